"""docs/metrics.md and the exposition agree: every metric the tables name is exported with the type they give, every
exported family is in a table, and the HELP text counts what the table counts (sequences, not requests).

The registry is the server's (make_registry), with the fake pynvml of tests/metrics for the GPU series."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from shardllm.metrics import EngineSnapshot, LatencyHistograms
from shardllm.metrics.gpu_monitor import GPUMonitor, RankDevice
from shardllm.metrics.prometheus import make_registry, render
from tests.metrics.fake_nvml import FakeGPU, FakeNVML

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


def documented() -> set[str]:
    """The metric names in the first column of docs/metrics.md's tables; `_rest` abbreviates the name before it
    with as many of its trailing words replaced (`shardllm_gpu_fb_used_bytes`, `_fb_free_bytes`)."""
    names = set()
    for line in DOC.read_text().splitlines():
        if not line.startswith("| `"):
            continue
        full = None
        for name in re.findall(r"`(_?[a-z0-9_]+)`", line.split("|")[1]):
            if name.startswith("shardllm_"):
                full = name
            elif full is not None:
                names.add("_".join(full.split("_")[:-len(name.strip("_").split("_"))]) + name)
                continue
            names.add(name)
    return names


def exported(monkeypatch) -> dict:
    """family name as scraped (counters with _total) -> (type, help), with every optional family present."""
    gpus = [FakeGPU(f"GPU-{i}", f"00000000:1{i}:00.0", links=(0, 1), tx_kib={0: 1, 1: 1}, rx_kib={0: 1, 1: 1})
            for i in range(2)]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML(gpus))
    monitor = GPUMonitor([RankDevice(r, r, 0, r) for r in range(2)]).start()
    snap = EngineSnapshot(memory_in_use=(1, 1), expert_load={(0, 0): 1}, finished={"stop": 1})
    try:
        text = render(make_registry(lambda: snap, LatencyHistograms(), "m", gpu_monitor=monitor)).decode()
    finally:
        monitor.stop()
    return {f.name + ("_total" if f.type == "counter" else ""): (f.type, f.documentation)
            for f in text_string_to_metric_families(text)}


def test_docs_tables_and_exposition_name_the_same_metrics(monkeypatch):
    fams, names = exported(monkeypatch), documented()
    assert len(names) > 30
    assert sorted(names - set(fams)) == [] and sorted(set(fams) - names) == []
    for name, (kind, _) in fams.items():
        assert (kind == "counter") == name.endswith("_total"), name  # Prometheus: counters, and only they, _total


def test_help_counts_sequences_as_the_docs_do(monkeypatch):
    """The table says a request with n > 1 counts n in these; their HELP said "Requests"."""
    fams = exported(monkeypatch)
    for name in ("shardllm_num_requests_running", "shardllm_num_requests_waiting", "shardllm_num_preemptions_total",
                 "shardllm_request_success_total"):
        assert fams[name][1].startswith("Sequences "), (name, fams[name][1])
