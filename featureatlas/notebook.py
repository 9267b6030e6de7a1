"""A store from a notebook: `atlas = open_atlas("store.duckdb")`, `atlas.unit("mlp/12/345")`, `atlas.probe(...)`,
`atlas.steer(...)`, `atlas.ablate(...)`.

Units and probes render inline as the site draws them (highlighted tokens, shaded to the unit's max), from inline
styles only: a notebook output may not load the site's stylesheet, and must make no request and run no script.
Every string from the store or the tokenizer is untrusted (a corpus can hold `<script>` or a bidi override), so all
of it goes through build/tokens.py's escaping, the site's own.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from featureatlas.errors import UsageError
from featureatlas.harvest.ablation import Ablated
from featureatlas.harvest.probe import Prober, TopUnit, UnitProbe, load_prober
from featureatlas.harvest.steer import Steered
from featureatlas.store.addresses import AddressError, format_address, parse_address, store_sources
from featureatlas.store.schema import open_store
from featureatlas.text import token_html, visible

BUCKETS = 9
SHOWN_EXAMPLES = 5  # top examples drawn in a unit's inline view
_POSITIVE = [f"hsl(24 100% {93 - 5 * i}%)" for i in range(BUCKETS)]  # the site's .a1-.a9
_NEGATIVE = [f"hsl(214 90% {light}%)" for light in (94, 90, 86, 81, 77, 73, 69, 64, 60)]  # .n1-.n9
_BOX = ("font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; white-space: pre-wrap; "
        "overflow-wrap: anywhere; line-height: 1.6; color: #16181b; background: #fff; padding: .3em .5em; "
        "border: 1px solid #ddd; border-radius: 4px; margin: .25em 0")


def _frame(rows: pa.Table) -> Any:
    """A pandas DataFrame when pandas is importable (it is not a dependency), else the pyarrow Table."""
    try:
        import pandas  # noqa: F401
    except ImportError:
        return rows
    return rows.to_pandas()


def highlight(tokens: list[str], activations: np.ndarray | list[float], scale: float | None, first: int = 0,
              mark: int | None = None) -> str:
    """Tokens as escaped HTML spans shaded like the site's (round(value / scale * 9) buckets), each value in its
    title; positions before `first` (BOS) are dimmed and unshaded; `mark` outlines the max."""
    spans = []
    for i, (token, value) in enumerate(zip(tokens, activations, strict=True)):
        value = float(value)
        style = ""
        if i < first:
            style = "opacity: .45"
        elif scale and scale > 0 and np.isfinite(value):
            bucket = max(-BUCKETS, min(BUCKETS, round(value / scale * BUCKETS)))
            if bucket:
                style = f"background: {(_POSITIVE[bucket - 1] if bucket > 0 else _NEGATIVE[-bucket - 1])}"
        if i == mark:
            style += ("; " if style else "") + "outline: 1px solid #b45309"
        title = html.escape(f"{visible(token)}: {value:.4g}", quote=True)
        spans.append(f'<span title="{title}" style="{style}">{token_html(token)}</span>')
    return f'<div style="{_BOX}">{"".join(spans)}</div>'


def _scale_of(max_activation: float | None, min_activation: float | None) -> float | None:
    if max_activation is not None and max_activation > 0:
        return float(max_activation)
    return float(-min_activation) if min_activation else None


@dataclass
class Unit:
    """One unit of a store: statistics, examples and logit effects, queried when asked for."""

    atlas: Atlas
    model: str
    source: str
    layer: int
    unit: int
    statistics: dict = field(default_factory=dict)

    @property
    def address(self) -> str:
        return format_address(self.model, self.source, self.layer, self.unit)

    def _where(self) -> list:
        return [self.model, self.source, self.layer, self.unit]

    def examples(self, kind: str | None = None) -> Any:
        """Every kept example (or one kind: top, bottom, quantile, random) with its context's display tokens."""
        sql = ("SELECT e.example_kind AS kind, e.rank, e.interval_lo, e.interval_hi, e.context_id, e.max_position, "
               "e.max_activation, c.tokens, e.activations FROM examples e JOIN contexts c USING (context_id) "
               "WHERE e.model = ? AND e.source = ? AND e.layer = ? AND e.unit = ?"
               + (" AND e.example_kind = ?" if kind else "") +
               " ORDER BY array_position(['top', 'bottom', 'quantile', 'random'], e.example_kind), e.interval_lo, "
               "e.rank")
        return _frame(self.atlas._query(sql, self._where() + ([kind] if kind else [])))

    def logits(self) -> Any:
        """The tokens the unit's output direction promotes (top) and suppresses (bottom), with their effect."""
        return _frame(self.atlas._query(
            "SELECT polarity, rank, token_id, token, effect FROM logit_effects WHERE model = ? AND source = ? AND "
            "layer = ? AND unit = ? ORDER BY polarity DESC, rank", self._where()))

    def explanations(self) -> list[str]:
        rows = self.atlas._query("SELECT text FROM explanations WHERE model = ? AND source = ? AND layer = ? AND "
                                 "unit = ? ORDER BY added_at", self._where(), optional=True)
        return [] if rows is None else rows.column("text").to_pylist()

    @property
    def scale(self) -> float | None:
        return _scale_of(self.statistics.get("max_activation"), self.statistics.get("min_activation"))

    def _repr_html_(self) -> str:
        s = self.statistics
        parts = [f"<h4 style=\"margin: .2em 0\">{html.escape(visible(self.address))}</h4>"]
        for text in self.explanations():
            parts.append(f"<p style=\"margin: .2em 0\"><em>{html.escape(visible(text))}</em></p>")
        cells = [(name, s.get(key)) for name, key in (("max", "max_activation"), ("min", "min_activation"),
                                                       ("mean", "mean"), ("std", "std"), ("frequency", "frequency"),
                                                       ("tokens", "n_tokens"))]
        parts.append("<p style=\"margin: .2em 0\">" + " &middot; ".join(
            f"{name} {html.escape(f'{value:.4g}' if isinstance(value, float) else str(value))}"
            for name, value in cells if value is not None) + "</p>")
        rows = self.atlas._query(
            "SELECT e.max_position, e.activations, c.tokens FROM examples e JOIN contexts c USING (context_id) "
            "WHERE e.model = ? AND e.source = ? AND e.layer = ? AND e.unit = ? AND e.example_kind = 'top' "
            f"ORDER BY e.rank LIMIT {SHOWN_EXAMPLES}", self._where()).to_pylist()
        first = int(self.atlas.bos_excluded(self.model))
        for row in rows:
            parts.append(highlight(row["tokens"], row["activations"], self.scale, first, row["max_position"]))
        logits = self.atlas._query(
            "SELECT polarity, token FROM logit_effects WHERE model = ? AND source = ? AND layer = ? AND unit = ? "
            "ORDER BY polarity DESC, rank", self._where()).to_pylist()
        for polarity, label in (("top", "promotes"), ("bottom", "suppresses")):
            tokens = [r["token"] for r in logits if r["polarity"] == polarity and r["token"] is not None]
            if tokens:
                parts.append(f"<p style=\"margin: .2em 0\">{label}: " + ", ".join(
                    f"<code>{token_html(t)}</code>" for t in tokens) + "</p>")
        return "<div>" + "".join(parts) + "</div>"

    def __repr__(self) -> str:
        return f"<Unit {self.address}>"


