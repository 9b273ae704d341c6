"""RMSNorm with the residual add folded in: norm(x, residual) -> (normed, x + residual)."""

from __future__ import annotations

import torch
from torch import nn

from shardllm.layers import triton_ops
from shardllm.layers.quantization.fp8_utils import ScaledProduct


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, dtype: torch.dtype | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)
        self.quant_target = None  # the FP8 linear this norm feeds, if it takes e4m3 input (fp8_fused.link_act_quant)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def forward(self, x: torch.Tensor | ScaledProduct, residual: torch.Tensor | None = None):
        """x: (N, H), or (N, heads, D) with any row strides (q/k norm); the Triton kernels on CUDA. Feeding an
        FP8 linear, the normed rows may come back quantized (a QuantizedActivation, fp8_fused.py). x may be a
        ScaledProduct (fp8_utils; from an FP8 linear linked by fp8_fused.link_deferred_scale)."""
        if self.quant_target is not None:
            out = self.quant_target.maybe_rms_norm(x, residual, self.weight, self.eps)
            if out is not None:
                return out
        if isinstance(x, ScaledProduct):  # an FP8 linear's product whose scales were left to this norm
            x = x.value()
        if triton_ops.use_triton(x):
            if residual is None:
                return triton_ops.rms_norm(x, self.weight, self.eps)
            return triton_ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x
