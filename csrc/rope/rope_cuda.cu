// CUDA kernels of the rotary embedding (Plane = rotate half, Interval = adjacent pairs).
//
// Fast path ("vector" kernel): a block handles a few (b, m) rows. Each thread loads its units
// (pairs of 16-byte vectors) first; the block writes the cos/sin of its rows into shared memory
// (one sincos per row and distinct angle, shared by all H heads, or the table's values); then
// threads rotate and store. Angles: p * theta in float-float (theta split in a high and a low
// float on the host, kept in a small device table), reduced by 2*pi with a three-part constant,
// then sincos on an argument in about [-pi, pi]: accurate at any position at float cost, so the
// kernel stays memory-bound.
//
// Fallback ("generic" kernel): one element per thread, any strides or alignment, angles in double.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

#include "rope/rope_cuda.h"

namespace oneflow_rope {

namespace {

constexpr int kMaxHalf = 4096;     // largest A/2 served by the vector kernel with computed angles
constexpr int kBlockThreads = 256;
constexpr int kMaxSharedBytes = 40 * 1024;

// Frequencies theta_i = base^(-2i/A) as float (hi, lo) pairs (hi + lo == theta to ~2^-48
// relative), computed once per (device, base, A) on the host and kept in device memory: kernel
// arguments stay small (a 2 KiB table in them cost launch latency).
const float2* CachedTheta(double base, int64_t part, cudaError_t* status) {
  static std::mutex mutex;
  static std::map<std::tuple<int, double, int64_t>, float2*> cache;
  int device = 0;
  *status = cudaGetDevice(&device);
  if (*status != cudaSuccess) return nullptr;
  std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_tuple(device, base, part);
  const auto found = cache.find(key);
  if (found != cache.end()) return found->second;
  const int64_t half = part / 2;
  std::vector<float2> host(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i) {
    const double theta = std::pow(base, -2.0 * static_cast<double>(i) / static_cast<double>(part));
    host[i].x = static_cast<float>(theta);
    host[i].y = static_cast<float>(theta - static_cast<double>(host[i].x));
  }
  float2* table = nullptr;
  *status = cudaMalloc(&table, host.size() * sizeof(float2));
  if (*status != cudaSuccess) return nullptr;
  // synchronous: the table is complete before any stream can use it
  *status = cudaMemcpy(table, host.data(), host.size() * sizeof(float2), cudaMemcpyHostToDevice);
  if (*status != cudaSuccess) {
    cudaFree(table);
    return nullptr;
  }
  cache.emplace(key, table);
  return table;
}

template<typename T>
struct Compute {
  using type = float;
};
template<>
struct Compute<double> {
  using type = double;
};

__device__ __forceinline__ float ToCompute(float v) { return v; }
__device__ __forceinline__ double ToCompute(double v) { return v; }
__device__ __forceinline__ float ToCompute(__half v) { return __half2float(v); }
__device__ __forceinline__ float ToCompute(__nv_bfloat16 v) {
  return __uint_as_float(static_cast<uint32_t>(__bfloat16_as_ushort(v)) << 16);
}

template<typename T>
__device__ __forceinline__ T FromCompute(float v);
template<>
__device__ __forceinline__ float FromCompute<float>(float v) { return v; }
template<>
__device__ __forceinline__ __half FromCompute<__half>(float v) { return __float2half_rn(v); }
template<>
__device__ __forceinline__ __nv_bfloat16 FromCompute<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

template<typename T, typename C>
__device__ __forceinline__ T Round(C v) {
  return FromCompute<T>(v);
}
template<>
__device__ __forceinline__ double Round<double, double>(double v) {
  return v;
}

__device__ __forceinline__ int64_t LoadPosition(const RopeParams& p, int64_t b, int64_t r,
                                                int64_t m) {
  const int64_t off = b * p.pos_stride_b + r * p.pos_stride_r + m * p.pos_stride_m;
  if (p.pos_type == PosType::kInt32) return static_cast<const int32_t*>(p.position_ids)[off];
  if (p.pos_type == PosType::kInt64) return static_cast<const int64_t*>(p.position_ids)[off];
  return m;
}

// sin/cos of pos * (hi + lo) for any int64 position: the product in float-float, reduced by 2*pi
// with a three-part constant to about [-pi, pi], then sincos. kFast uses the hardware sincos,
// whose error on [-pi, pi] is below 2^-21 (a few hundred times below half a unit of float16 or
// bfloat16; it does not grow with the position since the argument is reduced first); float32
// outputs use the full-accuracy sincosf.
template<bool kFast>
__device__ __forceinline__ void AngleSinCos(int64_t pos, float hi, float lo, float* s, float* c) {
  const float pf = static_cast<float>(pos);
  const float pl = static_cast<float>(pos - static_cast<int64_t>(pf));
  const float prod = pf * hi;
  const float err = fmaf(pf, hi, -prod);  // exact rounding error of prod
  const float tail = fmaf(pf, lo, fmaf(pl, hi, err));
  const float k = rintf(prod * 0.15915494309189535f);
  // 2*pi = k2PiHi + k2PiMid + k2PiLo
  float r = fmaf(-k, 6.28318548202514648f, prod);
  r = fmaf(-k, -1.7484555314695172e-07f, r);
  r = fmaf(-k, -6.8604980400235275e-15f, r);
  r += tail;
  if (kFast) {
    __sincosf(r, s, c);
  } else {
    sincosf(r, s, c);
  }
}

__device__ __forceinline__ void AngleSinCosDouble(int64_t pos, double theta, double* s,
                                                  double* c) {
  sincos(static_cast<double>(pos) * theta, s, c);
}

template<typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

// Division of 32-bit unsigned integers by a divisor fixed at launch (Granlund-Montgomery).
struct FastDiv {
  uint32_t d = 1, mul = 0, shift = 0;
  FastDiv() = default;
  explicit FastDiv(uint32_t divisor) : d(divisor) {
    if (d <= 1) return;
    while ((uint64_t{1} << shift) < d) ++shift;
    mul = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << shift) - d)) / d + 1);
  }
  __device__ __forceinline__ uint32_t Div(uint32_t n) const {
    if (d == 1) return n;
    const uint32_t t = __umulhi(n, mul);
    return (t + ((n - t) >> 1)) >> (shift - 1);
  }
};

