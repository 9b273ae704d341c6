"""Prompt chunks without cached context through FlashAttention over their own k, v (layers/attention/flash_prefill.py,
SHARDLLM_FLASH_PREFILL): the step's rows split three ways (leading decodes to the decode kernel, chunks over cached
context to the prefill kernel, the fresh prompts to FlashAttention), each part equal to the all-Triton step and to
the torch reference. CPU under the interpreter with FlashAttention replaced by a per-sequence torch SDPA (its
kernel is CUDA-only: the hardware boundary); on a GPU with torch's own kernel."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from shardllm.layers.attention import Attention, flash_prefill, triton_paged  # noqa: E402
from tests.layers.test_attention_rotary import spy  # noqa: E402
from tests.layers.test_fused_ops import cpu, gpu  # noqa: E402
from tests.layers.test_triton_attention import make_case  # noqa: E402

# (q_lens, seq_lens, num_decodes, fresh_from): two decodes, a chunk over cached context, three prompts from their
# first token; the same without the decodes and the chunk; decodes then prompts only; a chunk then prompts; a
# one-token prompt among the leading one-token rows (fresh from it on, but the decode kernel takes it)
CASES = [([1, 1, 6, 5, 12, 9], [37, 16, 29, 5, 12, 9], 2, 3),
         ([6, 5, 12], [6, 5, 12], 0, 0),
         ([1, 1, 7, 3], [20, 9, 7, 3], 2, 2),
         ([6, 5, 9], [30, 5, 9], 0, 1),
         ([1, 1, 6, 4], [20, 1, 6, 4], 2, 1)]


def varlen_reference(q, k, v, cu_seqlens, max_len, scale):
    """flash_prefill's contract in torch: causal SDPA per sequence, k and v heads repeated for the groups."""
    assert max_len == int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    out = torch.empty_like(q)
    g = q.shape[1] // k.shape[1]
    cu = cu_seqlens.tolist()
    assert cu[0] == 0 and cu[-1] == q.shape[0]
    for a, b in zip(cu[:-1], cu[1:]):
        qs, ks, vs = (x[a:b].transpose(0, 1) for x in (q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)))
        out[a:b] = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale).transpose(0, 1)
    return out


def run(q_lens, seq_lens, nd, ff, device, dtype, use_triton=True):
    q, k_cache, v_cache, meta = make_case(q_lens, seq_lens, 2, 3, 32, dtype, device, seed=5)
    attn = Attention(6, 32, 2).to(device)
    attn.use_triton = use_triton
    attn.kv_cache = torch.stack([k_cache, v_cache])
    k = torch.randn(sum(q_lens), 2 * 32, generator=torch.Generator().manual_seed(6)).to(device, dtype)
    v = torch.randn(sum(q_lens), 2 * 32, generator=torch.Generator().manual_seed(7)).to(device, dtype)
    host = torch.tensor([0, *q_lens]).cumsum(0).numpy()
    meta = dataclasses.replace(meta, num_decodes=nd, host_query_start_loc=host, fresh_from=ff)
    return attn(q.reshape(q.shape[0], -1), k, v, meta)


def check(monkeypatch, device, dtype, tol, mixed=True):
    """mixed False: SHARDLLM_MIXED_STEP_DECODE_KERNEL off, leading decodes in the prefill kernel's part."""
    from shardllm.layers.attention import attention as attention_mod

    monkeypatch.setattr(attention_mod, "MIXED_STEP_DECODE_KERNEL", mixed)
    calls = spy(monkeypatch, (triton_paged, "paged_decode_attention"), (triton_paged, "paged_prefill_attention"),
                (flash_prefill, "flash_prefill"))
    for q_lens, seq_lens, nd, ff in CASES:
        ref = run(q_lens, seq_lens, nd, ff, device, dtype, use_triton=False)
        calls.clear()
        whole = run(q_lens, seq_lens, nd, None, device, dtype)  # fresh_from unknown: the Triton kernels only
        assert "flash_prefill" not in calls
        calls.clear()
        out = run(q_lens, seq_lens, nd, ff, device, dtype)
        want = {"flash_prefill": 1}
        nd = nd if mixed else 0
        if nd:
            want["paged_decode_attention"] = 1
        if max(ff, nd) > nd:
            want["paged_prefill_attention"] = 1
        assert calls == want, (q_lens, calls)
        torch.testing.assert_close(out.float(), ref.float(), **tol)
        torch.testing.assert_close(whole.float(), ref.float(), **tol)


