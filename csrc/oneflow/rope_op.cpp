// Definition of the user ops "fused_apply_rotary_emb" and "fused_apply_rotary_emb_grad":
// attributes, shape / dtype inference and SBP signatures. Kernels live in rope_kernels.cpp.
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

using rope::RopeOpAttrs;

// The call the attributes describe, with the optional inputs' shapes. k_size and rotary_size 0
// mean "not given" (the attributes' defaults); the Python layer always passes them resolved.
rope::RopeArgs ArgsFromAttrs(const RopeOpAttrs& attrs, user_op::InferContext* ctx, const std::string& in) {
  rope::RopeArgs args;
  args.x_shape = ToVector(ctx->InputShape(in, 0));
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
  return args;
}

// Shape of the op's result, after the rules of rope::InferShapes (the same as Python's
// infer_shapes). For the backward, the input is dy (in output_layout) and the result dx (in
// x_layout, of the shape x had: the forward's rules are checked on it too).
Maybe<std::vector<int64_t>> InferRope(user_op::InferContext* ctx, bool backward) {
  const RopeOpAttrs attrs = rope::ReadRopeOpAttrs(ctx);
  const bool has_cos = ctx->has_input("cos", 0);
  if (has_cos != ctx->has_input("sin", 0)) {
    return Error::RuntimeError() << "fused_apply_rotary_emb: cos, sin: give both tables or neither";
  }
  if (has_cos && ctx->InputShape("sin", 0) != ctx->InputShape("cos", 0)) {
    return Error::RuntimeError() << "fused_apply_rotary_emb: sin: shape "
                                 << ctx->InputShape("sin", 0).ToString()
                                 << " differs from cos shape " << ctx->InputShape("cos", 0).ToString();
  }
  rope::RopeArgs args = ArgsFromAttrs(attrs, ctx, backward ? "dy" : "x");
  rope::RopeShapes shapes;
  if (backward) {
    args.layout = attrs.output_layout;
    args.tensor_index.reset();
  }
  std::string err = rope::InferShapes(args, &shapes);
  if (err.empty() && backward) {
    const rope::LayoutDesc* x_layout = rope::FindLayout(attrs.x_layout);
    rope::RopeSizes sizes;
    sizes.B = shapes.B;
    sizes.M = shapes.M;
    sizes.H = shapes.H;
    sizes.K = shapes.K;
    args = ArgsFromAttrs(attrs, ctx, "dy");
    if (x_layout != nullptr) args.x_shape = rope::LayoutShape(*x_layout, sizes);
    err = rope::InferShapes(args, &shapes);
    if (err.empty()) return args.x_shape;
  }
  if (!err.empty()) return Error::RuntimeError() << "fused_apply_rotary_emb: " << err;
  return shapes.out_shape;
}

Maybe<void> InferForwardShape(user_op::InferContext* ctx) {
  const std::vector<int64_t> out = *JUST(InferRope(ctx, false));
  ctx->SetOutputShape("out", 0, Shape(DimVector(out.begin(), out.end())));
  return Maybe<void>::Ok();
}

Maybe<void> InferBackwardShape(user_op::InferContext* ctx) {
  const std::vector<int64_t> dx = *JUST(InferRope(ctx, true));
  ctx->SetOutputShape("dx", 0, Shape(DimVector(dx.begin(), dx.end())));
  return Maybe<void>::Ok();
}

Maybe<void> CheckDataTypes(user_op::InferContext* ctx, const std::string& in) {
  const DataType dtype = ctx->InputDType(in, 0);
  if (dtype != DataType::kFloat && dtype != DataType::kDouble && dtype != DataType::kFloat16
      && dtype != DataType::kBFloat16) {
    return Error::TypeError() << "fused_apply_rotary_emb: x: dtype " << DataType_Name(dtype)
                              << " is not supported, expected float32, float64, float16 or "
                                 "bfloat16";
  }
  for (const char* table : {"cos", "sin"}) {
    if (ctx->has_input(table, 0) && ctx->InputDType(table, 0) != dtype) {
      return Error::TypeError() << "fused_apply_rotary_emb: " << table << ": dtype "
                                << DataType_Name(ctx->InputDType(table, 0))
                                << " differs from x's " << DataType_Name(dtype);
    }
  }
  if (ctx->has_input("position_ids", 0)) {
    const DataType pos = ctx->InputDType("position_ids", 0);
    if (pos != DataType::kInt32 && pos != DataType::kInt64) {
      return Error::TypeError() << "fused_apply_rotary_emb: position_ids: dtype "
                                << DataType_Name(pos) << " is not supported, expected int32 or "
                                << "int64";
    }
  }
  return Maybe<void>::Ok();
}

