// Thin OneFlow kernels: turn the op's tensors and attributes into a RopeParams and call the
// framework-free CPU or CUDA kernel.
#include <algorithm>
#include <cstring>
#include <thread>

#include "oneflow/core/framework/framework.h"
#include "oneflow/core/ep/include/device.h"
#include "rope/layout.h"
#include "rope/rope_params.h"
#ifdef ONEFLOW_ROPE_WITH_CUDA
#include "rope/rope_cuda.h"
#endif

#ifdef ONEFLOW_ROPE_WITH_CUDA
// The one CudaStream member this file needs, declared instead of including OneFlow's
// cuda_stream.h (which pulls in its CUDA 11 library headers). liboneflow exports it.
struct CUstream_st;
namespace oneflow {
namespace ep {
class CudaStream : public Stream {
 public:
  CUstream_st* cuda_stream() const;
};
}  // namespace ep
}  // namespace oneflow
#endif

namespace oneflow {

namespace {

namespace rope = ::oneflow_rope;

rope::DType ToRopeDType(DataType dtype) {
  switch (dtype) {
    case DataType::kDouble: return rope::DType::kFloat64;
    case DataType::kFloat16: return rope::DType::kFloat16;
    case DataType::kBFloat16: return rope::DType::kBFloat16;
    default: return rope::DType::kFloat32;
  }
}

std::vector<int64_t> ToVector(const ShapeView& shape) {
  std::vector<int64_t> v(shape.NumAxes());
  for (int i = 0; i < shape.NumAxes(); ++i) v[i] = shape.At(i);
  return v;
}

rope::IndexType ToIndexType(DataType dtype) {
  return dtype == DataType::kInt32 ? rope::IndexType::kInt32 : rope::IndexType::kInt64;
}

// Heads of the second tensor of a q+k call, from its shape in `layout` (K known).
int64_t HeadsOf(const rope::LayoutDesc& layout, const ShapeView& shape, int64_t K) {
  return layout.fused ? shape.At(2) / (K * layout.slots) : shape.At(rope::HeadAxis(layout));
}

// Builds the kernel parameters. Inputs arrive contiguous (the op does not declare support for
// non-contiguous tensors), so the strides follow from the layouts. Forward: x [k] -> out [k_out];
// backward: dy [dk_out] -> dx [dk]. A q+k call fills tensors[1]: from k, or (packed_qk) from the
// key slot of the packed x. Backward of a packed input: the slots that take no gradient get zeros,
// written by the kernel with tensors[0].
rope::RopeParams MakeParams(user_op::KernelComputeContext* ctx, bool backward) {
  const char* in_name = backward ? "dy" : "x";
  const char* in_k_name = backward ? "dk_out" : "k";
  const char* res_name = backward ? "dx" : "out";
  const char* res_k_name = backward ? "dk" : "k_out";
  const user_op::Tensor* in = ctx->Tensor4ArgNameAndIndex(in_name, 0);
  user_op::Tensor* res = ctx->Tensor4ArgNameAndIndex(res_name, 0);
  const user_op::Tensor* in_k = ctx->has_input(in_k_name, 0) ? ctx->Tensor4ArgNameAndIndex(in_k_name, 0) : nullptr;
  user_op::Tensor* res_k = ctx->has_output(res_k_name, 0) ? ctx->Tensor4ArgNameAndIndex(res_k_name, 0) : nullptr;
  const bool packed_qk = ctx->Attr<bool>("packed_qk");
  rope::RopeCall call;
  call.x_layout = ctx->Attr<std::string>("x_layout");
  call.output_layout = ctx->Attr<std::string>("output_layout");
  call.mode = ctx->Attr<std::string>("mode");
  call.tensor_index = ctx->Attr<int64_t>("tensor_index");
  call.k_size = ctx->Attr<int64_t>("k_size");
  call.rotary_size = ctx->Attr<int64_t>("rotary_size");
  const user_op::Tensor* pos =
      ctx->has_input("position_ids", 0) ? ctx->Tensor4ArgNameAndIndex("position_ids", 0) : nullptr;
  call.rotary_dim = pos != nullptr ? static_cast<int32_t>(pos->shape_view().At(1)) : 1;

  const rope::LayoutDesc* x_layout = rope::FindLayout(call.x_layout);
  const rope::LayoutDesc* out_layout = rope::FindLayout(call.output_layout);
  rope::RopeCall in_call = call;
  if (backward) {
    in_call.x_layout = call.output_layout;
    in_call.tensor_index = 0;
  }
  rope::RopeSizes sizes;
  const std::string err = rope::InferSizes(ToVector(in->shape_view()), in_call, &sizes);
  CHECK(err.empty()) << err;  // the op's inference has already checked this

  bool mode_ok = false;
  rope::RopeParams p;
  p.dtype = ToRopeDType(in->data_type());
  p.mode = rope::ParseMode(call.mode, &mode_ok);
  p.B = sizes.B;
  p.M = sizes.M;
  p.K = sizes.K;
  p.rotary_size = call.rotary_size > 0 ? call.rotary_size : sizes.K;
  p.rotary_dim = call.rotary_dim;
  p.base = ctx->Attr<double>("base");
  p.attention_scaling = ctx->Attr<double>("attention_scaling");
  p.inverse = backward;
  p.num_threads = 1;

  // The slots of x that are rotated: the selected one, and the key for packed_qk.
  const int64_t query_slot = rope::SelectedSlot(*x_layout, call.tensor_index);
  const int64_t key_slot = packed_qk ? rope::SlotNamed(*x_layout, "key") : -1;
  CHECK(!packed_qk || key_slot >= 0) << "fused_apply_rotary_emb: packed_qk needs a layout with a key slot";
  const size_t elem = GetSizeOfDataType(in->data_type());
  // Fills tensors[t]: `from` read in its layout at `x_slot` (forward) and written to `to`.
  auto fill = [&](int t, const user_op::Tensor* from, user_op::Tensor* to, int64_t heads, int64_t x_slot) {
    rope::RopeSizes s = sizes;
    s.H = heads;
    const rope::LayoutStrides xs = rope::ContiguousStrides(*x_layout, s, x_slot);
    const rope::LayoutStrides os = rope::ContiguousStrides(*out_layout, s, 0);
    const rope::LayoutStrides& in_s = backward ? os : xs;
    const rope::LayoutStrides& res_s = backward ? xs : os;
    rope::RopeTensor& tensor = p.tensors[t];
    tensor.H = heads;
    tensor.x = static_cast<const char*>(from->raw_dptr()) + in_s.offset * elem;
    tensor.out = static_cast<char*>(to->mut_raw_dptr()) + res_s.offset * elem;
    tensor.x_stride_b = in_s.b;
    tensor.x_stride_m = in_s.m;
    tensor.x_stride_h = in_s.h;
    tensor.out_stride_b = res_s.b;
    tensor.out_stride_m = res_s.m;
    tensor.out_stride_h = res_s.h;
  };
  fill(0, in, res, sizes.H, query_slot);
  if (packed_qk) {
    // forward: both read from x, written to out and k_out; backward: from dy and dk_out into dx
    if (backward) {
      fill(1, in_k, res, sizes.H, key_slot);
    } else {
      fill(1, in, res_k, sizes.H, key_slot);
    }
    p.num_tensors = 2;
  } else if (in_k != nullptr) {
    fill(1, in_k, res_k, HeadsOf(backward ? *out_layout : *x_layout, in_k->shape_view(), sizes.K), 0);
    p.num_tensors = 2;
  }
  if (backward && x_layout->slots > 1) {
    // the gradient of a packed input has zeros in the slots that were not rotated
    rope::RopeTensor& t = p.tensors[0];
    for (int64_t slot = 0; slot < x_layout->slots; ++slot) {
      if (slot != query_slot && slot != key_slot) {
        t.zero_slot_offset[t.num_zero_slots++] = (slot - query_slot) * sizes.K;
      }
    }
  }

  if (ctx->has_input("cos", 0)) {
    const user_op::Tensor* cos = ctx->Tensor4ArgNameAndIndex("cos", 0);
    p.cos = cos->raw_dptr();
    p.sin = ctx->Tensor4ArgNameAndIndex("sin", 0)->raw_dptr();
    p.table_rows = cos->shape_view().At(0);
    p.table_row_stride = cos->shape_view().At(1);
    p.table_dtype = ToRopeDType(cos->data_type());
  }
  if (pos != nullptr) {
    p.position_ids = pos->raw_dptr();
    p.pos_type = ToIndexType(pos->data_type());
    p.pos_stride_b = pos->shape_view().At(1) * pos->shape_view().At(2);
    p.pos_stride_r = pos->shape_view().At(2);
    p.pos_stride_m = 1;
  }
  p.seqlen_offset = ctx->Attr<int64_t>("seqlen_offset");
  if (ctx->has_input("seqlen_offsets", 0)) {
    const user_op::Tensor* offsets = ctx->Tensor4ArgNameAndIndex("seqlen_offsets", 0);
    p.seqlen_offsets = offsets->raw_dptr();
    p.offsets_type = ToIndexType(offsets->data_type());
    p.offsets_stride = 1;
  }
  if (ctx->has_input("inv_freq", 0)) {
    const user_op::Tensor* inv_freq = ctx->Tensor4ArgNameAndIndex("inv_freq", 0);
    p.inv_freq = inv_freq->raw_dptr();
    p.inv_freq_dtype = ToRopeDType(inv_freq->data_type());
  }
  return p;
}

// OneFlow's CPU intra-op thread count, as its own CPU kernels read it (ep::CpuStream::ParallelFor
// uses CpuDevice::GetNumThreads()). In the 0.9.0 wheel:
//  - the CPU device's count is set at start-up from the environment variable OMP_NUM_THREADS, by
//    default hardware_concurrency / (processes per node) - 2 (EnvGlobalObjectsScope::Init calls
//    ep::CpuDeviceManager::SetDeviceNumThreads(ParseIntegerFromEnv("OMP_NUM_THREADS", ...)));
//    CpuDeviceManager::GetDevice copies it into the CpuDevice;
//  - oneflow.set_num_threads(n) (_oneflow_internal's oneflow::multiprocessing::set_num_threads)
//    writes n into the CpuDevice.
// The wheel ships no ep/cpu header and exports no getter (only SetDeviceNumThreads, checked with
// nm -D), and CpuDevice::GetNumThreads() is inline. Its layout, read off the wheel's machine code
// (CpuDeviceManager::GetDevice allocates 0x18 bytes: vtable, DeviceManager* device_manager_,
// size_t num_threads_ at offset 16, the offset set_num_threads writes): the count is read from
// there, for a CPU device only. The default formula gives 0 or less on machines of 1 or 2 cores
// (this one: 2 - 2 = 0): that, like anything below 1, means one thread; at most
// hardware_concurrency threads.
int32_t IntraOpThreads(user_op::KernelComputeContext* ctx) {
  ep::Stream* stream = ctx->stream();
  if (stream == nullptr || stream->device_type() != DeviceType::kCPU) return 1;
  const ep::Device* device = stream->device();
  if (device == nullptr || device->device_type() != DeviceType::kCPU) return 1;
  int64_t count = 0;
  std::memcpy(&count, reinterpret_cast<const char*>(device) + 2 * sizeof(void*), sizeof(count));
  const int64_t hardware = std::max<int64_t>(1, std::thread::hardware_concurrency());
  return static_cast<int32_t>(std::min(std::max<int64_t>(count, 1), hardware));
}

template<bool kBackward>
class RopeCpuKernel final : public user_op::OpKernel {
 public:
  RopeCpuKernel() = default;
  ~RopeCpuKernel() override = default;

