"""The residual add + RMSNorm folded into the qkv / gate_up GEMV at M = 1 (shardllm/layers/gemv_norm.py, opt-in): the
kernel against triton_ops' RMSNorm then the same GEMV (bit-equal under the interpreter; on CUDA x + residual
bit-equal, the output within the GEMV's rounding), the hook's rules, a decoder layer's norms and linears with it on
and off. CPU under the interpreter; CUDA (gpu) with graphs."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from shardllm.layers import gemv as gemv_mod  # noqa: E402
from shardllm.layers import gemv_norm, gemv_silu, triton_ops  # noqa: E402
from shardllm.layers.gemv import GemvConfig, NormPrologue, gemv, load_table  # noqa: E402
from shardllm.layers.gemv_norm import RmsNormInput  # noqa: E402
from shardllm.layers.quantization import QuantizationConfig, quant_config_scope  # noqa: E402
from shardllm.layers.quantization.fp8_utils import quantize_per_row  # noqa: E402


@pytest.fixture(autouse=True)
def silu_fusion_on(monkeypatch):
    """The fusion as switched on (SHARDLLM_GEMV_FUSED_SILU=1; off by default until timed on a GPU): tests of the
    switch's off side set ENABLED themselves."""
    monkeypatch.setattr(gemv_silu, "ENABLED", True)

INTERPRET = isinstance(gemv_mod._gemv_kernel, InterpretedFunction)
cpu = pytest.mark.skipif(not INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1 before triton's import")


def gpu(fn, timeout: int = 120):
    skip = pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET or torch.cuda.get_device_capability() < (8, 9),
                              reason="needs a GPU with FP8 (sm89+), no interpreter")
    return pytest.mark.gpu(pytest.mark.timeout(timeout)(skip(fn)))


def operands(m: int, n: int, k: int, fp8: bool, device: str, seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)  # on the GPU: Llama-sized weights in milliseconds
    x = (torch.randn(m, k, generator=g, device=device) * 3).to(torch.bfloat16)
    res = torch.randn(m, k, generator=g, device=device).to(torch.bfloat16)
    nw = (torch.rand(k, generator=g, device=device) + 0.5).to(torch.bfloat16)
    w = torch.randn(n, k, generator=g, device=device) * 0.05
    if fp8:
        wq, ws = quantize_per_row(w)
        return x, res, nw, wq, ws.view(-1)
    return x, res, nw, w.to(torch.bfloat16), None


def check_against_unfused(m, n, k, fp8, cfg, residual, device):
    x, res, nw, w, s = operands(m, n, k, fp8, device, seed=n + k)
    res_out = torch.empty_like(x) if residual else None
    y = gemv(x, w, s, cfg, norm=NormPrologue(res if residual else None, nw, 1e-5, res_out))
    if residual:
        normed, res_ref = triton_ops.fused_add_rms_norm(x, res, nw, 1e-5)
        assert torch.equal(res_out, res_ref)  # x + residual: exact everywhere
    else:
        normed = triton_ops.rms_norm(x, nw, 1e-5)
    y_ref = gemv(normed, w, s, cfg)
    assert y.shape == (m, n) and y.dtype == torch.bfloat16
    if device == "cpu":
        assert torch.equal(y, y_ref)
    else:  # the sum of squares' reduction tree differs: rstd may differ in its last bit
        assert float((y.float() - y_ref.float()).abs().max()) <= 1e-2 * float(y_ref.float().abs().max())


CPU_CASES = [
    (1, 40, 300, GemvConfig(False, 8, 64, 1, late_reduce=True)),
    (2, 21, 96, GemvConfig(False, 8, 32, 2)),  # the kernel takes M <= its BLOCK_M rows (the hook only M = 1)
    (1, 24, 256, GemvConfig(False, 8, 64, 2)),  # EVEN_K
    (1, 16, 9000, GemvConfig(False, 8, 1024, 2)),  # rows wider than RMS_MAX_BLOCK: two chunks, as the RMSNorm kernel
]