@pytest.fixture
def flash_on_cpu(monkeypatch):
    monkeypatch.setattr(Attention, "uses_triton_kernels", lambda self, q: self.use_triton)
    monkeypatch.setattr(flash_prefill, "available", lambda q, k: True)
    monkeypatch.setattr(flash_prefill, "flash_prefill", varlen_reference)


@cpu
@pytest.mark.parametrize("mixed", [True, False])
def test_fresh_prompts_go_to_flash_attention_and_the_rest_to_the_kernels_cpu(monkeypatch, flash_on_cpu, mixed):
    check(monkeypatch, "cpu", torch.float32, dict(atol=2e-5, rtol=1e-4), mixed)


def test_available_says_no_off_the_gpu_or_when_switched_off(monkeypatch):
    q, k = torch.zeros(4, 8, 64, dtype=torch.bfloat16), torch.zeros(4, 2, 64, dtype=torch.bfloat16)
    monkeypatch.setattr(flash_prefill, "ENABLED", True)
    assert not flash_prefill.available(q, k)  # CPU tensors
    monkeypatch.setattr(flash_prefill, "ENABLED", False)
    assert not flash_prefill.available(q, k)


@gpu
@pytest.mark.timeout(120)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fresh_prompts_through_torch_flash_attention_gpu(monkeypatch, dtype):
    monkeypatch.setattr(flash_prefill, "ENABLED", True)
    q, k = torch.zeros(4, 6, 32, dtype=dtype, device="cuda"), torch.zeros(4, 2, 32, dtype=dtype, device="cuda")
    assert flash_prefill.available(q, k)  # an H100 / H200 with torch's CUDA build has the kernel
    check(monkeypatch, "cuda", dtype, dict(atol=2e-2, rtol=2e-2))


@cpu
def test_a_flash_kernel_that_fails_falls_back_to_the_triton_kernels_cpu(monkeypatch, flash_on_cpu, caplog):
    from shardllm.layers.attention import attention as attention_mod

    tries = []

    def refuses(*a):
        tries.append(1)
        raise RuntimeError("FlashAttention only supports ...")

    monkeypatch.setattr(flash_prefill, "flash_prefill", refuses)
    monkeypatch.setattr(attention_mod, "_flash_ok", [True])
    q_lens, seq_lens, nd, ff = CASES[0]
    ref = run(q_lens, seq_lens, nd, ff, "cpu", torch.float32, use_triton=False)
    for _ in range(2):
        out = run(q_lens, seq_lens, nd, ff, "cpu", torch.float32)
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    assert tries == [1] and "FlashAttention prefill failed" in caplog.text  # tried once, then not again


@cpu
def test_a_model_takes_flash_attention_for_fresh_prompts_with_the_same_tokens(tiny_checkpoints, monkeypatch, capsys):
    """End to end under the interpreter (16-token steps: chunked prompts, continuation chunks and decodes mixed):
    every step that starts a prompt sends it to FlashAttention (here its torch stand-in), and the tokens and
    logprobs are those of the run without it."""
    from shardllm import LLM, SamplingParams
    from shardllm.layers.attention import triton_paged as tp

    if not tp.HAS_TRITON:
        pytest.skip("no Triton")
    from shardllm.layers.attention import attention as attention_mod

    monkeypatch.setattr(Attention, "uses_triton_kernels", lambda self, q: self.use_triton)
    monkeypatch.setattr(attention_mod, "_flash_announced", False)
    greedy = SamplingParams(max_tokens=6, temperature=0, logprobs=2)
    prompts = [[(7 * i + j) % 250 + 3 for j in range(n)] for i, n in enumerate([9, 14, 5, 11, 7])]
    llm = LLM(tiny_checkpoints["llama"], device="cpu", num_kv_blocks=200, block_size=4, dtype="float32",
              max_num_tokens=16, enable_prefix_caching=False)
    try:
        want = llm.generate(prompts, greedy)
        seen = []
        monkeypatch.setattr(flash_prefill, "available", lambda q, k: True)
        monkeypatch.setattr(flash_prefill, "flash_prefill",
                            lambda q, k, v, cu, n, s: seen.append(len(cu) - 1) or varlen_reference(q, k, v, cu, n, s))
        got = llm.generate(prompts, greedy)
    finally:
        llm.shutdown()
    layers = llm.config.model_config.hf_config.num_hidden_layers
    assert sum(seen) == len(prompts) * layers  # each prompt's first chunk, once a layer
    assert "shardllm: FlashAttention prefill took" in capsys.readouterr().err
    for g, w in zip(got, want):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        for x, y in zip(g.outputs[0].logprobs, w.outputs[0].logprobs):
            assert x.keys() == y.keys() and all(abs(x[t].logprob - y[t].logprob) < 1e-4 for t in x)
