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

namespace oneflow {
namespace one {

class Tensor;
class OpExpr;

class OpInterpUtil {
 public:
  template<typename T>
  static Maybe<T> Dispatch(const OpExpr& op_expr, const TensorTuple& inputs, const AttrMap& attrs);
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

class RopeOp {
 public:
  // forward / backward: the UserOpExprs of fused_apply_rotary_emb(_grad) with inputs x (dy),
  // [cos, sin], [position_ids]; attrs: every attribute of the table, by name.
  RopeOp(py::handle forward, py::handle backward, bool has_table, bool has_positions,
         const py::kwargs& attrs)
      : forward_(UnpackOpExpr(forward, "forward")),
        backward_(UnpackOpExpr(backward, "backward")),
        has_table_(has_table),
        has_positions_(has_positions) {
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
    oneflow::MutableAttrMap map(AttributeNames());
#define ROPE_SET_ATTR(type, name, default_value) map.SetAttr<type>(#name, values_.name);
    ROPE_OP_ATTRIBUTES(ROPE_SET_ATTR)
#undef ROPE_SET_ATTR
    attr_map_ = oneflow::AttrMap(map);
  }

  py::object Forward(py::handle x, py::handle cos, py::handle sin, py::handle position_ids) const {
    return Run(*forward_, x, "x", cos, sin, position_ids);
  }

  py::object Backward(py::handle dy, py::handle cos, py::handle sin, py::handle position_ids) const {
    return Run(*backward_, dy, "dy", cos, sin, position_ids);
  }

