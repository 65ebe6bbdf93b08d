"""CPU benchmark of fused_apply_rotary_emb against memory speed (issue 10): OneFlow's clone of the
same number of bytes, the OneFlow composite x*cos + rotate(x)*sin, and numpy.

    python -m bench.bench_cpu [--quick] [--threads N] [--reps R] [--shapes ...] [--json out.json]

For each shape (B, M, H, K), dtype, layout of x, mode and direction (forward: the op; backward: its
grad op, dy -> dx in x's layout with the zero slots of a packed x), one row:

  ours       the op through OneFlow (eager, what a user calls), angles computed from base
             (the "+table" rows: cos/sin tables of x's dtype and int64 position_ids);
  clone      OneFlow's clone of a contiguous tensor of x's dtype holding (read + written) / 2
             bytes: the same traffic at memory speed (for an unpacked x: clone of x);
  ratio      ours / clone (issue 10 asks >= 0.8);
  composite  the same rotation written with OneFlow ops (BMHK rows; OneFlow 0.9.0 has no CPU
             bfloat16 multiply), backward: the same with -sin;
  numpy      the same with numpy (float32, float64, float16);
  slotcp     forward of a packed layout: OneFlow's copy of the slot (x.view(.., H, slots, K)[..., 0, :]
             .contiguous(), the same strided read as ours), for context.

Bandwidth = bytes read + bytes written per second: read x (a packed x: the selected slot only) or
dy, written out or dx. Each call is synchronised (OneFlow's eager Sync) and timed alone, after the
last-level cache is flushed (a buffer of three times its size is read) when the call moves at least
a quarter of that cache, as the GPU bench flushes L2 (smaller calls, not flushed, are timed
--small-reps times): otherwise a 16 MiB tensor read back from the
last call's cache makes clone look faster than memory (--no-flush: no flush at all). Ours and clone alternate call by call (so that load from
other processes hits both alike) and the best of --reps calls is kept. OneFlow's intra-op thread
setting is set with flow.set_num_threads(--threads, default: all cores); the kernel uses it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

import oneflow_rope  # noqa: E402  (loads OneFlow's CUDA libraries before `import oneflow`)
import oneflow as flow  # noqa: E402
from oneflow_rope import ops  # noqa: E402
from oneflow_rope.layout import infer_shapes  # noqa: E402

from tests.cases import layout_shape  # noqa: E402

SHAPES = [(1, 2048, 32, 128), (4, 512, 32, 128), (8, 1, 32, 128)]
LAYOUTS = ("BMHK", "BHMK", "MBHK", "BM(HK)", "MB(HK)", "BM(H2K)", "MB(H2K)", "BM(H3K)", "MB(H3K)")
DTYPES = ("float32", "bfloat16", "float16", "float64")
MODES = ("plane", "interval")
BOUND = 0.8
SIZE = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}
sync = flow._oneflow_internal.eager.Sync


def machine() -> str:
    model = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical cores"


def last_level_cache_bytes() -> int:
    """Size of the largest CPU cache (sysfs), 32 MiB when it cannot be read."""
    best = 0
    root = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(root):
            try:
                with open(os.path.join(root, entry, "size")) as f:
                    text = f.read().strip()
            except OSError:
                continue
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            digits = text[:-1] if text[-1:] in "KMG" else text
            if digits.isdigit():
                best = max(best, int(digits) * scale)
    except OSError:
        pass
    return best or 32 << 20


class CacheFlush:
    """Reads a buffer of three times the last-level cache, so the next call starts with none of
    its data cached (clean lines only: nothing for the next call to write back)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.buffer = np.ones(3 * last_level_cache_bytes() // 8) if enabled else None

    def __call__(self) -> None:
        if self.enabled:
            self.buffer.sum()


FLUSH = CacheFlush(False)  # main() sets it
SMALL_REPS = 200  # main() sets it (--small-reps)


def best_interleaved(fns: List[Callable[[], object]], reps: int, flush: bool = True) -> List[float]:
    """Seconds of the fastest of `reps` calls of each fn, the fns called in turn, each after a
    cache flush (when `flush`)."""
    for fn in fns:
        fn()
    sync()
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            if flush:
                FLUSH()
            t0 = time.perf_counter()
            fn()
            sync()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def best_alone(fn: Callable[[], object], reps: int) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def random_tensor(shape, dtype: str) -> flow.Tensor:
    return flow.tensor(np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)).to(getattr(flow, dtype))


# ---- peers (BMHK): OneFlow composite and numpy ----------------------------------------------------

