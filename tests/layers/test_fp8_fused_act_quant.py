"""FP8 activation quantization fused into RMSNorm and SiLU-and-mul (quantization/fp8_fused.py): the kernels against
the unfused kernels followed by quantize_per_token_triton (bit-exact), the hook's rules, and a tiny FP8 Llama's
tokens with the fused path on and off. CPU under the interpreter; CUDA (gpu)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from shardllm.layers import triton_ops  # noqa: E402
from shardllm.layers.activation import SiluAndMul  # noqa: E402
from shardllm.layers.layernorm import RMSNorm  # noqa: E402
from shardllm.layers.linear import RowParallelLinear  # noqa: E402
from shardllm.layers.quantization import (  # noqa: E402
    QuantizationConfig,
    fp8,
    fp8_fused,
    fp8_triton,
    quant_config_scope,
)
from shardllm.layers.quantization.fp8_fused import QuantizedActivation  # noqa: E402
from shardllm.layers.quantization.fp8_triton import quantize_per_token_triton  # noqa: E402
from shardllm.layers.quantization.fp8_utils import MIN_SCALE  # noqa: E402

INTERPRET = isinstance(fp8_fused._rmsnorm_quant_fp8_kernel, InterpretedFunction)
cpu = pytest.mark.skipif(not INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1 before the kernels' import")


def gpu(fn):
    skip = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET or torch.cuda.get_device_capability() < (8, 9),
                              reason="needs a GPU with FP8 (sm89+), no interpreter")
    return pytest.mark.gpu(pytest.mark.timeout(60)(skip(fn)))


def assert_same_quantization(got: QuantizedActivation, ref: torch.Tensor, dtype: torch.dtype) -> None:
    """got equals quantize_per_token_triton(ref) bit for bit (data compared as bytes: -0 vs +0, NaN) on CPU. On
    CUDA a compiled kernel may round a norm's fp32 intermediate differently in rare elements (a different FMA
    contraction), so there: scales within 1e-6 relative, and at most 1e-4 of the codes one e4m3 step away."""
    q, s = quantize_per_token_triton(ref)
    assert got.dtype == dtype and got.data.dtype == torch.float8_e4m3fn and got.scale.shape == (ref.shape[0], 1)
    if ref.device.type == "cpu":
        assert torch.equal(got.data.view(torch.uint8), q.view(torch.uint8))
        assert torch.equal(got.scale, s)
        return
    torch.testing.assert_close(got.scale, s, rtol=1e-6, atol=0)
    a, b = got.data.view(torch.uint8).int(), q.view(torch.uint8).int()
    differ = a != b
    assert differ.float().mean().item() <= 1e-4, f"{int(differ.sum())} of {a.numel()} codes differ"
    assert ((a - b).abs()[differ] <= 1).all() and (((a ^ b) & 0x80)[differ] == 0).all()  # adjacent, same sign


def check_rms_norm(device: str, dtype: torch.dtype, m: int, hidden: int, residual: bool) -> None:
    g = torch.Generator(device=device).manual_seed(hidden + residual)
    x = (torch.randn(m, hidden, device=device, generator=g) * 3).to(dtype)
    r = (torch.randn(m, hidden, device=device, generator=g)).to(dtype) if residual else None
    w = (torch.rand(hidden, device=device, generator=g) + 0.5).to(dtype)
    x[1] = 0  # an all-zero row: the floor scale, zeros
    if r is not None:
        r[1] = 0
    if residual:
        got, res_out = fp8_fused.rms_norm_quant(x, r, w, 1e-5)
        ref, res_ref = triton_ops.fused_add_rms_norm(x, r, w, 1e-5)
        assert torch.equal(res_out, res_ref)
    else:
        got = fp8_fused.rms_norm_quant(x, None, w, 1e-5)
        ref = triton_ops.rms_norm(x, w, 1e-5)
    assert_same_quantization(got, ref, dtype)
    assert got.scale[1].item() == pytest.approx(MIN_SCALE) and torch.isfinite(got.scale).all()
    assert not got.data[1].float().any()


def check_silu(device: str, dtype: torch.dtype, m: int, d: int, max_block: int) -> None:
    g = torch.Generator(device=device).manual_seed(d)
    x = (torch.randn(m, 2 * d, device=device, generator=g) * 4).to(dtype)
    x[2] = 0
    got = fp8_fused.silu_and_mul_quant(x, max_block)
    assert_same_quantization(got, triton_ops.silu_and_mul(x), dtype)
    assert got.scale[2].item() == pytest.approx(MIN_SCALE) and not got.data[2].float().any()


@cpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("residual", [False, True], ids=["norm", "add_norm"])
@pytest.mark.parametrize("chunks", [1, 3])
def test_rms_norm_quant_equals_norm_then_quantize(monkeypatch, dtype, residual, chunks):
    if chunks > 1:  # rows wider than the block: both kernels take their chunked passes
        monkeypatch.setattr(triton_ops, "RMS_MAX_BLOCK", 64)
    check_rms_norm("cpu", dtype, 5, 96 if chunks == 1 else 160, residual)


@cpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("max_block", [1024, 32], ids=["one_pass", "two_pass"])
def test_silu_and_mul_quant_equals_silu_then_quantize(dtype, max_block):
    check_silu("cpu", dtype, 4, 80, max_block)


def _fp8_linear(input_size: int, output_size: int, cfg: QuantizationConfig | None = None) -> RowParallelLinear:
    with quant_config_scope(cfg or QuantizationConfig()):
        layer = RowParallelLinear(input_size, output_size, dtype=torch.bfloat16)
    layer.weight_loader(layer.weight, torch.randn(output_size, input_size) * 0.1)
    layer.quant_method.process_weights_after_loading(layer)
    return layer


@cpu
def test_hook_quantizes_only_where_the_linear_would_quantize_per_token(monkeypatch):
    torch.manual_seed(0)
    monkeypatch.setattr(fp8_fused, "FORCE", True)
    monkeypatch.setattr(fp8_triton, "FP8_GEMV_MAX_M", 1)  # the default, whatever the environment says
    linear = _fp8_linear(64, 32)
    act = SiluAndMul()
    act.quant_target = fp8_fused.ActQuantTarget(linear)
    x = torch.randn(17, 128).to(torch.bfloat16)
    out = act(x)
    assert isinstance(out, QuantizedActivation) and out.shape == (17, 64)
    y = linear(out)  # the FP8 linear takes it: equals the linear on the unquantized rows (same quantization)
    monkeypatch.setattr(fp8, "quantize_per_row", quantize_per_token_triton)
    assert torch.equal(y, linear(triton_ops.silu_and_mul(x)))
    # SHARDLLM_FP8_GEMV_MAX_M (fp8_triton's, 1 by default): up to it the GEMV takes unquantized rows, past it the
    # GEMM quantized ones
    for bound, m_gemv in [(0, 0), (4, 4), (16, 16), (1, 1)]:
        monkeypatch.setattr(fp8_triton, "FP8_GEMV_MAX_M", bound)
        if m_gemv:
            assert isinstance(act(x[:m_gemv]), torch.Tensor), bound
        assert isinstance(act(x[:m_gemv + 1]), QuantizedActivation), bound
    norm = RMSNorm(64, 1e-5, dtype=torch.bfloat16)
    norm.quant_target = fp8_fused.ActQuantTarget(linear)
    h, r = torch.randn(2, 17, 64).to(torch.bfloat16)
    out, res = norm(h, r)  # (QuantizedActivation, x + residual) in place of (normed, x + residual)
    normed, res_ref = triton_ops.fused_add_rms_norm(h, r, norm.weight, 1e-5)
    assert isinstance(out, QuantizedActivation) and torch.equal(res, res_ref)
    assert torch.equal(linear(out), linear(normed))
    assert isinstance(act(x.float()), torch.Tensor)  # fp32 rows: the torch quantizer, never the kernels
    monkeypatch.setattr(fp8_fused, "ENABLED", False)  # SHARDLLM_FP8_FUSED_ACT_QUANT=0
    assert isinstance(act(x), torch.Tensor)
    monkeypatch.setattr(fp8_fused, "ENABLED", True)
    monkeypatch.setattr(fp8_fused, "FORCE", None)  # CPU without the override: the reference path
    assert isinstance(act(x), torch.Tensor)


@cpu
def test_only_dynamic_per_token_fp8_linears_are_linked():
    from shardllm.models.llama import LlamaForCausalLM
    from shardllm.models.mixtral import MixtralForCausalLM

    def build(cfg, cls=LlamaForCausalLM):
        from transformers import LlamaConfig, MixtralConfig

        size = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                    num_key_value_heads=1)
        hf = MixtralConfig(num_local_experts=2, **size) if cls is MixtralForCausalLM else LlamaConfig(**size)
        with quant_config_scope(cfg):
            model = cls(hf, 64)
        return model, fp8_fused.link_act_quant(model)

    model, linked = build(QuantizationConfig())
    assert linked == 6  # 2 layers x (input norm -> qkv, post-attention norm -> gate_up, act -> down)
    layer = model.model.layers[0]
    assert layer.input_layernorm.quant_target.linear is layer.self_attn.qkv_proj
    assert layer.mlp.act_fn.quant_target.linear is layer.mlp.down_proj
    assert "input_layernorm.quant_target" not in dict(layer.named_modules())  # not registered as a child
    assert build(None)[1] == 0  # bf16
    assert build(QuantizationConfig(), MixtralForCausalLM)[1] == 2  # the experts' input is no dense linear's
    assert build(QuantizationConfig(source="fp8", is_checkpoint_fp8=True, weight_strategy="tensor",
                                    activation_scheme="static"))[1] == 0
    assert build(QuantizationConfig(source="fp8", weight_strategy="block", is_checkpoint_fp8=True,
                                    weight_block_size=(16, 16), weight_scale_name="weight_scale_inv"))[1] == 0


def _tiny_llama_tokens(path: str, fused: bool, **llm_kwargs) -> tuple[list, int]:
    """Greedy tokens of the tiny Llama in FP8 with the fused path on or off, and how many fused launches ran."""
    from shardllm import LLM

    n = llm_kwargs.pop("n", 3)
    calls = []
    with pytest.MonkeyPatch.context() as mp:  # undone before the next engine loads its weights
        for name in ("rms_norm_quant", "silu_and_mul_quant"):
            fn = getattr(fp8_fused, name)
            mp.setattr(fp8_fused, name, lambda *a, _fn=fn, **k: calls.append(1) or _fn(*a, **k))
        mp.setattr(fp8_fused, "ENABLED", fused)
        llm = LLM(path, num_kv_blocks=64, max_batch_size=32, **llm_kwargs)
        try:
            if llm_kwargs.get("device") == "cpu":  # after the runner set its switches and quantized the weights
                mp.setattr(triton_ops, "USE_TRITON", True)  # the kernels, interpreted
                mp.setattr(fp8_fused, "FORCE", True)
                # the unfused path quantizes with the same Triton kernel (the interpreter's e4m3 cast isn't torch's)
                mp.setattr(fp8, "quantize_per_row", lambda x: quantize_per_token_triton(x.contiguous()))
            tokens = greedy_tokens(llm, n)
        finally:
            llm.shutdown()
    return tokens, len(calls)


def greedy_tokens(llm, n: int, max_tokens: int = 3) -> list:
    """The greedy tokens `llm` gives n short prompts of 6-10 tokens (ids under 300)."""
    from shardllm import SamplingParams

    prompts = [[1 + (7 * i + j) % 300 for j in range(6 + i % 5)] for i in range(n)]
    sp = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]


@cpu
def test_tiny_fp8_llama_tokens_equal_with_the_fused_quantization_on_and_off(tiny_checkpoints):
    kw = dict(dtype="bfloat16", quantization="fp8", device="cpu", enforce_eager=True)
    on, launches = _tiny_llama_tokens(tiny_checkpoints["llama"], True, **kw)
    off, none = _tiny_llama_tokens(tiny_checkpoints["llama"], False, **kw)
    assert launches >= 6 and none == 0  # the prefill (21 rows > 16) ran fused in both layers
    assert on == off


# ---- CUDA --------------------------------------------------------------------------------------------------------


@gpu
@pytest.mark.parametrize("residual", [False, True], ids=["norm", "add_norm"])
@pytest.mark.parametrize("hidden", [4096, 8192, 16384])  # one chunk, the widest one-chunk row, two chunks
def test_gpu_rms_norm_quant_equals_norm_then_quantize(residual, hidden):
    check_rms_norm("cuda", torch.bfloat16, 4096, hidden, residual)  # 4096 rows: rare flips show


@gpu
@pytest.mark.parametrize("d,max_block", [(14336, 16384), (14336, 4096), (7168, 16384), (1408, 16384)])
def test_gpu_silu_and_mul_quant_equals_silu_then_quantize(d, max_block):
    check_silu("cuda", torch.bfloat16, 300, d, max_block)


@pytest.mark.gpu
@pytest.mark.timeout(150)  # two engines with CUDA graphs
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a GPU with FP8 (sm89+), no interpreter")
def test_gpu_tiny_fp8_llama_tokens_equal_with_the_fused_quantization_on_and_off(tiny_checkpoints):
    """24 sequences: the decode steps (24 rows > 16) replay CUDA graphs captured with the fused kernels."""
    kw = dict(dtype="fp8", n=24)
    on, launches = _tiny_llama_tokens(tiny_checkpoints["llama"], True, **kw)
    off, none = _tiny_llama_tokens(tiny_checkpoints["llama"], False, **kw)
    assert launches > 0 and none == 0
    assert on == off
