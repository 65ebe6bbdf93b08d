"""Differential test of the shape rules: Python's ``oneflow_rope.infer_shapes`` against the op's
C++ inference (``_C.infer_shapes``, the rope::InferShapes the op's InferRope calls) over thousands
of random calls, valid and invalid. Both must agree on everything: the resolved sizes and output
shape, or the exact error message (which starts with the argument it names).

The calls are built from sizes in a layout and then bent: unknown or oddly spelled layout names,
packed output layouts, bad modes, tensor_index outside the slots, zero, negative, odd or too
large k_size / rotary_size, tables and position_ids of the wrong rank, width or size, negative
sizes, 1-D and 2-D RoPE; and the LLM inputs: a k of q+k calls (other head counts, wrong B / M / K,
packed layouts), packed q+k, int and tensor seqlen_offsets (with position_ids, outside the table,
wrong shape) and inv_freq (with tables, wrong shape); the varlen layouts ((BM)HK, ...: T tokens of
packed sequences) with cu_seqlens (wrong rank or size, with position_ids, with a batched layout,
missing), position_ids (R, T), varlen and batched output layouts mixed.
"""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from typing import Dict, Tuple

import numpy as np
import oneflow as flow
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import oneflow_rope
from oneflow_rope import _C
from oneflow_rope.op_table import ATTRIBUTES, INPUT_LAYOUTS, LAYOUTS, OUTPUT_LAYOUTS
from oneflow_rope.layout import layout_shape

ARGUMENTS = ("layout", "output_layout", "mode", "x", "tensor_index", "position_ids", "cos", "k_size",
             "rotary_size", "k", "seqlen_offsets", "inv_freq", "cu_seqlens")
FIELDS = ("batch", "seq_len", "num_heads", "head_size", "rotary_size", "rotary_dim", "tensor_index", "layout",
          "output_layout", "out_shape", "k_num_heads", "k_out_shape")


def test_both_languages_read_the_same_table():
    """The C++ table (generated from op_table.json at build time) holds what Python derives from it."""
    assert [entry["name"] for entry in _C.layouts()] == list(INPUT_LAYOUTS)
    for entry in _C.layouts():
        assert entry == dataclasses.asdict(LAYOUTS[entry["name"]]), entry["name"]
    assert _C.ATTRIBUTE_NAMES == tuple(a.name for a in ATTRIBUTES)


def spelled(rng: random.Random, name: str) -> str:
    """The name, or another spelling of it (case, spaces), or a name that is no layout."""
    roll = rng.random()
    if roll < 0.7:
        return name
    if roll < 0.8:
        return name.lower()
    if roll < 0.87:
        return " ".join(name)
    return rng.choice(["BXHK", "HKMB", "BM(H4K)", "", "BM(HK", "BMH K2", "(MB)HK", "bm(h3k) ", "(BM)(H4K)", "(B)MHK",
                       "(bm) hk"])


def bent(rng: random.Random, shape: Tuple[int, ...], p: float) -> Tuple[int, ...]:
    """The shape, or with probability p one size changed, an axis added or an axis removed."""
    if rng.random() >= p:
        return shape
    shape = list(shape)
    roll = rng.random()
    if roll < 0.6 and shape:
        shape[rng.randrange(len(shape))] += rng.choice([-9, -1, 1, 2, 5])
    elif roll < 0.8:
        shape.insert(rng.randrange(len(shape) + 1), rng.randint(0, 3))
    elif shape:
        del shape[rng.randrange(len(shape))]
    return tuple(shape)