constexpr int kMaxVectorThreads = 512;
constexpr int kMaxRows = 64;

struct VectorArgs {
  RopeParams p;
  const float2* theta;  // (hi, lo) of theta_i, i < A/2; null with cos/sin tables
  int rows_per_block;
  int units_per_head;   // rotary units + pass-through units
  int rot_units;        // rotary units per head
  int units_per_part;   // rotary units per rotary part
  int chunks_per_part;  // vectors of V elements per rotary part
  int pass_chunks;      // vectors of V elements after rotary_size
  FastDiv div_m;        // by M: row -> (b, m)
  FastDiv div_row;      // by units per row
  FastDiv div_head;     // by units per head
  FastDiv div_part;     // by units_per_part
};

// A unit is two vectors of V elements (the second may be absent at the end of a region), so every
// thread moves the same bytes: a vector of the first half of a rotary part and the vector A/2
// further (plane partners; for interval, whole pairs in each), or two vectors of the pass-through
// dims half that region apart. Neighbouring threads then read neighbouring vectors.
struct Unit {
  int lr;          // row within the block
  int k0, k1;      // first element of each vector; k1 < 0 when there is no second vector
  bool rotary;
  int64_t x_off;   // element offset of the row's head in x
};

template<int V, bool kPlane>
__device__ __forceinline__ Unit DecodeUnit(const VectorArgs& a, uint32_t u, int64_t row0) {
  const RopeParams& p = a.p;
  Unit unit;
  const uint32_t lr = a.div_row.Div(u);
  const uint32_t w_row = u - lr * static_cast<uint32_t>(p.H) * a.units_per_head;
  const uint32_t h = a.div_head.Div(w_row);
  const uint32_t w = w_row - h * a.units_per_head;
  const uint32_t row = static_cast<uint32_t>(row0) + lr;
  const uint32_t b = a.div_m.Div(row);
  const uint32_t m = row - b * static_cast<uint32_t>(p.M);
  unit.lr = static_cast<int>(lr);
  unit.x_off = b * p.x_stride_b + m * p.x_stride_m + h * p.x_stride_h;
  unit.rotary = w < static_cast<uint32_t>(a.rot_units);
  if (unit.rotary) {
    const uint32_t r = a.div_part.Div(w);
    const int part = static_cast<int>(p.rotary_size / p.rotary_dim);
    const int c = static_cast<int>(w - r * a.units_per_part);
    if (kPlane || a.chunks_per_part % 2 == 0) {
      // plane: a vector and its partner A/2 further; interval: the same addressing (each vector
      // holds whole pairs), so a warp's loads stay contiguous
      unit.k0 = static_cast<int>(r) * part + c * V;
      unit.k1 = unit.k0 + part / 2;
    } else {
      unit.k0 = static_cast<int>(r) * part + 2 * c * V;
      unit.k1 = 2 * c + 1 < a.chunks_per_part ? unit.k0 + V : -1;
    }
  } else {
    const int c = static_cast<int>(w - a.rot_units);
    const int pass_units = (a.pass_chunks + 1) / 2;
    unit.k0 = static_cast<int>(p.rotary_size) + c * V;
    unit.k1 = c + pass_units < a.pass_chunks ? unit.k0 + pass_units * V : -1;
  }
  return unit;
}

