// Shared by the stand-alone probes (bench/probe_*.cu): error checks, oneflow_rope's angle, and the
// timer the GPU bench's method uses (L2 flushed before each call, one event pair, median).
#ifndef ONEFLOW_ROPE_BENCH_PROBE_COMMON_CUH_
#define ONEFLOW_ROPE_BENCH_PROBE_COMMON_CUH_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#define CHECK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) { std::printf("%s: %s\n", #x, cudaGetErrorString(e_)); std::exit(1); } } while (0)

// A bf16 BMHK tensor's shape (probe_mapping.cu, probe_table.cu, probe_bulk.cu).
struct Shape { int B, M, H, K; };

// The probe's shape: B M H K from the command line, else (4, 4096, 32, 128).
inline Shape ShapeFromArgs(int argc, char** argv) {
  if (argc == 5) return {atoi(argv[1]), atoi(argv[2]), atoi(argv[3]), atoi(argv[4])};
  return {4, 4096, 32, 128};
}

// The cos/sin tables and position_ids of the table probes (probe_table.cu, probe_bulk.cu) on the
// device: two bf16 tables of (P, K) and `tokens` int64 positions, unfilled (FillPositions; each
// probe fills the tables its own way).
struct TableInputs {
  __nv_bfloat16* cos = nullptr;
  __nv_bfloat16* sin = nullptr;
  long long* pos = nullptr;
};
inline TableInputs MakeTableInputs(const Shape& sh, int P, long long tokens) {
  TableInputs t;
  CHECK(cudaMalloc(&t.cos, (size_t)P * sh.K * 2));
  CHECK(cudaMalloc(&t.sin, (size_t)P * sh.K * 2));
  CHECK(cudaMalloc(&t.pos, (size_t)tokens * 8));
  return t;
}
// `tokens` positions drawn from rng in [0, P), copied to pos.
inline void FillPositions(long long* pos, long long tokens, int P, std::mt19937& rng) {
  std::vector<long long> hp(tokens);
  for (auto& v : hp) v = rng() % P;
  CHECK(cudaMemcpy(pos, hp.data(), hp.size() * 8, cudaMemcpyHostToDevice));
}

// The first line of a table probe's output.
inline void PrintTableHeader(const Shape& sh, size_t bytes, int P, float memcpy_us) {
  std::printf("# shape (%d,%d,%d,%d) bf16, %.1f MiB, tables (%d, %d) bf16, int64 position_ids; cudaMemcpy %.2f us\n",
              sh.B, sh.M, sh.H, sh.K, bytes / 1048576.0, P, sh.K, memcpy_us);
}

// The angle as oneflow_rope computes it: int64 position times theta as a float (hi, lo) pair in
// float-float, reduced by 2*pi with a three-part constant, then the hardware sincos.
__device__ __forceinline__ void ExactSinCos(long long pos, float hi, float lo, float* s, float* c) {
  const float pf = static_cast<float>(pos);
  const float pl = static_cast<float>(pos - static_cast<long long>(pf));
  const float prod = pf * hi;
  const float err = fmaf(pf, hi, -prod);
  const float tail = fmaf(pf, lo, fmaf(pl, hi, err));
  const float k = rintf(prod * 0.15915494309189535f);
  float r = fmaf(-k, 6.28318548202514648f, prod);
  r = fmaf(-k, -1.7484555314695172e-07f, r);
  r = fmaf(-k, -6.8604980400235275e-15f, r);
  __sincosf(r + tail, s, c);
}

// Rotate-half of 8 bf16 dims of a (first half) and their partners z (second half): out_a =
// a * ca - z * sa, out_z = z * cz + a * sz, in float, rounded once.
__device__ __forceinline__ void Rot(const uint4& a, const uint4& z, const float* ca, const float* sa, const float* cz,
                                    const float* sz, uint4* oa, uint4* oz) {
  const __nv_bfloat162* pa = reinterpret_cast<const __nv_bfloat162*>(&a);
  const __nv_bfloat162* pz = reinterpret_cast<const __nv_bfloat162*>(&z);
  __nv_bfloat162* qa = reinterpret_cast<__nv_bfloat162*>(oa);
  __nv_bfloat162* qz = reinterpret_cast<__nv_bfloat162*>(oz);
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const float2 fa = __bfloat1622float2(pa[e]), fz = __bfloat1622float2(pz[e]);
    qa[e] = __floats2bfloat162_rn(fa.x * ca[2 * e] - fz.x * sa[2 * e], fa.y * ca[2 * e + 1] - fz.y * sa[2 * e + 1]);
    qz[e] = __floats2bfloat162_rn(fz.x * cz[2 * e] + fa.x * sz[2 * e], fz.y * cz[2 * e + 1] + fa.y * sz[2 * e + 1]);
  }
}

// Rotate-half of a and z with cos/sin given as bf16 table vectors (c0, s0 for a's 8 dims, c1, s1
// for z's), in float, rounded once (probe_table.cu, probe_bulk.cu).
__device__ __forceinline__ void TableRot(const uint4& a, const uint4& z, const uint4& c0, const uint4& s0,
                                         const uint4& c1, const uint4& s1, uint4* oa, uint4* oz) {
  float ca[8], sa[8], cz[8], sz[8];
  const __nv_bfloat162* pc0 = reinterpret_cast<const __nv_bfloat162*>(&c0);
  const __nv_bfloat162* ps0 = reinterpret_cast<const __nv_bfloat162*>(&s0);
  const __nv_bfloat162* pc1 = reinterpret_cast<const __nv_bfloat162*>(&c1);
  const __nv_bfloat162* ps1 = reinterpret_cast<const __nv_bfloat162*>(&s1);
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    float2 f = __bfloat1622float2(pc0[e]);
    ca[2 * e] = f.x, ca[2 * e + 1] = f.y;
    f = __bfloat1622float2(ps0[e]);
    sa[2 * e] = f.x, sa[2 * e + 1] = f.y;
    f = __bfloat1622float2(pc1[e]);
    cz[2 * e] = f.x, cz[2 * e + 1] = f.y;
    f = __bfloat1622float2(ps1[e]);
    sz[2 * e] = f.x, sz[2 * e + 1] = f.y;
  }
  Rot(a, z, ca, sa, cz, sz, oa, oz);
}

// GPU us of fn(): `warmup` untimed calls then `reps` timed ones, each after a 256 MiB memset
// (L2 flushed) and between one pair of events; the median.
class FlushedTimer {
 public:
  FlushedTimer(int warmup, int reps) : warmup_(warmup), reps_(reps) {
    CHECK(cudaMalloc(&flush_, kFlushBytes));
    CHECK(cudaEventCreate(&start_));
    CHECK(cudaEventCreate(&end_));
  }
  template<typename Fn>
  float operator()(Fn fn) {
    std::vector<float> v;
    for (int r = 0; r < warmup_ + reps_; ++r) {
      CHECK(cudaMemsetAsync(flush_, r, kFlushBytes));
      cudaEventRecord(start_);
      fn();
      cudaEventRecord(end_);
      CHECK(cudaEventSynchronize(end_));
      float ms = 0;
      cudaEventElapsedTime(&ms, start_, end_);
      if (r >= warmup_) v.push_back(ms * 1000.f);
    }
    std::sort(v.begin(), v.end());
    CHECK(cudaGetLastError());
    return v[v.size() / 2];
  }

 private:
  static constexpr size_t kFlushBytes = size_t{256} << 20;
  int warmup_, reps_;
  char* flush_ = nullptr;
  cudaEvent_t start_, end_;
};

#endif  // ONEFLOW_ROPE_BENCH_PROBE_COMMON_CUH_
