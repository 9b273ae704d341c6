"""An FP8 linear's route scales left to the quantizer that reads its output (fp8_utils.ScaledProduct,
fp8_fused.link_deferred_scale): the quantizers fed an unscaled product and its scales against the same quantizers
fed the scaled tensor, ScaledProduct.value, which linears are linked where, the FP8 linear's method returning one, and
a tiny FP8 Llama's tokens with the switch on and off. CPU under the interpreter; CUDA (gpu)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from shardllm.layers import microbatch_overlap, triton_ops  # noqa: E402
from shardllm.layers.activation import SiluAndMul  # noqa: E402
from shardllm.layers.layernorm import RMSNorm  # noqa: E402
from shardllm.layers.linear import MergedColumnParallelLinear  # noqa: E402
from shardllm.layers.quantization import (  # noqa: E402
    QuantizationConfig,
    fp8,
    fp8_fused,
    fp8_triton,
    fp8_utils,
    quant_config_scope,
)
from shardllm.layers.quantization.fp8_utils import ScaledProduct  # noqa: E402
from tests.layers.test_fp8_fused_act_quant import (  # noqa: E402
    INTERPRET,
    assert_same_quantization,
    cpu,
    gpu,
    greedy_tokens,
)


def _product(device: str, m: int, n: int, seed: int) -> ScaledProduct:
    """An unscaled bf16 product of integer-grid size (as the per-tensor kernel gives it) and plausible scales."""
    g = torch.Generator(device=device).manual_seed(seed)
    p = (torch.randn(m, n, device=device, generator=g) * 3e4).to(torch.bfloat16)
    xs = torch.rand(m, 1, device=device, generator=g) * 1e-2 + 1e-4
    ws = torch.rand(n, device=device, generator=g) * 1e-3 + 1e-5
    p[1] = 0  # a zero row: the quantizer's floor scale
    return ScaledProduct(p, xs, ws)


def _scaled(sp: ScaledProduct) -> torch.Tensor:
    """The product scaled by the route's own launch (fp8_triton.scale_rows_cols: interpreted on the CPU, whose bf16
    rounding is the interpreter's as in the quantizers; on a GPU what ScaledProduct.value runs)."""
    return fp8_triton.scale_rows_cols(sp.product.clone(), sp.row_scale, sp.col_scale, torch.bfloat16)


def check_norm(device: str, m: int, hidden: int, residual: bool) -> None:
    sp = _product(device, m, hidden, hidden + residual)
    g = torch.Generator(device=device).manual_seed(7)
    r = torch.randn(m, hidden, device=device, generator=g).to(torch.bfloat16) if residual else None
    if r is not None:
        r[1] = 0
    w = (torch.rand(hidden, device=device, generator=g) + 0.5).to(torch.bfloat16)
    unscaled = sp.product.clone()
    if residual:
        got, res_out = fp8_fused.rms_norm_quant(sp.product, r, w, 1e-5, scales=(sp.row_scale, sp.col_scale))
    else:
        got = fp8_fused.rms_norm_quant(sp.product, None, w, 1e-5, scales=(sp.row_scale, sp.col_scale))
    assert torch.equal(sp.product, unscaled)  # the kernel reads the product, never scales it in place
    value = _scaled(sp)
    if residual:
        ref, res_ref = triton_ops.fused_add_rms_norm(value, r, w, 1e-5)
        assert torch.equal(res_out, res_ref)  # round(round(p * xs * ws) + residual), bit for bit
    else:
        ref = triton_ops.rms_norm(value, w, 1e-5)
    assert_same_quantization(got, ref, torch.bfloat16)


def check_silu(device: str, m: int, d: int, max_block: int) -> None:
    sp = _product(device, m, 2 * d, d)
    got = fp8_fused.silu_and_mul_quant(sp.product, max_block, scales=(sp.row_scale, sp.col_scale))
    assert_same_quantization(got, triton_ops.silu_and_mul(_scaled(sp)), torch.bfloat16)


