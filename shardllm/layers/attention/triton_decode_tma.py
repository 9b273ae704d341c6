"""Paged decode attention whose K/V pages arrive by TMA (Hopper's tensor memory accelerator), one page a tile.

The pointer kernel (triton_paged._decode_kernel) forms a 64-bit address for every K/V element it loads; over an FP8
cache that per-element work, not the bytes, bounds it (1.7 TB/s on an H200, the same time per token as a bf16 cache).
Here a page's (block_size, D) slab of one kv head is one box of a tensor descriptor over the cache viewed as
(num_blocks x block_size, nkv, D): one TMA instruction a page, no address arithmetic per element. The scores and
the softmax are as in the pointer kernel (the same partitions, partials and reduce), so the two are interchangeable.

Needs: a cache laid out (num_blocks, block_size, nkv, D) contiguous, block_size a power of two in [16, 256],
num_blocks x block_size < 2**31, D a power of two with D x element size a multiple of 16 bytes, and a GPU with TMA
(sm90+) or the interpreter. `tma_supported` says whether a call qualifies;
paged_decode_attention falls back to the pointer kernel otherwise.
"""

from __future__ import annotations

import torch

from shardllm.layers.attention.triton_paged import HAS_TRITON, _decode_store, _jit, _split_len, tl
from shardllm.layers.pdl import pdl_enter
from shardllm.layers.triton_ops import finite_or_zero, neox_first, neox_second

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # an older Triton, or none
    TensorDescriptor = None


@_jit
def _page_step(q, k, v, tok0, end, m, l_sum, acc, qk_scale,
               BLOCK_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr, F16_DOT: tl.constexpr,
               V_T: tl.constexpr = False):
    """The online-softmax update of one page's (BLOCK_SIZE, D) K and V tiles: (m, l_sum, acc) after it.

    V_T: v is the page stored transposed, (D, BLOCK_SIZE) with tokens contiguous, which P.V reads as the scores read K
    (no shared-memory round trip of the converted tile, 128 registers instead of 165 at 64-token pages:
    benchmarks/kernel_ir.py). Its slots past `end` are not masked (a where on them costs that layout): they must hold
    finite values, zeros or stale ones, as p is 0 there."""
    k = k.to(q.dtype)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # (G, BLOCK_SIZE)
    if not F16_DOT:
        s = s * qk_scale
    valid = tok0 + tl.arange(0, BLOCK_SIZE) < end
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_sum = l_sum * alpha + tl.sum(p, 1)
    v = v.to(q.dtype)
    if V_T:
        v = tl.trans(v)
    else:
        if tok0 + BLOCK_SIZE > end:  # only a partition's last page has slots past `end`: p is 0 there, but the
            v = tl.where(valid[:, None], v, 0.0)  # slots hold stale or never-written bytes, and 0 x NaN is NaN
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_sum, acc


@_jit
def _two_page_step(q, k0, v0, k1, v1, tok0, end, m, l_sum, acc, qk_scale,
                   BLOCK_SIZE: tl.constexpr, DOT_PRECISION: tl.constexpr, F16_DOT: tl.constexpr):
    """_page_step over two consecutive pages (tokens tok0 .. tok0 + 2 x BLOCK_SIZE) with one softmax update: one
    running-max rescale of acc and l_sum for both (the per-page cost an FP8 page pays on half a bf16 page's bytes)."""
    k0 = k0.to(q.dtype)
    k1 = k1.to(q.dtype)
    s0 = tl.dot(q, tl.trans(k0), input_precision=DOT_PRECISION)  # (G, BLOCK_SIZE)
    s1 = tl.dot(q, tl.trans(k1), input_precision=DOT_PRECISION)
    if not F16_DOT:
        s0 = s0 * qk_scale
        s1 = s1 * qk_scale
    t = tok0 + tl.arange(0, BLOCK_SIZE)
    valid0 = t < end
    valid1 = t + BLOCK_SIZE < end
    s0 = tl.where(valid0[None, :], s0, float("-inf"))
    s1 = tl.where(valid1[None, :], s1, float("-inf"))
    m_new = tl.maximum(m, tl.maximum(tl.max(s0, 1), tl.max(s1, 1)))
    alpha = tl.exp2(m - m_new)
    p0 = tl.exp2(s0 - m_new[:, None])
    p1 = tl.exp2(s1 - m_new[:, None])
    l_sum = l_sum * alpha + tl.sum(p0, 1) + tl.sum(p1, 1)
    v0 = v0.to(q.dtype)
    v1 = v1.to(q.dtype)
    if tok0 + 2 * BLOCK_SIZE > end:  # the pair's slots past `end` (stale bytes, or the padding page 0): never NaN x 0
        v0 = tl.where(valid0[:, None], v0, 0.0)
        v1 = tl.where(valid1[:, None], v1, 0.0)
    acc = acc * alpha[:, None] + tl.dot(p0.to(v0.dtype), v0, input_precision=DOT_PRECISION)
    acc = acc + tl.dot(p1.to(v1.dtype), v1, input_precision=DOT_PRECISION)
    return m_new, l_sum, acc


