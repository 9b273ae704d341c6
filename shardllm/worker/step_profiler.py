"""Per-rank step profiling of the worker: where each step's wall time goes, on every rank of any executor.

Off unless `SHARDLLM_PROFILE_DIR` is set in the worker's environment (the multiproc executor's workers inherit
the driver's environment). Variables, read once when the Worker is built:

    SHARDLLM_PROFILE_DIR=<dir>           enable; each rank writes <dir>/rank<R>.json when its window closes
    SHARDLLM_PROFILE_STEPS=<first>:<count>
                                         the window: the worker's execute_model calls first .. first + count - 1
                                         (0-based, every call counts, prefill and empty ones too); default 8:16.
                                         "manual": no window until `Executor.start_step_profile(n, tag)` arms one
                                         (the file then goes to <dir>/<tag>/rank<R>.json)
    SHARDLLM_PROFILE_TOP=<n>             kernels listed per summary (default 15)

torch.profiler (CPU and, on a GPU, CUDA activities) runs from the step before the window (its start-up cost
lands there) until the entry of the step after it. While it runs, the runner's phases are wrapped in
record_function ranges; outside a window nothing is wrapped, and `Worker.execute_model` pays one attribute
check. A step's wall time is the time between two execute_model entries on this rank, so it includes the wait for
the next plan ("outside_us"). GPU busy time is the union of the kernel (and memcpy) intervals clipped to that wall
interval, and idle = wall - busy: kernels are counted in the interval in which they ran, which with async
scheduling or a pipeline is not always the step that launched them. A rank file holds:

    rank, tp_rank, tp_size, pp_rank, pp_size, device, dtype, quantization, tag, steps_profiled (call indices),
    steps: per step {index, num_seqs, num_tokens, decode, wall_us, gpu_busy_us, gpu_idle_us, gpu_compute_us,
                     execute_model_us, outside_us, phases_us, all_reduce_us, all_reduce_calls, send_recv_us}
    decode: the mean over decode-only steps (one token per sequence), or None; all: the mean over every step;
      each {num_steps, wall_us, gpu_busy_us, gpu_idle_us, gpu_compute_us, execute_model_us, outside_us, phases_us,
            all_reduce_us, all_reduce_calls, send_recv_us, kernels_per_step,
            top_kernels: [{name, calls_per_step, us_per_step}]}
    (all_reduce_us / send_recv_us: summed kernel durations, µs per step; a NCCL kernel is "busy" while it waits
    for its peer, so gpu_compute_us, the union of the other kernels, is the GPU's own work)

Phases (host time, µs per step): prepare_inputs, pp_recv, forward (eager), graph_replay, compute_logits, sample,
pp_send, wait_tokens (the host waiting for the sampled tokens). On a CPU there are no kernels: the GPU fields are
None, top_kernels lists aten ops (nested, so they overlap) and all_reduce_us / send_recv_us are the host time in
c10d collectives.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

import torch

from shardllm import envs

logger = logging.getLogger(__name__)

ENV_DIR, ENV_STEPS, ENV_TOP = "SHARDLLM_PROFILE_DIR", "SHARDLLM_PROFILE_STEPS", "SHARDLLM_PROFILE_TOP"
PREFIX = "shardllm::"
STEP, WINDOW_END = PREFIX + "step", PREFIX + "window_end"
PHASES = ("prepare_inputs", "pp_recv", "forward", "graph_replay", "compute_logits", "sample", "pp_send", "wait_tokens")


def busy_time(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals (any unit)."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def _started_in(events: list, a: float, b: float) -> list:
    """The profiler events that start in [a, b) (µs since the trace's start)."""
    return [e for e in events if a <= e.time_range.start < b]


def comm_kind(name: str) -> str | None:
    """'all_reduce', 'send_recv' or None for a kernel or host op name (NCCL, symm_mem, custom, gloo's c10d ops)."""
    n = name.lower()
    if "allreduce" in n or "all_reduce" in n:
        return "all_reduce"
    if "sendrecv" in n or (("nccl" in n or "c10d" in n) and ("send" in n or "recv" in n)):
        return "send_recv"
    return None


def parse_steps(value: str) -> tuple[int, int] | None:
    """'first:count' -> (first, count); 'manual' -> None. ValueError naming the fix otherwise."""
    if value.strip().lower() == "manual":
        return None
    try:
        first, count = (int(x) for x in value.split(":"))
    except ValueError:
        first = count = -1
    if first < 0 or count < 1:
        raise ValueError(f"{ENV_STEPS}={value!r}: use '<first>:<count>' (first >= 0, count >= 1) or 'manual'")
    return first, count


@dataclass
class _Window:
    start: int  # first profiled call
    count: int
    tag: str | None

    @property
    def end(self) -> int:
        return self.start + self.count


class StepProfiler:
    """One rank's profiler; the Worker calls `run_step` for every execute_model while it exists."""

    def __init__(self, out_dir: str, rank: int, steps: tuple[int, int] | None = None, top: int = 15):
        self.out_dir, self.rank, self.top = out_dir, rank, top
        self._calls = 0  # execute_model entries seen
        self._window = _Window(steps[0], steps[1], None) if steps else None
        self._prof = None
        self._plans: list[dict] = []  # per profiled step: index, num_seqs, num_tokens, decode
        self._undo: list = []  # wrappers to remove when the window closes
        self.last_result: dict | None = None

    @staticmethod
    def from_env(rank: int) -> StepProfiler | None:
        out_dir = envs.SHARDLLM_PROFILE_DIR
        if not out_dir:
            return None
        steps = parse_steps(envs.SHARDLLM_PROFILE_STEPS)
        return StepProfiler(out_dir, rank, steps, envs.SHARDLLM_PROFILE_TOP)

    def arm(self, num_steps: int, tag: str | None = None) -> None:
        """Profile the next `num_steps` execute_model calls after one warm-up call (the profiler's start)."""
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if self._window is not None and self._calls < self._window.end:
            raise ValueError("a profiling window is already open on this rank: wait for it to close")
        self._window = _Window(self._calls + 1, num_steps, tag)

    def run_step(self, runner, fn, *args):
        """Call fn(*args) (the worker's step), opening, marking and closing the window around it."""
        i = self._calls
        self._calls += 1
        w = self._window
        if w is None:
            return fn(*args)
        if i == w.end:
            self._close(runner)
            return fn(*args)
        if self._prof is None and i >= w.start - 1:
            self._open(runner)
        if not (w.start <= i < w.end):
            return fn(*args)
        so = args[0]
        num_tokens = sum(len(s.token_ids) for s in so.scheduled)
        self._plans.append({"index": i, "num_seqs": len(so.scheduled), "num_tokens": num_tokens,
                            "decode": bool(so.scheduled) and num_tokens == len(so.scheduled)})
        with torch.profiler.record_function(STEP):
            return fn(*args)

    def flush(self, runner) -> dict | None:
        """Close an open window now (its last step ends here) and return the last closed window's result."""
        if self._prof is not None:
            self._close(runner)
        return self.last_result

    # ---- the window --------------------------------------------------------------------------------------------
    def _open(self, runner) -> None:
        from torch.profiler import ProfilerActivity, profile

        self._on_gpu = runner.device.type == "cuda"
        self._wrap_phases(runner)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self._on_gpu else [])
        self._prof = profile(activities=acts)
        self._prof.start()

    def _close(self, runner) -> None:
        with torch.profiler.record_function(WINDOW_END):
            pass
        if self._on_gpu:
            torch.cuda.synchronize(runner.device)  # every kernel of the window is recorded (later ones are clipped)
        self._prof.stop()
        self._unwrap_phases()
        w = self._window
        try:
            result = self._analyze(runner, list(self._prof.events()))
            result["tag"] = w.tag
            self._write(result, w.tag)
            self.last_result = result
        except Exception as e:  # profiling must never take a rank down
            logger.warning("rank %d: step profile failed: %s: %s", self.rank, type(e).__name__, e)
        self._prof, self._plans, self._window = None, [], None

    def _write(self, result: dict, tag: str | None) -> None:
        d = os.path.join(self.out_dir, tag) if tag else self.out_dir
        os.makedirs(d, exist_ok=True)
        path = os.path.join(d, f"rank{self.rank}.json")
        with open(path + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(path + ".tmp", path)  # a reader never sees half a file

    def _wrap_phases(self, runner) -> None:
        from shardllm.worker import model_runner as mr

        def wrap(obj, name: str, phase: str) -> None:
            orig = getattr(obj, name)
            own = name in vars(obj)  # an attribute of the object itself (else of its class)

            def ranged(*a, **k):
                with torch.profiler.record_function(PREFIX + phase):
                    return orig(*a, **k)

            setattr(obj, name, ranged)
            self._undo.append((obj, name, orig if own else None))

        wrap(runner, "prepare_inputs", "prepare_inputs")
        wrap(runner, "_sample", "sample")
        wrap(runner.model, "forward", "forward")
        wrap(runner.model, "compute_logits", "compute_logits")
        if getattr(runner, "graph_runner", None) is not None:
            wrap(runner.graph_runner, "run", "graph_replay")
        wrap(mr, "pp_send", "pp_send")  # module globals: own attributes, restored as they were
        wrap(mr, "pp_recv", "pp_recv")
        wrap(mr.PendingOutput, "get", "wait_tokens")

    def _unwrap_phases(self) -> None:
        for obj, name, orig in reversed(self._undo):
            if orig is None:
                delattr(obj, name)
            else:
                setattr(obj, name, orig)
        self._undo = []

    # ---- the analysis ------------------------------------------------------------------------------------------
    def _analyze(self, runner, events: list) -> dict:
        from shardllm.distributed.parallel_state import get_parallel_context

        def span(e) -> tuple[float, float]:
            return e.time_range.start, e.time_range.end

        cpu = [e for e in events if e.device_type.name == "CPU" and e.time_range.end > 0]
        gpu = [e for e in events if e.device_type.name == "CUDA" and e.time_range.end > 0
               and not e.name.startswith((PREFIX, "ProfilerStep"))]  # kernels and copies, no annotations
        starts = sorted(e.time_range.start for e in cpu if e.name == STEP)
        step_len = {e.time_range.start: e.time_range.end - e.time_range.start for e in cpu if e.name == STEP}
        ends = [e.time_range.start for e in cpu if e.name == WINDOW_END]
        bounds = starts + ends[:1]
        n = min(len(bounds) - 1, len(self._plans))
        ranged = [e for e in cpu if e.name.startswith(PREFIX) and e.name not in (STEP, WINDOW_END)]
        ops = gpu if self._on_gpu else [e for e in cpu if e.name.startswith("aten::")]
        host_comm = [] if self._on_gpu else [e for e in cpu if comm_kind(e.name) and "::" in e.name]
        steps, kernels_in = [], []
        for k in range(n):
            a, b = bounds[k], bounds[k + 1]
            phases = dict.fromkeys(PHASES, 0.0)
            for e in _started_in(ranged, a, b):
                name = e.name[len(PREFIX):]
                phases[name] = phases.get(name, 0.0) + e.time_range.end - e.time_range.start
            kernels_in.append(_started_in(ops, a, b))
            comm = _started_in(gpu if self._on_gpu else host_comm, a, b)
            ar = [e for e in comm if comm_kind(e.name) == "all_reduce"]
            sr = [e for e in comm if comm_kind(e.name) == "send_recv"]
            busy = compute = None
            if self._on_gpu:
                clipped = [(max(s, a), min(t, b), e) for e, (s, t) in zip(gpu, map(span, gpu)) if t > a and s < b]
                busy = busy_time([(s, t) for s, t, _ in clipped])
                compute = busy_time([(s, t) for s, t, e in clipped if comm_kind(e.name) is None])
            wall = b - a
            steps.append({**self._plans[k], "wall_us": round(wall, 1),
                          "gpu_busy_us": None if busy is None else round(busy, 1),
                          "gpu_idle_us": None if busy is None else round(wall - busy, 1),
                          "gpu_compute_us": None if compute is None else round(compute, 1),
                          "execute_model_us": round(step_len[a], 1), "outside_us": round(wall - step_len[a], 1),
                          "phases_us": {p: round(v, 1) for p, v in phases.items()},
                          "all_reduce_us": round(sum(e.time_range.end - e.time_range.start for e in ar), 1),
                          "all_reduce_calls": len(ar),
                          "send_recv_us": round(sum(e.time_range.end - e.time_range.start for e in sr), 1)})
        decode = [k for k, s in enumerate(steps) if s["decode"]]
        ctx = get_parallel_context()
        mc = runner.model_config
        return {"rank": self.rank, "tp_rank": ctx.tp_rank, "tp_size": ctx.tp_size, "pp_rank": ctx.pp_rank,
                "pp_size": ctx.pp_size, "device": runner.device.type, "dtype": str(mc.dtype).removeprefix("torch."),
                "quantization": None if mc.quantization is None else getattr(mc.quantization, "method", "?"),
                "graphs": getattr(runner, "graph_runner", None) is not None,
                "steps_profiled": [s["index"] for s in steps], "steps": steps,
                "decode": self._summary(steps, kernels_in, decode) if decode else None,
                "all": self._summary(steps, kernels_in, list(range(len(steps)))) if steps else None}

    def _summary(self, steps: list[dict], kernels_in: list[list], which: list[int]) -> dict:
        m = len(which)

        def mean(key: str):
            vals = [steps[k][key] for k in which]
            return None if vals[0] is None else round(sum(vals) / m, 1)

        per_name: dict[str, list[float]] = {}
        for k in which:
            for e in kernels_in[k]:
                per_name.setdefault(e.name, []).append(e.time_range.end - e.time_range.start)
        top = sorted(per_name.items(), key=lambda kv: -sum(kv[1]))[: self.top]
        return {"num_steps": m, **{key: mean(key) for key in (
                    "wall_us", "gpu_busy_us", "gpu_idle_us", "gpu_compute_us", "execute_model_us", "outside_us",
                    "all_reduce_us", "all_reduce_calls", "send_recv_us")},
                "phases_us": {p: round(sum(steps[k]["phases_us"].get(p, 0.0) for k in which) / m, 1)
                              for p in steps[which[0]]["phases_us"]},
                "kernels_per_step": round(sum(len(kernels_in[k]) for k in which) / m, 1),
                "top_kernels": [{"name": name[:80], "calls_per_step": round(len(v) / m, 2),
                                 "us_per_step": round(sum(v) / m, 1)} for name, v in top]}
