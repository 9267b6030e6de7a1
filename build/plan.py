"""What a site consists of: a folder per (model, source, layer) and the jobs that fill them."""

from __future__ import annotations

from dataclasses import dataclass, field

from featureatlas.build.reader import Catalog, LayerInfo, noun
from featureatlas.build.shards import SHARD_UNITS
from featureatlas.build.worker import Job
from featureatlas.slugs import unique_slugs


@dataclass
class SourcePlan:
    name: str
    slug: str
    layers: list[tuple[LayerInfo, str]] = field(default_factory=list)  # (layer, folder relative to root)


@dataclass
class ModelPlan:
    name: str
    slug: str
    sources: list[SourcePlan] = field(default_factory=list)


@dataclass
class SitePlan:
    models: list[ModelPlan]
    jobs: list[Job]
    layers: list[dict]  # the search manifest's layers, in job.layer_index order

    @property
    def n_units(self) -> int:
        return sum(layer["n"] for layer in self.layers)


def plan_site(catalog: Catalog) -> SitePlan:
    """Folders from slugs of the untrusted names; per layer one job for its pages and one per data shard."""
    model_slugs = unique_slugs(catalog.models())
    models = {name: ModelPlan(name, slug) for name, slug in model_slugs.items()}
    for model in models.values():
        infos = [info for info in catalog.layers if info.key.model == model.name]
        source_slugs = unique_slugs(sorted({info.key.source for info in infos}))
        for source_name, source_slug in source_slugs.items():
            source = SourcePlan(source_name, source_slug)
            for info in infos:
                if info.key.source == source_name:
                    source.layers.append((info, f"{model.slug}/{source_slug}/{info.key.layer}"))
            model.sources.append(source)

    jobs: list[Job] = []
    layers: list[dict] = []
    for model in models.values():
        for source in model.sources:
            folders = [folder for _, folder in source.layers]
            for i, (info, folder) in enumerate(source.layers):
                prev = f"../{folders[i - 1].rsplit('/', 1)[1]}/index.html" if i > 0 else None
                nxt = f"../{folders[i + 1].rsplit('/', 1)[1]}/index.html" if i + 1 < len(folders) else None
                index = len(layers)
                layers.append({"model": info.key.model, "source": info.key.source, "layer": info.key.layer,
                               "path": folder, "noun": noun(info), "n": info.n_units, "max_unit": info.max_unit})
                jobs.append(Job(info, folder, index, None, (prev, nxt)))
                jobs.extend(Job(info, folder, index, shard) for shard in range(info.max_unit // SHARD_UNITS + 1))
    return SitePlan(models=list(models.values()), jobs=jobs, layers=layers)
