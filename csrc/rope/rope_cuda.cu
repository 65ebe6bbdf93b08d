// CUDA kernel of the rotary embedding (Plane = rotate half, Interval = adjacent pairs).
//
// Thread mapping. A head vector of K elements is cut into "units": a rotary unit is a vector of
// V elements and its rotation partner (plane: the vector A/2 further; interval: the next vector,
// each holding whole pairs), a pass-through unit is two neighbouring vectors past rotary_size.
// threadIdx.x is the unit (fixed for the thread's life, so its geometry and frequencies are
// decoded once), threadIdx.y an item lane and threadIdx.z a row lane. A row is one token (b, m),
// or one position m shared by the whole batch when nothing makes positions depend on b; an item
// is one head of one of the call's tensors (q and k of one launch), of every sequence when the row
// is shared. A thread handles up to kMaxItems items of a row: it issues all their loads, then
// computes (or loads) the cos/sin of its unit for the row once, in registers, and rotates and
// stores every item with them. No shared memory, no barrier. Blocks stride over (row group, item
// chunk) pieces of work; the grid is sized from the device's SM count and the kernel's occupancy.
//
// Two variants: "vector" (16-byte loads and stores; unit-stride K, aligned pointers and sizes)
// and "elementwise" (any strides and sizes, one element per access; V = 1 for plane, 2 for
// interval). Both compute the same values.
//
// Angles: p * theta in float-float (theta as a float hi + lo pair), reduced by 2*pi with a
// three-part constant, then sincos on an argument in about [-pi, pi]: accurate at any position
// at float cost. float64 outputs use double throughout.
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

constexpr int kBlockThreads = 256;  // threads per block the launch aims for
constexpr int kMaxBlockThreads = 512;  // launch bound (ONEFLOW_ROPE_TUNE may ask for more than 256)
constexpr int kMaxItems = 4;        // items (heads) per thread and row
constexpr int kMaxUnitLanes = 256;  // threadIdx.x extent; a thread loops when a head has more units

// ---- frequencies -------------------------------------------------------------------------------

// theta_i = base^(-2i/A) for i < A/2, computed once per (device, base, A) on the host and kept in
// device memory: as float (hi, lo) pairs (hi + lo == theta to ~2^-48 relative) for float32 math,
// and as double for float64 math.
struct FreqTables {
  const float2* hilo = nullptr;
  const double* dbl = nullptr;
};

FreqTables CachedFrequencies(double base, int64_t part, cudaError_t* status) {
  static std::mutex mutex;
  static std::map<std::tuple<int, double, int64_t>, FreqTables> cache;
  int device = 0;
  *status = cudaGetDevice(&device);
  if (*status != cudaSuccess) return {};
  std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_tuple(device, base, part);
  const auto found = cache.find(key);
  if (found != cache.end()) return found->second;
  const int64_t half = std::max<int64_t>(1, part / 2);
  std::vector<float2> hilo(static_cast<size_t>(half));
  std::vector<double> dbl(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i) {
    const double theta = std::pow(base, -2.0 * static_cast<double>(i) / static_cast<double>(part));
    dbl[i] = theta;
    hilo[i].x = static_cast<float>(theta);
    hilo[i].y = static_cast<float>(theta - static_cast<double>(hilo[i].x));
  }
  const size_t hilo_bytes = hilo.size() * sizeof(float2);
  const size_t dbl_bytes = dbl.size() * sizeof(double);
  char* block = nullptr;
  *status = cudaMalloc(&block, hilo_bytes + dbl_bytes);
  if (*status != cudaSuccess) return {};
  // synchronous copies: the tables are complete before any stream can use them
  *status = cudaMemcpy(block, hilo.data(), hilo_bytes, cudaMemcpyHostToDevice);
  if (*status == cudaSuccess) {
    *status = cudaMemcpy(block + hilo_bytes, dbl.data(), dbl_bytes, cudaMemcpyHostToDevice);
  }
  if (*status != cudaSuccess) {
    cudaFree(block);
    return {};
  }
  FreqTables tables{reinterpret_cast<const float2*>(block),
                    reinterpret_cast<const double*>(block + hilo_bytes)};
  cache.emplace(key, tables);
  return tables;
}

