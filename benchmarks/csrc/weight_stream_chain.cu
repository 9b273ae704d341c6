// Research probe for issue 13's batch-1 floor (benchmarks/megakernel_probe.py; not part of the engine).
//
// Question: can one persistent kernel run a whole decode step's chain of FP8 GEMVs, each waiting on the one
// before it through a grid-wide barrier, at close to the copy bandwidth? The engine launches ~127 GEMVs a token;
// each reaches 56-87% of the copy bandwidth alone (ramp and drain), and in-register or shared-memory prefetch
// before the PDL wait did not recover it (fourteenth and nineteenth sessions). Here the weight stream never stops:
// weights do not depend on activations, so a producer warp a block streams its rows of GEMV after GEMV into a
// ring of shared-memory slots (cp.async.bulk, completion on mbarriers) while the consumer warps wait at the
// barriers for each GEMV's input. The ring (STAGES x SLOT bytes an SM) is what hides a barrier's latency.
//
// desc: G rows of 8 int64: w (N x K e4m3, row-major), scale (N fp32), x (bf16: K, or 2K gate|up when silu),
//       y (N bf16), N, K, silu, kind (0 GEMV, 1 a barrier-only stage: the attention's place in a layer).
// counters: G uint32, zero at launch; block b adds 1 to counters[g] when its part of stage g is written.
// wait: 1 = stage g's consumers wait until counters[g - 1] == gridDim.x (the real chain); 0 = no waits (the
//       stream with the math: outputs are garbage); 2 = no waits and no math (the bulk-copy stream alone).
// Block b owns rows [b N / grid, (b + 1) N / grid) of every GEMV (at most YMAX); a ring slot holds
// min(8, floor(SLOT / K)) whole rows, so K <= SLOT.
// Numerics (as the nineteenth session's CUDA GEMV): x held in registers as f16 pairs scaled by 16 / max|x|, f16x2
// products over 16-term chunks, fp32 sums; y = bf16(sum * max|x| / 16 * scale[n]).
// grid must not exceed the SMs (one block an SM by shared memory): every block must be resident.

