"""The op-level inputs of real LLM stacks (issue 12, items 1-4), against the float64 reference:
``seqlen_offsets`` (int and int32/int64 tensors, with tables and computed angles), ``inv_freq``
with ``attention_scaling``, float32 cos/sin tables with float16/bfloat16 x, and
``fused_apply_rotary_emb_qk`` (q and k of any head counts in every unpacked layout, a packed
BM(H3K)/MB(H3K) q, output layouts, in place). Errors, gradients (reference backward, finite
differences in float64, one nn.Graph training step) and nn.Graph forward."""

from __future__ import annotations

from typing import Optional

import numpy as np
import oneflow as flow
import pytest

import oneflow_rope
from oneflow_rope import _C
from oneflow_rope.ops import _op_expr
from tests.cases import INPUT_LAYOUTS, OUTPUT_LAYOUTS, layout_shape, random_rope_table, round_to_dtype
from tests.flow_helpers import assert_rejects, keep_alive, to_flow, to_numpy64
from tests.reference import rope_reference, rope_reference_backward, tolerance

rope = oneflow_rope.fused_apply_rotary_emb
rope_qk = oneflow_rope.fused_apply_rotary_emb_qk

B, M, K = 2, 5, 16
UNPACKED = [layout for layout in INPUT_LAYOUTS if "2" not in layout and "3" not in layout]
PACKED_QKV = ["BM(H3K)", "MB(H3K)"]
OFFSET_KINDS = ("int", "int32", "int64")


def rng_for(*parts) -> np.random.Generator:
    return np.random.default_rng([ord(c) for c in "/".join(str(p) for p in parts)])


def x_array(rng, layout: str, H: int, dtype: str = "float32") -> np.ndarray:
    return round_to_dtype(rng.uniform(-1, 1, layout_shape(layout, B, M, H, K)), dtype)


def layout_kwargs(layout: str, tensor_index: Optional[int] = None) -> dict:
    kwargs = {"layout": layout}
    if "(" in layout:
        kwargs["k_size"] = K
    if tensor_index is not None:
        kwargs["tensor_index"] = tensor_index
    return kwargs


def offsets_for(kind: str, rng) -> object:
    """(the call's seqlen_offsets, the reference's)."""
    if kind == "int":
        return 7, 7
    values = rng.integers(0, 20, B)
    return flow.tensor(values, dtype=getattr(flow, kind)), values


def check(out: flow.Tensor, expected: np.ndarray, dtype: str, max_position: int, what: str = "") -> None:
    assert tuple(out.shape) == expected.shape, what
    assert out.dtype == getattr(flow, dtype), what
    err = float(np.max(np.abs(to_numpy64(out) - expected))) if expected.size else 0.0
    tol = tolerance(dtype, max_position)
    assert err <= tol, f"{what}: max error {err} > {tol}"


def packed_index(layout: str, rng) -> Optional[int]:
    if "3" in layout:
        return int(rng.integers(0, 3))
    if "2" in layout:
        return int(rng.integers(1, 3))
    return None


# ---- 1. seqlen_offsets ------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["plane", "interval"])
@pytest.mark.parametrize("table", [False, True], ids=["base", "table"])
@pytest.mark.parametrize("kind", OFFSET_KINDS)
@pytest.mark.parametrize("layout", INPUT_LAYOUTS)
def test_seqlen_offsets(layout, kind, table, mode):
    rng = rng_for("offsets", layout, kind, table, mode)
    x = x_array(rng, layout, 3)
    offsets, ref_offsets = offsets_for(kind, rng)
    kwargs = dict(layout_kwargs(layout, packed_index(layout, rng)), mode=mode)
    cos = sin = None
    if table:
        cos, sin = random_rope_table(rng, rows=30, part=K, mode=mode, dtype="float32")
    else:
        kwargs["base"] = 500.0
    out = rope(to_flow(x), to_flow(cos), to_flow(sin), seqlen_offsets=offsets, **kwargs)
    expected = rope_reference(x, cos=cos, sin=sin, seqlen_offsets=ref_offsets, **kwargs)
    check(out, expected, "float32", int(np.max(ref_offsets)) + M, f"{layout} {kind}")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
@pytest.mark.parametrize("kind", OFFSET_KINDS)
def test_seqlen_offsets_dtypes(dtype, kind):
    rng = rng_for("offsets-dtype", dtype, kind)
    x = x_array(rng, "BMHK", 3, dtype)
    offsets, ref_offsets = offsets_for(kind, rng)
    out = rope(to_flow(x, dtype), seqlen_offsets=offsets, rotary_size=8)
    check(out, rope_reference(x, seqlen_offsets=ref_offsets, rotary_size=8), dtype, 30)


def test_int_and_tensor_offsets_agree_and_zero_is_none():
    x = to_flow(x_array(np.random.default_rng(1), "BMHK", 3))
    a = rope(x, seqlen_offsets=9)
    b = rope(x, seqlen_offsets=flow.tensor([9, 9], dtype=flow.int64))
    c = rope(x, seqlen_offsets=np.int64(9))
    assert np.array_equal(a.numpy(), b.numpy()) and np.array_equal(a.numpy(), c.numpy())
    assert np.array_equal(rope(x, seqlen_offsets=0).numpy(), rope(x).numpy())
    # a prepared int call with another value is the same plan, with the new value
    for offset in (3, 4, 5000):
        np.testing.assert_allclose(rope(x, seqlen_offsets=offset).numpy(),
                                   rope_reference(x.numpy(), seqlen_offsets=offset), atol=1e-5)


def test_negative_offsets_with_computed_angles():
    """Without a table any position is valid, negative ones too (as with position_ids)."""
    x = x_array(np.random.default_rng(2), "BMHK", 2)
    for offsets in (-3, flow.tensor([-4, 2])):
        ref = offsets if isinstance(offsets, int) else offsets.numpy()
        np.testing.assert_allclose(rope(to_flow(x), seqlen_offsets=offsets).numpy(),
                                   rope_reference(x, seqlen_offsets=ref), atol=1e-5)


def test_offsets_outside_the_table_give_nan_rows_or_the_opt_in_error():
    x = flow.ones(2, 3, 2, 8)
    cos, sin = flow.ones(10, 8), flow.zeros(10, 8)
    offsets = flow.tensor([2, 8], dtype=flow.int32)  # sequence 1: positions 8, 9, 10
    out = rope(x, cos, sin, seqlen_offsets=offsets).numpy()
    assert np.all(out[0] == 1) and np.all(out[1, :2] == 1)
    assert np.all(np.isnan(out[1, 2]))
    with pytest.raises(ValueError, match=r"seqlen_offsets: got offset 8: the M=3 tokens .* positions 8 to 10, "
                                         r"expected every position in \[0, 10\)"):
        rope(x, cos, sin, seqlen_offsets=offsets, check_positions=True)
    with pytest.raises(ValueError, match=r"seqlen_offsets: got offset -1"):
        rope(x, cos, sin, seqlen_offsets=flow.tensor([-1, 0]), check_positions=True)
    rope(x, cos, sin, seqlen_offsets=flow.tensor([0, 7]), check_positions=True)  # 7, 8, 9: inside
    try:
        oneflow_rope.set_position_check(True)
        with pytest.raises(ValueError, match="seqlen_offsets"):
            rope_qk(x, x, cos, sin, seqlen_offsets=offsets)
    finally:
        oneflow_rope.set_position_check(False)


