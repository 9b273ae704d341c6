"""Weight-streaming GEMV for small M (decode): y = x @ (w * scale[:, None])^T for x (M <= 16, K) bf16/fp16 and
w (N, K) in e4m3 with per-channel fp32 scales, or in x's dtype with no scale. One Triton kernel family, two forms:

    tl.dot form:   a (16, BLOCK_K) x (BLOCK_K, BLOCK_N) tensor-core product per step (x padded to 16 rows)
    FMA form:      broadcast multiply (BLOCK_M, BLOCK_N, BLOCK_K) + tl.sum over K, no padding (for M <= 4)

Each program streams BLOCK_N weight rows over one of SPLIT_K slices of K (contiguous BLOCK_K-wide loads along K,
fp32 accumulation). With SPLIT_K > 1 the fp32 partials (SPLIT_K, M, N) go to a buffer that one small kernel sums and
casts (deterministic, no zeroed buffer, graph-capturable: the buffer is a torch.empty of the call).
Which config runs for which (N, K, M) comes from per-shape tables filled from `benchmarks/gemv_sweep.py` on an H200
(gemv_tables.py); the torch reference is `gemv_reference`.

The kernel can also form its input from the previous op's inputs as it loads it, so that op's kernel is not launched
at decode: SiLU-and-mul from gate_up (silu_input; gemv_silu.py). Compiled for sm_90a with Triton 3.9 (ptxas 13.4 -v,
on the CPU): no spills; the SiLU form keeps the plain form's barriers (252 -> 254 registers at 16 x 1024, 8 warps).
"""

from __future__ import annotations

import json
import math
import re
from typing import NamedTuple

import torch

from shardllm import envs
from shardllm.layers.gemv_tables import _BF16_SWEEP, _FP8_SWEEP
from shardllm.layers.pdl import launch_args, pdl_enter, pdl_launch_dependents, pdl_wait

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - CPU images without triton use the torch path
    HAS_TRITON = False

if HAS_TRITON:
    from shardllm.layers.gemv_steps import _dot_update, _early_step, _fma_update

GEMV_MAX_M = 16  # rows up to which the small-M kernels are used (the tl.dot form pads to one 16-row tile)
M_BUCKETS = (1, 2, 4, 8, 16)  # table keys: M rounded up to the next bucket


class GemvConfig(NamedTuple):
    """One kernel config. use_dot: tl.dot form (else the FMA form); block_k counts elements of w; late_reduce (FMA
    form): keep a (BLOCK_M, BLOCK_N, BLOCK_K) fp32 accumulator and sum over K once after the loop, instead of a
    cross-thread tl.sum every step (more registers, no shuffles in the loop); w_ahead (FMA form): each step loads
    the next step's weight tile before its own products, two tiles in flight a program (Triton does not pipeline the
    FMA form's register loads: one tile in flight, latency-bound where a weight is small for the GPU)."""

    use_dot: bool
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 4
    late_reduce: bool = False
    w_ahead: bool = False