// cos and sin (sin negated for the backward) of rotary dim k of row (b, m).
template<typename T, typename C, bool kPlane, bool kTable>
__device__ __forceinline__ void SinCosAt(const VectorArgs& args, uint32_t b, uint32_t m, int k, C* c, C* s) {
  const RopeParams& p = args.p;
  const int part = static_cast<int>(p.rotary_size / p.rotary_dim);
  const int r = k / part;
  const int j = k - r * part;
  const int64_t pos = LoadPosition(p, b, r, m);
  if (kTable) {
    if (pos >= 0 && pos < p.table_rows) {
      const int64_t t = pos * p.table_row_stride + j * p.table_col_stride;
      *c = static_cast<C>(ToCompute(static_cast<const T*>(p.cos)[t]));
      *s = static_cast<C>(ToCompute(static_cast<const T*>(p.sin)[t]));
    } else {
      *c = *s = static_cast<C>(NAN);
    }
  } else {
    const int i = kPlane ? (j % (part / 2)) : (j / 2);
    if constexpr (sizeof(C) == 8) {
      AngleSinCosDouble(pos, pow(p.base, -2.0 * i / part), reinterpret_cast<double*>(s),
                        reinterpret_cast<double*>(c));
    } else {
      const float2 theta = __ldg(args.theta + i);
      AngleSinCos<sizeof(T) == 2>(pos, theta.x, theta.y, reinterpret_cast<float*>(s),
                  reinterpret_cast<float*>(c));
    }
  }
  if (p.inverse) *s = -*s;
}