#ifndef STAGES
#define STAGES 10
#endif
#ifndef SLOT
#define SLOT 16384
#endif
#ifndef L2AHEAD
#define L2AHEAD 0
#endif
#ifndef PIECES
#define PIECES 1
#endif
#ifndef CWARPS
#define CWARPS 8
#endif
#ifndef KMAX
#define KMAX 14336
#endif
#ifndef YMAX
#define YMAX 256
#endif
#define PMAX 4  // parts of at most 256 chunks a row: K <= 16384
#define CT (CWARPS * 32)
#define XC ((KMAX / 16 + CT - 1) / CT)  // x chunks a consumer thread holds
#define MAXR 8

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
static __device__ __forceinline__ float silu_mul(float g, float u) {
  return round_bf16(round_bf16(g / (1.0f + __expf(-g))) * u);
}
static __device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(bar), "r"(count));
}
static __device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
  asm volatile(
      "{ .reg .pred p; WAIT_%=: mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1; @!p bra WAIT_%=; }"
      :: "r"(bar), "r"(parity) : "memory");
}
static __device__ __forceinline__ void mbar_arrive(u32 bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(bar) : "memory");
}
static __device__ __forceinline__ void consumers_sync() {  // named barrier 1: the consumer warps only
  asm volatile("bar.sync 1, %0;" :: "n"(CT) : "memory");
}
static __device__ __forceinline__ u32 ld_acquire(const u32* p) {
  u32 v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
static __device__ __forceinline__ uint4 ld_cg(const void* p) {  // L2 only: written by other SMs in this launch
  uint4 r;
  asm volatile("ld.global.cg.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}

struct Desc {
  const unsigned char* w;
  const float* scale;
  const u16* x;
  u16* y;
  long long n, k, silu, kind;
};

extern "C" __global__ void __launch_bounds__(CT + 32, 1)
shardllm_weight_stream_chain(const Desc* __restrict__ desc, int G, u32* counters, int wait) {
  extern __shared__ __align__(128) unsigned char smem[];
  unsigned char* ring = smem;
  u64* full = reinterpret_cast<u64*>(smem + STAGES * SLOT);
  u64* empty = full + STAGES;
  float* part = reinterpret_cast<float*>(empty + STAGES);  // [YMAX][PMAX]: this block's rows' part sums
  float* ssc = part + YMAX * PMAX;  // YMAX: their scales
  float* wmax = ssc + YMAX;  // CWARPS: max|x| a warp
  u32* xs = reinterpret_cast<u32*>(wmax + CWARPS + (4 - CWARPS % 4) % 4);  // KMAX / 2: x as scaled f16 pairs
  const int tid = threadIdx.x;
  if (tid == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(smem_u32(full + s), 1);
      mbar_init(smem_u32(empty + s), CWARPS);  // every consumer warp releases every slot
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  const int nb = gridDim.x, b = blockIdx.x;

  if (tid < 32) {  // producer warp: streams this block's rows of every GEMV, in order; a slot's copy is split in
    // PIECES bulk copies issued by as many lanes; lane 0 also asks L2 for the stage L2AHEAD stages ahead
    u32 it = 0;
    int ag = -1, ar = 0, ar1 = 0, arps = 0;  // the cursor L2AHEAD stages ahead
    long long ak = 0;
    const unsigned char* aw = nullptr;
    auto advance = [&]() -> bool {
      ar += arps;
      while (ar >= ar1) {
        if (++ag >= G) return false;
        const Desc e = desc[ag];
        if (e.kind) {
          ar = ar1 = arps = 0;
          continue;
        }
        ar = (int)(b * e.n / nb);
        ar1 = (int)((b + 1) * e.n / nb);
        ak = e.k;
        aw = e.w;
        arps = e.k > SLOT ? 1 : (int)(SLOT / e.k) < MAXR ? (int)(SLOT / e.k) : MAXR;
      }
      return true;
    };
    bool ahead = L2AHEAD > 0;
    for (int i = 0; i < L2AHEAD && ahead; ++i) ahead = advance();
    for (int g = 0; g < G; ++g) {
      const Desc d = desc[g];
      if (d.kind) continue;
      const int r0 = (int)(b * d.n / nb), r1 = (int)((b + 1) * d.n / nb);
      const int rps = d.k > SLOT ? 1 : (int)(SLOT / d.k) < MAXR ? (int)(SLOT / d.k) : MAXR;
      for (int r = r0; r < r1; r += rps, ++it) {
        const int rows = r1 - r < rps ? r1 - r : rps;
        const u32 s = it % STAGES, bytes = (u32)(rows * d.k);
        if (tid == 0 && ahead && (ahead = advance())) {
          const u32 abytes = (u32)((ar1 - ar < arps ? ar1 - ar : arps) * ak);
          asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" :: "l"(aw + (size_t)ar * ak), "r"(abytes)
                       : "memory");
        }
        if (it >= STAGES) mbar_wait(smem_u32(empty + s), ((it / STAGES) - 1) & 1u);
        if (tid == 0)
          asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(smem_u32(full + s)), "r"(bytes)
                       : "memory");
        __syncwarp();
        const u32 piece = ((bytes / PIECES) + 15u) & ~15u;
        if (tid < PIECES && tid * piece < bytes) {
          const u32 off = tid * piece, n = bytes - off < piece ? bytes - off : piece;
          asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                       :: "r"(smem_u32(ring + s * SLOT) + off), "l"(d.w + (size_t)r * d.k + off), "r"(n),
                          "r"(smem_u32(full + s)) : "memory");
        }
      }
    }
    return;
  }

  const int ct = tid - 32, lane = ct & 31, warp = ct >> 5;
  u32 it = 0, unit0 = 0;  // stages consumed; units handed out (they rotate over the warps)
  for (int g = 0; g < G; ++g) {
    const Desc d = desc[g];
    const int r0 = d.kind ? 0 : (int)(b * d.n / nb), r1 = d.kind ? 0 : (int)((b + 1) * d.n / nb);
    for (int i = ct; i < r1 - r0; i += CT) ssc[i] = d.scale[r0 + i];  // before the wait: no dependence
    if (wait && g > 0) {
      if (ct == 0) {
        while (ld_acquire(counters + g - 1) < (u32)nb) {
        }
        __threadfence();
      }
      consumers_sync();
    }
    if (d.kind) {  // a barrier-only stage
      consumers_sync();
      if (ct == 0) atomicAdd(counters + g, 1u);
      continue;
    }
    const int k = (int)d.k, chunks = k >> 4;
    // x into shared memory as f16 pairs scaled by 16 / max|x| (no f16 product or 8-term sum can overflow:
    // 448 * 16 * 8 < 65504); each thread first holds its chunks c = ct + j CT in registers
    u32 xh[XC][8];
    float amax = 0.f;
#pragma unroll
    for (int j = 0; j < XC; ++j) {
      const int c = ct + j * CT;
      if (c < chunks) {
        if (d.silu) {
          const uint4 ga = ld_cg(d.x + c * 16), gb = ld_cg(d.x + c * 16 + 8);
          const uint4 ua = ld_cg(d.x + k + c * 16), ub = ld_cg(d.x + k + c * 16 + 8);
          const u32 gv[8] = {ga.x, ga.y, ga.z, ga.w, gb.x, gb.y, gb.z, gb.w};
          const u32 uv[8] = {ua.x, ua.y, ua.z, ua.w, ub.x, ub.y, ub.z, ub.w};
#pragma unroll
          for (int q = 0; q < 8; ++q) {
            const float lo = silu_mul(bf16_lo(gv[q]), bf16_lo(uv[q])), hi = silu_mul(bf16_hi(gv[q]), bf16_hi(uv[q]));
            xh[j][q] = (__float_as_uint(hi) & 0xffff0000u) | (__float_as_uint(lo) >> 16);
          }
        } else {
          const uint4 a = ld_cg(d.x + c * 16), bq = ld_cg(d.x + c * 16 + 8);
          xh[j][0] = a.x; xh[j][1] = a.y; xh[j][2] = a.z; xh[j][3] = a.w;
          xh[j][4] = bq.x; xh[j][5] = bq.y; xh[j][6] = bq.z; xh[j][7] = bq.w;
        }
#pragma unroll
        for (int q = 0; q < 8; ++q) amax = fmaxf(amax, fmaxf(fabsf(bf16_lo(xh[j][q])), fabsf(bf16_hi(xh[j][q]))));
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    if (lane == 0) wmax[warp] = amax;
    consumers_sync();
    amax = 0.f;
#pragma unroll
    for (int i = 0; i < CWARPS; ++i) amax = fmaxf(amax, wmax[i]);
    const float xscale = amax > 0.f ? 16.0f / amax : 1.0f, dequant = amax > 0.f ? amax / 16.0f : 1.0f;
#pragma unroll
    for (int j = 0; j < XC; ++j) {
      const int c = ct + j * CT;
      if (c < chunks) {
        u32 h[8];
#pragma unroll
        for (int q = 0; q < 8; ++q) h[q] = pack_f16x2(bf16_lo(xh[j][q]) * xscale, bf16_hi(xh[j][q]) * xscale);
        reinterpret_cast<uint4*>(xs)[2 * c] = make_uint4(h[0], h[1], h[2], h[3]);
        reinterpret_cast<uint4*>(xs)[2 * c + 1] = make_uint4(h[4], h[5], h[6], h[7]);
      }
    }
    consumers_sync();

    // a unit: one row's part of at most 256 chunks (8 a lane), done by one warp alone (warp shuffles, no shared
    // atomics, no block-wide sync a stage); every warp waits for and releases every slot
    const int rps = k > SLOT ? 1 : (SLOT / k) < MAXR ? (SLOT / k) : MAXR;
    const int P = (chunks + 255) >> 8, cpp = (chunks + P - 1) / P;
    for (int r = r0; r < r1; r += rps, ++it) {
      const int rows = r1 - r < rps ? r1 - r : rps, units = rows * P;
      const u32 s = it % STAGES;
      mbar_wait(smem_u32(full + s), (it / STAGES) & 1u);
      if (wait != 2) {
        const uint4* ws = reinterpret_cast<const uint4*>(ring + s * SLOT);
        for (int u = (int)((warp + CWARPS - unit0 % CWARPS) % CWARPS); u < units; u += CWARPS) {
          const int i = u / P, p = u - i * P, c0 = p * cpp, c1 = c0 + cpp < chunks ? c0 + cpp : chunks;
          float acc = 0.f;
#pragma unroll
          for (int j = 0; j < 8; ++j) {
            const int c = c0 + lane + 32 * j;
            if (c < c1) {
              const uint4 wv = ws[i * chunks + c];
              const uint4 xa = reinterpret_cast<const uint4*>(xs)[2 * c], xb = reinterpret_cast<const uint4*>(xs)[2 * c + 1];
              const u32 wq[4] = {wv.x, wv.y, wv.z, wv.w};
              const u32 xq[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
              u32 h = 0u;
#pragma unroll
              for (int q = 0; q < 4; ++q) {
                h = hfma2(e4m3x2_to_f16x2(wq[q]), xq[2 * q], h);
                h = hfma2(e4m3x2_to_f16x2(wq[q] >> 16), xq[2 * q + 1], h);
              }
              acc += f16x2_sum(h);
            }
          }
#pragma unroll
          for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
          if (lane == 0) part[(r - r0 + i) * PMAX + p] = acc;
        }
        unit0 += (u32)units;
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(smem_u32(empty + s));  // this warp is done with slot s
    }
    consumers_sync();  // every unit's sum is in part
    for (int i = ct; i < r1 - r0; i += CT) {
      float sum = 0.f;
      for (int p = 0; p < P; ++p) sum += part[i * PMAX + p];
      d.y[r0 + i] = f32_to_bf16(sum * dequant * ssc[i]);
    }
    consumers_sync();  // this block's rows of y are written (and xs, part, ssc, wmax are free for the next GEMV)
    if (ct == 0) {
      __threadfence();
      atomicAdd(counters + g, 1u);
    }
  }
}
