// CPU kernel of the rotary embedding: one pass over (b, m), sin/cos computed once per row.
#include <cmath>
#include <limits>
#include <vector>

#include "rope/host_numeric.h"
#include "rope/rope_params.h"

namespace oneflow_rope {

namespace {

template<typename C>
C ReduceAngle(double angle) {
  // Reduce in double so the float sin/cos below stays accurate at any position.
  const double two_pi = 6.283185307179586476925286766559;
  return static_cast<C>(angle - two_pi * std::nearbyint(angle / two_pi));
}

int64_t LoadIndex(const void* data, IndexType type, int64_t offset) {
  if (type == IndexType::kInt32) return static_cast<const int32_t*>(data)[offset];
  return static_cast<const int64_t*>(data)[offset];
}

// Position of token m of sequence b for rotary part r; false when it cannot be found (varlen
// rows outside every sequence of a malformed cu_seqlens).
bool PositionOf(const RopeParams& p, int64_t b, int64_t r, int64_t m, int64_t* pos) {
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
  if (LoadIndex(p.cu_seqlens, p.cu_seqlens_type, 0) != 0
      || LoadIndex(p.cu_seqlens, p.cu_seqlens_type, S) != p.cu_seqlens_total) {
    return false;
  }
  // last s in [0, S) with cu[s] <= g
  int64_t lo = 0, hi = S;
  while (hi - lo > 1) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (LoadIndex(p.cu_seqlens, p.cu_seqlens_type, mid) <= g) lo = mid; else hi = mid;
  }
  if (S == 0) return false;
  const int64_t start = LoadIndex(p.cu_seqlens, p.cu_seqlens_type, lo);
  const int64_t end = LoadIndex(p.cu_seqlens, p.cu_seqlens_type, lo + 1);
  if (!(start <= g && g < end)) return false;
  *pos = g - start;
  return true;
}

template<typename T, typename TT>
int64_t Forward(const RopeParams& p) {
  using C = typename HostCompute<T>::type;
  const TT* cos_table = static_cast<const TT*>(p.cos);
  const TT* sin_table = static_cast<const TT*>(p.sin);
  const int64_t part = p.rotary_part();
  const int64_t half = part / 2;
  const int64_t rotary = p.rotary_size;
  const bool plane = p.mode == Mode::kPlane;
  const C sign = p.inverse ? C(-1) : C(1);
  const C scale = static_cast<C>(p.attention_scaling);

  // Frequencies theta_i (or inv_freq[i]), in double.
  std::vector<double> theta(half);
  for (int64_t i = 0; i < half; ++i) {
    if (p.inv_freq == nullptr) {
      theta[i] = std::pow(p.base, -2.0 * static_cast<double>(i) / static_cast<double>(part));
    } else if (p.inv_freq_dtype == DType::kFloat64) {
      theta[i] = static_cast<const double*>(p.inv_freq)[i];
    } else {
      theta[i] = static_cast<const float*>(p.inv_freq)[i];
    }
  }
  std::vector<C> cos_row(rotary), sin_row(rotary);
  int64_t bad_rows = 0;
  for (int64_t b = 0; b < p.B; ++b) {
    for (int64_t m = 0; m < p.M; ++m) {
      // cos/sin of every rotary dim of this row, one part after the other.
      for (int64_t r = 0; r < p.rotary_dim; ++r) {
        int64_t pos = 0;
        const bool found = PositionOf(p, b, r, m, &pos);
        C* c = cos_row.data() + r * part;
        C* s = sin_row.data() + r * part;
        if (!found || (cos_table != nullptr && (pos < 0 || pos >= p.table_rows))) {
          ++bad_rows;
          for (int64_t j = 0; j < part; ++j) c[j] = s[j] = std::numeric_limits<C>::quiet_NaN();
          continue;
        }
        if (cos_table != nullptr) {
          for (int64_t j = 0; j < part; ++j) {
            const int64_t t = pos * p.table_row_stride + j * p.table_col_stride;
            c[j] = scale * static_cast<C>(Load(cos_table + t));
            s[j] = sign * scale * static_cast<C>(Load(sin_table + t));
          }
        } else {
          for (int64_t j = 0; j < part; ++j) {
            const int64_t i = plane ? (j % half) : (j / 2);
            const C angle = ReduceAngle<C>(static_cast<double>(pos) * theta[i]);
            c[j] = scale * std::cos(angle);
            s[j] = sign * scale * std::sin(angle);
          }
        }
      }
      for (int ti = 0; ti < p.num_tensors; ++ti) {
        const RopeTensor& tensor = p.tensors[ti];
        const T* x = static_cast<const T*>(tensor.x);
        T* out = static_cast<T*>(tensor.out);
        for (int64_t h = 0; h < tensor.H; ++h) {
          const T* xh = x + b * tensor.x_stride_b + m * tensor.x_stride_m + h * tensor.x_stride_h;
          T* oh = out + b * tensor.out_stride_b + m * tensor.out_stride_m + h * tensor.out_stride_h;
          const int64_t sk = tensor.x_stride_k;
          // read the head first: out may be x (in place)
          std::vector<C> v(p.K);
          for (int64_t k = 0; k < p.K; ++k) v[k] = static_cast<C>(Load(xh + k * sk));
          for (int64_t k = 0; k < rotary; ++k) {
            const int64_t j = k % part;
            C partner;
            if (plane) {
              partner = j < half ? -v[k + half] : v[k - half];
            } else {
              partner = (j % 2 == 0) ? -v[k + 1] : v[k - 1];
            }
            Store(oh + k * tensor.out_stride_k, v[k] * cos_row[k] + partner * sin_row[k]);
          }
          for (int64_t k = rotary; k < p.K; ++k) {
            oh[k * tensor.out_stride_k] = xh[k * sk];
          }
          for (int z = 0; z < tensor.num_zero_slots; ++z) {
            T* zh = oh + tensor.zero_slot_offset[z];
            for (int64_t k = 0; k < p.K; ++k) Store(zh + k * tensor.out_stride_k, C(0));
          }
        }
      }
    }
  }
  return bad_rows;
}

}  // namespace

int64_t RopeForwardCpu(const RopeParams& p) {
  if (p.numel() == 0) return 0;
  const bool float_table = p.cos != nullptr && p.table_dtype == DType::kFloat32;
  switch (p.dtype) {
    case DType::kFloat32: return Forward<float, float>(p);
    case DType::kFloat64: return Forward<double, double>(p);
    case DType::kFloat16:
      return float_table ? Forward<HostHalf, float>(p) : Forward<HostHalf, HostHalf>(p);
    case DType::kBFloat16:
      return float_table ? Forward<HostBFloat16, float>(p) : Forward<HostBFloat16, HostBFloat16>(p);
  }
  return 0;
}

}  // namespace oneflow_rope
