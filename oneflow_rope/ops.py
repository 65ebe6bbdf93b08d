"""The Python call: argument checks and shape inference, then one dispatch of the OneFlow user op.

The checks and the inference run once per call signature (the tensors' shapes and the arguments);
what they resolve (the op expressions and the attribute map, held by a compiled ``_C.RopeOp``) is
kept, so a call whose signature was seen before goes straight to the dispatch. What the signature
does not cover (dtypes, devices, placements, tensor types) is checked by OneFlow and by the op's
own inference at dispatch; when those reject a call, the full Python checks run again to raise
the documented ValueError / TypeError.

No call reads a tensor's values back to the host, unless the position check is switched on
(``check_positions=True`` or :func:`set_position_check`).

Packed sequences of different lengths (the varlen layouts (BM)HK, (BM)(HK), (BM)(H2K), (BM)(H3K))
are one call: x holds all T tokens, ``cu_seqlens`` (S+1,) says where each sequence starts.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Dict, Optional, Tuple, Union

import numpy as np
import oneflow as flow
from oneflow.framework.graph_build_util import lazy_mode

from . import _C
from .layout import DEFAULT_LAYOUT, infer_shapes, parse_layout

__all__ = ["fused_apply_rotary_emb", "fused_apply_rotary_emb_qk", "cos_sin_table", "set_position_check",
           "position_check_enabled"]

_FLOAT_DTYPES = (flow.float32, flow.float64, flow.float16, flow.bfloat16)
_SIXTEEN_BIT = (flow.float16, flow.bfloat16)
_INDEX_DTYPES = (flow.int32, flow.int64)
_FREQ_DTYPES = (flow.float32, flow.float64)
_MAX_OFFSET = 2**62  # |an int seqlen_offsets| stays far from int64 overflow once m is added

# A prepared call: the compiled _C.RopeOp holding the op expressions and attributes. Its methods
# take (x, cos, sin, position_ids[, k, seqlen_offsets, inv_freq, cu_seqlens]).
_PLANS: Dict[tuple, object] = {}  # call signature -> RopeOp
_MAX_PLANS = 4096  # a long-running process with ever new shapes starts over past this
# (attributes, which optional inputs are given) -> RopeOp, shared by the signatures that resolve to it.
_PLANS_BY_ATTRS: Dict[tuple, object] = {}

_check_positions = os.environ.get("ONEFLOW_ROPE_CHECK_POSITIONS", "0") not in ("", "0")


def set_position_check(enabled: bool) -> None:
    """Switches the eager position check on or off for every call (default off, or on when the
    environment variable ONEFLOW_ROPE_CHECK_POSITIONS=1 is set at import).

    When on, an eager call with cos/sin tables and position_ids (or a tensor of seqlen_offsets)
    reads the smallest and largest position back to the host (one device-to-host
    synchronisation) and raises ValueError naming position_ids (or seqlen_offsets) and the bad
    value if one lies outside the table; an eager call with cu_seqlens reads it back and raises
    ValueError naming cu_seqlens when it is malformed (first entry not 0, decreasing, last entry
    not T) or, with a table, when a sequence is longer than the table. When off, such positions
    give NaN rows, as inside nn.Graph. ``check_positions=`` of a call overrides this switch.
    """
    global _check_positions
    _check_positions = bool(enabled)


def position_check_enabled() -> bool:
    """Whether :func:`set_position_check` has switched the eager position check on."""
    return _check_positions


@functools.lru_cache(maxsize=None)
def _op_expr(op_name: str, first_input: str, output: str, has_table: bool, has_positions: bool, *,
             second_input: Optional[str] = None, second_output: Optional[str] = None, has_offsets: bool = False,
             has_inv_freq: bool = False, has_cu_seqlens: bool = False):
    """The UserOpExpr of one kind of call: inputs in the op's order, then the outputs."""
    builder = flow.stateful_op(op_name).Input(first_input)
    if second_input is not None:
        builder = builder.Input(second_input)
    if has_table:
        builder = builder.Input("cos").Input("sin")
    if has_positions:
        builder = builder.Input("position_ids")
    if has_offsets:
        builder = builder.Input("seqlen_offsets")
    if has_inv_freq:
        builder = builder.Input("inv_freq")
    if has_cu_seqlens:
        builder = builder.Input("cu_seqlens")
    builder = builder.Output(output)
    if second_output is not None:
        builder = builder.Output(second_output)
    return builder.Build()


