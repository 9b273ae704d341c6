"""SiLU-and-mul folded into the down projection's GEMV (shardllm/layers/gemv_silu.py): the fused kernel against
triton_ops.silu_and_mul then the same GEMV (bit-equal), the hook's rules and links, an MLP and a tiny Llama with the
fused path on and off. CPU under the interpreter; CUDA (gpu) with graphs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from shardllm.layers import gemv as gemv_mod  # noqa: E402
from shardllm.layers import gemv_silu, triton_ops  # noqa: E402
from shardllm.layers.gemv import GemvConfig, gemv, load_table  # noqa: E402
from shardllm.layers.gemv_silu import SiluAndMulInput, silu_gemv  # noqa: E402
from shardllm.layers.quantization import QuantizationConfig, quant_config_scope  # noqa: E402
from shardllm.layers.quantization.fp8_utils import quantize_per_row  # noqa: E402
from tests.helpers import greedy_tokens_then_batch1  # noqa: E402

INTERPRET = isinstance(gemv_mod._gemv_kernel, InterpretedFunction)
cpu = pytest.mark.skipif(not INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1 before triton's import")


@pytest.fixture(autouse=True)
def silu_fusion_on(monkeypatch):
    """The fusion as switched on (SHARDLLM_GEMV_FUSED_SILU=1; off by default until timed on a GPU): tests of the
    switch's off side set ENABLED themselves."""
    monkeypatch.setattr(gemv_silu, "ENABLED", True)


def gpu(fn, timeout: int = 120):
    skip = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET or torch.cuda.get_device_capability() < (8, 9),
                              reason="needs a GPU with FP8 (sm89+), no interpreter")
    return pytest.mark.gpu(pytest.mark.timeout(timeout)(skip(fn)))


def operands(m: int, n: int, k: int, fp8: bool, device: str, seed: int = 0):
    """gate_up (m, 2k) bf16 spread like a gate_up projection's output, w (n, k) e4m3 + scales or bf16."""
    g = torch.Generator(device=device).manual_seed(seed)  # on the GPU: Llama-sized weights in milliseconds
    gate_up = (torch.randn(m, 2 * k, generator=g, device=device) * 2).to(torch.bfloat16)
    w = torch.randn(n, k, generator=g, device=device) * 0.05
    if fp8:
        wq, ws = quantize_per_row(w)
        return gate_up, wq, ws.view(-1)
    return gate_up, w.to(torch.bfloat16), None


def check_equal_to_unfused(m, n, k, fp8, cfg, device):
    gate_up, w, s = operands(m, n, k, fp8, device, seed=m * 100 + n)
    fused = gemv(gate_up, w, s, cfg, silu_input=True)
    unfused = gemv(triton_ops.silu_and_mul(gate_up), w, s, cfg)
    assert fused.shape == (m, n) and fused.dtype == torch.bfloat16
    assert torch.equal(fused, unfused), (cfg, float((fused.float() - unfused.float()).abs().max()))
    # and both are the product they claim to be (an fp32 reference, activation unrounded)
    gate, up = gate_up.float().chunk(2, dim=-1)
    ref = (F.silu(gate) * up) @ (w.float() if s is None else w.float() * s[:, None]).t()
    assert float((fused.float() - ref).abs().max()) <= 2e-2 * float(ref.abs().max())


# (m, n, k, config): both forms, the late reduction, split-K, K slices ending mid-block (masked) and whole (EVEN_K)
CPU_CASES = [
    (1, 40, 300, GemvConfig(False, 8, 64, 1, late_reduce=True)),
    (2, 37, 200, GemvConfig(False, 4, 32, 3)),
    (1, 24, 256, GemvConfig(False, 8, 64, 2)),  # EVEN_K
    (2, 33, 200, GemvConfig(True, 16, 64, 2)),
    (1, 32, 256, GemvConfig(True, 16, 64, 4)),  # EVEN_K, split-K partials
]


@cpu
@pytest.mark.parametrize("fp8", [True, False], ids=["e4m3", "bf16"])
@pytest.mark.parametrize("m,n,k,cfg", CPU_CASES, ids=[f"m{c[0]}_n{c[1]}_k{c[2]}_{'dot' if c[3].use_dot else 'fma'}"
                                                       f"_split{c[3].split_k}" for c in CPU_CASES])
def test_fused_gemv_equals_silu_and_mul_then_gemv_cpu(fp8, m, n, k, cfg):
    check_equal_to_unfused(m, n, k, fp8, cfg, "cpu")


def _build_llama(cfg: QuantizationConfig | None, intermediate_size: int = 96):
    from transformers import LlamaConfig

    from shardllm.models.llama import LlamaForCausalLM

    hf = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=intermediate_size, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1)
    with quant_config_scope(cfg):
        model = LlamaForCausalLM(hf, 64)
    return model, gemv_silu.link_gemv_silu(model)


