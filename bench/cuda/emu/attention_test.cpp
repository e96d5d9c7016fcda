// Host test of kernels/attention.cu (see run.sh): launches every kernel instantiation on odd
// shapes, with and without the causal mask, aligned and unaligned, and compares with a double
// reference under each dtype's bench tolerance.
#include <cstdio>
#include <sanitizer/asan_interface.h>
#include <cstdlib>
#include <thread>
#include <vector>
#include <random>
thread_local dim3 threadIdx, blockIdx;
dim3 blockDim, gridDim;
std::unique_ptr<std::barrier<>> emu_block_bar;
std::unique_ptr<std::barrier<>> emu_warp_bar[64];
float emu_xbuf[2048];
// The kernel's dynamic shared memory; past what the launch asks for (smem_floats in
// model/attention.rs) is poisoned, so ASan catches a carve-up that overruns it.
alignas(16) float attn_smem[1 << 16];
static size_t smem_floats(uint32_t hd) { return 32 * (hd + 4) + 32 * hd + ATTN_ROWS * hd + ATTN_ROWS * 32; }

template <typename K, typename T>
void launch(K kern, uint32_t grid, uint32_t block, const T* qkv, const T* mask, T* out, uint32_t n,
            uint32_t heads, uint32_t hd, int has_mask) {
  blockDim.x = block; gridDim.x = grid;
  ASAN_UNPOISON_MEMORY_REGION(attn_smem, sizeof attn_smem);
  ASAN_POISON_MEMORY_REGION(attn_smem + smem_floats(hd), sizeof attn_smem - smem_floats(hd) * 4);
  emu_block_bar = std::make_unique<std::barrier<>>(block);
  for (uint32_t w = 0; w < block / 32; ++w) emu_warp_bar[w] = std::make_unique<std::barrier<>>(32);
  std::vector<std::thread> ts;
  for (uint32_t t = 0; t < block; ++t)
    ts.emplace_back([=] {
      threadIdx.x = t;
      for (uint32_t bl = 0; bl < grid; ++bl) {
        blockIdx.x = bl;
        kern(qkv, mask, out, n, heads, hd, has_mask);
        emu_block_bar->arrive_and_wait();
      }
    });
  for (auto& t : ts) t.join();
}

template <typename T> float tof(T v) { return attn_to_f32(v); }

template <typename T, typename K>
double run(K kern, const char* name, uint32_t B, uint32_t H, uint32_t n, uint32_t hd, bool masked, int offset, double tol_abs, double tol_rel) {
  std::mt19937 rng(B * 1000 + n * 7 + hd + masked + offset);
  std::normal_distribution<float> nd(0.f, 1.f);
  uint32_t D = H * hd;
  std::vector<T> buf(offset + (size_t)B * n * 3 * D);
  T* qkv = buf.data() + offset;
  for (size_t i = 0; i < (size_t)B * n * 3 * D; ++i) qkv[i] = attn_from_f32<T>(nd(rng) * (i % (3 * D) < D ? 0.4f : 1.f));
  std::vector<T> mask((size_t)n * n);
  for (uint32_t i = 0; i < n; ++i) for (uint32_t j = 0; j < n; ++j) mask[i * n + j] = attn_from_f32<T>(j > i ? -INFINITY : (masked ? 0.1f * nd(rng) : 0.f));
  std::vector<T> out((size_t)B * n * D, attn_from_f32<T>(12345.f));
  uint32_t tiles = (n + ATTN_ROWS - 1) / ATTN_ROWS;
  launch(kern, B * H * tiles, ATTN_WARPS * 32, qkv, mask.data(), out.data(), n, H, hd, masked ? 1 : 0);
  double worst = 0;
  std::vector<double> sc(n);
  for (uint32_t b = 0; b < B; ++b) for (uint32_t h = 0; h < H; ++h) for (uint32_t i = 0; i < n; ++i) {
    double mx = -INFINITY;
    for (uint32_t j = 0; j < n; ++j) {
      double s = 0;
      for (uint32_t d = 0; d < hd; ++d) s += (double)tof(qkv[((size_t)b * n + i) * 3 * D + h * hd + d]) * tof(qkv[((size_t)b * n + j) * 3 * D + D + h * hd + d]);
      if (masked) s += tof(mask[i * n + j]);
      sc[j] = s; mx = std::max(mx, s);
    }
    double sum = 0; for (uint32_t j = 0; j < n; ++j) { sc[j] = std::exp(sc[j] - mx); sum += sc[j]; }
    for (uint32_t d = 0; d < hd; ++d) {
      double c = 0;
      for (uint32_t j = 0; j < n; ++j) c += sc[j] / sum * tof(qkv[((size_t)b * n + j) * 3 * D + 2 * D + h * hd + d]);
      double g = tof(out[((size_t)b * n + i) * D + h * hd + d]);
      double e = std::fabs(g - c) / (tol_abs + tol_rel * std::fabs(c));
      if (!(e <= worst)) worst = e;  // NaN sticks
      if (std::isnan(e)) worst = NAN;
    }
  }
  printf("%-5s B=%u H=%u n=%3u hd=%3u mask=%d off=%d  err/tol %.3f %s\n", name, B, H, n, hd, masked, offset, worst, worst <= 1 ? "ok" : "FAIL");
  return worst;
}

int main() {
  int fails = 0;
  struct C { uint32_t B, H, n, hd; bool m; int off; };
  std::vector<C> cs = {{1,1,1,8,false,0},{2,3,5,64,true,0},{3,2,50,64,false,0},{1,2,33,40,true,1},{2,1,77,64,true,0},
                       {1,2,197,64,false,0},{1,1,257,64,true,2},{1,1,257,128,false,0},{3,1,32,72,true,0},{1,2,31,120,false,3},{1,1,64,16,true,0}};
  for (auto c : cs) {
    fails += !(run<float>(attention_f32, "f32", c.B, c.H, c.n, c.hd, c.m, c.off, 1e-5, 1e-4) <= 1);
    fails += !(run<__half>(attention_f16, "f16", c.B, c.H, c.n, c.hd, c.m, c.off, 1e-3, 2e-3) <= 1);
    fails += !(run<__nv_bfloat16>(attention_bf16, "bf16", c.B, c.H, c.n, c.hd, c.m, c.off, 8e-3, 1.6e-2) <= 1);
  }
  printf("%d failures\n", fails);
  return fails != 0;
}
