"""Gradients: against the reference's backward, against central finite differences in float64,
in eager mode and in an nn.Graph training step; packed inputs; no gradient to cos/sin/positions."""

from __future__ import annotations

import numpy as np
import oneflow as flow
import pytest

import oneflow_rope
from tests.cases import (INPUT_LAYOUTS, Case, forward_cases, make_inputs, max_position, output_layout_cases,
                         round_to_dtype)
from tests.flow_helpers import keep_alive, to_flow, to_numpy64
from tests.reference import rope_reference, rope_reference_backward, tolerance

CASES = forward_cases()
# Trained inside one nn.Graph: every 10th float32/float64 case of the table (each layout, mode,
# rotary dim and variant appears) plus every 9th output-layout case.
GRAPH_CASES = [c for c in CASES if c.dtype in ("float32", "float64")][::10] + output_layout_cases()[::9]


def upstream_gradient(case: Case, shape) -> np.ndarray:
    return round_to_dtype(np.random.default_rng(case.seed() + 1).uniform(-1, 1, shape), case.dtype)


def expected_grad(case: Case, arrays, kwargs, dy) -> np.ndarray:
    return rope_reference_backward(dy, cos=arrays["cos"], sin=arrays["sin"], position_ids=arrays["position_ids"],
                                   x_shape=arrays["x"].shape, **kwargs)


def call(x, arrays, kwargs, dtype, cos_requires_grad=False):
    cos = to_flow(arrays["cos"], dtype, requires_grad=cos_requires_grad)
    sin = to_flow(arrays["sin"], dtype, requires_grad=cos_requires_grad)
    return oneflow_rope.fused_apply_rotary_emb(x, cos, sin, to_flow(arrays["position_ids"]), **kwargs), cos, sin


@pytest.mark.parametrize("case", CASES + output_layout_cases(), ids=lambda c: c.id)
def test_backward_eager(case: Case):
    arrays, kwargs = make_inputs(case)
    x = to_flow(arrays["x"], case.dtype, requires_grad=True)
    out, cos, sin = call(x, arrays, kwargs, case.dtype, cos_requires_grad=arrays["cos"] is not None)
    dy = upstream_gradient(case, tuple(out.shape))
    out.backward(to_flow(dy, case.dtype))  # dy reaches the op's backward as is, in any dtype
    assert tuple(x.grad.shape) == arrays["x"].shape
    expected = expected_grad(case, arrays, kwargs, dy)
    tol = tolerance(case.dtype, max_position(arrays, 5))
    err = np.max(np.abs(to_numpy64(x.grad) - expected))
    assert err <= tol, f"{case.id}: gradient error {err} > {tol}"
    if cos is not None:  # the tables take no gradient
        assert cos.grad is None and sin.grad is None


@pytest.mark.parametrize("layout", INPUT_LAYOUTS)  # the batched layouts; varlen: tests/test_varlen.py
@pytest.mark.parametrize("mode", ["plane", "interval"])
@pytest.mark.parametrize("rotary_dim", [1, 2])
def test_backward_matches_finite_differences(layout, mode, rotary_dim):
    case = Case(layout, mode, rotary_dim, partial=rotary_dim == 2, table=mode == "interval",
                positions="int64", dtype="float64")
    arrays, kwargs = make_inputs(case)
    x = to_flow(arrays["x"], "float64", requires_grad=True)
    out, _, _ = call(x, arrays, kwargs, "float64")
    rng = np.random.default_rng(case.seed() + 2)
    weight = rng.uniform(-1, 1, tuple(out.shape))
    (out * to_flow(weight)).sum().backward()
    grad = x.grad.numpy()

    def loss(values: np.ndarray) -> float:
        y = rope_reference(values, cos=arrays["cos"], sin=arrays["sin"], position_ids=arrays["position_ids"],
                           **kwargs)
        return float(np.sum(y * weight))

    eps = 1e-6
    for _ in range(4):  # directional derivatives along random directions
        v = rng.standard_normal(arrays["x"].shape)
        numeric = (loss(arrays["x"] + eps * v) - loss(arrays["x"] - eps * v)) / (2 * eps)
        assert abs(float(np.sum(grad * v)) - numeric) <= 1e-6 * max(1.0, abs(numeric))
    # and element by element on a few coordinates
    flat = arrays["x"].reshape(-1)
    for index in rng.choice(flat.size, size=6, replace=False):
        e = np.zeros_like(flat)
        e[index] = 1.0
        e = e.reshape(arrays["x"].shape)
        numeric = (loss(arrays["x"] + eps * e) - loss(arrays["x"] - eps * e)) / (2 * eps)
        assert abs(grad.reshape(-1)[index] - numeric) <= 1e-7


