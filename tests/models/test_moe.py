"""Mixture-of-experts: Mixtral / Qwen3-MoE / Qwen2-MoE against transformers, the grouped expert path against
the torch reference, the expert-parallel sharding of one layer, and the expert-load counters."""

import pytest
import torch
import transformers
from torch import nn

from shardllm import LLM, SamplingParams
from shardllm.distributed.parallel_state import ParallelContext, set_parallel_context
from shardllm.layers.moe import (
    FusedMoE,
    _grouped_mm_padded,
    collect_expert_load,
    expert_parallel_layout,
    fused_experts,
    fused_experts_grouped,
    fused_experts_reference,
    moe_packed_names,
    reset_expert_load,
    select_experts,
)
from shardllm.model_loader.resolve import load_shipped_config
from shardllm.model_loader.size import count_parameters
from shardllm.models.llama import LlamaForCausalLM
from shardllm.models.utils import load_weights_strict
from tests.helpers import chunked_logits

MOE_ARCHS = ["mixtral", "qwen3_moe", "qwen2_moe"]
PROMPTS = [[1, 17, 33, 5, 9, 101, 7], [3, 4], [250, 14, 88, 19, 201, 6, 6, 6, 42, 71, 300, 12, 9]]


@pytest.fixture(scope="module")
def moe_models(tiny_checkpoints):
    """arch -> (our LLM, the transformers model), built once for the module."""
    cache = {}

    def get(arch):
        if arch not in cache:
            path = tiny_checkpoints[arch]
            hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
            cache[arch] = LLM(path, device="cpu", num_kv_blocks=100, block_size=4), hf
        return cache[arch]

    return get


def _runner(llm):
    return llm.engine.executor.worker.model_runner


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_logits_match_transformers_prefill_chunked_and_decode(moe_models, arch):
    llm, hf = moe_models(arch)
    with torch.no_grad():
        ref = [hf(torch.tensor([p])).logits[0] for p in PROMPTS]
    for chunk in (64, 3, 1):  # whole prompt, chunked prefill across block edges, token by token
        ours = chunked_logits(_runner(llm), PROMPTS, chunk)
        for o, r in zip(ours, ref):
            torch.testing.assert_close(o, r, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_greedy_tokens_equal_transformers_for_a_ragged_batch(moe_models, arch):
    llm, hf = moe_models(arch)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), use_tqdm=False)
    for p, o in zip(PROMPTS, outs):
        ref = hf.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                          pad_token_id=0)[0, len(p):].tolist()
        assert o.outputs[0].token_ids == ref


def test_expert_load_counts_match_the_transformers_router(moe_models):
    llm, hf = moe_models("mixtral")
    model = _runner(llm).model
    reset_expert_load(model)
    chunked_logits(_runner(llm), PROMPTS, 3)
    load = collect_expert_load(model)
    cfg = hf.config
    assert set(load) == {(layer, e) for layer in range(cfg.num_hidden_layers) for e in range(cfg.num_local_experts)}
    num_tokens = sum(len(p) for p in PROMPTS)
    for layer in range(cfg.num_hidden_layers):
        assert sum(load[layer, e] for e in range(cfg.num_local_experts)) == num_tokens * cfg.num_experts_per_tok
    # per expert: the same choices as transformers' router over the same tokens
    expected = torch.zeros(cfg.num_hidden_layers, cfg.num_local_experts, dtype=torch.long)
    with torch.no_grad():
        for p in PROMPTS:
            router_logits = hf(torch.tensor([p]), output_router_logits=True).router_logits
            for layer, logits in enumerate(router_logits):
                ids = logits.topk(cfg.num_experts_per_tok, dim=-1).indices.flatten()
                expected[layer] += torch.bincount(ids, minlength=cfg.num_local_experts)
    assert [[load[layer, e] for e in range(cfg.num_local_experts)] for layer in range(cfg.num_hidden_layers)] \
        == expected.tolist()
    reset_expert_load(model)
    assert set(collect_expert_load(model).values()) == {0}


def test_routing_renormalises_only_when_asked():
    logits = torch.randn(5, 8)
    w, ids = select_experts(logits, 2, renormalize=True)
    # Mixtral's rule: the softmax over the top-k logits
    torch.testing.assert_close(w, torch.softmax(logits.topk(2).values, dim=-1))
    assert torch.equal(ids, logits.topk(2).indices)
    w, ids = select_experts(logits, 2, renormalize=False)  # Qwen2-MoE: the full-softmax probabilities
    torch.testing.assert_close(w, torch.softmax(logits, dim=-1).gather(1, ids))
    assert w.dtype == torch.float32 and bool((w.sum(-1) < 1).all())


def _random_experts(n, hidden, inter, num_experts, top_k, num_local, expert_start, dtype, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, hidden, generator=g)
    w13 = torch.randn(num_local, 2 * inter, hidden, generator=g) / hidden ** 0.5
    w2 = torch.randn(num_local, hidden, inter, generator=g) / inter ** 0.5
    weights, ids = select_experts(torch.randn(n, num_experts, generator=g), top_k, renormalize=True)
    return [t.to(device) for t in (x.to(dtype), w13.to(dtype), w2.to(dtype), weights, ids)] + [expert_start]


