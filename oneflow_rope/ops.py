"""The Python call: argument checks and shape inference, then one dispatch of the OneFlow user op.

The checks and the inference run once per call signature (the tensors' shapes and the arguments);
what they resolve (the op expressions and the attribute map, held by a compiled ``_C.RopeOp``) is
kept, so a call whose signature was seen before goes straight to the dispatch. What the signature
does not cover (dtypes, devices, placements, tensor types) is checked by OneFlow and by the op's
own inference at dispatch; when those reject a call, the full Python checks run again to raise
the documented ValueError / TypeError.

No call reads a tensor's values back to the host, unless the position check is switched on
(``check_positions=True`` or :func:`set_position_check`).
"""

from __future__ import annotations

import functools
import math
import os
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import oneflow as flow
from oneflow.framework.graph_build_util import lazy_mode

from . import _C
from .layout import DEFAULT_LAYOUT, infer_shapes

__all__ = ["fused_apply_rotary_emb", "cos_sin_table", "set_position_check", "position_check_enabled"]

_FLOAT_DTYPES = (flow.float32, flow.float64, flow.float16, flow.bfloat16)
_INDEX_DTYPES = (flow.int32, flow.int64)

# Call signature -> (run, run_with_grad), each taking (x, cos, sin, position_ids).
_Plan = Tuple[Callable, Callable]
_PLANS: Dict[tuple, _Plan] = {}
_MAX_PLANS = 4096  # a long-running process with ever new shapes starts over past this
# (attributes, has_table, has_positions) -> plan, shared by the signatures that resolve to it.
_PLANS_BY_ATTRS: Dict[tuple, _Plan] = {}

_check_positions = os.environ.get("ONEFLOW_ROPE_CHECK_POSITIONS", "0") not in ("", "0")


def set_position_check(enabled: bool) -> None:
    """Switches the eager position check on or off for every call (default off, or on when the
    environment variable ONEFLOW_ROPE_CHECK_POSITIONS=1 is set at import).

    When on, an eager call with cos/sin tables and position_ids reads the smallest and largest
    position back to the host (one device-to-host synchronisation) and raises ValueError naming
    position_ids and the bad value if one lies outside the table. When off, such positions give
    NaN rows, as inside nn.Graph. ``check_positions=`` of a call overrides this switch.
    """
    global _check_positions
    _check_positions = bool(enabled)


def position_check_enabled() -> bool:
    """Whether :func:`set_position_check` has switched the eager position check on."""
    return _check_positions


@functools.lru_cache(maxsize=None)
def _op_expr(op_name: str, first_input: str, output: str, has_table: bool, has_positions: bool):
    builder = flow.stateful_op(op_name).Input(first_input)
    if has_table:
        builder = builder.Input("cos").Input("sin")
    if has_positions:
        builder = builder.Input("position_ids")
    return builder.Output(output).Build()


def _plan_for(attrs: Dict[str, object], has_table: bool, has_positions: bool) -> _Plan:
    key = (tuple(attrs.items()), has_table, has_positions)
    plan = _PLANS_BY_ATTRS.get(key)
    if plan is None:
        op = _C.RopeOp(_op_expr("fused_apply_rotary_emb", "x", "out", has_table, has_positions),
                       _op_expr("fused_apply_rotary_emb_grad", "dy", "dx", has_table, has_positions),
                       has_table, has_positions, **attrs)
        plan = _PLANS_BY_ATTRS[key] = (op.forward, op.forward_with_grad)
    return plan


