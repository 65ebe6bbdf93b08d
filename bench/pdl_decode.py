"""Programmatic dependent launch (PDL) of decode steps, on and off (_rope_raw.set_pdl), in one
process. A decode step's rotation follows another kernel (the q/k projection) and is followed by
one (attention, or the rotation of k); PDL lets it be scheduled while the kernel before it
finishes. Prints, per decode call, GPU us (one event pair, median; L2 emptied before each timed
sequence unless said) of:

  alone     the call by itself (the bench's figure; PDL cannot act: an event sits before it)
  after     a 1 MiB elementwise kernel (torch.mul) then the call, minus the elementwise kernel alone
  chain     20 calls captured in one CUDA graph and replayed (no host launch cost), per call
  pairs     20 x (elementwise kernel, call) in one CUDA graph, per pair, minus the elementwise
            kernel's own time per call in a graph of 20 of it

    python3 -m bench.pdl_decode --build build-gpu
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from bench.sweep_launch import make_plan
from tests.raw_driver import load_raw

CONFIGS = [  # as bench/sweep_launch.py's CONFIGS
    ((1, 1, 32, 128), "bfloat16", "BMHK", "plane", "base+offsets"),
    ((1, 1, 32, 128), "bfloat16", "BMHK", "plane", "table+pos"),
    ((16, 1, 32, 128), "bfloat16", "BMHK", "plane", "base+offsets"),
    ((64, 1, 32, 128), "bfloat16", "BMHK", "plane", "table+pos"),
    ((1, 1, 32, 128), "float32", "BMHK", "plane", "base+offsets"),
]
REPS = 50
GRAPH_CALLS = 20


def events_us(fn, flush: torch.Tensor | None, reps: int = REPS) -> float:
    """Median GPU us of fn() between one event pair (flush zeroed before each, when given)."""
    for _ in range(3):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        if flush is not None:
            flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends))


def graph_of(fn) -> torch.cuda.CUDAGraph:
    """fn() captured GRAPH_CALLS times in one CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(GRAPH_CALLS):
            fn()
    return g


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default="build-gpu")
    args = ap.parse_args()
    raw = load_raw(args.build)
    if not hasattr(raw, "set_pdl"):
        print("this build has no set_pdl")
        return 1
    flush = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device="cuda")
    src = torch.randn(512 * 1024, device="cuda", dtype=torch.bfloat16)  # 1 MiB
    dst = torch.empty_like(src)

    def producer() -> None:
        torch.mul(src, 2.0, out=dst)

    prod_alone = events_us(producer, flush)
    prod_graph = graph_of(producer)
    prod_graph_us = events_us(prod_graph.replay, flush) / GRAPH_CALLS
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}: python {' '.join(sys.argv)}")
    print(f"# elementwise kernel (torch.mul, 1 MiB bf16): alone {prod_alone:.2f} us; in a graph of {GRAPH_CALLS}: "
          f"{prod_graph_us:.2f} us each")
    print(f"{'call':<52s} {'pdl':>4s} {'alone':>7s} {'after':>7s} {'chain':>7s} {'pairs':>7s}")
    keep = []
    for config in CONFIGS:
        plan, tensors = make_plan(raw, *config)
        keep.append(tensors)
        for pdl in (False, True):
            raw.set_pdl(pdl)
            stream_of = lambda: torch.cuda.current_stream().cuda_stream  # noqa: E731 (the capture stream in graphs)
            call = lambda: plan.run_cuda(stream_of())  # noqa: E731
            alone = events_us(call, flush)
            after = events_us(lambda: (producer(), call()), flush) - prod_alone
            chain = events_us(graph_of(call).replay, flush) / GRAPH_CALLS
            pairs = events_us(graph_of(lambda: (producer(), call())).replay, flush) / GRAPH_CALLS - prod_graph_us
            label = f"{config[0]} {config[1]} {config[3]} {config[4]}"
            print(f"{label:<52s} {'on' if pdl else 'off':>4s} {alone:7.2f} {after:7.2f} {chain:7.2f} {pairs:7.2f}",
                  flush=True)
    raw.set_pdl(True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
