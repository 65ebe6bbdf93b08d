"""One rank of the global-tensor test (tests/test_global.py starts two, as
`python -m tests.global_worker` from the repository root with the rank's environment).

For x split on B and x split on H, in eager mode and in nn.Graph, checks that the op keeps the
split (no boxing back to broadcast) and gives the single-rank reference result; also a backward.
Prints one line per check; exits 1 on any failure.
"""

from __future__ import annotations

import sys

import oneflow_rope  # before oneflow

import numpy as np  # noqa: E402
import oneflow as flow  # noqa: E402

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
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
