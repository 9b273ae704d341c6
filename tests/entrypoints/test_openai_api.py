"""The official `openai` client against a real server on the default model: completions and chat, streaming
and not, greedy streams equal to the non-streamed text, usage, n, stop, seed, logprobs."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.entrypoints.conftest import MODEL

PROMPT = "The capital of France is"
MESSAGES = [{"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url("/v1"), api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer():
    from shardllm.engine.detokenizer import load_tokenizer
    from shardllm.model_loader.default_model import default_model_path

    return load_tokenizer(default_model_path())


def test_models_version_health(server, client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx.get(server.url("/health")).status_code == 200
    assert httpx.get(server.url("/version")).json()["version"]


def test_completion_stream_equals_non_stream(client, tokenizer):
    full = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    choice = full.choices[0]
    assert choice.text and choice.finish_reason in ("stop", "length")
    assert full.usage.prompt_tokens == len(tokenizer.encode(PROMPT))
    if choice.finish_reason == "length":
        assert full.usage.completion_tokens == 12
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens

    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == choice.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()


def test_chat_stream_equals_non_stream(client, tokenizer):
    full = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0)
    msg = full.choices[0].message
    assert msg.role == "assistant" and msg.content
    expected_prompt = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    assert full.usage.prompt_tokens == len(tokenizer.encode(expected_prompt, add_special_tokens=False))

    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == msg.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()


def test_sse_wire_format_ends_with_done(server):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url("/v1/completions"), json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]" and events.count("data: [DONE]") == 1


def test_usage_counts_generated_tokens(client):
    # ignore_eos (a vLLM extension) makes the length exact; logprobs show one entry per generated token
    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=5, temperature=0,
                                         logprobs=True, extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 5 == len(out.choices[0].logprobs.content)


def test_n_seed_and_ignored_user(client):
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=1.0, seed=1234, n=2, user="someone",
              presence_penalty=0.3, frequency_penalty=0.3, top_p=0.9)
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert sorted(c.index for c in a.choices) == [0, 1]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert 2 <= a.usage.completion_tokens <= 12 and a.usage.prompt_tokens == b.usage.prompt_tokens


def test_stop_string_cuts_text(client):
    greedy = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    words = greedy.split()
    assert len(words) >= 2
    stop = words[1]
    cut = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == greedy[:greedy.index(stop)]
    streamed = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_logprobs(client):
    out = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == out.usage.completion_tokens
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 2 <= len(top) <= 3 and chosen == pytest.approx(max(top.values()))  # greedy picks the top one

    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0,
                                          logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(t.top_logprobs) == 3 and t.logprob <= 0 for t in content)

    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, temperature=0,
                                                 logprobs=True, top_logprobs=1, stream=True))
    streamed = [t.token for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert streamed == [t.token for t in content]


def test_batched_prompts_and_token_ids(client, tokenizer):
    ids = tokenizer.encode(PROMPT)
    out = client.completions.create(model=MODEL, prompt=[PROMPT, "Once upon a time"], max_tokens=4, temperature=0)
    assert sorted(c.index for c in out.choices) == [0, 1]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0)
    assert by_ids.choices[0].text == next(c.text for c in out.choices if c.index == 0)
    streamed = list(client.completions.create(model=MODEL, prompt=[ids, ids], max_tokens=4, temperature=0,
                                              stream=True))
    for index in (0, 1):
        assert "".join(c.choices[0].text for c in streamed if c.choices[0].index == index) == by_ids.choices[0].text
    echo = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0, echo=True)
    assert echo.choices[0].text.startswith(PROMPT)



# ---- issue 12's field reports, on the default model -----------------------------------------------------------
ALPHABET = "Here is the English alphabet: ABC"


def _stream_text(chunks, chat: bool = False) -> str:
    return "".join((c.choices[0].delta.content or "") if chat else c.choices[0].text for c in chunks if c.choices)


def test_stream_with_stop_strings_equals_the_text(client):
    kw = dict(model=MODEL, prompt=ALPHABET, stop=["DEFGHIJ"], temperature=0, max_tokens=20)
    full = client.completions.create(**kw).choices[0]
    assert (full.text, full.finish_reason) == ("", "stop")
    assert _stream_text(client.completions.create(**kw, stream=True)) == ""  # it once sent "DEFG"
    msgs = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]
    kw = dict(model=MODEL, messages=msgs, stop=["Observation:"], temperature=0, max_tokens=16)
    full = client.chat.completions.create(**kw).choices[0].message.content
    assert _stream_text(client.chat.completions.create(**kw, stream=True), chat=True) == full


def test_min_tokens_holds_back_a_stop_string(client):
    kw = dict(model=MODEL, prompt=ALPHABET, temperature=0, max_tokens=10, stop=["G"], extra_body={"min_tokens": 6})
    out = client.completions.create(**kw)
    assert out.usage.completion_tokens >= 6 and out.choices[0].text.startswith("DEFG")  # once "DEF" after 2 tokens
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert _stream_text(chunks) == out.choices[0].text and chunks[-1].usage.completion_tokens >= 6


def test_streamed_completion_logprobs_match_the_lists(client):
    kw = dict(model=MODEL, prompt="Hello, my name is", max_tokens=8, logprobs=0, stop=["XYZXYZ"], temperature=0)
    lp = client.completions.create(**kw).choices[0].logprobs
    chunks = [c.choices[0].logprobs for c in client.completions.create(**kw, stream=True) if c.choices[0].logprobs]
    assert [t for c in chunks for t in c.tokens] == lp.tokens
    assert [o for c in chunks for o in c.text_offset] == lp.text_offset  # once [0],[0],[1],[5],...
    assert [x for c in chunks for x in c.token_logprobs] == pytest.approx(lp.token_logprobs, abs=1e-4)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def _token_bytes(token: str) -> bytes:
    """A completions token back to bytes: `bytes:\\xf0\\x9f` for a partial character, else its UTF-8."""
    if token.startswith("bytes:"):
        return bytes(int(h, 16) for h in token[len("bytes:"):].split("\\x")[1:])
    return token.encode()


def test_logprob_bytes_rebuild_split_characters(client):
    msgs = [{"role": "user", "content": "Continue the pattern: 😀😀😀😀"}]
    out = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=8, temperature=0, logprobs=True,
                                         top_logprobs=2).choices[0]
    content = out.logprobs.content
    assert any(len(t.bytes) < 4 and t.bytes[0] >= 0xF0 for t in content)  # an emoji split over tokens
    assert all(t.bytes != [0xEF, 0xBF, 0xBD] for t in content)  # never the bytes of U+FFFD
    joined = b"".join(bytes(t.bytes) for t in content)
    assert joined.decode("utf-8", errors="ignore") == out.message.content  # a cut-off last character is dropped
    # completions: prompt tokens (echo) and generated ones spell partial characters as bytes:\xNN
    prompt = "Smileys: 😀😀"
    lp = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0, echo=True,
                                   logprobs=1).choices[0].logprobs
    assert any(t.startswith("bytes:") for t in lp.tokens)
    assert b"".join(_token_bytes(t) for t in lp.tokens).decode("utf-8", errors="ignore").startswith(prompt)
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
