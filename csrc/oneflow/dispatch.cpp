// Python module oneflow_rope._C: runs this package's user ops with their attributes, and exposes
// the C++ shape rules (the op's inference) for the differential test.
//
// OneFlow 0.9.0's Python API has no generic way to pass attributes to a user op, and the wheel
// lacks the headers of its tensor, interpreter and autograd classes, so the few exported entry
// points used here are declared by hand (their signatures match the symbols liboneflow exports).
//
// A RopeOp holds everything of a call that does not change from one call to the next: the op
// expressions and the attribute map, built once by name. Calling it costs one pybind11 call, a
// few type checks and OneFlow's own dispatch.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "binding/layout_binding.h"
#include "oneflow/core/common/maybe.h"
#include "oneflow/core/framework/attr_map.h"
#include "oneflow/core/framework/mutable_attr_map.h"
#include "oneflow/core/framework/tensor_tuple.h"
#include "rope/op_attrs.h"
#include "rope/rope_cpu_internal.h"

namespace oneflow {
namespace one {

class Tensor;
class OpExpr;

class OpInterpUtil {
 public:
  template<typename T>
  static Maybe<T> Dispatch(const OpExpr& op_expr, const TensorTuple& inputs, const AttrMap& attrs);
  // Runs the op into `outputs`: entries already set are the tensors to write (in place).
  static Maybe<void> Dispatch(const OpExpr& op_expr, const TensorTuple& inputs, TensorTuple* outputs,
                              const AttrMap& attrs);
};

PyObject* PyTensor_New(const std::shared_ptr<Tensor>& data);

class FunctionAutoGradCaptureState;

// What flow.autograd.Function runs on (exported by liboneflow): records a node whose backward
// is backward_fn, with forward_fn run under no-grad.
class AutogradFunctionBase {
 public:
  using FType = std::function<std::shared_ptr<TensorTuple>(
      const std::shared_ptr<FunctionAutoGradCaptureState>&, const TensorTuple&)>;
  static Maybe<TensorTuple> Apply(const std::string& name, const FType& forward_fn,
                                  const FType& backward_fn, const TensorTuple& inputs);
};

namespace functional {
std::shared_ptr<OpExpr> PyUnpackOpExpr(PyObject* obj);
}  // namespace functional

}  // namespace one

namespace autograd {
// Thread-local switch of eager autograd (flow.no_grad); exported by liboneflow.
class GradMode {
 public:
  static bool is_enabled();
  static void set_enabled(bool enabled);
};
}  // namespace autograd

}  // namespace oneflow

namespace {

namespace py = pybind11;
using oneflow::one::Tensor;

// Layout of a oneflow.Tensor Python object in 0.9.0.
struct PyTensorObject {
  PyObject_HEAD std::shared_ptr<Tensor> data;
};

PyTypeObject* TensorType() {
  static PyTypeObject* type = reinterpret_cast<PyTypeObject*>(
      py::object(py::module_::import("oneflow").attr("Tensor")).release().ptr());
  return type;
}

// The op has no eager gradient function of its own: a call that needs a gradient goes through
// RopeOp::ForwardWithGrad (an autograd function of x whose backward is the grad op), which runs
// this dispatch inside. cos, sin and position_ids take no gradient (docs/operator.md), so
// autograd is off for every dispatch, whatever their requires_grad.
class NoGradGuard {
 public:
  NoGradGuard() : previous_(oneflow::autograd::GradMode::is_enabled()) {
    if (previous_) oneflow::autograd::GradMode::set_enabled(false);
  }
  ~NoGradGuard() {
    if (previous_) oneflow::autograd::GradMode::set_enabled(true);
  }

