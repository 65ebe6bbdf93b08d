// Probe: how close to the copy can a rotate-half RoPE with cos/sin tables and position_ids get on
// this device, and in which order should a thread wait for its position? Stand-alone (no torch, no
// oneflow_rope code): bf16 BMHK x (B, M, H, K), bf16 tables (P, K) (full width, like the bench's),
// int64 position_ids (B, M) drawn in [0, P). A thread rotates one 16-byte vector and its partner
// for kHeads heads of one token. Prints GPU us (L2 flushed, median of 40) against cudaMemcpy of
// x's bytes.
//   nvcc -O3 -std=c++17 -arch=sm_90 bench/probe_table.cu -o /tmp/probe_table && /tmp/probe_table [B M H K]
// kOrder:
//   0  position first: wait for it, then issue the x loads and the table loads together (what
//      oneflow_rope's large calls do);
//   1  x loads first, then the position, then the table (what its small-call kernel does);
//   2  persistent grid: each thread loops over tokens and loads the next token's position while
//      it works on the current one (x and table loads go out together, the position is ready);
//   3  no position_ids: the table row is the token's m (no dependent load; a reference);
//   4  as 0, but one thread per token loads the position into shared memory and the block waits
//      at a barrier (one position load per token instead of one per thread);
//   5  every token reads table row 0 (as 3: no dependent load, and every thread reads the same lines);
//   6  no table: constant cos/sin in registers (the traffic of x alone, same mapping);
//   7  x loads first; the threads of head lane 0 load the position and the token's table vectors
//      into shared memory; a barrier; every thread reads its cos/sin from there (one table read per
//      token and unit instead of one per head lane).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "probe_common.cuh"

struct Args {
  const __nv_bfloat16* x;
  __nv_bfloat16* y;
  const __nv_bfloat16* cos;
  const __nv_bfloat16* sin;
  const long long* pos;
  Shape sh;
  int rows_total;
};

template<int kHeads, int kOrder>
__global__ void __launch_bounds__(256) TableProbe(const Args a) {
  const Shape sh = a.sh;
  const int u = threadIdx.x;
  const int k0 = u * 8, k1 = k0 + sh.K / 2;
  const long long sm = (long long)sh.H * sh.K;
  const int rows_per_block = blockDim.z;
  __shared__ long long block_pos[32];
  __shared__ uint4 block_tab[kOrder == 7 ? 32 * 8 * 4 : 1];  // [token][unit][c0 s0 c1 s1] (K <= 128)
  int row = blockIdx.x * rows_per_block + threadIdx.z;
  const int row_step = gridDim.x * rows_per_block;
  long long next_pos = 0;
  if (kOrder == 2 && row < a.rows_total) next_pos = __ldg(a.pos + row);
  if (kOrder == 4) {
    if (u == 0 && threadIdx.y == 0 && row < a.rows_total) block_pos[threadIdx.z] = __ldg(a.pos + row);
    __syncthreads();
  }
  for (; row < a.rows_total; row += row_step) {
    const int b = row / sh.M, m = row - b * sh.M;
    long long p = 0;
    if (kOrder == 0) p = __ldg(a.pos + row);
    if (kOrder == 2) {
      p = next_pos;
      if (row + row_step < a.rows_total) next_pos = __ldg(a.pos + row + row_step);
    }
    if (kOrder == 3) p = m;
    if (kOrder == 4) p = block_pos[threadIdx.z];
    if (kOrder == 5) p = 0;
    for (int h0 = threadIdx.y; h0 < sh.H; h0 += blockDim.y * kHeads) {
      uint4 va[kHeads], vz[kHeads];
      long long off[kHeads];
#pragma unroll
      for (int i = 0; i < kHeads; ++i) {
        const int h = h0 + i * blockDim.y;
        off[i] = (long long)row * sm + (long long)h * sh.K;
        if (h < sh.H) {
          va[i] = *reinterpret_cast<const uint4*>(a.x + off[i] + k0);
          vz[i] = *reinterpret_cast<const uint4*>(a.x + off[i] + k1);
        }
      }
      if (kOrder == 1) p = __ldg(a.pos + row);
      uint4 c0, s0, c1, s1;
      if constexpr (kOrder == 6) {
        c0 = c1 = make_uint4(0x3f803f80u, 0x3f803f80u, 0x3f803f80u, 0x3f803f80u);
        s0 = s1 = make_uint4(0, 0, 0, 0);
      } else if constexpr (kOrder == 7) {
        uint4* slot = block_tab + (threadIdx.z * blockDim.x + u) * 4;
        if (threadIdx.y == 0) {
          const long long t = __ldg(a.pos + row) * sh.K;
          slot[0] = __ldg(reinterpret_cast<const uint4*>(a.cos + t + k0));
          slot[1] = __ldg(reinterpret_cast<const uint4*>(a.sin + t + k0));
          slot[2] = __ldg(reinterpret_cast<const uint4*>(a.cos + t + k1));
          slot[3] = __ldg(reinterpret_cast<const uint4*>(a.sin + t + k1));
        }
        __syncthreads();
        c0 = slot[0], s0 = slot[1], c1 = slot[2], s1 = slot[3];
      } else {
        const long long t = p * sh.K;
        c0 = __ldg(reinterpret_cast<const uint4*>(a.cos + t + k0));
        s0 = __ldg(reinterpret_cast<const uint4*>(a.sin + t + k0));
        c1 = __ldg(reinterpret_cast<const uint4*>(a.cos + t + k1));
        s1 = __ldg(reinterpret_cast<const uint4*>(a.sin + t + k1));
      }
#pragma unroll
      for (int i = 0; i < kHeads; ++i) {
        const int h = h0 + i * blockDim.y;
        if (h < sh.H) {
          uint4 oa, oz;
          TableRot(va[i], vz[i], c0, s0, c1, s1, &oa, &oz);
          *reinterpret_cast<uint4*>(a.y + off[i] + k0) = oa;
          *reinterpret_cast<uint4*>(a.y + off[i] + k1) = oz;
        }
      }
    }
    if (kOrder != 2) break;  // a block per piece (the persistent grid loops)
  }
}

