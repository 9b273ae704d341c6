"""Can one half-batch's decode attention (HBM-bound) and the other half's FP8 GEMMs (tensor-core-bound) share an H200
when each holds part of the SMs? The physics behind a NanoFlow-style split of a 1000/1000 decode step (issue 13).

Half of a 512-row decode step at Llama-3-8B sizes, per layer: the FP8-cache decode attention of 256 sequences of
~1500 tokens (64-token pages, V transposed: the engine's layout) and the four FP8 GEMMs of 256 rows (qkv 6144 x
4096, o 4096 x 4096, gate_up 28672 x 4096, down 4096 x 14336; torch._scaled_mm row-wise, fast accumulation). Each
variant is LAYERS layers captured in one CUDA graph, timed over replays (ms a graph, median of 5 x 10 replays):

- attn / attn P=n: the attention alone, one program an item (the default) or a persistent grid of n programs
  (paged_decode_attention's `programs`);
- gemm c=k: the GEMMs alone, cuBLAS told to leave k SMs free (torch's SM carveout);
- serial: attention then GEMMs on one stream; "whole step": the same at twice the rows (the unsplit step today,
  whose GEMMs read the weights once where two halves read them twice);
- both P=n c=k: attention on one stream and GEMMs on another, forked and joined inside the graph.

A split pays where two "both" beat one "whole step" clearly. One JSON line a row, then a summary.

    python benchmarks/overlap_sm_split.py [--layers 8] [--ctx 1500] [--programs 264 528 ...] [--carveouts 0 48 66]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from shardllm.layers.attention.triton_paged import paged_decode_attention
from shardllm.layers.microbatch_overlap import sm_carveout

GEMMS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def attention_case(batch: int, ctx: int, bs: int = 64, seed: int = 0):
    """(q, k_cache, v_cache_t, block_tables, seq_lens, k_scale, v_scale): contexts uniform in [0.8, 1.2] x ctx,
    pages scattered over a cache far larger than L2."""
    g = torch.Generator().manual_seed(seed)
    lens = (torch.rand(batch, generator=g) * 0.4 + 0.8).mul(ctx).long().clamp(min=1)
    per = (lens + bs - 1) // bs
    nb = int(per.sum()) + 1
    perm = torch.randperm(nb - 1, generator=g) + 1
    tables = torch.zeros(batch, int(per.max()), dtype=torch.int32)
    o = 0
    for i, n in enumerate(per.tolist()):
        tables[i, :n] = perm[o:o + n]
        o += n
    fp8 = torch.float8_e4m3fn
    kc = (torch.randn(nb, bs, 8, 128, device="cuda") * 2).to(fp8)
    vt = torch.randn(nb, 8, 128, bs, device="cuda").to(fp8)
    q = torch.randn(batch, 32, 128, device="cuda", dtype=torch.bfloat16)
    one = torch.tensor(1.0, device="cuda")
    return q, kc, vt, tables.cuda(), lens.int().cuda(), one, one, int(lens.sum())


def gemm_case(m: int):
    fp8 = torch.float8_e4m3fn
    out = []
    for n, k in GEMMS.values():
        x = torch.randn(m, k, device="cuda").to(fp8)
        w = torch.randn(n, k, device="cuda").to(fp8)
        out.append((x, w.t(), torch.ones(m, 1, device="cuda"), torch.ones(1, n, device="cuda")))
    return out


def run_attn(a, programs):
    q, kc, vt, bt, lens, ks, vs, _ = a
    paged_decode_attention(q, kc, vt, bt, lens, 128 ** -0.5, k_scale=ks, v_scale=vs, v_transposed=True,
                           programs=programs)


def run_gemms(gs):
    for x, wt, sa, sb in gs:
        torch._scaled_mm(x, wt, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16, use_fast_accum=True)


def graph_of(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()  # compile / warm
        fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    torch.cuda.synchronize()
    return g


def time_graph(g, reps: int = 10) -> float:
    g.replay()
    torch.cuda.synchronize()
    runs = []
    for _ in range(5):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(reps):
            g.replay()
        e1.record()
        torch.cuda.synchronize()
        runs.append(e0.elapsed_time(e1) / reps)
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=256, help="rows of the half step")
    ap.add_argument("--ctx", type=int, default=1500)
    ap.add_argument("--programs", type=int, nargs="*", default=[132, 264, 528, 1056, 66 * 2, 66 * 4, 66 * 8, 44 * 8])
    ap.add_argument("--carveouts", type=int, nargs="*", default=[0, 44, 66, 88])
    args = ap.parse_args()
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    a = attention_case(args.batch, args.ctx)
    gs = gemm_case(args.batch)
    L = args.layers
    kv_gb = 2 * a[-1] * 8 * 128 / 1e9
    flop = 2 * args.batch * sum(n * k for n, k in GEMMS.values()) / 1e12
    rows = {}

    def row(name, fn, carve=0, **extra):
        with sm_carveout(carve, dev):
            g = graph_of(fn)
        ms = time_graph(g) / L
        rows[name] = ms
        print(json.dumps({"row": name, "ms_a_layer": round(ms, 4), **extra}), flush=True)
        return ms

    t_attn = row("attn", lambda: [run_attn(a, None) for _ in range(L)], tb_s=None)
    print(json.dumps({"attn_tb_s": round(kv_gb / t_attn, 3)}))
    for p in sorted(set(args.programs)):
        t = row(f"attn P={p}", lambda p=p: [run_attn(a, p) for _ in range(L)])
        print(json.dumps({"row": f"attn P={p}", "tb_s": round(kv_gb / t, 3)}))
    for c in args.carveouts:
        t = row(f"gemm c={c}", lambda: [run_gemms(gs) for _ in range(L)], carve=c)
        print(json.dumps({"row": f"gemm c={c}", "tflop_s": round(flop / t * 1e3, 1)}))
    t_serial = row("serial", lambda: [(run_attn(a, None), run_gemms(gs)) for _ in range(L)])
    a2, gs2 = attention_case(2 * args.batch, args.ctx, seed=1), gemm_case(2 * args.batch)
    t_full = row("serial, whole step (2 x rows, unsplit)", lambda: [(run_attn(a2, None), run_gemms(gs2))
                                                                   for _ in range(L)])

    def both(p, c):
        side = torch.cuda.Stream()

        def fn():
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(L):
                    run_gemms(gs)
            for _ in range(L):
                run_attn(a, p)
            torch.cuda.current_stream().wait_stream(side)
        return fn

    best = None
    for p in [None] + sorted(set(args.programs)):
        for c in args.carveouts:
            t = row(f"both P={p} c={c}", both(p, c), carve=c)
            if best is None or t < best[0]:
                best = (t, p, c)
    print(json.dumps({"summary": {"sms": sms, "attn_ms": round(t_attn, 4), "gemm_ms": round(rows["gemm c=0"], 4),
                                  "serial_ms": round(t_serial, 4), "best_both_ms": round(best[0], 4),
                                  "best_programs": best[1], "best_carveout": best[2],
                                  "gain_vs_serial": round(t_serial / best[0], 3),
                                  "whole_step_ms": round(t_full, 4),
                                  "gain_vs_whole_step": round(t_full / (2 * best[0]), 3)}}))


if __name__ == "__main__":
    main()
