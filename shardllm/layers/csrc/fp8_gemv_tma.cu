// Batch-1 FP8 GEMV for Hopper (sm_90a): y[n] = bf16(scale[n] * sum_k w[n, k] * x[k]), w (N, K) e4m3, x (K) bf16.
// Compiled at run time by NVRTC (shardllm/layers/cuda_gemv.py), one module per configuration; no CUDA headers.
//
// Why a kernel of its own: at batch 1 a decode step is ~270 kernels, and each Triton GEMV starts streaming its
// weights only after the kernel before it has finished (a PDL program may load before its wait, but only what
// its registers hold). Here one block an SM owns a contiguous run of weight rows and streams it into a ring of
// STAGES shared-memory stages with bulk asynchronous copies (cp.async.bulk, completion on an mbarrier): the first
// STAGES stages are requested BEFORE griddepcontrol.wait, so under programmatic dependent launch the weights flow
// from HBM while the kernels before (norm, attention) still run, and no register holds a load in flight.
//
// Each stage holds RS whole rows (RS * K bytes). The block's WARPS warps split a stage: warp w takes row w / WPR
// and K slice w % WPR (WPR = WARPS / RS warps a row); a lane takes the slice's 16-byte chunks lane, lane + 32, ...
// (at most NC). x stays in registers for the whole kernel, as f16 pairs scaled by 16 / max|x| (so that no f16
// product or 8-term partial sum can overflow: 448 * 16 * 8 < 65504); the products run as f16x2 FMAs over one
// 16-byte chunk (8 terms a half), and each chunk's sum is added in fp32. y = acc * (max|x| / 16) * scale[n].
// SILU: x is silu(gate) * up formed from gate_up (2K), with the roundings of triton_ops.silu_and_mul (silu
// rounded to bf16, the product rounded to bf16).
//
// Requirements (checked by the caller): K % (16 * WPR) == 0, N % RS == 0, 16-byte aligned w, x and y.

#ifndef RS
#define RS 4
#endif
#ifndef NC
#define NC 4
#endif
#ifndef STAGES
#define STAGES 4
#endif
#ifndef SILU
#define SILU 0
#endif
#define WARPS 8
#define WPR (WARPS / RS)

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;

static __device__ __forceinline__ u32 smem_u32(const void* p) {
  u32 r;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
  return r;
}

static __device__ __forceinline__ float bf16_lo(u32 v) { return __uint_as_float(v << 16); }
static __device__ __forceinline__ float bf16_hi(u32 v) { return __uint_as_float(v & 0xffff0000u); }

static __device__ __forceinline__ u16 f32_to_bf16(float f) {
  u16 r;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
  return r;
}

static __device__ __forceinline__ float round_bf16(float f) { return __uint_as_float(((u32)f32_to_bf16(f)) << 16); }

static __device__ __forceinline__ u32 pack_f16x2(float lo, float hi) {
  u32 r;
  asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

static __device__ __forceinline__ u32 e4m3x2_to_f16x2(u32 two) {  // the low 16 bits: byte 0 -> low half
  u32 r;
  asm("{ .reg .b16 t; cvt.u16.u32 t, %1; cvt.rn.f16x2.e4m3x2 %0, t; }" : "=r"(r) : "r"(two));
  return r;
}

static __device__ __forceinline__ u32 hfma2(u32 a, u32 b, u32 c) {
  u32 r;
  asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(c));
  return r;
}

static __device__ __forceinline__ float f16x2_sum(u32 v) {
  float lo, hi;
  asm("{ .reg .f16 l, h; mov.b32 {l, h}, %2; cvt.f32.f16 %0, l; cvt.f32.f16 %1, h; }" : "=f"(lo), "=f"(hi) : "r"(v));
  return lo + hi;
}

static __device__ __forceinline__ float silu_mul(float g, float u) {  // triton_ops.silu_and_mul's roundings
  float e;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(-g * 1.4426950408889634f));
  return round_bf16(round_bf16(g / (1.0f + e)) * u);
}

static __device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
  asm volatile(
      "{ .reg .pred p; WAIT_%=: mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1; @!p bra WAIT_%=; }"
      :: "r"(bar), "r"(parity) : "memory");
}

static __device__ __forceinline__ void stage_load(u32 bar, u32 dst, const unsigned char* src, u32 bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(bar), "r"(bytes) : "memory");
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
               :: "r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}

