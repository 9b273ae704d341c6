"""Start-up runs that compile the attention kernels' variants a run would otherwise compile in its middle: the decode
launch variants of mixed-step batch sizes that no CUDA-graph bucket takes (CPU: which sizes), and, on a GPU, a run
whose steps mix decodes with chunks compiles no attention, rotary or KV-write kernel after start-up."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shardllm.layers.attention import Attention, decode_configs
from shardllm.layers.attention import attention as attention_mod
from shardllm.layers.attention.decode_configs import decode_variant, set_decode_configs
from shardllm.worker.cuda_graph import batch_buckets, decode_warm_up_sizes


def model_with_cache(num_kv_heads: int = 2, head_dim: int = 32, block_size: int = 16) -> nn.Module:
    attn = Attention(4 * num_kv_heads, head_dim, num_kv_heads)
    attn.kv_cache = torch.zeros(2, 4, block_size, num_kv_heads, head_dim, dtype=torch.bfloat16)
    return nn.ModuleDict({"layer": attn})


@pytest.fixture
def table():
    """Sets a decode-config table for the test; the shipped one afterwards."""
    shipped = dict(decode_configs.DECODE_CONFIGS)
    yield set_decode_configs
    set_decode_configs(shipped)


@pytest.mark.parametrize("sms", [4, 132])
def test_warm_up_sizes_cover_every_decode_variant_the_buckets_miss(monkeypatch, table, sms):
    # a table bucket (33..40) that no CUDA-graph bucket (..., 32, 48, ...) falls in: those sizes take its config
    table({"bf16/32/32": {}, "bf16/32/40": {"num_warps": 2}, "bf16/32/512": {}})
    monkeypatch.setattr(decode_configs, "_num_sms", lambda device: sms)
    buckets, dev = batch_buckets(64), torch.device("cpu")

    def variant(n):
        return decode_variant(n, 2, 32, torch.bfloat16, 16, dev)

    sizes = decode_warm_up_sizes(model_with_cache(), buckets, 16, dev)
    assert 33 in sizes  # the first of 33..40: a config no bucket has
    covered = {variant(b) for b in buckets}
    extra = [variant(n) for n in sizes]
    assert len(set(extra)) == len(extra) and not covered & set(extra)  # each size a new variant, once
    assert {variant(n) for n in range(1, 65)} == covered | set(extra)  # together: every batch size's variant


def test_no_warm_up_without_a_cache_or_with_the_mixed_step_split_off(monkeypatch, table):
    table({"bf16/32/32": {}, "bf16/32/40": {"num_warps": 2}, "bf16/32/512": {}})
    buckets, dev = batch_buckets(64), torch.device("cpu")
    assert decode_warm_up_sizes(model_with_cache(), buckets, 16, dev)
    bare = model_with_cache()
    bare.layer.kv_cache = None
    assert decode_warm_up_sizes(bare, buckets, 16, dev) == []
    monkeypatch.setattr(attention_mod, "MIXED_STEP_DECODE_KERNEL", False)  # eager decodes only in mixed steps
    assert decode_warm_up_sizes(model_with_cache(), buckets, 16, dev) == []


KERNELS = {"_prefill_kernel", "_decode_kernel", "_decode_kernel_tma", "_decode_reduce_kernel", "_fused_rotary_kernel",
           "_write_kv_kernel"}


@pytest.mark.gpu
@pytest.mark.timeout(180)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_gpu_a_run_of_mixed_steps_compiles_no_attention_kernel_after_start_up(tiny_checkpoints, kv_cache_dtype):
    knobs = pytest.importorskip("triton").knobs
    from shardllm import LLM, SamplingParams

    # a 160-token step budget: prompts go in chunks while earlier ones decode (steps mixing both, of many shapes)
    llm = LLM(tiny_checkpoints["llama"], dtype="bfloat16", device="cuda", max_seq_len=256, max_batch_size=64,
              max_num_tokens=160, num_kv_blocks=2048, kv_cache_dtype=kv_cache_dtype)
    misses = []

    def hook(*, repr, compile, **_):  # a kernel's name and the arguments Triton assumed 16-byte aligned
        misses.append((repr.split("[")[0], sorted(k for k, v in compile["configs"][0].items() if v)))
        return False

    previous = knobs.runtime.jit_cache_hook
    knobs.runtime.jit_cache_hook = hook
    try:
        prompts = [[(5 * i + j) % 300 + 3 for j in range(1 + (37 * i) % 120)] for i in range(64)]  # 1-120 tokens
        outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), use_tqdm=False)
    finally:
        knobs.runtime.jit_cache_hook = previous
        llm.shutdown()
    assert [len(o.outputs[0].token_ids) for o in outs] == [12] * 64
    assert [m for m in misses if m[0] in KERNELS] == []
