"""What a site consists of: a folder per (model, source, layer) and the jobs that fill them."""

from __future__ import annotations

from dataclasses import dataclass, field

from featureatlas.build.reader import Catalog, LayerInfo
from featureatlas.build.slugs import unique_slugs
from featureatlas.build.worker import Job

CHUNK_UNITS = 256  # units per job: small enough to balance the processes, big enough for bulk reads


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

    @property
    def n_pages(self) -> int:
        """Pages the jobs write (the index page not included)."""
        return sum(1 if job.is_layer_page else job.stop - job.first for job in self.jobs)


def plan_site(catalog: Catalog) -> SitePlan:
    """Folders from slugs of the untrusted names; one layer-page job and unit jobs of CHUNK_UNITS per layer."""
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
    for model in models.values():
        for source in model.sources:
            folders = [folder for _, folder in source.layers]
            for i, (info, folder) in enumerate(source.layers):
                prev = f"../{folders[i - 1].rsplit('/', 1)[1]}/index.html" if i > 0 else None
                nxt = f"../{folders[i + 1].rsplit('/', 1)[1]}/index.html" if i + 1 < len(folders) else None
                jobs.append(Job(info, folder, 0, 0, (prev, nxt)))
                for first in range(0, info.n_units, CHUNK_UNITS):
                    jobs.append(Job(info, folder, first, min(first + CHUNK_UNITS, info.n_units)))
    return SitePlan(models=list(models.values()), jobs=jobs)
