"""The parameter table of the operator's tests, shared by the CPU tests (OneFlow) and the GPU test
bench (PyTorch tensors through the raw binding). Framework-free: numpy only.

A case is one combination of layout, output layout, mode, rotary dim, full/partial rotation,
table/computed sin-cos, kind of position_ids and dtype; `make_inputs` turns it into arrays whose
values are exactly representable in the case's dtype, plus the keyword arguments of the call.
"""

from __future__ import annotations

import itertools
import zlib
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

INPUT_LAYOUTS = ("BMHK", "BHMK", "MBHK", "BM(HK)", "MB(HK)", "BM(H2K)", "MB(H2K)", "BM(H3K)", "MB(H3K)")
OUTPUT_LAYOUTS = ("BMHK", "BHMK", "MBHK", "BM(HK)", "MB(HK)")
MODES = ("plane", "interval")
DTYPES = ("float32", "float64", "float16", "bfloat16")
POSITION_KINDS = ("none", "int32", "int64")


@dataclass(frozen=True)
class Case:
    layout: str
    mode: str = "plane"
    rotary_dim: int = 1
    partial: bool = False
    table: bool = False
    positions: str = "none"
    dtype: str = "float32"
    output_layout: Optional[str] = None

    @property
    def id(self) -> str:
        out = f"->{self.output_layout}" if self.output_layout else ""
        return (f"{self.layout}{out}-{self.mode}-R{self.rotary_dim}-{'partial' if self.partial else 'full'}-"
                f"{'table' if self.table else 'base'}-pos_{self.positions}-{self.dtype}")

    @property
    def packed_slots(self) -> int:
        return 3 if "3" in self.layout else (2 if "2" in self.layout else 1)

    @property
    def fused(self) -> bool:
        return "(" in self.layout

    def seed(self) -> int:
        return zlib.crc32(self.id.encode())


def forward_cases() -> List[Case]:
    """Every layout x mode x rotary dim x full/partial x table/computed x position_ids kind x dtype
    (rotary dim 2 needs position_ids, so it pairs with int32 and int64 only)."""
    cases = []
    for layout, mode, rotary_dim, partial, table, positions, dtype in itertools.product(
            INPUT_LAYOUTS, MODES, (1, 2), (False, True), (False, True), POSITION_KINDS, DTYPES):
        if rotary_dim == 2 and positions == "none":
            continue
        cases.append(Case(layout, mode, rotary_dim, partial, table, positions, dtype))
    return cases


def output_layout_cases() -> List[Case]:
    """Every input layout into every output layout, both modes."""
    return [Case(layout, mode, output_layout=out, positions="int64")
            for layout, out, mode in itertools.product(INPUT_LAYOUTS, OUTPUT_LAYOUTS, MODES)]


def round_to_dtype(a: np.ndarray, dtype: str) -> np.ndarray:
    """Float32 array whose values are exactly representable in `dtype` (float64 for float64)."""
    if dtype == "float64":
        return a.astype(np.float64)
    if dtype == "float16":
        return a.astype(np.float16).astype(np.float32)
    a = a.astype(np.float32)
    if dtype == "bfloat16":
        bits = a.view(np.uint32).astype(np.uint64)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.astype(np.uint32).view(np.float32)
    return a


def layout_shape(layout: str, B: int, M: int, H: int, K: int) -> Tuple[int, ...]:
    sizes = {"B": B, "M": M, "H": H, "K": K}
    if "(" not in layout:
        return tuple(sizes[c] for c in layout)
    slots = 3 if "3" in layout else (2 if "2" in layout else 1)
    first, second = layout[0], layout[1]
    return (sizes[first], sizes[second], H * slots * K)


def random_rope_table(rng: np.random.Generator, *, rows: int, part: int, mode: str, dtype: str):
    """Random cos/sin tables of shape (rows, part) that are a real RoPE table: the two dims of a
    rotated pair share one angle (so the rotation is orthogonal and its gradient is the rotation
    by the negated angle). Values exactly representable in `dtype`."""
    j = np.arange(part)
    pair = j % (part // 2) if mode == "plane" else j // 2
    angle = rng.uniform(-np.pi, np.pi, (rows, part // 2))[:, pair]
    return round_to_dtype(np.cos(angle), dtype), round_to_dtype(np.sin(angle), dtype)


def make_inputs(case: Case, *, B: int = 2, M: int = 5, H: int = 3, K: int = 16,
                max_position: int = 4096, rng: Optional[np.random.Generator] = None
                ) -> Tuple[Dict[str, Optional[np.ndarray]], Dict[str, object]]:
    """Arrays (x, cos, sin, position_ids; None where absent) and keyword arguments of one call."""
    rng = rng if rng is not None else np.random.default_rng(case.seed())
    rotary_size = K // 2 if case.partial else K
    part = rotary_size // case.rotary_dim
    x = round_to_dtype(rng.uniform(-1, 1, layout_shape(case.layout, B, M, H, K)), case.dtype)
    arrays: Dict[str, Optional[np.ndarray]] = {"x": x, "cos": None, "sin": None, "position_ids": None}
    kwargs: Dict[str, object] = {"layout": case.layout, "mode": case.mode}
    if case.output_layout is not None:
        kwargs["output_layout"] = case.output_layout
    rows = M + 4
    if case.table:
        arrays["cos"], arrays["sin"] = random_rope_table(rng, rows=rows, part=part, mode=case.mode, dtype=case.dtype)
    if case.positions != "none":
        high = rows if case.table else max_position
        pos = rng.integers(0, high, (B, case.rotary_dim, M))
        arrays["position_ids"] = pos.astype(np.int32 if case.positions == "int32" else np.int64)
    if case.partial:
        kwargs["rotary_size"] = rotary_size
    if case.fused and not (case.table and not case.partial):
        kwargs["k_size"] = K  # else K comes from the table width
    if case.packed_slots == 2:
        kwargs["tensor_index"] = 1 + case.seed() % 2
    elif case.packed_slots == 3:
        kwargs["tensor_index"] = case.seed() % 3
    if not case.table:
        kwargs["base"] = (10000.0, 500000.0, 10.0)[case.seed() % 3]
    return arrays, kwargs


def max_position(arrays: Dict[str, Optional[np.ndarray]], M: int) -> int:
    pos = arrays["position_ids"]
    return int(pos.max()) if pos is not None else M - 1
