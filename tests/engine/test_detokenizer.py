"""Incremental detokenization: tokenizers' DecodeStream (fast tokenizers) gives the text the Python form gives, token
by token or several tokens at a step, with and without special tokens, for byte-level BPE (the default model's
tokenizer: characters split over tokens) and a SentencePiece-style decoder (byte fallback, a leading space stripped
at the start of a text but not after the prompt); tokenizers that clean up spaces keep the Python form."""

from __future__ import annotations

import random

import pytest

from shardllm.engine import detokenizer
from shardllm.engine.detokenizer import detokenize_incrementally, init_offsets, load_tokenizer
from shardllm.engine.request import Request
from shardllm.model_loader.default_model import default_model_path
from shardllm.sampling_params import SamplingParams


def _sentencepiece_tokenizer():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, **{f"<0x{b:02X}>": 2 + b for b in range(256)}, "\u2581hi": 258, "\u2581": 259,
             "h": 260, "i": 261, "hi": 262, "\u2581the": 263}
    backend = Tokenizer(models.BPE(vocab, [("h", "i"), ("\u2581", "hi")], unk_token="<unk>", byte_fallback=True))
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>")


@pytest.fixture(scope="module")
def tokenizers():
    return {"byte_level": load_tokenizer(default_model_path()), "sentencepiece": _sentencepiece_tokenizer()}


def _run(tok, prompt: list[int], output: list[int], skip: bool, burst: list[int], stream: bool) -> tuple[str, list]:
    """The text of `output` after `prompt`, fed `burst[i]` tokens at a time; and whether a DecodeStream ran."""
    req = Request("r", prompt, SamplingParams(skip_special_tokens=skip))
    init_offsets(req, tok if stream else None)
    deltas, i, k = [], 0, 0
    while i < len(output):
        n = burst[k % len(burst)]
        req.token_ids.extend(output[i:i + n])
        deltas.append(detokenize_incrementally(tok, req))
        i, k = i + n, k + 1
    assert "".join(deltas) == req.output_text  # the deltas add up to the text
    return req.output_text, req.decode_stream


def _boundary_cut(tok, seq: list[int], rng: random.Random) -> int:
    """A cut of `seq` that leaves the prompt ending on a whole character (text prompts always do)."""
    cuts = [c for c in range(1, len(seq) - 1) if not tok.decode(seq[:c]).endswith("\ufffd")]
    return rng.choice(cuts)


def _cases(tok, name: str, rng: random.Random):
    special = sorted(set(tok.all_special_ids))
    if name == "byte_level":  # real text with characters split over tokens; random ids after a text prompt
        texts = ["Hi 😀 café ✓ naïve", " The capital of France is Paris.", "日本語のテキスト、絵文字🎉🎉"]
        seqs = [tok.encode(t, add_special_tokens=False) for t in texts]
        seqs += [tok.encode("Once upon a time", add_special_tokens=False) + [rng.randrange(len(tok)) for _ in range(40)]
                 for _ in range(20)]
    else:
        emoji = [2 + b for b in "😀".encode()]
        seqs = [[258, 263, *emoji, 258, 262, 1, 258], [263, *emoji, *emoji, 259, 260, 261], [258, 263, 259, 0, 262]]
    for seq in seqs:
        cut = _boundary_cut(tok, seq, rng) if len(seq) < 30 else 4
        yield seq[:cut], seq[cut:] + ([special[0]] if special else [])


@pytest.mark.parametrize("name", ["byte_level", "sentencepiece"])
def test_decode_stream_equals_the_python_form(tokenizers, name):
    tok = tokenizers[name]
    rng = random.Random(0)
    checked = 0
    for prompt, output in _cases(tok, name, rng):
        for skip in (True, False):
            for burst in ([1], [3], [1, 2, 5]):
                ref, no_stream = _run(tok, prompt, output, skip, burst, stream=False)
                got, stream = _run(tok, prompt, output, skip, burst, stream=True)
                assert no_stream is None and stream is not None  # the stream ran to the end
                assert got == ref, (name, prompt, output, skip, burst)
                checked += 1
    assert checked >= 18


def test_the_python_form_takes_over_where_the_stream_refuses(tokenizers):
    """DecodeStream raises on some byte sequences ("Invalid prefix"): detokenization goes on in Python, no error
    (_run checks that the deltas, the stream's and then Python's, add up to the text). On such byte soup the two
    forms may differ (the Python form emits nothing while the text ends in an invalid byte), so only that is
    checked; text is where they must agree (the test above)."""
    tok = tokenizers["sentencepiece"]
    rng = random.Random(1)
    took_over = lasted = 0
    for _ in range(100):
        output = [rng.randrange(264) for _ in range(12)]
        for burst in ([1], [4]):
            text, stream = _run(tok, [258, 263], output, True, burst, stream=True)
            assert isinstance(text, str)
            took_over += stream is None
            lasted += stream is not None
    assert took_over > 0 and lasted > 0  # both cases were met


