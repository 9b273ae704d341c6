"""Writing a step's new k and v into the paged KV cache: one Triton program per token, all kv heads (the rotary
path fuses the same write: triton_ops.rotary_embedding_and_write_kv_); and a transposed V cache's write for prompt
chunks in (D, tokens) tiles (write_v_transposed). Out of triton_paged.py, which re-exports write_kv_cache, only for
size."""

from __future__ import annotations

import torch

from shardllm.layers.attention.triton_paged import _check_cache, _jit, _pow2, tl
from shardllm.layers.pdl import launch_args, pdl_enter
from shardllm.layers.triton_ops import finite_or_zero, kv_scale_args


@_jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, k_scale_ptr, v_scale_ptr,
    stride_kn, stride_kh, stride_vn, stride_vh, stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    stride_vcd, NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, KV_SCALED: tl.constexpr = False, USE_PDL: tl.constexpr = False,
    FINITE_V: tl.constexpr = False,
):
    """One program per new token: its k and v, all kv heads, into the cache slot; slots < 0 are skipped. FINITE_V
    (a transposed V cache, whose decode reads slots past a sequence's end unmasked): a NaN or infinite v is stored
    as 0, so no such slot holds a non-finite value for another sequence to read.

    KV_SCALED: stores k / k_scale and v / v_scale (IEEE fp32 division by the scalars at the pointers: `/` is
    approximate on NVIDIA, 2 ulp; rounded once to the cache dtype).
    """
    pdl_enter(USE_PDL)
    n = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + n).to(tl.int64)
    h = tl.arange(0, HEADS_PAD)
    d = tl.arange(0, HEAD_DIM_PAD)
    mask = ((h < NUM_KV_HEADS) & (h * 0 + slot >= 0))[:, None] & (d < HEAD_DIM)[None, :]  # the interpreter
    # wants the slot test as a vector, not a scalar
    page = slot // BLOCK_SIZE
    in_page = slot % BLOCK_SIZE
    k = tl.load(k_ptr + n * stride_kn + h[:, None] * stride_kh + d[None, :], mask=mask)
    v = tl.load(v_ptr + n * stride_vn + h[:, None] * stride_vh + d[None, :], mask=mask)
    if FINITE_V:
        v = finite_or_zero(v)
    if KV_SCALED:
        k = tl.div_rn(k.to(tl.float32), tl.load(k_scale_ptr)).to(k_cache_ptr.dtype.element_ty)
        v = tl.div_rn(v.to(tl.float32), tl.load(v_scale_ptr)).to(v_cache_ptr.dtype.element_ty)
    tl.store(k_cache_ptr + page * stride_kcb + in_page * stride_kcs + h[:, None] * stride_kch + d[None, :], k,
             mask=mask)
    tl.store(v_cache_ptr + page * stride_vcb + in_page * stride_vcs + h[:, None] * stride_vch + d[None, :] * stride_vcd,
             v, mask=mask)


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor, k_scale: torch.Tensor | None = None,
                   v_scale: torch.Tensor | None = None) -> None:
    """k, v: (N, nkv, D) into slots of (num_blocks, block_size, nkv, D) caches, one launch for both.

    With k_scale, v_scale (() fp32 tensors, both or neither, read at run time) it stores k / k_scale and
    v / v_scale, divided in fp32 and rounded once to the cache dtype. Raises ValueError as kv_scale_args.
    """
    _check_cache(k_cache, v_cache)
    num_tokens, num_kv_heads, head_dim = k.shape
    assert k.stride(-1) == 1 and v.stride(-1) == 1 and k_cache.shape[2:] == k.shape[1:]
    k_scale, v_scale, kv_scaled = kv_scale_args(k_scale, v_scale, slot_mapping)
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, k_scale, v_scale, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        *k_cache.stride()[:3], *v_cache.stride(),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, HEADS_PAD=_pow2(num_kv_heads),
        HEAD_DIM_PAD=_pow2(head_dim), BLOCK_SIZE=k_cache.shape[1], KV_SCALED=kv_scaled,
        FINITE_V=v_cache.stride(-1) != 1, num_warps=4,
        **launch_args(k.device))