// ---- numeric helpers ---------------------------------------------------------------------------

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
__device__ __forceinline__ T Round(float v);
template<>
__device__ __forceinline__ float Round<float>(float v) { return v; }
template<>
__device__ __forceinline__ __half Round<__half>(float v) { return __float2half_rn(v); }
template<>
__device__ __forceinline__ __nv_bfloat16 Round<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template<typename T>
__device__ __forceinline__ T Round(double v) {
  return static_cast<T>(v);
}

// Rounds two values at once (one paired conversion for 16-bit types).
template<typename T, typename C>
__device__ __forceinline__ void RoundPair(C a, C b, T* out) {
  out[0] = Round<T>(a);
  out[1] = Round<T>(b);
}
template<>
__device__ __forceinline__ void RoundPair<__half, float>(float a, float b, __half* out) {
  *reinterpret_cast<__half2*>(out) = __floats2half2_rn(a, b);
}
template<>
__device__ __forceinline__ void RoundPair<__nv_bfloat16, float>(float a, float b,
                                                               __nv_bfloat16* out) {
  *reinterpret_cast<__nv_bfloat162*>(out) = __floats2bfloat162_rn(a, b);
}

// sin/cos of pos * (hi + lo) for any int64 position: the product in float-float, reduced by 2*pi
// with a three-part constant to about [-pi, pi], then sincos. kFast uses the hardware sincos,
// whose error on [-pi, pi] is below 2^-21 (hundreds of times below half a unit of float16 or
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

// Division of 32-bit unsigned integers by a divisor fixed at launch (Granlund-Montgomery), with
// a plain 64-bit division for the rare numerator past 2^32.
struct FastDiv {
  uint64_t d = 1;
  uint32_t mul = 0, shift = 0;
  FastDiv() = default;
  explicit FastDiv(uint64_t divisor) : d(divisor < 1 ? 1 : divisor) {
    if (d <= 1 || d > 0xffffffffull) return;
    while ((uint64_t{1} << shift) < d) ++shift;
    mul = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << shift) - d)) / d + 1);
  }
  __device__ __forceinline__ uint64_t Div(uint64_t n) const {
    if (d == 1) return n;
    if (n > 0xffffffffull || d > 0xffffffffull) return n / d;
    const uint32_t n32 = static_cast<uint32_t>(n);
    const uint32_t t = __umulhi(n32, mul);
    return (t + ((n32 - t) >> 1)) >> (shift - 1);
  }
};

// ---- launch arguments --------------------------------------------------------------------------

enum class FreqKind : int32_t { kHiLo = 0, kFloat32 = 1, kFloat64 = 2 };

struct KernelArgs {
  RopeParams p;
  const void* freq;   // frequencies for computed angles (FreqKind says how they are stored)
  FreqKind freq_kind;
  int units;          // units per head
  int rot_units;      // rotary units per head (the first ones)
  int units_per_part; // rotary units per rotary part
  int ipt;            // items per thread and row, <= kMaxItems
  int64_t rows;       // M when the batch shares positions, else B * M
  int64_t heads;      // H0 + H1
  int64_t items;      // items per row: B * (H0 + H1) when the batch shares positions, else H0 + H1
  int64_t item_chunks;
  int64_t chunks;     // row groups * item chunks
  bool batch_shared;
  FastDiv div_m;      // row -> (b, m)
  FastDiv div_heads;  // shared row's item -> (b, head)
  FastDiv div_chunks; // work piece -> (row group, item chunk)
};

// Vector of V elements, aligned to its size (16 bytes in the vector variant).
template<typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

__device__ __forceinline__ int64_t LoadIndex(const void* data, IndexType type, int64_t offset) {
  return type == IndexType::kInt32 ? static_cast<int64_t>(__ldg(static_cast<const int32_t*>(data) + offset))
                                   : static_cast<int64_t>(__ldg(static_cast<const long long*>(data) + offset));
}

