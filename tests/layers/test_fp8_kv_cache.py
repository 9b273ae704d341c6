"""FP8 KV cache: the Triton kernels read an e4m3 cache as the torch reference does, the engine holds twice the
tokens of a bf16 cache in the same memory, and greedy tokens stay close to the bf16 cache's."""

from __future__ import annotations

import pytest
import torch

from shardllm import LLM, SamplingParams
from tests.layers.test_triton_attention import INTERPRET, make_case, reference, run_decode, run_prefill

PROMPTS = [[1, 17, 33, 5, 9, 101, 7], [3, 4], [250, 14, 88, 19, 201, 6, 6, 6, 42, 71, 300, 12, 9]]
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)


@pytest.mark.skipif(not INTERPRET, reason="CPU tensors need TRITON_INTERPRET=1 before triton_paged's import")
@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_triton_kernels_read_an_fp8_cache_like_the_reference(fp8):
    q, kc, vc, meta = make_case([1, 1], [40, 17], 2, 4, 64, seed=3)
    kc8, vc8 = kc.to(fp8), vc.to(fp8)
    ref = reference(q, kc8, vc8, meta)  # the reference on the fp8 values read back
    torch.testing.assert_close(run_decode(q, kc8, vc8, meta, num_splits=2), ref, atol=2e-5, rtol=1e-4)
    q, kc, vc, meta = make_case([5, 3], [20, 3], 2, 4, 64, seed=4)
    kc8, vc8 = kc.to(fp8), vc.to(fp8)
    torch.testing.assert_close(run_prefill(q, kc8, vc8, meta), reference(q, kc8, vc8, meta), atol=2e-5, rtol=1e-4)


def test_fp8_cache_doubles_capacity_and_keeps_greedy_tokens_close(tiny_checkpoints):
    runs = {}
    for kv in ("auto", "fp8"):
        llm = LLM(tiny_checkpoints["llama"], device="cpu", dtype="bfloat16", cpu_kv_cache_gb=0.001, block_size=4,
                  kv_cache_dtype=kv)
        try:
            caches = llm.engine.executor.worker.model_runner.kv_caches
            assert caches[0].dtype == (torch.bfloat16 if kv == "auto" else torch.float8_e4m3fn)
            runs[kv] = (llm.engine.num_blocks,
                        [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)])
        finally:
            llm.shutdown()
    assert abs(runs["fp8"][0] - 2 * runs["auto"][0]) <= 1  # the same budget floor-divided by half the bytes
    same = sum(a == b for x, y in zip(runs["auto"][1], runs["fp8"][1]) for a, b in zip(x, y))
    assert same >= 0.5 * 3 * 8  # bf16 model, 3-bit-mantissa cache: most tokens unchanged


def test_unknown_kv_cache_dtype_names_the_choices():
    with pytest.raises(ValueError, match=r"kv_cache_dtype 'int8'.*fp8_e5m2"):
        LLM(None, device="cpu", kv_cache_dtype="int8")


@pytest.mark.parametrize("name,target", [
    ("model.layers.3.self_attn.k_scale", ("model.layers.3.self_attn", ("k",))),
    ("model.layers.3.self_attn.v_scale", ("model.layers.3.self_attn", ("v",))),
    ("model.layers.3.self_attn.kv_scale", ("model.layers.3.self_attn", ("k", "v"))),
    ("model.layers.3.self_attn.k_proj.k_scale", ("model.layers.3.self_attn", ("k",))),  # ModelOpt
    ("model.layers.3.self_attn.v_proj.v_scale", ("model.layers.3.self_attn", ("v",))),
    ("model.layers.3.self_attn.k_proj.output_scale", ("model.layers.3.self_attn", ("k",))),  # older CT
    ("model.layers.3.self_attn.attn.v_scale", ("model.layers.3.self_attn", ("v",))),
    ("model.layers.3.self_attn.k_proj.weight_scale", None),
    ("model.layers.3.self_attn.k_proj.input_scale", None),
    ("model.layers.3.self_attn.q_proj.weight", None),
])
def test_kv_scale_names(name, target):
    from shardllm.layers.quantization.kv_cache import kv_scale_target

    assert kv_scale_target(name) == target


