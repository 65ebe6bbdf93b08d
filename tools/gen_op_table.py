"""Writes the C++ header rope/op_table.h from the operator's table (oneflow_rope/op_table.json).

Run by CMake at build time (see CMakeLists.txt); standard library only. The table is read through
oneflow_rope/op_table.py, loaded by path (the package itself needs OneFlow), so the C++ header gets
exactly the values Python derives: axis positions, slots, tensor indices, defaults, attributes.

    python tools/gen_op_table.py OUTPUT_HEADER
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CXX_TYPES = {"string": "std::string", "int64": "int64_t", "double": "double", "bool": "bool"}


def load_table_module():
    path = os.path.join(ROOT, "oneflow_rope", "op_table.py")
    spec = importlib.util.spec_from_file_location("_rope_op_table", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while the class is created
    spec.loader.exec_module(module)
    return module


def literal(value) -> str:
    if value is None:
        return "nullptr"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # ASCII names: a valid C++ string literal
    if isinstance(value, float):
        return repr(value)
    return str(value)


def render(table) -> str:
    lines = [
        "// Generated from oneflow_rope/op_table.json by tools/gen_op_table.py: do not edit.",
        "#ifndef ONEFLOW_ROPE_GENERATED_OP_TABLE_H_",
        "#define ONEFLOW_ROPE_GENERATED_OP_TABLE_H_",
        "",
        f"#define ROPE_DEFAULT_LAYOUT {literal(table.DEFAULT_LAYOUT)}",
        "",
        "// X(name, ndim, batch_axis, seq_axis, head_axis, fused, varlen, slots, tensor_index of slots 0..2,",
        "//   tensor name of slots 0..2, default_tensor_index, unpacked, can_be_output)",
        "#define ROPE_LAYOUTS(X) \\",
    ]
    for info in table.LAYOUTS.values():
        indices = list(info.tensor_indices) + [-1] * (3 - info.slots)
        names = list(info.tensor_names) + [None] * (3 - info.slots)
        fields = [info.name, info.ndim, info.batch_axis, info.seq_axis, info.head_axis, info.fused, info.varlen, info.slots,
                  *indices, *names, info.default_tensor_index, info.unpacked, info.can_be_output]
        lines.append(f"  X({', '.join(literal(f) for f in fields)}) \\")
    lines += ["", "// X(name), in the order of oneflow_rope::Mode", "#define ROPE_MODES(X) \\"]
    lines += [f"  X({literal(mode)}) \\" for mode in table.MODES]
    lines += ["", "// X(C++ type, name, default): the op's attributes, set and read by name",
              "#define ROPE_OP_ATTRIBUTES(X) \\"]
    for attr in table.ATTRIBUTES:
        lines.append(f"  X({CXX_TYPES[attr.type]}, {attr.name}, {literal(attr.default)}) \\")
    lines += ["", "#endif  // ONEFLOW_ROPE_GENERATED_OP_TABLE_H_", ""]
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    text = render(load_table_module())
    out = sys.argv[1]
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    old = open(out).read() if os.path.exists(out) else None
    if old != text:  # keep the timestamp when nothing changed (no needless rebuilds)
        with open(out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