def test_sentencepiece_keeps_the_first_tokens_space(tokenizers):
    tok = tokenizers["sentencepiece"]
    # "▁hi" after a prompt is " hi" (decoded alone the decoder strips the space: the prompt gives the context)
    text, stream = _run(tok, [1, 263], [258, 258], True, [1], stream=True)
    assert stream is not None and text == " hi hi"
    assert tok.decode([258, 258]) == "hi hi"


def test_byte_level_text_equals_decoding_the_output(tokenizers):
    tok = tokenizers["byte_level"]
    ids = tok.encode("Say 😀 and ✓, then stop.", add_special_tokens=False)
    text, stream = _run(tok, ids[:3], ids[3:], True, [1], stream=True)
    assert stream is not None and text == tok.decode(ids[3:])


def test_python_form_where_the_tokenizers_decode_differs_from_its_backend(tokenizers, monkeypatch):
    """A tokenizer whose decode cleans up spaces (or decodes its own way) keeps the Python form; the probe runs once
    per tokenizer; the switch turns the stream off."""
    tok = tokenizers["byte_level"]
    decode = tok.decode
    monkeypatch.setattr(tok, "decode", lambda ids, **kw: decode(ids, **kw).replace(" .", ".").replace(" ,", ","))
    monkeypatch.setattr(tok, "_shardllm_stream_backend", False, raising=False)  # not probed yet
    assert _run(tok, [10, 11], [12, 13], True, [1], stream=True)[1] is None
    assert tok._shardllm_stream_backend is None  # the probe's answer, kept
    monkeypatch.setattr(tok, "decode", decode)
    monkeypatch.setattr(tok, "_shardllm_stream_backend", False)
    assert _run(tok, [10, 11], [12, 13], True, [1], stream=True)[1] is not None  # the real decode agrees
    monkeypatch.setattr(detokenizer.envs, "SHARDLLM_DECODE_STREAM", False)  # the switch
    assert _run(tok, [10, 11], [12, 13], True, [1], stream=True)[1] is None


def test_a_prompt_ending_inside_a_character_keeps_the_python_form(tokenizers):
    """Token-id prompts may end inside a character: the Python form (which drops that part) decodes the request."""
    tok = tokenizers["byte_level"]
    ids = tok.encode("Say 😀 and ✓ now", add_special_tokens=False)
    cut = next(c for c in range(1, len(ids)) if tok.decode(ids[:c]).endswith("\ufffd"))
    ref, _ = _run(tok, ids[:cut], ids[cut:], True, [1], stream=False)
    got, stream = _run(tok, ids[:cut], ids[cut:], True, [1], stream=True)
    assert stream is None and got == ref


@pytest.mark.parametrize("name", ["byte_level", "sentencepiece"])
def test_incremental_text_on_the_front_end_equals_the_engines_text(tokenizers, name):
    """IncrementalText (the server's API process makes the text of a request without stop strings) keeps only the
    prompt's last tokens, yet gives the engine's text (the Request form above, whole prompt), in every burst."""
    from shardllm.engine.detokenizer import IncrementalText

    tok = tokenizers[name]
    rng = random.Random(1)
    checked = 0
    # (and a SentencePiece output that starts with a word: its space shows only after a prompt)
    extra = [([258, 262], [263, 258, 262, 259, 263])] if name == "sentencepiece" else []
    for prompt, output in [*_cases(tok, name, rng), *extra]:
        prompt = [*(rng.randrange(len(tok)) for _ in range(8)), *prompt]  # longer than the context kept
        for skip in (True, False):
            params = SamplingParams(skip_special_tokens=skip)
            for burst in ([1], [2, 5]):
                ref, _ = _run(tok, prompt, output, skip, burst, stream=True)
                text = IncrementalText(prompt, params, tok)
                assert len(text.token_ids) <= 6
                pieces, i, k = [], 0, 0
                while i < len(output):
                    n = burst[k % len(burst)]
                    pieces.append(text.add(tok, output[i:i + n]))
                    i, k = i + n, k + 1
                assert "".join(pieces) == ref, (name, prompt, output, skip, burst)
                checked += 1
    assert checked >= 12