@cpu
@pytest.mark.parametrize("residual", [False, True], ids=["norm", "add_norm"])
@pytest.mark.parametrize("chunks", [1, 3])
def test_norm_quantizer_applies_the_scales_as_value_does(monkeypatch, residual, chunks):
    if chunks > 1:  # rows wider than the block: the chunked passes load the product three times
        monkeypatch.setattr(triton_ops, "RMS_MAX_BLOCK", 64)
    check_norm("cpu", 5, 96 if chunks == 1 else 160, residual)


@cpu
@pytest.mark.parametrize("max_block", [1024, 32], ids=["one_pass", "two_pass"])
def test_silu_quantizer_applies_the_scales_as_value_does(max_block):
    check_silu("cpu", 4, 80, max_block)  # up's channel scales are the second half of the product's


def test_value_scales_once_in_place_and_bad_scales_are_refused():
    sp = _product("cpu", 3, 32, 0)
    p = sp.product.clone()
    ref = (p.float() * sp.row_scale * sp.col_scale).to(torch.bfloat16)
    out = sp.value()
    assert out is sp.product and torch.equal(out, ref)
    assert sp.value() is out and torch.equal(out, ref)  # a second reader gets it as is, not scaled twice
    with pytest.raises(ValueError, match="scales are"):
        fp8_fused.rms_norm_quant(p, None, torch.ones(32, dtype=torch.bfloat16), 1e-5,
                                 scales=(sp.row_scale, sp.col_scale[:16]))
    with pytest.raises(ValueError, match="scales are"):
        fp8_fused.silu_and_mul_quant(p, scales=(sp.row_scale.double(), sp.col_scale))


def test_route_defers_only_its_in_place_bf16_product(monkeypatch):
    """scaled_mm_rowwise(defer=True): a ScaledProduct where the per-tensor route runs with its product in the
    output dtype, equal once scaled to the undeferred call; the tensor elsewhere (fp32 product, past the bound)."""
    g = torch.Generator().manual_seed(3)
    x_q, xs = fp8_utils.quantize_per_row(torch.randn(4, 64, generator=g))
    w_q, ws = fp8_utils.quantize_per_row(torch.randn(48, 64, generator=g))
    args = (x_q, w_q, xs, ws.view(1, -1), torch.bfloat16)
    if "tensorwise" not in fp8_utils.fp8_recipes(x_q.device):
        pytest.skip("this torch has no per-tensor FP8 GEMM on the CPU")
    deferred = fp8_utils.scaled_mm_rowwise(*args, defer=True)
    assert isinstance(deferred, ScaledProduct) and deferred.shape == (4, 48)
    assert torch.equal(deferred.value(), fp8_utils.scaled_mm_rowwise(*args))
    assert isinstance(fp8_utils.scaled_mm_rowwise(*args, fp32_product=True, defer=True), torch.Tensor)
    monkeypatch.setattr(fp8_utils, "TENSORWISE_MAX_OUTPUT", 4 * 48 - 1)  # the row-wise kernel: nothing to defer
    assert isinstance(fp8_utils.scaled_mm_rowwise(*args, defer=True), torch.Tensor)


