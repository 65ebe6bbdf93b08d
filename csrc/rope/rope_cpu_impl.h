// The CPU kernel's row loop. Included once per instruction set, with ROPE_CPU_ISA naming the
// namespace (baseline, avx2, avx512, avx512bf16); the including file is compiled with that
// instruction set. Only RopeRows has external linkage: every helper lives in an unnamed namespace
// so that the copies compiled for different instruction sets are never merged by the linker.
//
// A thread claims ranges of rows (in memory order) and works through them in blocks:
//  1. cos/sin of every rotary dim of each row of the block, sign and attention_scaling folded
//     in: from the tables, or computed once per (position, frequency) and shared by all heads and
//     both tensors: the angle is reduced in double (Cody-Waite, four parts of pi/2 of 27 bits:
//     exact for positions up to 2^24 and beyond), then sin/cos are polynomials on [-pi/4, pi/4]
//     in the compute type (float for float32 / float16 / bfloat16, double for float64),
//     vectorised over frequencies;
//  2. every head of every tensor of the block's rows (heads outer when heads are the slower axis
//     of x). Contiguous heads (stride 1 on k in x and out, out != x) take the direct kernels:
//     branch-free loops over k, read x, rotate, write out, that the compiler vectorises (the
//     baseline and AVX2 builds); the AVX-512 builds run the same loops written with intrinsics
//     (the compiler's 16-bit conversions are about twice as slow, and large calls write their
//     output with non-temporal stores); with rows outer, a row's cos/sin stay in registers for
//     all of the row's heads (RowAvx512). Other heads (a stride on k, or in place) are staged: the
//     rotary dims are loaded into a buffer, then rotated and stored, so out == x is safe. The
//     untouched dims are copied, the zero slots of a packed gradient zeroed.
// Each row's result depends only on the row, never on the block or thread it falls in.
#ifndef ROPE_CPU_ISA
#error "define ROPE_CPU_ISA before including rope_cpu_impl.h"
#endif

#include <cstdint>
#include <cstring>
#include <type_traits>
#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

// 16-bit types run hand-written AVX-512 kernels where the instruction set allows (the
// conversions are most of their work: the compiler's code for them is about twice as slow).
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__F16C__)
#define ROPE_CPU_AVX512_16BIT 1
#else
#define ROPE_CPU_AVX512_16BIT 0
#endif

#include "rope/host_numeric.h"
#include "rope/rope_cpu_internal.h"
#include "rope/rope_params.h"

