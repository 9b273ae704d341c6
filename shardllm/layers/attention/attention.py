"""Attention over the paged KV cache, for a flat batch of variable-length sequences.

A step's tokens are laid out sequence after sequence (N tokens in all); sequence b owns tokens
[query_start_loc[b], query_start_loc[b+1]) and, counting those, seq_lens[b] tokens of context whose
KV sits in the blocks block_tables[b]. The torch reference below is the oracle for faster backends.

    cache slot of position p of sequence b = block_tables[b, p // block_size] * block_size + p % block_size
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from shardllm import envs
from shardllm.layers import triton_ops
from shardllm.layers.attention import flash_prefill, triton_paged
from shardllm.layers.quantization.kv_cache import calibrate_kv_scales_
from shardllm.layers.rotary import RotaryEmbedding

logger = logging.getLogger(__name__)
# SHARDLLM_MIXED_STEP_DECODE_KERNEL=0 (read at import): a step mixing decodes with longer chunks sends all its rows
# to the prefill kernel (the previous behaviour, for A/B runs) instead of its leading decodes to the decode kernel
MIXED_STEP_DECODE_KERNEL = envs.SHARDLLM_MIXED_STEP_DECODE_KERNEL
_fused_rotary_ok = [True]  # cleared, for the process, if the fused rotary + KV-write kernel fails to launch
_flash_ok = [True]  # cleared, for the process, if flash_prefill's kernel fails
_flash_announced = False
# SHARDLLM_KV_SCALES_IN_KERNELS=0 (read at import): the Triton path applies FP8 k/v scales in four torch ops, as
# the torch reference does, instead of inside the kernels (the previous behaviour, for A/B runs)
KV_SCALES_IN_KERNELS = envs.SHARDLLM_KV_SCALES_IN_KERNELS
# SHARDLLM_KV_V_T_TILED_WRITE=1 (read at import): a transposed V cache takes a step's prompt chunks' v in
# (D, tokens) tiles (kv_write.write_v_transposed), not one row a token from the fused rotary kernel
V_T_TILED_WRITE = envs.SHARDLLM_KV_V_T_TILED_WRITE
_tiled_v_ok = [True]  # cleared, for the process, if that write fails to launch (the row store instead)
# SHARDLLM_DECODE_FUSED_ROTARY=N (read at import): decode-only steps of at most N rows rotate q and k and write k, v
# inside the TMA decode kernel (triton_paged.NewKV), one launch a layer fewer (0: none). Larger steps keep the two
# launches: the fused kernel's longer prologue delays every program of a many-wave grid (envs' measurements).
DECODE_FUSED_ROTARY = envs.SHARDLLM_DECODE_FUSED_ROTARY
_fused_decode_ok = [True]  # cleared, for the process, if that kernel fails to launch (the two launches instead)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # (N,) cache slot of each new token
    query_start_loc: torch.Tensor  # (B + 1,) cu_seqlens_q
    seq_lens: torch.Tensor  # (B,) context length after this step
    block_tables: torch.Tensor  # (B, max_blocks)
    max_query_len: int
    max_seq_len: int
    block_size: int
    # Leading sequences [0, num_decodes) with one query token each (rows 0 .. num_decodes - 1): in a step that
    # also holds longer chunks they go to the decode kernel, the rest to the prefill kernel (0: all to one kernel).
    num_decodes: int = 0
    # query_start_loc on the host ((B + 1,) ints), where the step's builder has it (the runner's prepare_inputs):
    # lets the host split a step at a sequence boundary without reading the device (layers/microbatch_overlap.py)
    host_query_start_loc: object = None
    # The first sequence from which on no sequence has cached context (each one's chunk starts its prompt), counted
    # on the host by the step's builder; None: unknown. Those sequences may attend over the step's own k, v
    # (flash_prefill) instead of the cache.
    fresh_from: int | None = None
    # Per-step tensors of the torch reference, built once and shared by all layers.
    _ref: dict = field(default_factory=dict, repr=False)
    _qsl_from: dict = field(default_factory=dict, repr=False)  # see query_start_loc_from

    def query_start_loc_from(self, b: int, first_row: int) -> torch.Tensor:
        """(B - b + 1,) int32: query_start_loc of sequences [b, B) counted from their first row (first_row:
        query_start_loc[b], which the caller knows on the host); computed once a step for each b, shared by the
        layers."""
        got = self._qsl_from.get(b)
        if got is None:
            got = self._qsl_from[b] = self.query_start_loc[b:] - first_row
        return got

    def chunks_query_start_loc(self) -> torch.Tensor:
        """(B - num_decodes + 1,) int32: query_start_loc of the sequences after the leading decodes (one row
        each), counted from their first row (query_start_loc[num_decodes:] - num_decodes); computed once a step."""
        return self.query_start_loc_from(self.num_decodes, self.num_decodes)

    def reference_indices(self) -> dict:
        if self._ref:
            return self._ref
        dev = self.seq_lens.device
        qsl = self.query_start_loc.long()
        q_lens = qsl[1:] - qsl[:-1]  # (B,)
        seq_lens = self.seq_lens.long()
        i = torch.arange(self.max_query_len, device=dev)
        q_valid = i[None, :] < q_lens[:, None]  # (B, Tq)
        q_index = torch.where(q_valid, qsl[:-1, None] + i[None, :], 0)  # (B, Tq)
        j = torch.arange(self.max_seq_len, device=dev)
        blocks = self.block_tables.long()[:, j // self.block_size]  # (B, Tk)
        kv_slots = blocks * self.block_size + j % self.block_size  # (B, Tk)
        q_pos = (seq_lens - q_lens)[:, None] + i[None, :]  # (B, Tq) position of each query
        mask = (j[None, None, :] <= q_pos[:, :, None]) & (j[None, None, :] < seq_lens[:, None, None])
        mask |= ~q_valid[:, :, None] & (j == 0)[None, None, :]  # padded query rows see one key: no NaN
        self._ref.update(q_valid=q_valid, q_index=q_index, kv_slots=kv_slots, mask=mask.unsqueeze(1))
        return self._ref


class Attention(nn.Module):
    """Writes this step's k, v into the cache, then attends q over the cached context.

    Given the rotary embedding, it rotates q and k first; on the Triton path that rotation and the cache write
    are one launch.
    """

    def __init__(self, num_heads: int, head_dim: int, num_kv_heads: int, scale: float | None = None):
        super().__init__()
        self.num_heads, self.head_dim, self.num_kv_heads = num_heads, head_dim, num_kv_heads
        self.scale = scale if scale is not None else head_dim**-0.5
        self.kv_cache: torch.Tensor | None = None  # (2, num_blocks, block_size, nkv, D), bound by the runner
        self.use_triton = True  # the runner turns it off for attention_backend="torch"
        # An FP8 cache holds k / k_scale and v / v_scale: 0-dim fp32 tensors, changed only in place (a CUDA graph
        # reads them), from the checkpoint or computed on the first step (see quantization/kv_cache.py)
        self.register_buffer("k_scale", torch.ones((), dtype=torch.float32), persistent=False)
        self.register_buffer("v_scale", torch.ones((), dtype=torch.float32), persistent=False)
        self.calibrate_kv_scales = False  # the runner sets it for the first step of an FP8 cache without scales
        self.kv_scales_from_checkpoint = (False, False)  # (k, v) given by the checkpoint (kv_cache.apply_kv_scales)
        # V stored (num_blocks, nkv, D, block_size) in kv_cache[1]'s memory (SHARDLLM_KV_V_TRANSPOSED; the runner
        # sets it where the Triton kernels run): the TMA decode kernel then reads a V page as it reads K's
        self.v_transposed = False

    def paged_caches(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(k_cache, v_cache), each (num_blocks, block_size, nkv, D); with v_transposed, V is a view of
        kv_cache[1]'s memory laid out (num_blocks, nkv, D, block_size) (its D stride is block_size)."""
        k_cache, v_cache = self.kv_cache[0], self.kv_cache[1]
        if self.v_transposed:
            nb, bs, nkv, d = v_cache.shape
            v_cache = v_cache.view(nb, nkv, d, bs).permute(0, 3, 1, 2)
        return k_cache, v_cache

    def uses_triton_kernels(self, q: torch.Tensor) -> bool:
        """Whether forward takes the Triton kernels (CUDA only; the tests patch it to run them on CPU)."""
        return q.is_cuda and self.use_triton and triton_paged.HAS_TRITON

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                rotary: nn.Module | None = None, positions: torch.Tensor | None = None) -> torch.Tensor:
        """q: (N, nh * D), k, v: (N, nkv * D) -> (N, nh * D).

        With `rotary` (q, k = rotary(positions, q, k), as RotaryEmbedding), q and k are rotated first, in place
        where the kernels do it. A RotaryEmbedding that would take its Triton kernel is fused with the cache write.
        """
        n = q.shape[0]
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        assert rotary is None or positions is not None
        scaled = self.kv_cache.element_size() == 1  # FP8 cache: k, v stored divided by their scales
        if scaled and self.calibrate_kv_scales:
            calibrate_kv_scales_(self, k, v)
        softmax_scale = self.scale
        kernels = self.uses_triton_kernels(q)
        # The kernels take the scale tensors (read when they run: CUDA graphs see in-place updates): the writes
        # divide, the attention multiplies q.k by k_scale and the output by v_scale. The torch reference (and the
        # kernels with KV_SCALES_IN_KERNELS off) does the same in four elementwise ops (rotation is linear: k may
        # be scaled before it).
        scale_ops = scaled and not (kernels and KV_SCALES_IN_KERNELS)
        kv_scales = {"k_scale": self.k_scale, "v_scale": self.v_scale} if scaled and not scale_ops else {}
        if scale_ops:
            k, v, q = k / self.k_scale, v / self.v_scale, q * self.k_scale
        paged = self.paged_caches() if kernels else None  # (num_blocks, block_size, nkv, D) each
        fuse_rotary = (kernels and isinstance(rotary, RotaryEmbedding) and rotary.uses_kernel(q)
                       and _fused_rotary_ok[0])
        fused_decode = (fuse_rotary and n <= DECODE_FUSED_ROTARY and _fused_decode_ok[0] and meta.max_query_len == 1
                        and not scale_ops and triton_paged.decode_takes_new_kv(q, *paged))
        if fused_decode:  # rotary, the cache write and the attention in one launch
            try:
                out = triton_paged.paged_decode_attention(
                    q, *paged, meta.block_tables, meta.seq_lens, softmax_scale, **kv_scales,
                    new_kv=triton_paged.NewKV(k, v, positions, rotary.cos_sin_cache, meta.slot_mapping))
                return out.view(n, self.num_heads * self.head_dim)
            except Exception as e:  # a Triton build that cannot compile it: the two launches it replaces
                logger.warning("decode attention with the fused rotary + KV write failed (%s: %s); using separate "
                               "kernels", type(e).__name__, e)
                _fused_decode_ok[0] = False
        if fuse_rotary:  # rotary and the cache write of k and v in one launch
            tiled_v = V_T_TILED_WRITE and _tiled_v_ok[0] and self.v_transposed and meta.max_query_len > 1
            try:
                triton_ops.rotary_embedding_and_write_kv_(positions, q, k, v, rotary.cos_sin_cache, *paged,
                                                          meta.slot_mapping, **kv_scales, write_v=not tiled_v)
            except Exception as e:  # a Triton build that cannot compile it: the two kernels it replaces
                logger.warning("fused rotary + KV write failed (%s: %s); using separate kernels",
                               type(e).__name__, e)
                _fused_rotary_ok[0] = fuse_rotary = False
            if fuse_rotary and tiled_v:  # prompt chunks: v in tiles of consecutive slots (k is written, rotated)
                try:
                    triton_paged.write_v_transposed(v, paged[1], meta.slot_mapping, kv_scales.get("v_scale"))
                except Exception as e:  # the row store of k and v instead (k again: the same bytes)
                    logger.warning("tiled V^T write failed (%s: %s); storing v a token a row",
                                   type(e).__name__, e)
                    _tiled_v_ok[0] = False
                    triton_paged.write_kv_cache(k, v, *paged, meta.slot_mapping, **kv_scales)
        if rotary is not None and not fuse_rotary:
            q, k = rotary(positions, q, k)
        if kernels:
            if not fuse_rotary:
                triton_paged.write_kv_cache(k, v, *paged, meta.slot_mapping, **kv_scales)  # one launch for k, v
            nd = meta.num_decodes if MIXED_STEP_DECODE_KERNEL else 0
            ff = _flash_from(meta, nd, q, k)
            fresh = None if ff is None else _flash_part(q, k, v, meta, ff, softmax_scale)
            if fresh is not None:  # sequences [ff, B) took FlashAttention over their own k, v; the others here
                out = self._around_flash_part(fresh, q, paged, meta, nd, ff, softmax_scale, kv_scales)
            elif meta.max_query_len == 1:  # decode only: split over the KV length, graph-capturable
                out = triton_paged.paged_decode_attention(q, *paged, meta.block_tables, meta.seq_lens,
                                                          softmax_scale, **kv_scales)
            elif 0 < nd < meta.seq_lens.shape[0]:  # a mixed step: its leading decodes, then its chunks
                out = torch.empty(n, self.num_heads, self.head_dim, dtype=q.dtype, device=q.device)
                triton_paged.paged_decode_attention(q[:nd], *paged, meta.block_tables[:nd], meta.seq_lens[:nd],
                                                    softmax_scale, out=out[:nd], **kv_scales)
                triton_paged.paged_prefill_attention(q[nd:], *paged, meta.chunks_query_start_loc(),
                                                     meta.seq_lens[nd:], meta.block_tables[nd:], meta.max_query_len,
                                                     softmax_scale, out=out[nd:], **kv_scales)
            else:
                out = triton_paged.paged_prefill_attention(q, *paged, meta.query_start_loc, meta.seq_lens,
                                                           meta.block_tables, meta.max_query_len, softmax_scale,
                                                           **kv_scales)
        else:
            assert not self.v_transposed, "a transposed V cache is read by the Triton kernels only"
            k_cache = self.kv_cache[0].view(-1, self.num_kv_heads, self.head_dim)  # (slots, nkv, D)
            v_cache = self.kv_cache[1].view(-1, self.num_kv_heads, self.head_dim)
            for cache, x in ((k_cache, k), (v_cache, v)):  # an FP8 cache stores x.to(fp8): a scale of 1.0
                x = x.to(cache.dtype)
                if cache.element_size() == 1:  # CPU kernels lack FP8 index_copy_: copy the bytes
                    cache, x = cache.view(torch.uint8), x.view(torch.uint8)
                cache.index_copy_(0, meta.slot_mapping, x)
            out = paged_attention_reference(q, k_cache, v_cache, meta, softmax_scale)
        if scale_ops:
            out = out * self.v_scale
        return out.reshape(n, self.num_heads * self.head_dim)

    def _around_flash_part(self, fresh: torch.Tensor, q: torch.Tensor, paged: tuple, meta: AttentionMetadata,
                           nd: int, ff: int, softmax_scale: float, kv_scales: dict) -> torch.Tensor:
        """The step's attention output (N, nh, D) around `fresh`, the rows of sequences [ff, B) from _flash_part:
        rows of sequences [0, nd) from the decode kernel, of [nd, ff) from the prefill kernel over the cache, as
        forward's other cases run them."""
        host = meta.host_query_start_loc
        r_nd, r_ff = int(host[nd]), int(host[ff])
        if r_ff == 0:
            return fresh
        out = torch.empty(q.shape[0], self.num_heads, self.head_dim, dtype=q.dtype, device=q.device)
        out[r_ff:] = fresh
        if nd:
            triton_paged.paged_decode_attention(q[:nd], *paged, meta.block_tables[:nd], meta.seq_lens[:nd],
                                                softmax_scale, out=out[:nd], **kv_scales)
        if ff > nd:
            longest = int((host[nd + 1:ff + 1] - host[nd:ff]).max())
            qsl = meta.query_start_loc_from(nd, r_nd)[:ff - nd + 1]  # sequences [nd, ff)
            triton_paged.paged_prefill_attention(q[r_nd:r_ff], *paged, qsl,
                                                 meta.seq_lens[nd:ff], meta.block_tables[nd:ff], longest,
                                                 softmax_scale, out=out[r_nd:r_ff], **kv_scales)
        return out


