"""Packed sequences of different lengths: the varlen layouts (BM)HK, (BM)(HK), (BM)(H2K), (BM)(H3K).

x holds the T tokens of all sequences on one axis; cu_seqlens (S+1,) says where each sequence
starts (token t of sequence s is at position t - cu_seqlens[s]), or position_ids (R, T) give the
positions. Every layout, both modes, every dtype, tables and computed angles, partial rotation,
rotary dim 2 (position_ids (2, T)), int32 and int64 cu_seqlens: forward and backward against the
float64 reference (tests/reference.py), in eager mode and inside nn.Graph; q+k calls; the same
result as rotating each sequence on its own; the errors raised before dispatch (naming
cu_seqlens); malformed cu_seqlens values (NaN rows, never an out-of-bounds access; the opt-in
check raises).
"""

from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np
import oneflow as flow
import pytest

import oneflow_rope
from oneflow_rope import _C
from oneflow_rope.layout import layout_shape
from oneflow_rope.ops import _op_expr
from tests.cases import random_rope_table, round_to_dtype
from tests.flow_helpers import assert_rejects, keep_alive, to_flow, to_numpy64
from tests.reference import positions_from_cu_seqlens, rope_reference, rope_reference_backward, tolerance

rope = oneflow_rope.fused_apply_rotary_emb
rope_qk = oneflow_rope.fused_apply_rotary_emb_qk

VARLEN = ("(BM)HK", "(BM)(HK)", "(BM)(H2K)", "(BM)(H3K)")
VARLEN_OUTPUTS = ("(BM)HK", "(BM)(HK)")
MODES = ("plane", "interval")
DTYPES = ("float32", "float64", "float16", "bfloat16")
# cu_seqlens of either dtype, or position_ids (1, T) / (2, T) (rotary dim 2)
POSITIONS = ("cu_int32", "cu_int64", "pos_R1", "pos_R2")
LENGTHS = (3, 0, 5, 1, 4)  # an empty sequence and one of one token among them
T = sum(LENGTHS)
H, K = 3, 16


def cu_of(lengths) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


CU = cu_of(LENGTHS)


def test_varlen_layouts_are_the_tables():
    assert oneflow_rope.VARLEN_LAYOUTS == VARLEN
    assert set(VARLEN) <= set(oneflow_rope.INPUT_LAYOUTS)
    assert [o for o in oneflow_rope.OUTPUT_LAYOUTS if o in VARLEN] == list(VARLEN_OUTPUTS)
    for layout, shape in (("(BM)HK", (T, H, K)), ("(BM)(HK)", (T, H * K)), ("(BM)(H2K)", (T, H * 2 * K)),
                          ("(BM)(H3K)", (T, H * 3 * K))):
        info = oneflow_rope.parse_layout(layout.lower().replace(")", ") "))
        assert info.name == layout and info.varlen and info.seq_axis == 0
        assert layout_shape(layout, 1, T, H, K) == shape
        shapes = oneflow_rope.infer_shapes(shape, layout, k_size=K, cu_seqlens_shape=(len(CU),))
        assert (shapes.B, shapes.M, shapes.H, shapes.K) == (1, T, H, K)
        assert shapes.output_layout == ("(BM)HK" if layout == "(BM)HK" else "(BM)(HK)")


@dataclass(frozen=True)
class VarlenCase:
    layout: str
    mode: str = "plane"
    table: bool = False
    partial: bool = False
    positions: str = "cu_int64"
    dtype: str = "float32"
    output_layout: Optional[str] = None

    @property
    def id(self) -> str:
        out = f"->{self.output_layout}" if self.output_layout else ""
        return (f"{self.layout}{out}-{self.mode}-{'table' if self.table else 'base'}-"
                f"{'partial' if self.partial else 'full'}-{self.positions}-{self.dtype}")

    @property
    def rotary_dim(self) -> int:
        return 2 if self.positions == "pos_R2" else 1

    def seed(self) -> int:
        return zlib.crc32(self.id.encode())


