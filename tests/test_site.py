"""The static site: layout, links, escaping, content checked against the store, and safe publishing."""

from __future__ import annotations

import html as html_lib
import json
import os
import re
import subprocess
import threading
import urllib.request
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import duckdb
import numpy as np
import pytest

from featureatlas.build import worker
from featureatlas.build.numbers import (
    decode_activations,
    encode_examples,
    format_activation,
    format_percent,
)
from featureatlas.build.output import MARKER, SiteError
from featureatlas.build.search_index import fnv1a
from featureatlas.build.shards import SHARD_UNITS, context_token_indices, numbers, read_js
from featureatlas.build.site import build_site
from featureatlas.build.worker import WINDOWS
from featureatlas.serve.server import make_server
from featureatlas.slugs import slugify, unique_slugs
from featureatlas.store.schema import StoreError, create_schema, open_store
from featureatlas.text import token_text

from helpers.synthetic_store import BOS, MODEL, PLAIN_TOKENS, SAE_CONFIG, histogram_bin, make_store

CSP = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'"
# Raw characters that must never reach a page: controls (other than newline) and direction overrides.
FORBIDDEN_CHARS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069\u200e\u200f]")


class Page(HTMLParser):
    """Everything the tests look at in one pass: tags, attributes, ids, and each example with its section,
    quantile interval, shown rank and value, and per token its classes and text."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.ids: set[str] = set()
        self.examples: list[dict] = []
        self.csp: str | None = None
        self._sections: list[str | None] = []  # ids of the open <section>s (None for those without one)
        self._interval = -1  # quantile intervals seen so far
        self._header: dict[str, str] = {}  # the rank and value of the example being read
        self._in_header_span: str | None = None
        self._token: dict | None = None
        self._depth_in_token = 0
        self._in_ctx = False
        self.feed(text)
        self.close()

    @property
    def section(self) -> str | None:
        return next((s for s in reversed(self._sections) if s), None)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags.append((tag, a))
        if a.get("id"):
            self.ids.add(a["id"] or "")
        if tag == "meta" and a.get("http-equiv") == "Content-Security-Policy":
            self.csp = a.get("content")
        classes = (a.get("class") or "").split()
        if tag == "section":
            self._sections.append(a.get("id"))
            self._interval += "interval" in classes
        elif tag == "span" and {"rank", "act"} & set(classes):
            self._in_header_span = classes[0]
            self._header[classes[0]] = ""
        elif tag == "div" and "ctx" in classes:
            self._in_ctx = True
            self.examples.append({"acts": a.get("data-acts"), "tokens": [], "classes": classes,
                                  "section": self.section, "interval": self._interval, **self._header})
        elif self._in_ctx and tag == "b" and self._token is None:
            self._token = {"classes": (a.get("class") or "").split(), "text": "", "tabindex": a.get("tabindex")}
            self.examples[-1]["tokens"].append(self._token)
        elif self._token is not None:
            self._depth_in_token += 1

    def handle_endtag(self, tag: str) -> None:
        if self._token is not None:
            if self._depth_in_token:
                self._depth_in_token -= 1
            else:
                self._token = None
        elif self._in_ctx and tag == "div":
            self._in_ctx = False
        elif tag == "section":
            self._sections.pop()
        elif tag == "span":
            self._in_header_span = None

    def handle_data(self, data: str) -> None:
        if self._token is not None:
            self._token["text"] += data
        elif self._in_header_span:
            self._header[self._in_header_span] += data

    def in_section(self, section: str) -> list[dict]:
        return [example for example in self.examples if example["section"] == section]


def pages(site: Path) -> dict[Path, str]:
    return {path: path.read_text(encoding="utf-8") for path in sorted(site.rglob("*.html"))}


SOURCE_FOLDERS = {"mlp": "mlp", "resid": "resid", "sae:res": "sae-res"}


def layer_dir(site: Path, layer: int, source: str = "mlp") -> Path:
    return site / slugify(MODEL) / SOURCE_FOLDERS[source] / str(layer)


def unit_data(site: Path, source: str, layer: int, unit: int) -> tuple[dict, dict]:
    """The data shard holding a unit, and the unit's entry in it."""
    key, shard = read_js((layer_dir(site, layer, source) / "d" / f"{unit // SHARD_UNITS}.js").read_text())
    assert key == f"{slugify(MODEL)}/{SOURCE_FOLDERS[source]}/{layer}/d/{unit // SHARD_UNITS}"
    assert shard["v"] == 1 and shard["bos"] == BOS
    return shard, next(row for row in shard["units"] if row["u"] == unit)


