// Tensor layouts of the operator: the layout table, shape inference and contiguous strides.
// Framework-free: shared by the OneFlow op definition and the raw (PyTorch / numpy) binding.
//
// The table itself is generated at build time from oneflow_rope/op_table.json (the one definition
// Python reads too), and InferShapes applies the same rules, in the same order and with the same
// messages, as oneflow_rope.layout.infer_shapes: tests/test_inference_differential.py runs both
// over thousands of random calls and requires the same outcome.
#ifndef ONEFLOW_ROPE_CSRC_ROPE_LAYOUT_H_
#define ONEFLOW_ROPE_CSRC_ROPE_LAYOUT_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "rope/op_table.h"  // generated: ROPE_LAYOUTS, ROPE_MODES, ROPE_OP_ATTRIBUTES
#include "rope/rope_params.h"

namespace oneflow_rope {

struct LayoutDesc {
  const char* name;  // e.g. "BM(H3K)"
  int ndim;          // number of tensor axes
  int batch_axis;    // for varlen layouts the token axis, which holds B = 1 and M = T
  int seq_axis;
  int head_axis;     // for fused layouts the last axis, shared with K (and the slots)
  bool fused;        // heads and head size share the last axis
  bool varlen;       // one axis holds the T tokens of packed sequences: (BM)HK, (BM)(HK), ...
  int slots;         // 1, or 2 / 3 for packed KV / QKV
  int64_t tensor_index[3];     // the tensor_index of each slot (query 0, key 1, value 2)
  const char* tensor_name[3];  // "query", "key", "value" per slot; nullptr when unpacked
  int64_t default_tensor_index;
  const char* unpacked;  // layout of one selected tensor (BM(H3K) -> BM(HK)); itself when unpacked
  bool can_be_output;
};

// Returns the layout of this name (spaces and case ignored), or nullptr.
const LayoutDesc* FindLayout(const std::string& name);
// Every layout, in the table's order.
const std::vector<const LayoutDesc*>& AllLayouts();
// "BMHK, BHMK, ..." for error messages.
std::string LayoutNames(bool outputs_only);

// Axis of x that holds B, M, H or K (for fused layouts H and K share the last axis; for varlen
// layouts B and M share the token axis).
int BatchAxis(const LayoutDesc& l);
int SeqAxis(const LayoutDesc& l);
int HeadAxis(const LayoutDesc& l);
int KAxis(const LayoutDesc& l);

// The modes in the order of Mode ("plane", "interval").
const std::vector<std::string>& ModeNames();
Mode ParseMode(const std::string& mode, bool* ok);

// The slot a tensor_index selects (0 for unpacked layouts), or -1 when it selects none.
int64_t SelectedSlot(const LayoutDesc& l, int64_t tensor_index);
// The slot holding the tensor of this name ("query", "key", "value"), or -1 when none does.
int64_t SlotNamed(const LayoutDesc& l, const char* name);

// A call's arguments as the user gives them to fused_apply_rotary_emb; nullopt: not given.
struct RopeArgs {
  std::vector<int64_t> x_shape;
  std::string layout = ROPE_DEFAULT_LAYOUT;
  std::optional<std::string> output_layout;
  std::string mode = "plane";
  std::optional<int64_t> tensor_index;
  std::optional<int64_t> k_size;
  std::optional<int64_t> rotary_size;
  std::optional<std::vector<int64_t>> table_shape;         // cos (and sin)
  std::optional<std::vector<int64_t>> position_ids_shape;
  // q+k calls: k's shape (same layout as x, which is q), or packed_qk: x is a packed
  // query-key-value tensor whose query and key are both rotated.
  std::optional<std::vector<int64_t>> k_shape;
  bool packed_qk = false;
  std::optional<int64_t> seqlen_offset;                      // seqlen_offsets given as an int
  std::optional<std::vector<int64_t>> seqlen_offsets_shape;  // seqlen_offsets given as a tensor
  std::optional<std::vector<int64_t>> inv_freq_shape;
  std::optional<std::vector<int64_t>> cu_seqlens_shape;     // varlen layouts: (S+1,)
};

// What the rules resolve for a call.
struct RopeShapes {
  int64_t B = 0, M = 0, H = 0, K = 0;
  int64_t rotary_size = 0;
  int32_t rotary_dim = 1;
  int64_t tensor_index = 0;
  const LayoutDesc* layout = nullptr;
  const LayoutDesc* output_layout = nullptr;
  std::vector<int64_t> out_shape;
  // q+k calls: the second tensor's head count and output shape (unset for one tensor).
  std::optional<int64_t> k_num_heads;
  std::optional<std::vector<int64_t>> k_out_shape;
};

// Checks every rule that depends only on shapes and arguments and resolves the defaults. Returns
// "" and fills `shapes`, or a message "argument: ..." naming the argument and the value given.
std::string InferShapes(const RopeArgs& args, RopeShapes* shapes);

struct RopeSizes {
  int64_t B = 0, M = 0, H = 0, K = 0;
};

// A call as the op's attributes give it (sizes already resolved), for the kernels.
struct RopeCall {
  std::string x_layout;
  std::string output_layout;
  std::string mode;
  int64_t tensor_index = 0;
  int64_t k_size = 0;       // head size; 0: from x's shape (unfused layouts only)
  int64_t rotary_size = 0;  // 0: K
  int32_t rotary_dim = 1;

  bool operator==(const RopeCall& o) const {
    return x_layout == o.x_layout && output_layout == o.output_layout && mode == o.mode
           && tensor_index == o.tensor_index && k_size == o.k_size && rotary_size == o.rotary_size
           && rotary_dim == o.rotary_dim;
  }
};

// B, M, H, K of x under the call's attributes (InferShapes without the optional inputs; for a
// varlen layout, as if its sequences were given).
std::string InferSizes(const std::vector<int64_t>& x_shape, const RopeCall& call, RopeSizes* sizes);

// Shape of a contiguous tensor of this layout holding B, M, H, K (slots for packed layouts; the
// token axis of a varlen layout holds B * M tokens).
std::vector<int64_t> LayoutShape(const LayoutDesc& l, const RopeSizes& s);

struct LayoutStrides {
  int64_t b = 0, m = 0, h = 0, k = 1;
  int64_t offset = 0;  // element offset of the selected slot
};
// Strides of the logical (b, m, h, k) axes in a contiguous tensor of this layout; slot selects
// the packed tensor (0-based).
LayoutStrides ContiguousStrides(const LayoutDesc& l, const RopeSizes& s, int64_t slot);

}  // namespace oneflow_rope

#endif  // ONEFLOW_ROPE_CSRC_ROPE_LAYOUT_H_
