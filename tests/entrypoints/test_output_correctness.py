"""Output correctness through a real server (a tiny random model with the default model's tokenizer, so tokens
are fast and the text is varied): streams with stop strings are the non-streamed text, min_tokens holds every
stop back, streamed logprobs join into the non-streamed lists, echo returns prompt logprobs, and every body and
chunk of every shape-changing option conforms to OpenAI's schemas (tests/entrypoints/openai_schema.py)."""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from shardllm.model_loader.default_model import default_model_path
from tests.entrypoints import openai_schema as S
from tests.entrypoints.conftest import RemoteServer
from tests.helpers import write_text_checkpoint

VOCAB = 49152


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    path = write_text_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "llama"), VOCAB, max_position_embeddings=1024)
    server = RemoteServer([path, "--tokenizer", default_model_path()])
    server.model = httpx.get(server.url("/v1/models")).json()["data"][0]["id"]
    yield server
    assert server.stop() == 0, server.log_tail()


def post(srv, endpoint: str, body: dict) -> dict | list[dict]:
    """The JSON body, or for a stream the list of its events (checked to end with one [DONE])."""
    body = {"model": srv.model, **body}
    url = srv.url(f"/v1/{endpoint}")
    if not body.get("stream"):
        r = httpx.post(url, json=body, timeout=120)
        return {"status": r.status_code, **r.json()}
    with httpx.stream("POST", url, json=body, timeout=120) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert all(x.startswith("data: ") for x in lines) and lines[-1] == "data: [DONE]"
    assert lines.count("data: [DONE]") == 1
    return [json.loads(x[6:]) for x in lines[:-1]]


def post_all(srv, endpoint: str, bodies: list[dict]) -> list:
    """Send the requests at once (they share the engine's batches); the answers in order."""
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda b: post(srv, endpoint, b), bodies))


def streamed_text(endpoint: str, chunks: list[dict], index: int = 0) -> str:
    key = "text" if endpoint == "completions" else "content"
    parts = [c[key] if endpoint == "completions" else c["delta"].get("content") or ""
             for ch in chunks for c in ch["choices"] if c["index"] == index]
    return "".join(parts)


def final_text(endpoint: str, body: dict, index: int = 0) -> tuple[str, str]:
    c = next(c for c in body["choices"] if c["index"] == index)
    return (c["text"] if endpoint == "completions" else c["message"]["content"]), c["finish_reason"]


def finish(chunks: list[dict], index: int = 0) -> str:
    return [c["finish_reason"] for ch in chunks for c in ch["choices"] if c["index"] == index][-1]


def inputs(endpoint: str, rng: random.Random) -> dict:
    if endpoint == "completions":
        return {"prompt": [rng.randrange(20, VOCAB) for _ in range(6)]}
    words = " ".join(rng.choice(["red", "tea", "moon", "seven", "river", "Ω", "café"]) for _ in range(4))
    return {"messages": [{"role": "user", "content": words}]}


def stop_candidates(text: str, rng: random.Random) -> list[str]:
    cands = [text + "!", "\x00never\x00", text[-1:] or "x"]
    for _ in range(5):
        if len(text) >= 2:
            i = rng.randrange(len(text) - 1)
            cands.append(text[i:i + rng.randint(1, 6)])
    return cands


@pytest.mark.parametrize("endpoint", ["completions", "chat/completions"])
def test_stop_strings_stream_equals_the_text(srv, endpoint):
    rng = random.Random(hash(endpoint) % 1000)
    for _ in range(2):
        base = {**inputs(endpoint, rng), "max_tokens": 16, "temperature": 0, "ignore_eos": True}
        ref, _ = final_text(endpoint, post(srv, endpoint, base))
        cases = [(stop, stream) for stop in stop_candidates(ref, rng) for stream in (False, True)]
        results = post_all(srv, endpoint, [{**base, "stop": [stop], "stream": stream} for stop, stream in cases])
        for (stop, stream), res in zip(cases, results):
            i = ref.find(stop)
            want = (ref[:i], "stop") if i >= 0 else (ref, "length")
            got = (streamed_text(endpoint, res), finish(res)) if stream else final_text(endpoint, res)
            assert got == want, (stop, stream)


