"""Layouts of ``fused_apply_rotary_emb``: parsing and shape inference, before any dispatch.

Logical axes: B batch, M sequence position, H heads, K head size. A parenthesised group is one
tensor axis holding the product of its letters, the rightmost varying fastest; ``2``/``3`` are
the slots of a packed key-value or query-key-value tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

__all__ = [
    "LayoutInfo",
    "RopeShapes",
    "INPUT_LAYOUTS",
    "OUTPUT_LAYOUTS",
    "parse_layout",
    "infer_shapes",
    "layout_shape",
]


@dataclass(frozen=True)
class LayoutInfo:
    """What a layout name means: which tensor axis holds each logical axis."""

    name: str
    ndim: int
    seq_first: bool  # M is the outermost axis (MBHK, MB(...))
    heads_before_seq: bool  # BHMK
    fused: bool  # H and K share the last axis
    slots: int  # 1, or 2 / 3 for packed KV / QKV
    can_be_output: bool

    @property
    def batch_axis(self) -> int:
        return 1 if self.seq_first else 0

    @property
    def seq_axis(self) -> int:
        if self.seq_first:
            return 0
        return 2 if self.heads_before_seq else 1

    @property
    def head_axis(self) -> int:
        """Axis holding H (for fused layouts, the last axis, shared with K)."""
        if self.fused:
            return 2
        return 1 if self.heads_before_seq else 2

    @property
    def unpacked(self) -> str:
        """The layout of one selected tensor of a packed layout: BM(H3K) -> BM(HK)."""
        if self.slots == 1:
            return self.name
        return ("MB" if self.seq_first else "BM") + "(HK)"


_LAYOUTS = {
    info.name: info
    for info in (
        LayoutInfo("BMHK", 4, False, False, False, 1, True),
        LayoutInfo("BHMK", 4, False, True, False, 1, True),
        LayoutInfo("MBHK", 4, True, False, False, 1, True),
        LayoutInfo("BM(HK)", 3, False, False, True, 1, True),
        LayoutInfo("MB(HK)", 3, True, False, True, 1, True),
        LayoutInfo("BM(H2K)", 3, False, False, True, 2, False),
        LayoutInfo("MB(H2K)", 3, True, False, True, 2, False),
        LayoutInfo("BM(H3K)", 3, False, False, True, 3, False),
        LayoutInfo("MB(H3K)", 3, True, False, True, 3, False),
    )
}

INPUT_LAYOUTS: Tuple[str, ...] = tuple(_LAYOUTS)
OUTPUT_LAYOUTS: Tuple[str, ...] = tuple(n for n, i in _LAYOUTS.items() if i.can_be_output)

MODES = ("plane", "interval")


def parse_layout(layout: object, argument: str = "layout", outputs_only: bool = False) -> LayoutInfo:
    """Returns the :class:`LayoutInfo` of a layout name; spaces and case are ignored.

    Raises TypeError for a non-string and ValueError for an unknown name, naming ``argument``.
    """
    allowed = OUTPUT_LAYOUTS if outputs_only else INPUT_LAYOUTS
    if not isinstance(layout, str):
        raise TypeError(f"{argument}: expected a string, one of {', '.join(allowed)}; got {layout!r}")
    name = layout.replace(" ", "").upper()
    info = _LAYOUTS.get(name)
    if info is None or name not in allowed:
        extra = " (packed layouts are inputs only)" if info is not None else ""
        raise ValueError(f"{argument}: got {layout!r}{extra}, expected one of {', '.join(allowed)}")
    return info


@dataclass(frozen=True)
class RopeShapes:
    """Sizes of one call, as :func:`infer_shapes` resolves them."""

    batch: int
    seq_len: int
    num_heads: int
    head_size: int
    rotary_size: int
    rotary_dim: int
    tensor_index: int
    layout: str
    output_layout: str
    out_shape: Tuple[int, ...]

    @property
    def B(self) -> int:
        return self.batch

    @property
    def M(self) -> int:
        return self.seq_len

    @property
    def H(self) -> int:
        return self.num_heads

    @property
    def K(self) -> int:
        return self.head_size

    @property
    def rotary_part(self) -> int:
        """Dims per rotary part: ``rotary_size // rotary_dim``, the cos/sin table width."""
        return self.rotary_size // self.rotary_dim


def layout_shape(layout: str, B: int, M: int, H: int, K: int) -> Tuple[int, ...]:
    """Shape of a contiguous tensor of ``layout`` holding these sizes."""
    info = parse_layout(layout)
    shape = [0] * info.ndim
    shape[info.batch_axis] = B
    shape[info.seq_axis] = M
    if info.fused:
        shape[2] = H * info.slots * K
    else:
        shape[info.head_axis] = H
        shape[3] = K
    return tuple(shape)


