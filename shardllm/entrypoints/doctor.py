"""`shardllm doctor [--url URL] [--json]`: this host's GPU set-up checked, and a running server's /metrics read for
the guide's common issues (imbalanced memory, low NVLink traffic / PCIe fallback, idle GPUs while requests wait,
KV cache full). Each finding says what was seen, why it matters and the fix. Exit 0 when healthy, 1 on a problem.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass

SEVERITIES = ("ok", "info", "warning", "problem")
# The switches that keep NVLink multicast (NVLS) off in NCCL, PyTorch's symmetric memory and NVSHMEM. NVLS exists
# only where Hopper-or-later GPUs sit on a third-generation NVSwitch; NCCL uses it there by default
# (NCCL_NVLS_ENABLE, NCCL >= 2.17) and skips it elsewhere. Turning it off is for platforms that forbid multicast.
MULTICAST_VARS = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
IMBALANCE_RATIO = 1.2  # the guide: memory "should be balanced across GPUs"; 20% apart is a finding
LOW_UTILIZATION_PERCENT = 80  # the guide's target is 80-95%
LOW_NVLINK_BYTES_PER_S = 1e9  # per GPU, while tokens are being generated with tp > 1 [ours]
KV_FULL_RATIO = 0.95


@dataclass
class Finding:
    severity: str  # ok | info | warning | problem
    check: str
    seen: str
    why: str = ""
    fix: str = ""


# ---- this host ------------------------------------------------------------------------------------------------------
def check_versions() -> list[Finding]:
    import torch

    seen = f"torch {torch.__version__}, CUDA runtime {torch.version.cuda or 'none (CPU build)'}"
    if torch.cuda.is_available():
        nccl = ".".join(map(str, torch.cuda.nccl.version())) if torch.distributed.is_nccl_available() else "none"
        seen += f", NCCL {nccl}"
    return [Finding("info", "versions", seen)]


def check_gpus(host: dict) -> list[Finding]:
    import torch

    cuda = torch.cuda.is_available()
    if not host.get("available"):
        if cuda:
            return [Finding("warning", "gpus", f"torch sees {torch.cuda.device_count()} GPUs but NVML does not "
                            f"answer: {host.get('reason')}", "GPU metrics and the topology checks need NVML",
                            "pip install 'shardllm[gpu]' (nvidia-ml-py) and check the driver with nvidia-smi")]
        return [Finding("info", "gpus", f"no NVIDIA GPU ({host.get('reason')})",
                        "shardllm runs on CPU here (gloo instead of NCCL); the GPU checks are skipped")]
    gpus = host["gpus"]
    out = [Finding("info", "driver", f"driver {host.get('driver_version')}, CUDA driver API "
                   f"{host.get('cuda_driver_version')}")]
    names = ", ".join(f"{g['index']}: {g['name']} {(g['memory_total'] or 0) / 2**30:.0f} GiB "
                      f"({(g['memory_free'] or 0) / 2**30:.0f} free)" for g in gpus)
    if not gpus:
        return out + [Finding("problem", "gpus", "NVML lists no visible GPU", "nothing to run on",
                              "check CUDA_VISIBLE_DEVICES and nvidia-smi")]
    if not cuda:
        out.append(Finding("problem", "gpus", f"NVML sees {len(gpus)} GPUs ({names}) but torch cannot use them",
                           "the engine would fall back to CPU",
                           "install a CUDA build of torch that the driver supports (torch.version.cuda <= the "
                           "driver's CUDA version)"))
    else:
        out.append(Finding("ok", "gpus", f"{len(gpus)} GPUs visible: {names}"))
    return out


def check_topology(host: dict) -> list[Finding]:
    if not host.get("available") or len(host.get("gpus", [])) < 2:
        return []
    pcie = [p for p in host["pairs"] if not p["nvlink"]]
    if not pcie:
        return [Finding("ok", "topology", f"NVLink between every pair of the {len(host['gpus'])} GPUs")]
    pairs = ", ".join(f"{a}-{b} ({p['pcie']}{'' if p.get('p2p') else ', no P2P'})" for p in pcie
                      for a, b in [p["gpus"]])
    return [Finding("warning", "topology", f"no NVLink between GPUs {pairs}",
                    "tensor parallelism does two all-reduces per layer: over PCIe they cost ~10x NVLink's time, "
                    "and without P2P access NCCL copies through host memory",
                    "keep tp inside NVLink-connected GPUs, use pipeline parallelism across the others "
                    "(`shardllm plan --topology pcie`); compare `nvidia-smi topo -m`")]


def check_devices(host: dict) -> list[Finding]:
    out = []
    for g in host.get("gpus", []) if host.get("available") else []:
        if g["nvlink_down"] and g["nvlink_up"]:
            out.append(Finding("problem", "nvlink", f"GPU {g['index']}: NVLink links {g['nvlink_down']} down, "
                               f"{len(g['nvlink_up'])} up", "less NVLink bandwidth for tp all-reduces",
                               "check `nvidia-smi nvlink --status` and `-e` (errors); reset or service the GPU"))
        hard = [r for r in g["throttle"] if r != "software power cap"]
        if hard:
            out.append(Finding("problem", "clocks", f"GPU {g['index']} slows its clocks: {', '.join(hard)}",
                               "a throttled GPU slows every rank of its tp group",
                               "check cooling and power (`nvidia-smi -q -d PERFORMANCE`)"))
        total, used = g["memory_total"] or 0, g["memory_used"] or 0
        if total and used > 0.1 * total:
            out.append(Finding("warning", "memory", f"GPU {g['index']}: {used / 2**30:.1f} of "
                               f"{total / 2**30:.0f} GiB already in use (a running server's included)",
                               "a server starting now sizes its KV cache from free memory: another process "
                               "shrinks it, and unequal free memory across ranks leaves GPUs imbalanced",
                               "expected if shardllm already serves on these GPUs; otherwise stop the other "
                               "process (nvidia-smi lists it) or choose other GPUs"))
        if g["mig"]:
            out.append(Finding("warning", "mig", f"GPU {g['index']} is in MIG mode",
                               "MIG slices have no NVLink and no utilisation counters",
                               "disable MIG (`nvidia-smi -mig 0`) for tensor parallelism"))
    return out


def nvls_possible(host: dict) -> bool | None:
    """Whether NVLink multicast can exist here: NVLink to an NVSwitch on Hopper or later (compute capability >= 9).
    None when NVML cannot tell where the links lead."""
    gpus = [g for g in host.get("gpus", []) if g.get("nvlink_up")]
    if not gpus:
        return False  # no NVLink up: PCIe only
    hopper = [g for g in gpus if g.get("compute_capability") is None
              or int(g["compute_capability"].split(".")[0]) >= 9]
    if not hopper:
        return False  # e.g. A100 boards: their NVSwitch has no multicast
    if any(g.get("nvswitch") for g in hopper):
        return True
    return None if any(g.get("nvswitch") is None for g in hopper) else False  # False: GPUs linked to each other


def check_settings(host: dict) -> list[Finding]:
    if not host.get("available") or len(host.get("gpus", [])) < 2:
        return []
    unset = [f"{k}={v}" for k, v in MULTICAST_VARS.items() if os.environ.get(k) != v]
    possible = nvls_possible(host)
    if possible is False:
        return [Finding("ok", "settings", "no NVLink multicast on these GPUs (NVLS needs Hopper or later GPUs on an "
                        "NVSwitch): NCCL_NVLS_ENABLE and the other multicast switches change nothing here")]
    if not unset:
        return [Finding("ok", "settings", "NVLink multicast turned off for NCCL, PyTorch and NVSHMEM",
                        "NCCL's all-reduce runs without NVLS (NVLink SHARP) here" if possible else "")]
    where = ("these GPUs are Hopper or later on an NVSwitch" if possible else
             "NVML does not say whether these GPUs' NVLinks lead to an NVSwitch; if they do")
    return [Finding("info", "settings", f"{where}: NCCL uses NVLink multicast (NVLS) by default; not set: "
                    f"{' '.join(unset)}",
                    "NVLS offloads NCCL's all-reduce to the NVSwitch and takes some GPU memory for its buffers; "
                    "shardllm's own symm_mem all-reduce never uses multicast. Keep it on unless the platform "
                    "forbids multicast (some shared or virtualised GPU hosts do, as their guides say) or NCCL "
                    "fails or hangs while setting NVLS up",
                    f"only in those cases: export {' '.join(unset)}")]


def check_infiniband(root: str = "/sys/class/infiniband") -> list[Finding]:
    try:
        devices = sorted(os.listdir(root))
    except OSError:
        devices = []
    if not devices:
        return [Finding("info", "infiniband", "no InfiniBand devices",
                        "multi-node runs would send pipeline traffic over TCP sockets",
                        "for several nodes use InfiniBand (the guide: essential for 405B+)")]
    states = []
    for d in devices:
        for port in sorted(os.listdir(os.path.join(root, d, "ports")) if os.path.isdir(
                os.path.join(root, d, "ports")) else []):
            try:
                with open(os.path.join(root, d, "ports", port, "state")) as f:
                    states.append(f"{d}/{port} {f.read().strip()}")
            except OSError:
                pass
    down = [s for s in states if "ACTIVE" not in s]
    return [Finding("warning" if down else "ok", "infiniband", "; ".join(states) or ", ".join(devices),
                    "a port that is not ACTIVE carries no traffic" if down else "",
                    "check the cable and the subnet manager (ibstat)" if down else "")]


# ---- a running server ----------------------------------------------------------------------------------------------
def fetch(url: str, timeout: float = 10.0) -> str:
    """The text of a server's /metrics (`url` is the server's address)."""
    with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=timeout) as r:
        return r.read().decode(errors="replace")


def scrape(url: str, timeout: float = 10.0) -> dict[str, list[tuple[dict, float]]]:
    """A server's /metrics, parsed."""
    return parse_metrics(fetch(url, timeout))


