// Probe: does the layout of a kernel's arguments cost time at its start? A kernel's arguments live
// in constant bank 0; each SM's constant caches start cold, and a warp that meets an instruction
// whose constant operand misses waits for it before it issues anything else. A kernel whose
// index math reads fields spread over many cache lines may wait several round trips before its
// first load; one with its fields in one line waits one.
//
// Every kernel here copies the same bytes (16-byte vectors, 4 per thread, 128-thread blocks, as
// RopeSmallKernel moves 4 vectors per thread); they differ only in which argument fields the index
// math reads before the loads: none beyond the pointers ("compact"), 6 fields in one 64-byte line
// ("packed"), or 6 fields 64 / 104 bytes apart in a 640-byte struct ("spread64", "spread104").
// The fields hold 1 and 0 so every variant computes the same index. Prints GPU us (L2 flushed,
// median) per variant and size.
//   nvcc -O3 -std=c++17 -arch=sm_90 bench/probe_params.cu -o /tmp/probe_params && /tmp/probe_params
#include <cuda_runtime.h>

#include <cstdio>
#include <cstring>

#include "probe_common.cuh"

struct Big {
  long long f[80];  // 640 bytes, like the whole RopeParams
};

// kStride 0: no fields read; else fields f[0], f[kStride], ..., f[5 * kStride] (8-byte units; 13:
// 104 bytes apart, the last at byte 520)
template<int kStride>
__global__ void __launch_bounds__(128) CopyArgs(const uint4* __restrict__ x, uint4* __restrict__ y, long long n,
                                                const Big big) {
  long long i = blockIdx.x * 4LL * blockDim.x + threadIdx.x;
  if (kStride > 0) {
    // i * 1 + 0, with each factor and term read from another field: serial uses of the constants
    i = i * big.f[0] + big.f[kStride];
    i = i * big.f[2 * kStride] + big.f[3 * kStride];
    i = i * big.f[4 * kStride] + big.f[5 * kStride];
  }
  uint4 v[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const long long j = i + k * blockDim.x;
    if (j < n) v[k] = x[j];
  }
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const long long j = i + k * blockDim.x;
    if (j < n) y[j] = v[k];
  }
}

// Arguments for stride s: factors f[0], f[2s], f[4s] = 1, terms f[s], f[3s], f[5s] = 0.
Big ArgsFor(int s) {
  Big big;
  std::memset(&big, 0, sizeof big);
  for (int q = 0; q < 6; q += 2) big.f[q * s] = 1;
  return big;
}

int main() {
  FlushedTimer time(5, 60);
  std::printf("# argument placement at a kernel's start: GPU us (L2 flushed before each call, median of 60)\n");
  std::printf("%10s %10s %10s %10s %10s %10s %10s\n", "bytes", "memcpy", "compact", "packed", "spread64",
              "spread104", "spread-compact");
  for (size_t bytes : {size_t{64} << 10, size_t{1} << 20, size_t{32} << 20, size_t{128} << 20}) {
    uint4 *x, *y;
    CHECK(cudaMalloc(&x, bytes));
    CHECK(cudaMalloc(&y, bytes));
    CHECK(cudaMemset(x, 1, bytes));
    const long long n = bytes / 16;
    const unsigned blocks = (unsigned)((n + 4 * 128 - 1) / (4 * 128));
    const float mc = time([&] { cudaMemcpyAsync(y, x, bytes, cudaMemcpyDeviceToDevice); });
    const float c0 = time([&] { CopyArgs<0><<<blocks, 128>>>(x, y, n, ArgsFor(1)); });
    const float c1 = time([&] { CopyArgs<1><<<blocks, 128>>>(x, y, n, ArgsFor(1)); });
    const float c8 = time([&] { CopyArgs<8><<<blocks, 128>>>(x, y, n, ArgsFor(8)); });
    const float c13 = time([&] { CopyArgs<13><<<blocks, 128>>>(x, y, n, ArgsFor(13)); });
    std::printf("%10zu %10.2f %10.2f %10.2f %10.2f %10.2f %10.2f\n", bytes, mc, c0, c1, c8, c13, c13 - c0);
    CHECK(cudaFree(x));
    CHECK(cudaFree(y));
  }
  return 0;
}
