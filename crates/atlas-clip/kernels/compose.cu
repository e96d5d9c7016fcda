// Fused composition over every block of a flat, 8-element-aligned layout:
//   out[j] = base[j] + sum_i c(i, block(j), part(j)) * tau_i[j]
// Each tau is read once and each weight written once. Arithmetic is a multiply then an add in
// f32 (__fmul_rn/__fadd_rn: no FMA contraction), in task-vector order, so the result is bit for
// bit the host composition (atlas_core::compose) before the conversion to the output dtype.
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

#define GROUP 8

enum { TAU_F32 = 0, TAU_F16 = 1, TAU_BF16 = 2 };

__device__ __forceinline__ uint64_t splitmix64(uint64_t x) {
  uint64_t z = x + 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// atlas_core::parts::part_of.
__device__ __forceinline__ uint32_t part_of(uint64_t key, uint64_t j, uint32_t k) {
  return (uint32_t)((((splitmix64(key + j) >> 32)) * (uint64_t)k) >> 32);
}

// The block holding group g: block_groups[b] <= g < block_groups[b + 1].
__device__ __forceinline__ int find_block(const uint32_t* block_groups, int n_blocks, uint32_t g) {
  int lo = 0, hi = n_blocks - 1;
  while (lo < hi) {
    int mid = (lo + hi + 1) >> 1;
    if (__ldg(block_groups + mid) <= g) lo = mid; else hi = mid - 1;
  }
  return lo;
}

__device__ __forceinline__ void load8(const void* p, int dtype, size_t g, float v[GROUP]) {
  if (dtype == TAU_F32) {
    const float4* q = (const float4*)p + 2 * g;
    float4 a = __ldg(q), b = __ldg(q + 1);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
  } else {
    uint4 raw = __ldg((const uint4*)p + g);
    const uint16_t* h = (const uint16_t*)&raw;
    #pragma unroll
    for (int e = 0; e < GROUP; e++) {
      if (dtype == TAU_F16) {
        v[e] = __half2float(__ushort_as_half(h[e]));
      } else {
        v[e] = __uint_as_float(((uint32_t)h[e]) << 16);
      }
    }
  }
}

__device__ __forceinline__ void store8(float* out, size_t g, const float v[GROUP]) {
  float4* q = (float4*)out + 2 * g;
  q[0] = make_float4(v[0], v[1], v[2], v[3]);
  q[1] = make_float4(v[4], v[5], v[6], v[7]);
}

__device__ __forceinline__ void store8(__half* out, size_t g, const float v[GROUP]) {
  uint4 raw;
  uint16_t* h = (uint16_t*)&raw;
  #pragma unroll
  for (int e = 0; e < GROUP; e++) h[e] = __half_as_ushort(__float2half_rn(v[e]));
  ((uint4*)out)[g] = raw;
}

__device__ __forceinline__ void store8(__nv_bfloat16* out, size_t g, const float v[GROUP]) {
  uint4 raw;
  uint16_t* h = (uint16_t*)&raw;
  #pragma unroll
  for (int e = 0; e < GROUP; e++) h[e] = __bfloat16_as_ushort(__float2bfloat16_rn(v[e]));
  ((uint4*)out)[g] = raw;
}

// taus[i]: device address of task vector i (flat, same layout as base); dtypes[i]: its dtype.
// coefs: [n_tv, n_blocks, k] as f32. keys: per-block part keys (read only when k > 1).
// block_groups: [n_blocks + 1] first group of each block; starts: first element of each block.
template <typename O>
__device__ void compose_impl(const float* __restrict__ base, const uint64_t* __restrict__ taus,
                             const int32_t* __restrict__ dtypes, const float* __restrict__ coefs,
                             const uint64_t* __restrict__ keys,
                             const uint32_t* __restrict__ block_groups, int n_blocks, int n_tv,
                             uint32_t k, uint32_t n_groups, O* __restrict__ out) {
  for (uint32_t g = blockIdx.x * blockDim.x + threadIdx.x; g < n_groups;
       g += gridDim.x * blockDim.x) {
    int b = find_block(block_groups, n_blocks, g);
    float acc[GROUP], tau[GROUP];
    uint8_t part[GROUP];
    load8(base, TAU_F32, g, acc);
    if (k > 1) {
      uint64_t j0 = (uint64_t)(g - block_groups[b]) * GROUP;
      #pragma unroll
      for (int e = 0; e < GROUP; e++) part[e] = (uint8_t)part_of(keys[b], j0 + e, k);
    }
    for (int i = 0; i < n_tv; i++) {
      const float* c = coefs + ((size_t)i * n_blocks + b) * k;
      if (k == 1 && c[0] == 0.0f) continue;  // as the host path: a zero coefficient adds nothing
      load8((const void*)taus[i], dtypes[i], g, tau);
      #pragma unroll
      for (int e = 0; e < GROUP; e++) {
        float ce = k == 1 ? c[0] : c[part[e]];
        acc[e] = __fadd_rn(acc[e], __fmul_rn(ce, tau[e]));
      }
    }
    store8(out, g, acc);
  }
}

#define COMPOSE(NAME, O)                                                                      \
  extern "C" __global__ void NAME(const float* base, const uint64_t* taus, const int32_t* dtypes, \
                                  const float* coefs, const uint64_t* keys,                    \
                                  const uint32_t* block_groups, int n_blocks, int n_tv,         \
                                  uint32_t k, uint32_t n_groups, O* out) {                     \
    compose_impl<O>(base, taus, dtypes, coefs, keys, block_groups, n_blocks, n_tv, k, n_groups, \
                    out);                                                                      \
  }

COMPOSE(compose_f32, float)
COMPOSE(compose_f16, __half)
COMPOSE(compose_bf16, __nv_bfloat16)

// ---------------------------------------------------------------------------------------------
// Gradient reduction: dots[i, b, p] = sum over the elements j of block b in part p of
// grad[j] * tau_i[j] (atlas_core::reduce_gradient on the device), in two stages:
//   1. reduce_partial: one thread block per tile (at most TILE_GROUPS groups of one block).
//      Each thread accumulates its groups in f32 registers (K <= REG_PARTS; larger K adds into
//      shared memory with atomics), the warps reduce by shuffles and thread p sums the warps'
//      values in warp order, writing partials[i, tile, p]. The task vectors are taken one after
//      the other by the same thread block, so the tile's gradient (TILE_GROUPS * 32 bytes) is
//      read from DRAM once and re-read from cache.
//   2. reduce_finish: one thread per (i, b, p) sums the partials of b's tiles in tile order, in
//      f64, so the result does not depend on scheduling (except K > REG_PARTS, whose shared
//      atomics add in any order).
// Pairs (i, b) whose task-vector block is all zero (nonzero[i * n_blocks + b] == 0) are skipped
// as on the host: they read nothing and give exactly zero.

#define TILE_GROUPS 2048
#define REG_PARTS 8
#define MAX_PARTS 256
#define WARPS_MAX 32

__device__ __forceinline__ float warp_sum(float v) {
  #pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// grad: flat f32 gradient (layout of the composition, zero padding). tile_first: [n_blocks + 1]
// first tile of each block. partials: [n_tv, n_tiles, k].
extern "C" __global__ void reduce_partial(const float* __restrict__ grad,
                                          const uint64_t* __restrict__ taus,
                                          const int32_t* __restrict__ dtypes,
                                          const uint8_t* __restrict__ nonzero,
                                          const uint64_t* __restrict__ keys,
                                          const uint32_t* __restrict__ block_groups,
                                          const uint32_t* __restrict__ tile_first, int n_blocks,
                                          int n_tv, uint32_t k, uint32_t n_tiles,
                                          float* __restrict__ partials) {
  __shared__ float warp_acc[WARPS_MAX][REG_PARTS];
  __shared__ float sums[MAX_PARTS];
  const uint32_t tile = blockIdx.x;
  if (tile >= n_tiles) return;
  const int b = find_block(tile_first, n_blocks, tile);
  const uint32_t g_block = block_groups[b];
  const uint32_t g0 = g_block + (tile - tile_first[b]) * TILE_GROUPS;
  const uint32_t g1 = min(g0 + TILE_GROUPS, block_groups[b + 1]);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int n_warps = (blockDim.x + 31) >> 5;
  for (int i = 0; i < n_tv; i++) {
    float* out = partials + ((size_t)i * n_tiles + tile) * k;
    if (!nonzero[(size_t)i * n_blocks + b]) {
      for (uint32_t p = threadIdx.x; p < k; p += blockDim.x) out[p] = 0.0f;
      continue;
    }
    const void* tau_p = (const void*)taus[i];
    const int dt = dtypes[i];
    if (k <= REG_PARTS) {
      float acc[REG_PARTS];
      #pragma unroll
      for (int p = 0; p < REG_PARTS; p++) acc[p] = 0.0f;
      for (uint32_t g = g0 + threadIdx.x; g < g1; g += blockDim.x) {
        float gv[GROUP], tv[GROUP];
        load8(grad, TAU_F32, g, gv);
        load8(tau_p, dt, g, tv);
        if (k == 1) {
          #pragma unroll
          for (int e = 0; e < GROUP; e++) acc[0] = fmaf(gv[e], tv[e], acc[0]);
        } else {
          const uint64_t j0 = (uint64_t)(g - g_block) * GROUP;
          #pragma unroll
          for (int e = 0; e < GROUP; e++) {
            const uint32_t pe = part_of(keys[b], j0 + e, k);
            const float prod = gv[e] * tv[e];
            #pragma unroll
            for (int p = 0; p < REG_PARTS; p++) acc[p] += pe == (uint32_t)p ? prod : 0.0f;
          }
        }
      }
      #pragma unroll
      for (int p = 0; p < REG_PARTS; p++) {
        if ((uint32_t)p < k) {
          const float v = warp_sum(acc[p]);
          if (lane == 0) warp_acc[warp][p] = v;
        }
      }
      __syncthreads();
      if (threadIdx.x < k) {
        float s = 0.0f;
        for (int w = 0; w < n_warps; w++) s += warp_acc[w][threadIdx.x];
        out[threadIdx.x] = s;
      }
      __syncthreads();  // warp_acc is reused by the next task vector
    } else {
      for (uint32_t p = threadIdx.x; p < k; p += blockDim.x) sums[p] = 0.0f;
      __syncthreads();
      for (uint32_t g = g0 + threadIdx.x; g < g1; g += blockDim.x) {
        float gv[GROUP], tv[GROUP];
        load8(grad, TAU_F32, g, gv);
        load8(tau_p, dt, g, tv);
        const uint64_t j0 = (uint64_t)(g - g_block) * GROUP;
        #pragma unroll
        for (int e = 0; e < GROUP; e++) atomicAdd(&sums[part_of(keys[b], j0 + e, k)], gv[e] * tv[e]);
      }
      __syncthreads();
      for (uint32_t p = threadIdx.x; p < k; p += blockDim.x) out[p] = sums[p];
      __syncthreads();  // sums is reset for the next task vector
    }
  }
}

// dots: [n_tv, n_blocks, k] f64.
extern "C" __global__ void reduce_finish(const float* __restrict__ partials,
                                         const uint32_t* __restrict__ tile_first, int n_blocks,
                                         int n_tv, uint32_t k, uint32_t n_tiles,
                                         double* __restrict__ dots) {
  const size_t n = (size_t)n_tv * n_blocks * k;
  for (size_t x = (size_t)blockIdx.x * blockDim.x + threadIdx.x; x < n;
       x += (size_t)gridDim.x * blockDim.x) {
    const uint32_t p = x % k;
    const int b = (int)((x / k) % n_blocks);
    const int i = (int)(x / ((size_t)k * n_blocks));
    double s = 0.0;
    for (uint32_t t = tile_first[b]; t < tile_first[b + 1]; t++)
      s += (double)partials[((size_t)i * n_tiles + t) * k + p];
    dots[x] = s;
  }
}