def test_only_linears_the_gemv_serves_are_linked(monkeypatch):
    from shardllm.layers.quantization import fp8_triton

    monkeypatch.setattr(fp8_triton, "FP8_GEMV_MAX_M", 1)  # the default, whatever the environment says
    model, linked = _build_llama(None)
    assert linked == 2  # one act_fn -> down_proj per layer
    mlp = model.model.layers[0].mlp
    assert mlp.act_fn.gemv_target.linear is mlp.down_proj
    assert "act_fn.gemv_target" not in dict(mlp.named_modules())  # not registered as a child
    assert _build_llama(QuantizationConfig())[1] == 2  # FP8, per-channel weights, dynamic per-token activations
    assert _build_llama(QuantizationConfig(source="fp8", is_checkpoint_fp8=True, weight_strategy="tensor",
                                           activation_scheme="static"))[1] == 0
    assert _build_llama(QuantizationConfig(source="fp8", weight_strategy="block", is_checkpoint_fp8=True,
                                           weight_block_size=(16, 16), weight_scale_name="weight_scale_inv"))[1] == 0
    monkeypatch.setattr(fp8_triton, "FP8_GEMV_MAX_M", 0)  # FP8 rows never take the GEMV: not linked, bf16 still
    assert _build_llama(QuantizationConfig())[1] == 0 and _build_llama(None)[1] == 2


def _mlp_with_weights(fp8: bool, device: str):
    model, _ = _build_llama(QuantizationConfig() if fp8 else None)
    model = model.to(device)
    mlp = model.model.layers[0].mlp
    g = torch.Generator(device="cpu").manual_seed(3)
    for lin in (mlp.gate_up_proj, mlp.down_proj):
        w = torch.randn(lin.weight.shape, generator=g) * 0.1
        if fp8:
            wq, ws = quantize_per_row(w)
            lin.weight.data.copy_(wq)
            lin.weight_scale.data.copy_(ws.view(-1))
        else:
            lin.weight.data = w.to(device, torch.bfloat16)
    return mlp


@cpu
@pytest.mark.parametrize("fp8", [True, False], ids=["e4m3", "bf16"])
def test_mlp_defers_silu_into_the_down_gemv_up_to_its_max_m_cpu(monkeypatch, fp8):
    from shardllm.layers.quantization import fp8_triton

    monkeypatch.setattr(fp8_triton, "FP8_GEMV_MAX_M", 1)  # the default, whatever the environment says
    mlp = _mlp_with_weights(fp8, "cpu")
    monkeypatch.setattr(triton_ops, "USE_TRITON", True)  # the kernels, interpreted
    monkeypatch.setattr(gemv_silu, "FORCE", True)
    calls = []
    real = gemv_mod.gemv
    monkeypatch.setattr(gemv_mod, "gemv", lambda *a, **k: calls.append(k.get("silu_input", False)) or real(*a, **k))
    for m in (1, 2, 3):
        x = torch.randn(m, 32, dtype=torch.bfloat16)
        gate_up = mlp.gate_up_proj(x)
        deferred = mlp.act_fn(gate_up)
        fused = m <= gemv_silu.FUSED_SILU_MAX_M  # 1: batch-1 decode (slower than unfused at 2 on an H200)
        assert isinstance(deferred, SiluAndMulInput) == fused
        calls.clear()
        y = mlp(x)
        assert calls == ([True] if fused else [])
        # the unfused path on the CPU: silu_and_mul, then F.linear (bf16) / the W8A8 torch path (FP8)
        monkeypatch.setattr(gemv_silu, "FORCE", False)
        y_ref = mlp(x)
        monkeypatch.setattr(gemv_silu, "FORCE", True)
        assert y.shape == y_ref.shape == (m, 32) and y.dtype == torch.bfloat16
        tol = 6e-2 if fp8 else 1e-2  # FP8 on the CPU: the unfused path also quantizes the activation (W8A8)
        assert float((y.float() - y_ref.float()).abs().max()) <= tol * float(y_ref.float().abs().max())
        if fused:  # the deferred input through the method is exactly silu_gemv with the chosen config
            w_scale = mlp.down_proj.weight_scale.view(-1) if fp8 else None
            assert torch.equal(y, silu_gemv(deferred, mlp.down_proj.weight, w_scale, None))
            assert deferred.shape == (m, 96) and deferred.dtype == torch.bfloat16
    monkeypatch.setattr(fp8_triton, "FP8_GEMV_MAX_M", 0)  # SHARDLLM_FP8_GEMV_MAX_M=0: FP8 takes its GEMM from 1 row
    gate_up = mlp.gate_up_proj(torch.randn(1, 32, dtype=torch.bfloat16))
    assert isinstance(mlp.act_fn(gate_up), SiluAndMulInput) != fp8  # bf16 weights still defer


