"""The engine's host work per step, measured on CPU with a model so small that its forward costs little:
what a GPU step would wait for if the host were not overlapped (the driver's scheduling, the plan's trip to
the workers, input preparation, sampling bookkeeping, output handling).

    python benchmarks/host_overhead.py --num_requests 256 --input_len 512 --output_len 64
    python benchmarks/host_overhead.py --pp 2 --async_scheduling --profile 25
    python benchmarks/host_overhead.py --decode_plan 2048   # one decode step's plan, no forward

Prints ms per step, and (one rank in this process) the time per step of each host part: the scheduler,
the plan's pickle round trip (what a worker process would pay), input preparation, the sampling batch,
the engine's handling of the step's tokens. With --profile N, the driver's N most expensive functions.
--decode_plan L times, for a decode step of --num_requests requests at context L, the scheduler's schedule
and update, the plan's pickle round trip and the runner's input preparation, with the model never run.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time

import torch


def write_tiny(path: str, layers: int) -> str:
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                   bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return path


def instrument(eng) -> dict[str, float]:
    """Wrap the host parts of a uniproc engine with timers; returns the dict the timers add into."""
    import gc
    import pickle

    totals = {"gc": 0.0, "schedule": 0.0, "plan_pickle": 0.0, "prepare_inputs": 0.0, "sampling_batch": 0.0,
              "update_from_output": 0.0, "engine_outputs": 0.0}

    def timed(obj, name, key):
        fn = getattr(obj, name)

        def wrapper(*args, **kw):
            t = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                totals[key] += time.perf_counter() - t
        setattr(obj, name, wrapper)

    started = [0.0]

    def on_gc(phase, info):
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            totals["gc"] += time.perf_counter() - started[0]
    gc.callbacks.append(on_gc)
    sched = eng.scheduler
    timed(sched, "schedule", "schedule")
    timed(sched, "update_from_output", "update_from_output")
    runner = eng.executor.worker.model_runner
    timed(runner, "prepare_inputs", "prepare_inputs")
    timed(runner, "_sampling_batch", "sampling_batch")
    timed(eng, "_process_token", "engine_outputs")
    submit = eng.executor.submit

    def submit_and_pickle(so):
        t = time.perf_counter()
        pickle.loads(pickle.dumps(so, protocol=pickle.HIGHEST_PROTOCOL))
        totals["plan_pickle"] += time.perf_counter() - t
        return submit(so)
    eng.executor.submit = submit_and_pickle
    return totals


def decode_plan(path: str, n: int, ctx: int) -> dict:
    """Host cost of one steady decode step of n requests at context ctx (the GC off: its pauses vary)."""
    import gc
    import pickle

    from shardllm import LLM, SamplingParams
    from shardllm.engine.request import Request
    from shardllm.step_io import ModelRunnerOutput

    llm = LLM(path, device="cpu", dtype="float32", max_batch_size=n, max_num_tokens=8192,
              num_kv_blocks=n * (ctx + 64) // 16 + 64, block_size=16, max_seq_len=ctx + 64)
    eng = llm.engine
    sched, runner = eng.scheduler, eng.executor.worker.model_runner
    for i in range(n):
        sched.add_request(Request(f"r{i}", [3 + (i + j) % 500 for j in range(ctx)],
                                  SamplingParams(max_tokens=60, ignore_eos=True, temperature=0)))
    times = {"schedule": [], "plan_pickle": [], "prepare_inputs": [], "update_from_output": []}

    def one(record: bool):
        t0 = time.perf_counter()
        so = sched.schedule()
        t1 = time.perf_counter()
        so = pickle.loads(pickle.dumps(so, protocol=pickle.HIGHEST_PROTOCOL))
        t2 = time.perf_counter()
        runner._update_states(so)
        runner.prepare_inputs(so)
        t3 = time.perf_counter()
        ids = [s.req_id for s in so.scheduled if s.do_sample]
        sched.update_from_output(so, ModelRunnerOutput(ids, [7] * len(ids)))
        t4 = time.perf_counter()
        if record and all(len(s.token_ids) == 1 for s in so.scheduled):
            for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                times[k].append(v)

    while sched.waiting or any(r.num_output_tokens == 0 for r in sched.running):
        one(False)  # the prompts, chunk by chunk
    gc.collect()
    gc.disable()
    for _ in range(40):
        one(True)
    gc.enable()
    llm.shutdown()
    return {"decode_requests": n, "context": ctx, "steps": len(times["schedule"]),
            **{f"{k}_ms": round(sorted(v)[len(v) // 2] * 1e3, 3) for k, v in times.items()}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num_requests", type=int, default=256)
    ap.add_argument("--input_len", type=int, default=16)
    ap.add_argument("--output_len", type=int, default=64)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--async_scheduling", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--backend", choices=("mp", "ray"), default=None,
                    help="executor for tp x pp > 1 (ray: a local Ray instance, or $RAY_ADDRESS)")
    ap.add_argument("--profile", type=int, default=0, help="print the driver's N top functions")
    ap.add_argument("--decode_plan", type=int, default=0, metavar="L", help="time one decode step's plan at context L")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    if a.decode_plan:
        with tempfile.TemporaryDirectory() as d:
            res = decode_plan(write_tiny(os.path.join(d, "tiny"), 2), a.num_requests, a.decode_plan)
        print(json.dumps(res) if a.json else res)
        return

    from shardllm import LLM, SamplingParams

    with tempfile.TemporaryDirectory() as d:
        path = write_tiny(os.path.join(d, "tiny"), layers=max(2, a.pp))
        kw = {} if a.async_scheduling is None else {"async_scheduling": a.async_scheduling}
        if a.backend:
            kw["distributed_executor_backend"] = a.backend
        llm = LLM(path, device="cpu", dtype="float32", tensor_parallel_size=a.tp, pipeline_parallel_size=a.pp,
                  max_batch_size=a.num_requests, num_kv_blocks=a.num_requests * (a.input_len + a.output_len) // 16 + 64,
                  block_size=16, **kw)
        g = torch.Generator().manual_seed(0)
        prompts = [{"prompt_token_ids": torch.randint(3, 500, (a.input_len,), generator=g).tolist()}
                   for _ in range(a.num_requests)]
        sp = SamplingParams(max_tokens=a.output_len, temperature=0, ignore_eos=True, detokenize=False)
        llm.generate(prompts[:4], sp, use_tqdm=False)  # warm-up
        eng = llm.engine
        steps0 = eng.stats.steps
        send0 = getattr(eng.executor, "plan_send_s", 0.0)
        parts = instrument(eng) if a.tp * a.pp == 1 else {}
        prof = cProfile.Profile() if a.profile else None
        t = time.perf_counter()
        if prof:
            prof.enable()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        if prof:
            prof.disable()
        wall = time.perf_counter() - t
        steps = eng.stats.steps - steps0
        assert all(len(o.outputs[0].token_ids) == a.output_len for o in outs)
        res = {"tp": a.tp, "pp": a.pp, "async_scheduling": llm.config.scheduler_config.async_scheduling,
               "num_requests": a.num_requests, "steps": steps, "ms_per_step": round(wall / steps * 1e3, 3),
               "us_per_request_step": round(wall / (a.num_requests * a.output_len) * 1e6, 2)}
        res.update({f"{k}_ms_per_step": round(v / steps * 1e3, 3) for k, v in parts.items()})
        if hasattr(eng.executor, "plan_send_s"):  # pickling the plan and writing it to every worker
            res["executor"] = type(eng.executor).__name__
            res["plan_send_ms_per_step"] = round((eng.executor.plan_send_s - send0) / steps * 1e3, 3)
        llm.shutdown() if hasattr(llm, "shutdown") else None
    print(json.dumps(res) if a.json else res)
    if prof:
        pstats.Stats(prof, stream=sys.stdout).sort_stats("cumulative").print_stats(a.profile)


if __name__ == "__main__":
    main()
