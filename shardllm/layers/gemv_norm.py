"""The residual add + RMSNorm folded into the next linear's weight-streaming GEMV at M = 1 (decode at batch 1): the
qkv / gate_up GEMV normalizes its input rows as it loads them (`gemv.gemv(..., norm=NormPrologue(...))`), and its
first program writes x + residual, so the RMSNorm kernel disappears. Off by default (SHARDLLM_GEMV_FUSED_NORM=1).

How it is wired (as gemv_silu.py): `link_gemv_norm(model)` gives each RMSNorm named in the model's
`fp8_act_quant_inputs` table a `GemvNormTarget` for the linear it feeds (input_layernorm -> qkv_proj,
post_attention_layernorm -> gate_up_proj) when the linear's method is one the GEMV serves. RMSNorm.forward then asks
the target; at M = 1 on CUDA it returns an `RmsNormInput` (x, residual, weight, eps: deferred) in place of the normed
rows, and with a residual also a new, not yet written `residual_out` tensor. The linear's GEMV writes residual_out
(x + residual) in the same launch; the model reads it only later (the next norm's residual), after that launch on
the same stream. So the hook is only for pairs whose linear consumes the normed rows before anything reads the
residual, which is what the model's table names.

Numerics: each element is formed with triton_ops' RMSNorm roundings; only the sum of squares' fp32 reduction tree
follows this GEMV config's warps instead of the RMSNorm kernel's, so the rstd may differ in its last bit and a rare
normed element by one step of the activation dtype; x + residual is exact. On the CPU (the interpreter) the two are
bit-equal (tests/layers/test_gemv_norm.py); at load on CUDA a probe requires x + residual bit-equal and the output
within 1% of the unfused path's largest value (the GEMV probes' bound).
"""

from __future__ import annotations

import torch
from torch import nn

from shardllm import envs
from shardllm.layers import gemv as gemv_mod
from shardllm.layers import triton_ops
from shardllm.layers.gemv import HAS_TRITON, DeferredGemvInput, GemvConfig, NormPrologue, load_table, table_config
from shardllm.layers.gemv_silu import _linear_weights, link_producers, probe_once

__all__ = ["FUSED_NORM_MAX_M", "GemvNormTarget", "RmsNormInput", "link_gemv_norm", "norm_gemv"]

ENABLED = envs.SHARDLLM_GEMV_FUSED_NORM
# None: the fused GEMV where the device checks pass; True / False force it on (CPU tests, TRITON_INTERPRET=1) / off.
FORCE: bool | None = None
FUSED_NORM_MAX_M = 1
# Measured configs for the norm-fused GEMV (gemv.load_table's format), by weight dtype; empty: the plain GEMV's
# FMA-form config where its table has one, else _DEFAULT_CONFIG (the tl.dot form cannot take the prologue).
FUSED_NORM_TABLES: dict[str, dict] = {"fp8": load_table({}), "bf16": load_table({})}
_DEFAULT_CONFIG = GemvConfig(False, 4, 512, 1, 4, 3, True)