// Position of token m of sequence b for rotary part r (see RopeParams); false when cu_seqlens
// gives none.
__device__ __forceinline__ bool RowPosition(const RopeParams& p, int64_t b, int r, int64_t m,
                                            int64_t* pos) {
  if (p.pos_type != IndexType::kNone) {
    *pos = LoadIndex(p.position_ids, p.pos_type,
                           b * p.pos_stride_b + r * p.pos_stride_r + m * p.pos_stride_m);
    return true;
  }
  int64_t g = m + p.seqlen_offset;
  if (p.offsets_type != IndexType::kNone) {
    g += LoadIndex(p.seqlen_offsets, p.offsets_type, b * p.offsets_stride);
  }
  if (p.cu_seqlens_type == IndexType::kNone) {
    *pos = g;
    return true;
  }
  const int64_t S = p.num_seqs;
  if (S <= 0 || LoadIndex(p.cu_seqlens, p.cu_seqlens_type, 0) != 0
      || LoadIndex(p.cu_seqlens, p.cu_seqlens_type, S) != p.cu_seqlens_total) {
    return false;
  }
  int64_t lo = 0, hi = S;  // last s in [0, S) with cu_seqlens[s] <= g
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (LoadIndex(p.cu_seqlens, p.cu_seqlens_type, mid) <= g) {
      lo = mid;
    } else {
      hi = mid;
    }
  }
  const int64_t start = LoadIndex(p.cu_seqlens, p.cu_seqlens_type, lo);
  const int64_t end = LoadIndex(p.cu_seqlens, p.cu_seqlens_type, lo + 1);
  if (!(start <= g && g < end)) return false;
  *pos = g - start;
  return true;
}

// Frequency i as a float (hi, lo) pair or a double.
__device__ __forceinline__ void LoadFreq(const KernelArgs& a, int i, float* hi, float* lo) {
  if (a.freq_kind == FreqKind::kHiLo) {
    const float2 f = __ldg(static_cast<const float2*>(a.freq) + i);
    *hi = f.x;
    *lo = f.y;
  } else if (a.freq_kind == FreqKind::kFloat32) {
    *hi = __ldg(static_cast<const float*>(a.freq) + i);
    *lo = 0.f;
  } else {
    const double d = __ldg(static_cast<const double*>(a.freq) + i);
    *hi = static_cast<float>(d);
    *lo = static_cast<float>(d - static_cast<double>(*hi));
  }
}
__device__ __forceinline__ void LoadFreq(const KernelArgs& a, int i, double* d, double*) {
  if (a.freq_kind == FreqKind::kFloat32) {
    *d = static_cast<double>(__ldg(static_cast<const float*>(a.freq) + i));
  } else {
    *d = __ldg(static_cast<const double*>(a.freq) + i);
  }
}

template<bool kFast>
__device__ __forceinline__ void SinCos(int64_t pos, float hi, float lo, float* s, float* c) {
  AngleSinCos<kFast>(pos, hi, lo, s, c);
}
template<bool kFast>
__device__ __forceinline__ void SinCos(int64_t pos, double theta, double, double* s, double* c) {
  sincos(static_cast<double>(pos) * theta, s, c);
}

// Loads V consecutive (kVec) or strided elements; elements at or past `limit` are not read.
template<typename T, int V, bool kVec>
__device__ __forceinline__ Pack<T, V> LoadVec(const T* ptr, int64_t stride, int count) {
  Pack<T, V> out;
  if constexpr (kVec) {
    static_assert(sizeof(Pack<T, V>) == 16, "vector variant moves 16 bytes per access");
    const uint4 raw = __ldcs(reinterpret_cast<const uint4*>(ptr));
    out = *reinterpret_cast<const Pack<T, V>*>(&raw);
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) out.v[e] = e < count ? ptr[e * stride] : T(0);
  }
  return out;
}

template<typename T, int V, bool kVec>
__device__ __forceinline__ void StoreVec(T* ptr, int64_t stride, int count, const Pack<T, V>& in) {
  if constexpr (kVec) {
    __stcs(reinterpret_cast<uint4*>(ptr), *reinterpret_cast<const uint4*>(&in));
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) {
      if (e < count) ptr[e * stride] = in.v[e];
    }
  }
}

// V table entries as compute values (16-byte loads in the vector variant).
template<typename TT, typename C, int V, bool kVec>
__device__ __forceinline__ void LoadTable(const TT* ptr, int64_t stride, C* out) {
  if constexpr (kVec) {
    constexpr int kChunks = V * static_cast<int>(sizeof(TT)) / 16;
    static_assert(kChunks >= 1, "a table vector is at least 16 bytes");
    alignas(16) TT vals[V];
#pragma unroll
    for (int q = 0; q < kChunks; ++q) {
      reinterpret_cast<uint4*>(vals)[q] = __ldg(reinterpret_cast<const uint4*>(ptr) + q);
    }
#pragma unroll
    for (int e = 0; e < V; ++e) out[e] = static_cast<C>(ToCompute(vals[e]));
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) out[e] = static_cast<C>(ToCompute(ptr[e * stride]));
  }
}

