"""Attention given the rotary embedding: on its Triton path the rotary and the KV-cache write are one launch
(`triton_ops.rotary_embedding_and_write_kv_`), equal to the torch path; a launch that fails falls back to the
two kernels. CPU under the interpreter (Attention's kernel choice patched), CUDA (gpu)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from shardllm.layers import triton_ops  # noqa: E402
from shardllm.layers.attention import Attention, triton_paged  # noqa: E402
from shardllm.layers.rotary import RotaryEmbedding  # noqa: E402
from tests.layers.test_fused_ops import cpu, gpu, tol  # noqa: E402
from tests.layers.test_triton_attention import make_case  # noqa: E402


def spy(monkeypatch, *targets) -> dict[str, int]:
    """Counts the calls of each (module, function name) in a dict, by name."""
    calls = {}

    def counted(fn, name):
        def call(*a, **kw):
            calls[name] = calls.get(name, 0) + 1
            return fn(*a, **kw)
        return call

    for mod, name in targets:
        monkeypatch.setattr(mod, name, counted(getattr(mod, name), name))
    return calls


def check_attention_with_rotary(monkeypatch, q_lens, seq_lens, nkv: int, group: int, d: int, dtype: torch.dtype,
                                device: str, seed: int = 0) -> None:
    """Attention.forward given the rotary: its Triton path with the fused launch (or, with the torch rotary, the
    separate KV write) equals the torch path: output and both caches. On CPU, uses_triton_kernels is patched."""
    g = torch.Generator().manual_seed(seed)
    _, k_cache, v_cache, meta = make_case(q_lens, seq_lens, nkv, group, d, dtype, device, seed)
    nh, n = nkv * group, sum(q_lens)
    attn, rope = Attention(nh, d, nkv), RotaryEmbedding(d, 4096, 10000.0).to(device)
    positions = torch.cat([torch.arange(s - q, s) for q, s in zip(q_lens, seq_lens)]).to(device)
    qkv = (2 * torch.randn(n, (nh + 2 * nkv) * d, generator=g)).to(device, dtype)
    calls = spy(monkeypatch, (triton_ops, "rotary_embedding_and_write_kv_"), (triton_ops, "rotary_embedding_"),
                (triton_paged, "write_kv_cache"))

    def forward(attention_kernels: bool, rotary_kernel: bool | None):
        attn.use_triton = attention_kernels
        monkeypatch.setattr(triton_ops, "USE_TRITON", rotary_kernel)
        attn.kv_cache = torch.stack([k_cache, v_cache])
        calls.clear()
        q, k, v = qkv.clone().split([nh * d, nkv * d, nkv * d], dim=-1)
        out = attn(q, k, v, meta, rope, positions)
        return out, attn.kv_cache, dict(calls)

    ref_out, ref_cache, ref_calls = forward(False, False)
    out, cache, fused_calls = forward(True, True if device == "cpu" else None)
    sep_out, sep_cache, sep_calls = forward(True, False)
    assert ref_calls == {}
    assert fused_calls == {"rotary_embedding_and_write_kv_": 1}
    assert sep_calls == {"write_kv_cache": 1}  # a rotary that does not take the kernel is not fused
    out_tol = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for o, c in ((out, cache), (sep_out, sep_cache)):
        torch.testing.assert_close(o, ref_out, **out_tol)
        torch.testing.assert_close(c[0], ref_cache[0], **tol(dtype, device, roundings=1))
        assert torch.equal(c[1], ref_cache[1])
    assert not torch.equal(cache[0], k_cache)  # this step's k were written


# ---- CPU, Triton interpreter -------------------------------------------------------------------------------------


@pytest.fixture
def attention_kernels_on_cpu(monkeypatch):
    """Attention's Triton path on CPU tensors (the kernels run interpreted), where the runner would choose it."""
    monkeypatch.setattr(Attention, "uses_triton_kernels", lambda self, q: self.use_triton)


@cpu
@pytest.mark.parametrize(("q_lens", "seq_lens"), [([1, 1], [17, 5]), ([3, 6], [3, 21])], ids=["decode", "prefill"])
def test_attention_fuses_rotary_with_the_kv_write(monkeypatch, attention_kernels_on_cpu, q_lens, seq_lens):
    check_attention_with_rotary(monkeypatch, q_lens, seq_lens, 2, 3, 64, torch.float32, "cpu", seed=len(q_lens))


