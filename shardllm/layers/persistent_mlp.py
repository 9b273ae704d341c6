"""A persistent decode MLP for batch 1 (issue 13's batch-1 floor; an experiment, not yet wired into the models).

At batch 1 a Llama MLP is three launches: the residual add + RMSNorm, the gate_up GEMV, the fused SiLU-and-mul
down GEMV (`gemv.gemv(..., silu_input=True)`). Each GEMV streams its weights at 74-86% of the copy bandwidth when
timed alone (docs/benchmarks.md, eleventh session): every launch ramps up and drains, and a kernel cannot load the
next one's weights. Here one launch does all three: `num_progs` programs, all resident at once, each

    1. computes the norm's rstd of x (+ residual) (program 0 also stores x + residual),
    2. runs gate_up's GEMV over its share of the row tiles (the normed input formed as it loads x),
    3. loads its first down tile's first weight step, then waits at a grid barrier for every program's gate_up rows,
    4. runs the down GEMV over its share of tiles (SiLU-and-mul formed as it loads gate_up's output).

The barrier is a sense-reversing one over two int64 words, (count, generation), both 0 at first: a program reads
the generation, adds 1 to the count; the last to arrive sets the count back to 0 and adds 1 to the generation, the
others wait for the generation to change. It leaves the words as it found them but for the generation, so any
launch size may follow any other and a CUDA graph replays it as is. It needs every program resident at once:
num_progs is at most `max_resident_programs` of the compiled binary, and where Triton can, the launch is
cooperative (the driver refuses a grid that cannot be co-resident instead of letting it hang). On the CPU
(Triton's interpreter runs programs one after another, so more than one program would wait forever) the kernel
runs as two launches, gate_up then down (`barrier=None`), with the same per-tile math; one program can also run
the one-launch form there, its barrier passing at once.

Numerics are the unfused path's up to fp32 summation order: the rstd's sum of squares, as gemv_norm's fused form.
Measured nowhere yet: `benchmarks/persistent_mlp.py` times it against the three launches (queued:
benchmarks/device_s14_c.sh).

In the models (SHARDLLM_PERSISTENT_MLP=1, off): `maybe_run` takes a Llama decoder layer's MLP block (the
post-attention norm, gate_up, SiLU, down) at one row, tp 1, with FP8 per-channel weights of shapes the tiles divide;
anything else returns None and runs as before. A CUDA graph captures it only once its grid is known (the eager
forward before each capture compiles it).
"""

from __future__ import annotations

import logging
import sys

import torch

from shardllm import envs
from shardllm.layers.gemv import HAS_TRITON
from shardllm.layers.triton_ops import RMS_MAX_BLOCK

ENABLED = envs.SHARDLLM_PERSISTENT_MLP
# None: where the checks pass and ENABLED; True: also on the CPU (two launches in the interpreter; tests); False: off
FORCE: bool | None = None
TILES, LATE, NUM_WARPS = (8, 512, 16, 1024), (False, True), 4  # the engine's M = 1 configs for Llama-3-8B's GEMVs
AHEAD, NUM_STAGES, TMA = 1, 3, False
if envs.SHARDLLM_PERSISTENT_MLP_CONFIG:  # a sweep's pick (benchmarks/persistent_mlp.py --variants)
    TILES, LATE, NUM_WARPS, AHEAD, NUM_STAGES, TMA = envs.SHARDLLM_PERSISTENT_MLP_CONFIG
COOPERATIVE = True  # a cooperative launch where Triton offers it (benchmarks/persistent_mlp.py times both)
_barriers: dict[torch.device, torch.Tensor] = {}
logger = logging.getLogger(__name__)
_announced = False