namespace oneflow_rope {
namespace cpu {
namespace ROPE_CPU_ISA {

namespace {

// ---- storage types <-> compute type (branch-free, bit-exact with host_numeric.h) -------------

inline uint32_t BitsOf(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, sizeof(u));
  return u;
}
inline float FloatOf(uint32_t u) {
  float f;
  __builtin_memcpy(&f, &u, sizeof(f));
  return f;
}

template<typename T>
struct Storage;

template<>
struct Storage<float> {
  using C = float;
  static inline float Load(const float* p) { return *p; }
  static inline void Store(float* p, float v) { *p = v; }
};

template<>
struct Storage<double> {
  using C = double;
  static inline double Load(const double* p) { return *p; }
  static inline void Store(double* p, double v) { *p = v; }
};

template<>
struct Storage<HostBFloat16> {
  using C = float;
  static inline float Load(const HostBFloat16* p) { return FloatOf(static_cast<uint32_t>(p->bits) << 16); }
  // Round to nearest even; NaN stays a (quiet) NaN.
  static inline void Store(HostBFloat16* p, float f) {
    const uint32_t u = BitsOf(f);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    const uint32_t nan = (u >> 16) | 0x40u;
    p->bits = static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
  }
};

// All-ones when cond, else zero; a select written as arithmetic, so that it stays branch-free
// (with -ftrapping-math GCC does not if-convert a ternary whose arm holds a float operation).
inline uint32_t MaskIf(bool cond) { return 0u - static_cast<uint32_t>(cond); }
inline uint32_t Select(uint32_t mask, uint32_t a, uint32_t b) { return (a & mask) | (b & ~mask); }

template<>
struct Storage<HostHalf> {
  using C = float;
  static inline float Load(const HostHalf* p) {
    const uint32_t h = p->bits;
    const uint32_t shifted = (h & 0x7fffu) << 13;  // exponent and mantissa, in float position
    const uint32_t exponent = shifted & 0x0f800000u;
    const uint32_t normal = shifted + ((127u - 15u) << 23);
    const uint32_t infnan = normal + ((128u - 16u) << 23);
    // subnormal: 2^-14 * (1 + mant / 1024) - 2^-14 = mant * 2^-24, exactly
    const uint32_t subnormal = BitsOf(FloatOf(normal + (1u << 23)) - FloatOf(113u << 23));
    const uint32_t magnitude = Select(MaskIf(exponent == 0x0f800000u), infnan,
                                      Select(MaskIf(exponent == 0), subnormal, normal));
    return FloatOf(magnitude | ((h & 0x8000u) << 16));
  }
  // Round to nearest even, overflow to infinity, NaN to the quiet NaN 0x7e00.
  static inline void Store(HostHalf* p, float f) {
    const uint32_t u = BitsOf(f);
    const uint32_t sign = (u >> 16) & 0x8000u;
    const uint32_t a = u & 0x7fffffffu;
    const uint32_t infnan = Select(MaskIf(a > 0x7f800000u), 0x7e00u, 0x7c00u);
    // subnormal result: adding 0.5 rounds a to a multiple of 2^-24 (the current rounding mode:
    // nearest even), whose low mantissa bits are then the half's bits
    const uint32_t subnormal = BitsOf(FloatOf(a) + 0.5f) - 0x3f000000u;
    const uint32_t normal = (a + ((15u - 127u) << 23) + 0xfffu + ((a >> 13) & 1u)) >> 13;
    const uint32_t h = Select(MaskIf(a >= 0x47800000u), infnan,
                              Select(MaskIf(a < 0x38800000u), subnormal, normal));
    p->bits = static_cast<uint16_t>(h | sign);
  }
};

// Table entries: the table's type to the compute type.
template<typename TT, typename C>
inline C LoadTable(const TT* p) {
  return static_cast<C>(Storage<TT>::Load(p));
}

// ---- angles ------------------------------------------------------------------------------------

// Round to the nearest integer (ties to even, the current rounding mode), branch-free and
// vectorisable; values of magnitude >= 2^52 are integers already.
inline double RoundToInteger(double t) {
  const double magic = 6755399441055744.0;  // 1.5 * 2^52
  const double rounded = (t + magic) - magic;
  return __builtin_fabs(t) < 4503599627370496.0 ? rounded : t;
}

// pi/2 in four parts of 27 significant bits: q * part is exact for |q| < 2^26.
constexpr double kPio2Part1 = 0x1.921fb54000000p+0;
constexpr double kPio2Part2 = 0x1.10b4610000000p-30;
constexpr double kPio2Part3 = 0x1.a626330000000p-58;
constexpr double kPio2Part4 = 0x1.45c06e0000000p-86;
constexpr double kTwoOverPi = 0.63661977236758134308;

// angle = position * theta[i] in double; reduced[i] = angle - q * pi/2 in [-pi/4, pi/4],
// quadrant[i] = q mod 4 (0 for a non-finite angle, whose reduced angle is NaN).
inline void ReduceAngles(const double* __restrict theta, int64_t n, double position,
                         double* __restrict reduced, int32_t* __restrict quadrant) {
  for (int64_t i = 0; i < n; ++i) {
    const double angle = position * theta[i];
    const double q = RoundToInteger(angle * kTwoOverPi);
    reduced[i] = (((angle - q * kPio2Part1) - q * kPio2Part2) - q * kPio2Part3) - q * kPio2Part4;
    double m = q - 4.0 * RoundToInteger(q * 0.25);  // in [-2, 2]
    m = m == m ? m : 0.0;
    quadrant[i] = static_cast<int32_t>(m);
  }
}

// sin and cos of the reduced angles, per quadrant. float: minimax polynomials (Cephes sinf /
// cosf, about 1 ulp on [-pi/4, pi/4]); double: fdlibm's __kernel_sin / __kernel_cos.
inline void SinCosReduced(const double* __restrict reduced, const int32_t* __restrict quadrant,
                          int64_t n, float* __restrict cos_out, float* __restrict sin_out) {
  for (int64_t i = 0; i < n; ++i) {
    const float x = static_cast<float>(reduced[i]);
    const float z = x * x;
    const float s = ((-1.9515295891e-4f * z + 8.3321608736e-3f) * z - 1.6666654611e-1f) * z * x + x;
    const float c = ((2.443315711809948e-5f * z - 1.388731625493765e-3f) * z + 4.166664568298827e-2f)
                        * z * z
                    - 0.5f * z + 1.0f;
    const int32_t k = quadrant[i];
    const float sv = (k & 1) ? c : s;
    const float cv = (k & 1) ? s : c;
    sin_out[i] = (k & 2) ? -sv : sv;
    cos_out[i] = ((k + 1) & 2) ? -cv : cv;
  }
}

inline void SinCosReduced(const double* __restrict reduced, const int32_t* __restrict quadrant,
                          int64_t n, double* __restrict cos_out, double* __restrict sin_out) {
  for (int64_t i = 0; i < n; ++i) {
    const double x = reduced[i];
    const double z = x * x;
    const double sr = 8.33333333332248946124e-03
                      + z * (-1.98412698298579493134e-04
                             + z * (2.75573137070700676789e-06
                                    + z * (-2.50507602534068634195e-08 + z * 1.58969099521155010221e-10)));
    const double s = x + z * x * (-1.66666666666666324348e-01 + z * sr);
    const double cr =
        z
        * (4.16666666666666019037e-02
           + z * (-1.38888888888741095749e-03
                  + z * (2.48015872894767294178e-05
                         + z * (-2.75573143513906633035e-07
                                + z * (2.08757232129817482790e-09 + z * -1.13596475577881948265e-11)))));
    const double c = 1.0 - (0.5 * z - z * cr);
    const int32_t k = quadrant[i];
    const double sv = (k & 1) ? c : s;
    const double cv = (k & 1) ? s : c;
    sin_out[i] = (k & 2) ? -sv : sv;
    cos_out[i] = ((k + 1) & 2) ? -cv : cv;
  }
}

// ---- positions ---------------------------------------------------------------------------------

inline int64_t LoadIndex(const void* data, IndexType type, int64_t offset) {
  if (type == IndexType::kInt32) return static_cast<const int32_t*>(data)[offset];
  return static_cast<const int64_t*>(data)[offset];
}

// Position of token m of sequence b for rotary part r; false when it cannot be found (varlen
// rows outside every sequence of a malformed cu_seqlens).
inline bool PositionOf(const RopeParams& p, int64_t b, int64_t r, int64_t m, int64_t* pos) {
  if (p.position_ids != nullptr) {
    *pos = LoadIndex(p.position_ids, p.pos_type,
                     b * p.pos_stride_b + r * p.pos_stride_r + m * p.pos_stride_m);
    return true;
  }
  int64_t g = m + p.seqlen_offset;
  if (p.seqlen_offsets != nullptr) g += LoadIndex(p.seqlen_offsets, p.offsets_type, b * p.offsets_stride);
  if (p.cu_seqlens == nullptr) {
    *pos = g;
    return true;
  }
  const int64_t S = p.num_seqs;
  if (S <= 0 || LoadIndex(p.cu_seqlens, p.cu_seqlens_type, 0) != 0
      || LoadIndex(p.cu_seqlens, p.cu_seqlens_type, S) != p.cu_seqlens_total) {
    return false;
  }
  // last s in [0, S) with cu[s] <= g
  int64_t lo = 0, hi = S;
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (LoadIndex(p.cu_seqlens, p.cu_seqlens_type, mid) <= g) lo = mid; else hi = mid;
  }
  const int64_t start = LoadIndex(p.cu_seqlens, p.cu_seqlens_type, lo);
  const int64_t end = LoadIndex(p.cu_seqlens, p.cu_seqlens_type, lo + 1);
  if (!(start <= g && g < end)) return false;
  *pos = g - start;
  return true;
}

// ---- one row's cos / sin -----------------------------------------------------------------------

struct Geometry {
  int64_t K, rotary, part, half;
  bool plane;
};

template<typename C>
struct RowScratch {
  double* reduced;
  int32_t* quadrant;
  C* fcos;
  C* fsin;
};

// cos[k] and sin[k] for the rotary dims k of row (b, m), such that
// out[k] = x[k] * cos[k] + x[partner(k)] * sin[k]: sin carries the rotation's sign (negative for
// the first dim of a pair), the backward's negation and attention_scaling. Returns the number of
// rotary parts whose position was outside the table or not found (their cos/sin are NaN).
// *paired: plane mode and both dims of every pair have one angle (cos[j] == cos[j + half],
// sin[j] == -sin[j + half]): always so for computed angles, checked for tables.
template<typename C, typename TT>
int64_t PrepareRow(const RopeParams& p, const Geometry& g, const double* theta, int64_t b,
                   int64_t m, C* __restrict cos_row, C* __restrict sin_row, const RowScratch<C>& tmp,
                   bool* paired) {
  const C scale = static_cast<C>(p.attention_scaling);
  const C signed_scale = p.inverse ? -scale : scale;
  const int64_t part = g.part, half = g.half;
  int64_t bad = 0;
  bool all_paired = g.plane;
  for (int64_t r = 0; r < p.rotary_dim; ++r) {
    C* __restrict c = cos_row + r * part;
    C* __restrict s = sin_row + r * part;
    int64_t pos = 0;
    const bool found = PositionOf(p, b, r, m, &pos);
    if (!found || (p.cos != nullptr && (pos < 0 || pos >= p.table_rows))) {
      ++bad;
      all_paired = false;
      const C nan = static_cast<C>(__builtin_nan(""));
      for (int64_t j = 0; j < part; ++j) c[j] = s[j] = nan;
      continue;
    }
    if (p.cos != nullptr) {
      const TT* ct = static_cast<const TT*>(p.cos) + pos * p.table_row_stride;
      const TT* st = static_cast<const TT*>(p.sin) + pos * p.table_row_stride;
      const int64_t cs = p.table_col_stride;
      for (int64_t j = 0; j < part; ++j) {
        c[j] = scale * LoadTable<TT, C>(ct + j * cs);
        s[j] = signed_scale * LoadTable<TT, C>(st + j * cs);
      }
      if (g.plane) {
        for (int64_t j = 0; j < half; ++j) s[j] = -s[j];
        int mismatches = 0;
        for (int64_t j = 0; j < half; ++j) {
          mismatches += (c[j] != c[j + half]) | (s[j] != -s[j + half]);
        }
        all_paired = all_paired && mismatches == 0;
      } else {
        for (int64_t i = 0; i < half; ++i) s[2 * i] = -s[2 * i];
      }
    } else {
      ReduceAngles(theta, half, static_cast<double>(pos), tmp.reduced, tmp.quadrant);
      SinCosReduced(tmp.reduced, tmp.quadrant, half, tmp.fcos, tmp.fsin);
      const C* __restrict fc = tmp.fcos;
      const C* __restrict fs = tmp.fsin;
      if (g.plane) {
        for (int64_t i = 0; i < half; ++i) {
          const C cv = scale * fc[i];
          const C sv = signed_scale * fs[i];
          c[i] = cv;
          c[i + half] = cv;
          s[i] = -sv;
          s[i + half] = sv;
        }
      } else {
        for (int64_t i = 0; i < half; ++i) {
          const C cv = scale * fc[i];
          const C sv = signed_scale * fs[i];
          c[2 * i] = cv;
          c[2 * i + 1] = cv;
          s[2 * i] = -sv;
          s[2 * i + 1] = sv;
        }
      }
    }
  }
  *paired = all_paired;
  return bad;
}

// ---- one head ----------------------------------------------------------------------------------
//
// Direct kernels: k contiguous in x and out, out != x. They read x and write out in one loop,
// x and out restrict: the compiler vectorises them with no alias check. kHalf > 0: the head
// geometry is a compile-time constant (half = 16, 32, 64: head sizes 32, 64, 128 per rotary
// part), so the loops have no remainder; 0: any size.
//
// Staged kernels (out == x, or a stride on k): the rotary dims of the head are first loaded into
// v (the whole rotary part is read before any of it is written), then rotated from v.

template<typename T>
using Compute = typename Storage<T>::C;

// Plane mode, dims j and j + half of each rotary part: paired rows use cos[j] for both and
// sin[j + half] (= -sin[j]), two table loads per pair instead of four.
template<typename T, bool kPaired, int64_t kHalf>
inline void PlaneDirect(const T* __restrict x, T* __restrict out, const Compute<T>* __restrict c,
                        const Compute<T>* __restrict s, int64_t parts, int64_t half_runtime) {
  const int64_t half = kHalf > 0 ? kHalf : half_runtime;
  for (int64_t r = 0; r < parts; ++r) {
    const T* xb = x + r * 2 * half;
    T* ob = out + r * 2 * half;
    const Compute<T>* cb = c + r * 2 * half;
    const Compute<T>* sb = s + r * 2 * half;
    for (int64_t j = 0; j < half; ++j) {
      const Compute<T> a = Storage<T>::Load(xb + j);
      const Compute<T> b = Storage<T>::Load(xb + half + j);
      if (kPaired) {
        const Compute<T> cv = cb[j];
        const Compute<T> sv = sb[half + j];
        Storage<T>::Store(ob + j, a * cv - b * sv);
        Storage<T>::Store(ob + half + j, b * cv + a * sv);
      } else {
        Storage<T>::Store(ob + j, a * cb[j] + b * sb[j]);
        Storage<T>::Store(ob + half + j, b * cb[half + j] + a * sb[half + j]);
      }
    }
  }
}

// Interval mode, dims 2i and 2i + 1.
template<typename T, int64_t kHalf>
inline void IntervalDirect(const T* __restrict x, T* __restrict out, const Compute<T>* __restrict c,
                           const Compute<T>* __restrict s, int64_t parts, int64_t half_runtime) {
  const int64_t pairs = parts * (kHalf > 0 ? kHalf : half_runtime);
  for (int64_t i = 0; i < pairs; ++i) {
    const Compute<T> a = Storage<T>::Load(x + 2 * i);
    const Compute<T> b = Storage<T>::Load(x + 2 * i + 1);
    Storage<T>::Store(out + 2 * i, a * c[2 * i] + b * s[2 * i]);
    Storage<T>::Store(out + 2 * i + 1, b * c[2 * i + 1] + a * s[2 * i + 1]);
  }
}

// v[k] = x[k * sx] for k < n, in the compute type.
template<typename T>
inline void LoadStaged(const T* __restrict x, int64_t sx, int64_t n, Compute<T>* __restrict v) {
  for (int64_t k = 0; k < n; ++k) v[k] = Storage<T>::Load(x + k * sx);
}

// out[k * so] = v[k] * c[k] + v[partner(k)] * s[k] for the rotary dims (so is 1 when kContig).
template<typename T, bool kPlane, bool kContig>
inline void StoreStaged(const Compute<T>* __restrict v, const Compute<T>* __restrict c,
                        const Compute<T>* __restrict s, T* __restrict out, int64_t so_runtime,
                        const Geometry& g) {
  const int64_t so = kContig ? 1 : so_runtime;
  if (kPlane) {
    const int64_t half = g.half;
    for (int64_t base = 0; base < g.rotary; base += g.part) {
      for (int64_t j = base; j < base + half; ++j) {
        Storage<T>::Store(out + j * so, v[j] * c[j] + v[j + half] * s[j]);
      }
      for (int64_t j = base + half; j < base + 2 * half; ++j) {
        Storage<T>::Store(out + j * so, v[j] * c[j] + v[j - half] * s[j]);
      }
    }
  } else {
    for (int64_t i = 0; i < g.rotary / 2; ++i) {
      const Compute<T> a = v[2 * i];
      const Compute<T> b = v[2 * i + 1];
      Storage<T>::Store(out + (2 * i) * so, a * c[2 * i] + b * s[2 * i]);
      Storage<T>::Store(out + (2 * i + 1) * so, b * c[2 * i + 1] + a * s[2 * i + 1]);
    }
  }
}

// bfloat16, direct: a 32-bit word of x holds dims 2i (low half) and 2i + 1 (high half); as
// floats they are word << 16 and word & 0xffff0000, and two rounded floats pack back into one
// word: no shuffles. The row's cos/sin come split by parity (ce[i] = cos[2i], co[i] = cos[2i+1],
// the same for sin). Plane mode needs an even half (so that j and j + half have one parity).
inline uint32_t LoadWord(const HostBFloat16* p) {
  uint32_t w;
  __builtin_memcpy(&w, p, sizeof(w));
  return w;
}
inline void StoreWord(HostBFloat16* p, uint32_t w) { __builtin_memcpy(p, &w, sizeof(w)); }
inline float LowBFloat16(uint32_t w) { return FloatOf(w << 16); }
inline float HighBFloat16(uint32_t w) { return FloatOf(w & 0xffff0000u); }
// Bits of f whose upper 16 are f rounded to bfloat16 (as Storage<HostBFloat16>::Store).
inline uint32_t RoundedBFloat16(float f) {
  const uint32_t u = BitsOf(f);
  return Select(MaskIf((u & 0x7fffffffu) > 0x7f800000u), u | 0x00400000u,
                u + 0x7fffu + ((u >> 16) & 1u));
}
inline uint32_t PackBFloat16(float low, float high) {
  return (RoundedBFloat16(low) >> 16) | (RoundedBFloat16(high) & 0xffff0000u);
}

struct SplitTable {
  const float* __restrict ce;
  const float* __restrict co;
  const float* __restrict se;
  const float* __restrict so;
};

template<int64_t kHalf>
inline void IntervalBFloat16(const HostBFloat16* __restrict x, HostBFloat16* __restrict out,
                             const SplitTable& t, int64_t parts, int64_t half_runtime) {
  const int64_t words = parts * (kHalf > 0 ? kHalf : half_runtime);
  const float* __restrict ce = t.ce;
  const float* __restrict co = t.co;
  const float* __restrict se = t.se;
  const float* __restrict so = t.so;
  for (int64_t i = 0; i < words; ++i) {
    const uint32_t w = LoadWord(x + 2 * i);
    const float a = LowBFloat16(w), b = HighBFloat16(w);
    StoreWord(out + 2 * i, PackBFloat16(a * ce[i] + b * se[i], b * co[i] + a * so[i]));
  }
}

// One half-part of plane mode: out_a = a * c + b * s on the words of one half (a), out_b on the
// other's (b).
inline void PlaneBFloat16Half(const HostBFloat16* __restrict xa, const HostBFloat16* __restrict xb,
                              HostBFloat16* __restrict oa, HostBFloat16* __restrict ob,
                              const float* __restrict ce_a, const float* __restrict co_a,
                              const float* __restrict se_a, const float* __restrict so_a,
                              const float* __restrict ce_b, const float* __restrict co_b,
                              const float* __restrict se_b, const float* __restrict so_b,
                              int64_t words) {
  for (int64_t i = 0; i < words; ++i) {
    const uint32_t wa = LoadWord(xa + 2 * i);
    const uint32_t wb = LoadWord(xb + 2 * i);
    const float a0 = LowBFloat16(wa), a1 = HighBFloat16(wa);
    const float b0 = LowBFloat16(wb), b1 = HighBFloat16(wb);
    StoreWord(oa + 2 * i, PackBFloat16(a0 * ce_a[i] + b0 * se_a[i], a1 * co_a[i] + b1 * so_a[i]));
    StoreWord(ob + 2 * i, PackBFloat16(b0 * ce_b[i] + a0 * se_b[i], b1 * co_b[i] + a1 * so_b[i]));
  }
}

template<int64_t kHalf>
inline void PlaneBFloat16(const HostBFloat16* x, HostBFloat16* out, const SplitTable& t,
                          int64_t parts, int64_t half_runtime) {
  const int64_t half = kHalf > 0 ? kHalf : half_runtime;
  const int64_t words = half / 2;  // per half of a part
  for (int64_t r = 0; r < parts; ++r) {
    const int64_t ia = r * half, ib = r * half + words;  // word index of each half
    PlaneBFloat16Half(x + r * 2 * half, x + r * 2 * half + half, out + r * 2 * half,
                      out + r * 2 * half + half, t.ce + ia, t.co + ia, t.se + ia, t.so + ia,
                      t.ce + ib, t.co + ib, t.se + ib, t.so + ib, words);
  }
}

#if defined(__F16C__)
// float16 with the F16C conversions (8 or 16 values an instruction, round to nearest even); the
// last few values of an odd-sized head go through Storage<HostHalf> (the same rounding).
inline void HalfToFloat(const HostHalf* __restrict x, float* __restrict v, int64_t n) {
  int64_t k = 0;
#if defined(__AVX512F__)
  for (; k + 16 <= n; k += 16) {
    _mm512_storeu_ps(v + k, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + k))));
  }