def _plan_for(attrs: Dict[str, object], *, has_table: bool, has_positions: bool, has_k: bool, has_offsets: bool,
              has_inv_freq: bool, has_cu_seqlens: bool):
    key = (tuple(attrs.items()), has_table, has_positions, has_k, has_offsets, has_inv_freq, has_cu_seqlens)
    plan = _PLANS_BY_ATTRS.get(key)
    if plan is None:
        two_outputs = has_k or bool(attrs["packed_qk"])
        extras = dict(has_offsets=has_offsets, has_inv_freq=has_inv_freq, has_cu_seqlens=has_cu_seqlens)
        forward = _op_expr("fused_apply_rotary_emb", "x", "out", has_table, has_positions,
                           second_input="k" if has_k else None, second_output="k_out" if two_outputs else None,
                           **extras)
        backward = _op_expr("fused_apply_rotary_emb_grad", "dy", "dx", has_table, has_positions,
                            second_input="dk_out" if two_outputs else None, second_output="dk" if has_k else None,
                            **extras)
        plan = _PLANS_BY_ATTRS[key] = _C.RopeOp(forward, backward, has_table, has_positions, has_k, has_offsets,
                                                has_inv_freq, has_cu_seqlens, **attrs)
    return plan


def _check_tensor(value: object, argument: str, dtypes, what: str) -> None:
    if not isinstance(value, flow.Tensor):
        raise TypeError(f"{argument}: expected a oneflow.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        raise TypeError(f"{argument}: dtype {value.dtype} is not supported, expected {what}")


def _placement_of(t: flow.Tensor):
    return ("global", t.placement) if t.is_global else ("local", t.device)


def _check_number(value: object, argument: str, *, positive: bool) -> None:
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
            or (positive and value <= 0)):
        raise ValueError(f"{argument}: got {value!r}, expected a finite number{' > 0' if positive else ''}")