if HAS_TRITON:

    @triton.jit
    def _gemv_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, split_k, stride_xm, stride_wn, stride_ym, stride_ys,
                     HAS_SCALE: tl.constexpr, USE_DOT: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr, LATE_REDUCE: tl.constexpr,
                     SILU_INPUT: tl.constexpr = False, USE_PDL: tl.constexpr = False, W_AHEAD: tl.constexpr = False,
                     W_EARLY: tl.constexpr = False):
        """Program (n tile, k slice): y[slice, :M, tile] = x[:, slice] @ (w[tile, slice] * s[tile])^T. SILU_INPUT:
        x_ptr holds gate_up (M, 2K) and x = silu(gate) * up is formed from it, once per (BLOCK_M, BLOCK_K) step (the
        FMA form then broadcasts it over BLOCK_N: recomputing it per repeated address would cost BLOCK_N exps).
        W_EARLY (not with W_AHEAD): the program's first weight tile is loaded into registers before the
        wait, so that it streams while the kernel before still runs (no kernel of a step writes weights; x, which
        the kernel before writes, is read only after the wait); its step runs first, then the loop (2 or 4 such
        tiles measured slower at batch 1 on an H200: docs/benchmarks.md, fourteenth session).
        The K loop is not software-pipelined: Triton pipelines loads that feed a dot, and asking it to stage the FMA
        form's loads too (tl.range's num_stages) halved this kernel's speed on an H200 (same section): shared-memory
        stages cost the occupancy that hides the loads' latency here."""
        pid_n = tl.program_id(0)  # (no memory is touched before the wait below)
        split = tl.program_id(1)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_in = n < N
        rows = tl.where(n_in, n, 0).to(tl.int64)  # rows past N read row 0 (never stored): no mask on w's rows
        k_per_split = tl.cdiv(tl.cdiv(K, split_k), BLOCK_K) * BLOCK_K
        k_start = split * k_per_split
        k_end = tl.minimum(k_start + k_per_split, K)
        tl.static_assert(not (W_EARLY and W_AHEAD), "W_EARLY excludes W_AHEAD")
        if W_EARLY:
            pdl_launch_dependents(USE_PDL)
            kf = k_start + tl.arange(0, BLOCK_K)
            if USE_DOT:  # (BN, BK)
                wf_ptrs = w_ptr + rows[:, None] * stride_wn + kf[None, :]
                wf_k = kf[None, :]
            else:  # (BM, BN, BK), the FMA form's repeated addresses
                wf_ptrs = w_ptr + rows[None, :, None] * stride_wn + 0 * tl.arange(0, BLOCK_M)[:, None, None] + \
                    kf[None, None, :]
                wf_k = kf[None, None, :]
            if EVEN_K:
                w_first = tl.load(wf_ptrs)
            else:
                w_first = tl.load(wf_ptrs, mask=wf_k < k_end, other=0.0)
            pdl_wait(USE_PDL)
        else:
            pdl_enter(USE_PDL)
        m = tl.arange(0, BLOCK_M)
        kk = tl.arange(0, BLOCK_K)
        m_in = m[:, None] < M
        # tl.dot form: (BM, BK) x and (BN, BK) w tiles. FMA form: both as (BM, BN, BK) tiles of repeated addresses
        # (L1 hits, no extra DRAM bytes) so that each is born in the product's layout; loading (BK,) or (BN, BK)
        # and broadcasting costs a shared-memory layout conversion (4-16 barriers) every step (PTX, Triton 3.9)
        w_rows = w_ptr + rows[:, None] * stride_wn  # (BN, 1)
        x_rows = x_ptr + m[:, None] * stride_xm  # (BM, 1)
        w_rows3 = w_ptr + rows[None, :, None] * stride_wn + 0 * m[:, None, None]  # (BM, BN, 1)
        x_rows3 = x_ptr + m[:, None, None] * stride_xm + 0 * n[None, :, None]  # (BM, BN, 1)
        m_in3 = (m[:, None, None] < M) & (n[None, :, None] >= 0)  # (BM, BN, 1)
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        if LATE_REDUCE:
            acc3 = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), tl.float32)
        else:
            acc3 = acc  # unused (_fma_update passes it through)
        if W_AHEAD:  # FMA form: the first tile; each step then loads the next one before its products
            k3_first = (k_start + kk)[None, None, :]
            w3_next = tl.load(w_rows3 + k3_first, mask=k3_first < k_end, other=0.0)
        loop_start = k_start
        if W_EARLY:  # the tile loaded before the wait: its step, then the loop from the next one
            acc, acc3 = _early_step(acc, acc3, w_first, k_start + kk, k_end, x_rows, x_rows3, m_in, m_in3, K,
                                    EVEN_K, SILU_INPUT, LATE_REDUCE, USE_DOT, DOT_F32)
            loop_start = k_start + BLOCK_K
        for k0 in range(loop_start, k_end, BLOCK_K):
            k = k0 + kk
            if USE_DOT:
                if EVEN_K:  # every slice is whole BLOCK_Ks: unmasked, vectorizable loads of w
                    w = tl.load(w_rows + k[None, :])  # (BN, BK)
                else:
                    w = tl.load(w_rows + k[None, :], mask=k[None, :] < k_end, other=0.0)
                acc = _dot_update(acc, w, k, k_end, x_rows, m_in, K, EVEN_K, SILU_INPUT, DOT_F32)
            else:
                k3 = k[None, None, :]
                if W_AHEAD:  # this step's tile was loaded a step ago; the next one (masked past k_end) now
                    w3 = w3_next
                    w3_next = tl.load(w_rows3 + k3 + BLOCK_K, mask=k3 + BLOCK_K < k_end, other=0.0)
                elif EVEN_K:
                    w3 = tl.load(w_rows3 + k3)  # (BM, BN, BK)
                else:
                    w3 = tl.load(w_rows3 + k3, mask=k3 < k_end, other=0.0)
                acc, acc3 = _fma_update(acc, acc3, w3, k, k_end, x_rows, x_rows3, m_in, m_in3, K, EVEN_K, SILU_INPUT,
                                        LATE_REDUCE)
        if LATE_REDUCE:
            acc = tl.sum(acc3, axis=2)
        if HAS_SCALE:
            acc = acc * tl.load(s_ptr + rows)[None, :]  # per-channel weight scales
        tl.store(y_ptr + split * stride_ys + m[:, None] * stride_ym + n[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=m_in & n_in[None, :])

    @triton.jit
    def _splitk_reduce_kernel(p_ptr, y_ptr, numel, split_k, BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
        """y = sum over the split_k partials (split_k, numel) fp32, cast to y's dtype."""
        pdl_enter(USE_PDL)
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = i < numel
        acc = tl.zeros((BLOCK,), tl.float32)
        for s in range(0, split_k):
            acc += tl.load(p_ptr + s * numel + i, mask=mask, other=0.0)
        tl.store(y_ptr + i, acc.to(y_ptr.dtype.element_ty), mask=mask)


class DeferredGemvInput:
    """An activation not computed yet, which the linear it feeds forms inside its small-M GEMV (SiLU-and-mul in
    gemv_silu.py): a producer returns one instead of a tensor, and the linear's method calls `gemv(w, w_scale, bias)`
    -> y (M, N) in the activation's dtype."""

    __slots__ = ()

    def gemv(self, w: torch.Tensor, w_scale: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError


def gemv(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor | None, config: GemvConfig,
         silu_input: bool = False) -> torch.Tensor:
    """y (M, N) in x's dtype = x @ (w * w_scale[:, None])^T (no scale: x @ w^T).

    Args:
        x: (M, K) bf16/fp16, M <= GEMV_MAX_M, contiguous rows. With silu_input, gate_up (M, 2K) instead, and the
            GEMV's input is silu(x[:, :K]) * x[:, K:], formed in registers with the same fp32 math and roundings
            to x's dtype as `triton_ops.silu_and_mul` (so the result equals silu_and_mul then this GEMV).
        w: (N, K) float8_e4m3fn (with w_scale) or x's dtype (w_scale None), contiguous rows.
        w_scale: (N,) fp32 per-channel scales, or None.
        config: the kernel config; split_k is capped at K's BLOCK_K count (slices are whole BLOCK_Ks, so the last
            ones may still be empty: their partials are zeros).
    Raises AssertionError on shapes outside that contract (callers check M and strides first).
    """
    m, k = x.shape
    if silu_input:
        k //= 2
    n = w.shape[0]
    assert m <= GEMV_MAX_M and w.shape[1] == k and x.stride(1) == 1 and w.stride(1) == 1
    assert not silu_input or x.shape[1] == 2 * k
    assert (w_scale is None) == (w.dtype == x.dtype)
    split_k = max(1, min(config.split_k, triton.cdiv(k, config.block_k)))
    even_k = k % (split_k * config.block_k) == 0
    pdl = launch_args(x.device)
    w_ahead = config.w_ahead and not config.use_dot
    early = W_EARLY_MODE == 2 or (W_EARLY_MODE == 1 and not silu_input)  # (silu: right after gate_up's GEMV)
    block_m = 16 if config.use_dot else max(1, triton.next_power_of_2(m))
    if split_k == 1:
        y = torch.empty((1, m, n), dtype=x.dtype, device=x.device)
    else:
        y = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
    _gemv_kernel[(triton.cdiv(n, config.block_n), split_k)](
        x, w, w if w_scale is None else w_scale, y, m, n, k, split_k, x.stride(0), w.stride(0), y.stride(1),
        y.stride(0), HAS_SCALE=w_scale is not None, USE_DOT=config.use_dot, EVEN_K=even_k, BLOCK_M=block_m,
        BLOCK_N=config.block_n, BLOCK_K=config.block_k, DOT_F32=not x.is_cuda,
        LATE_REDUCE=config.late_reduce and not config.use_dot, SILU_INPUT=silu_input, num_warps=config.num_warps,
        num_stages=config.num_stages, W_AHEAD=w_ahead, W_EARLY=early and not w_ahead, **pdl)
    if split_k == 1:
        return y[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block = 1024
    _splitk_reduce_kernel[(triton.cdiv(m * n, block),)](y, out, m * n, split_k, BLOCK=block, num_warps=4,
                                                         **launch_args(x.device))
    return out


# SHARDLLM_GEMV_W_EARLY: 1, each program of a GEMV loads its first weight tile before its PDL wait (not the fused
# SiLU form, which follows gate_up's GEMV: there the kernel before is bandwidth-bound too); 2, every GEMV; 0 none
W_EARLY_MODE = envs.SHARDLLM_GEMV_W_EARLY


def gemv_reference(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor | None) -> torch.Tensor:
    """The fp32 torch reference of `gemv`: (M, N) fp32."""
    wf = w.float() if w_scale is None else w.float() * w_scale.float()[:, None]
    return x.float() @ wf.t()


def m_bucket(m: int) -> int:
    """The table's M key for m rows: the smallest bucket >= m."""
    return next(b for b in M_BUCKETS if b >= m)


def load_table(table: dict) -> dict[tuple[int, int], dict[int, GemvConfig]]:
    """{"NxK": {"M": [use_dot, block_n, block_k, split_k, num_warps, num_stages, late_reduce, w_ahead]}} (the
    sweep's JSON; 0/1 for the flags, late_reduce and w_ahead optional) -> lookup."""
    out: dict[tuple[int, int], dict[int, GemvConfig]] = {}
    for shape, by_m in table.items():
        n, k = (int(v) for v in shape.split("x"))
        out[(n, k)] = {int(mm): GemvConfig(bool(c[0]), *(int(v) for v in c[1:6]), *(bool(v) for v in c[6:8]))
                       for mm, c in by_m.items()}
    return out


# The tuned tables (gemv_tables.py: the sweep's JSON, H200). Where an (N, K, M) has no entry FP8 falls back to
# fp8_triton.small_m_config's tl.dot configs and bf16 to cuBLAS (a bf16 entry means "beat cuBLAS by 3% or more
# there"). SHARDLLM_GEMV_TABLES=0 at start-up: both empty (A/B runs).
_TABLES_ON = envs.SHARDLLM_GEMV_TABLES
TABLE_KINDS = ("fp8", "bf16", "fp8_silu", "bf16_silu")


def env_table_overrides(text: str | None) -> dict[str, dict]:
    """SHARDLLM_GEMV_CONFIGS parsed: {kind: table in load_table's JSON format}, kinds from TABLE_KINDS ({} unset).

    Raises ValueError, naming the fix, for text that is not JSON, a kind not in TABLE_KINDS, or an entry that
    load_table cannot read."""
    if not text:
        return {}
    try:
        raw = json.loads(text)
    except ValueError as e:
        raise ValueError(f"SHARDLLM_GEMV_CONFIGS is not JSON ({e}): give e.g. "
                         '{"fp8": {"4096x4096": {"1": [0, 1, 2048, 1, 2, 3, 0]}}}') from e
    if not isinstance(raw, dict) or not set(raw) <= set(TABLE_KINDS):
        raise ValueError(f"SHARDLLM_GEMV_CONFIGS: keys must be among {TABLE_KINDS}, got "
                         f"{sorted(raw) if isinstance(raw, dict) else type(raw).__name__}")
    for kind, table in raw.items():
        try:
            if not isinstance(table, dict):
                raise ValueError(f"a table is an object of shapes, got {type(table).__name__}")
            for shape, by_m in table.items():
                if not re.fullmatch(r"[1-9][0-9]*x[1-9][0-9]*", shape) or not isinstance(by_m, dict):
                    raise ValueError(f"{shape!r}: keys are \"NxK\" (e.g. \"4096x4096\"), each an object of M keys")
                for mm, c in by_m.items():
                    if not mm.isdigit() or int(mm) not in M_BUCKETS:
                        raise ValueError(f"{shape}/{mm}: M must be one of {M_BUCKETS}")
                    if not isinstance(c, list) or not 6 <= len(c) <= 8 or not all(isinstance(v, int) for v in c):
                        raise ValueError(f"{shape}/{mm}: the config is a list of 6 to 8 ints, got {c!r}")
                    if min(c[1:6]) < 1:
                        raise ValueError(f"{shape}/{mm}: block_n, block_k, split_k, num_warps and num_stages must be "
                                         f"positive, got {c[1:6]}")
            load_table(table)
        except (AttributeError, TypeError, ValueError, IndexError) as e:
            raise ValueError(f"SHARDLLM_GEMV_CONFIGS[{kind!r}]: {e}; entries are {{\"NxK\": {{\"M\": [use_dot, "
                             f"block_n, block_k, split_k, num_warps, num_stages(, late_reduce, w_ahead)]}}}}") from e
    return raw


def merged_table(base: dict, kind: str) -> dict[tuple[int, int], dict[int, GemvConfig]]:
    """load_table(base) with SHARDLLM_GEMV_CONFIGS[kind]'s entries in place of those (shape, M) entries (also over
    the empty tables of SHARDLLM_GEMV_TABLES=0; an added shape is also a nearest_config candidate)."""
    table = load_table(base)
    for shape, by_m in load_table(_ENV_OVERRIDES.get(kind, {})).items():
        table[shape] = {**table.get(shape, {}), **by_m}
    return table


_ENV_OVERRIDES = env_table_overrides(envs.SHARDLLM_GEMV_CONFIGS)
FP8_GEMV_TABLE = merged_table(_FP8_SWEEP if _TABLES_ON else {}, "fp8")
BF16_GEMV_TABLE = merged_table(_BF16_SWEEP if _TABLES_ON else {}, "bf16")


def table_config(table: dict[tuple[int, int], dict[int, GemvConfig]], n: int, k: int, m: int) -> GemvConfig | None:
    """The table's config for an (N, K) weight at m rows, or None where the table has none."""
    by_m = table.get((n, k))
    return None if by_m is None else by_m.get(m_bucket(m))


def nearest_config(table: dict[tuple[int, int], dict[int, GemvConfig]], n: int, k: int, m: int) -> GemvConfig | None:
    """The table's config for (N, K) at m rows, else that of the tuned shape nearest to it with an entry for m's
    bucket, nearest by |log2(N / N')| + |log2(K / K')| (ties: the smaller N', then K'); None where no shape has one.

    Why: a sweep tunes one model's shapes (Llama-3-8B's), and the best launch follows the shape's class (long K:
    wide K blocks and more warps; wide N: more rows a program), so an untuned model's layer (Llama-3-70B's, or any
    tp's) takes a measured launch of its class instead of a generic one. Measured on an H200 (fourth session,
    docs/benchmarks.md) before Llama-3-70B had entries of its own: its FP8 batch-1 TPOT 13.40 ms at tp = 2 against
    16.11 ms with the generic tl.dot form; its layers' nearest-shape picks within 0-39% of their own sweep's best.
    SHARDLLM_GEMV_NEAREST_SHAPE=0 turns the nearest-shape step off (exact entries only)."""
    exact = table_config(table, n, k, m)
    if exact is not None or n <= 0 or k <= 0 or not envs.get("SHARDLLM_GEMV_NEAREST_SHAPE"):  # get: cheap per call
        return exact  # (an empty weight has no log2 distance: the caller's generic config)
    bucket = m_bucket(m)
    # Eager decode asks per layer and step. Cached per table, kept while the table equals a copy of it taken with
    # its picks (~0.4 us for a 16-shape table): id() alone outlives the table (a new one, as tests' monkeypatched
    # tables are, can get a freed one's id) and a table's length misses an entry changed in place.
    seen = _NEAREST.get(id(table))
    if seen is None or seen[0] != table:
        seen = _NEAREST[id(table)] = ({shape: dict(by_m) for shape, by_m in table.items()}, {})
    picks = seen[1]
    if (n, k, bucket) not in picks:
        shapes = [(abs(math.log2(n / nn)) + abs(math.log2(k / kk)), nn, kk) for (nn, kk), by_m in table.items()
                  if bucket in by_m]
        picks[(n, k, bucket)] = table[min(shapes)[1:]][bucket] if shapes else None
    return picks[(n, k, bucket)]


# id(table) -> (a copy of the table, {(N, K, M bucket): the nearest-shape config or None})
_NEAREST: dict[int, tuple[dict, dict[tuple[int, int, int], GemvConfig | None]]] = {}


_PROBED: dict[int | None, bool] = {}


def gemv_ok(device: torch.device) -> bool:
    """Whether the bf16 GEMV matches its reference on `device` in both forms (probed once per device, so a Triton
    that miscompiles it leaves every layer on cuBLAS)."""
    if device.type != "cuda" or not HAS_TRITON:
        return False
    if device.index is None:  # torch.device("cuda"): the current device, probed under its index
        device = torch.device("cuda", torch.cuda.current_device())
    if device.index not in _PROBED:
        import logging

        ok = False
        try:
            g = torch.Generator(device=device).manual_seed(0)
            x = torch.randn(3, 640, device=device, generator=g).to(torch.bfloat16)
            w = torch.randn(72, 640, device=device, generator=g).to(torch.bfloat16)
            ref = gemv_reference(x, w, None)
            ok = all(float((gemv(x, w, None, c).float() - ref).abs().max()) <= 2e-2 * float(ref.abs().max())
                     for c in (GemvConfig(True, 32, 128, 2), GemvConfig(False, 8, 128, 3),
                               GemvConfig(False, 4, 64, 2, late_reduce=True)))
        except Exception as e:  # a Triton that cannot compile it
            logging.getLogger(__name__).warning("bf16 GEMV kernel unavailable (%s: %s)", type(e).__name__, e)
        if not ok:
            logging.getLogger(__name__).warning("bf16 GEMV kernel disagrees with its reference on %s: cuBLAS only",
                                                device)
        _PROBED[device.index] = ok
    return _PROBED[device.index]


def small_m_linear_bf16(x: torch.Tensor, w: torch.Tensor, config: GemvConfig | None = None) -> torch.Tensor:
    """y = x @ w^T for x (M <= 16, K) and w (N, K) both bf16/fp16; config None: the table's, else a default
    FMA-form config for M <= 4 and tl.dot form above."""
    m, k = x.shape
    n = w.shape[0]
    if config is None:
        config = table_config(BF16_GEMV_TABLE, n, k, m) or GemvConfig(m > 4, 16 if m <= 4 else 32, 256, 1)
    return gemv(x, w, None, config)


def maybe_small_m_linear_bf16(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """The unquantized Linear's hook: the GEMV's y for x (..., K) where BF16_GEMV_TABLE has a config for this
    (N, K, M) on a CUDA device whose probe passed, else None (the caller runs cuBLAS)."""
    if not BF16_GEMV_TABLE or not x.is_cuda or x.dtype != torch.bfloat16 or w.dtype != x.dtype:
        return None
    k = x.shape[-1]
    m = x.numel() // k if k else 0
    if not 0 < m <= GEMV_MAX_M:
        return None
    config = table_config(BF16_GEMV_TABLE, w.shape[0], k, m)
    if config is None or not gemv_ok(x.device):
        return None
    y = gemv(x.reshape(m, k).contiguous(), w.contiguous(), None, config)
    if bias is not None:
        y = y + bias
    return y.view(*x.shape[:-1], y.shape[-1])