def query(store: Path, sql: str, params: list) -> list[tuple]:
    con = open_store(store)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def layer_statistics(store: Path, source: str, layer: int) -> dict[int, dict]:
    """Every unit's statistics row of one layer, by unit: one query where a page lists the whole layer."""
    con = open_store(store)
    try:
        cursor = con.execute("SELECT * FROM statistics WHERE source = ? AND layer = ?", [source, layer])
        names = [d[0] for d in cursor.description]
        return {row["unit"]: row for row in (dict(zip(names, r, strict=True)) for r in cursor.fetchall())}
    finally:
        con.close()


def store_statistics(store: Path, source: str, layer: int, unit: int) -> dict:
    con = open_store(store)
    try:
        cursor = con.execute("SELECT * FROM statistics WHERE source = ? AND layer = ? AND unit = ?",
                             [source, layer, unit])
        names = [d[0] for d in cursor.description]
        return dict(zip(names, cursor.fetchone(), strict=True))
    finally:
        con.close()


def store_examples(store: Path, source: str, layer: int, unit: int, kind: str) -> list[tuple]:
    """(rank, value, position, activations, tokens, interval_lo, interval_hi, start_token) in page order."""
    return query(store, """SELECT e.rank, e.max_activation, e.max_position, e.activations, c.tokens,
                                  e.interval_lo, e.interval_hi, c.start_token
                           FROM examples e JOIN contexts c USING (context_id)
                           WHERE source = ? AND layer = ? AND unit = ? AND example_kind = ?
                           ORDER BY interval_hi DESC, interval_lo DESC, rank""", [source, layer, unit, kind])


def shown_window(kind: str, position: int, length: int) -> tuple[int, int]:
    """The tokens [lo, hi) a page shows of an example: a window around its max (min) token."""
    before, after = WINDOWS.top if kind == "top" else WINDOWS.other
    lo = max(position - before, 0)
    return (0 if lo == 1 else lo), min(position + after + 1, length)


# --- layout -----------------------------------------------------------------------------------------

def test_layout_and_page_counts(site_dir: Path) -> None:
    assert (site_dir / "index.html").is_file()
    assert (site_dir / MARKER).is_file()
    assert (site_dir / "static" / "style.css").is_file() and (site_dir / "static" / "core.js").is_file()
    folders = {(source, layer): n for source in ("mlp", "resid") for layer in (0, 1) for n in [50]}
    folders[("sae:res", 1)] = 100  # the dictionary sits on its hook's layer only, twice as wide
    for (source, layer), n in folders.items():
        folder = layer_dir(site_dir, layer, source)
        assert sorted(p.name for p in folder.glob("*.html")) == ["index.html", "unit.html"]
        assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*.js")) == ["c/0.js", "d/0.js"]
        assert [row["u"] for row in unit_data(site_dir, source, layer, 0)[0]["units"]] == list(range(n))
    assert not layer_dir(site_dir, 0, "sae:res").exists()
    assert len(pages(site_dir)) == 2 + 2 * len(folders)  # index, search, and two pages a layer


def test_every_page_has_the_csp_and_no_inline_code(site_dir: Path) -> None:
    for path, text in pages(site_dir).items():
        page = Page(text)
        assert page.csp == CSP, path
        for tag, attrs in page.tags:
            assert tag not in {"style", "iframe", "object", "embed", "img", "textarea"}, (path, tag)
            assert "style" not in attrs, (path, tag)  # the histogram's SVG too: colours come from classes
            assert not any(name.startswith("on") for name in attrs), (path, tag, attrs)
            if tag == "script":  # the shared page scripts only, each deferred so they run in order
                assert re.fullmatch(r"(\.\./)*static/[a-z]+\.js", attrs.get("src") or "") and "defer" in attrs, path
        scripts = [attrs["src"].rsplit("/", 1)[1] for tag, attrs in page.tags if tag == "script"]
        assert scripts[0] == "core.js" and scripts[-1] == "keys.js", path  # the FA namespace first, the keys last
        assert "<script>" not in text and "<script " not in text.replace('<script src="', ""), path


def test_internal_links_resolve_and_nothing_is_external(site_dir: Path) -> None:
    all_pages = pages(site_dir)
    ids = {path: Page(text).ids for path, text in all_pages.items()}
    checked = 0
    for path, text in all_pages.items():
        for _, attrs in Page(text).tags:
            for name in ("href", "src", "action", "poster", "srcset", "xlink:href"):
                url = attrs.get(name)
                if url is None:
                    continue
                assert not re.match(r"^\s*(https?:|//|ftp:|javascript:|file:)", url, re.I), (path, url)
                if url.startswith("data:"):
                    assert name == "href" and url == "data:,", (path, url)  # the empty favicon only
                    continue
                target, _, fragment = url.partition("#")
                resolved = (path.parent / target).resolve() if target else path
                assert resolved.is_file(), (path, url)
                assert site_dir.resolve() in resolved.parents, (path, url)
                if fragment and resolved.name == "unit.html":  # a unit: its number must be in the layer's data
                    shard = resolved.parent / "d" / f"{int(fragment) // SHARD_UNITS}.js"
                    assert int(fragment) in {u["u"] for u in read_js(shard.read_text())[1]["units"]}, (path, url)
                elif fragment:
                    assert fragment in ids[resolved], (path, url)
                checked += 1
    assert checked > 300
    for path in (site_dir / "static").iterdir():
        static = path.read_text().replace('"http://www.w3.org/2000/svg"', "SVG_NS")
        assert "http:" not in static and "https:" not in static and "url(" not in static
        assert not re.search(r"\.(innerHTML|outerHTML)\b|insertAdjacentHTML|document\.write|eval\(", static)


