// Inference kernels behind model/fused.rs: LayerNorm and softmax over the last dimension (one
// warp per row), and the linear-layer epilogues bias + activation and bias + residual
// (grid-stride, elementwise). Values are read and written in the tensor's dtype; arithmetic is
// f32 in registers, as in the CPU kernels.
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float warp_sum(float v) {
  #pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
  #pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Two passes (mean, then the variance of the centred values), as the CPU kernel does.
template <typename T>
__device__ void layer_norm_impl(const T* __restrict__ x, const T* __restrict__ w,
                                const T* __restrict__ b, T* __restrict__ y, uint32_t rows,
                                uint32_t n, float eps) {
  uint32_t lane = threadIdx.x & 31;
  uint32_t row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  if (row >= rows) return;
  const T* xr = x + (size_t)row * n;
  T* yr = y + (size_t)row * n;
  float s = 0.f;
  for (uint32_t j = lane; j < n; j += 32) s += to_f32(xr[j]);
  float mean = warp_sum(s) / n;
  float v = 0.f;
  for (uint32_t j = lane; j < n; j += 32) {
    float d = to_f32(xr[j]) - mean;
    v += d * d;
  }
  float inv = rsqrtf(warp_sum(v) / n + eps);
  for (uint32_t j = lane; j < n; j += 32) {
    yr[j] = from_f32<T>((to_f32(xr[j]) - mean) * inv * to_f32(w[j]) + to_f32(b[j]));
  }
}

template <typename T>
__device__ void softmax_impl(const T* __restrict__ x, T* __restrict__ y, uint32_t rows,
                             uint32_t n) {
  uint32_t lane = threadIdx.x & 31;
  uint32_t row = (blockIdx.x * blockDim.x + threadIdx.x) >> 5;
  if (row >= rows) return;
  const T* xr = x + (size_t)row * n;
  T* yr = y + (size_t)row * n;
  float m = -INFINITY;
  for (uint32_t j = lane; j < n; j += 32) m = fmaxf(m, to_f32(xr[j]));
  m = warp_max(m);
  float s = 0.f;
  for (uint32_t j = lane; j < n; j += 32) s += expf(to_f32(xr[j]) - m);
  float inv = 1.f / warp_sum(s);
  for (uint32_t j = lane; j < n; j += 32) yr[j] = from_f32<T>(expf(to_f32(xr[j]) - m) * inv);
}

// act: 0 none, 1 quick_gelu (x * sigmoid(1.702 x)), 2 gelu (erf form).
__device__ __forceinline__ float activation(float v, int act) {
  if (act == 1) return v / (1.f + expf(-1.702f * v));
  if (act == 2) return 0.5f * v * (1.f + erff(v * 0.70710678118654752f));
  return v;
}

template <typename T>
__device__ void bias_act_impl(const T* __restrict__ x, const T* __restrict__ bias,
                              T* __restrict__ y, size_t numel, uint32_t n, int act) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < numel;
       i += (size_t)gridDim.x * blockDim.x) {
    y[i] = from_f32<T>(activation(to_f32(x[i]) + to_f32(bias[i % n]), act));
  }
}

template <typename T>
__device__ void bias_residual_impl(const T* __restrict__ x, const T* __restrict__ bias,
                                   const T* __restrict__ r, T* __restrict__ y, size_t numel,
                                   uint32_t n) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < numel;
       i += (size_t)gridDim.x * blockDim.x) {
    y[i] = from_f32<T>(to_f32(x[i]) + to_f32(bias[i % n]) + to_f32(r[i]));
  }
}

#define FUSED(SUFFIX, T)                                                                     \
  extern "C" __global__ void layer_norm_##SUFFIX(const T* x, const T* w, const T* b, T* y,   \
                                                 uint32_t rows, uint32_t n, float eps) {      \
    layer_norm_impl<T>(x, w, b, y, rows, n, eps);                                            \
  }                                                                                          \
  extern "C" __global__ void softmax_##SUFFIX(const T* x, T* y, uint32_t rows, uint32_t n) { \
    softmax_impl<T>(x, y, rows, n);                                                          \
  }                                                                                          \
  extern "C" __global__ void bias_act_##SUFFIX(const T* x, const T* bias, T* y, size_t numel, \
                                               uint32_t n, int act) {                        \
    bias_act_impl<T>(x, bias, y, numel, n, act);                                             \
  }                                                                                          \
  extern "C" __global__ void bias_residual_##SUFFIX(const T* x, const T* bias, const T* r,   \
                                                    T* y, size_t numel, uint32_t n) {         \
    bias_residual_impl<T>(x, bias, r, y, numel, n);                                          \
  }

FUSED(f32, float)
FUSED(f16, __half)
FUSED(bf16, __nv_bfloat16)
