"""Rotary position embedding (the half-split "neox" layout HF Llama uses), with Llama 3.1 and linear scaling."""

from __future__ import annotations

import math

import torch
from torch import nn

from shardllm.layers import triton_ops

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_parameters(hf_config) -> tuple[float, dict]:
    """(theta, scaling dict) from a transformers config, old (rope_scaling) or new (rope_parameters) style."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    scaling = dict(getattr(hf_config, "rope_scaling", None) or params)
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None) or 10000.0)
    return float(theta), scaling


def _inv_freq(rot_dim: int, theta: float, scaling: dict) -> torch.Tensor:
    inv_freq = 1.0 / (theta ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim))
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        factor, lo, hi = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        mid = (wavelen <= old_len / lo) & (wavelen >= old_len / hi)
        return torch.where(mid, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
    raise ValueError(f"rope type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, theta: float, scaling: dict | None = None):
        super().__init__()
        self.head_dim = head_dim
        inv_freq = _inv_freq(head_dim, theta, scaling or {})
        t = torch.arange(max_position, dtype=torch.float64)
        freqs = torch.outer(t, inv_freq)  # (P, D/2)
        self.register_buffer("cos_sin_cache", torch.cat([freqs.cos(), freqs.sin()], -1).float(),
                             persistent=False)  # (P, D)

    def uses_kernel(self, q: torch.Tensor) -> bool:
        """Whether forward rotates q with `triton_ops.rotary_embedding_` (neox, `cos_sin_cache`): where it does,
        a kernel fused with that rotation (`triton_ops.rotary_embedding_and_write_kv_`) may stand in for it."""
        return triton_ops.use_triton(q)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q: (N, nh, D), k: (N, nkv, D), positions: (N,).

        The Triton path (CUDA) rotates q and k in place and returns them; the torch reference returns new
        tensors. Callers must use the returned pair.
        """
        if self.uses_kernel(q):
            return triton_ops.rotary_embedding_(positions, q, k, self.cos_sin_cache)
        cos, sin = self.cos_sin_cache[positions].unsqueeze(1).chunk(2, dim=-1)  # (N, 1, D/2) each
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