# --- escaping ---------------------------------------------------------------------------------------

def test_hostile_strings_render_as_text(site_dir: Path) -> None:
    all_pages = pages(site_dir)
    joined = "\n".join(all_pages.values())
    for path, text in all_pages.items():
        assert not FORBIDDEN_CHARS.search(text), (path, FORBIDDEN_CHARS.search(text))
        assert "<script>alert" not in text and "<img" not in text and "</textarea>" not in text, path
        assert "<b>v1" not in text and "<b>docs" not in text and "<b>res" not in text, path  # model, corpus, SAE
        assert "</pre><script>" not in text, path  # the dictionary config
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in joined
    assert "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;" in joined
    assert "&lt;/textarea&gt;" in joined
    assert "a\\x00b" in joined  # NUL as a visible escape (in snippets)
    assert "\\u202eevil" in joined  # direction override as an escape
    assert "{{ 7*7 }}" in joined  # store text is never evaluated as a template
    index = all_pages[site_dir / "index.html"]
    assert "Tiny &#34;LM&#34; &lt;b&gt;v1&lt;/b&gt;/../x" in index
    # Paths of the building machine show as their last part: the dictionary folder's name, not where it lies.
    assert "<code>layer_1</code>" in index and "/data/saes" not in joined
    # The data shards are JSON for unit.js, which only ever sets text: the raw strings survive exactly.
    shard, _ = unit_data(site_dir, "mlp", 1, 0)
    assert "<script>alert(1)</script>" in shard["toks"] and "a\x00b" in shard["toks"]
    assert any("\u202e" in doc for doc in shard["docs"])


def test_dictionary_config_is_shown_as_escaped_json(site_dir: Path) -> None:
    text = (layer_dir(site_dir, 1, "sae:res") / "index.html").read_text()
    config = re.search(r"<summary>Dictionary config</summary><pre>(.*?)</pre>", text, re.S)
    assert config, "the SAE's layer page shows its config"
    shown = html_lib.unescape(config.group(1))
    assert json.loads(shown) == SAE_CONFIG  # every value, with \u202e written as an escape
    assert "\\u202eevil" in config.group(1) and "&lt;/pre&gt;&lt;script&gt;" in config.group(1)
    assert "Dictionary config" not in (layer_dir(site_dir, 1, "resid") / "index.html").read_text()


def test_token_display() -> None:
    assert token_text("one\ntwo") == "one\u23cetwo"
    assert token_text("<\x00>") == "&lt;\\x00&gt;"
    assert token_text("a  b") == "a\u00b7\u00b7b" and token_text(" the") == " the"
    assert token_text("x\u202ey") == "x\\u202ey" and token_text("\r\n") == "\\r\u23ce"


def test_slugs() -> None:
    assert slugify("SmolLM2-135M-Instruct") == "smollm2-135m-instruct"
    assert slugify("../../etc/passwd") == "etc-passwd"
    assert slugify("..") == "x" and slugify("") == "x" and slugify("///") == "x"
    assert slugify("static") == "static-"
    assert slugify("a..b") == "a.b"
    assert slugify("sae:res") == "sae-res"
    assert all(re.fullmatch(r"[a-z0-9._-]+", slugify(name)) for name in ["\u00e9t\u00e9", "A B", "<x>", "."])
    assert unique_slugs(["A/B", "a-b", "a b"]) == {"A/B": "a-b", "a-b": "a-b-2", "a b": "a-b-3"}


def encode(values: np.ndarray) -> str:
    """One example's activation text."""
    return encode_examples(values, np.array([0]), np.array([len(values)]))[0]


