"""One test per rule of docs/operator.md that a call can break: the exception type, and a message
that starts with the argument and names the value given. Then the same rules as the op's own
inference enforces them for calls that bypass the Python layer, the checks that still run for a
call whose signature was prepared before, and the positions outside a cos/sin table (NaN rows, or
ValueError with the opt-in check)."""

from __future__ import annotations

import numpy as np
import oneflow as flow
import pytest

import oneflow_rope
from oneflow_rope import _C, ops
from oneflow_rope.ops import _op_expr
from tests.flow_helpers import assert_rejects, keep_alive

rope = oneflow_rope.fused_apply_rotary_emb


def x4(*shape, dtype=flow.float32):
    return flow.zeros(*(shape or (2, 5, 3, 16)), dtype=dtype)


def table(rows=5, width=16, dtype=flow.float32):
    return flow.zeros(rows, width, dtype=dtype), flow.zeros(rows, width, dtype=dtype)


ERROR_CASES = [
    # (id, call, exception, words the message must contain)
    ("x-not-tensor", lambda: rope(np.zeros((2, 5, 3, 16))), TypeError, ["x", "ndarray"]),
    ("x-int-dtype", lambda: rope(x4(dtype=flow.int32)), TypeError, ["x", "int32"]),
    ("layout-unknown", lambda: rope(x4(), layout="BXHK"), ValueError, ["layout", "BXHK"]),
    ("layout-not-str", lambda: rope(x4(), layout=3), TypeError, ["layout", "3"]),
    ("layout-alias-conflict", lambda: rope(x4(), layout="BMHK", x_layout="BHMK"), ValueError,
     ["layout", "BHMK"]),
    ("x-ndim", lambda: rope(flow.zeros(2, 5, 48), layout="BMHK"), ValueError, ["x", "BMHK", "4-D"]),
    ("output-layout-unknown", lambda: rope(x4(), output_layout="HKMB"), ValueError,
     ["output_layout", "HKMB"]),
    ("output-layout-packed", lambda: rope(x4(), output_layout="BM(H3K)"), ValueError,
     ["output_layout", "BM(H3K)"]),
    ("mode", lambda: rope(x4(), mode="rotate"), ValueError, ["mode", "rotate"]),
    ("tensor-index-zero-h2k", lambda: rope(flow.zeros(2, 5, 3 * 2 * 16), layout="BM(H2K)", k_size=16,
                                          tensor_index=0), ValueError, ["tensor_index", "0"]),
    ("tensor-index-h3k", lambda: rope(flow.zeros(2, 5, 3 * 3 * 16), layout="BM(H3K)", k_size=16,
                                      tensor_index=3), ValueError, ["tensor_index", "3"]),
    ("tensor-index-unpacked", lambda: rope(x4(), tensor_index=1), ValueError, ["tensor_index", "1"]),
    ("k-size-missing", lambda: rope(flow.zeros(2, 5, 48), layout="BM(HK)"), ValueError, ["k_size"]),
    ("k-size-missing-with-rotary-size", lambda: rope(flow.zeros(2, 5, 48), *table(width=8), layout="BM(HK)",
                                                     rotary_size=8), ValueError, ["k_size"]),
    ("k-size-not-dividing", lambda: rope(flow.zeros(2, 5, 48), layout="BM(HK)", k_size=10), ValueError,
     ["k_size", "10", "48"]),
    ("k-size-mismatch-4d", lambda: rope(x4(), k_size=8), ValueError, ["k_size", "8", "16"]),
    ("k-size-not-int", lambda: rope(flow.zeros(2, 5, 48), layout="BM(HK)", k_size=16.0), TypeError,
     ["k_size", "16.0"]),
    ("rotary-size-too-big", lambda: rope(x4(), rotary_size=32), ValueError, ["rotary_size", "32", "16"]),
    ("rotary-size-odd", lambda: rope(x4(), rotary_size=7), ValueError, ["rotary_size", "7"]),
    ("rotary-size-2d-odd-part", lambda: rope(x4(), position_ids=flow.zeros(2, 2, 5, dtype=flow.int64),
                                             rotary_size=6), ValueError, ["rotary_size", "6"]),
    ("rotary-size-zero", lambda: rope(x4(), rotary_size=0), ValueError, ["rotary_size", "0"]),
    # an odd head size with no rotary_size given names where the head size came from
    ("odd-head-size", lambda: rope(x4(2, 5, 3, 15)), ValueError, ["x", "15"]),
    ("odd-k-size", lambda: rope(flow.zeros(2, 5, 45), layout="BM(HK)", k_size=15), ValueError, ["k_size", "15"]),
    ("odd-table-width", lambda: rope(flow.zeros(2, 5, 45), *table(width=15), layout="BM(HK)"), ValueError,
     ["cos", "15"]),
    ("head-size-2d-odd-part", lambda: rope(x4(2, 5, 3, 6), position_ids=flow.zeros(2, 2, 5, dtype=flow.int64)),
     ValueError, ["x", "6"]),
    ("zero-head-size", lambda: rope(x4(2, 5, 3, 0)), ValueError, ["x", "(2, 5, 3, 0)"]),
    ("k-size-from-table-not-dividing", lambda: rope(flow.zeros(2, 5, 48), *table(width=10), layout="BM(HK)"),
     ValueError, ["cos", "10", "48"]),
    ("cos-without-sin", lambda: rope(x4(), table()[0]), ValueError, ["cos", "sin"]),
    ("cos-dtype", lambda: rope(x4(), *table(dtype=flow.float64)), TypeError, ["cos", "float64"]),
    ("cos-width", lambda: rope(x4(), *table(width=12)), ValueError, ["cos", "12", "16"]),
    ("cos-ndim", lambda: rope(x4(), flow.zeros(5, 16, 1), flow.zeros(5, 16, 1)), ValueError, ["cos", "2-D"]),
    ("sin-shape", lambda: rope(x4(), flow.zeros(5, 16), flow.zeros(6, 16)), ValueError, ["sin", "(6, 16)"]),
    ("table-too-short", lambda: rope(x4(), *table(rows=4)), ValueError, ["cos", "4", "M=5"]),
    ("position-ids-dtype", lambda: rope(x4(), position_ids=flow.zeros(2, 1, 5)), TypeError,
     ["position_ids", "float32"]),
    ("position-ids-shape", lambda: rope(x4(), position_ids=flow.zeros(2, 1, 4, dtype=flow.int64)), ValueError,
     ["position_ids", "(2, 1, 4)"]),
    ("position-ids-rotary-dim-3", lambda: rope(x4(), position_ids=flow.zeros(2, 3, 5, dtype=flow.int64)),
     ValueError, ["position_ids", "(2, 3, 5)"]),
    ("position-outside-table", lambda: rope(x4(), *table(rows=8), check_positions=True,
                                            position_ids=flow.tensor(np.full((2, 1, 5), 8), dtype=flow.int64)),
     ValueError, ["position_ids", "8", "[0, 8)"]),
    ("position-negative", lambda: rope(x4(), *table(rows=8), check_positions=True,
                                       position_ids=flow.tensor(np.full((2, 1, 5), -1), dtype=flow.int32)),
     ValueError, ["position_ids", "-1"]),
    ("base-zero", lambda: rope(x4(), base=0.0), ValueError, ["base", "0.0"]),
    ("base-nan", lambda: rope(x4(), base=float("nan")), ValueError, ["base", "nan"]),
    ("placement-mismatch", lambda: rope(x4(), *[t.to_global(placement=flow.placement("cpu", ranks=[0]),
                                                          sbp=flow.sbp.broadcast) for t in table()]),
     ValueError, ["cos"]),
]


