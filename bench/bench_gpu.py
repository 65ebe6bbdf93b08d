"""GPU benchmark of the CUDA kernels against what a user would otherwise run, with bounds.

Regimes (each configuration is timed for our kernel and set against a bound):
  base       angles from base, large tensors (x >= 16 MiB)             bound 1.03 x min(copy, compile)
  table      cos/sin tables, without and with int32/int64 position_ids  bound 1.03 x min(copy, compile)
  partial    rotary_size = K/2, angles from base and from tables       bound 1.03 x min(copy, compile)
  rotary2    2-D RoPE (position_ids (B, 2, M)), base and tables         bound 1.03 x min(copy, compile)
  backward   the _grad op (dy -> dx in x's layout; zero slots of packed x) bound 1.03 x min(copy, compile)
  decode     M = 1, B in 1..64                                         bound 1.15 x copy; b2b <= copy b2b + 1 us
  packed-qk  q and k of one BM(H3K)/MB(H3K) tensor in one launch        bound 1.05 x copy of the two slices
  llm        decode step q+k one launch (vs two calls), float32 tables with bf16 x, inv_freq
  varlen     64 packed sequences of random lengths (cu_seqlens), 128K tokens  bound 1.03 x copy
`copy` is torch's device-to-device copy of x's bytes (read + written; the fraction-of-copy column);
the bounds use the copy of the same bytes the call must move (`copy_all`): x read and out written,
plus, where the call reads them, each cos/sin table row it uses once and its position_ids, offsets
or cu_seqlens (a copy moving x's bytes alone does less work than a call that also reads tables;
with 8 heads the tables add ~12% bytes). Copies are timed three times and the fastest median kept.
`compile` is torch.compile of the same function reading the same tables (peers: eager PyTorch,
torch.compile, Liger-Kernel and torchtune where installed). GPU time: L2 flushed (256 MiB zeroed) before each
call, one CUDA event pair per call, median. b2b: wall time per call of many calls in a row, no
flush (host dispatch included; ours through a prepared raw.Plan).

    python3 -m bench.bench_gpu --build build-gpu [--quick] [--json out.json] [--plot out.png]
           [--regimes base,table,...] [--compile-layouts BMHK,BM(H3K)] [--no-compile]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional, Tuple

import torch

from tests.raw_driver import extended_params, load_raw, rope, tensor_entry

LARGE_SHAPES = [(1, 4096, 32, 128), (4, 4096, 32, 128), (2, 8192, 8, 128), (16, 4096, 4, 128)]
DECODE_BATCHES = (1, 4, 16, 64)
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
LAYOUTS = ("BMHK", "BHMK", "MBHK", "BM(HK)", "MB(HK)", "BM(H3K)", "MB(H3K)")
MODES = ("plane", "interval")
DECODE_LAYOUTS = ("BMHK", "BM(H3K)")
PACKED_LAYOUTS = ("BM(H3K)", "MB(H3K)")
REGIMES = ("base", "table", "partial", "rotary2", "backward", "decode", "packed-qk", "llm", "varlen")
DEVICE = "cuda"  # --device cpu: a dry run of the whole script through the CPU kernel (no timing value)

BOUND = {"base": 1.03, "table": 1.03, "partial": 1.03, "rotary2": 1.03, "backward": 1.03, "decode": 1.15,
         "packed-qk": 1.05, "llm": 1.03, "varlen": 1.03}


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


class Timer:
    def __init__(self, reps: int, b2b_reps: int, warmup_ms: float = 0.0):
        self.reps = reps
        self.b2b_reps = b2b_reps
        self.warmup_ms = warmup_ms  # > 0: warm-up calls go on for at least this long (else 2 calls)
        if DEVICE == "cuda":
            self.flush = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device=DEVICE)
            self.starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
            self.ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]

    def gpu_us(self, fn: Callable[[], object], empty_l2: Optional[Callable[[], object]] = None) -> float:
        """Median GPU time of fn, L2 emptied before each call (by zeroing self.flush, or by
        `empty_l2` when given)."""
        for _ in range(2):
            fn()
        if DEVICE != "cuda":
            return self.b2b_us(fn)
        if self.warmup_ms > 0:
            t0 = time.perf_counter()
            while (time.perf_counter() - t0) * 1e3 < self.warmup_ms:
                self.flush.zero_()
                fn()
                sync()
        for i in range(self.reps):
            if empty_l2 is None:
                self.flush.zero_()
            else:
                empty_l2()
            self.starts[i].record()
            fn()
            self.ends[i].record()
        sync()
        return statistics.median(s.elapsed_time(e) * 1e3 for s, e in zip(self.starts, self.ends))

    def b2b_us(self, fn: Callable[[], object]) -> float:
        for _ in range(3):
            fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(self.b2b_reps):
            fn()
        sync()
        return (time.perf_counter() - t0) / self.b2b_reps * 1e6


# ---- peers -------------------------------------------------------------------------------------

def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    pairs = x.unflatten(-1, (-1, 2))
    return torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)


def make_peer(mode: str, kind: str, head_axis: int, rot: int):
    """The function a user would write (and torch.compile): x is the logical 4-D view in the
    layout's own axis order with the head axis at `head_axis`; tables are (P, A)."""
    rotate = rotate_half if mode == "plane" else rotate_pairs

    def gather(table, pos):  # pos: index tensor shaped like x without the head and K axes
        return table[pos].unsqueeze(head_axis)

    if kind == "table":   # tables indexed by m, pre-broadcast by the caller
        def f(x, c, s):
            return x * c + rotate(x) * s
    elif kind == "pos":
        def f(x, cos, sin, pos):
            return x * gather(cos, pos) + rotate(x) * gather(sin, pos)
    elif kind == "partial":
        def f(x, c, s):
            xr = x[..., :rot]
            return torch.cat((xr * c + rotate(xr) * s, x[..., rot:]), dim=-1)
    elif kind == "rotary2":
        def f(x, cos, sin, pos0, pos1):
            a = rot // 2
            x0, x1 = x[..., :a], x[..., a:rot]
            r0 = x0 * gather(cos, pos0) + rotate(x0) * gather(sin, pos0)
            r1 = x1 * gather(cos, pos1) + rotate(x1) * gather(sin, pos1)
            return torch.cat((r0, r1, x[..., rot:]), dim=-1)
    else:
        raise ValueError(kind)
    return f


