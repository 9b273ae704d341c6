"""Causal attention of a step's prompt chunks (prefill, chunked prefill over cached context, prefix hits, and the
decode rows of a mixed step where they are not split off) over the paged KV cache: one Triton kernel, tiles of a
sequence's query tokens x their GQA group against BLOCK_N-token tiles of its context. Out of triton_paged.py, which
re-exports paged_prefill_attention, prefill_block_q and the kernel, only for size."""

from __future__ import annotations

import json
from typing import NamedTuple

import torch

from shardllm import envs
from shardllm.layers.attention.decode_configs import _f16_dot
from shardllm.layers.attention.triton_paged import _LOG2E, _check_cache, _dot_precision, _jit, _pow2, tl
from shardllm.layers.triton_ops import kv_scale_args


@_jit
def _prefill_step(acc, m, l_sum, q, q_pos, tok0, kv_end, qk_scale, b, kvh, d, d_mask, k_cache_ptr, v_cache_ptr,
                  block_tables_ptr, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_vd,
                  stride_bt, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  V_T: tl.constexpr, MASKED: tl.constexpr):
    """One BLOCK_N-token context tile of _prefill_kernel's online softmax: (acc, m, l_sum) updated. MASKED: keys
    past kv_end and past each row's position excluded; else the caller knows every row sees every key of it."""
    tok = tok0 + tl.arange(0, BLOCK_N)
    tok_mask = tok < kv_end  # unmasked (not MASKED): every key of the tile is in the context, loads take no mask
    if MASKED:
        page = tl.load(block_tables_ptr + b * stride_bt + tok // BLOCK_SIZE, mask=tok_mask, other=0).to(tl.int64)
    else:
        page = tl.load(block_tables_ptr + b * stride_bt + tok // BLOCK_SIZE).to(tl.int64)
    in_page = tok % BLOCK_SIZE
    k_ptrs = k_cache_ptr + (page * stride_kb + in_page * stride_ks + kvh * stride_kh)[None, :] + d[:, None]
    if MASKED:
        k_t = tl.load(k_ptrs, mask=tok_mask[None, :] & d_mask[:, None], other=0.0).to(q.dtype)  # (D, N)
    else:
        k_t = tl.load(k_ptrs, mask=d_mask[:, None], other=0.0).to(q.dtype)
    s = tl.dot(q, k_t, input_precision=DOT_PRECISION) * qk_scale  # (M, N), log2 domain
    if MASKED:
        s = tl.where((tok[None, :] <= q_pos[:, None]) & tok_mask[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_sum = l_sum * alpha + tl.sum(p, 1)
    if V_T and BLOCK_SIZE % BLOCK_N == 0:  # a transposed V cache: the tile lies in one page (tok0 is a
        # multiple of BLOCK_N, which divides the page), whose tokens are contiguous. Its id as a scalar and no
        # token mask (slots past kv_end hold finite values in this layout, and p is 0 there) let Triton
        # vectorize the (D, N) load along the tokens; a gathered id per token or a token mask gives byte loads
        # (the sm90 PTX). Transposed for the dot.
        vpage = tl.load(block_tables_ptr + b * stride_bt + tok0 // BLOCK_SIZE).to(tl.int64)
        vin = tok0 % BLOCK_SIZE + tl.arange(0, BLOCK_N)
        v = tl.trans(tl.load(v_cache_ptr + vpage * stride_vb + kvh * stride_vh + vin[None, :] * stride_vs
                             + d[:, None] * stride_vd, mask=d_mask[:, None], other=0.0)).to(q.dtype)  # (N, D)
    else:
        v_ptrs = (v_cache_ptr + (page * stride_vb + in_page * stride_vs + kvh * stride_vh)[:, None]
                  + d[None, :] * stride_vd)
        if MASKED:
            v = tl.load(v_ptrs, mask=tok_mask[:, None] & d_mask[None, :], other=0.0).to(q.dtype)  # (N, D)
        else:
            v = tl.load(v_ptrs, mask=d_mask[None, :], other=0.0).to(q.dtype)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_sum


# one compile whatever the step: a mixed step slices the tables past its decodes (any alignment), and without an FP8
# cache the scale pointers are seq_lens (kv_scale_args' placeholder)
@_jit(do_not_specialize=["num_seqs", "stride_bt", "block_tables_ptr", "seq_lens_ptr", "k_scale_ptr", "v_scale_ptr"])
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr, out_ptr,
    k_scale_ptr, v_scale_ptr, qk_scale, num_seqs,
    stride_qn, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, stride_vd,
    stride_bt, stride_on, stride_oh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    KV_SCALED: tl.constexpr = False, F16_DOT: tl.constexpr = False, V_T: tl.constexpr = False,
    SPLIT_CAUSAL: tl.constexpr = False,
):
    """One program per (query tile, kv head); a tile is BLOCK_Q tokens of one sequence x its GROUP heads.
    SPLIT_CAUSAL: the context tiles before the tile's first token run without masks (PrefillConfig.split_causal).
    KV_SCALED: scores times the scalar at k_scale_ptr, output times the one at v_scale_ptr (as _decode_kernel).
    F16_DOT: fp16 dots over an FP8 cache, q pre-scaled (as _decode_kernel).

    Tiles are numbered without a prefix sum over the host: sequence b's tiles start at
    qsl[b] // BLOCK_Q + b, which leaves room for cdiv(q_len_b, BLOCK_Q) tiles, so N // BLOCK_Q + B
    programs cover any batch; a program finds its sequence by binary search and idles past its end.

        rows of the tile:  r = t * GROUP_PAD + g  ->  token qsl[b] + tile * BLOCK_Q + t, head kvh * GROUP + g
    """
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    lo = pid * 0
    hi = lo + num_seqs - 1
    while lo < hi:  # largest b with qsl[b] // BLOCK_Q + b <= pid
        mid = (lo + hi + 1) // 2
        first = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        lo = tl.where(first <= pid, mid, lo)
        hi = tl.where(first <= pid, hi, mid - 1)
    b = lo
    q_start = tl.load(query_start_loc_ptr + b)
    q_len = tl.load(query_start_loc_ptr + b + 1) - q_start
    tile = pid - (q_start // BLOCK_Q + b)
    seq_len = tl.load(seq_lens_ptr + b)
    ctx_len = seq_len - q_len  # cached context before this chunk

    r = tl.arange(0, BLOCK_Q * GROUP_PAD)
    t = tile * BLOCK_Q + r // GROUP_PAD  # (M,) token index inside the chunk
    head = kvh * GROUP + r % GROUP_PAD
    row_mask = (t < q_len) & (r % GROUP_PAD < GROUP)
    d = tl.arange(0, HEAD_DIM_PAD)
    d_mask = d < HEAD_DIM
    q_row = (q_start + t).to(tl.int64)
    q = tl.load(q_ptr + q_row[:, None] * stride_qn + head[:, None] * stride_qh + d[None, :],
                mask=row_mask[:, None] & d_mask[None, :], other=0.0)  # (M, D)
    q_pos = ctx_len + t  # (M,) causal: row sees keys 0..q_pos

    kv_end = tl.minimum(seq_len, ctx_len + (tile + 1) * BLOCK_Q)
    kv_end = tl.where(tile * BLOCK_Q < q_len, kv_end, 0)  # idle program
    if KV_SCALED:
        qk_scale = qk_scale * tl.load(k_scale_ptr)
    if F16_DOT:
        q = (q.to(tl.float32) * qk_scale).to(tl.float16)
        qk_scale = 1.0
    m = tl.full([BLOCK_Q * GROUP_PAD], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_Q * GROUP_PAD], tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    if SPLIT_CAUSAL:  # context tiles that every row of the tile sees in full (keys before its first token):
        # no causal or end mask, then the rest with them
        full_end = tl.minimum(kv_end, (ctx_len + tile * BLOCK_Q) // BLOCK_N * BLOCK_N)
        for tok0 in range(0, full_end, BLOCK_N):
            acc, m, l_sum = _prefill_step(acc, m, l_sum, q, q_pos, tok0, kv_end, qk_scale, b, kvh, d, d_mask,
                                          k_cache_ptr, v_cache_ptr, block_tables_ptr, stride_kb, stride_ks,
                                          stride_kh, stride_vb, stride_vs, stride_vh, stride_vd, stride_bt,
                                          BLOCK_SIZE, BLOCK_N, DOT_PRECISION, V_T, False)
    else:
        full_end = kv_end * 0
    for tok0 in range(full_end, kv_end, BLOCK_N):  # the first tile holds key 0, so every row's max is finite after it
        acc, m, l_sum = _prefill_step(acc, m, l_sum, q, q_pos, tok0, kv_end, qk_scale, b, kvh, d, d_mask,
                                      k_cache_ptr, v_cache_ptr, block_tables_ptr, stride_kb, stride_ks, stride_kh,
                                      stride_vb, stride_vs, stride_vh, stride_vd, stride_bt, BLOCK_SIZE, BLOCK_N,
                                      DOT_PRECISION, V_T, True)

    if KV_SCALED:
        acc = acc * tl.load(v_scale_ptr)
    out = acc / tl.where(l_sum > 0, l_sum, 1.0)[:, None]
    tl.store(out_ptr + q_row[:, None] * stride_on + head[:, None] * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


class PrefillConfig(NamedTuple):
    """A launch of the prefill kernel. rows: query rows a tile holds (tokens x the GQA group padded to a power of
    two; short chunks take fewer tokens, at least 16 rows); block_n: context tokens a step (a transposed V cache reads
    one-page tiles fast only where it divides block_size); num_warps 0: 8 for tiles of 128 rows or more, else 4;
    num_stages 0: Triton's default; split_causal: the context tiles before a tile's first token run without the
    causal and end masks (unmasked loads), the rest with them. The engine's launch is `prefill_config`'s."""

    rows: int = 128
    block_n: int = 64
    num_warps: int = 0
    num_stages: int = 0
    split_causal: bool = False


def parse_prefill_config(text: str | None) -> PrefillConfig:
    """PrefillConfig from JSON of its fields ('{"rows": 256, "split_causal": true}'); None or blank: the default.

    Raises:
        ValueError: not JSON of known fields, or a value out of range (the message names the field and the range).
    """
    if text is None or not text.strip():
        return PrefillConfig()
    try:
        fields = json.loads(text)
        cfg = PrefillConfig(**fields)
    except (ValueError, TypeError) as e:
        raise ValueError(f"SHARDLLM_PREFILL_CONFIG: JSON of PrefillConfig fields {list(PrefillConfig._fields)} "
                         f"expected, got {text!r} ({e})") from None

    def integer(n) -> bool:
        return isinstance(n, int) and not isinstance(n, bool)

    def pow2(n) -> bool:
        return integer(n) and n > 0 and n & (n - 1) == 0

    checks = {"rows": pow2(cfg.rows) and 16 <= cfg.rows <= 512,
              "block_n": pow2(cfg.block_n) and 16 <= cfg.block_n <= 256,
              "num_warps": integer(cfg.num_warps) and cfg.num_warps in (0, 1, 2, 4, 8, 16),
              "num_stages": integer(cfg.num_stages) and cfg.num_stages in range(0, 7),
              "split_causal": isinstance(cfg.split_causal, bool)}
    bad = [k for k, ok in checks.items() if not ok]
    if bad:
        raise ValueError(f"SHARDLLM_PREFILL_CONFIG: {bad} out of range in {cfg}: rows a power of two in [16, 512], "
                         "block_n a power of two in [16, 256], num_warps 0 (auto) or a power of two up to 16, "
                         "num_stages 0 (Triton's default) to 6, split_causal true or false")
    return cfg


# SHARDLLM_PREFILL_CONFIG, read at import: one launch for every step of the process; None: prefill_config's defaults
PREFILL_CONFIG = (parse_prefill_config(envs.SHARDLLM_PREFILL_CONFIG) if envs.is_given("SHARDLLM_PREFILL_CONFIG")
                  else None)
# The defaults, from benchmarks/prefill_sweep.py on one H200 (docs/benchmarks.md, twelfth session; 8B shapes, us a
# layer at 16 x 1000 / 128 x 128 tokens, the launch before: 774 / 290 standard, 895 / 309 transposed):
STANDARD = PrefillConfig(num_warps=4, split_causal=True)  # 554 / 224
V_T_LONG = PrefillConfig(block_n=128, split_causal=True)  # transposed V, chunks of V_T_LONG_FROM+ tokens: 750 us
V_T_SHORT = PrefillConfig()  # transposed V, shorter chunks (V_T_LONG's 128-token tiles: 425 us at 128 x 128)
V_T_LONG_FROM = 512  # between the two measured prompt lengths (128, 1000; 64-token pages): not itself measured
LAUNCH_CHANGES_AT = (V_T_LONG_FROM,)  # chunk lengths past `rows` where prefill_config's choice may change


def prefill_config(v_transposed: bool, max_query_len: int) -> PrefillConfig:
    """The prefill kernel's launch for a step: SHARDLLM_PREFILL_CONFIG where given, else by the V cache's layout
    (standard (N, D) tiles or transposed) and, transposed, the step's longest chunk (max_query_len tokens; a chunk
    over a long cached context counts by its own length). Measured only at 64-token pages on fresh prompts; other
    page sizes take the same choice."""
    if PREFILL_CONFIG is not None:
        return PREFILL_CONFIG
    if not v_transposed:
        return STANDARD
    return V_T_LONG if max_query_len >= V_T_LONG_FROM else V_T_SHORT


def prefill_block_q(max_query_len: int, group: int, config: PrefillConfig | None = None) -> int:
    """Query tokens a tile of the prefill kernel holds (a tile: tokens x the `group` query heads of one kv head):
    config.rows rows (default: prefill_config's for a standard V cache), fewer tokens for short chunks, and at least
    16 rows (tl.dot). One compiled kernel per value."""
    rows = (config or prefill_config(False, max_query_len)).rows
    group_pad = _pow2(group)
    block_q = min(max(rows // group_pad, 1), _pow2(max(max_query_len, 1)))  # short chunks: smaller tiles
    return max(block_q, _pow2(max(16 // group_pad, 1)))


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
                            max_query_len: int, scale: float, out: torch.Tensor | None = None,
                            k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
                            config: PrefillConfig | None = None) -> torch.Tensor:
    """Causal attention of variable-length chunks over their paged context (this step's k/v already written).

    Serves prefill, chunked prefill over cached context, prefix hits and decode rows in one launch.

    Args:
        q: (N, nh, D), last dim contiguous; sequence b owns rows [query_start_loc[b], query_start_loc[b+1]).
        query_start_loc: (B + 1,) int32; seq_lens: (B,) int32 context length including the chunk.
        max_query_len: host bound on the chunk lengths, only used to size the query tile.
        k_scale, v_scale: as paged_decode_attention's.
        config: the launch (default: prefill_config's for v_cache's layout and max_query_len).
    Returns:
        (N, nh, D), `out` if given.
    Raises:
        ValueError: scales as kv_scale_args refuses them.
    """
    _check_cache(k_cache, v_cache)
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert q.stride(-1) == 1 and num_heads % num_kv_heads == 0
    group = num_heads // num_kv_heads
    num_seqs = seq_lens.shape[0]
    k_scale, v_scale, kv_scaled = kv_scale_args(k_scale, v_scale, seq_lens)
    out = torch.empty_like(q) if out is None else out
    if num_tokens == 0:
        return out
    group_pad = _pow2(group)
    head_dim_pad = _pow2(head_dim, 16)
    v_t = v_cache.stride(-1) != 1
    cfg = config or prefill_config(v_t, max_query_len)
    block_q = prefill_block_q(max_query_len, group, cfg)
    num_tiles = num_tokens // block_q + num_seqs
    launch = dict(num_warps=cfg.num_warps or (8 if block_q * group_pad >= 128 else 4))
    if cfg.num_stages:
        launch["num_stages"] = cfg.num_stages
    _prefill_kernel[(num_tiles, num_kv_heads)](
        q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, out, k_scale, v_scale,
        scale * _LOG2E, num_seqs,
        q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride(),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
        BLOCK_SIZE=block_size, BLOCK_Q=block_q, BLOCK_N=cfg.block_n, DOT_PRECISION=_dot_precision(q.dtype),
        KV_SCALED=kv_scaled, F16_DOT=_f16_dot(q.dtype, k_cache.dtype), V_T=v_t,
        SPLIT_CAUSAL=cfg.split_causal, **launch)
    return out
