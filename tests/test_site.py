"""The static site: layout, links, escaping, content checked against the store, and safe publishing."""

from __future__ import annotations

import html as html_lib
import json
import os
import re
import subprocess
import threading
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import duckdb
import numpy as np
import pytest
from conftest import BOS, MISSING_TOKEN_ID, MODEL, N_LOGITS, PLAIN_TOKENS, SAE_CONFIG, histogram_bin, make_store

from featureatlas.build import examples, histogram, unit_pages
from featureatlas.build.numbers import (
    decode_activations,
    encode_activations,
    format_activation,
    format_one_in,
    format_percent,
)
from featureatlas.build.output import MARKER, SiteError
from featureatlas.build.serve import make_server
from featureatlas.build.site import build_site
from featureatlas.build.slugs import slugify, unique_slugs
from featureatlas.build.tokens import token_html, token_text
from featureatlas.store.schema import StoreError, create_schema, open_store

CSP = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:"
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


def unit_page(site: Path, source: str, layer: int, unit: int) -> str:
    return (layer_dir(site, layer, source) / f"{unit}.html").read_text()


def query(store: Path, sql: str, params: list) -> list[tuple]:
    con = open_store(store)
    try:
        return con.execute(sql, params).fetchall()
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
    before, after = examples.WINDOWS.top if kind == "top" else examples.WINDOWS.other
    lo = max(position - before, 0)
    return (0 if lo == 1 else lo), min(position + after + 1, length)


# --- layout -----------------------------------------------------------------------------------------

def test_layout_and_page_counts(site_dir: Path) -> None:
    assert (site_dir / "index.html").is_file()
    assert (site_dir / MARKER).is_file()
    assert (site_dir / "static" / "style.css").is_file() and (site_dir / "static" / "site.js").is_file()
    folders = {(source, layer): n for source in ("mlp", "resid") for layer in (0, 1) for n in [50]}
    folders[("sae:res", 1)] = 100  # the dictionary sits on its hook's layer only, twice as wide
    for (source, layer), n in folders.items():
        folder = layer_dir(site_dir, layer, source)
        assert (folder / "index.html").is_file()
        assert sorted(int(p.stem) for p in folder.glob("*.html") if p.stem != "index") == list(range(n))
    assert not layer_dir(site_dir, 0, "sae:res").exists()
    assert len(pages(site_dir)) == 1 + len(folders) + sum(folders.values())


def test_every_page_has_the_csp_and_no_inline_code(site_dir: Path) -> None:
    for path, text in pages(site_dir).items():
        page = Page(text)
        assert page.csp == CSP, path
        for tag, attrs in page.tags:
            assert tag not in {"style", "iframe", "object", "embed", "img", "textarea", "form"}, (path, tag)
            assert "style" not in attrs, (path, tag)  # the histogram's SVG too: colours come from classes
            assert not any(name.startswith("on") for name in attrs), (path, tag, attrs)
            if tag == "script":
                assert (attrs.get("src") or "").endswith("static/site.js"), path
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
                if fragment:
                    assert fragment in ids[resolved], (path, url)
                checked += 1
    assert checked > 2000
    for name in ("style.css", "site.js"):
        static = (site_dir / "static" / name).read_text()
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
    assert "a<i>\\x00</i>b" in joined  # NUL as a visible escape
    assert "<i>\\u202e</i>evil" in joined  # direction override as an escape
    assert "\\u202egnp.exe" in joined  # also in document names
    assert "{{ 7*7 }}" in joined  # store text is never evaluated as a template
    index = all_pages[site_dir / "index.html"]
    assert "Tiny &#34;LM&#34; &lt;b&gt;v1&lt;/b&gt;/../x" in index
    assert "/data/saes/&lt;b&gt;res&lt;/b&gt;\\u202e/layer_1" in index  # the dictionary path


def test_dictionary_config_is_shown_as_escaped_json(site_dir: Path) -> None:
    text = (layer_dir(site_dir, 1, "sae:res") / "index.html").read_text()
    config = re.search(r"<summary>Dictionary config</summary><pre>(.*?)</pre>", text, re.S)
    assert config, "the SAE's layer page shows its config"
    shown = html_lib.unescape(config.group(1))
    assert json.loads(shown) == SAE_CONFIG  # every value, with \u202e written as an escape
    assert "\\u202eevil" in config.group(1) and "&lt;/pre&gt;&lt;script&gt;" in config.group(1)
    assert "Dictionary config" not in (layer_dir(site_dir, 1, "resid") / "index.html").read_text()


