"""Where a decode step's time goes: kernels by total time, and how long the GPU sits idle between them.

    python benchmarks/profile_decode.py --model llama-3-8b --batch_size 1 --steps 32
    python benchmarks/profile_decode.py --model llama-3-8b --batch_size 256 --tp_size 2   # rank 0 only

Runs `steps` decode steps of `batch_size` requests (dummy weights, CUDA graphs unless --enforce_eager) under
torch.profiler and prints one JSON line: wall time per step, GPU busy time per step (kernels merged over
overlaps), and the top kernels with calls and µs per step. With tp > 1 the workers are other processes, so
only in-process (tp = 1) runs see the kernels; use tp > 1 for the wall time alone.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def busy_time(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
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


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3-8b", help="'default': the embedded default model (GGUF)")
    ap.add_argument("--batch_size", type=int, default=1)
    ap.add_argument("--input_len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--tp_size", type=int, default=1)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--load_format", default="dummy")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--enforce_eager", action="store_true")
    ap.add_argument("--top", type=int, default=15)
    a = ap.parse_args(argv)
    from torch.profiler import ProfilerActivity, profile

    from shardllm import LLM, SamplingParams

    model, load_format = (None, "auto") if a.model == "default" else (a.model, a.load_format)
    llm = LLM(model, load_format=load_format, dtype=a.dtype, tensor_parallel_size=a.tp_size,
              max_batch_size=a.batch_size, max_seq_len=a.input_len + 4 * a.steps + 16, device=a.device,
              enforce_eager=a.enforce_eager)
    eng = llm.engine
    vocab = llm.config.model_config.hf_config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(100, vocab - 100, (a.batch_size, a.input_len), generator=g).tolist()
    sp = SamplingParams(max_tokens=4 * a.steps, temperature=0, ignore_eos=True, detokenize=False)
    for i, p in enumerate(prompts):
        eng.add_request(f"p{i}", p, sp)
    while eng.stats.generation_tokens < 2 * a.batch_size:  # prefill and a few decode steps, outside the trace
        eng.step()
    on_gpu = llm.config.device == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=acts) as prof:
        t = time.perf_counter()
        steps0 = eng.stats.steps
        while eng.stats.steps - steps0 < a.steps:
            eng.step()
        if on_gpu:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t
    steps = eng.stats.steps - steps0
    kind = "cuda" if on_gpu else "cpu"
    events = [e for e in prof.events() if (e.device_type.name.lower() == kind) and e.time_range.end > 0]
    if kind == "cpu":  # without a GPU: top-level torch ops only, a host-side view
        events = [e for e in events if e.name.startswith("aten::")]
    per_kernel: dict[str, list[float]] = {}
    for e in events:
        per_kernel.setdefault(e.name, []).append(e.time_range.end - e.time_range.start)
    top = sorted(per_kernel.items(), key=lambda kv: -sum(kv[1]))[: a.top]
    busy = busy_time([(e.time_range.start, e.time_range.end) for e in events]) if kind == "cuda" else None
    res = {
        "model": a.model, "batch_size": a.batch_size, "tp": a.tp_size, "graphs": on_gpu and not a.enforce_eager,
        "steps": steps, "wall_ms_per_step": round(wall / steps * 1e3, 3),
        "gpu_busy_ms_per_step": round(busy / steps / 1e3, 3) if busy is not None else None,
        "kernels_per_step": round(len(events) / steps, 1),
        "top": [{"name": n[:80], "calls_per_step": round(len(v) / steps, 2),
                 "us_per_step": round(sum(v) / steps, 1)} for n, v in top],
    }
    print(json.dumps(res))
    llm.shutdown()
    return res


if __name__ == "__main__":
    main()
