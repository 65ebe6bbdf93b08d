// CUDA kernels of the rotary embedding, callable from plain C++ (no CUDA header needed here).
#ifndef ONEFLOW_ROPE_CSRC_ROPE_ROPE_CUDA_H_
#define ONEFLOW_ROPE_CSRC_ROPE_ROPE_CUDA_H_

#include <cstdint>

#include "rope/rope_params.h"

namespace oneflow_rope {

// Launches the rotation on `stream` (a cudaStream_t). Returns 0 or a cudaError_t value.
// Positions outside a cos/sin table give NaN outputs; nothing outside the table is read.
int RopeForwardCuda(const RopeParams& p, void* stream);

const char* RopeCudaErrorString(int status);

// Which kernel variant RopeForwardCuda would launch for `p`: "vector<N>" (16-byte accesses of N
// elements) or "elementwise" (any strides and sizes). For tests and benchmarks.
const char* RopeCudaKernelName(const RopeParams& p);

// Forces the launch shape for benchmark sweeps: items (heads) per thread and row, threads per
// block (up to 512), and the persistent grid (1) or a block per piece (0); 0, 0, -1 keep the
// built-in rule (from the device's SM count and the kernel's occupancy). Calls with cu_seqlens
// always take the persistent grid. small_kernel 0 keeps calls off the compact kernel
// (RopeSmallKernel: one-head calls, and two-head calls with computed angles; -1: the rule).
// Not thread-safe; not for production use.
void RopeCudaSetLaunchOverride(int items_per_thread, int block_threads, int persistent = -1, int small_kernel = -1);

// Turns programmatic dependent launch of RopeSmallKernel (small calls, and large calls with
// computed angles) off (false) or back on (true, the default; used only where the toolkit, device
// and kernel code allow it). For benchmarks; not thread-safe.
void RopeCudaSetPdl(bool enabled);

}  // namespace oneflow_rope

#endif  // ONEFLOW_ROPE_CSRC_ROPE_ROPE_CUDA_H_
