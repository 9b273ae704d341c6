"""FP8 quantizer and linear methods on CPU (torch's emulated _scaled_mm): round trips, zero rows, every recipe
against its dequantized fp32 twin, shard bookkeeping of fused layers, format detection and bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shardllm.distributed import parallel_state
from shardllm.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from shardllm.layers.quantization import QuantizationConfig, prepare_quantized_model, quant_config_scope
from shardllm.layers.quantization.formats import detect_quantization
from shardllm.layers.quantization.fp8_utils import (
    FP8_DTYPE,
    MIN_SCALE,
    dequantize,
    fp8_recipes,
    quantize_per_block,
    quantize_per_row,
    quantize_per_tensor,
    quantize_per_token_group,
)

E4M3_REL_ERR = 2.0**-4  # 3 mantissa bits: round-to-nearest is within half an ulp, 2^-4 relative


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def test_round_trip_within_e4m3_relative_error_and_matches_a_float_reference():
    torch.manual_seed(0)
    x = torch.randn(64, 256) * torch.logspace(-3, 2, 64)[:, None]  # rows of very different magnitudes
    q, scale = quantize_per_row(x)
    assert q.dtype == FP8_DTYPE and scale.shape == (64, 1)
    back = dequantize(q, scale)
    # normal range of e4m3 (|x / scale| >= 2^-6): relative error at most 2^-4
    normal = (x / scale).abs() >= 2.0**-6
    rel = ((back - x).abs() / x.abs())[normal]
    assert float(rel.max()) <= E4M3_REL_ERR
    # float reference: scale = amax / 448 exactly, the row's largest value maps onto 448
    assert torch.allclose(scale[:, 0], x.abs().amax(dim=1) / 448)
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((64,), 448.0))


def test_zero_rows_and_blocks_get_a_finite_floor_scale():
    x = torch.zeros(4, 32)
    x[1] = torch.randn(32)
    q, scale = quantize_per_row(x)
    assert float(scale[0]) == pytest.approx(MIN_SCALE) and torch.isfinite(scale).all()
    assert torch.equal(dequantize(q, scale)[0], torch.zeros(32))
    qb, sb = quantize_per_block(x, (2, 16))
    assert torch.isfinite(sb).all() and float(sb[1, 0]) == pytest.approx(MIN_SCALE)  # rows 2-3 are zero
    _, st = quantize_per_tensor(torch.zeros(3, 3))
    assert float(st) == pytest.approx(MIN_SCALE)


def test_block_quantization_edges_and_token_groups():
    torch.manual_seed(1)
    w = torch.randn(40, 72)  # neither dim a multiple of the 16 x 32 block: padded edge blocks
    q, s = quantize_per_block(w, (16, 32))
    assert s.shape == (3, 3)
    assert float(s[2, 2]) == pytest.approx(float(w[32:, 64:].abs().max()) / 448)
    assert float(((dequantize(q, s, (16, 32)) - w).abs() / w.abs().clamp(min=1e-2)).max()) < 0.2
    x = torch.randn(5, 64)
    xq, xs = quantize_per_token_group(x, 32)
    assert xs.shape == (5, 2)
    assert float(xs[3, 1]) == pytest.approx(float(x[3, 32:].abs().max()) / 448)


def test_cpu_probe_finds_the_emulated_recipes():
    assert {"tensorwise", "rowwise"} <= fp8_recipes(torch.device("cpu"))


def _linear(cls, cfg, *args, **kw):
    with quant_config_scope(cfg):
        return cls(*args, **kw)


@pytest.mark.parametrize("weight_only", [False, True])
def test_online_fp8_linear_equals_its_dequantized_twin(weight_only):
    """Per-channel online W8A8 = F.linear(dequant(x per token), dequant(W)); weight-only = F.linear(x, dequant(W))."""
    torch.manual_seed(2)
    w_gate, w_up, x = torch.randn(32, 64), torch.randn(48, 64), torch.randn(7, 64)
    layer = _linear(MergedColumnParallelLinear, QuantizationConfig(weight_only=weight_only), 64, [32, 48])
    layer.weight_loader(layer.weight, w_gate, 0)  # quantized row by row as each part arrives
    layer.weight_loader(layer.weight, w_up, 1)
    layer.quant_method.process_weights_after_loading(layer)
    assert layer.weight.dtype == FP8_DTYPE and layer.weight_scale.shape == (80,)
    w = torch.cat([w_gate, w_up])
    wq, ws = quantize_per_row(w)
    assert torch.equal(layer.weight.float(), wq.float()) and torch.equal(layer.weight_scale, ws[:, 0])
    xq, xs = quantize_per_row(x)
    twin = F.linear(x if weight_only else dequantize(xq, xs), dequantize(wq, ws))
    y = layer(x)
    assert torch.allclose(y, twin, rtol=1e-5, atol=1e-5)
    assert _cos(y, F.linear(x, w)) >= 0.999  # and close to the unquantized product


def test_per_tensor_checkpoint_scales_of_fused_parts_are_expanded_not_requantized():
    """q, k, v each bring their own per-tensor scale: the layer equals dequantize-then-compute exactly."""
    torch.manual_seed(3)
    cfg = QuantizationConfig(source="fp8", weight_strategy="tensor", is_checkpoint_fp8=True,
                             activation_scheme="static")
    layer = _linear(QKVParallelLinear, cfg, 32, 8, 4, 2)  # q 32 rows, k 16, v 16
    parts = {"q": torch.randn(32, 32) * 3, "k": torch.randn(16, 32) * 0.1, "v": torch.randn(16, 32)}
    deq = []
    for name, w in parts.items():
        q, s = quantize_per_tensor(w)
        layer.weight_loader(layer.weight, q, name)
        layer.weight_loader(layer.weight_scale, s.reshape(1), name)
        layer.weight_loader(layer.input_scale, torch.tensor([0.01 * (1 + len(deq))]), name)
        deq.append(dequantize(q, s))
    layer.quant_method.process_weights_after_loading(layer)
    assert layer.weight_scale.shape == (64,) and float(layer.input_scale) == pytest.approx(0.03)  # max of three
    x = torch.randn(5, 32)
    x_deq = (x / 0.03).clamp(-448, 448).to(FP8_DTYPE).float() * 0.03  # static activation scale
    assert torch.allclose(layer(x), F.linear(x_deq, torch.cat(deq)), rtol=1e-5, atol=1e-5)


def test_block_linear_equals_its_dequantized_twin():
    torch.manual_seed(4)
    cfg = QuantizationConfig(source="fp8", weight_strategy="block", is_checkpoint_fp8=True,
                             weight_block_size=(16, 32), weight_scale_name="weight_scale_inv")
    layer = _linear(RowParallelLinear, cfg, 64, 48)
    w = torch.randn(48, 64)
    q, s = quantize_per_block(w, (16, 32))
    layer.weight_loader(layer.weight, q)
    layer.weight_loader(layer.weight_scale_inv, s)
    x = torch.randn(6, 64)
    xq, xs = quantize_per_token_group(x, 32)
    twin = F.linear(xq.float() * xs.repeat_interleave(32, dim=1), dequantize(q, s, (16, 32)))
    y = layer(x)
    assert torch.allclose(y, twin, rtol=1e-5, atol=1e-5)
    assert _cos(y, F.linear(x, w)) >= 0.999


def test_fp8_shape_guard_names_the_fix():
    with pytest.raises(ValueError, match="divisible by 16.*tensor_parallel_size"):
        _linear(RowParallelLinear, QuantizationConfig(), 24, 32)


class _TwoLayerModel(torch.nn.Module):
    packed = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v")}

    def __init__(self, head_size: int = 16):
        super().__init__()
        self.self_attn = torch.nn.Module()
        self.self_attn.qkv_proj = QKVParallelLinear(64, head_size, 4, 2)
        self.self_attn.o_proj = RowParallelLinear(4 * head_size, 64)


def test_block_size_not_dividing_after_tp_names_the_layer_and_the_tp_sizes_that_work():
    cfg = QuantizationConfig(source="fp8", weight_strategy="block", is_checkpoint_fp8=True,
                             weight_block_size=(32, 32), weight_scale_name="weight_scale_inv")
    old = parallel_state.get_parallel_context()
    parallel_state.set_parallel_context(parallel_state.ParallelContext(tp_rank=1, tp_size=2))
    try:
        with quant_config_scope(cfg):
            model = _TwoLayerModel()
        with pytest.raises(ValueError, match=r"self_attn\.qkv_proj.*tensor_parallel_size=2.*work.*\[1\]"):
            prepare_quantized_model(model, cfg)
    finally:
        parallel_state.set_parallel_context(old)


def test_ignored_modules_stay_unquantized_and_partial_fused_ignores_are_refused():
    cfg = QuantizationConfig(source="compressed-tensors", weight_strategy="channel", is_checkpoint_fp8=True,
                             ignore=("re:.*self_attn\\.[qkv]_proj",))
    with quant_config_scope(cfg):
        model = _TwoLayerModel()
    prepare_quantized_model(model, cfg)
    assert model.self_attn.qkv_proj.weight.dtype == torch.get_default_dtype()
    assert not hasattr(model.self_attn.qkv_proj, "weight_scale")
    assert model.self_attn.o_proj.weight.dtype == FP8_DTYPE
    partial = QuantizationConfig(is_checkpoint_fp8=True, ignore=("self_attn.k_proj",))
    with quant_config_scope(partial):
        model = _TwoLayerModel()
    with pytest.raises(ValueError, match="ignore all of them or none"):
        prepare_quantized_model(model, partial)


class _Cfg:
    def __init__(self, qc=None):
        if qc is not None:
            self.quantization_config = qc


def test_format_detection(tmp_path):
    hf_block = detect_quantization(_Cfg({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": [128, 128]}), None, None)
    assert (hf_block.weight_strategy, hf_block.weight_scale_name, hf_block.weight_block_size) == (
        "block", "weight_scale_inv", (128, 128))
    auto_fp8 = detect_quantization(_Cfg({"quant_method": "fp8", "activation_scheme": "static",
                                         "ignored_layers": ["lm_head"]}), None, "fp8")
    assert (auto_fp8.weight_strategy, auto_fp8.activation_scheme, auto_fp8.ignore) == ("tensor", "static",
                                                                                       ("lm_head",))
    ct = detect_quantization(_Cfg({
        "quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
        "config_groups": {"group_0": {"targets": ["Linear"],
                                      "weights": {"type": "float", "num_bits": 8, "strategy": "channel"},
                                      "input_activations": {"type": "float", "num_bits": 8, "dynamic": True,
                                                            "strategy": "token"}}}}), None, None)
    assert (ct.source, ct.weight_strategy, ct.activation_scheme) == ("compressed-tensors", "channel", "dynamic")
    (tmp_path / "hf_quant_config.json").write_text(
        '{"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": "FP8", '
        '"exclude_modules": ["lm_head"]}}')
    mo = detect_quantization(_Cfg(), str(tmp_path), None)
    assert (mo.source, mo.weight_strategy, mo.activation_scheme) == ("modelopt", "tensor", "static")
    mo2 = detect_quantization(_Cfg({"quant_method": "modelopt", "quant_algo": "FP8", "ignore": ["lm_head"]}),
                              None, None)
    assert mo2.source == "modelopt"
    assert detect_quantization(_Cfg(), None, "fp8") == QuantizationConfig()
    assert detect_quantization(_Cfg(), None, None) is None


@pytest.mark.parametrize("qc,requested,match", [
    (None, "int4", "unknown quantization 'int4'"),
    ({"quant_method": "gptq", "bits": 4}, None, "'gptq'.*dtype='fp8'"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized",
      "config_groups": {"g": {"weights": {"type": "int", "num_bits": 4}}}}, None, "float-quantized FP8 only"),
    ({"quant_method": "modelopt", "quant_algo": "NVFP4"}, None, "FP8 only"),
])
def test_bad_quantization_configs_are_refused_with_the_fix(qc, requested, match):
    with pytest.raises(ValueError, match=match):
        detect_quantization(_Cfg(qc), None, requested)


def test_online_row_and_column_parallel_shards_quantize_their_own_slice():
    """tp = 2, rank 1: a column-parallel layer holds rows [N/2, N) with their full-row scales (the same as one
    rank's), a row-parallel layer holds columns [K/2, K) with per-row scales of that slice."""
    torch.manual_seed(5)
    w = torch.randn(64, 96)
    old = parallel_state.get_parallel_context()
    parallel_state.set_parallel_context(parallel_state.ParallelContext(tp_rank=1, tp_size=2))
    try:
        col = _linear(MergedColumnParallelLinear, QuantizationConfig(), 96, [32, 32])
        col.weight_loader(col.weight, w)  # a checkpoint storing gate and up fused: each part's rank-1 half
        row = _linear(RowParallelLinear, QuantizationConfig(), 96, 64)
        row.weight_loader(row.weight, w)
    finally:
        parallel_state.set_parallel_context(old)
    mine = torch.cat([w[16:32], w[48:64]])
    q, s = quantize_per_row(mine)
    assert torch.equal(col.weight.float(), q.float()) and torch.equal(col.weight_scale, s[:, 0])
    q, s = quantize_per_row(w[:, 48:])
    assert torch.equal(row.weight.float(), q.float()) and torch.equal(row.weight_scale, s[:, 0])


@pytest.mark.parametrize("pattern", ["model.mlp", "model.mlp.experts", "re:.*mlp\\.experts", "re:.*\\.mlp$"])
def test_experts_are_ignored_under_either_spelling(pattern):
    """Checkpoints name MoE experts as `...mlp` or `...mlp.experts`: either pattern leaves the fused experts
    unquantized (one spelling matching and the other not is not a partial ignore)."""
    from shardllm.layers.moe import FusedMoE

    cfg = QuantizationConfig(source="compressed-tensors", weight_strategy="channel", is_checkpoint_fp8=True,
                             ignore=(pattern,))
    root = torch.nn.Module()
    root.model = torch.nn.Module()
    with quant_config_scope(cfg):
        root.model.mlp = FusedMoE(4, 2, 32, 64, renormalize=True)
    assert root.model.mlp.quant_method is not None
    prepare_quantized_model(root, cfg)
    assert root.model.mlp.quant_method is None


@pytest.mark.parametrize("fp32_product", [True, False], ids=["fp32-product", "product-in-out-dtype"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rowwise_product_through_the_per_tensor_recipe_equals_the_rowwise_one(monkeypatch, out_dtype, fp32_product):
    """scaled_mm_rowwise_by_tensorwise (unit-scale per-tensor GEMM, then both scales) gives the row-wise recipe's
    product up to the summation order's rounding; an fp16 output never overflows on its unscaled product (up to
    448^2 K: here ~10^6, past fp16's 65504)."""
    from shardllm.layers.quantization import fp8_utils
    from shardllm.layers.quantization.fp8_utils import scaled_mm_rowwise, scaled_mm_rowwise_by_tensorwise

    monkeypatch.setattr(fp8_utils, "TENSORWISE_MAX_OUTPUT", 0)  # `want` from the row-wise recipe, not the route
    torch.manual_seed(3)
    x = torch.randn(33, 64) * torch.logspace(-2, 1, 33)[:, None]
    xq, xs = quantize_per_row(x)
    wq, ws = quantize_per_row(torch.randn(48, 64) * 0.1)
    xq[0], wq[0] = 448.0, 448.0  # an unscaled product of 448^2 x 64 in row 0, column 0
    want = scaled_mm_rowwise(xq, wq, xs, ws.view(1, -1), out_dtype)  # the emulated row-wise _scaled_mm
    got = scaled_mm_rowwise_by_tensorwise(xq, wq, xs, ws.view(1, -1), out_dtype, fp32_product=fp32_product)
    assert got.dtype == out_dtype and got.shape == (33, 48)
    # fp32: the summation order; bf16: one rounding step, two with the product rounded to bf16 first
    tol = 1e-5 if out_dtype == torch.float32 else 2**-7 if out_dtype == torch.bfloat16 and not fp32_product else 2**-8
    assert torch.isfinite(got).all()
    assert float((got.float() - want.float()).abs().max()) <= tol * float(want.float().abs().max())
    twin = dequantize(xq, xs) @ dequantize(wq, ws).t()
    assert torch.allclose(got.float(), twin, rtol=1e-2, atol=1e-3 * float(twin.abs().max()))


def test_row_col_scale_kernel_equals_torch_under_the_interpreter():
    """fp8_triton.scale_rows_cols (the epilogue of the per-tensor route on a GPU) over a ragged last column tile:
    bit-equal to (acc * x_scale * w_scale) in fp32; in bf16 within one ulp (the interpreter's cast to bf16 does not
    round to nearest; the GPU test checks bit-equality there)."""
    from shardllm.layers.quantization.fp8_triton import HAS_TRITON, scale_rows_cols

    if not HAS_TRITON:
        pytest.skip("needs triton (its interpreter on CPU)")
    torch.manual_seed(4)
    acc = torch.randn(5, 1500) * 1e4
    xs, ws = torch.rand(5, 1) * 1e-2 + 1e-4, torch.rand(1, 1500) * 1e-3 + 1e-5
    got = scale_rows_cols(acc, xs, ws, torch.float32)
    assert got.dtype == torch.float32 and torch.equal(got, acc * xs * ws)
    got = scale_rows_cols(acc, xs, ws, torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.allclose(got.float(), acc * xs * ws, rtol=2**-7, atol=0)
    wide = torch.randn(3, 1500 + 64)[:, :1500]  # rows with a gap: acc's row stride is honoured
    assert torch.equal(scale_rows_cols(wide, xs[:3], ws, torch.float32), wide * xs[:3] * ws)
    for args in [(acc.t().contiguous().t(), xs, ws), (acc, xs[:1], ws), (acc, xs, ws[:, :10]),
                 (acc.double(), xs, ws)]:  # a column stride, scales of the wrong size, an fp64 acc
        with pytest.raises(ValueError, match="scale_rows_cols"):
            scale_rows_cols(*args, torch.bfloat16)
    with pytest.raises(ValueError, match="in_place"):  # in place keeps acc's dtype
        scale_rows_cols(acc, xs, ws, torch.bfloat16, in_place=True)
    product = (acc / 64).to(torch.bfloat16)  # a bf16 product, scaled where it lies
    want = product.float() * xs * ws
    got = scale_rows_cols(product, xs, ws, torch.bfloat16, in_place=True)
    assert got.data_ptr() == product.data_ptr() and torch.allclose(got.float(), want, rtol=2**-7, atol=0)


def test_the_rowwise_gemm_takes_the_per_tensor_route_up_to_its_output_limit(monkeypatch):
    """SHARDLLM_FP8_TENSORWISE_MAX_OUTPUT (fp8_utils.TENSORWISE_MAX_OUTPUT): GEMMs with at most that many output
    elements (any N) take scaled_mm_rowwise_by_tensorwise where the device has the fp32-output per-tensor recipe;
    larger ones, and 0, the row-wise recipe."""
    from shardllm.layers.quantization import fp8_utils

    assert "tensorwise_f32" in fp8_recipes(torch.device("cpu"))
    taken, route = [], fp8_utils.scaled_mm_rowwise_by_tensorwise
    monkeypatch.setattr(fp8_utils, "scaled_mm_rowwise_by_tensorwise",
                        lambda xq, wq, *a, **k: taken.append(xq.shape[0] * wq.shape[0]) or route(xq, wq, *a, **k))
    for limit, m, n in [(128, 8, 16), (128, 9, 16), (0, 1, 16), (0, 0, 16), (1 << 20, 1, 28672)]:
        monkeypatch.setattr(fp8_utils, "TENSORWISE_MAX_OUTPUT", limit)
        wq, ws = quantize_per_row(torch.randn(n, 32))
        xq, xs = quantize_per_row(torch.randn(m, 32))
        y = fp8_utils.scaled_mm_rowwise(xq, wq, xs, ws.view(1, -1), torch.float32)
        assert torch.allclose(y, dequantize(xq, xs) @ dequantize(wq, ws).t(), rtol=1e-5, atol=1e-5)
    assert taken == [128, 28672]  # not 9 x 16 > 128, nor at the limit 0 (even for 0 rows); a wide N within it
