"""``RotaryEmbedding``: an nn.Module that rotates q and k, with transformers-style ``rope_scaling``.

The module holds the inverse frequencies of its ``rope_scaling`` (see :mod:`oneflow_rope.rope_scaling`)
and the attention factor, and applies them to q and k in the fused op: no cos/sin table is kept.
"""

from __future__ import annotations

import copy
import math
import numbers
from typing import Mapping, Optional, Tuple, Union

import numpy as np
import oneflow as flow
import oneflow.nn as nn

from .layout import MODES, parse_layout
from .ops import _FLOAT_DTYPES, _INDEX_DTYPES, _check_tensor, fused_apply_rotary_emb_qk
from .rope_scaling import RopeScaling, parse_rope_scaling

__all__ = ["RotaryEmbedding"]

# The longest position of a call: a Python int when the call's shapes fix it, else a 0-d tensor.
_Position = Union[int, flow.Tensor]


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (RoPE) of q and k, with the ``rope_scaling`` of a transformers config.

    Args:
        dim: the number of dims rotated in each head (even), from the first; the others pass
            through unchanged (partial rotation when ``dim`` < head size, as transformers'
            ``head_dim * partial_rotary_factor``).
        max_position_embeddings: the model's ``max_position_embeddings``.
        base: the RoPE base (transformers' ``rope_theta``).
        rope_scaling: None, or a transformers ``rope_scaling`` dict: ``rope_type`` (or ``type``)
            "default", "linear", "dynamic", "yarn", "llama3" or "longrope" and the keys of that
            type (factor, original_max_position_embeddings, beta_fast, beta_slow, mscale,
            mscale_all_dim, attention_factor, truncate, low_freq_factor, high_freq_factor,
            short_factor, long_factor), with transformers' defaults.
        mode: "plane" (rotate half: LLaMA, GPT-NeoX; transformers' ``rotate_half``) or
            "interval" (adjacent pairs: GPT-J).
        device: where the buffers live (default CPU); ``.to(device)`` moves them later.

    Attributes:
        inv_freq: float32 buffer (dim / 2,), not saved in the state dict: the inverse
            frequencies at initialisation, as transformers' ``inv_freq``.
        attention_scaling: the float that multiplies cos and sin (transformers' attention factor).
        scaling: the resolved :class:`~oneflow_rope.rope_scaling.RopeScaling`.

    "dynamic" and "longrope" follow the longest position of each call (its largest position + 1,
    as transformers' ``dynamic_rope_update``): "dynamic" grows the base once it exceeds
    ``max_position_embeddings``, "longrope" takes the long factors once it exceeds
    ``original_max_position_embeddings``. That position is read on the device (no host
    synchronisation), so eager mode and ``nn.Graph`` behave alike; see :meth:`inv_freq_for`.

    Example::

        >>> rope = RotaryEmbedding(128, 131072, 500000.0, rope_scaling={
        ...     "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        ...     "original_max_position_embeddings": 8192})
        >>> q, k = flow.randn(2, 16, 32, 128), flow.randn(2, 16, 8, 128)     # (B, M, H, K), GQA
        >>> q_rot, k_rot = rope(q, k, output_layout="BHMK")                  # (2, 32, 16, 128), (2, 8, 16, 128)
        >>> q1, k1 = rope(q[:, :1], k[:, :1], seqlen_offsets=flow.tensor([16, 9]))  # one decode step
    """

    def __init__(
        self,
        dim: int,
        max_position_embeddings: int = 2048,
        base: float = 10000.0,
        *,
        rope_scaling: Optional[Mapping[str, object]] = None,
        mode: str = "plane",
        device: Union[str, flow.device, None] = None,
    ) -> None:
        super().__init__()
        if not isinstance(mode, str) or mode not in MODES:
            raise ValueError(f"mode: got {mode!r}, expected one of {', '.join(repr(m) for m in MODES)}")
        self.scaling: RopeScaling = parse_rope_scaling(
            rope_scaling, dim=dim, base=base, max_position_embeddings=max_position_embeddings)
        self.dim = self.scaling.dim
        self.max_position_embeddings = self.scaling.max_position_embeddings
        self.base = self.scaling.base
        self.mode = mode
        self.rope_type = self.scaling.rope_type
        self.rope_scaling = copy.deepcopy(dict(rope_scaling)) if rope_scaling is not None else None
        self.attention_scaling = float(self.scaling.attention_factor)
        device = flow.device("cpu") if device is None else flow.device(device)

        def buffer(values: np.ndarray, dtype: flow.dtype) -> flow.Tensor:
            return flow.tensor(np.ascontiguousarray(values), dtype=dtype, device=device)

        # float64 formulas rounded once to float32, the dtype transformers keeps them in
        self.register_buffer("inv_freq", buffer(self.scaling.inv_freq(None).astype(np.float32), flow.float32),
                             persistent=False)
        if self.rope_type == "dynamic":  # 2 i / dim, for the frequencies of a grown base
            self.register_buffer("dynamic_exponent", buffer(np.arange(0, self.dim, 2) / self.dim, flow.float64),
                                 persistent=False)
        if self.rope_type == "longrope":  # inv_freq holds the short factors' frequencies
            long_seq_len = self.scaling.original_max_position_embeddings + 1
            self.register_buffer("long_inv_freq", buffer(self.scaling.inv_freq(long_seq_len).astype(np.float32),
                                                         flow.float32), persistent=False)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, max_position_embeddings={self.max_position_embeddings}, base={self.base}, "
                f"rope_type={self.rope_type!r}, mode={self.mode!r}, attention_scaling={self.attention_scaling:.6g}")

    def inv_freq_for(self, longest_position: _Position) -> flow.Tensor:
        """The float32 inverse frequencies (dim / 2,) for a call whose largest position is
        ``longest_position`` (an int, or a 0-d integer tensor on the buffers' device).

        Only "dynamic" and "longrope" depend on it; the others return :attr:`inv_freq`. With
        ``seq_len = longest_position + 1``: "dynamic" uses the base
        ``base * (factor * seq_len / max_position_embeddings - (factor - 1)) ** (dim / (dim - 2))``
        once seq_len > max_position_embeddings (computed in float64, rounded to float32);
        "longrope" the long factors once seq_len > original_max_position_embeddings. For a tensor
        the choice is made on the device, so it needs no synchronisation and works in ``nn.Graph``.
        """
        kind = self.rope_type
        if kind not in ("dynamic", "longrope"):
            return self.inv_freq
        known = isinstance(longest_position, numbers.Integral)
        seq_len = longest_position + 1
        if kind == "longrope":
            limit = self.scaling.original_max_position_embeddings
            if known:
                return self.long_inv_freq if seq_len > limit else self.inv_freq
            use_long = (seq_len > limit).to(flow.float32)  # 0 or 1: the blend below picks one exactly
            return self.inv_freq * (1.0 - use_long) + self.long_inv_freq * use_long

        max_pos, factor = self.max_position_embeddings, self.scaling.factor
        power = self.dim / (self.dim - 2)
        if known:
            if seq_len <= max_pos:
                return self.inv_freq
            log_base = math.log(self.base) + power * math.log(factor * seq_len / max_pos - (factor - 1.0))
            return flow.exp(self.dynamic_exponent * -log_base).to(flow.float32)
        length = flow.clamp(seq_len.to(flow.float64), min=float(max_pos))
        log_base = flow.log(length * factor / max_pos - (factor - 1.0)) * power + math.log(self.base)
        grown = flow.exp(self.dynamic_exponent * -log_base).to(flow.float32)
        use_grown = (seq_len > max_pos).to(flow.float32)
        return self.inv_freq * (1.0 - use_grown) + grown * use_grown

    def forward(
        self,
        q: flow.Tensor,
        k: Optional[flow.Tensor],
        position_ids: Optional[flow.Tensor] = None,
        *,
        seqlen_offsets: Union[int, flow.Tensor, None] = None,
        layout: str = "BMHK",
        output_layout: Optional[str] = None,
        k_size: Optional[int] = None,
        cu_seqlens: Optional[flow.Tensor] = None,
    ) -> Tuple[flow.Tensor, flow.Tensor]:
        """Rotates the first ``dim`` dims of every head of q and k.

        Args:
            q: queries in ``layout`` (any float dtype of the op): (B, M, Hq, K) for "BMHK",
                (B, Hq, M, K) for "BHMK", (M, B, Hq, K) for "MBHK", (B, M, Hq*K) for "BM(HK)",
                (M, B, Hq*K) for "MB(HK)"; or a packed (B, M, H*3*K) "BM(H3K)" / "MB(H3K)" tensor,
                with ``k=None``, whose query and key slots are rotated. The varlen layouts hold
                the T tokens of packed sequences: (T, Hq, K) "(BM)HK", (T, Hq*K) "(BM)(HK)",
                (T, H*3*K) "(BM)(H3K)", with ``cu_seqlens`` or position_ids (T,) / (1, T).
            k: keys in the same layout, with their own head count Hk (GQA / MQA), or None for a
                packed q.
            position_ids: optional int32/int64 positions, (B, M) as in transformers or (B, 1, M)
                as the op takes them ((T,) or (1, T) for a varlen layout). Default: token m of
                sequence b is at ``seqlen_offsets[b] + m``.
            seqlen_offsets: optional int, or int32/int64 tensor (B,): the position of each
                sequence's first token (a KV-cache decode step). Not together with position_ids.
            layout: layout of q and k (see above); default "BMHK".
            output_layout: BMHK, BHMK, MBHK, BM(HK) or MB(HK); default the input layout (for a
                packed q, its unpacked form).
            k_size: head size K for the fused layouts (BM(HK), BM(H3K), ...); default ``dim``.
            cu_seqlens: for a varlen layout, int32/int64 (S+1,): sequence s holds tokens
                cu_seqlens[s] to cu_seqlens[s+1] - 1, token t of it is at t - cu_seqlens[s].

        Returns:
            ``(q_rot, k_rot)``, new tensors in ``output_layout``. Differentiable in q and k.

        Example::

            >>> rope = RotaryEmbedding(64)
            >>> q, k = flow.randn(1, 10, 8, 64), flow.randn(1, 10, 2, 64)
            >>> q_rot, k_rot = rope(q, k, position_ids=flow.arange(10).reshape(1, 10))
        """
        info = parse_layout(layout, "layout")
        _check_tensor(q, "q", _FLOAT_DTYPES, "float16, bfloat16, float32 or float64")
        if k is None:
            if info.slots != 3:
                raise ValueError(f"k: got None with layout {info.name}; only a packed query-key-value q "
                                 "(layout BM(H3K), MB(H3K) or (BM)(H3K)) holds its own keys")
        else:
            _check_tensor(k, "k", _FLOAT_DTYPES, "float16, bfloat16, float32 or float64")
            if info.slots != 1:
                raise ValueError(f"k: got a tensor with the packed layout {info.name}; pass k=None to rotate "
                                 "the query and key slots of a packed q")
        if info.fused:
            if k_size is None:
                k_size = self.dim
            elif isinstance(k_size, bool) or not isinstance(k_size, numbers.Integral) or k_size <= 0:
                raise ValueError(f"k_size: got {k_size!r}, expected a positive int (the head size)")
            head_sizes = {"k_size": int(k_size)}
        else:
            if k_size is not None and k_size != q.shape[-1]:
                raise ValueError(f"k_size: got {k_size!r} but q of layout {info.name} has head size {q.shape[-1]}")
            head_sizes = {"q": q.shape[-1]} if k is None else {"q": q.shape[-1], "k": k.shape[-1]}
            k_size = None
        for name, size in head_sizes.items():
            if size < self.dim:
                raise ValueError(f"dim: RotaryEmbedding(dim={self.dim}) rotates {self.dim} dims of each head, but "
                                 f"{name} has head size {size}; expected dim <= head size")
        if not q.is_global and not q.is_lazy and q.device != self.inv_freq.device:
            raise ValueError(f"q: is on {q.device} but the module's buffers are on {self.inv_freq.device}; "
                             "move the module with .to(device)")
        position_ids = _op_position_ids(position_ids, info.varlen)
        _check_offsets(seqlen_offsets, position_ids)

        inv_freq = self.inv_freq
        if self.rope_type in ("dynamic", "longrope"):
            longest = _longest_position(q.shape[info.seq_axis], position_ids, seqlen_offsets, cu_seqlens)
            inv_freq = self.inv_freq_for(longest)
        return _rotate_qk(q, k, position_ids, seqlen_offsets, layout=info.name, output_layout=output_layout,
                          mode=self.mode, rotary_size=self.dim, k_size=k_size, inv_freq=inv_freq,
                          attention_scaling=self.attention_scaling, cu_seqlens=cu_seqlens)


def _op_position_ids(position_ids: Optional[flow.Tensor], varlen: bool = False) -> Optional[flow.Tensor]:
    """(B, M) or (B, 1, M) integer positions as the op's (B, 1, M); (T,) or (1, T) as (1, T) for a
    varlen layout."""
    if position_ids is None:
        return None
    _check_tensor(position_ids, "position_ids", _INDEX_DTYPES, "int32 or int64")
    shape = tuple(position_ids.shape)
    if varlen:
        if len(shape) == 1:
            return position_ids.unsqueeze(0)
        if len(shape) == 2 and shape[0] == 1:
            return position_ids
        raise ValueError(f"position_ids: got shape {shape}, expected (T,) or (1, T) for a varlen layout "
                         "(RotaryEmbedding rotates with one position per token)")
    if len(shape) == 2:
        return position_ids.unsqueeze(1)
    if len(shape) == 3 and shape[1] == 1:
        return position_ids
    raise ValueError(f"position_ids: got shape {shape}, expected (B, M) or (B, 1, M) (RotaryEmbedding rotates "
                     "with one position per token)")


def _check_offsets(seqlen_offsets: Union[int, flow.Tensor, None], position_ids: Optional[flow.Tensor]) -> None:
    if seqlen_offsets is None:
        return
    if position_ids is not None:
        raise ValueError("seqlen_offsets: got both seqlen_offsets and position_ids; give one of them "
                         "(position_ids already says where every token is)")
    if isinstance(seqlen_offsets, flow.Tensor):
        if seqlen_offsets.dtype not in _INDEX_DTYPES or seqlen_offsets.ndim != 1:
            raise TypeError(f"seqlen_offsets: got a {seqlen_offsets.dtype} tensor of shape "
                            f"{tuple(seqlen_offsets.shape)}, expected an int32 or int64 tensor of shape (B,)")
    elif isinstance(seqlen_offsets, bool) or not isinstance(seqlen_offsets, numbers.Integral):
        raise TypeError(f"seqlen_offsets: got {seqlen_offsets!r}, expected an int or an int32/int64 tensor (B,)")


def _longest_position(seq_len: int, position_ids: Optional[flow.Tensor],
                      seqlen_offsets: Union[int, flow.Tensor, None],
                      cu_seqlens: Optional[flow.Tensor] = None) -> _Position:
    """The largest position of the call: an int when the shapes fix it, else a 0-d tensor."""
    if seq_len == 0:
        return 0
    if position_ids is not None:
        return position_ids.max()
    if cu_seqlens is not None and cu_seqlens.shape[0] > 1:  # the longest packed sequence, minus one
        return (cu_seqlens[1:] - cu_seqlens[:-1]).max() - 1
    if seqlen_offsets is None:
        return seq_len - 1
    if isinstance(seqlen_offsets, flow.Tensor):
        return seqlen_offsets.max() + (seq_len - 1)
    return int(seqlen_offsets) + seq_len - 1


def _rotate_qk(q: flow.Tensor, k: Optional[flow.Tensor], position_ids: Optional[flow.Tensor],
               seqlen_offsets: Union[int, flow.Tensor, None], *, layout: str, output_layout: Optional[str],
               mode: str, rotary_size: int, k_size: Optional[int], inv_freq: flow.Tensor,
               attention_scaling: float, cu_seqlens: Optional[flow.Tensor] = None) -> Tuple[flow.Tensor, flow.Tensor]:
    """The one place the module calls the op: q and k in one launch, angles p * inv_freq on the device."""
    return fused_apply_rotary_emb_qk(q, k, position_ids=position_ids, layout=layout, output_layout=output_layout,
                                     mode=mode, rotary_size=rotary_size, k_size=k_size,
                                     seqlen_offsets=seqlen_offsets, inv_freq=inv_freq,
                                     attention_scaling=attention_scaling, cu_seqlens=cu_seqlens)