def _prepare(x, cos, sin, position_ids, *, layout, x_layout, output_layout, mode, tensor_index, k_size,
             base, rotary_size, seqlen_offsets, inv_freq, attention_scaling, cu_seqlens=None, qk=False, k=None,
             inplace=False):
    """Every check of the call, then the RopeOp that runs it. Raises ValueError / TypeError naming
    the argument, the value given and what was expected. qk: a q+k call (x is q; k None: x is a
    packed query-key-value tensor)."""
    if x_layout is not None and layout is not None and x_layout != layout:
        raise ValueError(f"layout: got layout={layout!r} and x_layout={x_layout!r}; they name the same "
                         "argument, give one of them")
    layout = layout if layout is not None else (x_layout if x_layout is not None else DEFAULT_LAYOUT)

    _check_tensor(x, "x", _FLOAT_DTYPES, "float16, bfloat16, float32 or float64")
    where = _placement_of(x)
    if k is not None:
        _check_tensor(k, "k", _FLOAT_DTYPES, "float16, bfloat16, float32 or float64")
        if k.dtype != x.dtype:
            raise TypeError(f"k: dtype {k.dtype} differs from q's dtype {x.dtype}; q and k must have one dtype")
        if _placement_of(k) != where:
            raise ValueError(f"k: is on {_placement_of(k)[1]} but q is on {where[1]}")
    if (cos is None) != (sin is None):
        raise ValueError(f"cos, sin: give both tables or neither; got cos={'None' if cos is None else 'a tensor'}, "
                         f"sin={'None' if sin is None else 'a tensor'}")
    if cos is not None:
        for name, table in (("cos", cos), ("sin", sin)):
            _check_tensor(table, name, _FLOAT_DTYPES, "float16, bfloat16, float32 or float64")
            if table.dtype != x.dtype and not (x.dtype in _SIXTEEN_BIT and table.dtype == flow.float32):
                raise TypeError(f"{name}: dtype {table.dtype} differs from x's dtype {x.dtype}; the tables must "
                                "have x's dtype (or float32 with a float16 / bfloat16 x)")
            if _placement_of(table) != where:
                raise ValueError(f"{name}: is on {_placement_of(table)[1]} but x is on {where[1]}")
        if sin.dtype != cos.dtype:
            raise TypeError(f"sin: dtype {sin.dtype} differs from cos's dtype {cos.dtype}")
        if tuple(sin.shape) != tuple(cos.shape):
            raise ValueError(f"sin: got shape {tuple(sin.shape)}, which differs from cos shape {tuple(cos.shape)}")
    if position_ids is not None:
        _check_tensor(position_ids, "position_ids", _INDEX_DTYPES, "int32 or int64")
        if _placement_of(position_ids) != where:
            raise ValueError(f"position_ids: is on {_placement_of(position_ids)[1]} but x is on {where[1]}")
    seqlen_offset = None
    if isinstance(seqlen_offsets, flow.Tensor):
        _check_tensor(seqlen_offsets, "seqlen_offsets", _INDEX_DTYPES, "int32 or int64")
        if _placement_of(seqlen_offsets) != where:
            raise ValueError(f"seqlen_offsets: is on {_placement_of(seqlen_offsets)[1]} but x is on {where[1]}")
    elif seqlen_offsets is not None:
        if isinstance(seqlen_offsets, bool) or not isinstance(seqlen_offsets, (int, np.integer)):
            raise TypeError(f"seqlen_offsets: expected an int or an int32 / int64 tensor of shape (B,), got "
                            f"{seqlen_offsets!r}")
        seqlen_offset = int(seqlen_offsets)
        if abs(seqlen_offset) > _MAX_OFFSET:
            raise ValueError(f"seqlen_offsets: got {seqlen_offset}, expected an int in [-2**62, 2**62]")
    if inv_freq is not None:
        _check_tensor(inv_freq, "inv_freq", _FREQ_DTYPES, "float32 or float64")
        if _placement_of(inv_freq) != where:
            raise ValueError(f"inv_freq: is on {_placement_of(inv_freq)[1]} but x is on {where[1]}")
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, flow.Tensor):
            raise TypeError(f"cu_seqlens: expected a oneflow.Tensor (int32 or int64, shape (S+1,)), got "
                            f"{type(cu_seqlens).__name__}")
        if cu_seqlens.dtype not in _INDEX_DTYPES:
            raise ValueError(f"cu_seqlens: dtype {cu_seqlens.dtype} is not supported, expected int32 or int64")
        if _placement_of(cu_seqlens) != where:
            raise ValueError(f"cu_seqlens: is on {_placement_of(cu_seqlens)[1]} but x is on {where[1]}")
    if cos is None and inv_freq is None:
        _check_number(base, "base", positive=True)
    _check_number(attention_scaling, "attention_scaling", positive=False)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace: expected True or False, got {inplace!r}")

    shapes = infer_shapes(
        tuple(x.shape), layout, output_layout=output_layout, mode=mode, tensor_index=tensor_index,
        k_size=k_size, rotary_size=rotary_size,
        table_shape=None if cos is None else tuple(cos.shape),
        position_ids_shape=None if position_ids is None else tuple(position_ids.shape),
        k_shape=None if k is None else tuple(k.shape), packed_qk=qk and k is None,
        seqlen_offset=seqlen_offset,
        seqlen_offsets_shape=tuple(seqlen_offsets.shape) if isinstance(seqlen_offsets, flow.Tensor) else None,
        inv_freq_shape=None if inv_freq is None else tuple(inv_freq.shape),
        cu_seqlens_shape=None if cu_seqlens is None else tuple(cu_seqlens.shape),
    )
    if inplace and shapes.output_layout != shapes.layout:
        why = (f"q of layout {shapes.layout} is a packed query-key-value tensor, whose query and key results "
               f"are separate tensors ({shapes.output_layout})" if qk and k is None
               else f"output_layout {shapes.output_layout} differs from layout {shapes.layout}")
        raise ValueError(f"inplace: {why}; the results are written into q and k only in their own layout")
    # seqlen_offset: an int seqlen_offsets is passed at each call (the attribute map of the call)
    attrs = dict(x_layout=shapes.layout, output_layout=shapes.output_layout, mode=mode,
                 tensor_index=shapes.tensor_index, k_size=shapes.head_size, rotary_size=shapes.rotary_size,
                 base=float(base) if cos is None and inv_freq is None else 10000.0, seqlen_offset=0,
                 attention_scaling=float(attention_scaling), packed_qk=qk and k is None)
    return _plan_for(attrs, has_table=cos is not None, has_positions=position_ids is not None, has_k=k is not None,
                     has_offsets=isinstance(seqlen_offsets, flow.Tensor), has_inv_freq=inv_freq is not None,
                     has_cu_seqlens=cu_seqlens is not None)


def _is_building_graph(t: flow.Tensor) -> bool:
    return t.is_lazy or lazy_mode.is_enabled()


