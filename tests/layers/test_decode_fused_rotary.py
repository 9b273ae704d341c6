"""The TMA decode kernel with the rotary and the KV write fused in (paged_decode_attention(new_kv=...),
triton_decode_tma's NEW_KV): against the two launches it replaces (triton_ops.rotary_embedding_and_write_kv_, then
the decode kernel over the written cache), the caches hold the same bytes and the attention matches; under the
interpreter on CPU (fp32 and scaled FP8 caches, V standard and transposed, one and several partitions, a padding
row, a sequence holding only its new token) and on CUDA (gpu: Llama-3-8B heads)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from shardllm.layers import triton_ops  # noqa: E402
from shardllm.layers.attention import triton_paged  # noqa: E402
from shardllm.layers.attention.triton_paged import DecodeConfig, NewKV, paged_decode_attention  # noqa: E402
from shardllm.layers.rotary import RotaryEmbedding  # noqa: E402
from tests.layers.test_fp8_attention_f16_dot import fp8_case  # noqa: E402
from tests.layers.test_triton_attention import cpu, gpu, make_case  # noqa: E402

TMA = DecodeConfig(tma=True, num_warps=2, num_stages=3, prefetch_pages=True)


def _step(q, kc, vc, meta, seed, device="cpu"):
    """The step's new raw k, v (B, nkv, D) in q's dtype, positions (the last context position) and a rotary."""
    g = torch.Generator().manual_seed(seed)
    b, nkv, d = q.shape[0], kc.shape[2], q.shape[2]
    k = (torch.randn(b, nkv, d, generator=g) * 2).to(device, q.dtype)
    v = torch.randn(b, nkv, d, generator=g).to(device, q.dtype)
    positions = (meta.seq_lens.long() - 1).clamp(min=0)
    rotary = RotaryEmbedding(d, 4096, 500000.0).to(device)
    return k, v, positions, rotary.cos_sin_cache


def _both(q, kc, vc, meta, new, num_splits, v_t=False, config=TMA, **kv):
    """(unfused out, fused out, caches after each): the two-launch path and the fused one from equal caches."""
    k, v, positions, cs = new
    kc1, vc1, kc2, vc2 = kc.clone(), vc.clone(), kc.clone(), vc.clone()
    view = (lambda c: c.view(c.shape[0], c.shape[2], c.shape[3], c.shape[1]).permute(0, 3, 1, 2)) if v_t else (
        lambda c: c)
    q1, k1 = q.clone(), k.clone()
    triton_ops.rotary_embedding_and_write_kv_(positions, q1, k1, v, cs, kc1, view(vc1), meta.slot_mapping, **kv)
    ref = paged_decode_attention(q1, kc1, view(vc1), meta.block_tables, meta.seq_lens, q.shape[-1] ** -0.5,
                                 num_splits=num_splits, config=config, **kv)
    q2, k2 = q.clone(), k.clone()
    got = paged_decode_attention(q2, kc2, view(vc2), meta.block_tables, meta.seq_lens, q.shape[-1] ** -0.5,
                                 num_splits=num_splits, config=config, new_kv=NewKV(k2, v, positions, cs,
                                                                                  meta.slot_mapping), **kv)
    assert torch.equal(q2, q) and torch.equal(k2, k)  # the fused call rotates in registers only
    return ref, got, (kc1, vc1), (kc2, vc2)


def _same_bytes(a, b):
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.element_size() == 1 else torch.equal(a, b)


@cpu
@pytest.mark.parametrize("config", [TMA, DecodeConfig(tma=True), DecodeConfig(tma=True, page_chunk=2),
                                    DecodeConfig(tma=True, block_n=32), DecodeConfig(tma=True, block_n=32,
                                                                                     page_chunk=4)],
                         ids=["prefetch", "plain", "page_chunk", "two_pages", "two_pages_chunked"])
@pytest.mark.parametrize("num_splits", [1, 4])
def test_fused_equals_rotary_write_then_decode_fp32(num_splits, config):
    """Every page loop of the TMA kernel (page ids ahead, plain, in chunks, two pages a tile with one or two softmax
    updates), lengths ending mid-page and on a page's last slot (16, 17, 32 at 16-token pages)."""
    lens = [150, 33, 0, 1, 64, 16, 17, 32]  # a padding row (length 0, slot -1), a sequence of only its new token
    q, kc, vc, meta = make_case([1] * len(lens), lens, 2, 3, 64, seed=31)  # GROUP 3: padding rows in GROUP_PAD
    meta.slot_mapping[2] = -1
    new = _step(q, kc, vc, meta, seed=32)
    ref, got, c1, c2 = _both(q, kc, vc, meta, new, num_splits, config=config)
    assert _same_bytes(c1[0], c2[0]) and _same_bytes(c1[1], c2[1])
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    assert got[2].abs().max() == 0
    # the one-token sequence attends to its own v only
    torch.testing.assert_close(got[3], new[1][3].repeat_interleave(3, 0), atol=1e-6, rtol=1e-5)


