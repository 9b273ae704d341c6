"""FP8 KV cache: the Triton kernels read an e4m3 cache as the torch reference does, the engine holds twice the
tokens of a bf16 cache in the same memory, and greedy tokens stay close to the bf16 cache's."""

from __future__ import annotations

import pytest
import torch

from shardllm import LLM, SamplingParams
from tests.layers.test_triton_attention import INTERPRET, make_case, reference, run_decode, run_prefill

PROMPTS = [[1, 17, 33, 5, 9, 101, 7], [3, 4], [250, 14, 88, 19, 201, 6, 6, 6, 42, 71, 300, 12, 9]]
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.mark.skipif(not INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1 before triton_paged's import")
@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_triton_kernels_read_an_fp8_cache_like_the_reference(fp8):
    q, kc, vc, meta = make_case([1, 1], [40, 17], 2, 4, 64, seed=3)
    kc8, vc8 = kc.to(fp8), vc.to(fp8)
    ref = reference(q, kc8, vc8, meta)  # the reference on the fp8 values read back
    torch.testing.assert_close(run_decode(q, kc8, vc8, meta, num_splits=2), ref, atol=2e-5, rtol=1e-4)
    q, kc, vc, meta = make_case([5, 3], [20, 3], 2, 4, 64, seed=4)
    kc8, vc8 = kc.to(fp8), vc.to(fp8)
    torch.testing.assert_close(run_prefill(q, kc8, vc8, meta), reference(q, kc8, vc8, meta), atol=2e-5, rtol=1e-4)


def test_fp8_cache_doubles_capacity_and_keeps_greedy_tokens_close(tiny_checkpoints):
    runs = {}
    for kv in ("auto", "fp8"):
        llm = LLM(tiny_checkpoints["llama"], device="cpu", dtype="bfloat16", cpu_kv_cache_gb=0.001, block_size=4,
                  kv_cache_dtype=kv)
        try:
            caches = llm.engine.executor.worker.model_runner.kv_caches
            assert caches[0].dtype == (torch.bfloat16 if kv == "auto" else torch.float8_e4m3fn)
            runs[kv] = (llm.engine.num_blocks,
                        [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)])
        finally:
            llm.shutdown()
    assert abs(runs["fp8"][0] - 2 * runs["auto"][0]) <= 1  # the same budget floor-divided by half the bytes
    same = sum(a == b for x, y in zip(runs["auto"][1], runs["fp8"][1]) for a, b in zip(x, y))
    assert same >= 0.5 * 3 * 8  # bf16 model, 3-bit-mantissa cache: most tokens unchanged


def test_unknown_kv_cache_dtype_names_the_choices():
    with pytest.raises(ValueError, match=r"kv_cache_dtype 'int8'.*fp8_e5m2"):
        LLM(None, device="cpu", kv_cache_dtype="int8")