// Element offsets of one item (a head of one tensor, of sequence b) in x and out; `second`
// says which tensor.
struct Item {
  const char* x;
  char* out;
  bool second;
};

template<typename T>
__device__ __forceinline__ Item ItemAt(const RopeParams& p, int64_t b, int64_t m, int64_t head) {
  const bool second = head >= p.tensors[0].H;
  const RopeTensor& t0 = p.tensors[0];
  const RopeTensor& t1 = p.tensors[1];
  const int64_t h = second ? head - t0.H : head;
  const int64_t xo = b * (second ? t1.x_stride_b : t0.x_stride_b)
                     + m * (second ? t1.x_stride_m : t0.x_stride_m)
                     + h * (second ? t1.x_stride_h : t0.x_stride_h);
  const int64_t oo = b * (second ? t1.out_stride_b : t0.out_stride_b)
                     + m * (second ? t1.out_stride_m : t0.out_stride_m)
                     + h * (second ? t1.out_stride_h : t0.out_stride_h);
  Item it;
  it.x = static_cast<const char*>(second ? t1.x : t0.x) + xo * static_cast<int64_t>(sizeof(T));
  it.out = static_cast<char*>(second ? t1.out : t0.out) + oo * static_cast<int64_t>(sizeof(T));
  it.second = second;
  return it;
}

// ---- the kernel --------------------------------------------------------------------------------

