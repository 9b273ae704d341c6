"""Decode attention's fused partition merge (triton_paged._decode_store with FUSED_REDUCE, batches of up to
FUSED_REDUCE_MAX_SEQS sequences): the last partition of each (sequence, kv head) merges the partials in the decode
kernel instead of a second launch. Same output as the separate reduce and the torch oracle, for the pointer and the
TMA kernel (a transposed V too), empty partitions and padding rows (zeros), and the counters back at zero after
every launch, so a replayed CUDA graph counts from zero again."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from shardllm.layers.attention import decode_configs, triton_paged  # noqa: E402
from shardllm.layers.attention.triton_paged import DecodeConfig, paged_decode_attention  # noqa: E402
from tests.layers.test_triton_attention import cpu, gpu, make_case, reference  # noqa: E402

POINTER = DecodeConfig(block_n=32)
TMA = DecodeConfig(tma=True, num_warps=2, num_stages=3, prefetch_pages=True)


def decode(q, kc, vc, meta, config, num_splits, fused: bool, monkeypatch, **kw) -> torch.Tensor:
    monkeypatch.setattr(decode_configs, "FUSED_REDUCE_MAX_SEQS", 16 if fused else 0)
    return paged_decode_attention(q, kc, vc, meta.block_tables, meta.seq_lens, q.shape[-1] ** -0.5, config=config,
                                  num_splits=num_splits, **kw)


def counters_at_zero(device) -> bool:
    t = triton_paged._counters.get(torch.device(device))
    return t is None or not t.any()


@cpu
@pytest.mark.parametrize("config", [POINTER, TMA], ids=["pointer", "tma"])
@pytest.mark.parametrize("num_splits", [2, 8])
@pytest.mark.parametrize("seq_lens", [[37], [37, 6, 16, 1], [200, 0, 3]], ids=["batch1", "ragged4", "padding-row"])
def test_fused_merge_equals_the_reduce_kernel(monkeypatch, config, num_splits, seq_lens):
    """A zero-length row (graph padding) has only empty partitions: zeros, as from the reduce kernel."""
    import tests.layers.test_triton_attention as attn_tests

    monkeypatch.setattr(attn_tests, "BLOCK_SIZE", 16)
    q, kc, vc, meta = make_case([1] * len(seq_lens), [max(s, 1) for s in seq_lens], 2, 4, 64)
    meta.seq_lens.copy_(torch.tensor(seq_lens, dtype=torch.int32))
    want = decode(q, kc, vc, meta, config, num_splits, False, monkeypatch)
    got = decode(q, kc, vc, meta, config, num_splits, True, monkeypatch)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    live = [b for b, s in enumerate(seq_lens) if s > 0]
    meta.seq_lens.clamp_(min=1)
    torch.testing.assert_close(got[live], reference(q, kc, vc, meta)[live], atol=2e-5, rtol=1e-4)
    for b, s in enumerate(seq_lens):
        if s == 0:
            assert torch.equal(got[b], torch.zeros_like(got[b]))
    assert counters_at_zero("cpu")


@cpu
def test_fused_merge_over_a_transposed_fp8_cache_with_scales(monkeypatch):
    """The TMA kernel's transposed-V path with an e4m3 cache and k/v scales (the partials carry v_scale)."""
    import tests.layers.test_triton_attention as attn_tests

    monkeypatch.setattr(attn_tests, "BLOCK_SIZE", 64)
    q, kc, vc, meta = make_case([1, 1], [150, 70], 2, 4, 64)
    kc, vc = (kc * 4).to(torch.float8_e4m3fn), (vc * 4).to(torch.float8_e4m3fn)
    vt = vc.permute(0, 2, 3, 1).contiguous()  # stored (num_blocks, nkv, D, block_size)
    scales = dict(k_scale=torch.tensor(0.25), v_scale=torch.tensor(0.5))
    want = decode(q, kc, vc, meta, TMA, 4, False, monkeypatch, **scales)
    got = decode(q, kc, vt, meta, TMA, 4, True, monkeypatch, v_transposed=True, **scales)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert counters_at_zero("cpu")


@cpu
def test_batches_past_the_limit_use_the_reduce_kernel(monkeypatch):
    calls = []
    real = triton_paged._decode_reduce_kernel
    monkeypatch.setattr(triton_paged, "_decode_reduce_kernel",
                        type("Spy", (), {"__getitem__": lambda self, grid: calls.append(grid) or real[grid]})())
    import tests.layers.test_triton_attention as attn_tests

    monkeypatch.setattr(attn_tests, "BLOCK_SIZE", 16)
    for n in (16, 17):
        q, kc, vc, meta = make_case([1] * n, [5 + b for b in range(n)], 1, 2, 64)
        decode(q, kc, vc, meta, POINTER, 2, True, monkeypatch)
    assert [g[0] for g in calls] == [17]  # 16 sequences merged in the decode kernel, 17 in the reduce kernel


@gpu
@pytest.mark.timeout(240)
@pytest.mark.parametrize("config", [POINTER, TMA], ids=["pointer", "tma"])
@pytest.mark.parametrize("batch", [1, 16])
def test_gpu_fused_merge_in_a_replayed_graph(monkeypatch, config, batch):
    """bf16 on CUDA, 32 partitions (batch 1's default), a CUDA graph replayed with new lengths 20 times: each replay
    equals the reduce kernel's result, so every launch left the counters at zero for the next."""
    import tests.layers.test_triton_attention as attn_tests

    if config.tma and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA needs sm90+")
    monkeypatch.setattr(attn_tests, "BLOCK_SIZE", 16)
    q, kc, vc, meta = make_case([1] * batch, [600] * batch, 8, 4, 128, torch.bfloat16, "cuda")
    lens = meta.seq_lens
    out = torch.empty_like(q)
    decode(q, kc, vc, meta, config, 32, True, monkeypatch, out=out)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode(q, kc, vc, meta, config, 32, True, monkeypatch, out=out)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        lens.copy_(torch.randint(1, 601, (batch,), generator=g, dtype=torch.int32))
        graph.replay()
        want = decode(q, kc, vc, meta, config, 32, False, monkeypatch)
        torch.testing.assert_close(out, want, atol=2e-2, rtol=2e-2)
    torch.cuda.synchronize()
    assert counters_at_zero("cuda")
