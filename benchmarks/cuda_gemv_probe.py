"""Research probe for issue 13's batch-1 floor: is a plain CUDA FP8 GEMV faster than the engine's Triton GEMV at
M = 1? Not part of the engine: the CUDA source below is compiled on the GPU machine at run time
(torch.utils.cpp_extension.load_inline: nvcc and ninja), once per call.

The CUDA kernel: one warp a weight row; each lane streams 16 FP8 weights a load (128-bit, no L1 allocation), U loads
issued before their math, the bf16 input read through the read-only cache, fp32 accumulation, a warp-shuffle sum,
the per-channel scale applied once. Launch: WARPS warps a block, N / WARPS blocks.

Shapes: Llama-3-8B's four layer linears at tp 1 (FP8 e4m3 weights, bf16 input, per-channel fp32 scales). Each time is
one CUDA graph of 20 calls replayed 10 times, the calls cycling over weight copies that together exceed 3x the L2
(as gemv_sweep.py), PDL off for both kernels (SHARDLLM_PDL=0). Reports us a call, TB/s over the weight bytes, and
the largest error against the fp32 reference relative to its largest value. Beside them, the engine's Triton GEMV
in FMA-form configs past gemv_sweep.py's grid (1-4 rows a program, 1-4 KB K tiles). One JSON line a row, then the
layer's sum for the engine's table, the best CUDA launch and the best Triton config of each shape.

    SHARDLLM_PDL=0 python benchmarks/cuda_gemv_probe.py
    SHARDLLM_PDL=0 python benchmarks/cuda_gemv_probe.py --silu   # the fused SiLU down GEMV's configs only
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import sys

os.environ.setdefault("SHARDLLM_PDL", "0")

import torch  # noqa: E402
from torch.utils.cpp_extension import load_inline  # noqa: E402

from shardllm.layers.gemv import FP8_GEMV_TABLE, GemvConfig, gemv, gemv_reference, nearest_config, table_config  # noqa: E402
from shardllm.layers.quantization.fp8_utils import quantize_per_row  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
LAUNCHES = [(w, u) for w in (4, 8) for u in (2, 4, 8)]
L2_BYTES = 60 * 2**20

CUDA_SRC = r"""
#include <torch/extension.h>
#include <ATen/cuda/CUDAContext.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

__device__ __forceinline__ uint4 ld_stream(const uint4* p) {
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}

__device__ __forceinline__ float dot16(uint4 wv, const __nv_bfloat16* xp, float acc) {
  const uint4 xa = __ldg(reinterpret_cast<const uint4*>(xp));
  const uint4 xb = __ldg(reinterpret_cast<const uint4*>(xp) + 1);
  const uint32_t w32[4] = {wv.x, wv.y, wv.z, wv.w};
  const uint32_t x32[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __half2_raw h0 = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(w32[i] & 0xFFFFu), __NV_E4M3);
    __half2_raw h1 = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)(w32[i] >> 16), __NV_E4M3);
    float2 f0 = __half22float2(*reinterpret_cast<__half2*>(&h0));
    float2 f1 = __half22float2(*reinterpret_cast<__half2*>(&h1));
    float2 x0 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&x32[2 * i]));
    float2 x1 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&x32[2 * i + 1]));
    acc = fmaf(f0.x, x0.x, acc); acc = fmaf(f0.y, x0.y, acc);
    acc = fmaf(f1.x, x1.x, acc); acc = fmaf(f1.y, x1.y, acc);
  }
  return acc;
}

template <int WARPS, int U>
__global__ void __launch_bounds__(WARPS * 32) gemv_fp8_kernel(
    const uint8_t* __restrict__ w, const __nv_bfloat16* __restrict__ x, const float* __restrict__ scale,
    __nv_bfloat16* __restrict__ y, int N, int K) {
  const int lane = threadIdx.x & 31;
  const int row = blockIdx.x * WARPS + (threadIdx.x >> 5);
  if (row >= N) return;
  const uint4* wr = reinterpret_cast<const uint4*>(w + (size_t)row * K);
  const int chunks = K >> 4;
  float acc = 0.f;
  int c = lane;
  for (; c + 32 * (U - 1) < chunks; c += 32 * U) {
    uint4 wv[U];
#pragma unroll
    for (int u = 0; u < U; ++u) wv[u] = ld_stream(wr + c + 32 * u);
#pragma unroll
    for (int u = 0; u < U; ++u) acc = dot16(wv[u], x + (size_t)(c + 32 * u) * 16, acc);
  }
  for (; c < chunks; c += 32) acc = dot16(ld_stream(wr + c), x + (size_t)c * 16, acc);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
  if (lane == 0) y[row] = __float2bfloat16(acc * scale[row]);
}

