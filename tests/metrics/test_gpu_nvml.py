"""On GPUs, against the real NVML: memory gauges agree with CUDA, NVLink counters count an all-reduce's bytes,
doctor finds NVLink between two GPUs, and the planner predicts the engine's measured memory (Llama-3-8B dummy)."""

from __future__ import annotations

import json
import time

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pynvml = pytest.importorskip("pynvml")

from shardllm.metrics.gpu_monitor import GPUMonitor, RankDevice  # noqa: E402

GiB = 1 << 30
TWO_GPUS = [pytest.mark.multi_gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]


def two_gpus(fn):
    for mark in TWO_GPUS:
        fn = mark(fn)
    return fn


def monitor(n: int) -> GPUMonitor:
    mon = GPUMonitor([RankDevice(r, r, 0, r) for r in range(n)]).start()
    assert mon.snapshot.available, mon.snapshot.reason
    return mon


@pytest.mark.timeout(60)
def test_memory_gauges_match_cuda_and_uuid_matches_torch():
    x = torch.empty(4 * GiB, dtype=torch.uint8, device="cuda:0")  # 4 GiB in use, so "used" is not just the context
    torch.cuda.synchronize()
    mon = monitor(1)
    try:
        free0, total = torch.cuda.mem_get_info(0)
        v = mon.poll().devices[0]
        free1, _ = torch.cuda.mem_get_info(0)
        free = (free0 + free1) / 2
        print(json.dumps({"nvml": v.values, "cuda_free": free, "cuda_total": total}))
        assert abs(v.values["fb_free"] - free) <= 0.01 * total
        assert abs(v.values["fb_used"] - (total - free)) <= 0.01 * total
        uuid = str(torch.cuda.get_device_properties(0).uuid)  # torch prints it without NVML's "GPU-" prefix
        assert v.labels["UUID"] == (uuid if uuid.startswith("GPU-") else "GPU-" + uuid)
        for key in ("utilization", "power", "sm_clock", "temperature", "fb_total"):
            assert key in v.values, key
    finally:
        mon.stop()
        del x


@two_gpus
@pytest.mark.timeout(90)
def test_nvlink_tx_counts_a_1gib_all_reduce():
    import torch.cuda.nccl as nccl

    n = 1 * GiB // 4  # 1 GiB of fp32 on each GPU
    bufs = [torch.ones(n, dtype=torch.float32, device=f"cuda:{i}") for i in range(2)]
    nccl.all_reduce(bufs)  # warm-up: communicator set-up, lazy allocations
    for i in range(2):
        torch.cuda.synchronize(i)
    mon = monitor(2)
    try:
        assert all(d.values.get("nvlink_links_active", 0) > 0 for d in mon.snapshot.devices), "no NVLink up"
        time.sleep(1.0)
        before = [d.values["nvlink_tx"] for d in mon.poll().devices]
        nccl.all_reduce(bufs)
        for i in range(2):
            torch.cuda.synchronize(i)
        time.sleep(1.0)  # let the driver's counters catch up
        after = [d.values["nvlink_tx"] for d in mon.poll().devices]
        grew = [a - b for a, b in zip(after, before)]
        print(json.dumps({"nvlink_tx_bytes_grew": grew, "payload_bytes": GiB}))
        # a ring all-reduce over 2 GPUs sends 2 (n-1)/n = 1 x the buffer from each GPU
        assert all(g >= GiB for g in grew), grew
        assert bufs[0][0].item() == 4.0  # 1 + 1, then (1 + 1) + (1 + 1)
    finally:
        mon.stop()


@two_gpus
@pytest.mark.timeout(60)
def test_doctor_finds_nvlink_between_two_gpus(capsys):
    from shardllm.entrypoints.cli import main
    from shardllm.metrics.gpu_monitor import inspect_host

    host = inspect_host()
    assert host["available"] and len(host["gpus"]) >= 2
    assert host["pairs"][0]["nvlink"], host["pairs"]
    main(["doctor", "--json"])
    report = json.loads(capsys.readouterr().out)
    topo = [f for f in report["findings"] if f["check"] == "topology"]
    assert topo and topo[0]["severity"] == "ok", topo


@pytest.mark.timeout(150)
@pytest.mark.parametrize("tp", [1, pytest.param(2, marks=TWO_GPUS)])
def test_planner_predicts_measured_memory_within_10_percent(tp):
    from shardllm import LLM
    from shardllm.engine.startup_summary import predict

    # enforce_eager: the KV cache is sized before graphs are captured, and the planner counts no graph pool, so
    # capturing 20 batch sizes of a 32-layer model would only cost time
    llm = LLM("llama-3-8b", load_format="dummy", dtype="bf16", device="cuda", tensor_parallel_size=tp,
              enforce_eager=True)
    try:
        reports = llm.engine.executor.memory_report()
        est = predict(llm.config, min(r["total"] for r in reports))
        for rank, rep in enumerate(reports):
            stage = est.stages[rank // tp]
            kv_pred = (stage.kv_tokens + llm.config.cache_config.block_size) * stage.kv_bytes_per_token
            print(json.dumps({"tp": tp, "rank": rank, "weights": rep["weights"], "weights_pred": stage.weights,
                              "kv_cache": rep["kv_cache"], "kv_pred": kv_pred, "peak": rep["peak"],
                              "total": rep["total"]}))
            assert abs(stage.weights - rep["weights"]) <= 0.10 * rep["weights"]
            assert abs(kv_pred - rep["kv_cache"]) <= 0.10 * rep["kv_cache"]
    finally:
        llm.shutdown()


@pytest.mark.timeout(60)
def test_inspect_host_reads_what_nvlink_leads_to_and_the_gauge_polls_link_states():
    from dataclasses import asdict

    from shardllm.entrypoints import doctor
    from shardllm.metrics.gpu_monitor import inspect_host

    host = inspect_host()
    assert host["available"], host
    g = host["gpus"][0]
    major, minor = torch.cuda.get_device_capability(0)
    assert g["compute_capability"] == f"{major}.{minor}"
    assert g["nvswitch"] in (True, False, None) and (g["nvlink_up"] or g["nvswitch"] is False)
    mon = monitor(1)
    try:
        active = mon.poll().devices[0].values.get("nvlink_links_active")
    finally:
        mon.stop()
    print(json.dumps({"gpu0": {k: g[k] for k in ("name", "compute_capability", "nvswitch", "nvlink_up",
                                                  "nvlink_down")}, "nvlink_links_active": active,
                      "nvls_possible": doctor.nvls_possible(host),
                      "settings": [asdict(f) for f in doctor.check_settings(host)]}))
    assert active == len(g["nvlink_up"])  # the polled gauge agrees with the one-shot inspection
