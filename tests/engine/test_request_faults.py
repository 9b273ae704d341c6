"""A fault while processing one request (its sampling) fails that request alone: the engine and the other
requests run on, with the tokens they would have had without it. The fault is real: a logits processor that
raises on the sampling rank. (logit_bias on tensor-parallel ranks: tests/entrypoints/test_dead_worker.py.)"""

from __future__ import annotations

import asyncio

import pytest
import torch

from shardllm import LLM, SamplingParams
from shardllm.engine.async_llm import AsyncLLM, RequestFailedError

PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]


def explode_after_two(output_ids: list[int], logits):
    """A logits processor that fails at the third token (module level: it pickles to worker processes)."""
    if len(output_ids) >= 2:
        raise RuntimeError("logits processor exploded")
    return logits


def _greedy(**kw) -> SamplingParams:
    return SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, **kw)


def _seeded(seed: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=6, temperature=1.0, seed=seed, ignore_eos=True, **kw)


def test_raising_logits_processor_fails_only_its_request(tiny_checkpoints):
    llm = LLM(tiny_checkpoints["llama"], device="cpu", num_kv_blocks=100, block_size=4)
    try:
        good = [_greedy(), _seeded(3)]
        ref = llm.generate([PROMPTS[0], PROMPTS[2]], good, use_tqdm=False)
        outs = llm.generate(PROMPTS, [good[0], _greedy(logits_processors=[explode_after_two]), good[1]],
                            use_tqdm=False)
        assert [o.outputs[0].token_ids for o in (outs[0], outs[2])] == [o.outputs[0].token_ids for o in ref]
        bad = outs[1].outputs[0]
        assert bad.finish_reason == "error" and "logits processor exploded" in bad.error
        assert len(bad.token_ids) == 2  # the tokens before the fault
        # the engine serves on; logit_bias reaches the sampling ranks: +100 makes token 42 every token
        again = llm.generate([PROMPTS[1]], _greedy(logit_bias={42: 100.0}), use_tqdm=False)
        assert again[0].outputs[0].token_ids == [42] * 6
        assert llm.engine.kv_cache_manager.usage == 0.0
    finally:
        llm.shutdown()


def test_async_llm_fails_the_request_and_keeps_serving(tiny_checkpoints):
    engine = AsyncLLM.from_kwargs(model=tiny_checkpoints["llama"], device="cpu", num_kv_blocks=100, block_size=4)

    async def run(prompt, params, rid):
        try:
            final = None
            async for out in engine.generate(prompt, params, rid):
                final = out
            return final.outputs[0].token_ids
        except RequestFailedError as e:
            return e

    async def main():
        a = await run(PROMPTS[0], _greedy(), "ref")
        results = await asyncio.gather(run(PROMPTS[0], _greedy(), "a"),
                                       run(PROMPTS[1], _greedy(logits_processors=[explode_after_two]), "b"),
                                       run(PROMPTS[2], _seeded(1, n=2), "c"))
        after = await run(PROMPTS[0], _greedy(), "d")
        return a, results, after

    try:
        ref, (a, b, c), after = asyncio.run(main())
        assert a == ref and after == ref
        assert isinstance(b, RequestFailedError) and "logits processor exploded" in str(b)
        assert isinstance(c, list) and len(c) == 6
        assert engine.is_healthy and engine.snapshot.finished.get("error") == 1
    finally:
        engine.shutdown()


@pytest.mark.gpu
@pytest.mark.multi_gpu  # tp = 2 where two GPUs are visible (the suite's serial pass), else tp = 1
@pytest.mark.timeout(120)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fault_isolation_and_logit_bias_on_gpus(tiny_checkpoints):
    """On GPUs, with CUDA graphs and async scheduling (every tp rank samples): the same as on CPU."""
    tp = 2 if torch.cuda.device_count() >= 2 else 1
    # 3 requests: 8 graph buckets' worth of batch (4 graphs, not 20) and 256 KV blocks (not ~30M: a tiny model's
    # cache sized from an H200's free memory is slow to build) test the same paths
    llm = LLM(tiny_checkpoints["llama"], device="cuda", tensor_parallel_size=tp, max_batch_size=8,
              num_kv_blocks=256)
    try:
        ref = llm.generate([PROMPTS[0], PROMPTS[2]], [_greedy(), _seeded(3)], use_tqdm=False)
        outs = llm.generate(PROMPTS, [_greedy(), _greedy(logits_processors=[explode_after_two]), _seeded(3)],
                            use_tqdm=False)
        assert [o.outputs[0].token_ids for o in (outs[0], outs[2])] == [o.outputs[0].token_ids for o in ref]
        assert outs[1].outputs[0].finish_reason == "error"
        forced = llm.generate([PROMPTS[1]], _seeded(5, logit_bias={42: 100.0}), use_tqdm=False)
        assert forced[0].outputs[0].token_ids == [42] * 6
    finally:
        llm.shutdown()


def _raise_after(token: int, output_ids: list[int], logits):
    """Fails the one child whose first token is `token` (module level: it pickles)."""
    if output_ids[:1] == [token]:
        raise RuntimeError("logits processor exploded")
    return logits


def test_a_failed_child_aborts_its_sibling_once(tiny_checkpoints):
    """n = 2, one child's sampling fails: it ends with "error", its sibling with "abort", each counted once (the
    sibling, processed after the failure in the same step, was counted twice and could turn into "stop")."""
    import functools

    llm = LLM(tiny_checkpoints["llama"], device="cpu", num_kv_blocks=100, block_size=4)
    try:
        for seed in range(1, 20):  # a seed whose two children start differently
            sp = dict(n=2, max_tokens=6, temperature=1.0, seed=seed, ignore_eos=True)
            firsts = [o.token_ids[0] for o in llm.generate([PROMPTS[0]], SamplingParams(**sp),
                                                           use_tqdm=False)[0].outputs]
            if firsts[0] != firsts[1]:
                break
        before = dict(llm.engine.stats.finished)
        proc = functools.partial(_raise_after, firsts[0])
        out = llm.generate([PROMPTS[0]], SamplingParams(**sp, logits_processors=[proc]), use_tqdm=False)[0]
        assert [o.finish_reason for o in out.outputs] == ["error", "abort"]
        after = llm.engine.stats.finished
        delta = {k: after.get(k, 0) - before.get(k, 0) for k in after}
        assert {k: v for k, v in delta.items() if v} == {"error": 1, "abort": 1}, delta
        assert llm.engine.kv_cache_manager.usage == 0.0
    finally:
        llm.shutdown()