 private:
  bool previous_;
};

const std::vector<std::string>& AttributeNames() {
#define ROPE_ATTR_NAME(type, name, default_value) #name,
  static const std::vector<std::string> names = {ROPE_OP_ATTRIBUTES(ROPE_ATTR_NAME)};
#undef ROPE_ATTR_NAME
  return names;
}

template<typename T>
T TakeAttr(const py::kwargs& attrs, const char* name) {
  if (!attrs.contains(name)) {
    throw py::type_error(std::string("oneflow_rope._C.RopeOp: attribute ") + name + " is missing");
  }
  return attrs[name].cast<T>();
}

std::shared_ptr<oneflow::one::OpExpr> UnpackOpExpr(py::handle op_expr, const char* what) {
  std::shared_ptr<oneflow::one::OpExpr> op = oneflow::one::functional::PyUnpackOpExpr(op_expr.ptr());
  if (!op) throw py::type_error(std::string("oneflow_rope._C.RopeOp: ") + what + " is not a OneFlow op expression");
  return op;
}

bool IsTensor(py::handle obj) { return PyObject_TypeCheck(obj.ptr(), TensorType()) != 0; }

const std::shared_ptr<Tensor>& TensorOf(py::handle obj) {
  return reinterpret_cast<PyTensorObject*>(obj.ptr())->data;
}

py::object Wrap(const std::shared_ptr<Tensor>& t) {
  return py::reinterpret_steal<py::object>(oneflow::one::PyTensor_New(t));
}

using oneflow::one::TensorTuple;
using AutogradFn = oneflow::one::AutogradFunctionBase::FType;

class RopeOp {
 public:
  // forward / backward: the UserOpExprs of fused_apply_rotary_emb(_grad) with inputs x (dy),
  // [k (dk_out)], [cos, sin], [position_ids], [seqlen_offsets], [inv_freq], [cu_seqlens] and
  // outputs out (dx), [k_out (dk)]; attrs: every attribute of the table, by name. has_offsets:
  // seqlen_offsets is a tensor input (an int seqlen_offsets is the attribute seqlen_offset, which a
  // call may change).
  RopeOp(py::handle forward, py::handle backward, bool has_table, bool has_positions, bool has_k,
         bool has_offsets, bool has_inv_freq, bool has_cu_seqlens, const py::kwargs& attrs)
      : forward_(UnpackOpExpr(forward, "forward")),
        backward_(UnpackOpExpr(backward, "backward")),
        has_table_(has_table),
        has_positions_(has_positions),
        has_k_(has_k),
        has_offsets_(has_offsets),
        has_inv_freq_(has_inv_freq),
        has_cu_seqlens_(has_cu_seqlens) {
#define ROPE_TAKE_ATTR(type, name, default_value) values_.name = TakeAttr<type>(attrs, #name);
    ROPE_OP_ATTRIBUTES(ROPE_TAKE_ATTR)
#undef ROPE_TAKE_ATTR
    if (attrs.size() != AttributeNames().size()) {
      const std::vector<std::string>& known = AttributeNames();
      for (auto item : attrs) {
        const std::string key = py::str(item.first);
        if (std::find(known.begin(), known.end(), key) == known.end()) {
          throw py::type_error("oneflow_rope._C.RopeOp: unknown attribute " + key);
        }
      }
    }
    if (has_k_ && values_.packed_qk) {
      throw py::type_error("oneflow_rope._C.RopeOp: k: a packed q+k call (packed_qk) takes no k");
    }
    call_attrs_ = std::make_unique<oneflow::MutableAttrMap>(AttributeNames());
#define ROPE_SET_ATTR(type, name, default_value) call_attrs_->SetAttr<type>(#name, values_.name);
    ROPE_OP_ATTRIBUTES(ROPE_SET_ATTR)
#undef ROPE_SET_ATTR
    attr_map_ = oneflow::AttrMap(*call_attrs_);
  }

  // The forward: out, or (out, k_out) for a q+k call. seqlen_offsets: a tensor, an int (the
  // attribute seqlen_offset for this call) or None.
  py::object Forward(py::handle x, py::handle cos, py::handle sin, py::handle position_ids, py::handle k,
                     py::handle seqlen_offsets, py::handle inv_freq, py::handle cu_seqlens) const {
    TensorTuple extras;
    const oneflow::AttrMap attrs =
        CollectExtras(&extras, cos, sin, position_ids, seqlen_offsets, inv_freq, cu_seqlens);
    TensorTuple inputs;
    AddFirst(&inputs, x, k, "x", "k");
    TensorTuple outputs(num_outputs());
    DispatchOrThrow(*forward_, inputs, extras, attrs, &outputs);
    return Result(outputs);
  }

  // The grad op: dx, or (dx, dk) for a q+k call with k (dx alone for packed_qk).
  py::object Backward(py::handle dy, py::handle cos, py::handle sin, py::handle position_ids, py::handle dk_out,
                      py::handle seqlen_offsets, py::handle inv_freq, py::handle cu_seqlens) const {
    TensorTuple extras;
    const oneflow::AttrMap attrs =
        CollectExtras(&extras, cos, sin, position_ids, seqlen_offsets, inv_freq, cu_seqlens);
    TensorTuple inputs;
    Add(&inputs, dy, "dy");
    if (num_outputs() == 2) {
      Add(&inputs, dk_out, "dk_out");
    } else if (!dk_out.is_none()) {
      throw py::type_error("dk_out: this call was prepared for one tensor");
    }
    TensorTuple outputs(has_k_ ? 2 : 1);
    DispatchOrThrow(*backward_, inputs, extras, attrs, &outputs);
    return Result(outputs);
  }

