"""Prometheus exposition of the engine's statistics (prefix `shardllm_`); docs/metrics.md lists them.

A collector reads the AsyncLLM's snapshot and histograms at scrape time, into a registry owned by one
server, so that two servers in one process (tests) never share or clash.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from shardllm.metrics import EngineSnapshot, Histogram, LatencyHistograms

PREFIX = "shardllm_"
FINISH_REASONS = ("stop", "length", "abort", "error")


class EngineCollector(Collector):
    """Turns an EngineSnapshot and LatencyHistograms into metric families."""

    def __init__(self, get_snapshot: Callable[[], EngineSnapshot], latency: LatencyHistograms,
                 model_name: str):
        self._get_snapshot = get_snapshot
        self._latency = latency
        self._labels = {"model_name": model_name}

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        g = GaugeMetricFamily(PREFIX + name, doc, labels=list(self._labels))
        g.add_metric(list(self._labels.values()), value)
        return g

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        c = CounterMetricFamily(PREFIX + name, doc, labels=list(self._labels))
        c.add_metric(list(self._labels.values()), value)
        return c

    def _histogram(self, name: str, doc: str, hist: Histogram) -> HistogramMetricFamily:
        buckets, total, _ = hist.snapshot()
        h = HistogramMetricFamily(PREFIX + name, doc, labels=list(self._labels))
        h.add_metric(list(self._labels.values()), [(_le(le), n) for le, n in buckets], total)
        return h

    def collect(self) -> Iterator[Metric]:
        s = self._get_snapshot()
        yield self._gauge("engine_healthy", "1 while the engine is serving, 0 after it failed or stopped.",
                          1.0 if s.is_healthy else 0.0)
        yield self._gauge("num_requests_running", "Sequences in the running batch (a request with n > 1 counts n).",
                          s.num_requests_running)
        yield self._gauge("num_requests_waiting", "Sequences waiting to be scheduled (preempted ones included).",
                          s.num_requests_waiting)
        yield self._gauge("kv_cache_usage_ratio", "Fraction of KV cache blocks held by requests (0 to 1).",
                          s.kv_cache_usage)
        yield self._gauge("kv_cache_num_blocks", "KV cache blocks per rank.", s.num_kv_blocks)
        yield self._gauge("kv_cache_capacity_tokens",
                          "Tokens the KV cache holds per rank (usable blocks x block size).",
                          s.kv_cache_capacity_tokens)
        yield self._counter("prompt_tokens", "Prompt tokens of sequences that produced a first token.",
                            s.prompt_tokens)
        yield self._counter("generation_tokens", "Tokens generated.", s.generation_tokens)
        yield self._counter("num_preemptions", "Sequences preempted because the KV cache ran out.",
                            s.preemptions)
        yield self._counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                            s.prefix_cache_queries)
        yield self._counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                            s.prefix_cache_hits)

        names = list(self._labels)
        finished = CounterMetricFamily(PREFIX + "request_success", "Sequences finished, by finish reason.",
                                       labels=[*names, "finish_reason"])
        for reason in sorted(set(FINISH_REASONS) | set(s.finished)):
            finished.add_metric([*self._labels.values(), reason], s.finished.get(reason, 0))
        yield finished

        memory = GaugeMetricFamily(PREFIX + "gpu_memory_used_bytes",
                                   "Device memory in use per rank (on CPU: weights plus KV cache).",
                                   labels=[*names, "rank"])
        for rank, used in enumerate(s.memory_in_use):
            memory.add_metric([*self._labels.values(), str(rank)], used)
        yield memory

        if s.expert_load:
            experts = CounterMetricFamily(PREFIX + "moe_expert_tokens",
                                          "Tokens routed to each expert of each MoE layer (imbalance shows here).",
                                          labels=[*names, "layer", "expert"])
            for (layer, expert), n in sorted(s.expert_load.items()):
                experts.add_metric([*self._labels.values(), str(layer), str(expert)], n)
            yield experts

        lat = self._latency
        yield self._histogram("time_to_first_token_seconds", "Time from arrival to the first token.",
                              lat.time_to_first_token)
        yield self._histogram("time_per_output_token_seconds",
                              "Mean time between output tokens of a request, after the first.",
                              lat.time_per_output_token)
        yield self._histogram("e2e_request_latency_seconds", "Time from arrival to the last token.",
                              lat.e2e_request_latency)
        yield self._histogram("request_queue_time_seconds", "Time from arrival to first being scheduled.",
                              lat.request_queue_time)


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


class GPUCollector(Collector):
    """A GPUMonitor's last poll as metric families (docs/metrics.md, "GPU metrics"); never calls NVML itself."""

    def __init__(self, monitor, model_name: str):
        self._monitor = monitor
        self._model_name = model_name

    def collect(self) -> Iterator[Metric]:
        from shardllm.metrics.gpu_monitor import GPU_METRICS

        snap = self._monitor.snapshot
        available = GaugeMetricFamily(PREFIX + "gpu_monitoring_available",
                                      "1 when GPU metrics come from NVML, 0 when NVML is missing or failed.",
                                      labels=["model_name"])
        available.add_metric([self._model_name], 1.0 if snap.available else 0.0)
        yield available
        if not snap.available or not snap.devices:
            return
        names = ["model_name", *snap.devices[0].labels]
        for key, (name, kind, doc) in GPU_METRICS.items():
            family = (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(PREFIX + name, doc, labels=names)
            for d in snap.devices:
                if key in d.values:
                    family.add_metric([self._model_name, *d.labels.values()], d.values[key])
            if family.samples:
                yield family
        if snap.memory_imbalance_ratio is not None:
            ratio = GaugeMetricFamily(PREFIX + "gpu_memory_imbalance_ratio",
                                      "Most / least GPU memory used across the ranks (1 = balanced).",
                                      labels=["model_name"])
            ratio.add_metric([self._model_name], snap.memory_imbalance_ratio)
            yield ratio


def make_registry(get_snapshot: Callable[[], EngineSnapshot], latency: LatencyHistograms,
                  model_name: str, gpu_monitor=None) -> CollectorRegistry:
    """A fresh registry holding the engine's metrics, and a GPUMonitor's when one is given."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(EngineCollector(get_snapshot, latency, model_name))
    if gpu_monitor is not None:
        registry.register(GPUCollector(gpu_monitor, model_name))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus' text format."""
    return generate_latest(registry)
