"""Bad input gets a 4xx in OpenAI's error shape and the server keeps serving; the API key guards /v1/*."""

from __future__ import annotations

import asyncio
import json
import signal

import httpx
import openai
import pytest

from tests.entrypoints.conftest import MAX_SEQ_LEN, MODEL, RemoteServer

KEY = "test-secret"
AUTH = {"Authorization": f"Bearer {KEY}"}
LONG_PROMPT = "hello " * (MAX_SEQ_LEN + 10)  # more tokens than the context


@pytest.fixture(scope="module")
def server():
    srv = RemoteServer(env={"SHARDLLM_API_KEY": KEY})  # the key from the environment, not the flag
    yield srv
    rc = srv.stop(signal.SIGTERM)
    assert rc == 0, srv.log_tail()


def completion(**kw):
    return {"model": MODEL, "prompt": "Hello", "max_tokens": 2, **kw}


def chat(**kw):
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **kw}


def assert_error_shape(r: httpx.Response, status: int, param: str | None = None, code: str | None = None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["type"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err


# (endpoint, raw body or JSON, status, param, code)
BAD = [
    ("completions", b"{not json", 400, None, None),
    ("completions", b"[1, 2]", 400, None, None),
    ("chat/completions", b"", 400, None, None),
    ("completions", completion(max_tokens="5"), 400, "max_tokens", None),
    ("completions", completion(temperature="hot"), 400, "temperature", None),
    ("completions", completion(prompt=5), 400, "prompt", None),
    ("completions", completion(stream="yes"), 400, "stream", None),
    ("completions", completion(stop=3), 400, "stop", None),
    ("chat/completions", chat(messages="hi"), 400, "messages", None),
    ("chat/completions", chat(messages=[{"role": "wizard", "content": "x"}]), 400, "messages", None),
    ("chat/completions", chat(messages=[{"content": "no role"}]), 400, "messages", None),
    ("chat/completions", chat(messages=[]), 400, "messages", None),
    ("completions", {"model": MODEL}, 400, "prompt", None),
    ("completions", {"prompt": "no model"}, 400, "model", None),
    ("chat/completions", {"model": MODEL}, 400, "messages", None),
    ("completions", completion(max_tokens=0), 400, "max_tokens", None),
    ("completions", completion(max_tokens=-3), 400, "max_tokens", None),
    ("chat/completions", chat(max_completion_tokens=0), 400, "max_completion_tokens", None),
    ("completions", completion(temperature=2.5), 400, "temperature", None),
    ("chat/completions", chat(temperature=-0.1), 400, "temperature", None),
    ("completions", completion(top_p=0), 400, "top_p", None),
    ("completions", completion(n=0), 400, "n", None),
    ("completions", completion(logprobs=99), 400, "logprobs", None),
    ("chat/completions", chat(top_logprobs=2), 400, "top_logprobs", None),
    ("completions", completion(prompt=[]), 400, "prompt", None),
    ("completions", completion(prompt=[1, 10**9]), 400, "prompt", None),
    ("completions", completion(prompt=LONG_PROMPT), 400, None, "context_length_exceeded"),
    ("chat/completions", chat(messages=[{"role": "user", "content": LONG_PROMPT}]), 400, None,
     "context_length_exceeded"),
    ("completions", completion(max_tokens=MAX_SEQ_LEN), 400, "max_tokens", "context_length_exceeded"),
    ("completions", completion(model="gpt-9"), 404, "model", "model_not_found"),
    ("chat/completions", chat(model="gpt-9"), 404, "model", "model_not_found"),
    # lone UTF-16 surrogates: valid JSON escapes, not text (the echoed model name once made a 500)
    ("completions", b'{"model": "\\ud800", "prompt": "x"}', 400, "model", "invalid_json"),
    ("completions", f'{{"model": "{MODEL}", "prompt": "\\ud800"}}'.encode(), 400, "prompt", "invalid_json"),
    ("chat/completions", f'{{"model": "{MODEL}", "messages": [{{"role": "user", "content": "hi"}}], '
                         '"\\udfff": 1}'.encode(), 400, None, "invalid_json"),
    ("completions", b'{"max_tokens": ' + b"9" * 5000 + b"}", 400, None, "invalid_json"),
    ("completions", completion(logit_bias={"9" * 5000: 1}), 400, "logit_bias", None),
    ("completions", completion(stop=[f"s{i}" for i in range(65)]), 400, "stop", None),
    ("chat/completions", chat(stop="x" * 257), 400, "stop", None),
    ("completions", completion(stop_token_ids=list(range(1025))), 400, "stop_token_ids", None),
    ("completions", completion(stop_token_ids=[10**12]), 400, "stop_token_ids", None),
    ("completions", completion(stream_options={"include_usage": True}), 400, "stream_options", None),
    # long prompts: their head (max_model_len x the longest token spelling) tokenized first, refused on it
    ("completions", completion(prompt="a" * 400_000), 400, "prompt", "context_length_exceeded"),
    ("chat/completions", chat(messages=[{"role": "user", "content": "a" * 400_000}]), 400, "messages",
     "context_length_exceeded"),
]


def _post(server, endpoint, body, headers=AUTH, timeout=60):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    return httpx.post(server.url(f"/v1/{endpoint}"), headers=headers, timeout=timeout, **kw)


@pytest.mark.parametrize("endpoint,body,status,param,code", BAD,
                         ids=[f"{i}-{b[0]}" for i, b in enumerate(BAD)])
def test_bad_input(server, endpoint, body, status, param, code):
    assert_error_shape(_post(server, endpoint, body), status, param, code)


def test_server_keeps_serving_after_bad_input(server):
    r = _post(server, "completions", completion(max_tokens=3, temperature=0))
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    part = {"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}  # other keys of a part: ignored
    assert _post(server, "chat/completions", chat(messages=[{"role": "user", "content": [part]}])).status_code == 200
    assert httpx.get(server.url("/health")).status_code == 200


def test_null_fields_take_their_defaults(server):
    """OpenAI's nullable parameters: null is the default. Completions' max_tokens null is 16 tokens (not the rest of
    the context, a CPU-minute request); n, stream, echo, logprobs, min_tokens, ignore_eos, skip_special_tokens,
    stream_options' include_usage null are accepted; a required field sent as null is missing."""
    nulls = dict(n=None, stream=None, echo=None, logprobs=None, min_tokens=None, ignore_eos=None,
                 skip_special_tokens=None, seed=None, stop=None, temperature=0)
    r = _post(server, "completions", {"model": MODEL, "prompt": "Hello", "max_tokens": None, **nulls}, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["choices"]) == 1 and body["usage"]["completion_tokens"] <= 16
    r = _post(server, "chat/completions", chat(logprobs=None, top_logprobs=None, n=None, stream=None,
                                                stream_options=None, max_completion_tokens=None, temperature=0))
    assert r.status_code == 200 and len(r.json()["choices"]) == 1 and r.json()["choices"][0]["logprobs"] is None
    assert_error_shape(_post(server, "completions", completion(model=None)), 400, "model")
    assert_error_shape(_post(server, "chat/completions", chat(messages=None)), 400, "messages")


def test_unknown_route_and_method(server):
    assert_error_shape(httpx.get(server.url("/v1/nothing"), headers=AUTH), 404)
    assert_error_shape(httpx.get(server.url("/v1/completions"), headers=AUTH), 405)
    # a trailing slash is another path: no redirect (which came before the key check and echoed the Host)
    r = _post(server, "completions/", completion())
    assert_error_shape(r, 404)
    assert "'/v1/completions' is (without the trailing slash)" in r.json()["error"]["message"]
    r = httpx.get(server.url("/v1/nothing"), headers=AUTH)
    assert "/v1/chat/completions" in r.json()["error"]["message"] and "/health" in r.json()["error"]["message"]
    assert_error_shape(_post(server, "completions/", completion(), headers={}), 401)
    for path in ("/docs", "/redoc", "/openapi.json"):  # not served: they would sit outside the key
        assert_error_shape(httpx.get(server.url(path)), 404)


def test_head_probes(server):
    for path in ("/health", "/version", "/metrics"):
        r = httpx.head(server.url(path))
        assert r.status_code == 200 and r.content == b"", path
    assert httpx.head(server.url("/v1/models"), headers=AUTH).status_code == 200
    assert httpx.head(server.url("/v1/models")).status_code == 401


def test_huge_prompt_is_refused_on_its_head(server):
    r = _post(server, "completions", completion(prompt="a" * 400_000))
    assert_error_shape(r, 400, "prompt", "context_length_exceeded")
    assert "alone make" in r.json()["error"]["message"]  # refused on its head: the rest was not tokenized


def test_api_key(server):
    assert_error_shape(_post(server, "completions", completion(), headers={}), 401, code="invalid_api_key")
    bad = {"Authorization": "Bearer wrong"}
    assert_error_shape(_post(server, "chat/completions", chat(), headers=bad), 401, code="invalid_api_key")
    assert_error_shape(httpx.get(server.url("/v1/models")), 401)
    assert httpx.get(server.url("/health")).status_code == 200  # open without a key
    assert httpx.get(server.url("/metrics")).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url("/v1"), api_key="wrong", max_retries=0).models.list()
    ok = openai.OpenAI(base_url=server.url("/v1"), api_key=KEY, max_retries=0)
    assert ok.completions.create(model=MODEL, prompt="Hi", max_tokens=2).usage.completion_tokens >= 1


def test_openai_client_sees_bad_request(server):
    client = openai.OpenAI(base_url=server.url("/v1"), api_key=KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="Hi", max_tokens=0)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


def test_mixed_burst_of_bad_and_good_requests(server):
    """Bad requests fired together with good ones, streaming and not: every good one completes."""
    good = [("completions", completion(max_tokens=4, ignore_eos=True, temperature=0), False),
            ("chat/completions", chat(max_tokens=4, ignore_eos=True), False),
            ("completions", completion(max_tokens=4, ignore_eos=True, stream=True), True),
            ("chat/completions", chat(max_tokens=4, ignore_eos=True, stream=True), True)] * 3
    bad = [(endpoint, body, status) for endpoint, body, status, _, _ in BAD]

    async def send(client, endpoint, body, stream):
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        if not stream:
            r = await client.post(f"/v1/{endpoint}", **kw)
            return r.status_code, r.json()
        async with client.stream("POST", f"/v1/{endpoint}", **kw) as r:
            lines = [line async for line in r.aiter_lines() if line.startswith("data: ")]
            return r.status_code, lines

    async def burst():
        async with httpx.AsyncClient(base_url=server.base_url, headers=AUTH, timeout=120) as client:
            jobs = [send(client, e, b, s) for e, b, s in good] + [send(client, e, b, False) for e, b, _ in bad]
            return await asyncio.gather(*jobs)

    results = asyncio.run(burst())
    for (_, _, stream), (status, payload) in zip(good, results[:len(good)]):
        assert status == 200, payload
        if stream:
            # an error event, or a choice finished by one (not the substring: a sampled token may be "error")
            events = [json.loads(line[len("data: "):]) for line in payload[:-1]]
            errors = [e for e in events if "error" in e
                      or any(c.get("finish_reason") == "error" for c in e.get("choices", []))]
            assert payload[-1] == "data: [DONE]" and not errors, errors
        else:
            assert payload["usage"]["completion_tokens"] == 4
    for (_, _, status), (got, payload) in zip(bad, results[len(good):]):
        assert got == status and set(payload["error"]) == {"message", "type", "param", "code"}
