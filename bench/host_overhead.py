"""Host time of one eager call of oneflow_rope.fused_apply_rotary_emb against OneFlow built-ins.

The bound (issue 9): each of our calls costs at most twice one flow.mul on the same tensor, in
the same process: for angles from base, cos/sin tables, and tables with position_ids, without
grad against flow.mul, with x.requires_grad against flow.mul with grad; the same for the LLM inputs
(issue 12): a tensor of seqlen_offsets, inv_freq with attention_scaling, and q and k (GQA: a
quarter of the heads) in one call, also in place. Not bound, shown for what they cost: an int
seqlen_offsets whose value changes at every call (each new value is an attribute OneFlow's eager
inference cache has not seen: one shape inference per call; a decode loop should pass a tensor),
and the opt-in position check. Also one LLaMA decode step of RoPE (q of one token, a cos/sin
cache, position_ids) written with plain OneFlow ops against ours.

Each row is timed back to back (calls in a loop, results dropped), in rounds that interleave all
rows; a row's figure is its best round. Two clocks: the wall time per call, and the CPU time of the
calling thread per call ("host"), which leaves out the time OneFlow's worker threads spend running
the kernels (on a machine with few cores they compete with the calling thread for the CPU).

    .venv/bin/python -m bench.host_overhead [--shape 1 1 32 128] [--calls 2000] [--rounds 15]

Prints the table (markdown) with the command and the machine in its header; exits 1 when the
bound does not hold.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from typing import Callable, Dict, List, Tuple

import oneflow_rope  # before oneflow: makes OneFlow's CUDA libraries loadable

import oneflow as flow  # noqa: E402

BOUND = 2.0


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def plain_decode_rope(q: flow.Tensor, cos_cache: flow.Tensor, sin_cache: flow.Tensor,
                      position_ids: flow.Tensor) -> flow.Tensor:
    """RoPE of q (B, M, H, K) at position_ids (B, 1, M) from (P, K) caches with plain OneFlow ops,
    as a LLaMA decode step writes it: gather the rows, rotate half, multiply and add."""
    B, M, _, K = q.shape
    rows = position_ids.reshape(-1)
    cos = flow.index_select(cos_cache, 0, rows).reshape(B, M, 1, K)
    sin = flow.index_select(sin_cache, 0, rows).reshape(B, M, 1, K)
    rotated = flow.cat([-q[..., K // 2:], q[..., : K // 2]], dim=-1)
    return q * cos + rotated * sin


def time_rows(rows: Dict[str, Callable[[], object]], *, calls: int, rounds: int) -> Dict[str, Tuple[float, float]]:
    """{name: (wall us per call, calling-thread CPU us per call)}, best round of each row."""
    best = {name: (float("inf"), float("inf")) for name in rows}
    for fn in rows.values():  # warm up: prepares every signature, fills OneFlow's caches
        for _ in range(50):
            fn()
    for _ in range(rounds):
        for name, fn in rows.items():
            wall0, cpu0 = time.perf_counter_ns(), time.thread_time_ns()
            for _ in range(calls):
                fn()
            cpu1, wall1 = time.thread_time_ns(), time.perf_counter_ns()
            wall, cpu = (wall1 - wall0) / calls / 1e3, (cpu1 - cpu0) / calls / 1e3
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return best


def table_lines(results: Dict[str, Tuple[float, float]], *, baselines: Dict[str, str]) -> List[str]:
    lines = ["| call | wall µs/call | host µs/call | host / baseline |", "|---|---|---|---|"]
    for name, (wall, cpu) in results.items():
        base = baselines.get(name)
        ratio = f"{cpu / results[base][1]:.2f} (of {base})" if base else "-"
        lines.append(f"| {name} | {wall:.1f} | {cpu:.1f} | {ratio} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", type=int, nargs=4, default=[1, 1, 32, 128], metavar=("B", "M", "H", "K"))
    parser.add_argument("--calls", type=int, default=2000, help="calls per row and round")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--table-rows", type=int, default=4096, help="rows of the cos/sin cache")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    B, M, H, K = args.shape
    rope = oneflow_rope.fused_apply_rotary_emb
    rope_qk = oneflow_rope.fused_apply_rotary_emb_qk
    x = flow.randn(B, M, H, K, device=args.device)
    x_grad = flow.randn(B, M, H, K, device=args.device).requires_grad_(True)
    cos, sin = oneflow_rope.cos_sin_table(args.table_rows, K, device=args.device)
    position_ids = flow.full((B, 1, M), args.table_rows - 1, dtype=flow.int64, device=args.device)
    offsets = flow.full((B,), 17, dtype=flow.int32, device=args.device)
    k = flow.randn(B, M, max(1, H // 4), K, device=args.device)
    k_grad = flow.randn(B, M, max(1, H // 4), K, device=args.device).requires_grad_(True)
    inv_freq = 1.0 / (10000.0 ** (flow.arange(0, K, 2, dtype=flow.float32, device=args.device) / K))
    step = iter(range(1, 1 << 62))  # an int seqlen_offsets that changes at every call

    rows = {
        "flow.mul": lambda: flow.mul(x, x),
        "ours, base": lambda: rope(x),
        "ours, table": lambda: rope(x, cos, sin),
        "ours, table + position_ids": lambda: rope(x, cos, sin, position_ids),
        "ours, seqlen_offsets (B,) tensor": lambda: rope(x, seqlen_offsets=offsets),
        "ours, seqlen_offsets int, new value each call": lambda: rope(x, seqlen_offsets=next(step)),
        "ours, inv_freq + attention_scaling": lambda: rope(x, inv_freq=inv_freq, attention_scaling=0.9),
        "ours, q+k (GQA) + seqlen_offsets": lambda: rope_qk(x, k, seqlen_offsets=offsets),
        "ours, q+k (GQA) + seqlen_offsets, in place": lambda: rope_qk(x, k, seqlen_offsets=offsets, inplace=True),
        "flow.mul, with grad": lambda: flow.mul(x_grad, x_grad),
        "ours, base, with grad": lambda: rope(x_grad),
        "ours, table, with grad": lambda: rope(x_grad, cos, sin),
        "ours, table + position_ids, with grad": lambda: rope(x_grad, cos, sin, position_ids),
        "ours, q+k (GQA) + seqlen_offsets, with grad": lambda: rope_qk(x_grad, k_grad, seqlen_offsets=offsets),
        "ours, table + position_ids, check_positions=True": lambda: rope(x, cos, sin, position_ids,
                                                                         check_positions=True),
        "LLaMA decode RoPE, plain ops": lambda: plain_decode_rope(x, cos, sin, position_ids),
        "LLaMA decode RoPE, ours": lambda: rope(x, cos, sin, position_ids),
    }
    baselines = {name: ("flow.mul, with grad" if "with grad" in name else "flow.mul")
                 for name in rows if name.startswith("ours")}
    baselines["LLaMA decode RoPE, ours"] = "LLaMA decode RoPE, plain ops"
    results = time_rows(rows, calls=args.calls, rounds=args.rounds)
    if args.device != "cpu":
        flow.cuda.synchronize()

    print(f"# host overhead of one eager call, x of shape {tuple(args.shape)} float32 on {args.device}")
    print(f"# command: {' '.join(getattr(sys, 'orig_argv', sys.argv))}")
    print(f"# machine: {machine()}")
    print(f"# OneFlow {flow.__version__}, Python {platform.python_version()}, "
          f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; best of {args.rounds} rounds of "
          f"{args.calls} calls per row")
    for line in table_lines(results, baselines=baselines):
        print(line)
    checked = [n for n in baselines
               if "check_positions" not in n and "new value each call" not in n and not n.startswith("LLaMA")]
    worst = max(results[n][1] / results[baselines[n]][1] for n in checked)
    verdict = "holds" if worst <= BOUND else "does NOT hold"
    print(f"# bound: host time <= {BOUND:g}x flow.mul (with grad: flow.mul with grad) {verdict}; "
          f"worst ratio {worst:.2f}")
    return 0 if worst <= BOUND else 1


if __name__ == "__main__":
    sys.exit(main())