def test_offsets_outside_the_table_in_graph_give_nan():
    x = flow.ones(2, 3, 2, 8)
    cos, sin = flow.ones(10, 8), flow.zeros(10, 8)

    class G(flow.nn.Graph):
        def build(self, x, cos, sin, offsets):
            return rope(x, cos, sin, seqlen_offsets=offsets, check_positions=True)  # no check in a graph

    out = keep_alive(G())(x, cos, sin, flow.tensor([2, 8], dtype=flow.int64)).numpy()
    assert np.all(out[0] == 1) and np.all(np.isnan(out[1, 2])) and np.all(out[1, :2] == 1)


def test_no_read_back_with_offsets(monkeypatch):
    x, cos, sin = flow.ones(2, 3, 2, 8), flow.ones(10, 8), flow.zeros(10, 8)
    offsets = flow.tensor([2, 8], dtype=flow.int32)
    rope(x, cos, sin, seqlen_offsets=offsets)
    rope_qk(x, x, cos, sin, seqlen_offsets=offsets)

    def forbidden(*args, **kwargs):
        raise AssertionError("a tensor was read back to the host")

    for name in ("numpy", "item", "tolist", "min", "max"):
        monkeypatch.setattr(flow.Tensor, name, forbidden)
    rope(x, cos, sin, seqlen_offsets=offsets)
    rope_qk(x, x, cos, sin, seqlen_offsets=offsets)
    rope(x.requires_grad_(True), cos, sin, seqlen_offsets=offsets)


# ---- 2. inv_freq and attention_scaling --------------------------------------------------------

