"""Runs the CPU kernel, built with AddressSanitizer and UndefinedBehaviorSanitizer into the raw
module, over the whole case table (forward and backward), odd sizes, views and positions outside
the cos/sin table; checks every result against the reference. tests/test_sanitizers.py builds
the module and runs this under the sanitizer runtime; any bad access aborts the process.

    python -m tests.sanitize_driver BUILD_DIR        (from the repository root)
"""

from __future__ import annotations

import sys

import numpy as np

from tests.cases import forward_cases, make_inputs, max_position, output_layout_cases
from tests.raw_driver import load_raw, rope, rope_backward
from tests.reference import rope_reference, rope_reference_backward, tolerance


def bf16_bits(a: np.ndarray) -> np.ndarray:
    """bfloat16 storage (uint16) of values already representable in bfloat16."""
    return (a.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


def from_bits(a: np.ndarray) -> np.ndarray:
    return (a.astype(np.uint32) << 16).view(np.float32)


def storage(a, dtype):
    if a is None:
        return None
    if dtype == "bfloat16":
        return bf16_bits(a)
    if dtype == "float16":
        return a.astype(np.float16)
    return a.astype(np.float64 if dtype == "float64" else np.float32)


def values(a, dtype):
    return from_bits(a).astype(np.float64) if dtype == "bfloat16" else a.astype(np.float64)


def main() -> int:
    raw = load_raw(sys.argv[1])

    failures, count = [], 0
    for case in forward_cases() + output_layout_cases():
        for M, K in ((5, 16), (3, 8), (1, 8)):
            arrays, kwargs = make_inputs(case, M=M, K=K, B=1 + case.seed() % 3, H=1 + case.seed() % 3)
            x = storage(arrays["x"], case.dtype)
            cos, sin = storage(arrays["cos"], case.dtype), storage(arrays["sin"], case.dtype)
            out = rope(raw, x, cos, sin, arrays["position_ids"], **kwargs)
            expected = rope_reference(arrays["x"], cos=arrays["cos"], sin=arrays["sin"],
                                      position_ids=arrays["position_ids"], **kwargs)
            tol = tolerance(case.dtype, max_position(arrays, M))
            err = np.max(np.abs(values(out, case.dtype) - expected))
            dy = storage(np.random.default_rng(1).uniform(-1, 1, expected.shape), case.dtype)
            dx = rope_backward(raw, dy, x.shape, cos, sin, arrays["position_ids"], **kwargs)
            exp_dx = rope_reference_backward(values(dy, case.dtype), cos=arrays["cos"], sin=arrays["sin"],
                                             position_ids=arrays["position_ids"], x_shape=x.shape, **kwargs)
            err_dx = np.max(np.abs(values(dx, case.dtype) - exp_dx))
            count += 1
            if not (err <= tol and err_dx <= tol):
                failures.append(f"{case.id} M={M} K={K}: err {err:.3g} / {err_dx:.3g} > {tol}")
    # views: a head slice, a transposed tensor, every other element of K
    rng = np.random.default_rng(5)
    big = rng.uniform(-1, 1, (2, 5, 6, 32))
    for name, view, layout in (("head-slice", big[:, :, 1:4, :], "BMHK"),
                               ("transposed", big.transpose(0, 2, 1, 3), "BHMK"),
                               ("k-stride", big[..., ::2], "BMHK")):
        out = rope(raw, view, layout=layout)
        err = np.max(np.abs(out - rope_reference(view, layout)))
        count += 1
        if err > 1e-12:
            failures.append(f"view {name}: err {err}")
    # positions outside the table: NaN rows, nothing read outside the table
    x = np.ones((1, 3, 2, 8))
    cos, sin = np.ones((4, 8)), np.zeros((4, 8))
    pos = np.array([[[0, 4, -1]]], dtype=np.int64)
    out = rope(raw, x, cos, sin, pos)
    count += 1
    if not (np.all(out[0, 0] == 1) and np.all(np.isnan(out[0, 1:]))):
        failures.append("positions outside the table did not give NaN")
    # empty tensors
    for shape in ((0, 5, 3, 16), (2, 0, 3, 16), (2, 5, 0, 16)):
        out = rope(raw, np.zeros(shape))
        count += 1
        if out.shape != shape:
            failures.append(f"empty {shape}: out shape {out.shape}")
    for f in failures[:20]:
        print("FAIL", f)
    print(f"{count - len(failures)} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
