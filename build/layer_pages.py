"""Layer pages: every unit of a layer in one light table with a plain-text snippet of its top example (readable
without JavaScript), and the layer's unit page, which unit.js fills from the data shards."""

from __future__ import annotations

import json
import math
from pathlib import Path

import duckdb
import jinja2
from markupsafe import Markup, escape

from featureatlas.build.numbers import format_activation, format_percent
from featureatlas.build.reader import LayerInfo, has_layout, noun, read_layer_explanations, read_snippets
from featureatlas.build.shards import SHARD_UNITS
from featureatlas.text import token_text, visible

SNIPPET_BEFORE = 8
SNIPPET_AFTER = 3
MAP_PAGE = "map.html"  # build/map_page.py writes it beside these pages for a layer with a layout


def snippet_html(tokens: list[str], max_index: int, cut_before: bool, cut_after: bool) -> str:
    """`…before<mark>max</mark>after…` as escaped text: no per-token markup, so thousands of rows stay light."""
    before = "".join(map(token_text, tokens[:max_index]))
    after = "".join(map(token_text, tokens[max_index + 1:]))
    mark = token_text(tokens[max_index]) if 0 <= max_index < len(tokens) else ""
    return ("\u2026" if cut_before else "") + f"{before}<mark>{mark}</mark>{after}" + ("\u2026" if cut_after else "")


def _snippet(tokens: list[str] | None, position: int | None, start: int, length: int, bos_token: str | None) -> str:
    if not tokens or position is None or not 0 <= position - start < len(tokens):
        return '<span class="none">no examples</span>'
    index, cut_after = position - start, start + len(tokens) < length
    if start == 0 and bos_token is not None and tokens[0] == bos_token and index > 0:
        tokens, index = tokens[1:], index - 1  # the BOS says nothing about the text
    return snippet_html(tokens, index, start > 0, cut_after)


def _number(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]


def _largest_magnitude(top: float | None, bottom: float | None) -> float | None:
    values = [abs(v) for v in (top, bottom) if v is not None and not math.isnan(v)]
    return max(values) if values else None


def _rows(con: duckdb.DuckDBPyConnection, info: LayerInfo, bos_token: str | None) -> tuple[list[str], bool]:
    """The table's rows, and whether any unit has an explanation (then the table gets that column)."""
    table = read_snippets(con, info.key, SNIPPET_BEFORE, SNIPPET_AFTER).to_pydict()
    explanations = read_layer_explanations(con, info.key)
    rows = []
    for unit, top, bottom, frequency, position, start, length, tokens in zip(
            table["unit"], table["max_activation"], table["min_activation"], table["frequency"],
            table["max_position"], table["snippet_start"], table["context_length"], table["snippet"], strict=True):
        # Typed here, whatever SQL returned: these go into the HTML and a URL as they are.
        unit, top, bottom, frequency = int(unit), _number(top), _number(bottom), _number(frequency)
        signed = (f"<td>{format_activation(bottom)}</td><td>{format_activation(_largest_magnitude(top, bottom))}</td>"
                  if info.signed else "")
        explained = (f"<td>{escape(visible(explanations[unit]))}</td>" if unit in explanations else "<td></td>"
                     ) if explanations else ""
        rows.append(f'<tr><td><a href="unit.html#{unit}">{unit}</a></td><td>{format_activation(top)}</td>{signed}'
                    f"<td>{format_percent(frequency)}</td>{explained}"
                    f"<td>{_snippet(tokens, position, start, length, bos_token)}</td></tr>")
    return rows, bool(explanations)


def config_text(config: str | None) -> Markup | None:
    """A dictionary's config as indented JSON, every non-ASCII character as a \\u escape (nothing hidden)."""
    if config is None:
        return None
    return Markup(escape(json.dumps(json.loads(config), indent=2, ensure_ascii=True)))


def write_layer_pages(con: duckdb.DuckDBPyConnection, info: LayerInfo, env: jinja2.Environment, folder: Path,
                      path: str, root: str, bos_token: str | None, neighbours: tuple[str | None, str | None],
                      model_anchor: str) -> int:
    """Write `<layer>/index.html` and `<layer>/unit.html`; returns their size in bytes. neighbours: hrefs of the
    previous/next layer pages."""
    rows, explained = _rows(con, info, bos_token)
    shared = {"root": root, "info": info, "model_anchor": model_anchor, "noun": noun(info),
              "map_href": MAP_PAGE if has_layout(con, info.key) else None}
    pages = {
        "index.html": env.get_template("layer.html").render(
            n_units=len(rows), rows=Markup("\n".join(rows)), config=config_text(info.config), prev=neighbours[0],
            next=neighbours[1], explained=explained, **shared),
        "unit.html": env.get_template("unit.html").render(path=path, shard_units=SHARD_UNITS, **shared),
    }
    size = 0
    for name, html in pages.items():
        data = html.encode("utf-8")
        (folder / name).write_bytes(data)
        size += len(data)
    return size
