// CUDA kernel of the rotary embedding (Plane = rotate half, Interval = adjacent pairs).
//
// Thread mapping. A head vector of K elements is cut into "units": a rotary unit is a vector of
// V elements and its rotation partner (plane: the vector A/2 further; interval: the vector A/2
// further when both hold whole pairs, else the next one), a pass-through unit is two vectors
// past rotary_size. A thread rotates one unit of up to kItems heads (item lane, item lane +
// lanes, ...) of one token (b, m) of one of the call's tensors (q and k of one launch): the grid
// is flat over (tensor, token, item lane, unit), unit fastest, so a warp reads whole head vectors;
// tokens are numbered in x's memory order (m-major for MB layouts). Large calls give a thread 2
// heads (computed angles) or 4 (tables), small ones (decode) one, in blocks just small enough
// (64..256 threads) to reach every SM. Small calls, and large ones with computed angles, run
// RopeSmallKernel where they fit it: the same unit code with compact arguments and 32-bit offsets,
// threads numbered (token, tensor, item lane, unit), for a shorter instruction chain per thread;
// large calls with tables run RopeKernel's 4-head instances.
// A thread issues its heads' loads first, then makes its unit's cos/sin (computed while the loads
// fly, or loaded from the tables), then rotates and stores; no shared memory, no barrier (one,
// with cu_seqlens, at the start). Calls get a block per piece of work, except those with
// cu_seqlens (and builds with ROPE_PERSISTENT 1 or 2): a persistent grid whose threads load the
// next piece's position while they process the current one.
//
// Two variants: "vector" (16-byte loads and stores; unit-stride K, aligned pointers and sizes)
// and "elementwise" (any strides and sizes, one element per access; V = 1 for plane, 2 for
// interval). Both compute the same values. bench/results/h200_2026-11-29b, -29c and -29d NOTES.md
// have what was measured and tried.
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
#include <type_traits>
#include <vector>

#include "rope/rope_cuda.h"