// A block handles rows_per_block consecutive (b, m) rows. Each thread first loads up to
// kPrefetch units; then the block computes the rows' cos/sin into shared memory (one sincos per
// distinct angle, shared by all heads); then threads rotate and store what they loaded.
// With computed angles, a plane dim and its partner share one value, and so do the two dims of an
// interval pair: only the first of each is computed, stored and read.
template<typename T, int V, bool kPlane, bool kTable, int kPrefetch>
__global__ void __launch_bounds__(kMaxVectorThreads) RopeVectorKernel(const VectorArgs args) {
  using C = typename Compute<T>::type;
  using P = Pack<T, V>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __shared__ int64_t out_row_off[kMaxRows];
  const RopeParams& p = args.p;
  const int rotary = static_cast<int>(p.rotary_size);
  const int part = rotary / p.rotary_dim;
  const int half = part / 2;
  C* cos_s = reinterpret_cast<C*>(smem_raw);
  C* sin_s = cos_s + args.rows_per_block * rotary;

  const int64_t num_rows = p.B * p.M;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * args.rows_per_block;
  const int rows_here = static_cast<int>(min(static_cast<int64_t>(args.rows_per_block), num_rows - row0));
  const uint32_t units_total = static_cast<uint32_t>(rows_here) * static_cast<uint32_t>(p.H) * args.units_per_head;
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);

  const uint32_t threads = blockDim.x;
  for (uint32_t base = 0; base < units_total; base += threads * kPrefetch) {
    P lo[kPrefetch], hi[kPrefetch];
#pragma unroll
    for (int q = 0; q < kPrefetch; ++q) {
      const uint32_t u = base + q * threads + threadIdx.x;
      if (u < units_total) {
        const Unit unit = DecodeUnit<V, kPlane>(args, u, row0);
        const T* xh = x + unit.x_off;
        lo[q] = *reinterpret_cast<const P*>(xh + unit.k0);
        if (unit.k1 >= 0) hi[q] = *reinterpret_cast<const P*>(xh + unit.k1);
      }
    }
    if (base == 0) {
      // cos/sin of the block's rows (computed angles: the first dim of each pair only) and the
      // rows' output offsets.
      const int entries = kTable ? rotary : rotary / 2;
      for (int e = threadIdx.x; e < rows_here * entries; e += threads) {
        const int lr = e / entries;
        const int idx = e - lr * entries;
        const uint32_t row = static_cast<uint32_t>(row0) + lr;
        const uint32_t b = args.div_m.Div(row);
        const uint32_t m = row - b * static_cast<uint32_t>(p.M);
        int k = idx;
        if (!kTable) {
          const int r = idx / half;
          const int i = idx - r * half;
          k = r * part + (kPlane ? i : 2 * i);
        }
        SinCosAt<T, C, kPlane, kTable>(args, b, m, k, cos_s + lr * rotary + k, sin_s + lr * rotary + k);
      }
      for (int lr = threadIdx.x; lr < rows_here; lr += threads) {
        const uint32_t row = static_cast<uint32_t>(row0) + lr;
        const uint32_t b = args.div_m.Div(row);
        out_row_off[lr] = b * p.out_stride_b + (row - b * static_cast<uint32_t>(p.M)) * p.out_stride_m;
      }
      __syncthreads();
    }
#pragma unroll
    for (int q = 0; q < kPrefetch; ++q) {
      const uint32_t u = base + q * threads + threadIdx.x;
      if (u >= units_total) continue;
      const Unit unit = DecodeUnit<V, kPlane>(args, u, row0);
      const uint32_t lr = static_cast<uint32_t>(unit.lr);
      const uint32_t w_row = u - lr * static_cast<uint32_t>(p.H) * args.units_per_head;
      const uint32_t h = args.div_head.Div(w_row);
      T* oh = out + out_row_off[unit.lr] + static_cast<int64_t>(h) * p.out_stride_h;
      const int k0 = unit.k0;
      const int k1 = unit.k1;
      if (!unit.rotary) {
        *reinterpret_cast<P*>(oh + k0) = lo[q];
        if (k1 >= 0) *reinterpret_cast<P*>(oh + k1) = hi[q];
        continue;
      }
      auto sincos_at = [&](int k, C* c, C* s) {
        *c = cos_s[unit.lr * rotary + k];
        *s = sin_s[unit.lr * rotary + k];
      };
      if (kPlane) {
        P oa, oz;
#pragma unroll
        for (int t = 0; t < V; ++t) {
          C ca, sa, cz, sz;
          sincos_at(k0 + t, &ca, &sa);
          if (kTable) {
            sincos_at(k1 + t, &cz, &sz);
          } else {
            cz = ca;
            sz = sa;
          }
          const C xa = static_cast<C>(ToCompute(lo[q].v[t]));
          const C xz = static_cast<C>(ToCompute(hi[q].v[t]));
          oa.v[t] = Round<T, C>(xa * ca - xz * sa);
          oz.v[t] = Round<T, C>(xz * cz + xa * sz);
        }
        *reinterpret_cast<P*>(oh + k0) = oa;
        *reinterpret_cast<P*>(oh + k1) = oz;
      } else {
#pragma unroll
        for (int vec = 0; vec < 2; ++vec) {
          const int k = vec == 0 ? k0 : k1;
          if (k < 0) break;
          const P& in = vec == 0 ? lo[q] : hi[q];
          P o;
#pragma unroll
          for (int t = 0; t < V; t += 2) {
            C c0, s0, c1, s1;
            sincos_at(k + t, &c0, &s0);
            if (kTable) {
              sincos_at(k + t + 1, &c1, &s1);
            } else {
              c1 = c0;
              s1 = s0;
            }
            const C x0 = static_cast<C>(ToCompute(in.v[t]));
            const C x1 = static_cast<C>(ToCompute(in.v[t + 1]));
            o.v[t] = Round<T, C>(x0 * c0 - x1 * s0);
            o.v[t + 1] = Round<T, C>(x1 * c1 + x0 * s1);
          }
          *reinterpret_cast<P*>(oh + k) = o;
        }
      }
    }
  }
}

