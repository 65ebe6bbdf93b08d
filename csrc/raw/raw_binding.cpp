// Python module _rope_raw: the same kernels and layout code as the OneFlow op, driven by raw
// pointers (from numpy arrays or PyTorch tensors) and no OneFlow at all. Used by the GPU test
// bench and benchmarks (PyTorch on the device machine) and by the sanitizer build on the CPU.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

#include "binding/layout_binding.h"
#include "rope/layout.h"
#include "rope/rope_cpu_internal.h"
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

IndexType ParseIndexType(const py::dict& d, const char* key) {
  const std::string name = d[key].cast<std::string>();
  if (name == "int32") return IndexType::kInt32;
  if (name == "int64") return IndexType::kInt64;
  throw py::value_error(std::string(key) + ": got '" + name + "', expected int32 or int64");
}

template<typename V>
V Get(const py::dict& d, const char* key, V fallback) {
  return d.contains(key) ? d[key].cast<V>() : fallback;
}

RopeTensor MakeTensor(const py::dict& d) {
  RopeTensor t;
  t.x = Ptr(d["x"].cast<uintptr_t>());
  t.out = const_cast<void*>(Ptr(d["out"].cast<uintptr_t>()));
  t.H = d["H"].cast<int64_t>();
  std::tie(t.x_stride_b, t.x_stride_m, t.x_stride_h, t.x_stride_k) =
      d["x_strides"].cast<std::tuple<int64_t, int64_t, int64_t, int64_t>>();
  std::tie(t.out_stride_b, t.out_stride_m, t.out_stride_h, t.out_stride_k) =
      d["out_strides"].cast<std::tuple<int64_t, int64_t, int64_t, int64_t>>();
  const auto zeros = Get<std::vector<int64_t>>(d, "zero_slots", {});
  if (zeros.size() > 2) throw py::value_error("zero_slots: at most 2 offsets");
  t.num_zero_slots = static_cast<int32_t>(zeros.size());
  for (size_t i = 0; i < zeros.size(); ++i) t.zero_slot_offset[i] = zeros[i];
  return t;
}

// The params dict: "tensors" (a list of 1 or 2 dicts with x, out, H, x_strides, out_strides,
// optional zero_slots) or those keys at the top level for one tensor; dtype, mode, B, M, K,
// rotary_size, rotary_dim, base, inverse; optional cos/sin (+ table_rows, table_strides,
// table_dtype), inv_freq (+ inv_freq_dtype), attention_scaling, position_ids (+ pos_dtype,
// pos_strides), seqlen_offset, seqlen_offsets (+ offsets_dtype), cu_seqlens (+ cu_seqlens_dtype,
// num_seqs, cu_seqlens_total). Pointers are integers, 0 for absent.
RopeParams MakeParams(const py::dict& d) {
  RopeParams p;
  p.dtype = ParseDType(d["dtype"].cast<std::string>());
  bool ok = false;
  p.mode = ParseMode(d["mode"].cast<std::string>(), &ok);
  if (!ok) throw py::value_error("mode: expected 'plane' or 'interval'");
  if (d.contains("tensors")) {
    const py::list tensors = d["tensors"].cast<py::list>();
    if (tensors.size() < 1 || tensors.size() > kMaxRopeTensors) {
      throw py::value_error("tensors: expected 1 or 2 tensors");
    }
    p.num_tensors = static_cast<int32_t>(tensors.size());
    for (size_t i = 0; i < tensors.size(); ++i) p.tensors[i] = MakeTensor(tensors[i].cast<py::dict>());
  } else {
    p.tensors[0] = MakeTensor(d);
  }
  p.B = d["B"].cast<int64_t>();
  p.M = d["M"].cast<int64_t>();
  p.K = d["K"].cast<int64_t>();
  p.rotary_size = d["rotary_size"].cast<int64_t>();
  p.rotary_dim = d["rotary_dim"].cast<int32_t>();
  p.base = d["base"].cast<double>();
  p.inverse = d["inverse"].cast<bool>();
  p.attention_scaling = Get<double>(d, "attention_scaling", 1.0);
  p.num_threads = Get<int32_t>(d, "num_threads", 1);
  const uintptr_t cos = Get<uintptr_t>(d, "cos", 0);
  if (cos != 0) {
    p.cos = Ptr(cos);
    p.sin = Ptr(d["sin"].cast<uintptr_t>());
    p.table_rows = d["table_rows"].cast<int64_t>();
    std::tie(p.table_row_stride, p.table_col_stride) =
        d["table_strides"].cast<std::tuple<int64_t, int64_t>>();
    p.table_dtype = d.contains("table_dtype") ? ParseDType(d["table_dtype"].cast<std::string>()) : p.dtype;
  }
  const uintptr_t inv_freq = Get<uintptr_t>(d, "inv_freq", 0);
  if (inv_freq != 0) {
    p.inv_freq = Ptr(inv_freq);
    p.inv_freq_dtype = ParseDType(d["inv_freq_dtype"].cast<std::string>());
  }
  const uintptr_t pos = Get<uintptr_t>(d, "position_ids", 0);
  if (pos != 0) {
    p.position_ids = Ptr(pos);
    p.pos_type = ParseIndexType(d, "pos_dtype");
    std::tie(p.pos_stride_b, p.pos_stride_r, p.pos_stride_m) =
        d["pos_strides"].cast<std::tuple<int64_t, int64_t, int64_t>>();
  }
  p.seqlen_offset = Get<int64_t>(d, "seqlen_offset", 0);
  const uintptr_t offsets = Get<uintptr_t>(d, "seqlen_offsets", 0);
  if (offsets != 0) {
    p.seqlen_offsets = Ptr(offsets);
    p.offsets_type = ParseIndexType(d, "offsets_dtype");
    p.offsets_stride = Get<int64_t>(d, "offsets_stride", 1);
  }
  const uintptr_t cu = Get<uintptr_t>(d, "cu_seqlens", 0);
  if (cu != 0) {
    p.cu_seqlens = Ptr(cu);
    p.cu_seqlens_type = ParseIndexType(d, "cu_seqlens_dtype");
    p.num_seqs = d["num_seqs"].cast<int64_t>();
    p.cu_seqlens_total = d["cu_seqlens_total"].cast<int64_t>();
  }
  const char* invalid = ValidateRopeParams(p);
  if (invalid != nullptr) throw py::value_error(std::string("invalid parameters: ") + invalid);
  return p;
}