# (tokens, hidden, intermediate, experts, top_k, local experts, first local expert): all experts local (ep=1),
# one ep group of several, a decode-sized batch, and more tokens than experts with top-k > 2
SHAPES = [(37, 64, 32, 8, 2, 8, 0), (37, 64, 16, 8, 2, 2, 4), (1, 64, 32, 8, 2, 4, 4), (130, 128, 48, 16, 4, 4, 8)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_path_equals_the_reference_on_cpu(shape, dtype):
    args = _random_experts(*shape, dtype)
    ref = fused_experts_reference(*args)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(fused_experts_grouped(*args), ref, **tol)
    assert torch.equal(fused_experts(*args), ref)  # the CPU picks the reference


def test_padded_bmm_fallback_has_grouped_mm_semantics():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(11, 16, generator=g), torch.randn(4, 16, 8, generator=g)
    offs = torch.tensor([3, 3, 7, 9], dtype=torch.int32)  # an empty group; rows 9, 10 belong to none
    out = _grouped_mm_padded(a, b, offs)
    ref = torch.cat([a[0:3] @ b[0], a[3:7] @ b[2], a[7:9] @ b[3], torch.zeros(2, 8)])
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(torch._grouped_mm(a, b, offs=offs)[:9], ref[:9])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("shape", SHAPES + [(4096, 1024, 512, 8, 2, 4, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_path_equals_the_reference_on_gpu(shape, dtype):
    args = _random_experts(*shape, dtype, device="cuda")
    ref = fused_experts_reference(*args)
    out = fused_experts(*args)  # CUDA picks the grouped path
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(out, fused_experts_grouped(*args), atol=0, rtol=0)


def test_expert_parallel_layout_example():
    assert [expert_parallel_layout(r, 4, 2) for r in range(4)] == [(0, 0, 2), (0, 1, 2), (1, 0, 2), (1, 1, 2)]
    assert [expert_parallel_layout(r, 4, 1)[:2] for r in range(4)] == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert [expert_parallel_layout(r, 4, 4)[:2] for r in range(4)] == [(0, 0), (1, 0), (2, 0), (3, 0)]


class RecordingSlice:
    """A lazy checkpoint tensor (as safetensors' get_slice) that records which parts were read."""

    def __init__(self, name, t, reads):
        self.name, self.t, self.reads = name, t, reads

    def get_shape(self):
        return list(self.t.shape)

    def __getitem__(self, index):
        self.reads.append(self.name)
        return self.t[index]


@pytest.mark.parametrize("tp,ep", [(2, 1), (2, 2), (4, 2), (4, 4)])
def test_rank_shards_sum_to_the_full_layer_and_read_only_their_experts(tp, ep):
    """One FusedMoE per simulated tp rank (no process group): their partial sums add up to the whole layer."""
    num_experts, hidden, inter, shared = 8, 64, 32, 48
    g = torch.Generator().manual_seed(0)
    ckpt = {"model.mlp.gate.weight": torch.randn(num_experts, hidden, generator=g),
            "model.mlp.shared_expert_gate.weight": torch.randn(1, hidden, generator=g)}
    for prefix, width in [("shared_expert", shared)] + [(f"experts.{e}", inter) for e in range(num_experts)]:
        for name, shape in [("gate_proj", (width, hidden)), ("up_proj", (width, hidden)),
                            ("down_proj", (hidden, width))]:
            ckpt[f"model.mlp.{prefix}.{name}.weight"] = torch.randn(*shape, generator=g) / 8
    packed = {**moe_packed_names(num_experts, "mlp.experts", "mlp", ("gate_proj", "up_proj", "down_proj")),
              **LlamaForCausalLM.packed}
    x = torch.randn(23, hidden, generator=g)

    def build(reads=None):
        root = nn.Module()
        root.model = nn.Module()
        root.model.mlp = FusedMoE(num_experts, 2, hidden, inter, renormalize=False,
                                  shared_expert_intermediate_size=shared, reduce_results=False)
        weights = ((n, RecordingSlice(n, t, reads) if reads is not None else t) for n, t in ckpt.items())
        load_weights_strict(root, weights, packed)
        return root.model.mlp

    with torch.no_grad():
        full = build()(x)
        total = torch.zeros_like(full)
        try:
            for rank in range(tp):
                set_parallel_context(ParallelContext(tp_rank=rank, tp_size=tp, ep_size=ep))
                reads = []
                moe = build(reads)
                assert moe.w13.weight.shape == (num_experts // ep, 2 * inter * ep // tp, hidden)
                read_experts = {int(n.split(".")[3]) for n in reads if ".experts." in n}
                assert read_experts == set(range(moe.expert_start, moe.expert_start + num_experts // ep))
                total += moe(x)
        finally:
            set_parallel_context(ParallelContext())
    torch.testing.assert_close(total, full, atol=1e-5, rtol=1e-5)


def test_qwen_moe_with_dense_layers_is_refused():
    from shardllm.models.qwen_moe import Qwen3MoeForCausalLM

    cfg = transformers.Qwen3MoeConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      num_experts=8, moe_intermediate_size=32, mlp_only_layers=[1])
    with pytest.raises(ValueError, match="mlp_only_layers"):
        Qwen3MoeForCausalLM(cfg, 64)


def test_parameter_counts_of_moe_models():
    assert count_parameters(load_shipped_config("mixtral-8x7b")) / 1e9 == pytest.approx(46.70, abs=0.01)
    assert count_parameters(load_shipped_config("mixtral-8x22b")) / 1e9 == pytest.approx(140.6, abs=0.1)
    qwen3_30b_a3b = transformers.Qwen3MoeConfig(
        vocab_size=151936, hidden_size=2048, moe_intermediate_size=768, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8)
    assert count_parameters(qwen3_30b_a3b) / 1e9 == pytest.approx(30.5, abs=0.05)
    qwen15_moe_a27b = transformers.Qwen2MoeConfig(
        vocab_size=151936, hidden_size=2048, moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
        num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16, num_experts=60)
    assert count_parameters(qwen15_moe_a27b) / 1e9 == pytest.approx(14.3, abs=0.05)
