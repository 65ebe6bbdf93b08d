"""Property test: hypothesis draws whole calls (layout, output layout, mode, sizes including 1 and
odd head counts and head sizes, rotary_size, rotary dim, table or computed sin/cos, kind of
position_ids, dtype, non-contiguous views) and checks the op against the reference, in eager mode
and for a sample inside nn.Graph. Fixed seed (derandomize) and a bounded number of examples, so
CI runs the same cases every time."""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import oneflow as flow
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import oneflow_rope
from tests.cases import INPUT_LAYOUTS, OUTPUT_LAYOUTS, layout_shape, random_rope_table, round_to_dtype
from tests.flow_helpers import keep_alive, to_flow, to_numpy64
from tests.reference import rope_reference, tolerance

SETTINGS = dict(derandomize=True, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@st.composite
def rope_calls(draw) -> Dict[str, object]:
    layout = draw(st.sampled_from(INPUT_LAYOUTS))
    mode = draw(st.sampled_from(["plane", "interval"]))
    rotary_dim = draw(st.sampled_from([1, 2]))
    B, M, H = draw(st.integers(1, 3)), draw(st.integers(1, 7)), draw(st.integers(1, 5))
    part = 2 * draw(st.integers(1, 4))
    rotary = part * rotary_dim
    K = rotary + draw(st.integers(0, 3))  # untouched dims, possibly an odd number of them
    dtype = draw(st.sampled_from(["float32", "float64", "float16", "bfloat16"]))
    table = draw(st.booleans())
    positions = draw(st.sampled_from(["int32", "int64"] if rotary_dim == 2 else ["none", "int32", "int64"]))
    output_layout = draw(st.one_of(st.none(), st.sampled_from(OUTPUT_LAYOUTS)))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)

    kwargs: Dict[str, object] = {"layout": layout, "mode": mode, "output_layout": output_layout}
    if K != rotary:
        kwargs["rotary_size"] = rotary
    slots = 3 if "3" in layout else (2 if "2" in layout else 1)
    if slots == 2:
        kwargs["tensor_index"] = draw(st.sampled_from([1, 2]))
    elif slots == 3:
        kwargs["tensor_index"] = draw(st.sampled_from([0, 1, 2]))
    if "(" in layout and not (table and K == rotary):
        kwargs["k_size"] = K
    arrays: Dict[str, Optional[np.ndarray]] = {"cos": None, "sin": None, "position_ids": None}
    rows = M + draw(st.integers(0, 3))
    if table:
        arrays["cos"], arrays["sin"] = random_rope_table(rng, rows=rows, part=part, mode=mode, dtype=dtype)
    else:
        kwargs["base"] = draw(st.sampled_from([10000.0, 500000.0, 10.0, 1.5]))
    if positions != "none":
        high = rows if table else 4096
        arrays["position_ids"] = rng.integers(0, high, (B, rotary_dim, M)).astype(
            np.int32 if positions == "int32" else np.int64)
    arrays["x"] = round_to_dtype(rng.uniform(-1, 1, layout_shape(layout, B, M, H, K)), dtype)
    # a non-contiguous view: the same values inside a larger tensor, one slice of its last axis
    view = draw(st.booleans())
    return {"arrays": arrays, "kwargs": kwargs, "dtype": dtype, "view": view, "M": M}


def flow_inputs(call):
    arrays, dtype = call["arrays"], call["dtype"]
    x = to_flow(arrays["x"], dtype)
    if call["view"]:
        padded = np.concatenate([arrays["x"], np.zeros(arrays["x"].shape[:-1] + (3,), arrays["x"].dtype)], -1)
        x = to_flow(padded, dtype)[..., : arrays["x"].shape[-1]]  # strided (unless all other sizes are 1)
    return x, to_flow(arrays["cos"], dtype), to_flow(arrays["sin"], dtype), to_flow(arrays["position_ids"])


def check(call, out):
    arrays, kwargs = call["arrays"], call["kwargs"]
    expected = rope_reference(arrays["x"], cos=arrays["cos"], sin=arrays["sin"],
                              position_ids=arrays["position_ids"], **kwargs)
    assert tuple(out.shape) == expected.shape
    pos = arrays["position_ids"]
    tol = tolerance(call["dtype"], int(pos.max()) if pos is not None else call["M"] - 1)
    err = float(np.max(np.abs(to_numpy64(out) - expected)))
    assert err <= tol, f"error {err} > {tol} for {kwargs}"


@settings(max_examples=400, **SETTINGS)
@given(rope_calls())
def test_random_calls_match_reference_eager(call):
    check(call, oneflow_rope.fused_apply_rotary_emb(*flow_inputs(call), **call["kwargs"]))


@settings(max_examples=4, **SETTINGS)
@given(st.lists(rope_calls(), min_size=8, max_size=8))
def test_random_calls_match_reference_in_graph(calls):
    """Eight random calls per graph (few graphs: see flow_helpers.keep_alive)."""
    inputs = [[t for t in flow_inputs(call)] for call in calls]
    flat = [t for group in inputs for t in group if t is not None]
    present = [[t is not None for t in group] for group in inputs]

    class RopeGraph(flow.nn.Graph):
        def build(self, *tensors):
            it = iter(tensors)
            outs = []
            for call, mask in zip(calls, present):
                args = [next(it) if there else None for there in mask]
                outs.append(oneflow_rope.fused_apply_rotary_emb(*args, **call["kwargs"]))
            return tuple(outs)

    outs = keep_alive(RopeGraph())(*flat)
    for call, out in zip(calls, outs):
        check(call, out)