def _check_position_range(position_ids: flow.Tensor, rows: int) -> None:
    """The opt-in eager check: every position in [0, rows). One read-back to the host (a device
    synchronisation on CUDA). Skipped while an nn.Graph is built (values unknown then)."""
    if _is_building_graph(position_ids) or position_ids.numel() == 0:
        return
    low, high = (int(v) for v in flow.stack([position_ids.min(), position_ids.max()]).numpy())
    if low < 0 or high >= rows:
        bad = low if low < 0 else high
        raise ValueError(f"position_ids: got position {bad}, expected every position in [0, {rows}) "
                         f"(the cos/sin table has {rows} rows)")


def _check_offsets_range(seqlen_offsets: flow.Tensor, seq_len: int, rows: int) -> None:
    """The opt-in eager check for a tensor of offsets: the positions offset .. offset + M - 1 of
    every sequence in [0, rows). One read-back to the host."""
    if _is_building_graph(seqlen_offsets) or seqlen_offsets.numel() == 0 or seq_len == 0:
        return
    low, high = (int(v) for v in flow.stack([seqlen_offsets.min(), seqlen_offsets.max()]).numpy())
    if low < 0 or high + seq_len > rows:
        bad = low if low < 0 else high
        raise ValueError(f"seqlen_offsets: got offset {bad}: the M={seq_len} tokens of its sequence are at positions "
                         f"{bad} to {bad + seq_len - 1}, expected every position in [0, {rows}) (the cos/sin "
                         f"table has {rows} rows)")


def _host_values(t: flow.Tensor) -> np.ndarray:
    """The values of a (small) tensor on the host: one read-back (every rank of a global one)."""
    if t.is_global:
        t = t.to_global(sbp=flow.sbp.broadcast).to_local()
    return t.numpy()


def _check_cu_seqlens_values(cu_seqlens: flow.Tensor, tokens: int, rows: Optional[int]) -> None:
    """The opt-in eager check of cu_seqlens: 0 first, non-decreasing, T last, and with a table
    (``rows``) no sequence longer than the table. One read-back to the host."""
    if _is_building_graph(cu_seqlens):
        return
    cu = _host_values(cu_seqlens).astype(np.int64)
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens: got first entry {cu[0]}, expected 0 (where the first sequence starts)")
    steps = np.diff(cu)
    if (steps < 0).any():
        s = int(np.argmax(steps < 0))
        raise ValueError(f"cu_seqlens: entries {s} and {s + 1} are {cu[s]} and {cu[s + 1]}, expected non-decreasing "
                         "offsets (sequence s holds tokens cu_seqlens[s] to cu_seqlens[s+1] - 1)")
    if cu[-1] != tokens:
        raise ValueError(f"cu_seqlens: got last entry {cu[-1]}, expected T={tokens}, the number of tokens of x")
    if rows is not None and steps.size and int(steps.max()) > rows:
        s = int(np.argmax(steps))
        raise ValueError(f"cu_seqlens: sequence {s} has {steps[s]} tokens, at positions 0 to {steps[s] - 1}, "
                         f"expected every position in [0, {rows}) (the cos/sin table has {rows} rows)")


def _check_positions_now(x, cos, position_ids, seqlen_offsets, layout, x_layout, check_positions,
                         cu_seqlens=None) -> None:
    """The opt-in check of a call's positions (see :func:`set_position_check`): against the table,
    and the values of cu_seqlens."""
    if not (_check_positions if check_positions is None else check_positions):
        return
    name = layout if layout is not None else (x_layout if x_layout is not None else DEFAULT_LAYOUT)
    if cu_seqlens is not None:
        _check_cu_seqlens_values(cu_seqlens, int(x.shape[parse_layout(name).seq_axis]),
                                 None if cos is None else int(cos.shape[0]))
    elif cos is None:
        return
    elif position_ids is not None:
        _check_position_range(position_ids, int(cos.shape[0]))
    elif isinstance(seqlen_offsets, flow.Tensor):
        _check_offsets_range(seqlen_offsets, int(x.shape[parse_layout(name).seq_axis]), int(cos.shape[0]))


def _offsets_key(seqlen_offsets) -> tuple:
    """The part of a call signature for a given seqlen_offsets: an int's value is passed at each
    call, so only its class counts; a tensor's shape does."""
    return (seqlen_offsets.__class__, getattr(seqlen_offsets, "shape", None))


