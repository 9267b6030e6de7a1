"""The home page: every model with its runs, and every source with its hook, dictionary and layers."""

from __future__ import annotations

from pathlib import Path

import jinja2

from featureatlas.build.plan import SitePlan, SourcePlan
from featureatlas.build.reader import Catalog

KIND_NAMES = {"mlp": "MLP neurons", "resid": "residual stream dimensions", "sae": "SAE features",
              "transcoder": "transcoder features"}


def _source(source_plan: SourcePlan) -> dict:
    """A source as the index lists it; its description comes from its first layer's `sources` row."""
    layers = [{"layer": info.key.layer, "href": f"{folder}/index.html", "n_units": info.n_units,
               "n_active": info.n_active, "hook": info.hook, "hook_name": info.hook_name}
              for info, folder in source_plan.layers]
    first = source_plan.layers[0][0]
    return {"name": source_plan.name, "layers": layers, "n_units": sum(layer["n_units"] for layer in layers),
            "kind": KIND_NAMES.get(first.kind or "", first.kind), "architecture": first.architecture,
            "dictionary_path": first.dictionary_path, "signed": first.signed}


def write_index(catalog: Catalog, plan: SitePlan, template: jinja2.Template, site_dir: Path) -> int:
    """Write index.html; returns its size in bytes."""
    models = []
    for model in plan.models:
        runs = [run for run in catalog.runs if run["model"] == model.name]
        models.append({"name": model.name, "anchor": f"m-{model.slug}", "runs": runs,
                       "sources": [_source(source) for source in model.sources if source.layers]})
    html = template.render(root="", models=models)
    data = html.encode("utf-8")
    (site_dir / "index.html").write_bytes(data)
    return len(data)