extern "C" __global__ void __launch_bounds__(WARPS * 32, 1)
shardllm_fp8_gemv_tma(const unsigned char* __restrict__ w, const u16* x, const float* __restrict__ scale, u16* y,
                      int N, int K) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const u32 stage_bytes = (u32)RS * (u32)K;
  u64* bars = reinterpret_cast<u64*>(smem + STAGES * stage_bytes);
  float* red = reinterpret_cast<float*>(bars + STAGES);  // [2][WARPS] row partials, then [WARPS] for max|x|

  const int groups = N / RS;  // a group: the RS rows one stage holds
  const int g0 = (int)((long long)blockIdx.x * groups / gridDim.x);
  const int ng = (int)((long long)(blockIdx.x + 1) * groups / gridDim.x) - g0;
  const unsigned char* src = w + (size_t)g0 * stage_bytes;

  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(smem_u32(bars + s)));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    for (int s = 0; s < STAGES && s < ng; ++s)  // weights only: no kernel of the step writes them
      stage_load(smem_u32(bars + s), smem_u32(smem + s * stage_bytes), src + (size_t)s * stage_bytes, stage_bytes);
  }
  // programmatic dependent launch: let the next kernel be placed, then wait for the one before (no-ops otherwise)
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  asm volatile("griddepcontrol.wait;" ::: "memory");

  // x for this warp's K slice, as f16 pairs scaled by 16 / max|x| (max over all of x, which the block covers)
  const int cw = (K >> 4) / WPR;  // 16-byte chunks in a slice
  const int slice = warp % WPR, row_in_group = warp / WPR;
  u32 xh[NC][8];
  float amax = 0.f;
#pragma unroll
  for (int j = 0; j < NC; ++j) {
    const int c = lane + 32 * j;
    if (c < cw) {
      const int k0 = (slice * cw + c) * 16;
#if SILU
      const uint4* g4 = reinterpret_cast<const uint4*>(x + k0);
      const uint4* u4 = reinterpret_cast<const uint4*>(x + K + k0);
      const uint4 ga = g4[0], gb = g4[1], ua = u4[0], ub = u4[1];
      const u32 gv[8] = {ga.x, ga.y, ga.z, ga.w, gb.x, gb.y, gb.z, gb.w};
      const u32 uv[8] = {ua.x, ua.y, ua.z, ua.w, ub.x, ub.y, ub.z, ub.w};
#pragma unroll
      for (int q = 0; q < 8; ++q) {
        const float lo = silu_mul(bf16_lo(gv[q]), bf16_lo(uv[q])), hi = silu_mul(bf16_hi(gv[q]), bf16_hi(uv[q]));
        xh[j][q] = (__float_as_uint(hi) & 0xffff0000u) | (__float_as_uint(lo) >> 16);  // bf16 pair (exact)
      }
#else
      const uint4* x4 = reinterpret_cast<const uint4*>(x + k0);
      const uint4 a = x4[0], b = x4[1];
      xh[j][0] = a.x; xh[j][1] = a.y; xh[j][2] = a.z; xh[j][3] = a.w;
      xh[j][4] = b.x; xh[j][5] = b.y; xh[j][6] = b.z; xh[j][7] = b.w;
#endif
#pragma unroll
      for (int q = 0; q < 8; ++q) amax = fmaxf(amax, fmaxf(fabsf(bf16_lo(xh[j][q])), fabsf(bf16_hi(xh[j][q]))));
    }
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
  if (lane == 0) red[2 * WARPS + warp] = amax;
  __syncthreads();
  amax = 0.f;
#pragma unroll
  for (int i = 0; i < WARPS; ++i) amax = fmaxf(amax, red[2 * WARPS + i]);
  const float xscale = amax > 0.f ? 16.0f / amax : 1.0f;
  const float dequant = amax > 0.f ? amax / 16.0f : 1.0f;
#pragma unroll
  for (int j = 0; j < NC; ++j)
#pragma unroll
    for (int q = 0; q < 8; ++q) xh[j][q] = pack_f16x2(bf16_lo(xh[j][q]) * xscale, bf16_hi(xh[j][q]) * xscale);

  for (int i = 0; i < ng; ++i) {
    const int s = i % STAGES;
    mbar_wait(smem_u32(bars + s), (u32)(i / STAGES) & 1u);
    const uint4* wrow = reinterpret_cast<const uint4*>(smem + s * stage_bytes + row_in_group * K) + slice * cw;
    float acc = 0.f;
#pragma unroll
    for (int j = 0; j < NC; ++j) {
      const int c = lane + 32 * j;
      if (c < cw) {
        const uint4 wv = wrow[c];
        const u32 wq[4] = {wv.x, wv.y, wv.z, wv.w};
        u32 h = 0u;
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          h = hfma2(e4m3x2_to_f16x2(wq[q]), xh[j][2 * q], h);
          h = hfma2(e4m3x2_to_f16x2(wq[q] >> 16), xh[j][2 * q + 1], h);
        }
        acc += f16x2_sum(h);
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    const int row0 = (g0 + i) * RS;
#if WPR == 1
    if (lane == 0) y[row0 + row_in_group] = f32_to_bf16(acc * dequant * scale[row0 + row_in_group]);
#else
    if (lane == 0) red[(i & 1) * WARPS + warp] = acc;
#endif
    __syncthreads();  // every warp is done with stage s (and its partials are in red)
    if (tid == 0 && i + STAGES < ng)
      stage_load(smem_u32(bars + s), smem_u32(smem + s * stage_bytes), src + (size_t)(i + STAGES) * stage_bytes,
                 stage_bytes);
#if WPR > 1
    if (tid < RS) {
      float sum = 0.f;
#pragma unroll
      for (int p = 0; p < WPR; ++p) sum += red[(i & 1) * WARPS + tid * WPR + p];
      y[row0 + tid] = f32_to_bf16(sum * dequant * scale[row0 + tid]);
    }
#endif
  }
}