@cpu
@pytest.mark.parametrize("residual", [True, False], ids=["add_norm", "norm"])
@pytest.mark.parametrize("fp8", [True, False], ids=["e4m3", "bf16"])
@pytest.mark.parametrize("m,n,k,cfg", CPU_CASES, ids=[f"m{c[0]}_n{c[1]}_k{c[2]}_s{c[3].split_k}" for c in CPU_CASES])
def test_norm_gemv_equals_rms_norm_then_gemv_cpu(fp8, residual, m, n, k, cfg):
    check_against_unfused(m, n, k, fp8, cfg, residual, "cpu")


def _build_llama(cfg: QuantizationConfig | None):
    from transformers import LlamaConfig

    from shardllm.models.llama import LlamaForCausalLM

    hf = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1)
    with quant_config_scope(cfg):
        model = LlamaForCausalLM(hf, 64)
    model = model.to(torch.bfloat16) if cfg is None else model
    g = torch.Generator().manual_seed(5)
    for layer in model.model.layers:
        for lin in (layer.self_attn.qkv_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
            w = torch.randn(lin.weight.shape, generator=g) * 0.1
            if cfg is None:
                lin.weight.data.copy_(w)
            else:
                wq, ws = quantize_per_row(w)
                lin.weight.data.copy_(wq)
                lin.weight_scale.data.copy_(ws.view(-1))
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight.data = (torch.rand(32, generator=g) + 0.5).to(torch.bfloat16)
    return model


def test_linked_only_when_switched_on(monkeypatch):
    model = _build_llama(None)
    assert gemv_norm.link_gemv_norm(model) == 0  # SHARDLLM_GEMV_FUSED_NORM unset: off
    monkeypatch.setattr(gemv_norm, "ENABLED", True)
    assert gemv_norm.link_gemv_norm(model) == 4  # 2 layers x (input norm -> qkv, post-attention norm -> gate_up)
    layer = model.model.layers[1]
    assert layer.input_layernorm.gemv_target.linear is layer.self_attn.qkv_proj
    assert layer.post_attention_layernorm.gemv_target.linear is layer.mlp.gate_up_proj
    assert gemv_norm.link_gemv_norm(_build_llama(QuantizationConfig())) == 4
    with quant_config_scope(QuantizationConfig(source="fp8", is_checkpoint_fp8=True, weight_strategy="tensor",
                                               activation_scheme="static")):
        from transformers import LlamaConfig

        from shardllm.models.llama import LlamaForCausalLM

        static = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=96,
                                              num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1), 64)
    assert gemv_norm.link_gemv_norm(static) == 0


def _layer_paths(model, x, h, r):
    """The first layer's norm -> qkv, and add + norm -> MLP (gate_up first, then the SiLU GEMV and down) at M rows:
    (qkv rows, residual after the input norm, MLP output, residual after the post-attention norm)."""
    layer = model.model.layers[0]
    normed = layer.input_layernorm(x)
    qkv = layer.self_attn.qkv_proj(normed)
    hidden, residual = layer.post_attention_layernorm(h, r)
    return qkv, x, layer.mlp(hidden), residual


