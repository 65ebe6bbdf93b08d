// Probe: what a strided read of one slot costs on this CPU, without oneflow_rope code. On one
// thread, copies a CHUNK-byte run from every slots-th run of a buffer into a contiguous one (32 MiB
// per slot), three ways: the slot alone; the slot while also reading one byte of every line of the
// other slots (the whole buffer streams in order); the slot with a software prefetch of the other
// slots' lines 4 KiB ahead. Then the whole buffer's copy, and a contiguous copy of the slot's bytes.
// Each after a 128 MiB buffer is written (caches emptied), best of 7. If the memory system read
// only the slot, the slot copy would take 1/slots of the whole copy's time.
//   gcc -O2 -march=native -DCHUNK=256 bench/probe_slot_copy.c -o /tmp/probe_slot_copy && /tmp/probe_slot_copy
// Development machine (AMD EPYC Zen 4): bench/results/cpu_2026-11-29d and -29e NOTES.md.
#include <immintrin.h>
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

static char* flush;
static void Flush(int r) { memset(flush, r, 128u << 20); }

int main(void) {
  const size_t chunk = CHUNK, n = (32u << 20) / CHUNK;
  static const char* kModes[] = {"slot alone", "slot + read other slots", "slot + prefetch other slots"};
  flush = aligned_alloc(4096, 128u << 20);
  for (int slots = 1; slots <= 3; ++slots) {
    const size_t bytes = n * chunk * slots;
    char* x = aligned_alloc(4096, bytes);
    char* out = aligned_alloc(4096, bytes);
    memset(x, 1, bytes);
    memset(out, 0, bytes);
    for (int mode = 0; mode < (slots > 1 ? 3 : 1); ++mode) {
      double best = 1e9;
      volatile char sink = 0;
      for (int r = 0; r < 7; ++r) {
        Flush(r);
        const double t0 = Now();
        for (size_t i = 0; i < n; ++i) {
          const char* src = x + i * chunk * slots;
          for (size_t l = chunk; mode > 0 && l < chunk * slots; l += 64) {
            if (mode == 1) sink += src[l];
            else _mm_prefetch(src + l + 4096, _MM_HINT_T0);
          }
          memcpy(out + i * chunk, src, chunk);
        }
        const double t = Now() - t0;
        if (t < best) best = t;
      }
      printf("slots %d, runs of %zu bytes, %-28s %.2f ms (%.1f GB/s of the slot read + written)\n", slots, chunk,
             kModes[mode], best * 1e3, 2.0 * n * chunk / best / 1e9);
    }
    double whole = 1e9, dense = 1e9;
    for (int r = 0; r < 7; ++r) {
      Flush(r);
      double t0 = Now();
      memcpy(out, x, bytes);
      const double t = Now() - t0;
      if (t < whole) whole = t;
      Flush(r + 1);
      t0 = Now();
      memcpy(out, x + bytes - n * chunk, n * chunk);
      const double d = Now() - t0;
      if (d < dense) dense = d;
    }
    printf("slots %d: whole buffer copy %.2f ms (%.1f GB/s); contiguous copy of the slot's bytes %.2f ms (%.1f GB/s)\n",
           slots, whole * 1e3, 2.0 * bytes / whole / 1e9, dense * 1e3, 2.0 * n * chunk / dense / 1e9);
    free(x);
    free(out);
  }
  free(flush);
  return 0;
}
