"""``oneflow_rope.RotaryEmbedding``: q and k rotated as the float64 reference rotates them with the
inverse frequencies and attention factor derived in test_rope_scaling.py from the published
formulas, for every rope_type, every way of giving positions, layouts, modes and dtypes, in eager
mode and inside nn.Graph ("dynamic" and "longrope" following the longest position of each call)."""

from __future__ import annotations

import zlib
from typing import Optional

import numpy as np
import oneflow as flow
import pytest

import oneflow_rope
from tests.flow_helpers import keep_alive, to_numpy64
from tests.reference import rope_reference, tolerance
from tests.test_rope_scaling import (expected_default, expected_dynamic, expected_linear, expected_llama3,
                                     expected_longrope, expected_yarn, longrope_attention, yarn_mscale)

DIM = 16  # rotated dims; the heads below have K = 24, so 8 dims pass through
SHORT = [1.0 + 0.25 * i for i in range(DIM // 2)]
LONG = [2.0 + 3.0 * i for i in range(DIM // 2)]
# name -> (max_position_embeddings, rope_scaling); base 10000 throughout
CONFIGS = {
    "default": (64, None),
    "linear": (64, {"rope_type": "linear", "factor": 4.0}),
    "dynamic": (64, {"rope_type": "dynamic", "factor": 2.0}),
    "yarn": (64, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "mscale": 1.0,
                  "mscale_all_dim": 0.5}),
    "llama3": (256, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 32}),
    "longrope": (256, {"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG,
                       "original_max_position_embeddings": 32}),
}
BASE = 10000.0


def make_rope(name: str, mode: str = "plane", dim: int = DIM) -> oneflow_rope.RotaryEmbedding:
    max_pos, rope_scaling = CONFIGS[name]
    return oneflow_rope.RotaryEmbedding(dim, max_pos, BASE, rope_scaling=rope_scaling, mode=mode)


def expected_parameters(name: str, seq_len: Optional[int], dim: int = DIM):
    """(float32 inverse frequencies, attention factor) from the formulas, for a call whose
    longest position is seq_len - 1."""
    max_pos, config = CONFIGS[name]
    if name == "default":
        inv, attention = expected_default(dim, BASE), 1.0
    elif name == "linear":
        inv, attention = expected_linear(dim, BASE, 4.0), 1.0
    elif name == "dynamic":
        inv, attention = expected_dynamic(dim, BASE, max_pos, 2.0, seq_len), 1.0
    elif name == "yarn":
        inv = expected_yarn(dim, BASE, 16, 4.0)
        attention = yarn_mscale(4.0, 1.0) / yarn_mscale(4.0, 0.5)
    elif name == "llama3":
        inv, attention = expected_llama3(dim, BASE, 8.0, 1.0, 4.0, 32), 1.0
    else:
        inv = expected_longrope(dim, BASE, LONG if seq_len is not None and seq_len > 32 else SHORT)
        attention = longrope_attention(256 / 32, 32)
    return np.array(inv, dtype=np.float64).astype(np.float32), attention


def random_array(shape, seed: int, dtype: str = "float64") -> np.ndarray:
    values = np.random.default_rng(seed).uniform(-1, 1, size=shape)
    return flow.tensor(values).to(getattr(flow, dtype)).to(flow.float64).numpy()  # exact in dtype


def as_flow(a: np.ndarray, dtype: str) -> flow.Tensor:
    return flow.tensor(a).to(getattr(flow, dtype))


def check(got: flow.Tensor, expected: np.ndarray, dtype: str, max_position: int, label: str = "") -> None:
    assert tuple(got.shape) == expected.shape, label
    assert got.dtype == getattr(flow, dtype), label
    tol = 1e-12 if dtype == "float64" else tolerance(dtype, max_position)
    err = float(np.max(np.abs(to_numpy64(got) - expected))) if expected.size else 0.0
    assert err <= tol, f"{label}: max error {err} > {tol}"


# ---- every rope_type, every way of giving positions ----------------------------------------------

B, M_SHORT, HQ, HK, K = 2, 6, 4, 2, 24


def positions_case(kind: str, regime: str):
    """(M, call keyword arguments as numpy/ints, the (B, 1, M) positions they mean). "short"
    positions stay below every threshold of CONFIGS (16); "long" ones pass all of them (256)."""
    rng = np.random.default_rng(zlib.crc32(f"{kind} {regime}".encode()))
    top = 12 if regime == "short" else 300
    if kind == "none":
        M = top + 1
        return M, {}, np.broadcast_to(np.arange(M), (B, 1, M))
    M = M_SHORT
    if kind == "int offset":
        offset = top - M + 1
        return M, {"seqlen_offsets": offset}, np.broadcast_to(np.arange(M) + offset, (B, 1, M))
    if kind == "tensor offsets":
        offsets = np.array([top - M + 1, 2])
        return M, {"seqlen_offsets": offsets}, np.arange(M)[None, None, :] + offsets[:, None, None]
    positions = rng.integers(0, top, size=(B, 1, M))
    positions[1, 0, 3] = top  # the longest position sits in the middle of a row
    key = "position_ids (B, M)" if kind == "position_ids (B, M)" else "position_ids"
    return M, {key: positions}, positions


def call_kwargs(kwargs: dict, dtype_of_index=flow.int64) -> dict:
    out = {}
    for key, value in kwargs.items():
        if key == "seqlen_offsets":
            out[key] = value if isinstance(value, int) else flow.tensor(value, dtype=dtype_of_index)
        elif key == "position_ids (B, M)":
            out["position_ids"] = flow.tensor(value[:, 0, :], dtype=dtype_of_index)
        else:
            out[key] = flow.tensor(value, dtype=dtype_of_index)
    return out


@pytest.mark.parametrize("regime", ["short", "long"])
@pytest.mark.parametrize("kind", ["none", "int offset", "tensor offsets", "position_ids", "position_ids (B, M)"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_rope_type_matches_the_reference(name, kind, regime):
    rope = make_rope(name)
    M, kwargs, positions = positions_case(kind, regime)
    q = random_array((B, M, HQ, K), 1)
    k = random_array((B, M, HK, K), 2)
    index_dtype = flow.int32 if kind == "position_ids" else flow.int64
    q_rot, k_rot = rope(as_flow(q, "float64"), as_flow(k, "float64"), **call_kwargs(kwargs, index_dtype))
    inv_freq, attention = expected_parameters(name, int(positions.max()) + 1)
    for x, got, label in ((q, q_rot, "q"), (k, k_rot, "k")):
        expected = rope_reference(x, "BMHK", position_ids=positions, inv_freq=inv_freq,
                                  attention_scaling=attention, rotary_size=DIM)
        np.testing.assert_array_equal(to_numpy64(got)[..., DIM:], x[..., DIM:])  # partial rotation
        check(got, expected, "float64", int(positions.max()), f"{name} {kind} {regime} {label}")


@pytest.mark.parametrize("name", ["dynamic", "longrope"])
def test_inv_freq_for_a_tensor_position_equals_the_int_one(name):
    rope = make_rope(name)
    max_pos = CONFIGS[name][0]
    threshold = max_pos if name == "dynamic" else 32
    for longest in [0, 5, threshold - 2, threshold - 1, threshold, threshold + 1, 3 * threshold, 10 ** 6]:
        from_int = rope.inv_freq_for(longest).numpy()
        from_tensor = rope.inv_freq_for(flow.tensor(longest, dtype=flow.int64)).numpy()
        expected, _ = expected_parameters(name, longest + 1)
        np.testing.assert_allclose(from_int, expected, rtol=2e-7, atol=0, err_msg=f"longest {longest}")
        np.testing.assert_allclose(from_tensor, expected, rtol=2e-7, atol=0, err_msg=f"longest {longest}")
        if longest + 1 <= threshold:  # below the threshold: exactly the initial buffer
            np.testing.assert_array_equal(from_tensor, rope.inv_freq.numpy())


def test_dynamic_grows_with_the_longest_position_of_each_call():
    rope = make_rope("dynamic")
    q = flow.randn(1, 4, 2, DIM, dtype=flow.float64)
    results = []
    for offset in (0, 100, 0, 500, 100):  # every call on its own: no state kept between calls
        q_rot, _ = rope(q, q, seqlen_offsets=offset)
        inv_freq, _ = expected_parameters("dynamic", offset + 4)
        expected = rope_reference(q.numpy(), position_ids=np.arange(4).reshape(1, 1, 4) + offset,
                                  inv_freq=inv_freq)
        check(q_rot, expected, "float64", offset + 3, f"offset {offset}")
        results.append(q_rot.numpy())
    np.testing.assert_array_equal(results[0], results[2])
    np.testing.assert_array_equal(results[1], results[4])


# ---- layouts, modes, dtypes ------------------------------------------------------------------------

@pytest.mark.parametrize("layout,output_layout", [
    ("BMHK", None), ("BMHK", "BHMK"), ("BHMK", None), ("BHMK", "MB(HK)"), ("MBHK", None), ("MBHK", "BMHK"),
    ("BM(HK)", None), ("BM(HK)", "BHMK"), ("MB(HK)", None), ("MB(HK)", "MBHK"),
])
@pytest.mark.parametrize("mode", ["plane", "interval"])
def test_layouts_and_modes(layout, output_layout, mode):
    rope = make_rope("llama3", mode)
    M = 40
    q = random_array((B, M, HQ, K), 3)
    k = random_array((B, M, HK, K), 4)
    offsets = np.array([7, 190])
    fused = "(" in layout

    def to_layout(x):
        y = np.ascontiguousarray(np.transpose(x, ["BMHK".index(c) for c in layout.replace("(HK)", "HK")]))
        return y.reshape(*y.shape[:2], -1) if fused else y

    extra = {"k_size": K} if fused else {}
    q_rot, k_rot = rope(as_flow(to_layout(q), "float64"), as_flow(to_layout(k), "float64"),
                        seqlen_offsets=flow.tensor(offsets), layout=layout, output_layout=output_layout, **extra)
    inv_freq, attention = expected_parameters("llama3", None)
    for x, got in ((q, q_rot), (k, k_rot)):
        expected = rope_reference(to_layout(x), layout, k_size=K, mode=mode, rotary_size=DIM, inv_freq=inv_freq,
                                  attention_scaling=attention, seqlen_offsets=offsets, output_layout=output_layout)
        check(got, expected, "float64", int(offsets.max()) + M, f"{layout}->{output_layout} {mode}")


@pytest.mark.parametrize("name", ["llama3", "dynamic", "longrope"])
def test_varlen_packed_sequences(name):
    """Packed sequences ((BM)HK q and k, a (BM)(H3K) qkv) with cu_seqlens rotate as each sequence
    alone; "dynamic" and "longrope" follow the longest sequence of the call."""
    rope = make_rope(name)
    lengths = [5, 0, 70, 1]  # the longest past max_position_embeddings (64) of "dynamic"
    cu = np.concatenate([[0], np.cumsum(lengths)])
    T = int(cu[-1])
    q, k = random_array((T, HQ, K), 5), random_array((T, HK, K), 6)
    q_rot, k_rot = rope(as_flow(q, "float64"), as_flow(k, "float64"), layout="(BM)HK",
                        cu_seqlens=flow.tensor(cu, dtype=flow.int32))
    inv_freq, attention = expected_parameters(name, max(lengths))
    for x, got in ((q, q_rot), (k, k_rot)):
        expected = rope_reference(x, "(BM)HK", cu_seqlens=cu, rotary_size=DIM, inv_freq=inv_freq,
                                  attention_scaling=attention)
        check(got, expected, "float64", max(lengths), name)
    qkv = random_array((T, HQ * 3 * K), 7)
    pq, pk = rope(as_flow(qkv, "float64"), None, layout="(BM)(H3K)", k_size=K,
                  position_ids=flow.tensor(np.concatenate([np.arange(n) for n in lengths])))
    for index, got in ((0, pq), (1, pk)):
        expected = rope_reference(qkv, "(BM)(H3K)", k_size=K, tensor_index=index, cu_seqlens=cu, rotary_size=DIM,
                                  inv_freq=inv_freq, attention_scaling=attention)
        check(got, expected, "float64", max(lengths), f"{name} packed")


@pytest.mark.parametrize("layout", ["BM(H3K)", "MB(H3K)"])
@pytest.mark.parametrize("output_layout", [None, "BHMK"])
def test_packed_qkv_rotates_query_and_key_slots(layout, output_layout):
    rope = make_rope("yarn")
    M, H = 9, 3
    qkv = random_array((B, M, H * 3 * K) if layout.startswith("BM") else (M, B, H * 3 * K), 5)
    position_ids = np.random.default_rng(0).integers(0, 100, size=(B, 1, M))
    q_rot, k_rot = rope(as_flow(qkv, "float64"), None, flow.tensor(position_ids), layout=layout, k_size=K,
                        output_layout=output_layout)
    inv_freq, attention = expected_parameters("yarn", None)
    for index, got in ((0, q_rot), (1, k_rot)):
        expected = rope_reference(qkv, layout, k_size=K, tensor_index=index, position_ids=position_ids,
                                  rotary_size=DIM, inv_freq=inv_freq, attention_scaling=attention,
                                  output_layout=output_layout)
        check(got, expected, "float64", 100, f"slot {index}")


def test_fused_layout_without_k_size_takes_dim_as_head_size():
    rope = make_rope("linear")
    q = random_array((B, 5, HQ * DIM), 6)
    q_rot, _ = rope(as_flow(q, "float64"), as_flow(q, "float64"), layout="BM(HK)")
    inv_freq, _ = expected_parameters("linear", None)
    check(q_rot, rope_reference(q, "BM(HK)", k_size=DIM, inv_freq=inv_freq), "float64", 4)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("name", ["yarn", "longrope"])
def test_dtypes(dtype, name):
    rope = make_rope(name)
    q = random_array((B, 50, HQ, K), 7, dtype)
    k = random_array((B, 50, HK, K), 8, dtype)
    q_rot, k_rot = rope(as_flow(q, dtype), as_flow(k, dtype))
    inv_freq, attention = expected_parameters(name, 50)
    for x, got in ((q, q_rot), (k, k_rot)):
        expected = rope_reference(x, inv_freq=inv_freq, attention_scaling=attention, rotary_size=DIM)
        check(got, expected, dtype, 49, f"{name} {dtype}")


def test_full_rotation_and_head_size_equal_to_dim():
    rope = oneflow_rope.RotaryEmbedding(K, 128, BASE)
    q = random_array((B, 7, HQ, K), 9)
    q_rot, _ = rope(as_flow(q, "float64"), as_flow(q, "float64"))
    inv_freq = np.array(expected_default(K, BASE)).astype(np.float32)  # float32, as transformers keeps it
    check(q_rot, rope_reference(q, inv_freq=inv_freq), "float64", 6)


# ---- nn.Graph -------------------------------------------------------------------------------------

class RopeGraph(flow.nn.Graph):
    def __init__(self, rope: oneflow_rope.RotaryEmbedding, **fixed) -> None:
        super().__init__()
        self.rope = rope
        self.fixed = fixed

    def build(self, q, k, positions):
        key = "position_ids" if positions.ndim > 1 else "seqlen_offsets"
        return self.rope(q, k, **{key: positions}, **self.fixed)


def test_graph_dynamic_follows_seqlen_offsets_from_the_data():
    rope = make_rope("dynamic")
    graph = keep_alive(RopeGraph(rope, output_layout="BHMK"))
    q = random_array((B, 1, HQ, K), 10)
    k = random_array((B, 1, HK, K), 11)
    for offsets in ([3, 7], [3, 400], [60, 2], [1000, 63]):  # one graph; longest below and above 64
        offsets = np.array(offsets)
        q_rot, k_rot = graph(as_flow(q, "float64"), as_flow(k, "float64"), flow.tensor(offsets))
        eager_q, eager_k = rope(as_flow(q, "float64"), as_flow(k, "float64"), seqlen_offsets=flow.tensor(offsets),
                                output_layout="BHMK")
        inv_freq, _ = expected_parameters("dynamic", int(offsets.max()) + 1)
        for x, got, eager in ((q, q_rot, eager_q), (k, k_rot, eager_k)):
            expected = rope_reference(x, seqlen_offsets=offsets, inv_freq=inv_freq, rotary_size=DIM,
                                      output_layout="BHMK")
            check(got, expected, "float64", int(offsets.max()), f"graph offsets {offsets}")
            np.testing.assert_allclose(got.numpy(), eager.numpy(), rtol=0, atol=1e-14)


def test_graph_longrope_follows_position_ids_from_the_data():
    rope = make_rope("longrope")
    graph = keep_alive(RopeGraph(rope))
    q = random_array((B, 8, HQ, K), 12, "float32")
    k = random_array((B, 8, HK, K), 13, "float32")
    for top in (31, 32, 200):  # longest + 1 = 32 keeps the short factors, 33 takes the long ones
        positions = np.tile(np.arange(8), (B, 1)) + (top - 7)
        q_rot, k_rot = graph(as_flow(q, "float32"), as_flow(k, "float32"), flow.tensor(positions))
        inv_freq, attention = expected_parameters("longrope", top + 1)
        for x, got in ((q, q_rot), (k, k_rot)):
            expected = rope_reference(x, position_ids=positions[:, None, :], inv_freq=inv_freq,
                                      attention_scaling=attention, rotary_size=DIM)
            check(got, expected, "float32", top, f"graph longrope top {top}")


# ---- gradient, buffers ----------------------------------------------------------------------------

def test_gradient_is_the_inverse_rotation():
    rope = make_rope("linear")  # attention factor 1: the rotation is orthogonal
    q = flow.tensor(random_array((B, 5, HQ, K), 14), requires_grad=True)
    k = flow.tensor(random_array((B, 5, HK, K), 15), requires_grad=True)
    grad_q = flow.tensor(random_array((B, 5, HQ, K), 16))
    q_rot, k_rot = rope(q, k, seqlen_offsets=3)
    ((q_rot * grad_q).sum() + k_rot.sum()).backward()
    # rotating dL/dq forward again gives dL/dq_rot back
    again, _ = rope(q.grad, q.grad, seqlen_offsets=3)
    np.testing.assert_allclose(again.numpy(), grad_q.numpy(), rtol=0, atol=1e-12)
    assert k.grad is not None and tuple(k.grad.shape) == (B, 5, HK, K)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_buffers_are_not_saved_and_follow_the_device(name):
    rope = make_rope(name)
    assert len(rope.state_dict()) == 0  # persistent=False, as transformers
    assert rope.inv_freq.dtype == flow.float32 and tuple(rope.inv_freq.shape) == (DIM // 2,)
    assert rope.inv_freq.device == flow.device("cpu")
    on_cpu = oneflow_rope.RotaryEmbedding(DIM, 64, device="cpu")
    assert on_cpu.to("cpu").inv_freq.device == flow.device("cpu")
    assert f"rope_type='{name}'" in repr(rope)
    assert rope.attention_scaling == pytest.approx(expected_parameters(name, None)[1], rel=1e-14)


def test_the_config_dict_is_copied():
    config = {"rope_type": "linear", "factor": 2.0}
    rope = oneflow_rope.RotaryEmbedding(DIM, 64, rope_scaling=config)
    config["factor"] = 8.0
    assert rope.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    np.testing.assert_allclose(rope.inv_freq.numpy()[0], 0.5)


# ---- errors ---------------------------------------------------------------------------------------

def q_k(head_size: int = K, dtype=flow.float32):
    return flow.zeros(B, 3, HQ, head_size, dtype=dtype), flow.zeros(B, 3, HK, head_size, dtype=dtype)


@pytest.mark.parametrize("make,call,error,match", [
    (lambda: oneflow_rope.RotaryEmbedding(0), None, ValueError, r"dim: got 0"),
    (lambda: oneflow_rope.RotaryEmbedding(True), None, ValueError, r"dim: got True"),
    (lambda: oneflow_rope.RotaryEmbedding(16, mode="half"), None, ValueError, r"mode: got 'half'"),
    (lambda: oneflow_rope.RotaryEmbedding(16, 2048, 0.0), None, ValueError, r"base: got 0.0"),
    (lambda: make_rope("llama3", dim=32), lambda r: r(*q_k(24)), ValueError,
     r"dim: RotaryEmbedding\(dim=32\) rotates 32 dims of each head, but q has head size 24"),
    (lambda: make_rope("default"), lambda r: r(flow.zeros(B, 3, HQ, K), flow.zeros(B, 3, HK, 8)), ValueError,
     r"but k has head size 8"),
    (lambda: make_rope("default"), lambda r: r(*q_k(), position_ids=flow.zeros(B, 2, 3, dtype=flow.int64)),
     ValueError, r"position_ids: got shape \(2, 2, 3\), expected \(B, M\) or \(B, 1, M\)"),
    (lambda: make_rope("default"), lambda r: r(*q_k(), position_ids=flow.zeros(B, 3)), TypeError,
     r"position_ids: dtype oneflow.float32 is not supported"),
    (lambda: make_rope("default"), lambda r: r(*q_k(), position_ids=[[0, 1, 2]]), TypeError,
     r"position_ids: expected a oneflow.Tensor, got list"),
    (lambda: make_rope("dynamic"),
     lambda r: r(*q_k(), position_ids=flow.zeros(B, 3, dtype=flow.int64), seqlen_offsets=2), ValueError,
     r"seqlen_offsets: got both seqlen_offsets and position_ids"),
    (lambda: make_rope("dynamic"), lambda r: r(*q_k(), seqlen_offsets=2.0), TypeError,
     r"seqlen_offsets: got 2.0, expected an int"),
    (lambda: make_rope("dynamic"), lambda r: r(*q_k(), seqlen_offsets=flow.zeros(B, 1, dtype=flow.int64)),
     TypeError, r"seqlen_offsets: got a oneflow.int64 tensor of shape \(2, 1\)"),
    (lambda: make_rope("default"), lambda r: r(q_k()[0], None), ValueError, r"k: got None with layout BMHK"),
    (lambda: make_rope("default"), lambda r: r(flow.zeros(B, 3, 3 * 3 * K), flow.zeros(B, 3, 3 * K),
                                               layout="BM(H3K)", k_size=K),
     ValueError, r"k: got a tensor with the packed layout BM\(H3K\)"),
    (lambda: make_rope("default"), lambda r: r(*q_k(), layout="BMKH"), ValueError, r"layout: got 'BMKH'"),
    (lambda: make_rope("default"), lambda r: r(*q_k(), k_size=8), ValueError, r"k_size: got 8 but q"),
    (lambda: make_rope("default"), lambda r: r(flow.zeros(B, 3, HQ * K), flow.zeros(B, 3, HK * K),
                                               layout="BM(HK)", k_size=0),
     ValueError, r"k_size: got 0"),
    (lambda: make_rope("default"), lambda r: r(np.zeros((B, 3, HQ, K)), q_k()[1]), TypeError,
     r"q: expected a oneflow.Tensor, got ndarray"),
    (lambda: make_rope("default"), lambda r: r(*q_k(), output_layout="BM(H3K)"), ValueError, r"output_layout"),
])
def test_errors_name_the_argument_and_value(make, call, error, match):
    with pytest.raises(error, match=match):
        rope = make()
        call(rope)
