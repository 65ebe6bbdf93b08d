// Probe: probe_mapping.cu's exact-angle 2-head kernel (RopeProbe<2, 2, false, true>), which reaches
// 0.99 of torch's copy on (4, 4096, 32, 128) bf16 in the bench's harness where RopeSmallKernel
// reaches 0.955 on the same tensors (bench/results/h200_2026-11-29i), morphed one trait of
// RopeSmallKernel at a time, to find the trait that costs the difference. With every flag off the
// kernel is RopeProbe's code (check: `python3 bench/sass_barriers.py` on both cubins shows the same
// loads and barriers). A library for bench/probe_morph.py:
//   nvcc -O3 -std=c++17 -arch=sm_90 -shared -Xcompiler -fPIC bench/probe_morph.cu -o /tmp/libmorph.so
// Traits (bits of `variant`):
//   1 kFlat:    a 1-D block, the thread's token, head lane and unit decoded from its global index by
//               multiply-high divisions (RopeSmallKernel's FastDiv), against a (units, lanes, rows)
//               block indexed by threadIdx
//   2 kBranchy: each head's loads inside `if (head < H) { lo; if (k1 >= 0) hi }` (runtime values),
//               the frequencies and angles inside `if (unit rotates)`, as RopeSmallKernel's source is
//               written (its SASS puts all those loads on one barrier)
//   4 kPairs:   frequencies as 8 (hi, lo) float2 loads (RopeSmallKernel's table) against 16 floats
//   8 kPdl:     griddepcontrol.launch_dependents + wait at the start (RopeSmallKernel's PDL
//               instructions; no-ops without the launch attribute, which is not set here)
//  16 kGeometry: the unit's offsets and frequency index from run-time geometry (rotary part r by
//               FastDiv when there are several, pass-through units, the frequency index clamped),
//               as UnitAt / LoadUnitFreqsOf compute them
//  32 kPos64:   the position an int64 (m plus a run-time offset) handed over by a lambda, as
//               RopeSmallKernel's position()
//  64 kScale:   cos and sin multiplied by run-time scales (attention_scaling, the backward's sign)
// 128 kTwo:     x, out and their strides picked from two tensors' fields by a run-time test (q and
//               k of one launch)
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "probe_common.cuh"

namespace {

struct Div {  // n / d for n < 2^31 by multiply-high (as RopeSmallKernel's FastDiv)
  uint32_t d = 1, mul = 0, shift = 0;
  Div() = default;
  explicit Div(uint32_t divisor) : d(divisor) {
    if (d <= 1) return;
    while ((uint64_t{1} << shift) < d) ++shift;
    mul = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << shift) - d)) / d + 1);
  }
  __device__ __forceinline__ uint32_t operator()(uint32_t n) const {
    if (d == 1) return n;
    const uint32_t t = __umulhi(n, mul);
    return (t + ((n - t) >> 1)) >> (shift - 1);
  }
};

struct Flat {  // the run-time values of the traits
  int threads_total, row_threads, units, rot_units, k1_add;
  Div div_row, div_units;
  int units_per_part, part, pass_units, rotary, first_threads;  // kGeometry, kTwo
  Div div_upp;
  long long pos_add;      // kPos64
  float scale, sin_scale;  // kScale
  const __nv_bfloat16* x1;  // kTwo: the second tensor (unused: every thread takes the first)
  __nv_bfloat16* y1;
  long long sm1, sb1;
};

