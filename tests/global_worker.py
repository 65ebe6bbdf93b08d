"""One rank of the global-tensor test (tests/test_global.py starts two, as
`python -m tests.global_worker` from the repository root with the rank's environment).

For x split on B and x split on H, in eager mode and in nn.Graph, checks that the op keeps the
split (no boxing back to broadcast) and gives the single-rank reference result; also a backward.
Then the same for the LLM inputs: a tensor of seqlen_offsets (split with B, or broadcast with H
split), and q+k calls (q and k of different head counts split on B or H, a packed q split on B;
in place, split on B or H). Then x split along its sequence axis (M, or the tokens of a varlen
layout), evenly and unevenly: every token keeps its global position (computed angles, tables,
position_ids split with x or given whole, int and tensor seqlen_offsets, inv_freq, cu_seqlens,
q+k), the output keeps the split, and so does the gradient.
Prints one line per check; exits 1 on any failure.
"""

from __future__ import annotations

import sys

import oneflow_rope  # before oneflow

import numpy as np  # noqa: E402
import oneflow as flow  # noqa: E402

from oneflow_rope.layout import layout_shape as any_layout_shape  # noqa: E402  (varlen layouts too)
from tests.cases import layout_shape  # noqa: E402
from tests.flow_helpers import keep_alive  # noqa: E402
from tests.reference import rope_reference, rope_reference_backward  # noqa: E402

B, M, H, K = 4, 6, 4, 16
CHECKS = [
    # layout, split axis of x, kind, expected split axis of the output, extra kwargs
    ("BMHK", 0, "B", 0, {}),
    ("BMHK", 2, "H", 2, {}),
    ("BHMK", 1, "H", 1, {"output_layout": "BHMK"}),
    ("MBHK", 1, "B", 0, {"output_layout": "BMHK"}),
    ("BM(H3K)", 0, "B", 0, {"k_size": K, "tensor_index": 1}),
    ("BM(H3K)", 2, "H", 2, {"k_size": K, "tensor_index": 2}),
    ("BM(HK)", 2, "H", 1, {"k_size": K, "output_layout": "BHMK", "mode": "interval"}),
]


def main() -> int:
    rank = flow.env.get_rank()
    placement = flow.placement("cpu", ranks=[0, 1])
    failures = 0
    rng = np.random.default_rng(0)  # same data on both ranks
    for layout, axis, kind, out_axis, kwargs in CHECKS:
        x_np = rng.uniform(-1, 1, layout_shape(layout, B, M, H, K)).astype(np.float32)
        pos_np = rng.integers(0, 5000, (B, 1, M)).astype(np.int64)
        pos_sbp = flow.sbp.split(0) if kind == "B" else flow.sbp.broadcast
        x = flow.tensor(x_np, placement=placement, sbp=flow.sbp.broadcast).to_global(sbp=flow.sbp.split(axis))
        pos = flow.tensor(pos_np, placement=placement, sbp=flow.sbp.broadcast).to_global(sbp=pos_sbp)
        kw = dict(layout=layout, **kwargs)
        expected = rope_reference(x_np, position_ids=pos_np, **kw)

        class RopeGraph(flow.nn.Graph):
            def build(self, x, pos):
                return oneflow_rope.fused_apply_rotary_emb(x, position_ids=pos, **kw)

        for mode_name, run in (("eager", lambda: oneflow_rope.fused_apply_rotary_emb(x, position_ids=pos, **kw)),
                               ("graph", lambda: keep_alive(RopeGraph())(x, pos))):
            out = run()
            sbp_ok = out.sbp == (flow.sbp.split(out_axis),)
            full = out.to_global(sbp=flow.sbp.broadcast).to_local().numpy()
            err = float(np.max(np.abs(full - expected)))
            ok = sbp_ok and err < 1e-5
            failures += not ok
            if rank == 0:
                print(f"{'ok  ' if ok else 'FAIL'} {layout:8s} x split({axis}) [{kind}] {mode_name}: "
                      f"out sbp {out.sbp}, max err {err:.2e}", flush=True)
        # backward: gradient keeps x's split and matches the reference
        xg = flow.tensor(x_np, placement=placement, sbp=flow.sbp.broadcast).to_global(sbp=flow.sbp.split(axis))
        xg.requires_grad_(True)
        out = oneflow_rope.fused_apply_rotary_emb(xg, position_ids=pos, **kw)
        out.sum().backward()
        grad = xg.grad.to_global(sbp=flow.sbp.broadcast).to_local().numpy()
        exp_grad = rope_reference_backward(np.ones(expected.shape), position_ids=pos_np, x_shape=x_np.shape, **kw)
        err = float(np.max(np.abs(grad - exp_grad)))
        ok = xg.grad.sbp == (flow.sbp.split(axis),) and err < 1e-5
        failures += not ok
        if rank == 0:
            print(f"{'ok  ' if ok else 'FAIL'} {layout:8s} x split({axis}) [{kind}] backward: grad sbp {xg.grad.sbp}, "
                  f"max err {err:.2e}", flush=True)
    failures += llm_checks(rank, placement) + inplace_checks(rank, placement) + sequence_split_checks(rank, placement)
    return 1 if failures else 0