// One element per thread; any strides; angles in double. Used when the vector kernel's
// conditions (alignment, sizes, shared memory) do not hold.
template<typename T>
__global__ void __launch_bounds__(kBlockThreads) RopeGenericKernel(const RopeParams p) {
  using C = typename Compute<T>::type;
  const int64_t total = p.B * p.M * p.H * p.K;
  const int64_t part = p.rotary_size / p.rotary_dim;
  const int64_t half = part / 2;
  const bool plane = p.mode == Mode::kPlane;
  const T* cos_t = static_cast<const T*>(p.cos);
  const T* sin_t = static_cast<const T*>(p.sin);
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    int64_t rest = idx;
    const int64_t k = rest % p.K;
    rest /= p.K;
    const int64_t h = rest % p.H;
    rest /= p.H;
    const int64_t m = rest % p.M;
    const int64_t b = rest / p.M;
    const T* xh = static_cast<const T*>(p.x) + b * p.x_stride_b + m * p.x_stride_m + h * p.x_stride_h;
    T* oh = static_cast<T*>(p.out) + b * p.out_stride_b + m * p.out_stride_m + h * p.out_stride_h;
    if (k >= p.rotary_size) {
      oh[k * p.out_stride_k] = xh[k * p.x_stride_k];
      continue;
    }
    const int64_t r = k / part;
    const int64_t j = k - r * part;
    const int64_t pos = LoadPosition(p, b, r, m);
    C c, s;
    if (cos_t != nullptr) {
      if (pos >= 0 && pos < p.table_rows) {
        const int64_t t = pos * p.table_row_stride + j * p.table_col_stride;
        c = static_cast<C>(ToCompute(cos_t[t]));
        s = static_cast<C>(ToCompute(sin_t[t]));
      } else {
        c = s = static_cast<C>(NAN);
      }
    } else {
      const int64_t i = plane ? (j % half) : (j / 2);
      double sd, cd;
      const double angle = static_cast<double>(pos) * pow(p.base, -2.0 * i / part);
      sincos(angle, &sd, &cd);
      c = static_cast<C>(cd);
      s = static_cast<C>(sd);
    }
    if (p.inverse) s = -s;
    int64_t partner_k;
    C sign;
    if (plane) {
      partner_k = j < half ? k + half : k - half;
      sign = j < half ? C(-1) : C(1);
    } else {
      partner_k = (j % 2 == 0) ? k + 1 : k - 1;
      sign = (j % 2 == 0) ? C(-1) : C(1);
    }
    const C xv = static_cast<C>(ToCompute(xh[k * p.x_stride_k]));
    const C pv = static_cast<C>(ToCompute(xh[partner_k * p.x_stride_k]));
    oh[k * p.out_stride_k] = Round<T, C>(xv * c + sign * pv * s);
  }
}

int MultiprocessorCount() {
  static const int count = [] {
    int device = 0, sms = 0;
    if (cudaGetDevice(&device) != cudaSuccess
        || cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess) {
      return 80;
    }
    return sms;
  }();
  return count;
}

bool Aligned(const void* ptr, int bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(bytes) == 0;
}

