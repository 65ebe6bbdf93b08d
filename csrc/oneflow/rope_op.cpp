// Definition of the user ops "fused_apply_rotary_emb" and "fused_apply_rotary_emb_grad":
// attributes, shape / dtype inference and SBP signatures. Kernels live in rope_kernels.cpp.
//
// Inputs and outputs of the forward op:   x [k] [cos sin] [position_ids] [seqlen_offsets] [inv_freq]
//                                         [cu_seqlens] -> out [k_out]
// and of the grad op:                     dy [dk_out] [cos sin] [position_ids] [seqlen_offsets]
//                                         [inv_freq] [cu_seqlens] -> dx [dk]
// A q+k call either gives k (rotated into k_out; gradient dk), or sets packed_qk: x is a packed
// query-key-value tensor whose query goes to out and whose key goes to k_out (both gradients
// land in dx, which has zeros in the value slot).
#include "oneflow/core/framework/framework.h"
#include "oneflow/core/framework/op_generated.h"
#include "rope/op_attrs.h"
#include "rope/layout.h"

namespace oneflow {

namespace {

namespace rope = ::oneflow_rope;

std::vector<int64_t> ToVector(const Shape& shape) {
  std::vector<int64_t> v(shape.NumAxes());
  for (int i = 0; i < shape.NumAxes(); ++i) v[i] = shape.At(i);
  return v;
}

Shape ToShape(const std::vector<int64_t>& v) { return Shape(DimVector(v.begin(), v.end())); }

using rope::RopeOpAttrs;

// The names of one direction's tensors: forward x, k -> out, k_out; backward dy, dk_out -> dx, dk.
struct ArgNames {
  const char* in;
  const char* in_k;
  const char* res;
  const char* res_k;
};
constexpr ArgNames kForwardNames{"x", "k", "out", "k_out"};
constexpr ArgNames kBackwardNames{"dy", "dk_out", "dx", "dk"};

// The call the attributes describe, with the optional inputs' shapes. k_size and rotary_size 0
// mean "not given" (the attributes' defaults), as does seqlen_offset 0; the Python layer always
// passes k_size and rotary_size resolved.
rope::RopeArgs ArgsFromAttrs(const RopeOpAttrs& attrs, user_op::InferContext* ctx, const ArgNames& names) {
  rope::RopeArgs args;
  args.x_shape = ToVector(ctx->InputShape(names.in, 0));
  args.layout = attrs.x_layout;
  args.output_layout = attrs.output_layout;
  args.mode = attrs.mode;
  args.tensor_index = attrs.tensor_index;
  if (attrs.k_size != 0) args.k_size = attrs.k_size;
  if (attrs.rotary_size != 0) args.rotary_size = attrs.rotary_size;
  if (ctx->has_input("cos", 0)) args.table_shape = ToVector(ctx->InputShape("cos", 0));
  if (ctx->has_input("position_ids", 0)) {
    args.position_ids_shape = ToVector(ctx->InputShape("position_ids", 0));
  }
  if (ctx->has_input(names.in_k, 0)) args.k_shape = ToVector(ctx->InputShape(names.in_k, 0));
  args.packed_qk = attrs.packed_qk;
  if (attrs.seqlen_offset != 0) args.seqlen_offset = attrs.seqlen_offset;
  if (ctx->has_input("seqlen_offsets", 0)) {
    args.seqlen_offsets_shape = ToVector(ctx->InputShape("seqlen_offsets", 0));
  }
  if (ctx->has_input("inv_freq", 0)) args.inv_freq_shape = ToVector(ctx->InputShape("inv_freq", 0));
  if (ctx->has_input("cu_seqlens", 0)) args.cu_seqlens_shape = ToVector(ctx->InputShape("cu_seqlens", 0));
  return args;
}

// Shapes of the op's results, after the rules of rope::InferShapes (the same as Python's
// infer_shapes): {out, k_out} for the forward. For the backward, the inputs are dy and dk_out (in
// output_layout) and the results dx and dk (in x_layout, of the shapes x and k had: the forward's
// rules are checked on them too); for packed_qk, dy and dk_out are the query's and the key's
// gradients and dx the packed tensor's.
Maybe<std::pair<std::vector<int64_t>, std::vector<int64_t>>> InferRope(user_op::InferContext* ctx,
                                                                       bool backward) {
  const RopeOpAttrs attrs = rope::ReadRopeOpAttrs(ctx);
  const ArgNames& names = backward ? kBackwardNames : kForwardNames;
  const bool has_cos = ctx->has_input("cos", 0);
  if (has_cos != ctx->has_input("sin", 0)) {
    return Error::RuntimeError() << "fused_apply_rotary_emb: cos, sin: give both tables or neither";
  }
  if (has_cos && ctx->InputShape("sin", 0) != ctx->InputShape("cos", 0)) {
    return Error::RuntimeError() << "fused_apply_rotary_emb: sin: shape "
                                 << ctx->InputShape("sin", 0).ToString()
                                 << " differs from cos shape " << ctx->InputShape("cos", 0).ToString();
  }
  const bool has_in_k = ctx->has_input(names.in_k, 0);
  const bool has_res_k = ctx->has_output(names.res_k, 0);
  // forward: k_out exactly when k is given or packed_qk; backward: dk_out exactly when the forward
  // had two results, dk exactly when it had a k.
  const bool consistent = backward ? has_in_k == (has_res_k || attrs.packed_qk) && !(attrs.packed_qk && has_res_k)
                                   : has_res_k == (has_in_k || attrs.packed_qk);
  if (!consistent) {
    return Error::RuntimeError() << "fused_apply_rotary_emb: k: the op's tensors do not match the call: "
                                 << names.in_k << (has_in_k ? " given" : " absent") << ", " << names.res_k
                                 << (has_res_k ? " given" : " absent") << ", packed_qk "
                                 << (attrs.packed_qk ? "true" : "false");
  }
  rope::RopeArgs args = ArgsFromAttrs(attrs, ctx, names);
  rope::RopeShapes shapes;
  if (!backward) {
    const std::string err = rope::InferShapes(args, &shapes);
    if (!err.empty()) return Error::RuntimeError() << "fused_apply_rotary_emb: " << err;
    return std::make_pair(shapes.out_shape, shapes.k_out_shape.value_or(std::vector<int64_t>()));
  }
  // backward: the sizes from dy (and dk_out), read in the output layout
  args.layout = attrs.output_layout;
  args.tensor_index.reset();
  args.packed_qk = false;
  std::string err = rope::InferShapes(args, &shapes);
  if (!err.empty()) return Error::RuntimeError() << "fused_apply_rotary_emb: " << err;
  const rope::LayoutDesc* x_layout = rope::FindLayout(attrs.x_layout);
  if (x_layout == nullptr) {
    return Error::RuntimeError() << "fused_apply_rotary_emb: layout: got '" << attrs.x_layout << "'";
  }
  if (attrs.packed_qk && shapes.k_num_heads != shapes.H) {
    return Error::RuntimeError() << "fused_apply_rotary_emb: k: the key's gradient has "
                                 << shapes.k_num_heads.value_or(0) << " heads, the query's " << shapes.H
                                 << "; the query and key of a packed tensor have the same heads";
  }
  rope::RopeSizes sizes;
  sizes.B = shapes.B;
  sizes.M = shapes.M;
  sizes.H = shapes.H;
  sizes.K = shapes.K;
  const std::vector<int64_t> dx_shape = rope::LayoutShape(*x_layout, sizes);
  std::vector<int64_t> dk_shape;
  args = ArgsFromAttrs(attrs, ctx, names);
  args.x_shape = dx_shape;
  if (has_res_k) {
    sizes.H = shapes.k_num_heads.value_or(0);
    dk_shape = rope::LayoutShape(*x_layout, sizes);
    args.k_shape = dk_shape;
  } else {
    args.k_shape.reset();
  }
  err = rope::InferShapes(args, &shapes);
  if (!err.empty()) return Error::RuntimeError() << "fused_apply_rotary_emb: " << err;
  return std::make_pair(dx_shape, dk_shape);
}

Maybe<void> InferShape(user_op::InferContext* ctx, bool backward) {
  const ArgNames& names = backward ? kBackwardNames : kForwardNames;
  const auto result = *JUST(InferRope(ctx, backward));
  ctx->SetOutputShape(names.res, 0, ToShape(result.first));
  if (ctx->has_output(names.res_k, 0)) ctx->SetOutputShape(names.res_k, 0, ToShape(result.second));
  return Maybe<void>::Ok();
}

Maybe<void> InferForwardShape(user_op::InferContext* ctx) { return InferShape(ctx, false); }
Maybe<void> InferBackwardShape(user_op::InferContext* ctx) { return InferShape(ctx, true); }

bool IsFloat(DataType d) {
  return d == DataType::kFloat || d == DataType::kDouble || d == DataType::kFloat16
         || d == DataType::kBFloat16;
}

Maybe<void> CheckIndexDType(user_op::InferContext* ctx, const char* name) {
  if (!ctx->has_input(name, 0)) return Maybe<void>::Ok();
  const DataType dtype = ctx->InputDType(name, 0);
  if (dtype != DataType::kInt32 && dtype != DataType::kInt64) {
    return Error::TypeError() << "fused_apply_rotary_emb: " << name << ": dtype " << DataType_Name(dtype)
                              << " is not supported, expected int32 or int64";
  }
  return Maybe<void>::Ok();
}

Maybe<void> InferDataType(user_op::InferContext* ctx, bool backward) {
  const ArgNames& names = backward ? kBackwardNames : kForwardNames;
  const DataType dtype = ctx->InputDType(names.in, 0);
  if (!IsFloat(dtype)) {
    return Error::TypeError() << "fused_apply_rotary_emb: x: dtype " << DataType_Name(dtype)
                              << " is not supported, expected float32, float64, float16 or "
                                 "bfloat16";
  }
  if (ctx->has_input(names.in_k, 0) && ctx->InputDType(names.in_k, 0) != dtype) {
    return Error::TypeError() << "fused_apply_rotary_emb: k: dtype " << DataType_Name(ctx->InputDType(names.in_k, 0))
                              << " differs from q's " << DataType_Name(dtype);
  }
  // The tables have x's dtype, or float32 with a 16-bit x (math in float32 either way).
  if (ctx->has_input("cos", 0)) {
    const DataType table = ctx->InputDType("cos", 0);
    const bool sixteen = dtype == DataType::kFloat16 || dtype == DataType::kBFloat16;
    if (table != dtype && !(sixteen && table == DataType::kFloat)) {
      return Error::TypeError() << "fused_apply_rotary_emb: cos: dtype " << DataType_Name(table)
                                << " differs from x's " << DataType_Name(dtype)
                                << " (float32 tables are accepted with float16 / bfloat16 x)";
    }
    if (ctx->has_input("sin", 0) && ctx->InputDType("sin", 0) != table) {
      return Error::TypeError() << "fused_apply_rotary_emb: sin: dtype " << DataType_Name(ctx->InputDType("sin", 0))
                                << " differs from cos's " << DataType_Name(table);
    }
  }
  JUST(CheckIndexDType(ctx, "position_ids"));
  JUST(CheckIndexDType(ctx, "seqlen_offsets"));
  JUST(CheckIndexDType(ctx, "cu_seqlens"));
  if (ctx->has_input("inv_freq", 0)) {
    const DataType inv = ctx->InputDType("inv_freq", 0);
    if (inv != DataType::kFloat && inv != DataType::kDouble) {
      return Error::TypeError() << "fused_apply_rotary_emb: inv_freq: dtype " << DataType_Name(inv)
                                << " is not supported, expected float32 or float64";
    }
  }
  ctx->SetOutputDType(names.res, 0, dtype);
  if (ctx->has_output(names.res_k, 0)) ctx->SetOutputDType(names.res_k, 0, dtype);
  return Maybe<void>::Ok();
}

Maybe<void> InferForwardDataType(user_op::InferContext* ctx) { return InferDataType(ctx, false); }
Maybe<void> InferBackwardDataType(user_op::InferContext* ctx) { return InferDataType(ctx, true); }

user_op::OpArg Arg(const std::string& name) { return user_op::OpArg(std::string(name), 0); }

// Heads of a tensor of this layout and shape (0 when unknown).
int64_t HeadsOf(const rope::LayoutDesc& layout, const Shape& shape, int64_t k_size) {
  if (shape.NumAxes() != layout.ndim) return 0;
  if (layout.fused) return k_size > 0 ? shape.At(rope::KAxis(layout)) / (k_size * layout.slots) : 0;
  return shape.At(rope::HeadAxis(layout));
}

// Signatures:
// - split on B: position_ids (B, R, M) and seqlen_offsets (B,) split with it. Not for the varlen
//   layouts, whose token axis holds B and M at once: splitting it is the split on M below.
// - split on H, only where every rank then holds whole heads.
// - split on M (the sequence axis; the tokens of a varlen layout): position_ids split along their
//   M axis (last) with x; seqlen_offsets (per sequence) and cu_seqlens whole on every rank. The
//   kernel adds where its rank's slice starts to each token's index (rope_kernels.cpp), so every
//   token keeps its global position: seqlen_offsets[b] + m, or t - cu_seqlens[s]. (OneFlow 0.9
//   counts slicing a broadcast input as costly: x split on M with position_ids broadcast is
//   moved to the split on H rather than position_ids sliced; give position_ids split with x.)
// - partial-sum (the op is linear in x).
// cos, sin, inv_freq and cu_seqlens are always broadcast; position_ids and seqlen_offsets are
// broadcast where their axis is not split.
Maybe<void> GetRopeSbp(user_op::SbpContext* ctx, bool backward) {
  const ArgNames& names = backward ? kBackwardNames : kForwardNames;
  const RopeOpAttrs attrs = rope::ReadRopeOpAttrs(ctx);
  const auto* x_layout = rope::FindLayout(attrs.x_layout);
  const auto* out_layout = rope::FindLayout(attrs.output_layout);
  CHECK_OR_RETURN(x_layout != nullptr && out_layout != nullptr)
      << "fused_apply_rotary_emb: unknown layout";
  const auto* in_layout = backward ? out_layout : x_layout;
  const auto* res_layout = backward ? x_layout : out_layout;
  const auto& conf = ctx->user_op_conf();
  CHECK_OR_RETURN(x_layout->varlen == out_layout->varlen)
      << "fused_apply_rotary_emb: output_layout: varlen and batched layouts do not mix";
  std::vector<user_op::OpArg> broadcast;  // always broadcast
  for (const char* t : {"cos", "sin", "inv_freq", "cu_seqlens"}) {
    if (conf.has_input(t, 0)) broadcast.emplace_back(t, 0);
  }
  std::vector<user_op::OpArg> per_sequence;  // split with B, else broadcast
  for (const char* t : {"position_ids", "seqlen_offsets"}) {
    if (conf.has_input(t, 0)) per_sequence.emplace_back(t, 0);
  }
  const bool has_positions = conf.has_input("position_ids", 0);
  const bool has_offsets = conf.has_input("seqlen_offsets", 0);
  const bool has_in_k = conf.has_input(names.in_k, 0);
  const bool has_res_k = conf.has_output(names.res_k, 0);
  // the layout of each tensor: the second input / result is in the same layout as the first
  auto add = [&](auto& builder, auto how) {
    how(builder, Arg(names.in), *in_layout);
    if (has_in_k) how(builder, Arg(names.in_k), *in_layout);
    how(builder, Arg(names.res), *res_layout);
    if (has_res_k) how(builder, Arg(names.res_k), *res_layout);
  };
  if (!in_layout->varlen) {
    auto builder = ctx->NewBuilder();
    add(builder, [](auto& b, const user_op::OpArg& arg, const rope::LayoutDesc& l) {
      b.Split(arg, rope::BatchAxis(l));
    });
    if (!broadcast.empty()) builder.Broadcast(broadcast);
    if (!per_sequence.empty()) builder.Split(per_sequence, 0);
    builder.Build();
  }
  const int64_t k_size = attrs.k_size;
  const int64_t parallel = ctx->parallel_num();
  bool whole_heads = true;
  if (in_layout->fused || res_layout->fused) {
    const int64_t heads = HeadsOf(*in_layout, ctx->LogicalTensorDesc4InputArgNameAndIndex(names.in, 0).shape(),
                                  k_size);
    whole_heads = heads > 0 && heads % parallel == 0;
    if (has_in_k) {
      const int64_t k_heads =
          HeadsOf(*in_layout, ctx->LogicalTensorDesc4InputArgNameAndIndex(names.in_k, 0).shape(), k_size);
      whole_heads = whole_heads && k_heads > 0 && k_heads % parallel == 0;
    }
  }
  if (whole_heads) {
    auto builder = ctx->NewBuilder();
    add(builder, [](auto& b, const user_op::OpArg& arg, const rope::LayoutDesc& l) {
      b.Split(arg, rope::HeadAxis(l));
    });
    if (!broadcast.empty()) builder.Broadcast(broadcast);
    if (!per_sequence.empty()) builder.Broadcast(per_sequence);
    builder.Build();
  }
  {
    auto builder = ctx->NewBuilder();
    add(builder, [](auto& b, const user_op::OpArg& arg, const rope::LayoutDesc& l) {
      b.Split(arg, rope::SeqAxis(l));
    });
    if (!broadcast.empty()) builder.Broadcast(broadcast);
    if (has_positions) {
      // (B, R, M), or (R, T) for a varlen layout: M (T) is the last axis
      const int64_t pos_axes = ctx->LogicalTensorDesc4InputArgNameAndIndex("position_ids", 0).shape().NumAxes();
      builder.Split(user_op::OpArg("position_ids", 0), pos_axes - 1);
    }
    if (has_offsets) builder.Broadcast(user_op::OpArg("seqlen_offsets", 0));
    builder.Build();
  }
  {
    auto builder = ctx->NewBuilder();
    add(builder, [](auto& b, const user_op::OpArg& arg, const rope::LayoutDesc&) { b.PartialSum(arg); });
    if (!broadcast.empty()) builder.Broadcast(broadcast);
    if (!per_sequence.empty()) builder.Broadcast(per_sequence);
    builder.Build();
  }
  return Maybe<void>::Ok();
}

}  // namespace

// The attributes of both ops (the forward call's, so the gradient op can rebuild its layouts),
// declared from the table: .Attr<type>("name", default) for each.
#define ROPE_DECLARE_ATTR(type, name, default_value) .Attr<type>(#name, default_value)

REGISTER_USER_OP("fused_apply_rotary_emb")
    .Input("x")
    .OptionalInput("k")
    .OptionalInput("cos")
    .OptionalInput("sin")
    .OptionalInput("position_ids")
    .OptionalInput("seqlen_offsets")
    .OptionalInput("inv_freq")
    .OptionalInput("cu_seqlens")
    .Output("out")
    .OptionalOutput("k_out")
    ROPE_OP_ATTRIBUTES(ROPE_DECLARE_ATTR)
    .SetLogicalTensorDescInferFn(InferForwardShape)
    .SetPhysicalTensorDescInferFn(InferForwardShape)
    .SetDataTypeInferFn(InferForwardDataType)
    .SetGetSbpFn([](user_op::SbpContext* ctx) { return GetRopeSbp(ctx, false); });

REGISTER_USER_OP("fused_apply_rotary_emb_grad")
    .Input("dy")
    .OptionalInput("dk_out")
    .OptionalInput("cos")
    .OptionalInput("sin")
    .OptionalInput("position_ids")
    .OptionalInput("seqlen_offsets")
    .OptionalInput("inv_freq")
    .OptionalInput("cu_seqlens")
    .Output("dx")
    .OptionalOutput("dk")
    ROPE_OP_ATTRIBUTES(ROPE_DECLARE_ATTR)
    .SetLogicalTensorDescInferFn(InferBackwardShape)
    .SetPhysicalTensorDescInferFn(InferBackwardShape)
    .SetDataTypeInferFn(InferBackwardDataType)
    .SetGetSbpFn([](user_op::SbpContext* ctx) { return GetRopeSbp(ctx, true); });

}  // namespace oneflow