@cpu
def test_hook_rules_cpu(monkeypatch):
    mlp = _mlp_with_weights(False, "cpu")
    gate_up = torch.randn(1, 192, dtype=torch.bfloat16)
    monkeypatch.setattr(triton_ops, "USE_TRITON", True)
    monkeypatch.setattr(gemv_silu, "FORCE", True)
    assert isinstance(mlp.act_fn(gate_up), SiluAndMulInput)
    assert isinstance(mlp.act_fn(gate_up.float()), torch.Tensor)  # fp32 rows: not the bf16 weight's input
    assert isinstance(mlp.act_fn(gate_up[:, :128]), torch.Tensor)  # not 2 x the linear's input size
    assert isinstance(mlp.act_fn(gate_up.view(1, 1, 192)), torch.Tensor)  # rows as (M, 2I) only
    monkeypatch.setattr(gemv_silu, "ENABLED", False)  # SHARDLLM_GEMV_FUSED_SILU=0
    assert isinstance(mlp.act_fn(gate_up), torch.Tensor)
    monkeypatch.setattr(gemv_silu, "ENABLED", True)
    monkeypatch.setattr(gemv_silu, "FORCE", None)  # CPU without the override: silu_and_mul as before
    assert isinstance(mlp.act_fn(gate_up), torch.Tensor)


def test_config_choice(monkeypatch):
    monkeypatch.delenv("SHARDLLM_GEMV_NEAREST_SHAPE", raising=False)
    w8 = torch.empty(4096, 14336, dtype=torch.float8_e4m3fn, device="meta")
    w16 = torch.empty(4096, 14336, dtype=torch.bfloat16, device="meta")
    from shardllm.layers.quantization.fp8_triton import small_m_config

    assert gemv_silu._fused_config(w8, 1) == GemvConfig(False, 8, 1024, 1, 4, 3, True)  # the fused table's
    assert gemv_silu._fused_config(w8, 2) == small_m_config(4096, 14336, 2)  # none there: the unfused FP8 path's
    w8_70b = torch.empty(8192, 28672, dtype=torch.float8_e4m3fn, device="meta")
    assert gemv_silu._fused_config(w8_70b, 1) == GemvConfig(False, 16, 1024, 1, 8, 3, True)  # 70B's own entry
    monkeypatch.setitem(gemv_silu.FUSED_SILU_TABLES, "fp8", load_table({"4096x14336": {"1": [0, 8, 1024, 1, 4, 3, 1]}}))
    assert gemv_silu._fused_config(w8_70b, 1) == GemvConfig(False, 8, 1024, 1, 4, 3, True)  # the nearest down's
    assert gemv_silu._fused_config(w16, 1) == gemv_silu._DEFAULT_CONFIG  # no bf16 entry (cuBLAS kept there)
    monkeypatch.setattr(gemv_mod, "BF16_GEMV_TABLE", load_table({"4096x14336": {"1": [0, 8, 256, 2, 4, 3]}}))
    assert gemv_silu._fused_config(w16, 1) == GemvConfig(False, 8, 256, 2, 4, 3)
    monkeypatch.setitem(gemv_silu.FUSED_SILU_TABLES, "fp8", load_table({"4096x14336": {"2": [1, 32, 128, 2]}}))
    assert gemv_silu._fused_config(w8, 2) == GemvConfig(True, 32, 128, 2)  # the fused table first


# ---- CUDA --------------------------------------------------------------------------------------------------------

GPU_CONFIGS = [GemvConfig(False, 16, 1024, 1, 8, 3, True), GemvConfig(False, 4, 512, 1, 4, 3, True),
               GemvConfig(False, 8, 256, 2, 4, 3), GemvConfig(True, 32, 256, 4)]


@gpu
@pytest.mark.parametrize("fp8", [True, False], ids=["e4m3", "bf16"])
@pytest.mark.parametrize("m,k", [(1, 14336), (2, 14336), (1, 7168), (2, 1000)])  # Llama-3-8B down at tp 1 / 2
@pytest.mark.parametrize("cfg", GPU_CONFIGS, ids=lambda c: f"{'dot' if c.use_dot else 'fma'}{c.block_n}x{c.block_k}"
                                                           f"s{c.split_k}{'late' if c.late_reduce else ''}")
def test_gpu_fused_gemv_equals_silu_and_mul_then_gemv(fp8, m, k, cfg):
    check_equal_to_unfused(m, 4096, k, fp8, cfg, "cuda")