def test_backward_in_graph_training_step():
    """One SGD step (lr = 1) of an nn.Graph with add_optimizer moves each parameter by -grad. All
    GRAPH_CASES train together in one graph (see flow_helpers.keep_alive for why one)."""
    prepared = []
    for case in GRAPH_CASES:
        arrays, kwargs = make_inputs(case)
        shape = oneflow_rope.infer_shapes(
            arrays["x"].shape, kwargs["layout"], output_layout=kwargs.get("output_layout"),
            mode=kwargs["mode"], tensor_index=kwargs.get("tensor_index"), k_size=kwargs.get("k_size"),
            rotary_size=kwargs.get("rotary_size"),
            table_shape=None if arrays["cos"] is None else arrays["cos"].shape,
            position_ids_shape=None if arrays["position_ids"] is None else arrays["position_ids"].shape).out_shape
        dy = upstream_gradient(case, shape)
        tensors = {"cos": to_flow(arrays["cos"], case.dtype), "sin": to_flow(arrays["sin"], case.dtype),
                   "position_ids": to_flow(arrays["position_ids"]), "weight": to_flow(dy, case.dtype)}
        prepared.append((case, arrays, kwargs, dy, tensors))

    class Holder(flow.nn.Module):
        # one attribute per parameter: inside nn.Graph, OneFlow 0.9.0 hands out a ParameterList's
        # items as ProxyTensor, which no op (ours or OneFlow's) accepts
        def __init__(self):
            super().__init__()
            for i, (case, arrays, _, _, _) in enumerate(prepared):
                setattr(self, f"x{i}", flow.nn.Parameter(flow.tensor(arrays["x"]).to(getattr(flow, case.dtype))))

        def params(self):
            return [getattr(self, f"x{i}") for i in range(len(prepared))]

    holder = Holder()
    optimizer = flow.optim.SGD(holder.parameters(), lr=1.0)

    class TrainStep(flow.nn.Graph):
        def __init__(self):
            super().__init__()
            self.holder = holder
            self.add_optimizer(optimizer)

        def build(self):
            loss = None
            for x, (_, _, kwargs, _, t) in zip(self.holder.params(), prepared):
                out = oneflow_rope.fused_apply_rotary_emb(x, t["cos"], t["sin"], t["position_ids"], **kwargs)
                term = (out * t["weight"]).sum().to(flow.float64)
                loss = term if loss is None else loss + term
            loss.backward()
            return loss

    before = [to_numpy64(x.detach()) for x in holder.params()]
    keep_alive(TrainStep())()
    failures = []
    for x, b, (case, arrays, kwargs, dy, _) in zip(holder.params(), before, prepared):
        grad = b - to_numpy64(x.detach())
        expected = expected_grad(case, arrays, kwargs, dy)
        tol = 2 * tolerance(case.dtype, max_position(arrays, 5))
        err = np.max(np.abs(grad - expected))
        if not err <= tol:
            failures.append(f"{case.id}: gradient error {err} > {tol}")
    assert not failures, "\n".join(failures)


def test_packed_gradient_has_zeros_in_other_slots():
    B, M, H, K = 2, 3, 2, 8
    x = flow.tensor(np.random.default_rng(0).uniform(-1, 1, (B, M, H * 3 * K)), requires_grad=True)
    out = oneflow_rope.fused_apply_rotary_emb(x, layout="BM(H3K)", k_size=K, tensor_index=1)
    out.sum().backward()
    grad = x.grad.numpy().reshape(B, M, H, 3, K)
    assert np.all(grad[:, :, :, 0] == 0) and np.all(grad[:, :, :, 2] == 0)
    assert np.any(grad[:, :, :, 1] != 0)


def test_position_ids_and_tables_take_no_gradient():
    x = flow.tensor(np.random.default_rng(1).uniform(-1, 1, (1, 4, 2, 8)), requires_grad=True)
    cos, sin = oneflow_rope.cos_sin_table(6, 8, dtype=flow.float64)
    cos.requires_grad_(True)
    sin.requires_grad_(True)
    pos = flow.tensor(np.array([[[0, 2, 4, 5]]]), dtype=flow.int64)
    oneflow_rope.fused_apply_rotary_emb(x, cos, sin, pos).sum().backward()
    assert x.grad is not None
    assert cos.grad is None and sin.grad is None and pos.grad is None


def test_no_grad_mode_records_nothing():
    x = flow.tensor(np.ones((1, 2, 1, 4)), requires_grad=True)
    with flow.no_grad():
        out = oneflow_rope.fused_apply_rotary_emb(x)
    assert not out.requires_grad
