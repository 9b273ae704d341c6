"""FP8 activation quantization fused into RMSNorm / SiLU-and-mul (quantization/fp8_fused.py) against the unfused
pair (the bf16 kernel, then quantize_per_token_triton), on one CUDA card, replayed from CUDA graphs.

Llama-3-8B shapes: hidden 4096 (add + RMSNorm, and RMSNorm alone), intermediate 14336 (SiLU-and-mul of the
(M, 28672) gate_up output; the fused kernel with the whole row in registers (one pass), and in chunks of 8192 or
4096 (two passes; fp8_fused.SILU_QUANT_MAX_BLOCK picks the chunk the engine uses, now 16384: one pass)). Per M:
microseconds per call, the speed-up, the fused kernel's DRAM traffic over its time (GB/s, bytes it must move:
inputs read once, outputs written once), and a bit-exactness check of data and scales.

    python benchmarks/fused_act_quant.py [--tokens 512 1024 8192]
"""

from __future__ import annotations

import argparse

import torch

from shardllm.layers import triton_ops
from shardllm.layers.quantization import fp8_fused
from shardllm.layers.quantization.fp8_triton import quantize_per_token_triton

H, INTER = 4096, 14336
DT = torch.bfloat16
REPS = 32


def time_us(fn, iters: int = 20) -> float:
    """Microseconds per call of fn, REPS calls per CUDA graph replay."""
    def reps():
        for _ in range(REPS):
            fn()

    reps()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        reps()
    g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / iters / REPS


def same(a, b) -> str:
    """"True" if bit-exact, else how many codes and scales differ and the largest code distance."""
    (qa, sa), (qb, sb) = a, b
    ca, cb = qa.view(torch.uint8).int(), qb.view(torch.uint8).int()
    if torch.equal(ca, cb) and torch.equal(sa, sb):
        return "True"
    d = (ca - cb).abs()
    return f"codes {int((d > 0).sum())}/{d.numel()} (max step {int(d.max())}), scales {int((sa != sb).sum())}"


def cases(m: int) -> list[tuple[str, object, object, int]]:
    """(name, unfused fn -> (q, s), fused fn -> (q, s), bytes the fused kernel moves)."""
    dev = "cuda"
    x, res = torch.randn(2, m, H, device=dev, dtype=DT)
    w = torch.rand(H, device=dev, dtype=DT) + 0.5
    h = torch.randn(m, 2 * INTER, device=dev, dtype=DT) * 2

    def add_norm_unfused():
        return quantize_per_token_triton(triton_ops.fused_add_rms_norm(x, res, w, 1e-5)[0])

    def add_norm_fused():
        qa, _ = fp8_fused.rms_norm_quant(x, res, w, 1e-5)
        return qa.data, qa.scale

    def norm_unfused():
        return quantize_per_token_triton(triton_ops.rms_norm(x, w, 1e-5))

    def norm_fused():
        qa = fp8_fused.rms_norm_quant(x, None, w, 1e-5)
        return qa.data, qa.scale

    def silu_unfused():
        return quantize_per_token_triton(triton_ops.silu_and_mul(h))

    def silu_fused(max_block):
        def fn():
            qa = fp8_fused.silu_and_mul_quant(h, max_block)
            return qa.data, qa.scale
        return fn

    # bytes: add+norm reads x, residual (bf16), writes residual out (bf16) and q (e4m3); silu reads 2d, writes d
    return [("add+rms_norm", add_norm_unfused, add_norm_fused, m * H * (2 + 2 + 2 + 1)),
            ("rms_norm", norm_unfused, norm_fused, m * H * (2 + 1)),
            ("silu_and_mul 1 pass", silu_unfused, silu_fused(16384), m * INTER * (4 + 1)),
            ("silu_and_mul 2x8192", silu_unfused, silu_fused(8192), m * INTER * (4 + 1)),
            ("silu_and_mul 4x4096", silu_unfused, silu_fused(4096), m * INTER * (4 + 1))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 1024, 8192])
    a = ap.parse_args()
    import triton

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, bf16 -> e4m3, "
          f"H {H}, I {INTER}, CUDA graphs of {REPS} calls")
    print(f"{'M':>5s}  {'op':22s} {'unfused us':>10s} {'fused us':>9s} {'speed-up':>8s} {'fused GB/s':>10s}  exact")
    ok = True
    for m in a.tokens:
        for name, unfused, fused, nbytes in cases(m):
            exact = same(unfused(), fused())
            ok = ok and exact == "True"
            t0, t1 = time_us(unfused), time_us(fused)
            print(f"{m:5d}  {name:22s} {t0:10.1f} {t1:9.1f} {t0 / t1:7.2f}x {nbytes / t1 / 1e3:10.0f}  {exact}",
                  flush=True)
        torch.cuda.empty_cache()
    print("all bit-exact" if ok else "MISMATCH: fused and unfused differ")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
