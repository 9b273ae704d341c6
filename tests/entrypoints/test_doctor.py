"""`shardllm doctor`: a report and an exit code on a CPU machine, a real CPU server's /metrics read over HTTP,
and the guide's common issues flagged from a real exposition of fake-NVML GPUs (the only mock)."""

from __future__ import annotations

import json
import sys

import httpx
import pytest
import torch

from shardllm.entrypoints import doctor
from shardllm.entrypoints.cli import main
from shardllm.metrics import EngineSnapshot, LatencyHistograms
from shardllm.metrics.gpu_monitor import GPUMonitor, RankDevice
from shardllm.metrics.prometheus import make_registry, render
from tests.entrypoints.conftest import RemoteServer, free_port
from tests.metrics.fake_nvml import FakeGPU, FakeNVML

GiB = 1 << 30


@pytest.fixture(scope="module")
def server():
    """A real CPU server with a short context: its start-up profile forward is 256 tokens, not 1024."""
    srv = RemoteServer(["--max_seq_len", "256", "--max_num_tokens", "256", "--cpu_kv_cache_gb", "0.05"])
    yield srv
    assert srv.stop() == 0, srv.log_tail()


def test_doctor_on_a_cpu_machine_reports_and_exits_cleanly(capsys):
    rc = main(["doctor", "--json"])  # any exception would fail this test: doctor must turn it into a finding
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    report = json.loads(out)
    assert rc == (0 if report["healthy"] else 1)
    checks = {f["check"]: f for f in report["findings"]}
    assert "versions" in checks and torch.__version__ in checks["versions"]["seen"]
    assert all(f["severity"] in doctor.SEVERITIES for f in report["findings"])
    if not torch.cuda.is_available():
        assert checks["gpus"]["severity"] == "info" and "no NVIDIA GPU" in checks["gpus"]["seen"]
        assert rc == 0
    assert main(["doctor"]) == rc  # the text report too
    assert "problem(s)" in capsys.readouterr().out


def test_host_checks_read_nvml(monkeypatch, capsys):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    for k in doctor.MULTICAST_VARS:
        monkeypatch.delenv(k, raising=False)
    gpus = [FakeGPU("GPU-a", "0:1", links=(0, 1)), FakeGPU("GPU-b", "0:2", links=(0,), links_down=(1,)),
            FakeGPU("GPU-c", "0:3", used=0, clock_reasons=0x40 | 0x4, p2p=False)]  # thermal slowdown, power cap
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML(gpus))
    from shardllm.metrics.gpu_monitor import inspect_host

    host = inspect_host()
    assert host["driver_version"] == "580.65.06" and host["cuda_driver_version"] == "13.0"
    assert [(p["gpus"], p["nvlink"], p["p2p"], p["pcie"]) for p in host["pairs"]] == [
        ([0, 1], True, True, "PHB"), ([0, 2], False, False, "PHB"), ([1, 2], False, False, "PHB")]
    found = doctor.check_topology(host) + doctor.check_devices(host) + doctor.check_settings(host)
    by = {(f.check, f.severity): f for f in found}
    assert "0-2 (PHB, no P2P), 1-2 (PHB, no P2P)" in by[("topology", "warning")].seen
    assert "links [1] down" in by[("nvlink", "problem")].seen
    assert by[("clocks", "problem")].seen == "GPU 2 slows its clocks: hardware thermal slowdown"
    # GPUs linked to each other, not to an NVSwitch: no multicast to turn off, whatever the variables say
    assert "change nothing here" in by[("settings", "ok")].seen
    assert main(["doctor"]) == 1  # problems found: exit 1, with the report
    assert "[PROBLEM] nvlink" in capsys.readouterr().out


def test_multicast_advice_only_where_nvls_exists(monkeypatch):
    from shardllm.metrics.gpu_monitor import inspect_host

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    for k in doctor.MULTICAST_VARS:
        monkeypatch.delenv(k, raising=False)

    def settings(**kw) -> doctor.Finding:
        monkeypatch.setitem(sys.modules, "pynvml", FakeNVML([FakeGPU(f"GPU-{i}", f"0:{i}", **kw) for i in range(2)]))
        (finding,) = doctor.check_settings(inspect_host())
        return finding

    hgx = dict(links=tuple(range(18)), nvswitch=True)
    for kw in (dict(links=()), dict(links=(0, 1)), dict(hgx, compute_capability=(8, 0))):  # PCIe, bridge, A100
        f = settings(**kw)
        assert (f.severity, f.fix) == ("ok", "") and "change nothing" in f.seen, kw
    f = settings(**hgx)  # Hopper on an NVSwitch: NCCL's default NVLS is fine; off only where it is forbidden
    assert f.severity == "info" and "NCCL uses NVLink multicast (NVLS) by default" in f.seen
    assert "NCCL_NVLS_ENABLE=0" in f.seen and "forbids multicast" in f.why and f.fix.startswith("only in those cases")
    for k, v in doctor.MULTICAST_VARS.items():
        monkeypatch.setenv(k, v)
    f = settings(**hgx)
    assert f.severity == "ok" and "without NVLS" in f.why


def test_doctor_reads_a_real_server(server, capsys):
    for _ in range(2):
        r = httpx.post(server.url("/v1/completions"), json={"model": "SmolLM2-135M-Instruct", "prompt": "Hi",
                                                             "max_tokens": 4}, timeout=60)
        assert r.status_code == 200
    assert server.metrics()[("shardllm_gpu_monitoring_available", ())] == 0  # a CPU server: no NVML
    rc = main(["doctor", "--url", server.base_url, "--json", "--interval", "0.2"])
    report = json.loads(capsys.readouterr().out)
    findings = {f["check"]: f for f in report["findings"]}
    assert findings["gpu metrics"]["severity"] == "info"
    assert findings["server"]["severity"] == "ok" and server.base_url in findings["server"]["seen"]
    assert rc == 0 and report["healthy"]
    host_port = server.base_url.split("://", 1)[1]  # 127.0.0.1:PORT, as curl takes it: http:// assumed
    assert main(["doctor", "--url", host_port, "--interval", "0.1"]) == 0
    assert f"http://{host_port}: no common issue" in capsys.readouterr().out


