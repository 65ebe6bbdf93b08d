// The attributes of the ops fused_apply_rotary_emb(_grad), one field per entry of the operator's
// table (oneflow_rope/op_table.json, through the generated rope/op_table.h). The op declares
// them, the inference and SBP functions read them, and the Python dispatch (_C.RopeOp) sets them,
// all by name from this one list.
#ifndef ONEFLOW_ROPE_CSRC_ROPE_OP_ATTRS_H_
#define ONEFLOW_ROPE_CSRC_ROPE_OP_ATTRS_H_

#include <cstdint>
#include <string>

#include "rope/op_table.h"

namespace oneflow_rope {

struct RopeOpAttrs {
#define ROPE_ATTR_FIELD(type, name, default_value) type name = default_value;
  ROPE_OP_ATTRIBUTES(ROPE_ATTR_FIELD)
#undef ROPE_ATTR_FIELD
};

// Reads every attribute by name from an op context (InferContext, SbpContext, KernelContext...).
template<typename Ctx>
RopeOpAttrs ReadRopeOpAttrs(const Ctx* ctx) {
  RopeOpAttrs attrs;
#define ROPE_READ_ATTR(type, name, default_value) attrs.name = ctx->template Attr<type>(#name);
  ROPE_OP_ATTRIBUTES(ROPE_READ_ATTR)
#undef ROPE_READ_ATTR
  return attrs;
}

}  // namespace oneflow_rope

#endif  // ONEFLOW_ROPE_CSRC_ROPE_OP_ATTRS_H_