@cpu
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("num_splits", [1, 2])
def test_fused_over_a_scaled_fp8_cache_with_v_transposed(monkeypatch, block_size, num_splits):
    """The engine's GPU layout: e4m3 K and transposed V with scales; a new v holding NaN is stored as 0."""
    import tests.layers.test_triton_attention as attn

    monkeypatch.setattr(attn, "BLOCK_SIZE", block_size)
    monkeypatch.setenv("SHARDLLM_FP8_ATTN_F16_DOT", "1")
    lens = [150, 33, 70, 1]
    q, kc8, vc8, meta, ks, vs, _ = fp8_case(torch.float8_e4m3fn, [1] * 4, lens, True, seed=33)
    vt = vc8.permute(0, 2, 3, 1).contiguous()  # (nb, nkv, D, bs): stored as the engine stores it
    vt = vt.view(vc8.shape)  # the same bytes, handed around in the cache's shape as kv_cache[1]
    k, v, positions, cs = _step(q, kc8, vc8, meta, seed=34)
    v[1, 0, 5] = float("nan")
    ref, got, c1, c2 = _both(q, kc8, vt, meta, (k, v, positions, cs), num_splits, v_t=True, k_scale=ks,
                             v_scale=vs)
    assert _same_bytes(c1[0], c2[0]) and _same_bytes(c1[1], c2[1])
    assert not got.isnan().any()
    torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)


@cpu
def test_new_kv_needs_the_tma_kernel_and_matching_shapes():
    q, kc, vc, meta = make_case([1, 1], [30, 5], 2, 4, 64, seed=35)
    k, v, positions, cs = _step(q, kc, vc, meta, seed=36)
    args = (q, kc, vc, meta.block_tables, meta.seq_lens, 0.125)
    with pytest.raises(ValueError, match="only the TMA decode kernel"):
        paged_decode_attention(*args, config=DecodeConfig(), new_kv=NewKV(k, v, positions, cs, meta.slot_mapping))
    with pytest.raises(ValueError, match="new_kv: k, v"):
        paged_decode_attention(*args, config=TMA, new_kv=NewKV(k[:1], v, positions, cs, meta.slot_mapping))
    assert not triton_paged.decode_takes_new_kv(q, kc, vc)  # fp32's default launch: the pointer kernel
    vt = vc.permute(0, 2, 3, 1).contiguous()  # a transposed V is always read by the TMA kernel
    assert triton_paged.decode_takes_new_kv(q, kc, vt.permute(0, 3, 1, 2))


@gpu
@pytest.mark.timeout(120)
@pytest.mark.parametrize("batch", [1, 256])
def test_gpu_fused_over_a_bf16_cache_in_the_tables_launches(batch):
    """A bf16 cache at 16-token pages, standard V: the table's launch (TMA, page ids in chunks at 256) and a plain
    TMA one, against the two launches on the GPU (bit-equal caches: the rotations are the same fused multiply-adds)."""
    lens = [int(x) for x in torch.randint(1, 700, (batch,), generator=torch.Generator().manual_seed(batch))]
    q, kc, vc, meta = make_case([1] * batch, lens, 8, 4, 128, torch.bfloat16, "cuda", seed=batch)
    new = _step(q, kc, vc, meta, seed=batch + 2, device="cuda")
    for config in (DecodeConfig(tma=True, num_warps=2, num_stages=3, page_chunk=16), DecodeConfig(tma=True)):
        ref, got, c1, c2 = _both(q, kc, vc, meta, new, None, config=config)
        assert _same_bytes(c1[0], c2[0]) and _same_bytes(c1[1], c2[1])
        assert (got.float() - ref.float()).abs().max() < 1e-2 * ref.float().abs().max()