def test_token_display() -> None:
    assert token_html("\n") == "<i>\u23ce\n</i>"  # a visible symbol, then the line break
    assert token_html("  ") == "<i>\u00b7\u00b7</i>"
    assert token_html(" the") == " the"
    assert token_html("\t") == "<i>\u21e5</i>"
    assert token_html("a  b") == "a<i>\u00b7\u00b7</i>b"
    assert token_html("<b>&") == "&lt;b&gt;&amp;"
    assert token_html("x\u202ey") == "x<i>\\u202e</i>y"
    assert token_text("one\ntwo") == "one\u23cetwo"
    assert token_text("<\x00>") == "&lt;\\x00&gt;"
    assert token_html("\r\n") == "<i>\\r\u23ce\n</i>" and token_html("\x7f\x85") == "<i>\\x7f\\x85</i>"
    # In logit tables a token is one line: the same glyphs, no line break.
    assert unit_pages.token_chip("\n\n", 5) == '<span class="tok"><i>\u23ce\u23ce</i></span>'
    assert unit_pages.token_chip(" <b>", 5) == '<span class="tok"> &lt;b&gt;</span>'
    assert unit_pages.token_chip(None, 9999) == '<span class="muted">id 9999</span>'


def test_slugs() -> None:
    assert slugify("SmolLM2-135M-Instruct") == "smollm2-135m-instruct"
    assert slugify("../../etc/passwd") == "etc-passwd"
    assert slugify("..") == "x" and slugify("") == "x" and slugify("///") == "x"
    assert slugify("static") == "static-"
    assert slugify("a..b") == "a.b"
    assert slugify("sae:res") == "sae-res"
    assert all(re.fullmatch(r"[a-z0-9._-]+", slugify(name)) for name in ["\u00e9t\u00e9", "A B", "<x>", "."])
    assert unique_slugs(["A/B", "a-b", "a b"]) == {"A/B": "a-b", "a-b": "a-b-2", "a b": "a-b-3"}


def test_number_formats() -> None:
    values = np.array([0, 0.1234, -0.01234, 1.5, 12345.6, 0.9996, -2e-7, np.nan, np.inf, -np.inf], dtype=np.float32)
    text = encode_activations(values)
    assert len(text) == 3 * len(values) and re.fullmatch(r"[A-Za-z0-9_-]*", text)
    decoded = decode_activations(text)
    assert decoded[:7] == [0, 0.123, -0.0123, 1.5, 12300, 1, -2e-7] and np.isnan(decoded[7])
    assert decoded[8:] == [np.inf, -np.inf]
    assert encode_activations(np.array([], dtype=np.float32)) == ""
    # Every float32 comes back as its three significant digits, over the whole range, subnormals included.
    rng = np.random.default_rng(1)
    spread = rng.standard_normal(20_000) * 10.0 ** rng.uniform(-46, 38.5, 20_000)
    spread = spread[np.abs(spread) <= np.finfo(np.float32).max].astype(np.float32)
    spread[:4] = [np.finfo(np.float32).max, -np.finfo(np.float32).smallest_subnormal, 999.6, -0.09996]
    assert decode_activations(encode_activations(spread)) == [float(f"{v:.3g}") for v in spread.tolist()]
    assert format_activation(None) == "\u2014" and format_activation(float("nan")) == "\u2014"
    assert format_activation(3.14159) == "3.142"
    assert [format_percent(f) for f in (0.1234, 0.000123, 0.0, 1.0, None)] == ["12.3%", "0.0123%", "0%", "100%",
                                                                                "\u2014"]
    assert [format_one_in(f) for f in (0.000123, 0.25, 0.9, 0.0, float("nan"))] == [
        "1 in 8,130 tokens", "1 in 4 tokens", "every token", "never", "no token seen"]


# --- unit pages -------------------------------------------------------------------------------------