@dataclass
class ProbeResult:
    """A probe of one unit on a text: `.tokens`, `.activations`; drawn inline like the unit's examples."""

    probe: UnitProbe

    @property
    def tokens(self) -> list[str]:
        return self.probe.tokens

    @property
    def activations(self) -> np.ndarray:
        return self.probe.activations

    @property
    def address(self) -> str:
        return self.probe.address

    def _repr_html_(self) -> str:
        p = self.probe
        scale = p.scale
        if scale is None:
            counted = p.activations[p.first_counted:]
            scale = _scale_of(float(counted.max()), float(counted.min())) if len(counted) else None
        head = (f"<p style=\"margin: .2em 0\">{html.escape(visible(p.address))}: max {p.max_activation:.4g} at "
                f"position {p.max_position}</p>")
        return "<div>" + head + highlight(p.tokens, p.activations, scale, p.first_counted, p.max_position) + "</div>"

    def __repr__(self) -> str:
        return f"<ProbeResult {self.address} on {len(self.tokens)} tokens>"


@dataclass
class AblationResult:
    """How removing a unit at one position changes log p of each token after it: `.effects[i]` is the change for
    `.tokens[position + 1 + i]`; drawn inline with the tokens after the position shaded by it (blue: less likely)."""

    address: str
    tokens: list[str]
    ablated: Ablated

    @property
    def position(self) -> int:
        return self.ablated.position

    @property
    def effects(self) -> np.ndarray:
        return self.ablated.effects

    def _repr_html_(self) -> str:
        p, effects = self.position, self.effects
        values = np.concatenate([np.zeros(p + 1, np.float32), effects])
        finite = np.abs(effects[np.isfinite(effects)])
        scale = float(finite.max()) if finite.size and finite.max() > 0 else None
        head = (f"<p style=\"margin: .2em 0\">{html.escape(visible(self.address))} removed at position {p} "
                f"({html.escape(visible(self.tokens[p]))}): change in log p of each token after it</p>")
        return "<div>" + head + highlight(self.tokens, values, scale, p + 1, p) + "</div>"

    def __repr__(self) -> str:
        return f"<AblationResult {self.address} at position {self.position} of {len(self.tokens)} tokens>"


