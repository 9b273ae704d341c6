"""L2 prefetch of a batch-1 GEMV's first weight rows from the RMSNorm before it (issues 13 and 15; sm90+).

At batch 1 a decode step alternates weight-streaming GEMVs with short kernels that read almost nothing from HBM
(the RMSNorms, ~2 us each, 64 a step on Llama-3-8B). Hopper's `cp.async.bulk.prefetch.L2.global [addr], size` asks
L2 for `size` bytes without waiting for them (PTX ISA 8.0+, "cp.async.bulk.prefetch"; sm_90), so a norm can start
the next GEMV's first megabytes moving while it runs: the GEMV's first programs (a GEMV's program p reads rows
[p * BLOCK_N, (p + 1) * BLOCK_N), and the first wave are the lowest p) then find their rows in L2. Measured in
`benchmarks/l2_prefetch_probe.py` (twenty-first session, one H200: 32 Llama-3-8B FP8 layers of the engine's GEMVs
with norm-length gaps): 4-8 MB a norm saved 27-38 us a step of ~2,500; prefetching all of o's 16.8 MB during the
attention saved nothing (o's GEMV is 7.4 us cold, 6.4 us with its weight already in L2: not bound by HBM).

How it is used: `link_l2_prefetch(model)` (after loading) gives each RMSNorm feeding a linear whose batch-1 GEMV
streams a 2-D weight (bf16, or FP8 per channel: gemv_silu's `_linear_weights`) that weight as `l2_prefetch`; the
norm's kernel, at one row on an sm90+ GPU, launches one program an SM (the row's and ones that only prefetch),
splits the first `SHARDLLM_L2_PREFETCH_MB` of it over them and issues the prefetches after its PDL wait. Nothing
else changes: a prefetch moves no data the kernel reads, so the outputs are bit-identical with it on or off. Off the
GPU, on older GPUs, or with SHARDLLM_L2_PREFETCH_MB=0, no link is made and the kernel compiles without it.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from shardllm import envs

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without Triton
    triton = tl = None

__all__ = ["CHUNK", "MAX_BYTES", "L2Prefetch", "launch_args", "link_l2_prefetch", "prefetch_l2", "prefetch_ranges",
           "programs", "supported"]

MAX_BYTES = int(envs.SHARDLLM_L2_PREFETCH_MB * 2 ** 20)  # read at import; 0: off
EARLY = envs.SHARDLLM_L2_PREFETCH_EARLY  # the requests before the norm's PDL wait, not after
CHUNK = 16384  # bytes a prefetch instruction (the probe: 16 and 64 KiB within 1%; 4 MB over 132 programs: 2 each)


@functools.cache
def supported(device_index: int) -> bool:
    """Whether CUDA device `device_index` runs `cp.async.bulk.prefetch.L2` (compute capability 9.0+, not ROCm).
    Cached per device."""
    if tl is None or torch.version.hip is not None or not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device_index)[0] >= 9


class L2Prefetch:
    """The weight a norm's kernel prefetches: the first `nbytes` bytes of `weight`'s storage (its first rows).
    Not an nn.Module or a Parameter, so the norm does not register the weight as its own."""

    def __init__(self, weight: torch.Tensor, nbytes: int):
        if not weight.is_contiguous():
            raise ValueError(f"L2Prefetch needs a contiguous weight (its first rows are its first bytes), got "
                             f"shape {tuple(weight.shape)} strides {weight.stride()}")
        if weight.data_ptr() % 16:
            raise ValueError(f"L2Prefetch needs a 16-byte aligned weight (bulk prefetch), got address "
                             f"{weight.data_ptr():#x}")
        self.weight = weight.detach().reshape(-1).view(torch.uint8)  # the bytes, so offsets count bytes
        self.nbytes = max(0, min(int(nbytes), self.weight.numel())) // 16 * 16  # bulk sizes are 16-byte multiples

    def launch_args(self, programs: int) -> dict:
        """The kernel arguments for `programs` programs sharing the prefetch: pf_ptr, pf_bytes, PF_CHUNK (bytes an
        instruction, 16-byte multiple), PF_NCHUNK (instructions a program, a power of 2)."""
        per_program = -(-self.nbytes // programs)
        nchunk = 1 << max(-(-per_program // CHUNK) - 1, 0).bit_length()
        return dict(pf_ptr=self.weight, pf_bytes=self.nbytes, PF_CHUNK=CHUNK, PF_NCHUNK=nchunk)


@functools.cache
def programs(device_index: int) -> int:
    """Programs a prefetching launch spreads its requests over: one an SM. A program lasts until its bulk requests
    are served, and one SM's requests are served at a fraction of HBM's rate (twenty-first session: a one-program
    norm asking for 4 MB took ~15 us, the same spread over 132 programs ~2 us)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def launch_args(target: L2Prefetch | None, x: torch.Tensor, rows: int) -> tuple[int, dict]:
    """(grid size, the norm kernel's prefetch arguments) for input rows x (N, H) normalised by `rows` programs: at
    one row on a supported GPU, a grid of one program an SM (at least `rows`; those past `rows` only prefetch,
    pf_rows) and the target's arguments; else (rows, {}) (the kernel's defaults: no prefetch)."""
    if (target is None or target.nbytes == 0 or x.shape[0] != 1 or not x.is_cuda
            or not supported(x.device.index or 0)):
        return rows, {}
    grid = max(rows, programs(x.device.index or 0))
    return grid, {**target.launch_args(grid), "pf_rows": rows, "PF_EARLY": EARLY}