  // The forward recorded for autograd: an autograd function of x alone whose backward is the
  // grad op. cos, sin and position_ids are held by the two closures, not inputs of the
  // function, so they take no gradient whatever their requires_grad.
  py::object ForwardWithGrad(py::handle x, py::handle cos, py::handle sin, py::handle position_ids) const {
    oneflow::one::TensorTuple extras;
    CollectExtras(&extras, cos, sin, position_ids);
    oneflow::one::TensorTuple inputs;
    Add(&inputs, x, "x");
    auto forward = [op = forward_, attrs = attr_map_, extras](
                       const std::shared_ptr<oneflow::one::FunctionAutoGradCaptureState>&,
                       const oneflow::one::TensorTuple& in) {
      return DispatchOrThrow(*op, in.at(0), extras, attrs);
    };
    auto backward = [op = backward_, attrs = attr_map_, extras](
                        const std::shared_ptr<oneflow::one::FunctionAutoGradCaptureState>&,
                        const oneflow::one::TensorTuple& out_grads) {
      return DispatchOrThrow(*op, out_grads.at(0), extras, attrs);
    };
    oneflow::Maybe<oneflow::one::TensorTuple> result = oneflow::one::AutogradFunctionBase::Apply(
        "fused_apply_rotary_emb", forward, backward, inputs);
    if (!result.IsOk()) throw std::runtime_error(result.GetSerializedError());
    std::shared_ptr<oneflow::one::TensorTuple> outputs = result.GetDataPtrAndStackedError().first;
    return py::reinterpret_steal<py::object>(oneflow::one::PyTensor_New(outputs->at(0)));
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

 private:
  static void Add(oneflow::one::TensorTuple* tensors, py::handle obj, const char* argument) {
    if (!PyObject_TypeCheck(obj.ptr(), TensorType())) {
      throw py::type_error(std::string(argument) + ": expected a oneflow.Tensor, got "
                           + Py_TYPE(obj.ptr())->tp_name);
    }
    tensors->emplace_back(reinterpret_cast<PyTensorObject*>(obj.ptr())->data);
  }

  // x (or dy) followed by the optional inputs, dispatched with autograd off; throws on error.
  static std::shared_ptr<oneflow::one::TensorTuple> DispatchOrThrow(
      const oneflow::one::OpExpr& op, const std::shared_ptr<Tensor>& first,
      const oneflow::one::TensorTuple& extras, const oneflow::AttrMap& attrs) {
    oneflow::one::TensorTuple tensors;
    tensors.emplace_back(first);
    for (const auto& t : extras) tensors.emplace_back(t);
    NoGradGuard no_grad;
    oneflow::Maybe<Tensor> result = oneflow::one::OpInterpUtil::Dispatch<Tensor>(op, tensors, attrs);
    if (!result.IsOk()) throw std::runtime_error(result.GetSerializedError());
    auto outputs = std::make_shared<oneflow::one::TensorTuple>();
    outputs->emplace_back(result.GetDataPtrAndStackedError().first);
    return outputs;
  }

  void CollectExtras(oneflow::one::TensorTuple* extras, py::handle cos, py::handle sin,
                     py::handle position_ids) const {
    if (cos.is_none() == has_table_ || sin.is_none() == has_table_) {
      throw py::type_error(has_table_ ? "cos, sin: this call was prepared with cos/sin tables"
                                      : "cos, sin: this call was prepared without cos/sin tables");
    }
    if (position_ids.is_none() == has_positions_) {
      throw py::type_error(has_positions_ ? "position_ids: this call was prepared with position_ids"
                                          : "position_ids: this call was prepared without position_ids");
    }
    if (has_table_) {
      Add(extras, cos, "cos");
      Add(extras, sin, "sin");
    }
    if (has_positions_) Add(extras, position_ids, "position_ids");
  }

  py::object Run(const oneflow::one::OpExpr& op, py::handle first, const char* first_name,
                 py::handle cos, py::handle sin, py::handle position_ids) const {
    oneflow::one::TensorTuple tensors;
    Add(&tensors, first, first_name);
    oneflow::one::TensorTuple extras;
    CollectExtras(&extras, cos, sin, position_ids);
    std::shared_ptr<oneflow::one::TensorTuple> outputs = DispatchOrThrow(op, tensors.at(0), extras, attr_map_);
    return py::reinterpret_steal<py::object>(oneflow::one::PyTensor_New(outputs->at(0)));
  }

  std::shared_ptr<oneflow::one::OpExpr> forward_;
  std::shared_ptr<oneflow::one::OpExpr> backward_;
  bool has_table_;
  bool has_positions_;
  oneflow_rope::RopeOpAttrs values_;
  oneflow::AttrMap attr_map_;
};

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "Compiled part of oneflow_rope: the fused_apply_rotary_emb user ops, their dispatch and "
            "the C++ shape rules.";
  py::class_<RopeOp>(m, "RopeOp",
                     "The op expressions and attributes of one kind of call, prepared once; "
                     "forward / backward run the op on tensors (None where a table or position_ids "
                     "is absent) with autograd off.")
      .def(py::init<py::handle, py::handle, bool, bool, const py::kwargs&>(), py::arg("forward"),
           py::arg("backward"), py::arg("has_table"), py::arg("has_positions"))
      .def("forward", &RopeOp::Forward, py::arg("x"), py::arg("cos"), py::arg("sin"),
           py::arg("position_ids"))
      .def("backward", &RopeOp::Backward, py::arg("dy"), py::arg("cos"), py::arg("sin"),
           py::arg("position_ids"))
      .def("forward_with_grad", &RopeOp::ForwardWithGrad, py::arg("x"), py::arg("cos"), py::arg("sin"),
           py::arg("position_ids"),
           "forward, recorded for autograd (the gradient flows to x only; the backward is the grad op).")
      .def_property_readonly("attrs", &RopeOp::Attrs, "The attributes, by name.")
      .def_property_readonly("has_table", &RopeOp::has_table)
      .def_property_readonly("has_positions", &RopeOp::has_positions);
  m.attr("ATTRIBUTE_NAMES") = py::tuple(py::cast(AttributeNames()));
  oneflow_rope::binding::DefineLayoutFunctions(m);
}
