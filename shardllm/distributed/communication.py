"""Collectives over this rank's tensor-parallel group; identity when the group has one rank."""

from __future__ import annotations

import contextlib

import torch

from shardllm import envs
from shardllm.distributed.parallel_state import get_parallel_context

# Profiling only: skip the tensor-parallel all-reduce (wrong results!) so that a benchmark can measure the
# share of a step spent in it as 1 - t(skipped) / t. Never set in serving.
_SKIP_ALL_REDUCE = envs.SHARDLLM_PROFILE_SKIP_ALL_REDUCE


_fast_all_reduce = None  # a SymmMemAllReduce when the config asks for it (see fast_all_reduce.py)


def set_fast_all_reduce(fast) -> None:
    global _fast_all_reduce
    _fast_all_reduce = fast


@contextlib.contextmanager
def nccl_only():
    """Inside: every tp all-reduce goes to NCCL (the symmetric-memory path has one buffer per rank, which two
    all-reduces in flight at once, as in layers/microbatch_overlap.py, would share)."""
    global _fast_all_reduce
    fast, _fast_all_reduce = _fast_all_reduce, None
    try:
        yield
    finally:
        _fast_all_reduce = fast


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum over the tp group. Use the result: it is `x` itself (NCCL, in place) or a new tensor (fast path)."""
    ctx = get_parallel_context()
    if ctx.tp_size == 1 or _SKIP_ALL_REDUCE:
        return x
    if _fast_all_reduce is not None:
        out = _fast_all_reduce(x)
        if out is not None:
            return out
    import torch.distributed as dist

    dist.all_reduce(x, group=ctx.tp_group)
    return x


def tp_all_gather(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Concatenate every tp rank's `x` along `dim`, in rank order."""
    ctx = get_parallel_context()
    if ctx.tp_size == 1:
        return x
    import torch.distributed as dist

    # one flat output (no per-rank copies out of a staging buffer: fewer kernels, and safe inside a CUDA graph,
    # where the LM head's gather runs); ranks stacked along dim 0, then concatenated along `dim`
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the first from torch 2.13
    flat = torch.empty((ctx.tp_size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    gather(flat, x.contiguous(), group=ctx.tp_group)
    return torch.cat(flat.view(ctx.tp_size, *x.shape).unbind(0), dim=dim)


def pp_send(tensors: dict[str, torch.Tensor]) -> None:
    """Send activations to the same tp rank of the next pipeline stage (keys sent in sorted order)."""
    import torch.distributed as dist

    ctx = get_parallel_context()
    dst = ctx.rank + ctx.tp_size
    for key in sorted(tensors):
        dist.send(tensors[key].contiguous(), dst=dst)


def pp_recv(keys: list[str], shape: tuple[int, ...], dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """Receive what the previous stage's `pp_send` sent (every tensor of `shape`)."""
    import torch.distributed as dist

    ctx = get_parallel_context()
    src = ctx.rank - ctx.tp_size
    out = {}
    for key in sorted(keys):
        t = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(t, src=src)
        out[key] = t
    return out


def send_tokens_to_first_stage(tokens: torch.Tensor):
    """Last stage, async scheduling: send a step's sampled tokens to the same tp rank of the first stage, without
    waiting (the first stage fills the placeholders of a later step with them). Returns the work handle."""
    import torch.distributed as dist

    ctx = get_parallel_context()
    dst = ctx.rank - (ctx.pp_size - 1) * ctx.tp_size
    return dist.isend(tokens, dst=dst, group=ctx.token_group)


def recv_tokens_from_last_stage(buf: torch.Tensor):
    """First stage: post the receive of a step's sampled tokens into `buf`; `wait()` the handle before use."""
    import torch.distributed as dist

    ctx = get_parallel_context()
    src = ctx.rank + (ctx.pp_size - 1) * ctx.tp_size
    return dist.irecv(buf, src=src, group=ctx.token_group)
