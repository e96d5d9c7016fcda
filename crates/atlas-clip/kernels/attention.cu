// Inference attention behind model/attention.rs: ctx = softmax(q kᵀ + mask) v for every
// (batch, head) in one launch, reading q, k and v straight from the stacked projection output
// [B, N, 3·D] (q already scaled by 1/√hd) and writing ctx as [B, N, D], so neither the
// [3, B, H, N, hd] permute nor the transpose back is materialised. Storage is f32, f16 or bf16;
// all arithmetic is f32.
//
// Layout of the work: one block of WARPS warps per (batch, head, tile of ROWS query rows); each
// warp owns R query rows. Keys are walked in tiles of 32 (one key per lane for the scores) with
// an online softmax (running max and sum per row, flash-attention style), so shared memory
// holds one tile of K and V in f32, not the whole head: staging all of K and V at N = 257,
// hd = 64 in f32 would take 131 KB, over the 48 KB a launch gets without the opt-in, and
// would cap N. With tiles the block needs (32·(hd+4) + 32·hd + ROWS·hd + WARPS·R·32) floats,
// 23 KB at hd = 64 and 43 KB at the largest head dim, 128, and N is unbounded.
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

#define ATTN_WARPS 4
#define ATTN_R 4
#define ATTN_ROWS (ATTN_WARPS * ATTN_R)
#define ATTN_TK 32
#define ATTN_HD_MAX 128

