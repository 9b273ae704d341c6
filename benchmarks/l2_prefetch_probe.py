"""Research probe for issue 13's batch-1 floor: do the HBM-idle gaps of a decode step (attention, the norms) pay for
prefetching the next GEMV's weights into L2? Not part of the engine.

A batch-1 FP8 step of Llama-3-8B spends ~0.4 ms of its ~2.7 ms in kernels that read almost nothing from HBM
(decode attention over a short context with its split reduce, ~8 us a layer; two RMSNorms, ~2 us each; eighteenth
session's profile), while the GEMVs stream 8 GB. Hopper's `cp.async.bulk.prefetch.L2.global` asks L2 for a range of
bytes without waiting for them (PTX ISA, "Data Movement and Conversion Instructions: cp.async.bulk.prefetch"),
so a gap kernel can start the next GEMV's weights moving: o's 16.8 MB during attention (H200's L2 is 50 MB), the
first megabytes of gate_up and of the next layer's qkv during the norms.

The probe replaces the gap kernels by timed stand-ins (one program an SM spinning on %globaltimer for the gap's
measured length, PDL like the engine's kernels) between the engine's own Triton GEMVs (its tables, PDL, the fused
SiLU down), 32 layers with their own weights (7 GB, far past L2), captured in one CUDA graph:

    base        the chain with its gaps
    fused PF    the gap stand-ins issue the prefetches themselves (what fusing into attention / RMSNorm would do)
    kernel PF   a separate prefetch launch before each gap (what a side kernel costs)

One JSON line a row: us a step, and the saving against base measured alternately in the same process. Measured in
the twenty-first session (docs/benchmarks.md): the norms' 4-8 MB saved 27-38 us of ~2,500 here, o's prefetch
nothing (`--o_rows`: o's GEMV 7.4 us cold, 6.4 us with its weight in L2); built into the engine's RMSNorm the
prefetch made batch 1 slower (2.747 -> 2.786 ms at 4 MB) and was removed.

    python benchmarks/l2_prefetch_probe.py
    python benchmarks/l2_prefetch_probe.py --pf_mb 0,4,8,12 --att_us 8 --norm_us 2
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl
from megakernel_probe import time_us  # benchmarks/ (this script's folder): the same CUDA-event timer

from shardllm.layers.pdl import launch_args, pdl_enter

LAYER = (("qkv", 6144, 4096, False), ("o", 4096, 4096, False), ("gate_up", 28672, 4096, False),
         ("down", 4096, 14336, True))


@triton.jit
def _timer():
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _prefetch(base_ptr, nbytes, pid, nprog, CHUNK: tl.constexpr, NCHUNK: tl.constexpr):
    """This program's share of [base, base + nbytes) asked of L2 in CHUNK-byte bulk prefetches."""
    per = tl.cdiv(tl.cdiv(nbytes, nprog), CHUNK) * CHUNK
    start = pid * per
    offs = start + tl.arange(0, NCHUNK) * CHUNK
    size = tl.minimum(tl.maximum(tl.minimum(nbytes - offs, start + per - offs), 0), CHUNK).to(tl.int32)
    # a block smaller than the program's threads is replicated across them (thread t holds element t % NCHUNK):
    # only threads below NCHUNK issue, so each range is asked for once
    tl.inline_asm_elementwise("{ .reg .pred p, q; .reg .u32 t; mov.u32 t, %tid.x; setp.lt.u32 q, t, $3; "
                              "setp.gt.s32 p, $2, 0; and.pred p, p, q; "
                              "@p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }", "=r,l,r,r",
                              [base_ptr + offs, size, tl.full([NCHUNK], NCHUNK, tl.int32)], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _gap_kernel(ns, pf_ptr, pf_bytes, HAS_PF: tl.constexpr, CHUNK: tl.constexpr, NCHUNK: tl.constexpr,
                USE_PDL: tl.constexpr = False):
    pdl_enter(USE_PDL)
    t0 = _timer()
    if HAS_PF:
        _prefetch(pf_ptr, pf_bytes, tl.program_id(0), tl.num_programs(0), CHUNK, NCHUNK)
    t = _timer()
    while t - t0 < ns:
        t = _timer()


@triton.jit
def _load_gap_kernel(ns, w_ptr, n_words, sink_ptr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
    """The gap stand-in that reads its share of w (int32 words) through L2 with evict_last (a load, not a
    prefetch: the bytes certainly arrive), then spins out the gap."""
    pdl_enter(USE_PDL)
    t0 = _timer()
    pid, nprog = tl.program_id(0), tl.num_programs(0)
    per = tl.cdiv(tl.cdiv(n_words, nprog), BLOCK) * BLOCK
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for i in range(pid * per, tl.minimum(pid * per + per, n_words), BLOCK):
        offs = i + tl.arange(0, BLOCK)
        acc ^= tl.load(w_ptr + offs, mask=offs < n_words, other=0, eviction_policy="evict_last")
    tl.store(sink_ptr + pid, tl.xor_sum(acc, axis=0))
    t = _timer()
    while t - t0 < ns:
        t = _timer()


@triton.jit
def _pf_kernel(pf_ptr, pf_bytes, CHUNK: tl.constexpr, NCHUNK: tl.constexpr, USE_PDL: tl.constexpr = False):
    pdl_enter(USE_PDL)
    _prefetch(pf_ptr, pf_bytes, tl.program_id(0), tl.num_programs(0), CHUNK, NCHUNK)


def build(layers: int, dev: torch.device) -> list[dict]:
    g = torch.Generator(device=dev).manual_seed(0)
    out = []
    for _ in range(layers):
        layer = {}
        for name, n, k, _silu in LAYER:
            layer[name] = (torch.randn(n, k, generator=g, device=dev).clamp_(-8, 8).to(torch.float8_e4m3fn),
                           torch.full((n,), 1.0 / k ** 0.5, device=dev))
        out.append(layer)
    return out


def make_step(layers: list[dict], sms: int, att_ns: int, norm_ns: int, mode: str, pf_bytes: int, chunk: int):
    """A function running one step; mode in base / fused / kernel."""
    from shardllm.layers.gemv import FP8_GEMV_TABLE, gemv, nearest_config, table_config
    from shardllm.layers.gemv_silu import FUSED_SILU_TABLES

    dev = layers[0]["o"][0].device
    pdl = launch_args(dev)
    x = torch.randn(1, 4096, device=dev).to(torch.bfloat16)
    cfgs = {}
    for name, n, k, silu in LAYER:
        table = FUSED_SILU_TABLES["fp8"] if silu else FP8_GEMV_TABLE
        cfgs[name] = table_config(table, n, k, 1) or nearest_config(table, n, k, 1)

    def gap(ns: int, w: torch.Tensor | None, nbytes: int) -> None:
        nbytes = 0 if w is None else min(nbytes, w.numel())
        per_prog = -(-nbytes // sms)
        nchunk = max(1, triton.next_power_of_2(-(-per_prog // chunk)))
        if mode == "kernel" and nbytes:
            _pf_kernel[(sms,)](w, nbytes, CHUNK=chunk, NCHUNK=nchunk, num_warps=1, **pdl)
        _gap_kernel[(sms,)](ns, w if w is not None else x, nbytes, HAS_PF=mode == "fused" and nbytes > 0,
                            CHUNK=chunk, NCHUNK=nchunk, num_warps=4, **pdl)

    pf = mode != "base"

    def step():
        h = x
        for i, layer in enumerate(layers):
            nxt = layers[(i + 1) % len(layers)]
            q = gemv(h, *layer["qkv"], cfgs["qkv"])
            gap(att_ns, layer["o"][0] if pf else None, 1 << 40)  # attention: all of o
            a = gemv(q[:, :4096], *layer["o"], cfgs["o"])
            gap(norm_ns, layer["gate_up"][0] if pf else None, pf_bytes)  # the post-attention norm
            gu = gemv(a, *layer["gate_up"], cfgs["gate_up"])
            h = gemv(gu, *layer["down"], cfgs["down"], silu_input=True)
            gap(norm_ns, nxt["qkv"][0] if pf else None, pf_bytes)  # the next layer's input norm
        return h

    step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    return graph.replay, out


def o_rows(layers: list[dict], sms: int, att_ns: int, reps: int) -> None:
    """o's GEMV alone: cold (32 weights in turn), hot (one weight, L2-resident after its first read), and after an
    attention-length gap that prefetches it (bulk prefetch, 16 / 64 KiB) or loads it (evict_last), each less the gap
    alone; one graph of 32 a row."""
    from shardllm.layers.gemv import FP8_GEMV_TABLE, gemv, nearest_config, table_config

    dev = layers[0]["o"][0].device
    pdl = launch_args(dev)
    cfg = table_config(FP8_GEMV_TABLE, 4096, 4096, 1) or nearest_config(FP8_GEMV_TABLE, 4096, 4096, 1)
    x = torch.randn(1, 4096, device=dev).to(torch.bfloat16)
    sink = torch.zeros(sms, dtype=torch.int32, device=dev)
    ws = [layer["o"] for layer in layers]
    nbytes = ws[0][0].numel()

    def gap(w, how):
        if how == "load":
            _load_gap_kernel[(sms,)](att_ns, w.view(torch.int32), nbytes // 4, sink, BLOCK=1024, num_warps=4, **pdl)
            return
        chunk = {"pf16": 16384, "pf64": 65536}.get(how, 16384)
        nchunk = max(1, triton.next_power_of_2(triton.cdiv(triton.cdiv(nbytes, sms), chunk)))
        _gap_kernel[(sms,)](att_ns, w, nbytes if how.startswith("pf") else 0, HAS_PF=how.startswith("pf"),
                            CHUNK=chunk, NCHUNK=nchunk, num_warps=4, **pdl)

    def graph_of(fn):
        fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        return g.replay

    variants = {
        "o cold": lambda: [gemv(x, w, s, cfg) for w, s in ws],
        "o hot": lambda: [gemv(x, *ws[0], cfg) for _ in ws],
        "gap": lambda: [gap(w, "none") for w, _ in ws],
        "gap + o": lambda: [(gap(w, "none"), gemv(x, w, s, cfg)) for w, s in ws],
        "gap pf16 + o": lambda: [(gap(w, "pf16"), gemv(x, w, s, cfg)) for w, s in ws],
        "gap pf64 + o": lambda: [(gap(w, "pf64"), gemv(x, w, s, cfg)) for w, s in ws],
        "gap load": lambda: [gap(w, "load") for w, _ in ws],
        "gap load + o": lambda: [(gap(w, "load"), gemv(x, w, s, cfg)) for w, s in ws],
    }
    fns = {k: graph_of(v) for k, v in variants.items()}
    for r in range(2):
        t = {k: time_us(f, reps) / len(ws) for k, f in fns.items()}
        out = {k: round(v, 2) for k, v in t.items()}
        out.update({"o after gap": round(t["gap + o"] - t["gap"], 2),
                    "o after pf16": round(t["gap pf16 + o"] - t["gap"], 2),
                    "o after pf64": round(t["gap pf64 + o"] - t["gap"], 2),
                    "o after load": round(t["gap load + o"] - t["gap load"], 2)})
        print(json.dumps({"row": "o alone, us a call", "round": r, "cfg": str(cfg), **out}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--att_us", type=float, default=8.0, help="attention + its split reduce, us a layer")
    ap.add_argument("--norm_us", type=float, default=2.0, help="one RMSNorm, us")
    ap.add_argument("--pf_mb", default="0,4,8", help="MB of gate_up / the next qkv prefetched in each norm gap")
    ap.add_argument("--chunk_kb", default="16,64", help="bulk prefetch sizes, KiB")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--o_rows", action="store_true", help="only o's GEMV cold / hot / after a prefetching gap")
    a = ap.parse_args()
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    layers = build(a.layers, dev)
    if a.o_rows:
        o_rows(layers, sms, int(a.att_us * 1e3), a.reps)
        return
    nbytes = sum(w.numel() + s.numel() * 4 for layer in layers for w, s in layer.values())
    att_ns, norm_ns = int(a.att_us * 1e3), int(a.norm_us * 1e3)
    base, ref = make_step(layers, sms, att_ns, norm_ns, "base", 0, 16384)
    rows = {"base": base}
    outs = {}
    for chunk in (int(c) * 1024 for c in a.chunk_kb.split(",")):
        for mb in (float(m) for m in a.pf_mb.split(",")):
            for mode in ("fused", "kernel"):
                name = f"{mode} chunk={chunk // 1024}K pf={mb:g}MB"
                try:
                    rows[name], outs[name] = make_step(layers, sms, att_ns, norm_ns, mode, int(mb * 2 ** 20), chunk)
                except Exception as e:  # a compile failure: the row says so
                    print(json.dumps({"row": name, "error": str(e)[-400:]}), flush=True)
    base()
    torch.cuda.synchronize()
    same = {n: bool(torch.equal(o, ref)) for n, o in outs.items()}
    gap_us = a.layers * (a.att_us + 2 * a.norm_us)
    print(json.dumps({"row": "setup", "gb": round(nbytes / 1e9, 3), "sms": sms, "gaps_us": gap_us,
                      "outputs_equal_base": all(same.values())}), flush=True)
    for r in range(a.rounds):
        tb = time_us(base, a.reps)
        for name, fn in rows.items():
            t = time_us(fn, a.reps) if name != "base" else tb
            print(json.dumps({"row": name, "round": r, "us": round(t, 1), "vs_base_us": round(t - tb, 1),
                              "gemv_tb_s_ex_gaps": round(nbytes / max(t - gap_us, 1) / 1e6, 3)}), flush=True)
            if name != "base":
                tb = time_us(base, a.reps)


if __name__ == "__main__":
    main()
