"""The Ray executor beside the multiproc one on the same host: greedy tokens and throughput (issue 14's GPU run).

    python benchmarks/ray_vs_mp.py --backend mp  --tp 2 > mp.json
    python benchmarks/ray_vs_mp.py --backend ray --tp 2 > ray.json   # a local Ray instance, or $RAY_ADDRESS

Prints one JSON line: the greedy token ids of fixed prompts (equal across backends means same numerics), output
tokens per second on --num_requests random prompts, ms per engine step, the plan's send time per step, and the
seconds the engine took to start.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=("mp", "ray"), required=True)
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--load_format", default="dummy")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--num_requests", type=int, default=256)
    ap.add_argument("--input_len", type=int, default=128)
    ap.add_argument("--output_len", type=int, default=128)
    a = ap.parse_args()
    from shardllm import LLM, SamplingParams

    t = time.perf_counter()
    llm = LLM(a.model, load_format=a.load_format, tensor_parallel_size=a.tp, pipeline_parallel_size=a.pp,
              distributed_executor_backend=a.backend, max_batch_size=a.num_requests)
    start_s = time.perf_counter() - t
    try:
        greedy = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
        vocab = llm.config.model_config.hf_config.vocab_size
        fixed = [{"prompt_token_ids": [(7 * i + 3 * j) % 300 + 3 for j in range(3 + 9 * i)]} for i in range(4)]
        tokens = [o.outputs[0].token_ids for o in llm.generate(fixed, greedy, use_tqdm=False)]
        g = torch.Generator().manual_seed(0)
        prompts = [{"prompt_token_ids": torch.randint(3, min(vocab, 30000), (a.input_len,), generator=g).tolist()}
                   for _ in range(a.num_requests)]
        sp = SamplingParams(max_tokens=a.output_len, temperature=0, ignore_eos=True, detokenize=False)
        eng = llm.engine
        steps0, send0 = eng.stats.steps, getattr(eng.executor, "plan_send_s", 0.0)
        t = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        wall = time.perf_counter() - t
        steps = eng.stats.steps - steps0
        n_out = sum(len(o.outputs[0].token_ids) for o in outs)
        print(json.dumps({
            "backend": a.backend, "executor": type(eng.executor).__name__, "model": a.model, "tp": a.tp,
            "pp": a.pp, "num_requests": a.num_requests, "input_len": a.input_len, "output_len": a.output_len,
            "start_s": round(start_s, 1), "output_tok_per_s": round(n_out / wall, 1), "steps": steps,
            "ms_per_step": round(wall / steps * 1e3, 3),
            "plan_send_ms_per_step": round((getattr(eng.executor, "plan_send_s", 0.0) - send0) / steps * 1e3, 3),
            "greedy_tokens": tokens}))
    finally:
        llm.shutdown()


if __name__ == "__main__":
    main()
