// Thin OneFlow kernels: turn the op's tensors and attributes into a RopeParams and call the
// framework-free CPU or CUDA kernel.
//
// A global tensor split along its sequence axis (M, or the tokens T of a varlen layout) reaches
// each rank's kernel as a slice: the kernels of a placement of several ranks find where their
// slice starts (the same balanced split OneFlow made) and add that to every token's index, so
// each token keeps its global position.
#include <algorithm>
#include <cstring>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "oneflow/core/common/balanced_splitter.h"
#include "oneflow/core/ep/include/device.h"
#include "oneflow/core/framework/framework.h"
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
  return layout.fused ? shape.At(rope::KAxis(layout)) / (K * layout.slots) : shape.At(rope::HeadAxis(layout));
}

// This rank's slice of the op's first input (x, or dy for the gradient) along its sequence axis:
// the global index of its first row there, and the logical length (T of cu_seqlens). A local
// tensor is its own whole: begin 0, total -1 (the physical length).
struct SeqSlice {
  int64_t begin = 0;
  int64_t total = -1;
};

// The input whose sequence axis the slice is taken along, and that axis.
const char* SlicedInput(bool backward) { return backward ? "dy" : "x"; }
template<typename Ctx>
int SlicedAxis(const Ctx* ctx, bool backward) {
  const rope::LayoutDesc* layout =
      rope::FindLayout(ctx->template Attr<std::string>(backward ? "output_layout" : "x_layout"));
  CHECK(layout != nullptr) << "fused_apply_rotary_emb: unknown layout";
  return rope::SeqAxis(*layout);
}

// The slice of a global tensor, as OneFlow cuts it (GetTensorSliceView4ParallelId): the ranks
// form the placement's hierarchy (the last dimension fastest), and each dimension whose SBP
// splits the sequence axis cuts the current range into balanced parts (BalancedSplitter: the
// first total % n parts one row longer).
SeqSlice SliceOf(user_op::KernelCacheContext* ctx, bool backward) {
  const char* input = SlicedInput(backward);
  const int axis = SlicedAxis(ctx, backward);
  const Shape& logical = ctx->LogicalTensorDesc4ArgNameAndIndex(input, 0)->shape();
  const NdSbp& nd_sbp = ctx->NdSbp4ArgNameAndIndex(input, 0);
  const Shape& hierarchy = *ctx->parallel_desc().hierarchy();
  CHECK_EQ(nd_sbp.sbp_parallel_size(), hierarchy.NumAxes()) << "fused_apply_rotary_emb: " << input
                                                             << ": SBP and placement hierarchy differ in rank";
  std::vector<int64_t> coordinate(hierarchy.NumAxes());
  int64_t id = ctx->parallel_ctx().parallel_id();
  for (int i = hierarchy.NumAxes() - 1; i >= 0; --i) {
    coordinate[i] = id % hierarchy.At(i);
    id /= hierarchy.At(i);
  }
  int64_t begin = 0, end = logical.At(axis);
  for (int i = 0; i < hierarchy.NumAxes(); ++i) {
    const SbpParallel& sbp = nd_sbp.sbp_parallel(i);
    if (sbp.has_split_parallel() && sbp.split_parallel().axis() == axis) {
      const Range part = BalancedSplitter(end - begin, hierarchy.At(i)).At(coordinate[i]);
      end = begin + part.end();
      begin += part.begin();
    }
  }
  const int64_t physical = ctx->TensorDesc4ArgNameAndIndex(input, 0)->shape().At(axis);
  CHECK_EQ(end - begin, physical) << "fused_apply_rotary_emb: " << input << ": this rank's slice along axis "
                                  << axis << " has " << physical << " rows, the balanced split gives "
                                  << end - begin;
  SeqSlice slice;
  slice.begin = begin;
  slice.total = logical.At(axis);
  return slice;
}

class SeqSliceCache final : public user_op::OpKernelCache {
 public:
  SeqSlice slice;
};

// Which optional inputs and outputs the op has. They are fixed for a kernel object (OneFlow makes
// one per op instance, eager or in a graph, and an op's inputs do not change), so each kernel
// reads them once (has_input is a lookup by name: 7 of them took 0.17 us of a call's 1.3 us of
// parameter building, measured on the CPU with a (8, 1, 32, 128) call).
struct OptionalArgs {
  bool k = false, k_out = false, position_ids = false, cos = false, cu_seqlens = false, seqlen_offsets = false,
       inv_freq = false;
};

