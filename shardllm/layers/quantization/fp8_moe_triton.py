"""A grouped GEMM for block-scaled FP8 experts in one Triton launch: expert-sorted rows times each expert's
e4m3 weight, both scales applied per 1 x bk activation group and bn x bk weight block inside the K loop (the
DeepSeek-V3 recipe, arXiv 2412.19437 sec 3.3), no host sync: the launch grid is sized from shapes only, so
it is captured in a CUDA graph. `grouped_block_fp8_mm_reference` is its torch twin (and the CPU path).
"""

from __future__ import annotations

import logging

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - images without triton use the torch path
    HAS_TRITON = False

logger = logging.getLogger(__name__)

if HAS_TRITON:

    @triton.jit
    def _grouped_block_fp8_kernel(a_ptr, as_ptr, w_ptr, ws_ptr, offs_ptr, y_ptr, N, K, E,
                                  stride_am, stride_asm, stride_we, stride_wn, stride_wse, stride_wsn, stride_ym,
                                  GROUP_N: tl.constexpr, GROUP_K: tl.constexpr, BLOCK_M: tl.constexpr,
                                  BLOCK_N: tl.constexpr, E_PAD: tl.constexpr):
        """Program (m tile t, n tile): the experts' m tiles are numbered in expert order, ceil(rows_e / BLOCK_M)
        each; t past the last one exits. The grid has cdiv(R, BLOCK_M) + E m tiles, an upper bound of the sum."""
        tile = tl.program_id(0)
        ex = tl.arange(0, E_PAD)
        ends = tl.load(offs_ptr + ex, mask=ex < E, other=0)  # (E_PAD,) group ends; 0 past E
        starts = tl.load(offs_ptr + ex - 1, mask=(ex > 0) & (ex < E), other=0)
        tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M  # m tiles of each expert (0 past E)
        cum = tl.cumsum(tiles, 0)  # inclusive
        e = tl.sum((cum <= tile).to(tl.int32), 0)  # the expert whose tiles hold t: the first with cum > t
        if e >= E:
            return
        pick = ex == e
        row_start = tl.sum(tl.where(pick, starts + (tile - cum + tiles) * BLOCK_M, 0), 0)
        row_end = tl.sum(tl.where(pick, ends, 0), 0)
        rows = row_start + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = n < N
        kk = tl.arange(0, GROUP_K)
        w_base = w_ptr + e.to(tl.int64) * stride_we
        ws_base = ws_ptr + e.to(tl.int64) * stride_wse + (n // GROUP_N) * stride_wsn  # (BLOCK_N,) pointers
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for kb in range(0, tl.cdiv(K, GROUP_K)):
            k = kb * GROUP_K + kk
            a = tl.load(a_ptr + rows[:, None].to(tl.int64) * stride_am + k[None, :],
                        mask=row_ok[:, None] & (k[None, :] < K), other=0.0)  # (BM, GK) e4m3
            w = tl.load(w_base + n[None, :].to(tl.int64) * stride_wn + k[:, None],
                        mask=n_ok[None, :] & (k[:, None] < K), other=0.0)  # (GK, BN) e4m3
            a_s = tl.load(as_ptr + rows.to(tl.int64) * stride_asm + kb, mask=row_ok, other=0.0)  # (BM,)
            w_s = tl.load(ws_base + kb, mask=n_ok, other=0.0)  # (BN,)
            acc += tl.dot(a, w) * a_s[:, None] * w_s[None, :]
        tl.store(y_ptr + rows[:, None].to(tl.int64) * stride_ym + n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & n_ok[None, :])


def tile_config(rows: int, num_experts: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) from the mean rows per expert (a shape, known at capture): small tiles for decode, where
    few experts have rows and N / BLOCK_N programs must fill the GPU, larger for prefill.
    [ours: a first guess; `benchmarks/fp8_moe_layer.py --sweep_block` measures the choices on the device]"""
    mean = rows // max(num_experts, 1)
    if mean <= 16:
        return 16, 64
    return (32, 128) if mean <= 32 else (64, 128)


def grouped_block_fp8_mm(a_q: torch.Tensor, a_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                         offs: torch.Tensor, block: tuple[int, int], out_dtype: torch.dtype,
                         block_m: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """Rows a_q[offs[e-1]:offs[e]] times expert e's weight, all experts in one launch.

    a_q (R, K) e4m3fn with a_scale (R, ceil(K / bk)) fp32 per 1 x bk group; w_q (E, N, K) e4m3fn with w_scale
    (E, ceil(N / bn), ceil(K / bk)) fp32 per bn x bk block; offs (E,) int32 group ends. Returns (R, N) in
    out_dtype; rows at or past offs[-1] are left unwritten (undefined), as torch._grouped_mm leaves them.
    bk must be a power of two >= 16 (one K step per scale group); block_m / block_n default to `tile_config`.
    """
    bn, bk = block
    r, k = a_q.shape
    e, n, _ = w_q.shape
    assert a_q.stride(1) == 1 and w_q.stride(2) == 1 and w_scale.stride(2) == 1 and a_scale.stride(1) == 1
    y = torch.empty((r, n), dtype=out_dtype, device=a_q.device)
    auto_m, auto_n = tile_config(r, e)
    bm, block_n = block_m or auto_m, block_n or auto_n
    grid = (triton.cdiv(r, bm) + e, triton.cdiv(n, block_n))
    _grouped_block_fp8_kernel[grid](
        a_q, a_scale, w_q, w_scale, offs, y, n, k, e, a_q.stride(0), a_scale.stride(0), w_q.stride(0),
        w_q.stride(1), w_scale.stride(0), w_scale.stride(1), y.stride(0), GROUP_N=bn, GROUP_K=bk, BLOCK_M=bm,
        BLOCK_N=block_n, E_PAD=max(triton.next_power_of_2(e), 2), num_warps=4, num_stages=3)
    return y


def grouped_block_fp8_mm_reference(a_q: torch.Tensor, a_scale: torch.Tensor, w_q: torch.Tensor,
                                   w_scale: torch.Tensor, offs: torch.Tensor, block: tuple[int, int],
                                   out_dtype: torch.dtype) -> torch.Tensor:
    """`grouped_block_fp8_mm` by a loop over the experts in fp32 (a host sync per expert): the test oracle."""
    from shardllm.layers.quantization.fp8_utils import dequantize

    bk = block[1]
    y = torch.zeros((a_q.shape[0], w_q.shape[1]), dtype=torch.float32, device=a_q.device)
    a = a_q.float() * a_scale.repeat_interleave(bk, dim=1)[:, : a_q.shape[1]]
    start = 0
    for e, end in enumerate(offs.tolist()):
        y[start:end] = a[start:end] @ dequantize(w_q[e], w_scale[e], block).t()
        start = end
    return y.to(out_dtype)


_PROBED: dict[tuple, bool] = {}


def grouped_block_triton_ok(device: torch.device, block: tuple[int, int]) -> bool:
    """Whether `grouped_block_fp8_mm` runs on `device` with `block` and matches its reference (probed once per
    device and block, eagerly: the first MoE forward runs before CUDA graph capture)."""
    bk = block[1]
    if device.type != "cuda" or not HAS_TRITON or bk < 16 or bk & (bk - 1):
        return False
    key = (device.index, tuple(block))
    if key in _PROBED:
        return _PROBED[key]
    from shardllm.layers.quantization.fp8_utils import quantize_per_block, quantize_per_token_group

    ok = False
    try:
        g = torch.Generator(device=device).manual_seed(0)
        num_experts, n, k = 3, 2 * block[0] + 16, 2 * bk
        a_q, a_s = quantize_per_token_group(torch.randn(40, k, device=device, generator=g), bk)
        w = torch.randn(num_experts, n, k, device=device, generator=g)
        ws = [quantize_per_block(w[i], block) for i in range(num_experts)]
        w_q, w_s = torch.stack([q for q, _ in ws]), torch.stack([s for _, s in ws])
        offs = torch.tensor([7, 7, 33], dtype=torch.int32, device=device)  # an empty group, rows past the end
        y = grouped_block_fp8_mm(a_q, a_s, w_q, w_s, offs, block, torch.float32)[:33]
        ref = grouped_block_fp8_mm_reference(a_q, a_s, w_q, w_s, offs, block, torch.float32)[:33]
        ok = bool(((y - ref).abs().max() <= 1e-3 * ref.abs().max()).item())
    except Exception as e:  # a Triton without FP8 dots on this GPU
        logger.warning("grouped block-FP8 Triton kernel unavailable (%s: %s)", type(e).__name__, e)
    if not ok:
        logger.warning("grouped block-FP8 Triton kernel disagrees with its reference on %s (block %s): experts run "
                       "through dequantized weights", device, block)
    _PROBED[key] = ok
    return ok