def test_number_formats() -> None:
    values = np.array([0, 0.1234, -0.01234, 1.5, 12345.6, 0.9996, -2e-7, np.nan, np.inf, -np.inf], dtype=np.float32)
    text = encode(values)
    assert len(text) == 3 * len(values) and re.fullmatch(r"[A-Za-z0-9_-]*", text)
    decoded = decode_activations(text)
    assert decoded[:7] == [0, 0.123, -0.0123, 1.5, 12300, 1, -2e-7] and np.isnan(decoded[7])
    assert decoded[8:] == [np.inf, -np.inf]
    assert encode(np.array([], dtype=np.float32)) == ""
    assert encode(np.zeros(3, np.float32)) == "~C" and decode_activations("~C") == [0.0, 0.0, 0.0]
    # Every float32 comes back as its three significant digits, over the whole range, subnormals included.
    rng = np.random.default_rng(1)
    spread = rng.standard_normal(20_000) * 10.0 ** rng.uniform(-46, 38.5, 20_000)
    spread = spread[np.abs(spread) <= np.finfo(np.float32).max].astype(np.float32)
    spread[:4] = [np.finfo(np.float32).max, -np.finfo(np.float32).smallest_subnormal, 999.6, -0.09996]
    assert decode_activations(encode(spread)) == [float(f"{v:.3g}") for v in spread.tolist()]
    assert format_activation(None) == "\u2014" and format_activation(float("nan")) == "\u2014"
    assert format_activation(3.14159) == "3.142"
    assert [format_percent(f) for f in (0.1234, 0.000123, 0.0, 1.0, None)] == ["12.3%", "0.0123%", "0%", "100%",
                                                                                "\u2014"]


# --- unit data (drawn by unit.js; tests/test_browser.py checks the drawing) --------------------------

SPECIAL_UNITS = [("mlp", 0, 0), ("mlp", 1, 7), ("mlp", 1, 5), ("mlp", 0, 4), ("resid", 1, 9), ("resid", 0, 2),
                 ("sae:res", 1, 0), ("sae:res", 1, 5)]


def short(value: float | None) -> float | None:
    """A value as shards store it: five significant digits."""
    return None if value is None or np.isnan(value) else float(f"{value:.5g}")


@pytest.mark.parametrize("source,layer,unit", SPECIAL_UNITS)
def test_statistics_histogram_and_logits_match_the_store(site_dir: Path, store_path: Path, source: str, layer: int,
                                                         unit: int) -> None:
    shard, row = unit_data(site_dir, source, layer, unit)
    stats = store_statistics(store_path, source, layer, unit)
    assert row["s"] == [short(stats["max_activation"]), short(stats["min_activation"]), stats["n_tokens"],
                        stats["n_firing"], short(stats["mean"]), short(stats["std"])]
    bins = query(store_path, """SELECT bin, count FROM histograms WHERE source = ? AND layer = ? AND unit = ?
                                AND count > 0 ORDER BY bin""", [source, layer, unit])
    if bins:  # the first bin, then every bin's count up to the last non-empty one
        first, counts = row["h"]
        assert first == bins[0][0] and len(counts) == bins[-1][0] - first + 1
        assert [(first + i, c) for i, c in enumerate(counts) if c] == bins
    else:
        assert "h" not in row
    for polarity, key in (("top", "lt"), ("bottom", "lb")):
        logits = query(store_path, """SELECT token, token_id, effect FROM logit_effects WHERE source = ? AND layer = ?
                                      AND unit = ? AND polarity = ? ORDER BY rank""", [source, layer, unit, polarity])
        assert [[None if t is None else shard["toks"][t], i, e] for t, i, e in row[key]] == [
            [token, token_id, short(effect)] for token, token_id, effect in logits]


@pytest.mark.parametrize("source,layer,unit", SPECIAL_UNITS)
def test_examples_of_every_kind_match_the_store(site_dir: Path, store_path: Path, source: str, layer: int,
                                                unit: int) -> None:
    """Each kind holds the store's examples in page order: the tokens of a window around the max (min) token,
    its activations to three significant digits, its document and offset; bottom examples for signed sources."""
    shard, row = unit_data(site_dir, source, layer, unit)
    assert ("bottom" in row["ex"]) == (source == "resid" and bool(store_examples(store_path, source, layer, unit,
                                                                                 "bottom")))
    for kind in ("top", "bottom", "quantile", "random"):
        rows = store_examples(store_path, source, layer, unit, kind)
        shown = row["ex"].get(kind, [])
        assert len(shown) == len(rows), kind
        for example, (_, value, position, activations, tokens, interval_lo, interval_hi, start) in zip(
                shown, rows, strict=True):
            c, lo, shown_position, shown_value, acts = example[:5]
            ctx = shard["ctx"][c]
            expected_lo, hi = shown_window(kind, position, len(tokens))
            assert (lo, shown_position, shown_value) == (expected_lo, position, short(value))
            assert decode_activations(acts) == [float(f"{a:.3g}") for a in activations[lo:hi]]
            assert len(acts) <= 3 * (hi - lo)  # runs of zeros are shorter
            indices = context_token_indices(shard, c)
            assert [shard["toks"][t] for t in indices[lo - ctx[2]:hi - ctx[2]]] == tokens[lo:hi]
            assert ctx[1] == start and ctx[3] == len(tokens) and shard["docs"][ctx[0]]
            if kind == "quantile":
                assert example[5:] == [short(interval_lo), short(interval_hi)]