def _flash_part(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata, ff: int,
                softmax_scale: float) -> torch.Tensor | None:
    """Attention of the rows of sequences [ff, B) over their own k, v through flash_prefill: (rows, nh, D), or None
    if its kernel raises RuntimeError (a torch that refuses these shapes), which turns it off for the process with a
    warning. q (N, nh, D), k, v (N, nkv, D), rotated."""
    global _flash_announced
    host = meta.host_query_start_loc
    r_ff = int(host[ff])
    longest = int((host[ff + 1:] - host[ff:-1]).max())
    try:
        fresh = flash_prefill.flash_prefill(q[r_ff:], k[r_ff:], v[r_ff:], meta.query_start_loc_from(ff, r_ff),
                                            longest, softmax_scale)
    except RuntimeError as e:
        logger.warning("FlashAttention prefill failed (%s); using the Triton prefill kernel", e)
        _flash_ok[0] = False
        return None
    if not _flash_announced:  # once per process: that the switch took effect
        _flash_announced = True
        print(f"shardllm: FlashAttention prefill took {len(host) - 1 - ff} of a step's {len(host) - 1} sequences "
              f"({q.shape[0] - r_ff} of {q.shape[0]} tokens)", file=sys.stderr, flush=True)
    return fresh


def _flash_from(meta: AttentionMetadata, nd: int, q: torch.Tensor, k: torch.Tensor) -> int | None:
    """The first sequence of a step's FlashAttention part (flash_prefill), or None where that part is empty or
    unknown, the step holds only decodes, or flash_prefill is not available here."""
    ff = meta.fresh_from
    if ff is None or meta.max_query_len == 1 or meta.host_query_start_loc is None:
        return None
    ff = max(ff, nd)
    if ff >= len(meta.host_query_start_loc) - 1 or not _flash_ok[0] or not flash_prefill.available(q, k):
        return None
    return ff