// Elements per 16-byte access if the vector kernel can run `p`, else 0.
template<typename T>
int VectorWidth(const RopeParams& p) {
  constexpr int V = 16 / sizeof(T);
  const int64_t part = p.rotary_size / p.rotary_dim;
  const int64_t half = part / 2;
  if (p.x_stride_k != 1 || p.out_stride_k != 1) return 0;
  if (!Aligned(p.x, 16) || !Aligned(p.out, 16)) return 0;
  for (int64_t v : {p.x_stride_b, p.x_stride_m, p.x_stride_h, p.out_stride_b, p.out_stride_m,
                    p.out_stride_h, p.K, p.rotary_size}) {
    if (v % V != 0) return 0;
  }
  if ((p.mode == Mode::kPlane ? half : part) % V != 0) return 0;
  if (p.cos == nullptr && half > kMaxHalf) return 0;
  using C = typename Compute<T>::type;
  if (static_cast<int64_t>(2 * sizeof(C)) * p.rotary_size > kMaxSharedBytes) return 0;
  // 32-bit unit and row arithmetic inside the kernel
  if (p.H * p.K / V > (int64_t{1} << 24) || p.B * p.M >= (int64_t{1} << 31) || p.M >= (int64_t{1} << 31)) return 0;
  return V;
}

template<typename T>
cudaError_t Launch(const RopeParams& p, cudaStream_t stream) {
  const int64_t total = p.B * p.M * p.H * p.K;
  const int V = VectorWidth<T>(p);
  if (V == 0) {
    const int64_t blocks = std::min<int64_t>((total + kBlockThreads - 1) / kBlockThreads, 65535 * 16);
    RopeGenericKernel<T><<<static_cast<unsigned>(blocks), kBlockThreads, 0, stream>>>(p);
    return cudaGetLastError();
  }
  using C = typename Compute<T>::type;
  constexpr int kV = 16 / sizeof(T);
  VectorArgs args;
  args.p = p;
  const int64_t part = p.rotary_size / p.rotary_dim;
  args.theta = nullptr;
  if (p.cos == nullptr && sizeof(C) == 4) {
    cudaError_t status = cudaSuccess;
    args.theta = CachedTheta(p.base, part, &status);
    if (status != cudaSuccess) return status;
  }
  const bool plane = p.mode == Mode::kPlane;
  args.chunks_per_part = static_cast<int>(part / kV);
  args.units_per_part = (args.chunks_per_part + 1) / 2;  // plane: (A/2)/V
  args.rot_units = static_cast<int>(p.rotary_dim) * args.units_per_part;
  args.pass_chunks = static_cast<int>((p.K - p.rotary_size) / kV);
  args.units_per_head = args.rot_units + (args.pass_chunks + 1) / 2;
  const int64_t units_per_row = p.H * args.units_per_head;
  const int64_t num_rows = p.B * p.M;
  // Launch shape: each thread loads `prefetch` units (two vectors each) before the sin/cos phase;
  // blocks cover about 256 units. Chosen with bench/sweep_launch.py on an H100
  // (bench/results/h100_2026-11-27/sweep_launch.txt): one unit per thread is best except for large
  // calls with cos/sin tables, where two are. ONEFLOW_ROPE_TUNE="prefetch,units_per_block,
  // min_blocks_per_sm" overrides it (prefetch 0: this rule).
  static const int* tune = [] {
    static int t[3] = {0, 256, 2};
    if (const char* env = std::getenv("ONEFLOW_ROPE_TUNE")) {
      std::sscanf(env, "%d,%d,%d", &t[0], &t[1], &t[2]);
    }
    return t;
  }();
  const bool table = p.cos != nullptr;
  const int wanted_prefetch = tune[0] > 0 ? tune[0] : (table && num_rows >= 1024 ? 2 : 1);
  const int prefetch = wanted_prefetch >= 4 ? 4 : (wanted_prefetch >= 2 ? 2 : 1);
  int64_t rows = std::max<int64_t>(1, tune[1] / std::max<int64_t>(1, units_per_row));
  const int64_t row_bytes = std::max<int64_t>(1, 2 * sizeof(C) * p.rotary_size);
  rows = std::min<int64_t>({rows, kMaxRows, std::max<int64_t>(1, kMaxSharedBytes / row_bytes),
                            std::max<int64_t>(1, num_rows / (std::max(1, tune[2]) * MultiprocessorCount()))});
  args.rows_per_block = static_cast<int>(rows);
  args.div_m = FastDiv(static_cast<uint32_t>(p.M));
  args.div_row = FastDiv(static_cast<uint32_t>(units_per_row));
  args.div_head = FastDiv(static_cast<uint32_t>(args.units_per_head));
  args.div_part = FastDiv(static_cast<uint32_t>(std::max(1, args.units_per_part)));
  const int64_t blocks = (num_rows + rows - 1) / rows;
  const size_t smem = static_cast<size_t>(rows * 2 * sizeof(C) * p.rotary_size);
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(blocks));
  const int64_t units_per_block = rows * units_per_row;
  // enough threads for one pass over the units, and for one sincos (or table read) each
  const int64_t entries = rows * (table ? p.rotary_size : p.rotary_size / 2);
  const int64_t wanted = std::max((units_per_block + prefetch - 1) / prefetch, entries);
  const int threads = static_cast<int>(std::min<int64_t>(kMaxVectorThreads, (wanted + 31) / 32 * 32));