def parse_metrics(text: str) -> dict[str, list[tuple[dict, float]]]:
    """Prometheus text as {sample name: [(labels, value)]}."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def _one(m: dict, name: str, default: float = 0.0) -> float:
    return m[name][0][1] if m.get(name) else default


def _by_rank(m: dict, name: str) -> dict[str, float]:
    return {labels.get("rank", "?"): v for labels, v in m.get(name, [])}


def diagnose_metrics(before: dict, after: dict, seconds: float) -> list[Finding]:
    """The guide's common issues, from two scrapes `seconds` apart."""
    out = []
    if _one(after, "shardllm_engine_healthy", 1.0) == 0:
        out.append(Finding("problem", "engine", "shardllm_engine_healthy is 0", "the engine failed or is stopping",
                           "read the server log; restart the server"))
    gen_rate = (_one(after, "shardllm_generation_tokens_total") - _one(before, "shardllm_generation_tokens_total")) \
        / seconds
    waiting, running = _one(after, "shardllm_num_requests_waiting"), _one(after, "shardllm_num_requests_running")
    preempted = _one(after, "shardllm_num_preemptions_total") - _one(before, "shardllm_num_preemptions_total")
    usage = _one(after, "shardllm_kv_cache_usage_ratio")
    if preempted > 0 or usage >= KV_FULL_RATIO:
        out.append(Finding("problem", "kv cache", f"KV cache {usage:.0%} full, {preempted:.0f} preemptions in "
                           f"{seconds:.0f} s", "requests wait and are recomputed: the memory is too small for the load",
                           "the guide's OOM advice: raise tp_size (more GPUs), lower max_batch_size, use dtype fp8 "
                           "(and kv_cache_dtype fp8), or add pipeline stages"))
    gpu = _one(after, "shardllm_gpu_monitoring_available") == 1
    if not gpu:
        out.append(Finding("info", "gpu metrics", "the server exports no GPU metrics "
                           "(shardllm_gpu_monitoring_available 0: CPU, or NVML missing)",
                           "the GPU checks (balance, NVLink, utilisation) are skipped",
                           "on a GPU server: install nvidia-ml-py there (`shardllm[gpu]`); on a CPU server there is "
                           "nothing to do"))
        return out
    used = _by_rank(after, "shardllm_gpu_fb_used_bytes")
    if len(used) > 1 and min(used.values()) > 0 and max(used.values()) / min(used.values()) > IMBALANCE_RATIO:
        out.append(Finding("problem", "memory balance", "memory used per rank: " + ", ".join(
            f"{r}: {v / 2**30:.1f} GiB" for r, v in sorted(used.items())),
            "the guide: memory should be balanced across GPUs; an imbalance points at a wrong tp/pp layout or "
            "another process on one GPU", "verify tp_size/pp_size (and pp_partition), check nvidia-smi for other "
            "processes, restart the server"))
    tp = len({labels.get("tp_rank") for labels, _ in after.get("shardllm_gpu_utilization_percent", [])})
    links = _by_rank(after, "shardllm_gpu_nvlink_links_active")
    if tp > 1 and links and min(links.values()) == 0:
        out.append(Finding("problem", "nvlink", f"tensor parallel size {tp} but ranks "
                           f"{[r for r, v in links.items() if v == 0]} have no active NVLink",
                           "the all-reduces fall back to PCIe", "check `nvidia-smi topo -m`; keep tp on NVLink GPUs"))
    elif tp > 1 and gen_rate > 0:
        tx0, tx1 = _by_rank(before, "shardllm_gpu_nvlink_tx_bytes_total"), _by_rank(after,
                                                                                   "shardllm_gpu_nvlink_tx_bytes_total")
        rates = {r: (tx1[r] - tx0.get(r, 0)) / seconds for r in tx1}
        if rates and max(rates.values()) < LOW_NVLINK_BYTES_PER_S:
            out.append(Finding("warning", "nvlink", f"NVLink tx {max(rates.values()) / 1e9:.2f} GB/s per GPU while "
                               f"generating {gen_rate:.0f} tok/s at tp {tp}",
                               "the guide: NVLink traffic is high under TP; little traffic suggests a PCIe fallback",
                               "verify `nvidia-smi topo -m` and that the GPUs share an NVSwitch"))
    util = _by_rank(after, "shardllm_gpu_utilization_percent")
    if waiting > 0 and util and min(util.values()) < LOW_UTILIZATION_PERCENT:
        out.append(Finding("warning", "utilisation", f"{waiting:.0f} requests waiting, {running:.0f} running, GPU "
                           f"utilisation {min(util.values()):.0f}% on the least busy rank",
                           "the guide's target is 80-95%: requests queue while GPUs idle",
                           "raise max_batch_size / max_num_tokens, or look for a host-side bottleneck"))
    return out


