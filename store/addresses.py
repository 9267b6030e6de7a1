"""Unit addresses: one syntax, shared by every command that names a unit (annotate, and later probe and export),
read against the sources a store actually holds so that short forms stay unambiguous.

    [MODEL::][SOURCE SEP][LAYER SEP]UNIT      SEP is '/' or spaces
    [MODEL::][SOURCE SEP]L<LAYER>[SEP]N<UNIT>

Examples: `mlp/12/345`, `L12 N345` and `L12N345` (MLP neuron 345 of layer 12), `12/345` (the MLP neuron when the
store has MLP neurons on layer 12, else the one source it has there), `resid/3/507`, `sae:res14/123` and
`sae:res14 123` (a source with one layer may leave the layer out), `sae:res14/14/123`, `transcoder:tc/3/9`.
A store holding several models needs the model first, `MODEL::mlp/12/345`, wherever a source-and-layer is held by
more than one of them. Anything that does not name exactly one unit raises AddressError, saying what exists.
"""

from __future__ import annotations

import re
import reprlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import duckdb

MODEL_SEPARATOR = "::"
_MAX_DIGITS = 18  # of a layer or unit number: more is past anything a store holds (they are 32-bit)
_SEP = r"(?:\s*/\s*|\s+)"
_PLACE = re.compile(rf"(?:(?P<layer>\d+){_SEP})?(?P<unit>\d+)"
                    rf"|[Ll](?P<l_layer>\d+)(?:{_SEP})?[Nn](?P<n_unit>\d+)", re.ASCII)
# Something that looks like a source name (to say "no such source" rather than "cannot read").
_SOURCE_LIKE = re.compile(r"(?:mlp|resid|(?:sae|transcoder):[^/\s]+)(?=[/\s]|$)")


class AddressError(ValueError):
    """An address that cannot be read or that could mean several units; the message lists what exists."""


class UnknownUnitError(AddressError):
    """A well-formed address of a model, source, layer or unit the store does not hold."""


@dataclass(frozen=True)
class SourceLayer:
    """One (model, source, layer) of a store, and how many units it has (None: not checked)."""

    model: str
    source: str
    layer: int
    n_units: int | None = None


def store_sources(con: duckdb.DuckDBPyConnection) -> list[SourceLayer]:
    """Every (model, source, layer) of an open store, with its unit count, for parse_address."""
    return [SourceLayer(*row) for row in con.execute(
        "SELECT model, source, layer, n_units FROM sources ORDER BY model, source, layer").fetchall()]


def parse_address(text: str, sources: Iterable[Sequence | SourceLayer], *,
                  default_source: str | None = None) -> tuple[str, str, int, int]:
    """(model, source, layer, unit) of the one unit `text` names among `sources`, each a SourceLayer or a
    (model, source, layer[, n_units]) tuple; `default_source` is used when the address names no source."""
    table = _table(sources)
    if not isinstance(text, str):
        raise AddressError(f"unit address {reprlib.repr(text)} is not text; write one such as mlp/12/345")
    label = _quote(text)
    rest = text.strip()
    if not rest:
        raise AddressError("empty unit address; write one such as mlp/12/345, L12N345 or sae:NAME/123")
    model = None
    if MODEL_SEPARATOR in rest:
        models = sorted({s.model for s in table}, key=len, reverse=True)
        model = next((m for m in models if rest.startswith(m + MODEL_SEPARATOR)), None)
        if model is None:
            given = rest.split(MODEL_SEPARATOR, 1)[0]
            raise UnknownUnitError(f"unit address {label}: no model {_quote(given)} in the store; it holds "
                                   f"{_list(sorted({s.model for s in table}))}")
        rest = rest[len(model) + len(MODEL_SEPARATOR):].strip()
    names = sorted({s.source for s in table if model is None or s.model == model}, key=len, reverse=True)
    source = next((n for n in names if rest.startswith(n) and re.match(r"$|[/\s]", rest[len(n):])), None)
    if source is not None:
        rest = re.sub(r"^\s*/?\s*", "", rest[len(source):])
    place = _PLACE.fullmatch(rest)
    if place is None:
        like = _SOURCE_LIKE.match(rest)
        if source is None and like:
            raise UnknownUnitError(f"unit address {label}: no source {_quote(like.group())} in the store; it has "
                                   f"{describe_sources(table)}")
        raise AddressError(f"unit address {label} cannot be read; write SOURCE/LAYER/UNIT (e.g. mlp/12/345), "
                           "L12N345 for an MLP neuron, or SOURCE/UNIT for a source with one layer")
    if place["n_unit"] is not None:
        layer, unit = _number(place["l_layer"], label), _number(place["n_unit"], label)
        if source is None:
            source = "mlp"  # L12N345 is Neuroscope's name for an MLP neuron
    else:
        layer = None if place["layer"] is None else _number(place["layer"], label)
        unit = _number(place["unit"], label)
    if source is None and layer is None and default_source is None:
        raise AddressError(f"unit address {label} names no source; write SOURCE/UNIT or SOURCE/LAYER/UNIT "
                           f"(the store has {describe_sources(table)})")
    return resolve_unit(table, model=model, source=source, layer=layer, unit=unit, default_source=default_source,
                        label=label)


