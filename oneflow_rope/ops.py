"""The Python call: argument checks, shape inference, then one dispatch of the OneFlow user op."""

from __future__ import annotations

import functools
import math
from typing import Optional, Tuple

import numpy as np
import oneflow as flow
from oneflow.framework.graph_build_util import lazy_mode

from . import _C
from .layout import infer_shapes

__all__ = ["fused_apply_rotary_emb", "cos_sin_table"]

_FLOAT_DTYPES = (flow.float32, flow.float64, flow.float16, flow.bfloat16)
_INDEX_DTYPES = (flow.int32, flow.int64)


@functools.lru_cache(maxsize=None)
def _op_expr(op_name: str, first_input: str, output: str, has_table: bool, has_positions: bool):
    builder = flow.stateful_op(op_name).Input(first_input)
    if has_table:
        builder = builder.Input("cos").Input("sin")
    if has_positions:
        builder = builder.Input("position_ids")
    return builder.Output(output).Build()


# (x_layout, output_layout, mode, tensor_index, k_size, rotary_size, base)
_Attrs = Tuple[str, str, str, int, int, int, float]


def _dispatch(backward: bool, first: flow.Tensor, extras: tuple, attrs: _Attrs) -> flow.Tensor:
    has_table = extras[0] is not None
    has_positions = extras[2] is not None
    op = (_op_expr("fused_apply_rotary_emb_grad", "dy", "dx", has_table, has_positions) if backward
          else _op_expr("fused_apply_rotary_emb", "x", "out", has_table, has_positions))
    inputs = [first] + [t for t in extras if t is not None]
    return _C.apply(op, inputs, *attrs)


@functools.lru_cache(maxsize=None)
def _autograd_function(attrs: _Attrs, has_table: bool, has_positions: bool):
    """A flow.autograd.Function for one set of attributes; the backward is the op's grad op
    (the same rotation by the negated angle, written back into x's layout)."""

    def split(extras):
        it = iter(extras)
        cos = sin = pos = None
        if has_table:
            cos, sin = next(it), next(it)
        if has_positions:
            pos = next(it)
        return cos, sin, pos

    class RotaryEmbFunction(flow.autograd.Function):
        @staticmethod
        def forward(ctx, x, *extras):
            ctx.save_for_backward(*extras)
            return _dispatch(False, x, split(extras), attrs)

        @staticmethod
        def backward(ctx, dy):
            extras = ctx.saved_tensors
            dx = _dispatch(True, dy, split(extras), attrs)
            return (dx,) + (None,) * len(extras)

    return RotaryEmbFunction


def _check_tensor(value: object, argument: str, dtypes, what: str) -> None:
    if not isinstance(value, flow.Tensor):
        raise TypeError(f"{argument}: expected a oneflow.Tensor, got {type(value).__name__}")
    if value.dtype not in dtypes:
        raise TypeError(f"{argument}: dtype {value.dtype} is not supported, expected {what}")


def _placement_of(t: flow.Tensor):
    return ("global", t.placement) if t.is_global else ("local", t.device)


def _check_position_range(position_ids: flow.Tensor, rows: int) -> None:
    """Positions outside the cos/sin table are a user error (eager tensors only: inside nn.Graph
    values are unknown when the graph is built, and the kernels write NaN for such rows)."""
    if position_ids.is_lazy or lazy_mode.is_enabled() or position_ids.numel() == 0:
        return  # building an nn.Graph (the tensor may be an eager one the graph captures)
    low = int(position_ids.min().numpy())
    high = int(position_ids.max().numpy())
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
            token m is at position m.
        layout: layout of x (default "BMHK"); ``x_layout`` is accepted as another name.
        output_layout: BMHK, BHMK, MBHK, BM(HK) or MB(HK); default x's layout (for a packed
            input, its unpacked form: BM(H3K) -> BM(HK)).
        mode: "plane" (rotate half, GPT-NeoX / LLaMA) or "interval" (adjacent pairs, GPT-J).
        tensor_index: which tensor of a packed layout to rotate.
        k_size: head size K; needed for fused layouts without a cos/sin table.
        base: frequency base when no table is given: theta_i = base ** (-2 i / A).
        rotary_size: rotate only the first ``rotary_size`` dims of each head (default K).

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
    if x_layout is not None and layout is not None and x_layout != layout:
        raise ValueError(f"layout: got layout={layout!r} and x_layout={x_layout!r}; they name the same "
                         "argument, give one of them")
    layout = layout if layout is not None else (x_layout if x_layout is not None else "BMHK")

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
            raise ValueError(f"sin: shape {tuple(sin.shape)} differs from cos shape {tuple(cos.shape)}")
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
    if cos is not None and position_ids is not None:
        _check_position_range(position_ids, int(cos.shape[0]))

    attrs: _Attrs = (shapes.layout, shapes.output_layout, mode, shapes.tensor_index, shapes.head_size,
                     shapes.rotary_size, float(base))
    if not x.is_contiguous():
        x = x.contiguous()
    if cos is not None:
        cos, sin = cos.detach(), sin.detach()  # the tables take no gradient
    extras = (cos, sin, position_ids)
    if x.requires_grad and flow.is_grad_enabled():
        fn = _autograd_function(attrs, cos is not None, position_ids is not None)
        return fn.apply(x, *[t for t in extras if t is not None])
    return _dispatch(False, x, extras, attrs)


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
