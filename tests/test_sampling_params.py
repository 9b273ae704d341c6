"""SamplingParams input validation: a value of the wrong type is a TypeError naming the field (a bool is no integer,
a float no count), a value out of range a ValueError naming it; numpy integers are taken as ints; valid input is
kept as it was. Token ids past the vocabulary are refused by the engine's add_request."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from shardllm import LLM, SamplingParams
from shardllm.sampling_params import _FLAG_FIELDS, _INTEGER_RULES, _NUMBER_FIELDS, _OPTIONAL_INTEGERS
from tests.conftest import TINY, write_tiny_checkpoint


def _proc(ids, logits):
    return logits


BAD = [
    # bools are no integers (logprobs=True failed in torch.topk; prompt_logprobs=True broke a model step)
    *[(dict(**{f: True}), TypeError, f) for f in ("logprobs", "prompt_logprobs", "top_k", "n", "max_tokens",
                                                   "min_tokens", "seed")],
    (dict(n=False), TypeError, "n"), (dict(top_k=False), TypeError, "top_k"),
    # floats and strings are no integers either
    (dict(max_tokens=2.0), TypeError, "max_tokens"), (dict(n=2.0), TypeError, "n"),
    (dict(logprobs=1.5), TypeError, "logprobs"), (dict(top_k="5"), TypeError, "top_k"),
    (dict(seed=1.0), TypeError, "seed"), (dict(n=None), TypeError, "n"),
    (dict(min_tokens=None), TypeError, "min_tokens"),
    # flags take only True or False (skip_special_tokens=None failed the request at detokenization)
    (dict(ignore_eos="no"), TypeError, "ignore_eos"), (dict(ignore_eos=2), TypeError, "ignore_eos"),
    (dict(skip_special_tokens=None), TypeError, "skip_special_tokens"), (dict(detokenize=1), TypeError, "detokenize"),
    # numbers: the type is checked before the range ('<=' not supported between str and float, unnamed)
    (dict(presence_penalty="1"), TypeError, "presence_penalty"), (dict(frequency_penalty=None), TypeError,
                                                                 "frequency_penalty"),
    (dict(repetition_penalty="1"), TypeError, "repetition_penalty"), (dict(temperature="0.7"), TypeError,
                                                                       "temperature"),
    (dict(temperature=None), TypeError, "temperature"), (dict(top_p=[1]), TypeError, "top_p"),
    (dict(min_p=True), TypeError, "min_p"), (dict(temperature=False), TypeError, "temperature"),
    # containers of the wrong type
    (dict(stop=5), TypeError, "stop"), (dict(stop=[5]), TypeError, "stop"), (dict(stop=["a", None]), TypeError, "stop"),
    (dict(stop=b"x"), TypeError, "stop"),
    (dict(stop_token_ids=5), TypeError, "stop_token_ids"), (dict(stop_token_ids=[True]), TypeError, "stop_token_ids"),
    (dict(stop_token_ids=[1.0]), TypeError, "stop_token_ids"), (dict(stop_token_ids="12"), TypeError,
                                                                "stop_token_ids"),
    (dict(logit_bias=[1, 2]), TypeError, "logit_bias"), (dict(logit_bias=5), TypeError, "logit_bias"),
    (dict(logit_bias={"5": 1.0}), TypeError, "logit_bias"), (dict(logit_bias={True: 1.0}), TypeError, "logit_bias"),
    (dict(logit_bias={5: "1"}), TypeError, "logit_bias"), (dict(logit_bias={5: None}), TypeError, "logit_bias"),
    (dict(logits_processors=_proc), TypeError, "logits_processors"),
    (dict(logits_processors=[_proc, 3]), TypeError, "logits_processors"),
    (dict(logits_processors=5), TypeError, "logits_processors"),
    # values out of range: ValueError naming the field, as before
    (dict(max_tokens=0), ValueError, "max_tokens"), (dict(min_tokens=-1), ValueError, "min_tokens"),
    (dict(min_tokens=5, max_tokens=2), ValueError, "min_tokens"), (dict(n=0), ValueError, "n"),
    (dict(top_k=-2), ValueError, "top_k"), (dict(logprobs=21), ValueError, "logprobs"),
    (dict(prompt_logprobs=-1), ValueError, "prompt_logprobs"), (dict(seed=2**63), ValueError, "seed"),
    (dict(temperature=math.nan), ValueError, "temperature"), (dict(top_p=math.inf), ValueError, "top_p"),
    (dict(min_p=math.nan), ValueError, "min_p"), (dict(presence_penalty=-math.inf), ValueError, "presence_penalty"),
    (dict(frequency_penalty=math.nan), ValueError, "frequency_penalty"),
    (dict(repetition_penalty=math.inf), ValueError, "repetition_penalty"),
    (dict(presence_penalty=np.float32(3)), ValueError, "presence_penalty"),
    (dict(stop=[""]), ValueError, "stop"), (dict(stop=""), ValueError, "stop"),
    (dict(stop_token_ids=[-1]), ValueError, "stop_token_ids"), (dict(logit_bias={-1: 1.0}), ValueError, "logit_bias"),
    (dict(logit_bias={5: 101}), ValueError, "logit_bias"), (dict(logit_bias={5: math.nan}), ValueError, "logit_bias"),
    (dict(logit_bias={5: 10**400}), ValueError, "logit_bias"),
]


# ids without object addresses (a function's repr differs between pytest-xdist's processes)
@pytest.mark.parametrize("kwargs, error, name", BAD, ids=[f"{i}-{n}" for i, (_, _, n) in enumerate(BAD)])
def test_bad_values_name_the_field(kwargs, error, name):
    with pytest.raises(error) as e:
        SamplingParams(**kwargs)
    assert type(e.value) is error
    # the message starts with the field's name (the server reports its first word as the OpenAI error's param)
    assert str(e.value).split(" ", 1)[0] == name, str(e.value)


def test_type_errors_say_what_the_field_takes():
    with pytest.raises(TypeError, match=r"logprobs must be an integer in \[0, 20\], or None, got bool True "
                                        r"\(a bool is not a number here\): pass an int"):
        SamplingParams(logprobs=True)
    with pytest.raises(TypeError, match="logits_processors must be a list of callables, got the single callable "
                                        "function .*: wrap it in a list"):
        SamplingParams(logits_processors=_proc)
    with pytest.raises(TypeError, match="stop must be a string or a list of strings, got int 5"):
        SamplingParams(stop=5)
    with pytest.raises(TypeError, match="logit_bias must be a dict of token id -> bias"):
        SamplingParams(logit_bias=[1, 2])
    with pytest.raises(TypeError, match="presence_penalty must be a number"):
        SamplingParams(presence_penalty="1")
    with pytest.raises(TypeError, match="skip_special_tokens must be True or False, got NoneType None"):
        SamplingParams(skip_special_tokens=None)


def test_every_scalar_field_is_type_checked():
    # a new int/float/bool field must join a list in sampling_params.py, or it would take any type
    typed = {f.name: f.type for f in dataclasses.fields(SamplingParams) if f.name != "eos_token_ids"}
    assert {n for n, t in typed.items() if t in ("int", "int | None")} == set(_INTEGER_RULES)
    assert {n for n, t in typed.items() if t == "int | None"} == set(_OPTIONAL_INTEGERS)
    assert {n for n, t in typed.items() if t == "float"} == set(_NUMBER_FIELDS)
    assert {n for n, t in typed.items() if t == "bool"} == set(_FLAG_FIELDS)


def test_numpy_scalars_are_numbers():
    p = SamplingParams(n=np.int64(2), max_tokens=np.int64(8), seed=np.int64(-3), min_tokens=np.int32(1),
                       top_k=np.int64(5), logprobs=np.int64(2), prompt_logprobs=np.uint8(1),
                       temperature=np.float32(0.5), top_p=np.float64(0.9), stop_token_ids=np.array([3, 4]),
                       logit_bias={np.int64(7): np.float32(1.5)})
    assert (p.n, p.max_tokens, p.seed, p.min_tokens, p.top_k, p.logprobs, p.prompt_logprobs) == (2, 8, -3, 1, 5, 2, 1)
    for v in (p.n, p.max_tokens, p.seed, p.min_tokens, p.top_k, p.logprobs, p.prompt_logprobs, *p.stop_token_ids,
              *p.logit_bias):
        assert type(v) is int
    assert type(p.temperature) is float and p.temperature == 0.5 and p.top_p == 0.9
    assert p.stop_token_ids == [3, 4] and p.logit_bias == {7: 1.5} and type(p.logit_bias[7]) is float
    assert p.child_seed(1) == -2 and p.clone(n=1).n == 1


def test_valid_input_is_kept_as_it_was():
    assert SamplingParams() == SamplingParams(
        max_tokens=16, min_tokens=0, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, seed=None, n=1, stop=[],
        stop_token_ids=[], ignore_eos=False, logprobs=None, prompt_logprobs=None, presence_penalty=0.0,
        frequency_penalty=0.0, repetition_penalty=1.0, skip_special_tokens=True, detokenize=True, logit_bias=None,
        logits_processors=None)
    p = SamplingParams(max_tokens=None, temperature=0, top_p=1, top_k=-1, min_p=1, seed=2**63 - 1, n=3,
                       stop="END", stop_token_ids=(5, 6), ignore_eos=True, logprobs=0, prompt_logprobs=20,
                       presence_penalty=-2, frequency_penalty=2.0, repetition_penalty=2, skip_special_tokens=False,
                       detokenize=False, logit_bias={0: -100, 9: 100.0}, logits_processors=(_proc,))
    assert p.max_tokens is None and p.temperature == 0 and type(p.temperature) is int and p.is_greedy
    assert (p.top_p, p.top_k, p.min_p, p.seed, p.n) == (1, -1, 1, 2**63 - 1, 3)
    assert p.stop == ["END"] and p.stop_token_ids == [5, 6] and p.logits_processors == [_proc]
    assert p.logit_bias == {0: -100, 9: 100.0} and (p.logprobs, p.prompt_logprobs) == (0, 20)
    assert (p.ignore_eos, p.skip_special_tokens, p.detokenize) == (True, False, False)
    assert p.needs_penalties and p.needs_output_tokens and p.child_seed(1) == -(2**63)
    # empty containers, as before: stops become [], an empty logit_bias / logits_processors None
    q = SamplingParams(stop=[], stop_token_ids=[], logit_bias={}, logits_processors=[])
    assert (q.stop, q.stop_token_ids, q.logit_bias, q.logits_processors) == ([], [], None, None)
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert p.clone() == p and dataclasses.replace(p, n=1).n == 1


def test_stop_token_ids_outside_the_vocabulary_are_refused(tmp_path):
    llm = LLM(write_tiny_checkpoint(str(tmp_path / "llama"), "llama"), device="cpu", num_kv_blocks=32, block_size=4,
              max_seq_len=32)
    try:
        vocab = TINY["vocab_size"]
        for ids in ([10**12], [1, vocab]):
            with pytest.raises(ValueError, match=rf"stop_token_ids \[{ids[-1]}\] are outside the vocabulary "
                                                 rf"\[0, {vocab}\)"):
                llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2, stop_token_ids=ids), use_tqdm=False)
        out = llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2, temperature=0, stop_token_ids=[vocab - 1]),
                           use_tqdm=False)[0].outputs[0]
        assert 1 <= len(out.token_ids) <= 2  # the engine still serves
    finally:
        llm.shutdown()
