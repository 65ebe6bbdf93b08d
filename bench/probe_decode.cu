// Probe: the floor of a decode-step RoPE (M = 1) on this GPU, with L2 flushed before each call as
// bench_gpu.py does. Stand-alone minimal kernels (no oneflow_rope code), bf16 BMHK x (B, 1, 32,
// 128), one 16-byte vector pair per thread:
//   copy          x -> out (the bound's reference, as a plain kernel; cudaMemcpy printed too)
//   table+pos     position_ids[b] -> cos/sin row (two dependent DRAM round trips) -> rotate
//   offsets+freq  offsets[b] and the frequency table -> exact angle -> rotate
//   offsets       offsets[b] -> exact angle from frequencies computed in the kernel -> rotate
//   const-pos     the position a kernel argument (no dependent load) -> table row -> rotate
// Prints GPU us (median of 300) of each and its ratio to the copy kernel.
//   nvcc -O3 -std=c++17 -arch=sm_90 bench/probe_decode.cu -o /tmp/probe_decode && /tmp/probe_decode
// (`/tmp/probe_decode once` launches each kernel once, untimed: bench/run_gpu.sh step ncudecode)
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "probe_common.cuh"

constexpr int kH = 32, kK = 128, kUnits = kK / 16, kRows = 8192;

__global__ void CopyKernel(const uint4* __restrict__ x, uint4* __restrict__ y, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = x[i];
}

__device__ __forceinline__ void Unpack(const uint4& v, float* f) {
  const __nv_bfloat162* p = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const float2 t = __bfloat1622float2(p[e]);
    f[2 * e] = t.x;
    f[2 * e + 1] = t.y;
  }
}

// kMode 0: position_ids + table; 1: offsets + frequency table; 2: offsets, frequencies computed;
// 3: position from the argument + table.
template<int kMode>
__global__ void __launch_bounds__(256) DecodeRope(const __nv_bfloat16* __restrict__ x, __nv_bfloat16* __restrict__ y,
                                                  const long long* __restrict__ pos_ids, const __nv_bfloat16* __restrict__ cos,
                                                  const __nv_bfloat16* __restrict__ sin, const float2* __restrict__ freq,
                                                  int threads, long long const_pos) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  if (t >= threads) return;
  const int u = t % kUnits;
  const int bh = t / kUnits;
  const int b = bh / kH;
  const long long pos = kMode == 3 ? const_pos : __ldg(pos_ids + b);
  const __nv_bfloat16* xr = x + static_cast<long long>(bh) * kK;
  const int k0 = u * 8, k1 = k0 + kK / 2;
  const uint4 a = *reinterpret_cast<const uint4*>(xr + k0);
  const uint4 z = *reinterpret_cast<const uint4*>(xr + k1);
  float ca[8], sa[8], cz[8], sz[8];
  if (kMode == 0 || kMode == 3) {
    const __nv_bfloat16* cr = cos + pos * kK;
    const __nv_bfloat16* sr = sin + pos * kK;
    Unpack(__ldg(reinterpret_cast<const uint4*>(cr + k0)), ca);
    Unpack(__ldg(reinterpret_cast<const uint4*>(sr + k0)), sa);
    Unpack(__ldg(reinterpret_cast<const uint4*>(cr + k1)), cz);
    Unpack(__ldg(reinterpret_cast<const uint4*>(sr + k1)), sz);
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      float hi, lo;
      if (kMode == 1) {
        const float2 f = __ldg(freq + k0 + e);
        hi = f.x;
        lo = f.y;
      } else {
        hi = exp2f(-(k0 + e) * (13.287712379549449f / 64.f));  // 10000^(-i/64)
        lo = 0.f;
      }
      ExactSinCos(pos, hi, lo, &sa[e], &ca[e]);
      cz[e] = ca[e];
      sz[e] = sa[e];
    }
  }
  uint4 oa, oz;
  Rot(a, z, ca, sa, cz, sz, &oa, &oz);
  __nv_bfloat16* yr = y + static_cast<long long>(bh) * kK;
  *reinterpret_cast<uint4*>(yr + k0) = oa;
  *reinterpret_cast<uint4*>(yr + k1) = oz;
}

