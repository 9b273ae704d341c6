"""Fused Triton kernels for the small elementwise ops of a decoder layer: RMSNorm (with the residual add),
SiluAndMul and rotary embedding (q and k in place, one launch; or with the paged KV-cache write of k and v).

Each replaces a handful of tiny torch kernels, which matters most in a CUDA-graph-replayed decode step. The
torch code in layernorm.py / activation.py / rotary.py stays the reference; the kernels follow its rounding:

    rms_norm      fp32 normalise, round to x.dtype, multiply by the weight in fp32, round once to the out dtype
    silu_and_mul  silu in fp32 rounded to x.dtype, then the product in fp32 rounded once (as F.silu(g) * u)
    rotary        fp32 rotation of the x.dtype values, rounded once

Only the fp32 math differs (reduction order, rsqrt, exp), so each rounded value equals torch's or is its
neighbour: x + residual is exact, rotary within 1 ulp, and where an intermediate is rounded (the normalised
x, silu(gate)) a 1-ulp flip there gives at most 2 ulps after the multiply (rare: about 1e-5 of the elements
on an H200 in bf16/fp16). fp32 agrees to ~1e-6. No host syncs, and grids depend only on shapes: all of them
can be graph-captured.

Triton is optional: without it this module still imports and HAS_TRITON is False. Under TRITON_INTERPRET=1
(set before triton is imported) the wrappers also run on CPU tensors, which is how the tests check them
(the interpreter truncates fp32 -> bf16 instead of rounding to nearest, so bf16 is a little off there).
"""

from __future__ import annotations

import torch

from shardllm.layers.pdl import launch_args, pdl_enter

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    triton = tl = None
    HAS_TRITON = False

# Which path the layers take: None picks the kernels for CUDA tensors when triton is there; True / False force
# the kernels / the torch reference (tests; True on CPU needs TRITON_INTERPRET=1).
USE_TRITON: bool | None = None
RMS_MAX_BLOCK = 8192  # rows wider than this are normalised in two passes over chunks of this size
SILU_BLOCK = 1024  # columns of `d` per silu_and_mul program


def use_triton(x: torch.Tensor) -> bool:
    """Whether a layer should run its op on `x` with the kernels of this module."""
    if not HAS_TRITON:
        return False
    return x.is_cuda if USE_TRITON is None else USE_TRITON


def _jit(fn):
    """triton.jit, or a no-op without triton (annotations are strings, so the kernels still parse)."""
    return triton.jit(fn) if HAS_TRITON else fn


# Kernel names are unique in the package: the interpreter re-executes kernel sources by name.