@gpu
@pytest.mark.timeout(120)
@pytest.mark.parametrize("batch", [1, 64, 512])
def test_gpu_fused_equals_rotary_write_then_decode(batch):
    """Llama-3-8B heads, an e4m3 cache at 64-token pages with V transposed (the engine's default on sm90), the
    default launch (config None)."""
    import tests.layers.test_triton_attention as attn

    old, attn.BLOCK_SIZE = attn.BLOCK_SIZE, 64
    try:
        lens = [int(x) for x in torch.randint(1, 1500, (batch,), generator=torch.Generator().manual_seed(batch))]
        q, kc8, vc8, meta, ks, vs, _ = fp8_case(torch.float8_e4m3fn, [1] * batch, lens, True, "cuda", seed=batch,
                                                nkv=8, group=4, head_dim=128)
    finally:
        attn.BLOCK_SIZE = old
    vt = vc8.permute(0, 2, 3, 1).contiguous().view(vc8.shape)
    view = vt.view(vt.shape[0], vt.shape[2], vt.shape[3], vt.shape[1]).permute(0, 3, 1, 2)
    assert triton_paged.decode_takes_new_kv(q, kc8, view)
    k, v, positions, cs = _step(q, kc8, vc8, meta, seed=batch + 1, device="cuda")
    kc1, vt1, kc2, vt2 = kc8.clone(), vt.clone(), kc8.clone(), vt.clone()
    v1 = vt1.view(view.shape[0], view.shape[2], view.shape[3], view.shape[1]).permute(0, 3, 1, 2)
    v2 = vt2.view(view.shape[0], view.shape[2], view.shape[3], view.shape[1]).permute(0, 3, 1, 2)
    q1, k1 = q.clone(), k.clone()
    triton_ops.rotary_embedding_and_write_kv_(positions, q1, k1, v, cs, kc1, v1, meta.slot_mapping, ks, vs)
    ref = paged_decode_attention(q1, kc1, v1, meta.block_tables, meta.seq_lens, 128 ** -0.5, k_scale=ks, v_scale=vs)
    got = paged_decode_attention(q.clone(), kc2, v2, meta.block_tables, meta.seq_lens, 128 ** -0.5, k_scale=ks,
                                 v_scale=vs, new_kv=NewKV(k.clone(), v, positions, cs, meta.slot_mapping))
    assert _same_bytes(kc1, kc2) and _same_bytes(vt1, vt2)
    assert (got.float() - ref.float()).abs().max() < 1e-2 * ref.float().abs().max()


@cpu
@pytest.mark.parametrize("max_rows", [3, 2])  # the default (128) covers every step here, like 3
def test_a_model_with_the_fused_decode_gives_the_same_tokens(tiny_checkpoints, monkeypatch, max_rows):
    """End to end under the interpreter, the TMA launch for every decode (as on an H200): with
    SHARDLLM_DECODE_FUSED_ROTARY at 3 every decode-only step's layers (3 rows) take NewKV (and the separate rotary +
    KV write does not run for them); at 2 none does. The greedy tokens and logprobs are those of the two-launch
    path."""
    from shardllm import LLM, SamplingParams
    from shardllm.layers.attention import Attention
    from shardllm.layers.attention import attention as attention_mod

    monkeypatch.setattr(Attention, "uses_triton_kernels", lambda self, q: self.use_triton)
    monkeypatch.setattr(RotaryEmbedding, "uses_kernel", lambda self, q: True)
    monkeypatch.setattr(triton_paged, "decode_config", lambda *a, **k: TMA)
    calls = {"fused": 0, "rotary_write": 0}
    decode, write = triton_paged.paged_decode_attention, triton_ops.rotary_embedding_and_write_kv_

    def counting_decode(*a, **k):
        calls["fused"] += k.get("new_kv") is not None
        return decode(*a, **k)

    def counting_write(*a, **k):
        calls["rotary_write"] += 1
        return write(*a, **k)

    monkeypatch.setattr(triton_paged, "paged_decode_attention", counting_decode)
    monkeypatch.setattr(triton_ops, "rotary_embedding_and_write_kv_", counting_write)
    monkeypatch.setattr(attention_mod, "DECODE_FUSED_ROTARY", 0)  # the two-launch path first
    greedy = SamplingParams(max_tokens=5, temperature=0, logprobs=2)
    prompts = [[(5 * i + j) % 250 + 3 for j in range(n)] for i, n in enumerate([9, 20, 1])]
    llm = LLM(tiny_checkpoints["llama"], device="cpu", num_kv_blocks=40, block_size=16, dtype="float32",
              enable_prefix_caching=False)
    try:
        want = llm.generate(prompts, greedy)
        assert calls["fused"] == 0
        writes_before = calls["rotary_write"]
        monkeypatch.setattr(attention_mod, "DECODE_FUSED_ROTARY", max_rows)
        got = llm.generate(prompts, greedy)
    finally:
        llm.shutdown()
    layers = llm.config.model_config.hf_config.num_hidden_layers
    fused_steps = 4 if max_rows >= 3 else 0  # the four decode-only steps after the prompts' step, of 3 rows each
    assert calls["fused"] == fused_steps * layers
    assert calls["rotary_write"] - writes_before == (5 - fused_steps) * layers  # the prompts' step and plain ones
    for g, w in zip(got, want):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        for x, y in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
            assert x.keys() == y.keys() and all(abs(x[t].logprob - y[t].logprob) < 1e-4 for t in x)


