"""Triton kernels of the FP8 linear: per-token activation quantization in one launch, and the small-M GEMV that
streams e4m3 weights (dequantized in registers; the kernel family is shardllm/layers/gemv.py) for batch-1 decode,
where cuBLAS's FP8 GEMM plus the activation quantization lose to it (benchmarks/fp8_gemm.py, H200). The torch
functions in fp8_utils are their references.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - CPU images without triton use the torch path
    HAS_TRITON = False

from shardllm import envs
from shardllm.layers.gemv import FP8_GEMV_TABLE, GEMV_MAX_M, GemvConfig, gemv, nearest_config
from shardllm.layers.pdl import launch_args, pdl_enter
from shardllm.layers.quantization.fp8_utils import FP8_MAX, MIN_SCALE

__all__ = ["FP8_GEMV_MAX_M", "GEMV_MAX_M", "fp8_small_m_linear", "quantize_per_token_triton", "scale_rows_cols",
           "small_m_config", "triton_fp8_ok"]

# Rows up to which an FP8 linear takes the weight-streaming GEMV (unquantized activations) instead of per-token
# quantization and the FP8 GEMM (SHARDLLM_FP8_GEMV_MAX_M, default 1, <= GEMV_MAX_M; 0: the GEMM from one row). The
# FP8 linear, the fused norm / activation quantizers (fp8_fused.py) and the fused SiLU GEMV (gemv_silu.py) read this
# one attribute at each call, so they agree on every M (tests set it here). H200, seventeenth session (`fp8_gemm.py
# --recipes --ms 1 2 4 8 16`, us, GEMV -> per-tensor route + its per-token quantization): M 1 qkv 8.0 -> 12.4,
# gate_up 32.1 -> 34.7; M 2 qkv 13.2 -> 12.3, gate_up 51.1 -> 36.6, down 25.0 -> 24.9; M 16 qkv 21.7 -> 10.8, o
# 14.1 -> 9.9, gate_up 44.0 -> 35.2.
FP8_GEMV_MAX_M = envs.SHARDLLM_FP8_GEMV_MAX_M

if HAS_TRITON:

    @triton.jit
    def _quant_per_token_kernel(x_ptr, q_ptr, s_ptr, K, stride_x, stride_q, BLOCK: tl.constexpr,
                                FP8_MAX_C: tl.constexpr, MIN_SCALE_C: tl.constexpr, USE_PDL: tl.constexpr = False):
        pdl_enter(USE_PDL)
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        amax = tl.zeros((BLOCK,), tl.float32)
        for k0 in range(0, K, BLOCK):
            x = tl.load(x_ptr + row * stride_x + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.maximum(tl.max(amax, 0) / FP8_MAX_C, MIN_SCALE_C)
        tl.store(s_ptr + row, scale)
        for k0 in range(0, K, BLOCK):
            x = tl.load(x_ptr + row * stride_x + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
            q = tl.clamp(x / scale, -FP8_MAX_C, FP8_MAX_C)
            tl.store(q_ptr + row * stride_q + k0 + cols, q.to(q_ptr.dtype.element_ty), mask=k0 + cols < K)


    @triton.jit
    def _scale_rows_cols_kernel(acc_ptr, xs_ptr, ws_ptr, y_ptr, N, stride_a, stride_y, BLOCK_N: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask = cols < N
        acc = tl.load(acc_ptr + row * stride_a + cols, mask=mask, other=0.0).to(tl.float32)
        y = acc * tl.load(xs_ptr + row) * tl.load(ws_ptr + cols, mask=mask, other=0.0)  # (acc * xs) * ws, as torch
        tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def scale_rows_cols(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor, out_dtype: torch.dtype,
                    in_place: bool = False) -> torch.Tensor:
    """(acc.float() * x_scale * w_scale).to(out_dtype) in one launch: acc (M, N) fp32, bf16 or fp16 with unit
    stride along N, x_scale (M, 1) and w_scale (1, N) or (N,) fp32, contiguous. `in_place`: written into acc
    (out_dtype must be acc's; each element is read before it is written, by the same thread). The row-wise scales
    of an FP8 GEMM run unscaled (fp8_utils.scaled_mm_rowwise_by_tensorwise). ValueError for other layouts, dtypes
    or scale sizes."""
    m, n = acc.shape
    if (acc.dtype not in (torch.float32, torch.bfloat16, torch.float16) or (n > 1 and acc.stride(1) != 1)
            or x_scale.numel() != m or w_scale.numel() != n or not x_scale.is_contiguous()
            or not w_scale.is_contiguous() or (in_place and out_dtype != acc.dtype)):
        raise ValueError(f"scale_rows_cols: acc (M, N) fp32 / bf16 / fp16 with unit column stride (out_dtype its "
                         f"own in place), x_scale of M and w_scale of N contiguous fp32 values; got acc "
                         f"{tuple(acc.shape)} {acc.dtype} strides {acc.stride()}, out_dtype {out_dtype}, "
                         f"in_place {in_place}, x_scale {tuple(x_scale.shape)}, w_scale {tuple(w_scale.shape)}")
    y = acc if in_place else torch.empty((m, n), dtype=out_dtype, device=acc.device)
    block = 1024
    _scale_rows_cols_kernel[(m, triton.cdiv(n, block))](acc, x_scale, w_scale, y, n, acc.stride(0), y.stride(0),
                                                         BLOCK_N=block, num_warps=4)
    return y


def small_m_config(n: int, k: int, m: int = 1) -> GemvConfig:
    """The small-M GEMV config for an (N, K) e4m3 weight at m rows: gemv.FP8_GEMV_TABLE's (from
    `benchmarks/gemv_sweep.py`) for that shape or, failing that, for the nearest tuned one (gemv.nearest_config),
    else the tl.dot form measured by `benchmarks/fp8_gemm.py
    --sweep_small_m` on an H200 at M = 1 (BLOCK_N/BLOCK_K/SPLIT_K, us): qkv 6144x4096 32/256/1 14.2, o 4096x4096
    32/512/1 10.3 (32/256/1 10.7), gate_up 28672x4096 32/256/1 42.3, down 4096x14336 32/256/4 27.3 (split 1: 32.2);
    BLOCK_N 16 was 1.4-2x slower."""
    return nearest_config(FP8_GEMV_TABLE, n, k, m) or GemvConfig(True, 32, 256, 4 if k >= 8192 and n <= 8192 else 1)


def quantize_per_token_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch of fp8_utils.quantize_per_row for x (M, K): (q (M, K) e4m3fn, scale (M, 1) fp32)."""
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    block = min(triton.next_power_of_2(k), 4096)
    _quant_per_token_kernel[(m,)](x, q, s, k, x.stride(0), q.stride(0), BLOCK=block, FP8_MAX_C=FP8_MAX,
                                  MIN_SCALE_C=MIN_SCALE, num_warps=8 if block >= 2048 else 4, **launch_args(x.device))
    return q, s