# ---- the command ---------------------------------------------------------------------------------------------------
def _guard(name: str, fn: Callable[[], list[Finding]]) -> list[Finding]:
    try:
        return fn()
    except Exception as e:  # a check that breaks is a finding, never a traceback
        return [Finding("warning", name, f"the check could not run: {type(e).__name__}: {e}")]


def run_checks(url: str | None = None, interval: float = 2.0) -> list[Finding]:
    from shardllm.metrics.gpu_monitor import inspect_host

    host = inspect_host()
    findings = []
    for name, fn in [("versions", check_versions), ("gpus", lambda: check_gpus(host)),
                     ("topology", lambda: check_topology(host)), ("devices", lambda: check_devices(host)),
                     ("settings", lambda: check_settings(host)), ("infiniband", check_infiniband)]:
        findings += _guard(name, fn)
    if url:
        findings += _guard("server", lambda: _check_server(url, interval))
    return findings


def _check_server(url: str, interval: float) -> list[Finding]:
    if "://" not in url and re.match(r"^[\w.-]+:\d+(/.*)?$", url):  # host:port, as curl takes it
        url = "http://" + url
    url = url.rstrip("/")
    if url.endswith("/metrics"):  # the scrape URL itself, as a Prometheus job names it
        url = url[:-len("/metrics")]
    try:
        first = fetch(url)
        time.sleep(interval)
        second = fetch(url)
    except OSError as e:
        return [Finding("problem", "server", f"cannot read {url}/metrics: {e}", "the server is down or unreachable",
                        "check the URL and that `shardllm serve` runs")]
    except ValueError as e:  # not a URL urllib can open
        return [Finding("problem", "server", f"--url {url!r} is not a URL: {e}", "nothing was checked",
                        "give the server's address, e.g. --url http://127.0.0.1:8000")]
    try:
        before, after = parse_metrics(first), parse_metrics(second)
    except ImportError:
        return [Finding("problem", "server", "prometheus-client is not installed", "needed to read /metrics",
                        "pip install 'shardllm[server]'")]
    except ValueError as e:  # an answer, but not Prometheus text: another service on that address
        return [Finding("problem", "server", f"{url}/metrics is not Prometheus text ({e}): {first[:80]!r}",
                        "something other than `shardllm serve` answers there; nothing was checked",
                        "give the address `shardllm serve` listens on (its --host and --port)")]
    if not any(name.startswith("shardllm_") for name in after):
        return [Finding("problem", "server", f"{url}/metrics has no shardllm_ metrics, only {len(after)} other "
                        "series", "another exporter or server answers there; nothing was checked",
                        "give the address `shardllm serve` listens on (its --host and --port)")]
    found = diagnose_metrics(before, after, interval)
    if not any(f.severity in ("warning", "problem") for f in found):
        found.append(Finding("ok", "server", f"{url}: no common issue in /metrics"))
    return found


