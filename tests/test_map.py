"""The map: the layout (UMAP over cosine) keeps near units near, is seeded and takes any input; the store keeps it;
the site draws it as a page that works from file:// (points, hover card, click, the ringed unit) in a browser."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pytest
import torch
import transformers

from featureatlas.build.map_page import GRID, POINTS
from featureatlas.build.shards import read_js
from featureatlas.harvest.layout import fuzzy_graph, layout, source_layout
from featureatlas.harvest.neighbours import nearest
from featureatlas.harvest.sources import dictionary_sources, mlp_sources, resid_sources
from featureatlas.load.dictionaries import load_dictionaries
from featureatlas.store.schema import open_store, open_store_for_update
from featureatlas.store.writer import StoreWriter

from helpers.browser import SHOTS, assert_clean
from helpers.synthetic_store import DEAD_FEATURE, MODEL, make_store
from helpers.tiny_models import HIDDEN, saelens_sae, tiny_config

HOSTILE = '<img src=x onerror=alert(1)> cats & "dogs" \u202eevil'
EXPLAINED_UNIT = 6


def mixture(n_clusters: int, per: int, width: int, seed: int, spread: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Points around n_clusters random directions: [n, width] and each point's cluster."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, width))
    labels = np.repeat(np.arange(n_clusters), per)
    return centres[labels] + spread * rng.standard_normal((len(labels), width)), labels


def map_neighbours(xy: np.ndarray, k: int) -> np.ndarray:
    d = ((xy[:, None, :] - xy[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(d, np.inf)
    return np.argsort(d, axis=1, kind="stable")[:, :k]


def trustworthiness(vectors: np.ndarray, xy: np.ndarray, k: int = 10) -> float:
    """Venna & Kaski's trustworthiness over cosine: 1 when every map neighbour is a true neighbour."""
    n = len(vectors)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    d = 1 - unit @ unit.T
    np.fill_diagonal(d, np.inf)
    rank = np.argsort(np.argsort(d, axis=1, kind="stable"), axis=1) + 1  # 1 = nearest
    penalty = np.maximum(np.take_along_axis(rank, map_neighbours(xy, k), axis=1) - k, 0).sum()
    return 1 - 2 / (n * k * (2 * n - 3 * k - 1)) * penalty


# --- the layout ---------------------------------------------------------------------------------------------------

def test_clusters_stay_apart_and_near_points_stay_near() -> None:
    vectors, labels = mixture(6, 40, 32, seed=0)
    xy = layout(vectors, seed=0)
    assert xy.shape == (240, 2) and xy.dtype == np.float32 and np.isfinite(xy).all()
    assert (labels[map_neighbours(xy, 10)] == labels[:, None]).mean() > 0.99
    centres = np.stack([xy[labels == c].mean(axis=0) for c in range(6)])
    radius = max(np.linalg.norm(xy[labels == c] - centres[c], axis=1).max() for c in range(6))
    gaps = [np.linalg.norm(centres[a] - centres[b]) for a in range(6) for b in range(a + 1, 6)]
    assert min(gaps) > 2 * radius  # every cluster is an island
    assert trustworthiness(vectors, xy) > 0.95


def test_a_continuum_keeps_its_order() -> None:
    """Points along a curve (and the noise around it): map neighbours are neighbours along the curve."""
    t = np.linspace(0, 3, 300)
    curve = np.stack([np.cos(t * f + f) for f in range(1, 17)] + [np.sin(t * f) for f in range(1, 17)], axis=1)
    vectors = curve + 0.02 * np.random.default_rng(1).standard_normal(curve.shape)
    xy = layout(vectors, seed=0)
    assert trustworthiness(vectors, xy) > 0.9
    random = np.random.default_rng(2).standard_normal((300, 2))
    assert trustworthiness(vectors, random) < 0.6  # what the check gives a map that knows nothing


def test_the_same_seed_gives_the_same_map_and_the_harvests_neighbours_can_be_reused() -> None:
    vectors, _ = mixture(3, 30, 16, seed=3)
    first = layout(vectors, seed=7, epochs=50)
    assert np.array_equal(first, layout(vectors, seed=7, epochs=50))
    assert not np.array_equal(first, layout(vectors, seed=8, epochs=50))
    knn = nearest(torch.from_numpy(vectors), k=20)  # more columns than the layout takes
    assert np.array_equal(first, layout(vectors, seed=7, epochs=50, knn=knn))