SPECIAL_UNITS = [("mlp", 0, 0), ("mlp", 1, 7), ("mlp", 1, 5), ("mlp", 0, 4), ("resid", 1, 9), ("resid", 0, 2),
                 ("sae:res", 1, 0), ("sae:res", 1, 5)]


@pytest.mark.parametrize("source,layer,unit", SPECIAL_UNITS)
def test_statistics_are_shown(site_dir: Path, store_path: Path, source: str, layer: int, unit: int) -> None:
    text = unit_page(site_dir, source, layer, unit)
    stats = store_statistics(store_path, source, layer, unit)
    facts = dict(re.findall(r'<div><dt>([^<]+)</dt><dd class="big">([^<]*)</dd>', text))
    assert facts == {"Max": format_activation(stats["max_activation"]),
                     "Min": format_activation(stats["min_activation"]),
                     "Fires on (&gt; 0)": format_percent(stats["frequency"]), "Mean": format_activation(stats["mean"]),
                     "Std": format_activation(stats["std"]), "Tokens counted": f"{stats['n_tokens']:,}"}
    assert f'<dd class="muted">{format_one_in(stats["frequency"])}</dd>' in text
    hook, hook_name = query(store_path, "SELECT hook, hook_name FROM sources WHERE source = ? AND layer = ?",
                            [source, layer])[0]
    assert f"<code>{hook_name}</code>" in text and f"<code class=\"muted\">{hook}</code>" in text
    noun = {"mlp": "Neuron", "resid": "Dimension", "sae:res": "Feature"}[source]
    assert f"<h1>{noun} {unit}</h1>" in text
    has_dictionary = source == "sae:res"
    assert ("<dt>Architecture</dt><dd>jumprelu</dd>" in text) == has_dictionary
    assert ("<code>/data/saes/&lt;b&gt;res&lt;/b&gt;\\u202e/layer_1</code>" in text) == has_dictionary


@pytest.mark.parametrize("source,layer,unit", SPECIAL_UNITS)
def test_examples_of_every_kind_match_the_store(site_dir: Path, store_path: Path, source: str, layer: int,
                                                unit: int) -> None:
    """Each section shows the store's examples of its kind, in order, token by token, with values, colours and
    the max token outlined; bottom examples only for signed sources."""
    page = Page(unit_page(site_dir, source, layer, unit))
    stats = store_statistics(store_path, source, layer, unit)
    signed = source == "resid"
    assert ("bottom" in page.ids) == signed
    for kind, section in (("top", "top"), ("bottom", "bottom"), ("quantile", "quantiles"), ("random", "random")):
        rows = store_examples(store_path, source, layer, unit, kind)
        shown = page.in_section(section)
        assert len(shown) == len(rows), kind
        assert [int(e["rank"].lstrip("#")) for e in shown] == [r[0] for r in rows]
        assert [e["act"] for e in shown] == [format_activation(r[1]) for r in rows]
        for example, (_, _, position, activations, tokens, *_) in zip(shown, rows, strict=True):
            lo, hi = shown_window(kind, position, len(tokens))
            acts = decode_activations(example["acts"])
            assert len(acts) == len(example["tokens"]) == hi - lo
            assert acts == [float(f"{a:.3g}") for a in activations[lo:hi]]  # three significant digits, exactly
            marked = [i for i, tok in enumerate(example["tokens"]) if "m" in tok["classes"]]
            assert marked == [position - lo] and example["tokens"][position - lo]["tabindex"] == "0"
            assert ("bos" in example["tokens"][0]["classes"]) == (lo == 0) and tokens[0] == BOS
            colours = [c for tok in example["tokens"] for c in tok["classes"] if re.fullmatch(r"[an]\d", c)]
            assert all(1 <= int(c[1]) <= examples.BUCKETS for c in colours)
    top = page.in_section("top")
    if top and stats["max_activation"] > 0:  # the unit's max gets the strongest colour
        position = store_examples(store_path, source, layer, unit, "top")[0][2]
        assert f"a{examples.BUCKETS}" in top[0]["tokens"][position]["classes"]
    if signed:  # the unit's min gets the strongest blue: bottom examples are scaled to the min
        (_, _, position, _, tokens, *_), *_ = store_examples(store_path, source, layer, unit, "bottom")
        lo, _ = shown_window("bottom", position, len(tokens))
        assert f"n{examples.BUCKETS}" in page.in_section("bottom")[0]["tokens"][position - lo]["classes"]
    if source == "mlp" and unit == 4:  # never positive: the colours are on the negative scale
        classes = {c for tok in top[0]["tokens"] if "bos" not in tok["classes"] for c in tok["classes"]}
        assert any(c.startswith("n") for c in classes) and not any(re.fullmatch(r"a\d", c) for c in classes)


