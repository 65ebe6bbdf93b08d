"""Checks of the CPU kernel through the raw module (no OneFlow). tests/test_cpu_kernel.py runs it in
a subprocess per instruction set (ONEFLOW_ROPE_CPU_ISA picks the kernel build, once a process):

  threads   every call of a grid (layouts, views, modes, dtypes, partial and 2-D rotary, tables,
            float32 tables with 16-bit x, computed angles, inv_freq, attention_scaling, position_ids,
            seqlen offsets, cu_seqlens valid and malformed, positions outside the table, q and k in
            one call, packed gradients with zero slots, in place, odd head sizes) on 1 thread and on
            2, 3 and 5 (the least bytes a thread must move lowered to 1, so that small calls split
            too): outputs (every bit) and counts of NaN rows equal; outputs within the reference's
            bounds;
  rounding  float16 / bfloat16 outputs of exactly computable products (x * 0.75 or x * 1.5 from a
            table, every 16-bit pattern: ties, subnormals, overflow, infinities, NaN) against numpy's
            round to nearest even, bit for bit;
  angles    computed angles at positions up to 2^24 against the float64 reference;
  large     calls moving 64 MiB (non-temporal stores and prefetching in the AVX-512 builds).

    python -m tests.cpu_kernel_driver BUILD_DIR [DIGESTS.json]
Prints the instruction set, any failures and 'N passed, N failed'; exits 1 on a failure. With
DIGESTS.json, writes a digest of each call's outputs there (the builds for each instruction set
must agree: they compute the same operations, without fused multiply-adds).
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from tests.cases import layout_shape, random_rope_table, round_to_dtype  # noqa: E402
from tests.raw_driver import extended_params, load_raw, rope, rope_backward, tensor_entry  # noqa: E402
from tests.reference import positions_from_cu_seqlens, rope_reference, rope_reference_backward, tolerance  # noqa: E402
from tests.sanitize_driver import from_bits, storage, values  # noqa: E402

THREADS = (2, 3, 5)


class Threaded:
    """The raw module, with every CPU launch made on n threads."""

    def __init__(self, raw, n: int):
        self._raw, self._n = raw, n

    def __getattr__(self, name):
        return getattr(self._raw, name)

    def forward_cpu(self, params):
        return self._raw.forward_cpu(dict(params, num_threads=self._n))


class Results:
    def __init__(self):
        self.passed = 0
        self.failures: List[str] = []
        self.digests: Dict[str, str] = {}  # call -> digest of its outputs (NaN payloads ignored)

    def check(self, ok: bool, what: str) -> None:
        if ok:
            self.passed += 1
        else:
            self.failures.append(what)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and np.array_equal(
        np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8))


def max_err(got: np.ndarray, expected: np.ndarray, dtype: str) -> float:
    g = values(got, dtype)
    if expected.size == 0:
        return 0.0
    return float(np.max(np.abs(g - expected)))


def digest(outs: List[np.ndarray]) -> str:
    """Of the values (float64: exact for every dtype), -0.0 and +0.0 apart, every NaN alike."""
    h = hashlib.sha256()
    for a in outs:
        v = values(a, "bfloat16" if a.dtype == np.uint16 else str(a.dtype))
        h.update(np.where(np.isnan(v), np.nan, v).tobytes())
    return h.hexdigest()


def across_threads(raw, res: Results, name: str, run: Callable[[object], Tuple[List[np.ndarray], int]],
                   check: Optional[Callable[[List[np.ndarray]], Optional[str]]] = None) -> None:
    """run(raw) -> (outputs, NaN-row count). Runs on 1 thread and on THREADS; compares."""
    outs1, bad1 = run(raw)
    res.digests[name] = digest(outs1)
    if check is not None:
        problem = check(outs1)
        res.check(problem is None, f"{name}: {problem}")
    for n in THREADS:
        outs, bad = run(Threaded(raw, n))
        ok = bad == bad1 and len(outs) == len(outs1) and all(same_bits(a, b) for a, b in zip(outs, outs1))
        res.check(ok, f"{name}: {n} threads differ from 1 (NaN rows {bad} vs {bad1})")


# ---- single-tensor calls through raw_driver.rope / rope_backward (every layout) -----------------

LAYOUTS = ("BMHK", "BHMK", "MBHK", "BM(HK)", "MB(HK)", "BM(H2K)", "MB(H2K)", "BM(H3K)", "MB(H3K)")
DTYPES = ("float32", "float64", "float16", "bfloat16")


def single_tensor_calls(raw, res: Results, rng: np.random.Generator) -> None:
    sizes = [(2, 37, 3, 128, 128), (3, 11, 2, 64, 64), (1, 29, 5, 40, 40), (2, 9, 3, 96, 32),
             (1, 13, 2, 12, 12), (2, 7, 3, 70, 64), (4, 5, 1, 256, 256)]
    count = 0
    for layout in LAYOUTS:
        for dtype in DTYPES:
            for mode in ("plane", "interval"):
                B, M, H, K, rot = sizes[count % len(sizes)]
                count += 1
                R = 2 if count % 5 == 0 and rot % 4 == 0 else 1
                table = count % 3 == 0
                positions = R == 2 or count % 2 == 0
                part = rot // R
                kwargs = {"layout": layout, "mode": mode}
                if rot != K:
                    kwargs["rotary_size"] = rot
                if "(" in layout:
                    kwargs["k_size"] = K
                if "2K" in layout:
                    kwargs["tensor_index"] = 1 + count % 2
                elif "3K" in layout:
                    kwargs["tensor_index"] = count % 3
                cos = sin = pos = None
                rows = M + 3
                if table:
                    cos, sin = random_rope_table(rng, rows=rows, part=part, mode=mode, dtype=dtype)
                else:
                    kwargs["base"] = (10000.0, 500000.0, 10.0)[count % 3]
                if positions:
                    high = rows if table else 4096
                    pos = rng.integers(0, high, (B, R, M)).astype(np.int32 if count % 4 else np.int64)
                x64 = round_to_dtype(rng.uniform(-1, 1, layout_shape(layout, B, M, H, K)), dtype)
                x = storage(x64, dtype)
                cs, ss = storage(cos, dtype), storage(sin, dtype)
                name = f"{layout}-{dtype}-{mode}-R{R}-{'table' if table else 'base'}-K{K}-rot{rot}"
                max_pos = int(pos.max()) if pos is not None else M - 1
                tol = tolerance(dtype, max_pos)

                def forward(r, x=x, cs=cs, ss=ss, pos=pos, kwargs=kwargs):
                    return [rope(r, x, cs, ss, pos, **kwargs)], 0

                def check_forward(outs, x64=x64, cos=cos, sin=sin, pos=pos, kwargs=kwargs, dtype=dtype, tol=tol):
                    exp = rope_reference(x64, cos=cos, sin=sin, position_ids=pos, **kwargs)
                    err = max_err(outs[0], exp, dtype)
                    return None if err <= tol else f"error {err} > {tol}"

                across_threads(raw, res, "forward " + name, forward, check_forward)

                exp_fwd = rope_reference(x64, cos=cos, sin=sin, position_ids=pos, **kwargs)
                dy64 = round_to_dtype(rng.uniform(-1, 1, exp_fwd.shape), dtype)
                dy = storage(dy64, dtype)

                def backward(r, dy=dy, x=x, cs=cs, ss=ss, pos=pos, kwargs=kwargs):
                    return [rope_backward(r, dy, x.shape, cs, ss, pos, **kwargs)], 0

                def check_backward(outs, dy64=dy64, x=x, cos=cos, sin=sin, pos=pos, kwargs=kwargs, dtype=dtype,
                                   tol=tol):
                    exp = rope_reference_backward(dy64, cos=cos, sin=sin, position_ids=pos, x_shape=x.shape,
                                                  **kwargs)
                    err = max_err(outs[0], exp, dtype)
                    return None if err <= tol else f"error {err} > {tol}"

                across_threads(raw, res, "backward " + name, backward, check_backward)


def views(raw, res: Results, rng: np.random.Generator) -> None:
    """Strided heads (the staged kernels): a head slice, a transposed tensor, every other k."""
    big = rng.uniform(-1, 1, (3, 23, 6, 64))
    for dtype in DTYPES:
        b = storage(round_to_dtype(big, dtype), dtype)
        for vname, view, layout in (("head-slice", b[:, :, 1:4, :], "BMHK"),
                                    ("transposed", b.transpose(0, 2, 1, 3), "BHMK"),
                                    ("k-stride", b[..., ::2], "BMHK")):
            for mode in ("plane", "interval"):
                def run(r, view=view, layout=layout, mode=mode):
                    return [rope(r, view, layout=layout, mode=mode)], 0

                def check(outs, view=view, layout=layout, mode=mode, dtype=dtype):
                    exp = rope_reference(values(view, dtype), layout, mode=mode)
                    err = max_err(outs[0], exp, dtype)
                    tol = tolerance(dtype, 0)
                    return None if err <= tol else f"error {err} > {tol}"

                across_threads(raw, res, f"view {vname}-{dtype}-{mode}", run, check)


# ---- calls using the extended parameters (as bench/gpu_check.py builds them) ----------------------

def extended_calls(raw, res: Results, rng: np.random.Generator) -> None:
    B, M, K = 2, 41, 128
    Hq, Hk = 4, 2
    for dtype in DTYPES:
        for mode in ("plane", "interval"):
            q64 = round_to_dtype(rng.uniform(-1, 1, (B, M, Hq, K)), dtype)
            k64 = round_to_dtype(rng.uniform(-1, 1, (B, M, Hk, K)), dtype)
            q, k = storage(q64, dtype), storage(k64, dtype)
            offsets = np.array([5, 1000], dtype=np.int64)

            # q and k in one call: inv_freq, attention_scaling, seqlen offsets
            for inv_dtype in (np.float32, np.float64):
                inv_freq = (1.0 / (10000.0 ** (np.arange(0, K, 2) / K))).astype(inv_dtype)

                def run(r, inv_freq=inv_freq, q=q, k=k, mode=mode, dtype=dtype):
                    oq, ok_ = np.empty_like(q), np.empty_like(k)
                    tensors = [tensor_entry(r, q, oq, "BMHK", "BMHK", K=K, H=Hq), tensor_entry(r, k, ok_, "BMHK", "BMHK", K=K, H=Hk)]
                    params = extended_params(r, tensors, dtype=dtype, B=B, M=M, K=K, mode=mode, inv_freq=inv_freq,
                                             attention_scaling=0.75, seqlen_offset=7, seqlen_offsets=offsets)
                    return [oq, ok_], launch_count(r, q, params)

                def check(outs, inv_freq=inv_freq, q64=q64, k64=k64, mode=mode, dtype=dtype):
                    kw = dict(mode=mode, inv_freq=inv_freq, attention_scaling=0.75, seqlen_offsets=offsets + 7)
                    errs = [max_err(outs[0], rope_reference(q64, **kw), dtype),
                            max_err(outs[1], rope_reference(k64, **kw), dtype)]
                    tol = tolerance(dtype, 1000 + M)
                    return None if max(errs) <= tol else f"errors {errs} > {tol}"

                across_threads(raw, res, f"q+k inv_freq {np.dtype(inv_dtype).name} {dtype}-{mode}", run, check)

            # float32 tables with 16-bit x (and x's dtype otherwise), inverse, positions outside the table
            table_dtype = "float32" if dtype in ("float16", "bfloat16") else dtype
            rows = 50
            cos, sin = random_rope_table(rng, rows=rows, part=K, mode=mode, dtype=table_dtype)
            cs, ss = storage(cos, table_dtype), storage(sin, table_dtype)
            pos = rng.integers(0, rows, (B, 1, M)).astype(np.int64)
            pos[0, 0, 3] = rows  # outside: a NaN row
            pos[1, 0, 10] = -1

            def run_table(r, q=q, k=k, cs=cs, ss=ss, pos=pos, mode=mode, dtype=dtype):
                oq, ok_ = np.empty_like(q), np.empty_like(k)
                tensors = [tensor_entry(r, q, oq, "BMHK", "BMHK", K=K, H=Hq), tensor_entry(r, k, ok_, "BMHK", "BMHK", K=K, H=Hk)]
                params = extended_params(r, tensors, dtype=dtype, B=B, M=M, K=K, mode=mode, cos=cs, sin=ss,
                                         position_ids=pos, inverse=True)
                return [oq, ok_], launch_count(r, q, params)

            def check_table(outs, q64=q64, cos=cos, sin=sin, pos=pos, mode=mode, dtype=dtype):
                good = np.clip(pos, 0, rows - 1)
                exp = rope_reference_backward(q64, cos=cos, sin=sin, position_ids=good, mode=mode)
                got = values(outs[0], dtype)
                nan_rows = np.isnan(got).all(axis=(2, 3))
                expect_nan = (pos[:, 0, :] < 0) | (pos[:, 0, :] >= rows)
                if not np.array_equal(nan_rows, expect_nan):
                    return "NaN rows are not the rows outside the table"
                err = float(np.max(np.abs(got[~expect_nan] - exp[~expect_nan])))
                tol = tolerance(dtype, rows)
                return None if err <= tol else f"error {err} > {tol}"

            across_threads(raw, res, f"table {table_dtype} with {dtype} x, inverse, outside rows {mode}",
                           run_table, check_table)

            # packed QKV: q and k slots in one call into BHMK outputs; in place on the packed tensor
            H = 3
            packed64 = round_to_dtype(rng.uniform(-1, 1, (B, M, H * 3 * K)), dtype)
            packed = storage(packed64, dtype)

            def run_packed(r, packed=packed, mode=mode, dtype=dtype):
                outs = [np.empty((B, H, M, K), packed.dtype) for _ in range(2)]
                tensors = [tensor_entry(r, packed, outs[s], "BM(H3K)", "BHMK", K=K, H=H, src_slot=s) for s in range(2)]
                params = extended_params(r, tensors, dtype=dtype, B=B, M=M, K=K, mode=mode, seqlen_offset=100)
                return outs, launch_count(r, packed, params)

            def check_packed(outs, packed64=packed64, mode=mode, dtype=dtype):
                errs = [max_err(outs[s], rope_reference(packed64, "BM(H3K)", mode=mode, tensor_index=s, k_size=K,
                                                        output_layout="BHMK", seqlen_offsets=100), dtype)
                        for s in range(2)]
                tol = tolerance(dtype, 100 + M)
                return None if max(errs) <= tol else f"errors {errs} > {tol}"

            across_threads(raw, res, f"packed q+k {dtype}-{mode}", run_packed, check_packed)

            def run_in_place(r, packed=packed, mode=mode, dtype=dtype):
                buf = packed.copy()
                tensors = [tensor_entry(r, buf, buf, "BM(H3K)", "BM(H3K)", K=K, H=H, src_slot=s, dst_slot=s) for s in range(2)]
                params = extended_params(r, tensors, dtype=dtype, B=B, M=M, K=K, mode=mode)
                return [buf], launch_count(r, buf, params)

            def check_in_place(outs, packed64=packed64, mode=mode, dtype=dtype):
                got = values(outs[0], dtype).reshape(B, M, H, 3, K)
                errs = [float(np.max(np.abs(got[:, :, :, s, :] - rope_reference(
                    packed64, "BM(H3K)", mode=mode, tensor_index=s, k_size=K, output_layout="BMHK"))))
                    for s in range(2)]
                errs.append(float(np.max(np.abs(got[:, :, :, 2, :] - packed64.reshape(B, M, H, 3, K)[:, :, :, 2, :]))))
                tol = tolerance(dtype, M)
                return None if max(errs) <= tol else f"errors {errs} > {tol}"

            across_threads(raw, res, f"in place packed q+k {dtype}-{mode}", run_in_place, check_in_place)

            # cu_seqlens: valid (int32 / int64) and malformed (last entry wrong: every row NaN)
            T = 97
            tx64 = round_to_dtype(rng.uniform(-1, 1, (1, T, 2, K)), dtype)
            tx = storage(tx64, dtype)
            cu = np.array([0, 10, 11, 50, 90, 97])
            for cdt, cu_arr, label in ((np.int32, cu, "int32"), (np.int64, cu, "int64"),
                                       (np.int64, np.array([0, 10, 11, 50, 90, 96]), "malformed")):
                def run_cu(r, cu_arr=cu_arr.astype(cdt), tx=tx, mode=mode, dtype=dtype):
                    out = np.empty_like(tx)
                    tensors = [tensor_entry(r, tx, out, "BMHK", "BMHK", K=K, H=2)]
                    params = extended_params(r, tensors, dtype=dtype, B=1, M=T, K=K, mode=mode, cu_seqlens=cu_arr)
                    return [out], launch_count(r, tx, params)

                def check_cu(outs, label=label, tx64=tx64, mode=mode, dtype=dtype):
                    got = values(outs[0], dtype)
                    if label == "malformed":
                        return None if np.isnan(got).all() else "malformed cu_seqlens: rows not NaN"
                    exp = rope_reference(tx64, mode=mode, position_ids=positions_from_cu_seqlens(cu, T))
                    err = float(np.max(np.abs(got - exp)))
                    return None if err <= tolerance(dtype, T) else f"error {err}"

                across_threads(raw, res, f"cu_seqlens {label} {dtype}-{mode}", run_cu, check_cu)


def launch_count(r, x, params) -> int:
    """Launches params on the CPU; returns the kernel's count of NaN rows."""
    return int(r.forward_cpu(params))


