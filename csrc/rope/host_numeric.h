// Host-side 16-bit float storage types and their conversions to and from float, written out by
// bit manipulation so the CPU kernel needs neither a framework nor a compiler extension.
#ifndef ONEFLOW_ROPE_CSRC_ROPE_HOST_NUMERIC_H_
#define ONEFLOW_ROPE_CSRC_ROPE_HOST_NUMERIC_H_

#include <cstdint>
#include <cstring>

namespace oneflow_rope {

struct HostHalf {
  uint16_t bits;
};
struct HostBFloat16 {
  uint16_t bits;
};

inline uint32_t FloatBits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}
inline float BitsFloat(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline float ToFloat(HostBFloat16 v) { return BitsFloat(static_cast<uint32_t>(v.bits) << 16); }

inline HostBFloat16 ToBFloat16(float f) {
  uint32_t u = FloatBits(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return HostBFloat16{static_cast<uint16_t>((u >> 16) | 0x40)};
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return HostBFloat16{static_cast<uint16_t>(u >> 16)};
}

inline float ToFloat(HostHalf v) {
  const uint32_t sign = static_cast<uint32_t>(v.bits & 0x8000u) << 16;
  const uint32_t exp = (v.bits >> 10) & 0x1fu;
  uint32_t mant = v.bits & 0x3ffu;
  if (exp == 0x1f) return BitsFloat(sign | 0x7f800000u | (mant << 13));  // inf / nan
  if (exp != 0) return BitsFloat(sign | ((exp + 112u) << 23) | (mant << 13));
  if (mant == 0) return BitsFloat(sign);
  // subnormal half: value = mant * 2^-24
  int e = -1;
  do {
    ++e;
    mant <<= 1;
  } while ((mant & 0x400u) == 0);
  mant &= 0x3ffu;
  return BitsFloat(sign | static_cast<uint32_t>(112 - e) << 23 | (mant << 13));
}

inline HostHalf ToHalf(float f) {
  const uint32_t u = FloatBits(f);
  const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
  const uint32_t absu = u & 0x7fffffffu;
  if (absu > 0x7f800000u) return HostHalf{static_cast<uint16_t>(sign | 0x7e00u)};  // nan
  if (absu >= 0x477ff000u) return HostHalf{static_cast<uint16_t>(sign | 0x7c00u)};  // overflow
  if (absu < 0x38800000u) {
    // result is subnormal (or zero): round absu * 2^24 to an integer, nearest even
    const float scaled = BitsFloat(absu) * 16777216.0f;  // exact: power of two scaling
    uint32_t q = static_cast<uint32_t>(scaled);
    const float rest = scaled - static_cast<float>(q);
    if (rest > 0.5f || (rest == 0.5f && (q & 1u))) ++q;
    return HostHalf{static_cast<uint16_t>(sign | q)};
  }
  // normal: rebias exponent, round mantissa to 10 bits, nearest even (carry may bump exponent)
  uint32_t h = ((absu >> 13) - (112u << 10));
  const uint32_t rem = absu & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return HostHalf{static_cast<uint16_t>(sign | h)};
}

template<typename T>
struct HostCompute {
  using type = float;
};
template<>
struct HostCompute<double> {
  using type = double;
};

inline float Load(const float* p) { return *p; }
inline double Load(const double* p) { return *p; }
inline float Load(const HostHalf* p) { return ToFloat(*p); }
inline float Load(const HostBFloat16* p) { return ToFloat(*p); }

inline void Store(float* p, float v) { *p = v; }
inline void Store(double* p, double v) { *p = v; }
inline void Store(HostHalf* p, float v) { *p = ToHalf(v); }
inline void Store(HostBFloat16* p, float v) { *p = ToBFloat16(v); }

}  // namespace oneflow_rope

#endif  // ONEFLOW_ROPE_CSRC_ROPE_HOST_NUMERIC_H_