CASES = [VarlenCase(*c) for c in itertools.product(VARLEN, MODES, (False, True), (False, True), POSITIONS, DTYPES)]
OUTPUT_CASES = [VarlenCase(layout, mode, output_layout=out, positions="cu_int32")
                for layout, out, mode in itertools.product(VARLEN, VARLEN_OUTPUTS, MODES)]


def make_inputs(case: VarlenCase, lengths=LENGTHS, max_position: int = 4096):
    """Arrays (x, cos, sin, position_ids, cu_seqlens; None where absent) and the call's keyword
    arguments (cu_seqlens excluded)."""
    rng = np.random.default_rng(case.seed())
    tokens = int(sum(lengths))
    rotary = K // 2 if case.partial else K
    part = rotary // case.rotary_dim
    x = round_to_dtype(rng.uniform(-1, 1, layout_shape(case.layout, 1, tokens, H, K)), case.dtype)
    arrays: Dict[str, Optional[np.ndarray]] = {"x": x, "cos": None, "sin": None, "position_ids": None,
                                               "cu_seqlens": None}
    kwargs: Dict[str, object] = {"layout": case.layout, "mode": case.mode}
    rows = max(lengths) + 3
    if case.positions.startswith("cu"):
        arrays["cu_seqlens"] = cu_of(lengths).astype(np.int32 if case.positions == "cu_int32" else np.int64)
    else:
        high = rows if case.table else max_position
        arrays["position_ids"] = rng.integers(0, high, (case.rotary_dim, tokens)).astype(
            np.int32 if case.rotary_dim == 2 else np.int64)
    if case.table:
        arrays["cos"], arrays["sin"] = random_rope_table(rng, rows=rows, part=part, mode=case.mode, dtype=case.dtype)
    else:
        kwargs["base"] = (10000.0, 500000.0, 10.0)[case.seed() % 3]
    if case.partial:
        kwargs["rotary_size"] = rotary
    if "(" in case.layout[4:]:
        kwargs["k_size"] = K
    if "2" in case.layout:
        kwargs["tensor_index"] = 1 + case.seed() % 2
    elif "3" in case.layout:
        kwargs["tensor_index"] = case.seed() % 3
    if case.output_layout is not None:
        kwargs["output_layout"] = case.output_layout
    return arrays, kwargs


def flow_inputs(arrays, dtype: str, requires_grad: bool = False):
    return dict(x=to_flow(arrays["x"], dtype, requires_grad=requires_grad), cos=to_flow(arrays["cos"], dtype),
                sin=to_flow(arrays["sin"], dtype), position_ids=to_flow(arrays["position_ids"]),
                cu_seqlens=to_flow(arrays["cu_seqlens"]))


def call(t, kwargs):
    return rope(t["x"], t["cos"], t["sin"], t["position_ids"], cu_seqlens=t["cu_seqlens"], **kwargs)


def reference(arrays, kwargs, dy=None):
    ref_kw = dict(cos=arrays["cos"], sin=arrays["sin"], position_ids=arrays["position_ids"],
                  cu_seqlens=arrays["cu_seqlens"], **kwargs)
    if dy is None:
        return rope_reference(arrays["x"], **ref_kw)
    return rope_reference_backward(dy, x_shape=arrays["x"].shape, **ref_kw)


def max_position(arrays) -> int:
    if arrays["position_ids"] is not None:
        return int(arrays["position_ids"].max())
    return max(LENGTHS) - 1


def check(case: VarlenCase, got: flow.Tensor, expected: np.ndarray, arrays) -> None:
    assert tuple(got.shape) == expected.shape, case.id
    assert got.dtype == getattr(flow, case.dtype)
    err = float(np.max(np.abs(to_numpy64(got) - expected))) if expected.size else 0.0
    tol = tolerance(case.dtype, max_position(arrays))
    assert err <= tol, f"{case.id}: max error {err} > {tol}"


