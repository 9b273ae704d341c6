"""Small-M GEMV sweep on one GPU: Llama-3-8B's (or --model llama-3-70b's) linears at tp 1 and tp 2, M in
{1, 2, 4, 8, 16}, cuBLAS bf16 beside the previous FP8 small-M kernel and a grid of `shardllm.layers.gemv` configs
(FP8 e4m3 and bf16 weights). Prints per shape the best config, its us and its share of 4.2 TB/s (H200 copy
bandwidth, docs/benchmarks.md), then the JSON tables that `shardllm/layers/gemv.py` takes as FP8_GEMV_TABLE /
BF16_GEMV_TABLE (bf16: only where the GEMV beats cuBLAS by --min_gain).

Each time is one CUDA graph of 20 calls replayed (as benchmarks/fp8_gemm.py), the calls cycling over copies of the
weight that together exceed the L2 (60 MB), so no call reads its weight from L2 as no decode step does.
Run: python benchmarks/gemv_sweep.py [--model llama-3-70b] [--budget_s 70] [--ms 1 2 4 8 16] [--tp 1 2]
[--out results.jsonl]
"""

from __future__ import annotations

import argparse
import itertools
import json
import signal
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from shardllm.layers.gemv import GemvConfig, gemv, gemv_reference
from shardllm.layers.quantization.fp8_utils import quantize_per_row

COPY_BW = 4.2e12  # B/s, H200 device-to-device copy (docs/benchmarks.md, KINDS.md)
L2_BYTES = 60 * 2**20
# hidden, intermediate, query heads, kv heads, head_dim (the models' config.json)
MODELS = {"llama-3-8b": (4096, 14336, 32, 8, 128), "llama-3-70b": (8192, 28672, 64, 8, 128)}
VOCAB = 128256