#define ROPE_LAUNCH(PF)                                                                         \
  if (plane && table) {                                                                         \
    RopeVectorKernel<T, kV, true, true, PF><<<grid, threads, smem, stream>>>(args);             \
  } else if (plane) {                                                                           \
    RopeVectorKernel<T, kV, true, false, PF><<<grid, threads, smem, stream>>>(args);            \
  } else if (table) {                                                                           \
    RopeVectorKernel<T, kV, false, true, PF><<<grid, threads, smem, stream>>>(args);            \
  } else {                                                                                      \
    RopeVectorKernel<T, kV, false, false, PF><<<grid, threads, smem, stream>>>(args);           \
  }
  if (prefetch == 4) {
    ROPE_LAUNCH(4)
  } else if (prefetch == 2) {
    ROPE_LAUNCH(2)
  } else {
    ROPE_LAUNCH(1)
  }
#undef ROPE_LAUNCH
  return cudaGetLastError();
}

}  // namespace

int RopeForwardCuda(const RopeParams& p, void* stream) {
  if (p.B * p.M * p.H * p.K == 0) return 0;
  if (ValidateRopeParams(p) != nullptr) return static_cast<int>(cudaErrorInvalidValue);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  cudaError_t err = cudaSuccess;
  switch (p.dtype) {
    case DType::kFloat32: err = Launch<float>(p, s); break;
    case DType::kFloat64: err = Launch<double>(p, s); break;
    case DType::kFloat16: err = Launch<__half>(p, s); break;
    case DType::kBFloat16: err = Launch<__nv_bfloat16>(p, s); break;
  }
  return static_cast<int>(err);
}

int RopeZeroFillCuda(void* ptr, int64_t bytes, void* stream) {
  if (bytes <= 0) return 0;
  return static_cast<int>(cudaMemsetAsync(ptr, 0, static_cast<size_t>(bytes),
                                          static_cast<cudaStream_t>(stream)));
}

const char* RopeCudaErrorString(int status) {
  return cudaGetErrorString(static_cast<cudaError_t>(status));
}

const char* RopeCudaKernelName(const RopeParams& p) {
  int v = 0;
  switch (p.dtype) {
    case DType::kFloat32: v = VectorWidth<float>(p); break;
    case DType::kFloat64: v = VectorWidth<double>(p); break;
    case DType::kFloat16: v = VectorWidth<__half>(p); break;
    case DType::kBFloat16: v = VectorWidth<__nv_bfloat16>(p); break;
  }
  switch (v) {
    case 2: return "vector<2>";
    case 4: return "vector<4>";
    case 8: return "vector<8>";
    default: return "generic";
  }
}

}  // namespace oneflow_rope
