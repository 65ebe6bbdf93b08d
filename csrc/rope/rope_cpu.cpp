// CPU kernel of the rotary embedding: one pass over (b, m), sin/cos computed once per row.
#include <cmath>
#include <limits>
#include <vector>

#include "rope/host_numeric.h"
#include "rope/rope_params.h"

namespace oneflow_rope {

const char* ValidateRopeParams(const RopeParams& p) {
  if (p.B < 0 || p.M < 0 || p.H < 0 || p.K < 0) return "negative size";
  if (p.rotary_dim != 1 && p.rotary_dim != 2) return "rotary_dim must be 1 or 2";
  if (p.rotary_size < 0 || p.rotary_size > p.K) return "rotary_size must be in [0, K]";
  if (p.rotary_size % (2 * p.rotary_dim) != 0) return "rotary_size / rotary_dim must be even";
  const int64_t numel = p.B * p.M * p.H * p.K;
  if (numel == 0) return nullptr;
  if (p.x == nullptr || p.out == nullptr) return "null x or out";
  if ((p.cos == nullptr) != (p.sin == nullptr)) return "cos and sin must be given together";
  if (p.cos != nullptr && p.table_rows <= 0) return "empty cos/sin table";
  if (p.pos_type != PosType::kNone && p.position_ids == nullptr) return "null position_ids";
  if (p.pos_type == PosType::kNone && p.rotary_dim != 1) return "rotary_dim 2 needs position_ids";
  if (p.pos_type == PosType::kNone && p.cos != nullptr && p.table_rows < p.M)
    return "cos/sin table has fewer rows than the sequence length";
  return nullptr;
}

namespace {

template<typename C>
C ReduceAngle(double angle) {
  // Reduce in double so the float sin/cos below stays accurate at any position.
  const double two_pi = 6.283185307179586476925286766559;
  return static_cast<C>(angle - two_pi * std::nearbyint(angle / two_pi));
}

int64_t PositionOf(const RopeParams& p, int64_t b, int64_t r, int64_t m) {
  const int64_t off = b * p.pos_stride_b + r * p.pos_stride_r + m * p.pos_stride_m;
  if (p.pos_type == PosType::kInt32) return static_cast<const int32_t*>(p.position_ids)[off];
  if (p.pos_type == PosType::kInt64) return static_cast<const int64_t*>(p.position_ids)[off];
  return m;
}

template<typename T>
int64_t Forward(const RopeParams& p) {
  using C = typename HostCompute<T>::type;
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
  const T* cos_table = static_cast<const T*>(p.cos);
  const T* sin_table = static_cast<const T*>(p.sin);
  const int64_t part = p.rotary_part();
  const int64_t half = part / 2;
  const int64_t rotary = p.rotary_size;
  const bool plane = p.mode == Mode::kPlane;
  const C sign = p.inverse ? C(-1) : C(1);

  // Frequencies theta_i = base^(-2i/A), in double.
  std::vector<double> theta(half);
  for (int64_t i = 0; i < half; ++i) {
    theta[i] = std::pow(p.base, -2.0 * static_cast<double>(i) / static_cast<double>(part));
  }
  std::vector<C> cos_row(rotary), sin_row(rotary);
  int64_t bad_rows = 0;
  for (int64_t b = 0; b < p.B; ++b) {
    for (int64_t m = 0; m < p.M; ++m) {
      // cos/sin of every rotary dim of this row, one part after the other.
      for (int64_t r = 0; r < p.rotary_dim; ++r) {
        const int64_t pos = PositionOf(p, b, r, m);
        C* c = cos_row.data() + r * part;
        C* s = sin_row.data() + r * part;
        if (cos_table != nullptr) {
          if (pos < 0 || pos >= p.table_rows) {
            ++bad_rows;
            for (int64_t j = 0; j < part; ++j) c[j] = s[j] = std::numeric_limits<C>::quiet_NaN();
            continue;
          }
          for (int64_t j = 0; j < part; ++j) {
            const int64_t t = pos * p.table_row_stride + j * p.table_col_stride;
            c[j] = Load(cos_table + t);
            s[j] = sign * static_cast<C>(Load(sin_table + t));
          }
        } else {
          for (int64_t j = 0; j < part; ++j) {
            const int64_t i = plane ? (j % half) : (j / 2);
            const C angle = ReduceAngle<C>(static_cast<double>(pos) * theta[i]);
            c[j] = std::cos(angle);
            s[j] = sign * std::sin(angle);
          }
        }
      }
      for (int64_t h = 0; h < p.H; ++h) {
        const T* xh = x + b * p.x_stride_b + m * p.x_stride_m + h * p.x_stride_h;
        T* oh = out + b * p.out_stride_b + m * p.out_stride_m + h * p.out_stride_h;
        for (int64_t k = 0; k < rotary; ++k) {
          const int64_t j = k % part;
          C partner;
          if (plane) {
            partner = j < half ? -static_cast<C>(Load(xh + (k + half) * p.x_stride_k))
                               : static_cast<C>(Load(xh + (k - half) * p.x_stride_k));
          } else {
            partner = (j % 2 == 0) ? -static_cast<C>(Load(xh + (k + 1) * p.x_stride_k))
                                   : static_cast<C>(Load(xh + (k - 1) * p.x_stride_k));
          }
          const C v = static_cast<C>(Load(xh + k * p.x_stride_k));
          Store(oh + k * p.out_stride_k, v * cos_row[k] + partner * sin_row[k]);
        }
        for (int64_t k = rotary; k < p.K; ++k) {
          oh[k * p.out_stride_k] = xh[k * p.x_stride_k];
        }
      }
    }
  }
  return bad_rows;
}

}  // namespace

int64_t RopeForwardCpu(const RopeParams& p) {
  if (p.B * p.M * p.H * p.K == 0) return 0;
  switch (p.dtype) {
    case DType::kFloat32: return Forward<float>(p);
    case DType::kFloat64: return Forward<double>(p);
    case DType::kFloat16: return Forward<HostHalf>(p);
    case DType::kBFloat16: return Forward<HostBFloat16>(p);
  }
  return 0;
}

}  // namespace oneflow_rope
