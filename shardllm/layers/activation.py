"""Activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shardllm.layers import triton_ops
from shardllm.layers.quantization.fp8_utils import ScaledProduct


class SiluAndMul(nn.Module):
    """silu(x[..., :d]) * x[..., d:] for the fused gate_up projection."""

    def __init__(self):
        super().__init__()
        self.quant_target = None  # the FP8 linear this feeds, if it takes e4m3 input (fp8_fused.link_act_quant)
        self.gemv_target = None  # the linear this feeds, if its GEMV can take gate_up (gemv_silu.link_gemv_silu)

    def forward(self, x: torch.Tensor | ScaledProduct) -> torch.Tensor:
        if self.quant_target is not None:  # feeding an FP8 linear: maybe quantized rows (fp8_fused.py)
            out = self.quant_target.maybe_silu_and_mul(x)
            if out is not None:
                return out
        if isinstance(x, ScaledProduct):  # gate_up's product whose scales were left to this activation
            x = x.value()
        if self.gemv_target is not None:  # M = 1: maybe gate_up deferred into the linear's GEMV (gemv_silu.py)
            deferred = self.gemv_target.maybe_defer(x)
            if deferred is not None:
                return deferred
        if triton_ops.use_triton(x):
            return triton_ops.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
