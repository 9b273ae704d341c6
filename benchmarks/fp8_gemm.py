"""FP8 GEMM on one GPU: torch._scaled_mm row-wise (with per-token activation quantization) beside bf16 F.linear,
at decode (small M) and prefill sizes of Llama-3-8B's linears; also checks each against the dequantized twin."""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F

from shardllm.layers.quantization.fp8_triton import (
    FP8_GEMV_MAX_M,
    GEMV_MAX_M,
    fp8_small_m_linear,
    quantize_per_token_triton,
    small_m_config,
    triton_fp8_ok,
)
from shardllm.layers.quantization.fp8_utils import (
    dequantize,
    fp8_recipes,
    quantize_per_row,
    quantize_per_tensor,
    scaled_mm_rowwise,
    scaled_mm_rowwise_by_tensorwise,
)

# (N, K) of each linear, per rank: Llama-3-8B at tp 1 (the default) and Llama-3-70B at tp 2 (--shapes)
SHAPE_SETS = {
    "llama-3-8b": {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)},
    "llama-3-70b-tp2": {"qkv": (5120, 8192), "o": (8192, 4096), "gate_up": (28672, 8192), "down": (8192, 14336)},
}
SHAPES = dict(SHAPE_SETS["llama-3-8b"])


def timed(fn, iters: int = 50) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(10):
            fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters // 10):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters * 1e3  # us


