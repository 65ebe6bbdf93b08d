"""The stand-alone probe kernel (bench/probe_mapping.cu's exact-angle 2-head kernel, built as a
library with -DPROBE_LIB) timed in the GPU bench's own harness, on the same tensors as our kernel
and torch's copy: is the gap between our RopeSmallKernel and the probe the kernel's, or the
harness's (the probe's own timer, cudaMalloc'd buffers)? bf16 BMHK, angles from base 10000.
Prints GPU us (bench_gpu.Timer: L2 flushed, median) per round, interleaved.

    nvcc -O3 -std=c++17 -arch=sm_90 -DPROBE_LIB -shared -Xcompiler -fPIC bench/probe_mapping.cu -o /tmp/libprobe.so
    python3 -m bench.probe_torch --build build-gpu --lib /tmp/libprobe.so
"""

from __future__ import annotations

import argparse
import ctypes

import torch

from bench.bench_gpu import Timer
from bench.sweep_launch import make_plan
from tests.raw_driver import load_raw

SHAPES = [(4, 4096, 32, 128), (2, 8192, 8, 128)]


def theta_hilo(K: int, base: float = 10000.0) -> torch.Tensor:
    """The probe's frequencies: hi[k] (float) for k < K, then lo[k] = theta - hi, theta of pair k % (K/2)."""
    i = torch.arange(K, dtype=torch.float64) % (K // 2)
    t = base ** (-2.0 * i / K)
    hi = t.to(torch.float32)
    lo = (t - hi.to(torch.float64)).to(torch.float32)
    return torch.cat([hi, lo]).cuda()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default="build-gpu")
    ap.add_argument("--lib", default="/tmp/libprobe.so")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    raw = load_raw(args.build)
    lib = ctypes.CDLL(args.lib)
    lib.LaunchProbe.argtypes = [ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int] * 4 + [ctypes.c_void_p, ctypes.c_int,
                                                                                          ctypes.c_int, ctypes.c_void_p]
    timer = Timer(reps=30, b2b_reps=10)
    stream = torch.cuda.current_stream().cuda_stream
    print(f"# {torch.cuda.get_device_name()}: GPU us, L2 flushed, median of 30; ours = raw plan, "
          f"ours N = our kernel with 2 heads per thread in blocks of N threads; probe N = the probe kernel in blocks of N threads, "
          f"pN 64r = the same capped at 64 registers (32 warps per SM, as ours)")
    for shape in SHAPES:
        B, M, H, K = shape
        plan, keep = make_plan(raw, shape, "bfloat16", "BMHK", "plane", "base")
        x, out = keep[0], keep[1]
        theta = theta_hilo(K)
        ref = out.clone()
        plan.run_cuda(stream)
        ref.copy_(out)
        out.zero_()
        assert lib.LaunchProbe(x.data_ptr(), out.data_ptr(), B, M, H, K, theta.data_ptr(), 256, 0, stream) == 0
        torch.cuda.synchronize()
        same = torch.equal(out, ref)

        def probe(threads: int, min_blocks: int = 0):
            return lambda: lib.LaunchProbe(x.data_ptr(), out.data_ptr(), B, M, H, K, theta.data_ptr(), threads,
                                           min_blocks, stream)

        def ours(items: int, threads: int):
            def run():
                raw.set_launch_override(items, threads, -1, -1)
                plan.run_cuda(stream)
                raw.set_launch_override(0, 0, -1, -1)
            return run

        runs = {"copy": lambda: out.copy_(x), "ours": ours(0, 0), "ours 256": ours(2, 256), "ours 512": ours(2, 512)}
        for threads in (128, 256):
            runs[f"probe {threads}"] = probe(threads)
            runs[f"p{threads} 64r"] = probe(threads, 4)
        print(f"# shape {shape} bf16 BMHK base: probe output equals ours bit for bit: {same}")
        print("round " + " ".join(f"{k:>10s}" for k in runs))
        for r in range(args.rounds):
            print(f"{r:<5d} " + " ".join(f"{timer.gpu_us(fn):10.2f}" for fn in runs.values()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
