"""FP8 on a GPU with FP8 tensor cores: the Triton kernels and cuBLAS recipes against their torch references,
every linear path against its dequantized twin, and a tiny FP8 model's tokens with and without CUDA graphs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shardllm.layers.linear import MergedColumnParallelLinear, RowParallelLinear
from shardllm.layers.quantization import QuantizationConfig, quant_config_scope
from shardllm.layers.quantization.fp8_utils import (
    dequantize,
    fp8_recipes,
    quantize_per_block,
    quantize_per_row,
    quantize_per_token_group,
)

fp8_gpu = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                             reason="needs a GPU with FP8 (sm89+)")
pytestmark = [pytest.mark.gpu, fp8_gpu]  # kernels: the GPU suite's 60 s per test (tests/conftest.py)


def test_probe_finds_rowwise_and_the_triton_kernels_agree():
    from shardllm.layers.quantization.fp8_triton import triton_fp8_ok

    dev = torch.device("cuda")
    assert "rowwise" in fp8_recipes(dev)
    assert triton_fp8_ok(dev)


@pytest.mark.parametrize("m", [1, 2, 7, 16, 17, 300])  # the GEMV (1 row by default), the FP8 GEMM past it
def test_online_linear_on_gpu_equals_its_dequantized_twin(m):
    torch.manual_seed(0)
    dev = torch.device("cuda")
    w_gate, w_up = torch.randn(512, 1024, device=dev) * 0.05, torch.randn(256, 1024, device=dev) * 0.05
    with torch.device(dev), quant_config_scope(QuantizationConfig()):
        layer = MergedColumnParallelLinear(1024, [512, 256], dtype=torch.bfloat16)
    layer.weight_loader(layer.weight, w_gate, 0)
    layer.weight_loader(layer.weight, w_up, 1)
    layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(m, 1024, device=dev).to(torch.bfloat16)
    wq, ws = quantize_per_row(torch.cat([w_gate, w_up]))
    w_deq = dequantize(wq, ws)
    from shardllm.layers.quantization import fp8, fp8_triton

    gemv = m <= fp8_triton.FP8_GEMV_MAX_M  # weight-streaming (SHARDLLM_FP8_GEMV_MAX_M, 1): activations unquantized
    if gemv:
        twin = x.float() @ w_deq.t()
    else:
        xq, xs = quantize_per_row(x)
        twin = dequantize(xq, xs) @ w_deq.t()
    calls, real = [], fp8.fp8_small_m_linear
    fp8.fp8_small_m_linear = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        y = layer(x).float()
    finally:
        fp8.fp8_small_m_linear = real
    assert calls == ([1] if gemv else [])
    assert float((y - twin).abs().max()) <= 1e-2 * float(twin.abs().max())


@pytest.mark.parametrize("route", [0, 1 << 20], ids=["rowwise-kernel", "per-tensor-route"])
@pytest.mark.parametrize("k", [4096, 14336])  # Llama-3-8B's qkv / o / gate_up, and its down proj
def test_rowwise_gemm_fast_accumulation_up_to_max_k_stays_near_its_twin(monkeypatch, k, route):
    """SHARDLLM_FP8_FAST_ACCUM_MAX_K (fp8_utils.FAST_ACCUM_MAX_K, default 8192): K = 4096 accumulates fast, K = 14336
    exactly; each within its bound of the fp32 product of the dequantized operands (max error over the output's max:
    1% fast, 0.5% exact; measured 0.5-0.7% and 0.2-0.3%), and on Hopper the setting reaches torch (0 gives another
    result)."""
    from shardllm.layers.quantization import fp8_utils

    monkeypatch.setattr(fp8_utils, "TENSORWISE_MAX_OUTPUT", route)  # 512 x 1024 outputs: the route at 2^20
    torch.manual_seed(2)
    dev = torch.device("cuda")
    x, w = torch.randn(512, k, device=dev), torch.randn(1024, k, device=dev) * 0.02
    xq, xs = quantize_per_row(x)
    wq, ws = quantize_per_row(w)
    twin = dequantize(xq, xs) @ dequantize(wq, ws).t()
    monkeypatch.setattr(fp8_utils, "FAST_ACCUM_MAX_K", 8192)
    y = fp8_utils.scaled_mm_rowwise(xq, wq, xs, ws.view(1, -1), torch.bfloat16).float()
    fast = k <= 8192
    # the route's bf16 product (fp8_utils.TENSORWISE_FP32 False) rounds once more: up to 2^-9 of the output
    extra = 2**-9 if route and not fp8_utils.TENSORWISE_FP32 else 0
    assert float((y - twin).abs().max()) <= ((1e-2 if fast else 5e-3) + extra) * float(twin.abs().max())
    monkeypatch.setattr(fp8_utils, "FAST_ACCUM_MAX_K", 0)
    exact = fp8_utils.scaled_mm_rowwise(xq, wq, xs, ws.view(1, -1), torch.bfloat16).float()
    assert float((exact - twin).abs().max()) <= (5e-3 + extra) * float(twin.abs().max())
    if torch.cuda.get_device_capability()[0] == 9:  # Hopper: fast accumulation changes bits (measured on an H200)
        assert torch.equal(y, exact) != fast


def test_block_linear_uses_the_cublas_block_recipe_and_equals_its_twin():
    torch.manual_seed(1)
    dev = torch.device("cuda")
    cfg = QuantizationConfig(source="fp8", weight_strategy="block", is_checkpoint_fp8=True,
                             weight_block_size=(128, 128), weight_scale_name="weight_scale_inv")
    with torch.device(dev), quant_config_scope(cfg):
        layer = RowParallelLinear(1024, 768, dtype=torch.bfloat16)
    w = torch.randn(768, 1024, device=dev) * 0.05
    q, s = quantize_per_block(w, (128, 128))
    layer.weight_loader(layer.weight, q)
    layer.weight_loader(layer.weight_scale_inv, s)
    layer.quant_method.process_weights_after_loading(layer)
    x = torch.randn(33, 1024, device=dev).to(torch.bfloat16)
    xq, xs = quantize_per_token_group(x, 128)
    twin = (xq.float() * xs.repeat_interleave(128, dim=1)) @ dequantize(q, s, (128, 128)).t()
    y = layer(x).float()
    assert float((y - twin).abs().max()) <= 1e-2 * float(twin.abs().max())
    assert F.cosine_similarity(y.flatten(), (x.float() @ w.t()).flatten(), dim=0) >= 0.999
    from shardllm.layers.quantization import fp8_utils

    assert fp8_utils._BLOCK_OK[0], "cuBLAS refused the block recipe at M = 33 (rows padded to 16): dequant fallback"


@pytest.mark.timeout(120)  # two engines
@pytest.mark.parametrize("kv", ["auto", "fp8"])
def test_tiny_fp8_model_graphs_equal_eager(tiny_checkpoints, kv):
    from shardllm import LLM, SamplingParams

    # the last prompt spans two of the FP8 cache's 64-token GPU pages (its default block size)
    prompts = [[1, 17, 33, 5, 9, 101, 7], [3, 4], [250, 14, 88, 19, 201, 6, 6, 6, 42, 71, 300, 12, 9],
               [20 + i for i in range(70)]]
    sp = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    out = {}
    for eager in (False, True):
        llm = LLM(tiny_checkpoints["llama"], dtype="fp8", kv_cache_dtype=kv, enforce_eager=eager,
                  num_kv_blocks=256, max_batch_size=8)  # 5% of an H200 was ~2-3M blocks, slow to build
        out[eager] = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
        llm.shutdown()
    assert out[False] == out[True]


def test_fp8_experts_grouped_gemm_equals_the_expert_loop():
    from shardllm.layers.moe import FusedMoE, select_experts

    torch.manual_seed(2)
    dev = torch.device("cuda")
    with torch.device(dev), quant_config_scope(QuantizationConfig()):
        torch.set_default_dtype(torch.bfloat16)
        try:
            moe = FusedMoE(8, 2, 256, 512, renormalize=True)
        finally:
            torch.set_default_dtype(torch.float32)
    for e in range(8):
        for part in (0, 1):
            moe.w13_loader(moe.w13.weight, torch.randn(512, 256, device=dev) * 0.05, (e, part))
        moe.w2_loader(moe.w2.weight, torch.randn(256, 512, device=dev) * 0.05, e)
    x = torch.randn(37, 256, device=dev).to(torch.bfloat16)
    weights, ids = select_experts(torch.randn(37, 8, device=dev), 2, True)
    method = moe.quant_method
    ref = method.apply_reference(moe, x, weights, ids).float()
    got = method.apply_grouped(moe, x, weights, ids).float()
    assert float((got - ref).abs().max()) <= 2e-2 * float(ref.abs().max())


@pytest.mark.parametrize("n,k", [(4096, 4096), (1024, 14336)])  # o_proj's shape, and a K past FAST_ACCUM_MAX_K
def test_rowwise_product_through_the_per_tensor_recipe_on_gpu(monkeypatch, n, k):
    """SHARDLLM_FP8_TENSORWISE_MAX_OUTPUT's route (unit-scale per-tensor GEMM into fp32, then the Triton scale
    epilogue): within a bf16 step of the row-wise recipe with exact accumulation (two with the product in bf16);
    with fast accumulation (each kernel ~1% off at K = 14336, measured) within its bound of the dequantized twin;
    its epilogue bit-equal to torch's; replayed from a CUDA graph with new inputs as it runs eagerly."""
    from shardllm.layers.quantization import fp8_utils
    from shardllm.layers.quantization.fp8_triton import scale_rows_cols

    dev = torch.device("cuda")
    assert "tensorwise_f32" in fp8_recipes(dev)
    torch.manual_seed(5)
    wq, ws = quantize_per_row(torch.randn(n, k, device=dev) * 0.02)
    ws = ws.view(1, -1)
    for m in (17, 64, 256):
        xq, xs = quantize_per_row(torch.randn(m, k, device=dev))
        got = fp8_utils.scaled_mm_rowwise_by_tensorwise(xq, wq, xs, ws, torch.bfloat16)
        want = torch._scaled_mm(xq, wq.t(), xs, ws, out_dtype=torch.bfloat16)
        assert float((got.float() - want.float()).abs().max()) <= 2**-7 * float(want.float().abs().max())
        bf16 = fp8_utils.scaled_mm_rowwise_by_tensorwise(xq, wq, xs, ws, torch.bfloat16, fp32_product=False)
        assert float((bf16.float() - want.float()).abs().max()) <= 2**-6 * float(want.float().abs().max())
        fast = fp8_utils.scaled_mm_rowwise_by_tensorwise(xq, wq, xs, ws, torch.bfloat16, use_fast_accum=True)
        twin = dequantize(xq, xs) @ dequantize(wq, ws.view(-1, 1)).t()
        assert float((fast.float() - twin).abs().max()) <= 2e-2 * float(twin.abs().max())
    acc = torch.randn(64, n, device=dev) * 1e3
    assert torch.equal(scale_rows_cols(acc, xs[:64].contiguous(), ws, torch.bfloat16),
                       (acc * xs[:64] * ws).to(torch.bfloat16))
    monkeypatch.setattr(fp8_utils, "TENSORWISE_MAX_OUTPUT", 64 * n)
    x_buf, xs_buf = torch.zeros_like(xq[:64]), torch.ones_like(xs[:64])
    fp8_utils.scaled_mm_rowwise(x_buf, wq, xs_buf, ws, torch.bfloat16)  # warm: compiled outside the capture
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        y_graph = fp8_utils.scaled_mm_rowwise(x_buf, wq, xs_buf, ws, torch.bfloat16)
    x_buf.copy_(xq[:64])
    xs_buf.copy_(xs[:64])
    g.replay()
    assert torch.equal(y_graph, fp8_utils.scaled_mm_rowwise(xq[:64], wq, xs[:64].contiguous(), ws, torch.bfloat16))