#endif
  for (; k + 8 <= n; k += 8) {
    _mm256_storeu_ps(v + k, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + k))));
  }
  for (; k < n; ++k) v[k] = Storage<HostHalf>::Load(x + k);
}

inline void FloatToHalf(const float* __restrict v, HostHalf* __restrict x, int64_t n) {
  int64_t k = 0;
#if defined(__AVX512F__)
  for (; k + 16 <= n; k += 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(x + k),
                        _mm512_cvtps_ph(_mm512_loadu_ps(v + k), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
#endif
  for (; k + 8 <= n; k += 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(x + k),
                     _mm256_cvtps_ph(_mm256_loadu_ps(v + k), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  for (; k < n; ++k) Storage<HostHalf>::Store(x + k, v[k]);
}
#endif

#if ROPE_CPU_AVX512_16BIT
template<typename T>
constexpr bool kAvx512Kernels = true;  // every dtype (see below)
// Direct kernels with AVX-512 intrinsics, for every dtype: a vector holds 16 dims (8 for
// float64). The last vector of a head, when partial, is masked (masked loads do not touch the
// masked-off elements); full vectors are not (masked 16-bit loads and stores are slow on some
// CPUs). Same arithmetic as the portable kernels (per dim out = x * cos + partner * sin, two
// products and a sum, no fused multiply-add), so every build gives the same bits. kStream: full
// vectors are written with non-temporal stores (out aligned to the vector's stored size): a large
// output then costs no read-for-ownership traffic and does not evict the input from the caches.
template<typename T>
struct Avx512;

template<>
struct Avx512<float> {
  using V = __m512;
  using M = __mmask16;
  static constexpr int64_t kLanes = 16;
  static constexpr int64_t kStoreAlign = 64;
  static V Load(const float* p) { return _mm512_loadu_ps(p); }
  static V Load(const float* p, M m) { return _mm512_maskz_loadu_ps(m, p); }
  static V LoadC(const float* p) { return _mm512_loadu_ps(p); }
  static V LoadC(const float* p, M m) { return _mm512_maskz_loadu_ps(m, p); }
  static void Store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static void Stream(float* p, V v) { _mm512_stream_ps(p, v); }
  static void Store(float* p, M m, V v) { _mm512_mask_storeu_ps(p, m, v); }
  static V Rotate(V x, V c, V partner, V s) { return _mm512_add_ps(_mm512_mul_ps(x, c), _mm512_mul_ps(partner, s)); }
  static V RotateSub(V x, V c, V partner, V s) { return _mm512_sub_ps(_mm512_mul_ps(x, c), _mm512_mul_ps(partner, s)); }
  static V SwapPairs(V v) { return _mm512_permute_ps(v, 0xb1); }
  static constexpr bool kPairNarrow = false;
};

template<>
struct Avx512<double> {
  using V = __m512d;
  using M = __mmask8;
  static constexpr int64_t kLanes = 8;
  static constexpr int64_t kStoreAlign = 64;
  static V Load(const double* p) { return _mm512_loadu_pd(p); }
  static V Load(const double* p, M m) { return _mm512_maskz_loadu_pd(m, p); }
  static V LoadC(const double* p) { return _mm512_loadu_pd(p); }
  static V LoadC(const double* p, M m) { return _mm512_maskz_loadu_pd(m, p); }
  static void Store(double* p, V v) { _mm512_storeu_pd(p, v); }
  static void Stream(double* p, V v) { _mm512_stream_pd(p, v); }
  static void Store(double* p, M m, V v) { _mm512_mask_storeu_pd(p, m, v); }
  static V Rotate(V x, V c, V partner, V s) { return _mm512_add_pd(_mm512_mul_pd(x, c), _mm512_mul_pd(partner, s)); }
  static V RotateSub(V x, V c, V partner, V s) { return _mm512_sub_pd(_mm512_mul_pd(x, c), _mm512_mul_pd(partner, s)); }
  static V SwapPairs(V v) { return _mm512_permute_pd(v, 0x55); }
  static constexpr bool kPairNarrow = false;
};

// 16-bit types: 16 values widened to float (Ops::Widen), narrowed back when stored.
template<typename T, typename Ops>
struct Avx512Half {
  using V = __m512;
  using M = __mmask16;
  static constexpr int64_t kLanes = 16;
  static constexpr int64_t kStoreAlign = 32;
  static V Load(const T* p) { return Ops::Widen(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static V Load(const T* p, M m) { return Ops::Widen(_mm256_maskz_loadu_epi16(m, p)); }
  static V LoadC(const float* p) { return _mm512_loadu_ps(p); }
  static V LoadC(const float* p, M m) { return _mm512_maskz_loadu_ps(m, p); }
  static void Store(T* p, V v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), Ops::Narrow(v)); }
  static void Stream(T* p, V v) { _mm256_stream_si256(reinterpret_cast<__m256i*>(p), Ops::Narrow(v)); }
  static void Store(T* p, M m, V v) { _mm256_mask_storeu_epi16(p, m, Ops::Narrow(v)); }
  static V Rotate(V x, V c, V partner, V s) { return _mm512_add_ps(_mm512_mul_ps(x, c), _mm512_mul_ps(partner, s)); }
  static V RotateSub(V x, V c, V partner, V s) { return _mm512_sub_ps(_mm512_mul_ps(x, c), _mm512_mul_ps(partner, s)); }
  static V SwapPairs(V v) { return _mm512_permute_ps(v, 0xb1); }
  // two vectors narrowed together where that is one instruction (bfloat16 on CPUs with
  // AVX512_BF16: Ops::kPairNarrow; PutPair), else each on its own (no insert into and extract from
  // a 512-bit register)
  static constexpr bool kPairNarrow = Ops::kPairNarrow;
  template<bool kStream>
  static void PutNarrowPair(T* pa, T* pb, V a, V b) {
    const __m512i n = Ops::Narrow2(a, b);
    const __m256i lo = _mm512_castsi512_si256(n), hi = _mm512_extracti64x4_epi64(n, 1);
    if constexpr (kStream) {
      _mm256_stream_si256(reinterpret_cast<__m256i*>(pa), lo);
      _mm256_stream_si256(reinterpret_cast<__m256i*>(pb), hi);
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pa), lo);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(pb), hi);
    }
  }
};

struct HalfOps {
  static constexpr bool kPairNarrow = false;
  static __m512 Widen(__m256i h) { return _mm512_cvtph_ps(h); }
  // round to nearest even (IEEE, subnormals kept), overflow to infinity
  static __m256i Narrow(__m512 v) { return _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static __m512i Narrow2(__m512 a, __m512 b) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(Narrow(a)), Narrow(b), 1);
  }
};

