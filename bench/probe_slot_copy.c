// Probe: what a strided read of one slot costs on this CPU, without oneflow_rope code. On one
// thread, copies a CHUNK-byte run from every slots-th run of a buffer into a contiguous one, and
// the whole buffer, 32 MiB per slot; prints the best of 9 of each. If the memory system read only
// the slot, the slot copy would take 1/slots of the whole copy's time.
//   gcc -O2 -DCHUNK=256 bench/probe_slot_copy.c -o /tmp/probe_slot_copy && /tmp/probe_slot_copy
// Development machine (AMD EPYC Zen 4), bench/results/cpu_2026-11-29d/NOTES.md: two slots take
// 0.80-0.92 of the whole copy's time (runs of 256, 512 or 1024 bytes alike), three 0.54-0.55.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#ifndef CHUNK
#define CHUNK 256
#endif

static double Now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(void) {
  const size_t chunk = CHUNK, n = (32u << 20) / CHUNK;
  for (int slots = 1; slots <= 3; ++slots) {
    const size_t bytes = n * chunk * slots;
    char* x = aligned_alloc(4096, bytes);
    char* out = aligned_alloc(4096, bytes);
    memset(x, 1, bytes);
    memset(out, 0, bytes);
    double best_slot = 1e9, best_whole = 1e9;
    for (int r = 0; r < 9; ++r) {
      const double t0 = Now();
      for (size_t i = 0; i < n; ++i) memcpy(out + i * chunk, x + i * chunk * slots, chunk);
      const double t1 = Now();
      memcpy(out, x, bytes);
      const double t2 = Now();
      if (t1 - t0 < best_slot) best_slot = t1 - t0;
      if (t2 - t1 < best_whole) best_whole = t2 - t1;
    }
    printf("slots %d, runs of %zu bytes: slot copy %.2f ms (%.1f GB/s read + written), whole copy %.2f ms "
           "(%.1f GB/s); slot / whole time %.2f\n",
           slots, chunk, best_slot * 1e3, 2.0 * n * chunk / best_slot / 1e9, best_whole * 1e3,
           2.0 * bytes / best_whole / 1e9, best_slot / best_whole);
    free(x);
    free(out);
  }
  return 0;
}
