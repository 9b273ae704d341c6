"""Attention over an FP8 KV cache with 16-bit queries runs its dots in fp16 (issue 13; on by default,
SHARDLLM_FP8_ATTN_F16_DOT=0 widens to bf16; always in the TMA kernel): the FP8 tiles widen to fp16 exactly, q carries
the softmax scale (and k_scale) into its one fp16 rounding. Checked against the fp32 oracle on the dequantized cache
under the interpreter, decode and prefill, e4m3 and e5m2, with and without k/v scales; on CUDA (gpu) beside the
bf16 widening too, with the tuned decode configs at the batch buckets the table holds."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from shardllm.layers.attention import triton_paged  # noqa: E402
from shardllm.layers.attention.triton_paged import DecodeConfig, decode_config  # noqa: E402
from tests.layers.test_triton_attention import cpu, gpu, make_case, reference, run_decode  # noqa: E402

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]


def fp8_case(fp8, q_lens, seq_lens, scaled, device="cpu", seed=0, nkv=2, group=4, head_dim=64):
    """bf16 queries over an FP8 cache (stored / scale when `scaled`); the oracle's fp32 dequantized cache."""
    q, kc, vc, meta = make_case(q_lens, seq_lens, nkv, group, head_dim, torch.float32, device, seed=seed)
    q = (q * 4).to(torch.bfloat16)  # |q| up to ~16: scores of a few tens, as trained models give
    ks, vs = (torch.tensor(0.37, device=device), torch.tensor(3.3, device=device)) if scaled else (None, None)
    kc8 = (kc * 3 / (ks if scaled else 1)).to(fp8)
    vc8 = (vc / (vs if scaled else 1)).to(fp8)
    deq = (kc8.float() * (ks if scaled else 1), vc8.float() * (vs if scaled else 1))
    return q, kc8, vc8, meta, ks, vs, deq


def errors(run, monkeypatch, q, deq, meta, flags=("1", "0")):
    """Max abs error against the fp32 oracle with fp16 dots (the default) and with bf16 widening (on
    CUDA only: the interpreter's bf16 widening of an FP8 tile is wrong by orders of magnitude, triton 3.6)."""
    ref = reference(q, *deq, meta)
    out = {"0": float("inf")}
    for flag in flags:
        monkeypatch.setenv("SHARDLLM_FP8_ATTN_F16_DOT", flag)
        out[flag] = (run().float() - ref).abs().max().item()
    return out["1"], out["0"], ref.abs().max().item()


def test_f16_dots_only_for_an_fp8_cache_under_16_bit_queries(monkeypatch):
    f = triton_paged._f16_dot
    monkeypatch.delenv("SHARDLLM_FP8_ATTN_F16_DOT", raising=False)
    assert f(torch.bfloat16, torch.float8_e4m3fn)  # on by default (8-11% faster on an H200)
    monkeypatch.setenv("SHARDLLM_FP8_ATTN_F16_DOT", "1")
    assert f(torch.bfloat16, torch.float8_e4m3fn) and f(torch.float16, torch.float8_e5m2)
    assert not f(torch.float32, torch.float8_e4m3fn)  # fp32 queries keep fp32 (tf32/ieee) dots
    assert not f(torch.bfloat16, torch.bfloat16)
    monkeypatch.setenv("SHARDLLM_FP8_ATTN_F16_DOT", "0")
    assert not f(torch.bfloat16, torch.float8_e4m3fn)


@cpu
@pytest.mark.parametrize("fp8", FP8, ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("scaled", [False, True], ids=["unscaled", "scaled"])
@pytest.mark.parametrize(("num_splits", "config"), [(1, DecodeConfig()), (2, DecodeConfig(block_n=32, early_v=True))],
                         ids=["one-split", "two-splits"])
def test_decode_f16_dots_match_the_oracle(monkeypatch, fp8, scaled, num_splits, config):
    q, kc8, vc8, meta, ks, vs, deq = fp8_case(fp8, [1, 1, 1], [40, 17, 1], scaled, seed=3)
    new, _, size = errors(lambda: run_decode(q, kc8, vc8, meta, num_splits=num_splits, config=config,
                                             k_scale=ks, v_scale=vs), monkeypatch, q, deq, meta, ("1",))
    assert new < 1e-2 * size, (new, size)  # the bf16 output's rounding and fp16 q/p, nothing more


@cpu
@pytest.mark.parametrize("fp8", FP8, ids=["e4m3", "e5m2"])
def test_prefill_f16_dots_match_the_oracle(monkeypatch, fp8):
    q, kc8, vc8, meta, ks, vs, deq = fp8_case(fp8, [5, 3, 1], [20, 3, 9], True, seed=4)  # chunks over context
    run = lambda: triton_paged.paged_prefill_attention(  # noqa: E731
        q, kc8, vc8, meta.query_start_loc, meta.seq_lens, meta.block_tables, meta.max_query_len, 64**-0.5,
        k_scale=ks, v_scale=vs)
    new, _, size = errors(run, monkeypatch, q, deq, meta, ("1",))
    assert new < 1e-2 * size, (new, size)


@gpu
@pytest.mark.timeout(120)
@pytest.mark.parametrize("fp8", FP8, ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("batch", [1, 64, 256, 512])
def test_gpu_decode_f16_dots_match_the_oracle(monkeypatch, fp8, batch):
    lens = [int(x) for x in torch.randint(1, 400, (batch,), generator=torch.Generator().manual_seed(batch))]
    q, kc8, vc8, meta, ks, vs, deq = fp8_case(fp8, [1] * batch, lens, True, "cuda", seed=batch, nkv=8, group=4,
                                              head_dim=128)
    cfg = decode_config(batch, 128, fp8)  # the tuned table's entry for this bucket
    new, old, size = errors(lambda: run_decode(q, kc8, vc8, meta, config=cfg, k_scale=ks, v_scale=vs),
                            monkeypatch, q, deq, meta)
    assert new < 1e-2 * size, (new, size)
    assert new <= old * 1.25 + 1e-3 * size, (new, old)  # no worse than widening to bf16
