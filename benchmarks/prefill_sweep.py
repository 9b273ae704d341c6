"""Launch variants of the prefill attention kernel (triton_prefill.PrefillConfig) on one CUDA card (issue 13).

Llama-3-8B heads (32 q, 8 kv, head_dim 128), bf16 queries, an e4m3 cache of 64-token pages in the layout the engine
uses on sm90+ (V transposed) and the standard one. Cases are whole prefill steps of 16k tokens: "16x1000" (16 fresh
prompts of 1,000 tokens: a 500 x 1000/1000 run's prefill step) and "128x128" (1000 x 128/128's); "NxQ+C" is N chunks
of Q tokens each after C cached ones (a long prompt's later chunk, e.g. 2x4096+4096), which the engine's choice of
launch (prefill_config) reads by the chunk's length alone. Every config's
output is compared with the default launch's (max abs difference), then timed as a CUDA graph of 10 calls (us a
call, TFLOP/s of the causal product: 4 x D x heads x sum over sequences of q_len x (ctx_len + (q_len + 1) / 2)).
Prints one JSON line per (case, layout, config), then per case and layout the best config beside PrefillConfig() and
the engine's default for the case (triton_prefill.prefill_config), and the SHARDLLM_PREFILL_CONFIG value that
selects it. On an H200 (eleventh session's profile) the default launch took
42-48 ms of a ~250 ms 16k-token prefill step of Llama-3-8B fp8 (32 layers): about 1.3-1.5 ms a layer.

    python benchmarks/prefill_sweep.py [--cases 16x1000 128x128 32x512 2x4096+4096] [--budget_s 120] [--configs JSON]
    python benchmarks/prefill_sweep.py --cases 16x1000 --configs '[{}]' --flash   # beside torch's FlashAttention-2
    TRITON_INTERPRET=1 python benchmarks/prefill_sweep.py --smoke   # CPU: a tiny case, exercises the code only
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from shardllm.layers.attention.triton_prefill import (
    PrefillConfig,
    paged_prefill_attention,
    parse_prefill_config,
    prefill_config,
)

NH, NKV, D, BS = 32, 8, 128, 64
# PrefillConfig() (the reference launch) first, then one change at a time, then combinations; cut short by the time
# budget. The engine's defaults (prefill_config: STANDARD, V_T_LONG, V_T_SHORT) are among them.
GRID = [
    PrefillConfig(),
    PrefillConfig(split_causal=True),
    PrefillConfig(rows=256),
    PrefillConfig(rows=256, split_causal=True),
    PrefillConfig(rows=256, split_causal=True, num_stages=3),
    PrefillConfig(block_n=32, split_causal=True),
    PrefillConfig(rows=256, block_n=32, split_causal=True),
    PrefillConfig(split_causal=True, num_stages=2),
    PrefillConfig(split_causal=True, num_stages=4),
    PrefillConfig(rows=256, split_causal=True, num_stages=4),
    PrefillConfig(rows=64, split_causal=True),
    PrefillConfig(block_n=128, split_causal=True),
    PrefillConfig(split_causal=True, num_warps=4),
    PrefillConfig(rows=256, split_causal=True, num_warps=4),
]


def parse_case(text: str) -> tuple[int, int, int]:
    """'NUM_SEQSxQ_LEN' (fresh prompts) or 'NUM_SEQSxQ_LEN+CTX' (chunks of Q_LEN tokens after CTX cached ones: a long
    prompt's later chunk) -> (num_seqs, q_len, ctx).

    Raises:
        ValueError: not of that form, or a count below 1 (ctx below 0).
    """
    try:
        seqs, rest = text.lower().split("x")
        q_len, _, ctx = rest.partition("+")
        out = int(seqs), int(q_len), int(ctx or 0)
    except ValueError:
        raise ValueError(f"--cases: NUM_SEQSxQ_LEN or NUM_SEQSxQ_LEN+CTX expected (16x1000, 2x2048+6144), got "
                         f"{text!r}") from None
    if min(out[:2]) < 1 or out[2] < 0:
        raise ValueError(f"--cases: counts must be positive (context >= 0), got {text!r}")
    return out


def build(num_seqs: int, q_len: int, vt: bool, device: str, g: torch.Generator, ctx: int = 0):
    """q (N, NH, D) bf16, the caches (V transposed where vt), the step's tables: chunks of q_len tokens after ctx
    cached ones (0: fresh prompts) on scattered pages."""
    pages_per_seq = -(-(ctx + q_len) // BS)
    num_blocks = 1 + num_seqs * pages_per_seq
    ids = (torch.randperm(num_blocks - 1, generator=g) + 1).view(num_seqs, pages_per_seq).to(torch.int32)
    shape = (num_blocks, BS, NKV, D)
    kc = (torch.randn(shape, generator=g) * 2).to(torch.float8_e4m3fn)
    vc = (torch.randn(shape, generator=g) * 2).to(torch.float8_e4m3fn)
    q = torch.randn(num_seqs * q_len, NH, D, generator=g).to(torch.bfloat16)
    qsl = torch.arange(num_seqs + 1, dtype=torch.int32) * q_len
    seq_lens = torch.full((num_seqs,), ctx + q_len, dtype=torch.int32)
    kc, vc, q, ids, qsl, seq_lens = (t.to(device) for t in (kc, vc, q, ids, qsl, seq_lens))
    if vt:
        vc = vc.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # stored (nb, nkv, D, bs)
    return q, kc, vc, qsl, seq_lens, ids


def timed(fn, device: str) -> float:
    """us a call: a CUDA graph of 10 calls replayed 5 times; on CPU one wall-clock call."""
    if device != "cuda":
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e6
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(10):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / 50


def flash_row(name: str, num_seqs: int, q_len: int, flops: float, device: str) -> dict:
    """One JSON row: flash_prefill.flash_prefill on num_seqs fresh prompts of q_len tokens (bf16 q, k, v)."""
    from shardllm.layers.attention import flash_prefill

    g = torch.Generator().manual_seed(q_len)
    q = torch.randn(num_seqs * q_len, NH, D, generator=g).to(device, torch.bfloat16)
    k, v = (torch.randn(num_seqs * q_len, NKV, D, generator=g).to(device, torch.bfloat16) for _ in range(2))
    cu = (torch.arange(num_seqs + 1, dtype=torch.int32) * q_len).to(device)
    us = timed(lambda: flash_prefill.flash_prefill(q, k, v, cu, q_len, D ** -0.5), device)
    row = dict(case=name, layout="flash (bf16 k, v of the step)", us=round(us, 1), tflop_s=round(flops / us / 1e6, 1))
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", nargs="+", default=["16x1000", "128x128"],
                    help="NUM_SEQSxQ_LEN fresh prompts, or NUM_SEQSxQ_LEN+CTX chunks after CTX cached tokens")
    ap.add_argument("--layouts", nargs="+", default=["vt", "standard"], choices=["vt", "standard"])
    ap.add_argument("--budget_s", type=float, default=120, help="stop starting configs after this many seconds")
    ap.add_argument("--configs", default=None, help="a JSON list of PrefillConfig field dicts instead of the grid")
    ap.add_argument("--flash", action="store_true",
                    help="also time torch's FlashAttention-2 varlen kernel on fresh-prompt cases "
                         "(SHARDLLM_FLASH_PREFILL's path: q, k, v bf16 as the step computed them, no cache read)")
    ap.add_argument("--smoke", action="store_true", help="CPU under TRITON_INTERPRET=1: a tiny case, 2 configs")
    a = ap.parse_args(argv)
    if a.flash and a.smoke:
        ap.error("--flash needs CUDA (torch's FlashAttention kernel): not with --smoke")
    device = "cpu" if a.smoke else "cuda"
    grid = [parse_prefill_config(json.dumps(c)) for c in json.loads(a.configs)] if a.configs else GRID
    if grid[0] != PrefillConfig():
        grid = [PrefillConfig()] + grid  # the reference launch
    try:
        cases = [parse_case(c) for c in a.cases]
    except ValueError as e:
        ap.error(str(e))
    cases = [(2, 70, 0)] if a.smoke and a.cases == ap.get_default("cases") else cases
    if a.smoke:
        grid = grid[:2]
    print(f"{torch.cuda.get_device_name() if device == 'cuda' else 'cpu (smoke)'}  torch {torch.__version__}")
    t0 = time.perf_counter()
    best, rows = {}, []
    for num_seqs, q_len, ctx in cases:
        flops = 4 * D * NH * num_seqs * q_len * (ctx + (q_len + 1) / 2)
        name = f"{num_seqs}x{q_len}" + (f"+{ctx}" if ctx else "")
        for layout in a.layouts:
            step = build(num_seqs, q_len, layout == "vt", device, torch.Generator().manual_seed(q_len), ctx)
            ref = None
            for cfg in grid:
                if time.perf_counter() - t0 > a.budget_s and ref is not None:
                    print(json.dumps(dict(case=name, layout=layout, config=cfg._asdict(),
                                          skipped="budget")))
                    continue

                def run(cfg=cfg, step=step, q_len=q_len):
                    return paged_prefill_attention(*step, q_len, D ** -0.5, config=cfg)

                try:
                    out = run().float()
                    us = timed(run, device)
                except Exception as e:  # a launch this GPU cannot compile (shared memory, registers): the next one
                    if ref is None:
                        raise  # the default launch must run
                    print(json.dumps(dict(case=name, layout=layout, config=cfg._asdict(),
                                          error=f"{type(e).__name__}: {str(e)[:200]}")), flush=True)
                    continue
                ref = out if ref is None else ref
                row = dict(case=name, layout=layout, config=cfg._asdict(), us=round(us, 1),
                           tflop_s=round(flops / us / 1e6, 1), max_diff=float((out - ref).abs().max()))
                print(json.dumps(row), flush=True)
                rows.append(row)
                key = (row["case"], layout)
                if cfg == PrefillConfig():
                    best.setdefault(key, {})["default_us"] = row["us"]
                if cfg == prefill_config(layout == "vt", q_len):
                    best.setdefault(key, {})["engine_us"] = row["us"]
                if row["max_diff"] < 2e-2 and row["us"] < best.get(key, {}).get("us", float("inf")):
                    best.setdefault(key, {}).update(us=row["us"], config=cfg)
        if a.flash and not ctx:  # the same fresh prompts through FlashAttention over their own bf16 k, v
            rows.append(flash_row(name, num_seqs, q_len, flops, device))
    for (case, layout), b in best.items():
        changed = {k: v for k, v in b["config"]._asdict().items() if v != PrefillConfig._field_defaults[k]}
        print(f"{case} {layout}: PrefillConfig() {b.get('default_us')} us, the engine's default (prefill_config) "
              f"{b.get('engine_us')} us, best {b['us']} us with "
              f"SHARDLLM_PREFILL_CONFIG='{json.dumps(changed)}'")
    return rows


if __name__ == "__main__":
    main()
