"""Layer pages: every unit of a layer in one light table, with a plain-text snippet of its top example."""

from __future__ import annotations

from pathlib import Path

import duckdb
import jinja2
from markupsafe import Markup

from featureatlas.build.numbers import format_activation
from featureatlas.build.reader import LayerKey, read_snippets
from featureatlas.build.tokens import token_text

SNIPPET_BEFORE = 8
SNIPPET_AFTER = 3


def snippet_html(tokens: list[str], max_index: int, cut_before: bool, cut_after: bool) -> str:
    """`…before<mark>max</mark>after…` as escaped text: no per-token markup, so 1536 rows stay light."""
    before = "".join(map(token_text, tokens[:max_index]))
    after = "".join(map(token_text, tokens[max_index + 1:]))
    mark = token_text(tokens[max_index]) if 0 <= max_index < len(tokens) else ""
    return ("\u2026" if cut_before else "") + f"{before}<mark>{mark}</mark>{after}" + ("\u2026" if cut_after else "")


def _rows(con: duckdb.DuckDBPyConnection, key: LayerKey, bos_token: str | None) -> list[str]:
    table = read_snippets(con, key, SNIPPET_BEFORE, SNIPPET_AFTER).to_pydict()
    rows = []
    for unit, top, n, position, start, length, tokens in zip(
            table["unit"], table["max_activation"], table["n_examples"], table["max_position"],
            table["snippet_start"], table["context_length"], table["snippet"], strict=True):
        if tokens and position is not None and 0 <= position - start < len(tokens):
            index, cut_after = position - start, start + len(tokens) < length
            if start == 0 and bos_token is not None and tokens[0] == bos_token and index > 0:
                tokens, index = tokens[1:], index - 1  # the BOS says nothing about the text
            snippet = snippet_html(tokens, index, start > 0, cut_after)
        else:
            snippet = '<span class="none">no examples</span>'
        rows.append(f'<tr><td><a href="{unit}.html">{unit}</a></td><td>{format_activation(top)}</td>'
                    f"<td>{n}</td><td>{snippet}</td></tr>")
    return rows


def write_layer_page(con: duckdb.DuckDBPyConnection, key: LayerKey, template: jinja2.Template, folder: Path,
                     root: str, bos_token: str | None, hook: str | None,
                     neighbours: tuple[str | None, str | None], model_anchor: str) -> int:
    """Write `<layer>/index.html`; returns its size in bytes. neighbours: hrefs of the previous/next layer."""
    rows = _rows(con, key, bos_token)
    html = template.render(root=root, model=key.model, source=key.source, layer=key.layer, hook=hook,
                           n_units=len(rows), rows=Markup("\n".join(rows)), prev=neighbours[0],
                           next=neighbours[1], model_anchor=model_anchor)
    data = html.encode("utf-8")
    (folder / "index.html").write_bytes(data)
    return len(data)