@cpu
def test_linked_linear_hands_its_reader_the_product(monkeypatch):
    """gate_up -> SiLU-and-mul as the model wires them: the linear's method returns a ScaledProduct only with
    defer_scale set and the route running; the quantizer's output equals the unlinked pair's bit for bit, and a
    reader without a fused quantizer (RMSNorm here) takes value()."""
    monkeypatch.setattr(fp8_fused, "FORCE", True)
    monkeypatch.setattr(fp8_triton, "FP8_GEMV_MAX_M", 1)
    monkeypatch.setattr(fp8, "cpu_weight_f32", lambda owner, w: None)  # the GPU's route, not the fp32 matmul
    if "tensorwise" not in fp8_utils.fp8_recipes(torch.device("cpu")):
        pytest.skip("this torch has no per-tensor FP8 GEMM on the CPU")
    torch.manual_seed(0)
    with quant_config_scope(QuantizationConfig()):
        gate_up = MergedColumnParallelLinear(32, [48, 48], dtype=torch.bfloat16)
    gate_up.weight_loader(gate_up.weight, torch.randn(96, 32) * 0.1)
    gate_up.quant_method.process_weights_after_loading(gate_up)
    act = SiluAndMul()
    act.quant_target = fp8_fused.ActQuantTarget(gate_up)  # any FP8 linear: only its method's flag is read
    x = fp8_fused.QuantizedActivation(*fp8_triton.quantize_per_token_triton(torch.randn(5, 32).to(torch.bfloat16)),
                                      torch.bfloat16)
    plain = gate_up(x)
    assert isinstance(plain, torch.Tensor)
    gate_up.defer_scale = True
    deferred = gate_up(x)
    assert isinstance(deferred, ScaledProduct)
    # the quantizer's result equals the scale launch's then the quantizer's (the interpreter's bf16 rounding on
    # both sides: the CPU route scales through torch, which rounds differently)
    got, ref = act(deferred), act(_scaled(deferred))
    assert torch.equal(got.data.view(torch.uint8), ref.data.view(torch.uint8)) and torch.equal(got.scale, ref.scale)
    assert torch.equal(deferred.value(), plain)  # the same product as the undeferred call's
    norm = RMSNorm(96, 1e-5, dtype=torch.bfloat16)  # no quant target: materializes
    assert torch.equal(norm(gate_up(x)), norm(plain))
    one_row = fp8_fused.QuantizedActivation(x.data[:1], x.scale[:1], torch.bfloat16)
    act.quant_target = None  # no fused quantizer: the activation takes value() too
    assert torch.equal(act(gate_up(one_row)), act(gate_up.quant_method.apply(gate_up, one_row, None).value()))
    act.quant_target = fp8_fused.ActQuantTarget(gate_up)
    once = gate_up(x)
    once.value()  # a reader before scaled it in place: the quantizer must not scale it again
    got, ref = act(once), act(plain)  # (both scaled by the CPU route's torch epilogue)
    assert torch.equal(got.data.view(torch.uint8), ref.data.view(torch.uint8)) and torch.equal(got.scale, ref.scale)
    # unquantized input (o_proj's, from the attention): quantized by the method itself, deferred for (M, K) rows
    # only; (B, T, K) rows come back as a tensor
    h = torch.randn(5, 32).to(torch.bfloat16)
    assert isinstance(gate_up(h), ScaledProduct) and torch.equal(gate_up(h).value(), gate_up(h[None])[0])
    assert isinstance(gate_up(h[None]), torch.Tensor)


FP8 = QuantizationConfig()


def _tiny(cls_name: str = "llama", cfg: QuantizationConfig | None = FP8, **extra):
    from transformers import LlamaConfig, MixtralConfig, Qwen2MoeConfig

    from shardllm.models.llama import LlamaForCausalLM
    from shardllm.models.mixtral import MixtralForCausalLM
    from shardllm.models.qwen_moe import Qwen2MoeForCausalLM

    size = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                num_key_value_heads=1, **extra)
    if cls_name == "mixtral":
        hf, cls = MixtralConfig(num_local_experts=2, **size), MixtralForCausalLM
    elif cls_name == "qwen2_moe":  # a shared expert beside the experts: an act_fn, no dense gate_up / down
        hf, cls = Qwen2MoeConfig(num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32,
                                 shared_expert_intermediate_size=64, **size), Qwen2MoeForCausalLM
    else:
        hf, cls = LlamaConfig(**size), LlamaForCausalLM
    with quant_config_scope(cfg):
        model = cls(hf, 64)
    fp8_fused.link_act_quant(model)
    return model


def _deferring(model) -> set[str]:
    return {name for name, m in model.named_modules() if getattr(m, "defer_scale", False)}