def tables_np(M: int, K: int, mode: str, base: float = 10000.0):
    j = np.arange(K)
    i = j % (K // 2) if mode == "plane" else j // 2
    angle = np.arange(M, dtype=np.float64)[:, None] * (base ** (-2.0 * i / K))[None, :]
    return np.cos(angle), np.sin(angle)


def composite_flow(x: flow.Tensor, cos: flow.Tensor, sin: flow.Tensor, mode: str) -> flow.Tensor:
    K = x.shape[-1]
    if mode == "plane":
        rotated = flow.cat([x[..., K // 2:] * -1.0, x[..., : K // 2]], dim=-1)
    else:
        pairs = x.reshape(*x.shape[:-1], K // 2, 2)
        rotated = flow.stack([pairs[..., 1] * -1.0, pairs[..., 0]], dim=-1).reshape(*x.shape)
    return x * cos + rotated * sin


def composite_numpy(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, mode: str) -> np.ndarray:
    K = x.shape[-1]
    if mode == "plane":
        rotated = np.concatenate([-x[..., K // 2:], x[..., : K // 2]], axis=-1)
    else:
        rotated = np.empty_like(x)
        rotated[..., 0::2] = -x[..., 1::2]
        rotated[..., 1::2] = x[..., 0::2]
    return x * cos + rotated * sin


def peers(shape, dtype: str, mode: str, backward: bool, reps: int) -> Tuple[Optional[float], Optional[float]]:
    """(composite, numpy) seconds for BMHK x of `shape`; None where unsupported."""
    B, M, H, K = shape
    c, s = tables_np(M, K, mode)
    if backward:
        s = -s
    comp = nump = None
    if dtype != "bfloat16":
        x = random_tensor(shape, dtype)
        cos = flow.tensor(c.reshape(1, M, 1, K)).to(getattr(flow, dtype))
        sin = flow.tensor(s.reshape(1, M, 1, K)).to(getattr(flow, dtype))
        try:
            comp = best_alone(lambda: composite_flow(x, cos, sin, mode), reps)
        except Exception:  # a CPU kernel OneFlow 0.9.0 lacks for this dtype
            comp = None
        npdt = {"float32": np.float32, "float64": np.float64, "float16": np.float16}[dtype]
        xn = np.random.default_rng(0).uniform(-1, 1, shape).astype(npdt)
        cn, sn = c.reshape(1, M, 1, K).astype(npdt), s.reshape(1, M, 1, K).astype(npdt)
        nump = best_alone(lambda: composite_numpy(xn, cn, sn, mode), reps)
    return comp, nump


# ---- ours ---------------------------------------------------------------------------------------

def slots_of(layout: str) -> int:
    return 3 if "3K" in layout else (2 if "2K" in layout else 1)


def measure(shape, dtype: str, layout: str, mode: str, table: bool, reps: int) -> Dict[str, object]:
    B, M, H, K = shape
    x = random_tensor(layout_shape(layout, B, M, H, K), dtype)
    kwargs = {"layout": layout, "mode": mode}
    if "(" in layout:
        kwargs["k_size"] = K
    cos = sin = pos = None
    if table:
        c, s = tables_np(M, K, mode)
        cos, sin = flow.tensor(c).to(getattr(flow, dtype)), flow.tensor(s).to(getattr(flow, dtype))
        pos = flow.tensor(np.tile(np.arange(M, dtype=np.int64), (B, 1)).reshape(B, 1, M))
    shapes = infer_shapes(tuple(x.shape), layout, mode=mode, k_size=kwargs.get("k_size"),
                          table_shape=None if cos is None else tuple(cos.shape),
                          position_ids_shape=None if pos is None else tuple(pos.shape))
    op = ops._prepare(x, cos, sin, pos, layout=layout, x_layout=None, output_layout=None, mode=mode,
                      tensor_index=None, k_size=kwargs.get("k_size"), base=10000.0, rotary_size=None,
                      seqlen_offsets=None, inv_freq=None, attention_scaling=1.0)
    dy = random_tensor(tuple(shapes.out_shape), dtype)
    item = SIZE[dtype]
    unit = B * M * H * K * item  # one unpacked tensor
    rows = {}
    for direction in ("forward", "backward"):
        if direction == "forward":
            nbytes = 2 * unit  # the slot read, out written

            def ours():
                return oneflow_rope.fused_apply_rotary_emb(x, cos, sin, pos, **kwargs)
        else:
            nbytes = unit + slots_of(layout) * unit  # dy read, dx written (zero slots included)

            def ours():
                # the grad op, as the op's autograd backward runs it
                return op.backward(dy, cos, sin, pos)
        ref = flow.empty(nbytes // 2 // item, dtype=getattr(flow, dtype))
        fns = [ours, lambda: ref.clone()]
        n = slots_of(layout)
        if direction == "forward" and n > 1:
            # what else a user would run to get the slot out: OneFlow's copy of it (a strided read
            # like ours), for context (the bound is against clone)
            fns.append(lambda: x.view(x.shape[0], x.shape[1], H, n, K)[:, :, :, 0].contiguous())
        # tensors of a few MiB and more start from memory; small ones (a decode step) stay warm, as
        # they would be in use (a flush would time OneFlow's own cold code and data, not the copy)
        # small calls take tens of us and the machine's load moves them by as much: best of more
        # calls (both ours and clone, interleaved as always)
        flush = nbytes >= last_level_cache_bytes() // 4
        times = best_interleaved(fns, reps if flush else max(reps, SMALL_REPS), flush=flush)
        t_ours, t_clone = times[0], times[1]
        rows[direction] = {"ours": nbytes / t_ours / 1e9, "clone": nbytes / t_clone / 1e9,
                           "ours_us": t_ours * 1e6, "clone_us": t_clone * 1e6, "bytes": nbytes,
                           "slot_copy": nbytes / times[2] / 1e9 if len(times) > 2 else None}
    return rows


def fmt(v: Optional[float]) -> str:
    return "    -" if v is None else f"{v:5.1f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="flow.set_num_threads (default: all cores)")
    parser.add_argument("--reps", type=int, default=12, help="calls timed per measurement (best kept)")
    parser.add_argument("--small-reps", type=int, default=200,
                        help="calls timed per measurement for calls that are not flushed (small ones; best kept)")
    parser.add_argument("--peer-reps", type=int, default=2, help="calls timed for the composite and numpy")
    parser.add_argument("--quick", action="store_true", help="BMHK and BM(H3K) only, no peers")
    parser.add_argument("--shapes", default=None, help="e.g. 1x2048x32x128,8x1x32x128")
    parser.add_argument("--dtypes", default=",".join(DTYPES))
    parser.add_argument("--layouts", default=None)
    parser.add_argument("--no-peers", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--no-flush", action="store_true", help="no cache flush before each timed call")
    args = parser.parse_args()
    global FLUSH
    FLUSH = CacheFlush(not args.no_flush)

    shapes = SHAPES if args.shapes is None else [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    layouts = args.layouts.split(",") if args.layouts else (("BMHK", "BM(H3K)") if args.quick else LAYOUTS)
    dtypes = args.dtypes.split(",")
    # OneFlow sets up its CPU device at its first op, with the thread count from OMP_NUM_THREADS
    # (its default: cores - 2, at least 1), overwriting a set_num_threads made before: one op
    # first, then the setting (measured: set first, a 2-thread call ran single-threaded)
    flow.zeros(1).numpy()
    flow.set_num_threads(args.threads)
    global SMALL_REPS
    SMALL_REPS = args.small_reps

    print(f"# {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(f"# machine: {machine()}; OneFlow {flow.__version__}, intra-op threads (flow.set_num_threads): "
          f"{args.threads}; kernel instruction set: {oneflow_rope._C.cpu_isa()}")
    print("# GB/s = (bytes read + bytes written) / s, best of "
          f"{args.reps} calls ({args.small_reps} for calls not flushed); clone: OneFlow clone of the same bytes; ratio = ours / clone (bound {BOUND}); "
          + ("no cache flush" if args.no_flush else
             f"last-level cache ({last_level_cache_bytes() >> 20} MiB) flushed before each timed call "
             "moving >= 1/4 of it"))
    results = []
    worst = []
    for shape in shapes:
        for dtype in dtypes:
            print(f"\n## shape (B, M, H, K) = {shape}, {dtype}")
            print(f"{'layout':10s} {'mode':8s} {'dir':8s} {'ours':>6s} {'clone':>6s} {'ratio':>6s} "
                  f"{'us':>8s} {'composite':>9s} {'numpy':>6s} {'slotcp':>6s}")
            variants = [(layout, False) for layout in layouts]
            if "BMHK" in layouts:
                variants.insert(1, ("BMHK", True))
            for layout, table in variants:
                for mode in MODES:
                    rows = measure(shape, dtype, layout, mode, table, args.reps)
                    for direction in ("forward", "backward"):
                        r = rows[direction]
                        comp = nump = None
                        if layout == "BMHK" and not table and not (args.quick or args.no_peers):
                            tc, tn = peers(shape, dtype, mode, direction == "backward", args.peer_reps)
                            comp = None if tc is None else r["bytes"] / tc / 1e9
                            nump = None if tn is None else r["bytes"] / tn / 1e9
                        ratio = r["ours"] / r["clone"]
                        name = layout + ("+table" if table else "")
                        mark = "" if ratio >= BOUND else "  < bound"
                        print(f"{name:10s} {mode:8s} {direction:8s} {r['ours']:6.1f} {r['clone']:6.1f} {ratio:6.2f} "
                              f"{r['ours_us']:8.0f} {fmt(comp):>9s} {fmt(nump):>6s} {fmt(r['slot_copy']):>6s}{mark}",
                              flush=True)
                        entry = {"shape": shape, "dtype": dtype, "layout": name, "mode": mode, "direction": direction,
                                 "ratio": ratio, "composite": comp, "numpy": nump, **r}
                        results.append(entry)
                        if ratio < BOUND:
                            worst.append(entry)
    print(f"\n# {len(results) - len(worst)} of {len(results)} rows at >= {BOUND} of clone")
    by_shape: Dict[Tuple, List[float]] = {}
    for e in results:
        by_shape.setdefault((e["shape"], e["dtype"]), []).append(e["ratio"])
    for (shape, dtype), ratios in by_shape.items():
        print(f"#   {str(shape):20s} {dtype:9s} ratio min {min(ratios):.2f}  median {float(np.median(ratios)):.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": sys.argv, "machine": machine(), "threads": args.threads,
                       "isa": oneflow_rope._C.cpu_isa(), "results": results}, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