int main(int argc, char** argv) {
  // "once": launch each kernel once for B = 1 and 64 (no timing), for ncu
  const bool once = argc > 1 && std::string(argv[1]) == "once";
  __nv_bfloat16 *x, *y, *cos, *sin;
  long long* pos;
  float2* freq;
  const int max_b = 64;
  CHECK(cudaMalloc(&x, max_b * kH * kK * 2));
  CHECK(cudaMalloc(&y, max_b * kH * kK * 2));
  CHECK(cudaMalloc(&cos, kRows * kK * 2));
  CHECK(cudaMalloc(&sin, kRows * kK * 2));
  CHECK(cudaMalloc(&pos, max_b * 8));
  CHECK(cudaMalloc(&freq, 64 * sizeof(float2)));
  CHECK(cudaMemset(x, 0x3c, max_b * kH * kK * 2));
  CHECK(cudaMemset(cos, 0x3c, kRows * kK * 2));
  CHECK(cudaMemset(sin, 0x3c, kRows * kK * 2));
  std::vector<long long> hp(max_b);
  for (int b = 0; b < max_b; ++b) hp[b] = (b * 2654435761LL) % kRows;
  CHECK(cudaMemcpy(pos, hp.data(), max_b * 8, cudaMemcpyHostToDevice));
  std::vector<float2> hf(64);
  for (int i = 0; i < 64; ++i) {
    const double t = std::pow(10000.0, -i / 64.0);
    hf[i].x = static_cast<float>(t);
    hf[i].y = static_cast<float>(t - hf[i].x);
  }
  CHECK(cudaMemcpy(freq, hf.data(), sizeof(float2) * 64, cudaMemcpyHostToDevice));
  if (once) {
    for (int B : {1, 64}) {
      const int n = B * kH * kK * 2 / 16;
      const int threads = B * kH * kUnits;
      const int blocks = (threads + 255) / 256;
      CopyKernel<<<(n + 255) / 256, 256>>>((const uint4*)x, (uint4*)y, n);
      DecodeRope<0><<<blocks, 256>>>(x, y, pos, cos, sin, freq, threads, 0);
      DecodeRope<1><<<blocks, 256>>>(x, y, pos, cos, sin, freq, threads, 0);
      DecodeRope<2><<<blocks, 256>>>(x, y, pos, cos, sin, freq, threads, 0);
    }
    CHECK(cudaDeviceSynchronize());
    return 0;
  }
  FlushedTimer time(20, 300);
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, 0));
  std::printf("# %s: decode-step floors, bf16 (B, 1, %d, %d), L2 flushed, GPU us (median of 300)\n", prop.name, kH, kK);
  std::printf("%4s %10s %10s %10s %13s %10s %10s\n", "B", "memcpy", "copy", "table+pos", "offsets+freq", "offsets",
              "const-pos");
  for (int B : {1, 4, 16, 64}) {
    const int n = B * kH * kK * 2 / 16;  // 16-byte vectors
    const int threads = B * kH * kUnits;
    const int blocks = (threads + 255) / 256;
    const float memcpy_us = time([&] { cudaMemcpyAsync(y, x, B * kH * kK * 2, cudaMemcpyDeviceToDevice); });
    const float copy_us = time([&] { CopyKernel<<<(n + 255) / 256, 256>>>((const uint4*)x, (uint4*)y, n); });
    float us[4];
    us[0] = time([&] { DecodeRope<0><<<blocks, 256>>>(x, y, pos, cos, sin, freq, threads, 0); });
    us[1] = time([&] { DecodeRope<1><<<blocks, 256>>>(x, y, pos, cos, sin, freq, threads, 0); });
    us[2] = time([&] { DecodeRope<2><<<blocks, 256>>>(x, y, pos, cos, sin, freq, threads, 0); });
    us[3] = time([&] { DecodeRope<3><<<blocks, 256>>>(x, y, pos, cos, sin, freq, threads, 77); });
    std::printf("%4d %10.2f %10.2f", B, memcpy_us, copy_us);
    for (float u : us) std::printf(" %6.2f(%.2f)", u, u / copy_us);
    std::printf("\n");
  }
  return 0;
}