template<typename T, typename TT, int V, bool kVec, bool kPlane, bool kTable>
__global__ void __launch_bounds__(kMaxBlockThreads) RopeKernel(const KernelArgs a) {
  using C = typename Compute<T>::type;
  using P = Pack<T, V>;
  constexpr bool kFast = sizeof(T) == 2;
  constexpr int kStep = V >= 2 ? 2 : 1;  // elements rounded together
  const RopeParams& p = a.p;
  const int part = static_cast<int>(p.rotary_size / p.rotary_dim);
  const int half = part / 2;
  const int rotary = static_cast<int>(p.rotary_size);
  const int K = static_cast<int>(p.K);
  const C scale = static_cast<C>(p.attention_scaling);
  const C sin_scale = p.inverse ? -scale : scale;
  const int64_t items_per_chunk = static_cast<int64_t>(blockDim.y) * a.ipt;

  for (int u = threadIdx.x; u < a.units; u += blockDim.x) {
    // ---- the unit's geometry and frequencies, once ----
    const bool rot = u < a.rot_units;
    int r = 0, k0, k1, count0 = V, count1 = V;
    if (rot) {
      r = u / a.units_per_part;
      const int c = u - r * a.units_per_part;
      if (kPlane) {
        k0 = r * part + c * V;
        k1 = k0 + half;
      } else {
        k0 = r * part + 2 * c * V;
        k1 = (2 * c + 1) * V < part ? k0 + V : -1;
      }
    } else {
      const int c = u - a.rot_units;
      k0 = rotary + 2 * c * V;
      k1 = k0 + V < K ? k0 + V : -1;
      count0 = min(V, K - k0);
      count1 = k1 >= 0 ? min(V, K - k1) : 0;
    }
    // Computed angles: the unit needs V frequencies; plane uses f[e] for element e of both
    // vectors, interval f[e / 2] for the first vector and f[V / 2 + e / 2] for the second.
    C f_hi[V], f_lo[V];
    if constexpr (!kTable) {
      const int first = kPlane ? k0 - r * part : (k0 - r * part) / 2;
      if (rot) {
#pragma unroll
        for (int e = 0; e < V; ++e) LoadFreq(a, min(first + e, half - 1), &f_hi[e], &f_lo[e]);
      }
    }

    for (int64_t w = blockIdx.x; w < a.chunks; w += gridDim.x) {
      const int64_t group = static_cast<int64_t>(a.div_chunks.Div(static_cast<uint64_t>(w)));
      const int64_t chunk = w - group * a.item_chunks;
      const int64_t row = group * blockDim.z + threadIdx.z;
      if (row >= a.rows) continue;
      int64_t b_row = 0, m = row;
      if (!a.batch_shared) {
        b_row = static_cast<int64_t>(a.div_m.Div(static_cast<uint64_t>(row)));
        m = row - b_row * p.M;
      }
      // ---- issue every load of the thread's items first ----
      const int64_t item0 = chunk * items_per_chunk + threadIdx.y;
      Item at[kMaxItems];
      bool live[kMaxItems];
      P lo[kMaxItems], hi[kMaxItems];
#pragma unroll
      for (int t = 0; t < kMaxItems; ++t) {
        const int64_t item = item0 + static_cast<int64_t>(t) * blockDim.y;
        live[t] = t < a.ipt && item < a.items;
        if (live[t]) {
          int64_t b = b_row, head = item;
          if (a.batch_shared) {
            b = static_cast<int64_t>(a.div_heads.Div(static_cast<uint64_t>(item)));
            head = item - b * a.heads;
          }
          at[t] = ItemAt<T>(p, b, m, head);
          const T* x = reinterpret_cast<const T*>(at[t].x);
          const int64_t xs = kVec ? 1 : (at[t].second ? p.tensors[1].x_stride_k : p.tensors[0].x_stride_k);
          lo[t] = LoadVec<T, V, kVec>(x + k0 * xs, xs, count0);
          if (k1 >= 0) hi[t] = LoadVec<T, V, kVec>(x + k1 * xs, xs, count1);
        }
      }
      // ---- cos/sin of the unit for this row ----
      C c0[V], s0[V], c1[V], s1[V];
      if (rot) {
        int64_t pos = 0;
        bool found = RowPosition(p, b_row, r, m, &pos);
        if (kTable) found = found && pos >= 0 && pos < p.table_rows;
        if (!found) {
#pragma unroll
          for (int e = 0; e < V; ++e) c0[e] = s0[e] = c1[e] = s1[e] = static_cast<C>(NAN);
        } else if constexpr (kTable) {
          const int64_t cs = p.table_col_stride;
          const TT* cos_row = static_cast<const TT*>(p.cos) + pos * p.table_row_stride;
          const TT* sin_row = static_cast<const TT*>(p.sin) + pos * p.table_row_stride;
          const int j0 = k0 - r * part;
          LoadTable<TT, C, V, kVec>(cos_row + j0 * cs, cs, c0);
          LoadTable<TT, C, V, kVec>(sin_row + j0 * cs, cs, s0);
          if (k1 >= 0) {
            const int j1 = k1 - r * part;
            LoadTable<TT, C, V, kVec>(cos_row + j1 * cs, cs, c1);
            LoadTable<TT, C, V, kVec>(sin_row + j1 * cs, cs, s1);
          }
#pragma unroll
          for (int e = 0; e < V; ++e) {
            c0[e] *= scale;
            s0[e] *= sin_scale;
            c1[e] *= scale;
            s1[e] *= sin_scale;
          }
        } else {
          C cs[V], sn[V];
#pragma unroll
          for (int e = 0; e < V; ++e) {
            SinCos<kFast>(pos, f_hi[e], f_lo[e], &sn[e], &cs[e]);
            cs[e] *= scale;
            sn[e] *= sin_scale;
          }
#pragma unroll
          for (int e = 0; e < V; ++e) {
            const int i0 = kPlane ? e : e / 2;
            const int i1 = kPlane ? e : V / 2 + e / 2;
            c0[e] = cs[i0];
            s0[e] = sn[i0];
            c1[e] = cs[i1];
            s1[e] = sn[i1];
          }
        }
      }
      // ---- rotate and store ----
#pragma unroll
      for (int t = 0; t < kMaxItems; ++t) {
        if (!live[t]) continue;
        const bool second = at[t].second;
        T* out = reinterpret_cast<T*>(at[t].out);
        const int64_t os = kVec ? 1 : (second ? p.tensors[1].out_stride_k : p.tensors[0].out_stride_k);
        P o0 = lo[t], o1 = hi[t];
        if (rot) {
          if constexpr (kPlane) {
#pragma unroll
            for (int e = 0; e < V; e += kStep) {
              C ra[kStep], rz[kStep];
#pragma unroll
              for (int q = 0; q < kStep; ++q) {
                const C xa = static_cast<C>(ToCompute(lo[t].v[e + q]));
                const C xz = static_cast<C>(ToCompute(hi[t].v[e + q]));
                ra[q] = xa * c0[e + q] - xz * s0[e + q];
                rz[q] = xz * c1[e + q] + xa * s1[e + q];
              }
              if constexpr (kStep == 2) {
                RoundPair<T, C>(ra[0], ra[1], &o0.v[e]);
                RoundPair<T, C>(rz[0], rz[1], &o1.v[e]);
              } else {
                o0.v[e] = Round<T>(ra[0]);
                o1.v[e] = Round<T>(rz[0]);
              }
            }
          } else {
#pragma unroll
            for (int e = 0; e < V; e += 2) {
              const C a0 = static_cast<C>(ToCompute(lo[t].v[e]));
              const C a1 = static_cast<C>(ToCompute(lo[t].v[e + 1]));
              RoundPair<T, C>(a0 * c0[e] - a1 * s0[e], a1 * c0[e + 1] + a0 * s0[e + 1], &o0.v[e]);
            }
            if (k1 >= 0) {
#pragma unroll
              for (int e = 0; e < V; e += 2) {
                const C z0 = static_cast<C>(ToCompute(hi[t].v[e]));
                const C z1 = static_cast<C>(ToCompute(hi[t].v[e + 1]));
                RoundPair<T, C>(z0 * c1[e] - z1 * s1[e], z1 * c1[e + 1] + z0 * s1[e + 1], &o1.v[e]);
              }
            }
          }
        }
        StoreVec<T, V, kVec>(out + k0 * os, os, count0, o0);
        if (k1 >= 0) StoreVec<T, V, kVec>(out + k1 * os, os, count1, o1);
        const RopeTensor& tensor = second ? p.tensors[1] : p.tensors[0];
        if (tensor.num_zero_slots > 0) {
          P zero;
#pragma unroll
          for (int e = 0; e < V; ++e) zero.v[e] = Round<T>(C(0));
          for (int z = 0; z < tensor.num_zero_slots; ++z) {
            T* zout = out + tensor.zero_slot_offset[z];
            StoreVec<T, V, kVec>(zout + k0 * os, os, count0, zero);
            if (k1 >= 0) StoreVec<T, V, kVec>(zout + k1 * os, os, count1, zero);
          }
        }
      }
    }
  }
}