@pytest.mark.parametrize("call,exc,words", [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_python_layer_rejects(call, exc, words):
    assert_rejects(call, exc, words)


@pytest.mark.parametrize("call,exc,words", [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_python_layer_rejects_after_the_signature_was_prepared(call, exc, words):
    """The same calls again: a rejected call prepares nothing, so it is rejected the same way the
    second time (and the checks the signature does not cover run at every call)."""
    test_python_layer_rejects(call, exc, words)


def direct(inputs, *, x_layout="BMHK", output_layout="BMHK", mode="plane", tensor_index=0, k_size=16,
           rotary_size=16, base=10000.0):
    """Calls the op without the Python layer's checks; attributes by name."""
    has_table = len(inputs) >= 3
    has_pos = len(inputs) in (2, 4)
    op = _C.RopeOp(_op_expr("fused_apply_rotary_emb", "x", "out", has_table, has_pos),
                   _op_expr("fused_apply_rotary_emb_grad", "dy", "dx", has_table, has_pos), has_table, has_pos,
                   x_layout=x_layout, output_layout=output_layout, mode=mode, tensor_index=tensor_index,
                   k_size=k_size, rotary_size=rotary_size, base=base, seqlen_offset=0, attention_scaling=1.0,
                   packed_qk=False)
    cos, sin = (inputs[1], inputs[2]) if has_table else (None, None)
    return op.forward(inputs[0], cos, sin, inputs[-1] if has_pos else None)


DIRECT_CASES = [
    ("layout", lambda: direct([x4()], x_layout="BXHK"), ["layout", "BXHK"]),
    ("output-layout", lambda: direct([x4()], output_layout="BM(H3K)"), ["output_layout"]),
    ("mode", lambda: direct([x4()], mode="spiral"), ["mode", "spiral"]),
    ("rotary-size", lambda: direct([x4()], rotary_size=18), ["rotary_size", "18"]),
    ("k-size", lambda: direct([x4()], k_size=8), ["k_size", "8"]),
    ("tensor-index", lambda: direct([flow.zeros(2, 5, 96)], x_layout="BM(H2K)", output_layout="BM(HK)",
                                    tensor_index=0), ["tensor_index", "0"]),
    ("table-width", lambda: direct([x4(), *table(width=8)]), ["cos", "(5, 8)"]),
    ("table-rows", lambda: direct([x4(), *table(rows=3)]), ["cos", "3"]),
    ("table-dtype", lambda: direct([x4(), *table(dtype=flow.float64)]), ["cos", "kDouble"]),
    ("position-shape", lambda: direct([x4(), flow.zeros(2, 1, 4, dtype=flow.int64)]), ["position_ids"]),
    ("position-dtype", lambda: direct([x4(), flow.zeros(2, 1, 5)]), ["position_ids", "kFloat"]),
    ("x-dtype", lambda: direct([x4(dtype=flow.int64)]), ["x", "kInt64"]),
]


@pytest.mark.parametrize("call,words", [c[1:] for c in DIRECT_CASES], ids=[c[0] for c in DIRECT_CASES])
def test_op_inference_rejects_direct_calls(call, words):
    with pytest.raises(RuntimeError) as info:
        call()
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message[:500]!r}"


def test_op_attributes_are_passed_by_name():
    op_expr = _op_expr("fused_apply_rotary_emb", "x", "out", False, False)
    grad_expr = _op_expr("fused_apply_rotary_emb_grad", "dy", "dx", False, False)
    attrs = dict(x_layout="BMHK", output_layout="BHMK", mode="interval", tensor_index=0, k_size=16, rotary_size=8,
                 base=500.0, seqlen_offset=3, attention_scaling=0.5, packed_qk=False)
    op = _C.RopeOp(op_expr, grad_expr, False, False, **attrs)
    assert op.attrs == attrs
    with pytest.raises(TypeError, match="rotary_size is missing"):
        _C.RopeOp(op_expr, grad_expr, False, False, **{k: v for k, v in attrs.items() if k != "rotary_size"})
    with pytest.raises(TypeError, match="unknown attribute head_size"):
        _C.RopeOp(op_expr, grad_expr, False, False, head_size=16, **attrs)
    with pytest.raises(TypeError, match="x: expected a oneflow.Tensor, got numpy.ndarray"):
        op.forward(np.zeros((2, 5, 3, 16)), None, None, None)
    with pytest.raises(TypeError, match="cos, sin: this call was prepared without"):
        op.forward(x4(), *table(), None)


PREPARED = {"x": x4(), "tables": table(), "position_ids": flow.zeros(2, 1, 5, dtype=flow.int64)}


def prepared_call(x=None, cos=None, sin=None, position_ids=None, **kwargs):
    """A call of the prepared signature (x4, a 5-row table, position_ids) with one thing changed."""
    cos = PREPARED["tables"][0] if cos is None else cos
    sin = PREPARED["tables"][1] if sin is None else sin
    position_ids = PREPARED["position_ids"] if position_ids is None else position_ids
    return rope(PREPARED["x"] if x is None else x, cos, sin, position_ids, **kwargs)


SIGNATURE_CASES = [
    # what the signature (shapes and arguments) does not cover, checked at every call
    ("x-dtype", lambda: prepared_call(x=x4(dtype=flow.float64)), TypeError, ["cos", "float64"]),
    ("x-int", lambda: prepared_call(x=x4(dtype=flow.int64)), TypeError, ["x", "int64"]),
    ("x-numpy", lambda: prepared_call(x=np.zeros((2, 5, 3, 16), np.float32)), TypeError, ["x", "ndarray"]),
    ("sin-dtype", lambda: prepared_call(sin=flow.zeros(5, 16, dtype=flow.float64)), TypeError, ["sin", "float64"]),
    ("sin-shape", lambda: prepared_call(sin=flow.zeros(6, 16)), ValueError, ["sin", "(6, 16)"]),
    ("sin-numpy", lambda: prepared_call(sin=np.zeros((5, 16), np.float32)), TypeError, ["sin", "ndarray"]),
    ("position-ids-dtype", lambda: prepared_call(position_ids=flow.zeros(2, 1, 5)), TypeError,
     ["position_ids", "float32"]),
    ("k-size-float", lambda: prepared_call(k_size=16.0), TypeError, ["k_size", "16.0"]),
    ("tensor-index-bool", lambda: prepared_call(tensor_index=False), TypeError, ["tensor_index", "False"]),
    ("cos-global", lambda: prepared_call(cos=PREPARED["tables"][0].to_global(
        placement=flow.placement("cpu", ranks=[0]), sbp=flow.sbp.broadcast)), ValueError, ["cos"]),
]


@pytest.mark.parametrize("call,exc,words", [c[1:] for c in SIGNATURE_CASES], ids=[c[0] for c in SIGNATURE_CASES])
def test_prepared_signature_still_checks_every_call(call, exc, words):
    prepared_call()
    prepared_call(k_size=16, tensor_index=0)
    test_python_layer_rejects(call, exc, words)


def test_a_prepared_signature_is_not_prepared_again(monkeypatch):
    calls = []
    prepare = ops._prepare
    monkeypatch.setattr(ops, "_prepare", lambda *a, **k: calls.append(1) or prepare(*a, **k))
    x = x4(1, 3, 2, 8)
    for _ in range(5):
        rope(x, layout="BMHK", mode="interval", base=123.0)
    assert len(calls) <= 1


def test_no_call_reads_values_back_to_the_host(monkeypatch):
    """Without the opt-in check, a call with a table and position_ids never reads a tensor back
    (on CUDA each read would be a device-to-host synchronisation)."""
    x, (cos, sin) = x4(), table(rows=8)
    pos = flow.tensor(np.full((2, 1, 5), 9), dtype=flow.int64)  # outside the table
    rope(x, cos, sin, pos)  # prepared

    def forbidden(*args, **kwargs):
        raise AssertionError("a tensor was read back to the host")

    for name in ("numpy", "item", "tolist", "min", "max"):
        monkeypatch.setattr(flow.Tensor, name, forbidden)
    for call in (lambda: rope(x, cos, sin, pos), lambda: rope(x4(2, 5, 3, 8), *table(rows=3, width=8), pos),
                 lambda: rope(x.requires_grad_(True), cos, sin, pos)):
        call()


def test_positions_outside_table_give_nan_rows_in_eager():
    x = flow.ones(1, 3, 2, 8)
    cos, sin = flow.ones(4, 8), flow.zeros(4, 8)
    pos = flow.tensor(np.array([[[0, 4, -7]]]), dtype=flow.int64)
    out = rope(x, cos, sin, pos).numpy()
    assert np.all(out[0, 0] == 1)
    assert np.all(np.isnan(out[0, 1])) and np.all(np.isnan(out[0, 2]))


def test_position_check_switch():
    x, (cos, sin) = x4(), table(rows=8)
    bad = flow.tensor(np.full((2, 1, 5), 8), dtype=flow.int64)
    assert not oneflow_rope.position_check_enabled()
    try:
        oneflow_rope.set_position_check(True)
        with pytest.raises(ValueError, match=r"position_ids: got position 8, expected every position in \[0, 8\)"):
            rope(x, cos, sin, bad)
        rope(x, cos, sin, bad, check_positions=False)  # the argument overrides the switch
        rope(x, cos, sin, flow.zeros(2, 1, 5, dtype=flow.int64))  # good positions pass
    finally:
        oneflow_rope.set_position_check(False)
    rope(x, cos, sin, bad)


def test_positions_outside_table_in_graph_give_nan_not_a_crash():
    """Inside nn.Graph positions are not known when the graph is built: the kernel reads nothing
    outside the table and writes NaN for those rows, as in eager mode."""
    x = flow.ones(1, 3, 2, 8)
    cos, sin = flow.ones(4, 8), flow.zeros(4, 8)
    pos = flow.tensor(np.array([[[0, 4, -7]]]), dtype=flow.int64)

    class G(flow.nn.Graph):
        def build(self, x, cos, sin, pos):
            return rope(x, cos, sin, pos)

    out = keep_alive(G())(x, cos, sin, pos).numpy()
    assert np.all(out[0, 0] == 1)
    assert np.all(np.isnan(out[0, 1])) and np.all(np.isnan(out[0, 2]))