struct BFloat16Ops {
#if defined(__AVX512BF16__)
  static constexpr bool kPairNarrow = true;
#else
  static constexpr bool kPairNarrow = false;
#endif
  // value i's bits into the high half of lane i (one word permute, the low halves zeroed)
  static __m512 Widen(__m256i h) {
    const __m512i idx = _mm512_set_epi16(15, 0, 14, 0, 13, 0, 12, 0, 11, 0, 10, 0, 9, 0, 8, 0, 7, 0, 6, 0, 5, 0, 4, 0,
                                         3, 0, 2, 0, 1, 0, 0, 0);
    return _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(0xAAAAAAAAu, idx, _mm512_castsi256_si512(h)));
  }
  // as Storage<HostBFloat16>::Store, 16 values at a time
  static __m256i Round(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_or_epi32(r, nan, u, _mm512_set1_epi32(0x00400000));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16));
  }
  // Round of two vectors, out of line: the rare path of Narrow2 (with it inline, GCC made Narrow2
  // itself an out-of-line call per pair of vectors)
  __attribute__((noinline, cold)) static __m512i Round2(__m512 a, __m512 b) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(Round(a)), Round(b), 1);
  }
  // vcvtneps2bf16 / vcvtne2ps2bf16 round the same way but read subnormal inputs as zero. A
  // subnormal float rounds to a subnormal or zero bfloat16 and a normal one to a normal one, so
  // only an input whose result is +-0 can be subnormal: one test of the result's words (instead of
  // classifying every input) sends those (rare) vectors to the check, and the subnormal ones to
  // the integer rounding.
  __attribute__((always_inline)) static inline __m256i Narrow(__m512 v) {
#if defined(__AVX512BF16__)
    const __m256i r = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
    if (__builtin_expect(_mm256_testn_epi16_mask(r, _mm256_set1_epi16(0x7fff)) == 0, 1)) return r;
    if (_mm512_fpclass_ps_mask(v, 0x20) == 0) return r;
#endif
    return Round(v);
  }
  // a in the low half, b in the high half
  __attribute__((always_inline)) static inline __m512i Narrow2(__m512 a, __m512 b) {
#if defined(__AVX512BF16__)
    const __m512i r = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(b, a));
    if (__builtin_expect(_mm512_testn_epi16_mask(r, _mm512_set1_epi16(0x7fff)) == 0, 1)) return r;
    if (_mm512_kor(_mm512_fpclass_ps_mask(a, 0x20), _mm512_fpclass_ps_mask(b, 0x20)) == 0) return r;
    return Round2(a, b);