def test_contexts_are_stored_once_per_shard(site_dir: Path) -> None:
    shard, _ = unit_data(site_dir, "mlp", 1, 0)
    uses = [ex[0] for row in shard["units"] for kind in row["ex"].values() for ex in kind]
    assert len(uses) > 2 * len(shard["ctx"])  # units share contexts: each is written once
    assert sorted(set(uses)) == list(range(len(shard["ctx"])))
    assert len(shard["toks"]) == len(set(shard["toks"]))


def test_examples_show_a_window_around_their_max(tmp_path: Path) -> None:
    """In 64-token contexts, top examples show up to 32 tokens before their max token and 8 after; the other
    kinds 10 before their max (min) and 4 after."""
    store = make_store(tmp_path / "long.duckdb", n_layers=1, n_units=6, context_length=64, sources=("resid",),
                       vocabulary=PLAIN_TOKENS)
    build_site(store, tmp_path / "site", workers=1, progress=False)
    shard, row = unit_data(tmp_path / "site", "resid", 0, 0)
    cut = 0
    for kind in ("top", "bottom", "quantile", "random"):
        before, after = WINDOWS.top if kind == "top" else WINDOWS.other
        for example in row["ex"][kind]:
            lo, position, n = example[1], example[2], len(decode_activations(example[4]))
            assert n <= 1 + before + after and lo <= position < lo + n
            assert lo == shown_window(kind, position, 64)[0]
            cut += lo > 0
    assert cut > 5


def test_bin_edges_are_the_store_views() -> None:
    """The fixture's histogram bins are the `histograms` view's: bin b holds [lo, hi)."""
    con = duckdb.connect()
    create_schema(con)
    con.execute("INSERT INTO t_histograms VALUES ('m', 's', 0, 0, ?, ?)", [list(range(-130, 131)), [1] * 261])
    view = con.execute("SELECT bin, lo FROM histograms WHERE bin >= 2 ORDER BY bin").fetchall()
    lows = np.array([lo for _, lo in view])
    assert histogram_bin(lows).tolist() == list(range(2, 131))
    assert histogram_bin(-lows).tolist() == list(range(-2, -131, -1))


def test_prev_next_across_shards(tmp_path: Path) -> None:
    store = make_store(tmp_path / "wide.duckdb", n_layers=1, n_units=300, sources=("mlp",), k=1, context_length=8)
    build_site(store, tmp_path / "site", workers=1, progress=False)
    first, _ = unit_data(tmp_path / "site", "mlp", 0, 0)
    second, _ = unit_data(tmp_path / "site", "mlp", 0, 299)
    assert [u["u"] for u in first["units"]] == list(range(256)) and (first["prev"], first["next"]) == (None, 256)
    assert [u["u"] for u in second["units"]] == list(range(256, 300))
    assert (second["prev"], second["next"]) == (255, None)


def test_search_index_finds_units_by_peak_token_logit_and_address(site_dir: Path, store_path: Path) -> None:
    _, manifest = read_js((site_dir / "search" / "manifest.js").read_text())
    layers = manifest["layers"]
    assert [(layer["source"], layer["layer"]) for layer in layers] == [
        ("mlp", 0), ("mlp", 1), ("resid", 0), ("resid", 1), ("sae:res", 1)]
    assert all((site_dir / layer["path"] / "unit.html").is_file() for layer in layers)
    terms: dict[str, list] = {}
    for path in (site_dir / "search" / "t").glob("*.js"):
        key, shard = read_js(path.read_text())
        assert key == f"search/t/{path.stem}"
        for term, postings in shard.items():
            assert fnv1a(term) % manifest["shards"] == int(path.stem)
            terms[term] = postings
    peaks = query(store_path, """SELECT e.source, e.layer, e.unit, c.tokens[e.max_position + 1] AS t
                                 FROM examples e JOIN contexts c USING (context_id)
                                 WHERE example_kind = 'top'""", [])
    counts = Counter((source, layer, unit, token.strip().lower()) for source, layer, unit, token in peaks)
    index_of = {(layer["source"], layer["layer"]): i for i, layer in enumerate(layers)}
    for (source, layer, unit, term), count in counts.items():
        if term:
            assert [0, index_of[source, layer], unit, count] in terms[term], (source, layer, unit, term)
    logits = query(store_path, """SELECT source, layer, unit, token FROM logit_effects
                                  WHERE polarity = 'top' AND token IS NOT NULL""", [])
    for source, layer, unit, token in logits[:50]:
        term = token.strip().lower()
        if term:
            assert any(p[:3] == [1, index_of[source, layer], unit] for p in terms[term])