def test_case_table_covers_every_combination():
    assert len(CASES) == 4 * 2 * 2 * 2 * 4 * 4
    assert {(c.layout, c.output_layout) for c in OUTPUT_CASES} == set(itertools.product(VARLEN, VARLEN_OUTPUTS))


@pytest.mark.parametrize("case", CASES + OUTPUT_CASES, ids=lambda c: c.id)
def test_forward(case: VarlenCase):
    arrays, kwargs = make_inputs(case)
    check(case, call(flow_inputs(arrays, case.dtype), kwargs), reference(arrays, kwargs), arrays)


@pytest.mark.parametrize("case", CASES + OUTPUT_CASES, ids=lambda c: c.id)
def test_backward(case: VarlenCase):
    """dL/dx for a random dL/dout: the rotation by the negated angle, written back into x's layout
    (zeros in the slots of a packed x that were not selected)."""
    arrays, kwargs = make_inputs(case)
    t = flow_inputs(arrays, case.dtype, requires_grad=True)
    out = call(t, kwargs)
    dy = round_to_dtype(np.random.default_rng(case.seed() + 1).uniform(-1, 1, tuple(out.shape)), case.dtype)
    out.backward(to_flow(dy, case.dtype))
    check(case, t["x"].grad, reference(arrays, kwargs, dy), arrays)


@pytest.mark.parametrize("layout", VARLEN)
@pytest.mark.parametrize("positions", POSITIONS)
def test_backward_matches_finite_differences(layout, positions):
    case = VarlenCase(layout, "interval" if positions == "pos_R2" else "plane", table=positions == "cu_int32",
                      partial=positions == "pos_R1", positions=positions, dtype="float64")
    arrays, kwargs = make_inputs(case)
    t = flow_inputs(arrays, "float64", requires_grad=True)
    out = call(t, kwargs)
    rng = np.random.default_rng(case.seed() + 2)
    weight = rng.uniform(-1, 1, tuple(out.shape))
    (out * to_flow(weight)).sum().backward()
    grad = t["x"].grad.numpy()
    ref_kw = dict(cos=arrays["cos"], sin=arrays["sin"], position_ids=arrays["position_ids"],
                  cu_seqlens=arrays["cu_seqlens"], **kwargs)
    eps = 1e-6
    for _ in range(4):
        v = rng.standard_normal(arrays["x"].shape)
        numeric = (np.sum(rope_reference(arrays["x"] + eps * v, **ref_kw) * weight)
                   - np.sum(rope_reference(arrays["x"] - eps * v, **ref_kw) * weight)) / (2 * eps)
        assert abs(float(np.sum(grad * v)) - numeric) <= 1e-6 * max(1.0, abs(numeric))


GRAPH_CASES = CASES[::7] + OUTPUT_CASES[::3]


def test_forward_graph():
    """GRAPH_CASES inside one nn.Graph (one graph for all, see flow_helpers.keep_alive)."""
    prepared, flat = [], []
    for case in GRAPH_CASES:
        arrays, kwargs = make_inputs(case)
        t = flow_inputs(arrays, case.dtype)
        names = [n for n, v in t.items() if v is not None]
        prepared.append((case, arrays, kwargs, names, list(range(len(flat), len(flat) + len(names)))))
        flat += [t[n] for n in names]

    class AllCases(flow.nn.Graph):
        def build(self, *tensors):
            outs = []
            for _, _, kwargs, names, slots in prepared:
                t = dict.fromkeys(("x", "cos", "sin", "position_ids", "cu_seqlens"))
                t.update({n: tensors[i] for n, i in zip(names, slots)})
                outs.append(call(t, kwargs))
            return tuple(outs)

    outs = keep_alive(AllCases())(*flat)
    for (case, arrays, kwargs, _, _), out in zip(prepared, outs):
        check(case, out, reference(arrays, kwargs), arrays)


