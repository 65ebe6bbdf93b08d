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

__all__ = ["LayoutInfo", "Attribute", "LAYOUTS", "INPUT_LAYOUTS", "OUTPUT_LAYOUTS", "MODES",
           "DEFAULT_LAYOUT", "TENSOR_INDICES", "ATTRIBUTES", "TABLE_PATH", "load"]

TABLE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "op_table.json")


@dataclass(frozen=True)
class LayoutInfo:
    """What a layout name means: which tensor axis holds each logical axis, and its slots."""

    name: str
    ndim: int
    batch_axis: int
    seq_axis: int
    head_axis: int  # for fused layouts the last axis, shared with K (and the slots)
    fused: bool  # H (and the slots) and K share the last axis
    slots: int  # 1, or 2 / 3 for packed key-value / query-key-value
    tensor_indices: Tuple[int, ...]  # the tensor_index of each slot ((0,) when unpacked)
    tensor_names: Tuple[Optional[str], ...]  # "query", "key", "value" per slot ((None,) when unpacked)
    default_tensor_index: int
    unpacked: str  # layout of one selected tensor: BM(H3K) -> BM(HK); itself when unpacked
    can_be_output: bool

    def slot_of(self, tensor_index: int) -> int:
        """The slot (0-based position in a head) that ``tensor_index`` selects."""
        return self.tensor_indices.index(tensor_index)


@dataclass(frozen=True)
class Attribute:
    name: str
    type: str  # "string", "int64", "double" or "bool"
    default: object


def _derive(entry: dict, tensor_indices: Dict[str, int]) -> LayoutInfo:
    name, axes = entry["name"], list(entry["axes"])
    fused = axes[-1] != "K"
    spelled = "".join(axes[:-1]) + "(" + axes[-1] + ")" if fused else "".join(axes)
    letters = sorted(c for c in "".join(axes) if c.isalpha())
    if spelled != name or letters != ["B", "H", "K", "M"]:
        raise ValueError(f"op_table.json: layout {name}: axes {axes} do not spell the name")
    slots = int(axes[-1][1:-1] or 1) if fused else 1
    head_axis = next(i for i, axis in enumerate(axes) if "H" in axis)
    names = tuple(entry.get("tensors", [None]))
    if len(names) != slots:
        raise ValueError(f"op_table.json: layout {name}: {slots} slots but tensors {list(names)}")
    indices = tuple(0 if n is None else tensor_indices[n] for n in names)
    default = entry.get("default_tensor")
    return LayoutInfo(
        name=name, ndim=len(axes), batch_axis=axes.index("B"), seq_axis=axes.index("M"),
        head_axis=head_axis, fused=fused, slots=slots, tensor_indices=indices, tensor_names=names,
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
        if info.unpacked not in layouts or not layouts[info.unpacked].can_be_output:
            raise ValueError(f"op_table.json: layout {info.name}: unpacked {info.unpacked} is not an output layout")
    attributes = tuple(Attribute(a["name"], a["type"], a["default"]) for a in table["attributes"])
    return layouts, tuple(table["modes"]), table["default_layout"], tensor_indices, attributes


LAYOUTS, MODES, DEFAULT_LAYOUT, TENSOR_INDICES, ATTRIBUTES = load()
INPUT_LAYOUTS: Tuple[str, ...] = tuple(LAYOUTS)
OUTPUT_LAYOUTS: Tuple[str, ...] = tuple(n for n, info in LAYOUTS.items() if info.can_be_output)
