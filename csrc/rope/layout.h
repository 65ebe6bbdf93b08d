// Tensor layouts of the operator: parsing, shape inference and contiguous strides.
// Framework-free: shared by the OneFlow op definition and the raw (PyTorch / numpy) binding.
#ifndef ONEFLOW_ROPE_CSRC_ROPE_LAYOUT_H_
#define ONEFLOW_ROPE_CSRC_ROPE_LAYOUT_H_

#include <cstdint>
#include <string>
#include <vector>

#include "rope/rope_params.h"

namespace oneflow_rope {

struct LayoutDesc {
  const char* name;  // e.g. "BM(H3K)"
  int ndim;          // number of tensor axes
  bool seq_first;    // M is the outermost axis (MBHK, MB(...))
  bool heads_before_seq;  // BHMK
  bool fused;        // heads and head size share the last axis
  int slots;         // 1, or 2 / 3 for packed KV / QKV
  bool can_be_output;
};

// Returns the layout with this exact name, or nullptr.
const LayoutDesc* FindLayout(const std::string& name);
// "BMHK, BHMK, ..." for error messages.
std::string LayoutNames(bool outputs_only);

// Axis of x that holds B, M or H (for fused layouts H shares the last axis).
int BatchAxis(const LayoutDesc& l);
int SeqAxis(const LayoutDesc& l);
int HeadAxis(const LayoutDesc& l);

struct RopeSizes {
  int64_t B = 0, M = 0, H = 0, K = 0;
};

// Everything a call is made of, as the op's attributes give it (sizes already resolved).
struct RopeCall {
  std::string x_layout;
  std::string output_layout;
  std::string mode;
  int64_t tensor_index = 0;
  int64_t k_size = 0;       // head size; required for fused layouts, checked for the others
  int64_t rotary_size = 0;  // resolved (== K when the user gave none)
  int32_t rotary_dim = 1;
};

// Infers B, M, H, K from x's shape and checks every rule that depends only on shapes and
// attributes. Returns "" on success or a message naming the argument and the value given.
std::string InferSizes(const std::vector<int64_t>& x_shape, const RopeCall& call,
                       RopeSizes* sizes);
// Checks the optional inputs' shapes against the sizes. table_shape empty means no table;
// pos_shape empty means no position_ids.
std::string CheckOptionalShapes(const RopeSizes& sizes, const RopeCall& call,
                                const std::vector<int64_t>& table_shape,
                                const std::vector<int64_t>& pos_shape);

// Shape of a contiguous tensor of this layout holding B, M, H, K (slots for packed layouts).
std::vector<int64_t> LayoutShape(const LayoutDesc& l, const RopeSizes& s);

struct LayoutStrides {
  int64_t b = 0, m = 0, h = 0, k = 1;
  int64_t offset = 0;  // element offset of the selected slot
};
// Strides of the logical (b, m, h, k) axes in a contiguous tensor of this layout; slot selects
// the packed tensor (0-based).
LayoutStrides ContiguousStrides(const LayoutDesc& l, const RopeSizes& s, int64_t slot);

// The slot a packed layout's tensor_index selects (0 for unpacked layouts).
int64_t SelectedSlot(const LayoutDesc& l, int64_t tensor_index);

Mode ParseMode(const std::string& mode, bool* ok);

}  // namespace oneflow_rope

#endif  // ONEFLOW_ROPE_CSRC_ROPE_LAYOUT_H_
