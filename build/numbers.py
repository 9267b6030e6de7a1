"""How activations are written: readable on the page, compact in the data attribute site.js reads."""

from __future__ import annotations

import math

import numpy as np


def format_activation(value: float | None) -> str:
    """Four significant digits; an em dash for a unit that was never seen (NULL / NaN)."""
    if value is None or math.isnan(value):
        return "\u2014"
    return f"{value:.4g}"


# A value rounded to 3 significant digits is a signed mantissa (100..999) and a decimal exponent, so it has a
# small integer code; the text of each code is formatted once and then looked up with numpy indexing, which
# is several times faster than formatting the two million floats of a layer one by one.
_EXPONENT_OFFSET = 64  # float32 exponents are within -45..38
_EXPONENTS = 128
_ZERO = 1000 * _EXPONENTS + _EXPONENT_OFFSET  # mantissa 0
_texts = np.full(2001 * _EXPONENTS, None, dtype=object)


def _text(code: int) -> str:
    mantissa, exponent = divmod(code, _EXPONENTS)
    value = (mantissa - 1000) * 10.0 ** (exponent - _EXPONENT_OFFSET - 2)
    text = f"{value:.3g}"
    return "." + text[2:] if text.startswith("0.") else "-." + text[3:] if text.startswith("-0.") else text


def compact_strings(values: np.ndarray) -> list[str]:
    """Each value as text with three significant digits and no leading zero (parseFloat reads `.5`)."""
    v = np.asarray(values, dtype=np.float64)
    magnitude = np.abs(v)
    usable = np.isfinite(v) & (magnitude > 0)
    exponent = np.floor(np.log10(np.where(usable, magnitude, 1.0)))
    mantissa = np.rint(np.where(usable, magnitude, 0.0) * 10.0 ** (2 - exponent))
    carry = mantissa >= 1000  # 999.6 rounds to 1000: that is 100 of the next decade
    mantissa[carry] = 100
    exponent[carry] += 1
    codes = (np.copysign(mantissa, v) + 1000).astype(np.int64) * _EXPONENTS + exponent.astype(np.int64)
    codes += _EXPONENT_OFFSET
    codes[~usable] = _ZERO
    for code in np.unique(codes[_texts[codes] == None]).tolist():  # noqa: E711 - elementwise test
        _texts[code] = _text(code)
    texts = _texts[codes].tolist()
    for i in np.nonzero(~np.isfinite(v))[0].tolist():  # nan, inf: rare, and not worth a code
        texts[i] = f"{v[i]}"
    return texts


def compact_activations(values: np.ndarray) -> str:
    """Comma-separated compact values, the format of the `data-acts` attribute: `0,.123,-1.5`."""
    return ",".join(compact_strings(values))