def fused_apply_rotary_emb(
    x: flow.Tensor,
    cos: Optional[flow.Tensor] = None,
    sin: Optional[flow.Tensor] = None,
    position_ids: Optional[flow.Tensor] = None,
    *,
    layout: Optional[str] = None,
    output_layout: Optional[str] = None,
    mode: str = "plane",
    tensor_index: Optional[int] = None,
    k_size: Optional[int] = None,
    base: float = 10000.0,
    rotary_size: Optional[int] = None,
    seqlen_offsets: Union[None, int, flow.Tensor] = None,
    inv_freq: Optional[flow.Tensor] = None,
    attention_scaling: float = 1.0,
    cu_seqlens: Optional[flow.Tensor] = None,
    check_positions: Optional[bool] = None,
    x_layout: Optional[str] = None,
) -> flow.Tensor:
    """Applies rotary position embedding (RoPE) to ``x`` in one fused kernel.

    Args:
        x: float16 / bfloat16 / float32 / float64 tensor, local or global, in ``layout``:

            ========== ============ =====================================================
            layout     x.shape      notes
            ========== ============ =====================================================
            BMHK       (B, M, H, K)
            BHMK       (B, H, M, K)
            MBHK       (M, B, H, K)
            BM(HK)     (B, M, H*K)  K from ``k_size`` or the cos/sin width
            MB(HK)     (M, B, H*K)
            BM(H2K)    (B, M, H*2*K) packed key/value; ``tensor_index`` 1 (key, default) or 2
            MB(H2K)    (M, B, H*2*K)
            BM(H3K)    (B, M, H*3*K) packed query/key/value; ``tensor_index`` 0 (default), 1, 2
            MB(H3K)    (M, B, H*3*K)
            (BM)HK     (T, H, K)    varlen: the T tokens of packed sequences (cu_seqlens)
            (BM)(HK)   (T, H*K)
            (BM)(H2K)  (T, H*2*K)
            (BM)(H3K)  (T, H*3*K)
            ========== ============ =====================================================

        cos, sin: optional tables of shape (P, rotary_size / rotary_dim), x's dtype (or float32
            for a float16 / bfloat16 x: the math is float32 either way); entry [p, j] is used for
            dim j of a rotary part at position p. Without them, the angles are computed from
            ``base`` (or ``inv_freq``).
        position_ids: optional int32/int64 tensor of shape (B, 1, M), or (B, 2, M) for 2-D RoPE
            (the first half of the rotary dims uses row 0, the second half row 1); (1, T) or
            (2, T) for a varlen layout. Default: token m is at position m. With a table, a
            position outside [0, P) gives NaN in its rotated dims (nothing outside the table is
            read); see ``check_positions``.
        layout: layout of x (default "BMHK"); ``x_layout`` is accepted as another name.
        output_layout: BMHK, BHMK, MBHK, BM(HK) or MB(HK); (BM)HK or (BM)(HK) for a varlen x.
            Default x's layout (for a packed input, its unpacked form: BM(H3K) -> BM(HK)).
        mode: "plane" (rotate half, GPT-NeoX / LLaMA) or "interval" (adjacent pairs, GPT-J).
        tensor_index: which tensor of a packed layout to rotate.
        k_size: head size K; needed for fused layouts without a cos/sin table.
        base: frequency base when no table is given: theta_i = base ** (-2 i / A).
        rotary_size: rotate only the first ``rotary_size`` dims of each head (default K).
        seqlen_offsets: without position_ids, token m of sequence b is at position
            ``seqlen_offsets[b] + m``: an int (the same for every sequence) or an int32/int64
            tensor of shape (B,) (a KV-cache decode step passes the cache lengths). Not together
            with position_ids. With a table, an int must keep the M positions inside it (else
            ValueError); a tensor's positions outside it give NaN rows (see ``check_positions``).
            Inside nn.Graph pass a tensor: an int is compiled into the graph.
        inv_freq: optional float32/float64 tensor of shape (A/2,), A = rotary_size / rotary_dim,
            replacing ``base``: the angle of frequency i at position p is p * inv_freq[i]
            (computed as precisely as from base). Not together with cos/sin.
        attention_scaling: multiplies cos and sin (YaRN, LongRoPE); default 1.
        cu_seqlens: for the varlen layouts, an int32/int64 tensor of shape (S+1,): sequence s
            holds tokens cu_seqlens[s] to cu_seqlens[s+1] - 1 of x, and token t of it is at
            position t - cu_seqlens[s] (cu_seqlens[0] = 0, non-decreasing, last = T). Not together
            with position_ids. A malformed cu_seqlens is seen only on the data: rows outside
            every sequence give NaN (see ``check_positions``); nothing out of bounds is read.
        check_positions: in eager mode, read position_ids (or a tensor of seqlen_offsets, or
            cu_seqlens) back to the host and raise ValueError for a position outside the table
            or a malformed cu_seqlens (one device synchronisation per call). Default: the package
            switch, :func:`set_position_check` (off).

    Returns:
        A new contiguous tensor in ``output_layout``. The op is differentiable in x (not in
        cos, sin, position_ids, seqlen_offsets, inv_freq or cu_seqlens), in eager mode and inside
        ``nn.Graph``.

    Example::

        >>> q = flow.randn(2, 128, 32, 64)                     # (B, M, H, K)
        >>> q_rot = fused_apply_rotary_emb(q, layout="BMHK")   # LLaMA-style, base 10000
        >>> qkv = flow.randn(2, 128, 32 * 3 * 64)
        >>> k_rot = fused_apply_rotary_emb(qkv, layout="BM(H3K)", tensor_index=1, k_size=64,
        ...                                output_layout="BHMK")  # (2, 32, 128, 64)
        >>> step = flow.randn(2, 1, 32, 64)                    # one decode step
        >>> cache_lengths = flow.tensor([17, 5], dtype=flow.int32)
        >>> step_rot = fused_apply_rotary_emb(step, seqlen_offsets=cache_lengths)  # positions 17 and 5
        >>> packed = flow.randn(10, 32, 64)                    # 3 sequences of 4, 1, 5 tokens: (T, H, K)
        >>> cu = flow.tensor([0, 4, 5, 10], dtype=flow.int32)
        >>> packed_rot = fused_apply_rotary_emb(packed, layout="(BM)HK", cu_seqlens=cu)
    """
    # The hot path: a call whose signature was prepared before costs a dict look-up and the
    # dispatch. The argument classes are part of the signature so that, e.g., k_size=16.0 does
    # not reuse the plan of k_size=16 (it is a TypeError).
    try:
        signature = (x.shape, None if cos is None else cos.shape,
                     None if position_ids is None else position_ids.shape, layout, x_layout, output_layout,
                     mode, tensor_index, k_size, base, rotary_size, tensor_index.__class__, k_size.__class__,
                     base.__class__, rotary_size.__class__,
                     None if seqlen_offsets is None else _offsets_key(seqlen_offsets),
                     None if inv_freq is None else inv_freq.shape, attention_scaling, attention_scaling.__class__,
                     None if cu_seqlens is None else cu_seqlens.shape)
        op = _PLANS[signature]
    except KeyError:
        op = _prepare(
            x, cos, sin, position_ids, layout=layout, x_layout=x_layout, output_layout=output_layout,
            mode=mode, tensor_index=tensor_index, k_size=k_size, base=base, rotary_size=rotary_size,
            seqlen_offsets=seqlen_offsets, inv_freq=inv_freq, attention_scaling=attention_scaling,
            cu_seqlens=cu_seqlens)
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        _PLANS[signature] = op
    except (AttributeError, TypeError):  # not a tensor, or an unhashable argument: no signature
        op = _prepare(
            x, cos, sin, position_ids, layout=layout, x_layout=x_layout, output_layout=output_layout,
            mode=mode, tensor_index=tensor_index, k_size=k_size, base=base, rotary_size=rotary_size,
            seqlen_offsets=seqlen_offsets, inv_freq=inv_freq, attention_scaling=attention_scaling,
            cu_seqlens=cu_seqlens)
    if cu_seqlens is not None or (cos is not None and (position_ids is not None or seqlen_offsets is not None)):
        _check_positions_now(x, cos, position_ids, seqlen_offsets, layout, x_layout, check_positions, cu_seqlens)
    try:
        if seqlen_offsets is None and inv_freq is None and cu_seqlens is None:
            if x.requires_grad:
                return op.forward_with_grad(x, cos, sin, position_ids)
            return op.forward(x, cos, sin, position_ids)
        if x.requires_grad:
            return op.forward_with_grad(x, cos, sin, position_ids, None, seqlen_offsets, inv_freq, cu_seqlens)
        return op.forward(x, cos, sin, position_ids, None, seqlen_offsets, inv_freq, cu_seqlens)
    except Exception:
        # Something the signature does not cover (a dtype, a device, a tensor type, the value of
        # an int seqlen_offsets) was rejected at dispatch: the full checks name the argument; if
        # they pass, the dispatch's error stands.
        _prepare(x, cos, sin, position_ids, layout=layout, x_layout=x_layout, output_layout=output_layout,
                 mode=mode, tensor_index=tensor_index, k_size=k_size, base=base, rotary_size=rotary_size,
                 seqlen_offsets=seqlen_offsets, inv_freq=inv_freq, attention_scaling=attention_scaling,
                 cu_seqlens=cu_seqlens)
        raise


