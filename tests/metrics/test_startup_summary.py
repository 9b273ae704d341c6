"""The start-up summary: logged by a real engine on CPU, and the planner's prediction built from the engine's config."""

from __future__ import annotations

import dataclasses
import logging

from shardllm import LLM
from shardllm.config import EngineConfig
from shardllm.engine.startup_summary import predict, summary_lines

GiB = 1 << 30


def test_engine_logs_layout_and_per_rank_memory(tiny_checkpoints, caplog):
    with caplog.at_level(logging.INFO, logger="shardllm.startup"):
        llm = LLM(tiny_checkpoints["llama"], device="cpu", num_kv_blocks=50, max_seq_len=256)
    lines = [r.getMessage() for r in caplog.records if r.name == "shardllm.startup"]
    assert lines[0].startswith("layout: tp 1 x pp 1 x ep 1 = 1 ranks on 1 node")
    weights = sum(p.numel() * p.element_size() for p in llm.engine.executor.worker.model_runner.model.parameters())
    assert lines[1].startswith(f"rank 0 (tp 0, pp 0) cpu: weights {weights / GiB:.2f} GiB")
    assert f"= {49 * 16} tokens" in lines[1]  # 50 blocks, one kept aside, 16 tokens each
    assert lines[2].startswith(f"KV cache: 50 blocks (49 usable) x 16 tokens = {49 * 16} tokens per rank")
    assert lines[2].endswith(f"max concurrency {49 * 16 / 256:.2f} requests of max_seq_len 256")
    assert lines[3].startswith("step limits: 256 sequences, 8192 tokens")  # CPU: default_batch_limits' smaller pair
    llm.shutdown()


def test_gpu_lines_compare_with_the_planner():
    config = dataclasses.replace(EngineConfig.create("llama-3-8b", load_format="dummy", device="cpu",
                                                     max_seq_len=8192), device="cuda")
    est = predict(config, 80 * GiB).stages[0]
    # a rank that measured 2% more weights and exactly the predicted KV cache
    report = {"weights": int(est.weights / 1.02), "kv_cache": est.kv_tokens * est.kv_bytes_per_token,
              "peak": 70 * GiB, "total": 80 * GiB}
    lines = summary_lines(config, est.kv_tokens // 16 + 1, [report])
    assert "cuda:0" in lines[1] and "(+2.0%)" in lines[1] and "(+0.0%)" in lines[1]
    assert f"= {est.kv_tokens} tokens" in lines[1]


def test_prediction_follows_fp8_weights_and_kv_cache():
    base = EngineConfig.create("llama-3-8b", load_format="dummy", device="cpu", max_seq_len=4096, dtype="bf16")
    fp8 = EngineConfig.create("llama-3-8b", load_format="dummy", device="cpu", max_seq_len=4096, dtype="fp8",
                              kv_cache_dtype="fp8")
    b, f = predict(base, 80 * GiB).stages[0], predict(fp8, 80 * GiB).stages[0]
    assert b.kv_bytes_per_token == 128 * 1024 and f.kv_bytes_per_token == 64 * 1024
    assert 9.0e9 < f.weights < 9.5e9  # decoder linears at 1 byte, embeddings and head at 2


def test_ray_layout_counts_the_nodes_ranks_were_placed_on_without_num_workers():
    from shardllm.executor.ray import RankPlacement

    config = EngineConfig.create("llama-3-8b", load_format="dummy", device="cpu", tensor_parallel_size=2,
                                 pipeline_parallel_size=2, distributed_executor_backend="ray")
    assert config.parallel_config.num_workers is None
    # Ray packed stage 0 on the driver's node and stage 1 on another: two nodes, though no --num_workers said so
    placement = [RankPlacement(r, r, "a1b2c3d4e5" if r < 2 else "f6e7d8c9b0", "10.0.0.1" if r < 2 else "10.0.0.2",
                               gpu_ids=(r % 2,)) for r in range(4)]
    reports = [{"weights": GiB, "kv_cache": GiB}] * 4
    lines = summary_lines(config, 10, reports, placement)
    assert "= 4 ranks on 2 nodes (Ray)" in lines[0]
    assert lines[1].startswith("rank 0 (tp 0, pp 0) node 10.0.0.1 (a1b2c3d4) cpu:")
    assert lines[4].startswith("rank 3 (tp 1, pp 1) node 10.0.0.2 (f6e7d8c9) cpu:")
    one = summary_lines(config, 10, reports, [dataclasses.replace(p, node_id="a1b2c3d4e5") for p in placement])
    assert "= 4 ranks on 1 node (Ray)" in one[0]  # all on one node: one node, though under Ray
    gpu = dataclasses.replace(config, device="cuda")
    assert "node 10.0.0.2 (f6e7d8c9) GPU 1:" in summary_lines(gpu, 10, reports, placement)[4]
