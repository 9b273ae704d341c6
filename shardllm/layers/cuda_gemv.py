"""Batch-1 FP8 GEMV in CUDA, compiled at run time by NVRTC and launched through the driver API (issue 13).

y (1, N) bf16 = x (1, K) bf16 @ (w (N, K) e4m3 * scale (N,) fp32 [:, None])^T, or with silu_input the same from
gate_up (1, 2K) with x = silu(gate) * up. The kernel (csrc/fp8_gemv_tma.cu) streams each block's weight rows into
shared memory with bulk asynchronous copies that start before its programmatic-dependent-launch wait, so a layer's
weights flow while the kernels before it still run; see the source's header for the scheme and its numerics (x
scaled into f16, f16x2 products over 16-term chunks, fp32 sums).

Why NVRTC and ctypes, not a C++ extension: the NVRTC library ships with every CUDA build of torch (no nvcc, no
ninja, no compile step at install), a module compiles in about a second, and the driver's cuLaunchKernelEx takes
the launch attribute that PDL needs (CUDA Driver API, "Execution Control"; CUDA C++ Programming Guide,
"Programmatic Dependent Launch and Synchronization"). Kernel launches go into the current torch stream, so CUDA
graph capture records them like any other kernel.

Switch: SHARDLLM_CUDA_GEMV (off by default; see envs). Where it is on but cannot run (no NVRTC, a GPU before sm_90,
a shape or alignment the kernel does not take, a compile or load error) the Triton GEMV runs instead, and the
first failure is logged once.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import logging
import os
import sys
from typing import NamedTuple

import torch

from shardllm import envs

__all__ = ["CudaGemvPlan", "ENABLED", "compile_source", "gemv_fp8", "plan", "usable"]

log = logging.getLogger(__name__)

ENABLED = envs.SHARDLLM_CUDA_GEMV
WARPS = 8  # the kernel's WARPS (8 warps, 256 threads a block)
STAGE_TARGET = 16384  # bytes a stage aims at (RS rows of K bytes)
SOURCES = {name: os.path.join(os.path.dirname(__file__), "csrc", f"fp8_gemv_{name}.cu") for name in ("tma", "reg")}


class CudaGemvPlan(NamedTuple):
    """One launch. kernel "tma" (csrc/fp8_gemv_tma.cu): rows a stage (rs), 16-byte chunks a lane may take (nc),
    stages in the ring; kernel "reg" (csrc/fp8_gemv_reg.cu): 16-byte chunks a lane a piece (u), rs 1 where every
    piece is whole (the kernel's EVEN: no guards), else 0. Both: blocks, and dynamic shared memory bytes."""

    rs: int
    nc: int
    stages: int
    grid: int
    smem: int
    kernel: str = "tma"
    u: int = 0

    def defines(self, silu: bool) -> dict[str, int]:
        if self.kernel == "reg":
            return {"U": self.u, "EVEN": int(self.rs), "WARPS": WARPS}  # (no SILU form: `usable` refuses it)
        return {"RS": self.rs, "NC": self.nc, "STAGES": self.stages, "SILU": int(silu)}


def plan(n: int, k: int, num_sms: int, stages: int | None = None, blocks_per_sm: int | None = None,
         kernel: str | None = None) -> CudaGemvPlan | None:
    """The launch for an (N, K) e4m3 weight on a GPU of `num_sms` SMs, or None where the kernel does not take the
    shape (kernel default: SHARDLLM_CUDA_GEMV_KERNEL).

    "reg": K a multiple of 16; a piece is U chunks a lane: where K is a multiple of 512, the largest U of 8..4
    dividing K / 512 (rs = 1 marks that even plan: no guards), else min(8, the chunks a lane in a row); grid
    num_sms * blocks_per_sm blocks of 8 warps, at most one warp a row; no shared memory, no fused SiLU form.
    "tma": RS is the power of two <= 8 with RS * K nearest STAGE_TARGET from below (at least 1); a row's K splits
    over 8 / RS warps, so K must be a multiple of 16 * 8 / RS and N of RS; a lane takes at most 8 chunks of 16 bytes
    (K <= 4096 * RS); stages (default SHARDLLM_CUDA_GEMV_STAGES) capped so the ring fits 200 KiB; at most one block per
    RS-row group."""
    if n <= 0 or k <= 0 or num_sms <= 0:
        return None
    kernel = envs.SHARDLLM_CUDA_GEMV_KERNEL if kernel is None else kernel
    stages = envs.SHARDLLM_CUDA_GEMV_STAGES if stages is None else stages
    blocks_per_sm = envs.SHARDLLM_CUDA_GEMV_BLOCKS_PER_SM if blocks_per_sm is None else blocks_per_sm
    if kernel == "reg":
        if k % 16:
            return None
        u = next((u for u in (8, 7, 6, 5, 4) if k % 512 == 0 and (k // 512) % u == 0), 0)
        even = int(u > 0)
        u = u or min(8, -(-k // 512))
        grid = max(1, min(num_sms * blocks_per_sm, -(-n // WARPS)))
        return CudaGemvPlan(even, 0, 0, grid, 0, "reg", u)
    rs = 8
    while rs > 1 and rs * k > STAGE_TARGET:
        rs //= 2
    wpr = WARPS // rs
    if k % (16 * wpr) or n % rs:
        return None
    cw = k // 16 // wpr
    nc = -(-cw // 32)
    if nc > 8:
        return None
    stage_bytes = rs * k
    stages = max(2, min(stages, (200 * 1024) // stage_bytes))
    grid = max(1, min(num_sms * blocks_per_sm, n // rs))
    smem = stages * stage_bytes + 8 * stages + 4 * 3 * WARPS
    return CudaGemvPlan(rs, 4 if nc <= 4 else 8, stages, grid, smem)


# --- NVRTC ---------------------------------------------------------------------------------------------------------

def _load_first(names: list[str], patterns: list[str]) -> ctypes.CDLL | None:
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            pass
    for pattern in patterns:
        for root in sys.path:
            for path in sorted(glob.glob(os.path.join(root, pattern))):
                try:
                    return ctypes.CDLL(path)
                except OSError:
                    pass
    return None


@functools.cache
def _nvrtc() -> ctypes.CDLL | None:
    """The NVRTC library (torch's CUDA major first, then any), or None."""
    major = (torch.version.cuda or "").split(".")[0]
    # NVRTC opens its builtins library by name at compile time: load a pip wheel's copy first (global symbols)
    for root in sys.path:
        for path in sorted(glob.glob(os.path.join(root, "nvidia/*/lib/libnvrtc-builtins.so*"))):
            if not major or f".so.{major}" in path:
                try:
                    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                except OSError:
                    pass
    names = ([f"libnvrtc.so.{major}"] if major else []) + ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"]
    return _load_first(names, ["nvidia/*/lib/libnvrtc.so*"])


def compile_source(arch: str, defines: dict[str, int], ptxas_verbose: bool = False, kernel: str = "tma"
                   ) -> tuple[bytes, str]:
    """(cubin, log) of csrc/fp8_gemv_{kernel}.cu for `arch` (e.g. "sm_90a") with -D defines. Needs no GPU.

    Raises RuntimeError naming the log where NVRTC is missing or the compile fails."""
    lib = _nvrtc()
    if lib is None:
        raise RuntimeError("NVRTC not found (libnvrtc.so of a CUDA build of torch, or pip install "
                           "nvidia-cuda-nvrtc-cu12)")
    source = SOURCES[kernel]
    with open(source, "rb") as f:
        src = f.read()
    opts = [f"--gpu-architecture={arch}", "-default-device", "-std=c++17"]
    opts += [f"-D{k}={v}" for k, v in sorted(defines.items())]
    if ptxas_verbose:
        opts.append("--ptxas-options=-v")
    prog = ctypes.c_void_p()
    _rtc(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), src, os.path.basename(source).encode(), 0, None, None))
    try:
        arr = (ctypes.c_char_p * len(opts))(*(o.encode() for o in opts))
        res = lib.nvrtcCompileProgram(prog, len(opts), arr)
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, buf)
        text = buf.value.decode(errors="replace")
        if res != 0:
            raise RuntimeError(f"NVRTC could not compile {source} for {arch} with {defines}:\n{text}")
        _rtc(lib, lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)))
        cubin = ctypes.create_string_buffer(size.value)
        _rtc(lib, lib.nvrtcGetCUBIN(prog, cubin))
        return cubin.raw, text
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def _rtc(lib: ctypes.CDLL, res: int) -> None:
    if res != 0:
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise RuntimeError(f"NVRTC error {res}: {lib.nvrtcGetErrorString(res).decode()}")


# --- driver API ----------------------------------------------------------------------------------------------------

class _LaunchAttr(ctypes.Structure):  # CUlaunchAttribute: id, 4 bytes of padding, a 64-byte value union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int), ("rest", ctypes.c_char * 60)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p),
                ("attrs", ctypes.POINTER(_LaunchAttr)), ("numAttrs", ctypes.c_uint)]


_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION (cuda.h)
_MAX_DYNAMIC_SHARED = 8  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES


@functools.cache
def _cuda() -> ctypes.CDLL:
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuLaunchKernelEx.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
                                     ctypes.c_void_p]
    return lib


def _drv(res: int, what: str) -> None:
    if res != 0:
        msg = ctypes.c_char_p()
        _cuda().cuGetErrorString(res, ctypes.byref(msg))
        raise RuntimeError(f"{what}: CUDA driver error {res} ({(msg.value or b'?').decode()})")


@functools.cache
def _kernel(device_index: int, p: CudaGemvPlan, silu: bool) -> ctypes.c_void_p:
    """The loaded kernel for a plan on one device (compiled and loaded once per process)."""
    major, minor = torch.cuda.get_device_capability(device_index)
    cubin, _ = compile_source(f"sm_{major}{minor}a" if major == 9 else f"sm_{major}{minor}", p.defines(silu),
                              kernel=p.kernel)
    lib = _cuda()
    with torch.cuda.device(device_index):
        torch.cuda.current_stream(device_index)  # the primary context is current on this thread
        module, fn = ctypes.c_void_p(), ctypes.c_void_p()
        _drv(lib.cuModuleLoadData(ctypes.byref(module), ctypes.c_char_p(cubin)), "cuModuleLoadData")
        _drv(lib.cuModuleGetFunction(ctypes.byref(fn), module, f"shardllm_fp8_gemv_{p.kernel}".encode()),
             "cuModuleGetFunction")
        _drv(lib.cuFuncSetAttribute(fn, _MAX_DYNAMIC_SHARED, p.smem), "cuFuncSetAttribute")
    return fn


def _launch(fn: ctypes.c_void_p, p: CudaGemvPlan, stream: int, pdl: bool, args: list) -> None:
    attr = _LaunchAttr(_PROGRAMMATIC_STREAM_SERIALIZATION, b"", 1, b"")
    cfg = _LaunchConfig(p.grid, 1, 1, WARPS * 32, 1, 1, p.smem, stream, ctypes.pointer(attr), 1 if pdl else 0)
    ptrs = (ctypes.c_void_p * len(args))(*(ctypes.cast(ctypes.byref(a), ctypes.c_void_p) for a in args))
    _drv(_cuda().cuLaunchKernelEx(ctypes.byref(cfg), fn, ptrs, None), "cuLaunchKernelEx")


_FAILED: set[tuple] = set()


def usable(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor | None, silu_input: bool) -> bool:
    """Whether gemv_fp8 takes this call: the switch on, one bf16 row on an sm90+ GPU, e4m3 w with fp32 per-channel
    scales, contiguous and 16-byte aligned operands, a shape `plan` takes (the fused SiLU input only with the "tma"
    kernel), and no earlier failure for it."""
    if not ENABLED or not x.is_cuda or x.dtype != torch.bfloat16 or x.dim() != 2 or x.shape[0] != 1:
        return False
    if w.dtype != torch.float8_e4m3fn or w_scale is None or w_scale.dtype != torch.float32:
        return False
    if not (x.is_contiguous() and w.is_contiguous() and w_scale.is_contiguous()):
        return False
    if x.data_ptr() % 16 or w.data_ptr() % 16:
        return False
    n, k = w.shape
    if x.shape[1] != (2 * k if silu_input else k) or w_scale.numel() != n:
        return False
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if torch.cuda.get_device_capability(index)[0] < 9:
        return False
    p = _plan_for(index, n, k)
    return p is not None and not (silu_input and p.kernel == "reg") and (index, n, k, silu_input) not in _FAILED


@functools.cache
def _plan_for(index: int, n: int, k: int) -> CudaGemvPlan | None:
    return plan(n, k, torch.cuda.get_device_properties(index).multi_processor_count)


def gemv_fp8(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, silu_input: bool = False,
             pdl: bool = True) -> torch.Tensor | None:
    """y (1, N) bf16, or None where the kernel cannot run (then logged once; the caller runs the Triton GEMV).
    Callers check `usable` first. pdl: launch with programmatic stream serialization (the engine's PDL switch)."""
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    n, k = w.shape
    p = _plan_for(index, n, k)
    try:
        fn = _kernel(index, p, silu_input)
    except Exception as e:  # no NVRTC, a compile or load failure: the Triton GEMV, once logged
        _FAILED.add((index, n, k, silu_input))
        log.warning("CUDA GEMV unavailable for %dx%d (silu %s): %s: %s; the Triton GEMV runs", n, k, silu_input,
                    type(e).__name__, str(e)[:500])
        return None
    y = torch.empty((1, n), dtype=torch.bfloat16, device=x.device)
    args = [ctypes.c_void_p(w.data_ptr()), ctypes.c_void_p(x.data_ptr()), ctypes.c_void_p(w_scale.data_ptr()),
            ctypes.c_void_p(y.data_ptr()), ctypes.c_int(n), ctypes.c_int(k)]
    _launch(fn, p, torch.cuda.current_stream(x.device).cuda_stream, pdl, args)
    return y
