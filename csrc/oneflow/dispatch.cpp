// Python module oneflow_rope._C: runs a UserOpExpr of this package's ops with attributes.
// OneFlow 0.9.0's Python API has no generic way to pass attributes to a user op, and the wheel
// lacks the headers of its tensor and interpreter classes, so the few exported entry points used
// here are declared by hand (their signatures match the symbols liboneflow exports).
#include <pybind11/pybind11.h>

#include <memory>
#include <stdexcept>
#include <string>

#include "oneflow/core/common/maybe.h"
#include "oneflow/core/framework/attr_map.h"
#include "oneflow/core/framework/mutable_attr_map.h"
#include "oneflow/core/framework/tensor_tuple.h"
#include "rope/rope_cpu_internal.h"

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

namespace functional {
std::shared_ptr<OpExpr> PyUnpackOpExpr(PyObject* obj);
}  // namespace functional

}  // namespace one
}  // namespace oneflow

namespace {

namespace py = pybind11;
using oneflow::one::Tensor;

// Layout of a oneflow.Tensor Python object in 0.9.0.
struct PyTensorObject {
  PyObject_HEAD std::shared_ptr<Tensor> data;
};

py::object Apply(py::handle op_expr, py::list inputs, const std::string& x_layout,
                 const std::string& output_layout, const std::string& mode, int64_t tensor_index,
                 int64_t k_size, int64_t rotary_size, double base) {
  std::shared_ptr<oneflow::one::OpExpr> op = oneflow::one::functional::PyUnpackOpExpr(op_expr.ptr());
  if (!op) throw std::invalid_argument("oneflow_rope._C.apply: op_expr is not a OneFlow op");
  oneflow::one::TensorTuple tensors;
  for (py::handle item : inputs) {
    // The caller (oneflow_rope.ops) has checked that every input is a oneflow.Tensor.
    tensors.emplace_back(reinterpret_cast<PyTensorObject*>(item.ptr())->data);
  }
  static thread_local oneflow::MutableAttrMap attrs(
      {"x_layout", "output_layout", "mode", "tensor_index", "k_size", "rotary_size", "base"});
  attrs.SetAllAttrs(x_layout, output_layout, mode, tensor_index, k_size, rotary_size, base);
  oneflow::Maybe<Tensor> result =
      oneflow::one::OpInterpUtil::Dispatch<Tensor>(*op, tensors, oneflow::AttrMap(attrs));
  if (!result.IsOk()) throw std::runtime_error(result.GetSerializedError());
  std::shared_ptr<Tensor> out = result.GetDataPtrAndStackedError().first;
  return py::reinterpret_steal<py::object>(oneflow::one::PyTensor_New(out));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "Compiled part of oneflow_rope: the fused_apply_rotary_emb user ops and their dispatch.";
  m.def("apply", &Apply, py::arg("op_expr"), py::arg("inputs"), py::arg("x_layout"),
        py::arg("output_layout"), py::arg("mode"), py::arg("tensor_index"), py::arg("k_size"),
        py::arg("rotary_size"), py::arg("base"),
        "Runs a fused_apply_rotary_emb(_grad) op expression on `inputs` with these attributes.");
  m.def("cpu_isa", &oneflow_rope::RopeCpuIsaName,
        "Instruction set the CPU kernel runs: baseline, avx2, avx512 or avx512bf16 (the best this "
        "CPU has; the environment variable ONEFLOW_ROPE_CPU_ISA, read once, lowers it).");
}