// ---- host side ---------------------------------------------------------------------------------

struct DeviceInfo {
  int sms = 80;
  int threads_per_sm = 2048;
};

const DeviceInfo& CurrentDeviceInfo() {
  static std::mutex mutex;
  static std::map<int, DeviceInfo> infos;
  int device = 0;
  cudaGetDevice(&device);
  std::lock_guard<std::mutex> lock(mutex);
  auto found = infos.find(device);
  if (found != infos.end()) return found->second;
  DeviceInfo info;
  cudaDeviceGetAttribute(&info.sms, cudaDevAttrMultiProcessorCount, device);
  cudaDeviceGetAttribute(&info.threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, device);
  return infos.emplace(device, info).first->second;
}

// Blocks of `threads` threads of `kernel` that fit on one SM (registers, threads), cached.
int BlocksPerSm(const void* kernel, int threads) {
  static std::mutex mutex;
  static std::map<std::tuple<int, const void*, int>, int> cache;
  int device = 0;
  cudaGetDevice(&device);
  std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_tuple(device, kernel, threads);
  auto found = cache.find(key);
  if (found != cache.end()) return found->second;
  int blocks = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, threads, 0) != cudaSuccess
      || blocks < 1) {
    cudaGetLastError();
    blocks = 1;
  }
  cache.emplace(key, blocks);
  return blocks;
}

bool Aligned(const void* ptr, int bytes) {
  return reinterpret_cast<uintptr_t>(ptr) % static_cast<uintptr_t>(bytes) == 0;
}

