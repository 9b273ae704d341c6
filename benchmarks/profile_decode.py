"""Where a decode step's time goes, on every rank of a tp / pp layout: kernels, GPU idle time, host phases, comms.

    python benchmarks/profile_decode.py --model llama-3-8b --batch_sizes 1 512 --steps 16
    python benchmarks/profile_decode.py --model llama-3-8b --batch_sizes 1 512 --tp_size 2
    python benchmarks/profile_decode.py --model llama-3-8b --batch_sizes 1 512 --pp_size 2 --async_scheduling off
    python benchmarks/profile_decode.py --model default --dtype float32 --device cpu --batch_sizes 32
    python benchmarks/profile_decode.py --summary out/*.jsonl      # human lines from earlier runs' JSON lines

One engine serves every batch size in turn (max batch = the largest). For each: `b` prompts of `input_len` random
tokens are prefilled and decoded for two tokens outside the trace, then every rank profiles `steps` decode steps
through the worker's step profiler (shardllm/worker/step_profiler.py, switched on here with SHARDLLM_PROFILE_DIR),
the requests are aborted and the next size starts. Prints one JSON line per batch size:

    layout, model, dtype, batch_size, tp, pp, graphs, async_scheduling,
    driver: wall_ms_per_step (between submits, over the profiled steps less the first pp + 1, which may wait for
            the workers' profiler start), out_tok_s (rows sampled / wall),
            schedule_us / submit_us / collect_us per step (submit = plan pickling and sending on multiproc; the
            whole step's launch on uniproc), seqs_per_step
    ranks: {rank: the rank's summary over its decode-only steps (wall, GPU busy / idle, host phases, all-reduce and
            send/recv time, top kernels), with tp_rank, pp_rank and how many profiled steps were not decode-only}

The rank files stay under --out_dir (a temporary directory by default): <out_dir>/b<batch>/rank<R>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import torch


class _Timer:
    """Wraps a bound method; while `on`, records (start, seconds, args) of each call."""

    def __init__(self, obj, name: str):
        self.orig = getattr(obj, name)
        self.on, self.calls = False, []
        setattr(obj, name, self)

    def __call__(self, *args, **kwargs):
        t = time.perf_counter()
        try:
            return self.orig(*args, **kwargs)
        finally:
            if self.on:
                self.calls.append((t, time.perf_counter() - t, args))

    def seconds(self, t0: float, t1: float) -> float:
        return sum(d for t, d, _ in self.calls if t0 <= t < t1)


def _rank_summary(r: dict, top: int) -> dict:
    s = r["decode"] or r["all"] or {}
    skipped = sum(1 for st in r["steps"] if not st["decode"])
    out = {"tp_rank": r["tp_rank"], "pp_rank": r["pp_rank"], "decode_only": r["decode"] is not None,
           "non_decode_steps_skipped": skipped if r["decode"] is not None else 0, **s}
    out["top_kernels"] = s.get("top_kernels", [])[:top]
    return out


def profile_batch(llm, b: int, a, timers: dict[str, _Timer]) -> dict:
    eng = llm.engine
    vocab = llm.config.model_config.hf_config.vocab_size
    g = torch.Generator().manual_seed(b)
    prompts = torch.randint(100, vocab - 100, (b, a.input_len), generator=g).tolist()
    from shardllm import SamplingParams

    sp = SamplingParams(max_tokens=a.steps + 32, temperature=0, ignore_eos=True, detokenize=False)
    ids = [f"b{b}-{i}" for i in range(b)]
    for rid, p in zip(ids, prompts):
        eng.add_request(rid, p, sp)
    reqs = [eng.scheduler.requests[rid] for rid in ids]
    # every prompt prefilled and two tokens each, outside the trace: with chunked prefill the first requests decode
    # long before the last are prefilled, so a count of all generated tokens would start the trace in prefill steps
    while min(r.num_output_tokens for r in reqs) < 2:
        if not eng.has_unfinished_requests():
            raise RuntimeError("the batch ended before every request had two tokens: raise --steps or check the log")
        eng.step()
    eng.executor.start_step_profile(a.steps, f"b{b}")
    for t in timers.values():
        t.on, t.calls = True, []
    submit = timers["submit"].calls
    while len(submit) < a.steps + 2:  # a warm-up step, the profiled steps, the step whose entry closes the window
        eng.step()
    for t in timers.values():
        t.on = False
    # The driver's window skips the first submits: up to pp + 1 steps are in flight, so they may wait for the
    # workers' profiler start (in their warm-up step); it ends at the submit that closes the workers' window.
    first = 1 + llm.config.parallel_config.pipeline_parallel_size + 1
    n = a.steps + 1 - first
    t0, t1 = submit[first][0], submit[a.steps + 1][0]
    wall = t1 - t0
    plans = [args[0] for _, _, args in submit[first:a.steps + 1]]
    rows = sum(sum(1 for s in so.scheduled if s.do_sample) for so in plans)
    seqs = sum(len(so.scheduled) for so in plans)
    ranks = eng.executor.step_profile()
    eng.abort_request(ids)
    while eng.has_unfinished_requests():
        eng.step()
    pc = llm.config.parallel_config
    return {
        "layout": f"tp{pc.tensor_parallel_size}pp{pc.pipeline_parallel_size}"
                  + (f"ep{pc.expert_parallel_size}" if pc.expert_parallel_size > 1 else ""),
        "model": a.model, "dtype": a.dtype,
        "batch_size": b, "input_len": a.input_len, "tp": pc.tensor_parallel_size, "pp": pc.pipeline_parallel_size,
        "graphs": llm.config.device == "cuda" and not a.enforce_eager,
        "async_scheduling": llm.config.scheduler_config.async_scheduling, "steps": a.steps,
        "driver": {"steps": n, "wall_ms_per_step": round(wall / n * 1e3, 3), "out_tok_s": round(rows / wall, 1),
                   "seqs_per_step": round(seqs / n, 1),
                   **{f"{k}_us_per_step": round(t.seconds(t0, t1) / n * 1e6, 1) for k, t in timers.items()}},
        "ranks": {str(i): _rank_summary(r, a.top) for i, r in enumerate(ranks) if r is not None},
    }


def summarize(results: list[dict], top: int = 3) -> str:
    """A few human lines per result line: the driver's step, then per rank where the wall time goes."""

    def ms(us) -> str:
        return "-" if us is None else f"{us / 1e3:.2f}"

    lines = []
    for r in results:
        d = r["driver"]
        lines.append(f"{r['layout']} {r['dtype']} batch {r['batch_size']} (graphs {r['graphs']}, async "
                     f"{r['async_scheduling']}): {d['wall_ms_per_step']:.2f} ms/step, {d['out_tok_s']:,.0f} out tok/s, "
                     f"{d['seqs_per_step']} seqs/step; driver us/step: schedule {d['schedule_us_per_step']}, "
                     f"submit {d['submit_us_per_step']}, collect {d['collect_us_per_step']}")
        for rank, x in r["ranks"].items():
            ph = {k: v for k, v in x.get("phases_us", {}).items() if v}
            lines.append(f"  rank {rank} (tp {x['tp_rank']}, pp {x['pp_rank']}, {x.get('num_steps')} steps"
                         f"{'' if x['decode_only'] else ', NOT decode-only'}): wall {ms(x.get('wall_us'))} ms, "
                         f"GPU busy {ms(x.get('gpu_busy_us'))} / idle {ms(x.get('gpu_idle_us'))} ms, all-reduce "
                         f"{ms(x.get('all_reduce_us'))} ms ({x.get('all_reduce_calls')} calls), send/recv "
                         f"{ms(x.get('send_recv_us'))} ms, outside execute_model {ms(x.get('outside_us'))} ms")
            lines.append("    host us/step: " + ", ".join(f"{k} {v:.0f}" for k, v in ph.items()))
            for k in x.get("top_kernels", [])[:top]:
                lines.append(f"    {k['us_per_step']:9.1f} us x{k['calls_per_step']:<6} {k['name'][:70]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3-8b", help="'default': the embedded default model (GGUF)")
    ap.add_argument("--batch_sizes", type=int, nargs="+", default=None)
    ap.add_argument("--batch_size", type=int, default=None, help="one batch size (the older spelling)")
    ap.add_argument("--input_len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=16, help="profiled steps per batch size (>= pp_size + 3)")
    ap.add_argument("--tp_size", type=int, default=1)
    ap.add_argument("--pp_size", type=int, default=1)
    ap.add_argument("--ep_size", type=int, default=1, help="expert parallel size (MoE models; divides tp_size)")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--kv_cache_dtype", default="auto")
    ap.add_argument("--load_format", default="dummy")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--enforce_eager", action="store_true")
    ap.add_argument("--async_scheduling", choices=["auto", "on", "off"], default="auto")
    ap.add_argument("--all_reduce", default=None, help="the tp all-reduce (nccl, symm_mem, ...); default: the engine's")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--out_dir", default=None, help="where the rank files go (default: a temporary directory)")
    ap.add_argument("--summary", nargs="+", default=None, metavar="JSONL",
                    help="only print a human summary of earlier runs' JSON lines (files), then exit")
    a = ap.parse_args(argv)
    if a.summary:
        results = [json.loads(line) for f in a.summary for line in open(f) if line.startswith("{")]
        print(summarize(results))
        return results
    if a.steps < a.pp_size + 3:
        ap.error(f"--steps must be at least pp_size + 3 = {a.pp_size + 3}")
    sizes = sorted(set((a.batch_sizes or []) + ([a.batch_size] if a.batch_size else []))) or [1]
    out_dir = a.out_dir or tempfile.mkdtemp(prefix="shardllm_profile_")
    from shardllm.worker import step_profiler

    # read by every worker when it starts (multiproc workers inherit this environment)
    os.environ[step_profiler.ENV_DIR] = out_dir
    os.environ[step_profiler.ENV_STEPS] = "manual"
    os.environ[step_profiler.ENV_TOP] = str(a.top)
    from shardllm import LLM

    model, load_format = (None, "auto") if a.model == "default" else (a.model, a.load_format)
    kwargs = {}
    if a.async_scheduling != "auto":
        kwargs["async_scheduling"] = a.async_scheduling == "on"
    if a.all_reduce:
        kwargs["all_reduce"] = a.all_reduce
    llm = LLM(model, load_format=load_format, dtype=a.dtype, tensor_parallel_size=a.tp_size,
              pipeline_parallel_size=a.pp_size, expert_parallel_size=a.ep_size, max_batch_size=max(sizes),
              max_seq_len=a.input_len + a.steps + 64, device=a.device, enforce_eager=a.enforce_eager,
              kv_cache_dtype=a.kv_cache_dtype, **kwargs)
    eng = llm.engine
    timers = {"schedule": _Timer(eng.scheduler, "schedule"), "submit": _Timer(eng.executor, "submit"),
              "collect": _Timer(eng.executor, "collect")}
    results = []
    try:
        for b in sizes:
            res = profile_batch(llm, b, a, timers)
            res["out_dir"] = out_dir
            print(json.dumps(res), flush=True)
            results.append(res)
    finally:
        llm.shutdown()
    return results


if __name__ == "__main__":
    main()