if tl is not None:
    @triton.jit
    def prefetch_ranges(nbytes, pid, nprog, CHUNK: tl.constexpr, NCHUNK: tl.constexpr):
        """Program `pid` of `nprog`'s share of [0, nbytes) as NCHUNK (offset, size) pairs: contiguous shares of a
        CHUNK multiple, sizes in [0, CHUNK] (0: nothing to ask), the shares disjoint and covering [0, nbytes)
        when nprog * NCHUNK * CHUNK >= nbytes. Offsets are CHUNK multiples; sizes 16-byte multiples when nbytes
        and CHUNK are."""
        per = tl.cdiv(tl.cdiv(nbytes, nprog), CHUNK) * CHUNK
        start = pid * per
        offs = start + tl.arange(0, NCHUNK) * CHUNK
        size = tl.minimum(tl.maximum(tl.minimum(nbytes - offs, start + per - offs), 0), CHUNK).to(tl.int32)
        return offs, size

    @triton.jit
    def prefetch_l2(base_ptr, nbytes, pid, nprog, CHUNK: tl.constexpr, NCHUNK: tl.constexpr):
        """Program `pid` of `nprog` asks L2 for its share (prefetch_ranges) of [base_ptr, base_ptr + nbytes)
        (base_ptr: to bytes; 16-byte aligned) in up to NCHUNK bulk prefetches. sm90+ only (inline PTX)."""
        offs, size = prefetch_ranges(nbytes, pid, nprog, CHUNK, NCHUNK)
        # A block narrower than the program's threads is replicated across them (thread t holds element
        # t % NCHUNK): only threads below NCHUNK issue, so each range is asked for once.
        tl.inline_asm_elementwise(
            "{ .reg .pred p, q; .reg .u32 t; mov.u32 t, %tid.x; setp.lt.u32 q, t, $3; setp.gt.s32 p, $2, 0; "
            "and.pred p, p, q; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }", "=r,l,r,r",
            [base_ptr + offs, size, tl.full([NCHUNK], NCHUNK, tl.int32)], dtype=tl.int32, is_pure=False, pack=1)
else:
    prefetch_ranges = prefetch_l2 = None


def link_l2_prefetch(model: nn.Module) -> int:
    """Gives each RMSNorm producer in `model.fp8_act_quant_inputs` ({producer: linear}, names relative to a decoder
    layer) an L2Prefetch of its linear's GEMV weight (the first SHARDLLM_L2_PREFETCH_MB of it), where the linear's
    batch-1 GEMV streams a 2-D weight with contiguous rows on an sm90+ GPU. Returns the number of links (0 when
    the switch is 0, off CUDA or before sm90)."""
    from shardllm.layers.gemv_silu import _linear_weights
    from shardllm.layers.layernorm import RMSNorm
    from shardllm.layers.quantization import producer_linear_pairs

    if MAX_BYTES <= 0:
        return 0
    linked = 0
    for producer, linear in producer_linear_pairs(model):
        weights = _linear_weights(linear) if isinstance(producer, RMSNorm) else None
        if weights is None:
            continue
        w = weights[0]
        if not w.is_cuda or not supported(w.device.index or 0) or not w.is_contiguous() or w.data_ptr() % 16:
            continue
        producer.l2_prefetch = L2Prefetch(w, MAX_BYTES)
        linked += 1
    return linked