__device__ __forceinline__ uint4 LoadX(const __nv_bfloat16* p) {  // RopeProbe's kMode 2
  uint4 v;
  asm volatile("ld.global.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

template<int kTraits>
__global__ void __launch_bounds__(256) MorphKernel(const __nv_bfloat16* __restrict__ x_arg,
                                                   __nv_bfloat16* __restrict__ y_arg, Shape sh,
                                                   const float* __restrict__ theta,
                                                   const float2* __restrict__ pairs, int rows_total, Flat f) {
  constexpr bool kFlat = kTraits & 1, kBranchy = kTraits & 2, kPairs = kTraits & 4, kPdl = kTraits & 8;
  constexpr bool kGeometry = kTraits & 16, kPos64 = kTraits & 32, kScale = kTraits & 64, kTwo = kTraits & 128;
  if (kPdl) {
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    asm volatile("griddepcontrol.wait;" ::: "memory");
  }
  int u, lane, row, lanes;
  bool second = false;
  if (kFlat) {
    const int gid = blockIdx.x * blockDim.x + threadIdx.x;
    if (gid >= f.threads_total) return;
    row = static_cast<int>(f.div_row(static_cast<uint32_t>(gid)));
    int j = gid - row * f.row_threads;
    if (kTwo) {
      second = j >= f.first_threads;
      j = second ? j - f.first_threads : j;
    }
    lane = static_cast<int>(f.div_units(static_cast<uint32_t>(j)));
    u = j - lane * f.units;
    lanes = f.row_threads / f.units;
  } else {
    u = threadIdx.x;
    lane = threadIdx.y;
    lanes = blockDim.y;
    row = blockIdx.x * blockDim.z + threadIdx.z;
    if (row >= rows_total) return;
  }
  const int b0 = row / sh.M;
  const int m = row - b0 * sh.M;
  const __nv_bfloat16* x = kTwo && second ? f.x1 : x_arg;
  __nv_bfloat16* y = kTwo && second ? f.y1 : y_arg;
  const long long sm = kTwo && second ? f.sm1 : (long long)sh.H * sh.K;
  const long long sb = kTwo && second ? f.sb1 : (long long)sh.M * sm;
  int k0 = u * 8;
  int k1 = kBranchy ? k0 + f.k1_add : k0 + sh.K / 2;
  bool rot = !kBranchy || u < f.rot_units;
  int fi = k0;  // the unit's first frequency
  if (kGeometry) {  // UnitAt, plane
    rot = u < f.rot_units;
    if (rot) {
      const int r = f.units_per_part == f.rot_units ? 0 : static_cast<int>(f.div_upp(static_cast<uint32_t>(u)));
      const int c = u - r * f.units_per_part;
      k0 = r * f.part + c * 8;
      k1 = k0 + f.part / 2;
      fi = k0 - r * f.part;
    } else {
      const int c = u - f.rot_units;
      k0 = f.rotary + c * 8;
      k1 = f.rotary + (c + f.pass_units) * 8;
      if (k1 >= sh.K) k1 = -1;
    }
  }
  auto position = [&]() -> long long { return kPos64 ? static_cast<long long>(m) + f.pos_add : m; };
  float c[8], s[8];
  auto make_angles = [&] {
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      float hi, lo;
      const int i = kGeometry ? min(fi + e, f.part / 2 - 1) : k0 + e;
      if (kPairs) {
        const float2 q = __ldg(pairs + i);
        hi = q.x;
        lo = q.y;
      } else {
        hi = __ldg(theta + i);
        lo = __ldg(theta + sh.K + i);
      }
      ExactSinCos(position(), hi, lo, &s[e], &c[e]);
      if (kScale) {
        c[e] *= f.scale;
        s[e] *= f.sin_scale;
      }
    }
  };
  bool have = false;
  for (int h0 = lane; h0 < sh.H; h0 += lanes * 2) {
    uint4 va[2], vz[2];
    long long off[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int h = h0 + i * lanes;
      off[i] = b0 * sb + m * sm + (long long)h * sh.K;
      if (kBranchy || kGeometry) {
        if (h < sh.H) {
          va[i] = LoadX(x + off[i] + k0);
          if (k1 >= 0) vz[i] = LoadX(x + off[i] + k1);
        }
      } else if (h < sh.H) {
        va[i] = LoadX(x + off[i] + k0);
        vz[i] = LoadX(x + off[i] + k1);
      }
    }
    if (!have) {
      have = true;
      if (rot) make_angles();
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int h = h0 + i * lanes;
      if (h < sh.H) {
        uint4 oa = va[i], oz = vz[i];
        if (rot) Rot(va[i], vz[i], c, s, c, s, &oa, &oz);
        *reinterpret_cast<uint4*>(y + off[i] + k0) = oa;
        if (!(kBranchy || kGeometry) || k1 >= 0) *reinterpret_cast<uint4*>(y + off[i] + k1) = oz;
      }
    }
  }
}

}  // namespace

// variant: bits as above (those listed in the switch). theta: 2K floats (hi, then lo); pairs: K/2 (hi, lo) float2. Blocks of
// block_threads threads: (K/16) units x min(16, H/2) head lanes x rows (kFlat: the same threads
// numbered in one dimension).
extern "C" int LaunchMorph(int variant, const void* x, void* y, int B, int M, int H, int K, const float* theta,
                           const void* pairs, int block_threads, cudaStream_t stream) {
  const Shape sh{B, M, H, K};
  const int units = K / 16;
  const int lanes = std::max(1, std::min(16, H / 2));
  const int rows_total = B * M;
  Flat f{};
  f.row_threads = units * lanes;
  f.threads_total = rows_total * f.row_threads;
  f.units = units;
  f.rot_units = units;
  f.k1_add = K / 2;
  f.div_row = Div(f.row_threads);
  f.div_units = Div(units);
  f.units_per_part = units;
  f.part = K;
  f.pass_units = 0;
  f.rotary = K;
  f.first_threads = f.row_threads;
  f.div_upp = Div(units);
  f.pos_add = 0;
  f.scale = f.sin_scale = 1.0f;
  f.x1 = static_cast<const __nv_bfloat16*>(x);
  f.y1 = static_cast<__nv_bfloat16*>(y);
  f.sm1 = (long long)H * K;
  f.sb1 = (long long)M * H * K;
  const int rows = std::max(1, block_threads / f.row_threads);
  dim3 block(units, lanes, rows), grid((rows_total + rows - 1) / rows);
  if (variant & 1) {
    block = dim3(rows * f.row_threads);
    grid = dim3((f.threads_total + block.x - 1) / block.x);
  }
  const auto* xb = static_cast<const __nv_bfloat16*>(x);
  auto* yb = static_cast<__nv_bfloat16*>(y);
  const auto* pb = static_cast<const float2*>(pairs);
  switch (variant) {
#define MORPH_CASE(V)                                                                            \
  case V:                                                                                        \
    MorphKernel<V><<<grid, block, 0, stream>>>(xb, yb, sh, theta, pb, rows_total, f);            \
    break;
    // the variants bench/probe_morph.py times (each trait alone, and together)
    MORPH_CASE(0) MORPH_CASE(1) MORPH_CASE(2) MORPH_CASE(4) MORPH_CASE(8) MORPH_CASE(3) MORPH_CASE(15)
    MORPH_CASE(16) MORPH_CASE(32) MORPH_CASE(64) MORPH_CASE(129) MORPH_CASE(240) MORPH_CASE(241) MORPH_CASE(255)
#undef MORPH_CASE
    default:
      return -1;
  }
  return static_cast<int>(cudaGetLastError());
}
