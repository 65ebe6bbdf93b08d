"""Small helpers turning the shared case table's numpy arrays into OneFlow calls."""

from __future__ import annotations

from typing import Dict, Optional

import numpy as np
import oneflow as flow
import pytest

import oneflow_rope


def to_flow(a: Optional[np.ndarray], dtype: Optional[str] = None, requires_grad: bool = False):
    """A OneFlow tensor with a's values (exact: the case table rounds them to `dtype` already)."""
    if a is None:
        return None
    t = flow.tensor(a)
    if dtype is not None:
        t = t.to(getattr(flow, dtype))
    if requires_grad:
        t.requires_grad_(True)
    return t


def to_numpy64(t: flow.Tensor) -> np.ndarray:
    return t.to(flow.float64).numpy() if t.dtype != flow.float64 else t.numpy()


def call_op(arrays: Dict[str, Optional[np.ndarray]], kwargs: dict, dtype: str, x=None) -> flow.Tensor:
    x = to_flow(arrays["x"], dtype) if x is None else x
    return oneflow_rope.fused_apply_rotary_emb(
        x, to_flow(arrays["cos"], dtype), to_flow(arrays["sin"], dtype),
        to_flow(arrays["position_ids"]), **kwargs)


def assert_rejects(call, exc, words) -> None:
    """call() raises exc whose message starts with the argument words[0] names ("words[0]:" or
    "words[0],") and contains every one of words."""
    with pytest.raises(exc) as info:
        call()
    message = str(info.value)
    assert message.startswith((words[0] + ":", words[0] + ",")), f"{message!r} does not start with {words[0]!r}"
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"


# OneFlow 0.9.0 can crash (SIGSEGV in vm::LazyJobStreamPolicy::DequeueNNGraph, on an actor
# thread) when an nn.Graph is destroyed right after it ran: its __del__ races the job's completion
# callback. Seen in about 1 run of 5 of the test suite before this; the core dump showed only
# OneFlow frames. Tests keep their graphs alive; at interpreter shutdown Graph.__del__ returns early.
_LIVE_GRAPHS: list = []


def keep_alive(graph: flow.nn.Graph) -> flow.nn.Graph:
    """Returns `graph`, kept referenced until the end of the process (see above)."""
    _LIVE_GRAPHS.append(graph)
    return graph
