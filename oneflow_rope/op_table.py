"""The operator's table (``op_table.json``): layouts, modes and attributes, read once.

This module is the only reader of the table: ``oneflow_rope.layout`` (Python's shape inference)
imports it, and ``tools/gen_op_table.py`` loads it by path at build time to write the C++ header
``rope/op_table.h``, so both languages see the same derived values (axis positions, slots, tensor
indices, defaults). Standard library only: it imports neither OneFlow nor the package.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

__all__ = ["LayoutInfo", "Attribute", "LAYOUTS", "INPUT_LAYOUTS", "OUTPUT_LAYOUTS", "VARLEN_LAYOUTS", "MODES",
           "DEFAULT_LAYOUT", "TENSOR_INDICES", "ATTRIBUTES", "TABLE_PATH", "load"]

TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "op_table.json")


@dataclass(frozen=True)
class LayoutInfo:
    """What a layout name means: which tensor axis holds each logical axis, and its slots."""

    name: str
    ndim: int
    batch_axis: int  # for varlen layouts the token axis, which holds B = 1 and M = T
    seq_axis: int
    head_axis: int  # for fused layouts the last axis, shared with K (and the slots)
    fused: bool  # H (and the slots) and K share the last axis
    varlen: bool  # one axis holds the T tokens of packed sequences: (BM)HK, (BM)(HK), ...
    slots: int  # 1, or 2 / 3 for packed key-value / query-key-value
    tensor_indices: Tuple[int, ...]  # the tensor_index of each slot ((0,) when unpacked)
    tensor_names: Tuple[Optional[str], ...]  # "query", "key", "value" per slot ((None,) when unpacked)
    default_tensor_index: int
    unpacked: str  # layout of one selected tensor: BM(H3K) -> BM(HK); itself when unpacked
    can_be_output: bool

    def slot_of(self, tensor_index: int) -> int:
        """The slot (0-based position in a head) that ``tensor_index`` selects."""
        return self.tensor_indices.index(tensor_index)

    @property
    def k_axis(self) -> int:
        """The axis holding K: the last (shared with H and the slots for fused layouts)."""
        return self.ndim - 1


@dataclass(frozen=True)
class Attribute:
    name: str
    type: str  # "string", "int64", "double" or "bool"
    default: object


def _derive(entry: dict, tensor_indices: Dict[str, int]) -> LayoutInfo:
    name, axes = entry["name"], list(entry["axes"])
    fused = axes[-1] != "K"
    # an axis of several letters is written in parentheses: BM(HK), (BM)HK, (BM)(H3K)
    spelled = "".join(axis if len(axis) == 1 else "(" + axis + ")" for axis in axes)
    letters = sorted(c for c in "".join(axes) if c.isalpha())
    if spelled != name or letters != ["B", "H", "K", "M"] or (fused and not axes[-1].startswith("H")):
        raise ValueError(f"op_table.json: layout {name}: axes {axes} do not spell the name")
    varlen = "BM" in axes
    if any(len(axis) > 1 and axis != "BM" for axis in axes[:-1]):
        raise ValueError(f"op_table.json: layout {name}: only the token axis BM and the last axis may be fused")
    slots = int(axes[-1][1:-1] or 1) if fused else 1
    head_axis = next(i for i, axis in enumerate(axes) if "H" in axis)
    batch_axis = next(i for i, axis in enumerate(axes) if "B" in axis)
    seq_axis = next(i for i, axis in enumerate(axes) if "M" in axis)
    names = tuple(entry.get("tensors", [None]))
    if len(names) != slots:
        raise ValueError(f"op_table.json: layout {name}: {slots} slots but tensors {list(names)}")
    indices = tuple(0 if n is None else tensor_indices[n] for n in names)
    default = entry.get("default_tensor")
    return LayoutInfo(
        name=name, ndim=len(axes), batch_axis=batch_axis, seq_axis=seq_axis,
        head_axis=head_axis, fused=fused, varlen=varlen, slots=slots, tensor_indices=indices, tensor_names=names,
        default_tensor_index=0 if default is None else tensor_indices[default],
        unpacked=entry.get("unpacked", name), can_be_output=bool(entry["output"]),
    )


def load(path: str = TABLE_PATH):
    """(layouts by name, modes, default layout, tensor indices by name, attributes) of the table."""
    with open(path, encoding="utf-8") as f:
        table = json.load(f)
    tensor_indices = dict(table["tensor_indices"])
    layouts = {}
    for entry in table["layouts"]:
        info = _derive(entry, tensor_indices)
        layouts[info.name] = info
    for info in layouts.values():
        unpacked = layouts.get(info.unpacked)
        if unpacked is None or not unpacked.can_be_output or unpacked.varlen != info.varlen:
            raise ValueError(f"op_table.json: layout {info.name}: unpacked {info.unpacked} is not an output layout "
                             "of the same kind")
    attributes = tuple(Attribute(a["name"], a["type"], a["default"]) for a in table["attributes"])
    return layouts, tuple(table["modes"]), table["default_layout"], tensor_indices, attributes


LAYOUTS, MODES, DEFAULT_LAYOUT, TENSOR_INDICES, ATTRIBUTES = load()
INPUT_LAYOUTS: Tuple[str, ...] = tuple(LAYOUTS)
OUTPUT_LAYOUTS: Tuple[str, ...] = tuple(n for n, info in LAYOUTS.items() if info.can_be_output)
VARLEN_LAYOUTS: Tuple[str, ...] = tuple(n for n, info in LAYOUTS.items() if info.varlen)
