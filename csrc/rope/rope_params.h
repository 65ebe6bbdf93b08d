// Plain description of one rotary-embedding call. Kernels (CPU and CUDA) read only this struct:
// no framework header is needed to build or call them.
//
// One call rotates one or two tensors (q and k of one launch, with their own head counts) that
// share B, M, K, the rotary geometry and the positions. Positions come from position_ids, or are
// the token index (plus offsets), or are found from cu_seqlens (packed variable-length
// sequences). Angles come from cos/sin tables, or are computed from base or from inv_freq.
#ifndef ONEFLOW_ROPE_CSRC_ROPE_ROPE_PARAMS_H_
#define ONEFLOW_ROPE_CSRC_ROPE_ROPE_PARAMS_H_

#include <cstdint>

namespace oneflow_rope {

enum class DType : int32_t { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };
enum class Mode : int32_t { kPlane = 0, kInterval = 1 };
// Element type of an integer input (position_ids, seqlen_offsets, cu_seqlens); kNone: absent.
enum class IndexType : int32_t { kNone = 0, kInt32 = 1, kInt64 = 2 };

constexpr int kMaxRopeTensors = 2;

// One rotated tensor. Element (b, m, h, k) of x lives at
// x[b*x_stride_b + m*x_stride_m + h*x_stride_h + k*x_stride_k] (the pointer already points at
// the selected slot of a packed tensor); the same for out. Strides are in elements, 64-bit so
// tensors past 2^31 elements index correctly. out may equal x (in place, same strides).
struct RopeTensor {
  const void* x = nullptr;
  void* out = nullptr;
  int64_t H = 0;
  int64_t x_stride_b = 0, x_stride_m = 0, x_stride_h = 0, x_stride_k = 1;
  int64_t out_stride_b = 0, out_stride_m = 0, out_stride_h = 0, out_stride_k = 1;
  // Gradient of a packed input: the other slots of each head of out get zeros, written by the
  // kernel with the rotated slot. Offsets in elements relative to out's (b, m, h) head.
  int32_t num_zero_slots = 0;
  int64_t zero_slot_offset[2] = {0, 0};
};

struct RopeParams {
  DType dtype = DType::kFloat32;  // of x and out
  Mode mode = Mode::kPlane;

  int32_t num_tensors = 1;
  RopeTensor tensors[kMaxRopeTensors];

  int64_t B = 0, M = 0, K = 0;

  // The first rotary_size dims of each head rotate, split in rotary_dim parts of
  // A = rotary_size / rotary_dim dims; part r uses position_ids[b, r, m].
  int64_t rotary_size = 0;
  int32_t rotary_dim = 1;

  // Optional cos/sin tables of shape (table_rows, A): entry [p, j] is used for dim j of a rotary
  // part at position p. table_dtype is x's dtype, or float32 with float16/bfloat16 x.
  const void* cos = nullptr;
  const void* sin = nullptr;
  DType table_dtype = DType::kFloat32;
  int64_t table_rows = 0;
  int64_t table_row_stride = 0;
  int64_t table_col_stride = 1;

  // Without tables the angle of frequency i at position p is p * theta_i, theta_i =
  // base ** (-2 i / A), or inv_freq[i] when inv_freq is given (A/2 contiguous float32 or
  // float64 values in the kernel's memory space). cos and sin are multiplied by
  // attention_scaling (tables included).
  double base = 10000.0;
  const void* inv_freq = nullptr;
  DType inv_freq_dtype = DType::kFloat32;
  double attention_scaling = 1.0;

  // Positions. With position_ids: element (b, r, m) at
  // position_ids[b*pos_stride_b + r*pos_stride_r + m*pos_stride_m].
  // Without: token m of sequence b has the index g = m + seqlen_offset (+ seqlen_offsets[b] when
  // given) and its position is g; with cu_seqlens (num_seqs + 1 entries) its position is
  // g - cu_seqlens[s] for the s with cu_seqlens[s] <= g < cu_seqlens[s + 1]. Every row of a call
  // with a malformed cu_seqlens (first entry not 0, last not cu_seqlens_total, an entry below the
  // one before), and rows whose position falls outside the cos/sin table, get NaN in their rotary
  // dims; nothing outside any input is read.
  const void* position_ids = nullptr;
  IndexType pos_type = IndexType::kNone;
  int64_t pos_stride_b = 0, pos_stride_r = 0, pos_stride_m = 0;
  int64_t seqlen_offset = 0;
  const void* seqlen_offsets = nullptr;
  IndexType offsets_type = IndexType::kNone;
  int64_t offsets_stride = 1;
  const void* cu_seqlens = nullptr;
  IndexType cu_seqlens_type = IndexType::kNone;
  int64_t num_seqs = 0;
  int64_t cu_seqlens_total = 0;

  // Backward: rotate by the negated angle (sin -> -sin).
  bool inverse = false;

  // CPU kernel: threads it may use (the framework's intra-op setting); 1 = the calling thread.
  int32_t num_threads = 1;

  int64_t rotary_part() const { return rotary_dim > 0 ? rotary_size / rotary_dim : 0; }
  int64_t num_rows() const { return B * M; }
  int64_t total_heads() const {
    int64_t heads = 0;
    for (int t = 0; t < num_tensors && t < kMaxRopeTensors; ++t) heads += tensors[t].H;
    return heads;
  }
  int64_t numel() const { return num_rows() * total_heads() * K; }
  // True when the position of token m is the same for every sequence b (no position_ids, no
  // per-sequence offsets, no cu_seqlens): kernels may share angles across the batch.
  bool positions_shared_by_batch() const {
    return position_ids == nullptr && seqlen_offsets == nullptr && cu_seqlens == nullptr;
  }
};

// Checks the parts of a RopeParams that the kernels rely on (sizes, divisibility, pointers).
// Returns nullptr when the params are usable, else a static message saying what is wrong.
const char* ValidateRopeParams(const RopeParams& p);

// Runs the rotation on the CPU. Returns the number of (b, m, r) rows whose position fell outside
// the cos/sin table or could not be found from cu_seqlens (those outputs are NaN, nothing outside
// any input is read); 0 on success.
int64_t RopeForwardCpu(const RopeParams& p);

}  // namespace oneflow_rope

#endif  // ONEFLOW_ROPE_CSRC_ROPE_ROPE_PARAMS_H_
