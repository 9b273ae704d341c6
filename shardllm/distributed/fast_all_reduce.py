"""A low-latency all-reduce for the tensor-parallel group on one host: PyTorch's symmetric-memory kernels.

Every rank allocates one buffer that all ranks of the group map (CUDA P2P over NVLink). A one-shot all-reduce
copies this rank's input into its buffer and then reads every peer's buffer and adds them (one kernel, one
barrier): the fastest for the small tensors of decode steps. A two-shot all-reduce (reduce-scatter then
all-gather through the same buffers) moves less data per rank and serves mid sizes. Larger tensors, other
dtypes, and anything the kernels cannot take go to NCCL.

Multicast (NVLS) is never used: only P2P kernels are called, and TORCH_SYMM_MEM_DISABLE_MULTICAST=1 is set
before the first allocation so that PyTorch does not create multicast objects either.
"""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)

BACKENDS = ("nccl", "symm_mem")
DEFAULT_MAX_BYTES = 8 << 20  # the buffer: the largest tensor the fast path takes (SHARDLLM_SYMM_MEM_MAX_MB)


def one_shot_max_bytes(world_size: int) -> int:
    """Up to this size one-shot wins (each rank reads world_size inputs); above it two-shot does.

    Starting points to be tuned on the device with benchmarks/all_reduce.py.
    """
    return 512 << 10 if world_size <= 2 else 256 << 10


class SymmMemAllReduce:
    """All-reduce (sum) of a contiguous tensor over `group`; `__call__` returns None when it cannot take one."""

    def __init__(self, group, device: torch.device, dtype: torch.dtype, max_bytes: int = DEFAULT_MAX_BYTES):
        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
        import torch.distributed as dist
        import torch.distributed._symmetric_memory as symm_mem

        for op in ("one_shot_all_reduce_copy", "two_shot_all_reduce_out"):
            if not hasattr(torch.ops.symm_mem, op):
                raise RuntimeError(f"this PyTorch ({torch.__version__}) has no torch.ops.symm_mem.{op}")
        self.world_size = dist.get_world_size(group)
        self.group_name = group.group_name
        self.dtype = dtype
        self.elem = torch.empty((), dtype=dtype).element_size()
        self.max_numel = max_bytes // self.elem
        self.one_shot_numel = one_shot_max_bytes(self.world_size) // self.elem
        # the kernels load 16 bytes per thread; two-shot splits the tensor into world_size equal parts
        self.align = 16 // self.elem
        if hasattr(symm_mem, "enable_symm_mem_for_group"):  # older releases need it before rendezvous
            symm_mem.enable_symm_mem_for_group(self.group_name)
        self.buffer = symm_mem.empty(self.max_numel, dtype=dtype, device=device)
        self.handle = symm_mem.rendezvous(self.buffer, self.group_name)
        self.calls = {"one_shot": 0, "two_shot": 0, "nccl": 0}

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        n = x.numel()
        if x.dtype != self.dtype or not x.is_contiguous() or n > self.max_numel or n % self.align:
            self.calls["nccl"] += 1
            return None
        ops = torch.ops.symm_mem
        if n <= self.one_shot_numel:
            self.calls["one_shot"] += 1
            return ops.one_shot_all_reduce_copy(self.buffer[:n].view(x.shape), x, "sum", self.group_name)
        if n % (self.align * self.world_size):
            self.calls["nccl"] += 1
            return None
        self.calls["two_shot"] += 1
        buf = self.buffer[:n].view(x.shape)
        buf.copy_(x)
        return ops.two_shot_all_reduce_out(buf, "sum", self.group_name, torch.empty_like(x))


def create(backend: str, group, device: torch.device, dtype: torch.dtype,
           max_bytes: int | None = None) -> SymmMemAllReduce | None:
    """The fast all-reduce the config asks for, or None for plain NCCL (every rank of `group` must call this).

    max_bytes: the symmetric buffer's size in bytes, the largest tensor the fast path takes (default:
    SHARDLLM_SYMM_MEM_MAX_MB, 8 MiB); every rank must pass the same. Raises ValueError for one under 1 MiB.

    'symm_mem' needs CUDA P2P between every pair of the group's GPUs. Where it cannot start on some rank, that
    rank says why, and all ranks agree (over NCCL) to use NCCL: a group never mixes the two.
    """
    if backend not in BACKENDS:
        raise ValueError(f"all_reduce must be one of {BACKENDS}, got {backend!r}")
    if backend == "nccl":
        return None
    if max_bytes is None:
        from shardllm import envs

        max_bytes = int(envs.SHARDLLM_SYMM_MEM_MAX_MB * (1 << 20))
    if max_bytes < (1 << 20):
        raise ValueError(f"the symmetric all-reduce buffer needs at least 1 MiB, got {max_bytes} bytes: raise "
                         "SHARDLLM_SYMM_MEM_MAX_MB")
    if device.type != "cuda":
        return None
    import torch.distributed as dist

    fast = None
    try:
        fast = SymmMemAllReduce(group, device, dtype, max_bytes=max_bytes)
    except Exception as e:  # an old driver, no P2P between these GPUs, a PyTorch without the kernels
        logger.warning("symmetric-memory all-reduce unavailable (%s: %s); using NCCL", type(e).__name__, e)
    ok = torch.tensor([1 if fast is not None else 0], dtype=torch.int32, device=device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
    return fast if int(ok.item()) == 1 else None
