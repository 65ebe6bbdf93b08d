"""RoPE scaling as in a Hugging Face transformers config: inverse frequencies and attention factor.

``rope_scaling`` is the dict of a transformers model config (``config.rope_scaling``, called
``rope_parameters`` in transformers 5): ``rope_type`` (or the older key ``type``) is one of
"default", "linear", "dynamic", "yarn", "llama3" or "longrope", with that library's key names and
defaults. :func:`compute_rope_parameters` gives, for a rotated size ``dim``, the inverse
frequencies (``dim / 2`` values; the angle of frequency ``i`` at position ``p`` is
``p * inv_freq[i]``) and the attention factor that multiplies cos and sin, the same numbers that
transformers' ``ROPE_INIT_FUNCTIONS[rope_type]`` computes for the same config. The formulas are
written here from transformers' ``modeling_rope_utils.py``; transformers evaluates them in
float32, this module in float64 (round the result to float32 once to get transformers' values up to
float32 rounding).

The formulas, with ``i = 0 .. dim/2 - 1`` and ``default_i = base ** (-2 i / dim)``:

============ ==================================================================================
rope_type    inverse frequency i; attention factor (1 unless given)
============ ==================================================================================
default      default_i
linear       default_i / factor
dynamic      the default formula with base replaced by
             ``base * (factor * L / max_pos - (factor - 1)) ** (dim / (dim - 2))``, where
             ``L = max(seq_len, max_pos)`` and seq_len is the longest position of the call + 1
             (at ``L = max_pos`` this is the default)
yarn         ``default_i * (ramp_i / factor + 1 - ramp_i)``, ramp_i = clamp((i - low) / (high - low),
             0, 1) with low/high the correction dims of beta_fast / beta_slow (floored / ceiled
             when ``truncate``, then clipped to [0, dim - 1]); attention factor
             ``attention_factor``, else ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)``
             when both are non-zero, else ``mscale(factor)``, with
             ``mscale(s, m=1) = 1 if s <= 1 else 0.1 * m * ln(s) + 1``
llama3       wavelength ``w_i = 2 pi / default_i``: default_i when ``w_i < orig / high_freq_factor``,
             default_i / factor when ``w_i > orig / low_freq_factor``, else
             ``(1 - s) * default_i / factor + s * default_i`` with
             ``s = (orig / w_i - low_freq_factor) / (high_freq_factor - low_freq_factor)``
longrope     ``default_i / ext_i``, ext = long_factor when seq_len > orig, else short_factor;
             attention factor ``attention_factor``, else 1 when factor <= 1, else
             ``sqrt(1 + ln(factor) / ln(orig))``
============ ==================================================================================

``orig`` is ``original_max_position_embeddings``; when the dict lacks it, it is
``max_position_embeddings`` (transformers' ``standardize_rope_params``). A yarn or longrope
``factor`` of None (for longrope also a missing one) is ``max_position_embeddings / orig``.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Mapping, Optional, Tuple

import numpy as np

__all__ = ["ROPE_TYPES", "RopeScaling", "parse_rope_scaling", "compute_rope_parameters"]

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "longrope")

# The keys each rope_type reads (transformers' names). Every type also accepts rope_type / type,
# rope_theta (must equal `base`) and partial_rotary_factor (not used: `dim` is the rotated size).
_TYPE_KEYS = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor", "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
             "mscale", "mscale_all_dim", "truncate"),
    "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
    "longrope": ("factor", "original_max_position_embeddings", "attention_factor", "short_factor",
                 "long_factor"),
}
_REQUIRED_KEYS = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "yarn": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
    "longrope": ("short_factor", "long_factor"),
}
_COMMON_KEYS = ("rope_type", "type", "rope_theta", "partial_rotary_factor")


@dataclass(frozen=True)
class RopeScaling:
    """A ``rope_scaling`` dict resolved for one rotated size: every default and fallback applied.

    ``factor`` is the scaling factor the formulas use (1 for "default"); ``attention_factor`` the
    number cos and sin are multiplied by. ``short_factor`` / ``long_factor`` are set for
    "longrope" only.
    """

    rope_type: str
    dim: int
    base: float
    max_position_embeddings: int
    factor: float = 1.0
    original_max_position_embeddings: int = 0
    attention_factor: float = 1.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    short_factor: Optional[Tuple[float, ...]] = None
    long_factor: Optional[Tuple[float, ...]] = None

    def inv_freq(self, seq_len: Optional[int] = None) -> np.ndarray:
        """The ``dim / 2`` inverse frequencies in float64 for a call whose longest position is
        ``seq_len - 1`` (None: at initialisation, as transformers' init). Only "dynamic" and
        "longrope" depend on ``seq_len``."""
        exponent = np.arange(0, self.dim, 2, dtype=np.float64) / self.dim  # 2 i / dim
        default = 1.0 / np.power(self.base, exponent)
        kind = self.rope_type
        if kind == "default":
            return default
        if kind == "linear":
            return default / self.factor
        if kind == "dynamic":
            length = self.max_position_embeddings if seq_len is None else max(seq_len, self.max_position_embeddings)
            base = self.base * (self.factor * length / self.max_position_embeddings
                                - (self.factor - 1.0)) ** (self.dim / (self.dim - 2))
            return 1.0 / np.power(base, exponent)
        if kind == "yarn":
            low, high = self.yarn_correction_range()
            if low == high:
                high += 0.001  # transformers' guard against a zero-width ramp
            ramp = np.clip((np.arange(self.dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
            # ramp 0: extrapolation (the default frequency), ramp 1: interpolation (divided by factor)
            return default / self.factor * ramp + default * (1.0 - ramp)
        if kind == "llama3":
            orig = self.original_max_position_embeddings
            wavelength = 2.0 * math.pi / default
            scaled = default / self.factor
            smooth = (orig / wavelength - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
            blended = (1.0 - smooth) * scaled + smooth * default
            long_wave = wavelength > orig / self.low_freq_factor
            short_wave = wavelength < orig / self.high_freq_factor
            return np.where(short_wave, default, np.where(long_wave, scaled, blended))
        if kind == "longrope":
            use_long = seq_len is not None and seq_len > self.original_max_position_embeddings
            ext = np.asarray(self.long_factor if use_long else self.short_factor, dtype=np.float64)
            return default / ext
        raise AssertionError(kind)  # parse_rope_scaling admits only ROPE_TYPES

    def yarn_correction_range(self) -> Tuple[float, float]:
        """yarn: the dims (low, high) between which the ramp goes from extrapolation to
        interpolation, before the zero-width guard."""

        def correction_dim(rotations: float) -> float:
            # the dim whose wavelength fits `rotations` times into the original context
            return (self.dim * math.log(self.original_max_position_embeddings / (rotations * 2.0 * math.pi))
                    / (2.0 * math.log(self.base)))

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        return max(low, 0), min(high, self.dim - 1)


def _number(value: object, key: str, *, positive: bool = True, allow_zero: bool = False) -> float:
    """A finite real number from the dict (not a bool), > 0 (or >= 0) when asked."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise TypeError(f"rope_scaling['{key}']: got {value!r}, expected a finite number")
    value = float(value)
    if positive and (value < 0 or (value == 0 and not allow_zero)):
        raise ValueError(f"rope_scaling['{key}']: got {value!r}, expected a number "
                         f"{'>= 0' if allow_zero else '> 0'}")
    return value


def _length(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) <= 0:
        raise ValueError(f"{key}: got {value!r}, expected a positive int")
    return int(value)


def _factor_list(value: object, key: str, dim: int) -> Tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise TypeError(f"rope_scaling['{key}']: got {value!r}, expected a list of dim / 2 = {dim // 2} numbers")
    if len(value) != dim // 2:
        raise ValueError(f"rope_scaling['{key}']: got {len(value)} numbers, expected dim / 2 = {dim // 2} "
                         f"(dim={dim})")
    return tuple(_number(v, key) for v in value)


def parse_rope_scaling(
    rope_scaling: Optional[Mapping[str, object]],
    *,
    dim: int,
    base: float = 10000.0,
    max_position_embeddings: int = 2048,
) -> RopeScaling:
    """Checks a transformers ``rope_scaling`` dict and resolves its defaults and fallbacks.

    Args:
        rope_scaling: None (plain RoPE) or a dict with ``rope_type`` (or ``type``) and the keys of
            that type, named as in transformers (see the module docstring).
        dim: the number of rotated dims per head (even); transformers' ``head_dim *
            partial_rotary_factor``.
        base: the RoPE base (transformers' ``rope_theta``).
        max_position_embeddings: the model's ``max_position_embeddings``.

    Returns:
        A :class:`RopeScaling`. Raises ValueError / TypeError naming the argument or the
        ``rope_scaling`` key, the value and what was expected; warns for keys the type does not use.

    Example::

        >>> s = parse_rope_scaling({"rope_type": "yarn", "factor": 4.0}, dim=64, max_position_embeddings=4096)
        >>> s.original_max_position_embeddings, round(s.attention_factor, 4)
        (4096, 1.1386)
    """
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim <= 0 or dim % 2:
        raise ValueError(f"dim: got {dim!r}, expected a positive even int (the number of rotated dims per head)")
    dim = int(dim)
    if isinstance(base, bool) or not isinstance(base, numbers.Real) or not math.isfinite(base) or base <= 0:
        raise ValueError(f"base: got {base!r}, expected a finite number > 0")
    base = float(base)
    max_pos = _length(max_position_embeddings, "max_position_embeddings")

    if rope_scaling is None:
        return RopeScaling("default", dim, base, max_pos, original_max_position_embeddings=max_pos)
    if not isinstance(rope_scaling, Mapping):
        raise TypeError(f"rope_scaling: got {type(rope_scaling).__name__} {rope_scaling!r}, expected None or a dict "
                        "such as {'rope_type': 'llama3', 'factor': 8.0, ...}")
    kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_scaling['rope_type']: got {kind!r}, expected one of {', '.join(ROPE_TYPES)}")
    for key in _REQUIRED_KEYS[kind]:
        if key not in rope_scaling:
            raise ValueError(f"rope_scaling: rope_type '{kind}' needs the key '{key}'; got keys {sorted(rope_scaling)}")
    unused = [key for key in rope_scaling if key not in _TYPE_KEYS[kind] and key not in _COMMON_KEYS]
    if unused:
        warnings.warn(f"rope_scaling: keys {unused} are not used by rope_type '{kind}' (it reads "
                      f"{', '.join(_TYPE_KEYS[kind]) or 'no other key'})", stacklevel=3)
    theta = rope_scaling.get("rope_theta")
    if theta is not None and float(theta) != base:
        raise ValueError(f"rope_scaling['rope_theta']: got {theta!r}, but base={base!r}; they name the same "
                         "number, give it once (as base)")

    def get(key: str) -> object:
        return rope_scaling.get(key)

    orig = get("original_max_position_embeddings")
    orig = max_pos if orig is None else _length(orig, "rope_scaling['original_max_position_embeddings']")
    fields = dict(original_max_position_embeddings=orig)

    if kind in ("linear", "dynamic", "llama3"):
        fields["factor"] = _number(get("factor"), "factor")
    if kind == "dynamic" and dim <= 2:
        raise ValueError(f"dim: got {dim}, but rope_type 'dynamic' scales the base by a power dim / (dim - 2); "
                         "expected dim >= 4")
    if kind == "yarn":
        factor = max_pos / orig if get("factor") is None else _number(get("factor"), "factor")
        if base == 1.0:
            raise ValueError("base: got 1.0, but rope_type 'yarn' divides by ln(base); expected base != 1")

        def mscale(scale: float, multiplier: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * multiplier * math.log(scale) + 1.0

        attention = get("attention_factor")
        if attention is not None:
            attention = _number(attention, "attention_factor", allow_zero=True)
        else:
            ms = get("mscale")
            ms_all = get("mscale_all_dim")
            ms = None if ms is None else _number(ms, "mscale", positive=False)
            ms_all = None if ms_all is None else _number(ms_all, "mscale_all_dim", positive=False)
            # transformers tests truthiness: a 0 (or missing) mscale or mscale_all_dim means mscale(factor)
            attention = mscale(factor, ms) / mscale(factor, ms_all) if ms and ms_all else mscale(factor)
        truncate = get("truncate")
        if truncate is None:
            truncate = True
        elif not isinstance(truncate, bool):
            raise TypeError(f"rope_scaling['truncate']: got {truncate!r}, expected True or False")
        # `or` as in transformers: a missing, None or 0 beta takes the paper's default
        beta_fast = _number(get("beta_fast") or 32, "beta_fast")
        beta_slow = _number(get("beta_slow") or 1, "beta_slow")
        fields.update(factor=factor, attention_factor=attention, beta_fast=beta_fast, beta_slow=beta_slow,
                      truncate=truncate)
    if kind == "llama3":
        low = _number(get("low_freq_factor"), "low_freq_factor")
        high = _number(get("high_freq_factor"), "high_freq_factor")
        if high <= low:
            raise ValueError(f"rope_scaling['high_freq_factor']: got {high!r}, expected more than "
                             f"low_freq_factor={low!r}")
        fields.update(low_freq_factor=low, high_freq_factor=high)
    if kind == "longrope":
        factor = max_pos / orig if get("factor") is None else _number(get("factor"), "factor")
        attention = get("attention_factor")
        if attention is not None:
            attention = _number(attention, "attention_factor", allow_zero=True)
        elif factor <= 1.0:
            attention = 1.0
        else:
            if orig == 1:
                raise ValueError("rope_scaling['original_max_position_embeddings']: got 1, but the longrope "
                                 "attention factor divides by its log; expected more than 1")
            attention = math.sqrt(1.0 + math.log(factor) / math.log(orig))
        fields.update(factor=factor, attention_factor=attention,
                      short_factor=_factor_list(get("short_factor"), "short_factor", dim),
                      long_factor=_factor_list(get("long_factor"), "long_factor", dim))
    return RopeScaling(kind, dim, base, max_pos, **fields)


def compute_rope_parameters(
    dim: int,
    base: float = 10000.0,
    max_position_embeddings: int = 2048,
    rope_scaling: Optional[Mapping[str, object]] = None,
    *,
    seq_len: Optional[int] = None,
) -> Tuple[np.ndarray, float]:
    """Inverse frequencies and attention factor of a transformers ``rope_scaling`` config.

    The counterpart of transformers' ``ROPE_INIT_FUNCTIONS[rope_type](config, device, seq_len)``
    for a config with ``rope_theta=base``, ``max_position_embeddings`` and a rotated size ``dim``
    (``head_dim * partial_rotary_factor``).

    Args:
        dim, base, max_position_embeddings, rope_scaling: as for :func:`parse_rope_scaling`.
        seq_len: the longest position of a call plus one; None means initialisation. Used by
            "dynamic" (the base grows once seq_len exceeds max_position_embeddings) and
            "longrope" (long factors once it exceeds original_max_position_embeddings).

    Returns:
        ``(inv_freq, attention_factor)``: a float64 numpy array of shape (dim / 2,) and a float.

    Example::

        >>> inv_freq, attention = compute_rope_parameters(
        ...     128, 500000.0, 131072, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        ...                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
        >>> inv_freq.shape, attention
        ((64,), 1.0)
    """
    scaling = parse_rope_scaling(rope_scaling, dim=dim, base=base, max_position_embeddings=max_position_embeddings)
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, numbers.Integral)):
        raise TypeError(f"seq_len: got {seq_len!r}, expected None or an int")
    return scaling.inv_freq(None if seq_len is None else int(seq_len)), scaling.attention_factor