def test_cards_give_a_search_result_its_line(site_dir: Path, store_path: Path) -> None:
    key, cards = read_js((layer_dir(site_dir, 1) / "c" / "0.js").read_text())
    assert key.endswith("/mlp/1/c/0") and [c[0] for c in cards["units"]] == list(range(50))
    unit, top, _, frequency, snippet, mark, explanation = cards["units"][7]
    stats = store_statistics(store_path, "mlp", 1, 7)
    assert top == short(stats["max_activation"]) and frequency == short(stats["frequency"])
    (_, _, position, _, tokens, *_), *_ = store_examples(store_path, "mlp", 1, 7, "top")
    assert snippet[mark] == tokens[position] and BOS not in snippet and explanation is None


# --- layer and index pages --------------------------------------------------------------------------

ROW = re.compile(r'<tr><td><a href="unit\.html#(\d+)">\d+</a></td>((?:<td>[^<]*</td>)+)<td>(.*?)</td></tr>')


def layer_rows(site: Path, source: str, layer: int) -> list[tuple[int, list[str], str]]:
    text = (layer_dir(site, layer, source) / "index.html").read_text()
    return [(int(unit), re.findall(r"<td>([^<]*)</td>", cells), snippet) for unit, cells, snippet in ROW.findall(text)]


def test_layer_page_lists_every_unit_with_its_numbers_and_a_snippet(site_dir: Path, store_path: Path) -> None:
    rows = layer_rows(site_dir, "mlp", 1)
    assert [unit for unit, _, _ in rows] == list(range(50))
    statistics = layer_statistics(store_path, "mlp", 1)
    for unit, cells, _ in rows:
        stats = statistics[unit]
        assert cells == [format_activation(stats["max_activation"]), format_percent(stats["frequency"])]
    assert "<b" not in "".join(snippet for *_, snippet in rows)  # plain text, no per-token elements
    (_, _, position, _, tokens, *_), *_ = store_examples(store_path, "mlp", 1, 7, "top")
    assert f"<mark>{token_text(tokens[position])}</mark>" in rows[7][2]
    assert all(snippet.count("<mark>") == 1 for unit, _, snippet in rows if unit != 3)
    assert rows[3][2] == '<span class="none">no examples</span>' and rows[3][1] == ["\u2014", "\u2014"]
    text = (layer_dir(site_dir, 1) / "index.html").read_text()
    assert [b for b in re.findall(r'data-sort="\d">([^<>]+)</button>', text)] == ["Unit", "Max", "Firing"]


def test_signed_layer_pages_show_min_and_largest_magnitude(site_dir: Path, store_path: Path) -> None:
    rows = layer_rows(site_dir, "resid", 1)
    statistics = layer_statistics(store_path, "resid", 1)
    for unit, cells, _ in rows:
        stats = statistics[unit]
        magnitude = max(abs(stats["max_activation"]), abs(stats["min_activation"]))
        assert cells == [format_activation(stats["max_activation"]), format_activation(stats["min_activation"]),
                         format_activation(magnitude), format_percent(stats["frequency"])]
    largest = max(rows, key=lambda row: float(row[1][2]))
    assert largest[0] == 9  # the outlier dimension
    text = (layer_dir(site_dir, 1, "resid") / "index.html").read_text()
    assert re.findall(r'data-sort="\d">([^<>]+)</button>', text) == ["Unit", "Max", "Min", "Max |act|", "Firing"]
    assert re.findall(r'data-sort="(\d)"', text) == ["0", "1", "2", "3", "4"]


def test_index_lists_models_sources_layers_and_run(site_dir: Path) -> None:
    text = (site_dir / "index.html").read_text()
    slug = slugify(MODEL)
    for folder in ("mlp/0", "mlp/1", "resid/0", "resid/1", "sae-res/1"):
        assert f'href="{slug}/{folder}/index.html"' in text
    for fact in ("<dt>Corpus</dt><dd>b&gt;</dd>", "375,000", "25,000", "<dd>16</dd>", "<dd>5</dd>", "float32",
                 "2025-01-02 04:05"):
        assert fact in text
    headings = re.findall(r"<h3>(.*?)</h3>", text)
    assert headings == ['mlp <span class="count">MLP neurons · 100 units in 2 layers</span>',
                        'resid <span class="count">residual stream dimensions, signed · 100 units in 2 layers</span>',
                        'sae:res <span class="count">SAE features · 100 units in 1 layer</span>']
    assert "Architecture jumprelu · <code>layer_1</code>" in text
    assert "<code>blocks.1.hook_resid_post</code>" in text and "<code>blocks.0.mlp.hook_post</code>" in text
    assert 'title="model.layers.1.mlp.down_proj:input"' in text
    assert "48 active" in text and "99 active" in text  # MLP units 3 and 4 never fire, nor does SAE feature 3


