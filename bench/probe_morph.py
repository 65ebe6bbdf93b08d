"""The mapping probe morphed one RopeSmallKernel trait at a time (bench/probe_morph.cu), timed in
the GPU bench's harness on the same tensors as torch's copy (and our kernel, with --build): which
trait costs the probe's lead (0.99 of copy against ours 0.955, bench/results/h200_2026-11-29i)?
bf16 BMHK, angles from base 10000. GPU us (bench_gpu.Timer: L2 flushed, median of 30), rounds
interleaved; every variant's output is checked bit for bit against the unmorphed probe's.

    nvcc -O3 -std=c++17 -arch=sm_90 -shared -Xcompiler -fPIC bench/probe_morph.cu -o /tmp/libmorph.so
    python3 -m bench.probe_morph --lib /tmp/libmorph.so [--build build-gpu]
"""

from __future__ import annotations

import argparse
import ctypes

import torch

from bench.bench_gpu import Timer
from bench.probe_torch import SHAPES, theta_hilo

TRAITS = {1: "flat", 2: "branchy", 4: "pairs", 8: "pdl", 16: "geometry", 32: "pos64", 64: "scale", 128: "two"}
# each trait alone, the first four together (measured in h200_2026-11-29i), the other four
# together, with the flat block, and all eight (the instances bench/probe_morph.cu builds)
VARIANTS = [0, 1, 2, 4, 8, 3, 15, 16, 32, 64, 129, 240, 241, 255]


def name_of(variant: int) -> str:
    if variant == 255:
        return "all"
    return "+".join(n for bit, n in TRAITS.items() if variant & bit) or "probe"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lib", default="/tmp/libmorph.so")
    ap.add_argument("--build", help="also time our kernel from this raw build")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", default="128,256", help="block sizes to time each variant with")
    args = ap.parse_args()
    lib = ctypes.CDLL(args.lib)
    lib.LaunchMorph.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p] + [ctypes.c_int] * 4 + [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    raw = None
    if args.build:
        from tests.raw_driver import load_raw
        raw = load_raw(args.build)
    timer = Timer(reps=30, b2b_reps=10)
    stream = torch.cuda.current_stream().cuda_stream
    print(f"# {torch.cuda.get_device_name()}: GPU us, L2 flushed, median of 30; columns: variant/threads per block")
    for shape in SHAPES:
        B, M, H, K = shape
        x = torch.randn(shape, device="cuda").to(torch.bfloat16)
        out = torch.empty_like(x)
        theta = theta_hilo(K)
        pairs = torch.stack([theta[: K // 2], theta[K : K + K // 2]], dim=1).contiguous()  # (K/2, 2): hi, lo

        def morph(variant: int, threads: int):
            return lambda: lib.LaunchMorph(variant, x.data_ptr(), out.data_ptr(), B, M, H, K, theta.data_ptr(),
                                           pairs.data_ptr(), threads, stream)

        assert morph(0, 256)() == 0
        torch.cuda.synchronize()
        ref = out.clone()
        runs = {"copy": lambda: out.copy_(x)}
        if raw is not None:
            from bench.sweep_launch import make_plan
            plan, keep = make_plan(raw, shape, "bfloat16", "BMHK", "plane", "base")
            runs["ours"] = lambda: plan.run_cuda(stream)
        same = []
        for variant in VARIANTS:
            for threads in (int(t) for t in args.threads.split(",")):
                out.zero_()
                assert morph(variant, threads)() == 0, (variant, threads)
                torch.cuda.synchronize()
                same.append(torch.equal(out, ref))
                runs[f"{name_of(variant)}/{threads}"] = morph(variant, threads)
        print(f"# shape {shape} bf16 BMHK base: every variant's output equals the probe's: {all(same)}")
        names = list(runs)
        print("round " + " ".join(f"{n:>20s}" for n in names))
        for r in range(args.rounds):
            print(f"{r:<5d} " + " ".join(f"{timer.gpu_us(runs[n]):20.2f}" for n in names), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
