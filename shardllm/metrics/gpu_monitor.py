"""GPU metrics through NVML (nvidia-ml-py, the optional `gpu` extra): polled in a background thread, read from a cache.

The only module that imports `pynvml`. Without the library, without a driver, or when a call fails, it degrades:
the monitor reports itself unavailable (`shardllm_gpu_monitoring_available 0`) and a query that one GPU does not
support drops only its own series. NVML numbers GPUs in PCI order and ignores CUDA_VISIBLE_DEVICES, so each rank's
GPU is found through CUDA_VISIBLE_DEVICES (indices or UUIDs) and named by UUID. `inspect_host` serves
`shardllm doctor` and `shardllm plan`.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

# Field ids of nvml.h (NVIDIA's header; pynvml mirrors them): cumulative NVLink payload counters in KiB, per link.
FI_NVLINK_THROUGHPUT_DATA_TX = 138
FI_NVLINK_THROUGHPUT_DATA_RX = 139
NVLINK_MAX_LINKS = 18  # links per GPU on Hopper (H100/H200 SXM); NVML's header allows up to 36
NOT_SUPPORTED = 3  # NVML_ERROR_NOT_SUPPORTED
NVLINK_DEVICE_TYPE_SWITCH = 2  # nvmlNvLinkDeviceType_t: what a link's far end is (0 GPU, 1 IBM NPU, 2 NVSwitch)
NVLINK_DEVICE_TYPE_UNKNOWN = 0xFF

# Sample key -> (metric name without the prefix, type, help). Units are Prometheus base units.
GPU_METRICS: dict[str, tuple[str, str, str]] = {
    "utilization": ("gpu_utilization_percent", "gauge",
                    "Percent of the last sample period with at least one kernel running (NVML; DCGM_FI_DEV_GPU_UTIL)."),
    "fb_used": ("gpu_fb_used_bytes", "gauge", "Device memory used, NVML's view of the whole GPU (DCGM FB_USED)."),
    "fb_free": ("gpu_fb_free_bytes", "gauge", "Device memory free (DCGM FB_FREE)."),
    "fb_total": ("gpu_fb_total_bytes", "gauge", "Device memory in total (DCGM FB_TOTAL)."),
    "fb_reserved": ("gpu_fb_reserved_bytes", "gauge", "Memory the driver and firmware reserve (DCGM FB_RESERVED)."),
    "power": ("gpu_power_watts", "gauge", "Power draw (DCGM_FI_DEV_POWER_USAGE)."),
    "sm_clock": ("gpu_sm_clock_hertz", "gauge", "SM clock (DCGM_FI_DEV_SM_CLOCK, which is in MHz)."),
    "temperature": ("gpu_temperature_celsius", "gauge", "GPU core temperature (DCGM_FI_DEV_GPU_TEMP)."),
    "nvlink_tx": ("gpu_nvlink_tx_bytes", "counter",
                  "NVLink payload bytes sent over all links since the monitor started (NVML throughput fields)."),
    "nvlink_rx": ("gpu_nvlink_rx_bytes", "counter", "NVLink payload bytes received over all links since start."),
    "nvlink_links_active": ("gpu_nvlink_links_active", "gauge", "NVLink links up."),
    "pcie_tx": ("gpu_pcie_tx_bytes_per_second", "gauge", "PCIe send rate over NVML's 20 ms window (DCGM PCIE_TX)."),
    "pcie_rx": ("gpu_pcie_rx_bytes_per_second", "gauge", "PCIe receive rate over NVML's 20 ms window."),
}


def load_nvml() -> tuple[Any, str | None]:
    """(pynvml initialised, None), or (None, why not): the library is missing or nvmlInit failed."""
    try:
        import pynvml
    except ImportError:
        return None, "nvidia-ml-py is not installed (pip install 'shardllm[gpu]')"
    try:
        pynvml.nvmlInit()
    except Exception as e:  # NVMLError (no driver, no library) or an OSError from ctypes
        return None, f"NVML did not initialise: {e}"
    return pynvml, None


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


# nvmlValueType_t -> the member of the nvmlValue_t union that holds the value
_VALUE_MEMBERS = {0: "dVal", 1: "uiVal", 2: "ulVal", 3: "ullVal", 4: "sllVal", 5: "siVal", 6: "usVal"}


def _field_value(fv) -> int:
    return int(getattr(fv.value, _VALUE_MEMBERS.get(getattr(fv, "valueType", 3), "ullVal")))


def _is_not_supported(e: Exception) -> bool:
    return getattr(e, "value", None) == NOT_SUPPORTED


@dataclass(frozen=True)
class GPUIdentity:
    """A physical GPU as DCGM-exporter labels it."""

    index: int  # NVML's index (PCI order), DCGM's `gpu` label
    uuid: str
    pci_bus_id: str
    name: str


def identify(nvml, handle, index: int) -> GPUIdentity:
    return GPUIdentity(index, _text(nvml.nvmlDeviceGetUUID(handle)),
                       _text(nvml.nvmlDeviceGetPciInfo(handle).busId), _text(nvml.nvmlDeviceGetName(handle)))


def all_gpus(nvml) -> list[tuple[Any, GPUIdentity]]:
    """Every GPU NVML sees, in its (PCI) order, as (handle, identity)."""
    out = []
    for i in range(nvml.nvmlDeviceGetCount()):
        h = nvml.nvmlDeviceGetHandleByIndex(i)
        out.append((h, identify(nvml, h, i)))
    return out


def visible_gpus(nvml, cuda_visible_devices: str | None = None) -> list[tuple[Any, GPUIdentity]]:
    """The GPUs CUDA numbers 0, 1, ... in this process: CUDA_VISIBLE_DEVICES' entries in its order.

    Entries are NVML/PCI indices (CUDA_DEVICE_ORDER=PCI_BUS_ID, or identical GPUs) or UUIDs, "GPU-" prefixes
    accepted as CUDA accepts them. Raises ValueError for an entry no GPU matches (MIG instances included).
    """
    gpus = all_gpus(nvml)
    if cuda_visible_devices is None:
        cuda_visible_devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cuda_visible_devices is None:
        return gpus
    out = []
    for entry in (e.strip() for e in cuda_visible_devices.split(",")):
        if not entry:
            break  # CUDA stops at the first empty or invalid entry
        if entry.isdigit():
            if int(entry) >= len(gpus):
                raise ValueError(f"CUDA_VISIBLE_DEVICES names GPU {entry}, but NVML sees {len(gpus)} GPUs")
            out.append(gpus[int(entry)])
            continue
        found = [g for g in gpus if g[1].uuid.startswith(entry if entry.startswith("GPU-") else "GPU-" + entry)]
        if len(found) != 1:
            raise ValueError(f"CUDA_VISIBLE_DEVICES entry {entry!r} matches {len(found)} GPUs (MIG instances are "
                             "not monitored)")
        out.append(found[0])
    return out


@dataclass(frozen=True)
class RankDevice:
    """A rank of the deployment on this host and the CUDA device index it runs on."""

    rank: int
    tp_rank: int
    pp_rank: int
    local_index: int


@dataclass
class DeviceSample:
    labels: dict[str, str]
    values: dict[str, float]  # GPU_METRICS key -> value; a key is absent when its query failed


@dataclass
class GPUSnapshot:
    available: bool
    reason: str | None = None
    devices: list[DeviceSample] = field(default_factory=list)
    memory_imbalance_ratio: float | None = None  # max / min fb_used over the ranks
    time: float = 0.0


class _Counter:
    """A cumulative hardware counter (KiB per link) turned into a byte total that only grows: the first sample
    and any sample below the previous one (a reset or a wrap) set a new baseline and add nothing."""

    def __init__(self):
        self.total = 0
        self._last: dict[int, int] = {}

    def update(self, link: int, kib: int) -> None:
        last = self._last.get(link)
        self._last[link] = kib
        if last is not None and kib >= last:
            self.total += (kib - last) * 1024


class _Device:
    """One monitored GPU: its handle, labels, counters and the queries it refused."""

    def __init__(self, nvml, handle, identity: GPUIdentity, rank: RankDevice, node: str):
        self.nvml, self.handle = nvml, handle
        self.labels = {"gpu": str(identity.index), "UUID": identity.uuid, "pci_bus_id": identity.pci_bus_id,
                       "modelName": identity.name, "rank": str(rank.rank), "tp_rank": str(rank.tp_rank),
                       "pp_rank": str(rank.pp_rank), "node": node}
        self.unsupported: set[str] = set()
        self.counters = {"nvlink_tx": _Counter(), "nvlink_rx": _Counter()}
        # the links this GPU has (up or down at start); their states are read again on every poll, as links go down
        self.link_ids = [link for link in range(NVLINK_MAX_LINKS) if self._link_state(link) is not None]
        self.links: list[int] = []  # the links up at the last poll

    def _link_state(self, link: int) -> bool | None:
        """Whether `link` is up (NVML_FEATURE_ENABLED), or None when NVML does not answer (no such link)."""
        try:
            return self.nvml.nvmlDeviceGetNvLinkState(self.handle, link) == 1
        except Exception:
            return None

    def _poll_links(self) -> int | None:
        """Re-read the link states: the count of links up, None when no link answered this time."""
        states = {link: self._link_state(link) for link in self.link_ids}
        if self.link_ids and all(v is None for v in states.values()):
            return None
        self.links = [link for link, up in states.items() if up]
        return len(self.links)

    def _query(self, key: str, fn):
        """fn() or None when it fails; NOT_SUPPORTED is remembered, so that query is never made again."""
        if key in self.unsupported:
            return None
        try:
            return fn()
        except Exception as e:
            if _is_not_supported(e):
                self.unsupported.add(key)
            logger.debug("NVML %s failed on GPU %s: %s", key, self.labels["gpu"], e)
            return None

    def sample(self) -> DeviceSample:
        n, h, v = self.nvml, self.handle, {}
        queries = {
            "utilization": lambda: n.nvmlDeviceGetUtilizationRates(h).gpu,
            "power": lambda: n.nvmlDeviceGetPowerUsage(h) / 1000.0,  # mW
            "sm_clock": lambda: n.nvmlDeviceGetClockInfo(h, 1) * 1e6,  # NVML_CLOCK_SM, MHz
            "temperature": lambda: n.nvmlDeviceGetTemperature(h, 0),  # NVML_TEMPERATURE_GPU
            # KB/s over a 20 ms window the call itself waits for: the reason scrapes never call NVML
            "pcie_tx": lambda: n.nvmlDeviceGetPcieThroughput(h, 0) * 1000.0,
            "pcie_rx": lambda: n.nvmlDeviceGetPcieThroughput(h, 1) * 1000.0,
        }
        for key, fn in queries.items():
            v[key] = self._query(key, fn)
        v.update(self._query("memory", self._memory) or {})
        v["nvlink_links_active"] = self._poll_links()
        if self.links and self._query("nvlink", self._nvlink):
            v["nvlink_tx"] = self.counters["nvlink_tx"].total
            v["nvlink_rx"] = self.counters["nvlink_rx"].total
        return DeviceSample(dict(self.labels), {k: float(x) for k, x in v.items() if x is not None})

    def _memory(self) -> dict:
        n, out = self.nvml, {}
        try:
            m = n.nvmlDeviceGetMemoryInfo(self.handle, version=n.nvmlMemory_v2)
            out["fb_reserved"] = m.reserved
        except Exception:  # an older binding or driver: version 1, whose `used` includes the reserved memory
            m = n.nvmlDeviceGetMemoryInfo(self.handle)
        out.update(fb_used=m.used, fb_free=m.free, fb_total=m.total)
        return out

    def _nvlink(self) -> bool:
        ids = [(fid, link) for fid in (FI_NVLINK_THROUGHPUT_DATA_TX, FI_NVLINK_THROUGHPUT_DATA_RX)
               for link in self.links]
        got = self.nvml.nvmlDeviceGetFieldValues(self.handle, ids)
        ok = 0
        for (fid, link), fv in zip(ids, got):
            if fv.nvmlReturn != 0:
                continue
            key = "nvlink_tx" if fid == FI_NVLINK_THROUGHPUT_DATA_TX else "nvlink_rx"
            self.counters[key].update(link, _field_value(fv))
            ok += 1
        if not ok:
            raise RuntimeError("no NVLink throughput field answered")
        return True


class GPUMonitor:
    """Polls NVML every `interval_s` in a daemon thread; `snapshot` returns the last complete poll, never calls NVML.

    Args:
        ranks: the ranks on this host and their CUDA device indices.
        interval_s: seconds between polls (default 1).
        imbalance_threshold: max/min memory used across ranks above which a warning is logged (the guide's
            "imbalanced GPU memory": 1.2 = 20%).
        reason: when set, the monitor is unavailable from the start (e.g. the engine runs on CPU).
    """

    def __init__(self, ranks: list[RankDevice], interval_s: float = 1.0, imbalance_threshold: float = 1.2,
                 reason: str | None = None):
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.ranks, self.interval_s, self.imbalance_threshold = ranks, interval_s, imbalance_threshold
        self._snapshot = GPUSnapshot(False, reason or "not started")
        self._reason = reason
        self._devices: list[_Device] = []
        self._nvml = None
        self._stop = threading.Event()
        self._poll_lock = threading.Lock()  # one poll at a time: the counters' baselines are not shared safely
        self._thread: threading.Thread | None = None
        self._warned = False

    @classmethod
    def for_engine(cls, config, interval_s: float = 1.0) -> GPUMonitor:
        """The ranks of an EngineConfig on this host (rank r on CUDA device r; stages of tp consecutive ranks); with
        the Ray executor the ranks may live elsewhere, so the monitor reports itself unavailable."""
        pc = config.parallel_config
        tp = pc.tensor_parallel_size
        ranks = [RankDevice(r, r % tp, r // tp, r) for r in range(pc.world_size)]
        reason = None if config.device == "cuda" else f"the engine runs on {config.device}, not on GPUs"
        if reason is None and pc.distributed_executor_backend == "ray":
            reason = "the ranks run in Ray actors, possibly on other nodes: run DCGM-exporter on each node instead"
        return cls(ranks, interval_s, reason=reason)

    @property
    def snapshot(self) -> GPUSnapshot:
        return self._snapshot

    def start(self) -> GPUMonitor:
        if self._reason is None:
            try:
                self._open()
            except Exception as e:  # never let monitoring stop the server
                self._close_nvml()
                self._reason = f"GPU monitoring failed to start: {e}"
        if self._reason is not None:
            self._snapshot = GPUSnapshot(False, self._reason)
            logger.info("GPU metrics unavailable: %s", self._reason)
            return self
        self.poll()
        self._thread = threading.Thread(target=self._run, name="shardllm-gpu-monitor", daemon=True)
        self._thread.start()
        return self

    def _open(self) -> None:
        nvml, why = load_nvml()
        if nvml is None:
            self._reason = why
            return
        self._nvml = nvml
        gpus = visible_gpus(nvml)
        node = socket.gethostname()
        for r in self.ranks:
            if r.local_index >= len(gpus):
                raise ValueError(f"rank {r.rank} runs on CUDA device {r.local_index} but only {len(gpus)} are visible")
            handle, ident = gpus[r.local_index]
            self._devices.append(_Device(nvml, handle, ident, r, node))

    def poll(self) -> GPUSnapshot:
        """Query every GPU once and publish the result (the background thread calls this)."""
        with self._poll_lock:
            return self._poll()

    def _poll(self) -> GPUSnapshot:
        samples = [d.sample() for d in self._devices]
        used = [s.values["fb_used"] for s in samples if "fb_used" in s.values]
        ratio = max(used) / min(used) if len(used) > 1 and min(used) > 0 else None
        if ratio is not None and ratio > self.imbalance_threshold and not self._warned:
            logger.warning("GPU memory is imbalanced across ranks: max/min used = %.2f (> %.2f); check the tp/pp "
                           "layout and whether another process uses one of the GPUs", ratio, self.imbalance_threshold)
        self._warned = ratio is not None and ratio > self.imbalance_threshold
        self._snapshot = GPUSnapshot(True, None, samples, ratio, time.time())
        return self._snapshot

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception:  # a GPU that fell off the bus must not end the thread silently
                logger.warning("GPU monitor poll failed", exc_info=True)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        self._close_nvml()

    def _close_nvml(self) -> None:
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
            self._nvml = None


# ---- one-shot inspection for `shardllm doctor` and `shardllm plan` -------------------------------------------------
TOPOLOGY_NAMES = {0: "same board", 10: "PIX", 20: "PXB", 30: "PHB", 40: "NODE", 50: "SYS"}
# Clock event reasons that mean the GPU slows itself down (nvml.h nvmlClocksEventReason*), by bit.
THROTTLE_REASONS = {0x8: "hardware slowdown", 0x20: "software thermal slowdown", 0x40: "hardware thermal slowdown",
                    0x80: "hardware power brake", 0x4: "software power cap"}


def _safe(fn, default=None):
    try:
        return fn()
    except Exception:
        return default


def inspect_host(cuda_visible_devices: str | None = None) -> dict:
    """What NVML says about this host's GPUs: versions, each GPU (memory, NVLink links up and down and whether they
    lead to an NVSwitch, compute capability, clock slowdown reasons) and each pair (NVLink P2P, any P2P read
    access, PCIe distance).
    {"available": False, "reason": ...} without NVML.
    """
    nvml, why = load_nvml()
    if nvml is None:
        return {"available": False, "reason": why}
    try:
        return _inspect(nvml, cuda_visible_devices)
    except Exception as e:
        return {"available": False, "reason": f"NVML failed: {e}"}
    finally:
        _safe(lambda: nvml.nvmlShutdown())


def _inspect(nvml, cuda_visible_devices: str | None) -> dict:
    cuda = _safe(lambda: nvml.nvmlSystemGetCudaDriverVersion())
    out = {"available": True, "driver_version": _safe(lambda: _text(nvml.nvmlSystemGetDriverVersion())),
           "cuda_driver_version": f"{cuda // 1000}.{cuda % 1000 // 10}" if cuda else None, "gpus": [], "pairs": []}
    gpus = visible_gpus(nvml, cuda_visible_devices)
    for h, ident in gpus:
        mem = _safe(lambda h=h: nvml.nvmlDeviceGetMemoryInfo(h))
        up, down = [], []
        for link in range(NVLINK_MAX_LINKS):
            state = _safe(lambda h=h, link=link: nvml.nvmlDeviceGetNvLinkState(h, link))
            if state == 1:
                up.append(link)
            elif state == 0:
                down.append(link)
        # what the links up lead to: NVML_NVLINK_DEVICE_TYPE_SWITCH (2) is an NVSwitch; None: NVML cannot tell
        remote = [_safe(lambda h=h, link=link: nvml.nvmlDeviceGetNvLinkRemoteDeviceType(h, link)) for link in up]
        known = [t for t in remote if t is not None and t != NVLINK_DEVICE_TYPE_UNKNOWN]
        nvswitch = (NVLINK_DEVICE_TYPE_SWITCH in known) if known or not up else None
        cc = _safe(lambda h=h: tuple(nvml.nvmlDeviceGetCudaComputeCapability(h)))
        reasons = _safe(lambda h=h: nvml.nvmlDeviceGetCurrentClocksEventReasons(h))
        if reasons is None:
            reasons = _safe(lambda h=h: nvml.nvmlDeviceGetCurrentClocksThrottleReasons(h), 0)
        out["gpus"].append({
            "index": ident.index, "uuid": ident.uuid, "pci_bus_id": ident.pci_bus_id, "name": ident.name,
            "memory_total": getattr(mem, "total", None), "memory_used": getattr(mem, "used", None),
            "memory_free": getattr(mem, "free", None), "nvlink_up": up, "nvlink_down": down, "nvswitch": nvswitch,
            "compute_capability": f"{cc[0]}.{cc[1]}" if cc else None,
            "throttle": [name for bit, name in THROTTLE_REASONS.items() if reasons & bit],
            "mig": bool(_safe(lambda h=h: nvml.nvmlDeviceGetMigMode(h)[0], 0))})
    for i, (hi, a) in enumerate(gpus):
        for hj, b in gpus[i + 1:]:
            status = _safe(lambda hi=hi, hj=hj: nvml.nvmlDeviceGetP2PStatus(hi, hj, 2))  # NVML_P2P_CAPS_INDEX_NVLINK
            read = _safe(lambda hi=hi, hj=hj: nvml.nvmlDeviceGetP2PStatus(hi, hj, 0))  # NVML_P2P_CAPS_INDEX_READ
            level = _safe(lambda hi=hi, hj=hj: nvml.nvmlDeviceGetTopologyCommonAncestor(hi, hj))
            out["pairs"].append({"gpus": [a.index, b.index], "nvlink": status == 0, "p2p": read == 0,
                                 "pcie": TOPOLOGY_NAMES.get(level, str(level) if level is not None else None)})
    return out