def test_quantile_intervals_are_labelled_highest_first(site_dir: Path, store_path: Path) -> None:
    text = unit_page(site_dir, "sae:res", 1, 0)
    rows = store_examples(store_path, "sae:res", 1, 0, "quantile")
    intervals = list(dict.fromkeys((lo, hi) for *_, lo, hi, _ in rows))
    assert len(intervals) == 3 and intervals == sorted(intervals, reverse=True)
    unit_max = store_statistics(store_path, "sae:res", 1, 0)["max_activation"]
    headings = re.findall(r'<section class="interval"><h3>(.*?)</h3>', text)
    assert headings == [f'{format_activation(lo)} to {format_activation(hi)} <span class="count">'
                        f"{100 * lo / unit_max:.0f}\u2013{100 * hi / unit_max:.0f}% of max \u00b7 2 examples</span>"
                        for lo, hi in intervals]
    page = Page(text)
    for example, (_, value, *_, lo, hi, _) in zip(page.in_section("quantiles"), rows, strict=True):
        assert intervals.index((lo, hi)) == example["interval"] and lo <= value < hi


def test_examples_show_a_window_around_their_max(tmp_path: Path) -> None:
    """In 64-token contexts, top examples show up to 32 tokens before their max token and 8 after; the other
    kinds 10 before their max (min) and 4 after; an ellipsis marks a cut, and the offset is the first shown
    token's."""
    store = make_store(tmp_path / "long.duckdb", n_layers=1, n_units=6, context_length=64, sources=("resid",),
                       vocabulary=PLAIN_TOKENS)
    build_site(store, tmp_path / "site", workers=1, progress=False)
    page_text = (tmp_path / "site" / slugify(MODEL) / "resid" / "0" / "0.html").read_text()
    page = Page(page_text)
    cut = 0
    for kind, section in (("top", "top"), ("bottom", "bottom"), ("quantile", "quantiles"), ("random", "random")):
        rows = store_examples(store, "resid", 0, 0, kind)
        before, after = examples.WINDOWS.top if kind == "top" else examples.WINDOWS.other
        for example, (_, _, position, _, tokens, *_) in zip(page.in_section(section), rows, strict=True):
            lo, hi = shown_window(kind, position, 64)
            assert hi - lo <= 1 + before + after
            assert [t["text"] for t in example["tokens"]] == tokens[lo:hi]
            assert ("cut-l" in example["classes"]) == (lo > 0) and ("cut-r" in example["classes"]) == (hi < 64)
            cut += lo > 0
        text = re.split(r'<section id="|</main>', page_text.split(f'<section id="{section}"')[1])[0]
        first_text_token = [start + max(lo - 1, 0) for lo, start in  # the BOS stands before the first text token
                            ((shown_window(kind, row[2], 64)[0], row[-1]) for row in rows)]
        assert [int(n) for n in re.findall(r"from token (\d+)", text)] == first_text_token
    assert cut > 5


def test_bin_edges_are_the_store_views() -> None:
    """The edges the page labels bars with are the `histograms` view's, for every bin; so are the fixture's bins."""
    con = duckdb.connect()
    create_schema(con)
    con.execute("INSERT INTO t_histograms VALUES ('m', 's', 0, 0, ?, ?)", [list(range(-130, 131)), [1] * 261])
    view = con.execute("SELECT bin, lo, hi FROM histograms ORDER BY bin").fetchall()
    assert view == [(b, *histogram.bin_edges(b)) for b in range(-130, 131)]
    lows = np.array([histogram.bin_edges(b)[0] for b in range(2, 131)])
    assert histogram_bin(lows).tolist() == list(range(2, 131))
    assert histogram_bin(-lows).tolist() == list(range(-2, -131, -1))