int main(int argc, char** argv) {
  const Shape sh = ShapeFromArgs(argc, argv);
  const int P = 8192;
  const long long n = (long long)sh.B * sh.M * sh.H * sh.K;
  const size_t bytes = n * 2;
  Args a{};
  a.sh = sh;
  a.rows_total = sh.B * sh.M;
  __nv_bfloat16 *x, *y;
  CHECK(cudaMalloc(&x, bytes));
  CHECK(cudaMalloc(&y, bytes));
  const TableInputs t = MakeTableInputs(sh, P, a.rows_total);
  CHECK(cudaMemset(x, 0x3c, bytes));
  CHECK(cudaMemset(t.cos, 0x3c, (size_t)P * sh.K * 2));
  CHECK(cudaMemset(t.sin, 0x3c, (size_t)P * sh.K * 2));
  std::mt19937 rng(1);
  FillPositions(t.pos, a.rows_total, P, rng);
  a.x = x, a.y = y, a.cos = t.cos, a.sin = t.sin, a.pos = t.pos;
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  FlushedTimer time(5, 40);
  const float memcpy_us = time([&] { cudaMemcpyAsync(y, x, bytes, cudaMemcpyDeviceToDevice); });
  PrintTableHeader(sh, bytes, P, memcpy_us);
  const int units = sh.K / 16;
  auto run = [&](const char* name, auto kernel, int heads, int lanes_wanted) {
    const int lanes = std::max(1, std::min(lanes_wanted, (sh.H + heads - 1) / heads));
    const int row_lanes = std::max(1, std::min(32, 128 / (units * lanes)));
    dim3 block(units, lanes, row_lanes);
    int blocks = (a.rows_total + row_lanes - 1) / row_lanes;
    int per_sm = 0;
    CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, units * lanes * row_lanes, 0));
    if (std::string(name).find("order 2") != std::string::npos) blocks = std::min(blocks, sms * per_sm);
    cudaFuncAttributes attr;
    CHECK(cudaFuncGetAttributes(&attr, kernel));
    const float us = time([&] { kernel<<<blocks, block>>>(a); });
    std::printf("%-34s block (%d,%d,%d) %3d regs %2d blocks/SM %8.2f us  memcpy/ours %.3f\n", name, units, lanes, row_lanes,
                attr.numRegs, per_sm, us, memcpy_us / us);
  };
  char name[96];
#define RUN(KH, ORDER, LANES)                                                          \
  std::snprintf(name, sizeof name, "heads %d order %d lanes %d", KH, ORDER, LANES); \
  run(name, TableProbe<KH, ORDER>, KH, LANES)
  for (int order_pass = 0; order_pass < 1; ++order_pass) {
    RUN(1, 3, 32); RUN(2, 3, 16); RUN(4, 3, 8);
    RUN(1, 0, 32); RUN(2, 0, 16); RUN(4, 0, 8); RUN(8, 0, 4);
    RUN(1, 1, 32); RUN(2, 1, 16); RUN(4, 1, 8);
    RUN(1, 2, 32); RUN(2, 2, 16); RUN(4, 2, 8);
    RUN(1, 4, 32); RUN(2, 4, 16); RUN(4, 4, 8);
    RUN(1, 0, 4); RUN(2, 0, 4); RUN(1, 1, 4);
    RUN(1, 5, 32); RUN(2, 5, 16); RUN(4, 5, 8);
    RUN(1, 6, 32); RUN(2, 6, 16); RUN(4, 6, 8);
    RUN(1, 7, 32); RUN(2, 7, 16); RUN(4, 7, 8);
  }
  return 0;
}
