"""Collectives over this rank's tensor-parallel group; identity when the group has one rank."""

from __future__ import annotations

import torch

from shardllm.distributed.parallel_state import get_parallel_context


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    ctx = get_parallel_context()
    if ctx.tp_size == 1:
        return x
    import torch.distributed as dist

    dist.all_reduce(x, group=ctx.tp_group)
    return x


def tp_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate every tp rank's `x` along `dim`, in rank order."""
    ctx = get_parallel_context()
    if ctx.tp_size == 1:
        return x
    import torch.distributed as dist

    parts = [torch.empty_like(x) for _ in range(ctx.tp_size)]
    dist.all_gather(parts, x.contiguous(), group=ctx.tp_group)
    return torch.cat(parts, dim=dim)
