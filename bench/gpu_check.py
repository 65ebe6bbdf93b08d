"""GPU test bench: the CUDA kernels against the float64 reference, with no OneFlow.

Runs on the device machine (PyTorch + the raw binding built by bench/run_gpu.sh):
  - every case of tests/cases.py (forward and backward), the output-layout cases;
  - precision at positions up to 65535 (SPEC.md bounds), every dtype and mode;
  - views with non-default strides, misaligned pointers (generic kernel), empty tensors;
  - positions outside the cos/sin table (NaN, no out-of-bounds read: run under compute-sanitizer);
  - a tensor of more than 2^31 elements (64-bit indexing), unless --subset.
Prints one line per group and a final 'N passed, N failed' line; exits 1 on any failure.

    python bench/gpu_check.py --build build-gpu [--subset 40] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from cases import Case, forward_cases, make_inputs, max_position, output_layout_cases, round_to_dtype  # noqa: E402
from raw_driver import rope, rope_backward  # noqa: E402
from reference import rope_reference, rope_reference_backward, tolerance  # noqa: E402

TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
                "bfloat16": torch.bfloat16}


def to_torch(a, dtype=None):
    if a is None:
        return None
    t = torch.from_numpy(np.ascontiguousarray(a)).cuda()
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


def run_case(raw, res, group, case: Case, M=5, K=16, max_pos=4096, backward=True):
    arrays, kwargs = make_inputs(case, M=M, K=K, max_position=max_pos)
    t = {n: to_torch(arrays[n], case.dtype if n != "position_ids" else None) for n in arrays}
    out = rope(raw, t["x"], t["cos"], t["sin"], t["position_ids"], **kwargs)
    torch.cuda.synchronize()
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
        torch.cuda.synchronize()
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
        res.check("views", f"misaligned-{dtype}-{name}", name == "generic" and err <= tolerance(dtype, 10),
                  f"err={err:.3g}")
        # non-unit stride of K (every other element of the last axis)
        wide = to_torch(round_to_dtype(rng.uniform(-1, 1, (2, 7, 6, 128)), dtype), dtype)
        xs = wide[..., ::2]
        out = rope(raw, xs)
        err = float(np.max(np.abs(to_np64(out) - rope_reference(to_np64(xs)))))
        res.check("views", f"k-stride-2-{dtype}", err <= tolerance(dtype, 10), f"err={err:.3g}")
    # empty tensors
    for shape, layout in (((0, 5, 3, 16), "BMHK"), ((2, 0, 3 * 3 * 16), "BM(H3K)")):
        x = torch.zeros(shape, device="cuda")
        out = rope(raw, x, layout=layout, k_size=16 if "(" in layout else None)
        res.check("odd", f"empty-{layout}", out.numel() == 0)
    # positions outside the table: NaN rows, no out-of-bounds read (compute-sanitizer checks)
    x = torch.ones(1, 3, 2, 8, device="cuda")
    cos = torch.ones(4, 8, device="cuda")
    sin = torch.zeros(4, 8, device="cuda")
    pos = torch.tensor([[[0, 4, -1]]], device="cuda", dtype=torch.int64)
    out = rope(raw, x, cos, sin, pos)
    torch.cuda.synchronize()
    ok = bool(torch.isnan(out[0, 1]).all() and torch.isnan(out[0, 2]).all() and (out[0, 0] == 1).all())
    res.check("odd", "positions-outside-table-give-nan", ok)


def check_large(raw, res):
    """More than 2^31 elements: 64-bit indexing in both kernels (the last rows are checked)."""
    H, K = 32, 128
    M = (1 << 31) // (H * K) + 8  # 2^31 + 32768 elements
    for dtype, layout, misalign in (("float16", "BMHK", 0), ("bfloat16", "BHMK", 0), ("float16", "BMHK", 1)):
        shape = (1, M, H, K) if layout == "BMHK" else (1, H, M, K)
        n = int(np.prod(shape))
        flat = torch.empty(n + misalign, dtype=TORCH_DTYPES[dtype], device="cuda").uniform_(-1, 1)
        x = flat[misalign:].view(shape)  # misalign=1 forces the generic kernel
        assert x.numel() > 2**31
        out = rope(raw, x, layout=layout)
        torch.cuda.synchronize()
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
    args = ap.parse_args()
    sys.path.insert(0, args.build)
    import _rope_raw as raw

    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  cmd: {' '.join(sys.argv)}")
    res = Results()
    t0 = time.time()
    fwd = forward_cases()[:: args.subset]
    for case in fwd:
        try:
            run_case(raw, res, "table", case)
        except Exception:  # noqa: BLE001 - report and go on
            res.check("table", case.id, False, traceback.format_exc(limit=2))
    for case in output_layout_cases()[:: args.subset]:
        try:
            run_case(raw, res, "output-layouts", case)
        except Exception:  # noqa: BLE001
            res.check("output-layouts", case.id, False, traceback.format_exc(limit=2))
    # realistic head sizes through the vector kernel, every layout/mode/dtype
    for case in forward_cases()[:: max(args.subset, 3)]:
        try:
            run_case(raw, res, "table-K128", case, M=33, K=128)
        except Exception:  # noqa: BLE001
            res.check("table-K128", case.id, False, traceback.format_exc(limit=2))
    check_precision(raw, res)
    check_views_and_odd_tensors(raw, res)
    if not args.no_large and args.subset == 1:
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