def _check_int(value: object, argument: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            import numpy as np

            if isinstance(value, np.integer):
                return int(value)
        except ImportError:  # pragma: no cover - numpy is a dependency
            pass
        raise TypeError(f"{argument}: expected an int, got {value!r}")
    return value


def infer_shapes(
    x_shape: Sequence[int],
    layout: str = "BMHK",
    *,
    output_layout: Optional[str] = None,
    mode: str = "plane",
    tensor_index: Optional[int] = None,
    k_size: Optional[int] = None,
    rotary_size: Optional[int] = None,
    table_shape: Optional[Sequence[int]] = None,
    position_ids_shape: Optional[Sequence[int]] = None,
) -> RopeShapes:
    """Parses ``layout`` and infers B, M, H, K, the rotary sizes and the output shape.

    Checks every rule of the operator that depends only on shapes and arguments, and raises
    ValueError / TypeError naming the argument, the value given and what was expected.

    Example::

        >>> infer_shapes((2, 16, 3 * 8 * 64), "BM(H3K)", k_size=64).out_shape
        (2, 16, 512)
    """
    info = parse_layout(layout, "layout")
    out_info = parse_layout(output_layout if output_layout is not None else info.unpacked,
                            "output_layout", outputs_only=True)
    if not isinstance(mode, str) or mode not in MODES:
        raise ValueError(f"mode: got {mode!r}, expected 'plane' or 'interval'")
    shape = tuple(int(d) for d in x_shape)
    if len(shape) != info.ndim:
        raise ValueError(
            f"x: layout {info.name} needs a {info.ndim}-D tensor, got shape {shape} ({len(shape)}-D)")

    # tensor_index
    if info.slots == 2:
        index = 1 if tensor_index is None else _check_int(tensor_index, "tensor_index")
        if index not in (1, 2):
            raise ValueError(
                f"tensor_index: got {index} for layout {info.name}, expected 1 (key) or 2 (value)")
    elif info.slots == 3:
        index = 0 if tensor_index is None else _check_int(tensor_index, "tensor_index")
        if index not in (0, 1, 2):
            raise ValueError(f"tensor_index: got {index} for layout {info.name}, "
                             "expected 0 (query), 1 (key) or 2 (value)")
    else:
        index = 0 if tensor_index is None else _check_int(tensor_index, "tensor_index")
        if index != 0:
            raise ValueError(f"tensor_index: got {index} for unpacked layout {info.name}, "
                             "expected None (it selects a tensor of a packed H2K / H3K layout)")

    # rotary dim from position_ids
    rotary_dim = 1
    if position_ids_shape is not None:
        pos_shape = tuple(int(d) for d in position_ids_shape)
        if len(pos_shape) != 3 or pos_shape[1] not in (1, 2):
            raise ValueError(f"position_ids: got shape {pos_shape}, expected (B, 1, M) or (B, 2, M)")
        rotary_dim = pos_shape[1]
    if table_shape is not None:
        table = tuple(int(d) for d in table_shape)
        if len(table) != 2:
            raise ValueError(f"cos: got shape {table}, expected a 2-D table (P, rotary_size / rotary_dim)")
    if k_size is not None:
        k_size = _check_int(k_size, "k_size")
        if k_size <= 0:
            raise ValueError(f"k_size: got {k_size}, expected a positive head size")
    if rotary_size is not None:
        rotary_size = _check_int(rotary_size, "rotary_size")
        if rotary_size <= 0:
            raise ValueError(f"rotary_size: got {rotary_size}, expected a positive number of dims")

    B = shape[info.batch_axis]
    M = shape[info.seq_axis]
    if not info.fused:
        H, K = shape[info.head_axis], shape[3]
        if k_size is not None and k_size != K:
            raise ValueError(f"k_size: got {k_size} but x of layout {info.name} and shape {shape} "
                             f"has head size {K}")
    else:
        if k_size is not None:
            K = k_size
        elif table_shape is not None and rotary_size is None:
            K = table[1] * rotary_dim
            if K <= 0:
                raise ValueError(f"cos: got shape {table}; its width cannot give the head size")
        else:
            why = "rotary_size is given, so the cos/sin width does not fix it" if table_shape is not None \
                else "give k_size or a cos/sin table"
            raise ValueError(f"k_size: layout {info.name} needs the head size K ({why}); got k_size=None")
        last = shape[2]
        if last % (K * info.slots) != 0:
            factor = f"{info.slots} * " if info.slots > 1 else ""
            raise ValueError(f"k_size: last axis of x ({last}) is not a multiple of {factor}K ({K}) "
                             f"for layout {info.name}")
        H = last // (K * info.slots)

    if rotary_size is None:
        rotary_size = K
    if rotary_size > K:
        raise ValueError(f"rotary_size: got {rotary_size}, expected at most the head size K={K}")
    if rotary_size % (2 * rotary_dim) != 0:
        raise ValueError(f"rotary_size: got {rotary_size}; with rotary dim {rotary_dim} each rotary part "
                         f"has rotary_size / {rotary_dim} dims, which must be even")
    part = rotary_size // rotary_dim

    if position_ids_shape is not None and (pos_shape[0] != B or pos_shape[2] != M):
        raise ValueError(f"position_ids: got shape {pos_shape}, expected ({B}, {rotary_dim}, {M}) "
                         f"for x with B={B}, M={M}")
    if table_shape is not None:
        if table[1] != part:
            raise ValueError(f"cos: got shape {table}, expected (P, {part}): width rotary_size / rotary dim "
                             f"= {rotary_size} / {rotary_dim}")
        if position_ids_shape is None and table[0] < M:
            raise ValueError(f"cos: table has {table[0]} rows but x has sequence length M={M}; without "
                             "position_ids the table needs at least M rows")

    return RopeShapes(
        batch=B, seq_len=M, num_heads=H, head_size=K, rotary_size=rotary_size,
        rotary_dim=rotary_dim, tensor_index=index, layout=info.name, output_layout=out_info.name,
        out_shape=layout_shape(out_info.name, B, M, H, K),
    )