@_jit
def _write_v_t_kernel(
    v_ptr, v_cache_ptr, slot_mapping_ptr, v_scale_ptr, num_tokens, stride_vn, stride_vh, stride_vcb, stride_vch,
    stride_vcd, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, TOKENS: tl.constexpr,
    KV_SCALED: tl.constexpr = False, USE_PDL: tl.constexpr = False,
):
    """One program per (TOKENS consecutive step rows, kv head): their v into a transposed V cache, (num_blocks, nkv,
    D, block_size), as a (D, TOKENS) tile whose TOKENS axis is the fast one, so that a prompt's tokens, consecutive
    slots of a page, are stored as runs of consecutive bytes (one row a token would store each byte block_size bytes
    from the last). Slots < 0 are skipped; a non-finite v is stored as 0 (kv_write._write_kv_kernel's FINITE_V)."""
    pdl_enter(USE_PDL)
    h = tl.program_id(1)
    n = tl.program_id(0) * TOKENS + tl.arange(0, TOKENS)
    slot = tl.load(slot_mapping_ptr + n, mask=n < num_tokens, other=-1).to(tl.int64)
    d = tl.arange(0, HEAD_DIM_PAD)
    ok = slot >= 0
    v = tl.load(v_ptr + n[:, None].to(tl.int64) * stride_vn + h * stride_vh + d[None, :],
                mask=ok[:, None] & (d < HEAD_DIM)[None, :], other=0.0)  # (TOKENS, D), D fast
    v = finite_or_zero(v)
    if KV_SCALED:
        v = tl.div_rn(v.to(tl.float32), tl.load(v_scale_ptr)).to(v_cache_ptr.dtype.element_ty)
    dest = (v_cache_ptr + ((slot // BLOCK_SIZE) * stride_vcb + h * stride_vch + slot % BLOCK_SIZE)[None, :]
            + d[:, None] * stride_vcd)  # (D, TOKENS)
    tl.store(dest, tl.trans(v).to(v_cache_ptr.dtype.element_ty), mask=(d < HEAD_DIM)[:, None] & ok[None, :])


def write_v_transposed(v: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
                       v_scale: torch.Tensor | None = None, tokens: int = 32) -> None:
    """v (N, nkv, D), last dim contiguous, into a transposed V cache: v_cache the (num_blocks, block_size, nkv, D)
    view of a (num_blocks, nkv, D, block_size) contiguous tensor (Attention.paged_caches with v_transposed); token n
    to slot_mapping[n], none where that is < 0. v_scale: () fp32 (an FP8 cache: stores v / v_scale, divided in fp32
    and rounded once), or None. A non-finite v is stored as 0. For steps of several tokens a sequence (prefill),
    whose rows are consecutive slots; the fused rotary kernel's one-row-a-token store is as good for decodes."""
    num_tokens, num_kv_heads, head_dim = v.shape
    assert v.stride(-1) == 1 and v_cache.stride(1) == 1, "v_cache: the transposed layout's (.., D) view"
    assert v_cache.shape[2:] == v.shape[1:] and slot_mapping.shape == (num_tokens,)
    if num_tokens == 0:
        return
    _write_v_t_kernel[(-(-num_tokens // tokens), num_kv_heads)](
        v, v_cache, slot_mapping, v_scale if v_scale is not None else slot_mapping, num_tokens, v.stride(0),
        v.stride(1), v_cache.stride(0), v_cache.stride(2), v_cache.stride(3), HEAD_DIM=head_dim,
        HEAD_DIM_PAD=_pow2(head_dim), BLOCK_SIZE=v_cache.shape[1], TOKENS=tokens, KV_SCALED=v_scale is not None,
        num_warps=4, **launch_args(v.device))
