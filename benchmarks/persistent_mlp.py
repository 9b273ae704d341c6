"""The persistent batch-1 MLP (shardllm/layers/persistent_mlp.py) against the engine's three launches, on one GPU:
Llama-3-8B's (or --model llama-3-70b's, tp 1) MLP at M = 1, fp8 weights, us per MLP and the weights' share of the
copy bandwidth (4.2 TB/s on an H200, docs/benchmarks.md).

    python benchmarks/persistent_mlp.py                    # 8B: the engine's path, then the persistent kernel's
    python benchmarks/persistent_mlp.py --progs 132 264 528 --warps 4 8
    python benchmarks/persistent_mlp.py --variants 8,512,8,1024:01:4:2:3 8,512,8,512:00:4:1:3

The engine's path is what a decode step at batch 1 runs: the fused residual add + RMSNorm kernel, the gate_up
GEMV, the SiLU-fused down GEMV, with the engine's tuned configs and PDL (on sm90+ unless SHARDLLM_PDL=0); beside it
the same with the norm folded into gate_up's GEMV (two launches), which tells the launch saved from the barrier's
gain. Each time
is one CUDA graph of `--layers` MLPs, each with its own weights (together past the L2, as in a model), replayed;
the persistent rows first check that their output equals the two-launch form's. One JSON line per row.
"""

from __future__ import annotations

import argparse
import functools
import json

import torch
from gemv_sweep import timed  # (benchmarks/ is this script's first sys.path entry)

from shardllm.layers import triton_ops
from shardllm.layers.gemv import FP8_GEMV_TABLE, GemvConfig, NormPrologue, gemv, table_config
from shardllm.layers.gemv_silu import _fused_config
from shardllm.layers.persistent_mlp import persistent_mlp
from shardllm.layers.quantization.fp8_utils import quantize_per_row

COPY_BW = 4.2e12
MODELS = {"llama-3-8b": (4096, 14336), "llama-3-70b": (8192, 28672)}