#define LAUNCH(WW, UU) \
  if (warps == WW && unroll == UU) { \
    gemv_fp8_kernel<WW, UU><<<(N + WW - 1) / WW, WW * 32, 0, stream>>>( \
        reinterpret_cast<const uint8_t*>(w.data_ptr()), reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()), \
        scale.data_ptr<float>(), reinterpret_cast<__nv_bfloat16*>(y.data_ptr()), N, K); \
    return; \
  }

void gemv_fp8(torch::Tensor w, torch::Tensor x, torch::Tensor scale, torch::Tensor y, int64_t warps,
              int64_t unroll) {
  const int N = w.size(0), K = w.size(1);
  TORCH_CHECK(K % 16 == 0 && w.is_contiguous() && x.is_contiguous(), "K % 16, contiguous");
  auto stream = at::cuda::getCurrentCUDAStream();
  LAUNCH(4, 2) LAUNCH(4, 4) LAUNCH(4, 8) LAUNCH(8, 2) LAUNCH(8, 4) LAUNCH(8, 8)
  TORCH_CHECK(false, "no such launch");
}
"""


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


def triton_configs(k: int) -> list[GemvConfig]:
    """FMA-form configs past gemv_sweep.py's grid: 1-4 rows a program and K tiles of 1-4 KB (more bytes in flight
    a thread, as the CUDA kernel's unroll), at most 128 products a thread a step."""
    out = []
    for bn, bk, warps, late in itertools.product((1, 2, 4), (1024, 2048, 4096), (2, 4, 8), (False, True)):
        if bk <= k and bn * bk // (32 * warps) <= 128:
            out.append(GemvConfig(False, bn, bk, 1, warps, 3, late))
    return out


def silu_sweep(n: int = 4096, k: int = 14336) -> None:
    """The fused SiLU down GEMV (gemv(..., silu_input=True), the engine's batch-1 down projection: its input is
    silu(gate) * up formed in registers, recomputed by every program) at the engine's config and over
    silu_configs(); the best as the fused table's entry (SHARDLLM_GEMV_CONFIGS_SILU=, what device_s17_b.sh reads)
    and as a whole SHARDLLM_GEMV_CONFIGS value (SHARDLLM_GEMV_CONFIGS=)."""
    from shardllm.layers.gemv_silu import FUSED_SILU_TABLES

    dev = torch.device("cuda")
    copies = 3 * L2_BYTES // (n * k) + 2
    ws = [quantize(torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.05) for _ in range(copies)]
    gate_up = torch.randn(1, 2 * k, device=dev, dtype=torch.bfloat16)
    act = (torch.nn.functional.silu(gate_up[:, :k].float()) * gate_up[:, k:].float()).to(torch.bfloat16)
    ref = gemv_reference(act, *ws[0]).float()
    calls = [ws[i % copies] for i in range(20)]
    engine = table_config(FUSED_SILU_TABLES["fp8"], n, k, 1)
    best = (float("inf"), None)
    for c in [engine] + silu_configs():
        try:
            err = float((gemv(gate_up, *ws[0], c, silu_input=True).float() - ref).abs().max() / ref.abs().max())
            t = graph_us(functools.partial(run_triton, gate_up, calls, c, True))
        except Exception as e:  # a config Triton cannot compile (registers, shared memory)
            print(json.dumps({"shape": "down silu", "config": list(c), "error": str(e)[:200]}))
            continue
        print(json.dumps({"shape": "down silu", "kernel": "engine" if c is engine else "triton", "config": list(c),
                          "us": round(t, 2), "tb_s": round(n * k / 1e3 / t, 3), "rel_err": round(err, 5)}),
              flush=True)
        if err < 1e-2:
            best = min(best, (t, [int(v) for v in c]))
    print(json.dumps({"best_silu": best[1], "us": round(best[0], 2)}))
    if best[1] is not None:  # the fused table's entry, and a SHARDLLM_GEMV_CONFIGS value holding only it
        entry = {f"{n}x{k}": {"1": best[1]}}
        print("SHARDLLM_GEMV_CONFIGS_SILU=" + json.dumps(entry, separators=(",", ":")))
        print("SHARDLLM_GEMV_CONFIGS=" + json.dumps({"fp8_silu": entry}, separators=(",", ":")))