def test_histogram_bars_match_the_store(site_dir: Path, store_path: Path) -> None:
    """One bar per non-empty bin with its range and count as its title; taller bars for larger counts; the
    negative side only where there are negative values; edges as the store's view defines them."""
    for source, layer, unit, negative in (("resid", 1, 9, True), ("sae:res", 1, 0, False), ("mlp", 1, 7, True)):
        rows = query(store_path, """SELECT bin, lo, hi, count FROM histograms
                                    WHERE source = ? AND layer = ? AND unit = ? AND count > 0 ORDER BY bin""",
                     [source, layer, unit])
        text = unit_page(site_dir, source, layer, unit)
        svg = re.search(r'<figure class="hist"><svg (.*?)</svg><figcaption id="hist-cap">(.*?)</figcaption>', text)
        assert svg and 'aria-labelledby="hist-cap"' in svg.group(1)
        bars = re.findall(r'<rect x="\d+" width=".86" height="(\d+)"><title>([^<]*)</title></rect>',
                          svg.group(1))
        assert [title for _, title in bars] == [f"{histogram.BIN_LABELS[b]}: {count:,}" for b, _, _, count in rows]
        heights = sorted(zip((count for *_, count in rows), (float(h) for h, _ in bars), strict=True))
        assert [h for _, h in heights] == sorted(h for _, h in heights)  # log scale keeps the order
        assert ('<g class="hn">' in svg.group(1)) == negative
        assert f"{sum(count for *_, count in rows):,} tokens counted" in svg.group(2)
    sae = unit_page(site_dir, "sae:res", 1, 0)
    assert '<g class="hz"><rect' in sae and "<title>exactly 0: " in sae  # most tokens: the zero bar
    assert "(every token of" not in sae and "(every token of 1 context in 8)" in unit_page(site_dir, "resid", 1, 9)
    assert histogram.BIN_LABELS[2] == "1.53e-05 to 1.91e-05" and histogram.BIN_LABELS[-130] == "-65.5k and below"


def test_logit_tables(site_dir: Path, store_path: Path) -> None:
    """Promoted and suppressed tokens in rank order, shown like tokens elsewhere, with their effects."""
    for source, unit in (("sae:res", 0), ("resid", 1)):
        text = unit_page(site_dir, source, 1, unit)
        for polarity, caption in (("top", "Promoted"), ("bottom", "Suppressed")):
            table = re.search(f"<caption>{caption}</caption>.*?<tbody>(.*?)</tbody>", text)
            assert table, caption
            shown = re.findall(r"<tr><td>(.*?)</td><td>([^<]*)</td></tr>", table.group(1))
            rows = query(store_path, """SELECT token, token_id, effect FROM logit_effects
                                        WHERE source = ? AND layer = 1 AND unit = ? AND polarity = ? ORDER BY rank""",
                         [source, unit, polarity])
            assert len(shown) == len(rows) == N_LOGITS
            assert shown == [(unit_pages.token_chip(token, token_id), f"{effect:+.3g}")
                             for token, token_id, effect in rows]
    promoted = unit_page(site_dir, "sae:res", 1, 0)
    assert '<span class="tok">&lt;script&gt;alert(1)&lt;/script&gt;</span>' in promoted
    assert f'<span class="muted">id {MISSING_TOKEN_ID}</span>' in unit_page(site_dir, "resid", 1, 1)
    assert "No logit effects in this store for this unit." in unit_page(site_dir, "mlp", 0, 0)  # none harvested


def test_absent_data_gets_a_short_line(site_dir: Path) -> None:
    never_seen = unit_page(site_dir, "mlp", 0, 3)
    assert never_seen.count("No examples: this neuron was never seen in the harvest.") == 3  # top, quantile, random
    assert "No histogram: this unit was never seen in the harvest." in never_seen
    assert '<dd class="big">\u2014</dd>' in never_seen and "no token seen" in never_seen
    assert '<div class="ctx"' not in never_seen and 'class="scale"' not in never_seen
    dead = unit_page(site_dir, "sae:res", 1, 3)
    assert dead.count("No examples: this feature never fired.") == 3 and "<dd class=\"muted\">never</dd>" in dead
    bars = re.findall(r"<rect[^>]*><title>([^<]*)</title>", dead)
    assert len(bars) == 1 and bars[0].startswith("exactly 0: ")  # a dead feature: only zeros
    assert Page(unit_page(site_dir, "mlp", 1, 5)).in_section("top").__len__() == 2  # fewer than k


