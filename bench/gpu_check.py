"""GPU test bench: the CUDA kernels against the float64 reference (tests/reference.py), no OneFlow.

Runs on the device machine (PyTorch + the raw binding built by bench/run_gpu.sh):
  - every case of tests/cases.py (forward and backward), the output-layout cases;
  - precision at positions up to 65535 and up to 2^24 (docs/operator.md bounds), every dtype and mode;
  - views with non-default strides, misaligned pointers (generic kernel), empty tensors;
  - positions outside the cos/sin table (NaN, no out-of-bounds read: run under compute-sanitizer);
  - a tensor of more than 2^31 elements (64-bit indexing), unless --subset;
  - a share of the cases and the LLM inputs again under forced launch shapes (2 and 4 heads per
    thread, a block per piece and the persistent grid), so that every kernel instance is checked
    at small sizes: the built-in rule gives small calls one head per thread.
Prints one line per group and a final 'N passed, N failed' line; exits 1 on any failure.

    python3 -m bench.gpu_check --build build-gpu [--subset 40] [--json out.json]   (from the repo root)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback

import numpy as np
import torch

from tests.cases import Case, forward_cases, make_inputs, max_position, output_layout_cases, round_to_dtype
from tests.raw_driver import extended_params, launch, load_raw, rope, rope_backward, tensor_entry
from tests.reference import positions_from_cu_seqlens, rope_reference, rope_reference_backward, tolerance

TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
                "bfloat16": torch.bfloat16}


DEVICE = "cuda"  # --device cpu runs the same checks through the CPU kernel (checks the harness)


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def to_torch(a, dtype=None):
    if a is None:
        return None
    t = torch.from_numpy(np.ascontiguousarray(a)).to(DEVICE)
    return t.to(TORCH_DTYPES[dtype]) if dtype is not None else t


def to_np64(t):
    return t.detach().to(torch.float64).cpu().numpy()


class Results:
    def __init__(self):
        self.passed = 0
        self.failed = []
        self.groups = {}

    def check(self, group, name, ok, detail=""):
        g = self.groups.setdefault(group, [0, 0, 0.0])
        if ok:
            self.passed += 1
            g[0] += 1
        else:
            self.failed.append(f"{group}: {name} {detail}")
            g[1] += 1

    def worst(self, group, ratio):
        g = self.groups.setdefault(group, [0, 0, 0.0])
        g[2] = max(g[2], ratio)


class Prefixed:
    """Results seen through a group-name prefix (the same checks under another launch shape)."""

    def __init__(self, res: Results, prefix: str):
        self.res, self.prefix = res, prefix

    def check(self, group, name, ok, detail=""):
        self.res.check(self.prefix + group, name, ok, detail)

    def worst(self, group, ratio):
        self.res.worst(self.prefix + group, ratio)


# (items per thread, threads per block, persistent grid, small kernel) forced by
# check_launch_shapes: every vector-kernel instance family the built-in rule uses for large calls.
# 2 heads per thread (computed angles: RopeSmallKernel's 2-head instance; tables: RopeKernel's),
# 4, the persistent grid, and RopeKernel's 1- and 2-head instances kept off RopeSmallKernel
# (small 0; the built-in rule gives such calls RopeSmallKernel where they fit it)
LAUNCH_SHAPES = [(2, 128, 0, -1), (4, 128, 0, -1), (4, 128, 1, -1), (1, 256, 1, -1), (1, 0, 0, 0), (2, 128, 0, 0)]


def run_case(raw, res, group, case: Case, M=5, K=16, max_pos=4096, backward=True, H=3):
    arrays, kwargs = make_inputs(case, M=M, K=K, H=H, max_position=max_pos)
    t = {n: to_torch(arrays[n], case.dtype if n != "position_ids" else None) for n in arrays}
    out = rope(raw, t["x"], t["cos"], t["sin"], t["position_ids"], **kwargs)
    sync()
    expected = rope_reference(arrays["x"], cos=arrays["cos"], sin=arrays["sin"],
                              position_ids=arrays["position_ids"], **kwargs)
    tol = tolerance(case.dtype, max_position(arrays, M))
    err = float(np.max(np.abs(to_np64(out) - expected))) if expected.size else 0.0
    res.check(group, case.id, tuple(out.shape) == expected.shape and err <= tol, f"err={err:.3g} tol={tol}")
    res.worst(group, err / tol)
    if backward:
        rng = np.random.default_rng(case.seed() + 1)
        dy = round_to_dtype(rng.uniform(-1, 1, expected.shape), case.dtype)
        dx = rope_backward(raw, to_torch(dy, case.dtype), tuple(arrays["x"].shape), t["cos"], t["sin"],
                           t["position_ids"], **kwargs)
        sync()
        exp_dx = rope_reference_backward(dy, cos=arrays["cos"], sin=arrays["sin"],
                                         position_ids=arrays["position_ids"], x_shape=arrays["x"].shape, **kwargs)
        err = float(np.max(np.abs(to_np64(dx) - exp_dx))) if exp_dx.size else 0.0
        res.check(group + "-backward", case.id, err <= tol, f"err={err:.3g} tol={tol}")
        res.worst(group + "-backward", err / tol)


def check_precision(raw, res):
    """Positions up to 65535, computed angles, realistic head sizes."""
    rng = np.random.default_rng(65535)
    for dtype in ("float16", "bfloat16", "float32", "float64"):
        for mode in ("plane", "interval"):
            for layout, base in (("BMHK", 10000.0), ("BM(H3K)", 500000.0)):
                B, M, H, K = 2, 256, 4, 128
                shape = (B, M, H, K) if layout == "BMHK" else (B, M, H * 3 * K)
                x = round_to_dtype(rng.uniform(-1, 1, shape), dtype)
                pos = rng.integers(0, 65536, (B, 1, M)).astype(np.int64)
                pos[0, 0, :4] = [0, 65535, 65534, 4095]
                kw = dict(layout=layout, mode=mode, base=base)
                if layout != "BMHK":
                    kw.update(k_size=K, tensor_index=1)
                out = rope(raw, to_torch(x, dtype), position_ids=to_torch(pos), **kw)
                expected = rope_reference(x, position_ids=pos, **kw)
                err = float(np.max(np.abs(to_np64(out) - expected)))
                tol = tolerance(dtype, 65535)
                name = f"{dtype}-{mode}-{layout}"
                res.check("precision-65535", name, err <= tol, f"err={err:.3g} tol={tol}")
                res.worst("precision-65535", err / tol)
                print(f"  precision {name}: max err {err:.3g} (bound {tol})")


def check_views_and_odd_tensors(raw, res):
    rng = np.random.default_rng(11)
    for dtype in ("float16", "float32"):
        big = round_to_dtype(rng.uniform(-1, 1, (2, 7, 6, 64)), dtype)
        tb = to_torch(big, dtype)
        # head slice of a larger tensor
        out = rope(raw, tb[:, :, 1:5, :])
        err = float(np.max(np.abs(to_np64(out) - rope_reference(big[:, :, 1:5, :]))))
        res.check("views", f"head-slice-{dtype}", err <= tolerance(dtype, 10), f"err={err:.3g}")
        # transposed view read as BHMK
        out = rope(raw, tb.transpose(1, 2), layout="BHMK", output_layout="BMHK")
        err = float(np.max(np.abs(to_np64(out) - rope_reference(big))))
        res.check("views", f"transposed-{dtype}", err <= tolerance(dtype, 10), f"err={err:.3g}")
        # misaligned pointer (forces the generic kernel)
        flat = to_torch(round_to_dtype(rng.uniform(-1, 1, 1 + 2 * 7 * 6 * 64), dtype), dtype)
        xm = flat[1:].view(2, 7, 6, 64)
        params = rope(raw, xm, plan_only=True)
        name = raw.kernel_name(params)
        out = rope(raw, xm)
        err = float(np.max(np.abs(to_np64(out) - rope_reference(to_np64(xm)))))
        res.check("views", f"misaligned-{dtype}-{name}", name == "elementwise" and err <= tolerance(dtype, 10),
                  f"err={err:.3g}")
        # non-unit stride of K (every other element of the last axis)
        wide = to_torch(round_to_dtype(rng.uniform(-1, 1, (2, 7, 6, 128)), dtype), dtype)
        xs = wide[..., ::2]
        out = rope(raw, xs)
        err = float(np.max(np.abs(to_np64(out) - rope_reference(to_np64(xs)))))
        res.check("views", f"k-stride-2-{dtype}", err <= tolerance(dtype, 10), f"err={err:.3g}")
    # empty tensors
    for shape, layout in (((0, 5, 3, 16), "BMHK"), ((2, 0, 3 * 3 * 16), "BM(H3K)")):
        x = torch.zeros(shape, device=DEVICE)
        out = rope(raw, x, layout=layout, k_size=16 if "(" in layout else None)
        res.check("odd", f"empty-{layout}", out.numel() == 0)
    # positions outside the table: NaN rows, no out-of-bounds read (compute-sanitizer checks)
    x = torch.ones(1, 3, 2, 8, device=DEVICE)
    cos = torch.ones(4, 8, device=DEVICE)
    sin = torch.zeros(4, 8, device=DEVICE)
    pos = torch.tensor([[[0, 4, -1]]], device=DEVICE, dtype=torch.int64)
    out = rope(raw, x, cos, sin, pos)
    sync()
    ok = bool(torch.isnan(out[0, 1]).all() and torch.isnan(out[0, 2]).all() and (out[0, 0] == 1).all())
    res.check("odd", "positions-outside-table-give-nan", ok)


# One rounding of the output dtype (half a unit in the last place for |out| < 2), plus float32's
# own error: the bound of angles computed from base at positions up to 2^24.
# float64: the angle p * theta itself carries p * 2^-53 of rounding at 2^24 (about 2e-9), in the
# reference as much as in the kernel.
LONG_CONTEXT_BOUND = {"float32": 1e-6, "bfloat16": 4e-3, "float16": 4.9e-4, "float64": 1e-8}


def check_long_context(raw, res):
    """Angles from base at positions up to 2^24: float32 within 1e-6 of float64, 16-bit types
    within one final rounding."""
    rng = np.random.default_rng(1 << 24)
    for dtype in ("float32", "bfloat16", "float16", "float64"):
        for mode in ("plane", "interval"):
            for base in (10000.0, 500000.0):
                B, M, H, K = 2, 128, 2, 128
                x = round_to_dtype(rng.uniform(-1, 1, (B, M, H, K)), dtype)
                pos = rng.integers(0, (1 << 24) + 1, (B, 1, M)).astype(np.int64)
                pos[0, 0, :6] = [0, 1 << 24, (1 << 24) - 1, 1 << 20, (1 << 20) + 1, 65535]
                out = rope(raw, to_torch(x, dtype), position_ids=to_torch(pos), mode=mode, base=base)
                expected = rope_reference(x, position_ids=pos, mode=mode, base=base)
                err = float(np.max(np.abs(to_np64(out) - expected)))
                bound = LONG_CONTEXT_BOUND[dtype]
                name = f"{dtype}-{mode}-base{base:g}"
                res.check("precision-2^24", name, err <= bound, f"err={err:.3g} bound={bound}")
                res.worst("precision-2^24", err / bound)
                print(f"  positions <= 2^24 {name}: max err {err:.3g} (bound {bound})")


def _run_extended(raw, res, group, name, dtype, outs_expected, params, x_for_device, tol):
    launch(raw, x_for_device, params)
    sync()
    for i, (out, expected) in enumerate(outs_expected):
        got = to_np64(out)
        if np.isnan(expected).any():  # rows that must be NaN
            ok = bool(np.array_equal(np.isnan(got), np.isnan(expected)))
            finite = ~np.isnan(expected)
            err = (float(np.max(np.abs(got[finite] - expected[finite]))) if finite.any() else 0.0) if ok else float("inf")
        else:
            err = float(np.max(np.abs(got - expected))) if expected.size else 0.0
        res.check(group, f"{name}[{i}]", err <= tol, f"err={err:.3g} tol={tol}")
        res.worst(group, err / tol)


def check_heads8(raw, res, subset=1):
    """Computed angles with 8 heads of K = 64, 128 or 256 (a token's threads fill whole warps, as in
    the bench's large shapes; the other cases use 3 heads): every layout, mode, rotary dim,
    full/partial and position kind of the computed-angle cases, forward and backward, one head per
    thread (the rule's choice at this size) and two (forced); then q and k of GQA head counts
    (8 + 4, 32 + 8) in one launch, with inv_freq, attention_scaling, offsets up to 60000, forward
    and inverse."""
    cases = [c for c in forward_cases() if not c.table][:: max(1, 2 * subset)]
    for i, case in enumerate(cases):
        K = (64, 128, 256)[i % 3]
        for items in (0, 2):
            raw.set_launch_override(items, 128 if items else 0, 0 if items else -1, -1)
            try:
                run_case(raw, res, f"heads8{'-2x128' if items else ''}", case, M=9, K=K, H=8)
            except Exception:  # noqa: BLE001
                res.check("heads8", case.id, False, traceback.format_exc(limit=2))
            finally:
                raw.set_launch_override(0, 0, -1, -1)
    rng = np.random.default_rng(32)
    B, M, K = 2, 7, 128
    for dtype in ("float16", "bfloat16", "float32", "float64"):
        for mode in ("plane", "interval"):
            for Hq, Hk in ((8, 4), (32, 8)):
                q = round_to_dtype(rng.uniform(-1, 1, (B, M, Hq, K)), dtype)
                k = round_to_dtype(rng.uniform(-1, 1, (B, M, Hk, K)), dtype)
                tq, tk = to_torch(q, dtype), to_torch(k, dtype)
                oq, ok_ = torch.full_like(tq, float("nan")), torch.full_like(tk, float("nan"))
                tensors = [tensor_entry(raw, tq, oq, "BMHK", "BMHK", K=K, H=Hq),
                           tensor_entry(raw, tk, ok_, "BMHK", "BMHK", K=K, H=Hk)]
                inv = (1.0 / (50000.0 ** (np.arange(0, K, 2) / K))).astype(np.float32)
                offs = rng.integers(0, 60000, (B,)).astype(np.int64)
                t_inv, t_offs = to_torch(inv), to_torch(offs)
                for inverse in (False, True):
                    params = extended_params(raw, tensors, dtype=dtype, B=B, M=M, K=K, mode=mode, inv_freq=t_inv,
                                             attention_scaling=1.25, seqlen_offsets=t_offs, inverse=inverse)
                    exp = [rope_reference(a, mode=mode, seqlen_offsets=offs, inv_freq=inv.astype(np.float64),
                                          attention_scaling=1.25) if not inverse else
                           rope_reference_backward(a, mode=mode, seqlen_offsets=offs, inv_freq=inv.astype(np.float64),
                                                   attention_scaling=1.25, x_shape=a.shape)
                           for a in (q, k)]
                    _run_extended(raw, res, "heads8-qk", f"{dtype}-{mode}-{Hq}+{Hk}{'-inverse' if inverse else ''}",
                                  dtype, list(zip((oq, ok_), exp)), params, tq, tolerance(dtype, 60000 + M))


def check_extensions(raw, res, K=128):
    """The inputs beyond upstream's op: seqlen offsets, inv_freq + attention_scaling, float32
    tables with 16-bit x, q and k (different head counts, or two slots of a packed tensor) in one
    launch, packed-gradient zero fill, cu_seqlens (valid and malformed)."""
    rng = np.random.default_rng(12)
    B, M = 3, 37
    for dtype in ("float16", "bfloat16", "float32", "float64"):
        tdt = TORCH_DTYPES[dtype]
        for mode in ("plane", "interval"):
            for Kh in (K, 16):
                rot = Kh if Kh == 16 else Kh // 2  # partial rotation on the large head
                Hq, Hk = 4, 2
                q = round_to_dtype(rng.uniform(-1, 1, (B, M, Hq, Kh)), dtype)
                k = round_to_dtype(rng.uniform(-1, 1, (B, M, Hk, Kh)), dtype)
                tq, tk = to_torch(q, dtype), to_torch(k, dtype)
                oq = torch.full_like(tq, float("nan"))
                ok_ = torch.full_like(tk, float("nan"))
                tensors = [tensor_entry(raw, tq, oq, "BMHK", "BMHK", K=Kh, H=Hq), tensor_entry(raw, tk, ok_, "BMHK", "BMHK", K=Kh, H=Hk)]
                tol = tolerance(dtype, 4096 + 64)
                tag = f"{dtype}-{mode}-K{Kh}"
                # 1. per-sequence offsets (int32 / int64) and a scalar offset, computed angles, q+k
                for odt in (np.int32, np.int64):
                    offs = rng.integers(0, 4096, (B,)).astype(odt)
                    t_offs = to_torch(offs)  # kept alive until the launch: params hold raw pointers
                    params = extended_params(raw, tensors, dtype=dtype, B=B, M=M, K=Kh, mode=mode, rotary_size=rot,
                                             seqlen_offsets=t_offs, seqlen_offset=5)
                    exp = [rope_reference(a, mode=mode, rotary_size=rot, seqlen_offsets=offs.astype(np.int64) + 5)
                           for a in (q, k)]
                    _run_extended(raw, res, "offsets+qk", f"{tag}-{np.dtype(odt).name}", dtype,
                                  list(zip((oq, ok_), exp)), params, tq, tol)
                # 2. inv_freq (float32 / float64) with attention_scaling, offsets
                for fdt in (np.float32, np.float64):
                    inv = (1.0 / (10000.0 ** (np.arange(0, rot, 2) / rot)) * rng.uniform(0.5, 1.0, rot // 2)).astype(fdt)
                    offs = rng.integers(0, 4096, (B,)).astype(np.int64)
                    t_inv, t_offs = to_torch(inv), to_torch(offs)
                    params = extended_params(raw, tensors, dtype=dtype, B=B, M=M, K=Kh, mode=mode, rotary_size=rot,
                                             inv_freq=t_inv, attention_scaling=0.8, seqlen_offsets=t_offs)
                    exp = [rope_reference(a, mode=mode, rotary_size=rot, seqlen_offsets=offs, inv_freq=inv,
                                          attention_scaling=0.8) for a in (q, k)]
                    _run_extended(raw, res, "inv_freq+scaling", f"{tag}-{np.dtype(fdt).name}", dtype,
                                  list(zip((oq, ok_), exp)), params, tq, tol)
                # 3. tables (x's dtype, and float32 with 16-bit x) with position_ids, some out of range
                table_dtypes = [dtype] + (["float32"] if dtype in ("float16", "bfloat16") else [])
                for table_dtype in table_dtypes:
                    rows = 4096
                    j = np.arange(rot)
                    i = j % (rot // 2) if mode == "plane" else j // 2
                    ang = rng.uniform(-np.pi, np.pi, (rows, rot // 2))[:, i]
                    cos_t = round_to_dtype(np.cos(ang), table_dtype)
                    sin_t = round_to_dtype(np.sin(ang), table_dtype)
                    pos = rng.integers(0, rows, (B, 1, M)).astype(np.int64)
                    pos[1, 0, 3] = rows  # outside the table: NaN row
                    pos[2, 0, 5] = -1
                    t_cos, t_sin, t_pos = to_torch(cos_t, table_dtype), to_torch(sin_t, table_dtype), to_torch(pos)
                    params = extended_params(raw, tensors, dtype=dtype, B=B, M=M, K=Kh, mode=mode, rotary_size=rot,
                                             cos=t_cos, sin=t_sin, position_ids=t_pos, attention_scaling=1.25)
                    safe = np.clip(pos, 0, rows - 1)
                    exp = []
                    for a in (q, k):
                        e = rope_reference(a, cos=cos_t * 1.25, sin=sin_t * 1.25, position_ids=safe, mode=mode,
                                           rotary_size=rot)
                        e[1, 3, :, :rot] = np.nan
                        e[2, 5, :, :rot] = np.nan
                        exp.append(e)
                    _run_extended(raw, res, "tables+qk", f"{tag}-table_{table_dtype}", dtype,
                                  list(zip((oq, ok_), exp)), params, tq, tol)
        # 4. q and k slots of one packed BM(H3K) tensor in one launch, written as BHMK
        H = 4
        qkv = round_to_dtype(rng.uniform(-1, 1, (B, M, H * 3 * K)), dtype)
        t = to_torch(qkv, dtype)
        outs = [torch.full((B, H, M, K), float("nan"), dtype=tdt, device=DEVICE) for _ in range(2)]
        tensors = [tensor_entry(raw, t, outs[s], "BM(H3K)", "BHMK", K=K, H=H, src_slot=s) for s in range(2)]
        for mode in ("plane", "interval"):
            params = extended_params(raw, tensors, dtype=dtype, B=B, M=M, K=K, mode=mode, seqlen_offset=100)
            exp = [rope_reference(qkv, "BM(H3K)", tensor_index=s, k_size=K, mode=mode, output_layout="BHMK",
                                  seqlen_offsets=100) for s in range(2)]
            _run_extended(raw, res, "packed-qk", f"{dtype}-{mode}", dtype, list(zip(outs, exp)), params, t,
                          tolerance(dtype, 200))
        # 5. cu_seqlens: packed tokens (T, H, K) as B = 1, M = T; valid and malformed offsets
        T = 300
        xs = round_to_dtype(rng.uniform(-1, 1, (1, T, H, K)), dtype)
        tx = to_torch(xs, dtype)
        out = torch.full_like(tx, float("nan"))
        tensors = [tensor_entry(raw, tx, out, "BMHK", "BMHK", K=K, H=H)]
        lengths = rng.integers(0, 40, 12)
        lengths[-1] = T - lengths[:-1].sum() if lengths[:-1].sum() < T else 0
        cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        cu[-1] = T
        cu = np.maximum.accumulate(np.minimum(cu, T))
        for cdt in (np.int32, np.int64):
            for mode in ("plane", "interval"):
                t_cu = to_torch(cu.astype(cdt))
                params = extended_params(raw, tensors, dtype=dtype, B=1, M=T, K=K, mode=mode, cu_seqlens=t_cu)
                exp = rope_reference(xs, mode=mode, position_ids=positions_from_cu_seqlens(cu, T))
                _run_extended(raw, res, "cu_seqlens", f"{dtype}-{mode}-{np.dtype(cdt).name}", dtype, [(out, exp)],
                              params, tx, tolerance(dtype, T))
        bad = cu.copy()
        bad[-1] = T - 1  # last entry is not T: every row NaN
        t_bad = to_torch(bad)
        params = extended_params(raw, tensors, dtype=dtype, B=1, M=T, K=K, cu_seqlens=t_bad)
        exp = rope_reference(xs, position_ids=positions_from_cu_seqlens(cu, T))
        exp[..., :K] = np.nan
        _run_extended(raw, res, "cu_seqlens", f"{dtype}-malformed-last", dtype, [(out, exp)], params, tx, 1.0)
        dec = cu.copy()
        dec[3], dec[4] = cu[4] + 1, cu[3]  # decreasing: every row NaN, like the other malformed arrays
        t_dec = to_torch(dec)
        params = extended_params(raw, tensors, dtype=dtype, B=1, M=T, K=K, cu_seqlens=t_dec)
        _run_extended(raw, res, "cu_seqlens", f"{dtype}-malformed-decreasing", dtype, [(out, exp)], params, tx, 1.0)

def check_launch_shapes(raw, res, subset: int):
    """Every 4th (x subset) case at K = 128, and the LLM inputs, under each of LAUNCH_SHAPES."""
    for items, threads, persistent, small in LAUNCH_SHAPES:
        prefix = f"launch-{items}x{threads}{'p' if persistent else ''}{'-nosmall' if small == 0 else ''}:"
        view = Prefixed(res, prefix)
        raw.set_launch_override(items, threads, persistent, small)
        try:
            for case in forward_cases()[:: 4 * subset]:
                try:
                    run_case(raw, view, "table-K128", case, M=33, K=128)
                except Exception:  # noqa: BLE001
                    view.check("table-K128", case.id, False, traceback.format_exc(limit=2))
            try:
                check_extensions(raw, view)
            except Exception:  # noqa: BLE001
                view.check("extensions", "crashed", False, traceback.format_exc(limit=3))
        finally:
            raw.set_launch_override(0, 0, -1, -1)


def check_large(raw, res):
    """More than 2^31 elements: 64-bit indexing in both kernels (the last rows are checked)."""
    H, K = 32, 128
    M = (1 << 31) // (H * K) + 8  # 2^31 + 32768 elements
    for dtype, layout, misalign in (("float16", "BMHK", 0), ("bfloat16", "BHMK", 0), ("float16", "BMHK", 1)):
        shape = (1, M, H, K) if layout == "BMHK" else (1, H, M, K)
        n = int(np.prod(shape))
        flat = torch.empty(n + misalign, dtype=TORCH_DTYPES[dtype], device=DEVICE).uniform_(-1, 1)
        x = flat[misalign:].view(shape)  # misalign=1 forces the generic kernel
        assert x.numel() > 2**31
        out = rope(raw, x, layout=layout)
        sync()
        tail = slice(M - 8, M)
        xs = x[:, tail] if layout == "BMHK" else x[:, :, tail]
        # reference positions of the tail rows are M-8..M-1: shift via position_ids
        pos = np.arange(M - 8, M).reshape(1, 1, 8)
        exp = rope_reference(to_np64(xs), layout, position_ids=pos)
        got = out[:, tail] if layout == "BMHK" else out[:, :, tail]
        err = float(np.max(np.abs(to_np64(got) - exp)))
        tol = tolerance(dtype, M)
        res.check("large-2^31", f"{dtype}-{layout}-{raw.kernel_name(rope(raw, x, layout=layout, plan_only=True))}",
                  err <= tol, f"err={err:.3g}")
        print(f"  large {dtype} {layout} numel={x.numel()}: tail err {err:.3g}")
        del x, out, flat
        torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default="build-gpu", help="folder holding the _rope_raw module")
    ap.add_argument("--subset", type=int, default=1, help="run every Nth case only (for sanitizers)")
    ap.add_argument("--no-large", action="store_true", help="skip the >2^31-element tensors")
    ap.add_argument("--json", help="write a summary here")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu to run the checks through the CPU kernel")
    ap.add_argument("--only", help="comma-separated groups to run: cases,precision,long,views,heads8,extensions,launch,large")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    raw = load_raw(args.build)

    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (CPU kernel)"
    print(f"device: {name}  torch {torch.__version__}  cmd: {' '.join(sys.argv)}")
    only = set(args.only.split(",")) if args.only else None

    def wanted(group):
        return only is None or group in only

    res = Results()
    t0 = time.time()
    fwd = forward_cases()[:: args.subset] if wanted("cases") else []
    for case in fwd:
        try:
            run_case(raw, res, "table", case)
        except Exception:  # noqa: BLE001 - report and go on
            res.check("table", case.id, False, traceback.format_exc(limit=2))
    for case in (output_layout_cases()[:: args.subset] if wanted("cases") else []):
        try:
            run_case(raw, res, "output-layouts", case)
        except Exception:  # noqa: BLE001
            res.check("output-layouts", case.id, False, traceback.format_exc(limit=2))
    # realistic head sizes through the vector kernel, every layout/mode/dtype
    for case in (forward_cases()[:: max(args.subset, 3)] if wanted("cases") else []):
        try:
            run_case(raw, res, "table-K128", case, M=33, K=128)
        except Exception:  # noqa: BLE001
            res.check("table-K128", case.id, False, traceback.format_exc(limit=2))
    if wanted("precision"):
        check_precision(raw, res)
    if wanted("long"):
        check_long_context(raw, res)
    if wanted("views"):
        check_views_and_odd_tensors(raw, res)
    if wanted("heads8") and DEVICE == "cuda":
        check_heads8(raw, res, args.subset)
    if wanted("extensions"):
        try:
            check_extensions(raw, res)
        except Exception:  # noqa: BLE001
            res.check("extensions", "crashed", False, traceback.format_exc(limit=3))
    if wanted("launch") and DEVICE == "cuda":
        check_launch_shapes(raw, res, args.subset)
    if wanted("large") and not args.no_large and args.subset == 1:
        check_large(raw, res)
    for group, (ok, bad, worst) in res.groups.items():
        print(f"  {group:24s} {ok:5d} passed {bad:3d} failed  worst err/bound {worst:.3f}")
    for f in res.failed[:30]:
        print("FAIL", f)
    print(f"elapsed {time.time() - t0:.1f}s")
    print(f"{res.passed} passed, {len(res.failed)} failed")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"passed": res.passed, "failed": res.failed, "groups": res.groups}, fh, indent=1)
    return 0 if not res.failed else 1


if __name__ == "__main__":
    sys.exit(main())