#else
    return _mm512_inserti64x4(_mm512_castsi256_si512(Round(a)), Round(b), 1);
#endif
  }
};

template<>
struct Avx512<HostHalf> : Avx512Half<HostHalf, HalfOps> {};
template<>
struct Avx512<HostBFloat16> : Avx512Half<HostBFloat16, BFloat16Ops> {};

template<typename A>
inline typename A::M TailMask(int64_t remaining) {  // the first `remaining` (<= kLanes) lanes
  return static_cast<typename A::M>((1u << remaining) - 1u);
}

// Stores (or streams: kStream) two rotated vectors, narrowed together where Avx512<T> can.
template<typename T, bool kStream>
inline void PutPair(T* pa, T* pb, typename Avx512<T>::V a, typename Avx512<T>::V b) {
  using A = Avx512<T>;
  if constexpr (A::kPairNarrow) {
    A::template PutNarrowPair<kStream>(pa, pb, a, b);
  } else if constexpr (kStream) {
    A::Stream(pa, a);
    A::Stream(pb, b);
  } else {
    A::Store(pa, a);
    A::Store(pb, b);
  }
}

// kPaired (cos[j + half] == cos[j], sin[j + half] == -sin[j], as for every row of computed angles):
// PlaneDirect's paired arithmetic (cos[j] for both dims, sin[j + half]), the same bits as the
// portable build; half the cos/sin loads, which for 16-bit types are as many bytes as x, and with
// heads outer (BHMK) come from L2.
template<typename T, bool kStream, int64_t kHalf, bool kPaired>
inline void PlaneAvx512(const T* x, T* out, const Compute<T>* c, const Compute<T>* s, int64_t parts,
                        int64_t half_runtime) {
  using A = Avx512<T>;
  constexpr int64_t N = A::kLanes;
  const int64_t half = kHalf > 0 ? kHalf : half_runtime;
  for (int64_t r = 0; r < parts; ++r) {
    const int64_t base = r * 2 * half;
    int64_t j = 0;
    for (; j + N <= half; j += N) {
      const int64_t ja = base + j, jb = base + half + j;
      const auto a = A::Load(x + ja);
      const auto b = A::Load(x + jb);
      typename A::V oa, ob;
      if (kPaired) {  // PlaneDirect's paired arithmetic: cos[j] for both, sin[j + half]
        const auto ca = A::LoadC(c + ja);
        const auto sb = A::LoadC(s + jb);
        oa = A::RotateSub(a, ca, b, sb);
        ob = A::Rotate(b, ca, a, sb);
      } else {
        oa = A::Rotate(a, A::LoadC(c + ja), b, A::LoadC(s + ja));
        ob = A::Rotate(b, A::LoadC(c + jb), a, A::LoadC(s + jb));
      }
      PutPair<T, kStream>(out + ja, out + jb, oa, ob);
    }
    if (j < half) {
      const auto m = TailMask<A>(half - j);
      const int64_t ja = base + j, jb = base + half + j;
      const auto a = A::Load(x + ja, m);
      const auto b = A::Load(x + jb, m);
      A::Store(out + ja, m, A::Rotate(a, A::LoadC(c + ja, m), b, A::LoadC(s + ja, m)));
      A::Store(out + jb, m, A::Rotate(b, A::LoadC(c + jb, m), a, A::LoadC(s + jb, m)));
    }
  }
}

// Pairs (2i, 2i + 1) never straddle a vector: vectors start at even dims.
template<typename T, bool kStream>
inline void IntervalAvx512(const T* x, T* out, const Compute<T>* c, const Compute<T>* s, int64_t rotary) {
  using A = Avx512<T>;
  constexpr int64_t N = A::kLanes;
  int64_t k = 0;
  for (; k + 2 * N <= rotary; k += 2 * N) {
    const auto v = A::Load(x + k);
    const auto w = A::Load(x + k + N);
    const auto ov = A::Rotate(v, A::LoadC(c + k), A::SwapPairs(v), A::LoadC(s + k));
    const auto ow = A::Rotate(w, A::LoadC(c + k + N), A::SwapPairs(w), A::LoadC(s + k + N));
    PutPair<T, kStream>(out + k, out + k + N, ov, ow);
  }
  for (; k < rotary; k += N) {  // the last one or two vectors of the head
    const auto m = TailMask<A>(rotary - k < N ? rotary - k : N);
    const auto v = A::Load(x + k, m);
    A::Store(out + k, m, A::Rotate(v, A::LoadC(c + k, m), A::SwapPairs(v), A::LoadC(s + k, m)));
  }
}

// The heads of one row (one rotary part of 2 * kHalf dims, kHalf a multiple of the vector), with
// the row's cos/sin loaded into registers once: the kernels above reload them for every head, as
// many loads again as x itself for float32 and twice as many for 16-bit types, which is what
// small calls (a decode step: every head of a row in the cache) spend their time on. The same
// arithmetic as PlaneAvx512 / IntervalAvx512, so the same bits. kKind: 0 plane, paired row;
// 1 plane; 2 interval. before(h, xh) runs before head h, after(xh, oh) after it.
enum RowKind { kRowPaired = 0, kRowPlane = 1, kRowInterval = 2 };

template<typename T, int64_t kHalf, int kKind>
constexpr int64_t RowTableVectors() {  // cos/sin vectors held for a row
  return (kKind == kRowPaired ? 2 : 4) * kHalf / Avx512<T>::kLanes;
}