// A call's parameters, converted once: launching it again costs one Python call.
struct Plan {
  RopeParams params;
  explicit Plan(const py::dict& d) : params(MakeParams(d)) {}
  int64_t RunCpu() const {
    py::gil_scoped_release release;
    return RopeForwardCpu(params);
  }
#ifdef ONEFLOW_ROPE_WITH_CUDA
  void RunCuda(uintptr_t stream) const {
    const int status = RopeForwardCuda(params, reinterpret_cast<void*>(stream));
    if (status != 0) throw std::runtime_error(std::string("CUDA: ") + RopeCudaErrorString(status));
  }
#endif
};

int64_t ForwardCpu(const py::dict& d) { return Plan(d).RunCpu(); }

int64_t CpuThreadsFor(const py::dict& d) { return RopeCpuThreadsFor(MakeParams(d)); }

#ifdef ONEFLOW_ROPE_WITH_CUDA
void ForwardCuda(const py::dict& d, uintptr_t stream) { Plan(d).RunCuda(stream); }

std::string KernelName(const py::dict& d) { return RopeCudaKernelName(MakeParams(d)); }
#endif

}  // namespace

PYBIND11_MODULE(_rope_raw, m) {
  m.doc() = "oneflow_rope kernels driven by raw pointers (no OneFlow): for tests and benchmarks.";
  oneflow_rope::binding::DefineLayoutFunctions(m);  // infer_shapes, layout, layouts
  m.def("forward_cpu", &ForwardCpu, "Runs the CPU kernel; returns the number of out-of-table rows.");
  m.def("cpu_isa", &RopeCpuIsaName, "Instruction set the CPU kernel runs (ONEFLOW_ROPE_CPU_ISA lowers it).");
  m.def("cpu_threads_for", &CpuThreadsFor, py::arg("params"),
        "Threads the CPU kernel would use for a params dict (its num_threads, at most).");
  m.def("set_cpu_min_bytes_per_thread", &RopeCpuSetMinBytesPerThread, py::arg("bytes"),
        "Least bytes a CPU thread must move before another is started (<= 0: default 1 MiB).");
  py::class_<Plan> plan(m, "Plan", "A call's parameters, converted once (for timing loops).");
  plan.def(py::init<const py::dict&>(), py::arg("params"));
  plan.def("run_cpu", &Plan::RunCpu);
  plan.def_property_readonly("num_threads", [](const Plan& plan) { return RopeCpuThreadsFor(plan.params); },
                             "Threads the CPU kernel uses for this plan.");
#ifdef ONEFLOW_ROPE_WITH_CUDA
  plan.def("run_cuda", &Plan::RunCuda, py::arg("stream"));
  m.def("forward_cuda", &ForwardCuda, py::arg("params"), py::arg("stream"));
  m.def("kernel_name", &KernelName);
  m.def("set_launch_override", &RopeCudaSetLaunchOverride, py::arg("items_per_thread"),
        py::arg("block_threads"), py::arg("persistent") = -1, py::arg("small_kernel") = -1,
        "Forces the CUDA launch shape (0, 0, -1, -1: the built-in rule; small_kernel 0: never the compact kernel).");
  m.def("set_pdl", &RopeCudaSetPdl, py::arg("enabled"),
        "Programmatic dependent launch of the compact kernel (small calls, large computed-angle calls) on (default, where supported) or off.");
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
