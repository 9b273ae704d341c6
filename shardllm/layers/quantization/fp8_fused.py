"""FP8 activation quantization fused into the kernel before an FP8 linear: RMSNorm (with or without the residual
add) and SiLU-and-mul write the e4m3 activation and its per-token fp32 scale instead of a bf16 tensor that
`quantize_per_token_triton` would read back.

Numerics: each kernel computes the row exactly as its unfused twin in triton_ops (same fp32 math, same roundings
to the activation dtype, same reduction shape) and then quantizes it with quantize_per_token_triton's rule
(scale = max(amax / 448, MIN_SCALE), q = clamp(y / scale, +-448) rounded to e4m3), so data and scales are
bit-identical to norm-then-quantize (tests/layers/test_fp8_fused_act_quant.py; on CUDA the gpu tests).

How a layer uses it: after loading, `link_act_quant(model)` gives each producer named in the model's
`fp8_act_quant_inputs` table (RMSNorm, SiluAndMul) an `ActQuantTarget` for the linear it feeds, when that linear's
method takes a `QuantizedActivation` (Fp8LinearMethod with dynamic per-token scales). The producer then asks it
for every call; where the fused form applies (CUDA with working FP8 Triton kernels, bf16/fp16 rows, M above the
small-M GEMV threshold, so the linear would quantize per token for cuBLAS's row-wise `_scaled_mm`) it gets a
`QuantizedActivation`, else the plain tensor as before. At tp > 1 nothing changes: a row-parallel linear
quantizes its own input shard either way, which is what SiLU-and-mul produces on that rank.

Switch: `SHARDLLM_FP8_FUSED_ACT_QUANT=0` (read at import) restores the unfused path; on by default.

The same kernels also take the linear before them (`link_deferred_scale`): where that FP8 linear's GEMM runs as
cuBLAS's per-tensor kernel (fp8_utils' route, few rows) it returns its unscaled product as a `ScaledProduct`, and
the quantizer applies the token and channel scales as it loads it, with fp8_triton.scale_rows_cols' expression
and rounding: the same values, one launch fewer. Measured on an H200 (eighteenth session, docs/benchmarks.md):
Llama-3-8B fp8 decode-phase TPOT at batch 2 / 8 / 16 / 64, 3.198 / 3.530 / 3.760 / 4.750 ms -> 3.174 / 3.474 /
3.681 / 4.654 (`SHARDLLM_FP8_DEFER_SCALE=0` -> on, alternating).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from shardllm import envs
from shardllm.layers import triton_ops
from shardllm.layers.pdl import launch_args, pdl_enter
from shardllm.layers.quantization import fp8_triton
from shardllm.layers.quantization.fp8_triton import HAS_TRITON, triton_fp8_ok
from shardllm.layers.quantization.fp8_utils import FP8_DTYPE, FP8_MAX, MIN_SCALE, ScaledProduct
from shardllm.layers.triton_ops import _jit, _pow2

if HAS_TRITON:
    import triton
    import triton.language as tl
else:  # pragma: no cover - the kernels below only parse (their annotations are strings)
    triton = tl = None

__all__ = ["ActQuantTarget", "QuantizedActivation", "link_act_quant", "link_deferred_scale", "rms_norm_quant",
           "silu_and_mul_quant"]

ENABLED = envs.SHARDLLM_FP8_FUSED_ACT_QUANT
DEFER_SCALE = envs.SHARDLLM_FP8_DEFER_SCALE  # link_deferred_scale's switch (read at import)
# None: the fused kernels where the device checks pass (CUDA, the FP8 Triton probe); True / False force them on
# (tests on CPU, which need TRITON_INTERPRET=1) / off.
FORCE: bool | None = None
# SiLU-and-mul outputs per chunk: rows wider take two passes over their inputs (amax, then quantize). One pass over a
# whole 14336-wide row (16384, 16 warps) measured fastest on an H200 (benchmarks/fused_act_quant.py, 8192 rows, CUDA
# graphs, 2026-11-30): 150.9 us, against 237.8 in 8192-wide and 240.1 in 4096-wide chunks (unfused: 262.9).
SILU_QUANT_MAX_BLOCK = 16384


class QuantizedActivation(NamedTuple):
    """An activation already quantized for an FP8 linear: data (M, K) float8_e4m3fn, scale (M, 1) fp32 per
    token, dtype the dtype the activation had (the linear's output dtype)."""

    data: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype

    @property
    def shape(self) -> torch.Size:
        return self.data.shape


# ---- kernels -----------------------------------------------------------------------------------------------------


@_jit
def _load_x(x_row, offs, mask, xs, ws_ptr, HAS_XSCALE: tl.constexpr):
    """Columns `offs` of one input row in fp32. HAS_XSCALE: the row is an FP8 GEMM's unscaled product (a
    fp8_utils.ScaledProduct) and the value is round((p * xs) * ws[offs]) to its dtype, what
    fp8_triton.scale_rows_cols stores (xs: the row's scale, ws_ptr: the channel scales)."""
    x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_XSCALE:
        x = (x * xs * tl.load(ws_ptr + offs, mask=mask, other=0.0)).to(x_row.dtype.element_ty).to(tl.float32)
    return x


@_jit
def _normed_row_chunk(x_row, res_row, w_ptr, offs, mask, rstd, HAS_RESIDUAL: tl.constexpr, xs, ws_ptr,
                      HAS_XSCALE: tl.constexpr):
    """w * round(s * rstd), rounded to x's dtype and returned in fp32, for columns `offs` of one row (s = x, or
    round(x + residual); x as _load_x gives it): the values triton_ops._fused_rmsnorm_row_kernel stores."""
    s = _load_x(x_row, offs, mask, xs, ws_ptr, HAS_XSCALE)
    if HAS_RESIDUAL:
        r = tl.load(res_row + offs, mask=mask, other=0.0).to(tl.float32)
        s = (s + r).to(x_row.dtype.element_ty).to(tl.float32)
    normed = (s * rstd).to(x_row.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return (w * normed).to(x_row.dtype.element_ty).to(tl.float32)


@_jit
def _rmsnorm_quant_fp8_kernel(
    x_ptr, res_ptr, w_ptr, q_ptr, s_ptr, res_out_ptr, eps, hidden, stride_xn, stride_rn, stride_qn, stride_ron,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, NUM_CHUNKS: tl.constexpr, FP8_MAX_C: tl.constexpr,
    MIN_SCALE_C: tl.constexpr, USE_PDL: tl.constexpr = False, xs_ptr=None, ws_ptr=None,
    HAS_XSCALE: tl.constexpr = False,
):
    """One program per token: y = RMSNorm(x (+ residual)) as the unfused kernel rounds it, then its e4m3 row and
    scale. With HAS_RESIDUAL, round(x + residual) is stored to res_out. Rows wider than BLOCK: three passes
    (sum of squares and res_out; amax; quantize), each recomputing y from the inputs. HAS_XSCALE: x is an FP8
    GEMM's unscaled product, scaled as it is loaded by xs_ptr[row] and ws_ptr[col] (_load_x)."""
    pdl_enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    xs = 1.0
    if HAS_XSCALE:
        xs = tl.load(xs_ptr + row)
    x_row = x_ptr + row * stride_xn
    res_row = res_ptr + row * stride_rn
    q_row = q_ptr + row * stride_qn
    cols = tl.arange(0, BLOCK)
    if NUM_CHUNKS == 1:
        mask = cols < hidden
        s = _load_x(x_row, cols, mask, xs, ws_ptr, HAS_XSCALE)
        if HAS_RESIDUAL:
            r = tl.load(res_row + cols, mask=mask, other=0.0).to(tl.float32)
            s_rounded = (s + r).to(res_out_ptr.dtype.element_ty)
            tl.store(res_out_ptr + row * stride_ron + cols, s_rounded, mask=mask)
            s = s_rounded.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(s * s, 0) / hidden + eps)
        normed = (s * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        y = (w * normed).to(x_ptr.dtype.element_ty).to(tl.float32)
        scale = tl.maximum(tl.max(tl.abs(y), 0) / FP8_MAX_C, MIN_SCALE_C)
        tl.store(s_ptr + row, scale)
        q = tl.clamp(y / scale, -FP8_MAX_C, FP8_MAX_C)
        tl.store(q_row + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    else:
        sum_sq = tl.zeros([BLOCK], tl.float32)
        for c in range(NUM_CHUNKS):
            offs = c * BLOCK + cols
            mask = offs < hidden
            s = _load_x(x_row, offs, mask, xs, ws_ptr, HAS_XSCALE)
            if HAS_RESIDUAL:
                r = tl.load(res_row + offs, mask=mask, other=0.0).to(tl.float32)
                s_rounded = (s + r).to(res_out_ptr.dtype.element_ty)
                tl.store(res_out_ptr + row * stride_ron + offs, s_rounded, mask=mask)
                s = s_rounded.to(tl.float32)
            sum_sq += s * s
        rstd = tl.rsqrt(tl.sum(sum_sq, 0) / hidden + eps)
        amax = tl.zeros([BLOCK], tl.float32)
        for c in range(NUM_CHUNKS):
            offs = c * BLOCK + cols
            y = _normed_row_chunk(x_row, res_row, w_ptr, offs, offs < hidden, rstd, HAS_RESIDUAL, xs, ws_ptr,
                                  HAS_XSCALE)
            amax = tl.maximum(amax, tl.abs(y))
        scale = tl.maximum(tl.max(amax, 0) / FP8_MAX_C, MIN_SCALE_C)
        tl.store(s_ptr + row, scale)
        for c in range(NUM_CHUNKS):
            offs = c * BLOCK + cols
            mask = offs < hidden
            y = _normed_row_chunk(x_row, res_row, w_ptr, offs, mask, rstd, HAS_RESIDUAL, xs, ws_ptr, HAS_XSCALE)
            q = tl.clamp(y / scale, -FP8_MAX_C, FP8_MAX_C)
            tl.store(q_row + offs, q.to(q_ptr.dtype.element_ty), mask=mask)


@_jit
def _silu_mul_row_chunk(x_row, d, offs, mask, xs, ws_ptr, HAS_XSCALE: tl.constexpr):
    """round(round(silu(gate)) * up) in fp32 for columns `offs` of one row: triton_ops' silu_and_mul values (gate
    and up as _load_x gives them)."""
    gate = _load_x(x_row, offs, mask, xs, ws_ptr, HAS_XSCALE)
    up = _load_x(x_row, d + offs, mask, xs, ws_ptr, HAS_XSCALE)
    act = (gate / (1.0 + tl.exp(-gate))).to(x_row.dtype.element_ty).to(tl.float32)
    return (act * up).to(x_row.dtype.element_ty).to(tl.float32)


@_jit
def _silu_and_mul_quant_fp8_kernel(x_ptr, q_ptr, s_ptr, d, stride_xn, stride_qn, BLOCK: tl.constexpr,
                                   NUM_CHUNKS: tl.constexpr, FP8_MAX_C: tl.constexpr, MIN_SCALE_C: tl.constexpr,
                                   USE_PDL: tl.constexpr = False, rows_ptr=None, HAS_ROWS: tl.constexpr = False,
                                   xs_ptr=None, ws_ptr=None, HAS_XSCALE: tl.constexpr = False):
    """One program per token: y = silu(gate) * up over its d outputs, then its e4m3 row and scale. Rows wider
    than BLOCK: two passes (amax; quantize), the second recomputing y from the inputs. HAS_ROWS: rows at or past
    the int32 at rows_ptr are skipped (left unwritten). HAS_XSCALE: x is an FP8 GEMM's unscaled product (_load_x)."""
    pdl_enter(USE_PDL)
    if HAS_ROWS:
        if tl.program_id(0) >= tl.load(rows_ptr):
            return
    row = tl.program_id(0).to(tl.int64)
    xs = 1.0
    if HAS_XSCALE:
        xs = tl.load(xs_ptr + row)
    x_row = x_ptr + row * stride_xn
    q_row = q_ptr + row * stride_qn
    cols = tl.arange(0, BLOCK)
    if NUM_CHUNKS == 1:
        mask = cols < d
        y = _silu_mul_row_chunk(x_row, d, cols, mask, xs, ws_ptr, HAS_XSCALE)
        scale = tl.maximum(tl.max(tl.abs(y), 0) / FP8_MAX_C, MIN_SCALE_C)
        tl.store(s_ptr + row, scale)
        q = tl.clamp(y / scale, -FP8_MAX_C, FP8_MAX_C)
        tl.store(q_row + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    else:
        amax = tl.zeros([BLOCK], tl.float32)
        for c in range(NUM_CHUNKS):
            offs = c * BLOCK + cols
            amax = tl.maximum(amax, tl.abs(_silu_mul_row_chunk(x_row, d, offs, offs < d, xs, ws_ptr, HAS_XSCALE)))
        scale = tl.maximum(tl.max(amax, 0) / FP8_MAX_C, MIN_SCALE_C)
        tl.store(s_ptr + row, scale)
        for c in range(NUM_CHUNKS):
            offs = c * BLOCK + cols
            mask = offs < d
            y = _silu_mul_row_chunk(x_row, d, offs, mask, xs, ws_ptr, HAS_XSCALE)
            q = tl.clamp(y / scale, -FP8_MAX_C, FP8_MAX_C)
            tl.store(q_row + offs, q.to(q_ptr.dtype.element_ty), mask=mask)


if HAS_TRITON and hasattr(_rmsnorm_quant_fp8_kernel, "rewrite"):  # the interpreter: see the note in triton_ops
    for _kernel in (_load_x, _normed_row_chunk, _rmsnorm_quant_fp8_kernel, _silu_mul_row_chunk,
                    _silu_and_mul_quant_fp8_kernel):
        _kernel.rewrite()


# ---- launchers ---------------------------------------------------------------------------------------------------


def _rows_2d(x: torch.Tensor, what: str) -> torch.Tensor:
    if x.dim() != 2:
        raise ValueError(f"{what}: expected (M, K) rows, got shape {tuple(x.shape)}")
    return x if x.stride(-1) == 1 else x.contiguous()


def rms_norm_quant(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                   scales: tuple[torch.Tensor, torch.Tensor] | None = None):
    """RMSNorm of x (+ residual), quantized per token to e4m3 in the same launch.

    x, residual (M, H) bf16/fp16 with a contiguous last dim, weight (H,) of x's dtype. Returns the
    QuantizedActivation (data (M, H) e4m3fn, scale (M, 1) fp32), and with a residual also x + residual (M, H) in
    x's dtype, as (QuantizedActivation, residual_out) like RMSNorm's. Bit-identical to
    `triton_ops.fused_add_rms_norm` / `rms_norm` followed by `quantize_per_token_triton`.
    scales: (row (M, 1), col (H,)) contiguous fp32: x is an FP8 GEMM's unscaled product (ScaledProduct's fields)
    and the result is that of its value(), with no launch of its own; ValueError for other sizes or dtypes.
    """
    x = _rows_2d(x, "rms_norm_quant")
    m, hidden = x.shape
    xs, ws = _check_scales(scales, m, hidden, "rms_norm_quant")
    assert weight.shape == (hidden,) and weight.stride(0) == 1 and weight.dtype == x.dtype
    q = torch.empty((m, hidden), dtype=FP8_DTYPE, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    res_out = None
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype
        residual = _rows_2d(residual, "rms_norm_quant")
        res_out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if m:
        block = min(_pow2(hidden), triton_ops.RMS_MAX_BLOCK)  # as triton_ops._rms_norm: the same reduction
        res, res_o = (x, x) if residual is None else (residual, res_out)
        _rmsnorm_quant_fp8_kernel[(m,)](
            x, res, weight, q, s, res_o, eps, hidden, x.stride(0), res.stride(0), q.stride(0), res_o.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK=block, NUM_CHUNKS=triton.cdiv(hidden, block),
            FP8_MAX_C=FP8_MAX, MIN_SCALE_C=MIN_SCALE, num_warps=min(max(block // 256, 1), 8), xs_ptr=xs, ws_ptr=ws,
            HAS_XSCALE=scales is not None, **launch_args(x.device))
    out = QuantizedActivation(q, s, x.dtype)
    return out if residual is None else (out, res_out)


def silu_and_mul_quant(x: torch.Tensor, max_block: int = SILU_QUANT_MAX_BLOCK,
                       num_rows: torch.Tensor | None = None,
                       scales: tuple[torch.Tensor, torch.Tensor] | None = None) -> QuantizedActivation:
    """silu(x[:, :d]) * x[:, d:] for x (M, 2d) bf16/fp16, quantized per token to e4m3 in the same launch:
    data (M, d) e4m3fn, scale (M, 1) fp32, bit-identical to `triton_ops.silu_and_mul` followed by
    `quantize_per_token_triton`. max_block: outputs per chunk (rows wider take two passes over their inputs).
    num_rows: a one-element int32 tensor on x's device; rows at or past its value are left undefined (the MoE
    layer's other ranks' rows: read on the GPU, no host sync). scales: (row (M, 1), col (2d,)) as rms_norm_quant's
    (ValueError likewise)."""
    x = _rows_2d(x, "silu_and_mul_quant")
    m, two_d = x.shape
    xs, ws = _check_scales(scales, m, two_d, "silu_and_mul_quant")
    assert two_d % 2 == 0
    d = two_d // 2
    q = torch.empty((m, d), dtype=FP8_DTYPE, device=x.device)
    s = torch.empty((m, 1), dtype=torch.float32, device=x.device)
    if m:
        block = min(_pow2(d), max_block)
        _silu_and_mul_quant_fp8_kernel[(m,)](
            x, q, s, d, x.stride(0), q.stride(0), BLOCK=block, NUM_CHUNKS=triton.cdiv(d, block),
            FP8_MAX_C=FP8_MAX, MIN_SCALE_C=MIN_SCALE, num_warps=min(max(block // 512, 1), 16),
            rows_ptr=num_rows, HAS_ROWS=num_rows is not None, xs_ptr=xs, ws_ptr=ws, HAS_XSCALE=scales is not None,
            **launch_args(x.device))
    return QuantizedActivation(q, s, x.dtype)


def _check_scales(scales: tuple[torch.Tensor, torch.Tensor] | None, m: int, n: int,
                  what: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(row, col) of a ScaledProduct's (M, N) product, checked: contiguous fp32 of M and N values, or (None, None)."""
    if scales is None:
        return None, None
    xs, ws = scales
    if (xs.numel() != m or ws.numel() != n or xs.dtype != torch.float32 or ws.dtype != torch.float32
            or not xs.is_contiguous() or not ws.is_contiguous()):
        raise ValueError(f"{what}: scales are (row (M, 1), col (N,)) contiguous fp32 for the ({m}, {n}) product, got "
                         f"{tuple(xs.shape)} {xs.dtype}, {tuple(ws.shape)} {ws.dtype}")
    return xs, ws


# ---- the hook between a producer and its FP8 linear --------------------------------------------------------------


def _fused_applies(x: torch.Tensor) -> bool:
    """Host checks on shapes, dtypes and cached probes only (graph-capturable)."""
    if not ENABLED or FORCE is False or not HAS_TRITON:
        return False
    if (x.dim() != 2 or x.shape[0] <= fp8_triton.FP8_GEMV_MAX_M
            or x.dtype not in (torch.bfloat16, torch.float16)):
        return False  # small M: the linear's weight-streaming GEMV takes the unquantized rows
    # on CUDA also where the unfused kernels would run (attention_backend="torch" turns triton_ops off)
    return FORCE is True or (x.is_cuda and triton_ops.use_triton(x) and triton_fp8_ok(x.device))


class ActQuantTarget:
    """The FP8 linear a producer (RMSNorm, SiluAndMul) feeds. Not an nn.Module, so the producer does not
    register the linear as its child; `link_act_quant` sets it as the producer's `quant_target`."""

    def __init__(self, linear: nn.Module):
        self.linear = linear

    def _wants(self, x: torch.Tensor) -> bool:
        return getattr(self.linear.quant_method, "accepts_quantized_input", False) and _fused_applies(x)

    def maybe_rms_norm(self, x: torch.Tensor | ScaledProduct, residual: torch.Tensor | None, weight: torch.Tensor,
                       eps: float):
        """`rms_norm_quant(x, residual, weight, eps)` where it applies, else None (the caller's own path). x may be
        a ScaledProduct: its scales are applied as the kernel loads it."""
        rows, scales = _unscaled(x)
        if (not self._wants(rows) or weight.dtype != rows.dtype
                or (residual is not None and residual.dtype != rows.dtype)):
            return None
        return rms_norm_quant(rows, residual, weight, eps, scales=scales)

    def maybe_silu_and_mul(self, x: torch.Tensor | ScaledProduct) -> QuantizedActivation | None:
        """`silu_and_mul_quant(x)` where it applies, else None; x as maybe_rms_norm's."""
        rows, scales = _unscaled(x)
        return silu_and_mul_quant(rows, scales=scales) if self._wants(rows) else None


def _unscaled(x: torch.Tensor | ScaledProduct) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """(the rows a kernel loads, their (row, col) scales or None: a ScaledProduct's once value() has run)."""
    if isinstance(x, ScaledProduct):
        return x.product, None if x.scaled else (x.row_scale, x.col_scale)
    return x, None


def link_act_quant(model: nn.Module) -> int:
    """Hands each producer in `model.fp8_act_quant_inputs` ({producer: linear}, names relative to a decoder layer
    of `model.model.layers`) an ActQuantTarget for its linear, where both exist (a MoE layer has no dense
    `mlp.down_proj`; a pipeline stage's missing layers have neither) and the linear's method accepts a
    QuantizedActivation. Call after `process_weights_after_loading`. Returns the number of links."""
    from shardllm.layers.quantization import producer_linear_pairs

    linked = 0
    for producer, linear in producer_linear_pairs(model):
        if hasattr(producer, "quant_target") and getattr(linear.quant_method, "accepts_quantized_input", False):
            producer.quant_target = ActQuantTarget(linear)
            linked += 1
    return linked


def link_deferred_scale(model: nn.Module) -> int:
    """Sets `defer_scale` on each FP8 linear of `model.fp8_scale_readers` ({linear: the module reading its output},
    names relative to a decoder layer of `model.model.layers`; "next:NAME": NAME in the next decoder layer) whose
    reader is a quantizer linked by link_act_quant (RMSNorm, SiluAndMul: they take a ScaledProduct), so that where
    its GEMM takes the per-tensor route the scale launch is skipped and the reader applies the scales as it loads
    the product. Not for a linear with a bias or another method than dynamic per-token FP8, a row-parallel one at
    tp > 1 (its output is all-reduced first), nor across a pipeline stage's end. Under the micro-batch overlap
    (SHARDLLM_TP_OVERLAP) only gate_up: o and down could defer there too (each half runs its layers in order) but
    are kept out, not measured. Call after link_act_quant. Returns the number of linears set.

    Switch: SHARDLLM_FP8_DEFER_SCALE=0 (read at import) sets none; so does SHARDLLM_FP8_FUSED_ACT_QUANT=0 (no
    quantizer would take the product)."""
    from shardllm.distributed.parallel_state import get_parallel_context
    from shardllm.layers import microbatch_overlap
    from shardllm.layers.linear import RowParallelLinear

    pairs = getattr(model, "fp8_scale_readers", None)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not DEFER_SCALE or not ENABLED or not pairs or layers is None:
        return 0
    tp = get_parallel_context().tp_size
    split_rows = microbatch_overlap.active(tp)
    end = getattr(model, "end_layer", len(layers))
    linked = 0
    for i, layer in enumerate(layers):
        for linear_name, reader_name in pairs.items():
            nxt = reader_name.startswith("next:")
            if nxt and i + 1 >= end:
                continue  # the stage's (or model's) last layer: its output leaves the layer loop
            try:
                linear = layer.get_submodule(linear_name)
                reader = (layers[i + 1] if nxt else layer).get_submodule(reader_name.removeprefix("next:"))
            except AttributeError:  # a MoE layer's MLP, a stage's missing layer
                continue
            row_parallel = isinstance(linear, RowParallelLinear)
            if (getattr(reader, "quant_target", None) is None or getattr(linear, "bias", None) is not None
                    or not getattr(linear.quant_method, "accepts_quantized_input", False)
                    or (row_parallel and (tp > 1 or split_rows)) or (nxt and split_rows)):
                continue
            linear.defer_scale = True
            linked += 1
    return linked
