"""The inverse frequencies and attention factor of every transformers ``rope_type``, against values
derived here from the published formulas (float64, plain Python ``math`` per frequency, no code
shared with ``oneflow_rope.rope_scaling``), with the defaults and fallbacks of transformers'
``modeling_rope_utils.py``:

* RoFormer (Su et al. 2021): theta_i = base^(-2i/d).
* linear / position interpolation (kaiokendev; Chen et al. 2023): theta_i / factor.
* dynamic NTK (bloc97, emozilla): base * (factor * L / max_pos - (factor - 1))^(d / (d - 2)),
  L = max(seq_len, max_pos).
* YaRN (Peng et al. 2023): ramp between interpolation and extrapolation over the dims whose
  wavelength fits between beta_slow and beta_fast turns into the original context; attention
  factor 0.1 ln(s) + 1 (and DeepSeek's mscale / mscale_all_dim ratio).
* Llama 3.1 (Meta's reference code): keep short wavelengths, divide long ones by factor, blend
  between with s = (orig / wavelength - low) / (high - low).
* LongRoPE (Ding et al. 2024; Phi-3): theta_i / ext_i with short or long factors; attention factor
  sqrt(1 + ln(s) / ln(orig)).

A few numbers are also checked against values worked out by hand (in the comments).
"""

from __future__ import annotations

import math
import warnings
from typing import List, Optional

import numpy as np
import pytest

import oneflow_rope
from oneflow_rope.rope_scaling import ROPE_TYPES, compute_rope_parameters, parse_rope_scaling


# ---- expected values, from the formulas ---------------------------------------------------------

def theta(dim: int, base: float, i: int) -> float:
    return base ** (-2.0 * i / dim)


