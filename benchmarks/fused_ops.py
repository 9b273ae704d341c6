"""The small elementwise ops of a decoder layer, torch path against the fused Triton kernels, on one CUDA card.

Llama-3-8B shapes (H 4096, I 14336, 32 q / 8 kv heads, D 128), bf16. Per op and for a layer's whole set
(2 fused add+norms, rotary, silu_and_mul; Qwen3 adds q/k norm): kernels launched and microseconds per call,
eager and replayed from a CUDA graph (64 layers' worth per graph, so that replay overhead is amortised).

    python benchmarks/fused_ops.py [--tokens 1 64 256 4096] [--qk_norm]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from shardllm.layers import triton_ops
from shardllm.layers.activation import SiluAndMul
from shardllm.layers.layernorm import RMSNorm
from shardllm.layers.rotary import RotaryEmbedding

H, INTER, NH, NKV, D = 4096, 14336, 32, 8, 128
DT = torch.bfloat16
REPS = 64


def make_ops(n: int, qk_norm: bool) -> dict:
    dev = "cuda"
    norm, qn, kn = RMSNorm(H, 1e-5, DT).to(dev), RMSNorm(D, 1e-6, DT).to(dev), RMSNorm(D, 1e-6, DT).to(dev)
    act, rope = SiluAndMul(), RotaryEmbedding(D, 8192, 500000.0).to(dev)
    x, res = torch.randn(2, n, H, device=dev, dtype=DT)
    h = torch.randn(n, 2 * INTER, device=dev, dtype=DT)
    qkv = torch.randn(n, (NH + 2 * NKV) * D, device=dev, dtype=DT)
    pos = torch.randint(0, 8192, (n,), device=dev)

    def rotary():
        q, k, _ = qkv.split([NH * D, NKV * D, NKV * D], dim=-1)
        q, k = q.view(n, NH, D), k.view(n, NKV, D)
        if qk_norm:
            q, k = qn(q), kn(k)
        rope(pos, q, k)

    def layer():
        norm(x, res)
        rotary()
        norm(x, res)
        act(h)

    return {"add+rms_norm": lambda: norm(x, res), "qk_norm+rotary" if qk_norm else "rotary": rotary,
            "silu_and_mul": lambda: act(h), "layer (all of them)": layer}


def count_kernels(fn) -> int:
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type.name == "CUDA")


def time_us(fn, graph: bool, iters: int = 20) -> float:
    def reps():
        for _ in range(REPS):
            fn()

    reps()
    torch.cuda.synchronize()
    run = reps
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            reps()
        run = g.replay
    run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / iters / REPS


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 64, 256, 4096])
    ap.add_argument("--qk_norm", action="store_true", help="Qwen3: RMSNorm of the q/k heads before rotary")
    a = ap.parse_args()
    import triton

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, bf16, "
          f"H {H}, I {INTER}, heads {NH}/{NKV}, D {D}")
    print(f"{'N':>5s}  {'op':22s} {'kernels':>13s}  {'eager us':>17s}  {'graph us':>17s}  graph speed-up")
    for n in a.tokens:
        for name, fn in make_ops(n, a.qk_norm).items():
            stats = {}
            for use in (False, True):
                triton_ops.USE_TRITON = use
                stats[use] = count_kernels(fn), time_us(fn, False), time_us(fn, True)
            triton_ops.USE_TRITON = None
            (k0, e0, g0), (k1, e1, g1) = stats[False], stats[True]
            print(f"{n:5d}  {name:22s} {k0:5d} -> {k1:4d}  {e0:7.1f} -> {e1:6.1f}  {g0:7.1f} -> {g1:6.1f}  "
                  f"{g0 / g1:6.2f}x", flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