@pytest.mark.parametrize("m", [17, 64, 300])
def test_online_linear_with_the_per_tensor_route_equals_its_twin(monkeypatch, m):
    from shardllm.layers.quantization import fp8_utils

    taken, route = [], fp8_utils.scaled_mm_rowwise_by_tensorwise
    monkeypatch.setattr(fp8_utils, "scaled_mm_rowwise_by_tensorwise",
                        lambda xq, *a, **k: taken.append(xq.shape[0]) or route(xq, *a, **k))
    monkeypatch.setattr(fp8_utils, "TENSORWISE_MAX_OUTPUT", 256 * 768)  # 17 and 64 rows of N = 768, not 300
    test_online_linear_on_gpu_equals_its_dequantized_twin(m)
    assert taken == ([m] if m <= 256 else [])


@pytest.mark.parametrize("m", [1, 7, 16])
def test_online_linear_below_the_gemv_bound_takes_the_fp8_gemm_and_equals_its_twin(monkeypatch, m):
    """SHARDLLM_FP8_GEMV_MAX_M=0: every row count quantizes per token and takes the FP8 GEMM (here through the
    per-tensor route), equal to the W8A8 twin; the GEMV is never called (counted in the test it runs)."""
    from shardllm.layers.quantization import fp8_triton, fp8_utils

    monkeypatch.setattr(fp8_triton, "FP8_GEMV_MAX_M", 0)
    monkeypatch.setattr(fp8_utils, "TENSORWISE_MAX_OUTPUT", 1 << 20)  # whatever the environment says
    taken, route = [], fp8_utils.scaled_mm_rowwise_by_tensorwise
    monkeypatch.setattr(fp8_utils, "scaled_mm_rowwise_by_tensorwise",
                        lambda xq, *a, **k: taken.append(xq.shape[0]) or route(xq, *a, **k))
    test_online_linear_on_gpu_equals_its_dequantized_twin(m)
    assert taken == [m]
