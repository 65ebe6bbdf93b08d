"""Summarises an Nsight Compute source page (`ncu -i rep --page source --csv --print-source sass`,
as bench/run_gpu.sh's step "profile" writes it): per kernel, the warp-stall samples by reason and
the instructions holding the most samples, with their reasons.

    python3 bench/ncu_stalls.py profile_source.csv[.gz] [--top 12] [--kernel N]
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import sys
from typing import Dict, List


def load(path: str) -> List[Dict]:
    raw = gzip.open(path, "rt") if path.endswith(".gz") else open(path)
    kernels: List[Dict] = []
    cur = None
    for row in csv.reader(io.StringIO(raw.read())):
        if not row:
            continue
        if row[0] == "Kernel Name":
            cur = {"name": row[1], "rows": [], "hdr": None}
            kernels.append(cur)
        elif row[0] == "Address" and cur is not None:
            cur["hdr"] = row
        elif cur is not None and cur["hdr"] is not None:
            cur["rows"].append(row)
    return [k for k in kernels if k["rows"]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--kernel", type=int, help="only the N-th kernel (0-based)")
    args = ap.parse_args()
    for n, k in enumerate(load(args.path)):
        if args.kernel is not None and n != args.kernel:
            continue
        hdr = k["hdr"]
        col = {h: i for i, h in enumerate(hdr)}
        reasons = [h for h in hdr if h.startswith("stall_") and "Not Issued" not in h]

        def num(row, name):
            try:
                return float(row[col[name]])
            except (ValueError, KeyError, IndexError):
                return 0.0

        total = sum(num(r, "Warp Stall Sampling (All Samples)") for r in k["rows"])
        insts = sum(num(r, "Instructions Executed") for r in k["rows"])
        by_reason = {h: sum(num(r, h) for r in k["rows"]) for h in reasons}
        print(f"== kernel {n}: {k['name'][:160]}")
        print(f"   samples {total:.0f}, warp instructions executed {insts:.0f}, SASS lines {len(k['rows'])}")
        print("   " + ", ".join(f"{h[6:]} {v / max(total, 1):.0%}" for h, v in
                                 sorted(by_reason.items(), key=lambda kv: -kv[1]) if v / max(total, 1) >= 0.01))
        top = sorted(k["rows"], key=lambda r: -num(r, "Warp Stall Sampling (All Samples)"))[: args.top]
        for r in top:
            s = num(r, "Warp Stall Sampling (All Samples)")
            why = sorted(((num(r, h), h[6:]) for h in reasons), reverse=True)[:3]
            print(f"   {r[col['Address']][-5:]} {s / max(total, 1):5.1%}  {r[col['Source']].strip()[:60]:60s} "
                  + " ".join(f"{w} {v / max(s, 1):.0%}" for v, w in why if v))
    return 0


if __name__ == "__main__":
    sys.exit(main())