// Whether the vector variant (16-byte accesses, V = 16 / sizeof(T)) can run p.
template<typename T, typename TT>
bool VectorFits(const RopeParams& p) {
  constexpr int V = 16 / sizeof(T);
  const int64_t part = p.rotary_part();
  const int64_t half = part / 2;
  if ((p.mode == Mode::kPlane ? half : part) % V != 0) return false;
  if ((p.K - p.rotary_size) % V != 0) return false;
  for (int i = 0; i < p.num_tensors; ++i) {
    const RopeTensor& t = p.tensors[i];
    if (t.x_stride_k != 1 || t.out_stride_k != 1 || !Aligned(t.x, 16) || !Aligned(t.out, 16)) {
      return false;
    }
    for (int64_t s : {t.x_stride_b, t.x_stride_m, t.x_stride_h, t.out_stride_b, t.out_stride_m,
                      t.out_stride_h, t.zero_slot_offset[0], t.zero_slot_offset[1]}) {
      if (s % V != 0) return false;
    }
  }
  if (p.cos != nullptr) {
    if (p.table_col_stride != 1 || !Aligned(p.cos, 16) || !Aligned(p.sin, 16)
        || (p.table_row_stride * static_cast<int64_t>(sizeof(TT))) % 16 != 0) {
      return false;
    }
  }
  return true;
}

struct LaunchShape {
  int ipt;
  dim3 block;
};

int g_override_ipt = 0;      // RopeCudaSetLaunchOverride: 0 keeps the rule's choice
int g_override_threads = 0;

// Items per thread and block shape (RopeCudaSetLaunchOverride can force both, for sweeps).
LaunchShape ChooseShape(int units, int64_t rows, int64_t items, const DeviceInfo& dev) {
  const int* tune = nullptr;
  const int override_values[2] = {g_override_ipt, g_override_threads};
  tune = override_values;
  const int unit_lanes = std::min(units, kMaxUnitLanes);
  const int block_threads = tune[1] > 0 ? std::min(tune[1], kMaxBlockThreads) : kBlockThreads;
  int ipt = tune[0];
  if (ipt <= 0) {
    // As many items per thread as keep one full wave of threads on the device: more items
    // share one row's cos/sin, fewer spread small calls over more SMs.
    const int64_t resident = static_cast<int64_t>(dev.sms) * dev.threads_per_sm;
    ipt = 1;
    for (int cand : {kMaxItems, 2}) {
      const int64_t threads = rows * unit_lanes * ((items + cand - 1) / cand);
      if (threads >= resident) {
        ipt = cand;
        break;
      }
    }
  }
  ipt = std::max(1, std::min(ipt, kMaxItems));
  const int64_t item_lanes_wanted = (items + ipt - 1) / ipt;
  const int item_lanes = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>(item_lanes_wanted, std::max(1, block_threads / unit_lanes))));
  const int row_lanes = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>({rows, std::max(1, block_threads / (unit_lanes * item_lanes)), 64})));
  return {ipt, dim3(unit_lanes, item_lanes, row_lanes)};
}

template<typename T, typename TT, int V, bool kVec>
cudaError_t LaunchVariant(const RopeParams& p, cudaStream_t stream, const DeviceInfo& dev) {
  using C = typename Compute<T>::type;
  const bool plane = p.mode == Mode::kPlane;
  const bool table = p.cos != nullptr;
  KernelArgs a{};
  a.p = p;
  const int64_t part = p.rotary_part();
  if (!table) {
    if (p.inv_freq != nullptr) {
      a.freq = p.inv_freq;
      a.freq_kind = p.inv_freq_dtype == DType::kFloat64 ? FreqKind::kFloat64 : FreqKind::kFloat32;
    } else {
      cudaError_t status = cudaSuccess;
      const FreqTables freq = CachedFrequencies(p.base, std::max<int64_t>(part, 2), &status);
      if (status != cudaSuccess) return status;
      if (sizeof(C) == 8) {
        a.freq = freq.dbl;
        a.freq_kind = FreqKind::kFloat64;
      } else {
        a.freq = freq.hilo;
        a.freq_kind = FreqKind::kHiLo;
      }
    }
  }
  const int64_t vectors_per_part = (part + V - 1) / V;
  a.units_per_part = static_cast<int>(plane ? (part / 2) / V : (vectors_per_part + 1) / 2);
  a.rot_units = p.rotary_dim * a.units_per_part;
  const int64_t pass_vectors = (p.K - p.rotary_size + V - 1) / V;
  a.units = a.rot_units + static_cast<int>((pass_vectors + 1) / 2);
  if (a.units == 0) return cudaSuccess;
  const int64_t heads = p.total_heads();
  a.batch_shared = p.positions_shared_by_batch();
  a.rows = a.batch_shared ? p.M : p.B * p.M;
  a.heads = heads;
  a.items = a.batch_shared ? p.B * heads : heads;
  const LaunchShape shape = ChooseShape(a.units, a.rows, a.items, dev);
  a.ipt = shape.ipt;
  const int64_t items_per_chunk = static_cast<int64_t>(shape.block.y) * shape.ipt;
  a.item_chunks = (a.items + items_per_chunk - 1) / items_per_chunk;
  const int64_t row_groups = (a.rows + shape.block.z - 1) / shape.block.z;
  a.chunks = row_groups * a.item_chunks;
  a.div_m = FastDiv(static_cast<uint64_t>(std::max<int64_t>(1, p.M)));
  a.div_heads = FastDiv(static_cast<uint64_t>(std::max<int64_t>(1, heads)));
  a.div_chunks = FastDiv(static_cast<uint64_t>(a.item_chunks));
  const int threads = static_cast<int>(shape.block.x * shape.block.y * shape.block.z);

  auto launch = [&](auto kernel) -> cudaError_t {
    const int64_t resident =
        static_cast<int64_t>(dev.sms) * BlocksPerSm(reinterpret_cast<const void*>(kernel), threads);
    const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(a.chunks, resident));
    kernel<<<static_cast<unsigned>(blocks), shape.block, 0, stream>>>(a);
    return cudaGetLastError();
  };
  if (plane && table) return launch(RopeKernel<T, TT, V, kVec, true, true>);
  if (plane) return launch(RopeKernel<T, T, V, kVec, true, false>);
  if (table) return launch(RopeKernel<T, TT, V, kVec, false, true>);
  return launch(RopeKernel<T, T, V, kVec, false, false>);
}