@_jit
def _neox_rotated(ptr, row, heads, pos, cs_ptr, stride_cs, HEAD_DIM: tl.constexpr):
    """Rows `row + heads x 1` (heads: a column of offsets) of D elements, neox-rotated by the cos/sin row of `pos`
    (cos in [0, D/2), sin in [D/2, D)), in fp32 and rounded to the rows' dtype: what triton_ops' fused rotary kernel
    stores in place (the same fused multiply-adds, triton_ops.neox_first / neox_second, element by element)."""
    half: tl.constexpr = HEAD_DIM // 2
    d = tl.arange(0, HEAD_DIM)
    x = tl.load(ptr + row + heads + d[None, :]).to(tl.float32)
    xp = tl.load(ptr + row + heads + ((d + half) % HEAD_DIM)[None, :]).to(tl.float32)
    cos = tl.load(cs_ptr + pos * stride_cs + d % half).to(tl.float32)[None, :]
    sin = tl.load(cs_ptr + pos * stride_cs + half + d % half).to(tl.float32)[None, :]
    first = (d < half)[None, :]  # there x is x1 and xp x2; past it x is x2 and xp x1
    return tl.where(first, neox_first(x, xp, cos, sin), neox_second(xp, x, cos, sin)).to(ptr.dtype.element_ty)


@_jit
def _new_token_step(q, b, kvh, k_new_ptr, v_new_ptr, pos, cs_ptr, stride_cs, stride_kn, stride_kh, stride_vn,
                    stride_vh, slot_ptr, k_cache_ptr, v_cache_ptr, stride_kcb, stride_kcs, stride_kch, stride_vcb,
                    stride_vcs, stride_vch, stride_vcd, k_scale_ptr, v_scale_ptr, m, l_sum, acc, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, KV_SCALED: tl.constexpr,
                    F16_DOT: tl.constexpr, FINITE_V: tl.constexpr):
    """The step's own token of sequence b, kv head kvh (NEW_KV): its k rotated, k and v stored into its cache slot
    (slot < 0: not stored) as triton_ops' fused rotary + KV write stores them (k / k_scale, v / v_scale rounded
    once to the cache dtype; FINITE_V: a non-finite v as 0), and the stored values' score and value folded into the
    online softmax (m, l_sum, acc) as _page_step folds a cache tile's."""
    d = tl.arange(0, HEAD_DIM)
    k = _neox_rotated(k_new_ptr, b.to(tl.int64) * stride_kn, tl.zeros([1, 1], tl.int64) + kvh * stride_kh, pos,
                      cs_ptr, stride_cs, HEAD_DIM)  # (1, D)
    v = tl.load(v_new_ptr + b.to(tl.int64) * stride_vn + kvh * stride_vh + d)[None, :]
    if FINITE_V:
        v = finite_or_zero(v)
    if KV_SCALED:
        k = tl.div_rn(k.to(tl.float32), tl.load(k_scale_ptr)).to(k_cache_ptr.dtype.element_ty)
        v = tl.div_rn(v.to(tl.float32), tl.load(v_scale_ptr)).to(v_cache_ptr.dtype.element_ty)
    else:
        k = k.to(k_cache_ptr.dtype.element_ty)
        v = v.to(v_cache_ptr.dtype.element_ty)
    slot = tl.load(slot_ptr + b).to(tl.int64)
    page = slot // BLOCK_SIZE
    in_page = slot % BLOCK_SIZE
    ok = (d * 0 + slot >= 0)[None, :]  # a vector test, for the interpreter (as kv_write's)
    tl.store(k_cache_ptr + page * stride_kcb + in_page * stride_kcs + kvh * stride_kch + d[None, :], k, mask=ok)
    tl.store(v_cache_ptr + page * stride_vcb + in_page * stride_vcs + kvh * stride_vch + d[None, :] * stride_vcd, v,
             mask=ok)
    s = tl.sum(q.to(tl.float32) * k.to(q.dtype).to(tl.float32), 1)  # (G,): the tile's dot, fp32 sums
    if not F16_DOT:
        s = s * qk_scale
    m_new = tl.maximum(m, s)
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new)
    l_sum = l_sum * alpha + p
    pv = p.to(q.dtype).to(tl.float32)[:, None] * v.to(q.dtype).to(tl.float32)
    acc = acc * alpha[:, None] + pv
    return m_new, l_sum, acc