def rope_tables(P: int, A: int, mode: str, dtype, base: float = 10000.0):
    j = torch.arange(A, device=DEVICE)
    i = (j % (A // 2)) if mode == "plane" else (j // 2)
    theta = base ** (-2.0 * i.double() / A)
    angle = torch.arange(P, device=DEVICE).double()[:, None] * theta[None, :]
    return angle.cos().to(dtype), angle.sin().to(dtype)


def extra_read_bytes(cos=None, positions=None, *others, rows: Optional[int] = None) -> int:
    """Bytes a call reads besides x: each cos/sin table row it uses, once (rows: the distinct
    positions, else every row of the table), and its index tensors (positions, offsets, ...)."""
    n = sum(t.numel() * t.element_size() for t in (positions, *others) if t is not None)
    if cos is not None:
        if rows is None:
            rows = cos.shape[0] if positions is None else int(torch.unique(positions).numel())
        n += 2 * min(rows, cos.shape[0]) * cos.shape[1] * cos.element_size()
    return n


# ---- layouts -----------------------------------------------------------------------------------

def slots_of(layout: str) -> int:
    return 3 if "H3K" in layout else (2 if "H2K" in layout else 1)


def unpacked(layout: str) -> str:
    return layout if slots_of(layout) == 1 else layout[:2] + "(HK)"


def alloc(layout: str, B: int, M: int, H: int, K: int, dtype) -> torch.Tensor:
    sizes = {"B": B, "M": M, "H": H, "K": K}
    if "(" in layout:
        shape = (sizes[layout[0]], sizes[layout[1]], H * slots_of(layout) * K)
    else:
        shape = tuple(sizes[c] for c in layout)
    return torch.empty(shape, dtype=dtype, device=DEVICE).uniform_(-1, 1)


def logical_view(x: torch.Tensor, layout: str, K: int, slot: int = 0) -> Tuple[torch.Tensor, int, bool]:
    """(4-D view in the layout's axis order, head axis, seq-first) for the peers."""
    if "(" not in layout:
        return x, layout.index("H"), layout[0] == "M"
    a, b, last = x.shape
    n = slots_of(layout)
    v = x.view(a, b, last // (n * K), n, K)[:, :, :, slot]
    return v, 2, layout[0] == "M"


# ---- the benchmark -----------------------------------------------------------------------------

class Bench:
    def __init__(self, args, raw):
        self.args = args
        self.raw = raw
        self.timer = Timer(reps=12 if args.quick else 30, b2b_reps=50 if args.quick else 200, warmup_ms=args.warmup_ms)
        self.stream = torch.cuda.current_stream().cuda_stream if DEVICE == "cuda" else 0
        self.rows: List[Dict] = []
        self.copy_cache: Dict[Tuple[int, str], Tuple[float, float]] = {}
        self.compiled: Dict = {}
        self.eager_cache: Dict = {}
        self.compile_layouts = set() if args.no_compile else set(args.compile_layouts.split(","))
        self.compile_shapes = (None if not args.compile_shapes else
                               {tuple(int(v) for v in t.split("x")) for t in args.compile_shapes.split(",")})

    def copy_us(self, nbytes: int, dtype) -> Tuple[float, float]:
        """(GPU, b2b) time of torch's copy of nbytes / 2 bytes (so nbytes are read + written): the
        fastest of three medians (one slow run of the copy would loosen every bound it sets)."""
        key = (nbytes, str(dtype))
        if key not in self.copy_cache:
            esize = torch.tensor([], dtype=dtype).element_size()
            n = max(1, nbytes // 2 // esize)
            src = torch.empty(n, dtype=dtype, device=DEVICE).uniform_(-1, 1)
            dst = torch.empty_like(src)
            gpu = min(self.timer.gpu_us(lambda: dst.copy_(src)) for _ in range(3))
            self.copy_cache[key] = (gpu, self.timer.b2b_us(lambda: dst.copy_(src)))
            del src, dst
        return self.copy_cache[key]

    def ours(self, params: dict):
        plan = self.raw.Plan(params)
        stream = self.stream
        if DEVICE != "cuda":
            return plan.run_cpu, "cpu"
        return (lambda: plan.run_cuda(stream)), self.raw.kernel_name(params)

    def peer(self, key, fn_args, mode, kind, head_axis, rot) -> Optional[float]:
        """GPU time of torch.compile of the peer (static shapes), timed once per key."""
        if key not in self.compiled:
            fn = torch.compile(make_peer(mode, kind, head_axis, rot), dynamic=False)
            t0 = time.time()
            try:
                fn(*fn_args)
                sync()
                secs = time.time() - t0
                us = self.timer.gpu_us(lambda: fn(*fn_args))
            except Exception as e:  # noqa: BLE001
                print(f"# compile failed for {key}: {type(e).__name__}: {e}")
                secs, us = time.time() - t0, None
            self.compiled[key] = (us, secs)
        return self.compiled[key][0]

    def record(self, regime, shape, dtype, mode, layout, variant, nbytes, ours_us, ours_b2b, copy, compile_us=None,
               note="", bound_kind="min", extra_bytes=0):
        copy_us, copy_b2b = copy
        # the bound's copy moves the bytes the call must move (x, out, and the table rows and
        # indices it reads: extra_bytes)
        copy_all = self.copy_us(nbytes + extra_bytes, getattr(torch, dtype))[0] if extra_bytes else copy_us

        def bound_with(copy: float) -> float:
            with_compile = compile_us is not None and bound_kind == "min"
            return BOUND[regime] * (min(copy, compile_us) if with_compile else copy)

        bound = bound_with(copy_all)
        ratio = ours_us / bound
        ratio_x = ours_us / bound_with(copy_us)
        b2b_ok = None
        if regime == "decode":
            b2b_ok = ours_b2b <= copy_b2b + 1.0
        row = dict(regime=regime, shape=list(shape), dtype=dtype, mode=mode, layout=layout, variant=variant,
                   bytes=nbytes, ours_us=ours_us, ours_b2b_us=ours_b2b, copy_us=copy_us, copy_b2b_us=copy_b2b,
                   compile_us=compile_us, of_copy=copy_us / ours_us, extra_bytes=extra_bytes,
                   copy_all_us=copy_all, bound_us=bound, ratio_to_bound=ratio, ratio_to_x_copy_bound=ratio_x,
                   b2b_ok=b2b_ok, note=note)
        self.rows.append(row)
        comp = f"{compile_us:8.2f}" if compile_us is not None else "       -"
        flag = "" if ratio <= 1.0 and b2b_ok is not False else "  <-- over bound"
        print(f"{regime:9s} {str(tuple(shape)):19s} {dtype:8s} {mode:8s} {layout:8s} {variant:14s} "
              f"{ours_us:8.2f} {ours_b2b:7.2f} {copy_us:8.2f} {copy_all:8.2f} {copy_b2b:7.2f} {comp} "
              f"{copy_us / ours_us:6.3f} {ratio:6.3f} {note}{flag}", flush=True)

    # -- large tensors: base, table, partial, rotary2, backward ------------------------------------
    def large(self, regimes):
        for shape in LARGE_SHAPES:
            B, M, H, K = shape
            for dname, dtype in DTYPES.items():
                esize = torch.tensor([], dtype=dtype).element_size()
                nbytes = 2 * B * M * H * K * esize
                copy = self.copy_us(nbytes, dtype)
                P = M
                cos_full = {}
                for mode in MODES:
                    cos_full[mode] = rope_tables(P, K, mode, dtype)
                for layout in LAYOUTS:
                    x = alloc(layout, B, M, H, K, dtype)
                    out_layout = unpacked(layout)
                    out = alloc(out_layout, B, M, H, K, dtype)
                    xv, head_axis, seq_first = logical_view(x, layout, K)
                    kw = {"k_size": K, "tensor_index": 0} if slots_of(layout) > 1 else ({"k_size": K} if "(" in layout else {})
                    ar = torch.arange(M, device=DEVICE)
                    pos64 = ar.expand(B, 1, M).contiguous()
                    pos32 = pos64.int()
                    pos2 = torch.stack((ar, ar // 2)).expand(B, 2, M).contiguous()
                    # index tensors for the peers, shaped like x without head and K axes
                    pidx = pos64[:, 0].t() if seq_first else pos64[:, 0]
                    pidx32 = pos32[:, 0].t() if seq_first else pos32[:, 0]
                    p2 = [pos2[:, r].t() if seq_first else pos2[:, r] for r in range(2)]
                    for mode in MODES:
                        cos, sin = cos_full[mode]
                        cosh, sinh = rope_tables(P, K // 2, mode, dtype)
                        # tables by m broadcast over the layout (peer "table" / "partial")
                        def bc(t):
                            if seq_first:
                                return t[:, None, None]
                            if layout == "BHMK":
                                return t[None, None]
                            return t[None, :, None]
                        variants = []
                        if "base" in regimes:
                            variants.append(("base", "base", {}, ("table", (xv, bc(cos), bc(sin)), K)))
                        if "table" in regimes:
                            variants.append(("table", "table", dict(cos=cos, sin=sin), ("table", (xv, bc(cos), bc(sin)), K)))
                            variants.append(("table", "table+pos32", dict(cos=cos, sin=sin, position_ids=pos32),
                                             ("pos", (xv, cos, sin, pidx32), K)))
                            variants.append(("table", "table+pos64", dict(cos=cos, sin=sin, position_ids=pos64),
                                             ("pos", (xv, cos, sin, pidx), K)))
                        if "partial" in regimes:
                            variants.append(("partial", "base", dict(rotary_size=K // 2),
                                             ("partial", (xv, bc(cosh), bc(sinh)), K // 2)))
                            variants.append(("partial", "table+pos64", dict(rotary_size=K // 2, cos=cosh, sin=sinh,
                                                                             position_ids=pos64),
                                             ("partial", (xv, bc(cosh), bc(sinh)), K // 2)))
                        if "rotary2" in regimes:
                            variants.append(("rotary2", "base+pos64", dict(position_ids=pos2),
                                             ("rotary2", (xv, cosh, sinh, p2[0], p2[1]), K)))
                            variants.append(("rotary2", "table+pos32", dict(position_ids=pos2.int(), cos=cosh, sin=sinh),
                                             ("rotary2", (xv, cosh, sinh, p2[0].int(), p2[1].int()), K)))
                        for regime, variant, call, (kind, fn_args, rot) in variants:
                            params = rope(self.raw, x, call.get("cos"), call.get("sin"), call.get("position_ids"),
                                          layout=layout, out=out, mode=mode, plan_only=True,
                                          rotary_size=call.get("rotary_size"), **kw)
                            fn, kname = self.ours(params)
                            ours_us = self.timer.gpu_us(fn)
                            compile_us, note = None, kname
                            if layout in self.compile_layouts and (self.compile_shapes is None
                                                                   or shape in self.compile_shapes):
                                key = (shape, dname, mode, layout, kind, variant.endswith("pos32"))
                                compile_us = self.peer(key, fn_args, mode, kind, head_axis, rot)
                                eager = self.eager_cache.get(key)
                                if eager is None:
                                    fn_e = make_peer(mode, kind, head_axis, rot)
                                    eager = self.eager_cache[key] = self.timer.gpu_us(lambda: fn_e(*fn_args))
                                note = f"{kname}; eager {eager:.1f} us"
                            self.record(regime, shape, dname, mode, layout, variant, nbytes, ours_us, 0.0, copy,
                                        compile_us, note,
                                        extra_bytes=extra_read_bytes(call.get("cos"), call.get("position_ids")))
                        if "backward" in regimes:
                            self.backward(shape, dname, dtype, mode, layout, x, out, kw, cos, sin, pos64)
                    del x, out
                torch.cuda.empty_cache()

    def backward(self, shape, dname, dtype, mode, layout, x, dy, kw, cos, sin, pos64):
        """dx (x's layout; the other slots of a packed x get zeros) from dy (the output layout)."""
        B, M, H, K = shape
        esize = torch.tensor([], dtype=dtype).element_size()
        n = B * M * H * K
        nbytes = (n + n * slots_of(layout)) * esize  # dy read + dx written (all slots)
        copy = self.copy_us(nbytes, dtype)
        out_layout = unpacked(layout)
        index = kw.get("tensor_index", 0)
        slot = index
        for variant, tables in (("base", {}), ("table+pos64", dict(cos=cos, sin=sin, position_ids=pos64))):
            params = rope(self.raw, dy, tables.get("cos"), tables.get("sin"), tables.get("position_ids"),
                          layout=out_layout, out=x, mode=mode, plan_only=True, k_size=K)
            # re-point the output at x's selected slot, in x's layout, with zeros in the others
            entry = tensor_entry(self.raw, dy, x, out_layout, layout, K=K, H=H, dst_slot=slot)
            params.update(entry)
            params["inverse"] = True
            if slots_of(layout) > 1:
                params["zero_slots"] = [(s - slot) * K for s in range(slots_of(layout)) if s != slot]
            fn, kname = self.ours(params)
            self.record("backward", shape, dname, mode, layout, variant, nbytes, self.timer.gpu_us(fn), 0.0, copy,
                        None, kname, extra_bytes=extra_read_bytes(tables.get("cos"), tables.get("position_ids")))

    # -- decode ----------------------------------------------------------------------------------
    def decode(self):
        H, K = 32, 128
        for B in DECODE_BATCHES:
            shape = (B, 1, H, K)
            for dname, dtype in DTYPES.items():
                esize = torch.tensor([], dtype=dtype).element_size()
                nbytes = 2 * B * H * K * esize
                copy = self.copy_us(nbytes, dtype)
                for layout in DECODE_LAYOUTS:
                    x = alloc(layout, B, 1, H, K, dtype)
                    out = alloc(unpacked(layout), B, 1, H, K, dtype)
                    kw = {"k_size": K, "tensor_index": 1} if slots_of(layout) > 1 else {}
                    P = 8192
                    for mode in MODES:
                        cos, sin = rope_tables(P, K, mode, dtype)
                        lens = torch.randint(0, P, (B,), device=DEVICE)
                        pos = lens.view(B, 1, 1)
                        for variant, call in (("base+offsets", dict(offsets=lens)),
                                              ("table+pos64", dict(cos=cos, sin=sin, position_ids=pos))):
                            params = rope(self.raw, x, call.get("cos"), call.get("sin"), call.get("position_ids"),
                                          layout=layout, out=out, mode=mode, plan_only=True, **kw)
                            if "offsets" in call:
                                params.update(seqlen_offsets=call["offsets"].data_ptr(), offsets_dtype="int64")
                            fn, kname = self.ours(params)
                            extra = (extra_read_bytes(None, None, lens) if "offsets" in call
                                     else extra_read_bytes(cos, pos))
                            self.record("decode", shape, dname, mode, layout, variant, nbytes, self.timer.gpu_us(fn),
                                        self.timer.b2b_us(fn), copy, None, kname, bound_kind="copy", extra_bytes=extra)
                    del x, out

    # -- packed q and k in one launch ------------------------------------------------------------
    def packed_qk(self):
        for shape in LARGE_SHAPES + [(1, 1, 32, 128), (64, 1, 32, 128)]:
            B, M, H, K = shape
            for dname, dtype in DTYPES.items():
                esize = torch.tensor([], dtype=dtype).element_size()
                nbytes = 2 * 2 * B * M * H * K * esize
                copy = self.copy_us(nbytes, dtype)
                for layout in PACKED_LAYOUTS:
                    x = alloc(layout, B, M, H, K, dtype)
                    outs = [alloc(unpacked(layout), B, M, H, K, dtype) for _ in range(2)]
                    tensors = [tensor_entry(self.raw, x, outs[s], layout, unpacked(layout), K=K, H=H, src_slot=s) for s in range(2)]
                    for mode in MODES:
                        params = extended_params(self.raw, tensors, dtype=dname, B=B, M=M, K=K, mode=mode)
                        fn, kname = self.ours(params)
                        self.record("packed-qk", shape, dname, mode, layout, "q+k", nbytes, self.timer.gpu_us(fn),
                                    self.timer.b2b_us(fn), copy, None, kname, bound_kind="copy")
                    del x, outs
            torch.cuda.empty_cache()

    # -- LLM-stack inputs ------------------------------------------------------------------------
    def llm(self):
        # decode step: q (B,1,32,128) and k (B,1,8,128) in one launch vs two calls, offsets = cache lengths
        for B in DECODE_BATCHES:
            for dname in ("bfloat16",):
                dtype = DTYPES[dname]
                esize = torch.tensor([], dtype=dtype).element_size()
                K = 128
                q = alloc("BMHK", B, 1, 32, K, dtype)
                k = alloc("BMHK", B, 1, 8, K, dtype)
                oq, ok_ = torch.empty_like(q), torch.empty_like(k)
                lens = torch.randint(0, 8192, (B,), device=DEVICE)
                nbytes = 2 * (q.numel() + k.numel()) * esize
                copy = self.copy_us(nbytes, dtype)
                both = extended_params(self.raw, [tensor_entry(self.raw, q, oq, "BMHK", "BMHK", K=K, H=32),
                                                  tensor_entry(self.raw, k, ok_, "BMHK", "BMHK", K=K, H=8)],
                                       dtype=dname, B=B, M=1, K=K, seqlen_offsets=lens)
                fn, kname = self.ours(both)
                one = self.timer.gpu_us(fn), self.timer.b2b_us(fn)
                plans = [self.raw.Plan(extended_params(self.raw, [e], dtype=dname, B=B, M=1, K=K, seqlen_offsets=lens))
                         for e in (tensor_entry(self.raw, q, oq, "BMHK", "BMHK", K=K, H=32), tensor_entry(self.raw, k, ok_, "BMHK", "BMHK", K=K, H=8))]

                def two():
                    if DEVICE != "cuda":
                        plans[0].run_cpu()
                        plans[1].run_cpu()
                        return
                    plans[0].run_cuda(self.stream)
                    plans[1].run_cuda(self.stream)

                two_t = self.timer.gpu_us(two), self.timer.b2b_us(two)
                self.record("decode", (B, 1, 40, K), dname, "plane", "BMHK", "q+k 1 launch", nbytes, one[0], one[1],
                            copy, None, f"{kname}; two calls: {two_t[0]:.2f} us gpu, {two_t[1]:.2f} us b2b",
                            bound_kind="copy", extra_bytes=extra_read_bytes(None, None, lens))
        # float32 tables with bf16 x, inv_freq vs base: large shapes, BMHK
        for shape in LARGE_SHAPES[1:3]:
            B, M, H, K = shape
            dname = "bfloat16"
            dtype = DTYPES[dname]
            nbytes = 2 * B * M * H * K * 2
            copy = self.copy_us(nbytes, dtype)
            x = alloc("BMHK", B, M, H, K, dtype)
            out = torch.empty_like(x)
            pos = torch.arange(M, device=DEVICE).expand(B, 1, M).contiguous()
            for mode in MODES:
                c32, s32 = rope_tables(M, K, mode, torch.float32)
                inv = (1.0 / (10000.0 ** (torch.arange(0, K, 2, device=DEVICE, dtype=torch.float64) / K))).float()
                entries = [tensor_entry(self.raw, x, out, "BMHK", "BMHK", K=K, H=H)]
                for variant, params, extra in (
                        ("f32 table+pos", extended_params(self.raw, entries, dtype=dname, B=B, M=M, K=K, mode=mode,
                                                          cos=c32, sin=s32, position_ids=pos), extra_read_bytes(c32, pos)),
                        ("inv_freq", extended_params(self.raw, entries, dtype=dname, B=B, M=M, K=K, mode=mode,
                                                     inv_freq=inv, attention_scaling=1.1), extra_read_bytes(None, None, inv)),
                        ("base", extended_params(self.raw, entries, dtype=dname, B=B, M=M, K=K, mode=mode), 0)):
                    fn, kname = self.ours(params)
                    self.record("llm", shape, dname, mode, "BMHK", variant, nbytes, self.timer.gpu_us(fn), 0.0, copy,
                                None, kname, bound_kind="copy", extra_bytes=extra)
            del x, out

    # -- packed variable-length sequences --------------------------------------------------------
    def varlen(self):
        H, K, S = 32, 128, 64
        T = 128 * 1024 if DEVICE == "cuda" else 2048  # the dry run keeps it small
        cu = varlen_cu_seqlens(T, S).to(DEVICE)
        max_len = int((cu[1:] - cu[:-1]).max())  # positions run 0 .. max_len - 1: the table rows read
        for dname in ("bfloat16", "float16"):
            dtype = DTYPES[dname]
            nbytes = 2 * T * H * K * 2
            copy = self.copy_us(nbytes, dtype)
            x = alloc("BMHK", 1, T, H, K, dtype)  # (T, H, K) as B = 1, M = T
            out = torch.empty_like(x)
            entries = [tensor_entry(self.raw, x, out, "BMHK", "BMHK", K=K, H=H)]
            for mode in MODES:
                cos, sin = rope_tables(T, K, mode, dtype)
                for variant, kw in (("base", {}), ("table", dict(cos=cos, sin=sin))):
                    for cdt in (torch.int32, torch.int64):
                        params = extended_params(self.raw, entries, dtype=dname, B=1, M=T, K=K, mode=mode,
                                                 cu_seqlens=cu.to(cdt), **kw)
                        fn, kname = self.ours(params)
                        extra = extra_read_bytes(kw.get("cos"), None, cu.to(cdt), rows=max_len)
                        self.record("varlen", (T, H, K), dname, mode, "(BM)HK", f"{variant}+cu{str(cdt)[-2:]}",
                                    nbytes, self.timer.gpu_us(fn), 0.0, copy, None, kname, bound_kind="copy",
                                    extra_bytes=extra)
            del x, out


def varlen_cu_seqlens(T: int, S: int) -> torch.Tensor:
    """cu_seqlens (int64, on the host) of S sequences of random lengths, T tokens in all (seed 0)."""
    gen = torch.Generator().manual_seed(0)
    cuts = torch.sort(torch.randperm(T - 1, generator=gen)[: S - 1] + 1).values
    return torch.cat((torch.tensor([0]), cuts, torch.tensor([T])))


def summarize(rows: List[Dict]) -> None:
    print("\n# per regime: worst ratio of our GPU time to the bound (<= 1.000 meets it)")
    for regime in REGIMES:
        rs = [r for r in rows if r["regime"] == regime]
        if not rs:
            continue
        worst = max(rs, key=lambda r: r["ratio_to_bound"])
        over = sum(r["ratio_to_bound"] > 1.0 for r in rs)
        extra = ""
        if regime == "decode":
            b2b_bad = [r for r in rs if r["b2b_ok"] is False]
            extra = f"; b2b over copy+1us: {len(b2b_bad)}"
        worst_x = max(r.get("ratio_to_x_copy_bound", r["ratio_to_bound"]) for r in rs)
        print(f"{regime:9s} worst {worst['ratio_to_bound']:.3f} ({tuple(worst['shape'])} {worst['dtype']} "
              f"{worst['mode']} {worst['layout']} {worst['variant']}: {worst['ours_us']:.2f} us vs bound "
              f"{worst['bound_us']:.2f} us), over bound {over}/{len(rs)}{extra}; "
              f"worst against x's copy alone {worst_x:.3f}")


def plot(rows: List[Dict], path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("# matplotlib unavailable: no plot")
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(15, 5))
    regimes = [g for g in REGIMES if any(r["regime"] == g for r in rows)]
    data = [[r["ratio_to_bound"] for r in rows if r["regime"] == g] for g in regimes]
    try:
        ax1.boxplot(data, tick_labels=regimes, showfliers=True)  # matplotlib >= 3.9
    except TypeError:
        ax1.boxplot(data, labels=regimes, showfliers=True)
    ax1.axhline(1.0, color="red", linestyle="--", linewidth=1)
    ax1.set_ylabel("our GPU time / bound  (<= 1 meets it)")
    ax1.set_title("All configurations, per regime")
    ax1.tick_params(axis="x", rotation=30)
    dec = [r for r in rows if r["regime"] == "decode" and r["layout"] == "BMHK" and r["mode"] == "plane"
           and r["dtype"] == "bfloat16"]
    labels = [f"{r['shape'][0]}x{r['shape'][2]}h {r['variant']}" for r in dec]
    xs = range(len(dec))
    ax2.bar([i - 0.2 for i in xs], [r["ours_us"] for r in dec], 0.4, label="ours")
    ax2.bar([i + 0.2 for i in xs], [r["copy_us"] for r in dec], 0.4, label="copy")
    ax2.set_yscale("log")
    ax2.set_xticks(list(xs))
    ax2.set_xticklabels(labels, rotation=60, fontsize=7, ha="right")
    ax2.set_ylabel("GPU time, us (log)")
    ax2.set_title("Decode (M = 1), bfloat16, plane, BMHK")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"# plot saved to {path}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default="build-gpu")
    ap.add_argument("--quick", action="store_true", help="fewer repetitions")
    ap.add_argument("--no-compile", action="store_true", help="no torch.compile peers (bounds use the copy only)")
    ap.add_argument("--compile-layouts", default="BMHK", help="layouts timed against torch.compile")
    ap.add_argument("--compile-shapes", help="large shapes timed against torch.compile (default: all)")
    ap.add_argument("--regimes", default=",".join(REGIMES))
    ap.add_argument("--shapes", help="large shapes, e.g. '4x4096x32x128,2x8192x8x128'")
    ap.add_argument("--launch", help="force the launch shape 'items_per_thread,threads' (sweeps)")
    ap.add_argument("--decode-batches", help="e.g. '1,64'")
    ap.add_argument("--warmup-ms", type=float, default=0.0,
                    help="before timing a call, repeat it (L2 flushed, synced) for at least this long (default: 2 calls)")
    ap.add_argument("--reverse-order", action="store_true",
                    help="time modes and layouts in reverse order (to tell an order effect from the kernel's)")
    ap.add_argument("--device", default="cuda", help="cpu: dry run of the script through the CPU kernel")
    ap.add_argument("--json")
    ap.add_argument("--plot")
    args = ap.parse_args()
    global DEVICE, DECODE_BATCHES, MODES, LAYOUTS, DECODE_LAYOUTS, PACKED_LAYOUTS
    DEVICE = args.device
    if args.reverse_order:
        MODES, LAYOUTS = MODES[::-1], LAYOUTS[::-1]
        DECODE_LAYOUTS, PACKED_LAYOUTS = DECODE_LAYOUTS[::-1], PACKED_LAYOUTS[::-1]
    if args.decode_batches:
        DECODE_BATCHES = tuple(int(v) for v in args.decode_batches.split(","))
    raw = load_raw(args.build)

    global LARGE_SHAPES
    if args.shapes:
        LARGE_SHAPES = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.launch:
        raw.set_launch_override(*[int(v) for v in args.launch.split(",")])
    import torch._dynamo as dynamo
    dynamo.config.cache_size_limit = 4096
    if DEVICE == "cuda":
        props = torch.cuda.get_device_properties(0)
        device = f"{props.name} ({props.multi_processor_count} SMs)"
    else:
        device = "cpu (dry run: CPU kernel, times are not GPU times)"
    header = (f"# device: {device}, torch {torch.__version__}\n"
              f"# command: python {' '.join(sys.argv)}\n"
              f"# GPU time: median of {12 if args.quick else 30} calls, L2 flushed before each; "
              f"b2b: calls back to back (decode only)\n"
              f"# bound: {BOUND}; x min(copy_all, torch.compile) where compile was timed "
              f"(layouts {'none' if args.no_compile else args.compile_layouts}), else x copy_all; copy_all: a copy "
              f"moving the bytes the call moves (x, out, table rows used, indices); copy_us: x's bytes alone "
              f"(ofcopy = copy_us / ours_us)")
    print(header)
    print(f"{'regime':9s} {'shape':19s} {'dtype':8s} {'mode':8s} {'layout':8s} {'variant':14s} {'ours_us':>8s} "
          f"{'b2b':>7s} {'copy_us':>8s} {'copy_all':>8s} {'c_b2b':>7s} {'compile':>8s} {'ofcopy':>6s} {'/bound':>6s}")
    bench = Bench(args, raw)
    regimes = set(args.regimes.split(","))
    t0 = time.time()
    large = regimes & {"base", "table", "partial", "rotary2", "backward"}
    steps = [(bool(large), lambda: bench.large(large)), ("decode" in regimes, bench.decode),
             ("packed-qk" in regimes, bench.packed_qk), ("llm" in regimes, bench.llm),
             ("varlen" in regimes, bench.varlen)]
    failed = 0
    for wanted, step in steps:
        if not wanted:
            continue
        try:
            step()
        except Exception:  # noqa: BLE001 - report, go on with the other regimes
            failed += 1
            traceback.print_exc()
    compile_secs = sum(s for _, s in bench.compiled.values())
    print(f"# elapsed {time.time() - t0:.0f} s ({len(bench.compiled)} torch.compile peers, {compile_secs:.0f} s compiling)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"header": header, "rows": bench.rows}, fh, indent=1)
    summarize(bench.rows)
    if args.plot:
        plot(bench.rows, args.plot)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