def test_units_without_a_direction_sit_below_the_map() -> None:
    vectors, labels = mixture(3, 30, 16, seed=4)
    aside = [0, 31, 62, 89]
    vectors[aside[:3]] = 0.0
    vectors[aside[3], 5] = np.nan
    xy = layout(vectors, seed=0)
    placed = np.setdiff1d(np.arange(len(vectors)), aside)
    assert np.isfinite(xy).all()
    assert xy[aside, 1].max() < xy[placed, 1].min()
    assert len({tuple(p) for p in xy[aside].tolist()}) == len(aside)  # each its own spot
    sub = map_neighbours(xy[placed], 5)
    assert (labels[placed][sub] == labels[placed][:, None]).mean() > 0.99  # the rest is mapped as without them


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 16])
def test_tiny_inputs_fewer_points_than_neighbours(n: int) -> None:
    vectors = np.random.default_rng(n).standard_normal((n, 8))
    xy = layout(vectors, seed=0, epochs=30)
    assert xy.shape == (n, 2) and np.isfinite(xy).all()
    if n >= 2:
        assert len({tuple(p) for p in xy.tolist()}) == n


def test_identical_and_all_zero_vectors() -> None:
    same = np.tile(np.arange(1.0, 9.0), (12, 1))
    assert np.isfinite(layout(same, seed=0, epochs=30)).all()
    zeros = layout(np.zeros((5, 4)), seed=0)
    assert np.isfinite(zeros).all() and len({tuple(p) for p in zeros.tolist()}) == 5
    with pytest.raises(ValueError, match=r"\[units, width\]"):
        layout(np.zeros(4))


def brute_fuzzy_graph(index: np.ndarray, distance: np.ndarray) -> dict[tuple[int, int], float]:
    """UMAP's fuzzy set, one point and one pair at a time: memberships exp(-(d - rho) / sigma) summing to
    log2(k), then a + b - ab over the two directions of each pair."""
    n, k = index.shape
    member: dict[tuple[int, int], float] = {}
    for i in range(n):
        positive = [d for d in distance[i] if d > 0]
        rho = min(positive) if positive else 0.0
        lo, hi, sigma = 0.0, math.inf, 1.0
        for _ in range(64):
            total = sum(math.exp(-max(d - rho, 0.0) / sigma) for d in distance[i])
            if total > math.log2(k):
                hi = sigma
            else:
                lo = sigma
            sigma = sigma * 2 if hi == math.inf else (lo + hi) / 2
        floor = 1e-3 * (np.mean(distance[i]) if rho > 0 else np.mean(distance))
        sigma = max(sigma, floor)
        for j, d in zip(index[i], distance[i], strict=True):
            member[(i, int(j))] = math.exp(-max(d - rho, 0.0) / sigma)
    union = {}
    for (i, j), w in member.items():
        back = member.get((j, i), 0.0)
        union[(i, j)] = union[(j, i)] = w + back - w * back
    return union


def test_fuzzy_graph_is_umaps_definition() -> None:
    vectors, _ = mixture(4, 15, 8, seed=5, spread=0.8)
    index, score = nearest(torch.from_numpy(vectors), k=6)
    distance = np.clip(1 - score.double().numpy(), 0, 2)
    head, tail, weight = fuzzy_graph(index.numpy().astype(np.int64), distance)
    got = {(int(h), int(t)): float(w) for h, t, w in zip(head, tail, weight, strict=True)}
    want = brute_fuzzy_graph(index.numpy(), distance)
    assert got.keys() == want.keys()
    assert max(abs(got[key] - want[key]) for key in want) < 1e-9
    assert all(got[(i, int(index[i, 0]))] == 1.0 for i in range(len(vectors)))  # the nearest is fully a neighbour