def test_bytes_and_files_per_unit_stay_small(tmp_path: Path) -> None:
    """Units as the harvest's defaults fill them: 20 top examples, 20 bottom examples (signed units), 12 quantile
    intervals of 2 samples and 4 random samples, from 64-token contexts; a histogram and 20 logits. A few KB a
    unit (contexts are shared within a shard) and files growing with units / 100 or slower."""
    store = make_store(tmp_path / "big.duckdb", n_layers=1, n_units=300, k=20, context_length=64,
                       vocabulary=PLAIN_TOKENS + ["\n"], quantiles=(12, 2), n_random=4)
    summary = build_site(store, tmp_path / "site", workers=1, progress=False)
    files = [p for p in (tmp_path / "site").rglob("*") if p.is_file()]
    assert summary.units == 1200 and summary.files == len(files) - 1  # the marker is not counted
    data = sum(p.stat().st_size for p in files if p.parent.name in ("d", "c"))
    assert data / summary.units < 12_000, data / summary.units
    n_layers = 4  # a data and a card file per 256 units of each layer
    assert sum(p.parent.name in ("d", "c") for p in files) <= 2 * (summary.units / SHARD_UNITS + n_layers)


def test_two_models_and_parallel_workers(tmp_path: Path) -> None:
    """Two models in one store, built by worker processes: each model has its own folder and index entry."""
    store = make_store(tmp_path / "a.duckdb", n_layers=1, n_units=30, models=("static", "Other/Model"))
    out = tmp_path / "site"
    summary = build_site(store, out, workers=2, progress=False)
    assert summary.units == 2 * (30 + 30 + 60) and summary.index == out / "index.html"
    assert (out / "static-" / "mlp" / "0" / "d" / "0.js").is_file()  # "static" must not clash with static/
    assert (out / "other-model" / "sae-res" / "0" / "unit.html").is_file()
    assert summary.bytes == sum(p.stat().st_size for p in out.rglob("*") if p.is_file() and p.name != MARKER)
    assert summary.files == sum(1 for p in out.rglob("*") if p.is_file() and p.name != MARKER)
    index = (out / "index.html").read_text()
    assert 'id="m-static-"' in index and 'href="other-model/mlp/0/index.html"' in index
    unit = (out / "other-model" / "mlp" / "0" / "unit.html").read_text()
    assert '<a href="../../../index.html#m-other-model">Other/Model</a>' in unit


# --- publishing -------------------------------------------------------------------------------------