  // The forward recorded for autograd: an autograd function of x (and k) whose backward is the
  // grad op. cos, sin, position_ids, seqlen_offsets and inv_freq are held by the two closures, not
  // inputs of the function, so they take no gradient whatever their requires_grad.
  py::object ForwardWithGrad(py::handle x, py::handle cos, py::handle sin, py::handle position_ids, py::handle k,
                             py::handle seqlen_offsets, py::handle inv_freq, py::handle cu_seqlens) const {
    return RecordForGrad(x, cos, sin, position_ids, k, seqlen_offsets, inv_freq, cu_seqlens, false);
  }

  // The forward written into x (and k) themselves; output_layout must be x_layout (checked here,
  // with the other conditions the op's contiguous kernels need). Returns x, or (x, k).
  py::object ForwardInplace(py::handle x, py::handle cos, py::handle sin, py::handle position_ids, py::handle k,
                            py::handle seqlen_offsets, py::handle inv_freq, py::handle cu_seqlens) const {
    CheckInplace(x, k);
    TensorTuple extras;
    const oneflow::AttrMap attrs =
        CollectExtras(&extras, cos, sin, position_ids, seqlen_offsets, inv_freq, cu_seqlens);
    TensorTuple inputs;
    AddFirst(&inputs, x, k, "x", "k");
    TensorTuple outputs(inputs);
    DispatchOrThrow(*forward_, inputs, extras, attrs, &outputs);
    return Result(outputs);
  }

  // ForwardInplace recorded for autograd: x (and k) get the function's node as their producer;
  // their values before the call receive the gradient.
  py::object ForwardInplaceWithGrad(py::handle x, py::handle cos, py::handle sin, py::handle position_ids,
                                    py::handle k, py::handle seqlen_offsets, py::handle inv_freq,
                                    py::handle cu_seqlens) const {
    CheckInplace(x, k);
    return RecordForGrad(x, cos, sin, position_ids, k, seqlen_offsets, inv_freq, cu_seqlens, true);
  }

  py::dict Attrs() const {
    py::dict d;
#define ROPE_GET_ATTR(type, name, default_value) d[#name] = values_.name;
    ROPE_OP_ATTRIBUTES(ROPE_GET_ATTR)
#undef ROPE_GET_ATTR
    return d;
  }

  bool has_table() const { return has_table_; }
  bool has_positions() const { return has_positions_; }
  bool has_k() const { return has_k_; }
  bool has_offsets() const { return has_offsets_; }
  bool has_inv_freq() const { return has_inv_freq_; }
  bool has_cu_seqlens() const { return has_cu_seqlens_; }
  int num_outputs() const { return (has_k_ || values_.packed_qk) ? 2 : 1; }

 private:
  static void Add(TensorTuple* tensors, py::handle obj, const char* argument) {
    if (!IsTensor(obj)) {
      throw py::type_error(std::string(argument) + ": expected a oneflow.Tensor, got "
                           + Py_TYPE(obj.ptr())->tp_name);
    }
    tensors->emplace_back(TensorOf(obj));
  }

  // x, then k for a call prepared with k.
  void AddFirst(TensorTuple* tensors, py::handle x, py::handle k, const char* x_name, const char* k_name) const {
    Add(tensors, x, x_name);
    if (has_k_) {
      Add(tensors, k, k_name);
    } else if (!k.is_none()) {
      throw py::type_error(std::string(k_name) + ": this call was prepared without k");
    }
  }

  // The attribute map of a call with another int seqlen_offsets: only that attribute changes in
  // the kept mutable map (the others keep their values, no allocation).
  oneflow::AttrMap AttrMapWithOffset(int64_t seqlen_offset) const {
    call_attrs_->SetAttr<int64_t>("seqlen_offset", seqlen_offset);
    return oneflow::AttrMap(*call_attrs_);
  }

  py::object Result(const TensorTuple& outputs) const {
    if (outputs.size() == 1) return Wrap(outputs.at(0));
    return py::make_tuple(Wrap(outputs.at(0)), Wrap(outputs.at(1)));
  }

  // The inputs plus the optional ones, dispatched with autograd off into `outputs` (entries
  // already set are written in place); throws on error.
  static void DispatchOrThrow(const oneflow::one::OpExpr& op, const TensorTuple& first, const TensorTuple& extras,
                              const oneflow::AttrMap& attrs, TensorTuple* outputs) {
    TensorTuple tensors(first);
    for (const auto& t : extras) tensors.emplace_back(t);
    NoGradGuard no_grad;
    oneflow::Maybe<void> result = oneflow::one::OpInterpUtil::Dispatch(op, tensors, outputs, attrs);
    if (!result.IsOk()) throw std::runtime_error(result.GetSerializedError());
  }

