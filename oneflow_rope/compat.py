"""A drop-in for newer OneFlow's ``oneflow._C.fused_apply_rotary_emb``.

Code written for OneFlow 1.x calls ``flow._C.fused_apply_rotary_emb(x, cos=..., sin=...,
position_ids=..., x_layout=..., ...)``, whose defaults differ from this package's own function
(x_layout defaults to "BHMK" there, "BMHK" here; cos, sin and position_ids are keyword-only
there). :func:`patch_oneflow` installs a function with upstream's exact signature and defaults,
backed by this package's op, so such code runs unchanged on OneFlow 0.9.0.
"""

from __future__ import annotations

from typing import Callable, Optional

import oneflow as flow

from .ops import fused_apply_rotary_emb

__all__ = ["patch_oneflow", "upstream_fused_apply_rotary_emb"]

UPSTREAM_DEFAULT_LAYOUT = "BHMK"


def upstream_fused_apply_rotary_emb(
    x: flow.Tensor,
    *,
    cos: Optional[flow.Tensor] = None,
    sin: Optional[flow.Tensor] = None,
    position_ids: Optional[flow.Tensor] = None,
    x_layout: str = UPSTREAM_DEFAULT_LAYOUT,
    output_layout: Optional[str] = None,
    mode: str = "plane",
    tensor_index: Optional[int] = None,
    k_size: Optional[int] = None,
    base: float = 1e4,
    rotary_size: Optional[int] = None,
) -> flow.Tensor:
    """``flow._C.fused_apply_rotary_emb`` of OneFlow 1.x: the same arguments, defaults and
    results, computed by :func:`oneflow_rope.fused_apply_rotary_emb` (see docs/operator.md; the
    README lists where this package is stricter than upstream)."""
    return fused_apply_rotary_emb(
        x, cos, sin, position_ids, layout=x_layout, output_layout=output_layout, mode=mode,
        tensor_index=tensor_index, k_size=k_size, base=base, rotary_size=rotary_size)


def patch_oneflow() -> Optional[Callable]:
    """Installs :func:`upstream_fused_apply_rotary_emb` as ``oneflow._C.fused_apply_rotary_emb``.

    Returns what was there before: None on OneFlow 0.9.0 (which has no such function), or the
    function installed by an earlier call. Example::

        >>> import oneflow_rope, oneflow as flow
        >>> oneflow_rope.patch_oneflow()
        >>> q = flow.randn(2, 32, 128, 64)                       # (B, H, M, K): upstream's default
        >>> q_rot = flow._C.fused_apply_rotary_emb(q, mode="plane")
    """
    previous = getattr(flow._C, "fused_apply_rotary_emb", None)
    flow._C.fused_apply_rotary_emb = upstream_fused_apply_rotary_emb
    return previous