@cpu
@pytest.mark.parametrize("fp8", [True, False], ids=["e4m3", "bf16"])
def test_decoder_layer_norms_defer_into_the_gemvs_at_m_1_cpu(monkeypatch, fp8):
    monkeypatch.setattr(gemv_norm, "ENABLED", True)
    model = _build_llama(QuantizationConfig() if fp8 else None)
    assert gemv_norm.link_gemv_norm(model) == 4 and gemv_silu.link_gemv_silu(model) == 2
    monkeypatch.setattr(triton_ops, "USE_TRITON", True)  # the kernels, interpreted
    monkeypatch.setattr(gemv_norm, "FORCE", True)
    monkeypatch.setattr(gemv_silu, "FORCE", True)
    # the unfused path's FP8 linears at M = 1 on the CPU: the same GEMV as on CUDA (not the W8A8 torch path)
    from shardllm.layers.quantization import fp8 as fp8_mod
    from shardllm.layers.quantization.fp8_triton import fp8_small_m_linear

    monkeypatch.setattr(fp8_mod, "triton_fp8_ok", lambda device: True)
    real_apply = fp8_mod.Fp8LinearMethod.apply

    def apply_on_cpu(self, layer, x, bias):
        if isinstance(x, torch.Tensor) and x.shape[0] <= 2:
            return fp8_small_m_linear(x.contiguous(), layer.weight, layer.weight_scale.view(-1))
        return real_apply(self, layer, x, bias)

    monkeypatch.setattr(fp8_mod.Fp8LinearMethod, "apply", apply_on_cpu)
    monkeypatch.setattr(gemv_mod, "BF16_GEMV_TABLE", load_table({}))
    # FP8: one FMA-form config per shape, so that fused and unfused run the same GEMV (the tables' role on CUDA)
    from shardllm.layers.quantization import fp8_triton

    fma = [0, 8, 32, 1, 4, 3, 1]
    table = load_table({f"{n}x{k}": {"1": fma, "2": fma} for n, k in ((64, 32), (192, 32), (32, 96))})
    monkeypatch.setattr(gemv_mod, "FP8_GEMV_TABLE", table)
    monkeypatch.setattr(fp8_triton, "FP8_GEMV_TABLE", table)
    g = torch.Generator().manual_seed(1)
    for m in (1, 2):
        x, h, r = (torch.randn(3, m, 32, generator=g) * 2).to(torch.bfloat16)
        ln = model.model.layers[0].post_attention_layernorm
        out = ln(h, r)
        assert isinstance(out[0] if isinstance(out, tuple) else out, RmsNormInput) == (m == 1)
        fused = _layer_paths(model, x, h, r)
        monkeypatch.setattr(gemv_norm, "FORCE", False)
        monkeypatch.setattr(gemv_silu, "FORCE", False)
        unfused = _layer_paths(model, x, h, r)
        monkeypatch.setattr(gemv_norm, "FORCE", True)
        monkeypatch.setattr(gemv_silu, "FORCE", True)
        for a, b in zip(fused, unfused):
            assert a.shape == b.shape and a.dtype == b.dtype
            if fp8:
                assert torch.equal(a, b)  # the same GEMV config both ways
            else:  # bf16: the unfused path on the CPU is F.linear (cuBLAS on CUDA for these shapes)
                assert float((a.float() - b.float()).abs().max()) <= 1e-2 * float(b.float().abs().max())


@cpu
def test_hook_rules_cpu(monkeypatch):
    monkeypatch.setattr(gemv_norm, "ENABLED", True)
    model = _build_llama(None)
    gemv_norm.link_gemv_norm(model)
    ln = model.model.layers[0].input_layernorm
    x, r = torch.randn(2, 1, 32, dtype=torch.bfloat16)
    monkeypatch.setattr(triton_ops, "USE_TRITON", True)
    monkeypatch.setattr(gemv_norm, "FORCE", True)
    deferred, residual_out = ln(x, r)
    assert isinstance(deferred, RmsNormInput) and deferred.shape == (1, 32) and residual_out.shape == (1, 32)
    assert residual_out.data_ptr() not in (x.data_ptr(), r.data_ptr())  # a new tensor the GEMV writes
    assert isinstance(ln(x), RmsNormInput)
    assert isinstance(ln(x.float(), r.float())[0], torch.Tensor)  # fp32 rows
    assert isinstance(ln(x, r.float())[0], torch.Tensor)  # a residual of another dtype
    assert isinstance(ln(x.view(1, 1, 32)), torch.Tensor)  # rows as (M, K) only
    monkeypatch.setattr(gemv_norm, "ENABLED", False)
    assert isinstance(ln(x, r)[0], torch.Tensor)
    monkeypatch.setattr(gemv_norm, "ENABLED", True)
    monkeypatch.setattr(gemv_norm, "FORCE", None)  # CPU without the override: the RMSNorm kernel as before
    assert isinstance(ln(x, r)[0], torch.Tensor)


