"""Programmatic dependent launch (PDL) for the decode path's Triton kernels (issues 13 and 15; on by default on sm90+).

At batch 1 a decode step is some 300 small kernels (about nine a layer), and each boundary costs the GPU a few
microseconds in which the next kernel is launched and its programs placed while the previous one drains. A kernel
launched with PDL (`launch_pdl=True`, Hopper and later) may be placed as soon as every program of the kernel before
it has signalled (`gdc_launch_dependents`); it then waits (`gdc_wait`) until that kernel has finished and its
writes are visible. `pdl_enter` does both as a kernel's first statement, so a PDL kernel touches no memory before
the kernel before it is done: the work itself is not overlapped, only the launch and placement latency. The order
stays transitive (a PDL kernel finishes only after its own wait, so after everything before it), and kernels
launched without PDL (cuBLAS, torch, NCCL) keep the stream's usual order on both sides.

Kernels take it as a `USE_PDL: tl.constexpr` parameter (default False: the code compiled without it is unchanged)
and call `pdl_enter(USE_PDL)` first; launches add `**launch_args(device)`, which is empty unless PDL applies.
Switch: on unless SHARDLLM_PDL=0 (read at import), on a CUDA GPU of compute capability >= 9 with a Triton that has
`launch_pdl` (3.3 and later). Sources: CUDA C++ Programming Guide, "Programmatic Dependent Launch and
Synchronization"; Triton's tutorial 11 (programmatic dependent launch).
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from shardllm import envs

try:
    import triton
    import triton.language as tl
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAS_GDC = True
except ImportError:  # no Triton, or one without the griddepcontrol intrinsics
    triton = tl = gdc_launch_dependents = gdc_wait = None
    HAS_GDC = False

__all__ = ["ENABLED", "launch_args", "pdl_enter", "pdl_launch_dependents", "pdl_wait", "supported"]

ENABLED = envs.SHARDLLM_PDL
_ON = {"USE_PDL": True, "launch_pdl": True}
_OFF: dict = {}


def _triton_has_launch_pdl() -> bool:
    """Whether this Triton's CUDA backend takes `launch_pdl` as a launch option."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_pdl" in {f.name for f in dataclasses.fields(CUDAOptions)}


@functools.cache
def supported(device_index: int) -> bool:
    """Whether PDL launches can run on CUDA device `device_index`: sm90+, not ROCm, griddepcontrol intrinsics and
    `launch_pdl` in this Triton. Cached per device (the engine asks once per launch)."""
    if not HAS_GDC or torch.version.hip is not None or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device_index)[0] >= 9 and _triton_has_launch_pdl()


def launch_args(device: torch.device) -> dict:
    """The launch keywords for a PDL kernel on `device`: {"USE_PDL": True, "launch_pdl": True} where SHARDLLM_PDL
    is on (the default) and `supported`, else {} (the kernel's defaults: no PDL). Never raises."""
    if not ENABLED or device.type != "cuda":
        return _OFF
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _ON if supported(index) else _OFF


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


@_jit
def pdl_launch_dependents(USE_PDL: tl.constexpr):
    """pdl_enter's first half: let the next kernel be placed (then the caller may read memory no kernel of the step
    writes, a layer's weights, before pdl_wait)."""
    if USE_PDL:
        gdc_launch_dependents()


@_jit
def pdl_wait(USE_PDL: tl.constexpr):
    """pdl_enter's second half: wait for the kernel before to finish and its writes to be visible."""
    if USE_PDL:
        gdc_wait()


@_jit
def pdl_enter(USE_PDL: tl.constexpr):
    """A PDL kernel's first statement: let the next kernel be placed, then wait for the one before to finish."""
    pdl_launch_dependents(USE_PDL)
    pdl_wait(USE_PDL)