def random_call(rng: random.Random) -> Dict[str, object]:
    """Keyword arguments of infer_shapes for one random call, valid or not."""
    layout = rng.choice(INPUT_LAYOUTS)
    info = LAYOUTS[layout]
    B, M, H = rng.randint(0, 3), rng.randint(0, 7), rng.randint(0, 4)
    T = B * M  # a varlen layout holds the B * M tokens
    R = rng.choice([1, 1, 2])
    part = 2 * rng.randint(0, 4) + (1 if rng.random() < 0.1 else 0)
    rotary = part * R
    K = rotary + rng.choice([0, 0, 0, 1, 2, 3])
    call: Dict[str, object] = {"x_shape": bent(rng, layout_shape(layout, B, M, H, K), 0.15),
                               "layout": spelled(rng, layout)}
    if rng.random() < 0.3:
        same_kind = [name for name in OUTPUT_LAYOUTS if LAYOUTS[name].varlen == info.varlen]
        roll = rng.random()
        call["output_layout"] = spelled(rng, rng.choice(INPUT_LAYOUTS if roll < 0.15 else
                                                        OUTPUT_LAYOUTS if roll < 0.3 else same_kind))
    if rng.random() < 0.1:
        call["mode"] = rng.choice(["rotate", "PLANE", "", "interval "])
    else:
        call["mode"] = rng.choice(["plane", "interval"])
    if rng.random() < 0.4:
        call["tensor_index"] = rng.choice(info.tensor_indices) if rng.random() < 0.6 else rng.randint(-1, 3)
    table = rng.random() < 0.5
    if info.fused and (not table or rng.random() < 0.3) or rng.random() < 0.1:
        call["k_size"] = K if rng.random() < 0.8 else rng.choice([0, -2, K + 1, 2 * K + 2, 15])
    if K != rotary or rng.random() < 0.1:
        call["rotary_size"] = rotary if rng.random() < 0.8 else rng.choice([0, -4, K + 2, rotary + 1, 6])
    if table:
        call["table_shape"] = bent(rng, (M + rng.randint(-1, 3), part), 0.15)
    if info.varlen:
        # positions: cu_seqlens (S+1,) mostly, else position_ids (R, T); sometimes both or none
        roll = rng.random()
        if R == 2 or roll < 0.3:
            shape = (R, T) if rng.random() < 0.9 else rng.choice([(B, R, M), (3, T), (R,)])
            call["position_ids_shape"] = bent(rng, shape, 0.1)
        if (R == 1 and roll >= 0.3 and roll < 0.95) or rng.random() < 0.05:
            call["cu_seqlens_shape"] = bent(rng, (rng.randint(1, 5),), 0.15) if rng.random() < 0.95 else (0,)
    else:
        if R == 2 or rng.random() < 0.5:
            call["position_ids_shape"] = bent(rng, (B, R, M) if rng.random() < 0.95 else (B, 3, M), 0.1)
        if rng.random() < 0.03:
            call["cu_seqlens_shape"] = (rng.randint(1, 5),)
    # the LLM inputs: q+k, seqlen_offsets, inv_freq
    roll = rng.random()
    if roll < 0.2 and (info.slots == 1 or rng.random() < 0.1):
        call["k_shape"] = bent(rng, layout_shape(layout, B, M, rng.randint(0, 4), K), 0.15)
    elif roll < 0.3 and (info.slots == 3 or rng.random() < 0.1):
        call["packed_qk"] = True
        if rng.random() < 0.05:
            call["k_shape"] = layout_shape(layout, B, M, H, K)
    roll = rng.random() if "position_ids_shape" not in call or rng.random() < 0.1 else 1.0
    if info.varlen and rng.random() < 0.8:  # seqlen_offsets are refused with varlen layouts
        roll = 1.0
    if roll < 0.15:
        call["seqlen_offset"] = rng.choice([0, 1, 3, -2, M, 1 << 40])
    elif roll < 0.3:
        call["seqlen_offsets_shape"] = bent(rng, (B,), 0.15)
    elif roll < 0.32:
        call["seqlen_offset"], call["seqlen_offsets_shape"] = 2, (B,)
    if rng.random() < 0.15:
        call["inv_freq_shape"] = bent(rng, (part // 2,), 0.2)
    return call


def python_outcome(call: Dict[str, object]):
    try:
        shapes = oneflow_rope.infer_shapes(**call)
    except ValueError as e:
        return "error", str(e)
    return "ok", tuple(getattr(shapes, f) for f in FIELDS)


def cpp_outcome(call: Dict[str, object]):
    args = dict(call)
    for name in ("x_shape", "table_shape", "position_ids_shape", "k_shape", "seqlen_offsets_shape", "inv_freq_shape",
                 "cu_seqlens_shape"):
        if name in args:
            args[name] = list(args[name])
    try:
        resolved = _C.infer_shapes(**args)
    except ValueError as e:
        return "error", str(e)
    return "ok", tuple(resolved[f] for f in FIELDS)


def resolved_call(call: Dict[str, object], shapes: Tuple) -> Dict[str, object]:
    """The call as the Python layer hands it to the op: every default resolved into attributes."""
    values = dict(zip(FIELDS, shapes))
    resolved = dict(call, layout=values["layout"], output_layout=values["output_layout"],
                    tensor_index=values["tensor_index"], k_size=values["head_size"],
                    rotary_size=values["rotary_size"])
    if resolved.get("seqlen_offset") == 0:  # the attribute's default: "not given"
        del resolved["seqlen_offset"]
    return resolved


def check_same_outcome(call: Dict[str, object]):
    py, cpp = python_outcome(call), cpp_outcome(call)
    assert py == cpp, f"{call}:\n  python: {py}\n  c++:    {cpp}"
    kind, detail = py
    if kind == "error":
        argument = detail.split(":")[0].split(",")[0]
        assert argument in ARGUMENTS, f"{call}: message names no argument: {detail!r}"
    else:
        # the op receives the resolved attributes: its inference must give the same result
        assert cpp_outcome(resolved_call(call, detail)) == cpp, call
    return py


SETTINGS = dict(derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@settings(max_examples=3000, **SETTINGS)
@given(st.randoms(use_true_random=False))
def test_python_and_op_inference_agree(rng):
    check_same_outcome(random_call(rng))


def test_random_calls_cover_every_rule():
    """6000 more calls from a fixed seed, with a census: both outcomes are common and every
    argument appears in some error."""
    rng = random.Random(20261128)
    census: Counter = Counter()
    for _ in range(6000):
        kind, detail = check_same_outcome(random_call(rng))
        census[kind if kind == "ok" else detail.split(":")[0].split(",")[0]] += 1
    assert census["ok"] >= 1000, census
    missing = [a for a in ARGUMENTS if census[a] == 0]
    assert not missing, f"no error named {missing}: {census}"


def small_valid_calls(count: int):
    rng = random.Random(7)
    while count:
        call = random_call(rng)
        kind, shapes = python_outcome(call)
        if kind == "ok" and 0 < int(np.prod(call["x_shape"])) <= 2048:
            count -= 1
            yield call, shapes


def test_op_output_shape_matches_inference():
    """The op itself, dispatched on real tensors for 200 small valid calls, gives the inferred shapes
    (q+k calls through fused_apply_rotary_emb_qk)."""
    for call, shapes in small_valid_calls(200):
        values = dict(zip(FIELDS, shapes))
        x = flow.zeros(*call["x_shape"])
        cos = sin = positions = None
        if "table_shape" in call:
            cos = sin = flow.zeros(*call["table_shape"])
        if "position_ids_shape" in call:
            positions = flow.zeros(*call["position_ids_shape"], dtype=flow.int64)
        kwargs = {k: call[k] for k in ("layout", "output_layout", "mode", "k_size", "rotary_size") if k in call}
        if "seqlen_offset" in call:
            kwargs["seqlen_offsets"] = call["seqlen_offset"]
        if "seqlen_offsets_shape" in call:
            kwargs["seqlen_offsets"] = flow.zeros(*call["seqlen_offsets_shape"], dtype=flow.int32)
        if "inv_freq_shape" in call:
            kwargs["inv_freq"] = flow.ones(*call["inv_freq_shape"])
        if "cu_seqlens_shape" in call:  # S+1 offsets from 0 to T
            tokens = call["x_shape"][0]
            kwargs["cu_seqlens"] = flow.tensor(np.linspace(0, tokens, call["cu_seqlens_shape"][0]).astype(np.int64))
        if "k_shape" in call or call.get("packed_qk"):
            k = flow.zeros(*call["k_shape"]) if "k_shape" in call else None
            out, k_out = oneflow_rope.fused_apply_rotary_emb_qk(x, k, cos, sin, positions, **kwargs)
            assert tuple(k_out.shape) == values["k_out_shape"], call
        else:
            if "tensor_index" in call:
                kwargs["tensor_index"] = call["tensor_index"]
            out = oneflow_rope.fused_apply_rotary_emb(x, cos, sin, positions, **kwargs)
        assert tuple(out.shape) == values["out_shape"], call
