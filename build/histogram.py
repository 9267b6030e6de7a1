"""The activation histogram as inline SVG: drawn at build time, readable without JavaScript, coloured by CSS
classes only (the CSP allows no inline styles). One `<title>` per bar gives its range and count on hover and
to assistive technology.

The store bins activations by |value| on a log scale (schema.sql, `histograms` view): bin 0 holds exact zeros,
|b| = 1 is (0, 2^-16), |b| = 2..129 split [2^-16, 2^16) into four bins an octave, |b| = 130 is [2^16, inf);
b < 0 mirrors b > 0 for negative values. Bars are drawn in bin order with the negative side mirrored to the
left of zero, so the x axis reads like a signed log scale; heights are log-scale counts.
"""

from __future__ import annotations

import math

import numpy as np

HALF = 130  # the largest |bin|
WIDTH, HEIGHT = 640, 210  # the viewBox; the figure scales to its column
LEFT, RIGHT, TOP, BOTTOM = 36, 10, 12, 20  # room for the count labels (left) and activation labels (below)
PLOT_W, PLOT_H = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
BASELINE = TOP + PLOT_H
MIN_SLOTS = 24  # a unit with few bins gets bars no wider than this allows, centred
LABEL_GAP = 40  # least distance between two activation labels, in viewBox units