def silu_configs() -> list[GemvConfig]:
    out = []
    for bn, bk, warps, late in itertools.product((1, 2, 4, 8, 16), (1024, 2048, 4096), (2, 4, 8), (False, True)):
        if bn * bk // (32 * warps) <= 128:
            out.append(GemvConfig(False, bn, bk, 1, warps, 3, late))
    return out


def main() -> None:
    if "--silu" in sys.argv:
        return silu_sweep()
    decl = "void gemv_fp8(torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor, int64_t, int64_t);"
    ext = load_inline("shardllm_cuda_gemv_probe", cpp_sources=decl, cuda_sources=CUDA_SRC, functions=["gemv_fp8"],
                      extra_cuda_cflags=["-O3", "-gencode=arch=compute_90,code=sm_90"], verbose=False)
    dev = torch.device("cuda")
    sums = {"engine": 0.0, "cuda_best": 0.0, "triton_best": 0.0}
    best_cfgs = {}
    for name, (n, k) in SHAPES.items():
        copies = 3 * L2_BYTES // (n * k) + 2
        ws = [quantize(torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.05) for _ in range(copies)]
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        ref = gemv_reference(x, *ws[0]).float()
        calls = [ws[i % copies] for i in range(20)]
        y = torch.empty(1, n, device=dev, dtype=torch.bfloat16)
        gb = n * k / 1e9

        def report(kernel, one, many, extra=None, ref=ref, name=name, gb=gb):
            err = float((one().float() - ref).abs().max() / ref.abs().max())
            t = graph_us(many)
            print(json.dumps({"shape": name, "kernel": kernel, "us": round(t, 2), "tb_s": round(gb / t * 1e3, 3),
                              "rel_err": round(err, 5), **(extra or {})}), flush=True)
            return t if err < 1e-2 else float("inf")

        cfg = table_config(FP8_GEMV_TABLE, n, k, 1) or nearest_config(FP8_GEMV_TABLE, n, k, 1)
        sums["engine"] += report("engine triton", functools.partial(gemv, x, *ws[0], cfg),
                                 functools.partial(run_triton, x, calls, cfg), {"config": str(cfg)})
        sums["cuda_best"] += min(
            report(f"cuda warps {wp} unroll {u}", functools.partial(run_cuda, ext, x, [ws[0]], y, wp, u),
                   functools.partial(run_cuda, ext, x, calls, y, wp, u)) for wp, u in LAUNCHES)
        best = (float("inf"), None)
        for c in triton_configs(k):
            try:
                t = report("triton", functools.partial(gemv, x, *ws[0], c),
                           functools.partial(run_triton, x, calls, c), {"config": list(c)})
            except Exception as e:  # a config Triton cannot compile (registers, shared memory)
                print(json.dumps({"shape": name, "config": list(c), "error": str(e)[:200]}))
                continue
            if t < best[0]:
                best = (t, list(c))
        sums["triton_best"] += best[0]
        best_cfgs[name] = best[1]
        del ws
    layer_gb = sum(n * k for n, k in SHAPES.values()) / 1e9
    print(json.dumps({"layer_us": {k: round(v, 2) for k, v in sums.items()},
                      "layer_tb_s": {k: round(layer_gb / v * 1e3, 3) for k, v in sums.items()},
                      "triton_best_configs": best_cfgs}))


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w8, sc = quantize_per_row(w)
    return w8.contiguous(), sc.reshape(-1).float().contiguous()


def run_triton(x, calls, cfg, silu_input=False):
    return [gemv(x, w, s, cfg, silu_input=silu_input) for w, s in calls][-1]


def run_cuda(ext, x, calls, y, warps, unroll):
    for w, s in calls:
        ext.gemv_fp8(w, x, s, y, warps, unroll)
    return y


if __name__ == "__main__":
    main()