class RmsNormInput(DeferredGemvInput):
    """RMSNorm(x (+ residual)) * weight not yet computed, for the linear an RMSNorm feeds: x (M, K), the norm's
    NormPrologue (residual_out is written by the GEMV)."""

    __slots__ = ("x", "norm")

    def __init__(self, x: torch.Tensor, norm: NormPrologue):
        self.x, self.norm = x, norm

    @property
    def shape(self) -> torch.Size:
        return self.x.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.x.dtype

    def gemv(self, w: torch.Tensor, w_scale: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
        return norm_gemv(self, w, w_scale, bias)


def _norm_config(w: torch.Tensor, m: int) -> GemvConfig:
    """The fused table's config for w (N, K) at m rows, else the plain GEMV's where it is of the FMA form, else
    _DEFAULT_CONFIG."""
    n, k = w.shape
    fp8 = w.dtype == torch.float8_e4m3fn
    config = table_config(FUSED_NORM_TABLES["fp8" if fp8 else "bf16"], n, k, m)
    if config is None:
        config = table_config(gemv_mod.FP8_GEMV_TABLE if fp8 else gemv_mod.BF16_GEMV_TABLE, n, k, m)
    return config if config is not None and not config.use_dot else _DEFAULT_CONFIG


def norm_gemv(x: RmsNormInput, w: torch.Tensor, w_scale: torch.Tensor | None, bias: torch.Tensor | None,
              config: GemvConfig | None = None) -> torch.Tensor:
    """y (M, N) in x's dtype = RMSNorm(x (+ residual)) @ (w * w_scale[:, None])^T (+ bias), writing x + residual to
    x.norm.residual_out, in one GEMV launch (two with split-K). w (N, K) e4m3 with w_scale (N,) fp32, or x's dtype
    with None; config None: `_norm_config`'s (an FMA-form config)."""
    y = gemv_mod.gemv(x.x, w, w_scale, config or _norm_config(w, x.x.shape[0]), norm=x.norm)
    return y if bias is None else y + bias


class GemvNormTarget:
    """The linear an RMSNorm feeds (not an nn.Module: not registered as the norm's child)."""

    def __init__(self, linear: nn.Module):
        self.linear = linear

    def _applies(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor) -> bool:
        """Host checks on shapes, dtypes and cached probes only (graph-capturable)."""
        if not ENABLED or FORCE is False or not HAS_TRITON:
            return False
        if x.dim() != 2 or not 0 < x.shape[0] <= FUSED_NORM_MAX_M or x.dtype not in (torch.bfloat16, torch.float16):
            return False
        if x.stride(1) != 1 or weight.dtype != x.dtype or weight.shape != (x.shape[1],) or weight.stride(0) != 1:
            return False
        if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype or residual.stride(1) != 1):
            return False
        weights = _linear_weights(self.linear, x.dtype)
        if weights is None or x.shape[1] != weights[0].shape[1]:
            return False
        if FORCE is True:
            return True
        if not (x.is_cuda and triton_ops.use_triton(x)):
            return False
        if weights[1] is None:
            return gemv_mod.gemv_ok(x.device)
        from shardllm.layers.quantization.fp8_triton import triton_fp8_ok

        return triton_fp8_ok(x.device)

    def maybe_defer(self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
        """Where the fused GEMV applies: RmsNormInput, or with a residual (RmsNormInput, residual_out) as RMSNorm
        returns (normed, x + residual); else None."""
        if not self._applies(x, residual, weight):
            return None
        residual_out = None if residual is None else torch.empty_like(x, memory_format=torch.contiguous_format)
        deferred = RmsNormInput(x, NormPrologue(residual, weight, eps, residual_out))
        return deferred if residual is None else (deferred, residual_out)


def fused_norm_ok(w: torch.Tensor, w_scale: torch.Tensor | None, dtype: torch.dtype) -> bool:
    """Whether the norm-fused GEMV compiles on this weight's device, shape and dtype with the config it would run,
    writes x + residual bit-equal to triton_ops.fused_add_rms_norm's and gives y within 1% of the largest value of
    the unfused pair's (probed once per (device, N, K, dtypes), at load time). Always True off CUDA."""
    if w.device.type != "cuda" or not HAS_TRITON:
        return True

    def check() -> bool:
        g = torch.Generator(device=w.device).manual_seed(0)
        k = w.shape[1]
        x, res = (torch.randn(2, 1, k, device=w.device, generator=g) * 2).to(dtype)
        nw = (torch.rand(k, device=w.device, generator=g) + 0.5).to(dtype)
        config = _norm_config(w, 1)
        res_out = torch.empty_like(x)
        y = norm_gemv(RmsNormInput(x, NormPrologue(res, nw, 1e-5, res_out)), w, w_scale, None, config).float()
        normed, res_ref = triton_ops.fused_add_rms_norm(x, res, nw, 1e-5)
        y_ref = gemv_mod.gemv(normed, w, w_scale, config).float()
        return torch.equal(res_out, res_ref) and bool(((y - y_ref).abs().max() <= 1e-2 * y_ref.abs().max()).item())

    return probe_once(("norm", w.device.index, *w.shape, w.dtype, dtype), check, "norm-fused GEMV",
                      "RMSNorm + GEMV", w)


def link_gemv_norm(model: nn.Module) -> int:
    """Hands each RMSNorm producer in `model.fp8_act_quant_inputs` a GemvNormTarget for its linear, where both
    exist, the linear's method is one the GEMV serves and (on CUDA) `fused_norm_ok` passes for its weight; nothing
    unless SHARDLLM_GEMV_FUSED_NORM=1. Call after `process_weights_after_loading`. Returns the number of links."""
    from shardllm.layers.layernorm import RMSNorm

    return link_producers(model, RMSNorm, fused_norm_ok, GemvNormTarget) if ENABLED else 0