def test_graph_training_step():
    """Gradients inside an nn.Graph training step: each varlen layout as a parameter, SGD with lr 1,
    the update is minus the reference gradient."""
    cases = [VarlenCase("(BM)HK", "plane", positions="cu_int32"),
             VarlenCase("(BM)(HK)", "interval", table=True, positions="cu_int64"),
             VarlenCase("(BM)(H2K)", "plane", partial=True, positions="pos_R1"),
             VarlenCase("(BM)(H3K)", "interval", positions="pos_R2", output_layout="(BM)HK")]
    prepared = [make_inputs(c) for c in cases]
    rng = np.random.default_rng(5)
    weights = [round_to_dtype(rng.uniform(-1, 1, reference(a, kw).shape), "float32") for a, kw in prepared]
    inputs = [flow_inputs(a, "float32") for a, _ in prepared]

    class Holder(flow.nn.Module):
        def __init__(self):
            super().__init__()
            for i, t in enumerate(inputs):
                setattr(self, f"x{i}", flow.nn.Parameter(t["x"].clone()))

    holder = Holder()
    optimizer = flow.optim.SGD(holder.parameters(), lr=1.0)
    w = [to_flow(a) for a in weights]

    class TrainStep(flow.nn.Graph):
        def __init__(self):
            super().__init__()
            self.holder = holder
            self.add_optimizer(optimizer)

        def build(self):
            loss = None
            for i, (t, (_, kwargs), wt) in enumerate(zip(inputs, prepared, w)):
                term = (call(dict(t, x=getattr(self.holder, f"x{i}")), kwargs) * wt).sum()
                loss = term if loss is None else loss + term
            loss.backward()
            return loss

    keep_alive(TrainStep())()
    for i, (t, (arrays, kwargs), wt, case) in enumerate(zip(inputs, prepared, weights, cases)):
        grad = t["x"].numpy() - getattr(holder, f"x{i}").detach().numpy()
        np.testing.assert_allclose(grad, reference(arrays, kwargs, wt), atol=1e-5, err_msg=case.id)


@pytest.mark.parametrize("layout", ["(BM)HK", "(BM)(HK)", "(BM)(H3K)"])
@pytest.mark.parametrize("table", [False, True])
def test_same_as_each_sequence_on_its_own(layout, table):
    """The packed call gives, for every sequence, what the batched op gives on that sequence alone
    (the same kernel: bit for bit)."""
    rng = np.random.default_rng(3)
    lengths = [7, 0, 1, 12, 5, 2]
    cu = cu_of(lengths)
    x = rng.uniform(-1, 1, layout_shape(layout, 1, int(cu[-1]), H, K)).astype(np.float32)
    cos = sin = None
    if table:
        cos, sin = (to_flow(a) for a in random_rope_table(rng, rows=12, part=K, mode="plane", dtype="float32"))
    fused = "(" in layout[4:]
    kw = dict(k_size=K) if fused else {}
    packed = rope(to_flow(x), cos, sin, layout=layout, cu_seqlens=flow.tensor(cu.astype(np.int32)), **kw).numpy()
    batched = "BM" + layout[4:]
    for s in range(len(lengths)):
        one = rope(to_flow(x[None, cu[s]:cu[s + 1]]), cos, sin, layout=batched, **kw).numpy()[0]
        np.testing.assert_array_equal(packed[cu[s]:cu[s + 1]], one, err_msg=f"sequence {s}")


