"""The streamed chunks' encoder (one envelope a stream) writes the very bytes the whole-dict encoding writes, for
texts with quotes, escapes, newlines, non-ASCII and emoji, logprobs, every finish reason, and a model name that is
itself awkward JSON."""

import json
import random

import pytest

pytest.importorskip("fastapi")

from shardllm.entrypoints.openai.streaming import chunk_encoder, sse_event  # noqa: E402

TEXTS = ["", " Paris", 'say "hi"\n', "tab\tback\\slash", "naïve 日本 😀", "\u2028\x00\x1f", "}], \"usage\": null"]


@pytest.mark.parametrize("include_usage", [False, True])
@pytest.mark.parametrize("kind", ["text_completion", "chat.completion.chunk"])
def test_chunk_encoder_equals_the_whole_dict_encoding(kind, include_usage):
    rng = random.Random(0)
    for model in ("SmolLM2-135M-Instruct", 'we"ird\\name ✓', "choices"):
        envelope = {"id": "cmpl-1", "object": kind, "created": 1767225600, "model": model, "choices": None,
                    **({"usage": None} if include_usage else {})}
        encode = chunk_encoder(envelope)
        for _ in range(40):
            text = rng.choice(TEXTS) + rng.choice(TEXTS)
            finish = rng.choice([None, "stop", "length", "abort"])
            logprobs = rng.choice([None, {"tokens": [text], "token_logprobs": [-0.5], "top_logprobs": None}])
            choice = ({"index": rng.randrange(4), "text": text, "logprobs": logprobs, "finish_reason": finish}
                      if kind == "text_completion" else
                      {"index": 0, "delta": rng.choice([{}, {"content": text}]), "logprobs": logprobs,
                       "finish_reason": finish})
            got = encode(choice)
            assert got == sse_event({**envelope, "choices": [choice]})
            assert json.loads(got[len("data: "):])["choices"] == [choice]  # and it parses back to the same chunk
