"""GPU metrics through NVML, on CPU: a fake pynvml module (tests/metrics/fake_nvml.py) is the only mock."""

from __future__ import annotations

import logging
import pathlib
import sys
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shardllm.metrics import EngineSnapshot, LatencyHistograms
from shardllm.metrics.gpu_monitor import GPUMonitor, RankDevice
from shardllm.metrics.prometheus import make_registry, render
from tests.metrics.fake_nvml import NOT_SUPPORTED, FakeGPU, FakeNVML

GiB = 1 << 30


def two_gpus(**kw) -> list[FakeGPU]:
    return [FakeGPU("GPU-aaaa-0000", "00000000:18:00.0", **kw), FakeGPU("GPU-bbbb-1111", "00000000:2A:00.0", **kw)]


def ranks(n: int, tp: int) -> list[RankDevice]:
    return [RankDevice(r, r % tp, r // tp, r) for r in range(n)]


@pytest.fixture
def nvml(monkeypatch):
    """Install a fake pynvml with two GPUs; tests edit its GPUs before starting a monitor."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    fake = FakeNVML(two_gpus())
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    return fake


def scrape(monitor: GPUMonitor) -> dict[str, list]:
    """The exposition of an engine + GPU registry: family name -> samples."""
    snap = EngineSnapshot(num_requests_running=3)
    text = render(make_registry(lambda: snap, LatencyHistograms(), "m", gpu_monitor=monitor)).decode()
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def by_gpu(samples) -> dict[str, float]:
    return {s.labels["gpu"]: s.value for s in samples}


def test_missing_library_reports_unavailable_and_engine_metrics_still_serve(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # `import pynvml` raises ImportError
    mon = GPUMonitor(ranks(2, 2)).start()
    assert not mon.snapshot.available and "nvidia-ml-py" in mon.snapshot.reason
    fams = scrape(mon)
    assert fams["shardllm_gpu_monitoring_available"][0].value == 0
    assert fams["shardllm_num_requests_running"][0].value == 3
    assert "shardllm_gpu_utilization_percent" not in fams
    mon.stop()


def test_init_failure_reports_unavailable(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", FakeNVML(two_gpus(), init_error=9))  # driver not loaded
    mon = GPUMonitor(ranks(1, 1)).start()
    assert not mon.snapshot.available and "did not initialise" in mon.snapshot.reason
    assert scrape(mon)["shardllm_gpu_monitoring_available"][0].value == 0


def test_real_library_without_a_driver_degrades():
    pytest.importorskip("pynvml")
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU driver")
    mon = GPUMonitor(ranks(1, 1)).start()
    assert not mon.snapshot.available and mon.snapshot.reason
    assert scrape(mon)["shardllm_gpu_monitoring_available"][0].value == 0
    mon.stop()


def test_for_engine_ranks_and_where_it_stays_off(nvml):
    from types import SimpleNamespace

    from shardllm.config import ParallelConfig

    cpu = SimpleNamespace(device="cpu", parallel_config=ParallelConfig(1, 1))
    mon = GPUMonitor.for_engine(cpu).start()
    assert not mon.snapshot.available and "cpu" in mon.snapshot.reason
    ray = SimpleNamespace(device="cuda", parallel_config=ParallelConfig(2, 1, distributed_executor_backend="ray"))
    assert "Ray" in GPUMonitor.for_engine(ray).start().snapshot.reason
    assert nvml.calls == []
    nvml.gpus += [FakeGPU(f"GPU-cccc-{i}", f"00000000:{40 + i}:00.0") for i in range(2)]
    mon = GPUMonitor.for_engine(SimpleNamespace(device="cuda", parallel_config=ParallelConfig(2, 2))).start()
    assert [(d.labels["rank"], d.labels["tp_rank"], d.labels["pp_rank"]) for d in mon.snapshot.devices] == [
        ("0", "0", "0"), ("1", "1", "0"), ("2", "0", "1"), ("3", "1", "1")]  # stages of consecutive ranks
    mon.stop()


def test_every_series_with_dcgm_labels(nvml):
    for g in nvml.gpus:
        g.links, g.tx_kib, g.rx_kib = (0, 1), {0: 5, 1: 5}, {0: 5, 1: 5}
    mon = GPUMonitor(ranks(2, 2)).start()
    fams = scrape(mon)
    assert fams["shardllm_gpu_monitoring_available"][0].value == 1
    util = fams["shardllm_gpu_utilization_percent"]
    assert {k for k in util[0].labels} == {"model_name", "gpu", "UUID", "pci_bus_id", "modelName", "rank", "tp_rank",
                                           "pp_rank", "node"}
    assert [(s.labels["rank"], s.labels["tp_rank"], s.labels["UUID"]) for s in util] == [
        ("0", "0", "GPU-aaaa-0000"), ("1", "1", "GPU-bbbb-1111")]
    assert by_gpu(fams["shardllm_gpu_power_watts"]) == {"0": 300.0, "1": 300.0}  # 300,000 mW
    assert by_gpu(fams["shardllm_gpu_sm_clock_hertz"])["0"] == 1980e6
    assert by_gpu(fams["shardllm_gpu_fb_used_bytes"])["0"] == 10e9
    assert by_gpu(fams["shardllm_gpu_fb_free_bytes"])["0"] == 150e9 - 10e9 - 0.5e9
    assert by_gpu(fams["shardllm_gpu_pcie_rx_bytes_per_second"])["1"] == 2_000_000  # 2000 KB/s
    assert by_gpu(fams["shardllm_gpu_nvlink_links_active"]) == {"0": 2, "1": 2}
    assert {s.name for s in fams["shardllm_gpu_nvlink_tx_bytes"]} == {"shardllm_gpu_nvlink_tx_bytes_total"}
    assert fams["shardllm_gpu_memory_imbalance_ratio"][0].value == 1.0
    mon.stop()


def test_not_supported_drops_only_that_series_and_is_not_asked_again(nvml):
    nvml.gpus[1].failing["nvmlDeviceGetPowerUsage"] = NOT_SUPPORTED
    mon = GPUMonitor(ranks(2, 2)).start()
    mon.poll()
    fams = scrape(mon)
    assert by_gpu(fams["shardllm_gpu_power_watts"]) == {"0": 300.0}
    for name in ("shardllm_gpu_utilization_percent", "shardllm_gpu_fb_used_bytes", "shardllm_gpu_temperature_celsius",
                 "shardllm_gpu_pcie_tx_bytes_per_second"):
        assert set(by_gpu(fams[name])) == {"0", "1"}, name
    power_calls = [c for c, _ in nvml.calls if c == "nvmlDeviceGetPowerUsage"]
    assert len(power_calls) == 2 + 1  # GPU 0 on both polls, GPU 1 only on the first
    mon.stop()


def test_other_errors_drop_the_series_for_one_poll_only(nvml):
    nvml.gpus[0].failing["nvmlDeviceGetTemperature"] = 15  # NVML_ERROR_GPU_IS_LOST, say: transient here
    mon = GPUMonitor(ranks(1, 1)).start()
    assert "temperature" not in mon.snapshot.devices[0].values
    del nvml.gpus[0].failing["nvmlDeviceGetTemperature"]
    assert mon.poll().devices[0].values["temperature"] == 40
    mon.stop()


def test_nvlink_counter_reset_and_first_sample_give_no_spike(nvml):
    g = nvml.gpus[0]
    g.links, g.tx_kib, g.rx_kib = (0, 1), {0: 1000, 1: 500}, {0: 7, 1: 7}
    mon = GPUMonitor(ranks(1, 1)).start()
    tx = lambda: mon.snapshot.devices[0].values["nvlink_tx"]  # noqa: E731
    assert tx() == 0  # the first sample is a baseline, not traffic since boot
    g.tx_kib = {0: 1100, 1: 600}
    mon.poll()
    assert tx() == (100 + 100) * 1024
    g.tx_kib = {0: 10, 1: 700}  # link 0's counter was reset (or wrapped): new baseline, adds nothing
    mon.poll()
    assert tx() == (200 + 100) * 1024
    g.tx_kib = {0: 30, 1: 700}
    mon.poll()
    assert tx() == (300 + 20) * 1024
    assert mon.snapshot.devices[0].values["nvlink_rx"] == 0
    mon.stop()


def test_nvlink_links_active_follows_links_going_down_and_up(nvml):
    g = nvml.gpus[0]
    g.links, g.tx_kib, g.rx_kib = (0, 1, 2), {0: 100, 1: 100, 2: 100}, {0: 1, 1: 1, 2: 1}
    mon = GPUMonitor(ranks(1, 1)).start()
    active = lambda: mon.snapshot.devices[0].values.get("nvlink_links_active")  # noqa: E731
    assert active() == 3
    g.links, g.links_down = (0, 2), (1,)  # link 1 goes down
    g.tx_kib = {0: 200, 1: 900, 2: 200}  # a down link's counter is not read: its traffic is not counted
    mon.poll()
    assert active() == 2
    assert mon.snapshot.devices[0].values["nvlink_tx"] == (100 + 100) * 1024
    g.links, g.links_down = (0, 1, 2), ()  # and comes back
    mon.poll()
    assert active() == 3
    mon.stop()


def test_reordered_cuda_visible_devices_map_by_uuid(nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    mon = GPUMonitor(ranks(2, 2)).start()
    d0 = mon.snapshot.devices[0].labels
    assert (d0["rank"], d0["gpu"], d0["UUID"], d0["pci_bus_id"]) == ("0", "1", "GPU-bbbb-1111", "00000000:2A:00.0")
    assert mon.snapshot.devices[1].labels["UUID"] == "GPU-aaaa-0000"
    mon.stop()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-bbbb")  # a UUID prefix, as CUDA accepts
    mon = GPUMonitor(ranks(1, 1)).start()
    assert mon.snapshot.devices[0].labels["gpu"] == "1"
    mon.stop()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-1234")
    mon = GPUMonitor(ranks(1, 1)).start()
    assert not mon.snapshot.available and "MIG-1234" in mon.snapshot.reason


def test_scrape_reads_the_cache_while_an_nvml_call_hangs(nvml):
    mon = GPUMonitor(ranks(2, 2), interval_s=0.01).start()  # the first poll runs here, unblocked
    nvml.block_pcie = threading.Event()  # from now on no poll completes: each one ends in a PCIe call
    nvml.gpus[0].util = 77  # so no snapshot can show this
    try:
        assert nvml.pcie_entered.wait(30), "the background poll never reached the PCIe call"
        calls_before = len(nvml.calls)
        fams = scrape(mon)  # the poller is stuck inside NVML: the scrape must not wait for it or call NVML
        assert len(nvml.calls) == calls_before
        assert by_gpu(fams["shardllm_gpu_utilization_percent"])["0"] == 50  # the last complete poll
    finally:
        nvml.block_pcie.set()
        mon.stop()
    assert {t for c, t in nvml.calls if c.startswith("nvmlDeviceGetPcie")} <= {
        "shardllm-gpu-monitor", threading.main_thread().name}


def test_memory_imbalance_ratio_and_warning(nvml, caplog):
    nvml.gpus[0].used, nvml.gpus[1].used = 90 * GiB, 40 * GiB
    with caplog.at_level(logging.WARNING, logger="shardllm.metrics.gpu_monitor"):
        mon = GPUMonitor(ranks(2, 2)).start()
        mon.poll()
    assert scrape(mon)["shardllm_gpu_memory_imbalance_ratio"][0].value == pytest.approx(90 / 40)
    warnings = [r for r in caplog.records if "imbalanced" in r.getMessage()]
    assert len(warnings) == 1  # once per crossing, not every poll
    mon.stop()


def test_no_deprecated_nvlink_counters_and_one_module_imports_pynvml():
    root = pathlib.Path(__file__).resolve().parents[2] / "shardllm"
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert "nvmlDeviceGetNvLinkUtilizationCounter" not in text, path
        assert "NVML_FI_DEV_NVLINK_BANDWIDTH_" not in text, path
        if path.name != "gpu_monitor.py":
            assert "import pynvml" not in text, path