OptionalArgs ReadOptionalArgs(user_op::KernelComputeContext* ctx, bool backward) {
  OptionalArgs o;
  o.k = ctx->has_input(backward ? "dk_out" : "k", 0);
  o.k_out = ctx->has_output(backward ? "dk" : "k_out", 0);
  o.position_ids = ctx->has_input("position_ids", 0);
  o.cos = ctx->has_input("cos", 0);
  o.cu_seqlens = ctx->has_input("cu_seqlens", 0);
  o.seqlen_offsets = ctx->has_input("seqlen_offsets", 0);
  o.inv_freq = ctx->has_input("inv_freq", 0);
  return o;
}

// OptionalArgs read at a kernel's first call.
class OptionalArgsOnce {
 public:
  const OptionalArgs& Get(user_op::KernelComputeContext* ctx, bool backward) const {
    std::call_once(once_, [&] { args_ = ReadOptionalArgs(ctx, backward); });
    return args_;
  }

 private:
  mutable std::once_flag once_;
  mutable OptionalArgs args_;
};

// B, M, H, K of the call (rope::InferSizes), remembered for the last shape and attributes seen by
// this thread: InferSizes runs the op's whole shape check (0.29 us a call on the CPU), and eager
// calls of one shape follow each other.
std::string CachedSizes(const ShapeView& shape, const rope::RopeCall& call, rope::RopeSizes* sizes) {
  struct Entry {
    std::vector<int64_t> shape;
    rope::RopeCall call;
    rope::RopeSizes sizes;
    bool valid = false;
  };
  thread_local Entry last;
  bool same = last.valid && static_cast<int64_t>(last.shape.size()) == shape.NumAxes() && last.call == call;
  for (int i = 0; same && i < shape.NumAxes(); ++i) same = last.shape[i] == shape.At(i);
  if (same) {
    *sizes = last.sizes;
    return std::string();
  }
  std::vector<int64_t> dims = ToVector(shape);
  std::string err = rope::InferSizes(dims, call, sizes);
  last.valid = err.empty();
  if (last.valid) {
    last.shape = std::move(dims);
    last.call = call;
    last.sizes = *sizes;
  }
  return err;
}

