// Probe (sm_90): does a shared-memory pipeline fed by bulk asynchronous copies (cp.async.bulk,
// the copy engine of Hopper's TMA) get a rotate-half RoPE with cos/sin tables and position_ids
// closer to the copy than a thread-per-vector kernel (bench/probe_table.cu: 0.87-0.94 of
// cudaMemcpy)? Stand-alone, bf16 BMHK x (B, M, H, K) contiguous, bf16 tables (P, K), int64
// position_ids (B, M). A persistent block loops over tiles of T whole tokens: one thread issues the
// bulk copy of the tile's x (T * H * K * 2 contiguous bytes) and, once the tokens' positions are
// in, of their cos and sin rows, into one of S shared-memory stages (an mbarrier counts the bytes);
// every thread then rotates its vectors from shared memory and stores them to global memory. The
// positions of a stage's tokens are loaded an iteration before they are needed. Checked against a
// plain kernel before timing.
//   nvcc -O3 -std=c++17 -arch=sm_90 bench/probe_bulk.cu -o /tmp/probe_bulk && /tmp/probe_bulk [B M H K]
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "probe_common.cuh"

struct Args {
  const __nv_bfloat16* x;
  __nv_bfloat16* y;
  const __nv_bfloat16* cos;
  const __nv_bfloat16* sin;
  const long long* pos;
  Shape sh;
  int tokens;  // B * M
  int tile;    // tokens per tile (T)
  int tiles;
  bool table;  // false: x only (cos = 1, sin = 0), the pipeline's own ceiling
};

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void BarInit(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(SmemAddr(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void BarExpect(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(SmemAddr(bar)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void BarWait(uint64_t* bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
        : "=r"(done)
        : "r"(SmemAddr(bar)), "r"(parity)
        : "memory");
  } while (!done);
}
__device__ __forceinline__ void BulkLoad(void* smem_dst, const void* gmem_src, uint32_t bytes, uint64_t* bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                   SmemAddr(smem_dst)),
               "l"(gmem_src), "r"(bytes), "r"(SmemAddr(bar))
               : "memory");
}

template<int S>
__global__ void __launch_bounds__(256) BulkRope(const Args a) {
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ uint64_t full[S];
  const Shape sh = a.sh;
  const int token_elems = sh.H * sh.K;
  const uint32_t x_bytes = static_cast<uint32_t>(a.tile) * token_elems * 2;
  const uint32_t row_bytes = static_cast<uint32_t>(sh.K) * 2;
  const uint32_t stage_bytes = x_bytes + (a.table ? 2u * row_bytes * a.tile : 0u);
  auto stage_x = [&](int s) { return reinterpret_cast<__nv_bfloat16*>(smem + static_cast<size_t>(s) * stage_bytes); };
  auto stage_tab = [&](int s) { return reinterpret_cast<__nv_bfloat16*>(smem + static_cast<size_t>(s) * stage_bytes + x_bytes); };
  if (threadIdx.x == 0) {
    for (int s = 0; s < S; ++s) BarInit(&full[s], 1);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  // tile j of this block is tile blockIdx.x + j * gridDim.x
  auto tile_of = [&](int j) { return static_cast<int>(blockIdx.x) + j * static_cast<int>(gridDim.x); };
  // warp 0: lane t < T loads token t's position of tile j (before it is needed), then issues the copies
  auto load_pos = [&](int j) -> long long {
    const int tl = tile_of(j);
    const int tok = tl * a.tile + lane;
    return (a.table && tl < a.tiles && lane < a.tile && tok < a.tokens) ? __ldg(a.pos + tok) : 0;
  };
  auto issue = [&](int j, long long p) {
    const int tl = tile_of(j);
    if (tl >= a.tiles) return;
    const int s = j % S;
    const int first = tl * a.tile;
    const int n = min(a.tile, a.tokens - first);
    const uint32_t xb = static_cast<uint32_t>(n) * token_elems * 2;
    if (lane == 0) BarExpect(&full[s], xb + (a.table ? 2u * row_bytes * n : 0u));
    __syncwarp();
    if (lane == 0) BulkLoad(stage_x(s), a.x + static_cast<size_t>(first) * token_elems, xb, &full[s]);
    if (a.table && lane < n) {
      __nv_bfloat16* tab = stage_tab(s) + static_cast<size_t>(lane) * 2 * sh.K;
      BulkLoad(tab, a.cos + p * sh.K, row_bytes, &full[s]);
      BulkLoad(tab + sh.K, a.sin + p * sh.K, row_bytes, &full[s]);
    }
  };
  long long next_p = 0;
  if (warp == 0) {
    for (int j = 0; j < S; ++j) issue(j, load_pos(j));
    next_p = load_pos(S);
  }
  const int half = sh.K / 2;
  const int units_per_head = half / 8;
  for (int j = 0; tile_of(j) < a.tiles; ++j) {
    const int s = j % S;
    const int tl = tile_of(j);
    const int first = tl * a.tile;
    const int n = min(a.tile, a.tokens - first);
    BarWait(&full[s], static_cast<uint32_t>((j / S) & 1));
    const __nv_bfloat16* xs = stage_x(s);
    const __nv_bfloat16* tab = stage_tab(s);
    const int units = n * sh.H * units_per_head;
    for (int w = threadIdx.x; w < units; w += blockDim.x) {
      const int u = w % units_per_head;
      const int th = w / units_per_head;  // token * H + head
      const int t = th / sh.H;
      const int k0 = u * 8, k1 = k0 + half;
      const uint4 va = *reinterpret_cast<const uint4*>(xs + static_cast<size_t>(th) * sh.K + k0);
      const uint4 vz = *reinterpret_cast<const uint4*>(xs + static_cast<size_t>(th) * sh.K + k1);
      uint4 oa, oz;
      if (a.table) {
        const __nv_bfloat16* c = tab + static_cast<size_t>(t) * 2 * sh.K;
        const __nv_bfloat16* sn = c + sh.K;
        TableRot(va, vz, *reinterpret_cast<const uint4*>(c + k0), *reinterpret_cast<const uint4*>(sn + k0),
                 *reinterpret_cast<const uint4*>(c + k1), *reinterpret_cast<const uint4*>(sn + k1), &oa, &oz);
      } else {
        float one[8], zero[8];
#pragma unroll
        for (int e = 0; e < 8; ++e) one[e] = 1.f, zero[e] = 0.f;
        Rot(va, vz, one, zero, one, zero, &oa, &oz);
      }
      __nv_bfloat16* y = a.y + static_cast<size_t>(first) * token_elems + static_cast<size_t>(th) * sh.K;
      *reinterpret_cast<uint4*>(y + k0) = oa;
      *reinterpret_cast<uint4*>(y + k1) = oz;
    }
    __syncthreads();  // stage s is free again
    if (warp == 0) {
      issue(j + S, next_p);
      next_p = load_pos(j + S + 1);
    }
  }
}

// The plain reference: a thread per (token, head, unit).
__global__ void RefRope(const Args a) {
  const Shape sh = a.sh;
  const int units_per_head = sh.K / 16;
  const long long w = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x;
  if (w >= static_cast<long long>(a.tokens) * sh.H * units_per_head) return;
  const int u = static_cast<int>(w % units_per_head);
  const long long th = w / units_per_head;
  const long long tok = th / sh.H;
  const int k0 = u * 8, k1 = k0 + sh.K / 2;
  const __nv_bfloat16* x = a.x + th * sh.K;
  float ca[8], sa[8], cz[8], sz[8];
  const long long p = a.table ? a.pos[tok] : 0;
  for (int e = 0; e < 8; ++e) {
    ca[e] = a.table ? __bfloat162float(a.cos[p * sh.K + k0 + e]) : 1.f;
    sa[e] = a.table ? __bfloat162float(a.sin[p * sh.K + k0 + e]) : 0.f;
    cz[e] = a.table ? __bfloat162float(a.cos[p * sh.K + k1 + e]) : 1.f;
    sz[e] = a.table ? __bfloat162float(a.sin[p * sh.K + k1 + e]) : 0.f;
  }
  uint4 oa, oz;
  Rot(*reinterpret_cast<const uint4*>(x + k0), *reinterpret_cast<const uint4*>(x + k1), ca, sa, cz, sz, &oa, &oz);
  *reinterpret_cast<uint4*>(a.y + th * sh.K + k0) = oa;
  *reinterpret_cast<uint4*>(a.y + th * sh.K + k1) = oz;
}

int main(int argc, char** argv) {
  const Shape sh = ShapeFromArgs(argc, argv);
  const int P = 8192;
  const long long n = (long long)sh.B * sh.M * sh.H * sh.K;
  const size_t bytes = n * 2;
  Args a{};
  a.sh = sh;
  a.tokens = sh.B * sh.M;
  __nv_bfloat16 *x, *y, *yref;
  CHECK(cudaMalloc(&x, bytes));
  CHECK(cudaMalloc(&y, bytes));
  CHECK(cudaMalloc(&yref, bytes));
  const TableInputs tables = MakeTableInputs(sh, P, a.tokens);
  std::mt19937 rng(1);
  {
    std::vector<uint16_t> h(n);
    for (auto& v : h) v = 0x3c00 + (rng() & 0xff);
    CHECK(cudaMemcpy(x, h.data(), bytes, cudaMemcpyHostToDevice));
    std::vector<uint16_t> t((size_t)P * sh.K);
    for (auto& v : t) v = 0x3e00 + (rng() & 0xff);
    CHECK(cudaMemcpy(tables.cos, t.data(), t.size() * 2, cudaMemcpyHostToDevice));
    for (auto& v : t) v = 0x3d00 + (rng() & 0xff);
    CHECK(cudaMemcpy(tables.sin, t.data(), t.size() * 2, cudaMemcpyHostToDevice));
  }
  FillPositions(tables.pos, a.tokens, P, rng);
  a.x = x, a.y = y, a.cos = tables.cos, a.sin = tables.sin, a.pos = tables.pos;
  int sms = 0;
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
  FlushedTimer time(5, 40);
  const float memcpy_us = time([&] { cudaMemcpyAsync(y, x, bytes, cudaMemcpyDeviceToDevice); });
  PrintTableHeader(sh, bytes, P, memcpy_us);
  std::vector<uint16_t> got(n), want(n);
  auto run = [&](auto kernel, int stages, int tile_kib, bool table) {
    a.table = table;
    a.tile = std::min(32, std::max(1, tile_kib * 1024 / (sh.H * sh.K * 2)));  // warp 0 lanes issue the rows
    a.tiles = (a.tokens + a.tile - 1) / a.tile;
    const size_t stage_bytes = (size_t)a.tile * sh.H * sh.K * 2 + (table ? 2 * (size_t)sh.K * 2 * a.tile : 0);
    const size_t smem = stage_bytes * stages;
    if (smem > 200 * 1024) return;
    CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    int per_sm = 0;
    CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, 256, smem));
    const int grid = std::min(a.tiles, sms * std::max(1, per_sm));
    // check against the plain kernel
    const long long threads = (long long)a.tokens * sh.H * (sh.K / 16);
    Args r = a;
    r.y = yref;
    RefRope<<<(unsigned)((threads + 255) / 256), 256>>>(r);
    CHECK(cudaMemset(y, 0, bytes));
    kernel<<<grid, 256, smem>>>(a);
    CHECK(cudaDeviceSynchronize());
    CHECK(cudaMemcpy(got.data(), y, bytes, cudaMemcpyDeviceToHost));
    CHECK(cudaMemcpy(want.data(), yref, bytes, cudaMemcpyDeviceToHost));
    const bool same = std::memcmp(got.data(), want.data(), bytes) == 0;
    const float us = time([&] { kernel<<<grid, 256, smem>>>(a); });
    const float ref_us = time([&] { RefRope<<<(unsigned)((threads + 255) / 256), 256>>>(r); });
    std::printf("%-6s stages %d tile %2d tokens (%3zu KiB smem) %d blocks/SM: %8.2f us memcpy/ours %.3f  %s  (plain kernel %.2f us, %.3f)\n",
                table ? "table" : "x-only", stages, a.tile, smem / 1024, per_sm, us, memcpy_us / us,
                same ? "matches" : "MISMATCH", ref_us, memcpy_us / ref_us);
  };
  for (bool table : {false, true}) {
    run(BulkRope<2>, 2, 16, table);
    run(BulkRope<3>, 3, 16, table);
    run(BulkRope<4>, 4, 16, table);
    run(BulkRope<4>, 4, 8, table);
    run(BulkRope<6>, 6, 8, table);
    run(BulkRope<3>, 3, 32, table);
    run(BulkRope<2>, 2, 48, table);
  }
  return 0;
}