__device__ __forceinline__ float attn_to_f32(float v) { return v; }
__device__ __forceinline__ float attn_to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float attn_to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T attn_from_f32(float v);
template <> __device__ __forceinline__ float attn_from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half attn_from_f32<__half>(float v) {
  return __float2half_rn(v);
}
template <> __device__ __forceinline__ __nv_bfloat16 attn_from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float attn_warp_sum(float v) {
  #pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float attn_warp_max(float v) {
  #pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Eight consecutive values (hd is a multiple of 8, so a chunk never straddles heads) as f32:
// 16-byte loads when the data is 16-byte aligned (every row and head offset is a multiple of
// 8 elements, so only the base pointer decides), element loads otherwise.
template <typename T>
__device__ __forceinline__ void attn_load8(const T* __restrict__ src, bool vec, float* dst) {
  if (vec) {
    constexpr int PER = 16 / sizeof(T);
    #pragma unroll
    for (int v = 0; v < 8 / PER; ++v) {
      uint4 raw = reinterpret_cast<const uint4*>(src)[v];
      const T* t = reinterpret_cast<const T*>(&raw);
      #pragma unroll
      for (int k = 0; k < PER; ++k) dst[v * PER + k] = attn_to_f32(t[k]);
    }
  } else {
    #pragma unroll
    for (int k = 0; k < 8; ++k) dst[k] = attn_to_f32(src[k]);
  }
}

// qkv: [B, N, 3·heads·hd] contiguous; mask: [N, N] contiguous (read only when has_mask);
// out: [B, N, heads·hd]. Grid: B · heads · ceil(N / ROWS) blocks of WARPS · 32 threads, with
// attn_smem_floats(hd) floats of dynamic shared memory. A row whose keys are all masked gives
// NaN, as the plain softmax does.
template <typename T>
__device__ void attention_impl(const T* __restrict__ qkv, const T* __restrict__ mask,
                               T* __restrict__ out, uint32_t n, uint32_t heads, uint32_t hd,
                               int has_mask) {
  extern __shared__ __align__(16) float attn_smem[];
  const uint32_t kstride = hd + 4;  // padding: lanes reading K rows hit distinct banks
  float* ks = attn_smem;                     // [TK][hd + 4]
  float* vs = ks + ATTN_TK * kstride;        // [TK][hd]
  float* qs = vs + ATTN_TK * hd;             // [ROWS][hd]
  float* ps = qs + ATTN_ROWS * hd;           // [WARPS][R][TK]

  const uint32_t tiles = (n + ATTN_ROWS - 1) / ATTN_ROWS;
  const uint32_t tile = blockIdx.x % tiles;
  const uint32_t h = (blockIdx.x / tiles) % heads;
  const uint32_t b = blockIdx.x / tiles / heads;
  const uint32_t d_model = heads * hd;
  const size_t row_stride = 3 * (size_t)d_model;
  const T* base = qkv + (size_t)b * n * row_stride + (size_t)h * hd;
  const bool vec = (reinterpret_cast<uintptr_t>(qkv) & 15) == 0;
  const uint32_t tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const uint32_t row0 = tile * ATTN_ROWS;
  const uint32_t chunks = hd / 8;

  // This block's query rows (zeros past the end, so those rows compute harmlessly).
  for (uint32_t u = tid; u < ATTN_ROWS * chunks; u += blockDim.x) {
    uint32_t r = u / chunks, c = u % chunks;
    float* dst = qs + r * hd + c * 8;
    if (row0 + r < n) {
      attn_load8(base + (size_t)(row0 + r) * row_stride + c * 8, vec, dst);
    } else {
      for (int k = 0; k < 8; ++k) dst[k] = 0.f;
    }
  }

  float m[ATTN_R], l[ATTN_R], acc[ATTN_R][ATTN_HD_MAX / 32];
  #pragma unroll
  for (int r = 0; r < ATTN_R; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
    #pragma unroll
    for (int c = 0; c < ATTN_HD_MAX / 32; ++c) acc[r][c] = 0.f;
  }
  const float* qw = qs + warp * ATTN_R * hd;
  float* pw = ps + warp * ATTN_R * ATTN_TK;

  for (uint32_t k0 = 0; k0 < n; k0 += ATTN_TK) {
    // The previous tile is fully consumed (and, the first time, qs is written) before the
    // stage is overwritten.
    __syncthreads();
    for (uint32_t u = tid; u < 2 * ATTN_TK * chunks; u += blockDim.x) {
      uint32_t which = u / (ATTN_TK * chunks), rem = u % (ATTN_TK * chunks);
      uint32_t key = rem / chunks, c = rem % chunks;
      float* dst = which == 0 ? ks + key * kstride + c * 8 : vs + key * hd + c * 8;
      if (k0 + key < n) {
        attn_load8(base + (size_t)(k0 + key) * row_stride + (1 + which) * d_model + c * 8, vec,
                   dst);
      } else {
        // Zeros, not garbage: a padded key's weight is 0 and 0 · NaN would poison the sum.
        for (int k = 0; k < 8; ++k) dst[k] = 0.f;
      }
    }
    __syncthreads();

    // Scores: lane j takes key k0 + j against the warp's R rows.
    float s[ATTN_R];
    #pragma unroll
    for (int r = 0; r < ATTN_R; ++r) s[r] = 0.f;
    const float* kr = ks + lane * kstride;
    for (uint32_t d = 0; d < hd; d += 4) {
      float4 kv = *reinterpret_cast<const float4*>(kr + d);
      #pragma unroll
      for (int r = 0; r < ATTN_R; ++r) {
        float4 qv = *reinterpret_cast<const float4*>(qw + r * hd + d);
        s[r] += qv.x * kv.x + qv.y * kv.y + qv.z * kv.z + qv.w * kv.w;
      }
    }
    const uint32_t key = k0 + lane;
    #pragma unroll
    for (int r = 0; r < ATTN_R; ++r) {
      const uint32_t i = row0 + warp * ATTN_R + r;
      float sc = -INFINITY;
      if (key < n) {
        sc = s[r];
        if (has_mask && i < n) sc += attn_to_f32(mask[(size_t)i * n + key]);
      }
      // Online softmax: rescale what was summed under the old max. While every key so far is
      // masked the max is -inf; shifting by 0 then keeps exp() from seeing -inf - -inf.
      const float mx = fmaxf(m[r], attn_warp_max(sc));
      const float shift = mx == -INFINITY ? 0.f : mx;
      const float p = expf(sc - shift);
      const float corr = expf(m[r] - shift);
      l[r] = l[r] * corr + attn_warp_sum(p);
      m[r] = mx;
      #pragma unroll
      for (int c = 0; c < ATTN_HD_MAX / 32; ++c) acc[r][c] *= corr;
      pw[r * ATTN_TK + lane] = p;
    }
    __syncwarp();

    // ctx += p v: lane owns dims lane, lane + 32, ...; p is read back as a broadcast.
    const uint32_t kt = min((uint32_t)ATTN_TK, n - k0);
    for (uint32_t j = 0; j < kt; ++j) {
      const float* vr = vs + j * hd;
      #pragma unroll
      for (int c = 0; c < ATTN_HD_MAX / 32; ++c) {
        const uint32_t d = lane + 32 * c;
        if (d < hd) {
          const float v = vr[d];
          #pragma unroll
          for (int r = 0; r < ATTN_R; ++r) acc[r][c] += pw[r * ATTN_TK + j] * v;
        }
      }
    }
  }

  #pragma unroll
  for (int r = 0; r < ATTN_R; ++r) {
    const uint32_t i = row0 + warp * ATTN_R + r;
    if (i >= n) continue;
    const float inv = 1.f / l[r];
    T* o = out + ((size_t)b * n + i) * d_model + (size_t)h * hd;
    #pragma unroll
    for (int c = 0; c < ATTN_HD_MAX / 32; ++c) {
      const uint32_t d = lane + 32 * c;
      if (d < hd) o[d] = attn_from_f32<T>(acc[r][c] * inv);
    }
  }
}

#define ATTENTION(SUFFIX, T)                                                                 \
  extern "C" __global__ void __launch_bounds__(ATTN_WARPS * 32)                              \
      attention_##SUFFIX(const T* qkv, const T* mask, T* out, uint32_t n, uint32_t heads,    \
                         uint32_t hd, int has_mask) {                                        \
    attention_impl<T>(qkv, mask, out, n, heads, hd, has_mask);                               \
  }

ATTENTION(f32, float)
ATTENTION(f16, __half)
ATTENTION(bf16, __nv_bfloat16)
