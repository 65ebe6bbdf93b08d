"""Sweeps the CUDA kernel's launch shape (items per thread x threads per block, forced through
_rope_raw.set_launch_override) over representative calls, against the built-in rule (0,0), in one
process. Prints one row per setting: GPU us of each call (L2 flushed, median) and its fraction of
a copy of the same bytes.

    python3 -m bench.sweep_launch --build build-gpu
"""

from __future__ import annotations

import argparse
import sys

import torch

from bench.bench_gpu import Timer, alloc, rope_tables, varlen_cu_seqlens
from tests.raw_driver import load_raw, rope

CONFIGS = [  # (shape, dtype, layout, mode, variant)
    ((4, 4096, 32, 128), "bfloat16", "BMHK", "plane", "base"),
    ((4, 4096, 32, 128), "bfloat16", "BMHK", "interval", "base"),
    ((4, 4096, 32, 128), "bfloat16", "BMHK", "plane", "table+pos"),
    ((4, 4096, 32, 128), "float32", "BMHK", "plane", "base"),
    ((4, 4096, 32, 128), "bfloat16", "BHMK", "plane", "table"),
    ((2, 8192, 8, 128), "bfloat16", "BMHK", "plane", "base"),
    ((2, 8192, 8, 128), "bfloat16", "BMHK", "plane", "table+pos"),
    ((16, 4096, 4, 128), "bfloat16", "BMHK", "plane", "table+pos"),
    ((1, 4096, 32, 128), "bfloat16", "BM(H3K)", "plane", "partial"),
    ((1, 1, 32, 128), "bfloat16", "BMHK", "plane", "table+pos"),
    ((64, 1, 32, 128), "bfloat16", "BMHK", "plane", "table+pos"),
    ((1, 1, 32, 128), "bfloat16", "BMHK", "plane", "base+offsets"),
    ((4, 4096, 32, 128), "bfloat16", "BMHK", "plane", "base+pos"),
    ((1, 4096, 32, 128), "bfloat16", "BMHK", "plane", "table+pos"),
    ((4, 4096, 32, 128), "bfloat16", "MBHK", "plane", "base"),
    ((4, 4096, 32, 128), "bfloat16", "BHMK", "plane", "base"),
    ((1, 4096, 32, 128), "bfloat16", "BHMK", "plane", "table+pos"),
    ((16, 1, 32, 128), "bfloat16", "BMHK", "plane", "base+offsets"),
    ((4, 1, 8, 128), "bfloat16", "BMHK", "plane", "table+pos"),
    ((1, 1, 32, 128), "float32", "BMHK", "plane", "base+offsets"),
    ((16, 1, 32, 128), "bfloat16", "BM(H3K)", "interval", "table+pos"),
    ((1, 131072, 32, 128), "bfloat16", "BMHK", "plane", "base+cu"),  # varlen: the bench's 64 sequences
    ((1, 131072, 32, 128), "bfloat16", "BMHK", "plane", "table+cu"),
]
# (items, threads[, persistent[, small]]): items 1, 2 or 4 heads per thread, 8 in builds with ROPE_TABLE_ITEMS=8
# (0: the rule's; the persistent grid takes 1 or 4); persistent 1 the
# persistent grid, 0 a block per piece, -1 (or left out) the rule's choice; small 0 keeps one-head
# calls off the small-call kernel (RopeSmallKernel), -1 (or left out) the rule's choice
SETTINGS = [(0, 0), (1, 256), (4, 256), (1, 128), (4, 128), (4, 512), (0, 0, 0), (0, 0, 1)]


def override(setting) -> tuple[int, int, int, int]:
    """(items, threads, persistent, small kernel) of a SETTINGS entry (-1 for those left out)."""
    full = tuple(setting) + (-1,) * (4 - len(setting))
    return full[0], full[1], full[2], full[3]


