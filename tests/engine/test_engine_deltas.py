"""The engine process sends each step's deltas (engine/core_proc.py) and the front end rebuilds the outputs from
them (engine/async_mp.py): step for step, the rebuilt outputs equal what LLMEngine.step returns on a twin engine
(text with stop strings held back, token ids, finish and stop reasons, logprobs, prompt logprobs, n > 1)."""

from __future__ import annotations

import math

import pytest

from shardllm.engine.async_mp import _State, apply_delta, apply_step_delta, build_output, detokenize_here
from shardllm.engine.core_proc import SeqDelta, make_delta, make_step_delta
from shardllm.engine.llm_engine import LLMEngine
from shardllm.model_loader.default_model import default_model_path
from shardllm.sampling_params import SamplingParams
from tests.helpers import write_text_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return write_text_checkpoint(str(tmp_path_factory.mktemp("ckpt") / "llama"))


def make_engine(checkpoint: str) -> LLMEngine:
    return LLMEngine.from_kwargs(model=checkpoint, tokenizer=default_model_path(), device="cpu", num_kv_blocks=128,
                                 max_seq_len=256)


def lp_values(entries) -> list | None:
    if entries is None:
        return None
    return [None if d is None else {t: round(lp.logprob, 6) for t, lp in d.items()} for d in entries]


def as_tuple(out) -> tuple:
    seqs = tuple((o.index, o.text, list(o.token_ids), o.finish_reason, o.stop_reason, lp_values(o.logprobs),
                  o.error) for o in out.outputs)
    return (out.request_id, out.finished, seqs, out.num_cached_tokens, lp_values(out.prompt_logprobs),
            out.metrics.first_token_time is not None)


REQUESTS = [
    ("plain", [5, 6, 7, 8], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)),
    ("stop", "The weather today", SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, stop=["e", "an"])),
    ("held", [20, 21, 22], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=["the end", "t the"])),
    ("n2", [9, 10, 11], SamplingParams(n=2, max_tokens=12, temperature=1.0, seed=3, ignore_eos=True, logprobs=2)),
    ("echo", [12, 13, 14, 15, 16], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=1,
                                                  prompt_logprobs=2)),
]


@pytest.mark.parametrize("frontend_detokenize", [True, False])
def test_rebuilt_outputs_equal_the_engines_step_for_step(checkpoint, frontend_detokenize):
    """As the engine process and the front end run (`_Core.run`, `ProcessAsyncLLM._apply`): a running request's
    plain-tuple delta where make_step_delta gives one, else make_delta's; with frontend_detokenize the requests
    without stop strings go to the engine with detokenize=False and the front end makes their text."""
    ref, sent = make_engine(checkpoint), make_engine(checkpoint)
    try:
        states, here = {}, set()
        for rid, prompt, params in REQUESTS:
            ref.add_request(rid, prompt, params, arrival_time=0.0)
            if detokenize_here(prompt, params, sent.tokenizer, frontend_detokenize):
                here.add(rid)
                sent.add_request(rid, prompt, params.clone(detokenize=False), arrival_time=0.0)
                states[rid] = _State(rid, prompt, params, tokenizer=sent.tokenizer)
            else:
                sent.add_request(rid, prompt, params, arrival_time=0.0)
                states[rid] = _State(rid, prompt, params)
        assert here == ({"plain", "n2", "echo"} if frontend_detokenize else set())
        steps = finished = fast = 0
        carried_prompt_logprobs = held_back = 0
        while ref.has_unfinished_requests():
            want = {out.request_id: as_tuple(out) for out in ref.step()}
            got = {}
            for pid in sent.step_progressed():
                tup = make_step_delta(sent, pid, 0)
                if tup is not None:
                    assert tup[0] == pid and (tup[2] == "" or pid not in here)  # the engine made no text
                    apply_step_delta(states[pid], tup, sent.tokenizer)
                    if pid == "held":
                        held_back += len(states[pid].seqs[0].text) < len(sent.sequences_of(pid)[0].output_text)
                    got[pid] = as_tuple(build_output(states[pid], sent.tokenizer))
                    fast += 1
                    continue
                d = make_delta(sent, pid)
                carried_prompt_logprobs += d.prompt_logprobs is not None
                if pid == "held" and not d.finished:
                    held_back += len(states[pid].seqs[0].text) + len(d.seqs[0].text) < len(
                        sent.sequences_of(pid)[0].output_text)
                apply_delta(states[pid], d, sent.tokenizer)
                out = build_output(states[pid], sent.tokenizer)
                got[pid] = as_tuple(out)
                finished += out.finished
            assert got == want, f"step {steps}"
            steps += 1
        assert finished == len(REQUESTS) and not sent.has_unfinished_requests() and steps >= 20
        assert fast >= 30  # most steps of "plain", "stop" and "held" took the tuple
        assert carried_prompt_logprobs == 1  # sent once, not every step
        assert held_back > 0  # some steps held back a tail that could still become a stop string
        assert all(sent.sequences_of(rid) is None for rid, _, _ in REQUESTS)  # released once finished
        stop = states["stop"].seqs[0]
        assert stop.finish_reason == "stop" and stop.stop_reason in ("e", "an")
        echo = build_output(states["echo"], sent.tokenizer)
        assert len(echo.prompt_logprobs) == 5 and echo.prompt_logprobs[0] is None
        assert all(math.isfinite(lp.logprob) and isinstance(lp.decoded_token, str)
                   for d in echo.prompt_logprobs[1:] for lp in d.values())
    finally:
        ref.shutdown()
        sent.shutdown()


def test_a_delta_that_resets_the_text_replaces_it():
    st = _State("r", [1, 2], SamplingParams(max_tokens=4))
    from shardllm.engine.core_proc import RequestDelta
    from shardllm.outputs import RequestMetrics

    def delta(text, reset, ids, finish=None):
        return RequestDelta("r", finish is not None, RequestMetrics(0.0), 0,
                            [SeqDelta(0, text, reset, ids, finish, None, None, None)])

    apply_delta(st, delta("Hello", False, [3]), None)
    apply_delta(st, delta(" wor", False, [4]), None)
    assert build_output(st, None).outputs[0].text == "Hello wor"
    apply_delta(st, delta("Help", True, [], "stop"), None)
    out = build_output(st, None)
    assert out.outputs[0].text == "Help" and out.outputs[0].token_ids == [3, 4] and out.finished


def test_frontend_detokenize_is_on_with_several_api_servers_unless_set(monkeypatch):
    from shardllm.engine.async_mp import frontend_detokenize

    monkeypatch.delenv("SHARDLLM_FRONTEND_DETOKENIZE", raising=False)
    assert [frontend_detokenize(n) for n in (1, 2, 4)] == [False, True, True]
    monkeypatch.setenv("SHARDLLM_FRONTEND_DETOKENIZE", "1")
    assert frontend_detokenize(1) and frontend_detokenize(2)
    monkeypatch.setenv("SHARDLLM_FRONTEND_DETOKENIZE", "0")
    assert not frontend_detokenize(1) and not frontend_detokenize(2)
