"""The home page: every model with its runs, sources and layers."""

from __future__ import annotations

from pathlib import Path

import jinja2

from featureatlas.build.plan import SitePlan
from featureatlas.build.reader import Catalog


def write_index(catalog: Catalog, plan: SitePlan, template: jinja2.Template, site_dir: Path) -> int:
    """Write index.html; returns its size in bytes."""
    models = []
    for model in plan.models:
        sources = []
        for source in model.sources:
            layers = [{"layer": info.key.layer, "href": f"{folder}/index.html", "n_units": info.n_units,
                       "n_active": info.n_active, "hook": info.hook} for info, folder in source.layers]
            sources.append({"name": source.name, "layers": layers,
                            "n_units": sum(layer["n_units"] for layer in layers)})
        runs = [run for run in catalog.runs if run["model"] == model.name]
        models.append({"name": model.name, "anchor": f"m-{model.slug}", "sources": sources, "runs": runs})
    html = template.render(root="", models=models)
    data = html.encode("utf-8")
    (site_dir / "index.html").write_bytes(data)
    return len(data)