def inv_freq_array(rng, part: int, dtype: str) -> np.ndarray:
    """Frequencies as an LLM's rope_scaling makes them (a base, then per-frequency factors)."""
    base = 10000.0 ** (-2.0 * np.arange(part // 2) / part)
    return (base * rng.uniform(0.25, 1.0, part // 2)).astype(dtype)


@pytest.mark.parametrize("inv_dtype", ["float32", "float64"])
@pytest.mark.parametrize("mode", ["plane", "interval"])
@pytest.mark.parametrize("layout", INPUT_LAYOUTS)
def test_inv_freq_and_attention_scaling(layout, mode, inv_dtype):
    rng = rng_for("inv", layout, mode, inv_dtype)
    x = x_array(rng, layout, 3)
    inv = inv_freq_array(rng, K, inv_dtype)
    kwargs = dict(layout_kwargs(layout, packed_index(layout, rng)), mode=mode, attention_scaling=1.3)
    positions = rng.integers(0, 4000, (B, 1, M))
    out = rope(to_flow(x), position_ids=to_flow(positions), inv_freq=to_flow(inv), **kwargs)
    check(out, rope_reference(x, position_ids=positions, inv_freq=inv, **kwargs), "float32", 4000, layout)


@pytest.mark.parametrize("scaling", [1.0, 0.5])
@pytest.mark.parametrize("inv_dtype", ["float32", "float64"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_inv_freq_dtypes(dtype, inv_dtype, scaling):
    rng = rng_for("inv-dtype", dtype, inv_dtype, scaling)
    x = x_array(rng, "BHMK", 2, dtype)
    inv = inv_freq_array(rng, 8, inv_dtype)  # rotary_size 8: A/2 = 4 frequencies
    kwargs = dict(layout="BHMK", rotary_size=8, attention_scaling=scaling, mode="interval")
    out = rope(to_flow(x, dtype), seqlen_offsets=flow.tensor([3, 100]), inv_freq=to_flow(inv), **kwargs)
    check(out, rope_reference(x, seqlen_offsets=[3, 100], inv_freq=inv, **kwargs), dtype, 105)


def test_inv_freq_of_base_equals_base():
    x = x_array(np.random.default_rng(3), "BMHK", 2, "float64")
    inv = 500.0 ** (-2.0 * np.arange(K // 2) / K)
    with_inv = rope(to_flow(x), inv_freq=flow.tensor(inv), seqlen_offsets=77)
    with_base = rope(to_flow(x), base=500.0, seqlen_offsets=77)
    np.testing.assert_allclose(with_inv.numpy(), with_base.numpy(), atol=1e-13)


@pytest.mark.parametrize("inv_dtype", ["float32", "float64"])
def test_inv_freq_long_positions_are_exact(inv_dtype):
    """Angles from inv_freq are as precise as from base (docs/operator.md, Precision): float32
    within 1e-6 of the reference up to position 2^24."""
    rng = np.random.default_rng(4)
    x = x_array(rng, "BMHK", 4)
    inv = inv_freq_array(rng, K, inv_dtype)
    for offset in (2**20, 2**24 - M):
        out = rope(to_flow(x), inv_freq=to_flow(inv), seqlen_offsets=offset)
        err = np.max(np.abs(out.numpy() - rope_reference(x, inv_freq=inv, seqlen_offsets=offset)))
        assert err <= 1e-6, f"position {offset}: error {err}"


def test_attention_scaling_with_tables():
    rng = np.random.default_rng(5)
    x = x_array(rng, "BMHK", 2, "float64")
    cos, sin = random_rope_table(rng, rows=M, part=K, mode="plane", dtype="float64")
    out = rope(to_flow(x), to_flow(cos), to_flow(sin), attention_scaling=0.25)
    np.testing.assert_allclose(out.numpy(), rope_reference(x, cos=cos, sin=sin, attention_scaling=0.25), atol=1e-13)


# ---- 3. float32 tables with float16 / bfloat16 x ----------------------------------------------

def half_ulp(values: np.ndarray, dtype: str) -> np.ndarray:
    """Half a unit in the last place of `dtype` at each value (the bound of one rounding)."""
    mantissa = 10 if dtype == "float16" else 7
    smallest = -14 if dtype == "float16" else -126
    exponent = np.maximum(np.floor(np.log2(np.maximum(np.abs(values), 1e-300))), smallest)
    return 0.5 * np.exp2(exponent - mantissa)


@pytest.mark.parametrize("positions", ["none", "position_ids", "seqlen_offsets"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("mode", ["plane", "interval"])
@pytest.mark.parametrize("layout", ["BMHK", "BHMK", "MB(HK)", "BM(H3K)"])
def test_float32_tables_with_16_bit_x(layout, mode, dtype, positions):
    """Math in float32, one rounding at the end: within half a unit of the reference computed from
    the float32 table values (a table rounded to 16 bits first would not be)."""
    rng = rng_for("f32-table", layout, mode, dtype, positions)
    x = x_array(rng, layout, 3, dtype)
    cos, sin = random_rope_table(rng, rows=40, part=K, mode=mode, dtype="float32")
    kwargs = dict(layout_kwargs(layout, packed_index(layout, rng)), mode=mode)
    call = {}
    if positions == "position_ids":
        call["position_ids"] = rng.integers(0, 40, (B, 1, M))
    elif positions == "seqlen_offsets":
        call["seqlen_offsets"] = rng.integers(0, 40 - M, B)
    out = rope(to_flow(x, dtype), to_flow(cos), to_flow(sin),
               **{name: to_flow(value) for name, value in call.items()}, **kwargs)
    assert out.dtype == getattr(flow, dtype)
    expected = rope_reference(x, cos=cos, sin=sin, **call, **kwargs)
    err = np.abs(to_numpy64(out) - expected)
    assert np.all(err <= half_ulp(expected, dtype) * 1.001 + 1e-6), float(np.max(err))


def test_float32_tables_qk_and_gradient():
    rng = np.random.default_rng(6)
    q = x_array(rng, "BMHK", 4, "bfloat16")
    k = x_array(rng, "BMHK", 2, "bfloat16")
    cos, sin = random_rope_table(rng, rows=M, part=K, mode="plane", dtype="float32")
    qt, kt = to_flow(q, "bfloat16", requires_grad=True), to_flow(k, "bfloat16", requires_grad=True)
    q_rot, k_rot = rope_qk(qt, kt, to_flow(cos), to_flow(sin), attention_scaling=0.5)
    check(q_rot, rope_reference(q, cos=cos, sin=sin, attention_scaling=0.5), "bfloat16", M)
    check(k_rot, rope_reference(k, cos=cos, sin=sin, attention_scaling=0.5), "bfloat16", M)
    # (no bfloat16 reductions on OneFlow's CPU: the upstream gradients are given)
    flow.autograd.backward([q_rot, k_rot], [to_flow(np.ones(q.shape), "bfloat16"), to_flow(2 * np.ones(k.shape),
                                                                                           "bfloat16")])
    check(qt.grad, rope_reference_backward(np.ones(q.shape), cos=cos, sin=sin, attention_scaling=0.5), "bfloat16", M)
    check(kt.grad, rope_reference_backward(2 * np.ones(k.shape), cos=cos, sin=sin, attention_scaling=0.5),
          "bfloat16", M)


# ---- 4. q and k in one call -------------------------------------------------------------------

def positions_for(kind: str, rng, table_rows: int):
    """(call kwargs, reference kwargs) for a kind of positions."""
    if kind == "position_ids":
        pos = rng.integers(0, table_rows, (B, 1, M))
        return {"position_ids": to_flow(pos)}, {"position_ids": pos}
    if kind == "offsets":
        offsets = rng.integers(0, table_rows - M, B)
        return {"seqlen_offsets": flow.tensor(offsets, dtype=flow.int32)}, {"seqlen_offsets": offsets}
    if kind == "int":
        return {"seqlen_offsets": 3}, {"seqlen_offsets": 3}
    return {}, {}


POSITION_KINDS = ("none", "position_ids", "offsets", "int")


@pytest.mark.parametrize("positions", POSITION_KINDS)
@pytest.mark.parametrize("table", [False, True], ids=["base", "table"])
@pytest.mark.parametrize("mode", ["plane", "interval"])
@pytest.mark.parametrize("layout", UNPACKED)
def test_qk_grouped_query(layout, mode, table, positions):
    rng = rng_for("qk", layout, mode, table, positions)
    q, k = x_array(rng, layout, 4), x_array(rng, layout, 2)
    rows = 30
    cos = sin = None
    if table:
        cos, sin = random_rope_table(rng, rows=rows, part=K, mode=mode, dtype="float32")
    call, ref = positions_for(positions, rng, rows)
    kwargs = dict(layout_kwargs(layout), mode=mode)
    q_rot, k_rot = rope_qk(to_flow(q), to_flow(k), to_flow(cos), to_flow(sin), **call, **kwargs)
    check(q_rot, rope_reference(q, cos=cos, sin=sin, **ref, **kwargs), "float32", rows, "q")
    check(k_rot, rope_reference(k, cos=cos, sin=sin, **ref, **kwargs), "float32", rows, "k")


@pytest.mark.parametrize("output_layout", OUTPUT_LAYOUTS)
@pytest.mark.parametrize("layout", UNPACKED)
def test_qk_output_layouts(layout, output_layout):
    rng = rng_for("qk-out", layout, output_layout)
    q, k = x_array(rng, layout, 3), x_array(rng, layout, 1)
    kwargs = dict(layout_kwargs(layout), output_layout=output_layout, rotary_size=8)
    offsets = flow.tensor([4, 11])
    q_rot, k_rot = rope_qk(to_flow(q), to_flow(k), seqlen_offsets=offsets, **kwargs)
    check(q_rot, rope_reference(q, seqlen_offsets=[4, 11], **kwargs), "float32", 16, "q")
    check(k_rot, rope_reference(k, seqlen_offsets=[4, 11], **kwargs), "float32", 16, "k")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float64"])
def test_qk_dtypes(dtype):
    rng = rng_for("qk-dtype", dtype)
    q, k = x_array(rng, "BHMK", 8, dtype), x_array(rng, "BHMK", 1, dtype)
    inv = inv_freq_array(rng, K, "float32")
    q_rot, k_rot = rope_qk(to_flow(q, dtype), to_flow(k, dtype), layout="BHMK", inv_freq=to_flow(inv),
                           attention_scaling=1.1, seqlen_offsets=flow.tensor([0, 60], dtype=flow.int64))
    kwargs = dict(layout="BHMK", inv_freq=inv, attention_scaling=1.1, seqlen_offsets=[0, 60])
    check(q_rot, rope_reference(q, **kwargs), dtype, 65)
    check(k_rot, rope_reference(k, **kwargs), dtype, 65)


@pytest.mark.parametrize("output_layout", [None] + list(OUTPUT_LAYOUTS))
@pytest.mark.parametrize("table", [False, True], ids=["base", "table"])
@pytest.mark.parametrize("mode", ["plane", "interval"])
@pytest.mark.parametrize("layout", PACKED_QKV)
def test_qk_packed(layout, mode, table, output_layout):
    rng = rng_for("qk-packed", layout, mode, table, output_layout)
    qkv = x_array(rng, layout, 3)
    kwargs = dict(mode=mode, output_layout=output_layout, layout=layout)
    cos = sin = None
    if table:
        cos, sin = random_rope_table(rng, rows=20, part=K, mode=mode, dtype="float32")  # K from the table
    else:
        kwargs["k_size"] = K
    before = qkv.copy()
    q_rot, k_rot = rope_qk(to_flow(qkv), None, to_flow(cos), to_flow(sin), seqlen_offsets=flow.tensor([1, 9]),
                           **kwargs)
    assert np.array_equal(qkv, before)
    for out, index in ((q_rot, 0), (k_rot, 1)):
        expected = rope_reference(qkv, cos=cos, sin=sin, seqlen_offsets=[1, 9], tensor_index=index, k_size=K,
                                  **{n: v for n, v in kwargs.items() if n != "k_size"})
        check(out, expected, "float32", 20, f"tensor {index}")


def test_qk_empty_and_single_head():
    for B_, M_ in ((0, 5), (2, 0)):
        q_rot, k_rot = rope_qk(flow.zeros(B_, M_, 4, K), flow.zeros(B_, M_, 1, K),
                               seqlen_offsets=flow.zeros(B_, dtype=flow.int32))
        assert tuple(q_rot.shape) == (B_, M_, 4, K) and tuple(k_rot.shape) == (B_, M_, 1, K)
    q_rot, k_rot = rope_qk(flow.zeros(2, 5, 4, K), flow.zeros(2, 5, 0, K))  # no k heads
    assert tuple(k_rot.shape) == (2, 5, 0, K)


# ---- in place ---------------------------------------------------------------------------------

@pytest.mark.parametrize("positions", ["none", "offsets", "position_ids"])
@pytest.mark.parametrize("layout", UNPACKED)
def test_qk_inplace_values(layout, positions):
    rng = rng_for("inplace", layout, positions)
    q, k = x_array(rng, layout, 4), x_array(rng, layout, 2)
    call, ref = positions_for(positions, rng, 64)
    kwargs = dict(layout_kwargs(layout), output_layout=layout, mode="interval")
    qt, kt = to_flow(q), to_flow(k)
    expected = rope_qk(qt, kt, **call, **kwargs)
    q_rot, k_rot = rope_qk(qt, kt, inplace=True, **call, **kwargs)
    assert q_rot is qt and k_rot is kt
    assert np.array_equal(qt.numpy(), expected[0].numpy()) and np.array_equal(kt.numpy(), expected[1].numpy())
    check(qt, rope_reference(q, **ref, **kwargs), "float32", 64)


def test_qk_inplace_keeps_the_gradient_of_the_values_before():
    """In place on non-leaf tensors: their producers get the gradient of the rotation."""
    rng = np.random.default_rng(7)
    q0, k0 = to_flow(x_array(rng, "BMHK", 4, "float64"), requires_grad=True), \
        to_flow(x_array(rng, "BMHK", 2, "float64"), requires_grad=True)
    wq, wk = rng.uniform(-1, 1, (B, M, 4, K)), rng.uniform(-1, 1, (B, M, 2, K))
    q, k = q0 * 2, k0 * 3
    q_rot, k_rot = rope_qk(q, k, seqlen_offsets=flow.tensor([5, 1]), inplace=True, attention_scaling=0.9)
    assert q_rot is q and not q.is_leaf
    ((q * to_flow(wq)).sum() + (k * to_flow(wk)).sum()).backward()
    kw = dict(seqlen_offsets=[5, 1], attention_scaling=0.9)
    np.testing.assert_allclose(q0.grad.numpy(), 2 * rope_reference_backward(wq, **kw), atol=1e-12)
    np.testing.assert_allclose(k0.grad.numpy(), 3 * rope_reference_backward(wk, **kw), atol=1e-12)


def test_qk_inplace_on_a_leaf_under_no_grad():
    q = flow.ones(1, 3, 2, 8).requires_grad_(True)
    with flow.no_grad():
        rope_qk(q, flow.ones(1, 3, 1, 8), inplace=True)
    np.testing.assert_allclose(q.numpy(), rope_reference(np.ones((1, 3, 2, 8))), atol=1e-6)


def test_qk_inplace_in_graph():
    rng = np.random.default_rng(8)
    q, k = x_array(rng, "BM(HK)", 4), x_array(rng, "BM(HK)", 2)

    class G(flow.nn.Graph):
        def build(self, q, k, offsets):
            q, k = q * 1, k * 1
            rope_qk(q, k, layout="BM(HK)", k_size=K, seqlen_offsets=offsets, inplace=True)
            return q, k

    q_rot, k_rot = keep_alive(G())(to_flow(q), to_flow(k), flow.tensor([2, 6]))
    kw = dict(layout="BM(HK)", k_size=K, seqlen_offsets=[2, 6])
    check(q_rot, rope_reference(q, **kw), "float32", 16)
    check(k_rot, rope_reference(k, **kw), "float32", 16)


# ---- errors ----------------------------------------------------------------------------------

def x4(*shape, dtype=flow.float32):
    return flow.zeros(*(shape or (2, 5, 3, 16)), dtype=dtype)


def tables(rows=8, width=16, dtype=flow.float32):
    return flow.zeros(rows, width, dtype=dtype), flow.zeros(rows, width, dtype=dtype)


ERROR_CASES = [
    # (id, call, exception, words the message must contain; the first starts it)
    ("offsets-and-position-ids", lambda: rope(x4(), position_ids=flow.zeros(2, 1, 5, dtype=flow.int64),
                                              seqlen_offsets=flow.zeros(2, dtype=flow.int64)),
     ValueError, ["seqlen_offsets", "position_ids"]),
    ("int-offset-and-position-ids", lambda: rope(x4(), position_ids=flow.zeros(2, 1, 5, dtype=flow.int64),
                                                 seqlen_offsets=0), ValueError, ["seqlen_offsets", "position_ids"]),
    ("offsets-float-dtype", lambda: rope(x4(), seqlen_offsets=flow.zeros(2)), TypeError,
     ["seqlen_offsets", "float32"]),
    ("offsets-float", lambda: rope(x4(), seqlen_offsets=2.5), TypeError, ["seqlen_offsets", "2.5"]),
    ("offsets-bool", lambda: rope(x4(), seqlen_offsets=True), TypeError, ["seqlen_offsets", "True"]),
    ("offsets-list", lambda: rope(x4(), seqlen_offsets=[1, 2]), TypeError, ["seqlen_offsets", "[1, 2]"]),
    ("offsets-shape", lambda: rope(x4(), seqlen_offsets=flow.zeros(3, dtype=flow.int32)), ValueError,
     ["seqlen_offsets", "(3,)", "B=2"]),
    ("offsets-2d", lambda: rope(x4(), seqlen_offsets=flow.zeros(2, 1, dtype=flow.int32)), ValueError,
     ["seqlen_offsets", "(2, 1)", "(B,)"]),
    ("offsets-placement", lambda: rope(x4(), seqlen_offsets=flow.zeros(2, dtype=flow.int32).to_global(
        placement=flow.placement("cpu", ranks=[0]), sbp=flow.sbp.broadcast)), ValueError, ["seqlen_offsets"]),
    ("int-offset-past-table", lambda: rope(x4(), *tables(rows=8), seqlen_offsets=4), ValueError,
     ["seqlen_offsets", "4 to 8", "0 to 7"]),
    ("int-offset-negative-with-table", lambda: rope(x4(), *tables(rows=8), seqlen_offsets=-1), ValueError,
     ["seqlen_offsets", "-1"]),
    ("int-offset-huge", lambda: rope(x4(), seqlen_offsets=2**63), ValueError, ["seqlen_offsets", str(2**63)]),
    ("inv-freq-with-tables", lambda: rope(x4(), *tables(), inv_freq=flow.ones(8)), ValueError, ["inv_freq", "cos"]),
    ("inv-freq-shape", lambda: rope(x4(), inv_freq=flow.ones(16)), ValueError, ["inv_freq", "(16,)", "(8,)"]),
    ("inv-freq-shape-partial", lambda: rope(x4(), inv_freq=flow.ones(8), rotary_size=8), ValueError,
     ["inv_freq", "(8,)", "(4,)"]),
    ("inv-freq-2d", lambda: rope(x4(), inv_freq=flow.ones(1, 8)), ValueError, ["inv_freq", "(1, 8)"]),
    ("inv-freq-dtype", lambda: rope(x4(), inv_freq=flow.ones(8, dtype=flow.float16)), TypeError,
     ["inv_freq", "float16"]),
    ("inv-freq-int", lambda: rope(x4(), inv_freq=flow.ones(8, dtype=flow.int64)), TypeError, ["inv_freq", "int64"]),
    ("inv-freq-numpy", lambda: rope(x4(), inv_freq=np.ones(8)), TypeError, ["inv_freq", "ndarray"]),
    ("attention-scaling-nan", lambda: rope(x4(), attention_scaling=float("nan")), ValueError,
     ["attention_scaling", "nan"]),
    ("attention-scaling-str", lambda: rope(x4(), attention_scaling="1"), ValueError, ["attention_scaling", "'1'"]),
    ("float32-table-float64-x", lambda: rope(x4(dtype=flow.float64), *tables()), TypeError,
     ["cos", "float32", "float64"]),
    ("float16-table-bfloat16-x", lambda: rope(x4(dtype=flow.bfloat16), *tables(dtype=flow.float16)), TypeError,
     ["cos", "float16", "bfloat16"]),
    ("float64-table-float16-x", lambda: rope(x4(dtype=flow.float16), *tables(dtype=flow.float64)), TypeError,
     ["cos", "float64"]),
    ("sin-dtype-differs-from-cos", lambda: rope(x4(dtype=flow.float16), tables()[0], tables(dtype=flow.float16)[1]),
     TypeError, ["sin", "float16", "float32"]),
    # q+k
    ("qk-k-dtype", lambda: rope_qk(x4(), x4(dtype=flow.float64)), TypeError, ["k", "float64"]),
    ("qk-k-not-tensor", lambda: rope_qk(x4(), np.zeros((2, 5, 1, 16))), TypeError, ["k", "ndarray"]),
    ("qk-q-not-tensor", lambda: rope_qk(np.zeros((2, 5, 1, 16)), x4()), TypeError, ["q", "ndarray"]),
    ("qk-k-batch", lambda: rope_qk(x4(), x4(3, 5, 1, 16)), ValueError, ["k", "(3, 5, 1, 16)", "B=2"]),
    ("qk-k-seq", lambda: rope_qk(x4(), x4(2, 4, 1, 16)), ValueError, ["k", "M=5"]),
    ("qk-k-head-size", lambda: rope_qk(x4(), x4(2, 5, 1, 8)), ValueError, ["k", "8", "K=16"]),
    ("qk-k-ndim", lambda: rope_qk(x4(), flow.zeros(2, 5, 16)), ValueError, ["k", "4-D", "(2, 5, 16)"]),
    ("qk-k-fused-width", lambda: rope_qk(flow.zeros(2, 5, 64), flow.zeros(2, 5, 24), layout="BM(HK)", k_size=16),
     ValueError, ["k", "24", "16"]),
    ("qk-q-ndim", lambda: rope_qk(flow.zeros(2, 5, 48), x4()), ValueError, ["q", "4-D"]),
    ("qk-k-none-unpacked", lambda: rope_qk(x4(), None), ValueError, ["k", "None", "BMHK", "BM(H3K)"]),
    ("qk-k-none-kv", lambda: rope_qk(flow.zeros(2, 5, 64), None, layout="BM(H2K)", k_size=16), ValueError,
     ["k", "BM(H2K)"]),
    ("qk-k-with-packed", lambda: rope_qk(flow.zeros(2, 5, 96), flow.zeros(2, 5, 96), layout="BM(H3K)", k_size=16),
     ValueError, ["k", "packed"]),
    ("qk-k-placement", lambda: rope_qk(x4(), x4().to_global(placement=flow.placement("cpu", ranks=[0]),
                                                            sbp=flow.sbp.broadcast)), ValueError, ["k"]),
    ("qk-offsets-and-position-ids", lambda: rope_qk(x4(), x4(), position_ids=flow.zeros(2, 1, 5, dtype=flow.int32),
                                                    seqlen_offsets=flow.zeros(2, dtype=flow.int32)),
     ValueError, ["seqlen_offsets", "position_ids"]),
    ("qk-inv-freq-with-tables", lambda: rope_qk(x4(), x4(), *tables(), inv_freq=flow.ones(8)), ValueError,
     ["inv_freq"]),
    # in place
    ("inplace-output-layout", lambda: rope_qk(x4(), x4(), output_layout="BHMK", inplace=True), ValueError,
     ["inplace", "BHMK"]),
    ("inplace-packed", lambda: rope_qk(flow.zeros(2, 5, 96), None, layout="BM(H3K)", k_size=16, inplace=True),
     ValueError, ["inplace", "packed"]),
    ("inplace-not-bool", lambda: rope_qk(x4(), x4(), inplace=1), TypeError, ["inplace", "1"]),
    ("inplace-not-contiguous", lambda: rope_qk(x4().transpose(1, 2), x4().transpose(1, 2), layout="BHMK",
                                               inplace=True), ValueError, ["inplace", "contiguous"]),
    ("inplace-same-tensor", lambda: (lambda t: rope_qk(t, t, inplace=True))(x4()), ValueError,
     ["inplace", "same tensor"]),
    ("inplace-leaf-requires-grad", lambda: rope_qk(x4().requires_grad_(True), x4(), inplace=True), RuntimeError,
     ["inplace", "q", "leaf"]),
    ("inplace-k-leaf-requires-grad", lambda: rope_qk(x4(), x4().requires_grad_(True), inplace=True), RuntimeError,
     ["inplace", "k", "leaf"]),
]


@pytest.mark.parametrize("repeat", [1, 2], ids=["first", "prepared"])
@pytest.mark.parametrize("call,exc,words", [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_rejects(call, exc, words, repeat):
    """Each call twice: a rejected call prepares nothing, so the second is rejected the same way."""
    assert_rejects(call, exc, words)


def test_prepared_int_offset_is_checked_at_every_call():
    """The value of an int seqlen_offsets is not part of the prepared signature: the op's own
    inference rejects a value outside the table, and the call names seqlen_offsets."""
    x, (cos, sin) = x4(), tables(rows=8)
    rope(x, cos, sin, seqlen_offsets=2)
    rope(x, cos, sin, seqlen_offsets=3)
    with pytest.raises(ValueError, match=r"seqlen_offsets: got 4: the M=5 tokens of each sequence are at positions "
                                         r"4 to 8, outside the cos/sin table's rows 0 to 7"):
        rope(x, cos, sin, seqlen_offsets=4)
    rope_qk(x, x, cos, sin, seqlen_offsets=1)
    with pytest.raises(ValueError, match="seqlen_offsets: got 6"):
        rope_qk(x, x, cos, sin, seqlen_offsets=6)


def test_prepared_signature_rechecks_dtypes():
    x = x4(dtype=flow.float16)
    rope(x, *tables(dtype=flow.float32))
    rope(x, *tables(dtype=flow.float16))
    with pytest.raises(TypeError, match="cos: dtype oneflow.float64"):
        rope(x, *tables(dtype=flow.float64))
    rope(x4(), seqlen_offsets=flow.zeros(2, dtype=flow.int32))
    with pytest.raises(TypeError, match="seqlen_offsets: dtype oneflow.float32"):
        rope(x4(), seqlen_offsets=flow.zeros(2))
    rope(x4(), inv_freq=flow.ones(8))
    with pytest.raises(TypeError, match="inv_freq: dtype oneflow.int32"):
        rope(x4(), inv_freq=flow.ones(8, dtype=flow.int32))
    rope_qk(x4(), x4(2, 5, 1, 16))
    with pytest.raises(TypeError, match="k: dtype oneflow.float64"):
        rope_qk(x4(), x4(2, 5, 1, 16, dtype=flow.float64))


def direct(x, *, k=None, cos=None, sin=None, position_ids=None, seqlen_offsets=None, inv_freq=None,
           packed_qk=False, seqlen_offset=0, x_layout="BMHK", output_layout="BMHK", k_size=16):
    """The op run without the Python layer's checks."""
    flags = dict(has_table=cos is not None, has_positions=position_ids is not None,
                 has_offsets=seqlen_offsets is not None, has_inv_freq=inv_freq is not None)
    two = k is not None or packed_qk
    forward = _op_expr("fused_apply_rotary_emb", "x", "out", flags["has_table"], flags["has_positions"],
                       second_input="k" if k is not None else None, second_output="k_out" if two else None,
                       has_offsets=flags["has_offsets"], has_inv_freq=flags["has_inv_freq"])
    backward = _op_expr("fused_apply_rotary_emb_grad", "dy", "dx", flags["has_table"], flags["has_positions"],
                        second_input="dk_out" if two else None, second_output="dk" if k is not None else None,
                        has_offsets=flags["has_offsets"], has_inv_freq=flags["has_inv_freq"])
    op = _C.RopeOp(forward, backward, flags["has_table"], flags["has_positions"], k is not None,
                   flags["has_offsets"], flags["has_inv_freq"], x_layout=x_layout, output_layout=output_layout,
                   mode="plane", tensor_index=0, k_size=k_size, rotary_size=16, base=10000.0,
                   seqlen_offset=seqlen_offset, attention_scaling=1.0, packed_qk=packed_qk)
    return op.forward(x, cos, sin, position_ids, k, seqlen_offsets, inv_freq)


DIRECT_CASES = [
    ("offsets-and-position-ids", lambda: direct(x4(), position_ids=flow.zeros(2, 1, 5, dtype=flow.int64),
                                                seqlen_offsets=flow.zeros(2, dtype=flow.int64)),
     ["seqlen_offsets", "position_ids"]),
    ("int-offset-and-position-ids", lambda: direct(x4(), position_ids=flow.zeros(2, 1, 5, dtype=flow.int64),
                                                   seqlen_offset=3), ["seqlen_offsets", "position_ids"]),
    ("int-and-tensor-offsets", lambda: direct(x4(), seqlen_offsets=flow.zeros(2, dtype=flow.int64), seqlen_offset=3),
     ["seqlen_offsets", "int"]),
    ("offsets-shape", lambda: direct(x4(), seqlen_offsets=flow.zeros(3, dtype=flow.int64)), ["seqlen_offsets", "(3,)"]),
    ("offsets-dtype", lambda: direct(x4(), seqlen_offsets=flow.zeros(2)), ["seqlen_offsets", "kFloat"]),
    ("int-offset-past-table", lambda: direct(x4(), cos=tables()[0], sin=tables()[1], seqlen_offset=6),
     ["seqlen_offsets", "6"]),
    ("inv-freq-with-tables", lambda: direct(x4(), cos=tables()[0], sin=tables()[1], inv_freq=flow.ones(8)),
     ["inv_freq"]),
    ("inv-freq-shape", lambda: direct(x4(), inv_freq=flow.ones(7)), ["inv_freq", "(7,)"]),
    ("inv-freq-dtype", lambda: direct(x4(), inv_freq=flow.ones(8, dtype=flow.float16)), ["inv_freq", "kFloat16"]),
    ("table-dtype", lambda: direct(x4(dtype=flow.float16), cos=tables(dtype=flow.float64)[0],
                                   sin=tables(dtype=flow.float64)[1]), ["cos", "kDouble"]),
    ("k-dtype", lambda: direct(x4(), k=x4(dtype=flow.float64)), ["k", "kDouble"]),
    ("k-shape", lambda: direct(x4(), k=x4(2, 4, 1, 16)), ["k", "(2, 4, 1, 16)"]),
    ("packed-qk-unpacked-layout", lambda: direct(x4(), packed_qk=True), ["k", "BMHK"]),
    ("packed-qk-with-k", lambda: direct(flow.zeros(2, 5, 96), k=flow.zeros(2, 5, 96), x_layout="BM(H3K)",
                                        output_layout="BM(HK)"), ["k", "packed"]),
]


@pytest.mark.parametrize("call,words", [c[1:] for c in DIRECT_CASES], ids=[c[0] for c in DIRECT_CASES])
def test_op_inference_rejects_direct_calls(call, words):
    with pytest.raises(RuntimeError) as info:
        call()
    for word in words:
        assert word in str(info.value), f"{word!r} not in {str(info.value)[:600]!r}"


def test_rope_op_rejects_packed_qk_with_k():
    with pytest.raises(TypeError, match="packed_qk"):
        direct(flow.zeros(2, 5, 96), k=flow.zeros(2, 5, 96), packed_qk=True, x_layout="BM(H3K)",
               output_layout="BM(HK)")


# ---- gradients --------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["int", "int64"])
@pytest.mark.parametrize("table", [False, True], ids=["base", "table"])
@pytest.mark.parametrize("layout", INPUT_LAYOUTS)
def test_gradient_with_offsets(layout, table, kind):
    rng = rng_for("grad-offsets", layout, table, kind)
    x = x_array(rng, layout, 3)
    offsets, ref_offsets = offsets_for(kind, rng)
    kwargs = layout_kwargs(layout, packed_index(layout, rng))
    cos = sin = None
    if table:
        cos, sin = random_rope_table(rng, rows=30, part=K, mode="plane", dtype="float32")
    xt = to_flow(x, requires_grad=True)
    out = rope(xt, to_flow(cos), to_flow(sin), seqlen_offsets=offsets, attention_scaling=0.8, **kwargs)
    dy = rng.uniform(-1, 1, tuple(out.shape))
    out.backward(to_flow(dy, "float32"))
    expected = rope_reference_backward(dy, cos=cos, sin=sin, seqlen_offsets=ref_offsets, attention_scaling=0.8,
                                       x_shape=x.shape, **kwargs)
    check(xt.grad, expected, "float32", 30, layout)


@pytest.mark.parametrize("output_layout", [None, "BHMK", "MB(HK)"])
@pytest.mark.parametrize("layout", UNPACKED)
def test_gradient_qk(layout, output_layout):
    rng = rng_for("grad-qk", layout, output_layout)
    q, k = x_array(rng, layout, 4), x_array(rng, layout, 2)
    inv = inv_freq_array(rng, K, "float64")
    kwargs = dict(layout_kwargs(layout), output_layout=output_layout)
    qt, kt = to_flow(q, requires_grad=True), to_flow(k, requires_grad=True)
    q_rot, k_rot = rope_qk(qt, kt, seqlen_offsets=flow.tensor([3, 0]), inv_freq=to_flow(inv), **kwargs)
    dq, dk = rng.uniform(-1, 1, tuple(q_rot.shape)), rng.uniform(-1, 1, tuple(k_rot.shape))
    ((q_rot * to_flow(dq, "float32")).sum() + (k_rot * to_flow(dk, "float32")).sum()).backward()
    ref = dict(seqlen_offsets=[3, 0], inv_freq=inv, **kwargs)
    check(qt.grad, rope_reference_backward(dq, x_shape=q.shape, **ref), "float32", 10, "dq")
    check(kt.grad, rope_reference_backward(dk, x_shape=k.shape, **ref), "float32", 10, "dk")


@pytest.mark.parametrize("output_layout", [None] + list(OUTPUT_LAYOUTS))
@pytest.mark.parametrize("layout", PACKED_QKV)
def test_gradient_qk_packed(layout, output_layout):
    """The packed tensor's gradient: the query's and the key's in their slots, zeros in the value's."""
    rng = rng_for("grad-packed", layout, output_layout)
    qkv = x_array(rng, layout, 3)
    kwargs = dict(layout=layout, k_size=K, output_layout=output_layout)
    xt = to_flow(qkv, requires_grad=True)
    q_rot, k_rot = rope_qk(xt, None, seqlen_offsets=flow.tensor([2, 7]), **kwargs)
    dq, dk = rng.uniform(-1, 1, tuple(q_rot.shape)), rng.uniform(-1, 1, tuple(k_rot.shape))
    ((q_rot * to_flow(dq, "float32")).sum() + (k_rot * to_flow(dk, "float32")).sum()).backward()
    ref = dict(seqlen_offsets=[2, 7], **kwargs)
    expected = (rope_reference_backward(dq, tensor_index=0, **ref)
                + rope_reference_backward(dk, tensor_index=1, **ref))
    check(xt.grad, expected, "float32", 12)
    grad = xt.grad.numpy()
    grad = (grad if layout.startswith("BM") else grad.transpose(1, 0, 2)).reshape(B, M, 3, 3, K)
    assert np.all(grad[:, :, :, 2] == 0)


def test_gradient_qk_one_result_used():
    """Only one of the results takes part in the loss: the other's gradient is zero."""
    rng = np.random.default_rng(9)
    for use in (0, 1):
        qkv = to_flow(x_array(rng, "BM(H3K)", 2), requires_grad=True)
        q, k = to_flow(x_array(rng, "BMHK", 2), requires_grad=True), to_flow(x_array(rng, "BMHK", 1),
                                                                            requires_grad=True)
        rope_qk(qkv, None, layout="BM(H3K)", k_size=K)[use].sum().backward()
        rope_qk(q, k)[use].sum().backward()
        slots = qkv.grad.numpy().reshape(B, M, 2, 3, K)
        assert np.all(slots[:, :, :, 1 - use] == 0) and np.any(slots[:, :, :, use] != 0)
        unused = k if use == 0 else q
        assert unused.grad is None or np.all(unused.grad.numpy() == 0)


def test_gradient_only_k_requires_grad():
    q, k = to_flow(np.ones((B, M, 2, K))), to_flow(np.ones((B, M, 1, K)), requires_grad=True)
    q_rot, k_rot = rope_qk(q, k, seqlen_offsets=2)
    assert q_rot.requires_grad and k_rot.requires_grad
    (q_rot.sum() + k_rot.sum()).backward()
    np.testing.assert_allclose(k.grad.numpy(), rope_reference_backward(np.ones((B, M, 1, K)), seqlen_offsets=2),
                               atol=1e-12)
    assert q.grad is None


# each: the inputs, the call on flow tensors, the reference on numpy arrays (finite_difference_case)
FD_CASES = [
    "qk-gqa-offsets-inv-freq", "qk-fused-int-offset-table", "qk-packed-table", "single-offsets-scaling",
]


def finite_difference_case(name: str):
    rng = rng_for("fd", name)
    if name == "qk-gqa-offsets-inv-freq":
        shapes = [(B, M, 4, K), (B, M, 2, K)]
        inv = inv_freq_array(rng, K, "float64")
        kw = dict(inv_freq=inv, attention_scaling=1.2, mode="interval")
        offsets = [4, 1]

        def run(ts):
            return rope_qk(*ts, seqlen_offsets=flow.tensor(offsets), inv_freq=flow.tensor(inv),
                           attention_scaling=1.2, mode="interval")

        def ref(vs):
            return [rope_reference(v, seqlen_offsets=offsets, **kw) for v in vs]
    elif name == "qk-fused-int-offset-table":
        shapes = [(M, B, 3 * K), (M, B, K)]
        cos, sin = random_rope_table(rng, rows=12, part=K, mode="plane", dtype="float64")

        def run(ts):
            return rope_qk(*ts, to_flow(cos), to_flow(sin), layout="MB(HK)", seqlen_offsets=6,
                           output_layout="BHMK")

        def ref(vs):
            return [rope_reference(v, "MB(HK)", cos=cos, sin=sin, seqlen_offsets=6, output_layout="BHMK")
                    for v in vs]
    elif name == "qk-packed-table":
        shapes = [(B, M, 2 * 3 * K)]
        cos, sin = random_rope_table(rng, rows=M, part=K, mode="interval", dtype="float64")

        def run(ts):
            return rope_qk(ts[0], None, to_flow(cos), to_flow(sin), layout="BM(H3K)", mode="interval")

        def ref(vs):
            return [rope_reference(vs[0], "BM(H3K)", cos=cos, sin=sin, mode="interval", tensor_index=i)
                    for i in (0, 1)]
    else:
        shapes = [(B, 2, M, K)]

        def run(ts):
            return (rope(ts[0], layout="BHMK", seqlen_offsets=flow.tensor([9, 2], dtype=flow.int32),
                         attention_scaling=0.6, rotary_size=8),)

        def ref(vs):
            return [rope_reference(vs[0], "BHMK", seqlen_offsets=[9, 2], attention_scaling=0.6, rotary_size=8)]
    values = [rng.uniform(-1, 1, s) for s in shapes]
    return values, run, ref, rng


@pytest.mark.parametrize("name", FD_CASES)
def test_gradient_matches_finite_differences(name):
    values, run, ref, rng = finite_difference_case(name)
    tensors = [to_flow(v, requires_grad=True) for v in values]
    outs = run(tensors)
    weights = [rng.uniform(-1, 1, tuple(o.shape)) for o in outs]
    sum((o * to_flow(w)).sum() for o, w in zip(outs, weights)).backward()
    grads = [t.grad.numpy() for t in tensors]

    def loss(vs):
        return float(sum(np.sum(o * w) for o, w in zip(ref(vs), weights)))

    eps = 1e-6
    for _ in range(4):
        direction = [rng.standard_normal(v.shape) for v in values]
        plus = loss([v + eps * d for v, d in zip(values, direction)])
        minus = loss([v - eps * d for v, d in zip(values, direction)])
        numeric = (plus - minus) / (2 * eps)
        analytic = float(sum(np.sum(g * d) for g, d in zip(grads, direction)))
        assert abs(analytic - numeric) <= 1e-6 * max(1.0, abs(numeric)), (analytic, numeric)


# ---- nn.Graph ---------------------------------------------------------------------------------

def test_forward_in_graph():
    rng = np.random.default_rng(10)
    q, k = x_array(rng, "BMHK", 4), x_array(rng, "BMHK", 2)
    qkv = x_array(rng, "MB(H3K)", 2)
    x16 = x_array(rng, "BHMK", 2, "float16")
    cos, sin = random_rope_table(rng, rows=20, part=K, mode="plane", dtype="float32")
    inv = inv_freq_array(rng, K, "float32")
    offsets = np.array([3, 12])

    class G(flow.nn.Graph):
        def build(self, q, k, qkv, x16, cos, sin, inv, offsets):
            return (*rope_qk(q, k, cos, sin, seqlen_offsets=offsets),
                    *rope_qk(qkv, None, layout="MB(H3K)", k_size=K, output_layout="BMHK", seqlen_offsets=4),
                    rope(x16, cos, sin, layout="BHMK", seqlen_offsets=offsets),
                    rope(q, inv_freq=inv, attention_scaling=0.7, seqlen_offsets=offsets))

    outs = keep_alive(G())(to_flow(q), to_flow(k), to_flow(qkv), to_flow(x16, "float16"), to_flow(cos), to_flow(sin),
                           to_flow(inv), to_flow(offsets))
    expected = [
        rope_reference(q, cos=cos, sin=sin, seqlen_offsets=offsets),
        rope_reference(k, cos=cos, sin=sin, seqlen_offsets=offsets),
        rope_reference(qkv, "MB(H3K)", k_size=K, output_layout="BMHK", seqlen_offsets=4, tensor_index=0),
        rope_reference(qkv, "MB(H3K)", k_size=K, output_layout="BMHK", seqlen_offsets=4, tensor_index=1),
        rope_reference(x16, "BHMK", cos=cos, sin=sin, seqlen_offsets=offsets),
        rope_reference(q, inv_freq=inv, attention_scaling=0.7, seqlen_offsets=offsets),
    ]
    dtypes = ["float32"] * 4 + ["float16", "float32"]
    for i, (out, exp, dtype) in enumerate(zip(outs, expected, dtypes)):
        check(out, exp, dtype, 20, f"output {i}")


def test_training_step_in_graph():
    """One SGD step (lr = 1) of an nn.Graph: each parameter moves by -grad, the reference's.
    float32 parameters: OneFlow 0.9.0 has no CPU sgd_update for float64 ones in a graph."""
    rng = np.random.default_rng(11)
    cos, sin = random_rope_table(rng, rows=24, part=K, mode="interval", dtype="float32")
    inv = inv_freq_array(rng, 8, "float64")
    offsets = np.array([5, 0])
    init = {"q": x_array(rng, "BHMK", 4), "k": x_array(rng, "BHMK", 2), "qkv": x_array(rng, "BM(H3K)", 2),
            "x": x_array(rng, "MB(HK)", 3), "p": x_array(rng, "BMHK", 2), "r": x_array(rng, "BMHK", 1)}
    weights = {name: round_to_dtype(rng.uniform(-1, 1, shape), "float32") for name, shape in (
        ("q", (B, 4, M, K)), ("k", (B, 2, M, K)), ("qkv_q", (B, M, 2 * K)), ("qkv_k", (B, M, 2 * K)),
        ("x", (M, B, 3 * K)), ("p", (B, M, 2, K)), ("r", (B, M, 1, K)))}

    class Holder(flow.nn.Module):
        def __init__(self):
            super().__init__()
            for name, value in init.items():
                setattr(self, name, flow.nn.Parameter(to_flow(value)))

    holder = Holder()
    optimizer = flow.optim.SGD(holder.parameters(), lr=1.0)
    tensors = {"cos": to_flow(cos), "sin": to_flow(sin), "inv": to_flow(inv), "offsets": to_flow(offsets),
               **{f"w_{n}": to_flow(w) for n, w in weights.items()}}

    class TrainStep(flow.nn.Graph):
        def __init__(self):
            super().__init__()
            self.holder = holder
            self.add_optimizer(optimizer)

        def build(self):
            h, t = self.holder, tensors
            q_rot, k_rot = rope_qk(h.q, h.k, t["cos"], t["sin"], layout="BHMK", mode="interval",
                                   seqlen_offsets=t["offsets"])
            pq, pk = rope_qk(h.qkv, None, layout="BM(H3K)", k_size=K, seqlen_offsets=3)
            x_rot = rope(h.x, layout="MB(HK)", k_size=K, inv_freq=t["inv"], rotary_size=8, attention_scaling=1.5)
            p, r = h.p * 1, h.r * 1  # non-leaf: rotated in place
            rope_qk(p, r, seqlen_offsets=t["offsets"], inplace=True)
            loss = ((q_rot * t["w_q"]).sum() + (k_rot * t["w_k"]).sum() + (pq * t["w_qkv_q"]).sum()
                    + (pk * t["w_qkv_k"]).sum() + (x_rot * t["w_x"]).sum() + (p * t["w_p"]).sum()
                    + (r * t["w_r"]).sum())
            loss.backward()
            return loss

    keep_alive(TrainStep())()
    kw = dict(cos=cos, sin=sin, layout="BHMK", mode="interval", seqlen_offsets=offsets)
    packed = dict(layout="BM(H3K)", k_size=K, seqlen_offsets=3)
    expected = {
        "q": rope_reference_backward(weights["q"], **kw),
        "k": rope_reference_backward(weights["k"], **kw),
        "qkv": rope_reference_backward(weights["qkv_q"], tensor_index=0, **packed)
        + rope_reference_backward(weights["qkv_k"], tensor_index=1, **packed),
        "x": rope_reference_backward(weights["x"], "MB(HK)", k_size=K, inv_freq=inv, rotary_size=8,
                                     attention_scaling=1.5),
        "p": rope_reference_backward(weights["p"], seqlen_offsets=offsets),
        "r": rope_reference_backward(weights["r"], seqlen_offsets=offsets),
    }
    for name, value in init.items():
        grad = value - getattr(holder, name).detach().numpy()
        np.testing.assert_allclose(grad, expected[name], atol=1e-5, err_msg=name)


def test_combinations_cover_every_layout():
    """Every batched layout; the varlen ones, with their q+k calls, are in tests/test_varlen.py."""
    batched = set(oneflow_rope.INPUT_LAYOUTS) - set(oneflow_rope.VARLEN_LAYOUTS)
    assert set(UNPACKED) | set(PACKED_QKV) | {"BM(H2K)", "MB(H2K)"} == batched
    assert set(UNPACKED) == set(OUTPUT_LAYOUTS)