def test_prev_next_up_links(site_dir: Path) -> None:
    def nav(unit: int, source: str = "mlp") -> dict[str, str]:
        text = unit_page(site_dir, source, 1, unit)
        return dict((rel, href) for href, rel in
                    ((a.get("href"), a.get("rel")) for tag, a in Page(text).tags if tag == "a") if rel)

    assert nav(0) == {"up": "index.html", "next": "1.html"}
    assert nav(10) == {"prev": "9.html", "up": "index.html", "next": "11.html"}
    assert nav(49) == {"prev": "48.html", "up": "index.html"}
    assert nav(99, "sae:res") == {"prev": "98.html", "up": "index.html"}
    layer0 = (layer_dir(site_dir, 0) / "index.html").read_text()
    assert 'rel="next" href="../1/index.html"' in layer0 and 'rel="prev"' not in layer0


# --- layer and index pages --------------------------------------------------------------------------

ROW = re.compile(r'<tr><td><a href="(\d+)\.html">\d+</a></td>((?:<td>[^<]*</td>)+)<td>(.*?)</td></tr>')


def layer_rows(site: Path, source: str, layer: int) -> list[tuple[int, list[str], str]]:
    text = (layer_dir(site, layer, source) / "index.html").read_text()
    return [(int(unit), re.findall(r"<td>([^<]*)</td>", cells), snippet) for unit, cells, snippet in ROW.findall(text)]


def test_layer_page_lists_every_unit_with_its_numbers_and_a_snippet(site_dir: Path, store_path: Path) -> None:
    rows = layer_rows(site_dir, "mlp", 1)
    assert [unit for unit, _, _ in rows] == list(range(50))
    for unit, cells, _ in rows:
        stats = store_statistics(store_path, "mlp", 1, unit)
        assert cells == [format_activation(stats["max_activation"]), format_percent(stats["frequency"])]
    assert "<b" not in "".join(snippet for *_, snippet in rows)  # plain text, no per-token elements
    (_, _, position, _, tokens, *_), *_ = store_examples(store_path, "mlp", 1, 7, "top")
    assert f"<mark>{token_text(tokens[position])}</mark>" in rows[7][2]
    assert all(snippet.count("<mark>") == 1 for unit, _, snippet in rows if unit != 3)
    assert rows[3][2] == '<span class="none">no examples</span>' and rows[3][1] == ["\u2014", "\u2014"]
    text = (layer_dir(site_dir, 1) / "index.html").read_text()
    assert [b for b in re.findall(r">([^<>]+)</button>", text)] == ["Unit", "Max", "Firing"]


def test_signed_layer_pages_show_min_and_largest_magnitude(site_dir: Path, store_path: Path) -> None:
    rows = layer_rows(site_dir, "resid", 1)
    for unit, cells, _ in rows:
        stats = store_statistics(store_path, "resid", 1, unit)
        magnitude = max(abs(stats["max_activation"]), abs(stats["min_activation"]))
        assert cells == [format_activation(stats["max_activation"]), format_activation(stats["min_activation"]),
                         format_activation(magnitude), format_percent(stats["frequency"])]
    largest = max(rows, key=lambda row: float(row[1][2]))
    assert largest[0] == 9  # the outlier dimension
    text = (layer_dir(site_dir, 1, "resid") / "index.html").read_text()
    assert re.findall(r">([^<>]+)</button>", text) == ["Unit", "Max", "Min", "Max |act|", "Firing"]
    assert re.findall(r'data-sort="(\d)"', text) == ["0", "1", "2", "3", "4"]