def recipe_rows(ms: list[int], dev: torch.device) -> None:
    """One JSON line per (layer, M): what each _scaled_mm recipe costs and how far it lands from the fp32 product of
    the dequantized operands (rel_err: max |y - twin| / max |twin|). TFLOP/s counts 2 x M x N x K."""
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        wq, ws = quantize_per_row(w)
        wt_q, wt_s = quantize_per_tensor(w)
        for m in ms:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            xq, xs = quantize_per_row(x)
            xt_q, xt_s = quantize_per_tensor(x)
            twin_row = dequantize(xq, xs) @ dequantize(wq, ws).t()
            twin_t = xt_q.float() @ wt_q.float().t() * (xt_s * wt_s)
            row = {"layer": name, "m": m, "bf16_us": round(timed(lambda x=x, w=w: F.linear(x, w)), 1)}
            cases = {"rowwise": (xq, wq, xs, ws.view(1, -1), twin_row), "tensorwise": (xt_q, wt_q, xt_s, wt_s, twin_t)}
            for recipe, (aq, bq, sa, sb, twin) in cases.items():
                for fast in (False, True):
                    def fn(aq=aq, bq=bq, sa=sa, sb=sb, fast=fast):
                        return torch._scaled_mm(aq, bq.t(), sa, sb, out_dtype=torch.bfloat16, use_fast_accum=fast)

                    key = recipe + ("_fast" if fast else "")
                    us = timed(fn)
                    err = float((fn().float() - twin).abs().max() / twin.abs().max())
                    row[key + "_us"] = round(us, 1)
                    row[key + "_tflops"] = round(2 * m * n * k / (us * 1e-6) / 1e12)
                    row[key + "_rel_err"] = f"{err:.1e}"
            wsr = ws.view(1, -1)
            # the row-wise product through the per-tensor kernel + scale epilogue (fp32 product, or bf16 in place)
            for fast, fp32 in ((False, True), (True, True), (True, False)):
                def tw_fn(xq=xq, wq=wq, xs=xs, wsr=wsr, fast=fast, fp32=fp32):
                    return scaled_mm_rowwise_by_tensorwise(xq, wq, xs, wsr, torch.bfloat16, use_fast_accum=fast,
                                                           fp32_product=fp32)

                key = "rowwise_by_tw" + ("" if fp32 else "_bf16") + ("_fast" if fast else "")
                us = timed(tw_fn)
                row[key + "_us"] = round(us, 1)
                row[key + "_rel_err"] = f"{float((tw_fn().float() - twin_row).abs().max() / twin_row.abs().max()):.1e}"
            if m <= GEMV_MAX_M and triton_fp8_ok(dev):  # the weight-streaming GEMV (the engine's up to
                # SHARDLLM_FP8_GEMV_MAX_M rows), and the per-token quantization the GEMM routes need before them
                row["gemv_us"] = round(timed(lambda x=x, wq=wq, ws=ws: fp8_small_m_linear(x, wq, ws.view(-1))), 1)
                row["quant_us"] = round(timed(lambda x=x: quantize_per_token_triton(x)), 1)
            print(json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ms", type=int, nargs="+", default=[1, 8, 16, 32, 128, 512, 4096])
    ap.add_argument("--sweep_small_m", action="store_true", help="time every small-M kernel config at M=1")
    ap.add_argument("--recipes", action="store_true",
                    help="per shape and M: bf16, _scaled_mm row-wise and per-tensor and the row-wise product through "
                         "the per-tensor kernel (fp8_utils.scaled_mm_rowwise_by_tensorwise), each with and without "
                         "use_fast_accum: us, TFLOP/s and the max error against the dequantized twin; at M <= "
                         "GEMV_MAX_M (16) also the small-M GEMV (the engine's up to SHARDLLM_FP8_GEMV_MAX_M rows) "
                         "and the per-token quantization the GEMMs need (quant_us)")
    ap.add_argument("--shapes", choices=sorted(SHAPE_SETS), default="llama-3-8b",
                    help="the linears' per-rank (N, K) to time (default: Llama-3-8B at tp 1)")
    a = ap.parse_args()
    SHAPES.clear()
    SHAPES.update(SHAPE_SETS[a.shapes])
    dev = torch.device("cuda")
    print("recipes", sorted(fp8_recipes(dev)), torch.cuda.get_device_name(), torch.__version__)
    if a.recipes:
        recipe_rows(a.ms, dev)
        return
    if a.sweep_small_m:
        for name, (n, k) in SHAPES.items():
            wq, ws = quantize_per_row(torch.randn(n, k, device=dev) * 0.02)
            x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
            row = {"layer": name, "default": small_m_config(n, k)}
            for cfg in itertools.product((16, 32, 64), (128, 256, 512), (1, 2, 4)):
                us = timed(lambda cfg=cfg, x=x, wq=wq, ws=ws: fp8_small_m_linear(x, wq, ws.view(-1), cfg))
                row["/".join(map(str, cfg))] = round(us, 1)
            best = min((v, c) for c, v in row.items() if "/" in c)
            row["best"] = best[1]
            row["best_GB_s"] = round(n * k / (best[0] * 1e-6) / 1e9)
            print(json.dumps(row))
        return
    for name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        wq, ws = quantize_per_row(w)
        wsr = ws.view(1, -1)
        for m in a.ms:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            bf16 = timed(lambda x=x, w=w: F.linear(x, w))
            xq, xs = quantize_per_row(x)
            gemm = timed(lambda xq=xq, xs=xs, wq=wq, wsr=wsr: scaled_mm_rowwise(xq, wq, xs, wsr, torch.bfloat16))

            def full_fn(x=x, wq=wq, wsr=wsr):
                q, s = quantize_per_row(x)  # the per-token activation quantization the layer runs
                return scaled_mm_rowwise(q, wq, s, wsr, torch.bfloat16)

            full = timed(full_fn)
            row = {}
            if triton_fp8_ok(dev):
                def kernels_fn(x=x, wq=wq, ws=ws, wsr=wsr):
                    if x.shape[0] <= FP8_GEMV_MAX_M:
                        return fp8_small_m_linear(x, wq, ws.view(-1))
                    q, s = quantize_per_token_triton(x)
                    return scaled_mm_rowwise(q, wq, s, wsr, torch.bfloat16)

                row["fp8_triton_us"] = round(timed(kernels_fn), 1)
                row["speedup_triton"] = round(bf16 / row["fp8_triton_us"], 2)
            y = scaled_mm_rowwise(xq, wq, xs, wsr, torch.bfloat16).float()
            twin = dequantize(xq, xs) @ dequantize(wq, ws).t()
            err = float((y - twin).abs().max() / twin.abs().max())
            weight_gb_s = n * k / (gemm * 1e-6) / 1e9  # fp8 weight bytes streamed per second
            print(json.dumps(dict(layer=name, m=m, bf16_us=round(bf16, 1), fp8_gemm_us=round(gemm, 1),
                                  fp8_with_act_quant_us=round(full, 1), speedup=round(bf16 / full, 2),
                                  fp8_weight_GB_s=round(weight_gb_s), rel_err_vs_twin=f"{err:.1e}", **row)))


if __name__ == "__main__":
    main()
