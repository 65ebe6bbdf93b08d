// CUDA kernels of the rotary embedding, callable from plain C++ (no CUDA header needed here).
#ifndef ONEFLOW_ROPE_CSRC_ROPE_ROPE_CUDA_H_
#define ONEFLOW_ROPE_CSRC_ROPE_ROPE_CUDA_H_

#include <cstdint>

#include "rope/rope_params.h"

namespace oneflow_rope {

// Launches the rotation on `stream` (a cudaStream_t). Returns 0 or a cudaError_t value.
// Positions outside a cos/sin table give NaN outputs; nothing outside the table is read.
int RopeForwardCuda(const RopeParams& p, void* stream);

// Sets `bytes` bytes at `ptr` to zero on `stream`. Returns 0 or a cudaError_t value.
int RopeZeroFillCuda(void* ptr, int64_t bytes, void* stream);

const char* RopeCudaErrorString(int status);

// Which kernel RopeForwardCuda would launch for `p`: "vector<N>" (N elements per access, sin/cos
// shared per row) or "generic" (one element per thread). For tests and benchmarks.
const char* RopeCudaKernelName(const RopeParams& p);

}  // namespace oneflow_rope

#endif  // ONEFLOW_ROPE_CSRC_ROPE_ROPE_CUDA_H_
