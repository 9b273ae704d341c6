"""The server's request checks that run before pydantic (entrypoints/openai/validation.py): lone surrogates and
over-long numbers refused with the field named, the stop-condition bounds, and the prompt-length bound that lets
the server refuse a huge prompt without tokenizing it (checked against the default model's real tokenizer)."""

from __future__ import annotations

import random

import pytest

from shardllm.entrypoints.openai import validation
from shardllm.entrypoints.openai.protocol import APIError


@pytest.mark.parametrize("body, param", [
    (rb'{"model": "\ud800", "prompt": "x"}', "model"),
    (rb'{"model": "m", "messages": [{"role": "user", "content": "a\udc00b"}]}', "messages"),
    (rb'{"model": "m", "prompt": ["ok", "\udfff"]}', "prompt"),
    (rb'{"model": "m", "stream_options": {"\ud800": 1}}', "stream_options"),
    (rb'{"model": "m", "\ud800": 1}', None),  # a top-level key: its name cannot be shown as param
    (rb'{"model": "m", "stop": ["x", "\ud83d"]}', "stop"),  # a high surrogate without its pair
])
def test_lone_surrogates_are_refused_naming_the_field(body, param):
    with pytest.raises(APIError) as e:
        validation.parse_json_object(body)
    assert e.value.status_code == 400 and e.value.code == "invalid_json" and e.value.param == param
    assert "surrogate" in e.value.message
    e.value.message.encode("utf-8")  # the message itself is valid text


def test_valid_pairs_and_non_ascii_pass():
    data = validation.parse_json_object(rb'{"model": "m", "prompt": "\ud83d\ude00 caf\u00e9 \u4e2d"}')
    assert data["prompt"] == "\U0001F600 café 中"


def test_numbers_past_the_digit_limit_are_invalid_json():
    with pytest.raises(APIError) as e:
        validation.parse_json_object(b'{"max_tokens": ' + b"9" * 5000 + b"}")
    assert e.value.code == "invalid_json" and "4,300 digits" in e.value.message


def test_depth_limit_still_holds():
    ok = b'{"a": ' + b"[" * 63 + b"]" * 63 + b"}"
    validation.parse_json_object(ok)
    with pytest.raises(APIError, match="deeper than 64"):
        validation.parse_json_object(b'{"a": ' + b"[" * 64 + b"]" * 64 + b"}")


def test_stop_bounds():
    validation.check_stop(["x"] * validation.MAX_STOP_STRINGS, list(range(validation.MAX_STOP_TOKEN_IDS)))
    validation.check_stop("y" * validation.MAX_STOP_STRING_CHARS, None)
    validation.check_stop(None, None)
    for stop, ids, param in ((["x"] * (validation.MAX_STOP_STRINGS + 1), None, "stop"),
                             ("y" * (validation.MAX_STOP_STRING_CHARS + 1), None, "stop"),
                             (["ok", "z" * 1000], None, "stop"),
                             (None, list(range(validation.MAX_STOP_TOKEN_IDS + 1)), "stop_token_ids")):
        with pytest.raises(APIError) as e:
            validation.check_stop(stop, ids)
        assert e.value.param == param and "at most" in e.value.message


class _Vocab:
    def __init__(self, vocab):
        self.vocab = vocab

    def get_vocab(self):
        return self.vocab


def test_prompt_chars_bound_from_the_longest_spelling():
    assert validation.max_prompt_chars(_Vocab({"a": 0, "hello": 1, "\u2581the": 2}), 100) == 100 * 5
    assert validation.max_prompt_chars(_Vocab({}), 100) is None
    assert validation.max_prompt_chars(object(), 100) is None


def test_prompt_chars_bound_holds_for_the_default_tokenizer():
    """For the default model's tokenizer the head the server tokenizes first is long enough: no text of T tokens
    is longer than the bound for T (random mixes of words, spaces, digits, punctuation, emoji and CJK, and long
    runs of one character: the longest tokens), so a prompt that fits is never refused by its head."""
    pytest.importorskip("gguf")
    from shardllm.engine.detokenizer import load_tokenizer
    from shardllm.model_loader.default_model import default_model_path

    tok = load_tokenizer(default_model_path())
    per_token = validation.max_prompt_chars(tok, 1)  # L: the longest spelling, in characters
    assert per_token >= 1
    rng = random.Random(0)
    pieces = ["the", " ", "  ", "\n", "0123", "-", "=", "\t", "日本語", "\U0001F600", "é", "supercalifragilistic"]
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 300))) for _ in range(200)]
    texts += [c * 5000 for c in (" ", "-", "=", "\n", "a", "0", "\t", "_", "*")]
    for text in texts:
        tokens = len(tok.encode(text, add_special_tokens=False))
        assert len(text) <= tokens * per_token, (text[:40], tokens)