def test_which_linears_leave_their_scales_to_the_reader(monkeypatch):
    model = _tiny()
    assert fp8_fused.link_deferred_scale(model) == 8
    # every layer's o and gate_up; down into the next layer's input norm, so not the last layer's (the final
    # norm feeds the bf16 LM head: no quantizer)
    assert _deferring(model) == {f"model.layers.{i}.{n}" for i in range(3) for n in ("self_attn.o_proj",
                                 "mlp.gate_up_proj")} | {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    model = _tiny()
    model.end_layer = 2  # a pipeline stage of layers 0-1: layer 1's output goes to the next stage
    fp8_fused.link_deferred_scale(model)
    assert "model.layers.1.mlp.down_proj" not in _deferring(model) and "model.layers.0.mlp.down_proj" in \
        _deferring(model)
    assert fp8_fused.link_deferred_scale(_tiny(cfg=None)) == 0  # bf16
    assert fp8_fused.link_deferred_scale(_tiny(cfg=QuantizationConfig(
        source="fp8", is_checkpoint_fp8=True, weight_strategy="tensor", activation_scheme="static"))) == 0
    biased = _tiny(attention_bias=True)  # o_proj with a bias: added after the product, so no deferral
    fp8_fused.link_deferred_scale(biased)
    assert not any("o_proj" in n for n in _deferring(biased))
    mlp_bias = _tiny(mlp_bias=True)  # gate_up and down with biases
    fp8_fused.link_deferred_scale(mlp_bias)
    assert _deferring(mlp_bias) == {f"model.layers.{i}.self_attn.o_proj" for i in range(3)}
    # MoE: the MLP is experts (no dense gate_up / down), and the post-attention norm feeds no dense FP8 linear
    assert fp8_fused.link_deferred_scale(_tiny("mixtral")) == 0
    assert fp8_fused.link_deferred_scale(_tiny("qwen2_moe")) == 0
    monkeypatch.setattr(microbatch_overlap, "ENABLED", True)  # the overlap splits rows between layers
    monkeypatch.setattr(microbatch_overlap, "AT_TP1", True)
    split = _tiny()
    fp8_fused.link_deferred_scale(split)
    assert _deferring(split) == {f"model.layers.{i}.mlp.gate_up_proj" for i in range(3)}
    monkeypatch.setattr(microbatch_overlap, "ENABLED", False)
    monkeypatch.setattr(fp8_fused, "ENABLED", False)  # SHARDLLM_FP8_FUSED_ACT_QUANT=0: no reader takes one
    assert fp8_fused.link_deferred_scale(_tiny()) == 0
    monkeypatch.setattr(fp8_fused, "ENABLED", True)
    monkeypatch.setattr(fp8_fused, "DEFER_SCALE", False)  # SHARDLLM_FP8_DEFER_SCALE=0
    assert fp8_fused.link_deferred_scale(_tiny()) == 0


def test_row_parallel_linears_keep_their_scales_at_tp_2(monkeypatch):
    """At tp > 1 o and down all-reduce their output first: only gate_up (column-parallel) defers."""
    from types import SimpleNamespace

    from shardllm.distributed import parallel_state

    model = _tiny()
    monkeypatch.setattr(parallel_state, "get_parallel_context", lambda: SimpleNamespace(tp_size=2))
    assert fp8_fused.link_deferred_scale(model) == 3
    assert _deferring(model) == {f"model.layers.{i}.mlp.gate_up_proj" for i in range(3)}


def _tiny_llama_tokens_cpu(path: str, defer: bool) -> tuple[list, int]:
    """Greedy tokens of the tiny Llama in FP8 on the CPU, its linears through the GPU's per-tensor route (torch's
    CPU recipe; the epilogue the interpreted scale kernel, whose bf16 rounding is the quantizers'), the fused
    quantizers interpreted; and how many ScaledProducts the quantizers took."""
    from shardllm import LLM

    took = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fp8_fused, "DEFER_SCALE", defer)  # read when the weights are linked
        llm = LLM(path, dtype="bfloat16", quantization="fp8", device="cpu", enforce_eager=True, num_kv_blocks=64,
                  max_batch_size=32)
        try:
            mp.setattr(triton_ops, "USE_TRITON", True)
            mp.setattr(fp8_fused, "FORCE", True)
            mp.setattr(fp8, "quantize_per_row", lambda x: fp8_triton.quantize_per_token_triton(x.contiguous()))
            mp.setattr(fp8, "cpu_weight_f32", lambda owner, w: None)
            mp.setattr(fp8_utils, "apply_row_col_scales", lambda acc, xs, ws, dtype, in_place=False:
                       fp8_triton.scale_rows_cols(acc, xs.contiguous(), ws.contiguous(), dtype, in_place=in_place))
            for name in ("rms_norm_quant", "silu_and_mul_quant"):
                fn = getattr(fp8_fused, name)
                mp.setattr(fp8_fused, name, lambda *a, _fn=fn, **k: took.append(k.get("scales") is not None)
                           or _fn(*a, **k))
            tokens = greedy_tokens(llm, 3)
        finally:
            llm.shutdown()
    return tokens, sum(took)