// Builds the kernel parameters. Inputs arrive contiguous (the op does not declare support for
// non-contiguous tensors), so the strides follow from the layouts. Forward: x [k] -> out [k_out];
// backward: dy [dk_out] -> dx [dk]. A q+k call fills tensors[1]: from k, or (packed_qk) from the
// key slot of the packed x. Backward of a packed input: the slots that take no gradient get zeros,
// written by the kernel with tensors[0]. `slice`: where this rank's rows start along the
// sequence axis (see SliceOf).
rope::RopeParams MakeParams(user_op::KernelComputeContext* ctx, bool backward, const SeqSlice& slice,
                            const OptionalArgs& opt) {
  const char* in_name = backward ? "dy" : "x";
  const char* in_k_name = backward ? "dk_out" : "k";
  const char* res_name = backward ? "dx" : "out";
  const char* res_k_name = backward ? "dk" : "k_out";
  const user_op::Tensor* in = ctx->Tensor4ArgNameAndIndex(in_name, 0);
  user_op::Tensor* res = ctx->Tensor4ArgNameAndIndex(res_name, 0);
  const user_op::Tensor* in_k = opt.k ? ctx->Tensor4ArgNameAndIndex(in_k_name, 0) : nullptr;
  user_op::Tensor* res_k = opt.k_out ? ctx->Tensor4ArgNameAndIndex(res_k_name, 0) : nullptr;
  rope::RopeCall call;
  call.x_layout = ctx->Attr<std::string>("x_layout");
  call.output_layout = ctx->Attr<std::string>("output_layout");
  const rope::LayoutDesc* x_layout = rope::FindLayout(call.x_layout);
  const rope::LayoutDesc* out_layout = rope::FindLayout(call.output_layout);
  CHECK(x_layout != nullptr && out_layout != nullptr) << "fused_apply_rotary_emb: unknown layout";
  // attributes are lookups by name too: those that cannot matter for these layouts are not read
  // (tensor_index and packed_qk: one slot; k_size: no fused layout)
  const bool packed_qk = x_layout->slots > 1 && ctx->Attr<bool>("packed_qk");
  call.mode = ctx->Attr<std::string>("mode");
  call.tensor_index = x_layout->slots > 1 ? ctx->Attr<int64_t>("tensor_index") : 0;
  call.k_size = x_layout->fused || out_layout->fused ? ctx->Attr<int64_t>("k_size") : 0;
  call.rotary_size = ctx->Attr<int64_t>("rotary_size");
  const user_op::Tensor* pos = opt.position_ids ? ctx->Tensor4ArgNameAndIndex("position_ids", 0) : nullptr;
  // position_ids: (B, R, M), or (R, T) for a varlen layout; R is the rotary dim
  const int pos_axes = pos != nullptr ? pos->shape_view().NumAxes() : 0;
  call.rotary_dim = pos != nullptr ? static_cast<int32_t>(pos->shape_view().At(pos_axes - 2)) : 1;

  rope::RopeCall in_call = call;
  if (backward) {
    in_call.x_layout = call.output_layout;
    in_call.tensor_index = 0;
  }
  rope::RopeSizes sizes;
  const std::string err = CachedSizes(in->shape_view(), in_call, &sizes);
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
  p.base = opt.cos || opt.inv_freq ? p.base : ctx->Attr<double>("base");  // used by computed angles only
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

  if (opt.cos) {
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
    p.pos_stride_b = pos->shape_view().At(pos_axes - 2) * pos->shape_view().At(pos_axes - 1);  // B = 1 if 2-D
    p.pos_stride_r = pos->shape_view().At(pos_axes - 1);
    p.pos_stride_m = 1;
  }
  // the index of a token is its global one: its row plus where this rank's slice starts
  p.seqlen_offset = ctx->Attr<int64_t>("seqlen_offset") + slice.begin;
  if (opt.cu_seqlens) {
    const user_op::Tensor* cu_seqlens = ctx->Tensor4ArgNameAndIndex("cu_seqlens", 0);
    p.cu_seqlens = cu_seqlens->raw_dptr();
    p.cu_seqlens_type = ToIndexType(cu_seqlens->data_type());
    p.num_seqs = cu_seqlens->shape_view().At(0) - 1;
    p.cu_seqlens_total = slice.total >= 0 ? slice.total : sizes.M;  // varlen: B = 1, M = T
  }
  if (opt.seqlen_offsets) {
    const user_op::Tensor* offsets = ctx->Tensor4ArgNameAndIndex("seqlen_offsets", 0);
    p.seqlen_offsets = offsets->raw_dptr();
    p.offsets_type = ToIndexType(offsets->data_type());
    p.offsets_stride = 1;
  }
  if (opt.inv_freq) {
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
  // hardware_concurrency reads /sys/devices/system/cpu/online at every call (6-8 us, most of a
  // decode step's host time on the CPU): read once
  static const int64_t hardware = std::max<int64_t>(1, std::thread::hardware_concurrency());
  return static_cast<int32_t>(std::min(std::max<int64_t>(count, 1), hardware));
}

// Runs the kernel of one device on the op's tensors.
template<bool kBackward, DeviceType kDevice>
void Run(user_op::KernelComputeContext* ctx, const SeqSlice& slice, const OptionalArgs& opt) {
  rope::RopeParams p = MakeParams(ctx, kBackward, slice, opt);
  if (kDevice == DeviceType::kCPU) p.num_threads = IntraOpThreads(ctx);
  const char* invalid = rope::ValidateRopeParams(p);
  CHECK(invalid == nullptr) << "fused_apply_rotary_emb: " << invalid;
  if (kDevice == DeviceType::kCPU) {
    const int64_t bad_rows = rope::RopeForwardCpu(p);
    LOG_IF(WARNING, bad_rows > 0)
        << "fused_apply_rotary_emb: " << bad_rows
        << " positions fell outside the cos/sin table or outside every sequence of cu_seqlens; their outputs are NaN";
    return;
  }
#ifdef ONEFLOW_ROPE_WITH_CUDA
  void* stream = ctx->stream()->As<ep::CudaStream>()->cuda_stream();
  const int status = rope::RopeForwardCuda(p, stream);
  CHECK_EQ(status, 0) << "fused_apply_rotary_emb: " << rope::RopeCudaErrorString(status);
#endif
}

// The kernel of a placement of one rank (local tensors): the tensor is whole.
template<bool kBackward, DeviceType kDevice>
class RopeKernel final : public user_op::OpKernel {
 public:
  RopeKernel() = default;
  ~RopeKernel() override = default;

 private:
  void Compute(user_op::KernelComputeContext* ctx) const override {
    CHECK_EQ(ctx->parallel_ctx().parallel_num(), 1) << "fused_apply_rotary_emb: the kernel of one rank runs on "
                                                    << ctx->parallel_ctx().parallel_num();
    Run<kBackward, kDevice>(ctx, SeqSlice(), optional_.Get(ctx, kBackward));
  }
  bool AlwaysComputeWhenAllOutputsEmpty() const override { return false; }
  OptionalArgsOnce optional_;
};

// The kernel of a placement of several ranks: finds where its slice starts along the sequence
// axis (the SBP may change from one eager call to the next, so at every call; cheap).
template<bool kBackward, DeviceType kDevice>
class RopeGlobalKernel final : public user_op::OpKernel {
 public:
  RopeGlobalKernel() = default;
  ~RopeGlobalKernel() override = default;

  void InitOpKernelCacheWithFlags(user_op::KernelCacheContext* ctx, int8_t /*flag*/,
                                  std::shared_ptr<user_op::OpKernelCache>* cache_ptr) const override {
    auto cache = std::make_shared<SeqSliceCache>();
    cache->slice = SliceOf(ctx, kBackward);
    *cache_ptr = std::move(cache);
  }

 private:
  using user_op::OpKernel::Compute;
  void Compute(user_op::KernelComputeContext* ctx, user_op::OpKernelState*,
               const user_op::OpKernelCache* cache) const override {
    const auto* slice = dynamic_cast<const SeqSliceCache*>(cache);
    CHECK(slice != nullptr) << "fused_apply_rotary_emb: no slice of the sequence axis";
    Run<kBackward, kDevice>(ctx, slice->slice, optional_.Get(ctx, kBackward));
  }
  bool AlwaysComputeWhenAllOutputsEmpty() const override { return false; }
  OptionalArgsOnce optional_;
};

// The number of ranks of the op's placement: one (local tensors, or a placement of one rank) or
// several (global tensors that may be split along the sequence axis).
auto HobParallelNum() {
  return hob::make_custom("parallel_num", [](const user_op::KernelRegContext& ctx) -> int64_t {
    return ctx.parallel_ctx().parallel_num();
  });
}

// ranks: the condition on the number of ranks of the op's placement (HobParallelNum).
#define REGISTER_ROPE_KERNEL(op, kernel, backward, device, dtype, result, ranks)                   \
  REGISTER_USER_KERNEL(op)                                                                          \
      .SetCreateFn<kernel<backward, device>>()                                                      \
      .SetIsMatchedHob((user_op::HobDeviceType() == device) && (user_op::HobDataType(result, 0) == dtype) \
                       && (HobParallelNum() ranks));
#define REGISTER_ROPE_KERNELS(device, dtype)                                                                \
  REGISTER_ROPE_KERNEL("fused_apply_rotary_emb", RopeKernel, false, device, dtype, "out", == int64_t{1})     \
  REGISTER_ROPE_KERNEL("fused_apply_rotary_emb_grad", RopeKernel, true, device, dtype, "dx", == int64_t{1})  \
  REGISTER_ROPE_KERNEL("fused_apply_rotary_emb", RopeGlobalKernel, false, device, dtype, "out", > int64_t{1}) \
  REGISTER_ROPE_KERNEL("fused_apply_rotary_emb_grad", RopeGlobalKernel, true, device, dtype, "dx", > int64_t{1})

REGISTER_ROPE_KERNELS(DeviceType::kCPU, DataType::kFloat)
REGISTER_ROPE_KERNELS(DeviceType::kCPU, DataType::kDouble)
REGISTER_ROPE_KERNELS(DeviceType::kCPU, DataType::kFloat16)
REGISTER_ROPE_KERNELS(DeviceType::kCPU, DataType::kBFloat16)
#ifdef ONEFLOW_ROPE_WITH_CUDA
REGISTER_ROPE_KERNELS(DeviceType::kCUDA, DataType::kFloat)
REGISTER_ROPE_KERNELS(DeviceType::kCUDA, DataType::kDouble)
REGISTER_ROPE_KERNELS(DeviceType::kCUDA, DataType::kFloat16)
REGISTER_ROPE_KERNELS(DeviceType::kCUDA, DataType::kBFloat16)
#endif

}  // namespace

}  // namespace oneflow