@gpu
def test_gpu_fused_gemv_is_graph_capturable():
    for fp8 in (True, False):
        gate_up, w, s = operands(2, 4096, 7168, fp8, "cuda")
        for cfg in (GemvConfig(False, 16, 1024, 1, 8, 3, True), GemvConfig(True, 32, 256, 4)):
            fn = lambda cfg=cfg, h=gate_up, w=w, s=s: gemv(h, w, s, cfg, silu_input=True)  # noqa: E731
            fn()
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                y = fn()
            for seed in (1, 2):
                gate_up.copy_(operands(2, 4096, 7168, fp8, "cuda", seed=seed)[0])
                graph.replay()
                torch.cuda.synchronize()
                assert torch.equal(y, fn())


@gpu
@pytest.mark.parametrize("fp8", [True, False], ids=["e4m3", "bf16"])
def test_gpu_mlp_fused_equals_unfused(monkeypatch, fp8):
    """On CUDA both paths run the same GEMV config (bf16: a table entry for the tiny down shape, so the unfused
    path leaves cuBLAS; fp8: no fused-table entry, so the fused GEMV takes small_m_config's too), so the MLP's output
    is bit-equal."""
    monkeypatch.setitem(gemv_silu.FUSED_SILU_TABLES, "fp8", load_table({}))
    if not fp8:
        monkeypatch.setattr(gemv_mod, "BF16_GEMV_TABLE", load_table({"32x96": {"1": [0, 4, 64, 1, 4, 3, 1],
                                                                               "2": [1, 16, 32, 2, 4, 4, 0]}}))
    mlp = _mlp_with_weights(fp8, "cuda")
    for m in (1, 2):
        x = torch.randn(m, 32, dtype=torch.bfloat16, device="cuda")
        assert isinstance(mlp.act_fn(mlp.gate_up_proj(x)), SiluAndMulInput) == (m <= gemv_silu.FUSED_SILU_MAX_M)
        y = mlp(x)
        monkeypatch.setattr(gemv_silu, "ENABLED", False)
        y_ref = mlp(x)
        monkeypatch.setattr(gemv_silu, "ENABLED", True)
        assert torch.equal(y, y_ref)


def _tiny_llama_tokens(path: str, fused: bool, **llm_kwargs) -> tuple[list, int]:
    """Greedy tokens of the tiny Llama with the fused GEMV on or off, and how many fused launches ran."""
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        real = gemv_silu.silu_gemv
        mp.setattr(gemv_silu, "silu_gemv", lambda *a, **k: calls.append(1) or real(*a, **k))
        mp.setattr(gemv_silu, "ENABLED", fused)
        tokens = greedy_tokens_then_batch1(path, 2, 6, **llm_kwargs)
    return tokens, len(calls)


@pytest.mark.gpu
@pytest.mark.timeout(150)  # four engines with CUDA graphs
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a GPU with FP8 (sm89+), no interpreter")
@pytest.mark.parametrize("dtype", ["fp8", "bfloat16"])
def test_gpu_tiny_llama_tokens_equal_with_the_fused_silu_on_and_off(tiny_checkpoints, dtype, monkeypatch):
    """Batch 1 and 2 decode steps replay CUDA graphs captured with the fused GEMV. bf16: the tiny down shape gets a
    table entry, so the unfused path runs the same GEMV instead of cuBLAS; fp8: no fused-table entry, so the fused
    GEMV takes the unfused path's config (the fused table's nearest entry would be another launch)."""
    monkeypatch.setitem(gemv_silu.FUSED_SILU_TABLES, "fp8", load_table({}))
    monkeypatch.setattr(gemv_mod, "BF16_GEMV_TABLE", load_table({"64x128": {"1": [0, 4, 64, 1, 4, 3, 1],
                                                                               "2": [1, 16, 64, 2, 4, 4, 0]}}))
    on, launches = _tiny_llama_tokens(tiny_checkpoints["llama"], True, dtype=dtype)
    off, none = _tiny_llama_tokens(tiny_checkpoints["llama"], False, dtype=dtype)
    assert launches > 0 and none == 0
    assert on == off


def test_probe_once_caches_and_refuses_what_raises_or_disagrees(monkeypatch):
    """The fused GEMVs' shared load-time probe: the check runs once per key; an exception or False is a refusal."""
    monkeypatch.setattr(gemv_silu, "_PROBED", {})
    w = torch.empty(4, 8)
    calls = []

    def check(result):
        calls.append(1)
        if isinstance(result, Exception):
            raise result
        return result

    assert gemv_silu.probe_once(("a",), lambda: check(True), "x", "y", w) is True
    assert gemv_silu.probe_once(("a",), lambda: check(False), "x", "y", w) is True and len(calls) == 1  # cached
    assert gemv_silu.probe_once(("b",), lambda: check(RuntimeError("no ptxas")), "x", "y", w) is False
    assert gemv_silu.probe_once(("c",), lambda: check(False), "x", "y", w) is False and len(calls) == 3
