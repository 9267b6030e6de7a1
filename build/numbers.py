"""How activations are written: readable on the page, compact in the data attribute tokens.js reads."""

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


# An example's activations as text (build/shards.py): each rounded to three significant digits, as exactly three
# characters, with no separators (tokens.js decodes it the same way; so does `decode_activations`).
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


# Runs of exact zeros (most of a dictionary feature's tokens) are shorter: `~` and one digit d stand for d + 1
# zeros (2 to 64); a lone zero keeps its three characters.
ZERO_RUN = "~"


def encode_examples(values: np.ndarray, starts: np.ndarray, stops: np.ndarray) -> list[str]:
    """Each example's activations (values[start:stop]) as text, runs of zeros shortened: built as one byte buffer
    (three bytes a value, two for the head of a run of zeros, none for the rest of it), then sliced."""
    values, starts, stops = np.asarray(values), np.asarray(starts, np.int64), np.asarray(stops, np.int64)
    n = len(values)
    codes = activation_codes(values)
    buffer = _DIGIT_BYTES[np.stack([codes >> 12, (codes >> 6) & 63, codes & 63], axis=1)]  # [n, 3] bytes
    width = np.full(n, ACT_WIDTH, np.int64)  # bytes each value keeps
    zero = codes == _ZERO_CODE
    if zero.any():
        first_of_example = np.zeros(n + 1, bool)
        first_of_example[starts] = True
        run_start = zero & (first_of_example[:n] | ~np.r_[False, zero[:-1]])
        run_end = np.nonzero(zero & ~np.r_[zero[1:] & ~first_of_example[1:n], False])[0] + 1  # past each run
        start_at = np.nonzero(run_start)[0]
        at = np.nonzero(zero)[0]
        run = np.cumsum(run_start)[at] - 1
        offset = at - start_at[run]
        chunk_length = np.minimum(run_end[run] - at, 64)  # zeros from a chunk's head to its end
        head = (offset % 64 == 0) & (chunk_length >= 2)
        buffer[at[head], 0] = ord(ZERO_RUN)
        buffer[at[head], 1] = _DIGIT_BYTES[chunk_length[head] - 1]
        width[at[head]] = 2
        width[at[offset % 64 != 0]] = 0  # inside a chunk: its head counts them
    keep = np.arange(ACT_WIDTH)[None, :] < width[:, None]
    text = buffer[keep].tobytes().decode("ascii")
    ends = np.r_[0, np.cumsum(width)]
    return [text[a:b] for a, b in zip(ends[starts].tolist(), ends[stops].tolist(), strict=True)]


_ZERO_CODE = int(activation_codes(np.zeros(1))[0])


def decode_activation(text: str) -> float:
    """One value from its three characters: the number that the three significant digits denote."""
    code = (_DIGIT_VALUES[text[0]] << 12) | (_DIGIT_VALUES[text[1]] << 6) | _DIGIT_VALUES[text[2]]
    if code >= _NAN:
        return {_NAN: math.nan, _POS_INF: math.inf, _NEG_INF: -math.inf}[code]
    exponent, mantissa = divmod(code, _MANTISSAS)
    return float(f"{mantissa - _MANTISSAS // 2}e{exponent - _EXPONENT_OFFSET}")


def decode_activations(text: str) -> list[float]:
    """Every value of an example's activation text, for tests and for anyone reading the data with a script."""
    values: list[float] = []
    i = 0
    while i < len(text):
        if text[i] == ZERO_RUN:
            values += [0.0] * (_DIGIT_VALUES[text[i + 1]] + 1)
            i += 2
        else:
            values.append(decode_activation(text[i:i + ACT_WIDTH]))
            i += ACT_WIDTH
    return values
