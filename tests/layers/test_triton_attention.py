"""Triton paged attention against the torch reference: fp32 under the interpreter on CPU, bf16 on CUDA."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from shardllm.layers.attention import triton_paged  # noqa: E402
from shardllm.layers.attention.attention import AttentionMetadata, paged_attention_reference  # noqa: E402
from shardllm.layers.attention.triton_paged import (  # noqa: E402
    paged_decode_attention,
    paged_prefill_attention,
    write_kv_cache,
)

# Whether the kernels were built for the interpreter: TRITON_INTERPRET=1 must be set before triton_paged is
# first imported (tests/layers/conftest.py does it when this directory is collected first).
INTERPRET = isinstance(triton_paged._decode_kernel, InterpretedFunction)
cpu = pytest.mark.skipif(not INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1 before triton_paged's import")
BLOCK_SIZE = 16


def gpu(fn):
    skip = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET, reason="needs CUDA, no interpreter")
    return pytest.mark.gpu(skip(fn))


def make_case(q_lens, seq_lens, num_kv_heads, group, head_dim, dtype=torch.float32, device="cpu", seed=0,
              spare_blocks=3):
    """Random q and a random paged cache; each sequence's blocks are scattered (block 0 is padding).

    Returns q (N, nh, D), k_cache, v_cache (num_blocks, block_size, nkv, D) and the step's AttentionMetadata.
    """
    g = torch.Generator().manual_seed(seed)
    bs = BLOCK_SIZE
    blocks_per_seq = [-(-s // bs) for s in seq_lens]
    num_blocks = 1 + sum(blocks_per_seq) + spare_blocks
    ids = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()
    max_blocks = max(max(blocks_per_seq), 1) + 1  # a wider table than needed, as a runner pads it
    block_tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.int32)
    for b, n in enumerate(blocks_per_seq):
        block_tables[b, :n] = torch.tensor(ids[:n], dtype=torch.int32)
        del ids[:n]
    slots = []
    for b, (ql, sl) in enumerate(zip(q_lens, seq_lens)):
        for p in range(sl - ql, sl):
            slots.append(int(block_tables[b, p // bs]) * bs + p % bs)
    num_heads = num_kv_heads * group
    shape = (num_blocks, bs, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=g).to(device, dtype)
    v_cache = torch.randn(shape, generator=g).to(device, dtype)
    q = torch.randn(sum(q_lens), num_heads, head_dim, generator=g).to(device, dtype)
    qsl = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    qsl[1:] = torch.cumsum(torch.tensor(q_lens), 0)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device), query_start_loc=qsl.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device), block_tables=block_tables.to(device),
        max_query_len=max(q_lens), max_seq_len=max(seq_lens), block_size=bs)
    return q, k_cache, v_cache, meta


def reference(q, k_cache, v_cache, meta) -> torch.Tensor:
    """The torch oracle in fp32 on the same (possibly bf16) values."""
    nkv, d = k_cache.shape[2:]
    f = lambda t: t.float().reshape(-1, nkv, d)
    return paged_attention_reference(q.float(), f(k_cache), f(v_cache), meta, d**-0.5)


def run_decode(q, k_cache, v_cache, meta, **kw) -> torch.Tensor:
    return paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.seq_lens, q.shape[-1] ** -0.5, **kw)


def run_prefill(q, k_cache, v_cache, meta) -> torch.Tensor:
    return paged_prefill_attention(q, k_cache, v_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables,
                                   meta.max_query_len, q.shape[-1] ** -0.5)


# (num_kv_heads, group, head_dim): GQA ratios 1 / 4 / 8, head sizes 64 / 128, few programs for the interpreter
HEADS = [(2, 1, 64), (2, 4, 128), (1, 8, 64), (1, 8, 128)]
HEAD_IDS = ["mha-d64", "gqa4-d128", "gqa8-d64", "gqa8-d128"]


# ---- CPU, fp32, Triton interpreter -------------------------------------------------------------------------------


@cpu
@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_ragged_lengths(heads, num_splits):
    seq_lens = [1, 16, 17, 100]  # one token, a full block, one past a block, several blocks
    q, kc, vc, meta = make_case([1] * len(seq_lens), seq_lens, *heads)
    torch.testing.assert_close(run_decode(q, kc, vc, meta, num_splits=num_splits), reference(q, kc, vc, meta),
                               atol=2e-5, rtol=1e-4)


@cpu
def test_decode_many_partitions_long_context_and_default_splits():
    q, kc, vc, meta = make_case([1, 1], [300, 129], 2, 4, 64, seed=1)
    ref = reference(q, kc, vc, meta)
    torch.testing.assert_close(run_decode(q, kc, vc, meta, num_splits=8), ref, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(run_decode(q, kc, vc, meta), ref, atol=2e-5, rtol=1e-4)


@cpu
@pytest.mark.parametrize("num_splits", [1, 2])
def test_decode_padding_rows_give_zeros_and_out_is_filled(num_splits):
    """Graph padding: rows with seq_len 0 and an all-zero block table must not disturb the others."""
    q, kc, vc, meta = make_case([1, 1], [40, 5], 2, 4, 64, seed=2)
    qp = torch.cat([q, torch.randn_like(q)])
    seq_lens = torch.cat([meta.seq_lens, torch.zeros(2, dtype=torch.int32)])
    tables = torch.cat([meta.block_tables, torch.zeros_like(meta.block_tables)])
    out = torch.full_like(qp, float("nan"))
    res = paged_decode_attention(qp, kc, vc, tables, seq_lens, 64**-0.5, out=out, num_splits=num_splits)
    assert res is out
    torch.testing.assert_close(out[:2], reference(q, kc, vc, meta), atol=2e-5, rtol=1e-4)
    assert torch.equal(out[2:], torch.zeros_like(out[2:]))


@cpu
def test_decode_strided_q_from_fused_qkv():
    q, kc, vc, meta = make_case([1, 1, 1], [33, 2, 48], 2, 4, 64, seed=3)
    qkv = torch.randn(3, (8 + 2 * 2) * 64)
    qkv[:, : 8 * 64] = q.reshape(3, -1)
    q_view = qkv[:, : 8 * 64].view(3, 8, 64)  # row stride 768, not 512
    torch.testing.assert_close(run_decode(q_view, kc, vc, meta, num_splits=2), reference(q, kc, vc, meta),
                               atol=2e-5, rtol=1e-4)


PREFILL_CASES = {
    # q_lens, seq_lens
    "prefill-ragged": ([5, 33, 1], [5, 33, 1]),
    "chunked-with-context": ([7, 20], [40, 55]),  # chunks after 33 and 35 cached tokens
    "prefix-hit-one-block": ([17], [33]),  # a whole block cached, the chunk crosses the next boundary
    "mixed-decode-rows": ([1, 18, 1, 1], [17, 50, 64, 1]),
}


@cpu
@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("case", list(PREFILL_CASES), ids=list(PREFILL_CASES))
def test_prefill_against_reference(heads, case):
    q_lens, seq_lens = PREFILL_CASES[case]
    q, kc, vc, meta = make_case(q_lens, seq_lens, *heads, seed=4)
    torch.testing.assert_close(run_prefill(q, kc, vc, meta), reference(q, kc, vc, meta), atol=2e-5, rtol=1e-4)


@cpu
def test_prefill_long_chunk_spans_several_query_tiles():
    q, kc, vc, meta = make_case([150, 3], [150, 70], 2, 1, 64, seed=5)  # 128-token tiles: 2 for the first
    torch.testing.assert_close(run_prefill(q, kc, vc, meta), reference(q, kc, vc, meta), atol=2e-5, rtol=1e-4)


@cpu
def test_prefill_decode_batch_equals_decode_kernel():
    q, kc, vc, meta = make_case([1, 1, 1], [9, 31, 80], 1, 8, 128, seed=6)
    torch.testing.assert_close(run_prefill(q, kc, vc, meta), run_decode(q, kc, vc, meta, num_splits=2),
                               atol=2e-5, rtol=1e-4)


@cpu
def test_write_kv_cache_equals_index_copy_and_skips_negative_slots():
    nkv, d, n = 2, 64, 6
    kc = torch.randn(5, BLOCK_SIZE, nkv, d)
    vc = torch.randn_like(kc)
    qkv = torch.randn(n, (4 + 2 * nkv) * d)  # k, v as strided views of a fused projection
    k = qkv[:, 4 * d: (4 + nkv) * d].view(n, nkv, d)
    v = qkv[:, (4 + nkv) * d:].view(n, nkv, d)
    slots = torch.tensor([17, 3, 79, 40, -1, 16])
    k_ref, v_ref = kc.clone().view(-1, nkv, d), vc.clone().view(-1, nkv, d)
    keep = slots >= 0
    k_ref.index_copy_(0, slots[keep], k[keep])
    v_ref.index_copy_(0, slots[keep], v[keep])
    write_kv_cache(k, v, kc, vc, slots)
    assert torch.equal(kc.view(-1, nkv, d), k_ref) and torch.equal(vc.view(-1, nkv, d), v_ref)


# ---- CUDA, bf16 --------------------------------------------------------------------------------------------------

GPU_HEADS = [(8, 1, 64), (8, 4, 128), (8, 8, 128), (2, 8, 64), (4, 4, 64)]


@gpu
@pytest.mark.parametrize("heads", GPU_HEADS)
@pytest.mark.parametrize("num_splits", [None, 1, 4, 32])
@pytest.mark.parametrize("seed", [0, 1])
def test_gpu_decode_bf16(heads, num_splits, seed):
    g = torch.Generator().manual_seed(100 + seed)
    seq_lens = [1, 16, 17, 1000, 4097] + torch.randint(1, 3000, (27,), generator=g).tolist()
    q, kc, vc, meta = make_case([1] * len(seq_lens), seq_lens, *heads, torch.bfloat16, "cuda", seed)
    out = run_decode(q, kc, vc, meta, num_splits=num_splits)
    torch.testing.assert_close(out.float(), reference(q, kc, vc, meta), atol=2e-2, rtol=2e-2)


@gpu
@pytest.mark.parametrize("heads", GPU_HEADS)
@pytest.mark.parametrize("case", ["prefill", "chunked", "mixed"])
def test_gpu_prefill_bf16(heads, case):
    g = torch.Generator().manual_seed(7)
    if case == "prefill":
        q_lens = [1, 16, 17, 500, 1031] + torch.randint(1, 300, (11,), generator=g).tolist()
        seq_lens = q_lens
    elif case == "chunked":
        q_lens = [512, 256, 37]
        seq_lens = [2048, 256 + 999, 37 + 16]
    else:
        q_lens = [300] + [1] * 40
        seq_lens = [700] + torch.randint(1, 2000, (40,), generator=g).tolist()
    q, kc, vc, meta = make_case(q_lens, seq_lens, *heads, torch.bfloat16, "cuda", seed=8)
    torch.testing.assert_close(run_prefill(q, kc, vc, meta).float(), reference(q, kc, vc, meta),
                               atol=2e-2, rtol=2e-2)


@gpu
def test_gpu_write_kv_cache_bf16():
    nkv, d, n = 8, 128, 300
    kc = torch.randn(64, BLOCK_SIZE, nkv, d, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    k, v = torch.randn(2, n, nkv, d, device="cuda", dtype=torch.bfloat16)
    slots = torch.randperm(64 * BLOCK_SIZE, device="cuda")[:n]
    k_ref, v_ref = kc.clone().view(-1, nkv, d), vc.clone().view(-1, nkv, d)
    k_ref.index_copy_(0, slots, k)
    v_ref.index_copy_(0, slots, v)
    write_kv_cache(k, v, kc, vc, slots)
    assert torch.equal(kc.view(-1, nkv, d), k_ref) and torch.equal(vc.view(-1, nkv, d), v_ref)


@gpu
@pytest.mark.parametrize("num_splits", [1, 8])
def test_gpu_decode_cuda_graph_replay_with_new_lengths(num_splits):
    """Capture once at the largest shapes; replays with other seq_lens/tables/q in the same buffers match."""
    batch, max_ctx = 8, 2048
    q, kc, vc, meta = make_case([1] * batch, [max_ctx] * batch, 8, 4, 128, torch.bfloat16, "cuda", seed=9)
    static_q, static_lens, static_tables = q.clone(), meta.seq_lens.clone(), meta.block_tables.clone()
    out = torch.empty_like(q)
    scale = 128**-0.5

    def step():
        paged_decode_attention(static_q, kc, vc, static_tables, static_lens, scale, out=out, num_splits=num_splits)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up compiles outside the capture
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    g = torch.Generator().manual_seed(10)
    for trial in range(4):
        lens = torch.randint(1, max_ctx + 1, (batch,), generator=g).tolist()
        if trial == 3:
            lens[-2:] = [0, 0]  # padded rows of a bucket
        perm = torch.randperm(batch, generator=g).tolist()
        static_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        static_tables.copy_(meta.block_tables[perm])  # other sequences' blocks, same buffer
        static_q.copy_(torch.randn(q.shape, generator=g).to(q))
        graph.replay()
        torch.cuda.synchronize()
        live = [i for i, n in enumerate(lens) if n > 0]
        step_meta = AttentionMetadata(
            slot_mapping=meta.slot_mapping, query_start_loc=torch.arange(len(live) + 1, dtype=torch.int32,
                                                                         device="cuda"),
            seq_lens=static_lens[live], block_tables=static_tables[live], max_query_len=1,
            max_seq_len=max(lens), block_size=BLOCK_SIZE)
        torch.testing.assert_close(out[live].float(), reference(static_q[live], kc, vc, step_meta),
                                   atol=2e-2, rtol=2e-2)
        assert torch.equal(out[len(live):], torch.zeros_like(out[len(live):]))
