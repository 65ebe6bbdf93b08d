"""Sweeps the vector kernel's launch shape (ONEFLOW_ROPE_TUNE="prefetch,units_per_block,
min_blocks_per_sm") over a few representative calls; one process per setting.

    python bench/sweep_launch.py --build build-gpu
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

CONFIGS = [  # (shape, dtype, layout, mode, variant)
    ((4, 4096, 32, 128), "float16", "BMHK", "plane", "base"),
    ((4, 4096, 32, 128), "float16", "BMHK", "interval", "base"),
    ((4, 4096, 32, 128), "float16", "BMHK", "plane", "partial"),
    ((4, 4096, 32, 128), "bfloat16", "BMHK", "plane", "table"),
    ((4, 4096, 32, 128), "float32", "BMHK", "plane", "base"),
    ((2, 8192, 8, 128), "float16", "BMHK", "plane", "base"),
    ((1, 4096, 32, 128), "float16", "BM(H3K)", "plane", "base"),
    ((1, 1, 32, 128), "float16", "BMHK", "plane", "base"),
    ((8, 1, 32, 128), "float16", "BMHK", "plane", "table"),
]


SETTINGS = ["0,256,2", "2,256,2", "2,512,2", "1,512,2", "1,128,2", "1,256,4"]


def worker(build: str) -> None:
    sys.path.insert(0, build)
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    import torch
    import _rope_raw as raw
    from raw_driver import rope

    flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    stream = torch.cuda.current_stream().cuda_stream

    def gpu_us(fn, reps=30):
        for _ in range(3):
            fn()
        ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
        for s, e in ev:
            flush.zero_()
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) * 1e3 for s, e in ev)

    out = []
    for shape, dtype, layout, mode, variant in CONFIGS:
        B, M, H, K = shape
        dt = getattr(torch, dtype)
        x = torch.empty(B, M, H * 3 * K if layout == "BM(H3K)" else H, *(() if layout == "BM(H3K)" else (K,)),
                        dtype=dt, device="cuda").uniform_(-1, 1)
        kw = {"k_size": K} if layout == "BM(H3K)" else {}
        cos = sin = None
        if variant == "table":
            cos = torch.rand(M, K, dtype=dt, device="cuda")
            sin = torch.rand(M, K, dtype=dt, device="cuda")
        if variant == "partial":
            kw["rotary_size"] = K // 2
        params = rope(raw, x, cos, sin, layout=layout, mode=mode, plan_only=True, **kw)
        out.append(gpu_us(lambda: raw.forward_cuda(params, stream)))
        n = B * M * H * K
        src = torch.empty(n, dtype=dt, device="cuda")
        dst = torch.empty_like(src)
        out.append(gpu_us(lambda: dst.copy_(src)))
    print(" ".join(f"{v:.2f}" for v in out))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build-gpu")
    ap.add_argument("--worker", action="store_true")
    args = ap.parse_args()
    if args.worker:
        worker(args.build)
        return 0
    print("# rows: ONEFLOW_ROPE_TUNE; columns: each config's GPU us (fraction of copy)")
    for i, c in enumerate(CONFIGS):
        print(f"# c{i}: {c}")
    for tune in SETTINGS:
        res = subprocess.run([sys.executable, __file__, "--worker", "--build", args.build],
                             env=dict(os.environ, ONEFLOW_ROPE_TUNE=tune), capture_output=True, text=True)
        if res.returncode != 0:
            print(tune, "failed", res.stderr[-300:])
            continue
        vals = [float(v) for v in res.stdout.split()]
        cells = [f"{vals[2 * i]:7.1f} ({vals[2 * i + 1] / vals[2 * i]:.2f})" for i in range(len(CONFIGS))]
        print(f"{tune:12s} " + " ".join(cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