def expected_default(dim: int, base: float) -> List[float]:
    return [theta(dim, base, i) for i in range(dim // 2)]


def expected_linear(dim: int, base: float, factor: float) -> List[float]:
    return [theta(dim, base, i) / factor for i in range(dim // 2)]


def expected_dynamic(dim: int, base: float, max_pos: int, factor: float, seq_len: Optional[int]) -> List[float]:
    length = max_pos if seq_len is None or seq_len < max_pos else seq_len
    grown = base * ((factor * length / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    return [theta(dim, grown, i) for i in range(dim // 2)]


def yarn_mscale(scale: float, m: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


def expected_yarn(dim: int, base: float, orig: int, factor: float, beta_fast: float = 32, beta_slow: float = 1,
                  truncate: bool = True) -> List[float]:
    # dim index at which the wavelength 2 pi / theta_i fits `r` times into orig
    def dim_of(r: float) -> float:
        return dim * math.log(orig / (r * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(beta_fast), dim_of(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if high == low:
        high = high + 0.001
    values = []
    for i in range(dim // 2):
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)  # 0: extrapolate, 1: interpolate
        values.append((1 - ramp) * theta(dim, base, i) + ramp * theta(dim, base, i) / factor)
    return values


def expected_llama3(dim: int, base: float, factor: float, low: float, high: float, orig: int) -> List[float]:
    values = []
    for i in range(dim // 2):
        t = theta(dim, base, i)
        wavelength = 2 * math.pi / t
        if wavelength < orig / high:
            values.append(t)
        elif wavelength > orig / low:
            values.append(t / factor)
        else:
            s = (orig / wavelength - low) / (high - low)
            values.append((1 - s) * t / factor + s * t)
    return values


def expected_longrope(dim: int, base: float, ext: List[float]) -> List[float]:
    return [theta(dim, base, i) / ext[i] for i in range(dim // 2)]


def longrope_attention(factor: float, orig: int) -> float:
    return 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(orig))


def check(got: np.ndarray, expected: List[float], rtol: float = 1e-12) -> None:
    assert got.dtype == np.float64 and got.shape == (len(expected),)
    np.testing.assert_allclose(got, np.array(expected), rtol=rtol, atol=0)


def check_module(dim, max_pos, base, rope_scaling, expected: List[float], attention: float) -> None:
    """The module's float32 buffer is the expected value rounded once (within 1e-7 relative)."""
    rope = oneflow_rope.RotaryEmbedding(dim, max_pos, base, rope_scaling=rope_scaling)
    got = rope.inv_freq.numpy()
    assert got.dtype == np.float32 and got.shape == (dim // 2,)
    np.testing.assert_allclose(got.astype(np.float64), np.array(expected), rtol=1e-7, atol=0)
    assert rope.attention_scaling == pytest.approx(attention, rel=1e-14)


# ---- default, linear -----------------------------------------------------------------------------

@pytest.mark.parametrize("rope_scaling", [None, {}, {"rope_type": "default"}, {"type": "default"}])
def test_default(rope_scaling):
    inv_freq, attention = compute_rope_parameters(64, 10000.0, 2048, rope_scaling)
    check(inv_freq, expected_default(64, 10000.0))
    assert inv_freq[0] == 1.0 and inv_freq[1] == pytest.approx(10000.0 ** (-2 / 64), rel=1e-15)
    assert attention == 1.0
    check_module(64, 2048, 10000.0, rope_scaling, expected_default(64, 10000.0), 1.0)


@pytest.mark.parametrize("key", ["rope_type", "type"])
def test_linear(key):
    config = {key: "linear", "factor": 4.0}
    inv_freq, attention = compute_rope_parameters(32, 500000.0, 4096, config)
    check(inv_freq, expected_linear(32, 500000.0, 4.0))
    assert inv_freq[0] == 0.25 and attention == 1.0
    check_module(32, 4096, 500000.0, config, expected_linear(32, 500000.0, 4.0), 1.0)


def test_rope_type_key_wins_over_the_older_type_key():
    inv_freq, _ = compute_rope_parameters(16, 10000.0, 64, {"rope_type": "linear", "type": "default", "factor": 2.0})
    check(inv_freq, expected_linear(16, 10000.0, 2.0))


# ---- dynamic ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("seq_len", [None, 1, 63, 64, 65, 200, 10 ** 6])
def test_dynamic_follows_the_sequence_length(seq_len):
    config = {"rope_type": "dynamic", "factor": 2.0}
    inv_freq, attention = compute_rope_parameters(16, 10000.0, 64, config, seq_len=seq_len)
    check(inv_freq, expected_dynamic(16, 10000.0, 64, 2.0, seq_len))
    assert attention == 1.0
    if seq_len is None or seq_len <= 64:  # within max_position_embeddings: plain RoPE
        check(inv_freq, expected_default(16, 10000.0))
    if seq_len == 200:  # by hand: base 10000 * (2 * 200 / 64 - 1) ** (16 / 14) = 10000 * 5.25 ** (8 / 7)
        assert inv_freq[1] == pytest.approx((10000.0 * 5.25 ** (8 / 7)) ** (-2 / 16), rel=1e-14)


def test_dynamic_module_starts_as_default():
    check_module(16, 64, 10000.0, {"rope_type": "dynamic", "factor": 2.0}, expected_default(16, 10000.0), 1.0)


# ---- yarn ------------------------------------------------------------------------------------------

def test_yarn_defaults():
    # beta_fast 32, beta_slow 1, truncate, orig = max_position_embeddings, attention 0.1 ln 4 + 1
    config = {"rope_type": "yarn", "factor": 4.0}
    inv_freq, attention = compute_rope_parameters(64, 10000.0, 4096, config)
    check(inv_freq, expected_yarn(64, 10000.0, 4096, 4.0))
    assert attention == pytest.approx(0.1 * math.log(4.0) + 1.0, rel=1e-15)
    assert attention == pytest.approx(1.1386294361119891, rel=1e-15)
    # by hand: correction dims 64 ln(4096 / 64 pi) / (2 ln 1e4) = 10.47 -> 10 and
    # 64 ln(4096 / 2 pi) / (2 ln 1e4) = 22.51 -> 23: dims < 10 keep theta_i, dims >= 23 are divided by 4
    assert parse_rope_scaling(config, dim=64, max_position_embeddings=4096).yarn_correction_range() == (10, 23)
    default = np.array(expected_default(64, 10000.0))
    np.testing.assert_allclose(inv_freq[:11], default[:11], rtol=1e-15)
    np.testing.assert_allclose(inv_freq[23:], default[23:] / 4.0, rtol=1e-15)
    assert np.all(inv_freq[11:23] < default[11:23]) and np.all(inv_freq[11:23] > default[11:23] / 4.0)
    check_module(64, 4096, 10000.0, config, expected_yarn(64, 10000.0, 4096, 4.0), attention)


@pytest.mark.parametrize("truncate", [True, False])
def test_yarn_explicit_keys(truncate):
    config = {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 2048, "beta_fast": 16.0,
              "beta_slow": 2.0, "truncate": truncate}
    inv_freq, attention = compute_rope_parameters(32, 50000.0, 16384, config)
    check(inv_freq, expected_yarn(32, 50000.0, 2048, 8.0, 16.0, 2.0, truncate))
    assert attention == pytest.approx(yarn_mscale(8.0), rel=1e-15)
    check_module(32, 16384, 50000.0, config, expected_yarn(32, 50000.0, 2048, 8.0, 16.0, 2.0, truncate), attention)


def test_yarn_without_truncation_has_fractional_ramp_ends():
    config = {"rope_type": "yarn", "factor": 4.0, "truncate": False}
    low, high = parse_rope_scaling(config, dim=64, max_position_embeddings=4096).yarn_correction_range()
    assert low == pytest.approx(64 * math.log(4096 / (64 * math.pi)) / (2 * math.log(10000.0)), rel=1e-15)
    assert high == pytest.approx(64 * math.log(4096 / (2 * math.pi)) / (2 * math.log(10000.0)), rel=1e-15)


def test_yarn_zero_or_missing_betas_take_the_defaults():
    explicit = compute_rope_parameters(64, 10000.0, 4096, {"rope_type": "yarn", "factor": 4.0, "beta_fast": 32,
                                                           "beta_slow": 1})
    zeros = compute_rope_parameters(64, 10000.0, 4096, {"rope_type": "yarn", "factor": 4.0, "beta_fast": 0,
                                                        "beta_slow": None})
    np.testing.assert_array_equal(explicit[0], zeros[0])


@pytest.mark.parametrize("mscale,mscale_all_dim", [(0.707, 0.707), (1.0, 0.707), (1.0, 0.0), (None, 1.0),
                                                   (1.0, None)])
def test_yarn_mscale(mscale, mscale_all_dim):
    # DeepSeek-V2 uses factor 40, mscale = mscale_all_dim = 0.707: attention factor exactly 1
    config = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096}
    if mscale is not None:
        config["mscale"] = mscale
    if mscale_all_dim is not None:
        config["mscale_all_dim"] = mscale_all_dim
    _, attention = compute_rope_parameters(64, 10000.0, 163840, config)
    if mscale and mscale_all_dim:  # both present and non-zero: their ratio
        expected = yarn_mscale(40.0, mscale) / yarn_mscale(40.0, mscale_all_dim)
    else:
        expected = yarn_mscale(40.0)
    assert attention == pytest.approx(expected, rel=1e-15)
    if mscale == mscale_all_dim:
        assert attention == 1.0


def test_yarn_attention_factor_given_wins():
    config = {"rope_type": "yarn", "factor": 40.0, "attention_factor": 0.5, "mscale": 1.0, "mscale_all_dim": 0.5}
    inv_freq, attention = compute_rope_parameters(64, 10000.0, 4096, config)
    assert attention == 0.5
    check(inv_freq, expected_yarn(64, 10000.0, 4096, 40.0))


def test_yarn_factor_none_is_the_context_ratio():
    # factor None: max_position_embeddings / original_max_position_embeddings = 32768 / 4096 = 8
    config = {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 4096}
    inv_freq, attention = compute_rope_parameters(64, 10000.0, 32768, config)
    check(inv_freq, expected_yarn(64, 10000.0, 4096, 8.0))
    assert attention == pytest.approx(yarn_mscale(8.0), rel=1e-15)


def test_yarn_factor_at_most_one_keeps_attention_one():
    _, attention = compute_rope_parameters(64, 10000.0, 4096, {"rope_type": "yarn", "factor": 1.0})
    assert attention == 1.0


def test_yarn_zero_width_ramp():
    # beta_fast == beta_slow without truncation: low == high, transformers widens the ramp by 0.001
    config = {"rope_type": "yarn", "factor": 4.0, "beta_fast": 8.0, "beta_slow": 8.0, "truncate": False}
    inv_freq, _ = compute_rope_parameters(64, 10000.0, 4096, config)
    check(inv_freq, expected_yarn(64, 10000.0, 4096, 4.0, 8.0, 8.0, False))
    assert np.all(np.isfinite(inv_freq))


# ---- llama3 ----------------------------------------------------------------------------------------

LLAMA31 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
           "original_max_position_embeddings": 8192}


def test_llama3_llama31_config():
    inv_freq, attention = compute_rope_parameters(128, 500000.0, 131072, LLAMA31)
    check(inv_freq, expected_llama3(128, 500000.0, 8.0, 1.0, 4.0, 8192))
    assert attention == 1.0
    default = np.array(expected_default(128, 500000.0))
    wavelength = 2 * np.pi / default
    short, long = wavelength < 8192 / 4.0, wavelength > 8192 / 1.0
    # all three regions occur
    assert short.sum() > 0 and long.sum() > 0 and (~short & ~long).sum() > 0
    np.testing.assert_allclose(inv_freq[short], default[short], rtol=1e-15)
    np.testing.assert_allclose(inv_freq[long], default[long] / 8.0, rtol=1e-15)
    check_module(128, 131072, 500000.0, LLAMA31, expected_llama3(128, 500000.0, 8.0, 1.0, 4.0, 8192), 1.0)


def test_llama3_small_config_all_regions():
    # head size 16, orig 32: wavelengths 6.3 (kept), 19.9 (blended), >= 62.8 (divided by 8)
    config = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 32}
    inv_freq, _ = compute_rope_parameters(16, 10000.0, 256, config)
    default = expected_default(16, 10000.0)
    assert inv_freq[0] == default[0]
    s = (32 / (2 * math.pi / default[1]) - 1.0) / 3.0  # by hand: (32 / 19.87 - 1) / 3 = 0.2035
    assert 0.2034 < s < 0.2036
    assert inv_freq[1] == pytest.approx((1 - s) * default[1] / 8 + s * default[1], rel=1e-14)
    np.testing.assert_allclose(inv_freq[2:], np.array(default[2:]) / 8.0, rtol=1e-15)


def test_llama3_original_length_falls_back_to_max_position_embeddings():
    config = {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0}
    inv_freq, _ = compute_rope_parameters(64, 10000.0, 1024, config)
    check(inv_freq, expected_llama3(64, 10000.0, 4.0, 2.0, 8.0, 1024))


# ---- longrope --------------------------------------------------------------------------------------

SHORT = [1.0 + 0.05 * i for i in range(48)]
LONG = [1.0 + 0.9 * i for i in range(48)]
PHI3 = {"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG, "original_max_position_embeddings": 4096}


@pytest.mark.parametrize("seq_len,long", [(None, False), (1, False), (4096, False), (4097, True), (131072, True)])
def test_longrope_short_or_long_factors_by_length(seq_len, long):
    inv_freq, attention = compute_rope_parameters(96, 10000.0, 131072, PHI3, seq_len=seq_len)
    check(inv_freq, expected_longrope(96, 10000.0, LONG if long else SHORT))
    # factor 131072 / 4096 = 32; by hand sqrt(1 + ln 32 / ln 4096) = sqrt(1 + 5/12) = sqrt(17/12)
    assert attention == pytest.approx(math.sqrt(17 / 12), rel=1e-15)
    assert attention == pytest.approx(longrope_attention(32.0, 4096), rel=1e-15)


def test_longrope_module_starts_with_short_factors():
    check_module(96, 131072, 10000.0, PHI3, expected_longrope(96, 10000.0, SHORT), math.sqrt(17 / 12))


def test_longrope_explicit_factor_and_attention_factor():
    _, attention = compute_rope_parameters(96, 10000.0, 131072, dict(PHI3, factor=16.0))
    assert attention == pytest.approx(longrope_attention(16.0, 4096), rel=1e-15)
    _, attention = compute_rope_parameters(96, 10000.0, 131072, dict(PHI3, factor=16.0, attention_factor=1.25))
    assert attention == 1.25


def test_longrope_without_original_length_has_factor_one():
    # orig falls back to max_position_embeddings, so factor = 1 and the attention factor is 1
    config = {"rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG}
    inv_freq, attention = compute_rope_parameters(96, 10000.0, 4096, config)
    assert attention == 1.0
    check(inv_freq, expected_longrope(96, 10000.0, SHORT))
    long_inv_freq, _ = compute_rope_parameters(96, 10000.0, 4096, config, seq_len=4097)
    check(long_inv_freq, expected_longrope(96, 10000.0, LONG))


# ---- keys and errors -------------------------------------------------------------------------------

def test_every_type_is_known():
    assert ROPE_TYPES == ("default", "linear", "dynamic", "yarn", "llama3", "longrope")


def test_unused_key_warns():
    with pytest.warns(UserWarning, match=r"beta_fast"):
        compute_rope_parameters(16, 10000.0, 64, {"rope_type": "linear", "factor": 2.0, "beta_fast": 4})


def test_transformers5_common_keys_are_accepted():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inv_freq, _ = compute_rope_parameters(16, 10000.0, 64, {"rope_type": "linear", "factor": 2.0,
                                                                 "rope_theta": 10000.0,
                                                                 "partial_rotary_factor": 0.5})
    check(inv_freq, expected_linear(16, 10000.0, 2.0))


@pytest.mark.parametrize("rope_scaling,kwargs,error,match", [
    ({"rope_type": "ntk"}, {}, ValueError, r"rope_scaling\['rope_type'\]: got 'ntk'"),
    ({"rope_type": "linear"}, {}, ValueError, r"rope_type 'linear' needs the key 'factor'"),
    ({"rope_type": "dynamic"}, {}, ValueError, r"needs the key 'factor'"),
    ({"rope_type": "yarn"}, {}, ValueError, r"needs the key 'factor'"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0}, {}, ValueError, r"'high_freq_factor'"),
    ({"rope_type": "longrope", "short_factor": SHORT}, {"dim": 96}, ValueError, r"'long_factor'"),
    ({"rope_type": "linear", "factor": 0.0}, {}, ValueError, r"rope_scaling\['factor'\]: got 0.0"),
    ({"rope_type": "linear", "factor": "2"}, {}, TypeError, r"rope_scaling\['factor'\]: got '2'"),
    ({"rope_type": "linear", "factor": True}, {}, TypeError, r"rope_scaling\['factor'\]"),
    ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0}, {}, ValueError,
     r"high_freq_factor'\]: got 1.0, expected more than low_freq_factor=4.0"),
    (dict(PHI3, short_factor=SHORT[:-1]), {"dim": 96}, ValueError, r"short_factor'\]: got 47 numbers, expected"),
    ({"rope_type": "yarn", "factor": 4.0, "truncate": "yes"}, {}, TypeError, r"truncate'\]: got 'yes'"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 0}, {}, ValueError,
     r"original_max_position_embeddings'\]: got 0"),
    ({"rope_type": "linear", "factor": 2.0, "rope_theta": 5.0}, {}, ValueError, r"rope_theta'\]: got 5.0, but base"),
    ({"rope_type": "dynamic", "factor": 2.0}, {"dim": 2}, ValueError, r"dim: got 2"),
    ("linear", {}, TypeError, r"rope_scaling: got str"),
    (None, {"dim": 15}, ValueError, r"dim: got 15, expected a positive even int"),
    (None, {"base": -1.0}, ValueError, r"base: got -1.0"),
    (None, {"max_position_embeddings": 0}, ValueError, r"max_position_embeddings: got 0"),
])
def test_errors_name_the_key_and_value(rope_scaling, kwargs, error, match):
    args = dict(dim=64, base=10000.0, max_position_embeddings=4096)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        compute_rope_parameters(args["dim"], args["base"], args["max_position_embeddings"], rope_scaling)
    with pytest.raises(error, match=match):
        oneflow_rope.RotaryEmbedding(args["dim"], args["max_position_embeddings"], args["base"],
                                     rope_scaling=rope_scaling)
