"""The parallel context of this rank: its place in the tp x pp layout and its process groups.

The only global state in shardllm. By default it is a world of one rank without any process group,
so every layer runs in a plain test. Rank layout (world = tp * pp, ranks of a stage consecutive):

    tp=2, pp=2:  stage 0 = ranks [0, 1], stage 1 = ranks [2, 3]
                 tp groups: [0, 1], [2, 3]      pp groups: [0, 2], [1, 3]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ParallelContext:
    rank: int = 0
    world_size: int = 1
    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1
    ep_size: int = 1
    tp_group: Any = None  # torch.distributed ProcessGroup, None for size 1
    pp_group: Any = None
    token_group: Any = None  # the pp group again, a separate communicator: sampled tokens, last -> first stage
    pp_partition: tuple[int, ...] | None = None  # layers per stage; None: even split

    @property
    def is_output_rank(self) -> bool:
        """The rank that samples and returns tokens: tp rank 0 of the last stage."""
        return self.tp_rank == 0 and self.is_last_stage

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_driver(self) -> bool:
        return self.rank == 0


def pp_layer_split(num_layers: int, pp_size: int, partition: list[int] | tuple[int, ...] | None = None) -> list[int]:
    """Layers per pipeline stage: `partition` when given, else even, the remainder spread from the front
    (32 layers over 3 stages: [11, 11, 10]). Stage s holds layers [sum(split[:s]), sum(split[:s + 1])).

    Raises:
        ValueError: pp_size beyond the layers, or a partition that does not give pp_size stages of at least one
            layer summing to num_layers.
    """
    if partition:
        part = list(partition)
        if len(part) != pp_size or sum(part) != num_layers or min(part) < 1:
            raise ValueError(f"pp_partition={part} must give {pp_size} stages (pp_size) of at least 1 layer each, "
                             f"summing to the model's {num_layers} layers")
        return part
    if pp_size < 1:
        raise ValueError(f"pipeline_parallel_size must be >= 1, got {pp_size}")
    if pp_size > num_layers:
        raise ValueError(f"pipeline_parallel_size={pp_size} exceeds the model's {num_layers} layers: "
                         f"use at most {num_layers} stages")
    base, extra = divmod(num_layers, pp_size)
    return [base + (s < extra) for s in range(pp_size)]


_CONTEXT = ParallelContext()


def get_parallel_context() -> ParallelContext:
    return _CONTEXT


def set_parallel_context(ctx: ParallelContext) -> None:
    global _CONTEXT
    _CONTEXT = ctx


def rank_layout(tp_size: int, pp_size: int) -> tuple[list[list[int]], list[list[int]]]:
    """(tp groups, pp groups) for world = tp * pp with the ranks of one stage consecutive.

    >>> rank_layout(2, 2)
    ([[0, 1], [2, 3]], [[0, 2], [1, 3]])
    """
    grid = [[s * tp_size + t for t in range(tp_size)] for s in range(pp_size)]  # [stage][tp rank]
    tp_groups = grid
    pp_groups = [[grid[s][t] for s in range(pp_size)] for t in range(tp_size)]
    return tp_groups, pp_groups


def init_distributed(rank: int, world_size: int, tp_size: int, pp_size: int, ep_size: int, backend: str,
                     init_method: str, device=None, pp_partition=None, timeout_s: float = 600.0) -> ParallelContext:
    """Join the process group and build this rank's tp and pp groups (every rank must call this)."""
    import datetime

    import torch.distributed as dist

    kwargs = {"device_id": device} if backend == "nccl" and device is not None else {}
    timeout = datetime.timedelta(seconds=timeout_s)
    if init_method.startswith("store://"):  # a TCPStore another process hosts (the multiproc driver)
        host, port = init_method[len("store://"):].rsplit(":", 1)
        kwargs["store"] = dist.TCPStore(host, int(port), is_master=False, timeout=timeout)
    else:
        kwargs["init_method"] = init_method
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout, **kwargs)
    tp_groups, pp_groups = rank_layout(tp_size, pp_size)
    tp_group = pp_group = None
    for ranks in tp_groups:  # new_group must be called by every rank for every group
        g = dist.new_group(ranks)
        if rank in ranks:
            tp_group = g
    token_group = None
    for ranks in pp_groups:
        g = dist.new_group(ranks)
        t = dist.new_group(ranks) if pp_size > 1 else None  # its own communicator: never queued behind activations
        if rank in ranks:
            pp_group, token_group = g, t
    ctx = ParallelContext(rank=rank, world_size=world_size, tp_rank=rank % tp_size, tp_size=tp_size,
                          pp_rank=rank // tp_size, pp_size=pp_size, ep_size=ep_size, tp_group=tp_group,
                          pp_group=pp_group, token_group=token_group,
                          pp_partition=tuple(pp_partition) if pp_partition else None)
    set_parallel_context(ctx)
    return ctx


def destroy_distributed() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    set_parallel_context(ParallelContext())