def test_qk_calls():
    """q and k (GQA: k has fewer heads) in one call, a packed query-key-value q, in place; and
    their gradients."""
    rng = np.random.default_rng(4)
    cu = flow.tensor(CU.astype(np.int32))
    q_np = rng.uniform(-1, 1, (T, 4, K)).astype(np.float32)
    k_np = rng.uniform(-1, 1, (T, 2, K)).astype(np.float32)
    q, k = to_flow(q_np, requires_grad=True), to_flow(k_np, requires_grad=True)
    q_rot, k_rot = rope_qk(q, k, layout="(BM)HK", cu_seqlens=cu, mode="interval", output_layout="(BM)(HK)")
    for got, a in ((q_rot, q_np), (k_rot, k_np)):
        expected = rope_reference(a, "(BM)HK", cu_seqlens=CU, mode="interval", output_layout="(BM)(HK)")
        np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)
    (q_rot.sum() + 2 * k_rot.sum()).backward()
    for t, a, wgt in ((q, q_np, 1.0), (k, k_np, 2.0)):
        dy = wgt * np.ones((T, a.shape[1] * K))
        expected = rope_reference_backward(dy, "(BM)HK", cu_seqlens=CU, mode="interval", output_layout="(BM)(HK)",
                                           x_shape=a.shape)
        np.testing.assert_allclose(t.grad.numpy(), expected, atol=1e-5)

    qkv_np = rng.uniform(-1, 1, (T, 2 * 3 * K)).astype(np.float32)
    pq, pk = rope_qk(to_flow(qkv_np), None, layout="(BM)(H3K)", k_size=K, cu_seqlens=cu)
    for got, index in ((pq, 0), (pk, 1)):
        expected = rope_reference(qkv_np, "(BM)(H3K)", k_size=K, tensor_index=index, cu_seqlens=CU)
        np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)

    q2, k2 = to_flow(q_np.reshape(T, -1)), to_flow(k_np.reshape(T, -1))
    out = rope_qk(q2, k2, layout="(BM)(HK)", k_size=K, cu_seqlens=cu, inplace=True)
    assert out[0] is q2 and out[1] is k2
    np.testing.assert_allclose(q2.numpy(), rope_reference(q_np, "(BM)HK", cu_seqlens=CU).reshape(T, -1), atol=1e-5)


def varlen_x(tokens: int = T, dtype=flow.float32) -> flow.Tensor:
    return flow.zeros(tokens, H, K, dtype=dtype)


def cu_tensor(values=CU, dtype=flow.int64) -> flow.Tensor:
    return flow.tensor(np.asarray(values), dtype=dtype)


