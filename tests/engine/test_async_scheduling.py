"""Async scheduling: step k+1 is scheduled and launched before step k's tokens come back.

Decoding requests join the next batch with a placeholder token that the worker fills on the device. The
results must equal synchronous scheduling's exactly, no length-limited request may compute a token past
its end, and a request stopped by EOS or a stop string computes at most one token more than it returns.
"""

import pytest

from shardllm import LLM, SamplingParams
from shardllm.step_io import PLACEHOLDER

PROMPTS = [[5, 9, 13, 200, 17, 4, 4, 81], [7, 3], [250, 14, 88, 19, 201, 6, 6, 6, 42, 71, 300, 12, 9],
           [11] * 5, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [99, 98]]


@pytest.fixture(scope="module")
def path(tiny_checkpoints):
    return tiny_checkpoints["llama"]


def make(path, async_scheduling, **kw):
    kw = {"num_kv_blocks": 200, "block_size": 4, **kw}
    return LLM(path, device="cpu", async_scheduling=async_scheduling, **kw)


class Recorder:
    """Wraps the executor: keeps every submitted plan and the order of submits (S) and collects (C)."""

    def __init__(self, engine):
        ex = engine.executor
        self.plans, self.calls = [], []
        submit, collect = ex.submit, ex.collect

        def rec_submit(so):
            self.plans.append(so)
            self.calls.append("S")
            return submit(so)

        def rec_collect():
            self.calls.append("C")
            return collect()

        ex.submit, ex.collect = rec_submit, rec_collect

    def computed(self, req_id):
        return sum(len(s.token_ids) for so in self.plans for s in so.scheduled if s.req_id == req_id)

    def placeholders(self, req_id=None):
        return sum(s.token_ids.count(PLACEHOLDER) for so in self.plans for s in so.scheduled
                   if req_id is None or s.req_id == req_id)


def tokens(outs):
    return [o.outputs[0].token_ids for o in outs]


def test_async_equals_sync_and_overlaps(path):
    greedy = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    ref = tokens(make(path, False).generate(PROMPTS, greedy, use_tqdm=False))
    llm = make(path, True)
    rec = Recorder(llm.engine)
    outs = llm.generate(PROMPTS, greedy, use_tqdm=False)
    assert tokens(outs) == ref
    assert llm.engine.stats.max_in_flight == 2
    assert rec.placeholders() > 0
    assert "SS" in "".join(rec.calls)  # the next step went out before the last one was collected
    # length-limited requests compute exactly prompt + max_tokens - 1 tokens: nothing past the end
    for p, o in zip(PROMPTS, outs):
        assert rec.computed(o.request_id) == len(p) + 12 - 1
    assert llm.engine.kv_cache_manager.usage == 0.0


def test_sync_mode_never_overlaps(path):
    llm = make(path, False)
    rec = Recorder(llm.engine)
    llm.generate(PROMPTS, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True), use_tqdm=False)
    assert rec.placeholders() == 0 and "SS" not in "".join(rec.calls)
    assert llm.engine.stats.max_in_flight == 1


def test_joining_chunked_prefill_and_preemption_keep_tokens(path):
    greedy = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    ref = tokens(make(path, False).generate(PROMPTS, greedy, use_tqdm=False))

    def staggered(llm):
        engine, results, pending, step = llm.engine, {}, list(enumerate(PROMPTS)), 0
        while pending or engine.has_unfinished_requests():
            if pending and step % 3 == 0:
                i, p = pending.pop(0)
                engine.add_request(str(i), p, greedy)
            for out in engine.step():
                if out.finished:
                    results[int(out.request_id)] = out.outputs[0].token_ids
            step += 1
        return [results[i] for i in range(len(PROMPTS))]

    assert staggered(make(path, True, max_num_tokens=8)) == ref  # chunks of 8: prefill spans several steps
    small = make(path, True, num_kv_blocks=25, max_seq_len=64)  # too few blocks for all six: preemption
    assert tokens(small.generate(PROMPTS, greedy, use_tqdm=False)) == ref
    assert small.engine.stats.preemptions > 0
    assert small.engine.kv_cache_manager.usage == 0.0