@pytest.mark.model
def test_sources_are_mapped_by_their_own_directions(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("llama")).eval()
    (mlp,) = mlp_sources(model.base_model, "llama", [1])
    (resid,) = resid_sources(model.base_model, "llama", [1], HIDDEN)
    folder = saelens_sae(tmp_path / "sae", HIDDEN, "blocks.1.hook_resid_post")
    (sae,) = dictionary_sources([("res1", d) for d in load_dictionaries(folder)], model.base_model, "llama",
                                torch.device("cpu"))
    kind, xy = source_layout(model, mlp, seed=0)
    rows = model.model.layers[1].mlp.down_proj.weight.T.detach()
    assert kind == "output" and np.array_equal(xy, layout(rows, seed=0))
    kind, xy = source_layout(model, sae, seed=0)
    assert kind == "decoder" and np.array_equal(xy, layout(sae.dictionary.decoder, seed=0))
    assert source_layout(model, resid) is None


# --- the store ----------------------------------------------------------------------------------------------------

def test_the_writer_stores_a_layout_behind_the_map_view(tmp_path: Path) -> None:
    xy = np.array([[0.5, -1.0], [2.0, 3.25], [-4.0, 0.0]], np.float32)
    with StoreWriter(tmp_path / "s.duckdb") as store:
        store.add_layout("m", "sae:x", 4, "decoder", xy)
        with pytest.raises(ValueError, match=r"finite \[units, 2\]"):
            store.add_layout("m", "sae:x", 5, "decoder", np.array([[0.0, np.nan]]))
    con = open_store(tmp_path / "s.duckdb")
    rows = con.execute("SELECT model, source, layer, unit, x, y, kind FROM map ORDER BY unit").fetchall()
    con.close()
    assert rows == [("m", "sae:x", 4, i, float(x), float(y), "decoder") for i, (x, y) in enumerate(xy.tolist())]


def test_a_store_from_before_layouts_opens_and_builds_without_maps(tmp_path: Path, store_path: Path) -> None:
    from featureatlas.build.site import build_site

    old = tmp_path / "old.duckdb"
    shutil.copyfile(store_path, old)
    con = duckdb.connect(str(old))
    con.execute("DROP VIEW map")
    con.execute("DROP TABLE t_layout")
    con.close()
    open_store(old).close()
    build_site(old, tmp_path / "site", workers=1, progress=False)
    assert not list((tmp_path / "site").rglob("map.html"))
    assert "map.html" not in (tmp_path / "site" / "index.html").read_text()


# --- the site -----------------------------------------------------------------------------------------------------

def add_layouts(path: Path) -> dict[tuple[str, int], np.ndarray]:
    """Give the SAE (four clusters of decoder rows, the dead feature's row zero) and MLP layer 1 a layout, and
    SAE feature EXPLAINED_UNIT a hostile explanation; returns each layout."""
    vectors, _ = mixture(4, 25, 16, seed=11)
    vectors[DEAD_FEATURE] = 0.0
    layouts = {("sae:res", 1): layout(vectors, seed=0),
               ("mlp", 1): layout(mixture(5, 10, 16, seed=12)[0], seed=0)}
    con = open_store_for_update(path)
    try:
        for (source, layer), xy in layouts.items():
            kind = "decoder" if source.startswith("sae") else "output"
            con.register("xy", pa.table({"unit": np.arange(len(xy), dtype=np.int32), "x": xy[:, 0], "y": xy[:, 1]}))
            con.execute("INSERT INTO t_layout SELECT ?, ?, ?, unit, x, y, ? FROM xy", [MODEL, source, layer, kind])
            con.unregister("xy")
        con.execute("INSERT INTO t_explanations VALUES (?, 'sae:res', 1, ?, ?, 0.9, 'detection', 'me', 'f', now())",
                    [MODEL, EXPLAINED_UNIT, HOSTILE])
    finally:
        con.close()
    return layouts


@pytest.fixture(scope="module")
def mapped(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[tuple[str, int], np.ndarray]]:
    from featureatlas.build.site import build_site

    root = tmp_path_factory.mktemp("map")
    store = make_store(root / "store.duckdb", sources=("mlp", "sae:res"))
    layouts = add_layouts(store)
    build_site(store, root / "site", workers=1, progress=False)
    return root / "site", layouts


def map_page(site: Path, source: str, layer: int) -> Path:
    return next(site.glob(f"*/{source.replace(':', '-')}/{layer}/map.html"))


def points(site: Path, source: str, layer: int) -> dict:
    path = map_page(site, source, layer).with_name(f"{POINTS}.js")
    key, data = read_js(path.read_text())
    assert key == f"{path.parent.relative_to(site).as_posix()}/{POINTS}"
    return data