def fp8_small_m_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                       config: GemvConfig | tuple[int, int, int] | None = None) -> torch.Tensor:
    """y = x @ (w * w_scale[:, None])^T for x (M <= 16, K) bf16/fp16, w (N, K) e4m3fn, w_scale (N,) fp32.

    Weight-streaming (W8A16 numerics: the activations stay in x's dtype, more accurate than W8A8) through
    `gemv.gemv`; config: a GemvConfig, a tl.dot-form (BLOCK_N, BLOCK_K, SPLIT_K), or None for small_m_config's."""
    m, k = x.shape
    if config is None:
        config = small_m_config(w.shape[0], k, m)
    elif not isinstance(config, GemvConfig):
        config = GemvConfig(True, *config)
    return gemv(x, w, w_scale, config)


_PROBED: dict[int | None, bool] = {}


def triton_fp8_ok(device: torch.device) -> bool:
    """Whether both kernels run on `device` and match their torch references (probed once per device, so a
    Triton build that miscompiles them falls back to torch + cuBLAS instead of serving wrong numbers)."""
    if device.type != "cuda" or not HAS_TRITON:
        return False
    if device.index is None:  # torch.device("cuda"): the current device, probed under its index
        device = torch.device("cuda", torch.cuda.current_device())
    if device.index in _PROBED:
        return _PROBED[device.index]
    import logging

    from shardllm.layers.quantization.fp8_utils import dequantize, quantize_per_row

    ok = False
    try:
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(5, 512, device=device, generator=g).to(torch.bfloat16)
        w = torch.randn(96, 512, device=device, generator=g)
        wq, ws = quantize_per_row(w)
        q, s = quantize_per_token_triton(x)
        q_ref, s_ref = quantize_per_row(x)
        y_ref = x.float() @ dequantize(wq, ws).t()
        # every form the measured table can pick: tl.dot, and the FMA form with and without the late reduction
        forms = [None, GemvConfig(False, 4, 512, 1, 4, 3, True), GemvConfig(False, 4, 512, 1, 4, 3, False)]
        ok = torch.allclose(s, s_ref) and torch.equal(q.float(), q_ref.float())
        for config in forms:
            rows = x if config is None else x[:2]  # the FMA form serves M <= 4
            y = fp8_small_m_linear(rows, wq, ws.view(-1), config).float()
            ok = ok and bool(((y - y_ref[: len(rows)]).abs().max() <= 2e-2 * y_ref.abs().max()).item())
    except Exception as e:  # a Triton that cannot compile them
        logging.getLogger(__name__).warning("FP8 Triton kernels unavailable (%s: %s)", type(e).__name__, e)
    if not ok:
        logging.getLogger(__name__).warning("FP8 Triton kernels disagree with their torch references on %s: using "
                                            "torch activation quantization and cuBLAS for every M", device)
    _PROBED[device.index] = ok
    return ok
