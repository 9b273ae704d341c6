// Batch-1 FP8 GEMV for Hopper, register-streaming form: y[n] = bf16(scale[n] * sum_k w[n, k] * x[k]), w (N, K)
// e4m3, x (K) bf16. Compiled at run time by NVRTC (cuda_gemv.py).
//
// A warp owns rows gw, gw + TW, ... (gw its index in the grid, TW the grid's warps) and streams them in pieces of
// 32 * U 16-byte chunks (a lane: U chunks, strided by 32 so a warp's loads are contiguous), the next piece's loads
// issued before the current piece's math (two pieces a warp in flight at most, no shared memory). The first piece
// is loaded BEFORE griddepcontrol.wait: under programmatic dependent launch a GEMV's weights start to flow while the
// kernel before it still runs. x is read after the wait, 16 values a chunk, through L1 (every warp of an SM reads
// the same K values); products and sums in fp32 (e4m3 pairs converted by cvt.rn.f16x2.e4m3x2, exact in f16).
//
// Requirements (checked by the caller): K % 16 == 0, 16-byte aligned w and x; EVEN: K % (512 * U) == 0 (no
// chunk past a row's end, so no guards).

#ifndef U
#define U 8
#endif
#ifndef WARPS
#define WARPS 8
#endif
#ifndef EVEN
#define EVEN 1
#endif
#ifndef MIN_BLOCKS
#define MIN_BLOCKS 2
#endif

typedef unsigned int u32;
typedef unsigned short u16;

static __device__ __forceinline__ u16 f32_bf16(float f) {
  u16 r;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(r) : "f"(f));
  return r;
}

static __device__ __forceinline__ u32 e4m3x2_to_f16x2(u32 two) {  // the low 16 bits: byte 0 -> low half
  u32 r;
  asm("{ .reg .b16 t; cvt.u16.u32 t, %1; cvt.rn.f16x2.e4m3x2 %0, t; }" : "=r"(r) : "r"(two));
  return r;
}

static __device__ __forceinline__ uint4 ld_stream(const uint4* p) {  // read once: no L1 allocation
  uint4 r;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
  return r;
}

static __device__ __forceinline__ void f16x2_f32(u32 v, float& lo, float& hi) {
  asm("{ .reg .f16 l, h; mov.b32 {l, h}, %2; cvt.f32.f16 %0, l; cvt.f32.f16 %1, h; }" : "=f"(lo), "=f"(hi) : "r"(v));
}

static __device__ __forceinline__ float dot_chunk(uint4 wv, const u16* x, int c, float acc) {
  const uint4* xp = reinterpret_cast<const uint4*>(x + 16 * c);
  const uint4 xa = xp[0], xb = xp[1];
  const u32 xq[8] = {xa.x, xa.y, xa.z, xa.w, xb.x, xb.y, xb.z, xb.w};
  const u32 wq[4] = {wv.x, wv.y, wv.z, wv.w};
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    float w0, w1, w2, w3;
    f16x2_f32(e4m3x2_to_f16x2(wq[q]), w0, w1);
    f16x2_f32(e4m3x2_to_f16x2(wq[q] >> 16), w2, w3);
    acc = fmaf(w0, __uint_as_float(xq[2 * q] << 16), acc);
    acc = fmaf(w1, __uint_as_float(xq[2 * q] & 0xffff0000u), acc);
    acc = fmaf(w2, __uint_as_float(xq[2 * q + 1] << 16), acc);
    acc = fmaf(w3, __uint_as_float(xq[2 * q + 1] & 0xffff0000u), acc);
  }
  return acc;
}

extern "C" __global__ void __launch_bounds__(WARPS * 32, MIN_BLOCKS)
shardllm_fp8_gemv_reg(const unsigned char* __restrict__ w, const u16* x, const float* __restrict__ scale, u16* y,
                      int N, int K) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int gw = blockIdx.x * WARPS + warp, tw = gridDim.x * WARPS;
  const int chunks = K >> 4;                              // 16-byte chunks a row
  const int per_row = (chunks + 32 * U - 1) / (32 * U);   // pieces a row
  const int rows = gw < N ? (N - 1 - gw) / tw + 1 : 0;    // this warp's rows
  const int pieces = rows * per_row;

  uint4 cur[U], nxt[U];
  if (pieces > 0) {  // weights only: no kernel of the step writes them
    const uint4* src = reinterpret_cast<const uint4*>(w + (size_t)gw * K) + lane;
#pragma unroll
    for (int u = 0; u < U; ++u)
      if (EVEN || lane + 32 * u < chunks) cur[u] = ld_stream(src + 32 * u);
  }
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  asm volatile("griddepcontrol.wait;" ::: "memory");

  float acc = 0.f;
  for (int t = 0; t < pieces; ++t) {
    const int row = gw + (t / per_row) * tw, p = t % per_row;
    if (t + 1 < pieces) {
      const int row1 = gw + ((t + 1) / per_row) * tw, p1 = (t + 1) % per_row;
      const uint4* src = reinterpret_cast<const uint4*>(w + (size_t)row1 * K) + p1 * 32 * U + lane;
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (EVEN || p1 * 32 * U + lane + 32 * u < chunks) nxt[u] = ld_stream(src + 32 * u);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = p * 32 * U + lane + 32 * u;
      if (EVEN || c < chunks) acc = dot_chunk(cur[u], x, c, acc);
    }
    if (p == per_row - 1) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
      if (lane == 0) y[row] = f32_bf16(acc * scale[row]);
      acc = 0.f;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) cur[u] = nxt[u];
  }
}
