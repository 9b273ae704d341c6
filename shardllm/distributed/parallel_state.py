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

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_driver(self) -> bool:
        return self.rank == 0


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