# name, layout, split axis of the inputs, kind, expected split axis of the outputs, q heads, k heads
# (None: one tensor; 0: a packed q, k=None), extra kwargs
LLM_CHECKS = [
    ("offsets", "BMHK", 0, "B", 0, 4, None, {}),
    ("offsets", "BHMK", 1, "H", 2, 4, None, {"output_layout": "BMHK"}),
    ("qk", "BMHK", 0, "B", 0, 4, 2, {"mode": "interval"}),
    ("qk", "BMHK", 2, "H", 2, 4, 2, {}),
    ("qk", "MB(HK)", 2, "H", 2, 4, 2, {"k_size": K}),
    ("qk", "BM(H3K)", 0, "B", 0, 4, 0, {"k_size": K, "output_layout": "BHMK"}),
]


def check_split_outputs(rank: int, label: str, outs, expected, out_axis: int) -> bool:
    """Whether every output keeps split(out_axis) and matches its expected array; rank 0 prints it."""
    sbp_ok = all(o.sbp == (flow.sbp.split(out_axis),) for o in outs)
    err = max(float(np.max(np.abs(o.to_global(sbp=flow.sbp.broadcast).to_local().numpy() - e)))
              for o, e in zip(outs, expected))
    ok = sbp_ok and err < 1e-5
    if rank == 0:
        print(f"{'ok  ' if ok else 'FAIL'} {label}: out sbp {[o.sbp for o in outs]}, max err {err:.2e}", flush=True)
    return ok


def check_split_grads(rank: int, label: str, tensors, exp_grads, axis: int) -> bool:
    """Whether every input's gradient keeps split(axis) and matches its expected array; rank 0
    prints it."""
    err = max(float(np.max(np.abs(t.grad.to_global(sbp=flow.sbp.broadcast).to_local().numpy() - g)))
              for t, g in zip(tensors, exp_grads))
    ok = all(t.grad.sbp == (flow.sbp.split(axis),) for t in tensors) and err < 1e-5
    if rank == 0:
        print(f"{'ok  ' if ok else 'FAIL'} {label} backward: grad sbp {[t.grad.sbp for t in tensors]}, "
              f"max err {err:.2e}", flush=True)
    return ok


def weighted_total(outs):
    """outs[0].sum() + 2 * the sum of the others: one loss whose gradient tells the outputs apart."""
    total = outs[0].sum()
    for o in outs[1:]:
        total = total + 2 * o.sum()
    return total


