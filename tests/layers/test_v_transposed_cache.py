"""A V cache stored (num_blocks, nkv, D, block_size) (SHARDLLM_KV_V_TRANSPOSED, Attention.v_transposed): the KV
writers, the prefill kernel, the pointer decode kernel and the TMA decode kernel's transposed-V path give the same
attention and the same (logical) cache contents as the standard layout, under the interpreter on CPU; the writers
store a non-finite v as 0 there (its decode reads slots past a sequence's end unmasked); the runner applies the
switch only to an FP8 cache on an sm90+ GPU."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from shardllm.layers import triton_ops  # noqa: E402
from shardllm.layers.attention import triton_paged  # noqa: E402
from shardllm.layers.attention.triton_paged import DecodeConfig  # noqa: E402
from tests.layers.test_fp8_kv_kernel_scales import (  # noqa: E402, F401
    attention_case,
    attention_kernels_on_cpu,
    exact_fp8_casts,
)
from tests.layers.test_triton_attention import cpu, gpu  # noqa: E402

STEPS = {"decode": ([1, 1, 1], [37, 6, 16]), "prefill": ([4, 7], [4, 30]), "mixed": ([1, 1, 5], [40, 17, 9]),
         "chunks": ([20, 9], [130, 75])}  # chunks over cached context whose 64-token tiles cross 96-token pages
TMA_PREFETCH = DecodeConfig(tma=True, num_warps=2, num_stages=3, prefetch_pages=True)


def transposed_copy(attn) -> None:
    """Re-lay attn's V cache (num_blocks, nkv, D, block_size) in the same memory, same logical contents."""
    nb, bs, nkv, d = attn.kv_cache.shape[1:]
    attn.kv_cache[1].view(nb, nkv, d, bs).copy_(attn.kv_cache[1].clone().permute(0, 2, 3, 1))
    attn.v_transposed = True


