"""Triton attention over the paged KV cache: decode (split over the KV length), varlen causal prefill, KV write.

Backends beside `paged_attention_reference` (the oracle). No host syncs: lengths are read from device memory
and launch grids depend only on host ints (batch size, token count, heads), so decode can be graph-captured.
Triton is optional: without it this module still imports and HAS_TRITON is False.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch

from shardllm.layers.attention.decode_configs import (  # noqa: F401 - DECODE_CONFIGS, set_decode_configs: API
    DECODE_CONFIGS,
    MAX_NUM_SPLITS,
    DecodeConfig,
    _config_cache,
    _f16_dot,
    _pow2,
    decode_config,
    default_num_splits,
    set_decode_configs,
)
from shardllm.layers.pdl import launch_args, pdl_enter
from shardllm.layers.triton_ops import kv_scale_args

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:
    triton = tl = None
    HAS_TRITON = False


def _jit(fn=None, **kwargs):
    """triton.jit, or a no-op without triton (annotations are strings, so the kernels still parse)."""
    if HAS_TRITON:
        return triton.jit(fn, **kwargs) if fn is not None else triton.jit(**kwargs)
    return fn if fn is not None else (lambda f: f)


_LOG2E = 1.4426950408889634


@_jit
def _split_len(seq_len, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tokens per decode partition: seq_len / NUM_SPLITS rounded up to whole tiles (at least one tile)."""
    tiles = (seq_len + NUM_SPLITS * BLOCK_N - 1) // (NUM_SPLITS * BLOCK_N)
    return tl.maximum(tiles, 1) * BLOCK_N