def _as_q_error(error: Exception) -> Exception:
    """The error of a q+k call: the tensor the rules call x is the argument q."""
    message = str(error)
    if message.startswith("x:"):
        return type(error)("q:" + message[2:])
    return error


def _prepare_qk(q, k, cos, sin, position_ids, **kwargs):
    try:
        return _prepare(q, cos, sin, position_ids, x_layout=None, tensor_index=None, qk=True, k=k, **kwargs)
    except (ValueError, TypeError) as e:
        renamed = _as_q_error(e)
        if renamed is e:
            raise
        raise renamed from None


def _check_inplace_autograd(q: flow.Tensor, k: Optional[flow.Tensor]) -> None:
    """In place is refused where autograd needs the tensor's value as it was: a leaf that
    requires grad (its .grad would belong to a tensor that no longer holds its value)."""
    if not flow.is_grad_enabled():
        return
    for name, t in (("q", q), ("k", k)):
        if t is not None and t.requires_grad and t.is_leaf:
            raise RuntimeError(f"inplace: {name} is a leaf tensor that requires grad, which autograd forbids "
                               "writing in place; use inplace=False (or rotate under flow.no_grad())")


def fused_apply_rotary_emb_qk(
    q: flow.Tensor,
    k: Optional[flow.Tensor],
    cos: Optional[flow.Tensor] = None,
    sin: Optional[flow.Tensor] = None,
    position_ids: Optional[flow.Tensor] = None,
    *,
    layout: str = DEFAULT_LAYOUT,
    output_layout: Optional[str] = None,
    mode: str = "plane",
    rotary_size: Optional[int] = None,
    base: float = 10000.0,
    seqlen_offsets: Union[None, int, flow.Tensor] = None,
    inv_freq: Optional[flow.Tensor] = None,
    attention_scaling: float = 1.0,
    inplace: bool = False,
    check_positions: Optional[bool] = None,
    k_size: Optional[int] = None,
    cu_seqlens: Optional[flow.Tensor] = None,
) -> Tuple[flow.Tensor, flow.Tensor]:
    """Applies RoPE to a query and a key in one kernel launch; returns ``(q_rot, k_rot)``.

    Every argument means what it means for :func:`fused_apply_rotary_emb` (positions, tables,
    ``seqlen_offsets``, ``inv_freq``, ``attention_scaling``, ``cu_seqlens``, modes,
    ``rotary_size``); q and k get the same positions and angles.

    Args:
        q, k: q and k in the same ``layout`` (BMHK, BHMK, MBHK, BM(HK), MB(HK), or varlen (BM)HK,
            (BM)(HK) with ``cu_seqlens``) and dtype, with the same B, M (T) and head size K and any
            head counts (grouped-query attention: k may have fewer heads). Or a packed
            query-key-value tensor as q (BM(H3K), MB(H3K), (BM)(H3K); shape (B, M, H*3*K),
            (M, B, H*3*K) or (T, H*3*K)) with ``k=None``: its query and key slots are rotated
            (the value slot is left alone).
        output_layout: the layout of both results; default q's layout (for a packed q, its
            unpacked form: BM(H3K) -> BM(HK)).
        inplace: write the results into q and k and return them. Needs output_layout equal to
            layout (so not for a packed q) and contiguous q and k; refused (RuntimeError) for a
            leaf tensor that requires grad while autograd is on. The gradient still flows to
            the values q and k had before the call.
        k_size: head size K for the fused layouts without a cos/sin table to give it.

    Returns:
        ``(q_rot, k_rot)``, new contiguous tensors in ``output_layout`` (q and k themselves with
        ``inplace=True``). Differentiable in q and k, in eager mode and inside ``nn.Graph``.

    Example::

        >>> q = flow.randn(2, 128, 32, 64)                     # (B, M, Hq, K)
        >>> k = flow.randn(2, 128, 8, 64)                      # (B, M, Hkv, K): GQA
        >>> q_rot, k_rot = fused_apply_rotary_emb_qk(q, k, layout="BMHK", output_layout="BHMK")
        >>> qkv = flow.randn(2, 128, 32 * 3 * 64)              # packed (B, M, H*3*K)
        >>> q_rot, k_rot = fused_apply_rotary_emb_qk(qkv, None, layout="BM(H3K)", k_size=64)
        >>> step_q, step_k = flow.randn(2, 1, 32, 64), flow.randn(2, 1, 8, 64)
        >>> fused_apply_rotary_emb_qk(step_q, step_k, seqlen_offsets=flow.tensor([17, 5]),
        ...                           inplace=True)            # a decode step, rotated in place
    """
    try:
        signature = ("qk", q.shape, None if k is None else k.shape, None if cos is None else cos.shape,
                     None if position_ids is None else position_ids.shape, layout, output_layout, mode, k_size,
                     base, rotary_size, k_size.__class__, base.__class__, rotary_size.__class__,
                     None if seqlen_offsets is None else _offsets_key(seqlen_offsets),
                     None if inv_freq is None else inv_freq.shape, attention_scaling, attention_scaling.__class__,
                     inplace, None if cu_seqlens is None else cu_seqlens.shape)
        op = _PLANS[signature]
    except KeyError:
        op = _prepare_qk(q, k, cos, sin, position_ids, layout=layout, output_layout=output_layout, mode=mode,
                         k_size=k_size, base=base, rotary_size=rotary_size, seqlen_offsets=seqlen_offsets,
                         inv_freq=inv_freq, attention_scaling=attention_scaling, inplace=inplace,
                         cu_seqlens=cu_seqlens)
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        _PLANS[signature] = op
    except (AttributeError, TypeError):  # not a tensor, or an unhashable argument: no signature
        op = _prepare_qk(q, k, cos, sin, position_ids, layout=layout, output_layout=output_layout, mode=mode,
                         k_size=k_size, base=base, rotary_size=rotary_size, seqlen_offsets=seqlen_offsets,
                         inv_freq=inv_freq, attention_scaling=attention_scaling, inplace=inplace,
                         cu_seqlens=cu_seqlens)
    if cu_seqlens is not None or (cos is not None and (position_ids is not None or seqlen_offsets is not None)):
        _check_positions_now(q, cos, position_ids, seqlen_offsets, layout, None, check_positions, cu_seqlens)
    needs_grad = q.requires_grad or (k is not None and k.requires_grad)
    try:
        if inplace:
            _check_inplace_autograd(q, k)
            if needs_grad:
                op.forward_inplace_with_grad(q, cos, sin, position_ids, k, seqlen_offsets, inv_freq, cu_seqlens)
            else:
                op.forward_inplace(q, cos, sin, position_ids, k, seqlen_offsets, inv_freq, cu_seqlens)
            return q, k
        if needs_grad:
            return op.forward_with_grad(q, cos, sin, position_ids, k, seqlen_offsets, inv_freq, cu_seqlens)
        return op.forward(q, cos, sin, position_ids, k, seqlen_offsets, inv_freq, cu_seqlens)
    except Exception as e:
        # as in fused_apply_rotary_emb; the in-place refusals are final
        if not str(e).startswith("inplace:"):
            _prepare_qk(q, k, cos, sin, position_ids, layout=layout, output_layout=output_layout, mode=mode,
                        k_size=k_size, base=base, rotary_size=rotary_size, seqlen_offsets=seqlen_offsets,
                        inv_freq=inv_freq, attention_scaling=attention_scaling, inplace=inplace,
                        cu_seqlens=cu_seqlens)
        raise


