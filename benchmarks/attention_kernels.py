"""Per-layer time of the Triton paged-attention kernels against the torch reference, on one CUDA card.

Llama-3-8B layout (32 q heads, 8 kv heads, D=128, block_size 16), bf16. Each timed call uses another layer's
cache (as many as it takes to exceed L2), so that numbers are not L2-hot; "graph" rows replay a CUDA graph of
all those calls, "eager" rows include Python launch cost. GB/s counts the KV bytes read.

    python benchmarks/attention_kernels.py [--batch 1 256] [--ctx 256 4096] [--splits 8 16 32]
"""

from __future__ import annotations

import argparse
import functools
import time

import torch

from shardllm.layers.attention.attention import AttentionMetadata, paged_attention_reference
from shardllm.layers.attention.triton_paged import (
    default_num_splits,
    paged_decode_attention,
    paged_prefill_attention,
    write_kv_cache,
)

NH, NKV, D, BS = 32, 8, 128, 16
DT = torch.bfloat16
L2_FLUSH_BYTES = 256 << 20


class Layers:
    """`n` independent caches and block tables for one batch shape (q_lens, seq_lens)."""

    def __init__(self, q_lens: list[int], seq_lens: list[int], max_layers: int = 256):
        dev = "cuda"
        self.blocks_per_seq = [-(-s // BS) for s in seq_lens]
        num_blocks = 1 + sum(self.blocks_per_seq)
        per_layer = 2 * num_blocks * BS * NKV * D * 2
        self.n = max(1, min(max_layers, -(-L2_FLUSH_BYTES // per_layer)))
        self.kv_bytes = 2 * sum(seq_lens) * NKV * D * 2
        self.caches = [torch.randn(2, num_blocks, BS, NKV, D, device=dev, dtype=DT) for _ in range(self.n)]
        ids = torch.randperm(num_blocks - 1, device=dev) + 1  # scattered blocks, like a busy cache
        table = torch.zeros(len(seq_lens), max(self.blocks_per_seq), dtype=torch.int32, device=dev)
        start = 0
        for b, n in enumerate(self.blocks_per_seq):
            table[b, :n] = ids[start:start + n]
            start += n
        qsl = [0]
        for n in q_lens:
            qsl.append(qsl[-1] + n)
        slots = []
        for b, (ql, sl) in enumerate(zip(q_lens, seq_lens)):
            pos = torch.arange(sl - ql, sl, device=dev)
            slots.append(table[b, pos // BS].long() * BS + pos % BS)
        self.meta = AttentionMetadata(
            slot_mapping=torch.cat(slots), query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev), block_tables=table,
            max_query_len=max(q_lens), max_seq_len=max(seq_lens), block_size=BS)
        self.q = torch.randn(qsl[-1], NH, D, device=dev, dtype=DT)
        self.k_new = torch.randn(qsl[-1], NKV, D, device=dev, dtype=DT)
        self.v_new = torch.randn_like(self.k_new)


def time_per_call(layers: Layers, fn, graph: bool, min_s: float = 0.3) -> float:
    """Seconds per call of fn(k_cache, v_cache), each call on the next layer's cache."""
    def all_layers():
        for c in layers.caches:
            fn(c[0], c[1])

    all_layers()  # compile
    torch.cuda.synchronize()
    run = all_layers
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            all_layers()
        run = g.replay
    run()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    run()
    torch.cuda.synchronize()
    iters = max(3, min(200, int(min_s / max(time.perf_counter() - t0, 1e-6))))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters / layers.n


def reference_fn(layers: Layers):
    meta = layers.meta
    meta.reference_indices()  # built once per step in the engine, shared by the layers

    def fn(kc, vc):
        paged_attention_reference(layers.q, kc.view(-1, NKV, D), vc.view(-1, NKV, D), meta, D**-0.5)
    return fn


def row(case, batch, ctx, name, secs, ref_secs, kv_bytes, flops=None) -> None:
    speed = f"{kv_bytes / secs / 1e9:8.0f} GB/s" if flops is None else f"{flops / secs / 1e12:8.1f} TFLOP/s"
    ratio = ref_secs / secs if ref_secs else float("nan")
    print(f"{case:8s} {batch:5d} {ctx:6d}  {name:30s} {secs * 1e6:10.1f} us  {speed}  {ratio:7.1f}x", flush=True)


def bench_decode(batch: int, ctx: int, splits: list[int], max_ref_kv_tokens: int) -> None:
    """One new token per sequence at position ctx - 1."""
    lay = Layers([1] * batch, [ctx] * batch)
    meta, q, out = lay.meta, lay.q, torch.empty_like(lay.q)
    ref = None
    if batch * ctx <= max_ref_kv_tokens:
        ref = time_per_call(lay, reference_fn(lay), graph=False)
        row("decode", batch, ctx, "reference (eager)", ref, ref, lay.kv_bytes)

    def dec(kc, vc, num_splits=None):
        paged_decode_attention(q, kc, vc, meta.block_tables, meta.seq_lens, D**-0.5, out=out, num_splits=num_splits)

    row("decode", batch, ctx, "triton (eager)", time_per_call(lay, dec, False), ref, lay.kv_bytes)
    default = default_num_splits(batch, NKV, q.device)
    for s in [default] + [s for s in splits if s != default]:
        secs = time_per_call(lay, functools.partial(dec, num_splits=s), True)
        row("decode", batch, ctx, f"triton (graph, splits={s}{'*' if s == default else ''})", secs, ref,
            lay.kv_bytes)


def bench_prefill(case: str, q_lens: list[int], seq_lens: list[int], run_ref: bool) -> None:
    """paged_prefill_attention over one step's chunks; `ctx` in the table is the longest context."""
    lay = Layers(q_lens, seq_lens, max_layers=8)
    meta = lay.meta
    flops = 4 * NH * D * sum(q * (s - q) + q * (q + 1) / 2 for q, s in zip(q_lens, seq_lens))  # QK^T and PV
    batch, ctx = len(q_lens), max(seq_lens)
    ref = None
    if run_ref:
        ref = time_per_call(lay, reference_fn(lay), graph=False)
        row(case, batch, ctx, "reference (eager)", ref, ref, lay.kv_bytes, flops)

    def pre(kc, vc):
        paged_prefill_attention(lay.q, kc, vc, meta.query_start_loc, meta.seq_lens, meta.block_tables,
                                meta.max_query_len, D**-0.5)

    row(case, batch, ctx, "triton prefill (eager)", time_per_call(lay, pre, False), ref, lay.kv_bytes, flops)


def bench_kv_write(n: int) -> None:
    """write_kv_cache against two index_copy_, n new tokens scattered one per block."""
    lay = Layers([1] * n, [BS] * n, max_layers=64)
    k, v = lay.k_new, lay.v_new
    slots = (torch.randperm(n, device="cuda") + 1) * BS

    def copy(kc, vc):
        kc.view(-1, NKV, D).index_copy_(0, slots, k)
        vc.view(-1, NKV, D).index_copy_(0, slots, v)

    def fused(kc, vc):
        write_kv_cache(k, v, kc, vc, slots)

    nbytes = 2 * n * NKV * D * 2
    for graph in (False, True):
        mode = "graph" if graph else "eager"
        ref = time_per_call(lay, copy, graph)
        row("kv-write", n, 0, f"2x index_copy_ ({mode})", ref, ref, nbytes)
        row("kv-write", n, 0, f"write_kv_cache ({mode})", time_per_call(lay, fused, graph), ref, nbytes)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 256])
    ap.add_argument("--ctx", type=int, nargs="+", default=[256, 4096])
    ap.add_argument("--splits", type=int, nargs="*", default=[1, 8, 16, 32], help="decode partitions to sweep")
    ap.add_argument("--max_prefill_tokens", type=int, default=1 << 18, help="skip larger whole-prompt cases")
    ap.add_argument("--max_ref_kv_tokens", type=int, default=1 << 20, help="skip the reference above this")
    a = ap.parse_args()
    import triton

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"{NH} q heads / {NKV} kv heads / D {D}, bf16, block_size {BS}; * = default splits")
    print(f"{'case':8s} {'B':>5s} {'ctx':>6s}  {'kernel':30s} {'per layer':>13s}  {'throughput':>15s}  vs ref")
    for batch in a.batch:
        for ctx in a.ctx:
            bench_decode(batch, ctx, a.splits, a.max_ref_kv_tokens)
            torch.cuda.empty_cache()
            if batch * ctx <= a.max_prefill_tokens:  # whole prompts of ctx tokens
                bench_prefill("prefill", [ctx] * batch, [ctx] * batch, batch * ctx * ctx <= (1 << 26))
                torch.cuda.empty_cache()
            if batch > 1 and ctx >= 512:  # a 512-token chunk at the end of its context beside batch - 1 decodes
                bench_prefill("mixed", [512] + [1] * (batch - 1), [ctx] * batch, batch * ctx <= a.max_ref_kv_tokens)
                torch.cuda.empty_cache()
    for n in (1, 256, 8192):
        bench_kv_write(n)


if __name__ == "__main__":
    main()