def test_config_is_of_the_fma_form(monkeypatch):
    w8 = torch.empty(6144, 4096, dtype=torch.float8_e4m3fn, device="meta")
    monkeypatch.setattr(gemv_mod, "FP8_GEMV_TABLE", load_table({"6144x4096": {"1": [1, 32, 256, 1]},
                                                                 "3072x4096": {"1": [0, 8, 512, 1, 4, 3, 1]}}))
    assert gemv_norm._norm_config(w8, 1) == gemv_norm._DEFAULT_CONFIG  # a tl.dot entry: not for the prologue
    w8b = torch.empty(3072, 4096, dtype=torch.float8_e4m3fn, device="meta")
    assert gemv_norm._norm_config(w8b, 1) == GemvConfig(False, 8, 512, 1, 4, 3, True)


# ---- CUDA --------------------------------------------------------------------------------------------------------


@gpu
@pytest.mark.parametrize("residual", [True, False], ids=["add_norm", "norm"])
@pytest.mark.parametrize("fp8", [True, False], ids=["e4m3", "bf16"])
@pytest.mark.parametrize("n", [6144, 3072, 28672, 14336])  # Llama-3-8B qkv and gate_up at tp 1 / 2
@pytest.mark.parametrize("cfg", [GemvConfig(False, 4, 512, 1, 4, 3, True), GemvConfig(False, 16, 1024, 1, 8, 3, True),
                                 GemvConfig(False, 8, 256, 2, 4, 3)], ids=["fma4x512", "fma16x1024w8", "fma8x256s2"])
def test_gpu_norm_gemv_against_rms_norm_then_gemv(fp8, residual, n, cfg):
    check_against_unfused(1, n, 4096, fp8, cfg, residual, "cuda")


@gpu
def test_gpu_norm_gemv_is_graph_capturable():
    import functools

    def run(x, res, nw, w, s, res_out):
        return gemv(x, w, s, gemv_norm._DEFAULT_CONFIG, norm=NormPrologue(res, nw, 1e-5, res_out))

    for fp8 in (True, False):
        x, res, nw, w, s = operands(1, 6144, 4096, fp8, "cuda")
        res_out = torch.empty_like(x)
        fn = functools.partial(run, x, res, nw, w, s, res_out)
        fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = fn()
        for seed in (1, 2):
            x.copy_(operands(1, 6144, 4096, fp8, "cuda", seed=seed)[0])
            graph.replay()
            torch.cuda.synchronize()
            replayed = (y.clone(), res_out.clone())
            assert torch.equal(replayed[0], fn()) and torch.equal(replayed[1], res_out)


