"""Forward results of the OneFlow op (CPU kernel) against the float64 reference, every case of the
shared parameter table, in eager mode and a representative set inside nn.Graph."""

from __future__ import annotations

import numpy as np
import oneflow as flow
import pytest

import oneflow_rope
from tests.cases import (INPUT_LAYOUTS, OUTPUT_LAYOUTS, Case, forward_cases, layout_shape, make_inputs, max_position,
                         output_layout_cases)
from tests.flow_helpers import call_op, keep_alive, to_flow, to_numpy64
from tests.reference import rope_reference, tolerance

FORWARD_CASES = forward_cases()
OUTPUT_CASES = output_layout_cases()
# Every 15th case of the table inside nn.Graph (one graph holding them all): it covers each
# layout, mode and dtype.
GRAPH_CASES = FORWARD_CASES[::15] + OUTPUT_CASES[::7]


def check_case(case: Case, out: flow.Tensor, arrays, kwargs) -> None:
    expected = rope_reference(arrays["x"], cos=arrays["cos"], sin=arrays["sin"],
                              position_ids=arrays["position_ids"], **kwargs)
    assert tuple(out.shape) == expected.shape
    assert out.dtype == getattr(flow, case.dtype)
    got = to_numpy64(out)
    tol = tolerance(case.dtype, max_position(arrays, 5))
    err = np.max(np.abs(got - expected)) if expected.size else 0.0
    assert err <= tol, f"{case.id}: max error {err} > {tol}"


def test_case_table_covers_every_combination():
    """Every batched layout (the varlen layouts have their own table in tests/test_varlen.py)."""
    varlen = set(oneflow_rope.VARLEN_LAYOUTS)
    assert len(FORWARD_CASES) == 9 * 2 * 2 * 2 * 4 * 5  # layouts, modes, partial, table, dtypes, (R, pos)
    assert {c.layout for c in FORWARD_CASES} == set(oneflow_rope.INPUT_LAYOUTS) - varlen
    assert {(c.layout, c.output_layout) for c in OUTPUT_CASES} == {
        (i, o) for i in oneflow_rope.INPUT_LAYOUTS for o in oneflow_rope.OUTPUT_LAYOUTS
        if i not in varlen and o not in varlen}


@pytest.mark.parametrize("case", FORWARD_CASES, ids=lambda c: c.id)
def test_forward_eager(case: Case):
    arrays, kwargs = make_inputs(case)
    check_case(case, call_op(arrays, kwargs, case.dtype), arrays, kwargs)


@pytest.mark.parametrize("case", OUTPUT_CASES, ids=lambda c: c.id)
def test_output_layouts(case: Case):
    arrays, kwargs = make_inputs(case)
    check_case(case, call_op(arrays, kwargs, case.dtype), arrays, kwargs)


