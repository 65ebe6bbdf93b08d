"""Markdown summary of a bench_gpu.py JSON file: GPU time (us) and fraction of the copy's
bandwidth per shape and dtype, for BMHK (plane and interval) and the peers that apply.

    python bench/summarize.py bench/results/h100_2026-11-27/bench.json [--layout BMHK]
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("json")
    ap.add_argument("--layout", default="BMHK")
    args = ap.parse_args()
    data = json.load(open(args.json))
    rows = data["rows"]
    print(data["header"].replace("# ", "").replace("\n", "  \n"))
    impls = ["ours-base", "ours-table", "ours-partial", "compile", "eager", "liger", "torchtune"]
    for mode in ("plane", "interval"):
        print(f"\n{args.layout}, {mode}: GPU us (fraction of copy)\n")
        print("| shape | dtype | copy | " + " | ".join(impls) + " |")
        print("|---" * (3 + len(impls)) + "|")
        keys = sorted({(tuple(r["shape"]), r["dtype"]) for r in rows}, key=lambda k: (k[0][0] * k[0][1] * k[0][2], k[0], k[1]))
        for shape, dtype in keys:
            def cell(impl, layout=args.layout):
                m = [r for r in rows if tuple(r["shape"]) == shape and r["dtype"] == dtype and r["impl"] == impl
                     and r["mode"] in (mode, "-") and r["layout"] in (layout, "-")]
                if not m and impl == "liger" and layout != "BHMK":  # Liger takes BHMK
                    return cell(impl, "BHMK")
                return f"{m[0]['gpu_us']:.1f} ({m[0]['of_copy']:.2f})" if m else "-"
            print(f"| {shape} | {dtype} | {cell('copy')} | " + " | ".join(cell(i) for i in impls) + " |")


if __name__ == "__main__":
    main()