def test_stops_found_a_step_late_are_cut_and_cost_at_most_one_token(path):
    probe = make(path, False).generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
                                       use_tqdm=False)
    # stop on each prompt's 4th greedy token, by stop_token_ids; then as if it were EOS
    params = [SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[o.outputs[0].token_ids[3]])
              for o in probe]
    ref = make(path, False).generate(PROMPTS, params, use_tqdm=False)
    llm = make(path, True)
    rec = Recorder(llm.engine)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert tokens(outs) == tokens(ref)
    assert [o.outputs[0].finish_reason for o in outs] == [o.outputs[0].finish_reason for o in ref]
    for p, o in zip(PROMPTS, outs):
        n_out = len(o.outputs[0].token_ids)
        assert len(p) + n_out - 1 <= rec.computed(o.request_id) <= len(p) + n_out
    assert llm.engine.kv_cache_manager.usage == 0.0


def test_seeded_sampling_equal_and_penalties_wait_for_their_tokens(path):
    params = [SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, top_k=20, seed=100 + i, ignore_eos=True)
              for i in range(len(PROMPTS))]
    params[1] = SamplingParams(max_tokens=10, temperature=0, repetition_penalty=1.5, presence_penalty=0.5,
                               ignore_eos=True)
    params[2] = SamplingParams(max_tokens=6, temperature=0, logprobs=3, ignore_eos=True)
    ref = make(path, False).generate(PROMPTS, params, use_tqdm=False)
    llm = make(path, True)
    rec = Recorder(llm.engine)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert tokens(outs) == tokens(ref)
    assert rec.placeholders(outs[1].request_id) == 0  # penalties read the tokens before: never a placeholder
    assert rec.placeholders(outs[0].request_id) > 0
    for a, b in zip(outs[2].outputs[0].logprobs, ref[2].outputs[0].logprobs):
        assert a.keys() == b.keys()
        assert all(abs(a[t].logprob - b[t].logprob) < 1e-5 for t in a)


def test_abort_in_flight_frees_blocks_and_others_finish(path):
    llm = make(path, True)
    engine = llm.engine
    greedy = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, greedy)
    for _ in range(4):
        engine.step()
    assert engine.scheduler.num_in_flight > 0
    engine.abort_request(["0", "3"])
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = len(out.outputs[0].token_ids)
    assert set(done) == {"1", "2", "4", "5"} and all(n == 20 for n in done.values())
    assert engine.kv_cache_manager.usage == 0.0


@pytest.mark.parametrize("tp,pp", [(1, 2), (2, 2)])
def test_pipeline_runs_ahead_with_tokens_sent_device_to_device(path, tp, pp):
    """With a pipeline, async scheduling is opt-in: a micro-batch's next step is queued before its tokens reach
    the host, and the first stage takes them from the last stage directly. Same tokens as one rank."""
    greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    ref = tokens(make(path, False).generate(PROMPTS, greedy, use_tqdm=False))
    default = make(path, None, pipeline_parallel_size=pp)
    try:
        assert not default.config.scheduler_config.async_scheduling  # off unless asked for
    finally:
        default.shutdown()
    llm = make(path, True, tensor_parallel_size=tp, pipeline_parallel_size=pp)
    try:
        rec = Recorder(llm.engine)
        assert tokens(llm.generate(PROMPTS, greedy, use_tqdm=False)) == ref
        assert rec.placeholders() > 0
        assert llm.engine.stats.max_in_flight == pp + 1
        for so in rec.plans:  # a request is in a batch at most once
            ids = [s.req_id for s in so.scheduled]
            assert len(ids) == len(set(ids))
        assert llm.engine.kv_cache_manager.usage == 0.0
    finally:
        llm.shutdown()


def test_tensor_parallel_random_sampling_every_rank_feeds_the_same_token(path):
    """Every tp rank samples its own copy of each token to fill its placeholders; with seeded random sampling
    the outputs equal synchronous scheduling's, so every rank fed the token the output rank returned."""
    params = [SamplingParams(max_tokens=10, temperature=1.0, top_p=0.95, seed=7 + i, ignore_eos=True)
              for i in range(len(PROMPTS))]
    outs = {}
    for overlap in (False, True):
        llm = make(path, overlap, tensor_parallel_size=2)
        try:
            outs[overlap] = tokens(llm.generate(PROMPTS, params, use_tqdm=False))
        finally:
            llm.shutdown()
    assert outs[True] == outs[False]
    assert len({tuple(t) for t in outs[True]}) > 1  # really sampled, not one degenerate sequence
