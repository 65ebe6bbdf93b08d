// Plain description of one rotary-embedding call. Kernels (CPU and CUDA) read only this struct:
// no framework header is needed to build or call them.
#ifndef ONEFLOW_ROPE_CSRC_ROPE_ROPE_PARAMS_H_
#define ONEFLOW_ROPE_CSRC_ROPE_ROPE_PARAMS_H_

#include <cstdint>

namespace oneflow_rope {

enum class DType : int32_t { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };
enum class Mode : int32_t { kPlane = 0, kInterval = 1 };
enum class PosType : int32_t { kNone = 0, kInt32 = 1, kInt64 = 2 };

// Element (b, m, h, k) of x lives at x[b*x_stride_b + m*x_stride_m + h*x_stride_h + k*x_stride_k]
// (the pointer already points at the selected slot of a packed tensor); the same for out.
// Strides are in elements. All sizes are 64-bit so tensors past 2^31 elements index correctly.
struct RopeParams {
  DType dtype = DType::kFloat32;
  Mode mode = Mode::kPlane;

  const void* x = nullptr;
  void* out = nullptr;

  int64_t B = 0, M = 0, H = 0, K = 0;
  int64_t x_stride_b = 0, x_stride_m = 0, x_stride_h = 0, x_stride_k = 1;
  int64_t out_stride_b = 0, out_stride_m = 0, out_stride_h = 0, out_stride_k = 1;

  // The first rotary_size dims of each head rotate, split in rotary_dim parts of
  // A = rotary_size / rotary_dim dims; part r uses position_ids[b, r, m].
  int64_t rotary_size = 0;
  int32_t rotary_dim = 1;

  // Optional cos/sin tables of shape (table_rows, A), same dtype as x, row stride in elements.
  const void* cos = nullptr;
  const void* sin = nullptr;
  int64_t table_rows = 0;
  int64_t table_row_stride = 0;
  int64_t table_col_stride = 1;

  // Used when no table is given: theta_i = base ** (-2 i / A).
  double base = 10000.0;

  // Optional positions: element (b, r, m) at position_ids[b*pos_stride_b + r*pos_stride_r +
  // m*pos_stride_m]. Without them the position of token m is m.
  const void* position_ids = nullptr;
  PosType pos_type = PosType::kNone;
  int64_t pos_stride_b = 0, pos_stride_r = 0, pos_stride_m = 0;

  // Backward: rotate by the negated angle (sin -> -sin).
  bool inverse = false;

  int64_t rotary_part() const { return rotary_size / rotary_dim; }
  int64_t num_rows() const { return B * M; }
};

// Checks the parts of a RopeParams that the kernels rely on (sizes, divisibility, pointers).
// Returns nullptr when the params are usable, else a static message saying what is wrong.
const char* ValidateRopeParams(const RopeParams& p);

// Runs the rotation on the CPU. Returns the number of (b, m, r) rows whose position fell outside
// the cos/sin table (those outputs are NaN, nothing outside the table is read); 0 on success.
int64_t RopeForwardCpu(const RopeParams& p);

}  // namespace oneflow_rope

#endif  // ONEFLOW_ROPE_CSRC_ROPE_ROPE_PARAMS_H_