def test_index_lists_models_sources_layers_and_run(site_dir: Path) -> None:
    text = (site_dir / "index.html").read_text()
    slug = slugify(MODEL)
    for folder in ("mlp/0", "mlp/1", "resid/0", "resid/1", "sae-res/1"):
        assert f'href="{slug}/{folder}/index.html"' in text
    for fact in ("corpus/&lt;b&gt;docs&lt;/b&gt;", "375,000", "25,000", "<dd>16</dd>", "<dd>5</dd>", "float32",
                 "2025-01-02 04:05"):
        assert fact in text
    headings = re.findall(r"<h3>(.*?)</h3>", text)
    assert headings == ['mlp <span class="count">MLP neurons · 100 units in 2 layers</span>',
                        'resid <span class="count">residual stream dimensions, signed · 100 units in 2 layers</span>',
                        'sae:res <span class="count">SAE features · 100 units in 1 layer</span>']
    assert "Architecture jumprelu · <code>/data/saes/&lt;b&gt;res&lt;/b&gt;\\u202e/layer_1</code>" in text
    assert "<code>blocks.1.hook_resid_post</code>" in text and "<code>blocks.0.mlp.hook_post</code>" in text
    assert 'title="model.layers.1.mlp.down_proj:input"' in text
    assert "48 active" in text and "99 active" in text  # MLP units 3 and 4 never fire, nor does SAE feature 3


def test_unit_pages_stay_small(tmp_path: Path) -> None:
    """A page as the harvest's defaults fill it: 20 top examples, 20 bottom examples (signed units), 12 quantile
    intervals of 2 samples and 4 random samples, from 64-token contexts; a histogram and 20 logits."""
    store = make_store(tmp_path / "big.duckdb", n_layers=1, n_units=12, k=20, context_length=64,
                       vocabulary=PLAIN_TOKENS + ["\n"], quantiles=(12, 2), n_random=4)
    build_site(store, tmp_path / "site", workers=1, progress=False)
    sizes = {(path.parent.parent.name, int(path.stem)): path.stat().st_size
             for path in (tmp_path / "site").glob("*/*/0/[0-9]*.html")}
    assert len(sizes) == 12 + 12 + 24
    assert sizes["mlp", 3] < 5_000, sizes  # never seen: no examples, no histogram
    assert max(size for (source, _), size in sizes.items() if source in ("mlp", "sae-res")) < 60_000, sizes
    assert max(size for (source, _), size in sizes.items() if source == "resid") < 80_000, sizes  # with bottom


def test_two_models_and_parallel_workers(tmp_path: Path) -> None:
    """Two models in one store, built by worker processes: each model has its own folder and index entry."""
    store = make_store(tmp_path / "a.duckdb", n_layers=1, n_units=30, models=("static", "Other/Model"))
    out = tmp_path / "site"
    summary = build_site(store, out, workers=2, progress=False)
    assert summary.pages == 1 + 2 * (3 + 30 + 30 + 60) and summary.index == out / "index.html"
    assert (out / "static-" / "mlp" / "0" / "29.html").is_file()  # "static" must not clash with static/
    assert (out / "other-model" / "sae-res" / "0" / "59.html").is_file()
    assert summary.bytes == sum(p.stat().st_size for p in out.rglob("*.html"))
    index = (out / "index.html").read_text()
    assert 'id="m-static-"' in index and 'href="other-model/mlp/0/index.html"' in index
    unit = (out / "other-model" / "mlp" / "0" / "7.html").read_text()
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
    assert summary.pages == 306 and not (out / "stale.html").exists() and (out / MARKER).is_file()
    assert leftovers(tmp_path) == []


def test_a_crash_leaves_no_partial_output(tmp_path: Path, store_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = unit_pages.write_unit_pages
    calls = []

    def fail_on_second_call(*args: object, **kwargs: object) -> tuple[int, int]:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(unit_pages, "write_unit_pages", fail_on_second_call)
    out = tmp_path / "site"
    with pytest.raises(RuntimeError, match="disk on fire"):
        build_site(store_path, out, workers=1, progress=False)
    assert not out.exists() and leftovers(tmp_path) == [] and len(calls) == 2

    monkeypatch.setattr(unit_pages, "write_unit_pages", real)
    build_site(store_path, out, workers=1, progress=False)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != MARKER}
    calls.clear()
    monkeypatch.setattr(unit_pages, "write_unit_pages", fail_on_second_call)
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
            assert response.status == 200 and CSP == response.headers["Content-Security-Policy"]
            assert b"featureatlas" in response.read()
        with urllib.request.urlopen(base + "static/site.js", timeout=10) as response:
            assert response.status == 200
    finally:
        server.shutdown()
        server.server_close()
