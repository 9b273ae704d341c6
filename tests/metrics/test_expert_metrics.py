"""MoE expert load reaches Prometheus: tokens per (layer, expert) from the workers to the exposition."""

from prometheus_client.parser import text_string_to_metric_families

from shardllm import LLM, SamplingParams
from shardllm.metrics import EngineSnapshot, LatencyHistograms
from shardllm.metrics.prometheus import make_registry, render


def test_expert_tokens_metric_counts_every_routed_token(tiny_checkpoints):
    llm = LLM(tiny_checkpoints["mixtral"], device="cpu", num_kv_blocks=100)
    prompts = [[5, 6, 7, 8, 9], [10, 11]]
    outs = llm.generate(prompts, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True), use_tqdm=False)
    # every prompt token and every generated token but the last passes through each MoE layer once
    tokens = sum(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) - 1 for o in outs)
    load = llm.engine.executor.expert_load()
    cfg = llm.config.model_config.hf_config
    snap = EngineSnapshot(expert_load=load)
    text = render(make_registry(lambda: snap, LatencyHistograms(), "tiny")).decode()
    fam = {f.name: f for f in text_string_to_metric_families(text)}["shardllm_moe_expert_tokens"]
    per_layer: dict[str, float] = {}
    for sample in fam.samples:
        per_layer[sample.labels["layer"]] = per_layer.get(sample.labels["layer"], 0) + sample.value
    assert len(per_layer) == cfg.num_hidden_layers
    assert all(v == tokens * cfg.num_experts_per_tok for v in per_layer.values())