@pytest.mark.gpu
@pytest.mark.timeout(150)  # four engines with CUDA graphs
@pytest.mark.skipif(not torch.cuda.is_available() or INTERPRET or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a GPU with FP8 (sm89+), no interpreter")
@pytest.mark.parametrize("dtype", ["fp8", "bfloat16"])
def test_gpu_tiny_llama_tokens_equal_with_the_fused_norm_on_and_off(tiny_checkpoints, dtype, monkeypatch):
    """Batch-1 decode steps replay CUDA graphs captured with the norm-fused GEMVs (qkv, gate_up) and the SiLU-fused
    down GEMV; greedy tokens equal the unfused path's. Both paths run the same FMA-form config per tiny shape (table
    entries), so only a last-bit rstd difference separates them, which must not flip a token here."""
    from shardllm import LLM, SamplingParams
    from shardllm.layers.quantization import fp8_triton

    fma = [0, 8, 64, 1, 4, 3, 1]
    table = load_table({f"{n}x{k}": {"1": fma, "2": fma} for n, k in ((128, 64), (256, 64), (64, 128), (64, 64))})
    for mod, name in ((gemv_mod, "FP8_GEMV_TABLE"), (fp8_triton, "FP8_GEMV_TABLE"), (gemv_mod, "BF16_GEMV_TABLE")):
        monkeypatch.setattr(mod, name, table)

    def tokens(fused: bool) -> tuple[list, int]:
        calls = []
        with pytest.MonkeyPatch.context() as mp:
            real = gemv_norm.norm_gemv
            mp.setattr(gemv_norm, "norm_gemv", lambda *a, **k: calls.append(1) or real(*a, **k))
            mp.setattr(gemv_norm, "ENABLED", fused)
            llm = LLM(tiny_checkpoints["llama"], num_kv_blocks=64, max_batch_size=8, dtype=dtype)
            try:
                sp = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
                out = [o.outputs[0].token_ids for o in llm.generate([[1 + 7 * j % 300 for j in range(9)]], sp,
                                                                    use_tqdm=False)]
            finally:
                llm.shutdown()
        return out, len(calls)

    on, launches = tokens(True)
    off, none = tokens(False)
    assert launches > 0 and none == 0
    assert on == off


@cpu
def test_tiny_fp8_llama_tokens_equal_with_both_fusions_on_and_off_cpu(tiny_checkpoints, monkeypatch):
    """The whole engine (CPU, eager, FP8 linears) with the SiLU and norm fusions forced on against both off: the
    unfused FP8 linears at M <= 2 run the same GEMV configs (an FMA entry per tiny shape, as the tables do on CUDA),
    so the decode steps' greedy tokens are equal."""
    from shardllm import LLM, SamplingParams
    from shardllm.layers.quantization import fp8 as fp8_mod
    from shardllm.layers.quantization import fp8_triton

    fma = [0, 64, 64, 1, 4, 3, 1]  # wide tiles: few programs, each one a Python loop under the interpreter
    table = load_table({f"{n}x{k}": {"1": fma, "2": fma} for n, k in ((128, 64), (256, 64), (64, 128), (64, 64))})
    monkeypatch.setattr(gemv_mod, "FP8_GEMV_TABLE", table)
    monkeypatch.setattr(fp8_triton, "FP8_GEMV_TABLE", table)
    monkeypatch.setitem(gemv_silu.FUSED_SILU_TABLES, "fp8", table)  # else the fused down takes its nearest entry
    down = torch.empty(64, 128, dtype=torch.float8_e4m3fn, device="meta")
    assert gemv_silu._fused_config(down, 1) == fp8_triton.small_m_config(64, 128, 1)
    real_apply = fp8_mod.Fp8LinearMethod.apply

    def apply_on_cpu(self, layer, x, bias):  # the CUDA path's GEMV at decode, on the CPU
        if isinstance(x, torch.Tensor) and x.dim() == 2 and x.shape[0] <= 2:
            y = fp8_triton.fp8_small_m_linear(x.contiguous(), layer.weight, layer.weight_scale.view(-1))
            return y if bias is None else y + bias
        return real_apply(self, layer, x, bias)

    monkeypatch.setattr(fp8_mod.Fp8LinearMethod, "apply", apply_on_cpu)

    def tokens(fused: bool) -> tuple[list, int]:
        calls = []
        with pytest.MonkeyPatch.context() as mp:
            for mod, name in ((gemv_norm, "norm_gemv"), (gemv_silu, "silu_gemv")):
                real = getattr(mod, name)
                mp.setattr(mod, name, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
                mp.setattr(mod, "ENABLED", fused)
            llm = LLM(tiny_checkpoints["llama"], num_kv_blocks=64, max_batch_size=8, dtype="bfloat16",
                      quantization="fp8", device="cpu", enforce_eager=True)
            try:
                mp.setattr(triton_ops, "USE_TRITON", True)  # after the runner set its switches
                for mod in (gemv_norm, gemv_silu):
                    mp.setattr(mod, "FORCE", fused)
                sp = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
                prompts = [[1 + (7 * i + j) % 300 for j in range(6 + i)] for i in range(2)]
                out = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]  # decode at M = 2
                out += [o.outputs[0].token_ids for o in llm.generate(prompts[:1], sp, use_tqdm=False)]  # M = 1
            finally:
                llm.shutdown()
        return out, len(calls)

    on, launches = tokens(True)
    off, none = tokens(False)
    # 2 decode steps at M = 1 (2 layers x (qkv, gate_up, down)), and at M = 2 (2 layers x down) where the SiLU
    # fusion serves M = 2; async may add
    at_m2 = 2 * 2 if gemv_silu.FUSED_SILU_MAX_M >= 2 else 0
    assert launches >= at_m2 + 2 * 2 * 3 and none == 0
    assert on == off