@_jit(do_not_specialize=["num_seqs", "stride_bt"])  # they vary step to step: one compile, not three
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
    k_scale_ptr, v_scale_ptr, qk_scale, num_heads, num_seqs,
    stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_vd,
    stride_bt, stride_ob, stride_oh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_DOT: tl.constexpr = True, PREFETCH_PAGES: tl.constexpr = False, K_ROWMAJOR: tl.constexpr = False,
    EARLY_V: tl.constexpr = False, KV_SCALED: tl.constexpr = False, F16_DOT: tl.constexpr = False,
    USE_PDL: tl.constexpr = False,
):
    """One program per (sequence, kv head, partition): all GROUP query heads of the kv head at once.

    KV_SCALED: the cache holds k / k_scale and v / v_scale (an FP8 cache); the scores are multiplied by the fp32
    scalar at k_scale_ptr (folded into qk_scale) and the output by the one at v_scale_ptr, both loaded here, at
    run time (a CUDA graph sees in-place updates). Without it the pointers are never read.

    F16_DOT (an FP8 cache, bf16/fp16 queries, use_dot; on unless SHARDLLM_FP8_ATTN_F16_DOT=0): both dots run in
    fp16. The FP8 tiles widen to fp16 in one `cvt` per two values on sm89+ (exact: every e4m3 and e5m2 value is an
    fp16 value) where widening to bf16 takes more conversions; q is multiplied by qk_scale in fp32 before its fp16
    rounding (|q| * scale stays far inside fp16's range) and p (in [0, 1]) is fp16. Measured on an H200: 8-11% less
    time per layer than widening to bf16 (decode_configs._f16_dot); the FP8 cache is still short of its bandwidth.

    Variants (DecodeConfig): USE_DOT False computes q.k and p.v as broadcast products summed in fp32 (no
    padding of the GROUP rows to 16); PREFETCH_PAGES loads the next tile's page ids before this tile's K/V;
    K_ROWMAJOR loads K as (N, D), like V, and transposes it in registers for tl.dot; EARLY_V issues the V tile's
    load with K's, before the scores (twice the bytes in flight, more registers).

    Partitions split the context evenly in whole tiles; those past the end idle (the reduce skips them):

        seq_len 300, NUM_SPLITS 4, BLOCK_N 64  ->  split_len 128
        tokens  [0 ....... 128) [128 ...... 256) [256 .. 300)  (none)
        split          0               1              2          3
    """
    pdl_enter(USE_PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    split_len = _split_len(seq_len, NUM_SPLITS, BLOCK_N)
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM_PAD)
    head = kvh * GROUP + g  # (G,)
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    q = tl.load(q_ptr + b * stride_qb + head[:, None] * stride_qh + d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # (G, D)

    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_sum = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    n = tl.arange(0, BLOCK_N)
    table = block_tables_ptr + b * stride_bt
    if not USE_DOT:
        q32 = q.to(tl.float32)
    if KV_SCALED:  # q.(k / k_scale) * k_scale: one multiply of the scalar, not of every score
        qk_scale = qk_scale * tl.load(k_scale_ptr)
    if F16_DOT:  # the scale rides on q (fp32 multiply, then one rounding to fp16): scores come out scaled
        q = (q.to(tl.float32) * qk_scale).to(tl.float16)
    if PREFETCH_PAGES:
        page = tl.load(table + (start + n) // BLOCK_SIZE, mask=start + n < end, other=0).to(tl.int64)
    for tok0 in range(start, end, BLOCK_N):
        tok = tok0 + n  # (N,)
        tok_mask = tok < end
        if PREFETCH_PAGES:
            cur = page
            page = tl.load(table + (tok + BLOCK_N) // BLOCK_SIZE, mask=tok + BLOCK_N < end, other=0).to(tl.int64)
        else:
            cur = tl.load(table + tok // BLOCK_SIZE, mask=tok_mask, other=0).to(tl.int64)
        in_page = tok % BLOCK_SIZE
        k_row = cur * stride_kb + in_page * stride_ks + kvh * stride_kh  # (N,)
        kd_mask = tok_mask[:, None] & d_mask[None, :]  # (N, D)
        v_ptrs = (v_cache_ptr + (cur * stride_vb + in_page * stride_vs + kvh * stride_vh)[:, None]
                  + d[None, :] * stride_vd)  # stride_vd: 1 (Triton specializes it), or a transposed cache's
        if EARLY_V:
            v_raw = tl.load(v_ptrs, mask=kd_mask, other=0.0)  # (N, D)
        if USE_DOT:
            if K_ROWMAJOR:
                k = tl.load(k_cache_ptr + k_row[:, None] + d[None, :], mask=kd_mask, other=0.0).to(q.dtype)
                s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (G, N)
            else:
                k_t = tl.load(k_cache_ptr + k_row[None, :] + d[:, None],
                              mask=tok_mask[None, :] & d_mask[:, None], other=0.0).to(q.dtype)  # (D, N)
                s = tl.dot(q, k_t, input_precision=DOT_PRECISION)  # (G, N)
        else:
            k = tl.load(k_cache_ptr + k_row[:, None] + d[None, :], mask=kd_mask, other=0.0).to(tl.float32)
            s = tl.sum(q32[:, None, :] * k[None, :, :], 2)  # (G, N)
        if not F16_DOT:  # (F16_DOT: q carries the scale)
            s = s * qk_scale  # log2 domain (times k_scale with KV_SCALED)
        s = tl.where(tok_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, 1)
        if not EARLY_V:
            v_raw = tl.load(v_ptrs, mask=kd_mask, other=0.0)  # (N, D)
        if USE_DOT:
            v = v_raw.to(q.dtype)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        else:
            v = v_raw.to(tl.float32)
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], 1)
        m = m_new

    _decode_store(acc, m, l_sum, b, split, head, g_mask, d, d_mask, out_ptr, part_acc_ptr, part_ml_ptr, v_scale_ptr,
                  num_heads, num_seqs, stride_ob, stride_oh, HEAD_DIM, NUM_SPLITS, KV_SCALED)


@_jit
def _decode_store(acc, m, l_sum, b, split, head, g_mask, d, d_mask, out_ptr, part_acc_ptr, part_ml_ptr, v_scale_ptr,
                  num_heads, num_seqs, stride_ob, stride_oh,
                  HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, KV_SCALED: tl.constexpr):
    """A decode program's result: the (G, D) output of its heads with one partition, else its partials."""
    if KV_SCALED:  # p.(v / v_scale) * v_scale; partials too (the reduce is linear in acc)
        acc = acc * tl.load(v_scale_ptr)
    hd_mask = g_mask[:, None] & d_mask[None, :]
    if NUM_SPLITS == 1:
        out = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]  # an empty sequence (graph padding) gives zeros
        tl.store(out_ptr + b * stride_ob + head[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=hd_mask)
    else:
        row = (b * num_heads + head) * NUM_SPLITS + split  # (G,) row of the (B, nh, S) partials
        tl.store(part_acc_ptr + row[:, None].to(tl.int64) * HEAD_DIM + d[None, :], acc, mask=hd_mask)
        tl.store(part_ml_ptr + row, m, mask=g_mask)
        tl.store(part_ml_ptr + num_seqs * num_heads * NUM_SPLITS + row, l_sum, mask=g_mask)


@_jit(do_not_specialize=["num_seqs"])
def _decode_reduce_kernel(
    part_acc_ptr, part_ml_ptr, seq_lens_ptr, out_ptr, num_heads, num_seqs, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    """One program per (sequence, query head): merge the partitions' (max, sum, acc) by their maxima."""
    pdl_enter(USE_PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + b)
    split_len = _split_len(seq_len, NUM_SPLITS, BLOCK_N)
    num_valid = (seq_len + split_len - 1) // split_len
    s = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, HEAD_DIM_PAD)
    valid = s < num_valid
    row = (b * num_heads + h) * NUM_SPLITS + s  # (S,)
    m = tl.load(part_ml_ptr + row, mask=valid, other=float("-inf"))
    l_sum = tl.load(part_ml_ptr + num_seqs * num_heads * NUM_SPLITS + row, mask=valid, other=0.0)
    acc = tl.load(part_acc_ptr + row[:, None].to(tl.int64) * HEAD_DIM + d[None, :],
                  mask=valid[:, None] & (d < HEAD_DIM)[None, :], other=0.0)  # (S, D)
    m_max = tl.max(m, 0)
    w = tl.where(valid, tl.exp2(m - tl.where(num_valid > 0, m_max, 0.0)), 0.0)  # (S,)
    denom = tl.sum(w * l_sum, 0)
    out = tl.sum(w[:, None] * acc, 0) / tl.where(denom > 0, denom, 1.0)  # (D,)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


# ---- launchers ---------------------------------------------------------------------------------------------------


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """Both (num_blocks, block_size, nkv, D); K's D contiguous, V's too unless it is a view of a cache stored
    (num_blocks, nkv, D, block_size) (Attention.v_transposed: the kernels take its strides)."""
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, "caches are (num_blocks, block_size, nkv, D)"
    assert k_cache.stride(-1) == 1 and (v_cache.stride(-1) == 1 or _transposed_v(v_cache) is not None)


def _transposed_v(v_cache: torch.Tensor) -> torch.Tensor | None:
    """The (num_blocks, nkv, D, block_size) contiguous tensor of which `v_cache` (num_blocks, block_size, nkv, D) is
    a permuted view, or None when it is not one (a (.., D)-contiguous cache, the standard layout)."""
    if v_cache.stride(-1) == 1:
        return None
    physical = v_cache.permute(0, 2, 3, 1)
    return physical if physical.is_contiguous() else None


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 only matters for fp32 inputs


# A transposed V cache's decode launch where the table's entry cannot read it (a pointer entry, page ids in chunks,
# two pages a tile): the 64-token FP8 entries' launch.
VT_DEFAULT = DecodeConfig(tma=True, num_warps=2, num_stages=3, prefetch_pages=True)


def _vt_launch(cfg: DecodeConfig, block_size: int) -> bool:
    """Whether the TMA kernel's transposed-V path can run `cfg`: one page a tile, page ids not in chunks."""
    return cfg.tma and cfg.page_chunk == 0 and cfg.block_n in (None, block_size)


class NewKV(NamedTuple):
    """A decode step's own tokens for paged_decode_attention to rotate, store and attend to (new_kv): k, v (B, nkv,
    D) as the qkv projection gives them (k not yet rotated; last dim contiguous), positions (B,) int, cos_sin_cache
    (max_position, D) (RotaryEmbedding's: cos in [0, D/2), sin in [D/2, D); neox rotation), slot_mapping (B,) int
    (a token's cache slot; < 0: not stored)."""

    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor
    cos_sin_cache: torch.Tensor
    slot_mapping: torch.Tensor


def _decode_plan(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, config: DecodeConfig | None
                 ) -> tuple[DecodeConfig, torch.Tensor | None, bool, bool]:
    """(config, the transposed V cache's own tensor or None, V read transposed, the TMA kernel runs) of a call;
    v_cache is the (num_blocks, block_size, nkv, D) view."""
    v_phys = _transposed_v(v_cache)
    block_size = k_cache.shape[1]
    cfg = decode_config(q.shape[0], q.shape[2], k_cache.dtype, block_size) if config is None else config
    if (v_phys is not None and config is None and not _vt_launch(cfg, block_size)
            and vt_supported(q, k_cache, v_phys)):  # a transposed V cache: always the TMA kernel's V_T path (the
        cfg = dataclasses.replace(VT_DEFAULT, num_splits=cfg.num_splits)  # pointer kernel would read it by bytes)
    use_vt = v_phys is not None and _vt_launch(cfg, block_size) and vt_supported(q, k_cache, v_phys)
    use_tma = use_vt or (cfg.tma and tma_supported(q, k_cache) and tma_supported(q, v_cache))
    return cfg, v_phys, use_vt, use_tma


def decode_takes_new_kv(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """Whether paged_decode_attention(q, k_cache, v_cache, ...) with its default launch can take new_kv: the TMA
    kernel runs it (an sm90+ GPU or the interpreter, the page sizes it tiles), the cache's head_dim is even, and q is
    16-bit or fp32 (the rotation rounds to q's dtype). v_cache: the (num_blocks, block_size, nkv, D) view."""
    if not HAS_TRITON or q.shape[0] == 0 or q.shape[2] % 2:
        return False
    return _decode_plan(q, k_cache, v_cache, None)[3]


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           out: torch.Tensor | None = None, num_splits: int | None = None,
                           config: DecodeConfig | None = None, k_scale: torch.Tensor | None = None,
                           v_scale: torch.Tensor | None = None, v_transposed: bool = False,
                           new_kv: NewKV | None = None) -> torch.Tensor:
    """Attention of one new token per sequence over its paged context (this token's k/v already written).

    Args:
        q: (B, nh, D), last dim contiguous.
        k_cache, v_cache: (num_blocks, block_size, nkv, D).
        block_tables: (B, max_blocks) int32; seq_lens: (B,) int32 context length including this token
            (0 for padding rows, which give zeros).
        num_splits: partitions per sequence, a power of two <= MAX_NUM_SPLITS; overrides the config's.
        config: launch choices; default decode_config(B, D, cache dtype, block_size).
        k_scale, v_scale: () fp32 tensors on q's device, both or neither: the cache holds k / k_scale and
            v / v_scale (an FP8 cache); the kernel reads them at run time and returns
            softmax(q.k * k_scale * scale) (v * v_scale). None: the cache is read as stored.
        v_transposed: v_cache is the (num_blocks, nkv, D, block_size) contiguous tensor itself (the engine passes
            its (.., D) view instead, Attention.paged_caches, which is detected); only the TMA kernel reads it this
            way (a tma config, one page a tile, no page_chunk), and slots past a sequence's end must hold finite
            values (they are not masked: triton_decode_tma._page_step with V_T).
        new_kv: rotary and the KV write fused in (TMA kernel only; decode_takes_new_kv says where): q is given
            before its rotation, and each sequence's last position (seq_lens - 1) comes from new_kv, not the cache:
            its k rotated, k and v stored into its slot as triton_ops.rotary_embedding_and_write_kv_ stores them (k
            / k_scale, v / v_scale) and attended to. q and new_kv.k are not modified.
    Returns:
        (B, nh, D), `out` if given.
    Raises:
        ValueError: an invalid config, scales as kv_scale_args refuses them, or v_transposed with a config or
            cache the TMA kernel cannot read that way.
    """
    if v_transposed:  # the (num_blocks, nkv, D, block_size) tensor itself: its (.., D) view for the checks
        nb, bs, nkv, d = k_cache.shape
        if v_cache.shape != (nb, nkv, d, bs) or not v_cache.is_contiguous():
            raise ValueError(f"v_transposed: v_cache must be a contiguous (num_blocks, nkv, D, block_size) = "
                             f"{(nb, nkv, d, bs)} tensor, got {tuple(v_cache.shape)}")
        v_cache = v_cache.permute(0, 3, 1, 2)
    _check_cache(k_cache, v_cache)
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert q.stride(-1) == 1 and num_heads % num_kv_heads == 0
    group = num_heads // num_kv_heads
    if config is not None:
        config.validate()  # the table's entries are validated once, at lookup
    cfg, v_phys, use_vt, use_tma = _decode_plan(q, k_cache, v_cache, config)
    k_scale, v_scale, kv_scaled = kv_scale_args(k_scale, v_scale, seq_lens)
    if num_splits is None:
        num_splits = cfg.num_splits or default_num_splits(num_seqs, num_kv_heads, q.device)
    assert num_splits == _pow2(num_splits) and num_splits <= MAX_NUM_SPLITS
    out = torch.empty_like(q) if out is None else out
    if num_seqs == 0:
        return out
    part_acc = part_ml = out  # unused placeholders when there is a single partition
    if num_splits > 1:
        part_acc = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(2, num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
    head_dim_pad = _pow2(head_dim, 16)
    block_n = cfg.block_n or (64 if head_dim_pad <= 128 else 32)
    pdl = launch_args(q.device)  # {} off sm90+ or with SHARDLLM_PDL=0
    extra = {**pdl, **({} if cfg.num_stages is None else {"num_stages": cfg.num_stages})}
    f16_dot = cfg.use_dot and _f16_dot(q.dtype, k_cache.dtype)
    if v_transposed and not use_vt:
        raise ValueError(f"v_transposed: the TMA kernel reads it only with tma=True, page_chunk=0 and one page a "
                         f"tile (got {cfg}), on an sm90+ GPU or the interpreter, from a contiguous (num_blocks, nkv, "
                         f"D, block_size) V cache of K's dtype (got {tuple(v_cache.shape)}, {v_cache.dtype})")
    if new_kv is not None and not use_tma:
        raise ValueError(f"new_kv: only the TMA decode kernel fuses the rotary and the KV write (this call's launch "
                         f"{cfg} takes the pointer kernel); check decode_takes_new_kv first")
    if use_tma:
        if new_kv is not None:
            extra.update(_new_kv_args(new_kv, q, k_cache, v_cache))
        pages = 2 if cfg.block_n == 2 * block_size else 1  # whole pages: block_n picks 1 or 2
        block_n = pages * block_size  # the reduce's partition unit
        _decode_kernel_tma[(num_seqs, num_kv_heads, num_splits)](
            q, descriptor(k_cache), descriptor_vt(v_phys) if use_vt else descriptor(v_cache), block_tables,
            seq_lens, out, part_acc, part_ml, k_scale,
            v_scale, scale * _LOG2E, num_heads, num_seqs, q.stride(0), q.stride(1), block_tables.stride(0),
            out.stride(0), out.stride(1), GROUP=group, GROUP_PAD=_pow2(group, 16), HEAD_DIM=head_dim,
            BLOCK_SIZE=block_size, PAGES=pages, NUM_SPLITS=num_splits, DOT_PRECISION=_dot_precision(q.dtype),
            KV_SCALED=kv_scaled, F16_DOT=_f16_dot(q.dtype, k_cache.dtype, tma=True), PAGE_CHUNK=cfg.page_chunk,
            PREFETCH=cfg.prefetch_pages, V_T=use_vt, num_warps=cfg.num_warps, **extra)
    else:
        _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
            q, k_cache, v_cache, block_tables, seq_lens, out, part_acc, part_ml, k_scale, v_scale,
            scale * _LOG2E, num_heads, num_seqs,
            q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride(),
            block_tables.stride(0), out.stride(0), out.stride(1),
            GROUP=group, GROUP_PAD=_pow2(group, 16 if cfg.use_dot else 1), HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
            BLOCK_SIZE=block_size, BLOCK_N=block_n, NUM_SPLITS=num_splits, DOT_PRECISION=_dot_precision(q.dtype),
            USE_DOT=cfg.use_dot, PREFETCH_PAGES=cfg.prefetch_pages, K_ROWMAJOR=cfg.k_rowmajor, EARLY_V=cfg.early_v,
            KV_SCALED=kv_scaled, F16_DOT=f16_dot, num_warps=cfg.num_warps, **extra)
    if num_splits > 1:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            part_acc, part_ml, seq_lens, out, num_heads, num_seqs, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, BLOCK_N=block_n, NUM_SPLITS=num_splits, num_warps=4, **pdl)
    return out


def _new_kv_args(new_kv: NewKV, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> dict:
    """The TMA kernel's NEW_KV arguments; v_cache: the (num_blocks, block_size, nkv, D) view (a transposed V
    cache's too: its D stride is block_size, and its stores make a non-finite v 0, as the KV writers do)."""
    k, v, positions, cs, slots = new_kv
    b, nkv, d = q.shape[0], k_cache.shape[2], q.shape[2]
    if (k.shape != (b, nkv, d) or v.shape != k.shape or k.stride(-1) != 1 or v.stride(-1) != 1 or k.dtype != q.dtype
            or v.dtype != q.dtype or positions.shape != (b,) or slots.shape != (b,) or cs.dim() != 2
            or cs.shape[1] != d or cs.stride(-1) != 1 or d % 2):
        raise ValueError(f"new_kv: k, v ({b}, {nkv}, {d}) in q's dtype {q.dtype} with contiguous rows, positions and "
                         f"slot_mapping ({b},), cos_sin_cache (max_position, {d}), an even head_dim; got k "
                         f"{tuple(k.shape)} {k.dtype}, v {tuple(v.shape)}, positions {tuple(positions.shape)}, "
                         f"slot_mapping {tuple(slots.shape)}, cos_sin_cache {tuple(cs.shape)}")
    return dict(NEW_KV=True, k_new_ptr=k, v_new_ptr=v, pos_ptr=positions, cs_ptr=cs, stride_cs=cs.stride(0),
                stride_kn=k.stride(0), stride_kh=k.stride(1), stride_vn=v.stride(0), stride_vh=v.stride(1),
                slot_ptr=slots, k_cache_ptr=k_cache, v_cache_ptr=v_cache, stride_kcb=k_cache.stride(0),
                stride_kcs=k_cache.stride(1), stride_kch=k_cache.stride(2), stride_vcb=v_cache.stride(0),
                stride_vcs=v_cache.stride(1), stride_vch=v_cache.stride(2), stride_vcd=v_cache.stride(3),
                FINITE_V=v_cache.stride(-1) != 1)


# the TMA decode kernel and the KV write reuse this module's helpers: imported last, once they exist
from shardllm.layers.attention.kv_write import (  # noqa: E402, F401 - their home
    _write_kv_kernel,
    _write_v_t_kernel,
    write_kv_cache,
    write_v_transposed,
)
from shardllm.layers.attention.triton_decode_tma import (  # noqa: E402
    _decode_kernel_tma,
    descriptor,
    descriptor_vt,
    tma_supported,
    vt_supported,
)
from shardllm.layers.attention.triton_prefill import (  # noqa: E402, F401 - their home
    PrefillConfig,
    _prefill_kernel,
    paged_prefill_attention,
    prefill_block_q,
)
