"""``oneflow_rope.patch_oneflow()``: code written for newer OneFlow's
``flow._C.fused_apply_rotary_emb`` runs unchanged.

The cases are those of OneFlow's own test of that op (python/oneflow/test/modules/
test_fused_rotary_embedding.py): x of dims (3, 2, 5, 8) read in the test's layouts, base 10,
rotary sizes 4 and 8, 1-D and 2-D RoPE, angles computed or from tables of M or 2M rows, with
and without int32 position_ids, each call spelled as upstream's test spells it (keyword-only
tables, x_layout, k_size, tensor_index and output_layout for packed inputs). The expected values
come from this package's float64 reference (tests/reference.py), not from upstream's code.
"""

from __future__ import annotations

import subprocess
import sys
from typing import List, NamedTuple

import numpy as np
import oneflow as flow
import pytest

import oneflow_rope
from oneflow_rope.compat import upstream_fused_apply_rotary_emb
from tests.reference import rope_reference, tolerance

DIMS = (3, 2, 5, 8)
BASE = 10.0


class UpstreamCase(NamedTuple):
    mode: str
    layout: str
    rotary_size: int
    rotary_dim: int
    tables: bool        # cos/sin given (else computed from base)
    positions: bool     # position_ids given

    @property
    def id(self) -> str:
        return (f"{self.mode}-{self.layout}-rot{self.rotary_size}-R{self.rotary_dim}-"
                f"{'tables' if self.tables else 'computed'}-{'pos' if self.positions else 'nopos'}")


def upstream_cases() -> List[UpstreamCase]:
    cases = []
    # "op_plane": packed and fused seq-first layouts, computed angles with position_ids
    for layout in ("MB(H3K)", "MB(HK)"):
        for rotary_size in (4, 8):
            for rotary_dim in (2, 1):
                cases.append(UpstreamCase("plane", layout, rotary_size, rotary_dim, False, True))
    # "op_interval_2d": BMHK, 2-D RoPE with position_ids, computed and from tables
    for tables in (False, True):
        cases.append(UpstreamCase("interval", "BMHK", 4, 2, tables, True))
    # "op_interval_1d": BMHK, every combination of tables and position_ids
    for tables in (False, True):
        for positions in (False, True):
            cases.append(UpstreamCase("interval", "BMHK", 4, 1, tables, positions))
    return cases


def sizes(layout: str):
    """(B, M, H, K) and x's shape as upstream's test reads DIMS for a layout."""
    a, b, H, K = DIMS
    seq_first = layout.startswith("M")
    B, M = (b, a) if seq_first else (a, b)
    if "(" not in layout:
        return (B, M, H, K), DIMS
    slots = 3 if "H3K" in layout else (2 if "H2K" in layout else 1)
    return (B, M, H, K), (a, b, H * slots * K)


def tables_for(rows: int, width: int, mode: str) -> tuple:
    """cos/sin tables as upstream's test builds them: frequency i of dim j is j mod (A/2) for
    plane and j // 2 for interval."""
    j = np.arange(width)
    i = j % (width // 2) if mode == "plane" else j // 2
    angle = np.arange(rows)[:, None] * BASE ** (-2.0 * i / width)[None, :]
    return np.cos(angle), np.sin(angle)


@pytest.fixture(scope="module", autouse=True)
def patched():
    previous = oneflow_rope.patch_oneflow()
    assert previous is None or previous is upstream_fused_apply_rotary_emb
    yield


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("case", upstream_cases(), ids=lambda c: c.id)
def test_upstream_case(case: UpstreamCase, dtype: str):
    (B, M, H, K), x_shape = sizes(case.layout)
    rng = np.random.default_rng(3124)
    x = rng.uniform(-1, 1, x_shape)
    if dtype == "float16":
        x = x.astype(np.float16).astype(np.float64)
    fx = flow.tensor(x, dtype=getattr(flow, dtype))
    kwargs = dict(x_layout=case.layout, k_size=K, base=BASE, rotary_size=case.rotary_size, mode=case.mode)
    ref_kwargs = dict(mode=case.mode, k_size=K, base=BASE, rotary_size=case.rotary_size)
    cos = sin = pos = None
    max_pos = M - 1
    if case.positions:
        pos = rng.integers(0, 2 * M, (B, case.rotary_dim, M))
        max_pos = int(pos.max())
        kwargs["position_ids"] = flow.tensor(pos, dtype=flow.int32)
    if case.tables:
        rows = 2 * M if case.positions else M
        cos, sin = tables_for(rows, case.rotary_size // case.rotary_dim, case.mode)
        if dtype == "float16":
            cos, sin = (t.astype(np.float16).astype(np.float64) for t in (cos, sin))
        kwargs["cos"] = flow.tensor(cos, dtype=getattr(flow, dtype))
        kwargs["sin"] = flow.tensor(sin, dtype=getattr(flow, dtype))
    tol = tolerance(dtype, max_pos)
    if "H3K" in case.layout:
        out_layout = "MBHK" if case.layout.startswith("M") else "BMHK"
        for index in range(3):
            got = flow._C.fused_apply_rotary_emb(fx, output_layout=out_layout, tensor_index=index, **kwargs)
            want = rope_reference(x, case.layout, cos=cos, sin=sin, position_ids=pos, tensor_index=index,
                                  output_layout=out_layout, **ref_kwargs)
            assert got.shape == want.shape
            assert np.max(np.abs(got.numpy().astype(np.float64) - want)) <= tol
    else:
        got = flow._C.fused_apply_rotary_emb(fx, **kwargs)
        want = rope_reference(x, case.layout, cos=cos, sin=sin, position_ids=pos, **ref_kwargs)
        assert got.shape == want.shape  # output_layout defaults to x's layout, as upstream
        assert np.max(np.abs(got.numpy().astype(np.float64) - want)) <= tol


def test_upstream_defaults_bhmk_and_keyword_only_tables():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 3, 4, 8))  # read as (B, H, M, K): upstream's default layout
    got = flow._C.fused_apply_rotary_emb(flow.tensor(x, dtype=flow.float64))
    assert np.max(np.abs(got.numpy() - rope_reference(x, "BHMK"))) <= 1e-12
    ours = oneflow_rope.fused_apply_rotary_emb(flow.tensor(x, dtype=flow.float64))  # ours: BMHK
    assert np.max(np.abs(ours.numpy() - rope_reference(x, "BMHK"))) <= 1e-12
    cos, sin = oneflow_rope.cos_sin_table(4, 8, dtype=flow.float64)
    with pytest.raises(TypeError):
        flow._C.fused_apply_rotary_emb(flow.tensor(x), cos, sin)  # upstream: tables are keyword-only


def test_patch_returns_what_it_replaced():
    # a fresh process: OneFlow 0.9.0 has no fused_apply_rotary_emb, so the first patch returns None
    code = ("import oneflow_rope, oneflow as flow\n"
            "first = oneflow_rope.patch_oneflow()\n"
            "second = oneflow_rope.patch_oneflow()\n"
            "from oneflow_rope.compat import upstream_fused_apply_rotary_emb as f\n"
            "print(first is None, second is f, flow._C.fused_apply_rotary_emb is f)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "True True True"