template<typename T, bool kStream, int64_t kHalf, int kKind, typename Before, typename After>
inline void RowAvx512(const T* xr, T* orow, int64_t sx, int64_t so, int64_t H, const Compute<T>* c,
                      const Compute<T>* s, const Before& before, const After& after) {
  using A = Avx512<T>;
  using V = typename A::V;
  constexpr int64_t N = A::kLanes;
  constexpr int64_t NV = kHalf / N;  // vectors per half
  static_assert(kHalf % N == 0, "whole vectors only");
  // body(x, out) rotates one head
  auto each_head = [&](const auto& body) {
    for (int64_t h = 0; h < H; ++h) {
      const T* x = xr + h * sx;
      T* out = orow + h * so;
      before(h, x);
      body(x, out);
      after(x, out);
    }
  };
  if constexpr (kKind == kRowPaired || kKind == kRowPlane) {
    // paired: one cos for both halves and the second half's sin, negated for the first
    constexpr bool kPaired = kKind == kRowPaired;
    V ca[NV], sa[kPaired ? 1 : NV], cb[kPaired ? 1 : NV], sb[NV];
    for (int64_t q = 0; q < NV; ++q) {
      ca[q] = A::LoadC(c + q * N);
      sb[q] = A::LoadC(s + kHalf + q * N);
      if constexpr (!kPaired) {
        sa[q] = A::LoadC(s + q * N);
        cb[q] = A::LoadC(c + kHalf + q * N);
      }
    }
    each_head([&](const T* x, T* out) {
      for (int64_t q = 0; q < NV; ++q) {
        const V a = A::Load(x + q * N);
        const V b = A::Load(x + kHalf + q * N);
        if constexpr (kPaired) {
          PutPair<T, kStream>(out + q * N, out + kHalf + q * N, A::RotateSub(a, ca[q], b, sb[q]),
                              A::Rotate(b, ca[q], a, sb[q]));
        } else {
          PutPair<T, kStream>(out + q * N, out + kHalf + q * N, A::Rotate(a, ca[q], b, sa[q]),
                              A::Rotate(b, cb[q], a, sb[q]));
        }
      }
    });
  } else {
    constexpr int64_t NR = 2 * NV;  // vectors of the rotary part
    V cv[NR], sv[NR];
    for (int64_t q = 0; q < NR; ++q) {
      cv[q] = A::LoadC(c + q * N);
      sv[q] = A::LoadC(s + q * N);
    }
    each_head([&](const T* x, T* out) {
      for (int64_t q = 0; q < NR; q += 2) {
        const V v = A::Load(x + q * N);
        const V w = A::Load(x + (q + 1) * N);
        PutPair<T, kStream>(out + q * N, out + (q + 1) * N, A::Rotate(v, cv[q], A::SwapPairs(v), sv[q]),
                            A::Rotate(w, cv[q + 1], A::SwapPairs(w), sv[q + 1]));
      }
    });
  }
}
#endif

// The dims past rotary_size are copied, the zero slots of a packed gradient zeroed.
// kStream (AVX-512 builds, large calls): zero slots whose bytes are whole 64-byte lines are
// written with non-temporal stores, like the rotated slot.
template<typename T, bool kStream = false>
inline void TailAndZeros(const T* xh, T* oh, const RopeTensor& t, const Geometry& g) {
  const int64_t sx = t.x_stride_k, so = t.out_stride_k;
  const int64_t rest = g.K - g.rotary;
  if (rest > 0 && (xh != oh || sx != so)) {  // in place: already there
    const T* xt = xh + g.rotary * sx;
    T* ot = oh + g.rotary * so;
    if (sx == 1 && so == 1) {
      __builtin_memcpy(ot, xt, static_cast<size_t>(rest) * sizeof(T));
    } else {
      for (int64_t k = 0; k < rest; ++k) ot[k * so] = xt[k * sx];
    }
  }
  for (int z = 0; z < t.num_zero_slots; ++z) {
    T* zh = oh + t.zero_slot_offset[z];
#if ROPE_CPU_AVX512_16BIT
    const int64_t bytes = g.K * static_cast<int64_t>(sizeof(T));
    if (kStream && so == 1 && bytes % 64 == 0 && reinterpret_cast<uintptr_t>(zh) % 64 == 0) {
      char* line = reinterpret_cast<char*>(zh);
      for (int64_t at = 0; at < bytes; at += 64) {
        _mm512_stream_si512(reinterpret_cast<__m512i*>(line + at), _mm512_setzero_si512());
      }
      continue;
    }
#endif
    if (so == 1) {
      __builtin_memset(zh, 0, static_cast<size_t>(g.K) * sizeof(T));  // +0 in every float format
    } else {
      for (int64_t k = 0; k < g.K; ++k) __builtin_memset(zh + k * so, 0, sizeof(T));
    }
  }
}

// The rows of a block: (b, m), their cos/sin and whether they are paired.
template<typename C>
struct BlockRows {
  const int64_t* b;
  const int64_t* m;
  const bool* paired;
  const C* cos;
  const C* sin;
  // bfloat16 only: cos / sin split by parity, rotary_size per row: ce, co (and se, so) halves
  const float* cos_split;
  const float* sin_split;
  int64_t n;
};

// Software prefetching of x, for contiguous heads (k stride 1):
//  - heads with gaps between them (one slot of a packed x) defeat the hardware prefetchers: the
//    head kGapAhead heads ahead in the row is prefetched;
//  - with non-temporal stores (large calls) and 4- or 8-byte elements, the hardware prefetchers
//    alone leave a single thread short of memory speed (measured: float64 +40%, float32 +10%;
//    16-bit types: none): x is prefetched kStreamAhead bytes ahead, non-temporally.
// Prefetches never fault; addresses are formed as integers (they may lie past the tensor).
constexpr int64_t kGapAhead = 4;
// Heads outer (BHMK): heads streamed together. Measured on the development machine (AMD EPYC,
// (1|4, 32, 2048|512, 128), one thread, bench: raw kernel, cache flushed): 1 head 11-13 GB/s
// (float16) / 16-18 (float32), 4 heads 19-24 / 21-22, 8 heads 12 / 14 (too many streams).
constexpr int64_t kHeadsOuterGroup = 4;
constexpr int64_t kStreamAhead = 8192;

inline void PrefetchLines(const void* p, int64_t offset, int64_t bytes, bool temporal) {
  const uintptr_t at = reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(offset);
  for (int64_t line = 0; line < bytes; line += 64) {
    const void* address = reinterpret_cast<const void*>(at + static_cast<uintptr_t>(line));
    if (temporal) {
      __builtin_prefetch(address, 0, 3);
    } else {
      __builtin_prefetch(address, 0, 0);
    }
  }
}

// The prefetch of ForEachHead's rows-outer traversal, before head h (at xh) of a row.
struct HeadPrefetch {
  int64_t H = 0;
  int64_t gap_offset = 0;  // bytes to the head kGapAhead heads ahead (gaps only)
  int64_t head_bytes = 0;
  bool gaps = false, ahead = false;
  inline void operator()(int64_t h, const void* xh) const {
    if (gaps && h + kGapAhead < H) {
      PrefetchLines(xh, gap_offset, head_bytes, true);
    } else if (ahead) {
      PrefetchLines(xh, kStreamAhead, head_bytes, false);
    }
  }
};

template<typename T>
inline HeadPrefetch MakeHeadPrefetch(const RopeTensor& t, const Geometry& g, bool stream) {
  HeadPrefetch f;
  f.H = t.H;
  f.head_bytes = t.x_stride_k == 1 ? g.rotary * static_cast<int64_t>(sizeof(T)) : 0;
  f.gaps = t.x_stride_h > g.K;
  f.ahead = stream && sizeof(T) >= 4 && !f.gaps;
  f.gap_offset = kGapAhead * t.x_stride_h * static_cast<int64_t>(sizeof(T));
  return f;
}

// Rows outer: row(xr, orow, i) for each of the block's rows i of tensor t (xr, orow: the row's
// first head in x and out).
template<typename T, typename RowFn>
inline void ForEachRow(const RopeTensor& t, const BlockRows<Compute<T>>& rows, const RowFn& row) {
  const T* x = static_cast<const T*>(t.x);
  T* out = static_cast<T*>(t.out);
  for (int64_t i = 0; i < rows.n; ++i) {
    row(x + rows.b[i] * t.x_stride_b + rows.m[i] * t.x_stride_m,
        out + rows.b[i] * t.out_stride_b + rows.m[i] * t.out_stride_m, i);
  }
}