@cpu
def test_a_failing_fused_decode_falls_back_to_the_two_launches(tiny_checkpoints, monkeypatch, caplog):
    from shardllm import LLM, SamplingParams
    from shardllm.layers.attention import Attention
    from shardllm.layers.attention import attention as attention_mod

    monkeypatch.setattr(Attention, "uses_triton_kernels", lambda self, q: self.use_triton)
    monkeypatch.setattr(RotaryEmbedding, "uses_kernel", lambda self, q: True)
    monkeypatch.setattr(triton_paged, "decode_config", lambda *a, **k: TMA)
    monkeypatch.setattr(attention_mod, "_fused_decode_ok", [True])
    monkeypatch.setattr(attention_mod, "DECODE_FUSED_ROTARY", 0)  # the two-launch path first
    decode, tries = triton_paged.paged_decode_attention, []

    def refusing(*a, **k):
        if k.get("new_kv") is not None:
            tries.append(1)
            raise RuntimeError("PassManager::run failed")
        return decode(*a, **k)

    greedy = SamplingParams(max_tokens=4, temperature=0)
    llm = LLM(tiny_checkpoints["llama"], device="cpu", num_kv_blocks=40, block_size=16, dtype="float32",
              enable_prefix_caching=False)
    try:
        want = llm.generate([[5, 6, 7, 8]], greedy)
        monkeypatch.setattr(attention_mod, "DECODE_FUSED_ROTARY", 1)
        monkeypatch.setattr(triton_paged, "paged_decode_attention", refusing)
        got = llm.generate([[5, 6, 7, 8]], greedy)
    finally:
        llm.shutdown()
    assert tries == [1] and "fused rotary + KV write failed" in caplog.text  # tried once, then not again
    assert got[0].outputs[0].token_ids == want[0].outputs[0].token_ids


@cpu
@pytest.mark.parametrize("max_rows", [4, 1])
def test_the_warm_up_compiles_the_plain_launch_mixed_steps_take(tiny_checkpoints, monkeypatch, max_rows):
    """With SHARDLLM_DECODE_FUSED_ROTARY on, the start-up warm-up runs each decode size with the plain launch (a
    mixed step's decodes take it; the CUDA-graph buckets of at most that many rows ran only the fused one) and,
    without graphs, the sizes up to it with the fused one too."""
    from shardllm import LLM
    from shardllm.layers.attention import Attention
    from shardllm.layers.attention import attention as attention_mod

    monkeypatch.setattr(Attention, "uses_triton_kernels", lambda self, q: self.use_triton)
    monkeypatch.setattr(RotaryEmbedding, "uses_kernel", lambda self, q: True)
    monkeypatch.setattr(triton_paged, "decode_config", lambda *a, **k: TMA)
    llm = LLM(tiny_checkpoints["llama"], device="cpu", num_kv_blocks=40, block_size=16, dtype="float32",
              max_batch_size=4)
    try:
        runner = llm.engine.executor.worker.model_runner
        decode, seen = triton_paged.paged_decode_attention, []
        monkeypatch.setattr(triton_paged, "paged_decode_attention",
                            lambda *a, **k: seen.append((a[0].shape[0], k.get("new_kv") is not None))
                            or decode(*a, **k))
        monkeypatch.setattr(attention_mod, "DECODE_FUSED_ROTARY", max_rows)
        sizes, _ = runner.warm_up_kernels()
    finally:
        llm.shutdown()
    layers = llm.config.model_config.hf_config.num_hidden_layers
    plain = [n for n, fused in seen if not fused]
    fused = [n for n, f in seen if f]
    assert sizes and sorted(plain) == sorted(sizes * layers)
    assert fused and max(fused) <= max_rows and set(fused) == {n for n in sizes if n <= max_rows}
    assert len(fused) == len(set(fused)) * layers
    assert attention_mod.DECODE_FUSED_ROTARY == max_rows  # restored after the plain runs
