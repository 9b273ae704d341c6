"""deploy/grafana/shardllm-dashboard.json: every metric and label its queries name is served.

Engine names: a real CPU server's /metrics (the embedded model, after one request so that labelled counters
have series). GPU names (`shardllm_gpu_*`, which a CPU server reports only as monitoring unavailable): the same
exposition code (make_registry + GPUMonitor) over the fake pynvml of tests/metrics, the hardware boundary.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")
parser = pytest.importorskip("prometheus_client.parser")

from tests.entrypoints.conftest import MODEL, RemoteServer  # noqa: E402

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "shardllm-dashboard.json"
METRIC = re.compile(r"\bshardllm_[a-z0-9_]+\b")
BY = re.compile(r"\bby \(([^)]*)\)")


def queries(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return exprs


def is_gpu_query(expr: str) -> bool:
    """Queries of the NVML monitor's series (shardllm_gpu_memory_used_bytes is the engine's, served on CPU)."""
    return any(n.startswith("shardllm_gpu_") and n != "shardllm_gpu_memory_used_bytes" for n in METRIC.findall(expr))


def served_labels(text: str) -> dict[str, set[str]]:
    """sample name -> the label names it carries, from Prometheus text."""
    labels: dict[str, set[str]] = {}
    for family in parser.text_string_to_metric_families(text):
        for s in family.samples:
            labels.setdefault(s.name, set()).update(s.labels)
    return labels


def unserved(exprs: list[str], labels: dict[str, set[str]]) -> list[str]:
    """The metric names, `by (...)` labels and model_name filters of `exprs` that `labels` lacks."""
    missing = []
    for expr in exprs:
        names = METRIC.findall(expr)
        missing += [n for n in names if n not in labels]
        for group in BY.findall(expr):
            for label in (x.strip() for x in group.split(",")):
                if label != "le" and not any(label in labels.get(n, ()) for n in names):
                    missing.append(f"label {label} in {expr}")
        if "model_name" in expr:
            missing += [f"model_name on {n}" for n in names if n in labels and "model_name" not in labels[n]]
    return missing


def test_dashboard_is_well_formed():
    d = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)) and d["uid"] and d["title"]
    variables = {v["name"] for v in d["templating"]["list"]}
    for p in d["panels"]:
        assert p["targets"] and {"h", "w", "x", "y"} <= p["gridPos"].keys()
        assert p["datasource"]["uid"].strip("${}") in variables
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs))
        for t in p["targets"]:
            assert METRIC.search(t["expr"]), t["expr"]
            assert "$model_name" in t["expr"]  # the dashboard's model selector applies to every query


@pytest.mark.timeout(300)
def test_every_queried_engine_metric_and_label_is_served():
    server = RemoteServer()
    try:
        r = httpx.post(server.url("/v1/completions"), timeout=120,
                       json={"model": MODEL, "prompt": "Hello", "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200, r.text
        text = httpx.get(server.url("/metrics"), timeout=10).text
    finally:
        assert server.stop() == 0
    exprs = [e for e in queries(json.loads(DASHBOARD.read_text())) if not is_gpu_query(e)]
    assert len(exprs) >= 12
    labels = served_labels(text)
    assert unserved(exprs, labels) == []
    assert unserved(["sum by (rank) (shardllm_bogus_total)"], labels)  # the check can fail


def test_every_queried_gpu_metric_is_exported_by_the_gpu_monitor(monkeypatch):
    from shardllm.metrics import EngineSnapshot, LatencyHistograms
    from shardllm.metrics.gpu_monitor import GPUMonitor, RankDevice
    from shardllm.metrics.prometheus import make_registry, render
    from tests.metrics.fake_nvml import FakeGPU, FakeNVML

    gpus = [FakeGPU(f"GPU-{i}", f"00000000:1{i}:00.0", links=(0, 1), tx_kib={0: 1, 1: 1}, rx_kib={0: 1, 1: 1})
            for i in range(2)]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML(gpus))
    monitor = GPUMonitor([RankDevice(r, r, 0, r) for r in range(2)]).start()
    try:
        text = render(make_registry(EngineSnapshot, LatencyHistograms(), "m", gpu_monitor=monitor)).decode()
    finally:
        monitor.stop()
    exprs = [e for e in queries(json.loads(DASHBOARD.read_text())) if is_gpu_query(e)]
    assert len(exprs) >= 4
    assert unserved(exprs, served_labels(text)) == []


def _unit_of(panel: dict, ref_id: str) -> str | None:
    """The unit Grafana shows a target in: an override for its refId, else the panel's default."""
    unit = panel["fieldConfig"]["defaults"].get("unit")
    for o in panel["fieldConfig"].get("overrides", []):
        if o["matcher"] == {"id": "byFrameRefID", "options": ref_id}:
            unit = next((p["value"] for p in o["properties"] if p["id"] == "unit"), unit)
    return unit


def expected_units(expr: str) -> set[str] | None:
    """Grafana units that show a query of `expr`'s metric in the unit its name ends with; None: a plain count."""
    name = re.sub(r"_(bucket|total)$", "", METRIC.findall(expr)[0])
    if name.endswith("_bytes"):
        return {"Bps", "binBps"} if "rate(" in expr else {"bytes", "decbytes"}
    for suffix, units in (("_seconds", {"s"}), ("_watts", {"watt"}), ("_celsius", {"celsius"}),
                          ("_percent", {"percent"}), ("_ratio", {"percentunit"})):
        if name.endswith(suffix):
            return units
    return None


def test_every_query_is_shown_in_its_metrics_unit():
    """The power panel drew the hottest GPU's temperature in watts (its default unit, no override for it)."""
    d = json.loads(DASHBOARD.read_text())
    wrong = []
    for p in d["panels"]:
        for t in p["targets"]:
            units = expected_units(t["expr"])
            if units is not None and _unit_of(p, t["refId"]) not in units:
                wrong.append(f"{p['title']} / {t['legendFormat']}: {_unit_of(p, t['refId'])}, not {sorted(units)}")
    assert wrong == []
    assert expected_units("max(shardllm_gpu_temperature_celsius)") == {"celsius"}  # the check can fail