def cos_sin_table(
    seq_len: int,
    dim: int,
    *,
    base: float = 10000.0,
    mode: str = "plane",
    dtype: flow.dtype = flow.float32,
    device: str = "cpu",
) -> Tuple[flow.Tensor, flow.Tensor]:
    """cos and sin tables of shape (seq_len, dim) for ``fused_apply_rotary_emb``.

    Entry [p, j] holds cos / sin of ``p * base ** (-2 i / dim)`` with ``i = j mod dim/2`` for
    "plane" and ``i = j // 2`` for "interval", computed in float64 and rounded once to ``dtype``.
    ``dim`` is the table width: rotary_size / rotary_dim.
    """
    if dim <= 0 or dim % 2:
        raise ValueError(f"dim: got {dim}, expected a positive even number")
    if mode not in ("plane", "interval"):
        raise ValueError(f"mode: got {mode!r}, expected 'plane' or 'interval'")
    j = np.arange(dim)
    i = j % (dim // 2) if mode == "plane" else j // 2
    angle = np.arange(seq_len, dtype=np.float64)[:, None] * (base ** (-2.0 * i / dim))[None, :]
    cos = flow.tensor(np.cos(angle), dtype=flow.float64, device=device).to(dtype)
    sin = flow.tensor(np.sin(angle), dtype=flow.float64, device=device).to(dtype)
    return cos, sin