@_jit(do_not_specialize=["num_seqs", "stride_bt"])
def _decode_kernel_tma(
    q_ptr, k_desc, v_desc, block_tables_ptr, seq_lens_ptr, out_ptr, part_acc_ptr, part_ml_ptr,
    k_scale_ptr, v_scale_ptr, qk_scale, num_heads, num_seqs, stride_qb, stride_qh, stride_bt, stride_ob, stride_oh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    PAGES: tl.constexpr, NUM_SPLITS: tl.constexpr, DOT_PRECISION: tl.constexpr, KV_SCALED: tl.constexpr,
    F16_DOT: tl.constexpr, USE_PDL: tl.constexpr = False, PAGE_CHUNK: tl.constexpr = 0, PREFETCH: tl.constexpr = False,
    V_T: tl.constexpr = False, NEW_KV: tl.constexpr = False, k_new_ptr=None, v_new_ptr=None, pos_ptr=None,
    cs_ptr=None, stride_cs=0, stride_kn=0, stride_kh=0, stride_vn=0, stride_vh=0, slot_ptr=None, k_cache_ptr=None,
    v_cache_ptr=None, stride_kcb=0, stride_kcs=0, stride_kch=0, stride_vcb=0, stride_vcs=0, stride_vch=0,
    stride_vcd=0, FINITE_V: tl.constexpr = False,
):
    """One program per (sequence, kv head, partition), as _decode_kernel; a tile is PAGES whole pages (1 or 2:
    BLOCK_N = PAGES x BLOCK_SIZE, their loads issued before either's math; with PAGE_CHUNK, two pages share one
    softmax update), so partitions start on tile boundaries and a page needs one block-table entry. PREFETCH (without
    PAGE_CHUNK): each tile's page id is loaded an iteration ahead, so no load of the iteration feeds its TMA
    coordinate and Triton's pipeliner keeps num_stages - 1 tiles in flight (one without: benchmarks/kernel_ir.py).
    V_T (one page a tile, no PAGE_CHUNK): v_desc is over a V cache stored (num_blocks, nkv, D, BLOCK_SIZE), boxes
    (D, BLOCK_SIZE) (descriptor_vt), read by _page_step's V_T form.
    NEW_KV (rotary and the KV write fused in, TensorRT-LLM's masked-attention design): q_ptr holds q before its
    rotation; each program rotates its GROUP rows (by pos_ptr[b], cos/sin rows of cs_ptr), and the program whose
    partition holds the sequence's last position takes that token from k_new_ptr / v_new_ptr (rotating k) instead
    of the cache, stores it into the cache (slot_ptr[b]; k_cache_ptr / v_cache_ptr with the (num_blocks,
    block_size, nkv, D) view's strides) after its page loop, and folds it in (_new_token_step); the page loop ends
    before that position (its slot, masked, may hold the previous step's bytes)."""
    pdl_enter(USE_PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    split_len = _split_len(seq_len, NUM_SPLITS, BLOCK_SIZE * PAGES)
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, HEAD_DIM)
    head = kvh * GROUP + g
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    if NEW_KV:
        pos = tl.load(pos_ptr + b).to(tl.int64)
        heads = tl.where(g_mask, head, kvh * GROUP)[:, None] * stride_qh  # padding rows: a real row, unused
        q = _neox_rotated(q_ptr, b.to(tl.int64) * stride_qb, heads, pos, cs_ptr, stride_cs, HEAD_DIM)
        q = tl.where(g_mask[:, None], q, 0.0)
        new_at = seq_len - 1
        new_here = (start <= new_at) & (new_at < end)
        end = tl.minimum(end, new_at)  # the page loop stops before the step's own token
    else:
        q = tl.load(q_ptr + b * stride_qb + head[:, None] * stride_qh + d[None, :], mask=g_mask[:, None],
                    other=0.0)
    if KV_SCALED:
        qk_scale = qk_scale * tl.load(k_scale_ptr)
    if F16_DOT:
        q = (q.to(tl.float32) * qk_scale).to(tl.float16)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_sum = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    table = block_tables_ptr + b * stride_bt
    if PAGE_CHUNK > 0:  # page ids PAGE_CHUNK at a time into registers: no load feeds a TMA coordinate in the loop
        c = tl.arange(0, PAGE_CHUNK)
        end_page = (end + BLOCK_SIZE - 1) // BLOCK_SIZE
        for p0 in range(start // BLOCK_SIZE, end_page, PAGE_CHUNK):
            pages = tl.load(table + p0 + c, mask=p0 + c < end_page, other=0)
            for j in range(0, tl.minimum(PAGE_CHUNK, end_page - p0), PAGES):
                row0 = tl.sum(tl.where(c == j, pages, 0)) * BLOCK_SIZE
                k0 = k_desc.load([row0, kvh, 0]).reshape(BLOCK_SIZE, HEAD_DIM)
                v0 = v_desc.load([row0, kvh, 0]).reshape(BLOCK_SIZE, HEAD_DIM)
                if PAGES == 2:  # pairs never straddle a chunk (PAGE_CHUNK is even); past end_page: padding page 0
                    row1 = tl.sum(tl.where(c == j + 1, pages, 0)) * BLOCK_SIZE
                    k1 = k_desc.load([row1, kvh, 0]).reshape(BLOCK_SIZE, HEAD_DIM)
                    v1 = v_desc.load([row1, kvh, 0]).reshape(BLOCK_SIZE, HEAD_DIM)
                    m, l_sum, acc = _two_page_step(q, k0, v0, k1, v1, (p0 + j) * BLOCK_SIZE, end, m, l_sum, acc,
                                                   qk_scale, BLOCK_SIZE, DOT_PRECISION, F16_DOT)
                else:
                    m, l_sum, acc = _page_step(q, k0, v0, (p0 + j) * BLOCK_SIZE, end, m, l_sum, acc, qk_scale,
                                               BLOCK_SIZE, DOT_PRECISION, F16_DOT)
    nxt = tl.load(table + start // BLOCK_SIZE, mask=PREFETCH and start < end, other=0)
    for tok0 in range(start, end if PAGE_CHUNK == 0 else start, BLOCK_SIZE * PAGES):
        if PREFETCH:
            row0 = nxt * BLOCK_SIZE
            nxt = tl.load(table + tok0 // BLOCK_SIZE + PAGES, mask=tok0 + PAGES * BLOCK_SIZE < end, other=0)
        else:
            row0 = tl.load(table + tok0 // BLOCK_SIZE) * BLOCK_SIZE  # the page's first row of the (nb x bs) view
        k0 = k_desc.load([row0, kvh, 0]).reshape(BLOCK_SIZE, HEAD_DIM)
        if V_T:  # rows (page x nkv + kvh) x D .. + D of the (nb x nkv x D, bs) view
            vt = v_desc.load([(row0 // BLOCK_SIZE * tl.num_programs(1) + kvh) * HEAD_DIM, 0])
            m, l_sum, acc = _page_step(q, k0, vt, tok0, end, m, l_sum, acc, qk_scale, BLOCK_SIZE, DOT_PRECISION,
                                       F16_DOT, V_T=True)
        else:
            v0 = v_desc.load([row0, kvh, 0]).reshape(BLOCK_SIZE, HEAD_DIM)
            if PAGES == 2:  # the second page (the padding page 0 past the end: its slots are masked)
                row1 = tl.load(table + tok0 // BLOCK_SIZE + 1, mask=tok0 + BLOCK_SIZE < end, other=0) * BLOCK_SIZE
                k1 = k_desc.load([row1, kvh, 0]).reshape(BLOCK_SIZE, HEAD_DIM)
                v1 = v_desc.load([row1, kvh, 0]).reshape(BLOCK_SIZE, HEAD_DIM)
            m, l_sum, acc = _page_step(q, k0, v0, tok0, end, m, l_sum, acc, qk_scale, BLOCK_SIZE, DOT_PRECISION,
                                       F16_DOT)
            if PAGES == 2:
                m, l_sum, acc = _page_step(q, k1, v1, tok0 + BLOCK_SIZE, end, m, l_sum, acc, qk_scale, BLOCK_SIZE,
                                           DOT_PRECISION, F16_DOT)
    if NEW_KV:
        if new_here:
            m, l_sum, acc = _new_token_step(q, b, kvh, k_new_ptr, v_new_ptr, pos, cs_ptr, stride_cs, stride_kn,
                                            stride_kh, stride_vn, stride_vh, slot_ptr, k_cache_ptr, v_cache_ptr,
                                            stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
                                            stride_vcd, k_scale_ptr, v_scale_ptr, m, l_sum, acc, qk_scale, HEAD_DIM,
                                            BLOCK_SIZE, KV_SCALED, F16_DOT, FINITE_V)
    _decode_store(acc, m, l_sum, b, split, head, g_mask, d, d_mask, out_ptr, part_acc_ptr, part_ml_ptr, v_scale_ptr,
                  num_heads, num_seqs, stride_ob, stride_oh, HEAD_DIM, NUM_SPLITS, KV_SCALED)


def _nvidia_sm90(device: torch.device) -> bool:
    return torch.version.hip is None and torch.cuda.get_device_capability(device)[0] >= 9  # ROCm reports 9.x on MI300


def _page_sizes_ok(head_dim: int, block_size: int, itemsize: int) -> bool:
    """A page is one tile and one TMA box: a power-of-two head_dim of whole 16-byte rows, block_size a power of two
    (tl.arange) in [16, 256] (tl.dot; a box's dims are at most 256)."""
    return (head_dim == 1 << (head_dim - 1).bit_length() and head_dim * itemsize % 16 == 0
            and block_size == 1 << (block_size - 1).bit_length() and 16 <= block_size <= 256)


def tma_supported(q: torch.Tensor, cache: torch.Tensor) -> bool:
    """Whether this call can take the TMA kernel: see the module docstring."""
    if not HAS_TRITON or TensorDescriptor is None:
        return False
    if q.device.type == "cuda" and not _nvidia_sm90(q.device):
        return False
    nb, bs, nkv, d = cache.shape
    # TMA coordinates are int32, so the rows of the (nb x bs) view must fit in one
    return (_page_sizes_ok(d, bs, cache.element_size()) and nb * bs < 2**31
            and cache.stride() == (bs * nkv * d, nkv * d, d, 1) and cache.data_ptr() % 16 == 0)


def vt_layout_eligible(device: torch.device, head_dim: int, block_size: int, itemsize: int) -> bool:
    """Whether a KV cache of these sizes on `device` may store V transposed with every decode on the TMA path: an
    NVIDIA sm90+ GPU, the page sizes tma_supported takes, and pages of whole 16-byte rows (the conditions of
    tma_supported and vt_supported that no single call decides). Elsewhere the pointer kernel would read a
    transposed V byte by byte."""
    return (HAS_TRITON and TensorDescriptor is not None and device.type == "cuda" and _nvidia_sm90(device)
            and _page_sizes_ok(head_dim, block_size, itemsize) and block_size * itemsize % 16 == 0)


def vt_supported(q: torch.Tensor, k_cache: torch.Tensor, v_cache_t: torch.Tensor) -> bool:
    """Whether a call with V stored transposed can take the TMA kernel: K as tma_supported wants it, and v_cache_t
    (num_blocks, nkv, D, block_size) contiguous, of K's dtype and sizes, 16-byte aligned rows and base."""
    if not tma_supported(q, k_cache):
        return False
    nb, bs, nkv, d = k_cache.shape
    return (v_cache_t.shape == (nb, nkv, d, bs) and v_cache_t.dtype == k_cache.dtype and v_cache_t.is_contiguous()
            and bs * v_cache_t.element_size() % 16 == 0 and v_cache_t.data_ptr() % 16 == 0
            and nb * nkv * d < 2**31)


def descriptor_vt(v_cache_t: torch.Tensor):
    """A TMA descriptor over a V cache stored (num_blocks, nkv, D, block_size), viewed as (num_blocks x nkv x D,
    block_size), boxes of (D, block_size): one page of one kv head, tokens contiguous."""
    nb, nkv, d, bs = v_cache_t.shape
    return TensorDescriptor.from_tensor(v_cache_t.view(nb * nkv * d, bs), [d, bs])


def descriptor(cache: torch.Tensor):
    """A TMA descriptor over `cache` viewed as (num_blocks x block_size, nkv, D), boxes of (block_size, 1, D).

    Built per call (a few us of host time; a CUDA graph captures the launch once): the engine passes kv_cache[0] /
    kv_cache[1], new views each call, so nothing kept on the tensor would be found again.
    """
    nb, bs, nkv, d = cache.shape
    return TensorDescriptor.from_tensor(cache.view(nb * bs, nkv, d), [bs, 1, d])
