// CUDA built-ins for compiling a kernel source as host C++ (run.sh): one std::thread per CUDA
// thread of a block, std::barrier for __syncthreads/__syncwarp, shuffles through a shared buffer.
// Only what kernels/attention.cu uses.
#pragma once
#include <cmath>
#include <cstdint>
#include <algorithm>
#include <barrier>
#include <memory>
#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(x)
#define __shared__
#define __align__(n) __attribute__((aligned(n)))
struct dim3 { uint32_t x = 1, y = 1, z = 1; };
extern thread_local dim3 threadIdx, blockIdx;
extern dim3 blockDim, gridDim;
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) uint4 { uint32_t x, y, z, w; };
using std::min;
extern std::unique_ptr<std::barrier<>> emu_block_bar;
extern std::unique_ptr<std::barrier<>> emu_warp_bar[64];
extern float emu_xbuf[2048];
inline void __syncthreads() { emu_block_bar->arrive_and_wait(); }
inline void __syncwarp() { emu_warp_bar[threadIdx.x / 32]->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int o) {
  uint32_t t = threadIdx.x;
  emu_xbuf[t] = v; __syncwarp();
  float r = emu_xbuf[t ^ o]; __syncwarp();
  return r;
}
