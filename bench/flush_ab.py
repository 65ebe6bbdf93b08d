"""Our kernel against torch's copy of the same bytes under three ways of emptying L2 before each
timed call, in one process: "zero" (the bench's: a 256 MiB buffer zeroed, so L2 is left full of
dirty lines that must be written back during the timed call), "read" (the same buffer summed:
L2 left holding clean lines) and "none" (nothing between calls). Prints GPU us (median) and
ours / copy per call and mode, so the share of the gap that comes from the flush's write-backs
can be seen. torch.neg (an elementwise kernel moving the same bytes) is timed too, as copy_ is a
memcpy that ncu does not profile.

    python3 -m bench.flush_ab --build build-gpu            # timings
    python3 -m bench.flush_ab --build build-gpu --once     # each copy and kernel launched once (for ncu)
"""

from __future__ import annotations

import argparse
import sys

import torch

from bench.bench_gpu import Timer
from bench.sweep_launch import make_plan
from tests.raw_driver import load_raw

CONFIGS = [  # (shape, dtype, layout, mode, variant)
    ((4, 4096, 32, 128), "bfloat16", "BMHK", "plane", "base"),
    ((4, 4096, 32, 128), "bfloat16", "BMHK", "plane", "table+pos"),
    ((4, 4096, 32, 128), "float32", "BMHK", "plane", "base"),
    ((2, 8192, 8, 128), "bfloat16", "BMHK", "plane", "base"),
    ((2, 8192, 8, 128), "bfloat16", "BMHK", "interval", "base"),
    ((2, 8192, 8, 128), "bfloat16", "MBHK", "plane", "table+pos"),
    ((16, 4096, 4, 128), "bfloat16", "BMHK", "plane", "table+pos"),
]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--build", default="build-gpu")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--once", action="store_true")
    args = ap.parse_args()
    raw = load_raw(args.build)
    stream = torch.cuda.current_stream().cuda_stream
    timer = Timer(reps=args.reps, b2b_reps=0)  # its 256 MiB flush buffer serves all three modes
    flush_f = timer.flush.view(torch.float32)
    sink = torch.empty((), dtype=torch.float32, device="cuda")
    empty_l2 = {"zero": timer.flush.zero_, "read": lambda: torch.sum(flush_f, dim=0, out=sink), "none": lambda: None}

    def gpu_us(fn, mode: str) -> float:
        return timer.gpu_us(fn, empty_l2[mode])

    modes = ["zero", "read", "none"]
    if not args.once:
        print(f"# {torch.cuda.get_device_name()}: python {' '.join(sys.argv)}")
        print(f"{'call':58s} " + " ".join(f"{m + ' copy':>10s} {m + ' neg':>10s} {m + ' ours':>10s} {'ratio':>6s}" for m in modes))
    for shape, dname, layout, mode, variant in CONFIGS:
        B, M, H, K = shape
        dtype = getattr(torch, dname)
        plan, keep = make_plan(raw, shape, dname, layout, mode, variant)  # keep: the plan's tensors, alive
        src = torch.empty(B * M * H * K, dtype=dtype, device="cuda").uniform_(-1, 1)
        dst = torch.empty_like(src)
        if args.once:
            torch.cuda.synchronize()
            torch.neg(src, out=dst)  # an elementwise kernel moving the copy's bytes (copy_ is a memcpy)
            plan.run_cuda(stream)
            torch.cuda.synchronize()
            continue
        cells = []
        for m in modes:
            c = min(gpu_us(lambda: dst.copy_(src), m) for _ in range(2))
            n = gpu_us(lambda: torch.neg(src, out=dst), m)
            o = gpu_us(lambda: plan.run_cuda(stream), m)
            cells.append(f"{c:10.2f} {n:10.2f} {o:10.2f} {o / c:6.3f}")
        name = f"{shape} {dname} {mode} {layout} {variant}"
        print(f"{name:58s} " + " ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
