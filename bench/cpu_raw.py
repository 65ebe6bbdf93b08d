"""The CPU kernel alone (the raw binding, no OneFlow): bandwidth of the forward on a plain and on
packed layouts per mode, and the time of small calls, for a quick A/B of a kernel change or of the
instruction set (ONEFLOW_ROPE_CPU_ISA=avx512bf16|avx512|avx2|baseline picks it).

    cmake -S . -B build/cpu-raw -DONEFLOW_ROPE_BUILD_ONEFLOW_OPS=OFF -DONEFLOW_ROPE_BUILD_RAW=ON \\
          -DONEFLOW_ROPE_WITH_CUDA=OFF && cmake --build build/cpu-raw
    .venv/bin/python -m bench.cpu_raw --build build/cpu-raw [--threads 2] [--dtypes bfloat16,float16]

Large calls: (1, 2048, 32, 128), best of 12 calls, each after the last-level cache is flushed
(a 768 MiB buffer is read); bandwidth = bytes read (x, or its slot) + bytes written. numpy's copy of
the output's bytes is printed beside them for scale. Small calls: best mean of 2000 back-to-back
calls, no flush.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from tests.raw_driver import load_raw, rope

NUMPY_TYPES = {"float32": np.float32, "float64": np.float64, "float16": np.float16, "bfloat16": np.uint16}


def random_values(rng, shape, dname: str) -> np.ndarray:
    """Values in [0, 100) of the dtype; bfloat16 as its bits in uint16 (the float32 values
    truncated), not the integers 0..99 cast to uint16, which as bfloat16 bits are all subnormal
    numbers: every vector would then take the kernel's rare subnormal path (until session 7 this
    bench did that, and its bfloat16 figures were about twice too slow)."""
    values = rng.random(shape, dtype=np.float32) * 100
    if dname == "bfloat16":
        return (values.view(np.uint32) >> 16).astype(np.uint16)
    return values.astype(NUMPY_TYPES[dname])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default="build/cpu-raw")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtypes", default="bfloat16,float16,float32")
    args = ap.parse_args()
    raw = load_raw(args.build)
    flush = np.ones(768 * 2**20 // 8)

    def best_flushed(fn, reps=12):
        times = []
        for _ in range(reps):
            flush.sum()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    def best_mean(fn, n=2000, reps=5):
        for _ in range(50):
            fn()
        best = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            best = min(best, (time.perf_counter() - t0) / n)
        return best

    def plan(x, out, layout, mode, threads, **kw):
        params = rope(raw, x, layout=layout, output_layout="BMHK", out=out, mode=mode, plan_only=True, **kw)
        params["num_threads"] = threads
        return raw.Plan(params)

    print(f"# python {' '.join(sys.argv)}  ISA={os.environ.get('ONEFLOW_ROPE_CPU_ISA', 'auto')}  threads={args.threads}")
    rng = np.random.default_rng(0)
    B, M, H, K = 1, 2048, 32, 128
    for dname in args.dtypes.split(","):
        dt = NUMPY_TYPES[dname]
        out = np.empty((B, M, H, K), dtype=dt)
        for layout, slots in (("BMHK", 1), ("BM(H2K)", 2), ("BM(H3K)", 3)):
            shape = (B, M, H, K) if slots == 1 else (B, M, H * slots * K)
            x = random_values(rng, shape, dname)
            kw = {} if slots == 1 else {"k_size": K}
            cells = []
            for mode in ("plane", "interval"):
                p = plan(x, out, layout, mode, args.threads, **kw)
                cells.append(f"{mode} {2 * out.nbytes / best_flushed(p.run_cpu) / 1e9:5.1f} GB/s")
            src = np.empty_like(out)
            copy = 2 * out.nbytes / best_flushed(lambda: np.copyto(out, src)) / 1e9
            print(f"{dname:9s} {str((B, M, H, K)):18s} {layout:8s} " + ", ".join(cells) + f"; numpy copy {copy:5.1f} GB/s",
                  flush=True)
        for shape in ((1, 1, 32, 128), (8, 1, 32, 128), (64, 1, 32, 128)):
            x = random_values(rng, shape, dname)
            small_out = np.empty_like(x)
            p = plan(x, small_out, "BMHK", "plane", 1)
            print(f"{dname:9s} {str(shape):18s} BMHK     plane, one thread: {best_mean(p.run_cpu) * 1e6:6.2f} us", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
