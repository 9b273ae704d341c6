"""Issue 12's robustness items against a real server: parameters checked at the edge with their real ranges,
values that round to nothing in float32, unsupported fields, nested JSON, the operator's limits (body size,
sequences per request, read and keep-alive timeouts, the API key from a file) and client disconnects."""

from __future__ import annotations

import random
import signal
import socket
import threading
import time

import httpx
import pytest

from tests.entrypoints.conftest import MODEL, RemoteServer

KEY = "key-from-a-file"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BODY = 1_000_000
MAX_SEQS = 8
READ_TIMEOUT_S = 1


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    key_file = tmp_path_factory.mktemp("key") / "api_key"
    key_file.write_text(f"  {KEY}\n")
    srv = RemoteServer(["--api_key_file", str(key_file), "--max_request_body_bytes", str(MAX_BODY),
                        "--max_seqs_per_request", str(MAX_SEQS), "--request_read_timeout", str(READ_TIMEOUT_S),
                        "--timeout_keep_alive", "1", "--log_level", "info"])
    assert KEY not in " ".join(srv.proc.args)  # the key is not on the command line (`ps` shows that)
    yield srv
    rc = srv.stop(signal.SIGTERM)
    assert rc == 0, srv.log_tail()


def test_server_logs_where_it_listens(server):
    with open(server.log.name) as f:  # at --log_level info, once it listens (it is healthy by now)
        assert f"shardllm: serving on http://127.0.0.1:{server.port}\n" in f.read()


def post(server, body, endpoint="completions", headers=AUTH, **kw) -> httpx.Response:
    kw.setdefault("timeout", 120)
    if isinstance(body, (bytes, str)):
        return httpx.post(server.url(f"/v1/{endpoint}"), content=body, headers=headers, **kw)
    return httpx.post(server.url(f"/v1/{endpoint}"), json=body, headers=headers, **kw)


def completion(**kw) -> dict:
    return {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 4, "temperature": 0, **kw}


def chat(**kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Name three colors."}], "max_tokens": 4,
            "temperature": 0, **kw}


