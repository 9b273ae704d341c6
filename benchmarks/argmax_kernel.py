"""Greedy arg-max on one GPU: layers/argmax.py's two kernels beside torch.argmax, bf16 logits (B, V), us per call
from a CUDA graph of 20 calls (as benchmarks/fp8_gemm.py times). Run: python benchmarks/argmax_kernel.py
[--rows 1 4 16] [--vocab 128256]"""

from __future__ import annotations

import argparse
import json

import torch

from shardllm.layers.argmax import greedy_argmax


def timed(fn, calls: int = 20, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (calls * reps)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--vocab", type=int, default=128256)
    a = ap.parse_args()
    for rows in a.rows:
        x = torch.randn(rows, a.vocab, device="cuda", dtype=torch.bfloat16)
        out = torch.empty(rows, dtype=torch.long, device="cuda")
        t_torch = timed(lambda x=x, out=out: torch.argmax(x, dim=-1, out=out))
        t_triton = timed(lambda x=x, out=out: greedy_argmax(x, out=out, force=True))
        same = torch.equal(greedy_argmax(x, force=True), torch.argmax(x, dim=-1))
        print(json.dumps(dict(rows=rows, vocab=a.vocab, torch_us=round(t_torch, 2), triton_us=round(t_triton, 2),
                              same=same)))


if __name__ == "__main__":
    main()
