"""How activations are written: readable on the page, compact in the data attribute site.js reads."""

from __future__ import annotations

import math

import numpy as np


def format_activation(value: float | None) -> str:
    """Four significant digits; an em dash for a unit that was never seen (NULL / NaN)."""
    if value is None or math.isnan(value):
        return "\u2014"
    return f"{value:.4g}"


def format_percent(fraction: float | None) -> str:
    """A frequency as a percentage to three significant digits; an em dash when unknown (no token seen)."""
    if fraction is None or math.isnan(fraction):
        return "\u2014"
    return f"{100 * fraction:.3g}%"


def format_one_in(fraction: float | None) -> str:
    """A frequency as people say it: "1 in 2,345 tokens" (rounded), "never" or "every token"."""
    if fraction is None or math.isnan(fraction):
        return "no token seen"
    if fraction <= 0:
        return "never"
    n = round(1 / fraction)
    return "every token" if n <= 1 else f"1 in {n:,} tokens"


# The `data-acts` attribute: every activation of an example, rounded to three significant digits, as exactly
# three characters, with no separators (site.js decodes it the same way; so does `decode_activations`).
#
# A value rounded to three significant digits is m * 10**e with m an integer in -999..999 (|m| >= 100 unless
# the value is 0). Its code is (e + 50) * 2000 + (m + 1000), which for every float32 (e within -47..36) is below
# 64**3; the code is written as three base64url digits, most significant first. Three codes above the
# finite ones stand for NaN (a token without an activation), +inf and -inf.
ACT_DIGITS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
ACT_WIDTH = 3
_MANTISSAS = 2000
_EXPONENT_OFFSET = 50
_MAX_EXPONENT = 130 - _EXPONENT_OFFSET  # so that every finite code is below _NAN
_NAN, _POS_INF, _NEG_INF = 262000, 262001, 262002
_DIGIT_BYTES = np.frombuffer(ACT_DIGITS.encode("ascii"), dtype=np.uint8)
_DIGIT_VALUES = {c: i for i, c in enumerate(ACT_DIGITS)}


def activation_codes(values: np.ndarray) -> np.ndarray:
    """Each value's code (see above), vectorised: no Python loop over the two million values of a layer."""
    v = np.asarray(values, dtype=np.float64)
    magnitude = np.abs(v)
    usable = np.isfinite(v) & (magnitude > 0)
    exponent = np.floor(np.log10(np.where(usable, magnitude, 1.0))) - 2
    mantissa = np.rint(np.where(usable, magnitude, 0.0) * 10.0 ** -exponent)
    carry = mantissa >= 1000  # 999.6 rounds to 1000: that is 100 of the next decade
    mantissa[carry] = 100
    exponent[carry] += 1
    mantissa[exponent < -_EXPONENT_OFFSET] = 0  # below float32's range: zero
    shifted = np.clip(exponent, -_EXPONENT_OFFSET, _MAX_EXPONENT).astype(np.int64) + _EXPONENT_OFFSET
    codes = shifted * _MANTISSAS + (np.copysign(mantissa, v).astype(np.int64) + _MANTISSAS // 2)
    codes[np.isnan(v)] = _NAN
    too_large = (v == np.inf) | (v == -np.inf) | (exponent > _MAX_EXPONENT)  # the last: beyond float32, too
    codes[too_large] = np.where(v[too_large] > 0, _POS_INF, _NEG_INF)
    return codes


def encode_activations(values: np.ndarray) -> str:
    """The values as `data-acts` text: ACT_WIDTH characters each, so value i is at [3 * i, 3 * i + 3)."""
    codes = activation_codes(values)
    digits = np.stack([codes >> 12, (codes >> 6) & 63, codes & 63], axis=1)
    return _DIGIT_BYTES[digits].tobytes().decode("ascii")


def decode_activation(text: str) -> float:
    """One value from its three characters: the number that the three significant digits denote."""
    code = (_DIGIT_VALUES[text[0]] << 12) | (_DIGIT_VALUES[text[1]] << 6) | _DIGIT_VALUES[text[2]]
    if code >= _NAN:
        return {_NAN: math.nan, _POS_INF: math.inf, _NEG_INF: -math.inf}[code]
    exponent, mantissa = divmod(code, _MANTISSAS)
    return float(f"{mantissa - _MANTISSAS // 2}e{exponent - _EXPONENT_OFFSET}")


def decode_activations(text: str) -> list[float]:
    """Every value of a `data-acts` attribute, for tests and for anyone reading the pages with a script."""
    return [decode_activation(text[i:i + ACT_WIDTH]) for i in range(0, len(text), ACT_WIDTH)]