namespace oneflow_rope {

namespace {

// Compile-time knobs (bench/run_gpu.sh VARIANTS builds alternatives to compare on the device).
#ifndef ROPE_ANGLE_ITEMS
// heads a thread rotates in large calls with computed angles: 1, 2 or 4 (2 ran 2-7% faster than 4
// on the H200: more threads, fewer registers; bench/results/h200_2026-11-29d)
#define ROPE_ANGLE_ITEMS 2
#endif
#ifndef ROPE_TABLE_ITEMS
// heads a thread rotates in large calls with cos/sin tables: 1, 2, 4 or 8 (4 ran up to 7% faster
// than 2 with position_ids: a table row loaded after its position serves more heads; 8, whose
// instances are compiled only when asked for here or in ROPE_ANGLE_ITEMS, is untried)
#define ROPE_TABLE_ITEMS 4
#endif
// the most heads per thread of any instance (8 only when a knob asks for it)
constexpr int kMaxItems = ROPE_TABLE_ITEMS >= 8 || ROPE_ANGLE_ITEMS >= 8 ? 8 : 4;
#ifndef ROPE_ITEMS_WAVES
// large calls (more one-item threads than this many waves of the device's resident threads)
// give each thread several heads; smaller ones one head per thread (latency first)
#define ROPE_ITEMS_WAVES 1
#endif
#ifndef ROPE_PERSISTENT
// 0: a block per piece of the work; 1: at most the blocks that fit on the device at once, each
// looping over pieces and loading the next piece's position ahead; 2: 1 for large calls (several
// heads per thread) whose positions are read from memory, else 0. Calls with cu_seqlens always
// take 1 (blocks check it once). 0 measured best on the H200 (bench/results/h200_2026-11-29d:
// tables with position_ids 0.92 of copy against 0.87 with 2; computed angles 6% slower with 1).
#define ROPE_PERSISTENT 0
#endif
#ifndef ROPE_MIN_BLOCKS
#define ROPE_MIN_BLOCKS 1  // > 1: blocks of 256 threads that must fit per SM (caps registers)
#endif
#ifndef ROPE_STREAM_HINTS
#define ROPE_STREAM_HINTS 0  // 1: x loads and out stores marked streaming (evict-first); measured
                             // ~6% slower on the H200 (bench/probe_mapping.cu)
#endif
#ifndef ROPE_LARGE_BLOCK_THREADS
// threads per block of calls whose threads take several heads (128 ran 1-3% faster than 256 on
// the H200 in two sweeps: finer blocks at the same occupancy)
#define ROPE_LARGE_BLOCK_THREADS 128
#endif
#ifndef ROPE_ANGLE_MIN_BLOCKS
// > 0: blocks of ROPE_LARGE_BLOCK_THREADS threads that must fit per SM in the 2-head instances
// (RopeKernel's and RopeSmallKernel's; caps their registers; such calls then take blocks of
// ROPE_LARGE_BLOCK_THREADS at most).
// 8 (64 registers, from 72) measured 0.6-1.1% slower on the H200's bench (h200_2026-11-29d).
#define ROPE_ANGLE_MIN_BLOCKS 0
#endif
#ifndef ROPE_TABLE_MIN_BLOCKS
// > 0: the same for the 4-head instances of calls with tables (block per piece). 5 caps them at 96
// registers, without spills (ptxas, sm_90): it changes the bfloat16 instances (101-104 registers:
// 4 blocks per SM) and those of 16-bit x with float32 tables (104-112); float16, float32 and
// float64 ones already fit 5 blocks. On the H200's bench of 2026-11-29 (h200_2026-11-29d) a build
// with it ran bfloat16 tables with position_ids 2.5-4% faster (median per row) and the other
// dtypes the same; bench/results/h200_2026-11-29g has the A/B of the present code.
#define ROPE_TABLE_MIN_BLOCKS 5
#endif
#ifndef ROPE_SMALL_KERNEL
// 1: calls with one head per thread (decode and other small calls) of the vector variant take
// RopeSmallKernel (compact arguments, tensors interleaved per token, 32-bit offsets) when they
// fit it; 0: always RopeKernel
#define ROPE_SMALL_KERNEL 1
#endif
#ifndef ROPE_SMALL_ITEMS2
// 1: large calls with computed angles (2 heads per thread) that fit RopeSmallKernel (one tensor or
// q and k, no zero slots, 32-bit offsets) run its 2-head instance instead of RopeKernel's: the
// same work per thread with RopeSmallKernel's shorter instruction path (RopeKernel issued ~45%
// more instructions than a minimal kernel on them: bench/results/h200_2026-11-29g). 0: RopeKernel.
#define ROPE_SMALL_ITEMS2 1
#endif
#ifndef ROPE_PDL
// 1: RopeSmallKernel (small calls, and large calls with computed angles) is launched with
// programmatic dependent launch where the toolkit (CUDA >= 12.3, which also captures such launches
// into CUDA graphs), the device (compute capability >= 9.0) and the kernel's code (compiled for
// compute_90 or later, so that it waits for the previous kernel itself) allow it: the launch and
// the argument work before the first memory access overlap the previous kernel's tail, and the
// next kernel may be scheduled while this one runs. 0: plain launches everywhere.
#define ROPE_PDL 1
#endif
#if ROPE_PDL && defined(CUDART_VERSION) && CUDART_VERSION >= 12030
#define ROPE_HAVE_PDL 1
#else
#define ROPE_HAVE_PDL 0
#endif
#ifndef ROPE_SMALL_PAD_REGS
// > 0 (an experiment, not for use): RopeSmallKernel's computed-angle 2-head instances hold this
// many extra registers live until their stores (words loaded from the frequency table, chained to
// x's data at the end), so that fewer warps fit per SM with the same blocks and no shared memory:
// a clean occupancy test (bench/results/h200_2026-11-29i NOTES, "A register view").
#define ROPE_SMALL_PAD_REGS 0
#endif
#ifndef ROPE_MEMORY_ROW_ORDER
#define ROPE_MEMORY_ROW_ORDER 1  // 0: rows always b-major (row = b * M + m), the order before 2026-11-29
#endif
// threads per block of small calls (one head per thread): enough blocks to reach every SM, blocks
// of kMinSmallBlockThreads to kBlockThreads threads (decode (1, 1, 32, 128) on the H200: 64-thread
// blocks on 4 SMs 5.4-5.5 us against one 256-thread block 5.7-5.9; 32 threads no better than 64)
constexpr int kBlockThreads = 256;
constexpr int kMinSmallBlockThreads = 64;
// launch bound (RopeCudaSetLaunchOverride may ask for 512 unless registers are capped)
constexpr int kMaxBlockThreads = ROPE_MIN_BLOCKS > 1 ? 256 : 512;
// The launch bounds of an instance: ROPE_ANGLE_MIN_BLOCKS / ROPE_TABLE_MIN_BLOCKS when set for it.
constexpr int CappedMinBlocks(int items, bool table, bool pipe) {
  return pipe ? 0 : (items == 2 && !table ? ROPE_ANGLE_MIN_BLOCKS : (items == 4 && table ? ROPE_TABLE_MIN_BLOCKS : 0));
}
constexpr int BoundThreads(int items, bool table, bool pipe) {
  return CappedMinBlocks(items, table, pipe) > 0 ? ROPE_LARGE_BLOCK_THREADS : kMaxBlockThreads;
}
constexpr int BoundMinBlocks(int items, bool table, bool pipe) {
  return CappedMinBlocks(items, table, pipe) > 0 ? CappedMinBlocks(items, table, pipe) : ROPE_MIN_BLOCKS;
}

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

// Division of 32-bit unsigned integers by a divisor fixed at launch (Granlund-Montgomery). The
// launch keeps every numerator below 2^31.
struct FastDiv {
  uint32_t d = 1, mul = 0, shift = 0;
  FastDiv() = default;
  explicit FastDiv(uint32_t divisor) : d(divisor < 1 ? 1 : divisor) {
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

// ---- launch arguments --------------------------------------------------------------------------

enum class FreqKind : int32_t { kHiLo = 0, kFloat32 = 1, kFloat64 = 2 };

// How a head splits into units of V-element vectors (MakeGeometry; computed on the host: no 64-bit
// division at the start of every thread).
struct UnitGeometry {
  int32_t units = 0;           // units per head
  int32_t part = 0;            // A = rotary_size / rotary_dim
  int32_t rot_units = 0;       // rotary units per head (the first ones)
  int32_t units_per_part = 0;  // rotary units per rotary part
  int32_t pass_units = 0;      // pass-through units; unit c moves vectors c and c + pass_units
  bool interval_halves = false;  // interval units pair vector c with the one A/2 further (else c + 1)
};

// Work of one launch: for tensor t, threads (row, item lane, unit) in that order, unit fastest;
// rows are the tokens (b, m), m fastest. Blocks [0, blocks0) hold tensor 0's threads, the rest
// tensor 1's. An item lane takes heads lane, lane + lanes, ... (kItems of them).
struct KernelArgs {
  UnitGeometry geo;
  FreqKind freq_kind;
  const void* freq;       // frequencies for computed angles (FreqKind says how they are stored)
  int32_t rows;           // B * M
  int32_t blocks0;        // blocks of tensor 0
  int32_t blocks;         // blocks of the whole call (the grid may be smaller: blocks loop)
  int32_t lanes[kMaxRopeTensors];  // item lanes per row of each tensor
  // Rows (tokens) in memory order: m_outer (MB layouts: m's stride is the larger) numbers them
  // row = m * B + b, else row = b * M + m; inner_n is B or M and div_inner divides by it. Blocks
  // that run together then touch one stretch of x instead of B stretches (MBHK with B = 4 ran 8%
  // slower than BMHK in the other order: bench/results/h200_2026-11-29d).
  bool m_outer;
  int32_t inner_n;
  FastDiv div_units, div_inner;
  FastDiv div_upp;  // by units_per_part (UnitPart)
  FastDiv div_lanes[kMaxRopeTensors];
  RopeParams p;
};

// Arguments of RopeSmallKernel: what a thread of a small call reads, ~280 bytes (KernelArgs holds
// the whole RopeParams, 600 bytes). Threads are numbered (row, tensor, item lane,
// unit), unit fastest: the q and k heads of a token are neighbours. Offsets fit in
// 32 bits (SmallFits). Positions: idx[b * idx_sb + r * idx_sr + m * idx_sm] (position_ids, or
// seqlen_offsets with idx_sr = idx_sm = 0; none: nullptr) + m_coef * m + pos_add.
struct SmallArgs {
  int32_t threads;        // rows * row_threads
  int32_t row_threads;    // threads per token, (lanes0 + lanes1) * units
  int32_t first_threads;  // those of tensor 0, lanes0 * units
  int32_t lanes0, lanes1;  // item lanes of each tensor (heads / kItems, rounded up): lane l takes
                           // heads l, l + lanes, ...
  int32_t H0, H1;
  // rows in memory order as in KernelArgs: row = m * B + b when m_outer, else b * M + m; inner_n
  // is B or M
  bool m_outer;
  int32_t inner_n;
  FastDiv div_row, div_units, div_inner, div_upp;
  const void* idx;
  int32_t idx_sb, idx_sr, idx_sm;
  int32_t m_coef;
  int64_t pos_add;
  IndexType idx_type;
  bool inverse;
  UnitGeometry geo;
  int32_t rotary, K;
  const void* freq;
  const void* cos;
  const void* sin;
  int64_t table_rows, table_row_stride;
  double attention_scaling;
  // tensors 0 and 1 (q and k of one launch): x, out and their b, m, h strides
  const void* x0;
  const void* x1;
  void* out0;
  void* out1;
  int32_t xs0_b, xs0_m, xs0_h, xs1_b, xs1_m, xs1_h;
  int32_t os0_b, os0_m, os0_h, os1_b, os1_m, os1_h;
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
                                            bool cu_seqlens_decreasing, int64_t* pos) {
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
  if (S <= 0 || cu_seqlens_decreasing || LoadIndex(p.cu_seqlens, p.cu_seqlens_type, 0) != 0
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

// Frequency i, stored as kKind, as a float (hi, lo) pair or a double.
template<FreqKind kKind>
__device__ __forceinline__ void LoadFreq(const void* freq, int i, float* hi, float* lo) {
  if constexpr (kKind == FreqKind::kHiLo) {
    const float2 f = __ldg(static_cast<const float2*>(freq) + i);
    *hi = f.x;
    *lo = f.y;
  } else if constexpr (kKind == FreqKind::kFloat32) {
    *hi = __ldg(static_cast<const float*>(freq) + i);
    *lo = 0.f;
  } else {
    const double d = __ldg(static_cast<const double*>(freq) + i);
    *hi = static_cast<float>(d);
    *lo = static_cast<float>(d - static_cast<double>(*hi));
  }
}
template<FreqKind kKind>
__device__ __forceinline__ void LoadFreq(const void* freq, int i, double* d, double*) {
  if constexpr (kKind == FreqKind::kFloat32) {
    *d = static_cast<double>(__ldg(static_cast<const float*>(freq) + i));
  } else {
    *d = __ldg(static_cast<const double*>(freq) + i);  // kFloat64 (kHiLo is never used with double)
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

// Loads V consecutive (kVec) or strided elements; elements at or past `count` are not read.
template<typename T, int V, bool kVec>
__device__ __forceinline__ Pack<T, V> LoadVec(const T* ptr, int64_t stride, int count) {
  Pack<T, V> out;
  if constexpr (kVec) {
    static_assert(sizeof(Pack<T, V>) == 16, "vector variant moves 16 bytes per access");
#if ROPE_STREAM_HINTS
    const uint4 raw = __ldcs(reinterpret_cast<const uint4*>(ptr));
#else
    const uint4 raw = *reinterpret_cast<const uint4*>(ptr);
#endif
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
#if ROPE_STREAM_HINTS
    __stcs(reinterpret_cast<uint4*>(ptr), *reinterpret_cast<const uint4*>(&in));
#else
    *reinterpret_cast<uint4*>(ptr) = *reinterpret_cast<const uint4*>(&in);
#endif
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) {
      if (e < count) ptr[e * stride] = in.v[e];
    }
  }
}

// V table entries, kept in the table's own type until they are used (16-bit tables take half
// the registers of converted ones); 16-byte loads in the vector variant.
template<typename TT, int V, bool kVec>
__device__ __forceinline__ Pack<TT, V> LoadTable(const TT* ptr, int64_t stride) {
  Pack<TT, V> out;
  if constexpr (kVec) {
    constexpr int kChunks = V * static_cast<int>(sizeof(TT)) / 16;
    static_assert(kChunks >= 1, "a table vector is at least 16 bytes");
#pragma unroll
    for (int q = 0; q < kChunks; ++q) {
      reinterpret_cast<uint4*>(out.v)[q] = __ldg(reinterpret_cast<const uint4*>(ptr) + q);
    }
  } else {
#pragma unroll
    for (int e = 0; e < V; ++e) out.v[e] = ptr[e * stride];
  }
  return out;
}

// Flips the sign of every entry (sin -> -sin for the backward) on the stored bits.
template<typename TT, int V>
__device__ __forceinline__ void NegateTable(Pack<TT, V>* t) {
  if constexpr (sizeof(TT) == 8) {
#pragma unroll
    for (int e = 0; e < V; ++e) t->v[e] = -t->v[e];
  } else if constexpr (sizeof(Pack<TT, V>) % 4 == 0) {
    constexpr uint32_t kSign = sizeof(TT) == 2 ? 0x80008000u : 0x80000000u;
    uint32_t* w = reinterpret_cast<uint32_t*>(t->v);
#pragma unroll
    for (int q = 0; q < static_cast<int>(sizeof(Pack<TT, V>)) / 4; ++q) w[q] ^= kSign;
  } else {  // one 16-bit entry
    uint16_t* h = reinterpret_cast<uint16_t*>(t->v);
    h[0] ^= 0x8000u;
  }
}

// ---- the kernel --------------------------------------------------------------------------------

// Unit geometry: the element offsets of its two vectors (k1 < 0: none), the elements of each
// that exist, its rotary part r and whether it rotates.
struct Unit {
  int k0, k1, count0, count1, r;
  bool rot;
};

// Rotary part of rotary unit u (Args: KernelArgs or SmallArgs).
template<typename Args>
__device__ __forceinline__ int UnitPart(const Args& a, int u) {
  return a.geo.units_per_part == a.geo.rot_units ? 0 : static_cast<int>(a.div_upp.Div(static_cast<uint32_t>(u)));
}

template<int V, bool kPlane, typename Args>
__device__ __forceinline__ Unit UnitAt(const Args& a, int u, int part, int rotary, int K) {
  Unit g;
  g.rot = u < a.geo.rot_units;
  g.r = 0;
  g.count0 = g.count1 = V;
  if (g.rot) {
    g.r = UnitPart(a, u);
    const int c = u - g.r * a.geo.units_per_part;
    if (kPlane || a.geo.interval_halves) {
      // a vector and the one A/2 further: plane partners; for interval both hold whole pairs,
      // and a warp's loads stay contiguous
      g.k0 = g.r * part + c * V;
      g.k1 = g.k0 + part / 2;
    } else {
      g.k0 = g.r * part + 2 * c * V;
      g.k1 = (2 * c + 1) * V < part ? g.k0 + V : -1;
    }
  } else {
    const int c = u - a.geo.rot_units;
    g.k0 = rotary + c * V;
    g.k1 = rotary + (c + a.geo.pass_units) * V;
    if (g.k1 >= K) g.k1 = -1;
    g.count0 = min(V, K - g.k0);
    g.count1 = g.k1 >= 0 ? min(V, K - g.k1) : 0;
  }
  return g;
}

// Frequencies of a rotary unit's V angles (computed angles). Plane: frequency f0 + e for element
// e of both vectors. Interval: f0 + e for e < V / 2 (the first vector's pairs), f1 + e for the
// rest (the second vector's pairs).
template<FreqKind kKind, int V, bool kPlane, typename C>
__device__ __forceinline__ void LoadUnitFreqsOf(const void* freq, const Unit& g, int part, C* hi_f, C* lo_f) {
  const int half = part / 2;
  const int f0 = kPlane ? g.k0 - g.r * part : (g.k0 - g.r * part) / 2;
  const int f1 = kPlane ? f0 : (g.k1 >= 0 ? (g.k1 - g.r * part) / 2 : f0) - V / 2;
#pragma unroll
  for (int e = 0; e < V; ++e) {
    LoadFreq<kKind>(freq, min((kPlane || e < V / 2 ? f0 : f1) + e, half - 1), &hi_f[e], &lo_f[e]);
  }
}
template<int V, bool kPlane, typename C>
__device__ __forceinline__ void LoadUnitFreqs(FreqKind kind, const void* freq, const Unit& g, int part,
                                              C* hi_f, C* lo_f) {
  if (kind == FreqKind::kHiLo) {
    LoadUnitFreqsOf<FreqKind::kHiLo, V, kPlane>(freq, g, part, hi_f, lo_f);
  } else if (kind == FreqKind::kFloat32) {
    LoadUnitFreqsOf<FreqKind::kFloat32, V, kPlane>(freq, g, part, hi_f, lo_f);
  } else {
    LoadUnitFreqsOf<FreqKind::kFloat64, V, kPlane>(freq, g, part, hi_f, lo_f);
  }
}

// cos/sin of one rotary unit and the rotation of one head's unit with them. Tables give one value
// per element of each vector (tc0, ts0 for the first, tc1, ts1 for the second), kept in the table's
// type until used (16-bit tables take half the registers of converted ones; sin negated on its
// bits for the backward; the scaling applied to the rotated values). Computed angles give V
// values (scaled): plane, angle e for element e of both vectors; interval, angle e / 2 for the
// first vector and V / 2 + e / 2 for the second.
template<typename T, typename TT, int V, bool kPlane, bool kTable>
struct UnitTrig {
  using C = typename Compute<T>::type;
  using P = Pack<T, V>;
  Pack<TT, V> tc0, ts0, tc1, ts1;
  C c0[kTable ? 1 : V], s0[kTable ? 1 : V];

  __device__ __forceinline__ void SetNan() {
#pragma unroll
    for (int e = 0; e < V; ++e) {
      if constexpr (kTable) {
        tc0.v[e] = ts0.v[e] = tc1.v[e] = ts1.v[e] = Round<TT>(static_cast<C>(NAN));
      } else {
        c0[e] = s0[e] = static_cast<C>(NAN);
      }
    }
  }
  // Table rows at column j0 (first vector) and j1 (second; < 0: none).
  template<bool kVec>
  __device__ __forceinline__ void LoadTables(const TT* cos_row, const TT* sin_row, int64_t cs, int j0, int j1,
                                             bool inverse) {
    tc0 = LoadTable<TT, V, kVec>(cos_row + j0 * cs, cs);
    ts0 = LoadTable<TT, V, kVec>(sin_row + j0 * cs, cs);
    if (j1 >= 0) {
      tc1 = LoadTable<TT, V, kVec>(cos_row + j1 * cs, cs);
      ts1 = LoadTable<TT, V, kVec>(sin_row + j1 * cs, cs);
    }
    if (inverse) {
      NegateTable(&ts0);
      NegateTable(&ts1);
    }
  }
  template<bool kFast>
  __device__ __forceinline__ void MakeAngles(int64_t pos, const C* hi_f, const C* lo_f, C scale, C sin_scale) {
#pragma unroll
    for (int e = 0; e < V; ++e) {
      SinCos<kFast>(pos, hi_f[e], lo_f[e], &s0[e], &c0[e]);
      c0[e] *= scale;
      s0[e] *= sin_scale;
    }
  }
  __device__ __forceinline__ C cos_a(int e) const {
    if constexpr (kTable) return static_cast<C>(ToCompute(tc0.v[e])); else return c0[kPlane ? e : e / 2];
  }
  __device__ __forceinline__ C sin_a(int e) const {
    if constexpr (kTable) return static_cast<C>(ToCompute(ts0.v[e])); else return s0[kPlane ? e : e / 2];
  }
  __device__ __forceinline__ C cos_z(int e) const {
    if constexpr (kTable) return static_cast<C>(ToCompute(tc1.v[e])); else return c0[kPlane ? e : V / 2 + e / 2];
  }
  __device__ __forceinline__ C sin_z(int e) const {
    if constexpr (kTable) return static_cast<C>(ToCompute(ts1.v[e])); else return s0[kPlane ? e : V / 2 + e / 2];
  }
  // Rotates a head's unit (lo: its first vector, hi: its second, when has_hi) into o0, o1
  // (scaled: the rotated values times scale, for tables).
  __device__ __forceinline__ void Rotate(const P& lo, const P& hi, bool has_hi, bool scaled, C scale, P* o0,
                                         P* o1) const {
    auto sv = [&](C v) -> C { return scaled ? v * scale : v; };
    if constexpr (kPlane) {
      constexpr int kStep = V >= 2 ? 2 : 1;  // elements rounded together
#pragma unroll
      for (int e = 0; e < V; e += kStep) {
        C ra[kStep], rz[kStep];
#pragma unroll
        for (int q = 0; q < kStep; ++q) {
          const C xa = static_cast<C>(ToCompute(lo.v[e + q]));
          const C xz = static_cast<C>(ToCompute(hi.v[e + q]));
          ra[q] = sv(xa * cos_a(e + q) - xz * sin_a(e + q));
          rz[q] = sv(xz * cos_z(e + q) + xa * sin_z(e + q));
        }
        if constexpr (kStep == 2) {
          RoundPair<T, C>(ra[0], ra[1], &o0->v[e]);
          RoundPair<T, C>(rz[0], rz[1], &o1->v[e]);
        } else {
          o0->v[e] = Round<T>(ra[0]);
          o1->v[e] = Round<T>(rz[0]);
        }
      }
    } else {
#pragma unroll
      for (int e = 0; e < V; e += 2) {
        const C a0 = static_cast<C>(ToCompute(lo.v[e]));
        const C a1 = static_cast<C>(ToCompute(lo.v[e + 1]));
        RoundPair<T, C>(sv(a0 * cos_a(e) - a1 * sin_a(e)), sv(a1 * cos_a(e + 1) + a0 * sin_a(e + 1)), &o0->v[e]);
      }
      if (has_hi) {
#pragma unroll
        for (int e = 0; e < V; e += 2) {
          const C z0 = static_cast<C>(ToCompute(hi.v[e]));
          const C z1 = static_cast<C>(ToCompute(hi.v[e + 1]));
          RoundPair<T, C>(sv(z0 * cos_z(e) - z1 * sin_z(e)), sv(z1 * cos_z(e + 1) + z0 * sin_z(e + 1)), &o1->v[e]);
        }
      }
    }
  }
};

// One thread's piece of work in block blk: tensor, token (b, m), item lane and unit.
struct Piece {
  bool live, second;
  int u, lane, lanes, b, m;
};

__device__ __forceinline__ Piece PieceAt(const KernelArgs& a, int blk) {
  Piece w;
  w.second = blk >= a.blocks0;
  const uint32_t gid = static_cast<uint32_t>(w.second ? blk - a.blocks0 : blk) * blockDim.x + threadIdx.x;
  const uint32_t lane_row = a.div_units.Div(gid);
  w.u = static_cast<int>(gid - lane_row * static_cast<uint32_t>(a.geo.units));
  w.lanes = w.second ? a.lanes[1] : a.lanes[0];
  const uint32_t row = (w.second ? a.div_lanes[1] : a.div_lanes[0]).Div(lane_row);
  w.lane = static_cast<int>(lane_row - row * static_cast<uint32_t>(w.lanes));
  w.live = blk < a.blocks && row < static_cast<uint32_t>(a.rows);
  const int outer = static_cast<int>(a.div_inner.Div(row));
  const int inner = static_cast<int>(row) - outer * a.inner_n;
  w.b = a.m_outer ? inner : outer;
  w.m = a.m_outer ? outer : inner;
  return w;
}

// Position of the piece's token for its unit's rotary part (0 for pass-through units), in two
// steps so the persistent grid can load a piece's position (position_ids[b, r, m] or
// seqlen_offsets[b]) a piece ahead and use the value only when the piece's turn comes: used at
// once (a range check), the load made the thread wait a DRAM round trip before its current
// piece's loads. StartPosition issues the load and returns the value unused; FinishPosition makes
// the position from it with no branch, and says false when there is none (cu_seqlens places no
// token there, or it falls outside the cos/sin table). cu_seqlens positions are searched in
// StartPosition.
struct PendingPosition {
  int64_t v = 0;
  int kind = 0;  // 0: v is the position; 1: v is position_ids[b, r, m]; 2: v is seqlen_offsets[b]
  bool found = true;
};

__device__ __forceinline__ PendingPosition StartPosition(const KernelArgs& a, const Piece& w,
                                                         bool cu_seqlens_decreasing) {
  PendingPosition s;
  if (!w.live || w.u >= a.geo.rot_units) return s;
  const RopeParams& p = a.p;
  const int r = UnitPart(a, w.u);
  if (p.pos_type != IndexType::kNone) {
    s.kind = 1;
    s.v = LoadIndex(p.position_ids, p.pos_type, w.b * p.pos_stride_b + r * p.pos_stride_r + w.m * p.pos_stride_m);
  } else if (p.cu_seqlens_type == IndexType::kNone) {
    s.kind = 2;
    if (p.offsets_type != IndexType::kNone) s.v = LoadIndex(p.seqlen_offsets, p.offsets_type, w.b * p.offsets_stride);
  } else {
    s.found = RowPosition(p, w.b, r, w.m, cu_seqlens_decreasing, &s.v);
  }
  return s;
}

template<bool kTable>
__device__ __forceinline__ bool FinishPosition(const KernelArgs& a, const Piece& w, const PendingPosition& s,
                                               int64_t* pos) {
  *pos = s.kind == 2 ? s.v + w.m + a.p.seqlen_offset : s.v;
  bool found = s.found;
  if (kTable) found = found && *pos >= 0 && *pos < a.p.table_rows;
  return found;
}

// One thread: one unit of kItems heads of one token (b, m) of one tensor. In order: the token's
// position (made first, or loaded a piece ahead in the persistent grid), the loads of its heads'
// vectors, the unit's cos/sin (table loads, or computed while the loads fly), then the rotation
// and the stores. Large calls give a thread 2 or 4 heads (ROPE_ANGLE_ITEMS, ROPE_TABLE_ITEMS),
// small ones 1.
template<typename T, typename TT, int V, bool kVec, bool kPlane, bool kTable, int kItems, bool kPipe>
__global__ void __launch_bounds__(BoundThreads(kItems, kTable, kPipe), BoundMinBlocks(kItems, kTable, kPipe))
    RopeKernel(const KernelArgs a) {
  using C = typename Compute<T>::type;
  using P = Pack<T, V>;
  constexpr bool kFast = sizeof(T) == 2;
  const RopeParams& p = a.p;
  const int part = a.geo.part;

  // A decreasing cu_seqlens places no token (every row NaN): the block checks its S + 1 entries
  // once, each thread a share, and agrees through the barrier's predicate (every thread of the
  // block reaches it: the condition is the same for all).
  bool cu_seqlens_decreasing = false;
  if (p.cu_seqlens_type != IndexType::kNone) {
    for (int64_t s = threadIdx.x; s < p.num_seqs; s += blockDim.x) {
      if (LoadIndex(p.cu_seqlens, p.cu_seqlens_type, s + 1) < LoadIndex(p.cu_seqlens, p.cu_seqlens_type, s)) {
        cu_seqlens_decreasing = true;
      }
    }
    cu_seqlens_decreasing = __syncthreads_or(cu_seqlens_decreasing) != 0;
  }

  // One piece of work: the rotation of the thread's heads at token (cur.b, cur.m).
  // position(&pos) gives the piece's position (false: none); it is asked for after the piece's x
  // loads are issued (the persistent grid finishes there the position it loaded a piece ahead).
  auto run_piece = [&](const Piece& cur, auto position) {
    const int b = cur.b, m = cur.m, lane = cur.lane, lanes = cur.lanes;
    const RopeTensor& ts = cur.second ? p.tensors[1] : p.tensors[0];
    const int H = static_cast<int>(ts.H);
    const Unit g = UnitAt<V, kPlane>(a, cur.u, part, static_cast<int>(p.rotary_size), static_cast<int>(p.K));

    // the heads' loads
    const int64_t xs = kVec ? 1 : ts.x_stride_k;
    const int64_t os = kVec ? 1 : ts.out_stride_k;
    const T* x = static_cast<const T*>(ts.x) + b * ts.x_stride_b + m * ts.x_stride_m + lane * ts.x_stride_h;
    T* out = static_cast<T*>(ts.out) + b * ts.out_stride_b + m * ts.out_stride_m + lane * ts.out_stride_h;
    const int64_t x_step = lanes * ts.x_stride_h;
    const int64_t out_step = lanes * ts.out_stride_h;
    P lo[kItems], hi[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      if (lane + i * lanes < H) {
        const T* xi = x + i * x_step;
        lo[i] = LoadVec<T, V, kVec>(xi + g.k0 * xs, xs, g.count0);
        if (g.k1 >= 0) hi[i] = LoadVec<T, V, kVec>(xi + g.k1 * xs, xs, g.count1);
      }
    }
    // computed angles: the unit's frequencies (small calls: loaded while the x loads fly and
    // before the position is asked for, as a decode step's position may still be on its way from
    // memory; large calls load them after, which takes fewer registers)
    [[maybe_unused]] C hi_f[kTable ? 1 : V], lo_f[kTable ? 1 : V];
    constexpr bool kEarlyFreqs = !kTable && kItems == 1;
    if constexpr (kEarlyFreqs) {
      if (g.rot) LoadUnitFreqs<V, kPlane>(a.freq_kind, a.freq, g, part, hi_f, lo_f);
    }
    int64_t cur_pos = 0;
    const bool cur_found = position(&cur_pos);

    // cos/sin of the unit (UnitTrig)
    UnitTrig<T, TT, V, kPlane, kTable> trig;
    const C scale = static_cast<C>(p.attention_scaling);
    const bool scaled = kTable && p.attention_scaling != 1.0;
    if (g.rot) {
      if (!cur_found) {
        trig.SetNan();
      } else if constexpr (kTable) {
        const TT* cos_row = static_cast<const TT*>(p.cos) + cur_pos * p.table_row_stride;
        const TT* sin_row = static_cast<const TT*>(p.sin) + cur_pos * p.table_row_stride;
        trig.template LoadTables<kVec>(cos_row, sin_row, p.table_col_stride, g.k0 - g.r * part,
                                       g.k1 >= 0 ? g.k1 - g.r * part : -1, p.inverse);
      } else {
        if constexpr (!kEarlyFreqs) LoadUnitFreqs<V, kPlane>(a.freq_kind, a.freq, g, part, hi_f, lo_f);
        trig.template MakeAngles<kFast>(cur_pos, hi_f, lo_f, scale, p.inverse ? -scale : scale);
      }
    }

    // rotate and store each head (plus zeros in a packed gradient's other slots)
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      if (lane + i * lanes >= H) continue;
      T* oi = out + i * out_step;
      P o0 = lo[i], o1 = hi[i];
      if (g.rot) trig.Rotate(lo[i], hi[i], g.k1 >= 0, scaled, scale, &o0, &o1);
      StoreVec<T, V, kVec>(oi + g.k0 * os, os, g.count0, o0);
      if (g.k1 >= 0) StoreVec<T, V, kVec>(oi + g.k1 * os, os, g.count1, o1);
      if (ts.num_zero_slots > 0) {
        P zero;
#pragma unroll
        for (int e = 0; e < V; ++e) zero.v[e] = Round<T>(C(0));
        for (int z = 0; z < ts.num_zero_slots; ++z) {
          T* zout = oi + ts.zero_slot_offset[z];
          StoreVec<T, V, kVec>(zout + g.k0 * os, os, g.count0, zero);
          if (g.k1 >= 0) StoreVec<T, V, kVec>(zout + g.k1 * os, os, g.count1, zero);
        }
      }
    }
  };

  if constexpr (!kPipe) {
    // A block per piece of work. A position made from the row index is made before the x loads:
    // made after them it made the thread wait for the x loads first (the code after the loads
    // waits on the scoreboard of the position load of the other path; measured 0.81 vs 0.90 of
    // copy with tables on the H200).
    // In small calls (one head per thread: decode) a position read from memory is loaded before
    // the x loads and used after them, so its DRAM round trip overlaps theirs; the two paths are
    // separate code so that the other one never waits on that load's scoreboard. Large calls
    // with positions in memory wait for the position before their x loads (issuing the x loads
    // first measured 0.76 vs 0.88 of copy with tables and position_ids on the H200; an L2
    // prefetch of x while the position loads gained nothing over the whole bench:
    // bench/results/h200_2026-11-29e).
    const Piece w = PieceAt(a, blockIdx.x);
    if (!w.live) return;
    const PendingPosition start = StartPosition(a, w, cu_seqlens_decreasing);
    if (kItems == 1 && (p.pos_type != IndexType::kNone || p.offsets_type != IndexType::kNone)) {
      run_piece(w, [&](int64_t* pos) { return FinishPosition<kTable>(a, w, start, pos); });
    } else {
      int64_t pos = 0;
      const bool found = FinishPosition<kTable>(a, w, start, &pos);
      run_piece(w, [&](int64_t* q) {
        *q = pos;
        return found;
      });
    }
  } else {
    // A persistent grid: blockIdx.x, then every gridDim.x-th piece. The position of the next
    // piece is loaded while the current one is processed and used only when its turn comes, so
    // a piece's x and table loads go out together instead of waiting on its position.
    int blk = blockIdx.x;  // < a.blocks: the grid is at most a.blocks
    Piece w = PieceAt(a, blk);
    PendingPosition pending = StartPosition(a, w, cu_seqlens_decreasing);
    while (true) {
      const Piece cur = w;
      const PendingPosition cur_pending = pending;
      const bool more = static_cast<int>(gridDim.x) < a.blocks - blk;  // no overflow near 2^31
      if (more) {
        w = PieceAt(a, blk + static_cast<int>(gridDim.x));
        pending = StartPosition(a, w, cu_seqlens_decreasing);
      }
      if (cur.live) {
        run_piece(cur, [&](int64_t* p) { return FinishPosition<kTable>(a, cur, cur_pending, p); });
      }
      if (!more) break;
      blk += static_cast<int>(gridDim.x);
    }
  }
}

// RopeSmallKernel's launch bounds: the 2-head instances capped like RopeKernel's when
// ROPE_ANGLE_MIN_BLOCKS is set, else (and the 1-head ones always) the block size alone.
#if ROPE_ANGLE_MIN_BLOCKS > 0
#define ROPE_SMALL_BOUNDS(items) \
  __launch_bounds__((items) == 2 ? BoundThreads(2, false, false) : kMaxBlockThreads, \
                    (items) == 2 ? BoundMinBlocks(2, false, false) : 1)
#else
#define ROPE_SMALL_BOUNDS(items) __launch_bounds__(kMaxBlockThreads)
#endif

// Small calls (one head per thread: decode steps, short prompts), and with kItems = 2 the large
// calls with computed angles: one unit of kItems heads (item lane, lane + lanes) of one token per
// thread, as RopeKernel's instances compute it, with less work between the start and the position's
// load and between its arrival and the stores. A
// decode step is a latency chain of a few warps per SM (position load, sin/cos, rotation,
// stores), so each instruction on it counts: RopeKernel's one-head instance issued ~2x the
// instructions per warp of a minimal kernel, and waited longer on instruction fetch (the code
// comes from DRAM after L2 is emptied; bench/results/h200_2026-11-29f).
// kKind: how the frequencies of computed angles are stored (one instance per kind).
template<typename T, typename TT, int V, bool kPlane, bool kTable, FreqKind kKind, int kItems>
__global__ void ROPE_SMALL_BOUNDS(kItems) RopeSmallKernel(const SmallArgs a) {
  using C = typename Compute<T>::type;
  using P = Pack<T, V>;
  constexpr bool kFast = sizeof(T) == 2;
  const int gid = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (gid >= a.threads) return;
  const int row = static_cast<int>(a.div_row.Div(static_cast<uint32_t>(gid)));
  const int j = gid - row * a.row_threads;
  const bool second = j >= a.first_threads;
  const int jt = second ? j - a.first_threads : j;
  const int lane = static_cast<int>(a.div_units.Div(static_cast<uint32_t>(jt)));
  const int u = jt - lane * a.geo.units;
  const int outer = static_cast<int>(a.div_inner.Div(static_cast<uint32_t>(row)));
  const int inner = row - outer * a.inner_n;
  const int b = a.m_outer ? inner : outer;
  const int m = a.m_outer ? outer : inner;
  const bool rot = u < a.geo.rot_units;
#if ROPE_SMALL_PAD_REGS > 0
  [[maybe_unused]] uint32_t pad[ROPE_SMALL_PAD_REGS];  // loaded after the PDL wait, below
#endif

  // position() gives the token's position; asked for after the x loads are issued
  auto run = [&](auto position) {
    const Unit g = UnitAt<V, kPlane>(a, u, a.geo.part, a.rotary, a.K);
    const int lanes = second ? a.lanes1 : a.lanes0;
    const int H = second ? a.H1 : a.H0;
    const int xs_h = second ? a.xs1_h : a.xs0_h;
    const int xo = b * (second ? a.xs1_b : a.xs0_b) + m * (second ? a.xs1_m : a.xs0_m) + lane * xs_h;
    const T* x = static_cast<const T*>(second ? a.x1 : a.x0) + xo;
    P lo[kItems], hi[kItems];
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      if (kItems == 1 || lane + i * lanes < H) {
        const T* xi = x + i * lanes * xs_h;
        lo[i] = LoadVec<T, V, true>(xi + g.k0, 1, V);
        if (g.k1 >= 0) hi[i] = LoadVec<T, V, true>(xi + g.k1, 1, V);
      }
    }
    [[maybe_unused]] C hi_f[kTable ? 1 : V], lo_f[kTable ? 1 : V];
    if constexpr (!kTable) {
      if (rot) LoadUnitFreqsOf<kKind, V, kPlane>(a.freq, g, a.geo.part, hi_f, lo_f);
    }
    const int64_t pos = position();
    UnitTrig<T, TT, V, kPlane, kTable> trig;
    const C scale = static_cast<C>(a.attention_scaling);
    const bool scaled = kTable && a.attention_scaling != 1.0;
    if (rot) {
      if constexpr (kTable) {
        if (pos < 0 || pos >= a.table_rows) {
          trig.SetNan();
        } else {
          const int64_t row_offset = pos * a.table_row_stride;
          trig.template LoadTables<true>(static_cast<const TT*>(a.cos) + row_offset,
                                         static_cast<const TT*>(a.sin) + row_offset, 1, g.k0 - g.r * a.geo.part,
                                         g.k1 >= 0 ? g.k1 - g.r * a.geo.part : -1, a.inverse);
        }
      } else {
        trig.template MakeAngles<kFast>(pos, hi_f, lo_f, scale, a.inverse ? -scale : scale);
      }
    }
    const int os_h = second ? a.os1_h : a.os0_h;
    const int oo = b * (second ? a.os1_b : a.os0_b) + m * (second ? a.os1_m : a.os0_m) + lane * os_h;
    T* out = static_cast<T*>(second ? a.out1 : a.out0) + oo;
#pragma unroll
    for (int i = 0; i < kItems; ++i) {
      if (kItems == 1 || lane + i * lanes < H) {
        P o0 = lo[i], o1 = hi[i];
        if (rot) trig.Rotate(lo[i], hi[i], g.k1 >= 0, scaled, scale, &o0, &o1);
        T* oi = out + i * lanes * os_h;
        StoreVec<T, V, true>(oi + g.k0, 1, V, o0);
        if (g.k1 >= 0) StoreVec<T, V, true>(oi + g.k1, 1, V, o1);
      }
    }
#if ROPE_SMALL_PAD_REGS > 0
    if constexpr (kItems == 2 && !kTable) {  // the pads chained to x's data (not reassociable)
      uint32_t acc = *reinterpret_cast<const uint32_t*>(&lo[0]);
#pragma unroll
      for (int i = 0; i < ROPE_SMALL_PAD_REGS; ++i) acc = acc * pad[i] + 1u;
      if (a.threads < 0) *static_cast<uint32_t*>(a.out0) = acc;  // never: a use the compiler must keep
    }
#endif
  };
#if ROPE_HAVE_PDL && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  // Programmatic dependent launch (LaunchSmall): the next kernel may be scheduled now (it waits
  // for this grid's completion itself); this one waits for the previous kernel's completion and
  // memory here, after its index work and before its first global access (a no-op when launched
  // without the attribute).
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
#if ROPE_SMALL_PAD_REGS > 0
  if constexpr (kItems == 2 && !kTable) {
    // words of the frequencies (every kind holds at least part / 2 of them: float32 inv_freq)
#pragma unroll
    for (int i = 0; i < ROPE_SMALL_PAD_REGS; ++i) {
      const uint32_t* w = static_cast<const uint32_t*>(a.freq) + min(i, a.geo.part / 2 - 1);
      asm volatile("ld.global.u32 %0, [%1];" : "=r"(pad[i]) : "l"(w));
    }
  }
#endif
  // A position read from memory is loaded before the x loads and used after them (its DRAM round
  // trip overlaps theirs); the two paths are separate code, so the other never waits on that
  // load's scoreboard.
  if (a.idx != nullptr) {
    const int64_t v = rot ? LoadIndex(a.idx, a.idx_type, b * a.idx_sb + UnitPart(a, u) * a.idx_sr + m * a.idx_sm) : 0;
    run([&] { return v + a.m_coef * m + a.pos_add; });
  } else {
    run([&] { return static_cast<int64_t>(m) + a.pos_add; });
  }
}

// ---- host side ---------------------------------------------------------------------------------

struct DeviceInfo {
  int sms = 80;
  int threads_per_sm = 2048;
  int major = 0;  // compute capability
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
  cudaDeviceGetAttribute(&info.major, cudaDevAttrComputeCapabilityMajor, device);
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

int g_override_items = 0;    // RopeCudaSetLaunchOverride: 0 keeps the rule's choice
int g_override_threads = 0;
int g_override_persistent = -1;
int g_override_small = -1;  // 0: never RopeSmallKernel
bool g_pdl = true;           // RopeCudaSetPdl

#if ROPE_HAVE_PDL
// Whether `kernel`'s code was compiled for compute_90 or later (its griddepcontrol.wait is there),
// cached. PTX of an older target JIT-compiled for a Hopper device lacks it: such a kernel must
// not be launched with programmatic dependent launch.
bool CompiledForSm90(const void* kernel) {
  static std::mutex mutex;
  static std::map<std::pair<int, const void*>, bool> cache;
  int device = 0;
  cudaGetDevice(&device);
  std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(device, kernel);
  auto found = cache.find(key);
  if (found != cache.end()) return found->second;
  cudaFuncAttributes attr{};
  const cudaError_t status = cudaFuncGetAttributes(&attr, kernel);
  if (status != cudaSuccess) cudaGetLastError();  // this call's error only
  const bool ok = status == cudaSuccess && attr.ptxVersion >= 90;
  cache.emplace(key, ok);
  return ok;
}
#endif

UnitGeometry MakeGeometry(const RopeParams& p, int V) {
  UnitGeometry g;
  const int64_t part = p.rotary_part();
  const bool plane = p.mode == Mode::kPlane;
  const int64_t vectors_per_part = (part + V - 1) / V;
  g.interval_halves = !plane && (part / 2) % V == 0;
  g.units_per_part = static_cast<int32_t>(plane || g.interval_halves ? (part / 2) / V : (vectors_per_part + 1) / 2);
  g.rot_units = p.rotary_dim * g.units_per_part;
  const int64_t pass_vectors = (p.K - p.rotary_size + V - 1) / V;
  g.pass_units = static_cast<int32_t>((pass_vectors + 1) / 2);
  g.units = g.rot_units + g.pass_units;
  g.part = static_cast<int32_t>(part);
  return g;
}

// Threads per block of a call with one head per thread: enough blocks to reach every SM, blocks
// of kMinSmallBlockThreads to kBlockThreads threads.
int SmallBlockThreads(int64_t one_item_threads, const DeviceInfo& dev) {
  const int64_t per_sm = (one_item_threads + dev.sms - 1) / dev.sms;
  return static_cast<int>(
      std::min<int64_t>(kBlockThreads, std::max<int64_t>(kMinSmallBlockThreads, (per_sm + 31) / 32 * 32)));
}

// Whether RopeSmallKernel can run p (vector variant assumed): no cu_seqlens, no zero slots, every
// offset it makes fits in 32 bits (non-negative strides).
bool SmallFits(const RopeParams& p) {
  constexpr int64_t kMax = 0x7fffffff;
  if (p.cu_seqlens != nullptr) return false;
  // the largest offset of an n0 x n1 x n2 grid with these strides, plus `extra`, fits
  auto fits = [&](int64_t n0, int64_t s0, int64_t n1, int64_t s1, int64_t n2, int64_t s2, int64_t extra) {
    int64_t span = extra;
    for (auto [n, stride] : {std::make_pair(n0, s0), std::make_pair(n1, s1), std::make_pair(n2, s2)}) {
      if (stride < 0 || stride > kMax) return false;
      span += std::max<int64_t>(0, n - 1) * stride;
    }
    return span <= kMax;
  };
  for (int t = 0; t < p.num_tensors; ++t) {
    const RopeTensor& ts = p.tensors[t];
    if (ts.num_zero_slots > 0) return false;
    if (!fits(p.B, ts.x_stride_b, p.M, ts.x_stride_m, ts.H, ts.x_stride_h, p.K)
        || !fits(p.B, ts.out_stride_b, p.M, ts.out_stride_m, ts.H, ts.out_stride_h, p.K)) {
      return false;
    }
  }
  if (p.pos_type != IndexType::kNone
      && !fits(p.B, p.pos_stride_b, p.rotary_dim, p.pos_stride_r, p.M, p.pos_stride_m, 1)) {
    return false;
  }
  if (p.offsets_type != IndexType::kNone && !fits(p.B, p.offsets_stride, 1, 0, 1, 0, 1)) return false;
  return p.B * p.M * p.total_heads() * p.K < (int64_t{1} << 31);
}

// Launches RopeSmallKernel for p (units of geometry k, frequencies `freq` stored as `kind`) in
// blocks of `threads`, kItems heads per thread (1; or 2 for computed angles), rows in x's memory
// order (m_outer: m-major).
template<typename T, typename TT, int V, int kItems = 1>
cudaError_t LaunchSmall(const UnitGeometry& k, FreqKind kind, const void* freq, const RopeParams& p, int threads,
                        bool m_outer, cudaStream_t stream, const DeviceInfo& dev) {
  SmallArgs a{};
  const int64_t h0 = p.tensors[0].H;
  const int64_t h1 = p.num_tensors > 1 ? p.tensors[1].H : 0;
  const int64_t lanes0 = (h0 + kItems - 1) / kItems;
  const int64_t lanes1 = (h1 + kItems - 1) / kItems;
  const int64_t row_threads = (lanes0 + lanes1) * k.units;
  const int64_t total = p.B * p.M * row_threads;  // < 2^31: SmallFits
  if (total == 0) return cudaSuccess;
  a.threads = static_cast<int32_t>(total);
  a.row_threads = static_cast<int32_t>(row_threads);
  a.first_threads = static_cast<int32_t>(lanes0 * k.units);
  a.lanes0 = static_cast<int32_t>(lanes0);
  a.lanes1 = static_cast<int32_t>(lanes1);
  a.H0 = static_cast<int32_t>(h0);
  a.H1 = static_cast<int32_t>(h1);
  a.m_outer = m_outer;
  a.inner_n = static_cast<int32_t>(std::max<int64_t>(1, m_outer ? p.B : p.M));
  a.div_row = FastDiv(static_cast<uint32_t>(row_threads));
  a.div_units = FastDiv(static_cast<uint32_t>(k.units));
  a.div_inner = FastDiv(static_cast<uint32_t>(a.inner_n));
  a.div_upp = FastDiv(static_cast<uint32_t>(std::max(1, k.units_per_part)));
  if (p.pos_type != IndexType::kNone) {
    a.idx = p.position_ids;
    a.idx_type = p.pos_type;
    a.idx_sb = static_cast<int32_t>(p.pos_stride_b);
    a.idx_sr = static_cast<int32_t>(p.pos_stride_r);
    a.idx_sm = static_cast<int32_t>(p.pos_stride_m);
  } else {
    if (p.offsets_type != IndexType::kNone) {
      a.idx = p.seqlen_offsets;
      a.idx_type = p.offsets_type;
      a.idx_sb = static_cast<int32_t>(p.offsets_stride);
    }
    a.m_coef = 1;
    a.pos_add = p.seqlen_offset;
  }
  a.geo = k;
  a.rotary = static_cast<int32_t>(p.rotary_size);
  a.K = static_cast<int32_t>(p.K);
  a.inverse = p.inverse;
  a.freq = freq;
  a.cos = p.cos;
  a.sin = p.sin;
  a.table_rows = p.table_rows;
  a.table_row_stride = p.table_row_stride;
  a.attention_scaling = p.attention_scaling;
  const RopeTensor& t0 = p.tensors[0];
  const RopeTensor& t1 = p.tensors[p.num_tensors > 1 ? 1 : 0];
  a.x0 = t0.x;
  a.out0 = t0.out;
  a.x1 = t1.x;
  a.out1 = t1.out;
  a.xs0_b = static_cast<int32_t>(t0.x_stride_b);
  a.xs0_m = static_cast<int32_t>(t0.x_stride_m);
  a.xs0_h = static_cast<int32_t>(t0.x_stride_h);
  a.xs1_b = static_cast<int32_t>(t1.x_stride_b);
  a.xs1_m = static_cast<int32_t>(t1.x_stride_m);
  a.xs1_h = static_cast<int32_t>(t1.x_stride_h);
  a.os0_b = static_cast<int32_t>(t0.out_stride_b);
  a.os0_m = static_cast<int32_t>(t0.out_stride_m);
  a.os0_h = static_cast<int32_t>(t0.out_stride_h);
  a.os1_b = static_cast<int32_t>(t1.out_stride_b);
  a.os1_m = static_cast<int32_t>(t1.out_stride_m);
  a.os1_h = static_cast<int32_t>(t1.out_stride_h);
  const unsigned blocks = static_cast<unsigned>((total + threads - 1) / threads);
  auto launch = [&](auto kernel) -> cudaError_t {
#if ROPE_HAVE_PDL
    if (g_pdl && dev.major >= 9 && CompiledForSm90(reinterpret_cast<const void*>(kernel))) {
      cudaLaunchConfig_t config{};
      config.gridDim = dim3(blocks);
      config.blockDim = dim3(static_cast<unsigned>(threads));
      config.dynamicSmemBytes = 0;
      config.stream = stream;
      cudaLaunchAttribute attr[1];
      attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
      attr[0].val.programmaticStreamSerializationAllowed = 1;
      config.attrs = attr;
      config.numAttrs = 1;
      const cudaError_t status = cudaLaunchKernelEx(&config, kernel, a);
      if (status != cudaErrorNotSupported) return status;
      cudaGetLastError();  // the attribute refused: a plain launch below
    }
#else
    (void)dev;
#endif
    kernel<<<blocks, threads, 0, stream>>>(a);
    return cudaGetLastError();
  };
  constexpr FreqKind kHiLo = FreqKind::kHiLo, kF32 = FreqKind::kFloat32, kF64 = FreqKind::kFloat64;
  auto dispatch = [&](auto plane_c) -> cudaError_t {
    constexpr bool kP = decltype(plane_c)::value;
    if constexpr (kItems == 1) {  // the 2-head instances exist for computed angles only
      if (p.cos != nullptr) return launch(RopeSmallKernel<T, TT, V, kP, true, kHiLo, 1>);
    } else {
      if (p.cos != nullptr) return cudaErrorInvalidValue;
    }
    if (kind == kF64) return launch(RopeSmallKernel<T, T, V, kP, false, kF64, kItems>);
    if (kind == kF32) return launch(RopeSmallKernel<T, T, V, kP, false, kF32, kItems>);
    if constexpr (sizeof(T) == 8) {
      return cudaErrorInvalidValue;  // float64 math never takes the (hi, lo) frequencies
    } else {
      return launch(RopeSmallKernel<T, T, V, kP, false, kHiLo, kItems>);
    }
  };
  return p.mode == Mode::kPlane ? dispatch(std::true_type{}) : dispatch(std::false_type{});
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
  a.geo = MakeGeometry(p, V);
  if (a.geo.units == 0) return cudaSuccess;
  const int64_t rows = p.B * p.M;
  if (rows >= (int64_t{1} << 31)) return cudaErrorInvalidValue;  // 32-bit rows in the kernel

  // Heads per thread: ROPE_ANGLE_ITEMS / ROPE_TABLE_ITEMS when one head per thread would give more than
  // ROPE_ITEMS_WAVES waves of the device's resident threads, else 1 (the elementwise variant, a
  // fallback for strided or misaligned tensors, always 1).
  const int64_t one_item_threads = rows * a.geo.units * p.total_heads();
  const int64_t wave = static_cast<int64_t>(dev.sms) * dev.threads_per_sm;
  const int large_items = table ? ROPE_TABLE_ITEMS : ROPE_ANGLE_ITEMS;
  const int wanted = g_override_items > 0 ? g_override_items
                                          : (one_item_threads > ROPE_ITEMS_WAVES * wave ? large_items : 1);
  // A block per piece (ROPE_PERSISTENT 0), or the persistent grid: always with cu_seqlens (its
  // blocks check cu_seqlens once), else as ROPE_PERSISTENT or the launch override says.
  const bool pipe = p.cu_seqlens != nullptr
      || (g_override_persistent >= 0 ? g_override_persistent == 1
                                     : ROPE_PERSISTENT == 1 || (ROPE_PERSISTENT == 2 && wanted > 1 && !p.positions_shared_by_batch()));
  // the kernels' heads per thread: 1, 2, 4 (or 8 where compiled; the elementwise variant 1; the
  // persistent grid 1 or 4)
  const int items = !kVec || wanted < 2 ? 1
                    : pipe ? 4
                    : wanted >= 8 && kMaxItems >= 8 ? 8
                    : wanted >= 4 ? 4 : 2;
  const int small_threads = SmallBlockThreads(one_item_threads, dev);
  const int threads = std::min(g_override_threads > 0 ? std::min(g_override_threads, kMaxBlockThreads)
                                                      : (items > 1 ? ROPE_LARGE_BLOCK_THREADS : small_threads),
                               BoundThreads(items, table, pipe));
  int64_t blocks = 0;
  for (int t = 0; t < p.num_tensors; ++t) {
    const int64_t lanes = std::max<int64_t>(1, (p.tensors[t].H + items - 1) / items);
    const int64_t tensor_blocks = p.tensors[t].H > 0 ? (rows * lanes * a.geo.units + threads - 1) / threads : 0;
    // 32-bit thread indices (and FastDiv numerators below 2^31) inside the kernel
    if (tensor_blocks * threads >= (int64_t{1} << 31)) return cudaErrorInvalidValue;
    a.lanes[t] = static_cast<int32_t>(lanes);
    a.div_lanes[t] = FastDiv(static_cast<uint32_t>(lanes));
    if (t == 0) a.blocks0 = static_cast<int32_t>(tensor_blocks);
    blocks += tensor_blocks;
  }
  if (blocks == 0) return cudaSuccess;
  if (blocks >= (int64_t{1} << 31)) return cudaErrorInvalidValue;
  a.blocks = static_cast<int32_t>(blocks);
  a.rows = static_cast<int32_t>(rows);
  a.div_units = FastDiv(static_cast<uint32_t>(a.geo.units));
  a.div_upp = FastDiv(static_cast<uint32_t>(std::max(1, a.geo.units_per_part)));
  {
    const RopeTensor& t0 = p.tensors[0];
    a.m_outer = ROPE_MEMORY_ROW_ORDER && p.B > 1 && p.M > 1 && std::abs(t0.x_stride_m) > std::abs(t0.x_stride_b);  // x's order
  }
  a.inner_n = static_cast<int32_t>(std::max<int64_t>(1, a.m_outer ? p.B : p.M));
  a.div_inner = FastDiv(static_cast<uint32_t>(a.inner_n));

#if ROPE_SMALL_KERNEL
  if constexpr (kVec) {
    // one head per thread, or two with computed angles (ROPE_SMALL_ITEMS2)
    const bool small_items = items == 1 || (ROPE_SMALL_ITEMS2 && items == 2 && !table);
    if (small_items && !pipe && g_override_small != 0 && SmallFits(p)) {
      return items == 1 ? LaunchSmall<T, TT, V, 1>(a.geo, a.freq_kind, a.freq, p, threads, a.m_outer, stream, dev)
                        : LaunchSmall<T, TT, V, 2>(a.geo, a.freq_kind, a.freq, p, threads, a.m_outer, stream, dev);
    }
  }
#endif
  auto launch = [&](auto kernel) -> cudaError_t {
    int64_t grid = blocks;
    if (pipe) {
      const int64_t resident =
          static_cast<int64_t>(dev.sms) * BlocksPerSm(reinterpret_cast<const void*>(kernel), threads);
      grid = std::max<int64_t>(1, std::min<int64_t>(blocks, resident));
    }
    kernel<<<static_cast<unsigned>(grid), threads, 0, stream>>>(a);
    return cudaGetLastError();
  };
  // kernel instances: heads per thread 1, 2 and 4, and 8 where a knob asks for it (the persistent
  // grid: 1 and 4; the elementwise variant: 1)
  auto dispatch = [&](auto plane_c, auto table_c) -> cudaError_t {
    constexpr bool kP = decltype(plane_c)::value;
    constexpr bool kT = decltype(table_c)::value;
    using TK = std::conditional_t<kT, TT, T>;
    if constexpr (!kVec) {
      return pipe ? launch(RopeKernel<T, TK, V, kVec, kP, kT, 1, true>)
                  : launch(RopeKernel<T, TK, V, kVec, kP, kT, 1, false>);
    } else {
      if (pipe) {
        return items == 1 ? launch(RopeKernel<T, TK, V, kVec, kP, kT, 1, true>)
                          : launch(RopeKernel<T, TK, V, kVec, kP, kT, 4, true>);
      }
      if (items == 1) return launch(RopeKernel<T, TK, V, kVec, kP, kT, 1, false>);
      if constexpr (kMaxItems >= 8) {
        if (items == 8) return launch(RopeKernel<T, TK, V, kVec, kP, kT, 8, false>);
      }
      return items == 2 ? launch(RopeKernel<T, TK, V, kVec, kP, kT, 2, false>)
                        : launch(RopeKernel<T, TK, V, kVec, kP, kT, 4, false>);
    }
  };
  using True = std::true_type;
  using False = std::false_type;
  if (plane) return table ? dispatch(True{}, True{}) : dispatch(True{}, False{});
  return table ? dispatch(False{}, True{}) : dispatch(False{}, False{});
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

void RopeCudaSetLaunchOverride(int items_per_thread, int block_threads, int persistent, int small_kernel) {
  g_override_small = small_kernel;
  g_override_items = items_per_thread;
  g_override_threads = block_threads;
  g_override_persistent = persistent;
}

void RopeCudaSetPdl(bool enabled) { g_pdl = enabled; }

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