def format_report(findings: list[Finding]) -> str:
    lines = []
    for f in findings:
        lines.append(f"[{f.severity.upper():7}] {f.check}: {f.seen}")
        if f.why:
            lines.append(f"           why: {f.why}")
        if f.fix:
            lines.append(f"           fix: {f.fix}")
    problems = sum(f.severity == "problem" for f in findings)
    lines.append(f"{problems} problem(s), {sum(f.severity == 'warning' for f in findings)} warning(s)")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from shardllm.entrypoints.arg_types import positive_float

    p = argparse.ArgumentParser(prog="shardllm doctor", allow_abbrev=False,
                                description="Check this host's GPUs and, with --url, a running server's metrics.")
    p.add_argument("--url", help="a running server, e.g. http://localhost:8000 (reads its /metrics twice)")
    p.add_argument("--interval", type=positive_float, default=2.0, help="seconds between the two scrapes (rates)")
    p.add_argument("--json", action="store_true", help="print the findings as JSON")
    args = p.parse_args(argv)
    try:
        findings = run_checks(args.url, max(args.interval, 0.1))
    except Exception as e:  # import failures and the like: still a report, never a traceback
        findings = [Finding("problem", "doctor", f"{type(e).__name__}: {e}")]
    healthy = not any(f.severity == "problem" for f in findings)
    from shardllm.utils import print_output

    print_output(json.dumps({"healthy": healthy, "findings": [asdict(f) for f in findings]}, indent=2) if args.json
                 else format_report(findings))
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