def resolve_unit(sources: Iterable[Sequence | SourceLayer], *, unit: int, model: str | None = None,
                 source: str | None = None, layer: int | None = None, default_source: str | None = None,
                 label: str | None = None) -> tuple[str, str, int, int]:
    """The one (model, source, layer, unit) matching the parts given, filling in what is left out the way
    parse_address documents; for inputs that give the parts separately (columns of a file)."""
    table = _table(sources)
    what = f"unit address {label}" if label else f"unit {_join(model, source, layer, unit)}"
    if model is not None:
        if not any(s.model == model for s in table):
            raise UnknownUnitError(f"{what}: no model {_quote(model)} in the store; it holds "
                                   f"{_list(sorted({s.model for s in table}))}")
        table = [s for s in table if s.model == model]
    source = source if source is not None else default_source
    if source is not None:
        chosen = [s for s in table if s.source == source]
        if not chosen:
            raise UnknownUnitError(f"{what}: no source {_quote(source)} in the store; it has "
                                   f"{describe_sources(table)}")
        table = chosen
    if layer is None:
        layers = sorted({s.layer for s in table})
        if source is None or len(layers) != 1:
            raise AddressError(f"{what} names no layer, and {source or 'the store'} has layers {_ranges(layers)}; "
                               f"write {source or 'SOURCE'}/LAYER/{unit}")
        layer = layers[0]
    chosen = [s for s in table if s.layer == layer]
    if not chosen:
        raise UnknownUnitError(f"{what}: no layer {layer} in {_quote(source) if source else 'the store'}; "
                               f"it has {describe_sources(table)}")
    if source is None and len({s.source for s in chosen}) > 1:
        mlp = [s for s in chosen if s.source == "mlp"]
        if not mlp:
            raise AddressError(f"{what} is ambiguous: layer {layer} is in {_list(sorted({s.source for s in chosen}))}"
                               f"; write SOURCE/{layer}/{unit}")
        chosen = mlp
    if len(chosen) > 1:
        raise AddressError(f"{what} is ambiguous: {chosen[0].source} layer {layer} is in models "
                           f"{_list(sorted(s.model for s in chosen))}; name one (MODEL{MODEL_SEPARATOR}"
                           f"{chosen[0].source}/{layer}/{unit}, or --model)")
    found = chosen[0]
    if unit < 0 or found.n_units is not None and unit >= found.n_units:
        raise UnknownUnitError(f"{what}: no unit {unit} in {found.source} layer {layer}, which has units "
                               f"0-{(found.n_units or 1) - 1}")
    return found.model, found.source, found.layer, unit


def format_address(model: str, source: str, layer: int, unit: int, *, with_model: bool = False) -> str:
    """The canonical address of a unit, which parse_address reads back (with the model when several)."""
    return (f"{model}{MODEL_SEPARATOR}" if with_model else "") + f"{source}/{layer}/{unit}"


def describe_sources(sources: Iterable[Sequence | SourceLayer]) -> str:
    """What a store holds, compactly, for error messages: `mlp (layers 0-29), sae:res15 (layer 15)`."""
    table = _table(sources)
    several = len({s.model for s in table}) > 1
    groups: dict[tuple[str, str], list[int]] = {}
    for s in table:
        groups.setdefault((s.model, s.source), []).append(s.layer)
    parts = []
    for (model, source), layers in sorted(groups.items()):
        layers = sorted(set(layers))
        name = f"{_quote(model)}{MODEL_SEPARATOR}{source}" if several else source
        parts.append(f"{name} (layer{'s' if len(layers) > 1 else ''} {_ranges(layers)})")
    return ", ".join(parts) if parts else "no sources"


def _number(digits: str, label: str) -> int:
    """A layer or unit number of an address; one with more digits than any store's numbers names nothing (and
    Python refuses to convert more than 4,300 digits)."""
    significant = digits.lstrip("0")
    if len(significant) > _MAX_DIGITS:
        raise UnknownUnitError(f"unit address {label}: the number {_quote(significant, 20)} is larger than any "
                               "layer or unit of a store")
    return int(significant or "0")


def _table(sources: Iterable[Sequence | SourceLayer]) -> list[SourceLayer]:
    return [s if isinstance(s, SourceLayer) else SourceLayer(*s) for s in sources]


def _ranges(values: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'."""
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs) or "none"


def _quote(text: str, limit: int = 80) -> str:
    """Untrusted text for a one-line message: repr escapes control and invisible characters; long text is cut."""
    return repr(text if len(text) <= limit else text[:limit] + "…")


def _list(items: list[str]) -> str:
    return ", ".join(_quote(i) for i in items)


def _join(model: str | None, source: str | None, layer: int | None, unit: int) -> str:
    parts = [p for p in (source, None if layer is None else str(layer), str(unit)) if p is not None]
    return _quote((f"{model}{MODEL_SEPARATOR}" if model is not None else "") + "/".join(parts))