@pytest.mark.parametrize("endpoint", ["completions", "chat/completions"])
def test_min_tokens_holds_back_stop_strings(srv, endpoint):
    rng = random.Random(5)
    base = {**inputs(endpoint, rng), "max_tokens": 10, "temperature": 0, "ignore_eos": True}
    ref, _ = final_text(endpoint, post(srv, endpoint, base))
    stop = [ref[:1]]  # in the first token's text
    early = post(srv, endpoint, {**base, "stop": stop})
    assert final_text(endpoint, early) == ("", "stop") and early["usage"]["completion_tokens"] == 1
    for stream in (False, True):
        body = {**base, "stop": stop, "min_tokens": 6, "stream": stream,
                **({"stream_options": {"include_usage": True}} if stream else {})}  # only with stream (OpenAI's rule)
        res = post(srv, endpoint, body)
        usage = res[-1]["usage"] if stream else res["usage"]
        text = streamed_text(endpoint, res) if stream else final_text(endpoint, res)[0]
        assert usage["completion_tokens"] >= 6 and text.startswith(ref[:1])


def join_lists(parts: list[dict], keys: tuple[str, ...]) -> dict:
    return {k: [x for p in parts for x in p[k]] for k in keys}


def test_streamed_logprobs_join_into_the_non_streamed_lists(srv):
    rng = random.Random(9)
    keys = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
    for echo in (False, True):
        base = {**inputs("completions", rng), "max_tokens": 12, "temperature": 0, "ignore_eos": True,
                "logprobs": 2, "echo": echo}
        ref = final_text("completions", post(srv, "completions", base))[0]
        for stop in [ref[len(ref) // 2:len(ref) // 2 + 4] or "x", "\x00never"]:  # held back tails, or none
            full, chunks = post_all(srv, "completions", [{**base, "stop": [stop], "stream": s} for s in (False, True)])
            lp = full["choices"][0]["logprobs"]
            joined = join_lists([c["choices"][0]["logprobs"] for c in chunks if c["choices"][0]["logprobs"]], keys)
            assert joined["tokens"] == lp["tokens"] and joined["text_offset"] == lp["text_offset"]
            # the two ran in one batch: values agree to float rounding, not bit for bit
            assert joined["token_logprobs"] == pytest.approx(lp["token_logprobs"], abs=1e-4)
            assert [t and sorted(t) for t in joined["top_logprobs"]] == [t and sorted(t) for t in lp["top_logprobs"]]
            assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
            n_prompt = full["usage"]["prompt_tokens"] if echo else 0
            assert len(lp["tokens"]) == n_prompt + full["usage"]["completion_tokens"]
            if echo:  # the prompt's tokens lead, the first without a logprob (nothing comes before it)
                assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
                assert all(x <= 0 for x in lp["token_logprobs"][1:])
                assert all(len(t) >= 2 for t in lp["top_logprobs"][1:])
    chat = {**inputs("chat/completions", rng), "max_tokens": 12, "temperature": 0, "ignore_eos": True,
            "logprobs": True, "top_logprobs": 2, "stop": ["\x00never"]}
    full, chunks = post_all(srv, "chat/completions", [{**chat, "stream": s} for s in (False, True)])
    streamed = [t for c in chunks for ch in c["choices"] if ch["logprobs"] for t in ch["logprobs"]["content"]]
    content = full["choices"][0]["logprobs"]["content"]
    assert [(t["token"], t["bytes"]) for t in streamed] == [(t["token"], t["bytes"]) for t in content]
    assert [t["logprob"] for t in streamed] == pytest.approx([t["logprob"] for t in content], abs=1e-4)
    for t in streamed:  # a token's bytes are its text's, unless the token holds part of a character
        assert "\ufffd" in t["token"] or bytes(t["bytes"]) == t["token"].encode()


# ---- issue 20: every shape conforms ----------------------------------------------------------------------------
SHAPES = [
    {}, {"n": 2, "temperature": 1.0, "seed": 3}, {"stop": ["e"]},
    {"stream": True}, {"stream": True, "stream_options": {"include_usage": True}, "n": 2, "temperature": 1.0},
]
COMPLETION_SHAPES = SHAPES + [{"logprobs": 3}, {"echo": True}, {"echo": True, "logprobs": 1},
                              {"stream": True, "logprobs": 2, "echo": True}]
CHAT_SHAPES = SHAPES + [{"logprobs": True}, {"logprobs": True, "top_logprobs": 3},
                        {"stream": True, "logprobs": True, "top_logprobs": 2, "n": 2, "temperature": 1.0}]


CASES = {"completions": (COMPLETION_SHAPES, S.CreateCompletionResponse, S.CreateCompletionStreamResponse),
         "chat/completions": (CHAT_SHAPES, S.CreateChatCompletionResponse, S.CreateChatCompletionStreamResponse)}


def _logprobs_asked(body: dict) -> bool:
    return body.get("logprobs") not in (None, False)


@pytest.mark.parametrize("endpoint", list(CASES))
def test_every_body_and_chunk_conforms(srv, endpoint):
    shapes, schema, stream_schema = CASES[endpoint]
    rng = random.Random(11)
    bodies = [{**inputs(endpoint, rng), "max_tokens": 5, **shape} for shape in shapes]
    for body, res in zip(bodies, post_all(srv, endpoint, bodies)):
        n = body.get("n", 1)
        if body.get("stream"):
            for chunk in res:
                S.check(chunk, stream_schema)
            assert {c["index"] for ch in res for c in ch["choices"]} == set(range(n))
            assert res[-1]["usage"] is not None if "stream_options" in body else "usage" not in res[-1]
            continue
        assert res.pop("status") == 200
        S.check(res, schema)
        assert sorted(c["index"] for c in res["choices"]) == list(range(n))
        lp = res["choices"][0]["logprobs"]
        assert (lp is None) == (not _logprobs_asked(body))
        if body.get("top_logprobs"):
            assert all(len(t["top_logprobs"]) == body["top_logprobs"] for t in lp["content"])


def test_models_and_errors_conform(srv):
    S.check(httpx.get(srv.url("/v1/models")).json(), S.ListModelsResponse)
    S.check(httpx.get(srv.url(f"/v1/models/{srv.model}")).json(), S.Model)
    errors = [("completions", {"prompt": "hi", "max_tokens": -1}), ("completions", {"prompt": "hi", "model": "nope"}),
              ("chat/completions", {"messages": []}), ("chat/completions", {"messages": "hi"}),
              ("completions", {"prompt": "hi", "logprobs": 99})]
    for endpoint, body in errors:
        res = post(srv, endpoint, body)
        assert res.pop("status") in (400, 404)
        S.check(res, S.ErrorResponse)
    r = httpx.post(srv.url("/v1/completions"), content=b"{not json", timeout=30)
    assert r.status_code == 400
    S.check(r.json(), S.ErrorResponse)


def test_schema_check_catches_a_dropped_field():
    """The check itself: a body without a required (nullable) property, or with a wrong type, fails."""
    good = {"id": "x", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "finish_reason": "stop", "logprobs": None,
                         "message": {"role": "assistant", "content": "hi", "refusal": None}}]}
    S.check(good, S.CreateChatCompletionResponse)
    del good["choices"][0]["message"]["refusal"]
    with pytest.raises(AssertionError, match="refusal is required"):
        S.check(good, S.CreateChatCompletionResponse)
    with pytest.raises(AssertionError, match="created should be integer"):
        S.check({**good, "created": 1.5}, S.CreateChatCompletionResponse)