@_jit
def _fused_rmsnorm_row_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, eps, hidden, heads,
    stride_xn, stride_xh, stride_rn, stride_on, stride_oh, stride_ron,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, NUM_CHUNKS: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    """One program per row (token, or token x head): out = w * round(norm(s)), s = x (+ residual).

    With HAS_RESIDUAL, s is rounded to its dtype and stored to res_out first, as torch's `x + residual`.
    Rows wider than BLOCK take two passes; the second recomputes s from the inputs (never rereads res_out).
    """
    pdl_enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    n = row // heads
    h = row % heads
    x_row = x_ptr + n * stride_xn + h * stride_xh
    o_row = out_ptr + n * stride_on + h * stride_oh
    cols = tl.arange(0, BLOCK)
    if NUM_CHUNKS == 1:
        mask = cols < hidden
        s = tl.load(x_row + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + n * stride_rn + cols, mask=mask, other=0.0).to(tl.float32)
            s_rounded = (s + r).to(res_out_ptr.dtype.element_ty)
            tl.store(res_out_ptr + n * stride_ron + cols, s_rounded, mask=mask)
            s = s_rounded.to(tl.float32)
        rstd = tl.rsqrt(tl.sum(s * s, 0) / hidden + eps)
        normed = (s * rstd).to(res_out_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(o_row + cols, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)
    else:
        sum_sq = tl.zeros([BLOCK], tl.float32)
        for c in range(NUM_CHUNKS):
            offs = c * BLOCK + cols
            mask = offs < hidden
            s = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                r = tl.load(res_ptr + n * stride_rn + offs, mask=mask, other=0.0).to(tl.float32)
                s_rounded = (s + r).to(res_out_ptr.dtype.element_ty)
                tl.store(res_out_ptr + n * stride_ron + offs, s_rounded, mask=mask)
                s = s_rounded.to(tl.float32)
            sum_sq += s * s
        rstd = tl.rsqrt(tl.sum(sum_sq, 0) / hidden + eps)
        for c in range(NUM_CHUNKS):
            offs = c * BLOCK + cols
            mask = offs < hidden
            s = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                r = tl.load(res_ptr + n * stride_rn + offs, mask=mask, other=0.0).to(tl.float32)
                s = (s + r).to(res_out_ptr.dtype.element_ty).to(tl.float32)
            normed = (s * rstd).to(res_out_ptr.dtype.element_ty).to(tl.float32)
            w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(o_row + offs, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


@_jit
def _fused_silu_and_mul_kernel(x_ptr, out_ptr, d, stride_xn, stride_on, BLOCK: tl.constexpr,
                               USE_PDL: tl.constexpr = False, rows_ptr=None, HAS_ROWS: tl.constexpr = False):
    """Grid (rows, cdiv(d, BLOCK)): out[n, j] = round(silu(x[n, j])) * x[n, d + j], fp32 math. HAS_ROWS: rows at or
    past the int32 at rows_ptr are skipped (left unwritten)."""
    pdl_enter(USE_PDL)
    if HAS_ROWS:
        if tl.program_id(0) >= tl.load(rows_ptr):
            return
    n = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + n * stride_xn + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + n * stride_xn + d + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + n * stride_on + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


@_jit
def neox_first(x1, x2, cos, sin):
    """The first half of a neox rotation, x1 cos - x2 sin, as one fused multiply-add over the rounded x2 sin: the
    form the compiler contracted it to on sm90, written out so that every kernel rotating a head (this module's,
    triton_decode_tma's NEW_KV) rounds it alike wherever it compiles."""
    return tl.fma(x1, cos, -(x2 * sin))


@_jit
def neox_second(x1, x2, cos, sin):
    """The second half, x2 cos + x1 sin, as fma(x1, sin, rounded x2 cos) (see neox_first)."""
    return tl.fma(x1, sin, x2 * cos)


@_jit
def _rotate_heads_inplace(ptr, row_off, stride_h, num_heads, cos, sin,
                          HALF: tl.constexpr, HEADS_PAD: tl.constexpr, HALF_PAD: tl.constexpr):
    """Rotates heads [0, num_heads) of one token, (HEADS_PAD, HALF_PAD) tiles of both halves, in place.

    Returns the stored (rounded) halves, for a caller that writes them elsewhere too.
    """
    h = tl.arange(0, HEADS_PAD)
    j = tl.arange(0, HALF_PAD)
    mask = (h < num_heads)[:, None] & (j < HALF)[None, :]
    p1 = ptr + row_off + h[:, None] * stride_h + j[None, :]
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
    y1 = neox_first(x1, x2, cos, sin).to(ptr.dtype.element_ty)
    y2 = neox_second(x1, x2, cos, sin).to(ptr.dtype.element_ty)
    tl.store(p1, y1, mask=mask)
    tl.store(p1 + HALF, y2, mask=mask)
    return y1, y2


@_jit
def _fused_rotary_kernel(
    pos_ptr, q_ptr, k_ptr, v_ptr, cache_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, k_scale_ptr, v_scale_ptr,
    num_q_heads, num_kv_heads, stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh, stride_cache,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch, stride_vcd,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, Q_HEADS_PAD: tl.constexpr, KV_HEADS_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, WRITE_KV: tl.constexpr, KV_SCALED: tl.constexpr = False,
    USE_PDL: tl.constexpr = False, FINITE_V: tl.constexpr = False, WRITE_V: tl.constexpr = True,
):
    """One program per token: neox rotation of all its q and k heads with cos/sin of its position, in place;
    with WRITE_KV, then its rotated k and (WRITE_V) its v into its cache slot (slots < 0, padding, skip only the
    write), divided by the fp32 scalars at k_scale_ptr / v_scale_ptr with KV_SCALED (an FP8 cache).
    """
    pdl_enter(USE_PDL)
    n = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + n).to(tl.int64)
    j = tl.arange(0, HALF_PAD)
    jm = j < HALF
    cos = tl.load(cache_ptr + pos * stride_cache + j, mask=jm, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(cache_ptr + pos * stride_cache + HALF + j, mask=jm, other=0.0).to(tl.float32)[None, :]
    _rotate_heads_inplace(q_ptr, n * stride_qn, stride_qh, num_q_heads, cos, sin, HALF, Q_HEADS_PAD, HALF_PAD)
    k1, k2 = _rotate_heads_inplace(k_ptr, n * stride_kn, stride_kh, num_kv_heads, cos, sin,
                                   HALF, KV_HEADS_PAD, HALF_PAD)
    if WRITE_KV:
        _write_rotated_kv(n, k1, k2, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, k_scale_ptr, v_scale_ptr,
                          num_kv_heads, stride_vn, stride_vh, stride_kcb, stride_kcs, stride_kch, stride_vcb,
                          stride_vcs, stride_vch, stride_vcd, HALF, HALF_PAD, KV_HEADS_PAD, BLOCK_SIZE, KV_SCALED,
                          FINITE_V, WRITE_V)


@_jit
def finite_or_zero(x):
    """x with its NaN and infinite elements replaced by 0 (what the KV writers store into a transposed V cache, whose
    decode reads slots past a sequence's end unmasked)."""
    return tl.where(tl.abs(x.to(tl.float32)) < float("inf"), x, 0.0)


@_jit
def _write_rotated_kv(n, k1, k2, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, k_scale_ptr, v_scale_ptr,
                      num_kv_heads, stride_vn, stride_vh, stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs,
                      stride_vch, stride_vcd, HALF: tl.constexpr, HALF_PAD: tl.constexpr, KV_HEADS_PAD: tl.constexpr,
                      BLOCK_SIZE: tl.constexpr, KV_SCALED: tl.constexpr, FINITE_V: tl.constexpr,
                      WRITE_V: tl.constexpr = True):
    """Token n's rotated k (halves k1, k2, as stored in k's dtype) and (WRITE_V) its v into its cache slot, unless
    the slot is < 0; with KV_SCALED, k / k_scale and v / v_scale (IEEE fp32 division), rounded once to the cache
    dtype."""
    j = tl.arange(0, HALF_PAD)
    jm = j < HALF
    slot = tl.load(slot_mapping_ptr + n).to(tl.int64)
    h = tl.arange(0, KV_HEADS_PAD)
    # the slot test as a vector, not a scalar, for the interpreter (as in kv_write._write_kv_kernel)
    mask = ((h < num_kv_heads) & (h * 0 + slot >= 0))[:, None] & jm[None, :]
    page = slot // BLOCK_SIZE
    in_page = slot % BLOCK_SIZE
    v1_ptr = v_ptr + n * stride_vn + h[:, None] * stride_vh + j[None, :]
    v1 = tl.load(v1_ptr, mask=mask)
    v2 = tl.load(v1_ptr + HALF, mask=mask)
    if FINITE_V:  # as kv_write._write_kv_kernel's
        v1 = finite_or_zero(v1)
        v2 = finite_or_zero(v2)
    if KV_SCALED:
        k_scale = tl.load(k_scale_ptr)
        v_scale = tl.load(v_scale_ptr)
        k1 = tl.div_rn(k1.to(tl.float32), k_scale).to(k_cache_ptr.dtype.element_ty)
        k2 = tl.div_rn(k2.to(tl.float32), k_scale).to(k_cache_ptr.dtype.element_ty)
        v1 = tl.div_rn(v1.to(tl.float32), v_scale).to(v_cache_ptr.dtype.element_ty)
        v2 = tl.div_rn(v2.to(tl.float32), v_scale).to(v_cache_ptr.dtype.element_ty)
    kc = k_cache_ptr + page * stride_kcb + in_page * stride_kcs + h[:, None] * stride_kch + j[None, :]
    vc = v_cache_ptr + page * stride_vcb + in_page * stride_vcs + h[:, None] * stride_vch + j[None, :] * stride_vcd
    tl.store(kc, k1, mask=mask)
    tl.store(kc + HALF, k2, mask=mask)
    if WRITE_V:
        tl.store(vc, v1, mask=mask)
        tl.store(vc + HALF * stride_vcd, v2, mask=mask)


if HAS_TRITON and hasattr(_fused_rmsnorm_row_kernel, "rewrite"):  # the interpreter (TRITON_INTERPRET=1)
    # It reads a kernel's source from this file at its first launch, by line number: an edit of the file since
    # the import (a long test run beside an editor) then yields the wrong function, KeyError: '<kernel name>'.
    for _kernel in (_fused_rmsnorm_row_kernel, _fused_silu_and_mul_kernel, neox_first, neox_second,
                    _rotate_heads_inplace, _fused_rotary_kernel, _write_rotated_kv, finite_or_zero):
        _kernel.rewrite()


# ---- launchers ---------------------------------------------------------------------------------------------------


def _pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _rows(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """x as (N, heads, D) rows: (tensor, heads, stride over N, stride over heads); last dim contiguous."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dim() == 3:
        return x, x.shape[1], x.stride(0), x.stride(1)
    if x.dim() != 2:
        x = x.reshape(-1, x.shape[-1])
    return x, 1, x.stride(0), 0


def _rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
              eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    hidden = x.shape[-1]
    assert weight.shape == (hidden,) and weight.stride(0) == 1
    sum_dtype = x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)
    out = torch.empty(x.shape, dtype=torch.promote_types(sum_dtype, weight.dtype), device=x.device)
    res_out = None if residual is None else torch.empty(x.shape, dtype=sum_dtype, device=x.device)
    if x.numel() == 0:
        return out, res_out
    if residual is None:
        xr, heads, sxn, sxh = _rows(x)
        res, res_o, srn, sron = x, x, 0, 0  # unused: HAS_RESIDUAL is off (res_o gives the sum dtype)
    else:
        assert x.shape == residual.shape
        xr, heads, sxn, sxh = _rows(x.reshape(-1, hidden))
        res, _, srn, _ = _rows(residual.reshape(-1, hidden))
        res_o, _, sron, _ = _rows(res_out.view(-1, hidden))
    o, _, son, soh = _rows(out if residual is None else out.view(-1, hidden))
    block = min(_pow2(hidden), RMS_MAX_BLOCK)
    _fused_rmsnorm_row_kernel[(xr.shape[0] * heads,)](
        xr, res, weight, o, res_o, eps, hidden, heads, sxn, sxh, srn, son, soh, sron,
        HAS_RESIDUAL=residual is not None, BLOCK=block, NUM_CHUNKS=triton.cdiv(hidden, block),
        num_warps=min(max(block // 256, 1), 8), **launch_args(x.device))
    return out, res_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim of x (N, H) or (N, heads, D), any row strides; a new contiguous tensor."""
    return _rms_norm(x, None, weight, eps)[0]


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one launch, out of place; x, residual (N, H)."""
    return _rms_norm(x, residual, weight, eps)  # type: ignore[return-value]


def silu_and_mul(x: torch.Tensor, num_rows: torch.Tensor | None = None) -> torch.Tensor:
    """silu(x[..., :d]) * x[..., d:] for x (..., 2d) -> (..., d). num_rows: a one-element int32 tensor on x's
    device; rows (of x viewed as (-1, 2d)) at or past its value are left undefined (the MoE layer's other ranks'
    rows: read on the GPU, no host sync)."""
    assert x.shape[-1] % 2 == 0
    d = x.shape[-1] // 2
    out = torch.empty(*x.shape[:-1], d, dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    xr, _, sxn, _ = _rows(x.reshape(-1, 2 * d))
    block = min(_pow2(d), SILU_BLOCK)
    _fused_silu_and_mul_kernel[(xr.shape[0], triton.cdiv(d, block))](
        xr, out.view(-1, d), d, sxn, d, BLOCK=block, num_warps=4 if block >= 512 else 1, rows_ptr=num_rows,
        HAS_ROWS=num_rows is not None, **launch_args(x.device))
    return out


def rotary_embedding_(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                      cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates q (N, nh, D) and k (N, nkv, D) in place (neox half split); returns them.

    q, k may be strided views (e.g. of a fused qkv output) with a contiguous last dim; positions (N,);
    cos_sin_cache (P, D) = [cos | sin].
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    assert k.shape[0] == num_tokens and k.shape[2] == head_dim and head_dim % 2 == 0
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and cos_sin_cache.stride(-1) == 1
    assert cos_sin_cache.shape[-1] == head_dim
    if num_tokens == 0:
        return q, k
    half = head_dim // 2
    _fused_rotary_kernel[(num_tokens,)](  # no cache write: k stands in for the unused pointers
        positions, q, k, k, cos_sin_cache, k, k, positions, k, k, num_q_heads, num_k_heads,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), 0, 0, cos_sin_cache.stride(0), 0, 0, 0, 0, 0, 0, 1,
        HALF=half, HALF_PAD=_pow2(half), Q_HEADS_PAD=_pow2(num_q_heads), KV_HEADS_PAD=_pow2(num_k_heads),
        BLOCK_SIZE=1, WRITE_KV=False, num_warps=_rotary_num_warps(num_q_heads, num_k_heads, half),
        **launch_args(q.device))
    return q, k


def kv_scale_args(k_scale: torch.Tensor | None, v_scale: torch.Tensor | None,
                  placeholder: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(k_scale, v_scale, KV_SCALED) for a kernel launch: the scale tensors, or `placeholder` twice (never read)
    and False without them. Host checks only (no sync, graph-capturable).

    Raises:
        ValueError: only one of the two given, or one that is not a one-element fp32 tensor on placeholder's
            device.
    """
    if k_scale is None and v_scale is None:
        return placeholder, placeholder, False
    for name, t in (("k_scale", k_scale), ("v_scale", v_scale)):
        if t is None or t.dtype != torch.float32 or t.numel() != 1 or t.device != placeholder.device:
            raise ValueError(f"{name}: pass k_scale and v_scale together, each a one-element float32 tensor on "
                             f"{placeholder.device} (got {None if t is None else (t.dtype, tuple(t.shape), t.device)})")
    return k_scale, v_scale, True


def _rotary_num_warps(num_q_heads: int, num_k_heads: int, half: int) -> int:
    return 4 if _pow2(max(num_q_heads, num_k_heads)) * half >= 1024 else 1


def rotary_embedding_and_write_kv_(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                   cos_sin_cache: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                   slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                                   v_scale: torch.Tensor | None = None,
                                   write_v: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """`rotary_embedding_(positions, q, k, cos_sin_cache)`, then the rotated k and (write_v) v into the paged caches.

    One launch for what `rotary_embedding_` + `attention.kv_write.write_kv_cache` do in two. q (N, nh, D) and
    k (N, nkv, D) are rotated in place and returned; v (N, nkv, D) is only read. k_cache, v_cache are
    (num_blocks, block_size, nkv, D) of k's dtype; token n goes to slot_mapping[n] (block * block_size +
    offset), none where that is < 0. q, k, v may be strided views with a contiguous last dim.

    k_scale, v_scale: () fp32 tensors, both or neither (an FP8 cache): the caches get the rotated k / k_scale and
    v / v_scale, divided in fp32 by the values the tensors hold when the kernel runs (CUDA-graph safe) and
    rounded once; q and k stay unscaled. Raises ValueError as `kv_scale_args`.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    assert k.shape == v.shape and k.shape[0] == num_tokens and k.shape[2] == head_dim and head_dim % 2 == 0
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1 and cos_sin_cache.stride(-1) == 1
    assert cos_sin_cache.shape[-1] == head_dim
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape and k_cache.shape[2:] == k.shape[1:], \
        "caches are (num_blocks, block_size, nkv, D)"
    assert k_cache.stride(-1) == 1  # V may be a transposed cache's view (Attention.v_transposed): its D stride
    fp8_cache = k_cache.element_size() == 1  # an FP8 cache: the store casts
    assert (k_cache.dtype == k.dtype or fp8_cache) and v_cache.dtype == k_cache.dtype
    assert slot_mapping.shape == (num_tokens,)
    k_scale, v_scale, kv_scaled = kv_scale_args(k_scale, v_scale, slot_mapping)
    if num_tokens == 0:
        return q, k
    half = head_dim // 2
    _fused_rotary_kernel[(num_tokens,)](
        positions, q, k, v, cos_sin_cache, k_cache, v_cache, slot_mapping, k_scale, v_scale, num_q_heads,
        num_kv_heads,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin_cache.stride(0),
        *k_cache.stride()[:3], *v_cache.stride(),
        HALF=half, HALF_PAD=_pow2(half), Q_HEADS_PAD=_pow2(num_q_heads), KV_HEADS_PAD=_pow2(num_kv_heads),
        BLOCK_SIZE=k_cache.shape[1], WRITE_KV=True, KV_SCALED=kv_scaled, FINITE_V=v_cache.stride(-1) != 1,
        WRITE_V=write_v, num_warps=_rotary_num_warps(num_q_heads, num_kv_heads, half), **launch_args(q.device))
    return q, k
