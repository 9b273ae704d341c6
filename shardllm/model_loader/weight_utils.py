"""Helpers for weight loaders: a checkpoint tensor may be a torch.Tensor or a lazy safetensors slice.

Narrowing a lazy slice reads only that part of the file, so each rank reads only its own shard.
"""

from __future__ import annotations

from typing import Any

import torch


def weight_shape(w: Any) -> tuple[int, ...]:
    return tuple(w.shape) if isinstance(w, torch.Tensor) else tuple(w.get_shape())


def narrow(w: Any, dim: int, start: int, length: int) -> torch.Tensor | Any:
    if isinstance(w, torch.Tensor):
        return w.narrow(dim, start, length)
    index = [slice(None)] * len(w.get_shape())
    index[dim] = slice(start, start + length)
    return w[tuple(index)]


def materialize(w: Any) -> torch.Tensor:
    if isinstance(w, torch.Tensor):
        return w
    return w[()] if len(w.get_shape()) == 0 else w[:]  # a 0-dim slice (per-tensor scales) refuses [:]


def copy_weight(param: torch.Tensor, w: Any) -> None:
    w = materialize(w)
    if tuple(param.shape) != tuple(w.shape):
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)} vs checkpoint {tuple(w.shape)}")
    param.data.copy_(w)


def default_weight_loader(param: torch.Tensor, w: Any) -> None:
    copy_weight(param, w)