// The heads of row i one by one, each after its prefetch.
template<typename T, typename HeadFn>
inline void EachHeadOfRow(const RopeTensor& t, const HeadPrefetch& prefetch, const T* xr, T* orow, int64_t i,
                          const HeadFn& head) {
  for (int64_t h = 0; h < t.H; ++h) {
    const T* xh = xr + h * t.x_stride_h;
    prefetch(h, xh);
    head(xh, orow + h * t.out_stride_h, i);
  }
}

// Every head of tensor t in the block's rows: heads outer when heads are the slower axis of x
// (BHMK), so that each head's rows stream through memory in order, kHeadsOuterGroup heads at a
// time (row by row within the group: each row's cos/sin, read from L2, serves the group's heads
// from L1); rows outer otherwise.
template<typename T, typename HeadFn>
inline void ForEachHead(const RopeTensor& t, const Geometry& g, const BlockRows<Compute<T>>& rows,
                        bool stream, const HeadFn& head) {
  const T* x = static_cast<const T*>(t.x);
  T* out = static_cast<T*>(t.out);
  const int64_t head_bytes = t.x_stride_k == 1 ? g.rotary * static_cast<int64_t>(sizeof(T)) : 0;
  if (t.x_stride_h > t.x_stride_m) {
    const bool ahead_rows = stream && sizeof(T) >= 4 && t.x_stride_m == g.K;  // rows contiguous
    for (int64_t h0 = 0; h0 < t.H; h0 += kHeadsOuterGroup) {
      const int64_t h1 = h0 + kHeadsOuterGroup < t.H ? h0 + kHeadsOuterGroup : t.H;
      for (int64_t i = 0; i < rows.n; ++i) {
        for (int64_t h = h0; h < h1; ++h) {
          const T* xh = x + rows.b[i] * t.x_stride_b + rows.m[i] * t.x_stride_m + h * t.x_stride_h;
          if (ahead_rows) PrefetchLines(xh, kStreamAhead, head_bytes, false);
          head(xh, out + rows.b[i] * t.out_stride_b + rows.m[i] * t.out_stride_m + h * t.out_stride_h, i);
        }
      }
    }
  } else {
    const HeadPrefetch prefetch = MakeHeadPrefetch<T>(t, g, stream);
    ForEachRow<T>(t, rows, [&](const T* xr, T* orow, int64_t i) { EachHeadOfRow(t, prefetch, xr, orow, i, head); });
  }
}

template<typename T, int64_t kHalf, bool kStream>
void RotateTensorDirect(const RopeTensor& t, const Geometry& g, const BlockRows<Compute<T>>& rows,
                        Compute<T>* v, Compute<T>* o) {
  const int64_t parts = g.part > 0 ? g.rotary / g.part : 0;
  const int64_t rotary = g.rotary;
  const bool tail = g.K > g.rotary || t.num_zero_slots > 0;
  (void)v;
  (void)o;
  auto head = [&](const T* xh, T* oh, int64_t i) {
    const Compute<T>* c = rows.cos + i * rotary;
    const Compute<T>* s = rows.sin + i * rotary;
#if ROPE_CPU_AVX512_16BIT
    if constexpr (kAvx512Kernels<T>) {
      if (g.plane && rows.paired[i]) {
        PlaneAvx512<T, kStream, kHalf, true>(xh, oh, c, s, parts, g.half);
      } else if (g.plane) {
        PlaneAvx512<T, kStream, kHalf, false>(xh, oh, c, s, parts, g.half);
      } else {
        IntervalAvx512<T, kStream>(xh, oh, c, s, rotary);
      }
    } else
#endif
    if constexpr (std::is_same<T, HostBFloat16>::value) {
      const float* cs = rows.cos_split + i * rotary;
      const float* ss = rows.sin_split + i * rotary;
      const SplitTable split{cs, cs + rotary / 2, ss, ss + rotary / 2};
      if (!g.plane) {
        IntervalBFloat16<kHalf>(xh, oh, split, parts, g.half);
      } else if (g.half % 2 == 0) {
        PlaneBFloat16<kHalf>(xh, oh, split, parts, g.half);
      } else {
        PlaneDirect<T, false, kHalf>(xh, oh, c, s, parts, g.half);
      }
#if defined(__F16C__)
    } else if constexpr (std::is_same<T, HostHalf>::value) {
      HalfToFloat(xh, v, rotary);
      if (g.plane) {
        StoreStaged<float, true, true>(v, c, s, o, 1, g);
      } else {
        StoreStaged<float, false, true>(v, c, s, o, 1, g);
      }
      FloatToHalf(o, oh, rotary);
#endif
    } else {
      if (!g.plane) {
        IntervalDirect<T, kHalf>(xh, oh, c, s, parts, g.half);
      } else if (rows.paired[i]) {
        PlaneDirect<T, true, kHalf>(xh, oh, c, s, parts, g.half);
      } else {
        PlaneDirect<T, false, kHalf>(xh, oh, c, s, parts, g.half);
      }
    }
    if (tail) TailAndZeros<T, kStream>(xh, oh, t, g);
  };
#if ROPE_CPU_AVX512_16BIT
  if constexpr (kAvx512Kernels<T> && kHalf > 0 && kHalf % Avx512<T>::kLanes == 0) {
    // rows outer, one rotary part: each row's cos/sin in registers for all the row's heads (a
    // row whose cos/sin would take more than 16 vectors, float64 unless paired, keeps the
    // per-head kernels)
    if (!(t.x_stride_h > t.x_stride_m) && parts == 1) {
      const HeadPrefetch prefetch = MakeHeadPrefetch<T>(t, g, kStream);
      // the tail is a call (which clobbers every vector register): rows without one get a loop
      // with none, so that their cos/sin stay in registers
      auto after = [&](const T* xh, T* oh) { TailAndZeros<T, kStream>(xh, oh, t, g); };
      auto no_tail = [](const T*, T*) {};
      auto row = [&](auto kind, const T* xr, T* orow, const Compute<T>* c, const Compute<T>* s) {
        constexpr int kKind = decltype(kind)::value;
        if (tail) {
          RowAvx512<T, kStream, kHalf, kKind>(xr, orow, t.x_stride_h, t.out_stride_h, t.H, c, s, prefetch, after);
        } else {
          RowAvx512<T, kStream, kHalf, kKind>(xr, orow, t.x_stride_h, t.out_stride_h, t.H, c, s, prefetch, no_tail);
        }
      };
      constexpr bool kPlaneFits = RowTableVectors<T, kHalf, kRowPlane>() <= 16;
      constexpr bool kIntervalFits = RowTableVectors<T, kHalf, kRowInterval>() <= 16;
      ForEachRow<T>(t, rows, [&](const T* xr, T* orow, int64_t i) {
        const Compute<T>* c = rows.cos + i * rotary;
        const Compute<T>* s = rows.sin + i * rotary;
        if (g.plane && rows.paired[i]) {
          row(std::integral_constant<int, kRowPaired>(), xr, orow, c, s);
        } else if (g.plane && kPlaneFits) {
          row(std::integral_constant<int, kRowPlane>(), xr, orow, c, s);
        } else if (!g.plane && kIntervalFits) {
          row(std::integral_constant<int, kRowInterval>(), xr, orow, c, s);
        } else {
          EachHeadOfRow(t, prefetch, xr, orow, i, head);
        }
      });
      return;
    }
  }
#endif
  ForEachHead<T>(t, g, rows, kStream, head);
}

