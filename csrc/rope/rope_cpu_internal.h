// Internal interface of the CPU kernel: rope_cpu.cpp splits the rows of a call over threads and
// hands each thread a RowTask; the row loop itself (rope_cpu_impl.h) is compiled once per
// instruction set (baseline x86-64 / any CPU, AVX2+FMA+F16C, AVX-512, AVX-512 with BF16) and
// chosen at run time.
//
// Everything defined in this header has internal linkage (static or an unnamed namespace): the
// translation units compiled with -mavx2 / -mavx512f must not emit a definition that the linker
// could merge with the baseline one, or a CPU without AVX would run AVX code.
#ifndef ONEFLOW_ROPE_CSRC_ROPE_ROPE_CPU_INTERNAL_H_
#define ONEFLOW_ROPE_CSRC_ROPE_ROPE_CPU_INTERNAL_H_

#include <cstddef>
#include <cstdint>

#include "rope/rope_params.h"

namespace oneflow_rope {
namespace cpu {

// One thread's share of a call: it claims ranges of claim_rows rows (in the kernel's row order,
// see RowOrderMInner) from the shared counter *next until all num_rows are taken. Which thread
// runs a row changes nothing in its result.
struct RowTask {
  const RopeParams* p = nullptr;
  const double* theta = nullptr;  // rotary_part / 2 frequencies (computed angles only)
  int64_t* next = nullptr;        // first unclaimed row, shared by the call's threads
  int64_t num_rows = 0;
  int64_t claim_rows = 1;
  int64_t block_rows = 1;   // rows whose cos/sin are prepared together (<= claim_rows)
  bool stream_stores = false;  // large output: non-temporal stores where the kernel has them
  void* scratch = nullptr;  // ScratchLayout(...).bytes, 64-byte aligned, this thread's own
};

// Offsets (bytes, 64-aligned) of one thread's scratch buffers. Every slot is sized for 8-byte
// elements so one layout serves float and double math.
struct ScratchLayout {
  size_t cos = 0, sin = 0;      // block_rows * rotary_size compute-type values each
  size_t cos_split = 0, sin_split = 0;  // the same split by parity (bfloat16 kernels)
  size_t v = 0, o = 0;          // K each: one head of x / out, in the compute type
  size_t reduced = 0;           // half: reduced angles (double)
  size_t quadrant = 0;          // half: int32 quadrant of each angle
  size_t fcos = 0, fsin = 0;    // half: cos / sin per frequency
  size_t row_b = 0, row_m = 0;  // block_rows: (b, m) of each row of a block
  size_t row_paired = 0;        // block_rows bools: the row's pairs share one angle
  size_t bytes = 0;
};

static inline size_t AlignUp64(size_t n) { return (n + 63) & ~static_cast<size_t>(63); }

static inline ScratchLayout MakeScratchLayout(const RopeParams& p, int64_t block_rows) {
  const size_t rotary = static_cast<size_t>(p.rotary_size);
  const size_t half = p.rotary_dim > 0 ? static_cast<size_t>(p.rotary_size / p.rotary_dim / 2) : 0;
  const size_t rows = static_cast<size_t>(block_rows);
  ScratchLayout l;
  size_t at = 0;
  auto take = [&at](size_t count) {
    const size_t offset = at;
    at += AlignUp64(count * 8);
    return offset;
  };
  l.cos = take(rows * rotary);
  l.sin = take(rows * rotary);
  l.cos_split = take(rows * rotary);
  l.sin_split = take(rows * rotary);
  l.v = take(static_cast<size_t>(p.K));
  l.o = take(static_cast<size_t>(p.K));
  l.reduced = take(half);
  l.quadrant = take(half);
  l.fcos = take(half);
  l.fsin = take(half);
  l.row_b = take(rows);
  l.row_m = take(rows);
  l.row_paired = take(rows);
  l.bytes = at + 64;
  return l;
}

// Row r of the call is (b, m) = (r / M, r % M), or (r % B, r / B) when the sequence axis is
// outer in memory (MBHK-like layouts): rows are visited, and split over threads, in the order
// of tensor 0's memory.
static inline bool RowOrderMInner(const RopeParams& p) {
  const RopeTensor& t = p.tensors[0];
  return !(p.B > 1 && p.M > 1 && t.x_stride_b < t.x_stride_m);
}

namespace baseline {
int64_t RopeRows(const RowTask& task);
}
#if defined(ONEFLOW_ROPE_CPU_AVX2)
namespace avx2 {
int64_t RopeRows(const RowTask& task);
}
#endif
#if defined(ONEFLOW_ROPE_CPU_AVX512)
namespace avx512 {
int64_t RopeRows(const RowTask& task);
}
namespace avx512bf16 {
int64_t RopeRows(const RowTask& task);
}
#endif

}  // namespace cpu

// For tests and benchmarks (defined in rope_cpu.cpp): the instruction set the CPU kernel runs
// ("baseline", "avx2", "avx512" or "avx512bf16"); the number of threads a call would use; the
// least bytes a thread must move before another one is started (<= 0: the default, 1 MiB).
const char* RopeCpuIsaName();
int64_t RopeCpuThreadsFor(const RopeParams& p);
void RopeCpuSetMinBytesPerThread(int64_t bytes);
}  // namespace oneflow_rope

#endif  // ONEFLOW_ROPE_CSRC_ROPE_ROPE_CPU_INTERNAL_H_
