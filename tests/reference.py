"""The float64 numpy reference of fused_apply_rotary_emb, written once from docs/operator.md.

It shares no code with the package: its own layout handling, its own rotation. Every test (CPU,
GPU bench, property test) compares against these functions.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

__all__ = ["to_logical", "from_logical", "rope_reference", "rope_reference_backward", "tolerance",
           "default_positions", "positions_from_cu_seqlens"]

_SLOTS = {"(HK)": 1, "(H2K)": 2, "(H3K)": 3}
_VARLEN = "(BM)"  # the token axis of the varlen layouts: B = 1 and M = T


def _varlen(layout: str) -> bool:
    return layout.startswith(_VARLEN)


def _batched(layout: str) -> str:
    """The batched layout of the same axes: (BM)HK -> BMHK, (BM)(H3K) -> BM(H3K)."""
    return "BM" + layout[len(_VARLEN):] if _varlen(layout) else layout


def _split(layout: str) -> Tuple[str, int]:
    """('BM', slots) for fused layouts, (layout, 0) for 4-D ones."""
    for suffix, slots in _SLOTS.items():
        if layout.endswith(suffix):
            return layout[: -len(suffix)], slots
    return layout, 0


def to_logical(x: np.ndarray, layout: str, K: Optional[int] = None, slot: int = 0) -> np.ndarray:
    """View of x as (B, M, H, K) (for packed layouts, the given slot; (1, T, H, K) for varlen)."""
    if _varlen(layout):
        return to_logical(x[None], _batched(layout), K, slot)
    head, slots = _split(layout)
    if slots == 0:
        order = [layout.index(c) for c in "BMHK"]
        return np.transpose(x, order)
    a, b, last = x.shape
    assert last % (slots * K) == 0
    H = last // (slots * K)
    y = x.reshape(a, b, H, slots, K)[:, :, :, slot, :]
    return y if head == "BM" else np.transpose(y, (1, 0, 2, 3))


def from_logical(y: np.ndarray, layout: str, slot: int = 0) -> np.ndarray:
    """A (B, M, H, K) array laid out in `layout`. For packed layouts, the other slots are zero; a
    varlen layout holds the B * M tokens on one axis."""
    if _varlen(layout):
        z = from_logical(y, _batched(layout), slot)
        return z.reshape((z.shape[0] * z.shape[1],) + z.shape[2:])
    head, slots = _split(layout)
    B, M, H, K = y.shape
    if slots == 0:
        return np.ascontiguousarray(np.transpose(y, ["BMHK".index(c) for c in layout]))
    z = y if head == "BM" else np.transpose(y, (1, 0, 2, 3))
    a, b = z.shape[:2]
    packed = np.zeros((a, b, H, slots, K), dtype=y.dtype)
    packed[:, :, :, slot, :] = z
    return packed.reshape(a, b, H * slots * K)


def _slot_of(layout: str, tensor_index: Optional[int]) -> int:
    slots = _split(layout)[1]
    if slots == 2:
        return (1 if tensor_index is None else tensor_index) - 1
    if slots == 3:
        return 0 if tensor_index is None else tensor_index
    return 0


def _default_output(layout: str) -> str:
    head, slots = _split(layout)
    return layout if slots <= 1 else head + "(HK)"


def _rotate(xl: np.ndarray, positions: np.ndarray, *, mode: str, rotary_size: int, base: float,
            cos: Optional[np.ndarray], sin: Optional[np.ndarray], sign: float,
            inv_freq: Optional[np.ndarray] = None, attention_scaling: float = 1.0) -> np.ndarray:
    """The rotation: xl is (B, M, H, K) float64, positions (B, R, M) int. Angles from the
    tables, else p * inv_freq[i], else p * base ** (-2i/A); cos and sin times attention_scaling."""
    out = xl.copy()
    R = positions.shape[1]
    A = rotary_size // R
    j = np.arange(A)
    i = j % (A // 2) if mode == "plane" else j // 2
    for r in range(R):
        xs = xl[..., r * A:(r + 1) * A]
        if mode == "plane":
            partner = np.concatenate([-xs[..., A // 2:], xs[..., :A // 2]], axis=-1)
        else:
            partner = np.empty_like(xs)
            partner[..., 0::2] = -xs[..., 1::2]
            partner[..., 1::2] = xs[..., 0::2]
        p = positions[:, r, :].astype(np.int64)  # (B, M)
        if cos is not None:
            c = cos.astype(np.float64)[p]  # (B, M, A)
            s = sin.astype(np.float64)[p]
        else:
            if inv_freq is not None:
                theta = np.asarray(inv_freq).astype(np.float64)[i]
            else:
                theta = np.power(np.float64(base), -2.0 * i / A)
            angle = p[..., None].astype(np.float64) * theta
            c, s = np.cos(angle), np.sin(angle)
        c, s = c * attention_scaling, s * attention_scaling
        out[..., r * A:(r + 1) * A] = xs * c[:, :, None, :] + sign * partner * s[:, :, None, :]
    return out


def default_positions(B: int, M: int, seqlen_offsets=None) -> np.ndarray:
    """(B, 1, M) positions without position_ids: token m of sequence b is at m + seqlen_offsets[b]
    (seqlen_offsets: None, an int, or B ints)."""
    pos = np.broadcast_to(np.arange(M, dtype=np.int64), (B, 1, M))
    if seqlen_offsets is None:
        return pos
    offsets = np.broadcast_to(np.asarray(seqlen_offsets, dtype=np.int64).reshape(-1), (B,))
    return pos + offsets[:, None, None]


def _positions(position_ids, layout: str, B: int, M: int, seqlen_offsets, cu_seqlens) -> np.ndarray:
    """(B, R, M) positions of a call: position_ids ((R, T) for a varlen layout), cu_seqlens, or
    the token index plus seqlen_offsets."""
    if position_ids is not None:
        pos = np.asarray(position_ids)
        return pos[None] if _varlen(layout) else pos
    if cu_seqlens is not None:
        return positions_from_cu_seqlens(cu_seqlens, M)
    return default_positions(B, M, seqlen_offsets)


def _rotary_dim(position_ids, layout: str) -> int:
    if position_ids is None:
        return 1
    shape = np.asarray(position_ids).shape
    return shape[0] if _varlen(layout) else shape[1]


def positions_from_cu_seqlens(cu_seqlens, T: int) -> np.ndarray:
    """(1, 1, T) positions of packed tokens: token t of sequence s is at t - cu_seqlens[s]."""
    cu = np.asarray(cu_seqlens, dtype=np.int64)
    t = np.arange(T)
    s = np.searchsorted(cu, t, side="right") - 1
    return (t - cu[s]).reshape(1, 1, T)


def _as_float64(a) -> np.ndarray:
    return np.asarray(a).astype(np.float64)


def rope_reference(x, layout: str = "BMHK", *, cos=None, sin=None, position_ids=None,
                   output_layout: Optional[str] = None, mode: str = "plane",
                   tensor_index: Optional[int] = None, k_size: Optional[int] = None,
                   base: float = 10000.0, rotary_size: Optional[int] = None,
                   seqlen_offsets=None, inv_freq=None, attention_scaling: float = 1.0,
                   cu_seqlens=None) -> np.ndarray:
    """fused_apply_rotary_emb in float64 numpy. x, cos, sin: arrays of any float dtype. A varlen
    layout ((BM)HK, ...) holds T tokens; their positions come from cu_seqlens or position_ids (R, T)."""
    x = _as_float64(x)
    R = _rotary_dim(position_ids, layout)
    K = k_size
    if K is None and _split(layout)[1] == 0:
        K = x.shape[-1]
    if K is None:
        K = np.asarray(cos).shape[1] * R
    xl = to_logical(x, layout, K, _slot_of(layout, tensor_index))
    B, M, H, K = xl.shape
    positions = _positions(position_ids, layout, B, M, seqlen_offsets, cu_seqlens)
    rotary = K if rotary_size is None else rotary_size
    out = _rotate(xl, positions, mode=mode, rotary_size=rotary, base=base,
                  cos=None if cos is None else _as_float64(cos), sin=None if sin is None else _as_float64(sin),
                  sign=1.0, inv_freq=inv_freq, attention_scaling=attention_scaling)
    return from_logical(out, output_layout or _default_output(layout))


def rope_reference_backward(dy, layout: str = "BMHK", *, cos=None, sin=None, position_ids=None,
                            output_layout: Optional[str] = None, mode: str = "plane",
                            tensor_index: Optional[int] = None, k_size: Optional[int] = None,
                            base: float = 10000.0, rotary_size: Optional[int] = None,
                            x_shape: Optional[Tuple[int, ...]] = None, seqlen_offsets=None, inv_freq=None,
                            attention_scaling: float = 1.0, cu_seqlens=None) -> np.ndarray:
    """dL/dx for dL/dout = dy: rotation by the negated angle (cos and sin still times
    attention_scaling: the transpose of the forward), written back into x's layout (zeros in the
    slots of a packed input that were not selected). x_shape gives K when neither the output
    layout, k_size nor a table does (a 4-D x written to a fused output layout)."""
    dy = _as_float64(dy)
    out_layout = output_layout or _default_output(layout)
    R = _rotary_dim(position_ids, layout)
    if _split(out_layout)[1] == 0:
        K = dy.shape[-1]
    elif k_size is not None:
        K = k_size
    elif _split(layout)[1] == 0 and x_shape is not None:
        K = x_shape[-1]
    else:
        K = np.asarray(cos).shape[1] * R
    dyl = to_logical(dy, out_layout, K, 0)
    B, M, H, K = dyl.shape
    positions = _positions(position_ids, layout, B, M, seqlen_offsets, cu_seqlens)
    rotary = K if rotary_size is None else rotary_size
    dx = _rotate(dyl, positions, mode=mode, rotary_size=rotary, base=base,
                 cos=None if cos is None else _as_float64(cos), sin=None if sin is None else _as_float64(sin),
                 sign=-1.0, inv_freq=inv_freq, attention_scaling=attention_scaling)
    return from_logical(dx, layout, slot=_slot_of(layout, tensor_index))


# docs/operator.md, "Precision": bound on |out - reference| for |x| <= 1, by dtype and largest position.
_TOLERANCE = {
    "float16": (2e-3, 1e-2),
    "bfloat16": (1.6e-2, 2e-2),
    "float32": (1e-3, 1e-2),
    "float64": (1e-12, 1e-10),
}


def tolerance(dtype_name: str, max_position: int) -> float:
    short, long = _TOLERANCE[dtype_name]
    return short if max_position < 4096 else long