def llm_checks(rank: int, placement) -> int:
    failures = 0
    rng = np.random.default_rng(1)  # same data on both ranks
    for name, layout, axis, kind, out_axis, heads, k_heads, kwargs in LLM_CHECKS:
        offsets_np = rng.integers(0, 3000, (B,)).astype(np.int32)
        offsets_sbp = flow.sbp.split(0) if kind == "B" else flow.sbp.broadcast
        arrays = [rng.uniform(-1, 1, layout_shape(layout, B, M, heads, K)).astype(np.float32)]
        if k_heads:
            arrays.append(rng.uniform(-1, 1, layout_shape(layout, B, M, k_heads, K)).astype(np.float32))

        def to_global(a, requires_grad=False):
            t = flow.tensor(a, placement=placement, sbp=flow.sbp.broadcast).to_global(sbp=flow.sbp.split(axis))
            return t.requires_grad_(True) if requires_grad else t

        offsets = flow.tensor(offsets_np, placement=placement, sbp=flow.sbp.broadcast).to_global(sbp=offsets_sbp)
        kw = dict(layout=layout, **kwargs)
        if k_heads is None:
            expected = [rope_reference(arrays[0], seqlen_offsets=offsets_np, **kw)]
        elif k_heads == 0:
            expected = [rope_reference(arrays[0], seqlen_offsets=offsets_np, tensor_index=i, **kw) for i in (0, 1)]
        else:
            expected = [rope_reference(a, seqlen_offsets=offsets_np, **kw) for a in arrays]

        def call(tensors, offsets):
            if k_heads is None:
                return (oneflow_rope.fused_apply_rotary_emb(tensors[0], seqlen_offsets=offsets, **kw),)
            k = tensors[1] if k_heads else None
            return oneflow_rope.fused_apply_rotary_emb_qk(tensors[0], k, seqlen_offsets=offsets, **kw)

        class LlmGraph(flow.nn.Graph):
            def build(self, offsets, *tensors):
                return call(tensors, offsets)

        tensors = [to_global(a) for a in arrays]
        for mode_name, run in (("eager", lambda: call(tensors, offsets)),
                               ("graph", lambda: keep_alive(LlmGraph())(offsets, *tensors))):
            failures += not check_split_outputs(rank, f"{name:7s} {layout:8s} split({axis}) [{kind}] {mode_name}",
                                                run(), expected, out_axis)
        # backward: the gradients keep the inputs' split and match the reference
        tensors = [to_global(a, requires_grad=True) for a in arrays]
        outs = call(tensors, offsets)
        weighted_total(outs).backward()
        ref_kw = dict(seqlen_offsets=offsets_np, **kw)
        if k_heads == 0:
            exp_grads = [rope_reference_backward(np.ones(expected[0].shape), tensor_index=0, **ref_kw)
                         + rope_reference_backward(2 * np.ones(expected[1].shape), tensor_index=1, **ref_kw)]
        else:
            exp_grads = [rope_reference_backward(w * np.ones(e.shape), x_shape=a.shape, **ref_kw)
                         for w, e, a in zip((1, 2), expected, arrays)]
        failures += not check_split_grads(rank, f"{name:7s} {layout:8s} split({axis}) [{kind}]", tensors,
                                          exp_grads, axis)
    return failures


def inplace_checks(rank: int, placement) -> int:
    """q and k (split on B or H) rotated in place keep their split and hold the reference result."""
    failures = 0
    rng = np.random.default_rng(2)
    q_np = rng.uniform(-1, 1, (B, M, 4, K)).astype(np.float32)
    k_np = rng.uniform(-1, 1, (B, M, 2, K)).astype(np.float32)
    offsets_np = rng.integers(0, 3000, (B,)).astype(np.int64)
    offsets = flow.tensor(offsets_np, placement=placement, sbp=flow.sbp.broadcast)
    for axis in (0, 2):
        q, k = (flow.tensor(a, placement=placement, sbp=flow.sbp.broadcast).to_global(sbp=flow.sbp.split(axis))
                for a in (q_np, k_np))
        q_rot, k_rot = oneflow_rope.fused_apply_rotary_emb_qk(q, k, seqlen_offsets=offsets, inplace=True)
        err = max(float(np.max(np.abs(t.to_global(sbp=flow.sbp.broadcast).to_local().numpy()
                                      - rope_reference(a, seqlen_offsets=offsets_np))))
                  for t, a in ((q, q_np), (k, k_np)))
        ok = q_rot is q and k_rot is k and q.sbp == k.sbp == (flow.sbp.split(axis),) and err < 1e-5
        failures += not ok
        if rank == 0:
            print(f"{'ok  ' if ok else 'FAIL'} inplace BMHK     split({axis}): sbp {q.sbp}, max err {err:.2e}",
                  flush=True)
    return failures