def shapes(tp: int, model: str = "llama-3-8b") -> dict[str, tuple[int, int]]:
    """(N, K) of one rank's linears at tensor-parallel size tp (column-parallel split N, row-parallel K)."""
    hidden, inter, q_heads, kv_heads, head = MODELS[model]
    return {"qkv": ((q_heads + 2 * kv_heads) * head // tp, hidden), "o": (hidden, q_heads * head // tp),
            "gate_up": (2 * inter // tp, hidden), "down": (hidden, inter // tp), "lm_head": (VOCAB // tp, hidden)}


@triton.jit
def _previous_small_m_kernel(x_ptr, w_ptr, s_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym, stride_ys,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             SPLIT_K: tl.constexpr):
    """The FP8 small-M kernel before gemv.py (commit 4921a2f), kept here as the sweep's baseline."""
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, BLOCK_M)
    kk = tl.arange(0, BLOCK_K)
    k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k = k0 + kk
        x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=(m[:, None] < M) & (k[None, :] < k_end),
                    other=0.0)
        w = tl.load(w_ptr + n[None, :].to(tl.int64) * stride_wn + k[:, None],
                    mask=(n[None, :] < N) & (k[:, None] < k_end), other=0.0)
        acc = tl.dot(x, w.to(x.dtype), acc)
    s = tl.load(s_ptr + n, mask=n < N, other=0.0)
    y = acc * s[None, :]
    tl.store(y_ptr + split * stride_ys + m[:, None] * stride_ym + n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=(m[:, None] < M) & (n[None, :] < N))


def previous_fp8(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    m, k = x.shape
    n = w.shape[0]
    split_k = 4 if k >= 8192 and n <= 8192 else 1
    y = torch.empty((split_k, m, n), dtype=x.dtype if split_k == 1 else torch.float32, device=x.device)
    _previous_small_m_kernel[(triton.cdiv(n, 32), split_k)](x, w, s, y, m, n, k, x.stride(0), w.stride(0),
                                                            y.stride(1), y.stride(0), BLOCK_M=16, BLOCK_N=32,
                                                            BLOCK_K=256, SPLIT_K=split_k, num_warps=4, num_stages=4)
    return y[0] if split_k == 1 else y.sum(0).to(x.dtype)


def timed(fns: list, calls: int = 20, replays: int = 3) -> float:
    """us per call: a CUDA graph of `calls` calls cycling over fns (one per weight copy), replayed."""
    for f in fns:
        f()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(calls):
            fns[i % len(fns)]()
    g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / (replays * calls) * 1e3


def candidates(fp8: bool, m: int, n: int, k: int) -> list[GemvConfig]:
    """The grid: FMA form for M <= 4, tl.dot form for every M; split-K only where the N tiles alone leave SMs idle."""
    elt = 1 if fp8 else 2
    out = []
    if m <= 4:
        bm = triton.next_power_of_2(m)
        for bn, bk_bytes, late, warps in itertools.product((4, 8, 16), (256, 512, 1024), (False, True), (4, 8)):
            per_thread = bm * bn * bk_bytes // elt // (32 * warps)  # fp32 products per thread and step
            if per_thread <= 64 and (warps == 4 or per_thread > 32):  # 8 warps only for tiles 4 warps cannot hold
                out.append(GemvConfig(False, bn, bk_bytes // elt, 1, warps, 3, late))
                if bk_bytes <= 512 and per_thread <= 32:  # small tiles: the next one loaded a step ahead too
                    out.append(GemvConfig(False, bn, bk_bytes // elt, 1, warps, 3, late, w_ahead=True))
    for bn, bk_bytes in itertools.product((16, 32, 64), (128, 256, 512)):
        out.append(GemvConfig(True, bn, bk_bytes // elt, 1, 4, 4))
    sm = torch.cuda.get_device_properties(0).multi_processor_count
    grid = []
    for c in out:
        tiles = triton.cdiv(n, c.block_n)
        for s in (1, 2, 4, 8):
            if s == 1 or (tiles * s // 2 < 8 * sm and k // s >= 2 * c.block_k):
                grid.append(c._replace(split_k=s))
    return grid


def _compile_key(fp8: bool, m: int, k: int, cfg: GemvConfig) -> tuple:
    """What Triton compiles a distinct binary for: the constexprs, and ints specialized as 1 (M, split_k)."""
    split = max(1, min(cfg.split_k, triton.cdiv(k, cfg.block_k)))
    bm = 16 if cfg.use_dot else triton.next_power_of_2(m)
    return (fp8, cfg.use_dot, cfg.block_n, cfg.block_k, bm, m == 1, split == 1, k % (split * cfg.block_k) == 0,
            cfg.num_warps, cfg.num_stages, cfg.late_reduce and not cfg.use_dot, cfg.w_ahead and not cfg.use_dot)


def _precompile(jobs: list[tuple[bool, int, int, GemvConfig]]) -> int:
    """Worker process: run each config once on a 64-row weight of the real K (the same specializations as the
    sweep's shapes), so Triton's on-disk cache holds every binary before the timed process needs it."""
    dev = torch.device("cuda")
    done = 0
    for fp8, m, k, cfg in jobs:
        try:
            x = torch.zeros(m, k, device=dev, dtype=torch.bfloat16)
            w = torch.zeros(64, k, device=dev, dtype=torch.float8_e4m3fn if fp8 else torch.bfloat16)
            gemv(x, w, torch.ones(64, device=dev) if fp8 else None, cfg)
            done += 1
        except Exception:  # reported by the timed pass
            pass
    if done:
        torch.cuda.synchronize()
    return done


def precompile(todo: list[tuple[bool, int, int, GemvConfig]], workers: int) -> None:
    """Compile the grid in `workers` processes (ptxas dominates a compile; one process does ~2 a second)."""
    import concurrent.futures
    import multiprocessing

    groups: dict[tuple, tuple] = {}
    for fp8, m, k, cfg in todo:
        groups.setdefault(_compile_key(fp8, m, k, cfg), (fp8, m, k, cfg))
    jobs = list(groups.values())
    chunks = [jobs[i::workers] for i in range(workers)]
    t = time.time()
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as ex:
        done = sum(ex.map(_precompile, [c for c in chunks if c]))
    print(f"precompiled {done}/{len(jobs)} kernels in {workers} processes, {time.time() - t:.1f} s", flush=True)


_WEIGHTS: dict[tuple[int, int], list[torch.Tensor]] = {}
_FP8_WEIGHTS: dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]] = {}


def weights(n: int, k: int, fp8: bool, dev: torch.device) -> tuple[list, list]:
    """Copies of a random (N, K) bf16 weight that together exceed the L2 several times (kept for every M: the
    sweep's shapes take ~10 GB), and the (e4m3, scale) operands of each copy when fp8, else (bf16, None)."""
    if (n, k) not in _WEIGHTS:
        copies = max(2, min(8, -(-4 * L2_BYTES // (n * k))))
        torch.manual_seed(0)
        _WEIGHTS[(n, k)] = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    ws = _WEIGHTS[(n, k)]
    if not fp8:
        return ws, [(w, None) for w in ws]
    if (n, k) not in _FP8_WEIGHTS:
        _FP8_WEIGHTS[(n, k)] = [(q, s.view(-1)) for q, s in map(quantize_per_row, ws)]
    return ws, _FP8_WEIGHTS[(n, k)]


def sweep_one(fp8: bool, n: int, k: int, m: int, dev: torch.device) -> tuple[dict, tuple | None]:
    """Time cuBLAS bf16, the previous FP8 kernel (fp8) and every candidate at one (N, K, M): (row, (us, config))."""
    w_bytes = n * k * (1 if fp8 else 2) + (4 * n if fp8 else 0)
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    ws, args = weights(n, k, fp8, dev)
    row = dict(n=n, k=k, m=m, cublas_bf16_us=round(timed([lambda w=w: F.linear(x, w) for w in ws]), 2))
    if fp8:
        row["fp8_previous_us"] = round(timed([lambda wa=wa: previous_fp8(x, *wa) for wa in args]), 2)
    ref = gemv_reference(x, *args[0])
    best, failed = None, []
    for cfg in candidates(fp8, m, n, k):
        try:
            y = gemv(x, *args[0], cfg).float()
            if float((y - ref).abs().max()) > 2e-2 * float(ref.abs().max()):
                failed.append([int(v) for v in cfg])
                continue
            us = timed([lambda wa=wa, cfg=cfg: gemv(x, *wa, cfg) for wa in args])
        except Exception as e:  # a config Triton cannot compile (registers, shared memory)
            failed.append([*(int(v) for v in cfg), type(e).__name__])
            continue
        if best is None or us < best[0]:
            best = (us, cfg)
    if best is not None:
        us, cfg = best
        row.update(best=[int(v) for v in cfg], best_us=round(us, 2), best_TB_s=round(w_bytes / us / 1e6, 3),
                   best_pct_of_copy_bw=round(100 * w_bytes / (us * 1e-6) / COPY_BW, 1),
                   cublas_pct_of_copy_bw=round(100 * n * k * 2 / (row["cublas_bf16_us"] * 1e-6) / COPY_BW, 1),
                   speedup_vs_cublas=round(row["cublas_bf16_us"] / us, 2))
        if fp8:
            row["speedup_vs_previous"] = round(row["fp8_previous_us"] / us, 2)
    if failed:
        row["failed"] = failed
    return row, best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--dtypes", nargs="+", default=["fp8", "bf16"])
    ap.add_argument("--model", default="llama-3-8b", choices=list(MODELS), help="whose linear shapes")
    ap.add_argument("--budget_s", type=float, default=70, help="stop starting new shapes after this many seconds")
    ap.add_argument("--min_gain", type=float, default=0.03, help="bf16 table: GEMV at least this much faster")
    ap.add_argument("--out", help="also write every row (JSON lines) here")
    ap.add_argument("--compile_workers", type=int, default=12, help="processes that precompile the grid (0: none)")
    a = ap.parse_args()
    t0 = time.time()
    plan = [(dtype == "fp8", m, k, cfg) for tp, dtype in itertools.product(a.tp, a.dtypes)
            for name, (n, k) in shapes(tp, a.model).items() if not (name == "lm_head" and dtype == "fp8")
            for m in a.ms for cfg in candidates(dtype == "fp8", m, n, k)]
    if a.compile_workers:
        try:
            precompile(plan, a.compile_workers)
        except Exception as e:  # the timed pass compiles what is missing
            print(f"precompile failed ({type(e).__name__}: {e}); compiling in the timed pass", flush=True)
    dev = torch.device("cuda")
    print("device", torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__)
    tables: dict[str, dict] = {"fp8": {}, "bf16": {}}
    rows = []
    out = open(a.out, "w") if a.out else None  # noqa: SIM115 - one row a line as they come (a timeout keeps them)
    def stop(*_):  # `timeout` sends SIGTERM: print what was measured
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    skipped: list[str] = []
    try:
        for m in a.ms:  # M = 1 (batch-1 decode) first: a budget cut drops the larger M
            for tp, dtype in itertools.product(a.tp, a.dtypes):
                for name, (n, k) in shapes(tp, a.model).items():
                    if name == "lm_head" and dtype == "fp8":  # the LM head stays bf16 under fp8
                        continue
                    if time.time() - t0 > a.budget_s:
                        skipped.append(f"{dtype}/tp{tp}/{name}/M{m}")
                        continue
                    row, best = sweep_one(dtype == "fp8", n, k, m, dev)
                    row = dict(dtype=dtype, tp=tp, layer=name, **row, elapsed_s=round(time.time() - t0, 1))
                    if best is not None and (dtype == "fp8" or best[0] * (1 + a.min_gain) <= row["cublas_bf16_us"]):
                        tables[dtype].setdefault(f"{n}x{k}", {})[str(m)] = [int(v) for v in best[1]]
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    if out:
                        out.write(json.dumps(row) + "\n")
                        out.flush()
    except KeyboardInterrupt:
        print("interrupted: the tables below hold the shapes measured so far")
    if skipped:
        print(f"budget of {a.budget_s} s spent: {len(skipped)} skipped: {' '.join(skipped)}")
    if out:
        out.close()
    print("\n== per shape: best GEMV beside cuBLAS bf16 (us, % of 4.2 TB/s)")
    for r in rows:
        if "best" in r:
            prev = f" fp8_prev {r['fp8_previous_us']:6.2f}" if "fp8_previous_us" in r else ""
            print(f"{r['dtype']:4} tp{r['tp']} {r['layer']:8} {r['n']:6}x{r['k']:<6} M={r['m']:<2} cublas "
                  f"{r['cublas_bf16_us']:6.2f} ({r['cublas_pct_of_copy_bw']:5.1f}%){prev} best {r['best_us']:6.2f} "
                  f"({r['best_pct_of_copy_bw']:5.1f}%) {r['best']}")
    print("\n== FP8_GEMV_TABLE json\n" + json.dumps(tables["fp8"], separators=(",", ":")))
    print("\n== BF16_GEMV_TABLE json\n" + json.dumps(tables["bf16"], separators=(",", ":")))
    print(f"total {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