  // The optional inputs in the op's order, checked against what the call was prepared with;
  // returns the attribute map of the call (a new one when an int seqlen_offsets differs).
  oneflow::AttrMap CollectExtras(TensorTuple* extras, py::handle cos, py::handle sin, py::handle position_ids,
                                 py::handle seqlen_offsets, py::handle inv_freq, py::handle cu_seqlens) const {
    if (cos.is_none() == has_table_ || sin.is_none() == has_table_) {
      throw py::type_error(has_table_ ? "cos, sin: this call was prepared with cos/sin tables"
                                      : "cos, sin: this call was prepared without cos/sin tables");
    }
    if (position_ids.is_none() == has_positions_) {
      throw py::type_error(has_positions_ ? "position_ids: this call was prepared with position_ids"
                                          : "position_ids: this call was prepared without position_ids");
    }
    if (inv_freq.is_none() == has_inv_freq_) {
      throw py::type_error(has_inv_freq_ ? "inv_freq: this call was prepared with inv_freq"
                                         : "inv_freq: this call was prepared without inv_freq");
    }
    if (cu_seqlens.is_none() == has_cu_seqlens_) {
      throw py::type_error(has_cu_seqlens_ ? "cu_seqlens: this call was prepared with cu_seqlens"
                                           : "cu_seqlens: this call was prepared without cu_seqlens");
    }
    int64_t offset = values_.seqlen_offset;
    if (has_offsets_) {
      if (seqlen_offsets.is_none() || !IsTensor(seqlen_offsets)) {
        throw py::type_error("seqlen_offsets: this call was prepared with a tensor of offsets");
      }
    } else if (!seqlen_offsets.is_none()) {
      if (IsTensor(seqlen_offsets) || PyBool_Check(seqlen_offsets.ptr()) || !PyIndex_Check(seqlen_offsets.ptr())) {
        throw py::type_error("seqlen_offsets: this call was prepared with an int or no seqlen_offsets");
      }
      offset = py::cast<int64_t>(py::reinterpret_borrow<py::object>(seqlen_offsets).attr("__index__")());
    }
    if (has_table_) {
      Add(extras, cos, "cos");
      Add(extras, sin, "sin");
    }
    if (has_positions_) Add(extras, position_ids, "position_ids");
    if (has_offsets_) Add(extras, seqlen_offsets, "seqlen_offsets");
    if (has_inv_freq_) Add(extras, inv_freq, "inv_freq");
    if (has_cu_seqlens_) Add(extras, cu_seqlens, "cu_seqlens");
    return offset == values_.seqlen_offset ? attr_map_ : AttrMapWithOffset(offset);
  }

  // In place: the result has x's layout and x (and k) can take it as is.
  void CheckInplace(py::handle x, py::handle k) const {
    if (values_.output_layout != values_.x_layout) {
      throw py::value_error("inplace: output_layout " + values_.output_layout + " differs from layout "
                            + values_.x_layout + "; the result can be written into q and k only in their layout");
    }
    if (values_.packed_qk) {
      throw py::value_error("inplace: a packed query-key-value tensor cannot hold the separate results");
    }
    for (py::handle t : {x, k}) {
      if (t.is_none() || !IsTensor(t)) continue;
      if (!py::cast<bool>(py::reinterpret_borrow<py::object>(t).attr("is_contiguous")())) {
        throw py::value_error("inplace: q and k must be contiguous to be written in place");
      }
    }
    if (has_k_ && IsTensor(x) && IsTensor(k) && TensorOf(x) == TensorOf(k)) {
      throw py::value_error("inplace: q and k are the same tensor");
    }
  }