# x split along its sequence axis. name, layout, (B, M, H) of x (B None: a varlen layout's T = M
# tokens), split axis of x, split axis of the outputs, extra inputs, kwargs. Extra inputs:
# "pos" position_ids (R = 1) given whole, "pos_split" split with x, "pos2_split" R = 2 split with
# x, "table" cos/sin, "offsets" a tensor (B,) given whole, "inv" inv_freq, "cu32" / "cu64"
# cu_seqlens, "k" a second tensor of 2 heads (q+k), "qk" a packed q whose query and key rotate.
# position_ids given whole with x split on M: OneFlow 0.9 counts slicing a broadcast input as
# costly and moves x to the split on H instead (right values, the H split).
SEQ_CHECKS = [
    ("BMHK-uneven", "BMHK", (2, 7, 4), 1, 1, (), {}),
    ("BMHK-pos-whole", "BMHK", (2, 6, 2), 1, 2, ("pos", "table"), {"mode": "interval"}),
    ("BMHK-pos-split", "BMHK", (2, 7, 2), 1, 1, ("pos_split",), {}),
    ("BHMK->BMHK", "BHMK", (2, 7, 2), 2, 1, (), {"output_layout": "BMHK", "seqlen_offsets": 5}),
    ("MBHK-offsets", "MBHK", (3, 5, 2), 0, 0, ("offsets", "table"), {}),
    ("MB(HK)-inv", "MB(HK)", (2, 9, 2), 0, 0, ("inv",), {"k_size": 16, "attention_scaling": 0.7}),
    ("BM(H3K)-R2", "BM(H3K)", (2, 7, 2), 1, 2, ("pos2_split",), {"k_size": 16, "tensor_index": 1,
                                                                "output_layout": "BHMK"}),
    ("qk-BMHK", "BMHK", (2, 7, 4), 1, 1, ("k", "offsets"), {}),
    ("varlen", "(BM)HK", (None, 13, 2), 0, 0, ("cu32",), {}),
    ("varlen-table", "(BM)(H3K)", (None, 13, 2), 0, 0, ("cu64", "table"),
     {"k_size": 16, "tensor_index": 2, "output_layout": "(BM)HK", "mode": "interval"}),
    ("varlen-pos2", "(BM)(HK)", (None, 12, 2), 0, 0, ("pos2_split",), {"k_size": 16}),
    ("varlen-pos-split", "(BM)HK", (None, 11, 2), 0, 0, ("pos_split",), {}),
    ("varlen-qk", "(BM)(H3K)", (None, 13, 2), 0, 0, ("qk", "cu32"), {"k_size": 16}),
    ("varlen-qk-k", "(BM)HK", (None, 13, 4), 0, 0, ("k", "cu64"), {"mode": "interval"}),
]


