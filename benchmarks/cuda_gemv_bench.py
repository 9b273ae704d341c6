"""The batch-1 FP8 GEMV, CUDA kernel (layers/cuda_gemv.py) against the engine's Triton GEMV, kernel by kernel.

Llama-3-8B's layer linears at tp 1 (e4m3 weights, per-channel fp32 scales, one bf16 row; down also in its fused
SiLU form, from gate_up), each timed as one CUDA graph of 20 calls over weight copies that together exceed 3x the
L2, so every call streams from HBM; launches with PDL as the engine makes them (SHARDLLM_PDL=0: without). Prints
one JSON line a (shape, kernel, plan): us a call, TB/s over the weight bytes, the largest error against the fp32
reference relative to its largest value.

    python benchmarks/cuda_gemv_bench.py [--variants reg:1 reg:2 tma:4:2]

A variant is KERNEL:BLOCKS_PER_SM for the register-streaming kernel, tma:STAGES:BLOCKS_PER_SM for the ring.
"""

from __future__ import annotations

import argparse
import json

import torch

from shardllm.layers import cuda_gemv, gemv_silu, triton_ops
from shardllm.layers.gemv import gemv, gemv_reference
from shardllm.layers.pdl import launch_args
from shardllm.layers.quantization.fp8_triton import small_m_config
from shardllm.layers.quantization.fp8_utils import quantize_per_row

SHAPES = {"qkv": (6144, 4096, False), "o": (4096, 4096, False), "gate_up": (28672, 4096, False),
          "down": (4096, 14336, False), "down_silu": (4096, 14336, True)}
L2_BYTES = 60 * 2**20


def graph_us(fn, reps: int = 10) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record()
    for _ in range(reps):
        g.replay()
    e1.record()
    torch.cuda.synchronize()
    return e0.elapsed_time(e1) * 1e3 / (reps * 20)


def run_shape(name: str, n: int, k: int, silu: bool, variants: list[str], sms: int, pdl: bool,
              sums: dict[str, float]) -> None:
    dev = torch.device("cuda")
    copies = 3 * L2_BYTES // (n * k) + 2
    ws = []
    for _ in range(copies):
        q, s = quantize_per_row(torch.randn(n, k, device=dev) * 0.05)
        ws.append((q.contiguous(), s.view(-1).float().contiguous()))
    x = torch.randn(1, 2 * k if silu else k, device=dev).to(torch.bfloat16)
    ref = gemv_reference(triton_ops.silu_and_mul(x) if silu else x, *ws[0])
    calls = [ws[i % copies] for i in range(20)]
    config = gemv_silu._fused_config(ws[0][0], 1) if silu else small_m_config(n, k, 1)

    def err(y):
        return round(float((y.float() - ref).abs().max() / ref.abs().max()), 5)

    cuda_gemv.ENABLED = False
    t = graph_us(lambda: [gemv(x, q, s, config, silu_input=silu) for q, s in calls])
    e = err(gemv(x, *ws[0], config, silu_input=silu))
    print(json.dumps({"shape": name, "kernel": "triton", "us": round(t, 2), "tb_s": round(n * k / t / 1e6, 3),
                      "rel_err": e}), flush=True)
    sums["triton"] = sums.get("triton", 0.0) + (0 if name == "down" else t)
    for key in variants:
        kernel, *nums = key.split(":")
        stages, bps = (int(nums[0]), int(nums[1])) if kernel == "tma" else (0, int(nums[0]))
        p = cuda_gemv.plan(n, k, sms, stages, bps, kernel)
        if silu and kernel == "reg":  # no fused SiLU form
            continue
        cuda_gemv._plan_for = lambda index, nn, kk, p=p: p  # this plan
        try:
            t = graph_us(lambda: [cuda_gemv.gemv_fp8(x, q, s, silu, pdl) for q, s in calls])
            e = err(cuda_gemv.gemv_fp8(x, *ws[0], silu, pdl))
        except Exception as ex:  # a plan that cannot launch (shared memory)
            print(json.dumps({"shape": name, "plan": list(p), "error": str(ex)[:300]}), flush=True)
            continue
        print(json.dumps({"shape": name, "kernel": key, "plan": list(p), "us": round(t, 2),
                          "tb_s": round(n * k / t / 1e6, 3), "rel_err": e}), flush=True)
        sums[key] = sums.get(key, 0.0) + (0 if name == "down" else t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", nargs="+", default=["reg:1", "reg:2", "reg:3", "tma:4:2"])
    args = ap.parse_args()
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    pdl = bool(launch_args(dev))
    sums: dict[str, float] = {}
    for name, (n, k, silu) in SHAPES.items():
        run_shape(name, n, k, silu, args.variants, sms, pdl, sums)
    print(json.dumps({"layer_us (qkv + o + gate_up + down_silu)": {k: round(v, 2) for k, v in sums.items()},
                      "pdl": pdl}))


if __name__ == "__main__":
    main()
