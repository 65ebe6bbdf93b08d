// Python module _rope_raw: the same kernels and layout code as the OneFlow op, driven by raw
// pointers (from numpy arrays or PyTorch tensors) and no OneFlow at all. Used by the GPU test
// bench and benchmarks (PyTorch on the device machine) and by the sanitizer build on the CPU.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "rope/layout.h"
#include "rope/rope_params.h"
#ifdef ONEFLOW_ROPE_WITH_CUDA
#include "rope/rope_cuda.h"
#endif

namespace py = pybind11;
using namespace oneflow_rope;

namespace {

DType ParseDType(const std::string& name) {
  if (name == "float32") return DType::kFloat32;
  if (name == "float64") return DType::kFloat64;
  if (name == "float16") return DType::kFloat16;
  if (name == "bfloat16") return DType::kBFloat16;
  throw py::value_error("dtype: got '" + name + "', expected float32, float64, float16 or bfloat16");
}

const void* Ptr(uintptr_t address) { return reinterpret_cast<const void*>(address); }

// Checks shapes like the op's inference does; returns (B, M, H, K, out_shape).
std::tuple<int64_t, int64_t, int64_t, int64_t, std::vector<int64_t>> InferSizesPy(
    const std::vector<int64_t>& x_shape, const std::string& x_layout,
    const std::string& output_layout, const std::string& mode, int64_t tensor_index,
    int64_t k_size, int64_t rotary_size, int32_t rotary_dim, const std::vector<int64_t>& table_shape,
    const std::vector<int64_t>& pos_shape) {
  RopeCall call;
  call.x_layout = x_layout;
  call.output_layout = output_layout;
  call.mode = mode;
  call.tensor_index = tensor_index;
  call.k_size = k_size;
  call.rotary_size = rotary_size;
  call.rotary_dim = rotary_dim;
  RopeSizes s;
  std::string err = InferSizes(x_shape, call, &s);
  if (err.empty()) err = CheckOptionalShapes(s, call, table_shape, pos_shape);
  if (!err.empty()) throw py::value_error(err);
  return {s.B, s.M, s.H, s.K, LayoutShape(*FindLayout(output_layout), s)};
}

int64_t SelectedSlotPy(const std::string& layout, int64_t tensor_index) {
  const LayoutDesc* l = FindLayout(layout);
  if (l == nullptr) throw py::value_error("layout: unknown '" + layout + "'");
  return SelectedSlot(*l, tensor_index);
}

RopeParams MakeParams(const py::dict& d) {
  RopeParams p;
  p.dtype = ParseDType(d["dtype"].cast<std::string>());
  bool ok = false;
  p.mode = ParseMode(d["mode"].cast<std::string>(), &ok);
  if (!ok) throw py::value_error("mode: expected 'plane' or 'interval'");
  p.x = Ptr(d["x"].cast<uintptr_t>());
  p.out = const_cast<void*>(Ptr(d["out"].cast<uintptr_t>()));
  p.B = d["B"].cast<int64_t>();
  p.M = d["M"].cast<int64_t>();
  p.H = d["H"].cast<int64_t>();
  p.K = d["K"].cast<int64_t>();
  std::tie(p.x_stride_b, p.x_stride_m, p.x_stride_h, p.x_stride_k) =
      d["x_strides"].cast<std::tuple<int64_t, int64_t, int64_t, int64_t>>();
  std::tie(p.out_stride_b, p.out_stride_m, p.out_stride_h, p.out_stride_k) =
      d["out_strides"].cast<std::tuple<int64_t, int64_t, int64_t, int64_t>>();
  p.rotary_size = d["rotary_size"].cast<int64_t>();
  p.rotary_dim = d["rotary_dim"].cast<int32_t>();
  p.base = d["base"].cast<double>();
  p.inverse = d["inverse"].cast<bool>();
  const uintptr_t cos = d["cos"].cast<uintptr_t>();
  if (cos != 0) {
    p.cos = Ptr(cos);
    p.sin = Ptr(d["sin"].cast<uintptr_t>());
    p.table_rows = d["table_rows"].cast<int64_t>();
    std::tie(p.table_row_stride, p.table_col_stride) =
        d["table_strides"].cast<std::tuple<int64_t, int64_t>>();
  }
  const uintptr_t pos = d["position_ids"].cast<uintptr_t>();
  if (pos != 0) {
    p.position_ids = Ptr(pos);
    const std::string pos_type = d["pos_dtype"].cast<std::string>();
    if (pos_type != "int32" && pos_type != "int64") {
      throw py::value_error("pos_dtype: got '" + pos_type + "', expected int32 or int64");
    }
    p.pos_type = pos_type == "int32" ? PosType::kInt32 : PosType::kInt64;
    std::tie(p.pos_stride_b, p.pos_stride_r, p.pos_stride_m) =
        d["pos_strides"].cast<std::tuple<int64_t, int64_t, int64_t>>();
  }
  const char* invalid = ValidateRopeParams(p);
  if (invalid != nullptr) throw py::value_error(std::string("invalid parameters: ") + invalid);
  return p;
}

int64_t ForwardCpu(const py::dict& d) {
  const RopeParams p = MakeParams(d);
  py::gil_scoped_release release;
  return RopeForwardCpu(p);
}

#ifdef ONEFLOW_ROPE_WITH_CUDA
void ForwardCuda(const py::dict& d, uintptr_t stream) {
  const RopeParams p = MakeParams(d);
  const int status = RopeForwardCuda(p, reinterpret_cast<void*>(stream));
  if (status != 0) throw std::runtime_error(std::string("CUDA: ") + RopeCudaErrorString(status));
}

std::string KernelName(const py::dict& d) { return RopeCudaKernelName(MakeParams(d)); }
#endif

}  // namespace

PYBIND11_MODULE(_rope_raw, m) {
  m.doc() = "oneflow_rope kernels driven by raw pointers (no OneFlow): for tests and benchmarks.";
  m.def("infer_sizes", &InferSizesPy, py::arg("x_shape"), py::arg("x_layout"),
        py::arg("output_layout"), py::arg("mode"), py::arg("tensor_index"), py::arg("k_size"),
        py::arg("rotary_size"), py::arg("rotary_dim"), py::arg("table_shape"),
        py::arg("pos_shape"));
  m.def("selected_slot", &SelectedSlotPy);
  m.def("forward_cpu", &ForwardCpu, "Runs the CPU kernel; returns the number of out-of-table rows.");
#ifdef ONEFLOW_ROPE_WITH_CUDA
  m.def("forward_cuda", &ForwardCuda, py::arg("params"), py::arg("stream"));
  m.def("kernel_name", &KernelName);
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