@pytest.mark.browser
def test_layers_with_a_layout_get_a_map_page_linked_from_the_index(mapped: tuple[Path, dict]) -> None:
    site, layouts = mapped
    assert sorted(p.parent.relative_to(site).as_posix().split("/", 1)[1] for p in site.rglob("map.html")) == [
        "mlp/1", "sae-res/1"]
    index = (site / "index.html").read_text()
    for source, layer in layouts:
        href = map_page(site, source, layer).relative_to(site).as_posix()
        assert f'href="{href}"' in index
    page = map_page(site, "sae:res", 1).read_text()
    assert "Content-Security-Policy" in page and "<script>" not in page and "style=" not in page
    assert 'src="../../../static/map.js"' in page and 'role="img"' in page and 'href="index.html"' in page


def test_points_hold_the_layout_and_each_units_card(mapped: tuple[Path, dict]) -> None:
    site, layouts = mapped
    data = points(site, "sae:res", 1)
    xy = layouts[("sae:res", 1)].astype(np.float64)
    assert data["v"] == 1 and data["kind"] == "decoder" and data["noun"] == "Feature"
    assert data["u"] == list(range(100))
    span = (xy.max(axis=0) - xy.min(axis=0)).max()
    want = np.rint((xy - xy.min(axis=0)) * (GRID / span)).astype(int)
    assert data["x"] == want[:, 0].tolist() and data["y"] == want[:, 1].tolist()
    assert data["span"] == want.max(axis=0).tolist() and GRID in data["span"]
    con = open_store(next(site.parent.glob("store.duckdb")))
    stats = dict(con.execute("SELECT unit, max_activation FROM units WHERE source = 'sae:res'").fetchall())
    con.close()
    assert all(m is None or math.isclose(m, stats[u], rel_tol=1e-4) for u, m in zip(data["u"], data["max"],
                                                                                     strict=True))
    assert data["e"] == [[EXPLAINED_UNIT, HOSTILE.replace("\u202e", "\\u202e")]]  # defused as on every page
    assert points(site, "mlp", 1)["kind"] == "output"


def test_an_incremental_build_keeps_the_maps(mapped: tuple[Path, dict], tmp_path: Path) -> None:
    from featureatlas.build.site import build_site

    site, _ = mapped
    copy = tmp_path / "site"
    shutil.copytree(site, copy)
    before = map_page(copy, "sae:res", 1).read_bytes()
    build_site(next(site.parent.glob("store.duckdb")), copy, workers=1, progress=False, incremental=True)
    assert map_page(copy, "sae:res", 1).read_bytes() == before
    assert points(copy, "sae:res", 1) == points(site, "sae:res", 1)


# --- in a browser -------------------------------------------------------------------------------------------------

def open_map(page: object, site: Path, fragment: str = "") -> None:
    from playwright.sync_api import expect

    page.goto(map_page(site, "sae:res", 1).as_uri() + fragment)  # type: ignore[attr-defined]
    # polled from the driver: wait_for_function would evaluate a string in the page, which its CSP forbids
    expect(page.locator("#map")).not_to_have_attribute("data-points", "0")  # type: ignore[attr-defined]


def point(page: object, unit: int) -> tuple[float, float]:
    at = page.evaluate(f"FA.mapPoint({unit})")  # type: ignore[attr-defined]
    return at["x"], at["y"]


@pytest.mark.browser
def test_map_page_from_file_url(page: object, mapped: tuple[Path, dict]) -> None:
    from playwright.sync_api import expect

    site, _ = mapped
    open_map(page, site)
    assert page.get_attribute("#map", "data-points") == "100"  # every point drawn, the set-aside dead one too
    painted = page.evaluate("""() => { const c = document.getElementById('map');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++; return n; }""")
    assert painted >= 100 * 9  # at least 3 x 3 pixels a point
    data = points(site, "sae:res", 1)
    unique = [u for u in data["u"] if [(x, y) for x, y in zip(data["x"], data["y"], strict=True)].count(
        (data["x"][u], data["y"][u])) == 1]
    unit = unique[10]

    page.mouse.move(*point(page, unit))
    card = page.locator("#map-card")
    expect(card).to_be_visible()
    assert card.inner_text().splitlines()[0] == f"Feature {unit}"
    page.mouse.move(*point(page, EXPLAINED_UNIT))
    expect(card).to_contain_text(HOSTILE.replace("\u202e", "\\u202e"))  # as text, not markup
    assert page.locator("img").count() == 0
    page.mouse.move(2, 2)
    expect(card).to_be_hidden()

    page.select_option("#map-colour", "e")
    expect(page.locator("#map-legend")).to_contain_text("explained (1)")
    page.mouse.click(*point(page, unit))
    page.wait_for_url(f"**/sae-res/1/unit.html#{unit}")
    expect(page.locator("h1")).to_have_text(f"Feature {unit}")
    assert_clean(page)