def step(q_lens, seq_lens, v_t: bool, fused: bool, nan_row: int | None = None, device: str = "cpu",
         dtype: torch.dtype = torch.float32, cache_dtype: torch.dtype = torch.float8_e4m3fn):
    attn, (q, k, v, meta, rope, positions) = attention_case(cache_dtype, True, q_lens, seq_lens,
                                                            (0.25, 8.0), device, dtype)
    if nan_row is not None:
        v = v.clone()
        v[nan_row, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    if v_t:
        transposed_copy(attn)
    if sum(q_lens) > len(q_lens) and len(q_lens) > 1 and q_lens[0] == 1:
        import dataclasses

        meta = dataclasses.replace(meta, num_decodes=sum(1 for x in q_lens if x == 1))
    use_triton, triton_ops.USE_TRITON = triton_ops.USE_TRITON, fused
    try:
        out = attn(q, k, v, meta, rope, positions)
    finally:
        triton_ops.USE_TRITON = use_triton
    return out, attn.paged_caches()


@cpu
@pytest.mark.usefixtures("attention_kernels_on_cpu", "exact_fp8_casts")
@pytest.mark.parametrize("name", list(STEPS))
@pytest.mark.parametrize("fused", [True, False], ids=["fused-rotary-write", "write"])
@pytest.mark.parametrize("tma", [False, True], ids=["table", "tma-prefetch"])
@pytest.mark.parametrize("block_size", [16, 64, 48, 96])
def test_transposed_v_gives_the_standard_layouts_attention_and_cache(monkeypatch, name, fused, tma, block_size):
    """tma: the table's entry is a TMA one; else a pointer entry, which a transposed V cache replaces by
    triton_paged.VT_DEFAULT: its decode rows take the TMA kernel's transposed-V path either way where pages are a
    power of two (TMA), else the pointer kernel by strides. Prefill: 64-token pages read one-page V tiles by a
    scalar page id, unmasked; the other sizes a page id per token (96: a 64-token tile crosses pages)."""
    check_layouts(monkeypatch, name, fused, tma, block_size, "cpu", torch.float32, dict(atol=1e-4, rtol=1e-3))


@cpu
@pytest.mark.usefixtures("attention_kernels_on_cpu", "exact_fp8_casts")
@pytest.mark.parametrize("name", ["decode", "chunks"])
@pytest.mark.parametrize("cache_dtype,block_size",
                         [(torch.float8_e5m2, 64), (torch.float8_e4m3fn, 128), (torch.float8_e4m3fn, 256)],
                         ids=["e5m2-64", "e4m3-128", "e4m3-256"])
def test_transposed_v_with_e5m2_and_the_largest_pages(monkeypatch, name, cache_dtype, block_size):
    """The default covers e5m2 caches and pages up to 256 tokens (the TMA box's limit) too."""
    check_layouts(monkeypatch, name, True, True, block_size, "cpu", torch.float32, dict(atol=1e-4, rtol=1e-3),
                  cache_dtype)


@gpu
@pytest.mark.parametrize("name", list(STEPS))
@pytest.mark.parametrize("tma", [False, True], ids=["table", "tma-prefetch"])
@pytest.mark.parametrize("block_size", [16, 64])
def test_transposed_v_on_gpu(monkeypatch, name, tma, block_size):
    """The same on CUDA (bf16 activations, the fused rotary + KV write), TMA for real on sm90+."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("the transposed V cache's decode needs TMA (sm90+)")
    check_layouts(monkeypatch, name, True, tma, block_size, "cuda", torch.bfloat16, dict(atol=2e-2, rtol=2e-2))


def check_layouts(monkeypatch, name, fused, tma, block_size, device, dtype, tol,
                  cache_dtype: torch.dtype = torch.float8_e4m3fn) -> None:
    import tests.layers.test_triton_attention as attn_tests

    monkeypatch.setattr(attn_tests, "BLOCK_SIZE", block_size)
    if tma:
        monkeypatch.setattr(triton_paged, "decode_config", lambda *a, **k: TMA_PREFETCH)
    else:  # a pointer entry
        monkeypatch.setattr(triton_paged, "decode_config", lambda *a, **k: DecodeConfig(block_n=32))
    calls = []
    vt_launch = triton_paged.descriptor_vt
    monkeypatch.setattr(triton_paged, "descriptor_vt", lambda c: calls.append(c.shape) or vt_launch(c))
    ref, (k_ref, v_ref) = step(*STEPS[name], False, fused, device=device, dtype=dtype, cache_dtype=cache_dtype)
    calls.clear()
    out, (k_t, v_t) = step(*STEPS[name], True, fused, device=device, dtype=dtype, cache_dtype=cache_dtype)
    assert v_t.stride(-1) != 1  # the transposed layout's view
    assert torch.equal(k_t.view(torch.uint8), k_ref.view(torch.uint8))
    assert torch.equal(v_t.contiguous().view(torch.uint8), v_ref.view(torch.uint8))
    torch.testing.assert_close(out.float(), ref.float(), **tol)
    pow2 = block_size & (block_size - 1) == 0
    assert bool(calls) == (name in ("decode", "mixed") and pow2)  # decode rows: the transposed-V TMA path


@cpu
@pytest.mark.usefixtures("attention_kernels_on_cpu", "exact_fp8_casts")
@pytest.mark.parametrize("fused", [True, False], ids=["fused-rotary-write", "write"])
def test_writers_store_a_non_finite_v_as_zero_in_a_transposed_cache(fused):
    _, (_, v_t) = step([1, 1], [37, 6], True, fused, nan_row=1)
    _, (_, v_std) = step([1, 1], [37, 6], False, fused, nan_row=1)
    slots = attention_case(torch.float8_e4m3fn, True, [1, 1], [37, 6])[1][3].slot_mapping
    bs = v_t.shape[1]
    s = int(slots[1])
    written_t, written_std = v_t[s // bs, s % bs].float(), v_std[s // bs, s % bs].float()
    assert torch.equal(written_t[0, :3], torch.zeros(3))  # NaN, inf, -inf -> 0
    assert not torch.isfinite(written_std[0, :3]).all()  # the standard layout keeps them (its reads are masked)
    assert torch.equal(written_t[0, 3:], written_std[0, 3:])


def test_the_runner_applies_the_switch_only_where_the_kernels_read_it(monkeypatch, caplog):
    """An FP8 cache, the Triton attention kernels on an NVIDIA sm90+ GPU (the capability and ROCm are faked: a
    hardware boundary), power-of-two pages and head dims the TMA path reads; else False, whatever the environment
    says. On by default (silently standard elsewhere: a bf16 cache is not worth a warning); a warning only where the
    variable asked for it (an empty value does not ask); 0 turns it off."""
    import logging
    from types import SimpleNamespace

    from shardllm.layers.attention import triton_decode_tma
    from shardllm.worker.model_runner import ModelRunner

    if triton_decode_tma.TensorDescriptor is None:
        pytest.skip("this Triton has no TensorDescriptor (the TMA path's host API)")
    caps = {"cap": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: caps["cap"])
    monkeypatch.setattr(triton_paged, "HAS_TRITON", True)
    monkeypatch.setattr(triton_decode_tma, "HAS_TRITON", True)
    monkeypatch.setattr(torch.version, "hip", None)
    runner = ModelRunner.__new__(ModelRunner)
    runner.device, runner.kv_cache_dtype, runner.block_size = torch.device("cuda"), torch.float8_e4m3fn, 64
    runner.config = SimpleNamespace(attention_backend="triton")
    runner.attn_layers = [SimpleNamespace(head_dim=128), SimpleNamespace(head_dim=64)]
    monkeypatch.delenv("SHARDLLM_KV_V_TRANSPOSED", raising=False)
    assert runner._v_transposed() is True  # the default
    runner.kv_cache_dtype = torch.float8_e5m2
    assert runner._v_transposed() is True
    runner.kv_cache_dtype = torch.float8_e4m3fn
    caplog.set_level(logging.WARNING, logger="shardllm")
    not_eligible = (("kv_cache_dtype", torch.bfloat16), ("block_size", 96), ("block_size", 512),
                    ("device", torch.device("cpu")), ("config", SimpleNamespace(attention_backend="torch")),
                    ("attn_layers", [SimpleNamespace(head_dim=128), SimpleNamespace(head_dim=80)]),
                    ("attn_layers", [SimpleNamespace(head_dim=8)]))
    for asked in ("", " ", "1"):
        monkeypatch.setenv("SHARDLLM_KV_V_TRANSPOSED", asked)
        for field, value in not_eligible:
            saved = getattr(runner, field)
            setattr(runner, field, value)
            assert runner._v_transposed() is False, (field, value)
            setattr(runner, field, saved)
        caps["cap"] = (8, 9)
        assert runner._v_transposed() is False
        caps["cap"] = (9, 0)
        monkeypatch.setattr(torch.version, "hip", "6.2")  # ROCm reports 9.x on MI300: no NVIDIA TMA
        assert runner._v_transposed() is False
        monkeypatch.setattr(torch.version, "hip", None)
        warned = [r for r in caplog.records if "SHARDLLM_KV_V_TRANSPOSED" in r.getMessage()]
        assert bool(warned) == (asked == "1"), repr(asked)
    assert runner._v_transposed() is True
    monkeypatch.setenv("SHARDLLM_KV_V_TRANSPOSED", "0")
    assert runner._v_transposed() is False


@cpu
@pytest.mark.usefixtures("attention_kernels_on_cpu", "exact_fp8_casts")
@pytest.mark.parametrize("name", ["prefill", "mixed", "chunks"])
@pytest.mark.parametrize("block_size", [16, 64, 96])
def test_tiled_v_write_gives_the_standard_layouts_cache(monkeypatch, name, block_size):
    """SHARDLLM_KV_V_T_TILED_WRITE: steps with prompt chunks store v by write_v_transposed's (D, tokens) tiles; the
    cache bytes and the attention are the standard layout's, as with the fused kernel's row store."""
    from shardllm.layers.attention import attention as attention_mod

    monkeypatch.setattr(attention_mod, "V_T_TILED_WRITE", True)
    calls = []
    real = triton_paged.write_v_transposed
    monkeypatch.setattr(triton_paged, "write_v_transposed", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    check_layouts(monkeypatch, name, True, True, block_size, "cpu", torch.float32, dict(atol=1e-4, rtol=1e-3))
    assert calls  # the tiled writer stored the transposed run's v


def check_write_v_transposed(scaled: bool, device: str, dtype: torch.dtype) -> None:
    """45 rows (a partial last tile) over 64-token pages, two prompts and a padding row (slot -1), a NaN and an inf:
    the cache holds what the standard layout's writer stores, transposed, non-finite values as 0, nothing for -1."""
    nb, bs, nkv, d = 5, 64, 2, 32
    g = torch.Generator().manual_seed(3)
    v = (torch.randn(45, nkv, d, generator=g) * 4).to(dtype)
    v[7, 1, 3], v[30, 0, 0] = float("nan"), float("inf")
    slots = torch.cat([torch.arange(2 * bs + 10, 2 * bs + 40), torch.tensor([-1]), torch.arange(bs, bs + 14)])
    scale = torch.tensor(0.37) if scaled else None  # not a power of two: div_rn's rounding, not a shift
    vt = torch.zeros(nb, nkv, d, bs, dtype=torch.float8_e4m3fn)
    v_dev, vt_dev = v.to(device), vt.to(device)
    triton_paged.write_v_transposed(v_dev, vt_dev.permute(0, 3, 1, 2), slots.to(device),
                                    None if scale is None else scale.to(device))
    want = torch.zeros(nb, bs, nkv, d, dtype=torch.float8_e4m3fn)
    x = torch.where(torch.isfinite(v), v.float(), 0.0) / (scale if scaled else 1.0)
    keep = slots >= 0
    want.view(-1, nkv, d).view(torch.uint8)[slots[keep]] = x[keep].to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(vt_dev.cpu().view(torch.uint8), want.permute(0, 2, 3, 1).contiguous().view(torch.uint8))


@cpu
@pytest.mark.usefixtures("attention_kernels_on_cpu", "exact_fp8_casts")
def test_a_failing_tiled_v_write_falls_back_to_the_row_store(monkeypatch, caplog):
    """If the tiled write cannot launch, the step stores k and v a token a row (k not rotated twice), says so
    once, and later steps take the row store; the result is the standard layout's."""
    from shardllm.layers.attention import attention as attention_mod

    monkeypatch.setattr(attention_mod, "V_T_TILED_WRITE", True)
    monkeypatch.setattr(attention_mod, "_tiled_v_ok", [True])

    def broken(*a, **k):
        raise RuntimeError("no such kernel")

    monkeypatch.setattr(triton_paged, "write_v_transposed", broken)
    with caplog.at_level("WARNING"):
        check_layouts(monkeypatch, "prefill", True, True, 64, "cpu", torch.float32, dict(atol=1e-4, rtol=1e-3))
    assert "tiled V^T write failed" in caplog.text and attention_mod._tiled_v_ok == [False]
    assert attention_mod._fused_rotary_ok == [True]  # the fused rotary kernel is not blamed


@cpu
@pytest.mark.usefixtures("exact_fp8_casts")
@pytest.mark.parametrize("scaled", [False, True], ids=["e4m3", "e4m3-scaled"])
def test_write_v_transposed_bytes(scaled):
    check_write_v_transposed(scaled, "cpu", torch.float32)


@gpu
@pytest.mark.timeout(120)
@pytest.mark.parametrize("scaled", [False, True], ids=["e4m3", "e4m3-scaled"])
def test_write_v_transposed_bytes_on_gpu(scaled):
    """The same on CUDA from bf16 rows (the engine's activations)."""
    check_write_v_transposed(scaled, "cuda", torch.bfloat16)
