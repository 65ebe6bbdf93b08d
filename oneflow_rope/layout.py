"""Layouts of ``fused_apply_rotary_emb``: parsing and shape inference, before any dispatch.

Logical axes: B batch, M sequence position, H heads, K head size. A parenthesised group is one
tensor axis holding the product of its letters, the rightmost varying fastest; ``2``/``3`` are
the slots of a packed key-value or query-key-value tensor.

The layouts come from the operator's table (``op_table.json``), which the C++ op reads too. The
rules below are applied in the same order and with the same messages as the op's C++ inference
(``csrc/rope/layout.cpp``); ``tests/test_inference_differential.py`` checks that the two agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

from .op_table import (DEFAULT_LAYOUT, INPUT_LAYOUTS, LAYOUTS, MODES, OUTPUT_LAYOUTS, TENSOR_INDICES, VARLEN_LAYOUTS,
                       LayoutInfo)

__all__ = [
    "LayoutInfo",
    "RopeShapes",
    "INPUT_LAYOUTS",
    "OUTPUT_LAYOUTS",
    "VARLEN_LAYOUTS",
    "MODES",
    "DEFAULT_LAYOUT",
    "parse_layout",
    "infer_shapes",
    "layout_shape",
]

_MODE_CHOICES = ", ".join(f"'{m}'" for m in MODES[:-1]) + f" or '{MODES[-1]}'" if len(MODES) > 1 else f"'{MODES[0]}'"


def parse_layout(layout: object, argument: str = "layout", outputs_only: bool = False) -> LayoutInfo:
    """Returns the :class:`LayoutInfo` of a layout name; spaces and case are ignored.

    Raises TypeError for a non-string and ValueError for an unknown name, naming ``argument``.
    """
    allowed = OUTPUT_LAYOUTS if outputs_only else INPUT_LAYOUTS
    if not isinstance(layout, str):
        raise TypeError(f"{argument}: expected a string, one of {', '.join(allowed)}; got {layout!r}")
    info = LAYOUTS.get(layout)
    if info is None:
        info = LAYOUTS.get(layout.replace(" ", "").upper())
    if info is None or info.name not in allowed:
        extra = " (packed layouts are inputs only)" if info is not None else ""
        raise ValueError(f"{argument}: got '{layout}'{extra}, expected one of {', '.join(allowed)}")
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
    # q+k calls (a tensor k, or a packed x whose query and key are both rotated): the second
    # tensor's head count and output shape; None when the call rotates one tensor.
    k_num_heads: Optional[int] = None
    k_out_shape: Optional[Tuple[int, ...]] = None

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
    """Shape of a contiguous tensor of ``layout`` holding these sizes (a varlen layout's token
    axis holds B * M tokens)."""
    info = parse_layout(layout)
    shape = [0] * info.ndim
    if info.varlen:
        shape[info.seq_axis] = B * M
    else:
        shape[info.batch_axis] = B
        shape[info.seq_axis] = M
    if info.fused:
        shape[info.head_axis] = H * info.slots * K
    else:
        shape[info.head_axis] = H
        shape[info.k_axis] = K
    return tuple(shape)


def _batch_and_length(info: LayoutInfo, shape: Tuple[int, ...]) -> Tuple[int, int]:
    """(B, M) of a tensor of this layout: (1, T) for a varlen layout's T tokens."""
    if info.varlen:
        return 1, shape[info.seq_axis]
    return shape[info.batch_axis], shape[info.seq_axis]


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


def _shape(value: Sequence[int], argument: str) -> Tuple[int, ...]:
    try:
        return tuple(_check_int(d, argument) for d in value)
    except TypeError:
        raise TypeError(f"{argument}: expected a shape (a sequence of ints), got {value!r}") from None