# ---- float16 / bfloat16 rounding, bit for bit -----------------------------------------------------

def bf16_round_bits(f32: np.ndarray) -> np.ndarray:
    u = f32.astype(np.float32).view(np.uint32).astype(np.uint64)
    nan = np.isnan(f32)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
    r = np.where(nan, ((u >> 16) | 0x40) & 0xFFFF, r)
    return r.astype(np.uint16)


def rounding(raw, res: Results) -> None:
    patterns = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    K = 128
    M = 65536 // K
    for dtype in ("bfloat16", "float16"):
        xbits = patterns.reshape(1, M, 1, K)
        x = xbits if dtype == "bfloat16" else xbits.view(np.float16)
        xf = from_bits(xbits) if dtype == "bfloat16" else xbits.view(np.float16).astype(np.float32)
        for factor in (0.75, 1.5):
            for mode in ("plane", "interval"):
                cos = np.full((M, K), factor, np.float32)
                sin = np.zeros((M, K), np.float32)
                cs, ss = storage(cos, dtype), storage(sin, dtype)
                out = rope(raw, x, cs, ss, mode=mode)
                # out[k] = x[k] * factor + x[partner] * (+-0), exact before the rounding
                j = np.arange(K)
                if mode == "plane":
                    partner, sign = np.where(j < K // 2, j + K // 2, j - K // 2), np.where(j < K // 2, -1.0, 1.0)
                else:
                    partner, sign = j ^ 1, np.where(j % 2 == 0, -1.0, 1.0)
                zero = (np.float32(0.0) * sign).astype(np.float32)
                with np.errstate(invalid="ignore", over="ignore"):
                    exact = xf * np.float32(factor) + xf[..., partner] * zero
                got_bits = out.view(np.uint16)
                with np.errstate(invalid="ignore", over="ignore"):
                    want = bf16_round_bits(exact) if dtype == "bfloat16" else exact.astype(np.float16).view(np.uint16)
                nan = np.isnan(exact)
                got_nan = (got_bits & 0x7FFF) > (0x7F80 if dtype == "bfloat16" else 0x7C00)
                ok = np.array_equal(got_bits[~nan], want[~nan]) and np.array_equal(got_nan, nan)
                bad = int(np.sum(got_bits[~nan] != want[~nan]))
                res.check(ok, f"rounding {dtype} x{factor} {mode}: {bad} values differ from round to nearest even")


def angles(raw, res: Results) -> None:
    """Computed angles at large positions, every dtype, against the float64 reference. The
    reference is given the kernel's frequencies base ** (-2i / A) as inv_freq, computed with libm's
    pow (math.pow, as the kernel): numpy's power may be 1 ulp off, which at position 2^24 moves
    float64 results by ~1e-9, past the bound."""
    K, H = 128, 2
    rng = np.random.default_rng(7)
    pos = np.array([0, 1, 4095, 65535, 2**20 + 3, 2**24 - 1, 2**24], dtype=np.int64)
    M = pos.size
    for dtype in DTYPES:
        x64 = round_to_dtype(rng.uniform(-1, 1, (1, M, H, K)), dtype)
        x = storage(x64, dtype)
        for base in (10000.0, 1.5):
            theta = np.array([math.pow(base, -2.0 * i / K) for i in range(K // 2)])
            for mode in ("plane", "interval"):
                p = pos.reshape(1, 1, M)
                out = rope(raw, x, None, None, p, mode=mode, base=base)
                exp = rope_reference(x64, position_ids=p, mode=mode, inv_freq=theta)
                err = max_err(out, exp, dtype)
                tol = tolerance(dtype, int(pos.max()))
                res.check(err <= tol, f"angles {dtype} base {base} {mode}: error {err} > {tol} at 2^24")


def large_calls(raw, res: Results) -> None:
    """Calls moving over 1.5x the last-level cache (64 MiB): the AVX-512 builds write them with
    non-temporal stores and prefetch x; threads and reference as above (reference on a few rows)."""
    rng = np.random.default_rng(11)
    for dtype, shape in (("float32", (1, 2048, 32, 128)), ("float64", (1, 1024, 32, 128)),
                         ("bfloat16", (2, 2048, 32, 128)), ("float16", (2, 2048, 32, 128))):
        B, M, H, K = shape
        x64 = round_to_dtype(rng.uniform(-1, 1, shape), dtype)
        x = storage(x64, dtype)
        pos = np.broadcast_to(np.arange(M, dtype=np.int64), (B, 1, M)).copy()
        rows = np.r_[0:3, M // 2:M // 2 + 3, M - 3:M]
        for mode in ("plane", "interval"):
            def run(r, x=x, mode=mode, pos=pos):
                return [rope(r, x, None, None, pos, mode=mode)], 0

            def check(outs, x64=x64, mode=mode, pos=pos, dtype=dtype):
                exp = rope_reference(x64[:, rows], position_ids=pos[:, :, rows], mode=mode)
                err = max_err(outs[0][:, rows], exp, dtype)
                tol = tolerance(dtype, M)
                return None if err <= tol else f"error {err} > {tol}"

            across_threads(raw, res, f"large {dtype} {shape} {mode}", run, check)

    # the gradient of a packed x: zero slots written with the rotated one (64 MiB written)
    B, M, H, K = 1, 1024, 32, 128
    for dtype in ("float32", "bfloat16"):
        dy64 = round_to_dtype(rng.uniform(-1, 1, (B, M, H * K)), dtype)
        dy = storage(dy64, dtype)
        x_shape = (B, M, H * 3 * K)
        kwargs = {"layout": "BM(H3K)", "k_size": K, "tensor_index": 1}

        def run_bwd(r, dy=dy, x_shape=x_shape, kwargs=kwargs):
            return [rope_backward(r, dy, x_shape, **kwargs)], 0

        def check_bwd(outs, dy64=dy64, x_shape=x_shape, kwargs=kwargs, dtype=dtype):
            got = values(outs[0], dtype).reshape(B, M, H, 3, K)
            if not (np.all(got[:, :, :, 0] == 0) and np.all(got[:, :, :, 2] == 0)):
                return "zero slots not zero"
            rows = np.r_[0:3, M - 3:M]
            exp = rope_reference_backward(dy64[:, rows], position_ids=np.broadcast_to(rows, (B, 1, rows.size)),
                                          x_shape=(B, rows.size, H * 3 * K), **kwargs)
            err = float(np.max(np.abs(got[:, rows].reshape(exp.shape) - exp)))
            return None if err <= tolerance(dtype, M) else f"error {err}"

        across_threads(raw, res, f"large packed gradient {dtype}", run_bwd, check_bwd)


def main() -> int:
    raw = load_raw(sys.argv[1])

    raw.set_cpu_min_bytes_per_thread(1)
    res = Results()
    rng = np.random.default_rng(2024)
    single_tensor_calls(raw, res, rng)
    views(raw, res, rng)
    extended_calls(raw, res, rng)
    rounding(raw, res)
    angles(raw, res)
    large_calls(raw, res)
    print("isa", raw.cpu_isa())
    if len(sys.argv) > 2:
        with open(sys.argv[2], "w") as f:
            json.dump({"isa": raw.cpu_isa(), "digests": res.digests}, f, indent=0, sort_keys=True)
    for f in res.failures[:30]:
        print("FAIL", f)
    print(f"{res.passed} passed, {len(res.failures)} failed")
    return 1 if res.failures else 0


if __name__ == "__main__":
    sys.exit(main())
