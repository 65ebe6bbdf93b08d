"""Markdown summary of a bench_gpu.py JSON file: per regime, our GPU time against the copy of the
same bytes, torch.compile and the regime's bound; and a table of BMHK calls for one dtype.

    python bench/summarize.py bench/results/h200_2026-11-28/bench.json [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("json")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    data = json.load(open(args.json))
    rows = data["rows"]
    print(data["header"].replace("# ", "").replace("\n", "  \n"))
    print("\n| regime | calls | of copy: min / median / max | our time / bound: median / worst | "
          "worst against x's copy alone | calls meeting the bound |")
    print("|---|---|---|---|---|---|")
    groups = defaultdict(list)
    for r in rows:
        groups[r["regime"]].append(r)
    for regime, rs in groups.items():
        oc = [r["of_copy"] for r in rs]
        rb = [r["ratio_to_bound"] for r in rs]
        rx = [r.get("ratio_to_x_copy_bound", r["ratio_to_bound"]) for r in rs]
        meet = sum(v <= 1.0 for v in rb)
        print(f"| {regime} | {len(rs)} | {min(oc):.2f} / {statistics.median(oc):.2f} / {max(oc):.2f} | "
              f"{statistics.median(rb):.2f} / {max(rb):.2f} | {max(rx):.2f} | {meet} |")
    print(f"\n{args.dtype}, BMHK, GPU µs (L2 flushed):\n")
    print("| shape | mode | variant | ours | copy | torch.compile | eager |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if r["layout"] != "BMHK" or r["dtype"] != args.dtype or r["regime"] not in ("base", "table", "decode"):
            continue
        eager = r["note"].split("eager ")[1].split(" us")[0] if "eager " in r["note"] else "-"
        comp = f"{r['compile_us']:.1f}" if r["compile_us"] else "-"
        print(f"| {tuple(r['shape'])} | {r['mode']} | {r['variant']} | {r['ours_us']:.1f} | {r['copy_us']:.1f} | "
              f"{comp} | {eager} |")


if __name__ == "__main__":
    main()
