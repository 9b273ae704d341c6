"""The TMA decode kernel (layers/attention/triton_decode_tma.py): pages loaded by tensor descriptors give the same
attention as the pointer kernel and the fp32 oracle, under the interpreter on CPU (fp32 and FP8 caches, k/v scales,
one and several partitions, graph-padding rows of length 0) and on CUDA (gpu: bf16 and FP8 caches at Llama-3-8B
heads); calls it cannot serve fall back to the pointer kernel."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("triton")

from shardllm.layers.attention import triton_decode_tma  # noqa: E402
from shardllm.layers.attention.triton_paged import DecodeConfig, paged_decode_attention  # noqa: E402
from tests.layers.test_fp8_attention_f16_dot import fp8_case  # noqa: E402
from tests.layers.test_triton_attention import cpu, gpu, make_case, reference, run_decode  # noqa: E402

TMA = DecodeConfig(tma=True)


@pytest.fixture
def tma_launches(monkeypatch):
    """Counts launches of the TMA kernel (so a silent fallback cannot pass for it)."""
    calls = []
    kernel = triton_decode_tma._decode_kernel_tma

    class Counting:
        def __getitem__(self, grid):
            calls.append(grid)
            return kernel[grid]

    monkeypatch.setattr("shardllm.layers.attention.triton_paged._decode_kernel_tma", Counting())
    return calls


@cpu
@pytest.mark.parametrize("num_splits", [1, 4])
def test_tma_kernel_equals_the_oracle_fp32(tma_launches, num_splits):
    q, kc, vc, meta = make_case([1] * 4, [40, 17, 0, 1], 2, 4, 64, seed=11)  # a padding row of length 0
    got = run_decode(q, kc, vc, meta, num_splits=num_splits, config=TMA)
    assert len(tma_launches) == 1
    torch.testing.assert_close(got, reference(q, kc, vc, meta), atol=2e-5, rtol=1e-4)
    assert got[2].abs().max() == 0  # the empty sequence gives zeros, as the pointer kernel's


@cpu
@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3", "e5m2"])
@pytest.mark.parametrize("num_splits", [1, 2])
def test_tma_kernel_reads_an_fp8_cache_with_scales(monkeypatch, tma_launches, fp8, num_splits):
    monkeypatch.setenv("SHARDLLM_FP8_ATTN_F16_DOT", "1")  # the pointer kernel as the TMA one computes (and the
    # interpreter's bf16 widening of FP8 tiles is wrong, see test_fp8_attention_f16_dot.py)
    q, kc8, vc8, meta, ks, vs, deq = fp8_case(fp8, [1, 1, 1], [40, 17, 1], True, seed=12)
    got = run_decode(q, kc8, vc8, meta, num_splits=num_splits, config=TMA, k_scale=ks, v_scale=vs)
    assert len(tma_launches) == 1
    ref = reference(q, *deq, meta)
    assert (got.float() - ref).abs().max() < 1e-2 * ref.abs().max()
    pointer = run_decode(q, kc8, vc8, meta, num_splits=num_splits, k_scale=ks, v_scale=vs)
    torch.testing.assert_close(got, pointer, atol=1e-2, rtol=1e-2)


@cpu
def test_calls_the_tma_kernel_cannot_serve_take_the_pointer_kernel(tma_launches):
    q, kc, vc, meta = make_case([1, 1], [30, 5], 2, 4, 48, seed=13)  # head_dim 48: not a power of two
    assert not triton_decode_tma.tma_supported(q, kc)
    torch.testing.assert_close(run_decode(q, kc, vc, meta, config=TMA), reference(q, kc, vc, meta),
                               atol=2e-5, rtol=1e-4)
    q, kc, vc, meta = make_case([1, 1], [30, 5], 2, 4, 64, seed=14)
    kc_t = kc.transpose(1, 2).contiguous().transpose(1, 2)  # same values, another layout
    assert not triton_decode_tma.tma_supported(q, kc_t)
    torch.testing.assert_close(run_decode(q, kc_t, vc, meta, config=TMA), reference(q, kc, vc, meta),
                               atol=2e-5, rtol=1e-4)
    assert tma_launches == []


def test_tma_needs_the_dot():
    with pytest.raises(ValueError, match="use_dot"):
        DecodeConfig(tma=True, use_dot=False).validate()


@gpu
@pytest.mark.timeout(120)
@pytest.mark.parametrize("cache", [torch.bfloat16, torch.float8_e4m3fn], ids=["bf16", "e4m3"])
@pytest.mark.parametrize("batch", [1, 64, 512])
def test_gpu_tma_kernel_equals_the_pointer_kernel(tma_launches, cache, batch):
    lens = [int(x) for x in torch.randint(1, 400, (batch,), generator=torch.Generator().manual_seed(batch))]
    if cache == torch.bfloat16:
        q, kc, vc, meta = make_case([1] * batch, lens, 8, 4, 128, torch.bfloat16, "cuda", seed=batch)
        ks = vs = None
        ref = reference(q, kc, vc, meta)
    else:
        q, kc, vc, meta, ks, vs, deq = fp8_case(cache, [1] * batch, lens, True, "cuda", seed=batch, nkv=8, group=4,
                                                head_dim=128)
        ref = reference(q, *deq, meta)
    for ns in (None, 1, 8):
        got = run_decode(q, kc, vc, meta, num_splits=ns, config=DecodeConfig(tma=True, num_splits=None),
                         k_scale=ks, v_scale=vs)
        assert (got.float() - ref).abs().max() < 1e-2 * ref.abs().max()
    assert len(tma_launches) == 3


@cpu
def test_tma_kernel_ignores_nan_in_the_unused_tail_of_the_last_page(tma_launches):
    """A page is loaded whole: slots past seq_len (a freed page's stale values, NaN after an overflow) must not
    reach the output (p = 0 there, but 0 x NaN is NaN), as the pointer kernel's masked loads guarantee."""
    q, kc, vc, meta = make_case([1, 1], [20, 7], 2, 4, 64, seed=15)
    want = reference(q, kc, vc, meta)
    for b, n in enumerate(meta.seq_lens.tolist()):
        page, used = meta.block_tables[b, (n - 1) // 16], (n - 1) % 16 + 1
        kc[page, used:] = float("nan")
        vc[page, used:] = float("nan")
    for ns in (1, 2):
        got = run_decode(q, kc, vc, meta, num_splits=ns, config=TMA)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert len(tma_launches) == 2


@cpu
def test_tma_falls_back_for_pages_it_cannot_tile():
    """TMA tiles are whole pages: a block size that is not a power of two in [16, 256] (tl.arange's and a TMA
    box's limits) takes the pointer kernel instead of failing to compile."""
    q = torch.randn(1, 4, 64)
    for bs in (24, 512):
        assert not triton_decode_tma.tma_supported(q, torch.zeros(2, bs, 1, 64))
    assert triton_decode_tma.tma_supported(q, torch.zeros(2, 16, 1, 64))
    q, kc, vc, meta = make_case([1], [30], 1, 4, 64, seed=16)
    kc24, vc24 = (c.reshape(-1, 1, 64)[:48].reshape(2, 24, 1, 64) for c in (kc, vc))
    meta.block_tables[:] = torch.tensor([0, 1, 0])[:meta.block_tables.shape[1]]
    meta.block_size = 24
    got = run_decode(q, kc24, vc24, meta, config=TMA)
    torch.testing.assert_close(got, reference(q, kc24, vc24, meta), atol=2e-5, rtol=1e-4)


@cpu
@pytest.mark.parametrize("head_dim", [16, 256])
def test_tma_kernel_at_small_and_large_head_dims(tma_launches, head_dim):
    q, kc, vc, meta = make_case([1, 1], [33, 16], 1, 4, head_dim, seed=17)
    got = run_decode(q, kc, vc, meta, num_splits=2, config=TMA)
    assert len(tma_launches) == 1
    torch.testing.assert_close(got, reference(q, kc, vc, meta), atol=2e-5, rtol=1e-4)


@gpu
@pytest.mark.timeout(120)
@pytest.mark.parametrize("head_dim, cache", [(64, torch.bfloat16), (256, torch.bfloat16), (64, torch.float8_e5m2),
                                             (256, torch.float8_e4m3fn), (128, torch.float32)],
                         ids=["d64-bf16", "d256-bf16", "d64-e5m2", "d256-e4m3", "d128-fp32"])
def test_gpu_tma_kernel_other_head_dims_dtypes_and_a_nan_page_tail(tma_launches, head_dim, cache):
    """Head sizes 64 / 256 (a 512-byte row: several TMA messages a box), e5m2, fp32 q over an fp32 cache, and a
    NaN in the slots past seq_len of each last page (must not reach the output). Not yet run on a GPU."""
    lens = [1, 15, 16, 17, 250, 399]
    if cache.itemsize == 1:
        q, kc, vc, meta, ks, vs, deq = fp8_case(cache, [1] * len(lens), lens, True, "cuda", seed=3, nkv=4, group=4,
                                                head_dim=head_dim)
    else:
        q, kc, vc, meta = make_case([1] * len(lens), lens, 4, 4, head_dim, cache, "cuda", seed=3)
        ks = vs = None
        deq = (kc.float(), vc.float())
    ref = reference(q, *deq, meta)
    for b, n in enumerate(lens):
        page, used = int(meta.block_tables[b, (n - 1) // 16]), (n - 1) % 16 + 1
        if used < 16:
            kc[page, used:] = float("nan")  # (e4m3fn / e5m2 have NaN codes too)
            vc[page, used:] = float("nan")
    for ns in (1, 4):
        got = run_decode(q, kc, vc, meta, num_splits=ns, config=TMA, k_scale=ks, v_scale=vs)
        assert torch.isfinite(got).all()
        assert (got.float() - ref).abs().max() < 1e-2 * ref.abs().max()
    assert len(tma_launches) == 2


@gpu
@pytest.mark.timeout(120)
def test_gpu_tma_kernel_in_a_cuda_graph_and_over_a_recreated_cache(tma_launches):
    """The descriptor is encoded at launch (Triton fills the CUtensorMap on the host per call), so a captured
    launch replays over in-place updates of the cache and lengths; a cache tensor freed and allocated again (likely
    at the same address) gets a descriptor of its own. Views as the engine passes them: kv_cache[0], kv_cache[1].
    Not yet run on a GPU."""
    lens = [0, 1, 16, 17, 170, 1000, 0]
    q, kc, vc, meta = make_case([1] * len(lens), lens, 8, 4, 128, torch.bfloat16, "cuda", seed=21)
    kv = torch.stack([kc, vc])  # (2, nb, bs, nkv, D), as model_runner allocates it
    ref = reference(q, kc, vc, meta)
    live = meta.seq_lens.cpu() > 0
    got = run_decode(q, kv[0], kv[1], meta, config=TMA)
    assert (got.float()[live] - ref[live]).abs().max() < 1e-2 * ref.abs().max()
    out, seq_lens = torch.empty_like(q), meta.seq_lens.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # compiled by the eager call above
        paged_decode_attention(q, kv[0], kv[1], meta.block_tables, seq_lens, 128**-0.5, out=out, config=TMA)
    kv[1].mul_(-1)  # in place: the graph must see it
    seq_lens.copy_(torch.tensor([0, 1, 9, 17, 100, 999, 0], dtype=torch.int32))
    graph.replay()
    meta2 = dataclasses.replace(meta, seq_lens=seq_lens.clone(), max_seq_len=999, _ref={})
    ref2 = reference(q, kv[0], kv[1], meta2)
    live2 = seq_lens.cpu() > 0
    assert (out.float()[live2] - ref2[live2]).abs().max() < 1e-2 * ref2.abs().max()
    shape = kv.shape
    del kv
    kv2 = torch.randn(shape, device="cuda").to(torch.bfloat16)  # a new cache, maybe at the freed address
    ref3 = reference(q, kv2[0], kv2[1], meta)
    got3 = run_decode(q, kv2[0], kv2[1], meta, config=TMA)
    assert (got3.float()[live] - ref3[live]).abs().max() < 1e-2 * ref3.abs().max()
    assert len(tma_launches) == 3


@cpu
@pytest.mark.parametrize("num_splits", [1, 2, 4])
def test_two_pages_a_tile_equal_the_oracle(monkeypatch, tma_launches, num_splits):
    """block_n = 2 x block_size: two pages a tile (the second past the end on odd page counts), NaN in the unused
    slots of a partition's last pages kept out."""
    monkeypatch.setenv("SHARDLLM_FP8_ATTN_F16_DOT", "1")
    q, kc, vc, meta = make_case([1] * 5, [40, 17, 16, 1, 33], 2, 4, 64, seed=21)  # 3, 2, 1, 1, 3 pages
    ref = reference(q, kc, vc, meta)
    poisoned_k, poisoned_v = kc.clone(), vc.clone()
    for b, n in enumerate(meta.seq_lens.tolist()):  # every slot past a sequence's end, in its pages and page 0
        pages = meta.block_tables[b, : -(-n // 16)].tolist()
        for i, page in enumerate(pages):
            lo = n - 16 * i if i == len(pages) - 1 else 16
            poisoned_k[page, lo:] = float("nan")
            poisoned_v[page, lo:] = float("nan")
    poisoned_k[0], poisoned_v[0] = float("nan"), float("nan")
    got = run_decode(q, poisoned_k, poisoned_v, meta, num_splits=num_splits, config=DecodeConfig(tma=True, block_n=32))
    assert len(tma_launches) == 1
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)


@cpu
@pytest.mark.parametrize("num_splits", [1, 2])
@pytest.mark.parametrize("chunk", [2, 4])
def test_page_ids_in_chunks_give_the_same_attention(tma_launches, monkeypatch, num_splits, chunk):
    """page_chunk reads page ids `chunk` at a time (so the pipeliner can keep several pages in flight): the same
    result as one id a page, across chunk boundaries (7 pages at chunk 2: 4 chunks, the last one short), with an
    FP8 cache and scales, empty and one-token sequences."""
    monkeypatch.setenv("SHARDLLM_FP8_ATTN_F16_DOT", "1")
    q, kc8, vc8, meta, ks, vs, deq = fp8_case(torch.float8_e4m3fn, [1] * 4, [100, 17, 0, 1], True, seed=21)
    want = run_decode(q, kc8, vc8, meta, num_splits=num_splits, config=TMA, k_scale=ks, v_scale=vs)
    got = run_decode(q, kc8, vc8, meta, num_splits=num_splits, config=DecodeConfig(tma=True, page_chunk=chunk),
                     k_scale=ks, v_scale=vs)
    assert len(tma_launches) == 2
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    ref = reference(q, *deq, meta)
    assert (got.float() - ref).abs().max() < 1e-2 * ref.abs().max()


def test_page_chunk_needs_tma_and_a_power_of_two():
    for bad in (DecodeConfig(page_chunk=4), DecodeConfig(tma=True, page_chunk=3),
                DecodeConfig(tma=True, page_chunk=128)):
        with pytest.raises(ValueError, match="page_chunk"):
            bad.validate()
    DecodeConfig(tma=True, page_chunk=16).validate()


@cpu
@pytest.mark.parametrize("block_size", [32, 64])
def test_larger_pages_give_the_same_attention(tma_launches, monkeypatch, block_size):
    """KV blocks of 32 and 64 tokens (`--block_size`: one TMA box a page, 2-4x the bytes of a 16-token FP8 page):
    the TMA kernel, plain, with page ids in chunks and two pages a tile, equals the pointer kernel and the oracle
    over an FP8 cache."""
    import tests.layers.test_triton_attention as attn

    monkeypatch.setattr(attn, "BLOCK_SIZE", block_size)
    monkeypatch.setenv("SHARDLLM_FP8_ATTN_F16_DOT", "1")
    q, kc8, vc8, meta, ks, vs, deq = fp8_case(torch.float8_e4m3fn, [1] * 4, [150, 33, 0, 64], True, seed=5)
    assert kc8.shape[1] == block_size
    pointer = run_decode(q, kc8, vc8, meta, num_splits=2, k_scale=ks, v_scale=vs)
    pairs = 2 * block_size  # two pages a tile; with page_chunk, one softmax update for both
    for cfg in (TMA, DecodeConfig(tma=True, page_chunk=2), DecodeConfig(tma=True, block_n=pairs),
                DecodeConfig(tma=True, block_n=pairs, page_chunk=2)):
        got = run_decode(q, kc8, vc8, meta, num_splits=2, config=cfg, k_scale=ks, v_scale=vs)
        torch.testing.assert_close(got.float(), pointer.float(), atol=2e-2, rtol=2e-2)
    assert len(tma_launches) == 4
    ref = reference(q, *deq, meta)
    assert (got.float() - ref).abs().max() < 1e-2 * ref.abs().max()


@pytest.mark.parametrize("block_size", [32, 64])
def test_page_ids_an_iteration_ahead_give_the_same_attention(tma_launches, monkeypatch, block_size):
    """prefetch_pages (each page id loaded an iteration ahead; the 64-token table entries), at 2 to 4 stages and with
    several partitions: equal to the table's earlier launch and to the oracle over an FP8 cache; the padding page
    holds NaN, never read (the id past a partition's last page is masked)."""
    import tests.layers.test_triton_attention as attn

    monkeypatch.setattr(attn, "BLOCK_SIZE", block_size)
    monkeypatch.setenv("SHARDLLM_FP8_ATTN_F16_DOT", "1")
    q, kc8, vc8, meta, ks, vs, deq = fp8_case(torch.float8_e4m3fn, [1] * 4, [150, 33, 0, 70], True, seed=7)
    kc8[0] = float("nan")
    vc8[0] = float("nan")
    ref = reference(q, *deq, meta)
    for num_splits in (1, 2):
        plain = run_decode(q, kc8, vc8, meta, num_splits=num_splits, config=TMA, k_scale=ks, v_scale=vs)
        for stages in (2, 3, 4):
            cfg = DecodeConfig(tma=True, num_warps=2, num_stages=stages, prefetch_pages=True)
            got = run_decode(q, kc8, vc8, meta, num_splits=num_splits, config=cfg, k_scale=ks, v_scale=vs)
            assert not got.isnan().any(), cfg
            torch.testing.assert_close(got.float(), plain.float(), atol=1e-2, rtol=1e-2)
            assert (got.float() - ref).abs().max() < 1e-2 * ref.abs().max()
    assert len(tma_launches) == 8


@pytest.mark.parametrize("block_size", [16, 64])
def test_a_transposed_v_cache_gives_the_same_attention(tma_launches, monkeypatch, block_size):
    """v_transposed: V stored (num_blocks, nkv, D, block_size) and read by _page_step's V_T form (no mask past a
    sequence's end, so slots there hold finite stale values here), with and without page ids an iteration ahead,
    one to four partitions and a padding row of length 0: equal to the standard layout and to the oracle over an FP8
    cache."""
    import tests.layers.test_triton_attention as attn

    monkeypatch.setattr(attn, "BLOCK_SIZE", block_size)
    monkeypatch.setenv("SHARDLLM_FP8_ATTN_F16_DOT", "1")
    q, kc8, vc8, meta, ks, vs, deq = fp8_case(torch.float8_e4m3fn, [1] * 4, [150, 33, 0, 70], True, seed=9)
    vc8_t = vc8.permute(0, 2, 3, 1).contiguous()  # (nb, nkv, D, bs)
    ref = reference(q, *deq, meta)
    for num_splits in (1, 4):
        plain = run_decode(q, kc8, vc8, meta, num_splits=num_splits, config=TMA, k_scale=ks, v_scale=vs)
        for prefetch in (False, True):
            cfg = DecodeConfig(tma=True, num_warps=2, num_stages=3, prefetch_pages=prefetch)
            got = run_decode(q, kc8, vc8_t, meta, num_splits=num_splits, config=cfg, k_scale=ks, v_scale=vs,
                             v_transposed=True)
            torch.testing.assert_close(got.float(), plain.float(), atol=1e-2, rtol=1e-2)
            assert (got.float() - ref).abs().max() < 1e-2 * ref.abs().max()
            assert got[2].abs().max() == 0
    assert len(tma_launches) == 6


def test_a_transposed_v_cache_needs_the_tma_page_loop():
    q, kc, vc, meta = make_case([1, 1], [30, 5], 2, 4, 64, seed=15)
    vc_t = vc.permute(0, 2, 3, 1).contiguous()
    for cfg in (DecodeConfig(), DecodeConfig(tma=True, page_chunk=4), DecodeConfig(tma=True, block_n=32)):
        with pytest.raises(ValueError, match="v_transposed"):
            run_decode(q, kc, vc_t, meta, config=cfg, v_transposed=True)
    with pytest.raises(ValueError, match="v_transposed"):  # the standard layout passed as transposed
        run_decode(q, kc, vc, meta, config=TMA, v_transposed=True)


@cpu
@pytest.mark.parametrize("num_splits", [1, 2, 4])
@pytest.mark.parametrize("chunk", [2, 4])
def test_two_pages_a_softmax_update_give_the_same_attention(tma_launches, monkeypatch, num_splits, chunk):
    """page_chunk with block_n = 2 x block_size: pairs of pages share one softmax update (an odd page count pairs
    the last page with the padding page 0, whose slots are masked; NaN there must not leak). Equal to one page a
    step within fp32 rounding, and to the oracle within FP8's."""
    monkeypatch.setenv("SHARDLLM_FP8_ATTN_F16_DOT", "1")
    q, kc8, vc8, meta, ks, vs, deq = fp8_case(torch.float8_e4m3fn, [1] * 5, [100, 17, 0, 1, 48], True, seed=23)
    kc8[0] = float("nan")  # the padding page: never read into a result
    vc8[0] = float("nan")
    one = run_decode(q, kc8, vc8, meta, num_splits=num_splits, config=DecodeConfig(tma=True, page_chunk=chunk),
                     k_scale=ks, v_scale=vs)
    two = run_decode(q, kc8, vc8, meta, num_splits=num_splits,
                     config=DecodeConfig(tma=True, page_chunk=chunk, block_n=2 * kc8.shape[1]), k_scale=ks, v_scale=vs)
    assert len(tma_launches) == 2 and not two.isnan().any()
    torch.testing.assert_close(two.float(), one.float(), atol=1e-2, rtol=1e-2)
    ref = reference(q, *deq, meta)
    assert (two.float() - ref).abs().max() < 1e-2 * ref.abs().max()


def test_table_entries_on_larger_pages_drop_page_chunk_and_deep_stages(monkeypatch):
    """The table was swept on 16-token pages: on 32- and 64-token pages (the FP8 cache's GPU default is 64) a TMA
    entry runs with page_chunk 0 and at most 4 stages (unset: Triton's default), the best of the measured rows; other
    entries are unchanged."""
    from shardllm.layers.attention import decode_configs as dc

    monkeypatch.setattr(dc, "DECODE_CONFIGS", {"fp8_e4m3/128/64": {"block_n": 32, "prefetch_pages": True},
                                               "fp8_e4m3/128/256": {"num_stages": 6, "num_warps": 2,
                                                                     "page_chunk": 32, "tma": True},
                                               "fp8_e4m3/128/512": {"num_warps": 2, "page_chunk": 16, "tma": True}})
    monkeypatch.setattr(dc, "_config_cache", {})
    fp8 = torch.float8_e4m3fn
    assert dc.decode_config(200, 128, fp8) == DecodeConfig(num_stages=6, num_warps=2, page_chunk=32, tma=True)
    assert dc.decode_config(200, 128, fp8, 16) == dc.decode_config(200, 128, fp8)
    for bs in (32, 64):
        assert dc.decode_config(200, 128, fp8, bs) == DecodeConfig(num_stages=4, num_warps=2, tma=True)
        assert dc.decode_config(512, 128, fp8, bs) == DecodeConfig(num_warps=2, tma=True)  # unset stages stay unset
        assert dc.decode_config(8, 128, fp8, bs) == DecodeConfig(block_n=32, prefetch_pages=True)  # pointer kernel


@cpu
@pytest.mark.parametrize("cfg", [DecodeConfig(block_n=32, early_v=True, num_stages=4, prefetch_pages=True),
                                 DecodeConfig(block_n=32)], ids=["bn32-prefetch-earlyv", "bn32"])
def test_pointer_kernel_tiles_smaller_than_a_page(monkeypatch, cfg):
    """The table's pointer-kernel entries (32-token tiles) on 64-token pages, the FP8 cache's GPU default: a tile
    is half a page, so two tiles share a page id; equal to the oracle within FP8's error."""
    import tests.layers.test_triton_attention as attn

    monkeypatch.setattr(attn, "BLOCK_SIZE", 64)
    monkeypatch.setenv("SHARDLLM_FP8_ATTN_F16_DOT", "1")
    q, kc8, vc8, meta, ks, vs, deq = fp8_case(torch.float8_e4m3fn, [1] * 4, [150, 33, 0, 64], True, seed=6)
    assert kc8.shape[1] == 64
    got = run_decode(q, kc8, vc8, meta, num_splits=2, config=cfg, k_scale=ks, v_scale=vs)
    ref = reference(q, *deq, meta)
    assert (got.float() - ref).abs().max() < 1e-2 * ref.abs().max()
    assert got[2].abs().max() == 0