@cpu
def test_tiny_fp8_llama_tokens_equal_with_deferred_scales_on_and_off(tiny_checkpoints):
    """The whole model: o into the post-attention norm, gate_up into SiLU-and-mul, down into the next layer's input
    norm, in the prefill (21 rows) and the 3-row decode steps; the last layer's down feeds the final norm."""
    on, took_on = _tiny_llama_tokens_cpu(tiny_checkpoints["llama"], True)
    off, took_off = _tiny_llama_tokens_cpu(tiny_checkpoints["llama"], False)
    assert on == off
    assert took_on > 0 and took_off == 0


def _tiny_llama_tokens(path: str, defer: bool, n: int) -> tuple[list, int]:
    """Greedy tokens of the tiny Llama in FP8 (n sequences) with SHARDLLM_FP8_DEFER_SCALE on or off, and how many
    scale launches its linears made (captured once per CUDA graph)."""
    from shardllm import LLM

    calls = []
    with pytest.MonkeyPatch.context() as mp:
        fn = fp8_triton.scale_rows_cols
        mp.setattr(fp8_triton, "scale_rows_cols", lambda *a, **k: calls.append(1) or fn(*a, **k))
        mp.setattr(fp8_fused, "DEFER_SCALE", defer)
        llm = LLM(path, dtype="fp8", num_kv_blocks=64, max_batch_size=32)
        try:
            tokens = greedy_tokens(llm, n, max_tokens=4)
        finally:
            llm.shutdown()
    return tokens, len(calls)


@pytest.mark.gpu
@pytest.mark.timeout(150)  # two engines with CUDA graphs
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET or torch.cuda.get_device_capability() < (9, 0),
                    reason="needs a GPU with FP8 GEMMs (sm90), no interpreter")
def test_gpu_tiny_fp8_llama_tokens_equal_with_deferred_scales_on_and_off(tiny_checkpoints):
    """8 sequences: decode steps of 8 rows, through the per-tensor route, replayed from CUDA graphs."""
    on, launches_on = _tiny_llama_tokens(tiny_checkpoints["llama"], True, 8)
    off, launches_off = _tiny_llama_tokens(tiny_checkpoints["llama"], False, 8)
    assert on == off
    assert launches_off > launches_on > 0  # qkv keeps its scale launch; o, gate_up and down (not the last) defer


@gpu
@pytest.mark.parametrize("residual", [False, True], ids=["norm", "add_norm"])
@pytest.mark.parametrize("hidden", [4096, 16384])
def test_gpu_norm_quantizer_applies_the_scales(residual, hidden):
    check_norm("cuda", 256, hidden, residual)


@gpu
@pytest.mark.parametrize("d,max_block", [(14336, 16384), (14336, 4096)])
def test_gpu_silu_quantizer_applies_the_scales(d, max_block):
    check_silu("cuda", 36, d, max_block)