@pytest.mark.browser
def test_the_unit_from_the_url_is_ringed_and_the_keyboard_works(page: object, mapped: tuple[Path, dict]) -> None:
    from playwright.sync_api import expect

    site, _ = mapped
    open_map(page, site, f"#unit={EXPLAINED_UNIT}")
    assert page.get_attribute("#map", "data-selected") == str(EXPLAINED_UNIT)
    chosen = page.locator("#map-selected")
    expect(chosen.get_by_role("link", name=f"Open Feature {EXPLAINED_UNIT}")).to_have_attribute(
        "href", f"unit.html#{EXPLAINED_UNIT}")
    x, y = point(page, EXPLAINED_UNIT)
    ring = page.evaluate(f"""() => {{ const c = document.getElementById('map'), r = c.getBoundingClientRect();
        const s = c.width / r.width, cx = ({x} - r.left) * s, cy = ({y} - r.top) * s, h = Math.ceil(12 * s);
        const img = c.getContext('2d').getImageData(Math.round(cx) - h, Math.round(cy) - h, 2 * h + 1, 2 * h + 1);
        const opaque = (px, py) => img.data[4 * ((Math.round(py) - Math.round(cy) + h) * img.width
                                                 + Math.round(px) - Math.round(cx) + h) + 3] > 0;
        let n = 0;
        for (let k = 0; k < 32; k++) {{
          const a = k * Math.PI / 16;
          n += [7.5, 8.5, 9.5].some(d => opaque(cx + d * s * Math.cos(a), cy + d * s * Math.sin(a))) ? 1 : 0;
        }}
        return n; }}""")
    assert ring >= 30  # a closed ring around the point (its neighbours alone leave gaps)

    page.fill("#map-unit", "42")
    page.press("#map-unit", "Enter")
    expect(page.locator("#map")).to_have_attribute("data-selected", "42")
    assert page.url.endswith("#unit=42")
    page.fill("#map-unit", "4000")
    page.press("#map-unit", "Enter")
    expect(chosen).to_have_text("This map has no feature 4000.")

    page.goto(map_page(site, "sae:res", 1).as_uri() + "#unit=42")
    expect(page.locator("#map")).to_have_attribute("data-selected", "42")
    before = point(page, 42)
    page.focus("#map")
    page.keyboard.press("+")
    page.keyboard.press("ArrowLeft")
    after = point(page, 42)
    assert after != before
    page.keyboard.press("0")
    page.keyboard.press("Enter")
    page.wait_for_url("**/sae-res/1/unit.html#42")
    assert_clean(page)


@pytest.mark.browser
@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_map_page_accessibility_and_screenshot(page: object, mapped: tuple[Path, dict], scheme: str) -> None:
    pytest.importorskip("axe_playwright_python")
    from axe_playwright_python.sync_playwright import Axe

    site, _ = mapped
    page.emulate_media(color_scheme=scheme)  # type: ignore[attr-defined]
    open_map(page, site, f"#unit={EXPLAINED_UNIT}")
    page.mouse.move(*point(page, 20))
    page.locator("#map-card").wait_for()
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"map-{scheme}.png"), full_page=True)
    assert not re.search(r"\bundefined\b|NaN", page.inner_text("main"))
    assert_clean(page)  # before axe, whose own reads of the stylesheets file:// refuses
    violations = [f"{v['id']} ({v['impact']}): {v['nodes'][0]['target']}" for v in Axe().run(page).response[
        "violations"] if v["impact"] in ("serious", "critical")]
    assert violations == []
    page.set_viewport_size({"width": 390, "height": 800})
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")  # no sideways scroll