def test_doctor_flags_an_unreachable_server(capsys):
    url = f"http://127.0.0.1:{free_port()}"
    assert main(["doctor", "--url", url, "--interval", "0.1"]) == 1
    out = capsys.readouterr().out
    assert "[PROBLEM] server: cannot read" in out and "fix:" in out
    assert main(["doctor", "--url", "notaurl", "--interval", "0.1"]) == 1  # a typo is a problem, not a pass
    assert "is not a URL" in capsys.readouterr().out


def exposition(fake: FakeNVML, snap: EngineSnapshot, monkeypatch) -> tuple:
    """Two scrapes of a real registry over fake-NVML GPUs, the second after `fake` changes (see callers)."""
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    mon = GPUMonitor([RankDevice(r, r, 0, r) for r in range(len(fake.gpus))]).start()
    registry = make_registry(lambda: snap, LatencyHistograms(), "m", gpu_monitor=mon)
    return mon, lambda: doctor.parse_metrics(render(registry).decode())


def test_diagnose_flags_the_guides_common_issues(monkeypatch):
    gpus = [FakeGPU("GPU-a", "0:1", used=90 * GiB, util=40), FakeGPU("GPU-b", "0:2", used=40 * GiB, util=45)]
    snap = EngineSnapshot(num_requests_running=8, num_requests_waiting=5, kv_cache_usage=0.99, preemptions=3)
    mon, scrape = exposition(FakeNVML(gpus), snap, monkeypatch)
    before = scrape()
    mon.poll()
    findings = {f.check: f for f in doctor.diagnose_metrics(before, scrape(), 2.0)}
    assert findings["memory balance"].severity == "problem" and "90.0 GiB" in findings["memory balance"].seen
    assert findings["nvlink"].severity == "problem" and "no active NVLink" in findings["nvlink"].seen  # tp 2 on PCIe
    assert findings["utilisation"].severity == "warning" and "40%" in findings["utilisation"].seen
    assert findings["kv cache"].severity == "problem" and "fp8" in findings["kv cache"].fix
    mon.stop()


def test_diagnose_nvlink_traffic_under_tp(monkeypatch):
    gpus = [FakeGPU(f"GPU-{i}", f"0:{i}", util=90, links=(0, 1), tx_kib={0: 0, 1: 0}) for i in range(2)]
    fake = FakeNVML(gpus)
    mon, scrape = exposition(fake, EngineSnapshot(num_requests_running=4), monkeypatch)
    for g in gpus:
        g.tx_kib = {0: 100, 1: 100}  # 200 KiB in 2 s while generating: a PCIe fallback's signature
    mon.poll()
    before = scrape()
    for g in gpus:
        g.tx_kib = {0: 200, 1: 200}
    mon.poll()
    after = scrape()
    after["shardllm_generation_tokens_total"] = [({}, 1000.0)]  # 500 tok/s between the two scrapes
    low = {f.check: f for f in doctor.diagnose_metrics(before, after, 2.0)}
    assert low["nvlink"].severity == "warning" and "0.00 GB/s" in low["nvlink"].seen
    for g in gpus:
        g.tx_kib = {0: 200 + 4 * 2**20, 1: 200 + 4 * 2**20}  # 8 GiB more in 2 s: healthy TP traffic
    mon.poll()
    busy = doctor.diagnose_metrics(after, {**scrape(), "shardllm_generation_tokens_total": [({}, 2000.0)]}, 2.0)
    assert not [f for f in busy if f.severity in ("warning", "problem")]
    mon.stop()


@pytest.mark.parametrize("argv", [["doctor", "--bogus"]])
def test_doctor_bad_flag_is_a_usage_error(argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2


@pytest.fixture
def other_service():
    """A real HTTP server on loopback that is not shardllm: GET /<page>/metrics answers PAGES[page]."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    pages = {"/html/metrics": b"<html><body>{ not metrics }</body></html>",
             "/exporter/metrics": b"# TYPE node_load1 gauge\nnode_load1 0.5\n"}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = pages.get(self.path)
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(body or b"not found")

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.mark.parametrize("page, seen", [
    ("html", "/html/metrics is not Prometheus text"),
    ("exporter", "/exporter/metrics has no shardllm_ metrics, only 1 other series"),
])
def test_doctor_tells_another_service_from_a_server(other_service, page, seen, capsys):
    """Another service on the address was "not a URL" (an HTML page) or passed as healthy (another exporter's
    metrics: "no common issue", exit 0)."""
    assert main(["doctor", "--url", f"{other_service}/{page}", "--interval", "0.01", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    (server,) = [f for f in report["findings"] if f["check"] == "server"]
    assert server["severity"] == "problem" and seen in server["seen"] and "not a URL" not in server["seen"]
    assert not report["healthy"]


def test_doctor_takes_the_metrics_url_itself(server, capsys):
    """--url http://host:port/metrics (a Prometheus target's URL) reads that page, not /metrics/metrics (a 404)."""
    assert main(["doctor", "--url", server.url("/metrics"), "--interval", "0.1"]) == 0
    assert f"{server.base_url}: no common issue" in capsys.readouterr().out