# Layouts holding one tensor (q and k of a q+k call), and packed layouts holding a query and a key.
_SINGLE_LAYOUTS = ", ".join(name for name, info in LAYOUTS.items() if info.slots == 1)
_QK_LAYOUTS = " or ".join(name for name, info in LAYOUTS.items()
                          if "query" in info.tensor_names and "key" in info.tensor_names)
_VARLEN_LAYOUTS = ", ".join(VARLEN_LAYOUTS)


def _output_choices(varlen: bool) -> str:
    """The output layouts that go with an input of this kind (varlen or not)."""
    return ", ".join(name for name in OUTPUT_LAYOUTS if LAYOUTS[name].varlen == varlen)


def _vector_shape(value: Sequence[int], argument: str, expected: str) -> Tuple[int, ...]:
    """The shape of a 1-D input (seqlen_offsets, inv_freq); its length is checked later."""
    shape = _shape(value, argument)
    if len(shape) != 1:
        raise ValueError(f"{argument}: got shape {shape}, expected {expected}")
    if shape[0] < 0:
        raise ValueError(f"{argument}: got shape {shape}, which has a negative size")
    return shape


def _index_choices(info: LayoutInfo) -> str:
    if info.slots == 1:
        return "None or 0 (only packed layouts hold several tensors)"
    items = [f"{index} ({name})" for index, name in zip(info.tensor_indices, info.tensor_names)]
    return ", ".join(items[:-1]) + " or " + items[-1]


