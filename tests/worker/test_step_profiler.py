"""Worker-side step profiling: every rank of a tp = 2 run on CPU (gloo, multiproc) writes its file; the window
armed through the executor lands on every rank; with SHARDLLM_PROFILE_DIR unset nothing is profiled or written."""

from __future__ import annotations

import json
import os

import pytest
import torch

from shardllm import LLM, SamplingParams
from shardllm.worker.step_profiler import ENV_DIR, ENV_STEPS, PHASES, busy_time, comm_kind, parse_steps

PROMPTS = [[5, 9, 13, 200, 17], [7, 3]]
GREEDY = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
STEP_KEYS = {"index", "num_seqs", "num_tokens", "decode", "wall_us", "gpu_busy_us", "gpu_idle_us", "gpu_compute_us",
             "execute_model_us", "outside_us", "phases_us", "all_reduce_us", "all_reduce_calls", "send_recv_us"}
SUMMARY_KEYS = {"num_steps", "wall_us", "gpu_busy_us", "gpu_idle_us", "gpu_compute_us", "execute_model_us",
                "outside_us", "phases_us", "all_reduce_us", "all_reduce_calls", "send_recv_us", "kernels_per_step",
                "top_kernels"}


def _check_rank_file(d: dict, rank: int, steps: list[int]) -> None:
    assert d["rank"] == rank and d["tp_rank"] == rank and d["tp_size"] == 2 and d["pp_size"] == 1
    assert d["device"] == "cpu" and d["dtype"] == "float32"
    assert d["steps_profiled"] == steps
    for s in d["steps"]:
        assert set(s) == STEP_KEYS
        assert s["wall_us"] > 0 and 0 < s["execute_model_us"] <= s["wall_us"] + 1
        assert s["decode"] and s["num_seqs"] == s["num_tokens"] == len(PROMPTS)  # every profiled step decodes
        assert set(s["phases_us"]) == set(PHASES)
        assert s["phases_us"]["forward"] > 0 and s["phases_us"]["prepare_inputs"] > 0
        assert s["phases_us"]["compute_logits"] > 0 and s["phases_us"]["sample"] > 0  # async: every tp rank samples
        assert s["all_reduce_calls"] > 0 and s["all_reduce_us"] > 0  # gloo's all-reduce, host side on CPU
        assert s["gpu_busy_us"] is None  # no GPU here
    assert set(d["decode"]) == SUMMARY_KEYS and d["decode"]["num_steps"] == len(steps)
    assert d["decode"]["wall_us"] > 0 and d["decode"]["top_kernels"]
    assert {"name", "calls_per_step", "us_per_step"} <= set(d["decode"]["top_kernels"][0])


@pytest.mark.timeout(120)
def test_tp2_ranks_write_their_profiles(tiny_checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_DIR, str(tmp_path))  # the multiproc workers inherit it
    monkeypatch.setenv(ENV_STEPS, "1:2")
    llm = LLM(tiny_checkpoints["llama"], tensor_parallel_size=2, device="cpu", num_kv_blocks=200, block_size=4)
    try:
        outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)  # 5 steps: the window (calls 1, 2) closes at call 3
        for rank in (0, 1):
            with open(tmp_path / f"rank{rank}.json") as f:
                _check_rank_file(json.load(f), rank, [1, 2])
        # a window armed through the executor: between the same two plans on every rank, in <dir>/<tag>/
        llm.engine.executor.start_step_profile(2, "again")
        again = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        results = llm.engine.executor.step_profile()
        assert [r["rank"] for r in results] == [0, 1]
        assert results[0]["steps_profiled"] == results[1]["steps_profiled"]
        first = results[0]["steps_profiled"][0]
        assert results[0]["steps_profiled"] == [first, first + 1]
        for rank in (0, 1):
            with open(tmp_path / "again" / f"rank{rank}.json") as f:
                assert json.load(f)["steps_profiled"] == results[0]["steps_profiled"]
        # profiling changes no token
        assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in outs]
    finally:
        llm.shutdown()


@pytest.mark.timeout(60)
def test_off_without_the_directory(tiny_checkpoints, tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_DIR, raising=False)
    monkeypatch.setenv(ENV_STEPS, "0:2")  # a window alone does not switch profiling on
    monkeypatch.chdir(tmp_path)
    llm = LLM(tiny_checkpoints["llama"], device="cpu", num_kv_blocks=200, block_size=4)
    try:
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        assert llm.engine.executor.worker.step_profiler is None
        assert llm.engine.executor.step_profile() == [None]
        with pytest.raises(ValueError, match=ENV_DIR):
            llm.engine.executor.start_step_profile(2)
    finally:
        llm.shutdown()
    assert os.listdir(tmp_path) == []


def test_steps_setting_and_helpers():
    assert parse_steps("8:16") == (8, 16) and parse_steps("manual") is None
    for bad in ("8", "a:b", "-1:4", "3:0"):
        with pytest.raises(ValueError, match="first"):
            parse_steps(bad)
    assert busy_time([(0, 2), (1, 3), (5, 6)]) == 4 and busy_time([]) == 0
    assert comm_kind("ncclDevKernel_AllReduce_Sum_bf16_RING_LL") == "all_reduce"
    assert comm_kind("c10d::allreduce_") == "all_reduce"
    assert comm_kind("ncclDevKernel_SendRecv") == "send_recv" and comm_kind("c10d::recv_") == "send_recv"
    assert comm_kind("ampere_bf16_s16816gemm") is None


@pytest.mark.gpu
@pytest.mark.timeout(120)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_kernels_and_graph_replay(tiny_checkpoints, tmp_path, monkeypatch):
    """On a GPU: kernels (replayed from CUDA graphs) are seen, busy + idle = wall, the replay is a host phase."""
    monkeypatch.setenv(ENV_DIR, str(tmp_path))
    monkeypatch.setenv(ENV_STEPS, "3:4")
    llm = LLM(tiny_checkpoints["llama"], device="cuda", max_seq_len=256, max_batch_size=8, num_kv_blocks=256)
    try:
        llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), use_tqdm=False)
    finally:
        llm.shutdown()
    with open(tmp_path / "rank0.json") as f:
        d = json.load(f)
    assert d["device"] == "cuda" and d["graphs"] and d["steps_profiled"] == [3, 4, 5, 6]
    for s in d["steps"]:
        assert 0 < s["gpu_busy_us"] <= s["wall_us"] and s["gpu_compute_us"] <= s["gpu_busy_us"]
        assert abs(s["gpu_busy_us"] + s["gpu_idle_us"] - s["wall_us"]) < 1
        assert s["phases_us"]["graph_replay"] > 0 and s["phases_us"]["forward"] == 0  # decode steps replay
    top = d["decode"]["top_kernels"]
    assert top and all(k["calls_per_step"] > 0 and k["us_per_step"] > 0 for k in top)
    assert d["decode"]["kernels_per_step"] >= 10  # a 2-layer model's step is more than a handful of kernels
