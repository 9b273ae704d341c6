"""Engine statistics in plain Python: a snapshot of gauges and counters, and latency histograms.

The engine thread writes them; exporters (metrics/prometheus.py) read them. No third-party imports.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from dataclasses import dataclass, field

from shardllm.outputs import RequestMetrics, RequestOutput

# Seconds. Wide on purpose: the same engine runs a 135M model on a laptop CPU and a 405B model on GPUs.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0)
TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0, 960.0, 1920.0)
QUEUE_BUCKETS = E2E_BUCKETS


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine's state after a step, published whole so that readers in other threads see one moment."""

    num_requests_running: int = 0
    num_requests_waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of usable KV blocks held by requests
    num_kv_blocks: int = 0
    kv_cache_capacity_tokens: int = 0  # (blocks - 1) x block_size: what an FP8 cache doubles
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: dict[str, int] = field(default_factory=dict)  # finish reason -> requests
    preemptions: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens found
    memory_in_use: tuple[int, ...] = ()  # bytes per rank
    expert_load: dict = field(default_factory=dict)  # MoE: (layer, expert) -> tokens routed
    is_healthy: bool = True


class Histogram:
    """A cumulative histogram with fixed upper bounds (Prometheus semantics: a value v counts in le >= v)."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = tuple(sorted(buckets))
        self._counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        i = bisect_left(self.buckets, value)
        with self._lock:
            self._counts[i] += 1
            self._sum += value

    def state(self) -> tuple[list[int], float]:
        """(per-bucket counts, the +Inf one last; sum): what `load` takes, to copy a histogram between processes."""
        with self._lock:
            return list(self._counts), self._sum

    def load(self, state: tuple[list[int], float]) -> None:
        """Take another histogram's `state()` (same buckets) in place of this one's counts."""
        counts, total = state
        if len(counts) != len(self._counts):
            raise ValueError(f"a histogram state of {len(counts)} buckets for one of {len(self._counts)}")
        with self._lock:
            self._counts, self._sum = list(counts), float(total)

    def snapshot(self) -> tuple[list[tuple[float, int]], float, int]:
        """([(upper bound, cumulative count)] ending with +Inf, sum, count)."""
        with self._lock:
            counts, total = list(self._counts), self._sum
        cumulative, running = [], 0
        for le, c in zip((*self.buckets, float("inf")), counts):
            running += c
            cumulative.append((le, running))
        return cumulative, total, running


class LatencyHistograms:
    """Per-request latencies, observed when a request finishes (from its RequestOutput.metrics)."""

    def __init__(self):
        self.time_to_first_token = Histogram(TTFT_BUCKETS)
        self.time_per_output_token = Histogram(TPOT_BUCKETS)
        self.e2e_request_latency = Histogram(E2E_BUCKETS)
        self.request_queue_time = Histogram(QUEUE_BUCKETS)

    def observe(self, out: RequestOutput) -> None:
        self.observe_metrics(out.metrics, max((len(o.token_ids) for o in out.outputs), default=0))

    def observe_metrics(self, m: RequestMetrics, num_tokens: int) -> None:
        """A finished request's times (`num_tokens`: its longest sequence's output tokens, for the TPOT)."""
        if m.first_scheduled_time is not None:
            self.request_queue_time.observe(max(m.first_scheduled_time - m.arrival_time, 0.0))
        if m.first_token_time is None:
            return
        self.time_to_first_token.observe(max(m.first_token_time - m.arrival_time, 0.0))
        finished = m.finished_time
        if finished is None:
            return
        self.e2e_request_latency.observe(max(finished - m.arrival_time, 0.0))
        if num_tokens > 1:
            self.time_per_output_token.observe(max(finished - m.first_token_time, 0.0) / (num_tokens - 1))

    def _all(self) -> tuple[Histogram, ...]:
        return (self.time_to_first_token, self.time_per_output_token, self.e2e_request_latency,
                self.request_queue_time)

    def state(self) -> tuple:
        """Every histogram's state (picklable): the engine process sends it, each API server `load`s it."""
        return tuple(h.state() for h in self._all())

    def load(self, state: tuple) -> None:
        for h, st in zip(self._all(), state, strict=True):
            h.load(st)
