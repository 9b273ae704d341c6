"""A fake `pynvml` module for CPU tests: the hardware boundary, and the only mock of the GPU metrics tests.

Installed with `monkeypatch.setitem(sys.modules, "pynvml", FakeNVML([...]))`; it answers the calls the monitor
makes with the shapes nvidia-ml-py returns (structs with the same attribute names), and records who called.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from types import SimpleNamespace

NOT_SUPPORTED = 3


class FakeNVMLError(Exception):
    def __init__(self, value: int):
        super().__init__(f"NVML error {value}")
        self.value = value


@dataclass
class FakeGPU:
    uuid: str
    pci_bus_id: str
    name: str = "NVIDIA H200"
    total: int = 150_000_000_000
    used: int = 10_000_000_000
    reserved: int = 500_000_000
    util: int = 50
    power_mw: int = 300_000
    sm_mhz: int = 1980
    temp: int = 40
    links: tuple[int, ...] = ()  # active NVLink ids
    tx_kib: dict[int, int] = field(default_factory=dict)  # link -> cumulative KiB
    rx_kib: dict[int, int] = field(default_factory=dict)
    pcie_kbps: tuple[int, int] = (1000, 2000)  # tx, rx in KB/s
    failing: dict[str, int] = field(default_factory=dict)  # call name -> NVML error code it raises
    links_down: tuple[int, ...] = ()  # NVLink ids present but down
    clock_reasons: int = 0  # nvmlClocksEventReason* bits
    p2p: bool = True  # P2P read access to the other GPUs
    nvswitch: bool = False  # its links lead to an NVSwitch (an HGX board), else straight to other GPUs
    compute_capability: tuple[int, int] = (9, 0)  # Hopper


class FakeNVML:
    """The subset of pynvml the monitor uses, over a list of FakeGPUs in PCI order."""

    NVMLError = FakeNVMLError
    nvmlMemory_v2 = 0x02000028
    NVML_ERROR_NOT_SUPPORTED = NOT_SUPPORTED

    def __init__(self, gpus: list[FakeGPU], init_error: int | None = None):
        self.gpus = gpus
        self.init_error = init_error
        self.calls: list[tuple[str, str]] = []  # (call, thread name)
        self.block_pcie = None  # a threading.Event the PCIe call waits on, when set
        self.pcie_entered = threading.Event()

    def _call(self, name: str, h: FakeGPU | None = None) -> None:
        self.calls.append((name, threading.current_thread().name))
        if h is not None and name in h.failing:
            raise FakeNVMLError(h.failing[name])

    def nvmlInit(self):
        self._call("nvmlInit")
        if self.init_error is not None:
            raise FakeNVMLError(self.init_error)

    def nvmlShutdown(self):
        self._call("nvmlShutdown")

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        return self.gpus[i]

    def nvmlDeviceGetUUID(self, h):
        return h.uuid

    def nvmlDeviceGetPciInfo(self, h):
        return SimpleNamespace(busId=h.pci_bus_id.encode())

    def nvmlDeviceGetName(self, h):
        return h.name

    def nvmlDeviceGetUtilizationRates(self, h):
        self._call("nvmlDeviceGetUtilizationRates", h)
        return SimpleNamespace(gpu=h.util, memory=10)

    def nvmlDeviceGetMemoryInfo(self, h, version=None):
        self._call("nvmlDeviceGetMemoryInfo", h)
        return SimpleNamespace(total=h.total, used=h.used, free=h.total - h.used - h.reserved, reserved=h.reserved)

    def nvmlDeviceGetPowerUsage(self, h):
        self._call("nvmlDeviceGetPowerUsage", h)
        return h.power_mw

    def nvmlDeviceGetClockInfo(self, h, clock):
        self._call("nvmlDeviceGetClockInfo", h)
        return h.sm_mhz

    def nvmlDeviceGetTemperature(self, h, sensor):
        self._call("nvmlDeviceGetTemperature", h)
        return h.temp

    def nvmlDeviceGetNvLinkState(self, h, link):
        if link in h.links:
            return 1
        if link in h.links_down:
            return 0
        raise FakeNVMLError(NOT_SUPPORTED)

    def nvmlDeviceGetNvLinkRemoteDeviceType(self, h, link):
        if link not in h.links:
            raise FakeNVMLError(NOT_SUPPORTED)
        return 2 if h.nvswitch else 0  # NVML_NVLINK_DEVICE_TYPE_SWITCH, _GPU

    def nvmlDeviceGetCudaComputeCapability(self, h):
        return h.compute_capability

    def nvmlSystemGetDriverVersion(self):
        return "580.65.06"

    def nvmlSystemGetCudaDriverVersion(self):
        return 13000

    def nvmlDeviceGetCurrentClocksEventReasons(self, h):
        return h.clock_reasons

    def nvmlDeviceGetP2PStatus(self, a, b, index):
        if index == 0:  # NVML_P2P_CAPS_INDEX_READ: over PCIe too, unless a GPU says otherwise
            return 0 if a.p2p and b.p2p else 5
        return 0 if a.links and b.links else 5  # NVML_P2P_STATUS_OK, else NOT_SUPPORTED (a status, not an error)

    def nvmlDeviceGetTopologyCommonAncestor(self, a, b):
        return 30  # NVML_TOPOLOGY_HOSTBRIDGE

    def nvmlDeviceGetFieldValues(self, h, ids):
        self._call("nvmlDeviceGetFieldValues", h)
        out = []
        for fid, link in ids:
            counters = h.tx_kib if fid == 138 else h.rx_kib
            ok = link in counters
            out.append(SimpleNamespace(fieldId=fid, scopeId=link, nvmlReturn=0 if ok else NOT_SUPPORTED,
                                       valueType=3, value=SimpleNamespace(ullVal=counters.get(link, 0))))
        return out

    def nvmlDeviceGetPcieThroughput(self, h, counter):
        self._call("nvmlDeviceGetPcieThroughput", h)
        if self.block_pcie is not None:
            self.pcie_entered.set()
            self.block_pcie.wait()
        return h.pcie_kbps[counter]