def assert_error(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert param is None or err["param"] == param, err
    assert code is None or err["code"] == code, err
    return err


# ---- item 5: every parameter checked at the edge, with its real range -----------------------------------------
OUT_OF_RANGE = [
    (completion(seed=2**64), "seed"), (completion(seed=-(2**63) - 1), "seed"), (chat(seed=2**63), "seed"),
    (completion(logit_bias={"5": 101}), "logit_bias"), (completion(logit_bias={"-1": 1}), "logit_bias"),
    (completion(logit_bias={"abc": 1}), "logit_bias"), (chat(logit_bias={str(10**9): 1}), "logit_bias"),
    (completion(n=129), "n"), (completion(top_k=-2), "top_k"), (completion(min_p=1.5), "min_p"),
    (completion(repetition_penalty=0), "repetition_penalty"), (completion(presence_penalty=2.5), "presence_penalty"),
    (completion(frequency_penalty=-3), "frequency_penalty"), (completion(min_tokens=5, max_tokens=2), "min_tokens"),
    (completion(stop_token_ids=[-1]), "stop_token_ids"), (chat(max_tokens=10**30), "max_tokens"),
]


@pytest.mark.parametrize("body,param", OUT_OF_RANGE, ids=[p for _, p in OUT_OF_RANGE])
def test_out_of_range_parameters_are_400(server, body, param):
    endpoint = "chat/completions" if "messages" in body else "completions"
    assert_error(post(server, body, endpoint), 400, param)


def test_non_finite_numbers_are_400(server):
    for text in ('"temperature": NaN', '"top_p": Infinity', '"presence_penalty": -Infinity'):
        body = f'{{"model": "{MODEL}", "prompt": "Hi", "max_tokens": 2, {text}}}'
        assert_error(post(server, body), 400)


def test_edge_values_inside_the_range_run_and_the_engine_survives(server):
    # the largest seed with n = 2 (seed + 1 wraps), a huge top_k, and the other edges, all in one burst
    bodies = [completion(seed=2**63 - 1, n=2, temperature=1.0), completion(seed=-(2**63), temperature=1.0),
              completion(top_k=10**30, temperature=1.0), chat(n=2, seed=0, temperature=1.0, top_p=1e-46),
              completion(min_p=1.0, temperature=1.0), completion(logit_bias={"0": -100, "1": 100.0})]
    results = [None] * len(bodies)

    def send(i):
        endpoint = "chat/completions" if "messages" in bodies[i] else "completions"
        results[i] = post(server, bodies[i], endpoint)

    _together(send, len(bodies))
    for r in results:
        assert r.status_code == 200, r.text
    assert httpx.get(server.url("/health")).status_code == 200


# ---- item 10: sampling keeps the most likely token; underflowing values do not become infinities ---------------
def test_tiny_top_p_and_min_p_one_are_greedy(server):
    greedy = post(server, completion(max_tokens=6)).json()["choices"][0]["text"]
    extras = [{"top_p": 1e-46}, {"top_p": 1e-300, "seed": 5}, {"min_p": 1.0}, {"top_k": 1}]
    texts = [None] * len(extras)

    def send(i):
        texts[i] = post(server, completion(max_tokens=6, temperature=1.0, **extras[i])).json()["choices"][0]["text"]

    _together(send, len(extras))
    assert texts == [greedy] * len(extras)


def _together(fn, n: int) -> None:
    """fn(0) ... fn(n - 1), each in its own thread, at the same time."""
    threads = [threading.Thread(target=fn, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_repetition_penalty_that_underflows_emits_no_special_token(server):
    texts = []
    for penalty in (1e-46, 1e-30):  # 1e-46 is 0 in float32; it acts as the smallest penalty that stays finite
        r = post(server, chat(repetition_penalty=penalty, max_tokens=6, skip_special_tokens=False, ignore_eos=True),
                 "chat/completions")
        assert r.status_code == 200, r.text
        texts.append(r.json()["choices"][0]["message"]["content"])
    assert "<|" not in texts[0] and texts[0] == texts[1], texts


# ---- item 12: unsupported fields are refused, never dropped ----------------------------------------------------
@pytest.mark.parametrize("field,value", [("tools", [{"type": "function", "function": {"name": "f"}}]),
                                         ("response_format", {"type": "json_object"}), ("functions", [{}]),
                                         ("parallel_tool_calls", True), ("no_such_field", 1)])
def test_unsupported_fields_are_400(server, field, value):
    assert_error(post(server, chat(**{field: value}), "chat/completions"), 400, field, "unsupported_parameter")


def test_null_fields_and_stream_options_extras(server):
    assert post(server, chat(tools=None, user=None), "chat/completions").status_code == 200
    assert_error(post(server, completion(stream=True, stream_options={"include_usage": True, "extra": 1})), 400,
                 "stream_options.extra", "unsupported_parameter")  # refused as an unknown top-level field is


# ---- item 9: nested JSON -------------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [70, 100_000])
def test_deeply_nested_json_is_400(server, depth):
    body = f'{{"model": "{MODEL}", "prompt": ' + "[" * depth + "]" * depth + "}"
    assert_error(post(server, body), 400, code="invalid_json")
    assert_error(post(server, f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "x", '
                              f'"name": {"[" * depth + "]" * depth}}}]}}', "chat/completions"), 400)


# ---- item 13 + 8: operator limits ------------------------------------------------------------------------------
def test_sequences_per_request_are_capped(server):
    assert_error(post(server, completion(prompt=["a", "b", "c"], n=3, max_tokens=1)), 400, "prompt")
    assert_error(post(server, chat(n=MAX_SEQS + 1, max_tokens=1), "chat/completions"), 400, "n")
    ok = post(server, completion(prompt=["a", "b"], n=MAX_SEQS // 2, max_tokens=1, temperature=1.0))
    assert ok.status_code == 200 and len(ok.json()["choices"]) == MAX_SEQS


def _raw(server: RemoteServer, data: bytes, timeout: float = 30) -> tuple[bytes, float]:
    """Send raw bytes; return what the server answered until it closed, and how long that took."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=timeout) as s:
        s.sendall(data)
        start, chunks = time.monotonic(), []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks), time.monotonic() - start


def test_body_over_the_limit_is_413_before_it_is_read(server):
    # Content-Length says 100 MB and no body byte is ever sent: the answer cannot have waited for it
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {100 * 2**20}\r\n\r\n").encode()
    answer, _ = _raw(server, head)
    assert answer.startswith(b"HTTP/1.1 413") and b"request_too_large" in answer
    # a chunked body has no length: it is cut off as it passes the limit
    body = completion(prompt="x " * MAX_BODY)
    r = httpx.post(server.url("/v1/completions"), headers=AUTH, timeout=60,
                   content=iter([httpx.Request("POST", "/", json=body).content]))
    assert_error(r, 413, code="request_too_large")


def test_half_sent_and_idle_connections_are_closed(server):
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Length: 500\r\n\r\n"
    partial = [b"", b"POST /v1/compl", head.encode() + b'{"model": ']
    answers = [None] * len(partial)

    def send(i):
        answers[i] = _raw(server, partial[i])[0]

    _together(send, len(partial))  # each would wait forever (the socket's 30 s timeout) if the server kept it open
    assert answers == [b""] * len(partial)  # closed by the read deadline, not answered
    # a kept-alive connection, idle after its answer, is closed too (uvicorn's timeout_keep_alive)
    get = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    answer, _ = _raw(server, get)
    assert answer.startswith(b"HTTP/1.1 200")


def test_client_disconnect_is_a_brief_info_line(server):
    head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Length: 500\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(head.encode() + b'{"model": ')
        time.sleep(0.3)
    with httpx.stream("POST", server.url("/v1/completions"), json=completion(stream=True), headers=AUTH) as r:
        assert list(r.iter_lines())[-2] == "data: [DONE]"  # a stream read to its end is no disconnect
    body = completion(max_tokens=200, ignore_eos=True, stream=True)
    with httpx.stream("POST", server.url("/v1/completions"), json=body, headers=AUTH, timeout=60) as r:
        next(r.iter_lines())  # one event, then hang up mid-stream
    with socket.create_connection(("127.0.0.1", server.port)) as s:  # and mid-wait, without streaming
        payload = httpx.Request("POST", "/", json=completion(max_tokens=200, ignore_eos=True)).content
        s.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\nContent-Length: "
                  f"{len(payload)}\r\n\r\n".encode() + payload)
        time.sleep(0.5)
    deadline = time.monotonic() + 20
    events = ("disconnected while sending its request", "disconnected while waiting for its answer",
              "disconnected during the stream of cmpl-")
    while not all(e in server.log_tail(20000) for e in events) and time.monotonic() < deadline:
        time.sleep(0.2)
    log = server.log_tail(20000)
    assert all(e in log for e in events), log[-3000:]
    assert log.count("disconnected during the stream") == 1
    assert "Traceback" not in log and " ERROR " not in log, log[-3000:]


def test_health_answers_while_huge_messages_are_tokenized(server):
    """Sixteen messages far past the context: tokenized one after another in the tokenizer's thread (up to
    validation.max_prompt_chars, about 83,000 characters at this context, each), then refused by their token
    count, while /health keeps answering."""
    words = ["alpha", "river", "seven", "blue", "house"]
    rng = random.Random(0)
    content = " ".join(rng.choice(words) for _ in range(150_000 // 6))
    results = []

    def big():
        results.append(post(server, chat(messages=[{"role": "user", "content": content}]), "chat/completions"))

    threads = [threading.Thread(target=big, daemon=True) for _ in range(16)]  # seconds of the tokenizer's time
    for t in threads:
        t.start()
    answered = 0
    while any(t.is_alive() for t in threads):
        if httpx.get(server.url("/health"), timeout=30).status_code == 200 and any(t.is_alive() for t in threads):
            answered += 1
        time.sleep(0.05)
    assert len(results) == 16
    for r in results:  # refused by their token count (of their first max_model_len x L characters)
        assert_error(r, 400, code="context_length_exceeded")
    assert answered >= 2  # /health kept answering while the messages were tokenized


# ---- item 13: the API key from a file; unknown /v1 paths ask for it before saying 404 --------------------------
def test_api_key_from_file_and_unknown_paths(server):
    assert_error(post(server, completion(), headers={}), 401, code="invalid_api_key")
    assert post(server, completion()).status_code == 200
    for path in ("/v1/nothing", "/v1/embeddings", "/v1/models/x/y/z"):
        assert_error(httpx.get(server.url(path)), 401, code="invalid_api_key")
        assert_error(httpx.post(server.url(path)), 401, code="invalid_api_key")
    assert_error(httpx.get(server.url("/v1/nothing"), headers=AUTH), 404)
    assert_error(httpx.get(server.url("/v1/completions"), headers=AUTH), 405)
    assert httpx.get(server.url("/health")).status_code == 200