@cpu
def test_a_fused_kernel_that_fails_to_launch_falls_back_to_two(monkeypatch, attention_kernels_on_cpu, caplog):
    """If the fused launch raises (a Triton that cannot compile it), the step still gets the right answer from
    the separate kernels, with a warning, and later steps do not try the fused one again."""
    from shardllm.layers.attention import attention as attention_mod

    monkeypatch.setattr(attention_mod, "_fused_rotary_ok", [True])
    _, k_cache, v_cache, meta = make_case([1, 1], [9, 4], 2, 2, 32)
    attn, rope = Attention(4, 32, 2), RotaryEmbedding(32, 512, 10000.0)
    positions = torch.tensor([8, 3])
    qkv = torch.randn(2, 8 * 32)

    def run(use_triton: bool):
        attn.use_triton = use_triton
        monkeypatch.setattr(triton_ops, "USE_TRITON", use_triton)
        attn.kv_cache = torch.stack([k_cache, v_cache])
        q, k, v = qkv.clone().split([128, 64, 64], dim=-1)
        return attn(q, k, v, meta, rope, positions), attn.kv_cache

    ref_out, ref_cache = run(False)

    def broken(*a, **kw):
        raise RuntimeError("cannot compile")

    monkeypatch.setattr(triton_ops, "rotary_embedding_and_write_kv_", broken)
    calls = spy(monkeypatch, (triton_ops, "rotary_embedding_and_write_kv_"), (triton_ops, "rotary_embedding_"),
                (triton_paged, "write_kv_cache"))
    with caplog.at_level("WARNING"):
        out, cache = run(True)
    assert "fused rotary + KV write failed" in caplog.text
    assert calls == {"rotary_embedding_and_write_kv_": 1, "rotary_embedding_": 1, "write_kv_cache": 1}
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(cache, ref_cache, atol=2e-5, rtol=1e-4)
    calls.clear()
    run(True)
    assert calls == {"rotary_embedding_": 1, "write_kv_cache": 1}  # not tried again


@cpu
def test_attention_applies_another_rotary_first(monkeypatch, attention_kernels_on_cpu):
    """A rotary module that is not a RotaryEmbedding is called as given, then the separate KV write."""
    _, k_cache, v_cache, meta = make_case([2], [2], 1, 2, 32)
    attn = Attention(2, 32, 1)
    attn.kv_cache = torch.stack([k_cache, v_cache])
    monkeypatch.setattr(triton_ops, "USE_TRITON", True)
    calls = spy(monkeypatch, (triton_ops, "rotary_embedding_and_write_kv_"), (triton_paged, "write_kv_cache"))

    class Negate(torch.nn.Module):
        def forward(self, positions, q, k):
            return -q, -k

    qkv = torch.randn(2, 4 * 32)
    q, k, v = qkv.split([64, 32, 32], dim=-1)
    attn(q, k, v, meta, Negate(), torch.zeros(2, dtype=torch.long))
    assert calls == {"write_kv_cache": 1}
    assert torch.equal(attn.kv_cache[0].view(-1, 32)[meta.slot_mapping], -k)


@cpu
@pytest.mark.parametrize("attention", ["torch", "triton"])  # triton: paged kernels, rotary fused with the KV write
@pytest.mark.parametrize("arch", ["llama", "qwen3"])  # qwen3: q/k norm on the strided views, then rotary
def test_tiny_model_with_the_kernels_equals_the_torch_path(tiny_checkpoints, monkeypatch, arch, attention):
    from shardllm import LLM
    from tests.helpers import chunked_logits

    llm = LLM(tiny_checkpoints[arch], device="cpu", num_kv_blocks=100, block_size=4)
    runner = llm.engine.executor.worker.model_runner
    prompts = [[1, 17, 33, 5, 9, 101, 7], [3, 4, 250]]
    ref = chunked_logits(runner, prompts, 4)  # a prefill step, then chunks with cached context
    monkeypatch.setattr(triton_ops, "USE_TRITON", True)
    if attention == "triton":
        monkeypatch.setattr(Attention, "uses_triton_kernels", lambda self, q: self.use_triton)
    calls = spy(monkeypatch, (triton_ops, "rotary_embedding_and_write_kv_"), (triton_ops, "rotary_embedding_"))
    for o, r in zip(chunked_logits(runner, prompts, 4), ref):
        torch.testing.assert_close(o, r, atol=1e-4, rtol=1e-4)
    layer_steps = runner.model.config.num_hidden_layers * 2  # two steps of chunks
    assert calls == {"rotary_embedding_and_write_kv_" if attention == "triton" else "rotary_embedding_": layer_steps}


# ---- CUDA, bf16 -----------------------------------------------------------------------------------------------


@gpu
@pytest.mark.parametrize(("q_lens", "seq_lens"), [([1] * 8, [1, 16, 17, 100, 700, 33, 2, 1000]),
                                                  ([300, 1, 37], [300, 90, 53])], ids=["decode", "prefill"])
@pytest.mark.parametrize("heads", [(8, 4, 128), (2, 3, 64)])
def test_gpu_attention_fuses_rotary_with_the_kv_write_bf16(monkeypatch, q_lens, seq_lens, heads):
    check_attention_with_rotary(monkeypatch, q_lens, seq_lens, *heads, torch.bfloat16, "cuda")