def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Plain torch: gather each sequence's context from the cache, pad, run masked SDPA, unpad."""
    ref = meta.reference_indices()

    def gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # x[index], index (B, T): (B, T, ...)
        raw = x.view(torch.uint8) if x.element_size() == 1 and x.dtype.is_floating_point else x  # FP8: bytes
        out = raw.index_select(0, index.reshape(-1)).view(*index.shape, *x.shape[1:])  # ~7x aten::index on CPU
        return out.view(x.dtype)

    qp = gather(q, ref["q_index"]).transpose(1, 2)  # (B, nh, Tq, D)
    kp = gather(k_cache, ref["kv_slots"]).transpose(1, 2).to(q.dtype)  # (B, nkv, Tk, D); FP8 cache read back
    vp = gather(v_cache, ref["kv_slots"]).transpose(1, 2).to(q.dtype)
    group = qp.shape[1] // kp.shape[1]
    if q.is_cuda and group > 1:  # CUDA's memory-efficient kernel takes a mask but not GQA: expand kv heads
        kp, vp = kp.repeat_interleave(group, dim=1), vp.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=ref["mask"], scale=scale,
                                         enable_gqa=qp.shape[1] != kp.shape[1])  # (B, nh, Tq, D)
    return out.transpose(1, 2)[ref["q_valid"]]  # (N, nh, D)
