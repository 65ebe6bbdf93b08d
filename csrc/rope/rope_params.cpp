#include "rope/rope_params.h"

namespace oneflow_rope {

namespace {

bool IsSixteenBit(DType d) { return d == DType::kFloat16 || d == DType::kBFloat16; }

}  // namespace

const char* ValidateRopeParams(const RopeParams& p) {
  if (p.num_tensors < 1 || p.num_tensors > kMaxRopeTensors) return "num_tensors must be 1 or 2";
  if (p.B < 0 || p.M < 0 || p.K < 0) return "negative size";
  for (int t = 0; t < p.num_tensors; ++t) {
    const RopeTensor& x = p.tensors[t];
    if (x.H < 0) return "negative head count";
    if (x.num_zero_slots < 0 || x.num_zero_slots > 2) return "num_zero_slots must be 0, 1 or 2";
  }
  if (p.rotary_dim != 1 && p.rotary_dim != 2) return "rotary_dim must be 1 or 2";
  if (p.rotary_size < 0 || p.rotary_size > p.K) return "rotary_size must be in [0, K]";
  if (p.rotary_size % (2 * p.rotary_dim) != 0) return "rotary_size / rotary_dim must be even";
  if (p.numel() == 0) return nullptr;
  for (int t = 0; t < p.num_tensors; ++t) {
    const RopeTensor& x = p.tensors[t];
    if (x.H > 0 && (x.x == nullptr || x.out == nullptr)) return "null x or out";
  }
  if ((p.cos == nullptr) != (p.sin == nullptr)) return "cos and sin must be given together";
  if (p.cos != nullptr) {
    if (p.table_rows <= 0) return "empty cos/sin table";
    if (p.table_dtype != p.dtype && !(IsSixteenBit(p.dtype) && p.table_dtype == DType::kFloat32)) {
      return "cos/sin must have x's dtype, or float32 with float16/bfloat16 x";
    }
  }
  if (p.inv_freq != nullptr) {
    if (p.cos != nullptr) return "inv_freq and cos/sin tables exclude each other";
    if (p.inv_freq_dtype != DType::kFloat32 && p.inv_freq_dtype != DType::kFloat64) {
      return "inv_freq must be float32 or float64";
    }
  }
  if ((p.pos_type == IndexType::kNone) != (p.position_ids == nullptr)) {
    return "position_ids and pos_type must be given together";
  }
  if ((p.offsets_type == IndexType::kNone) != (p.seqlen_offsets == nullptr)) {
    return "seqlen_offsets and offsets_type must be given together";
  }
  if ((p.cu_seqlens_type == IndexType::kNone) != (p.cu_seqlens == nullptr)) {
    return "cu_seqlens and cu_seqlens_type must be given together";
  }
  if (p.position_ids != nullptr && (p.seqlen_offsets != nullptr || p.cu_seqlens != nullptr)) {
    return "position_ids exclude seqlen_offsets and cu_seqlens";
  }
  if (p.cu_seqlens != nullptr && p.num_seqs < 0) return "negative num_seqs";
  if (p.position_ids == nullptr && p.rotary_dim != 1) return "rotary_dim 2 needs position_ids";
  if (p.positions_shared_by_batch() && p.seqlen_offset == 0 && p.cos != nullptr
      && p.table_rows < p.M) {
    return "cos/sin table has fewer rows than the sequence length";
  }
  return nullptr;
}

}  // namespace oneflow_rope
