// Probe: which thread mapping reaches the device's copy bandwidth for a rotate-half RoPE over a
// contiguous bf16 BMHK tensor (angles from base, shared by the batch)? Stand-alone (no torch, no
// oneflow_rope code), so the effect of each choice is seen alone. Prints GPU us (L2 flushed,
// median of 40) and the fraction of cudaMemcpy D2D and of a plain vector copy kernel.
//   nvcc -O3 -std=c++17 -arch=sm_90 bench/probe_mapping.cu -o /tmp/probe && /tmp/probe [B M H K]
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "probe_common.cuh"

__global__ void CopyKernel(const uint4* __restrict__ x, uint4* __restrict__ y, long long n) {
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) y[i] = x[i];
}

// kMode 0: default ld/st (the compiler may use the read-only path: x is __restrict__); 1: ld.cs /
// st.cs (streaming); 2: plain ld.global. kBatchLoop: the thread also loops over b
// (angles computed once for all b) in batches of kHeads items. kExact: angles as ExactSinCos
// (theta_lo from theta + K). Block (units, head lanes, rows).
template<int kHeads, int kMode, bool kBatchLoop, bool kExact = false, int kMinBlocks = 1>
__global__ void __launch_bounds__(256, kMinBlocks) RopeProbe(const __nv_bfloat16* __restrict__ x, __nv_bfloat16* __restrict__ y,
                                                 Shape sh, const float* __restrict__ theta, int rows_total) {
  const int units = sh.K / 16;  // 8 bf16 per vector, plane pairs -> K/16 units
  const int u = threadIdx.x;
  const int row = blockIdx.x * blockDim.z + threadIdx.z;
  if (row >= rows_total) return;
  const int b0 = kBatchLoop ? 0 : row / sh.M;
  const int m = kBatchLoop ? row : row - b0 * sh.M;
  const int nb = kBatchLoop ? sh.B : 1;
  const long long sm = (long long)sh.H * sh.K, sb = (long long)sh.M * sm;
  const int k0 = u * 8, k1 = k0 + sh.K / 2;
  (void)units;
  float c[8], s[8];
  bool have = false;
  for (int b = b0; b < b0 + nb; ++b) {
    for (int h0 = threadIdx.y; h0 < sh.H; h0 += blockDim.y * kHeads) {
      uint4 va[kHeads], vz[kHeads];
      long long off[kHeads];
#pragma unroll
      for (int i = 0; i < kHeads; ++i) {
        const int h = h0 + i * blockDim.y;
        off[i] = b * sb + m * sm + (long long)h * sh.K;
        if (h < sh.H) {
          const uint4* pa = reinterpret_cast<const uint4*>(x + off[i] + k0);
          const uint4* pz = reinterpret_cast<const uint4*>(x + off[i] + k1);
          if (kMode == 1) {
            va[i] = __ldcs(pa);
            vz[i] = __ldcs(pz);
          } else if (kMode == 2) {  // plain ld.global (not the read-only path __restrict__ allows)
            asm volatile("ld.global.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(va[i].x), "=r"(va[i].y), "=r"(va[i].z), "=r"(va[i].w) : "l"(pa));
            asm volatile("ld.global.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(vz[i].x), "=r"(vz[i].y), "=r"(vz[i].z), "=r"(vz[i].w) : "l"(pz));
          } else {
            va[i] = *pa;
            vz[i] = *pz;
          }
        }
      }
      if (!have) {
        have = true;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          if (kExact) {
            ExactSinCos(m, __ldg(theta + k0 + e), __ldg(theta + sh.K + k0 + e), &s[e], &c[e]);
          } else {
            __sincosf(m * __ldg(theta + k0 + e), &s[e], &c[e]);
          }
        }
      }
#pragma unroll
      for (int i = 0; i < kHeads; ++i) {
        const int h = h0 + i * blockDim.y;
        if (h < sh.H) {
          uint4 oa, oz;
          Rot(va[i], vz[i], c, s, c, s, &oa, &oz);
          uint4* qa = reinterpret_cast<uint4*>(y + off[i] + k0);
          uint4* qz = reinterpret_cast<uint4*>(y + off[i] + k1);
          if (kMode == 1) {
            __stcs(qa, oa);
            __stcs(qz, oz);
          } else {
            *qa = oa;
            *qz = oz;
          }
        }
      }
    }
  }
}

#ifdef PROBE_LIB
// Entry for bench/probe_torch.py (nvcc -DPROBE_LIB -shared): the exact-angle 2-head kernel (plain
// ld.global) on caller-owned x, y and theta (2K floats: hi then lo), blocks of (K/16) units x
// min(16, H/2) head lanes x as many rows as fit in block_threads, on the given stream; min_blocks
// 4 takes the instance whose launch bounds cap it at 64 registers (else 79: 24 warps per SM).
extern "C" int LaunchProbe(const void* x, void* y, int B, int M, int H, int K, const float* theta, int block_threads,
                           int min_blocks, cudaStream_t stream) {
  const Shape sh{B, M, H, K};
  const int units = K / 16;
  const int head_lanes = std::max(1, std::min(16, H / 2));
  const int rows_total = B * M;
  const int rows_per_block = std::max(1, block_threads / (units * head_lanes));
  dim3 block(units, head_lanes, rows_per_block);
  const int blocks = (rows_total + rows_per_block - 1) / rows_per_block;
  const auto* xb = static_cast<const __nv_bfloat16*>(x);
  auto* yb = static_cast<__nv_bfloat16*>(y);
  if (min_blocks >= 4) {  // launch bounds (256, 4): at most 64 registers, 32 warps per SM
    RopeProbe<2, 2, false, true, 4><<<blocks, block, 0, stream>>>(xb, yb, sh, theta, rows_total);
  } else {
    RopeProbe<2, 2, false, true><<<blocks, block, 0, stream>>>(xb, yb, sh, theta, rows_total);
  }
  return static_cast<int>(cudaGetLastError());
}
#else
int main(int argc, char** argv) {
  const Shape sh = ShapeFromArgs(argc, argv);
  const long long n = (long long)sh.B * sh.M * sh.H * sh.K;
  const size_t bytes = n * 2;
  __nv_bfloat16 *x, *y;
  float* theta;
  CHECK(cudaMalloc(&x, bytes));
  CHECK(cudaMalloc(&y, bytes));
  CHECK(cudaMalloc(&theta, 2 * sh.K * sizeof(float)));
  CHECK(cudaMemset(x, 0x3c, bytes));
  std::vector<float> th(2 * sh.K);
  for (int i = 0; i < sh.K; ++i) {
    const double t = pow(10000.0, -2.0 * (i % (sh.K / 2)) / sh.K);
    th[i] = static_cast<float>(t);
    th[sh.K + i] = static_cast<float>(t - static_cast<double>(th[i]));
  }
  CHECK(cudaMemcpy(theta, th.data(), 2 * sh.K * sizeof(float), cudaMemcpyHostToDevice));
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  FlushedTimer time(5, 40);
  const float memcpy_us = time([&] { cudaMemcpyAsync(y, x, bytes, cudaMemcpyDeviceToDevice); });
  const long long nv = bytes / 16;
  float copy_us = 1e30f;
  for (int per : {1, 2, 4, 8}) {
    const long long blocks = (nv + 256LL * per - 1) / (256LL * per);
    copy_us = std::min(copy_us, time([&] { CopyKernel<<<(unsigned)blocks, 256>>>((const uint4*)x, (uint4*)y, nv); }));
  }
  std::printf("# shape (%d,%d,%d,%d) bf16, %.1f MiB; cudaMemcpy %.2f us (%.2f TB/s), copy kernel %.2f us\n", sh.B, sh.M, sh.H,
              sh.K, bytes / 1048576.0, memcpy_us, 2.0 * bytes / memcpy_us * 1e-6, copy_us);
  auto report = [&](const char* name, float us) {
    std::printf("%-44s %8.2f us  memcpy/ours %.3f  copykernel/ours %.3f\n", name, us, memcpy_us / us, copy_us / us);
  };
  const int units = sh.K / 16;
  auto run = [&](const char* name, auto kernel, int head_lanes, int heads, bool batch_loop) {
    head_lanes = std::max(1, std::min(head_lanes, sh.H / heads));  // no idle lanes on few heads
    const int rows_total = batch_loop ? sh.M : sh.B * sh.M;
    const int per_row = std::max(1, head_lanes);
    const int row_lanes = std::max(1, 256 / (units * per_row));
    dim3 block(units, head_lanes, row_lanes);
    const int blocks = (rows_total + row_lanes - 1) / row_lanes;
    (void)heads;
    report(name, time([&] { kernel<<<blocks, block>>>(x, y, sh, theta, rows_total); }));
  };
  char name[128];
#define RUN(KH, MODE, BL, LANES)                                                                 \
  std::snprintf(name, sizeof name, "heads/thread %d mode %d batchloop %d lanes %d", KH, MODE, BL, LANES); \
  run(name, RopeProbe<KH, MODE, BL>, LANES, KH, BL)
#define RUNX(KH, BL, LANES)                                                                      \
  std::snprintf(name, sizeof name, "exact angle: heads/thread %d batchloop %d lanes %d", KH, BL, LANES); \
  run(name, RopeProbe<KH, 0, BL, true>, LANES, KH, BL)
#define RUNXP(KH, LANES)                                                                         \
  std::snprintf(name, sizeof name, "exact angle, plain ld.global: heads/thread %d lanes %d", KH, LANES); \
  run(name, RopeProbe<KH, 2, false, true>, LANES, KH, false)
  RUNXP(2, 16);
  RUNXP(4, 8);
  RUNX(1, false, 32);
  RUNX(2, false, 16);
  RUNX(4, false, 8);
  RUNX(4, true, 8);
  RUN(1, 0, false, 32);
  RUN(2, 0, false, 16);
  RUN(4, 0, false, 8);
  RUN(8, 0, false, 4);
  RUN(4, 1, false, 8);
  RUN(8, 1, false, 4);
  RUN(2, 0, true, 16);
  RUN(4, 0, true, 8);
  RUN(8, 0, true, 4);
  RUN(4, 1, true, 8);
  return 0;
}
#endif  // PROBE_LIB
