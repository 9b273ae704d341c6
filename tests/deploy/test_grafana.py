"""deploy/grafana/shardllm-dashboard.json: every metric and label its queries name is in a real server's
/metrics (a CPU server with the embedded model, after one request so that labelled counters have series)."""

from __future__ import annotations

import json
import re
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
def test_every_queried_metric_and_label_is_served():
    server = RemoteServer()
    try:
        r = httpx.post(server.url("/v1/completions"), timeout=120,
                       json={"model": MODEL, "prompt": "Hello", "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200, r.text
        text = httpx.get(server.url("/metrics"), timeout=10).text
    finally:
        assert server.stop() == 0
    labels: dict[str, set[str]] = {}
    for family in parser.text_string_to_metric_families(text):
        for s in family.samples:
            labels.setdefault(s.name, set()).update(s.labels)
    d = json.loads(DASHBOARD.read_text())
    missing = []
    for expr in queries(d):
        names = METRIC.findall(expr)
        missing += [n for n in names if n not in labels]
        for group in BY.findall(expr):
            for label in (x.strip() for x in group.split(",")):
                if label != "le" and not any(label in labels.get(n, ()) for n in names):
                    missing.append(f"label {label} in {expr}")
        if "model_name" in expr:
            assert all("model_name" in labels.get(n, ()) for n in names if n in labels)
    assert missing == [], f"the dashboard queries names /metrics does not serve: {missing}"