def _check_tensor(value: object, argument: str, dtypes, what: str) -> None:
    if not isinstance(value, flow.Tensor):
        raise TypeError(f"{argument}: expected a oneflow.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        raise TypeError(f"{argument}: dtype {value.dtype} is not supported, expected {what}")


def _placement_of(t: flow.Tensor):
    return ("global", t.placement) if t.is_global else ("local", t.device)


def _prepare(x, cos, sin, position_ids, *, layout, x_layout, output_layout, mode, tensor_index, k_size,
             base, rotary_size) -> _Plan:
    """Every check of the call, then the plan that runs it. Raises ValueError / TypeError naming
    the argument, the value given and what was expected."""
    if x_layout is not None and layout is not None and x_layout != layout:
        raise ValueError(f"layout: got layout={layout!r} and x_layout={x_layout!r}; they name the same "
                         "argument, give one of them")
    layout = layout if layout is not None else (x_layout if x_layout is not None else DEFAULT_LAYOUT)

    _check_tensor(x, "x", _FLOAT_DTYPES, "float16, bfloat16, float32 or float64")
    if (cos is None) != (sin is None):
        raise ValueError(f"cos, sin: give both tables or neither; got cos={'None' if cos is None else 'a tensor'}, "
                         f"sin={'None' if sin is None else 'a tensor'}")
    where = _placement_of(x)
    if cos is not None:
        for name, table in (("cos", cos), ("sin", sin)):
            _check_tensor(table, name, _FLOAT_DTYPES, "float16, bfloat16, float32 or float64")
            if table.dtype != x.dtype:
                raise TypeError(f"{name}: dtype {table.dtype} differs from x's dtype {x.dtype}; "
                                "the tables must have x's dtype")
            if _placement_of(table) != where:
                raise ValueError(f"{name}: is on {_placement_of(table)[1]} but x is on {where[1]}")
        if tuple(sin.shape) != tuple(cos.shape):
            raise ValueError(f"sin: got shape {tuple(sin.shape)}, which differs from cos shape {tuple(cos.shape)}")
    if position_ids is not None:
        _check_tensor(position_ids, "position_ids", _INDEX_DTYPES, "int32 or int64")
        if _placement_of(position_ids) != where:
            raise ValueError(f"position_ids: is on {_placement_of(position_ids)[1]} but x is on {where[1]}")
    if cos is None:
        if isinstance(base, bool) or not isinstance(base, (int, float)) or not math.isfinite(base) or base <= 0:
            raise ValueError(f"base: got {base!r}, expected a finite number > 0")

    shapes = infer_shapes(
        tuple(x.shape), layout, output_layout=output_layout, mode=mode, tensor_index=tensor_index,
        k_size=k_size, rotary_size=rotary_size,
        table_shape=None if cos is None else tuple(cos.shape),
        position_ids_shape=None if position_ids is None else tuple(position_ids.shape),
    )
    attrs = dict(x_layout=shapes.layout, output_layout=shapes.output_layout, mode=mode,
                 tensor_index=shapes.tensor_index, k_size=shapes.head_size, rotary_size=shapes.rotary_size,
                 base=float(base))
    return _plan_for(attrs, cos is not None, position_ids is not None)


def _check_position_range(position_ids: flow.Tensor, rows: int) -> None:
    """The opt-in eager check: every position in [0, rows). One read-back to the host (a device
    synchronisation on CUDA). Skipped while an nn.Graph is built (values unknown then)."""
    if position_ids.is_lazy or lazy_mode.is_enabled() or position_ids.numel() == 0:
        return
    low, high = (int(v) for v in flow.stack([position_ids.min(), position_ids.max()]).numpy())
    if low < 0 or high >= rows:
        bad = low if low < 0 else high
        raise ValueError(f"position_ids: got position {bad}, expected every position in [0, {rows}) "
                         f"(the cos/sin table has {rows} rows)")


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
    x_layout: Optional[str] = None,
    check_positions: Optional[bool] = None,
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
            ========== ============ =====================================================

        cos, sin: optional tables of shape (P, rotary_size / rotary_dim), x's dtype; entry
            [p, j] is used for dim j of a rotary part at position p. Without them, the angles are
            computed from ``base``.
        position_ids: optional int32/int64 tensor of shape (B, 1, M), or (B, 2, M) for 2-D RoPE
            (the first half of the rotary dims uses row 0, the second half row 1). Default:
            token m is at position m. With a table, a position outside [0, P) gives NaN in its
            rotated dims (nothing outside the table is read); see ``check_positions``.
        layout: layout of x (default "BMHK"); ``x_layout`` is accepted as another name.
        output_layout: BMHK, BHMK, MBHK, BM(HK) or MB(HK); default x's layout (for a packed
            input, its unpacked form: BM(H3K) -> BM(HK)).
        mode: "plane" (rotate half, GPT-NeoX / LLaMA) or "interval" (adjacent pairs, GPT-J).
        tensor_index: which tensor of a packed layout to rotate.
        k_size: head size K; needed for fused layouts without a cos/sin table.
        base: frequency base when no table is given: theta_i = base ** (-2 i / A).
        rotary_size: rotate only the first ``rotary_size`` dims of each head (default K).
        check_positions: in eager mode, read position_ids back to the host and raise ValueError
            for a position outside the table (one device synchronisation per call). Default: the
            package switch, :func:`set_position_check` (off).

    Returns:
        A new contiguous tensor in ``output_layout``. The op is differentiable in x (not in
        cos, sin or position_ids), in eager mode and inside ``nn.Graph``.

    Example::

        >>> q = flow.randn(2, 128, 32, 64)                     # (B, M, H, K)
        >>> q_rot = fused_apply_rotary_emb(q, layout="BMHK")   # LLaMA-style, base 10000
        >>> qkv = flow.randn(2, 128, 32 * 3 * 64)
        >>> k_rot = fused_apply_rotary_emb(qkv, layout="BM(H3K)", tensor_index=1, k_size=64,
        ...                                output_layout="BHMK")  # (2, 32, 128, 64)
    """
    # The hot path: a call whose signature was prepared before costs a dict look-up and the
    # dispatch. The argument classes are part of the signature so that, e.g., k_size=16.0 does
    # not reuse the plan of k_size=16 (it is a TypeError).
    try:
        signature = (x.shape, None if cos is None else cos.shape,
                     None if position_ids is None else position_ids.shape, layout, x_layout, output_layout,
                     mode, tensor_index, k_size, base, rotary_size, tensor_index.__class__, k_size.__class__,
                     base.__class__, rotary_size.__class__)
        run, run_with_grad = _PLANS[signature]
    except KeyError:
        run, run_with_grad = _prepare(
            x, cos, sin, position_ids, layout=layout, x_layout=x_layout, output_layout=output_layout,
            mode=mode, tensor_index=tensor_index, k_size=k_size, base=base, rotary_size=rotary_size)
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        _PLANS[signature] = (run, run_with_grad)
    except (AttributeError, TypeError):  # not a tensor, or an unhashable argument: no signature
        run, run_with_grad = _prepare(
            x, cos, sin, position_ids, layout=layout, x_layout=x_layout, output_layout=output_layout,
            mode=mode, tensor_index=tensor_index, k_size=k_size, base=base, rotary_size=rotary_size)
    if position_ids is not None and cos is not None and (
            _check_positions if check_positions is None else check_positions):
        _check_position_range(position_ids, int(cos.shape[0]))
    try:
        if x.requires_grad:
            return run_with_grad(x, cos, sin, position_ids)
        return run(x, cos, sin, position_ids)
    except Exception:
        # Something the signature does not cover (a dtype, a device, a tensor type) was rejected
        # at dispatch: the full checks name the argument; if they pass, the dispatch's error stands.
        _prepare(x, cos, sin, position_ids, layout=layout, x_layout=x_layout, output_layout=output_layout,
                 mode=mode, tensor_index=tensor_index, k_size=k_size, base=base, rotary_size=rotary_size)
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
