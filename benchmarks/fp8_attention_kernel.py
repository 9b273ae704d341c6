"""Decode attention over an FP8 cache: the repo's table (_table rows), the pointer kernel's tuned form with fp16 dots
(the default) and with bf16 widening (SHARDLLM_FP8_ATTN_F16_DOT=0), and the TMA kernel over both caches in launch
variants (warps, stages, page_chunk: page ids in chunks, so that several pages are in flight), Llama-3-8B heads
(32 q, 8 kv, head_dim 128, block 16), one CUDA card (issue 13).

Each case (batch, mean context) gets one cache larger than the H200's 50 MiB L2 with scattered blocks; contexts are
uniform in [0.8, 1.2] x the mean. Time: triton.testing.do_bench_cudagraph of one call (the tuned launch for the
bucket), us; TB/s counts the K/V bytes read (2 x sum(seq_lens) x 8 x 128 x element size). One JSON line per row.

    python benchmarks/fp8_attention_kernel.py [--cases 512x170 1024x192 500x1500 64x1000 1x1000]
    python benchmarks/fp8_attention_kernel.py --cases 512x170 500x1500 --block_sizes 16 32 64
    python benchmarks/fp8_attention_kernel.py --cases 512x1500 --block_sizes 64 --configs \
        '[{"tma": true, "num_warps": 2, "num_stages": 4}, {"tma": true, "num_warps": 4, "num_stages": 3}]'

--configs: only these DecodeConfig field sets, over an e4m3 cache at each --block_sizes, each row with its largest
difference from the first config's output relative to that output's largest value ("rel_diff"); with --v_transposed
each TMA config of one page a tile also reads V stored transposed (num_blocks, nkv, D, block_size).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import torch

from shardllm.layers.attention.triton_paged import DecodeConfig, paged_decode_attention


def case(batch: int, ctx: int, cache_dtype: torch.dtype, g: torch.Generator, bs: int = 16):
    nkv, d = 8, 128
    lens = (torch.rand(batch, generator=g) * 0.4 + 0.8).mul(ctx).long().clamp(min=1)
    blocks_per = (lens + bs - 1) // bs
    nblocks = int(blocks_per.sum()) + 1
    perm = torch.randperm(nblocks - 1, generator=g) + 1
    tables = torch.zeros(batch, int(blocks_per.max()), dtype=torch.int32)
    o = 0
    for i, n in enumerate(blocks_per.tolist()):
        tables[i, :n] = perm[o:o + n]
        o += n
    kc = (torch.randn(nblocks, bs, nkv, d, device="cuda") * 2).to(cache_dtype)
    vc = torch.randn(nblocks, bs, nkv, d, device="cuda").to(cache_dtype)
    q = torch.randn(batch, 32, d, device="cuda", dtype=torch.bfloat16)
    scales = (torch.tensor(0.5, device="cuda"), torch.tensor(2.0, device="cuda")) \
        if cache_dtype != torch.bfloat16 else (None, None)
    return q, kc, vc, tables.cuda(), lens.int().cuda(), scales


def time_call(q, kc, vc, bt, lens, scales, config=None, v_transposed=False) -> float:
    """us per call (the tuned launch unless `config`), as a CUDA graph replay."""
    import triton

    out = torch.empty_like(q)

    def fn():
        paged_decode_attention(q, kc, vc, bt, lens, 128**-0.5, out=out, k_scale=scales[0], v_scale=scales[1],
                               config=config, v_transposed=v_transposed)

    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(fn, rep=200) * 1e3


def main() -> None:

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=["512x170", "1024x192", "500x1500", "64x1000", "1x1000"])
    ap.add_argument("--block_sizes", type=int, nargs="+", default=[16],
                    help="KV cache block sizes (tokens a page): above 16, only the TMA rows, labelled _bsN (a TMA "
                         "box is one page: 2 KiB of FP8 K per head at 16)")
    ap.add_argument("--configs", type=json.loads, default=None,
                    help="JSON list of DecodeConfig field dicts: time only these (e4m3 cache)")
    ap.add_argument("--v_transposed", action="store_true",
                    help="with --configs: each TMA config of one page a tile also over V stored (num_blocks, nkv, "
                         "D, block_size), the layout the engine does not use yet")
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    if a.configs is not None:
        for c in a.cases:
            for bs in a.block_sizes:
                _config_rows(c, bs, [DecodeConfig(**f) for f in a.configs], g, a.v_transposed)
        return
    for c in a.cases:
        for bs in a.block_sizes:
            if bs != 16:
                _tma_rows(c, bs, g)
        if 16 not in a.block_sizes:
            continue
        batch, ctx = map(int, c.split("x"))
        pointer = DecodeConfig(block_n=32, early_v=True, prefetch_pages=True)  # the pointer kernel's tuned form
        for label, dt, flag, cfg in (
                ("bf16_table", torch.bfloat16, "1", None), ("fp8_table", torch.float8_e4m3fn, "1", None),
                ("fp8_pointer_f16dot", torch.float8_e4m3fn, "1", pointer),
                ("fp8_pointer_bf16dot", torch.float8_e4m3fn, "0", pointer),
                ("fp8_pointer_f16dot_s5", torch.float8_e4m3fn, "1", dataclasses.replace(pointer, num_stages=5)),
                *[(f"{n}_tma_w2_s{st}_pc{pc}", dt_, "1",
                   DecodeConfig(tma=True, num_warps=2, num_stages=st, page_chunk=pc))
                  for n, dt_ in (("bf16", torch.bfloat16), ("fp8", torch.float8_e4m3fn))
                  for st, pc in ((4, 0), (4, 16), (6, 16), (6, 32))],
                *[(f"{n}_tma_w2_s{st}_pc32_pairs", dt_, "1",  # two pages a softmax update (block_n 32)
                   DecodeConfig(tma=True, num_warps=2, num_stages=st, page_chunk=32, block_n=32))
                  for n, dt_ in (("bf16", torch.bfloat16), ("fp8", torch.float8_e4m3fn)) for st in (3, 4)]):
            os.environ["SHARDLLM_FP8_ATTN_F16_DOT"] = flag
            args = case(batch, ctx, dt, g)
            us = time_call(*args, config=cfg)
            nbytes = 2 * int(args[4].sum()) * 8 * 128 * args[1].element_size()
            print(json.dumps(dict(batch=batch, ctx=ctx, kernel=label, us=round(us, 1),
                                  tb_s=round(nbytes / us / 1e6, 2))), flush=True)
            del args
    os.environ.pop("SHARDLLM_FP8_ATTN_F16_DOT", None)


def _config_rows(c: str, bs: int, configs: list[DecodeConfig], g: torch.Generator, v_transposed: bool = False
                 ) -> None:
    """One row per config; with v_transposed, each TMA config of one page a tile also over the same V stored
    (num_blocks, nkv, D, block_size) (row key "v_transposed": true)."""
    batch, ctx = map(int, c.split("x"))
    args = case(batch, ctx, torch.float8_e4m3fn, g, bs)
    vc_t = args[2].permute(0, 2, 3, 1).contiguous() if v_transposed else None
    nbytes = 2 * int(args[4].sum()) * 8 * 128 * args[1].element_size()
    first = None
    for cfg in configs:
        layouts = [False] + ([True] if v_transposed and cfg.tma and cfg.page_chunk == 0
                             and cfg.block_n in (None, bs) else [])
        for vt in layouts:
            run = (args[0], args[1], vc_t if vt else args[2], *args[3:])
            out = torch.empty_like(args[0])
            paged_decode_attention(run[0], run[1], run[2], run[3], run[4], 128**-0.5, out=out, k_scale=run[5][0],
                                   v_scale=run[5][1], config=cfg, v_transposed=vt)
            first = out if first is None else first
            rel = ((out.float() - first.float()).abs().max() / first.float().abs().max()).item()
            us = time_call(*run, config=cfg, v_transposed=vt)
            fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                      if getattr(cfg, f.name) != getattr(DecodeConfig(), f.name)}
            print(json.dumps(dict(batch=batch, ctx=ctx, block_size=bs, config=fields, v_transposed=vt,
                                  us=round(us, 1), tb_s=round(nbytes / us / 1e6, 2), rel_diff=round(rel, 4))),
                  flush=True)


def _tma_rows(c: str, bs: int, g: torch.Generator) -> None:
    """The TMA variants at block size `bs` (the pointer kernel's tuned forms assume 16-token pages)."""
    batch, ctx = map(int, c.split("x"))
    for n, dt in (("bf16", torch.bfloat16), ("fp8", torch.float8_e4m3fn)):
        for st, pc in ((4, 0), (4, 16), (6, 32)):
            args = case(batch, ctx, dt, g, bs)
            us = time_call(*args, config=DecodeConfig(tma=True, num_warps=2, num_stages=st, page_chunk=pc))
            nbytes = 2 * int(args[4].sum()) * 8 * 128 * args[1].element_size()
            print(json.dumps(dict(batch=batch, ctx=ctx, kernel=f"{n}_tma_w2_s{st}_pc{pc}_bs{bs}", us=round(us, 1),
                                  tb_s=round(nbytes / us / 1e6, 2))), flush=True)
            del args


if __name__ == "__main__":
    main()