template<typename T, typename TT>
cudaError_t Launch(const RopeParams& p, cudaStream_t stream) {
  const DeviceInfo& dev = CurrentDeviceInfo();
  if (VectorFits<T, TT>(p)) return LaunchVariant<T, TT, 16 / sizeof(T), true>(p, stream, dev);
  if (p.mode == Mode::kPlane) return LaunchVariant<T, TT, 1, false>(p, stream, dev);
  return LaunchVariant<T, TT, 2, false>(p, stream, dev);
}

template<typename T>
cudaError_t LaunchWithTable(const RopeParams& p, cudaStream_t stream) {
  if (p.cos != nullptr && p.table_dtype == DType::kFloat32) return Launch<T, float>(p, stream);
  return Launch<T, T>(p, stream);
}

}  // namespace

int RopeForwardCuda(const RopeParams& p, void* stream) {
  if (ValidateRopeParams(p) != nullptr) return static_cast<int>(cudaErrorInvalidValue);
  if (p.numel() == 0) return 0;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  cudaError_t err = cudaSuccess;
  switch (p.dtype) {
    case DType::kFloat32: err = Launch<float, float>(p, s); break;
    case DType::kFloat64: err = Launch<double, double>(p, s); break;
    case DType::kFloat16: err = LaunchWithTable<__half>(p, s); break;
    case DType::kBFloat16: err = LaunchWithTable<__nv_bfloat16>(p, s); break;
  }
  return static_cast<int>(err);
}

void RopeCudaSetLaunchOverride(int items_per_thread, int block_threads) {
  g_override_ipt = items_per_thread;
  g_override_threads = block_threads;
}

const char* RopeCudaErrorString(int status) {
  return cudaGetErrorString(static_cast<cudaError_t>(status));
}

const char* RopeCudaKernelName(const RopeParams& p) {
  bool vec = false;
  const bool float_table = p.cos != nullptr && p.table_dtype == DType::kFloat32;
  switch (p.dtype) {
    case DType::kFloat32: vec = VectorFits<float, float>(p); break;
    case DType::kFloat64: vec = VectorFits<double, double>(p); break;
    case DType::kFloat16:
      vec = float_table ? VectorFits<__half, float>(p) : VectorFits<__half, __half>(p);
      break;
    case DType::kBFloat16:
      vec = float_table ? VectorFits<__nv_bfloat16, float>(p)
                        : VectorFits<__nv_bfloat16, __nv_bfloat16>(p);
      break;
  }
  if (!vec) return "elementwise";
  switch (p.dtype) {
    case DType::kFloat64: return "vector<2>";
    case DType::kFloat32: return "vector<4>";
    default: return "vector<8>";
  }
}

}  // namespace oneflow_rope