ERROR_CASES = [
    # (id, call, exception, words the message has; the first names the argument it starts with)
    ("cu-dtype-float", lambda: rope(varlen_x(), layout="(BM)HK", cu_seqlens=cu_tensor(dtype=flow.float32)),
     ValueError, ["cu_seqlens", "float32", "int32 or int64"]),
    ("cu-dtype-int8", lambda: rope(varlen_x(), layout="(BM)HK", cu_seqlens=cu_tensor(dtype=flow.int8)),
     ValueError, ["cu_seqlens", "int8"]),
    ("cu-shape-2d", lambda: rope(varlen_x(), layout="(BM)HK", cu_seqlens=cu_tensor([CU])),
     ValueError, ["cu_seqlens", "(1, 6)", "(S+1,)"]),
    ("cu-shape-empty", lambda: rope(varlen_x(), layout="(BM)HK", cu_seqlens=flow.zeros(0, dtype=flow.int64)),
     ValueError, ["cu_seqlens", "(0,)"]),
    ("cu-not-a-tensor", lambda: rope(varlen_x(), layout="(BM)HK", cu_seqlens=list(CU)),
     TypeError, ["cu_seqlens", "list"]),
    ("cu-batched-layout", lambda: rope(flow.zeros(1, T, H, K), cu_seqlens=cu_tensor()),
     ValueError, ["cu_seqlens", "BMHK", "(BM)HK"]),
    ("cu-with-position-ids", lambda: rope(varlen_x(), position_ids=flow.zeros(1, T, dtype=flow.int64),
                                          layout="(BM)HK", cu_seqlens=cu_tensor()),
     ValueError, ["cu_seqlens", "position_ids"]),
    ("cu-missing", lambda: rope(varlen_x(), layout="(BM)HK"), ValueError, ["cu_seqlens", "(BM)HK", "position_ids"]),
    ("cu-on-another-placement", lambda: rope(varlen_x(), layout="(BM)HK", cu_seqlens=cu_tensor().to_global(
        placement=flow.placement("cpu", ranks=[0]), sbp=flow.sbp.broadcast)), ValueError, ["cu_seqlens", "is on"]),
    ("offsets-tensor", lambda: rope(varlen_x(), layout="(BM)HK", cu_seqlens=cu_tensor(),
                                    seqlen_offsets=flow.zeros(1, dtype=flow.int64)),
     ValueError, ["seqlen_offsets", "(BM)HK", "cu_seqlens"]),
    ("offsets-int", lambda: rope(varlen_x(), layout="(BM)HK", cu_seqlens=cu_tensor(), seqlen_offsets=0),
     ValueError, ["seqlen_offsets", "(BM)HK"]),
    ("output-batched", lambda: rope(varlen_x(), layout="(BM)HK", cu_seqlens=cu_tensor(), output_layout="BMHK"),
     ValueError, ["output_layout", "BMHK", "(BM)HK, (BM)(HK)"]),
    ("output-varlen-of-batched", lambda: rope(flow.zeros(1, T, H, K), output_layout="(BM)HK"),
     ValueError, ["output_layout", "(BM)HK", "BMHK, BHMK"]),
    ("position-ids-batched-shape", lambda: rope(varlen_x(), position_ids=flow.zeros(1, 1, T, dtype=flow.int64),
                                                layout="(BM)HK"),
     ValueError, ["position_ids", f"(1, 1, {T})", "(1, T) or (2, T)"]),
    ("position-ids-length", lambda: rope(varlen_x(), position_ids=flow.zeros(1, T - 1, dtype=flow.int64),
                                         layout="(BM)HK"),
     ValueError, ["position_ids", f"(1, {T - 1})", f"T={T}"]),
    ("x-rank", lambda: rope(flow.zeros(1, T, H, K), layout="(BM)HK", cu_seqlens=cu_tensor()),
     ValueError, ["x", "3-D"]),
    ("k-tokens", lambda: rope_qk(varlen_x(), varlen_x(T - 1), layout="(BM)HK", cu_seqlens=cu_tensor()),
     ValueError, ["k", f"T={T}"]),
    ("qk-cu-dtype", lambda: rope_qk(varlen_x(), varlen_x(), layout="(BM)HK", cu_seqlens=cu_tensor(dtype=flow.float64)),
     ValueError, ["cu_seqlens", "float64"]),
]