def test_forward_graph():
    """Every GRAPH_CASES call inside one nn.Graph (one graph for all: OneFlow 0.9.0 can crash
    when many graphs run one after the other, see flow_helpers.keep_alive)."""
    prepared, flat = [], []
    for case in GRAPH_CASES:
        arrays, kwargs = make_inputs(case)
        names = [n for n in ("x", "cos", "sin", "position_ids") if arrays[n] is not None]
        slots = list(range(len(flat), len(flat) + len(names)))
        flat += [to_flow(arrays[n], case.dtype if n != "position_ids" else None) for n in names]
        prepared.append((case, arrays, kwargs, names, slots))

    class AllCasesGraph(flow.nn.Graph):
        def build(self, *tensors):
            outs = []
            for _, _, kwargs, names, slots in prepared:
                t = {n: tensors[i] for n, i in zip(names, slots)}
                outs.append(oneflow_rope.fused_apply_rotary_emb(
                    t["x"], t.get("cos"), t.get("sin"), t.get("position_ids"), **kwargs))
            return tuple(outs)

    outs = keep_alive(AllCasesGraph())(*flat)
    assert len(outs) == len(prepared)
    failures = []
    for (case, arrays, kwargs, _, _), out in zip(prepared, outs):
        try:
            check_case(case, out, arrays, kwargs)
        except AssertionError as e:
            failures.append(f"{case.id}: {e}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("layout", INPUT_LAYOUTS)  # the batched layouts; varlen: tests/test_varlen.py
@pytest.mark.parametrize("output_layout", [None] + list(OUTPUT_LAYOUTS))
def test_python_shape_inference_matches_op(layout, output_layout):
    B, M, H, K = 2, 3, 4, 8
    x = flow.zeros(*layout_shape(layout, B, M, H, K))
    kwargs = {"layout": layout, "output_layout": output_layout}
    if "(" in layout:
        kwargs["k_size"] = K
    shapes = oneflow_rope.infer_shapes(tuple(x.shape), **kwargs)
    assert (shapes.B, shapes.M, shapes.H, shapes.K) == (B, M, H, K)
    out = oneflow_rope.fused_apply_rotary_emb(x, **kwargs)
    assert tuple(out.shape) == shapes.out_shape
    expected_layout = output_layout or (layout if "2" not in layout and "3" not in layout else layout[:2] + "(HK)")
    assert shapes.output_layout == expected_layout
    assert shapes.out_shape == layout_shape(expected_layout, B, M, H, K)


def test_x_layout_alias():
    arrays, kwargs = make_inputs(Case("BHMK"))
    x = to_flow(arrays["x"])
    a = oneflow_rope.fused_apply_rotary_emb(x, layout="BHMK")
    b = oneflow_rope.fused_apply_rotary_emb(x, x_layout="BHMK")
    c = oneflow_rope.fused_apply_rotary_emb(x, layout="BHMK", x_layout="BHMK")
    assert np.array_equal(a.numpy(), b.numpy()) and np.array_equal(a.numpy(), c.numpy())
    np.testing.assert_allclose(a.numpy(), rope_reference(arrays["x"], "BHMK"), atol=1e-6)


def test_non_contiguous_views():
    rng = np.random.default_rng(7)
    big = rng.uniform(-1, 1, (2, 5, 6, 16)).astype(np.float32)
    # one head-slice of a larger BMHK tensor
    view = to_flow(big)[:, :, 1:4, :]
    assert not view.is_contiguous()
    np.testing.assert_allclose(oneflow_rope.fused_apply_rotary_emb(view).numpy(),
                               rope_reference(big[:, :, 1:4, :]), atol=1e-6)
    # a transposed tensor read as BHMK
    bmhk = to_flow(big)
    bhmk_view = bmhk.transpose(1, 2)
    out = oneflow_rope.fused_apply_rotary_emb(bhmk_view, layout="BHMK", output_layout="BMHK")
    np.testing.assert_allclose(out.numpy(), rope_reference(big), atol=1e-6)
    # every other token of a sequence
    strided = to_flow(big)[:, ::2]
    np.testing.assert_allclose(oneflow_rope.fused_apply_rotary_emb(strided).numpy(),
                               rope_reference(big[:, ::2]), atol=1e-6)


@pytest.mark.parametrize("layout,shape", [("BMHK", (0, 5, 3, 16)), ("BMHK", (2, 0, 3, 16)),
                                          ("BHMK", (2, 0, 5, 16)), ("BM(H3K)", (2, 0, 3 * 3 * 16)),
                                          ("MB(HK)", (4, 2, 0))])
def test_empty_tensors(layout, shape):
    x = flow.zeros(*shape)
    out = oneflow_rope.fused_apply_rotary_emb(x, layout=layout, k_size=16 if "(" in layout else None)
    expected = oneflow_rope.infer_shapes(shape, layout, k_size=16 if "(" in layout else None).out_shape
    assert tuple(out.shape) == expected and out.numel() == 0


def test_cos_sin_table_helper_matches_computed_angles():
    for mode in ("plane", "interval"):
        cos, sin = oneflow_rope.cos_sin_table(9, 16, base=500.0, mode=mode, dtype=flow.float64)
        rng = np.random.default_rng(3)
        x = rng.uniform(-1, 1, (2, 9, 3, 16))
        with_table = oneflow_rope.fused_apply_rotary_emb(to_flow(x), cos, sin, mode=mode)
        computed = oneflow_rope.fused_apply_rotary_emb(to_flow(x), mode=mode, base=500.0)
        np.testing.assert_allclose(with_table.numpy(), computed.numpy(), atol=1e-12)
        np.testing.assert_allclose(computed.numpy(), rope_reference(x, mode=mode, base=500.0), atol=1e-12)