def test_scaled_fp8_cache_equals_attention_over_the_dequantized_cache():
    """k/v stored as (k / k_scale).to(fp8), read back times the scale: the torch path against that math."""
    import torch.nn.functional as F

    from shardllm.layers.attention import Attention
    from shardllm.layers.attention.attention import AttentionMetadata

    torch.manual_seed(0)
    n, nh, nkv, d = 6, 4, 2, 16
    attn = Attention(nh, d, nkv)
    attn.use_triton = False
    attn.kv_cache = torch.zeros(2, 4, 4, nkv, d, dtype=torch.float8_e4m3fn)
    attn.k_scale.fill_(4.0)
    attn.v_scale.fill_(0.25)
    q, k, v = torch.randn(n, nh * d), torch.randn(n, nkv * d) * 8, torch.randn(n, nkv * d) / 8
    meta = AttentionMetadata(slot_mapping=torch.arange(n), query_start_loc=torch.tensor([0, n]),
                             seq_lens=torch.tensor([n]), block_tables=torch.tensor([[0, 1, 2, 3]]),
                             max_query_len=n, max_seq_len=n, block_size=4)
    out = attn(q, k, v, meta)
    kd = (k / 4.0).to(torch.float8_e4m3fn).float() * 4.0
    vd = (v / 0.25).to(torch.float8_e4m3fn).float() * 0.25
    heads = lambda x, h: x.view(n, h, d).transpose(0, 1)  # noqa: E731
    ref = F.scaled_dot_product_attention(heads(q, nh), heads(kd, nkv), heads(vd, nkv), is_causal=True,
                                         scale=d**-0.5, enable_gqa=True).transpose(0, 1).reshape(n, nh * d)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert float(attn.kv_cache[0].float().abs().max()) <= 448  # stored pre-divided, inside the FP8 range


def test_checkpoint_kv_scales_reach_every_layer(tiny_checkpoints, tmp_path):
    import json
    import os

    from safetensors.torch import load_file, save_file

    src = tiny_checkpoints["llama"]
    tensors = load_file(os.path.join(src, "model.safetensors"))
    tensors["model.layers.0.self_attn.k_proj.k_scale"] = torch.tensor(0.5)  # ModelOpt's names
    tensors["model.layers.0.self_attn.v_proj.v_scale"] = torch.tensor(0.25)
    tensors["model.layers.1.self_attn.kv_scale"] = torch.tensor([2.0])  # AutoFP8's one scale
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        (tmp_path / "config.json").write_text(json.dumps(json.load(f)))
    llm = LLM(str(tmp_path), device="cpu", num_kv_blocks=100, block_size=4, kv_cache_dtype="fp8")
    try:
        layers = [a for a in llm.engine.executor.worker.model_runner.attn_layers]
        assert [(float(a.k_scale), float(a.v_scale)) for a in layers] == [(0.5, 0.25), (2.0, 2.0)]
        out = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == 8 for o in out)
    finally:
        llm.shutdown()


def test_metrics_report_the_cache_capacity_in_tokens():
    pytest.importorskip("prometheus_client")
    from prometheus_client import CollectorRegistry, generate_latest

    from shardllm.metrics import EngineSnapshot, LatencyHistograms
    from shardllm.metrics.prometheus import EngineCollector

    reg = CollectorRegistry()
    reg.register(EngineCollector(lambda: EngineSnapshot(num_kv_blocks=10, kv_cache_capacity_tokens=160),
                                 LatencyHistograms(), "m"))
    assert 'shardllm_kv_cache_capacity_tokens{model_name="m"} 160.0' in generate_latest(reg).decode()