def make_plan(raw, shape, dname: str, layout: str, mode: str, variant: str):
    """The raw module's plan of one config (shape, dtype, layout, mode, variant as in CONFIGS), and
    the tensors it reads and writes (keep them alive while the plan runs)."""
    B, M, H, K = shape
    dtype = getattr(torch, dname)
    x = alloc(layout, B, M, H, K, dtype)
    out = alloc(layout if "3" not in layout else "BM(HK)", B, M, H, K, dtype)
    kw = {"k_size": K} if "(" in layout else {}
    cos = sin = pos = offsets = None
    if variant.startswith("table"):
        cos, sin = rope_tables(max(M, 8192), K, mode, dtype)
    if variant.endswith("pos"):
        pos = torch.randint(0, max(M, 8192), (B, 1, M), device="cuda")
    rot = K // 2 if variant == "partial" else None
    params = rope(raw, x, cos, sin, pos, layout=layout, out=out, mode=mode, rotary_size=rot, plan_only=True, **kw)
    if variant.endswith("offsets"):  # KV-cache lengths as seqlen_offsets
        offsets = torch.randint(0, 8192, (B,), device="cuda")
        params.update(seqlen_offsets=offsets.data_ptr(), offsets_dtype="int64")
    if variant.endswith("cu"):  # varlen (T, H, K) as B = 1, M = T: the bench's 64 sequences
        offsets = varlen_cu_seqlens(M, 64).to(device="cuda", dtype=torch.int32)
        params.update(cu_seqlens=offsets.data_ptr(), cu_seqlens_dtype="int32", num_seqs=64, cu_seqlens_total=M)
    return raw.Plan(params), [x, out, cos, sin, pos, offsets]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--build", default="build-gpu")
    ap.add_argument("--settings", help="'items,threads[,persistent];...' (default: a built-in list; '0,0' is the rule)")
    ap.add_argument("--once", action="store_true", help="launch each config once, no timing (for ncu)")
    ap.add_argument("--configs", help="indices of CONFIGS to run, e.g. '0,5' (default: all)")
    ap.add_argument("--pdl", type=int, choices=(0, 1), default=1,
                    help="0: programmatic dependent launch off (raw set_pdl) for the whole sweep")
    args = ap.parse_args()
    settings = SETTINGS if not args.settings else [tuple(int(v) for v in t.split(",")) for t in args.settings.split(";")]
    raw = load_raw(args.build)
    if hasattr(raw, "set_pdl"):
        raw.set_pdl(bool(args.pdl))
    configs = CONFIGS if not args.configs else [CONFIGS[int(i)] for i in args.configs.split(",")]

    timer = Timer(reps=20, b2b_reps=20)
    stream = torch.cuda.current_stream().cuda_stream
    plans, copies = [], []
    keep = []
    for config in configs:
        plan, tensors = make_plan(raw, *config)
        plans.append(plan)
        keep += tensors
        (B, M, H, K), dtype = config[0], getattr(torch, config[1])
        src = torch.empty(B * M * H * K, dtype=dtype, device="cuda")
        copies.append(timer.gpu_us(lambda dst=torch.empty_like(src), src=src: dst.copy_(src)))
    if args.once:  # each config once under each setting given (default: the rule)
        for setting in settings if args.settings else [(0, 0)]:
            raw.set_launch_override(*override(setting))
            for plan in plans:
                plan.run_cuda(stream)
        raw.set_launch_override(0, 0, -1, -1)
        torch.cuda.synchronize()
        return 0
    print(f"# {torch.cuda.get_device_name()}: python {' '.join(sys.argv)}  (PDL {'on' if args.pdl else 'off'})")
    names = [f"c{i}" for i in (range(len(CONFIGS)) if not args.configs else args.configs.split(","))]
    for name, c, copy in zip(names, configs, copies):
        print(f"# {name}: {c}  copy {copy:.2f} us")
    print("setting    " + " ".join(f"{name:>14s}" for name in names))
    for setting in settings:
        ipt, threads, persistent, small = override(setting)
        raw.set_launch_override(ipt, threads, persistent, small)
        cells = []
        for plan, copy in zip(plans, copies):
            us = timer.gpu_us(lambda: plan.run_cuda(stream))
            cells.append(f"{us:7.2f} ({copy / us:.2f})")
        label = f"{ipt},{threads}" + (f",{persistent}" if persistent >= 0 or small >= 0 else "") + (f",{small}" if small >= 0 else "")
        print(f"{label:<10s} " + " ".join(f"{c:>14s}" for c in cells), flush=True)
    raw.set_launch_override(0, 0, -1, -1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