template<typename T>
void RotateTensorStaged(const RopeTensor& t, const Geometry& g, const BlockRows<Compute<T>>& rows,
                        Compute<T>* v) {
  const int64_t rotary = g.rotary;
  ForEachHead<T>(t, g, rows, false, [&](const T* xh, T* oh, int64_t i) {
    const Compute<T>* c = rows.cos + i * rotary;
    const Compute<T>* s = rows.sin + i * rotary;
    LoadStaged<T>(xh, t.x_stride_k, rotary, v);
    if (g.plane) {
      StoreStaged<T, true, false>(v, c, s, oh, t.out_stride_k, g);
    } else {
      StoreStaged<T, false, false>(v, c, s, oh, t.out_stride_k, g);
    }
    TailAndZeros<T>(xh, oh, t, g);
  });
}

// Whether the non-temporal stores of the AVX-512 kernels can write every full vector of every
// head of t: out and its head strides aligned to the vector's stored size.
template<typename T>
bool CanStream(const RopeTensor& t, const Geometry& g) {
#if ROPE_CPU_AVX512_16BIT
  if constexpr (kAvx512Kernels<T>) {
    const int64_t align = Avx512<T>::kStoreAlign;
    const int64_t size = static_cast<int64_t>(sizeof(T));
    const bool strides = (t.out_stride_b * size) % align == 0 && (t.out_stride_m * size) % align == 0
                         && (t.out_stride_h * size) % align == 0;
    const bool geometry = g.plane ? (g.half * size) % align == 0 : true;
    return reinterpret_cast<uintptr_t>(t.out) % static_cast<uintptr_t>(align) == 0 && strides && geometry;
  }
#endif
  (void)t;
  (void)g;
  return false;
}

template<typename T, bool kStream>
void RotateTensorDirectHalf(const RopeTensor& t, const Geometry& g, const BlockRows<Compute<T>>& rows,
                            Compute<T>* v, Compute<T>* o) {
  switch (g.half) {
    case 16: return RotateTensorDirect<T, 16, kStream>(t, g, rows, v, o);
    case 32: return RotateTensorDirect<T, 32, kStream>(t, g, rows, v, o);
    case 64: return RotateTensorDirect<T, 64, kStream>(t, g, rows, v, o);
    default: return RotateTensorDirect<T, 0, kStream>(t, g, rows, v, o);
  }
}

template<typename T>
void RotateTensor(const RopeTensor& t, const Geometry& g, const BlockRows<Compute<T>>& rows,
                  Compute<T>* v, Compute<T>* o, bool stream) {
  if (t.H <= 0) return;
  const bool direct = t.x_stride_k == 1 && t.out_stride_k == 1 && t.x != t.out;
  if (!direct) return RotateTensorStaged<T>(t, g, rows, v);
  if (stream && CanStream<T>(t, g)) return RotateTensorDirectHalf<T, true>(t, g, rows, v, o);
  return RotateTensorDirectHalf<T, false>(t, g, rows, v, o);
}

template<typename T, typename TT>
int64_t Rows(const RowTask& task) {
  using C = typename Storage<T>::C;
  const RopeParams& p = *task.p;
  Geometry g;
  g.K = p.K;
  g.rotary = p.rotary_size;
  g.part = p.rotary_dim > 0 ? p.rotary_size / p.rotary_dim : 0;
  g.half = g.part / 2;
  g.plane = p.mode == Mode::kPlane;

  const ScratchLayout layout = MakeScratchLayout(p, task.block_rows);
  char* base = static_cast<char*>(task.scratch);
  C* cos_block = reinterpret_cast<C*>(base + layout.cos);
  C* sin_block = reinterpret_cast<C*>(base + layout.sin);
  C* v = reinterpret_cast<C*>(base + layout.v);
  C* o = reinterpret_cast<C*>(base + layout.o);
  float* cos_split = reinterpret_cast<float*>(base + layout.cos_split);
  float* sin_split = reinterpret_cast<float*>(base + layout.sin_split);
  constexpr bool kSplit = std::is_same<T, HostBFloat16>::value && !ROPE_CPU_AVX512_16BIT;
  RowScratch<C> tmp;
  tmp.reduced = reinterpret_cast<double*>(base + layout.reduced);
  tmp.quadrant = reinterpret_cast<int32_t*>(base + layout.quadrant);
  tmp.fcos = reinterpret_cast<C*>(base + layout.fcos);
  tmp.fsin = reinterpret_cast<C*>(base + layout.fsin);
  int64_t* row_b = reinterpret_cast<int64_t*>(base + layout.row_b);
  int64_t* row_m = reinterpret_cast<int64_t*>(base + layout.row_m);
  bool* row_paired = reinterpret_cast<bool*>(base + layout.row_paired);

  const bool m_inner = RowOrderMInner(p);
  const bool shared_by_batch = p.positions_shared_by_batch();
  int64_t bad = 0;
  for (;;) {
    const int64_t claimed = __atomic_fetch_add(task.next, task.claim_rows, __ATOMIC_RELAXED);
    if (claimed >= task.num_rows) break;
    const int64_t claim_end =
        task.num_rows - claimed < task.claim_rows ? task.num_rows : claimed + task.claim_rows;
    for (int64_t first = claimed; first < claim_end; first += task.block_rows) {
      const int64_t n = claim_end - first < task.block_rows ? claim_end - first : task.block_rows;
      int64_t prev_bad = 0;
      for (int64_t i = 0; i < n; ++i) {
        const int64_t row = first + i;
        row_b[i] = m_inner ? row / p.M : row % p.B;
        row_m[i] = m_inner ? row % p.M : row / p.B;
        C* c = cos_block + i * g.rotary;
        C* s = sin_block + i * g.rotary;
        if (i > 0 && shared_by_batch && row_m[i] == row_m[i - 1]) {
          // same position as the row before (another sequence of a batch-shared position, e.g.
          // a decode step): its cos/sin, not a second computation
          std::memcpy(c, c - g.rotary, sizeof(C) * g.rotary);
          std::memcpy(s, s - g.rotary, sizeof(C) * g.rotary);
          row_paired[i] = row_paired[i - 1];
          bad += prev_bad;
          if (kSplit) {
            std::memcpy(cos_split + i * g.rotary, cos_split + (i - 1) * g.rotary, sizeof(float) * g.rotary);
            std::memcpy(sin_split + i * g.rotary, sin_split + (i - 1) * g.rotary, sizeof(float) * g.rotary);
          }
          continue;
        }
        prev_bad = PrepareRow<C, TT>(p, g, task.theta, row_b[i], row_m[i], c, s, tmp, &row_paired[i]);
        bad += prev_bad;
        if (kSplit) {
          float* cs = cos_split + i * g.rotary;
          float* ss = sin_split + i * g.rotary;
          const int64_t words = g.rotary / 2;
          for (int64_t w = 0; w < words; ++w) {
            cs[w] = static_cast<float>(c[2 * w]);
            cs[words + w] = static_cast<float>(c[2 * w + 1]);
            ss[w] = static_cast<float>(s[2 * w]);
            ss[words + w] = static_cast<float>(s[2 * w + 1]);
          }
        }
      }
      const BlockRows<C> rows{row_b, row_m, row_paired, cos_block, sin_block, cos_split, sin_split, n};
      for (int ti = 0; ti < p.num_tensors; ++ti) {
        RotateTensor<T>(p.tensors[ti], g, rows, v, o, task.stream_stores);
      }
    }
  }
#if ROPE_CPU_AVX512_16BIT
  if (task.stream_stores) _mm_sfence();  // the non-temporal stores are visible before the join
#endif
  return bad;
}

}  // namespace

int64_t RopeRows(const RowTask& task) {
  const RopeParams& p = *task.p;
  const bool float_table = p.cos != nullptr && p.table_dtype == DType::kFloat32;
  switch (p.dtype) {
    case DType::kFloat32: return Rows<float, float>(task);
    case DType::kFloat64: return Rows<double, double>(task);
    case DType::kFloat16:
      return float_table ? Rows<HostHalf, float>(task) : Rows<HostHalf, HostHalf>(task);
    case DType::kBFloat16:
      return float_table ? Rows<HostBFloat16, float>(task) : Rows<HostBFloat16, HostBFloat16>(task);
  }
  return 0;
}

}  // namespace ROPE_CPU_ISA
}  // namespace cpu
}  // namespace oneflow_rope