def sequence_split_checks(rank: int, placement) -> int:
    failures = 0
    rng = np.random.default_rng(3)  # same data on both ranks
    K = 16
    for name, layout, (batch, length, heads), axis, out_axis, extras, kwargs in SEQ_CHECKS:
        varlen = batch is None
        arrays = [rng.uniform(-1, 1, any_layout_shape(layout, batch or 1, length, heads, K)).astype(np.float32)]
        if "k" in extras:
            arrays.append(rng.uniform(-1, 1, any_layout_shape(layout, batch or 1, length, 2, K)).astype(np.float32))
        lengths = [3, 0, 4, 1, length - 8]
        cu = np.concatenate([[0], np.cumsum(lengths)])
        inputs, ref = {}, {}  # op inputs (global) and reference arguments
        whole = dict(placement=placement, sbp=flow.sbp.broadcast)
        R = 2 if "pos2_split" in extras else 1
        if {"pos", "pos_split", "pos2_split"} & set(extras):
            pos_np = rng.integers(0, 12 if "table" in extras else 5000, (R, length) if varlen else (batch, R, length))
            pos = flow.tensor(pos_np, **whole)
            split = "pos_split" in extras or "pos2_split" in extras
            inputs["position_ids"] = pos.to_global(sbp=flow.sbp.split(pos_np.ndim - 1)) if split else pos
            ref["position_ids"] = pos_np
        if "table" in extras:
            part = (K if "rotary_size" not in kwargs else kwargs["rotary_size"]) // R
            angle = rng.uniform(-np.pi, np.pi, (12, part // 2))
            j = np.arange(part)
            pair = j % (part // 2) if kwargs.get("mode", "plane") == "plane" else j // 2
            ref["cos"] = np.cos(angle[:, pair]).astype(np.float32)
            ref["sin"] = np.sin(angle[:, pair]).astype(np.float32)
            inputs["cos"], inputs["sin"] = flow.tensor(ref["cos"], **whole), flow.tensor(ref["sin"], **whole)
        if "offsets" in extras:
            ref["seqlen_offsets"] = rng.integers(0, 3 if "table" in extras else 3000, (batch,)).astype(np.int64)
            inputs["seqlen_offsets"] = flow.tensor(ref["seqlen_offsets"], **whole)
        if "inv" in extras:
            ref["inv_freq"] = rng.uniform(0.001, 1.0, (K // 2,)).astype(np.float32)
            inputs["inv_freq"] = flow.tensor(ref["inv_freq"], **whole)
        for bits in (32, 64):
            if f"cu{bits}" in extras:
                ref["cu_seqlens"] = cu
                inputs["cu_seqlens"] = flow.tensor(cu.astype(f"int{bits}"), **whole)
        if "seqlen_offsets" in kwargs:
            ref["seqlen_offsets"] = kwargs["seqlen_offsets"]
        kw = dict(layout=layout, **kwargs)
        ref_kw = dict(kw, **ref)
        two = "k" in extras or "qk" in extras
        if "qk" in extras:
            expected = [rope_reference(arrays[0], **dict(ref_kw, tensor_index=i)) for i in (0, 1)]
        else:
            expected = [rope_reference(a, **ref_kw) for a in arrays]

        def call(tensors, extra):
            args = dict(kw, **extra)
            if two:
                return rope_qk(tensors[0], tensors[1] if len(tensors) > 1 else None, **args)
            return (oneflow_rope.fused_apply_rotary_emb(tensors[0], **args),)

        names = sorted(inputs)

        class SeqGraph(flow.nn.Graph):
            def build(self, *tensors):
                n = len(arrays)
                return call(tensors[:n], dict(zip(names, tensors[n:])))

        def to_global(a, requires_grad=False):
            t = flow.tensor(a, **whole).to_global(sbp=flow.sbp.split(axis))
            return t.requires_grad_(True) if requires_grad else t

        tensors = [to_global(a) for a in arrays]
        for mode_name, run in (("eager", lambda: call(tensors, inputs)),
                               ("graph", lambda: keep_alive(SeqGraph())(*tensors, *[inputs[n] for n in names]))):
            failures += not check_split_outputs(rank, f"seq {name:16s} {layout:9s} split({axis}) {mode_name}",
                                                run(), expected, out_axis)
        # backward: the gradients keep x's split and match the reference
        tensors = [to_global(a, requires_grad=True) for a in arrays]
        outs = call(tensors, inputs)
        weighted_total(outs).backward()
        if "qk" in extras:
            exp_grads = [sum(rope_reference_backward(w * np.ones(e.shape), **dict(ref_kw, tensor_index=i))
                             for i, w, e in zip((0, 1), (1, 2), expected))]
        else:
            exp_grads = [rope_reference_backward(w * np.ones(e.shape), x_shape=a.shape, **ref_kw)
                         for w, e, a in zip((1, 2), expected, arrays)]
        failures += not check_split_grads(rank, f"seq {name:16s} {layout:9s} split({axis})", tensors,
                                          exp_grads, axis)
    return failures


def rope_qk(q, k, **kwargs):
    return oneflow_rope.fused_apply_rotary_emb_qk(q, k, **{n: v for n, v in kwargs.items() if n != "tensor_index"})


if __name__ == "__main__":
    sys.exit(main())
