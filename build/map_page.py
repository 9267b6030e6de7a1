"""Map pages: for each (model, source, layer) that has a layout in the store (the `map` view, written by the
harvest with harvest/layout.py), `<layer>/map.html`, every unit as a point on one canvas, and its points as the
data file `<layer>/points.js`, a script that calls FA.put (the one way to load data that works from `file://`).
static/map.js draws them, pans, zooms, finds the point under the pointer and opens its unit page.

Points file (format version 1; map.js reads it, tests decode it with shards.read_js):
  {"v": 1, "kind": "decoder" | "output", "noun": "Feature", "span": [w, h],
   "u": [unit, ...], "x": [0..65535, ...], "y": [0..65535, ...] (up is larger y; one scale for both axes, so the
   map keeps its shape, w and h the largest x and y), "max": [max activation or null, ...],
   "f": [firing frequency or null, ...], "e": [[row, explanation], ...] (each explained unit's best one, cut to
   EXPLANATION_CHARS)}
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import jinja2
import numpy as np

from featureatlas.build.plan import SitePlan
from featureatlas.build.reader import LayerInfo, LayerKey, column, has_view, noun, query, read_layer_explanations
from featureatlas.build.shards import js_file, numbers
from featureatlas.build.worker import LAYER_ROOT
from featureatlas.text import visible

MAP_PAGE = "map.html"
POINTS = "points"  # the data file's name in the layer folder, without `.js`
FORMAT_VERSION = 1
GRID = 65535  # coordinates are integers 0..GRID: a 1/65,536 of the map, finer than any screen shows it
EXPLANATION_CHARS = 300  # of the explanation a card shows; the unit page has all of it
KIND_ORDER = ("decoder", "output")  # when a layer has layouts of several kinds, the first found is drawn
DIRECTIONS = {"decoder": "decoder directions (what each feature writes)",
              "output": "output weights (each neuron's row of the MLP output projection)"}


_PLACED = "model = ? AND source = ? AND layer = ? AND isfinite(x) AND isfinite(y)"


def read_layouts(con: duckdb.DuckDBPyConnection) -> set[LayerKey]:
    """The layers with a placed unit, which get a map page (none in stores written before layouts existed)."""
    if not has_view(con, "map"):
        return set()
    rows = con.execute("SELECT DISTINCT model, source, layer FROM map WHERE isfinite(x) AND isfinite(y)").fetchall()
    return {LayerKey(model, source, int(layer)) for model, source, layer in rows}


def map_links(plan: SitePlan, mapped: set[LayerKey]) -> dict[str, str]:
    """Layer page href -> map page href, from the site root, for the index's links."""
    return {f"{layer['path']}/index.html": f"{layer['path']}/{MAP_PAGE}" for layer in plan.layers
            if LayerKey(layer["model"], layer["source"], layer["layer"]) in mapped}


def read_points(con: duckdb.DuckDBPyConnection, key: LayerKey, unit_noun: str) -> dict | None:
    """A layer's points file (see the module's docstring), or None when it has no placed unit."""
    params = [key.model, key.source, key.layer]
    kinds = [kind for (kind,) in con.execute(f"SELECT DISTINCT kind FROM map WHERE {_PLACED}", params).fetchall()]
    if not kinds:
        return None
    kind = min(kinds, key=lambda k: (KIND_ORDER.index(k) if k in KIND_ORDER else len(KIND_ORDER), k))
    t = query(con, """
        SELECT m.unit, m.x, m.y, u.max_activation, u.frequency
        FROM map m LEFT JOIN units u USING (model, source, layer, unit)
        WHERE m.model = ? AND m.source = ? AND m.layer = ? AND isfinite(m.x) AND isfinite(m.y) AND m.kind = ?
        ORDER BY m.unit""", [*params, kind])
    units = column(t, "unit", np.int64)
    if len(units) == 0:
        return None
    xy = np.stack([column(t, "x", np.float64), column(t, "y", np.float64)], axis=1)
    low = xy.min(axis=0)
    span = float((xy.max(axis=0) - low).max())
    grid = np.rint((xy - low) * (GRID / span)).astype(np.int64) if span > 0 else np.zeros_like(xy, np.int64)
    row_of = {int(unit): row for row, unit in enumerate(units.tolist())}
    explained = [[row_of[unit], _cut(visible(text))] for unit, text in sorted(read_layer_explanations(con, key).items())
                 if unit in row_of]
    return {"v": FORMAT_VERSION, "kind": kind, "noun": unit_noun, "span": grid.max(axis=0).tolist(),
            "u": units.tolist(), "x": grid[:, 0].tolist(), "y": grid[:, 1].tolist(),
            "max": numbers(column(t, "max_activation", np.float64)), "f": numbers(column(t, "frequency", np.float64)),
            "e": explained}


def _cut(text: str) -> str:
    return text if len(text) <= EXPLANATION_CHARS else text[:EXPLANATION_CHARS - 1].rstrip() + "\u2026"


def write_maps(con: duckdb.DuckDBPyConnection, plan: SitePlan, env: jinja2.Environment, site_dir: Path
               ) -> tuple[int, int]:
    """Every layer's map page (see write_map_page); returns (files, bytes)."""
    mapped = read_layouts(con)
    files = size = 0
    for model in plan.models:
        for source in model.sources:
            for info, folder in source.layers:
                written = write_map_page(con, info, env, site_dir, folder, f"m-{model.slug}", info.key in mapped)
                files, size = files + written[0], size + written[1]
    return files, size


def write_map_page(con: duckdb.DuckDBPyConnection, info: LayerInfo, env: jinja2.Environment, site_dir: Path,
                   folder: str, model_anchor: str, placed: bool = True) -> tuple[int, int]:
    """Write a layer's map page and points file into site_dir/folder; returns (files, bytes), (0, 0) when the
    layer has no placed unit (placed: whether read_layouts lists it). Earlier files there are removed first, never
    written through: an incremental build hard-links them from the previous site."""
    target = site_dir / folder
    for name in (MAP_PAGE, f"{POINTS}.js"):
        (target / name).unlink(missing_ok=True)
    points = read_points(con, info.key, noun(info)) if placed else None
    if points is None:
        return 0, 0
    target.mkdir(parents=True, exist_ok=True)
    data = js_file(f"{folder}/{POINTS}", points)
    html = env.get_template("map.html").render(
        root=LAYER_ROOT, info=info, noun=noun(info), model_anchor=model_anchor, path=folder, n_units=len(points["u"]),
        n_explained=len(points["e"]), directions=DIRECTIONS.get(points["kind"], f"{points['kind']} directions"),
    ).encode("utf-8")
    (target / f"{POINTS}.js").write_bytes(data)
    (target / MAP_PAGE).write_bytes(html)
    return 2, len(data) + len(html)
