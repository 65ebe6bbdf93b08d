// CPU kernel of the rotary embedding.
//
// The rows (b, m) of a call are split into equal contiguous ranges, one per thread: up to
// p.num_threads threads (the framework's intra-op setting; the calling thread is one of them),
// fewer when a range would be too small to pay for starting a thread. Each row's result depends
// on the row alone (the same code, the same operations in the same order, whatever range it is
// in), so the output is bitwise the same for any thread count. The count of rows whose position
// fell outside the table is summed over the threads.
//
// The row loop (rope_cpu_impl.h) is compiled for four instruction sets on x86-64 (baseline,
// AVX2+FMA+F16C, AVX-512, AVX-512 with BF16 conversions) and the best one the CPU supports runs;
// elsewhere only the baseline build exists. ONEFLOW_ROPE_CPU_ISA=baseline|avx2|avx512|avx512bf16
// (read once) forces a lower one, for tests and benchmarks.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <system_error>
#include <thread>
#include <utility>
#include <vector>

#include "rope/rope_cpu_internal.h"
#include "rope/rope_params.h"

#define ROPE_CPU_ISA baseline
#include "rope/rope_cpu_impl.h"
#undef ROPE_CPU_ISA

namespace oneflow_rope {

namespace {

using RowsFn = int64_t (*)(const cpu::RowTask&);

struct IsaChoice {
  RowsFn fn;
  const char* name;
};

IsaChoice ChooseIsa() {
  const char* forced = std::getenv("ONEFLOW_ROPE_CPU_ISA");
  const std::string want = forced != nullptr ? forced : "";
  (void)want;
#if defined(ONEFLOW_ROPE_CPU_AVX512) || defined(ONEFLOW_ROPE_CPU_AVX2)
  __builtin_cpu_init();
#endif
#if defined(ONEFLOW_ROPE_CPU_AVX512)
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")
                      && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")
                      && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if ((want.empty() || want == "avx512bf16") && avx512 && __builtin_cpu_supports("avx512bf16")) {
    return {&cpu::avx512bf16::RopeRows, "avx512bf16"};
  }
  if ((want.empty() || want == "avx512bf16" || want == "avx512") && avx512) {
    return {&cpu::avx512::RopeRows, "avx512"};
  }
#endif
#if defined(ONEFLOW_ROPE_CPU_AVX2)
  if ((want.empty() || want == "avx512bf16" || want == "avx512" || want == "avx2")
      && __builtin_cpu_supports("avx2")
      && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    return {&cpu::avx2::RopeRows, "avx2"};
  }
#endif
  return {&cpu::baseline::RopeRows, "baseline"};
}

const IsaChoice& Isa() {
  static const IsaChoice choice = ChooseIsa();
  return choice;
}

size_t ElementSize(DType d) {
  switch (d) {
    case DType::kFloat64: return 8;
    case DType::kFloat16:
    case DType::kBFloat16: return 2;
    default: return 4;
  }
}

// Bytes a thread should move at least before another thread is worth starting (a thread start
// and join costs some tens of microseconds; this is about 30 us of memory traffic). Tests lower
// it (RopeCpuSetMinBytesPerThread) to run small calls on many threads.
constexpr int64_t kMinBytesPerThread = int64_t{1} << 20;
std::atomic<int64_t> min_bytes_per_thread{kMinBytesPerThread};
// cos and sin of a block of rows take about this many bytes (they stay in L1 while the block's
// heads are rotated).
constexpr int64_t kBlockTableBytes = 16 * 1024;
constexpr int64_t kBlockTableBytesHeadsOuter = 512 * 1024;  // 4 heads streamed at a time: 512 KiB
                                                               // ran 5-15% faster than 256 KiB
constexpr int64_t kClaimBytes = 256 * 1024;

// Size of one instance of the largest cache (the L3 a core shares), from sysfs as lscpu reads it
// (sysconf(_SC_LEVEL3_CACHE_SIZE) gives the sum over all instances on some machines); 32 MiB
// when it cannot be read.
int64_t LastLevelCacheBytes() {
  static const int64_t bytes = [] {
    int64_t best = 0;
    for (int index = 0; index < 8; ++index) {
      const std::string dir = "/sys/devices/system/cpu/cpu0/cache/index" + std::to_string(index) + "/";
      std::FILE* level_file = std::fopen((dir + "level").c_str(), "r");
      std::FILE* size_file = std::fopen((dir + "size").c_str(), "r");
      int level = 0;
      long long size = 0;
      char unit = 0;
      if (level_file != nullptr && size_file != nullptr && std::fscanf(level_file, "%d", &level) == 1
          && std::fscanf(size_file, "%lld%c", &size, &unit) >= 1) {
        if (unit == 'K') size <<= 10;
        if (unit == 'M') size <<= 20;
        if (level >= 2 && size > best) best = size;
      }
      if (level_file != nullptr) std::fclose(level_file);
      if (size_file != nullptr) std::fclose(size_file);
    }
    return best > 0 ? best : int64_t{32} << 20;
  }();
  return bytes;
}

// theta_i = base^(-2i/A), i < A/2, computed once per (base, A) and kept for the process (the
// vectors are never freed or moved, so the pointer stays valid).
const double* BaseFrequencies(double base, int64_t part) {
  static std::mutex mutex;
  static std::map<std::pair<double, int64_t>, std::unique_ptr<std::vector<double>>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  std::unique_ptr<std::vector<double>>& slot = cache[{base, part}];
  if (!slot) {
    const int64_t half = part / 2;
    slot.reset(new std::vector<double>(static_cast<size_t>(std::max<int64_t>(1, half))));
    for (int64_t i = 0; i < half; ++i) {
      (*slot)[i] = std::pow(base, -2.0 * static_cast<double>(i) / static_cast<double>(part));
    }
  }
  return slot->data();
}

// Bytes read and written per row: the rotated heads, plus the zero slots.
int64_t RowBytes(const RopeParams& p) {
  int64_t heads = 0;
  for (int t = 0; t < p.num_tensors && t < kMaxRopeTensors; ++t) {
    heads += p.tensors[t].H * (2 + p.tensors[t].num_zero_slots);
  }
  return heads * p.K * static_cast<int64_t>(ElementSize(p.dtype));
}

struct AlignedBuffer {
  std::unique_ptr<unsigned char[]> storage;
  void* aligned = nullptr;
  size_t bytes = 0;
  explicit AlignedBuffer(size_t size) : storage(new unsigned char[size + 64]), bytes(size) {
    const uintptr_t at = reinterpret_cast<uintptr_t>(storage.get());
    aligned = storage.get() + ((64 - at % 64) % 64);
  }
};

}  // namespace

const char* RopeCpuIsaName() { return Isa().name; }

void RopeCpuSetMinBytesPerThread(int64_t bytes) {
  min_bytes_per_thread.store(bytes > 0 ? bytes : kMinBytesPerThread, std::memory_order_relaxed);
}

int64_t RopeCpuThreadsFor(const RopeParams& p) {
  const int64_t rows = p.num_rows();
  if (rows <= 0) return 1;
  int64_t threads = std::max<int64_t>(1, p.num_threads);
  const int64_t min_bytes = std::max<int64_t>(1, min_bytes_per_thread.load(std::memory_order_relaxed));
  threads = std::min(threads, std::max<int64_t>(1, RowBytes(p) * rows / min_bytes));
  return std::min(threads, rows);
}

int64_t RopeForwardCpu(const RopeParams& params) {
  if (params.numel() == 0) return 0;
  // A decreasing cu_seqlens places no token: every row is NaN, like a first entry other than 0
  // or a last one other than the total (one pass over the S + 1 entries, once per call).
  RopeParams checked = params;
  if (params.cu_seqlens != nullptr) {
    auto cu = [&](int64_t s) -> int64_t {
      return params.cu_seqlens_type == IndexType::kInt32 ? static_cast<const int32_t*>(params.cu_seqlens)[s]
                                                         : static_cast<const int64_t*>(params.cu_seqlens)[s];
    };
    for (int64_t s = 0; s < params.num_seqs; ++s) {
      if (cu(s + 1) < cu(s)) {
        checked.cu_seqlens_total = cu(params.num_seqs) + 1;  // no longer matches: every row NaN
        break;
      }
    }
  }
  const RopeParams& p = checked;
  const RowsFn rows_fn = Isa().fn;

  // Frequencies theta_i (or inv_freq[i]), in double, shared by all threads. Those from base are
  // kept per (base, A) for the process (a call of a small tensor would spend more on std::pow
  // than on its rows).
  const int64_t part = p.rotary_part();
  const int64_t half = part / 2;
  std::vector<double> theta_given;
  const double* theta = nullptr;
  if (p.cos == nullptr && p.inv_freq != nullptr) {
    theta_given.resize(half);
    for (int64_t i = 0; i < half; ++i) {
      theta_given[i] = p.inv_freq_dtype == DType::kFloat64 ? static_cast<const double*>(p.inv_freq)[i]
                                                           : static_cast<const float*>(p.inv_freq)[i];
    }
    theta = theta_given.data();
  } else if (p.cos == nullptr) {
    theta = BaseFrequencies(p.base, part);
  }

  const int64_t rows = p.num_rows();
  const int64_t threads = RopeCpuThreadsFor(p);
  const int64_t row_table_bytes =
      std::max<int64_t>(1, 2 * p.rotary_size * (p.dtype == DType::kFloat64 ? 8 : 4));
  // Heads outer in memory (BHMK): each head of a block streams block_rows rows of x, so blocks
  // are long (their cos/sin then live in L2 rather than L1).
  const bool heads_outer = p.tensors[0].x_stride_h > p.tensors[0].x_stride_m;
  const int64_t table_budget = heads_outer ? kBlockTableBytesHeadsOuter : kBlockTableBytes;
  const int64_t max_block = heads_outer ? 512 : 64;
  const int64_t block_rows =
      std::max<int64_t>(1, std::min<int64_t>(max_block, table_budget / row_table_bytes));
  // Threads claim rows in ranges of about kClaimBytes (at least 8 ranges a thread, so that a
  // thread slowed down by other work on its core does not hold up the call), whole blocks.
  int64_t claim_rows = rows;
  if (threads > 1) {
    claim_rows = std::max<int64_t>(1, kClaimBytes / std::max<int64_t>(1, RowBytes(p)));
    claim_rows = std::min(claim_rows, std::max<int64_t>(1, rows / (8 * threads)));
    claim_rows = std::max(block_rows, claim_rows / block_rows * block_rows);
  }
  const cpu::ScratchLayout layout = cpu::MakeScratchLayout(p, block_rows);
  // A call moving at least 3/4 of what the last-level cache holds writes its output with
  // non-temporal stores where the kernel has them (AVX-512 builds): no read-for-ownership of lines
  // that are entirely overwritten, and an output that large would not stay cached for the next op
  // anyway. The threshold was 1.5x the cache until 2026-11-29; 16-bit (1, 2048, 32, 128) calls (32
  // MiB, the dev machine's L3) then used plain stores, and streaming them measured 1.1-1.4x
  // faster on BMHK and BM(H3K) in alternating runs (bench/results/cpu_2026-11-29e).
  const bool stream_stores = 4 * RowBytes(p) * rows >= 3 * LastLevelCacheBytes();

  int64_t next = 0;
  std::vector<cpu::RowTask> tasks(threads);
  // Scratch buffers, kept by the calling thread from call to call (a fresh large allocation would
  // cost page faults every call).
  thread_local std::vector<AlignedBuffer> scratch;
  while (static_cast<int64_t>(scratch.size()) < threads) scratch.emplace_back(0);
  for (int64_t t = 0; t < threads; ++t) {
    if (scratch[t].bytes < layout.bytes) scratch[t] = AlignedBuffer(layout.bytes);
    cpu::RowTask& task = tasks[t];
    task.p = &p;
    task.theta = theta;
    task.next = &next;
    task.num_rows = rows;
    task.claim_rows = claim_rows;
    task.block_rows = block_rows;
    task.stream_stores = stream_stores;
    task.scratch = scratch[t].aligned;
  }
  if (threads == 1) return rows_fn(tasks[0]);

  std::vector<int64_t> bad(threads, 0);
  std::vector<std::thread> workers;
  workers.reserve(threads - 1);
  int64_t started = 1;
  for (; started < threads; ++started) {
    try {
      workers.emplace_back([&, started] { bad[started] = rows_fn(tasks[started]); });
    } catch (const std::system_error&) {
      break;  // no more threads: the ones started (and this one) claim all the rows
    }
  }
  bad[0] = rows_fn(tasks[0]);  // claims rows until none are left, whatever the others managed
  for (std::thread& w : workers) w.join();
  int64_t total = 0;
  for (int64_t b : bad) total += b;
  return total;
}

}  // namespace oneflow_rope