def graph_us(fn, layers: int) -> float:
    """us per layer: a CUDA graph of fn(0) .. fn(layers - 1), replayed (gemv_sweep.timed)."""
    return timed([functools.partial(fn, i) for i in range(layers)], calls=layers, replays=5)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3-8b", choices=list(MODELS))
    ap.add_argument("--layers", type=int, default=16, help="MLPs with their own weights in one graph")
    ap.add_argument("--progs", type=int, nargs="*", default=[], help="num_progs to try beside the default")
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--tiles", default="8,512,16,1024", help="gate_up BLOCK_N,BLOCK_K, down BLOCK_N,BLOCK_K")
    ap.add_argument("--variants", nargs="*", default=[],
                    help="persistent configs TILES:LATE:WARPS:AHEAD:STAGES[:TMA], e.g. 8,512,8,1024:01:4:2:3 or "
                         "32,256,32,256:00:4:1:6:1 (LATE: gate_up's then down's late reduce, 0/1; TMA 1: weights "
                         "through TMA descriptors); default: --tiles, late 01, each of --warps, ahead 1, 3 stages, "
                         "then the first without the cooperative launch")
    a = ap.parse_args()
    h, inter = MODELS[a.model]
    dev = torch.device("cuda")
    torch.manual_seed(0)
    x = torch.randn(1, h, device=dev, dtype=torch.bfloat16)
    res = torch.randn(1, h, device=dev, dtype=torch.bfloat16)
    nw = torch.rand(h, device=dev, dtype=torch.bfloat16) + 0.5
    ws = []
    for _ in range(a.layers):
        wg, sg = quantize_per_row(torch.randn(2 * inter, h, device=dev))
        wd, sd = quantize_per_row(torch.randn(h, inter, device=dev) / 8)
        ws.append((wg, sg.view(-1), wd, sd.view(-1)))
    weight_bytes = 3 * h * inter
    cfg_gu = table_config(FP8_GEMV_TABLE, 2 * inter, h, 1)
    cfg_d = _fused_config(ws[0][2], 1)  # the engine's SiLU-fused down config

    def engine(i):
        wg, sg, wd, sd = ws[i]
        normed, _ = triton_ops.fused_add_rms_norm(x, res, nw, 1e-5)
        return gemv(gemv(normed, wg, sg, cfg_gu), wd, sd, cfg_d, silu_input=True)

    def row(name, us, **kw):
        print(json.dumps({"row": name, "us_per_mlp": round(us, 2), "tb_s": round(weight_bytes / us / 1e6, 3),
                          "of_copy_bw": round(weight_bytes / us / 1e-6 / COPY_BW, 3), **kw}), flush=True)

    row("engine", graph_us(engine, a.layers), gate_up=str(cfg_gu), down=str(cfg_d))
    r_out = torch.empty_like(x)

    def engine_norm_fused(i):  # the norm folded into gate_up's GEMV (SHARDLLM_GEMV_FUSED_NORM's form): two launches
        wg, sg, wd, sd = ws[i]
        gu = gemv(x, wg, sg, cfg_norm, norm=NormPrologue(res, nw, 1e-5, r_out))
        return gemv(gu, wd, sd, cfg_d, silu_input=True)

    cfg_norm = cfg_gu if not cfg_gu.use_dot else GemvConfig(False, 8, 512, 1, 4, 3, False)
    row("engine_norm_fused", graph_us(engine_norm_fused, a.layers), gate_up=str(cfg_norm))
    from shardllm.layers import persistent_mlp as pm

    bar = pm.new_barrier(dev)
    variants = [v.split(":") for v in a.variants] or [[a.tiles, "01", str(w), "1", "3"] for w in a.warps]
    for n_v, (tiles_s, late_s, warps_s, ahead_s, stages_s, *tma_s) in enumerate(variants):
        tiles = tuple(int(v) for v in tiles_s.split(","))
        late = tuple(c == "1" for c in late_s)
        warps, ahead, stages = int(warps_s), int(ahead_s), int(stages_s)
        tma = tma_s == ["1"]
        kw = dict(late=late, num_warps=warps, ahead=ahead, num_stages=stages, tma=tma)
        wg, sg, wd, sd = ws[0]
        want, _ = persistent_mlp(x, res, nw, 1e-5, wg, sg, wd, sd, None, tiles, **kw)
        coops = [True, False] if n_v == 0 and not a.variants else [True]
        for cooperative in coops:
            pm.COOPERATIVE = cooperative
            for progs in [None] + (a.progs if cooperative else []):
                desc = dict(tiles=tiles_s, late=late_s, warps=warps, ahead=ahead, stages=stages, tma=int(tma),
                            progs=progs or "resident", cooperative=cooperative)
                try:
                    got, _ = persistent_mlp(x, res, nw, 1e-5, wg, sg, wd, sd, bar, tiles, num_progs=progs, **kw)
                    torch.cuda.synchronize()
                    same = bool(torch.equal(got, want))

                    def fused(i, progs=progs, tiles=tiles, kw=kw):
                        wg, sg, wd, sd = ws[i]
                        return persistent_mlp(x, res, nw, 1e-5, wg, sg, wd, sd, bar, tiles, num_progs=progs, **kw)

                    row("persistent", graph_us(fused, a.layers), **desc, equal_to_two_launches=same,
                        resident=max(pm._compiled.values()))
                except Exception as e:  # one variant failing says nothing of the others
                    print(json.dumps({"row": "persistent", **desc, "error": f"{type(e).__name__}: {str(e)[:200]}"}),
                          flush=True)
            pm._compiled.clear()  # (the next variant's resident count alone)
    print(json.dumps({"sms": torch.cuda.get_device_properties(dev).multi_processor_count}))


if __name__ == "__main__":
    main()