Maybe<void> InferForwardDataType(user_op::InferContext* ctx) {
  JUST(CheckDataTypes(ctx, "x"));
  ctx->SetOutputDType("out", 0, ctx->InputDType("x", 0));
  return Maybe<void>::Ok();
}

Maybe<void> InferBackwardDataType(user_op::InferContext* ctx) {
  JUST(CheckDataTypes(ctx, "dy"));
  ctx->SetOutputDType("dx", 0, ctx->InputDType("dy", 0));
  return Maybe<void>::Ok();
}

user_op::OpArg Arg(const std::string& name) { return user_op::OpArg(std::string(name), 0); }

// Signatures: split on B (position_ids split with it), split on H (only where every rank then
// holds whole heads), and partial-sum (the op is linear in x). cos/sin are always broadcast.
Maybe<void> GetRopeSbp(user_op::SbpContext* ctx, bool backward) {
  const std::string in_name = backward ? "dy" : "x";
  const std::string out_name = backward ? "dx" : "out";
  const RopeOpAttrs attrs = rope::ReadRopeOpAttrs(ctx);
  const auto* x_layout = rope::FindLayout(attrs.x_layout);
  const auto* out_layout = rope::FindLayout(attrs.output_layout);
  CHECK_OR_RETURN(x_layout != nullptr && out_layout != nullptr)
      << "fused_apply_rotary_emb: unknown layout";
  const auto* in_layout = backward ? out_layout : x_layout;
  const auto* res_layout = backward ? x_layout : out_layout;
  std::vector<user_op::OpArg> tables;
  for (const char* t : {"cos", "sin"}) {
    if (ctx->user_op_conf().has_input(t, 0)) tables.emplace_back(t, 0);
  }
  const bool has_pos = ctx->user_op_conf().has_input("position_ids", 0);

  {
    auto builder = ctx->NewBuilder()
                       .Split(Arg(in_name), rope::BatchAxis(*in_layout))
                       .Split(Arg(out_name), rope::BatchAxis(*res_layout));
    if (!tables.empty()) builder.Broadcast(tables);
    if (has_pos) builder.Split(Arg("position_ids"), 0);
    builder.Build();
  }
  const int64_t k_size = attrs.k_size;
  const Shape& in_shape = ctx->LogicalTensorDesc4InputArgNameAndIndex(in_name, 0).shape();
  int64_t heads = 0;
  if (in_layout->fused) {
    if (k_size > 0 && in_shape.NumAxes() == 3) heads = in_shape.At(2) / (k_size * in_layout->slots);
  } else if (in_shape.NumAxes() == 4) {
    heads = in_shape.At(rope::HeadAxis(*in_layout));
  }
  const bool whole_heads = !(in_layout->fused || res_layout->fused)
                           || (heads > 0 && heads % ctx->parallel_num() == 0);
  if (whole_heads) {
    auto builder = ctx->NewBuilder()
                       .Split(Arg(in_name), rope::HeadAxis(*in_layout))
                       .Split(Arg(out_name), rope::HeadAxis(*res_layout));
    if (!tables.empty()) builder.Broadcast(tables);
    if (has_pos) builder.Broadcast(Arg("position_ids"));
    builder.Build();
  }
  {
    auto builder = ctx->NewBuilder()
                       .PartialSum(Arg(in_name))
                       .PartialSum(Arg(out_name));
    if (!tables.empty()) builder.Broadcast(tables);
    if (has_pos) builder.Broadcast(Arg("position_ids"));
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
    .OptionalInput("cos")
    .OptionalInput("sin")
    .OptionalInput("position_ids")
    .Output("out")
    ROPE_OP_ATTRIBUTES(ROPE_DECLARE_ATTR)
    .SetLogicalTensorDescInferFn(InferForwardShape)
    .SetPhysicalTensorDescInferFn(InferForwardShape)
    .SetDataTypeInferFn(InferForwardDataType)
    .SetGetSbpFn([](user_op::SbpContext* ctx) { return GetRopeSbp(ctx, false); });

REGISTER_USER_OP("fused_apply_rotary_emb_grad")
    .Input("dy")
    .OptionalInput("cos")
    .OptionalInput("sin")
    .OptionalInput("position_ids")
    .Output("dx")
    ROPE_OP_ATTRIBUTES(ROPE_DECLARE_ATTR)
    .SetLogicalTensorDescInferFn(InferBackwardShape)
    .SetPhysicalTensorDescInferFn(InferBackwardShape)
    .SetDataTypeInferFn(InferBackwardDataType)
    .SetGetSbpFn([](user_op::SbpContext* ctx) { return GetRopeSbp(ctx, true); });

}  // namespace oneflow
