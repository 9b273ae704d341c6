"""Start-up runs that compile the attention kernels' variants a run would otherwise compile in its middle: the decode
launch variants of mixed-step batch sizes that no CUDA-graph bucket takes (CPU: which sizes), and, on a GPU, a run
whose steps mix decodes with chunks compiles no attention, rotary or KV-write kernel after start-up."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from shardllm.layers.attention import Attention, decode_configs
from shardllm.layers.attention import attention as attention_mod
from shardllm.layers.attention.decode_configs import decode_variant, set_decode_configs
from shardllm.worker.cuda_graph import batch_buckets
from shardllm.worker.kernel_warm_up import decode_warm_up_sizes


def model_with_cache(num_kv_heads: int = 2, head_dim: int = 32, block_size: int = 16, layers: int = 1) -> nn.Module:
    """Attention layers with caches; layer i has head_dim x 2^i (models whose layers differ)."""
    mods = {}
    for i in range(layers):
        attn = Attention(4 * num_kv_heads, head_dim << i, num_kv_heads)
        attn.kv_cache = torch.zeros(2, 4, block_size, num_kv_heads, head_dim << i, dtype=torch.bfloat16)
        mods[f"layer{i}"] = attn
    return nn.ModuleDict(mods)


@pytest.fixture
def table():
    """Sets a decode-config table for the test; the shipped one afterwards."""
    shipped = dict(decode_configs.DECODE_CONFIGS)
    yield set_decode_configs
    set_decode_configs(shipped)


# a table bucket (33..40) that no CUDA-graph bucket (..., 32, 48, ...) falls in: those sizes take its config
SKEWED = {"bf16/32/32": {}, "bf16/32/40": {"num_warps": 2}, "bf16/32/512": {}}


@pytest.mark.parametrize("sms", [4, 132])
def test_warm_up_sizes_cover_every_decode_variant_the_buckets_miss(monkeypatch, table, sms):
    table(SKEWED)
    monkeypatch.setattr(decode_configs, "_num_sms", lambda device: sms)
    buckets, dev = batch_buckets(64), torch.device("cpu")

    def variant(n):
        return decode_variant(n, 2, 32, torch.bfloat16, 16, dev)

    sizes = decode_warm_up_sizes(model_with_cache(), buckets, 64, 16, dev)
    assert 33 in sizes  # the first of 33..40: a config no bucket has
    covered = {variant(b) for b in buckets}
    extra = [variant(n) for n in sizes]
    assert len(set(extra)) == len(extra) and not covered & set(extra)  # each size a new variant, once
    assert {variant(n) for n in range(1, 65)} == covered | set(extra)  # together: every batch size's variant
    # without graphs (nothing covered): one size per variant of 1..64, each the smallest taking it
    alone = decode_warm_up_sizes(model_with_cache(), [], 64, 16, dev)
    assert [variant(n) for n in alone] == list(dict.fromkeys(variant(n) for n in range(1, 65)))


def test_warm_up_sizes_cover_each_layer_shape_and_need_a_cache(table):
    table({**SKEWED, "bf16/64/16": {}, "bf16/64/20": {"num_warps": 8}, "bf16/64/512": {}})  # head_dim 64: 17..20
    buckets, dev = batch_buckets(64), torch.device("cpu")
    two = decode_warm_up_sizes(model_with_cache(layers=2), buckets, 64, 16, dev)
    one = decode_warm_up_sizes(model_with_cache(layers=1), buckets, 64, 16, dev)
    assert 17 in two and 17 not in one and 33 in one  # each layer shape's skewed bucket
    for shape_dim in (32, 64):
        want = {decode_variant(n, 2, shape_dim, torch.bfloat16, 16, dev) for n in range(1, 65)}
        got = {decode_variant(n, 2, shape_dim, torch.bfloat16, 16, dev) for n in buckets + two}
        assert got == want, shape_dim
    bare = model_with_cache()
    bare.layer0.kv_cache = None
    assert decode_warm_up_sizes(bare, buckets, 64, 16, dev) == []


def test_runner_warms_decodes_eagerly_without_graphs_and_with_them_only_for_mixed_steps(monkeypatch, tiny_checkpoints):
    from shardllm import LLM

    llm = LLM(tiny_checkpoints["llama"], device="cpu", num_kv_blocks=100, block_size=4, max_batch_size=16)
    try:
        runner = llm.engine.executor.worker.model_runner
        assert runner.graph_runner is None  # CPU: every decode step eager, so every variant
        eager = runner.warm_up_decode_sizes()
        assert eager and eager[0] == 1 and eager == sorted(eager)
        monkeypatch.setattr(runner, "graph_runner", SimpleNamespace(buckets=batch_buckets(16)))
        monkeypatch.setattr(attention_mod, "DECODE_FUSED_ROTARY", 0)  # every bucket ran the plain launch
        graphed = runner.warm_up_decode_sizes()
        assert set(graphed) < set(eager) or not graphed  # the buckets ran the rest
        monkeypatch.setattr(attention_mod, "DECODE_FUSED_ROTARY", 10 ** 6)  # every bucket ran the fused launch only
        assert runner.warm_up_decode_sizes() == eager
        monkeypatch.setattr(attention_mod, "DECODE_FUSED_ROTARY", 4)  # buckets of 1-4 rows did
        below = runner.warm_up_decode_sizes()
        assert set(graphed) <= set(below) <= set(eager)
        assert below == decode_warm_up_sizes(runner.model, [b for b in batch_buckets(16) if b > 4], 16,
                                             runner.block_size, runner.device)
        monkeypatch.setattr(attention_mod, "DECODE_FUSED_ROTARY", 0)
        assert runner.warm_up_decode_sizes() == graphed
        monkeypatch.setattr(attention_mod, "MIXED_STEP_DECODE_KERNEL", False)  # with graphs, eager decodes: mixed only
        assert runner.warm_up_decode_sizes() == []
        caches = [c.clone() for c in runner.kv_caches]
        monkeypatch.setattr(runner, "graph_runner", None)
        decode, tiles = runner.warm_up_kernels()
        assert decode == eager and tiles == runner.warm_up_prefill_tiles()
        for before, after in zip(caches, runner.kv_caches):  # only the padding block 0 written
            assert torch.equal(before[:, 1:], after[:, 1:])
    finally:
        llm.shutdown()


KERNELS = {"_prefill_kernel", "_decode_kernel", "_decode_kernel_tma", "_decode_reduce_kernel", "_fused_rotary_kernel",
           "_write_kv_kernel", "_argmax_chunk_kernel", "_argmax_merge_kernel"}


@pytest.mark.gpu
@pytest.mark.timeout(180)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_gpu_a_run_of_mixed_steps_compiles_no_attention_kernel_after_start_up(tiny_checkpoints, kv_cache_dtype):
    knobs = pytest.importorskip("triton").knobs
    from shardllm import LLM, SamplingParams
    from shardllm.layers import argmax, triton_ops
    from shardllm.layers.attention import triton_decode_tma, triton_paged

    # Triton keeps what this process compiled (earlier tests ran this model): forget it, so that the variants the
    # start-up does not compile would be met again here, not found in memory
    for kernel in (triton_paged._prefill_kernel, triton_paged._decode_kernel, triton_paged._decode_reduce_kernel,
                   triton_paged._write_kv_kernel, triton_decode_tma._decode_kernel_tma,
                   triton_ops._fused_rotary_kernel, argmax._argmax_chunk_kernel, argmax._argmax_merge_kernel):
        assert {kernel.fn.__name__} <= KERNELS and hasattr(kernel, "device_caches")
        kernel.device_caches.clear()
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
