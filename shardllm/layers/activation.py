"""Activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from shardllm.layers import triton_ops


class SiluAndMul(nn.Module):
    """silu(x[..., :d]) * x[..., d:] for the fused gate_up projection."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if triton_ops.use_triton(x):
            return triton_ops.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up
