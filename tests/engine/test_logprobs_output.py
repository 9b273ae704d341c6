"""Logprobs in the engine's outputs: no token text decoded on the engine thread (each Logprob decodes on first read),
and a running request's logprobs handed out without copying the list each step. A tiny random model with the
default model's tokenizer, driven step by step as AsyncLLM drives it."""

from __future__ import annotations

import pickle
import sys

import pytest

from shardllm import LLM, SamplingParams
from shardllm.model_loader.default_model import default_model_path
from shardllm.outputs import Logprob, LogprobsSnapshot


class CountingTokenizer:
    """The real tokenizer, counting the calls of `decode` (every other attribute passes through)."""

    def __init__(self, tokenizer):
        self.__dict__["_tok"], self.__dict__["decodes"] = tokenizer, 0

    def decode(self, *args, **kwargs):
        self.__dict__["decodes"] += 1
        return self._tok.decode(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._tok, name)


@pytest.fixture(scope="module")
def llm(tiny_checkpoints):
    # the tiny model's 320 token ids are tokens of the default model's vocabulary too
    llm = LLM(tiny_checkpoints["llama"], tokenizer=default_model_path(), device="cpu", num_kv_blocks=64,
              max_seq_len=128)
    yield llm
    llm.shutdown()


def run_steps(engine, params: SamplingParams, prompt=(5, 9, 13, 200)) -> list:
    """Every output of one request, one per step (what AsyncLLM hands the server)."""
    engine.add_request("r", list(prompt), params)
    outs = []
    while engine.has_unfinished_requests():
        outs += [o.outputs[0] for o in engine.step()]
    return outs


def test_no_token_text_is_decoded_on_the_engine_thread(llm):
    engine = llm.engine
    real = engine.tokenizer
    engine.tokenizer = counting = CountingTokenizer(real)
    try:
        # detokenize=False: the output text is not made, so any decode would be the logprobs'
        outs = run_steps(engine, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=5,
                                                prompt_logprobs=3, detokenize=False))
    finally:
        engine.tokenizer = real
    final = outs[-1]
    assert len(final.logprobs) == 6 and counting.decodes == 0  # 6 tokens x 6 entries made, none decoded yet
    for token, entry in zip(final.token_ids, final.logprobs):
        assert token in entry and len(entry) in (5, 6)
        for t, lp in entry.items():  # read now, each decodes its own token, once
            assert lp.decoded_token == real.decode([t])
    assert counting.decodes == sum(len(e) for e in final.logprobs)
    lp = next(iter(final.logprobs[0].values()))
    assert lp.decoded_token is lp.decoded_token and counting.decodes == sum(len(e) for e in final.logprobs)


def test_logprob_equality_repr_and_pickle_decode_it():
    class Tok:
        def decode(self, ids):
            return f"<{ids[0]}>"

    lazy = Logprob(-0.5, tokenizer=Tok(), token_id=7)
    assert lazy == Logprob(-0.5, "<7>") and repr(lazy) == "Logprob(logprob=-0.5, decoded_token='<7>')"
    copy = pickle.loads(pickle.dumps(Logprob(-1.0, tokenizer=Tok(), token_id=3)))
    assert copy.decoded_token == "<3>" and copy._tokenizer is None  # the tokenizer never travels
    assert Logprob(-1.0).decoded_token is None  # no tokenizer: no text


def test_running_outputs_share_the_logprobs_instead_of_copying_them(llm):
    outs = run_steps(llm.engine, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=2))
    running, final = outs[:-1], outs[-1]
    assert len(running) == 19 and not any(o.finished for o in running) and final.finished
    assert type(final.logprobs) is list and len(final.logprobs) == 20  # finished: the request's own list
    for o in running:
        n = len(o.token_ids)
        assert isinstance(o.logprobs, LogprobsSnapshot) and len(o.logprobs) == n  # the entries of its step only,
        assert o.logprobs == final.logprobs[:n]  # though the list grew since, and the same entries (no copies)
        assert all(a is b for a, b in zip(o.logprobs, final.logprobs))
        assert o.logprobs[-1] is final.logprobs[n - 1] and o.logprobs[1:3] == final.logprobs[:n][1:3]
        with pytest.raises(IndexError):
            o.logprobs[n]
    # no copy per step: an output's logprobs take the same memory after 19 tokens as after 1
    assert sys.getsizeof(running[-1].logprobs) == sys.getsizeof(running[0].logprobs)