  py::object RecordForGrad(py::handle x, py::handle cos, py::handle sin, py::handle position_ids, py::handle k,
                           py::handle seqlen_offsets, py::handle inv_freq, py::handle cu_seqlens,
                           bool inplace) const {
    TensorTuple extras;
    const oneflow::AttrMap attrs =
        CollectExtras(&extras, cos, sin, position_ids, seqlen_offsets, inv_freq, cu_seqlens);
    TensorTuple inputs;
    AddFirst(&inputs, x, k, "x", "k");
    const int outputs = num_outputs();
    AutogradFn forward = [op = forward_, attrs, extras, outputs, inplace](
                             const std::shared_ptr<oneflow::one::FunctionAutoGradCaptureState>&,
                             const TensorTuple& in) {
      auto result = std::make_shared<TensorTuple>(outputs);
      if (inplace) *result = in;
      DispatchOrThrow(*op, in, extras, attrs, result.get());
      return result;
    };
    const int grads = static_cast<int>(inputs.size());
    AutogradFn backward = [op = backward_, attrs, extras, grads](
                              const std::shared_ptr<oneflow::one::FunctionAutoGradCaptureState>&,
                              const TensorTuple& out_grads) {
      auto result = std::make_shared<TensorTuple>(grads);
      DispatchOrThrow(*op, out_grads, extras, attrs, result.get());
      return result;
    };
    oneflow::Maybe<TensorTuple> result =
        oneflow::one::AutogradFunctionBase::Apply("fused_apply_rotary_emb", forward, backward, inputs);
    if (!result.IsOk()) throw std::runtime_error(result.GetSerializedError());
    return Result(*result.GetDataPtrAndStackedError().first);
  }

  std::shared_ptr<oneflow::one::OpExpr> forward_;
  std::shared_ptr<oneflow::one::OpExpr> backward_;
  bool has_table_;
  bool has_positions_;
  bool has_k_;
  bool has_offsets_;
  bool has_inv_freq_;
  bool has_cu_seqlens_;
  oneflow_rope::RopeOpAttrs values_;
  oneflow::AttrMap attr_map_;  // of every call, except one with another int seqlen_offsets
  std::unique_ptr<oneflow::MutableAttrMap> call_attrs_;  // used under the GIL only
};

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "Compiled part of oneflow_rope: the fused_apply_rotary_emb user ops, their dispatch and "
            "the C++ shape rules.";
#define ROPE_CALL_ARGS(first, second)                                                          \
  py::arg(first), py::arg("cos"), py::arg("sin"), py::arg("position_ids"), py::arg(second) = py::none(), \
      py::arg("seqlen_offsets") = py::none(), py::arg("inv_freq") = py::none(), py::arg("cu_seqlens") = py::none()
  py::class_<RopeOp>(m, "RopeOp",
                     "The op expressions and attributes of one kind of call, prepared once; "
                     "forward / backward run the op on tensors (None where an optional input is "
                     "absent) with autograd off; a q+k call returns two tensors.")
      .def(py::init<py::handle, py::handle, bool, bool, bool, bool, bool, bool, const py::kwargs&>(),
           py::arg("forward"), py::arg("backward"), py::arg("has_table"), py::arg("has_positions"),
           py::arg("has_k") = false, py::arg("has_offsets") = false, py::arg("has_inv_freq") = false,
           py::arg("has_cu_seqlens") = false)
      .def("forward", &RopeOp::Forward, ROPE_CALL_ARGS("x", "k"))
      .def("backward", &RopeOp::Backward, ROPE_CALL_ARGS("dy", "dk_out"))
      .def("forward_with_grad", &RopeOp::ForwardWithGrad, ROPE_CALL_ARGS("x", "k"),
           "forward, recorded for autograd (the gradient flows to x and k only; the backward is the grad op).")
      .def("forward_inplace", &RopeOp::ForwardInplace, ROPE_CALL_ARGS("x", "k"),
           "forward written into x (and k); returns them.")
      .def("forward_inplace_with_grad", &RopeOp::ForwardInplaceWithGrad, ROPE_CALL_ARGS("x", "k"),
           "forward_inplace, recorded for autograd.")
      .def_property_readonly("attrs", &RopeOp::Attrs, "The attributes, by name.")
      .def_property_readonly("has_table", &RopeOp::has_table)
      .def_property_readonly("has_positions", &RopeOp::has_positions)
      .def_property_readonly("has_k", &RopeOp::has_k)
      .def_property_readonly("has_offsets", &RopeOp::has_offsets)
      .def_property_readonly("has_inv_freq", &RopeOp::has_inv_freq)
      .def_property_readonly("has_cu_seqlens", &RopeOp::has_cu_seqlens)
      .def_property_readonly("num_outputs", &RopeOp::num_outputs);
#undef ROPE_CALL_ARGS
  m.attr("ATTRIBUTE_NAMES") = py::tuple(py::cast(AttributeNames()));
  oneflow_rope::binding::DefineLayoutFunctions(m);
  m.def("cpu_isa", &oneflow_rope::RopeCpuIsaName,
        "Instruction set the CPU kernel runs: baseline, avx2, avx512 or avx512bf16 (the best this "
        "CPU has; the environment variable ONEFLOW_ROPE_CPU_ISA, read once, lowers it).");
}