def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_refuses_a_folder_that_is_not_a_site(tmp_path: Path, store_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(SiteError, match=r"mine: folder is not empty and is not a featureatlas site"):
        build_site(store_path, out, workers=1, progress=False)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    assert leftovers(tmp_path) == []


def test_refuses_unusable_targets(tmp_path: Path, store_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(SiteError, match="exists and is not a folder"):
        build_site(store_path, a_file, workers=1, progress=False)
    with pytest.raises(SiteError, match="cannot create folder"):
        build_site(store_path, a_file / "site", workers=1, progress=False)
    with pytest.raises(StoreError):
        build_site(tmp_path / "missing.duckdb", tmp_path / "site", workers=1, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_builds_into_an_empty_folder_and_rebuilds_over_a_site(tmp_path: Path, store_path: Path) -> None:
    out = tmp_path / "site"
    out.mkdir()
    build_site(store_path, out, workers=1, progress=False)
    (out / "stale.html").write_text("from an older build")
    summary = build_site(store_path, out, workers=1, progress=False)
    assert summary.units == 300 and not (out / "stale.html").exists() and (out / MARKER).is_file()
    assert leftovers(tmp_path) == []


def test_a_crash_leaves_no_partial_output(tmp_path: Path, store_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = worker.render_shard
    calls = []

    def fail_on_second_call(*args: object, **kwargs: object) -> tuple[int, int]:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(worker, "render_shard", fail_on_second_call)
    out = tmp_path / "site"
    with pytest.raises(RuntimeError, match="disk on fire"):
        build_site(store_path, out, workers=1, progress=False)
    assert not out.exists() and leftovers(tmp_path) == [] and len(calls) == 2

    monkeypatch.setattr(worker, "render_shard", real)
    build_site(store_path, out, workers=1, progress=False)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != MARKER}
    calls.clear()
    monkeypatch.setattr(worker, "render_shard", fail_on_second_call)
    with pytest.raises(RuntimeError):
        build_site(store_path, out, workers=1, progress=False)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != MARKER} == before
    assert leftovers(tmp_path) == []


def test_leftovers_of_a_killed_build_are_removed(tmp_path: Path, store_path: Path) -> None:
    finished = subprocess.Popen(["true"])
    finished.wait()
    stale = tmp_path / f".site.{finished.pid}.partial"
    (stale / "static").mkdir(parents=True)
    running = tmp_path / f".site.{os.getppid()}.partial"  # a build that may still be going on
    running.mkdir()
    build_site(store_path, tmp_path / "site", workers=1, progress=False)
    assert leftovers(tmp_path) == [running.name]


# --- serving ----------------------------------------------------------------------------------------

def test_serve_refuses_a_folder_without_a_site(tmp_path: Path) -> None:
    with pytest.raises(SiteError, match="no index.html"):
        make_server(tmp_path, port=0)


def test_serve_serves_the_site(site_dir: Path) -> None:
    server = make_server(site_dir, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}/"
        with urllib.request.urlopen(base + "index.html", timeout=10) as response:
            assert response.status == 200 and response.headers["Content-Security-Policy"].startswith(CSP + "; ")
            assert b"featureatlas" in response.read()
        with urllib.request.urlopen(base + "static/core.js", timeout=10) as response:
            assert response.status == 200
    finally:
        server.shutdown()
        server.server_close()


# --- explanations and incremental builds --------------------------------------------------------------

def site_files(site: Path) -> dict[str, bytes]:
    return {str(p.relative_to(site)): p.read_bytes() for p in site.rglob("*")
            if p.is_file() and p.name not in (MARKER, ".featureatlas-build.json.gz")}


def test_explanations_are_shown_searched_and_rebuilt_incrementally(tmp_path: Path, store_path: Path) -> None:
    """annotate, then build --incremental: only the annotated layer is rendered again, and the result equals a
    full build; the explanation is in the unit's data, its layer page's table and the search index."""
    from featureatlas.annotate.explanations import annotate

    store = tmp_path / "store.duckdb"
    store.write_bytes(store_path.read_bytes())
    site = tmp_path / "site"
    first = build_site(store, site, workers=1, progress=False, incremental=True)
    assert first.reused_units == 0 and first.units == 300
    again = build_site(store, site, workers=1, progress=False, incremental=True)
    assert again.units == 0 and again.reused_units == 300  # nothing changed: every layer linked
    notes = tmp_path / "notes.csv"
    notes.write_text('unit,text,score,author\nresid/1/9,"the outlier <b>dimension</b>\u202e",0.9,alice\n')
    annotate(store, notes)
    after = build_site(store, site, workers=1, progress=False, incremental=True)
    assert after.units == 50 and after.reused_units == 250  # the annotated layer only
    full = build_site(store, tmp_path / "full", workers=1, progress=False)
    assert site_files(site) == site_files(tmp_path / "full") and full.files == after.files

    _, row = unit_data(site, "resid", 1, 9)
    assert row["x"] == [["the outlier <b>dimension</b>\u202e", 0.9, "alice", None]]
    layer = (layer_dir(site, 1, "resid") / "index.html").read_text()
    assert "<td>the outlier &lt;b&gt;dimension&lt;/b&gt;\\u202e</td>" in layer and "Explanation</th>" in layer
    assert "Explanation</th>" not in (layer_dir(site, 1) / "index.html").read_text()
    _, manifest = read_js((site / "search" / "manifest.js").read_text())
    term_file = site / "search" / "t" / f"{fnv1a('outlier') % manifest['shards']}.js"
    postings = read_js(term_file.read_text())[1]["outlier"]
    assert postings == [[2, 3, 9, 1]]  # kind 2: an explanation's word; the fourth layer (resid 1); unit 9


def test_incremental_build_of_another_site_renders_everything(tmp_path: Path, store_path: Path) -> None:
    site = tmp_path / "site"
    build_site(store_path, site, workers=1, progress=False)
    other = make_store(tmp_path / "other.duckdb", n_layers=2, n_units=40)  # another harvest
    summary = build_site(other, site, workers=1, progress=False, incremental=True)
    assert summary.units == 240 and summary.reused_units == 0
    assert site_files(site) == site_files(build_site(other, tmp_path / "full", workers=1, progress=False).index.parent)


def test_shard_numbers_have_five_significant_digits() -> None:
    rng = np.random.default_rng(0)
    values = (rng.standard_normal(50_000) * 10.0 ** rng.uniform(-40, 38, 50_000)).astype(np.float32)
    values[:6] = [0, np.nan, np.inf, -np.inf, 1e-45, -3.4e38]
    expected = [None, 3.4e38, -3.4e38] + [float(f"{v:.5g}") for v in values[4:].tolist()]
    assert numbers(values) == [0.0] + expected