class Atlas:
    """A store opened read-only for browsing, and a lazily loaded model for probing."""

    def __init__(self, store: Path | str, model: str | None = None, saes: list[str] | None = None,
                 device: str = "auto"):
        self.store = Path(store)
        open_store(self.store).close()  # refuses a missing file or another schema at once
        self._model, self._saes, self._device = model, list(saes or []), device
        self._probers: dict[str, Prober] = {}

    def _query(self, sql: str, params: list, optional: bool = False) -> pa.Table | None:
        con = open_store(self.store)  # short-lived: a notebook must not hold the file's lock between cells
        try:
            relation = con.sql(sql, params=params)
            fetch = getattr(relation, "to_arrow_table", None) or relation.fetch_arrow_table  # duckdb >= 1.4's name
            return fetch()
        except Exception:
            if optional:
                return None
            raise
        finally:
            con.close()

    def _address(self, address: str) -> tuple[str, str, int, int]:
        con = open_store(self.store)
        try:
            held = store_sources(con)
        finally:
            con.close()
        try:
            return parse_address(address, held)
        except AddressError as err:
            raise UsageError(str(err)) from None

    def bos_excluded(self, model: str) -> bool:
        """Whether the model's (latest) run starts each context with a BOS that never counts as the max."""
        from featureatlas.harvest.reopen import read_runs

        con = open_store(self.store)
        try:
            runs = [run for run in read_runs(con) if run.model == model]
        finally:
            con.close()
        return bool(runs and runs[-1].bos_excluded)

    def unit(self, address: str) -> Unit:
        """The unit an address names (mlp/12/345, L12N345, sae:res15/123, ...)."""
        model, source, layer, unit = self._address(address)
        rows = self._query("SELECT * FROM statistics WHERE model = ? AND source = ? AND layer = ? AND unit = ?",
                           [model, source, layer, unit]).to_pylist()
        stats = {k: v for k, v in (rows[0] if rows else {}).items() if k not in ("model", "source", "layer", "unit")}
        return Unit(self, model, source, layer, unit, stats)

    def prober(self, model: str | None = None) -> Prober:
        """The model (and dictionaries) of the store's run, reopened on first use and kept."""
        key = model or ""
        if key not in self._probers:
            self._probers[key] = load_prober(self._model, self._saes, store=self.store, device=self._device,
                                             model_name=model)
        return self._probers[key]

    def probe(self, text: str, unit: str | None = None, *, top: int | None = None, source: str = "mlp",
              layer: int | None = None) -> ProbeResult | list[TopUnit]:
        """A unit's activations on the text (unit=...), or the `top` units of (source, layer) that fire most."""
        if (unit is None) == (top is None):
            raise UsageError("pass unit='mlp/12/345' or top=N")
        if unit is not None:
            model = self._address(unit)[0]
            return ProbeResult(self.prober(model).unit(text, unit))
        return self.prober().top(text, source, layer, top)

    def steer(self, address: str, text: str, strength: float, mode: str = "add", max_new_tokens: int = 30,
              seed: int | None = None) -> Steered:
        """The text continued as the model does and with the unit pushed (harvest/steer.py: mode add adds strength x
        the unit's direction, clamp sets a dictionary feature's activation to strength): `.unsteered`, `.steered`."""
        return self.prober(self._address(address)[0]).steer(text, address, strength, mode, max_new_tokens, seed)

    def ablate(self, address: str, context_id: int | None = None, *, text: str | None = None,
               position: int | None = None) -> AblationResult:
        """How removing the unit at `position` of a stored context (context_id) or of a text changes log p of each
        token after it (harvest/ablation.py). position: by default the unit's max there (a top example's own
        max_position for a stored context)."""
        if (context_id is None) == (text is None):
            raise UsageError("pass context_id=N (a stored context) or text='...'")
        model, source, layer, unit = self._address(address)
        prober = self.prober(model)
        ids = prober.token_ids(text) if text is not None else prober.context_token_ids(context_id)
        if position is None and context_id is not None:
            rows = self._query("SELECT max_position FROM examples WHERE model = ? AND source = ? AND layer = ? AND "
                               "unit = ? AND context_id = ? AND example_kind = 'top'",
                               [model, source, layer, unit, context_id]).to_pylist()
            position = rows[0]["max_position"] if rows else None
        if position is None:
            position = prober.unit(None, address, token_ids=ids).max_position
        return AblationResult(format_address(model, source, layer, unit), prober.display(ids),
                              prober.ablate(address, ids, position))

    def __repr__(self) -> str:
        return f"<Atlas {self.store}>"


def open_atlas(store: Path | str, model: str | None = None, saes: list[str] | None = None,
               device: str = "auto") -> Atlas:
    """Open a store; `model`/`saes` say where the run's model and dictionaries are now, if they moved."""
    return Atlas(store, model, saes, device)
