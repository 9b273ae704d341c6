"""Issue 12 item 5 over HTTP: a fault while sampling one request (a logits processor that raises, put on requests
with max_tokens 7 by tests/entrypoints/fault_site/sitecustomize.py in the server process) answers that request
with a 500 in OpenAI's error shape (an error event in a stream), while requests running beside it get the tokens
they get alone, and the server stays healthy."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from shardllm.model_loader.default_model import default_model_path
from tests.entrypoints.conftest import RemoteServer
from tests.helpers import write_text_checkpoint

FAULT_SITE = os.path.join(os.path.dirname(__file__), "fault_site")
GOOD = [{"prompt": p, "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        for p in ("The sky is", "Once upon a time", "1, 2, 3,")]


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    path = write_text_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "llama"), 49152, max_position_embeddings=1024)
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {"PYTHONPATH": os.pathsep.join([FAULT_SITE, root, os.environ.get("PYTHONPATH", "")])}
    server = RemoteServer([path, "--tokenizer", default_model_path()], env=env)
    yield server
    assert server.stop() == 0, server.log_tail()


def _post(srv, endpoint: str, body: dict):
    url = srv.url(f"/v1/{endpoint}")
    if not body.get("stream"):
        r = httpx.post(url, json={"model": "m", **body}, timeout=120)
        return r.status_code, r.json()
    with httpx.stream("POST", url, json={"model": "m", **body}, timeout=120) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return r.status_code, [json.loads(e) for e in events[:-1]]


def _model(srv) -> str:
    return httpx.get(srv.url("/v1/models")).json()["data"][0]["id"]


def test_a_fault_in_one_request_fails_it_alone(srv):
    model = _model(srv)
    good = [{**b, "model": model} for b in GOOD]
    alone = [_post(srv, "completions", b) for b in good]
    assert all(status == 200 for status, _ in alone)
    faulty = [("completions", {"model": model, "prompt": "Hello", "max_tokens": 7, "temperature": 0}),
              ("chat/completions", {"model": model, "messages": [{"role": "user", "content": "Hi"}],
                                    "max_tokens": 7, "stream": True}),
              ("completions", {"model": model, "prompt": "Hello", "max_tokens": 7, "n": 2, "temperature": 0.8})]
    jobs = [("completions", b) for b in good] + faulty
    with ThreadPoolExecutor(len(jobs)) as pool:  # all at once: they share the engine's batches
        results = list(pool.map(lambda job: _post(srv, *job), jobs))
    beside, (plain, streamed, with_n) = results[:len(good)], results[len(good):]
    for (status, body), (_, ref) in zip(beside, alone):
        assert status == 200 and body["choices"][0]["text"] == ref["choices"][0]["text"]
    for status, body in (plain, with_n):
        assert status == 500, body
        assert body["error"]["type"] == "server_error" and "logits processor exploded" in body["error"]["message"]
        assert set(body["error"]) == {"message", "type", "param", "code"}
    status, events = streamed
    assert status == 200 and "error" in events[-1], events[-3:]  # the stream ends with an error event
    assert "logits processor exploded" in events[-1]["error"]["message"]
    # the engine serves on
    assert httpx.get(srv.url("/health")).status_code == 200
    again = _post(srv, "completions", good[0])
    assert again[0] == 200 and again[1]["choices"][0]["text"] == alone[0][1]["choices"][0]["text"]