 private:
  void Compute(user_op::KernelComputeContext* ctx) const override {
    rope::RopeParams p = MakeParams(ctx, kBackward);
    p.num_threads = IntraOpThreads(ctx);
    const char* invalid = rope::ValidateRopeParams(p);
    CHECK(invalid == nullptr) << "fused_apply_rotary_emb: " << invalid;
    const int64_t bad_rows = rope::RopeForwardCpu(p);
    LOG_IF(WARNING, bad_rows > 0)
        << "fused_apply_rotary_emb: " << bad_rows
        << " positions fell outside the cos/sin table; their outputs are NaN";
  }
  bool AlwaysComputeWhenAllOutputsEmpty() const override { return false; }
};

#ifdef ONEFLOW_ROPE_WITH_CUDA
template<bool kBackward>
class RopeCudaKernel final : public user_op::OpKernel {
 public:
  RopeCudaKernel() = default;
  ~RopeCudaKernel() override = default;

 private:
  void Compute(user_op::KernelComputeContext* ctx) const override {
    const rope::RopeParams p = MakeParams(ctx, kBackward);
    void* stream = ctx->stream()->As<ep::CudaStream>()->cuda_stream();
    const char* invalid = rope::ValidateRopeParams(p);
    CHECK(invalid == nullptr) << "fused_apply_rotary_emb: " << invalid;
    const int status = rope::RopeForwardCuda(p, stream);
    CHECK_EQ(status, 0) << "fused_apply_rotary_emb: " << rope::RopeCudaErrorString(status);
  }
  bool AlwaysComputeWhenAllOutputsEmpty() const override { return false; }
};
#endif

#define REGISTER_ROPE_KERNELS(device, kernel, dtype)                                          \
  REGISTER_USER_KERNEL("fused_apply_rotary_emb")                                              \
      .SetCreateFn<kernel<false>>()                                                           \
      .SetIsMatchedHob((user_op::HobDeviceType() == device)                                   \
                       && (user_op::HobDataType("out", 0) == dtype));                         \
  REGISTER_USER_KERNEL("fused_apply_rotary_emb_grad")                                         \
      .SetCreateFn<kernel<true>>()                                                            \
      .SetIsMatchedHob((user_op::HobDeviceType() == device)                                   \
                       && (user_op::HobDataType("dx", 0) == dtype));

REGISTER_ROPE_KERNELS(DeviceType::kCPU, RopeCpuKernel, DataType::kFloat)
REGISTER_ROPE_KERNELS(DeviceType::kCPU, RopeCpuKernel, DataType::kDouble)
REGISTER_ROPE_KERNELS(DeviceType::kCPU, RopeCpuKernel, DataType::kFloat16)
REGISTER_ROPE_KERNELS(DeviceType::kCPU, RopeCpuKernel, DataType::kBFloat16)
#ifdef ONEFLOW_ROPE_WITH_CUDA
REGISTER_ROPE_KERNELS(DeviceType::kCUDA, RopeCudaKernel, DataType::kFloat)
REGISTER_ROPE_KERNELS(DeviceType::kCUDA, RopeCudaKernel, DataType::kDouble)
REGISTER_ROPE_KERNELS(DeviceType::kCUDA, RopeCudaKernel, DataType::kFloat16)
REGISTER_ROPE_KERNELS(DeviceType::kCUDA, RopeCudaKernel, DataType::kBFloat16)
#endif

}  // namespace

}  // namespace oneflow