def bin_edges(b: int) -> tuple[float, float]:
    """[lo, hi) of |activation| for bin b (the `histograms` view's lo and hi)."""
    m = abs(b)
    if m == 0:
        return 0.0, 0.0
    if m == 1:
        return 0.0, 2.0 ** -16
    if m == HALF:
        return 2.0 ** 16, math.inf

    def edge(i: int) -> float:
        return 2.0 ** ((i - 2) // 4 - 16) * (1 + ((i - 2) % 4) / 4)

    return edge(m), edge(m + 1)


def _bin_coordinate(magnitude: float) -> float:
    """Where a magnitude in [2^-16, 2^16) falls on the |bin| axis, fractionally (bin b spans [b, b + 1))."""
    octave = math.floor(math.log2(magnitude))
    return 2 + 4 * (octave + 16) + 4 * (magnitude / 2.0 ** octave - 1)


def _number(value: float) -> str:
    """A short axis or range label: 3 significant digits, 'k'/'M' for thousands and millions."""
    if value >= 1e6:
        return f"{value / 1e6:.3g}M"
    if value >= 1e3:
        return f"{value / 1e3:.3g}k"
    return f"{value:.3g}"


def _bin_label(b: int) -> str:
    """The range a bar counts, as its title starts: '0.25 to 0.312', '-0.312 to -0.25', 'exactly 0'."""
    lo, hi = bin_edges(b)
    if b == 0:
        return "exactly 0"
    if hi == math.inf:
        return f"{_number(lo)} and above" if b > 0 else f"-{_number(lo)} and below"
    return f"{_number(lo)} to {_number(hi)}" if b > 0 else f"-{_number(hi)} to -{_number(lo)}"


BIN_LABELS = {b: _bin_label(b) for b in range(-HALF, HALF + 1)}


class _Axis:
    """Slots for the bins of one unit: [-high..-low], 0, [low..high] (the negative side only when present)."""

    def __init__(self, bins: np.ndarray):
        magnitudes = np.abs(bins[bins != 0])
        self.low, self.high = (int(magnitudes.min()), int(magnitudes.max())) if len(magnitudes) else (1, 1)
        self.negative = bool(bins[0] < 0)
        side = self.high - self.low + 1
        self.zero = side if self.negative else 0  # the slot of exact zeros
        n_slots = self.zero + 1 + side
        self.slot = PLOT_W / max(n_slots, MIN_SLOTS)
        self.left = LEFT + (PLOT_W - n_slots * self.slot) / 2

    def slot_indices(self, bins: np.ndarray) -> np.ndarray:
        return np.where(bins == 0, self.zero, np.where(bins > 0, self.zero + 1 + bins - self.low, self.high + bins))

    def value_x(self, value: float) -> float:
        """The x of a signed activation (|value| in [2^-16, 2^16)), consistent with the bars."""
        position = _bin_coordinate(abs(value))
        index = self.zero + 1 + position - self.low if value > 0 else self.high + 1 - position
        return self.left + index * self.slot

    def ticks(self) -> list[tuple[float, str]]:
        """(x, label) for round activations in the drawn range: powers of ten, or 1-2-5 steps in a short range;
        labels that would overlap are dropped."""
        lo, hi = max(bin_edges(self.low)[0], 2.0 ** -16), min(bin_edges(self.high)[1], 2.0 ** 16)
        decades = range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
        for steps in ((1,), (1, 2, 5)):
            values = [s * 10.0 ** d for d in decades for s in steps if lo <= s * 10.0 ** d < hi]
            if len(values) >= 3:
                break
        signs = (1, -1) if self.negative else (1,)
        ticks = [(self.value_x(sign * v), ("-" if sign < 0 else "") + _number(v)) for v in values for sign in signs]
        zero = (self.left + (self.zero + 0.5) * self.slot, "0")
        kept = [zero]
        for tick in sorted(ticks):
            if all(abs(tick[0] - k[0]) >= LABEL_GAP for k in kept) and LEFT <= tick[0] <= WIDTH - RIGHT / 2:
                kept.append(tick)
        return kept


def _count_scale(max_count: int) -> tuple[float, list[tuple[float, str]]]:
    """The height of a count of 10^k as k * unit, and (y, label) of the gridlines at powers of ten."""
    decades = max(1, math.ceil(math.log10(max(max_count, 1)) - 1e-9))
    step = 1 if decades <= 6 else 2
    grid = [(BASELINE - PLOT_H * math.log10(1 + 10 ** k) / math.log10(1 + 10 ** decades), _number(10 ** k))
            for k in range(0, decades + 1, step)]
    return PLOT_H / math.log10(1 + 10 ** decades), grid


def _caption(total: int, every: int, negative: bool) -> str:
    sampled = f" (every token of 1 context in {every})" if every > 1 else ""
    mirrored = " Negative values are mirrored left of 0." if negative else ""
    return (f"{total:,} tokens counted{sampled}. Bars are bins of |activation|, four per octave; heights are "
            f"log-scale counts.{mirrored} Hover a bar for its range and count.")


def histogram_svg(bins: np.ndarray, counts: np.ndarray, every: int) -> str:
    """A `<figure>` with the SVG bar chart of one unit's histogram (bins sorted, counts > 0) and its caption;
    every: the histogram counts the tokens of one context in this many."""
    axis = _Axis(bins)
    unit_height, grid = _count_scale(int(counts.max()))
    heights = np.maximum(np.rint(unit_height * np.log10(1 + counts)), 1).astype(np.int64)
    rects = [f'<rect x="{x}" width=".86" height="{h}"><title>{BIN_LABELS[b]}: {count:,}</title></rect>'
             for x, h, b, count in zip(axis.slot_indices(bins).tolist(), heights.tolist(), bins.tolist(),
                                       counts.tolist(), strict=True)]  # in slots across, viewBox units up
    zero, positive = np.searchsorted(bins, [0, 1]).tolist()  # bins are sorted: negative, zero, positive
    groups = (("hn", rects[:zero]), ("hz", rects[zero:positive]), ("hp", rects[positive:]))
    bars = "".join(f'<g class="{name}">{"".join(group)}</g>' for name, group in groups if group)
    gridlines = "".join(f"M{LEFT} {y:.1f}H{WIDTH - RIGHT}" for y, _ in grid)
    count_labels = "".join(f'<text x="{LEFT - 4}" y="{y + 3:.1f}">{label}</text>' for y, label in grid)
    ticks = axis.ticks()
    tick_marks = "".join(f"M{x:.1f} {BASELINE}v3" for x, _ in ticks)
    value_labels = "".join(f'<text x="{x:.1f}" y="{HEIGHT - 5}">{label}</text>' for x, label in ticks)
    return (f'<figure class="hist"><svg viewBox="0 0 {WIDTH} {HEIGHT}" aria-labelledby="hist-cap">'
            f'<path class="grid" d="{gridlines}"/><g class="ylab">{count_labels}</g>'
            f'<g transform="matrix({axis.slot:.3f} 0 0 -1 {axis.left:.1f} {BASELINE})">{bars}</g>'
            f'<path class="axis" d="M{LEFT} {BASELINE}H{WIDTH - RIGHT}{tick_marks}"/>'
            f'<g class="xlab">{value_labels}</g></svg>'
            f'<figcaption id="hist-cap">{_caption(int(counts.sum()), every, axis.negative)}</figcaption></figure>')