def infer_shapes(
    x_shape: Sequence[int],
    layout: str = DEFAULT_LAYOUT,
    *,
    output_layout: Optional[str] = None,
    mode: str = "plane",
    tensor_index: Optional[int] = None,
    k_size: Optional[int] = None,
    rotary_size: Optional[int] = None,
    table_shape: Optional[Sequence[int]] = None,
    position_ids_shape: Optional[Sequence[int]] = None,
    k_shape: Optional[Sequence[int]] = None,
    packed_qk: bool = False,
    seqlen_offset: Optional[int] = None,
    seqlen_offsets_shape: Optional[Sequence[int]] = None,
    inv_freq_shape: Optional[Sequence[int]] = None,
    cu_seqlens_shape: Optional[Sequence[int]] = None,
) -> RopeShapes:
    """Parses ``layout`` and infers B, M, H, K, the rotary sizes and the output shape.

    Checks every rule of the operator that depends only on shapes and arguments, and raises
    ValueError / TypeError naming the argument, the value given and what was expected.

    The q+k form (:func:`fused_apply_rotary_emb_qk`): ``x_shape`` is q's shape and ``k_shape``
    k's (same layout, B, M and K; any head count), or ``packed_qk=True`` for a packed
    query-key-value x whose query and key are both rotated; the result then also has
    ``k_num_heads`` and ``k_out_shape``. ``seqlen_offset`` is an int ``seqlen_offsets``,
    ``seqlen_offsets_shape`` the shape of a tensor one; ``inv_freq_shape`` the shape of inv_freq.

    The varlen layouts ((BM)HK, (BM)(HK), (BM)(H2K), (BM)(H3K)) hold the T tokens of packed
    sequences on one axis: B = 1 and M = T, the sequences come from ``cu_seqlens_shape`` (S+1,)
    or the positions from ``position_ids_shape`` (R, T); their output layout is varlen too.

    Example::

        >>> infer_shapes((2, 16, 3 * 8 * 64), "BM(H3K)", k_size=64).out_shape
        (2, 16, 512)
        >>> infer_shapes((2, 16, 32, 64), "BMHK", k_shape=(2, 16, 8, 64)).k_out_shape
        (2, 16, 8, 64)
        >>> infer_shapes((100, 3 * 8 * 64), "(BM)(H3K)", k_size=64, cu_seqlens_shape=(5,)).out_shape
        (100, 512)
    """
    # Keep in step with rope::InferShapes (csrc/rope/layout.cpp): same rules, order and messages.
    info = parse_layout(layout, "layout")
    out_info = parse_layout(info.unpacked if output_layout is None else output_layout, "output_layout",
                            outputs_only=True)
    if out_info.varlen != info.varlen:
        raise ValueError(f"output_layout: got '{out_info.name}' for layout {info.name}, expected one of "
                         f"{_output_choices(info.varlen)} (packed varlen tokens and batched sequences do not mix)")
    if not isinstance(mode, str):
        raise TypeError(f"mode: expected a string, {_MODE_CHOICES}; got {mode!r}")
    if mode not in MODES:
        raise ValueError(f"mode: got '{mode}', expected {_MODE_CHOICES}")

    shape = _shape(x_shape, "x")
    if len(shape) != info.ndim:
        raise ValueError(f"x: layout {info.name} needs a {info.ndim}-D tensor, got shape {shape} ({len(shape)}-D)")
    if min(shape, default=0) < 0:
        raise ValueError(f"x: got shape {shape}, which has a negative size")

    index = info.default_tensor_index if tensor_index is None else _check_int(tensor_index, "tensor_index")
    if index not in info.tensor_indices:
        raise ValueError(f"tensor_index: got {index} for layout {info.name}, expected {_index_choices(info)}")

    if packed_qk:
        if k_shape is not None:
            raise ValueError(f"k: got shape {_shape(k_shape, 'k')}, but q is a packed query-key-value tensor "
                             "whose key is rotated with its query; give k=None")
        if "query" not in info.tensor_names or "key" not in info.tensor_names:
            raise ValueError(f"k: got None with layout {info.name}; without k, q must be a packed "
                             f"query-key-value tensor ({_QK_LAYOUTS}) whose query and key are rotated")
        query = TENSOR_INDICES["query"]
        if index != query:
            raise ValueError(f"tensor_index: got {index}, but a packed q+k call rotates the query and the key; "
                             f"expected {query} (query)")
    if k_shape is not None:
        k = _shape(k_shape, "k")
        if info.slots > 1:
            raise ValueError(f"k: layout {info.name} is packed; q and k must each be one tensor ({_SINGLE_LAYOUTS}), "
                             "or give the packed query-key-value tensor as q with k=None")
        if len(k) != info.ndim:
            raise ValueError(f"k: layout {info.name} needs a {info.ndim}-D tensor, got shape {k} ({len(k)}-D)")
        if min(k, default=0) < 0:
            raise ValueError(f"k: got shape {k}, which has a negative size")

    rotary_dim = 1
    if position_ids_shape is not None:
        pos = _shape(position_ids_shape, "position_ids")
        if info.varlen:
            if len(pos) != 2 or pos[0] not in (1, 2):
                raise ValueError(f"position_ids: got shape {pos}, expected (1, T) or (2, T) for the varlen layout "
                                 f"{info.name}")
        elif len(pos) != 3 or pos[1] not in (1, 2):
            raise ValueError(f"position_ids: got shape {pos}, expected (B, 1, M) or (B, 2, M)")
        if min(pos) < 0:
            raise ValueError(f"position_ids: got shape {pos}, which has a negative size")
        rotary_dim = pos[0] if info.varlen else pos[1]
    if table_shape is not None:
        table = _shape(table_shape, "cos")
        if len(table) != 2:
            raise ValueError(f"cos: got shape {table}, expected a 2-D table (P, rotary_size / rotary_dim)")
        if min(table) < 0:
            raise ValueError(f"cos: got shape {table}, which has a negative size")
    if cu_seqlens_shape is not None:
        cu = _shape(cu_seqlens_shape, "cu_seqlens")
        if not info.varlen:
            raise ValueError(f"cu_seqlens: given with layout {info.name}; cu_seqlens gives the sequences of packed "
                             f"tokens, for the varlen layouts ({_VARLEN_LAYOUTS})")
        if position_ids_shape is not None:
            raise ValueError("cu_seqlens: given together with position_ids; a token's position comes from one of "
                             "them, give one")
        if len(cu) != 1 or cu[0] < 1:
            raise ValueError(f"cu_seqlens: got shape {cu}, expected (S+1,): the first token of each of the S "
                             "sequences, then the number of tokens T")
    elif info.varlen and position_ids_shape is None:
        raise ValueError(f"cu_seqlens: got None with the varlen layout {info.name}, whose tokens belong to packed "
                         "sequences; give cu_seqlens (S+1,) or position_ids (R, T)")
    if seqlen_offset is not None or seqlen_offsets_shape is not None:
        if seqlen_offset is not None and seqlen_offsets_shape is not None:
            raise ValueError(f"seqlen_offsets: got an int offset ({seqlen_offset}) and a tensor of offsets; "
                             "give one of them")
        if position_ids_shape is not None:
            raise ValueError("seqlen_offsets: given together with position_ids; token m of sequence b is at "
                             "seqlen_offsets[b] + m only without position_ids, give one of them")
        if info.varlen:
            raise ValueError(f"seqlen_offsets: given with the varlen layout {info.name}, whose token t of sequence "
                             "s is at t - cu_seqlens[s]; give the positions as position_ids instead")
        if seqlen_offset is not None:
            seqlen_offset = _check_int(seqlen_offset, "seqlen_offsets")
        else:
            offsets = _vector_shape(seqlen_offsets_shape, "seqlen_offsets", "(B,): one offset per sequence")
    if inv_freq_shape is not None:
        if table_shape is not None:
            raise ValueError("inv_freq: given together with cos/sin tables; inv_freq gives the frequencies of "
                             "computed angles (instead of base), give it or the tables")
        inv = _vector_shape(inv_freq_shape, "inv_freq", "a 1-D tensor (rotary_size / rotary_dim / 2,)")
    if k_size is not None:
        k_size = _check_int(k_size, "k_size")
        if k_size <= 0:
            raise ValueError(f"k_size: got {k_size}, expected a positive head size")
    if rotary_size is not None:
        rotary_size = _check_int(rotary_size, "rotary_size")
        if rotary_size <= 0:
            raise ValueError(f"rotary_size: got {rotary_size}, expected a positive number of dims")

    B, M = _batch_and_length(info, shape)
    if not info.fused:
        H, K = shape[info.head_axis], shape[info.k_axis]
        source = "x"
        if k_size is not None and k_size != K:
            raise ValueError(f"k_size: got {k_size} but x of layout {info.name} and shape {shape} has head size {K}")
        if K == 0:
            raise ValueError(f"x: got shape {shape}, whose head size is 0; expected a positive head size")
    else:
        if k_size is not None:
            K, source = k_size, "k_size"
        elif table_shape is not None and rotary_size is None:
            K, source = table[1] * rotary_dim, "cos"
            if K == 0:
                raise ValueError(f"cos: got shape {table}, whose width 0 gives no head size K")
        else:
            why = ("rotary_size is given, so the cos/sin width does not fix it" if table_shape is not None
                   else "give k_size or a cos/sin table")
            raise ValueError(f"k_size: layout {info.name} needs the head size K ({why}); got k_size=None")
        step = K * info.slots
        if shape[-1] % step != 0:
            given = f"k_size: got {K}" if source == "k_size" else f"cos: got shape {table}, whose width gives K = {K}"
            multiple = f"{info.slots} * K = {step}" if info.slots > 1 else f"K = {K}"
            raise ValueError(f"{given}, but the last axis of x ({shape[-1]}) is not a multiple of {multiple} "
                             f"for layout {info.name}")
        H = shape[-1] // step

    k_heads = H if packed_qk else None
    if k_shape is not None:
        if _batch_and_length(info, k) != (B, M):
            if info.varlen:
                raise ValueError(f"k: got shape {k}; q and k need the same tokens, q has T={M}")
            raise ValueError(f"k: got shape {k}; q and k need the same B and M, q has B={B}, M={M}")
        if not info.fused:
            if k[-1] != K:
                raise ValueError(f"k: got shape {k}, whose head size {k[-1]} differs from q's head size K={K}")
            k_heads = k[info.head_axis]
        else:
            if k[-1] % K != 0:
                raise ValueError(f"k: got shape {k}, whose last axis ({k[-1]}) is not a multiple of the head size "
                                 f"K = {K} for layout {info.name}")
            k_heads = k[-1] // K

    if rotary_size is None:
        rotary = K
        if rotary % (2 * rotary_dim) != 0:
            if source == "cos":
                raise ValueError(f"cos: got shape {table}; its width {table[1]} is the number of dims of each "
                                 "rotary part, which must be even")
            lead = f"x: got shape {shape}, whose head size {K}" if source == "x" else f"k_size: got {K}; the head size"
            raise ValueError(f"{lead} is rotated whole when rotary_size is not given, and with rotary dim "
                             f"{rotary_dim} it must be a multiple of {2 * rotary_dim} (each rotary part has an "
                             "even number of dims); give rotary_size to rotate fewer dims")
    else:
        rotary = rotary_size
        if rotary > K:
            raise ValueError(f"rotary_size: got {rotary}, expected at most the head size K={K}")
        if rotary % (2 * rotary_dim) != 0:
            raise ValueError(f"rotary_size: got {rotary}; with rotary dim {rotary_dim} each rotary part has "
                             f"rotary_size / {rotary_dim} dims, which must be even")
    part = rotary // rotary_dim

    if position_ids_shape is not None:
        if info.varlen and pos[1] != M:
            raise ValueError(f"position_ids: got shape {pos}, expected ({rotary_dim}, {M}) for x with T={M} tokens")
        if not info.varlen and (pos[0] != B or pos[2] != M):
            raise ValueError(f"position_ids: got shape {pos}, expected ({B}, {rotary_dim}, {M}) for x with B={B}, "
                             f"M={M}")
    if table_shape is not None:
        if table[1] != part:
            raise ValueError(f"cos: got shape {table}, expected (P, {part}): width rotary_size / rotary dim "
                             f"= {rotary} / {rotary_dim}")
        if position_ids_shape is None and seqlen_offsets_shape is None and cu_seqlens_shape is None:
            # the positions are known: 0..M-1, or seqlen_offset + (0..M-1) (a tensor of offsets,
            # position_ids or cu_seqlens: known only at run time, NaN rows outside the table)
            offset = 0 if seqlen_offset is None else seqlen_offset
            if offset == 0 and table[0] < M:
                raise ValueError(f"cos: got shape {table}: {table[0]} rows, but x has sequence length M={M}; "
                                 "without position_ids the table needs at least M rows")
            if offset != 0 and M > 0 and (offset < 0 or offset + M > table[0]):
                raise ValueError(f"seqlen_offsets: got {offset}: the M={M} tokens of each sequence are at positions "
                                 f"{offset} to {offset + M - 1}, outside the cos/sin table's rows 0 to {table[0] - 1}")
    if seqlen_offsets_shape is not None and offsets[0] != B:
        raise ValueError(f"seqlen_offsets: got shape {offsets}, expected ({B},) for x with B={B}")
    if inv_freq_shape is not None and inv[0] != part // 2:
        raise ValueError(f"inv_freq: got shape {inv}, expected ({part // 2},): one frequency per pair of the {part} "
                         f"dims of a rotary part (rotary_size / rotary dim = {rotary} / {rotary_dim})")

    return RopeShapes(
        batch=B, seq_len=M, num_heads=H, head_size=K, rotary_size=rotary, rotary_dim=rotary_dim,
        tensor_index=index, layout=info.name, output_layout=out_info.name,
        out_shape=layout_shape(out_info.name, B, M, H, K),
        k_num_heads=k_heads,
        k_out_shape=None if k_heads is None else layout_shape(out_info.name, B, M, k_heads, K),
    )