@pytest.mark.parametrize("call_,exc,words", [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_rejected_before_dispatch(call_, exc, words):
    assert_rejects(call_, exc, words)
    assert_rejects(call_, exc, words)  # the same again: a rejected call prepares nothing


def test_prepared_signature_rechecks_the_dtype_of_cu_seqlens():
    """A call whose shapes were prepared before still has the dtype of cu_seqlens checked."""
    rope(varlen_x(), layout="(BM)HK", cu_seqlens=cu_tensor(dtype=flow.int32))
    assert_rejects(lambda: rope(varlen_x(), layout="(BM)HK", cu_seqlens=cu_tensor(dtype=flow.float32)), ValueError,
                   ["cu_seqlens", "float32"])


def direct(x, cu_seqlens, *, x_layout="(BM)HK", output_layout="(BM)HK", position_ids=None):
    """The op run without the Python layer's checks."""
    has_pos = position_ids is not None
    forward = _op_expr("fused_apply_rotary_emb", "x", "out", False, has_pos, has_cu_seqlens=True)
    backward = _op_expr("fused_apply_rotary_emb_grad", "dy", "dx", False, has_pos, has_cu_seqlens=True)
    op = _C.RopeOp(forward, backward, False, has_pos, False, False, False, True, x_layout=x_layout,
                   output_layout=output_layout, mode="plane", tensor_index=0, k_size=K, rotary_size=K, base=10000.0,
                   seqlen_offset=0, attention_scaling=1.0, packed_qk=False)
    return op.forward(x, None, None, position_ids, None, None, None, cu_seqlens)


@pytest.mark.parametrize("call_,words", [
    (lambda: direct(varlen_x(), cu_tensor(dtype=flow.float32)), ["cu_seqlens", "kFloat"]),
    (lambda: direct(varlen_x(), cu_tensor([CU])), ["cu_seqlens", "(1, 6)"]),
    (lambda: direct(flow.zeros(1, T, H, K), cu_tensor(), x_layout="BMHK", output_layout="BMHK"),
     ["cu_seqlens", "BMHK"]),
    (lambda: direct(varlen_x(), cu_tensor(), position_ids=flow.zeros(1, T, dtype=flow.int64)),
     ["cu_seqlens", "position_ids"]),
    (lambda: direct(varlen_x(), cu_tensor(), output_layout="BMHK"), ["output_layout", "BMHK"]),
], ids=["dtype", "shape", "batched-layout", "with-position-ids", "output-layout"])
def test_op_inference_rejects_direct_calls(call_, words):
    """Calls that bypass the Python layer meet the same rules in the op's own inference."""
    with pytest.raises(RuntimeError) as info:
        call_()
    for word in words:
        assert word in str(info.value), f"{word!r} not in {str(info.value)[:500]!r}"
    assert direct(varlen_x(), cu_tensor()).shape == (T, H, K)


# Malformed cu_seqlens values: seen only on the data. Every row is NaN in its rotated dims (the
# other dims are copied); nothing outside any input is read; the opt-in check raises ValueError
# naming cu_seqlens.
MALFORMED = [
    # (id, cu_seqlens, rows NaN, words of the check's message)
    ("first-not-0", [1, 4, 9, T], np.ones(T, bool), ["cu_seqlens", "first entry 1", "expected 0"]),
    ("last-not-T", [0, 4, 9, T - 1], np.ones(T, bool), ["cu_seqlens", f"last entry {T - 1}", f"T={T}"]),
    ("last-past-T", [0, 4, 9, T + 5], np.ones(T, bool), ["cu_seqlens", f"last entry {T + 5}"]),
    ("decreasing", [0, 8, 4, T], np.ones(T, bool), ["cu_seqlens", "entries 1 and 2", "8 and 4", "non-decreasing"]),
    ("far-outside", [0, -100, 10**6, T], np.ones(T, bool), ["cu_seqlens", "entries 0 and 1", "0 and -100"]),
]


@pytest.mark.parametrize("cu,nan_rows,words", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
@pytest.mark.parametrize("dtype", [flow.int32, flow.int64])
def test_malformed_cu_seqlens(cu, nan_rows, words, dtype):
    rng = np.random.default_rng(6)
    x_np = rng.uniform(-1, 1, (T, H, K)).astype(np.float32)
    x, cu_t = to_flow(x_np), cu_tensor(cu, dtype)
    out = rope(x, layout="(BM)HK", cu_seqlens=cu_t, rotary_size=8).numpy()
    np.testing.assert_array_equal(out[..., 8:], x_np[..., 8:])  # the dims that do not rotate are copied
    rotated = out[..., :8]
    nan = np.isnan(rotated).all(axis=(1, 2))
    assert (np.isnan(rotated).any(axis=(1, 2)) == nan).all(), "a row is NaN in part"
    if nan_rows is not None:
        assert (nan == nan_rows).all()
    # the rows that are not NaN are rotations of x (plane mode: each pair (j, j + 4) keeps its norm)
    pairs_in = np.hypot(x_np[~nan, :, :4], x_np[~nan, :, 4:8])
    pairs_out = np.hypot(rotated[~nan, :, :4], rotated[~nan, :, 4:])
    np.testing.assert_allclose(pairs_out, pairs_in, rtol=1e-5)
    # the gradient: the same rows NaN
    xg = to_flow(x_np, requires_grad=True)
    rope(xg, layout="(BM)HK", cu_seqlens=cu_t, rotary_size=8).sum().backward()
    assert (np.isnan(xg.grad.numpy()[..., :8]).all(axis=(1, 2)) == nan).all()
    # the opt-in check, per call or for every call
    assert_rejects(lambda: rope(x, layout="(BM)HK", cu_seqlens=cu_t, check_positions=True), ValueError, words)
    oneflow_rope.set_position_check(True)
    try:
        assert_rejects(lambda: rope(x, layout="(BM)HK", cu_seqlens=cu_t), ValueError, words)
        assert_rejects(lambda: rope_qk(x, x, layout="(BM)HK", cu_seqlens=cu_t), ValueError, words)
        rope(x, layout="(BM)HK", cu_seqlens=cu_t, check_positions=False)  # the call's own choice wins
    finally:
        oneflow_rope.set_position_check(False)


def test_malformed_cu_seqlens_in_graph_give_nan_rows():
    """Inside nn.Graph the values are unknown when the graph is built: NaN rows, no error."""
    x = to_flow(np.random.default_rng(7).uniform(-1, 1, (T, H, K)).astype(np.float32))
    cu_good, cu_bad = cu_tensor(CU, flow.int32), cu_tensor([0, 3, 3, 8, 9, T - 1], flow.int32)

    class G(flow.nn.Graph):
        def build(self, x, cu):
            return rope(x, layout="(BM)HK", cu_seqlens=cu, check_positions=True)

    graph = keep_alive(G())
    good = graph(x, cu_good).numpy()
    np.testing.assert_allclose(good, rope_reference(x.numpy(), "(BM)HK", cu_seqlens=CU), atol=1e-5)
    assert np.isnan(graph(x, cu_bad).numpy()).all()


def test_sequences_longer_than_the_table():
    """With a table of P rows, the tokens at positions >= P are NaN rows (the table is never read
    past its end); the opt-in check names cu_seqlens and the sequence."""
    rng = np.random.default_rng(8)
    x_np = rng.uniform(-1, 1, (T, H, K)).astype(np.float32)
    cos_np, sin_np = random_rope_table(rng, rows=4, part=K, mode="plane", dtype="float32")
    cos, sin, x, cu = to_flow(cos_np), to_flow(sin_np), to_flow(x_np), cu_tensor(CU)
    out = rope(x, cos, sin, layout="(BM)HK", cu_seqlens=cu).numpy()
    positions = positions_from_cu_seqlens(CU, T)[0, 0]
    inside = positions < 4
    assert np.isnan(out[~inside]).all() and np.isfinite(out[inside]).all()
    expected = rope_reference(x_np, "(BM)HK", cos=np.pad(cos_np, ((0, 8), (0, 0))),
                              sin=np.pad(sin_np, ((0, 8), (0, 0))), cu_seqlens=CU)
    np.testing.assert_allclose(out[inside], expected[inside], atol=1e-6)
    assert_rejects(lambda: rope(x, cos, sin, layout="(BM)HK", cu_seqlens=cu, check_positions=True), ValueError,
                   ["cu_seqlens", "sequence 2 has 5 tokens", "the cos/sin table has 4 rows"])
    rope(x, cos, sin, layout="(BM)HK", cu_seqlens=cu_tensor([0, 4, 4, 8, 12, T]), check_positions=True)


def test_check_accepts_well_formed_cu_seqlens():
    x = varlen_x()
    for cu in (CU, [0, T], [0, 0, T, T], np.arange(T + 1)):
        rope(x, layout="(BM)HK", cu_seqlens=cu_tensor(cu, flow.int32), check_positions=True)
    empty = rope(varlen_x(0), layout="(BM)HK", cu_seqlens=cu_tensor([0]), check_positions=True)
    assert tuple(empty.shape) == (0, H, K)