if HAS_TRITON:
    import triton
    import triton.language as tl

    from shardllm.layers.gemv_steps import _fma_update
    from shardllm.layers.pdl import launch_args, pdl_enter

    try:
        from triton.tools.tensor_descriptor import TensorDescriptor
    except ImportError:  # pragma: no cover - a Triton without host TMA descriptors
        TensorDescriptor = None

    @triton.jit
    def _step_load(w_ptr, j, its, pid, num_progs, S, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """The (1, BLOCK_N, BLOCK_K) weights of step j of this program's flat (tile, K step) loop: its tile pid +
        (j // S) * num_progs, columns (j % S) * BLOCK_K on (rows past N read row 0, their outputs masked; a step
        at or past `its` reads nothing, zeros)."""
        n = (pid + (j // S) * num_progs) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = tl.where(n < N, n, 0).to(tl.int64)
        k = (j % S) * BLOCK_K + tl.arange(0, BLOCK_K)
        ptrs = w_ptr + rows[None, :, None] * K + k[None, None, :]
        return tl.load(ptrs, mask=k[None, None, :] * 0 + j < its, other=0.0)

    @triton.jit
    def _step_load_tma(w_desc, j, its, pid, num_progs, S, N, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """_step_load through a TMA descriptor over w (N, K), boxes (BLOCK_N, BLOCK_K): rows past N read zeros (the
        box's out-of-bounds fill), and a step at or past `its` asks for a box wholly past N, which reads nothing."""
        row0 = tl.where(j < its, (pid + (j // S) * num_progs) * BLOCK_N, N)
        return w_desc.load([row0, (j % S) * BLOCK_K])[None, :, :]

    @triton.jit
    def _prologue(w_ptr, pid, num_progs, its, S, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                  AHEAD: tl.constexpr):
        """The weights of a flat loop's first AHEAD steps (1 or 2)."""
        w0 = _step_load(w_ptr, 0, its, pid, num_progs, S, N, K, BLOCK_N, BLOCK_K)
        if AHEAD == 2:
            w1 = _step_load(w_ptr, 1, its, pid, num_progs, S, N, K, BLOCK_N, BLOCK_K)
        else:
            w1 = w0
        return w0, w1

    @triton.jit
    def _flat_gemv(w_ptr, s_ptr, y_ptr, w0, w1, pid, num_progs, its, S, N, K, x_rows, r_rows, nw_rows, rstd,
                   BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SILU_INPUT: tl.constexpr,
                   NORM_INPUT: tl.constexpr, HAS_RESIDUAL: tl.constexpr, LATE_REDUCE: tl.constexpr,
                   AHEAD: tl.constexpr, TMA: tl.constexpr, STAGES: tl.constexpr):
        """y[n] = s[n] * sum_k w[n, k] x[k] over this program's row tiles pid, pid + num_progs, .. as one flat loop
        of `its` steps (S a tile), each loading the weights of the step AHEAD on (w0, w1: the prologue's) before
        its products, so the loads run on across tile ends (TMA: w_ptr is a descriptor, each step's box loaded in
        the step and Triton's pipeliner keeps num_stages - 1 ahead in shared memory; w0, w1 unused); a tile's
        products in the order of the engine's GEMV (gemv_steps._fma_update), its output scaled and stored at its
        last step."""
        m = tl.arange(0, 1)
        nn = tl.arange(0, BLOCK_N)
        kk = tl.arange(0, BLOCK_K)
        m_in = m[:, None] < 1
        m_in3 = (m[:, None, None] < 1) & (nn[None, :, None] >= 0)
        acc = tl.zeros((1, BLOCK_N), tl.float32)
        if LATE_REDUCE:
            acc3 = tl.zeros((1, BLOCK_N, BLOCK_K), tl.float32)
        else:
            acc3 = acc
        for j in tl.range(0, its, num_stages=STAGES):
            if TMA:
                w = _step_load_tma(w_ptr, j, its, pid, num_progs, S, N, BLOCK_N, BLOCK_K)
            else:
                w = w0
                w_next = _step_load(w_ptr, j + AHEAD, its, pid, num_progs, S, N, K, BLOCK_N, BLOCK_K)
            acc, acc3 = _fma_update(acc, acc3, w, (j % S) * BLOCK_K + kk, K, x_rows, x_rows, r_rows, nw_rows, rstd,
                                    m_in, m_in3, K, True, SILU_INPUT, NORM_INPUT, HAS_RESIDUAL, LATE_REDUCE)
            if j % S == S - 1:
                n = (pid + (j // S) * num_progs) * BLOCK_N + nn
                rows = tl.where(n < N, n, 0)
                if LATE_REDUCE:
                    out = tl.sum(acc3, axis=2)
                else:
                    out = acc
                out = out * tl.load(s_ptr + rows)[None, :]
                tl.store(y_ptr + n[None, :], out.to(y_ptr.dtype.element_ty), mask=(n < N)[None, :])
                acc = acc * 0.0
                acc3 = acc3 * 0.0
            if not TMA:
                if AHEAD == 2:
                    w0 = w1
                    w1 = w_next
                else:
                    w0 = w_next
        return

    @triton.jit(do_not_specialize=["num_progs"])  # (the compile that sizes the grid runs at num_progs 1)
    def _persistent_mlp_kernel(x_ptr, r_ptr, nw_ptr, r_out_ptr, wg_ptr, sg_ptr, gu_ptr, wd_ptr, sd_ptr, out_ptr,
                               bar_ptr, wg_desc, wd_desc, H, INTER, eps, num_progs,
                               PHASES: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_N1: tl.constexpr,
                               BLOCK_K1: tl.constexpr, BLOCK_N2: tl.constexpr, BLOCK_K2: tl.constexpr,
                               LATE1: tl.constexpr, LATE2: tl.constexpr, NORM_BLOCK: tl.constexpr,
                               NORM_CHUNKS: tl.constexpr, AHEAD: tl.constexpr = 1, TMA: tl.constexpr = False,
                               LOOP_STAGES: tl.constexpr = 1, USE_PDL: tl.constexpr = False):
        """PHASES 3: norm + gate_up, grid barrier, down (one launch); 1: norm + gate_up only; 2: down only.
        x, r (1, H) bf16; nw (H,); wg (2 INTER, H) e4m3, sg (2 INTER,) fp32; gu (1, 2 INTER) bf16 (gate_up's
        output); wd (H, INTER) e4m3, sd (H,) fp32; out (1, H) bf16; bar: two int64 words (count, generation).
        num_progs: the launch's programs, the tile loops' stride (a launch of PHASES 1 or 2 may have fewer programs
        than tiles too). AHEAD: weight steps each loop loads ahead of its products (1 or 2). TMA: the weights read
        through wg_desc / wd_desc (TMA descriptors, boxes (BLOCK_N, BLOCK_K)), pipelined by Triton, not AHEAD."""
        pid = tl.program_id(0)
        m = tl.arange(0, 1)
        m_in = m[:, None] < 1
        if PHASES != 2:
            # gate_up's first steps' weights, before the wait for the previous kernel and the norm
            S1 = H // BLOCK_K1
            its1 = tl.cdiv(tl.maximum(tl.cdiv(2 * INTER, BLOCK_N1) - pid, 0), num_progs) * S1
            if TMA:
                w0, w1 = wg_ptr, wg_ptr
            else:
                w0, w1 = _prologue(wg_ptr, pid, num_progs, its1, S1, 2 * INTER, H, BLOCK_N1, BLOCK_K1, AHEAD)
            pdl_enter(USE_PDL)
            # 1. the norm's rstd (the chunks of triton_ops' RMSNorm); program 0 stores x + residual
            x_rows = x_ptr + m[:, None] * 0
            r_rows = r_ptr + m[:, None] * 0
            nw_rows = nw_ptr + 0 * m[:, None]
            nb = tl.arange(0, NORM_BLOCK)
            sum_sq = tl.zeros((1, NORM_BLOCK), tl.float32)
            for c in range(NORM_CHUNKS):
                offs = c * NORM_BLOCK + nb[None, :]
                mask = m_in & (offs < H)
                sq = tl.load(x_rows + offs, mask=mask, other=0.0).to(tl.float32)
                if HAS_RESIDUAL:
                    s = (sq + tl.load(r_rows + offs, mask=mask, other=0.0).to(tl.float32)).to(x_ptr.dtype.element_ty)
                    tl.store(r_out_ptr + offs, s, mask=mask & (offs * 0 + pid == 0))
                    sq = s.to(tl.float32)
                sum_sq += sq * sq
            rstd = tl.rsqrt(tl.sum(sum_sq, axis=1) / H + eps)[:, None]
            # 2. gate_up over this program's row tiles, the normed input formed as it loads x
            _flat_gemv(wg_desc if TMA else wg_ptr, sg_ptr, gu_ptr, w0, w1, pid, num_progs, its1, S1, 2 * INTER, H,
                       x_rows, r_rows, nw_rows, rstd, BLOCK_N1, BLOCK_K1, False, True, HAS_RESIDUAL, LATE1, AHEAD, TMA,
                       LOOP_STAGES)
        else:
            pdl_enter(USE_PDL)
        if PHASES != 1:
            # 3. the down loop's first steps' weights, loaded before the barrier
            S2 = INTER // BLOCK_K2
            its2 = tl.cdiv(tl.maximum(tl.cdiv(H, BLOCK_N2) - pid, 0), num_progs) * S2
            if TMA:
                w0, w1 = wd_ptr, wd_ptr
            else:
                w0, w1 = _prologue(wd_ptr, pid, num_progs, its2, S2, H, INTER, BLOCK_N2, BLOCK_K2, AHEAD)
            if PHASES == 3:  # (count, generation): see the module's docstring
                tl.debug_barrier()  # every thread's gate_up stores issued before the program counts itself in
                gen = tl.atomic_add(bar_ptr + 1, 0, sem="acquire", scope="gpu")
                arrived = tl.atomic_add(bar_ptr, 1, sem="acq_rel", scope="gpu")
                if arrived == num_progs - 1:  # the last: reset the count, then open the barrier
                    tl.atomic_xchg(bar_ptr, 0, sem="relaxed", scope="gpu")
                    tl.atomic_add(bar_ptr + 1, 1, sem="release", scope="gpu")
                else:
                    while tl.atomic_add(bar_ptr + 1, 0, sem="acquire", scope="gpu") == gen:
                        pass
                tl.debug_barrier()
            # 4. down over this program's row tiles, SiLU-and-mul formed from gate_up's output as it loads it
            gu_rows = gu_ptr + m[:, None] * 0
            zero = tl.zeros((1, 1), tl.float32)
            _flat_gemv(wd_desc if TMA else wd_ptr, sd_ptr, out_ptr, w0, w1, pid, num_progs, its2, S2, H, INTER,
                       gu_rows, gu_rows, gu_rows, zero, BLOCK_N2, BLOCK_K2, True, False, False, LATE2, AHEAD, TMA,
                       LOOP_STAGES)


_compiled: dict[tuple, int] = {}


def max_resident_programs(device: torch.device, n_regs: int, shared: int, num_warps: int) -> int:
    """How many programs of a kernel using `n_regs` registers a thread and `shared` bytes of shared memory, with
    `num_warps` warps, fit on the GPU at once: SMs x min(threads, registers, shared memory, blocks) per SM, the
    CUDA occupancy limits (CUDA C++ Programming Guide, compute capabilities table): registers allocated per warp in
    units of 256, 1 KiB of shared memory reserved per block (sm80+), 32 blocks an SM on sm80 / sm90 / sm100, else
    16 (the least of the others)."""
    p = torch.cuda.get_device_properties(device)
    threads = 32 * num_warps
    per_sm = [p.max_threads_per_multi_processor // threads, 32 if (p.major, p.minor) in ((8, 0), (9, 0), (10, 0))
              else 16]
    regs_warp = -(-max(n_regs, 1) * 32 // 256) * 256
    per_sm.append(p.regs_per_multiprocessor // (regs_warp * num_warps))
    per_sm.append(p.shared_memory_per_multiprocessor // (shared + (1024 if p.major >= 8 else 0) or 1))
    return p.multi_processor_count * max(min(per_sm), 0)


def _cooperative() -> dict:
    """launch_cooperative_grid=True where this Triton's CUDA backend has the option and COOPERATIVE, else nothing."""
    if not COOPERATIVE:
        return {}
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:  # pragma: no cover - no CUDA backend
        return {}
    return {"launch_cooperative_grid": True} if "launch_cooperative_grid" in CUDAOptions.__dataclass_fields__ else {}


def persistent_mlp(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                   w_gate_up: torch.Tensor, s_gate_up: torch.Tensor, w_down: torch.Tensor, s_down: torch.Tensor,
                   barrier: torch.Tensor | None, tiles: tuple[int, int, int, int] = (8, 512, 16, 1024),
                   late: tuple[bool, bool] = (False, True), num_warps: int = 4, num_progs: int | None = None,
                   ahead: int = 1, num_stages: int = 3, tma: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(down(silu_and_mul(gate_up(RMSNorm(x + residual)))), x + residual) for one row.

    Args:
        x, residual: (1, H) bf16 (residual None: x is the residual stream itself, as in a model's first layer).
        norm_weight: (H,) bf16. w_gate_up: (2I, H) float8_e4m3fn, s_gate_up (2I,) fp32 per-channel scales;
        w_down: (H, I) float8_e4m3fn, s_down (H,) fp32. H a multiple of tiles[1], I of tiles[3].
        barrier: two int64 words on x's device (`new_barrier`), kept by the caller across calls; None: two
            launches instead of one (the CPU's form).
        tiles: (BLOCK_N, BLOCK_K) of gate_up's GEMV, then of down's (elements of fp8 weight; powers of two).
        late: the FMA form's late reduction for each GEMV (gemv.GemvConfig.late_reduce).
        num_progs: programs of the launch(es) (default: with `barrier`, as many as fit on the GPU at once, else one
            a tile); capped at the down GEMV's tile count (each program takes at least one). With `barrier` and
            more than one program, all must be resident at once (max_resident_programs; see the module).
        ahead: weight steps each program loads ahead of its products (1 or 2: registers of 1 or 2 tiles).
        num_stages: Triton's software pipelining stages of the loops (of the TMA form's weight loads; the pointer
            form's loads are not pipelined by Triton, only loaded `ahead`).
        tma: the weights read through TMA descriptors (boxes (BLOCK_N, BLOCK_K), BLOCK_K <= 256; Hopper, or the
            interpreter), num_stages - 1 boxes in flight in shared memory a program, instead of `ahead` in
            registers.
    Returns (out (1, H), residual_out (1, H)), bf16. Raises ValueError on shapes or dtypes outside that.
    """
    if not HAS_TRITON:
        raise ValueError("persistent_mlp needs Triton")
    h, i2 = x.shape[-1], w_gate_up.shape[0]
    i = i2 // 2
    bn1, bk1, bn2, bk2 = tiles
    if (x.shape != (1, h) or w_gate_up.shape != (2 * i, h) or w_down.shape != (h, i) or h % bk1 or i % bk2
            or w_gate_up.dtype != torch.float8_e4m3fn or w_down.dtype != torch.float8_e4m3fn
            or s_gate_up.shape != (2 * i,) or s_down.shape != (h,) or norm_weight.shape != (h,)
            or not (w_gate_up.is_contiguous() and w_down.is_contiguous() and x.is_contiguous())):
        raise ValueError(f"persistent_mlp: x (1, H) with H % {bk1} == 0, e4m3 w_gate_up (2I, H) and w_down (H, I) "
                         f"with I % {bk2} == 0 (all contiguous), per-channel scales; got x {tuple(x.shape)}, w_gate_up "
                         f"{tuple(w_gate_up.shape)} {w_gate_up.dtype}, w_down {tuple(w_down.shape)} {w_down.dtype}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype
                                 or not residual.is_contiguous()):
        raise ValueError(f"persistent_mlp: residual {tuple(residual.shape)} {residual.dtype} must be contiguous, of "
                         f"x's shape {tuple(x.shape)} and dtype {x.dtype}")
    gu = torch.empty((1, 2 * i), dtype=x.dtype, device=x.device)
    out = torch.empty_like(x)
    r_out = torch.empty_like(x) if residual is not None else x
    n_tiles2 = triton.cdiv(h, bn2)
    if ahead not in (1, 2):
        raise ValueError(f"persistent_mlp: ahead={ahead}; use 1 or 2")
    if tma and (TensorDescriptor is None or max(tiles) > 256):
        raise ValueError(f"persistent_mlp: tma needs Triton's TensorDescriptor and tiles of at most 256 (a TMA box's "
                         f"limit); got tiles {tiles}")
    common = _consts(h, residual is not None, tiles, late, num_warps, ahead, num_stages, tma)
    descs = ((TensorDescriptor.from_tensor(w_gate_up, [bn1, bk1]), TensorDescriptor.from_tensor(w_down, [bn2, bk2]))
             if tma else (w_gate_up, w_down))
    args = [x, x if residual is None else residual, norm_weight, r_out, w_gate_up, s_gate_up, gu, w_down, s_down,
            out]
    if barrier is None:
        dummy = torch.zeros(2, dtype=torch.int64, device=x.device)
        grid1 = min(triton.cdiv(2 * i, bn1), num_progs or 1 << 30)
        grid2 = min(n_tiles2, num_progs or 1 << 30)
        _persistent_mlp_kernel[(grid1,)](*args, dummy, *descs, h, i, eps, grid1, PHASES=1, **common)
        _persistent_mlp_kernel[(grid2,)](*args, dummy, *descs, h, i, eps, grid2, PHASES=2, **common)
        return out, r_out
    if barrier.dtype != torch.int64 or barrier.shape != (2,) or barrier.device != x.device:
        raise ValueError("persistent_mlp: barrier must be two int64 words on x's device (new_barrier)")
    extra = {**launch_args(x.device), **(_cooperative() if x.is_cuda else {})}
    if x.is_cuda:
        resident = _resident(x.device, [*args, barrier, *descs], h, i, eps, common, extra)
        if num_progs is not None and min(num_progs, n_tiles2) > resident:
            raise ValueError(f"persistent_mlp: num_progs={num_progs} programs cannot all be resident at once (at "
                             f"most {resident} here): the barrier would wait forever")
        requested, num_progs = num_progs, resident if num_progs is None else num_progs
    elif num_progs != 1:
        raise ValueError("persistent_mlp: on the CPU, one program (num_progs=1) or barrier=None")
    num_progs = max(1, min(num_progs, n_tiles2))  # every program owns a first down tile
    try:
        _persistent_mlp_kernel[(num_progs,)](*args, barrier, *descs, h, i, eps, num_progs, PHASES=3, **common,
                                             **extra)
    except RuntimeError as e:
        # A driver that refuses the cooperative launch itself (with PDL, say; not inside a capture, which the
        # eager forward before it has passed): launch plainly from now on. The grid was checked to be resident
        # above, so the plain launch cannot wait forever.
        if not extra.get("launch_cooperative_grid") or torch.cuda.is_current_stream_capturing():
            raise
        global COOPERATIVE
        COOPERATIVE = False
        logger.warning("persistent MLP: the cooperative launch failed (%s); launching without it", e)
        return persistent_mlp(x, residual, norm_weight, eps, w_gate_up, s_gate_up, w_down, s_down, barrier, tiles,
                              late, num_warps, requested, ahead, num_stages, tma)  # (None: sized for the plain launch)
    return out, r_out


def _resident(device, args, h, i, eps, common, extra) -> int:
    """max_resident_programs of the binary a launch with these constexprs and options runs, compiled (not
    launched) once per key."""
    key = _key(device, common, extra)
    if key not in _compiled:
        k = _persistent_mlp_kernel.warmup(*args, h, i, eps, 1, PHASES=3, grid=(1,), **common, **extra)
        if getattr(k, "n_regs", None) is None:
            k._init_handles()
        _compiled[key] = max_resident_programs(device, k.n_regs, k.metadata.shared, common["num_warps"])
    return _compiled[key]


def new_barrier(device: torch.device) -> torch.Tensor:
    """The (count, generation) words persistent_mlp's barrier needs, zeroed; keep one per device and reuse it."""
    return torch.zeros(2, dtype=torch.int64, device=device)


def _consts(h: int, has_residual: bool, tiles: tuple[int, int, int, int], late: tuple[bool, bool],
            num_warps: int, ahead: int = 1, num_stages: int = 3, tma: bool = False) -> dict:
    """The kernel's constexprs, num_warps and num_stages for hidden size h."""
    norm_block = min(triton.next_power_of_2(h), RMS_MAX_BLOCK)
    return dict(HAS_RESIDUAL=has_residual, BLOCK_N1=tiles[0], BLOCK_K1=tiles[1], BLOCK_N2=tiles[2],
                BLOCK_K2=tiles[3], LATE1=late[0], LATE2=late[1], NORM_BLOCK=norm_block,
                NORM_CHUNKS=triton.cdiv(h, norm_block), AHEAD=ahead, TMA=tma, LOOP_STAGES=num_stages,
                num_warps=num_warps, num_stages=num_stages)


def _key(device: torch.device, common: dict, pdl: dict) -> tuple:
    return device.index, tuple(common.items()), tuple(pdl.items())


def maybe_run(layer, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A Llama decoder layer's mlp_block (post_attention_layernorm, then the MLP) as one persistent launch:
    (out (1, H), x + residual), or None where it does not apply (see the module's docstring)."""
    if FORCE is False or not (ENABLED or FORCE) or not HAS_TRITON:
        return None
    if residual is None or x.dim() != 2 or x.shape[0] != 1 or x.dtype != torch.bfloat16 or residual.shape != x.shape:
        return None
    from shardllm.layers import microbatch_overlap

    if microbatch_overlap.running():  # two halves on two streams: two launches at once would share the barrier
        return None
    from shardllm.distributed.parallel_state import get_parallel_context
    from shardllm.layers.activation import SiluAndMul
    from shardllm.layers.gemv_silu import _linear_weights

    mlp = getattr(layer, "mlp", None)
    gate_up, down = getattr(mlp, "gate_up_proj", None), getattr(mlp, "down_proj", None)
    if (gate_up is None or down is None or type(getattr(mlp, "act_fn", None)) is not SiluAndMul
            or getattr(gate_up, "bias", None) is not None or getattr(down, "bias", None) is not None
            or get_parallel_context().tp_size != 1):
        return None
    wg, wd = _linear_weights(gate_up, x.dtype), _linear_weights(down, x.dtype)
    if wg is None or wd is None or wg[1] is None or wd[1] is None:
        return None
    h, inter = x.shape[1], wd[0].shape[1]
    if (wg[0].shape != (2 * inter, h) or wd[0].shape != (h, inter) or h % TILES[1] or inter % TILES[3]
            or not (wg[0].is_contiguous() and wd[0].is_contiguous() and x.is_contiguous())):
        return None
    norm = layer.post_attention_layernorm
    barrier = None
    if x.is_cuda:
        from shardllm.layers.quantization.fp8_triton import triton_fp8_ok

        if FORCE is not True and not triton_fp8_ok(x.device):
            return None
        key = _key(x.device, _consts(h, True, TILES, LATE, NUM_WARPS, AHEAD, NUM_STAGES, TMA),
                   {**launch_args(x.device), **_cooperative()})
        if torch.cuda.is_current_stream_capturing() and key not in _compiled:
            return None  # its grid is sized from a compile, which loads a module: not inside a capture
        barrier = _barriers.get(x.device)
        if barrier is None:
            barrier = _barriers[x.device] = new_barrier(x.device)
    out = persistent_mlp(x, residual, norm.weight, norm.eps, wg[0], wg[1], wd[0], wd[1], barrier, TILES, LATE,
                         NUM_WARPS, ahead=AHEAD, num_stages=NUM_STAGES, tma=TMA)
    global _announced
    if not _announced and x.is_cuda:  # once per process: that the switch took effect, and the grid it sized
        _announced = True
        grid = min(max(_compiled.values()), triton.cdiv(h, TILES[2]))
        print(f"shardllm: persistent batch-1 MLP on ({grid} programs a launch, cooperative="
              f"{COOPERATIVE and bool(_cooperative())})", file=sys.stderr, flush=True)
    return out


def reference_mlp(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                  w_gate_up: torch.Tensor, s_gate_up: torch.Tensor, w_down: torch.Tensor, s_down: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The unfused math in torch (fp32 products of the dequantized weights, the same roundings to x's dtype as the
    engine's kernels: x + residual, the normed rows, gate_up's output, silu(gate), silu * up)."""
    s = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    normed = (s.float() * torch.rsqrt(s.float().pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    normed = (norm_weight.float() * normed.float()).to(x.dtype)
    gu = (normed.float() @ (w_gate_up.float() * s_gate_up[:, None]).t()).to(x.dtype)
    i = gu.shape[-1] // 2
    gate, up = gu[:, :i].float(), gu[:, i:].float()
    act = ((gate / (1.0 + torch.exp(-gate))).to(x.dtype).float() * up).to(x.dtype)
    out = (act.float() @ (w_down.float() * s_down[:, None]).t()).to(x.dtype)
    return out, s
