"""`export --format neuronpedia`: the folder layout Neuronpedia imports, as SAEDashboard's exporter writes it.

Per (model, source, layer), `<model id>/<layer>-<set>/` holds one-line `release.jsonl`, `model.jsonl`,
`sourceset.jsonl` and `source.jsonl`, and per batch of units `features/batch-N.jsonl.gz` (one row per unit),
`activations/batch-N.jsonl.gz` (one row per example) and, where the store has explanations,
`explanations/batch-N.jsonl.gz`. Field names are those of SAEDashboard's current exporter and Neuronpedia's
database. What we cannot fill from a store is written empty or null, never made up;
docs/exports-and-annotations.md lists each such field and how our data maps onto theirs (histogram bars,
quantile intervals, the BOS token).
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import duckdb

from featureatlas.errors import UsageError, setting_name
from featureatlas.export.common import (
    Chunk,
    ExportContext,
    Files,
    LayerRef,
    dumps,
    explanation_columns,
    in_chunk,
    read_runs,
    sql_json,
    sql_number,
    sql_numbers,
)
from featureatlas.text import visible

DEFAULT_BATCH_SIZE = 128  # features per batch file, SAEDashboard's default
VISIBILITY = "PUBLIC"  # what SAEDashboard's exporter writes; Neuronpedia's admin decides on import
_MODEL_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")  # Neuronpedia's rule for model ids
_SET_ID = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
_UNSAFE = re.compile(r"[^a-z0-9_-]+")


def neuronpedia_id(name: str) -> str:
    """A default id from an untrusted name: lowercase letters, digits, `_` and `-` (what Neuronpedia allows)."""
    return _UNSAFE.sub("-", name.lower()).strip("-_")[:100].strip("-_") or "x"


def _unique_ids(names: list[str]) -> dict[str, str]:
    ids: dict[str, str] = {}
    for name in names:
        base = neuronpedia_id(name)
        candidate, n = base, 1
        while candidate in ids.values():
            n += 1
            candidate = f"{base}-{n}"
        ids[name] = candidate
    return ids


def check_options(refs: list[LayerRef], options: dict[str, Any]) -> dict[str, Any]:
    """Validated ids per model and per (model, source), creator id and batch size; refuses what would collide."""
    batch_size = options.get("batch_size")
    batch_size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
    if batch_size < 1:
        raise UsageError(f"{setting_name('batch_size')} {batch_size}: give at least 1 feature per batch file")
    models = sorted({ref.model for ref in refs})
    pairs = sorted({(ref.model, ref.source) for ref in refs})
    model_ids = _unique_ids(models)
    set_ids: dict[tuple[str, str], str] = {}
    for model in models:  # set ids are unique within a model
        set_ids.update(_set_ids(pairs, model))
    model_id, set_name = options.get("model_id"), options.get("set_name")
    if model_id is not None:
        if not _MODEL_ID.fullmatch(model_id):
            raise UsageError(f"{setting_name('model_id')} {model_id!r}: use letters, digits, '_' and '-' only "
                             "(Neuronpedia's rule for model ids), at most 128")
        if len(models) > 1:
            raise UsageError(f"{setting_name('model_id')} names one model, but the store has {len(models)} "
                             f"({', '.join(visible(m) for m in models)}); export them with their default ids")
        model_ids = {model: model_id for model in models}
    if set_name is not None:
        if not _SET_ID.fullmatch(set_name):
            raise UsageError(f"{setting_name('set_name')} {set_name!r}: use letters, digits, '.', '_' and '-' only, "
                             "starting with a letter or digit, at most 128")
        if len(pairs) > 1:
            raise UsageError(f"{setting_name('set_name')} names one source set, but {len(pairs)} sources are exported "
                             f"({', '.join(visible(s) for _, s in pairs)}); choose one with {setting_name('sources')}")
        set_ids = {pair: set_name for pair in pairs}
    creator_id = options.get("creator_id")
    return {"batch_size": batch_size, "model_ids": model_ids, "set_ids": set_ids, "creator_id": creator_id}


def _set_ids(pairs: list[tuple[str, str]], model: str) -> dict[tuple[str, str], str]:
    ids = _unique_ids([source for m, source in pairs if m == model])
    return {(model, source): set_id for source, set_id in ids.items()}


# --- the SQL: one row per unit with its feature row, its activation rows and its explanation rows --------------------


def rows_sql(explanations: dict[str, str] | None) -> str:
    """(unit, feature line, activation lines, explanation lines) per unit of a chunk, in unit order.

    Parameters: $1..$5 as `in_chunk`; $6 the feature line up to the index, $7 the feature line's constant middle,
    $8 the activation line up to the index, $9 the explanation line up to the index, $10 the id seed (model id
    and source id), $11 1 when the BOS position is dropped (else 0), $12 the creator id as JSON, $13 createdAt
    as JSON."""
    # Examples: top (binMin -1, binMax the unit's max, binContains -1, as SAEDashboard marks its top group) then
    # quantile intervals (binMin/binMax the interval; the store does not count the contexts in it: binContains null).
    tokens = "list_slice(c.tokens, $11 + 1, length(c.tokens))"
    values = "list_slice(e.activations, $11 + 1, length(e.activations))"
    position = "(e.max_position - $11)"
    activation = (
        f"""$8 || e.unit || '","id":"c' || left(md5($10 || ':' || e.unit || ':' || e.example_kind || ':' || """
        f"""e.rank || ':' || coalesce(CAST(e.interval_lo AS VARCHAR), '')), 24) || '"' || """
        f"""',"tokens":' || {sql_json(tokens)} || ',"values":' || coalesce({sql_numbers(values)}, '[]') || """
        f"""',"maxValue":' || {sql_number('e.max_activation')} || ',"maxValueTokenIndex":' || {position} || """
        f"""',"minValue":' || {sql_number(f'list_min({values})')} || """
        f"""',"binMin":' || CASE WHEN e.example_kind = 'top' THEN '-1' ELSE {sql_number('e.interval_lo')} END || """
        f"""',"binMax":' || CASE WHEN e.example_kind = 'top' THEN {sql_number('st.max_activation')} """
        f"""ELSE {sql_number('e.interval_hi')} END || """
        f"""',"binContains":' || CASE WHEN e.example_kind = 'top' THEN '-1' ELSE 'null' END || """
        f"""',"qualifyingTokenIndex":' || {position} || '}}'""")
    order = ("CASE e.example_kind WHEN 'top' THEN 0 ELSE 1 END, e.interval_hi DESC NULLS LAST, "
             "e.interval_lo DESC NULLS LAST, e.rank")
    # no explanations: an empty CTE that still names $9, $12 and $13 (DuckDB refuses unused parameters)
    explanation_cte = "x AS (SELECT NULL::INTEGER AS unit, $9 || $12 || $13 AS lines WHERE false)"
    if explanations is not None:
        text, score, author = explanations["text"], explanations["score"], explanations["author"]
        # Neuronpedia keeps scores in another table and names explainer models from its own list: both go in notes
        score_text = f"'score' || coalesce(' (' || {explanations['score_kind']} || ')', '') || ': ' || {score}"
        notes = (f"CASE WHEN {author} IS NULL AND {score} IS NULL THEN 'null' ELSE to_json(concat_ws('; ', "
                 f"'author: ' || {author}, {score_text}))::VARCHAR END")
        line = (f"""$9 || x.unit || '","id":"c' || left(md5($10 || ':' || x.unit || ':explanation:' || """
                f"""x.ordinal_), 24) || '","description":' || {sql_json(text)} || ',"authorId":' || $12 || """
                f"""',"embedding":null,"triggeredById":null,"typeName":null,"explanationModelName":null' || """
                f"""',"notes":' || {notes} || ',"createdAt":' || $13 || '}}'""")
        explanation_cte = (
            f"x AS (SELECT x.unit, string_agg({line}, chr(10) ORDER BY x.ordinal_) AS lines FROM ("
            f"SELECT x.*, row_number() OVER (PARTITION BY x.unit ORDER BY {score} DESC NULLS LAST, {text}) "
            f"AS ordinal_ FROM explanations x WHERE {in_chunk('x')}) x GROUP BY x.unit)")
    top_tokens = "FILTER (polarity = 'top' AND token IS NOT NULL)"
    bottom_tokens = "FILTER (polarity = 'bottom' AND token IS NOT NULL)"
    return f"""
        WITH st AS (
            SELECT unit, frequency, max_activation FROM statistics WHERE {in_chunk()}),
        h AS (  -- positive bins only, as SAEDashboard's histogram counts activations > 0
            SELECT unit,
                   '[' || string_agg(CAST(count AS VARCHAR), ',' ORDER BY bin) || ']' AS heights,
                   '[' || string_agg({sql_number('CASE WHEN isfinite(hi) THEN (lo + hi) / 2 ELSE lo END')}, ','
                                     ORDER BY bin) || ']' AS bar_values
            FROM histograms WHERE {in_chunk()} AND bin > 0 AND count > 0 GROUP BY unit),
        l AS (
            SELECT unit,
                   to_json(list(token ORDER BY rank) {top_tokens})::VARCHAR AS pos_str,
                   '[' || string_agg({sql_number('effect')}, ',' ORDER BY rank) {top_tokens} || ']' AS pos_values,
                   to_json(list(token ORDER BY rank) {bottom_tokens})::VARCHAR AS neg_str,
                   '[' || string_agg({sql_number('effect')}, ',' ORDER BY rank) {bottom_tokens} || ']' AS neg_values
            FROM logit_effects WHERE {in_chunk()} GROUP BY unit),
        a AS (
            SELECT e.unit, string_agg({activation}, chr(10) ORDER BY {order}) AS lines
            FROM examples e JOIN contexts c USING (context_id) LEFT JOIN st USING (unit)
            WHERE {in_chunk('e')} AND e.example_kind IN ('top', 'quantile') AND e.max_position >= $11
            GROUP BY e.unit),
        {explanation_cte}
        SELECT st.unit,
               $6 || st.unit || $7 || {sql_number('st.max_activation')} ||
               ',"pos_str":' || coalesce(l.pos_str, '[]') || ',"pos_values":' || coalesce(l.pos_values, '[]') ||
               ',"neg_str":' || coalesce(l.neg_str, '[]') || ',"neg_values":' || coalesce(l.neg_values, '[]') ||
               ',"frac_nonzero":' || {sql_number('coalesce(st.frequency, 0)')} ||
               ',"freq_hist_data_bar_heights":' || coalesce(h.heights, '[]') ||
               ',"freq_hist_data_bar_values":' || coalesce(h.bar_values, '[]') || '}}' AS feature,
               a.lines AS activations, x.lines AS explanations
        FROM st LEFT JOIN h USING (unit) LEFT JOIN l USING (unit) LEFT JOIN a USING (unit) LEFT JOIN x USING (unit)
        ORDER BY st.unit"""


def _prefix(fields: dict[str, Any], key: str = "index") -> str:
    """JSON text of `fields` followed by `"key":"` (the row continues with the unit number)."""
    return dumps(fields)[:-1] + f',"{key}":"'


# --- metadata rows ---------------------------------------------------------------------------------------------------


def _model_facts(ctx: ExportContext) -> dict[str, dict[str, Any]]:
    """Per model: its latest run, its number of layers (1 + the highest layer the store has of it), its MLP width
    and its residual width (from the store's `mlp` and `resid` sources, when it has them)."""
    facts: dict[str, dict[str, Any]] = {}
    widths = ctx.con.execute("""
        SELECT model, max(layer), max(n_units) FILTER (source = 'mlp'), max(n_units) FILTER (source = 'resid')
        FROM (SELECT model, source, layer, count(*) AS n_units FROM units GROUP BY ALL) GROUP BY model""").fetchall()
    for model, top_layer, mlp, resid in widths:
        facts[model] = {"layers": int(top_layer) + 1, "mlp": mlp, "resid": resid, "run": None}
    for run in read_runs(ctx.con):
        fact = facts.setdefault(run["model"], {"layers": 0, "mlp": None, "resid": None, "run": None})
        fact["run"] = run  # ordered by start time: the latest wins
        fact["layers"] = max([fact["layers"], *(layer + 1 for layer in run.get("layers") or [])])
    return facts


def _metadata(ref: LayerRef, model_id: str, set_id: str, source_id: str, facts: dict[str, Any], drop_bos: bool,
              creator_id: str | None, created_at: str) -> dict[str, dict[str, Any]]:
    """The four one-line files of a source folder, as Neuronpedia's release, model, source set and source rows."""
    run = facts.get("run") or {}
    release_name = f"{model_id}-{set_id}"
    description = f"{ref.source} of {ref.model}, harvested by featureatlas"
    info = ref.info
    hook = ", ".join(str(v) for v in (info.get("hook_name"), info.get("hook")) if v)
    context_length = run.get("context_length")
    lowered = ref.model.lower()
    return {
        "release": {"name": release_name, "description": description, "descriptionShort": description,
                    "creatorName": "", "creatorId": creator_id, "visibility": VISIBILITY, "isNewUi": False,
                    "featured": False, "urls": [], "creatorEmail": None, "creatorNameShort": "",
                    "defaultSourceSetName": None, "defaultSourceId": None, "defaultUmapSourceIds": [],
                    "createdAt": created_at},
        "model": {"id": model_id, "instruct": "instruct" in lowered or lowered.endswith("-it"),
                  "creatorId": creator_id, "displayNameShort": ref.model, "displayName": ref.model,
                  "tlensId": None, "dimension": facts.get("resid"), "visibility": VISIBILITY,
                  "defaultSourceSetName": None, "defaultSourceId": None, "inferenceEnabled": False,
                  "layers": facts.get("layers", ref.layer + 1), "neuronsPerLayer": facts.get("mlp") or 0,
                  "createdAt": created_at, "owner": "", "updatedAt": created_at, "website": None},
        "sourceset": {"modelId": model_id, "name": set_id, "creatorId": creator_id, "hasDashboards": True,
                      "visibility": VISIBILITY, "description": description, "type": info.get("kind") or "",
                      "creatorName": "", "urls": [], "creatorEmail": None, "releaseName": release_name,
                      "defaultOfModelId": None, "defaultRange": 1, "defaultShowBreaks": True, "showDfa": False,
                      "showCorrelated": False, "showHeadAttribution": False, "showUmap": False,
                      "createdAt": created_at},
        "source": {"id": source_id, "modelId": model_id, "setName": set_id, "creatorId": creator_id,
                   "hasDashboards": True, "inferenceEnabled": False, "inferenceHosts": [],
                   "saelensConfig": info.get("config") if info.get("dictionary_format") == "saelens" else None,
                   "saelensRelease": None, "saelensSaeId": None, "hfRepoId": None, "hfFolderId": None,
                   "visibility": VISIBILITY, "defaultOfModelId": None, "hasUmap": False,
                   "hasUmapLogSparsity": False, "hasUmapClusters": False, "num_prompts": run.get("n_contexts"),
                   "num_tokens_in_prompt": (context_length - 1 if drop_bos else context_length)
                   if context_length is not None else None,
                   "dataset": _last_part(run.get("corpus")),
                   "notes": f"featureatlas export of {ref.source}, layer {ref.layer}" + (f" ({hook})" if hook else ""),
                   "createdAt": created_at},
    }


GZIP_LEVEL = 1  # twice as fast as SAEDashboard's 5, files about 12% larger; gzip is most of this format's cost


def _last_part(path: str | None) -> str | None:
    """A corpus path's last part: an upload is public, the building machine's folders are not (as on the site)."""
    return re.split(r"[\\/]", path.rstrip("/\\"))[-1] or path if path else path


def _gzipped(lines: list[str]) -> Callable[[], bytes]:
    """The batch file's bytes, compressed when the writing thread calls it (mtime 0: same rows, same file)."""
    text = "\n".join(lines) + "\n" if lines else ""

    def compress() -> bytes:
        return gzip.compress(text.encode(), compresslevel=GZIP_LEVEL, mtime=0)
    return compress


@dataclass(frozen=True)
class _Folder:
    """One source folder: where it is and the SQL parameters that name it in every row."""

    path: Path
    params: list[Any]


def write_neuronpedia(ctx: ExportContext) -> None:
    """Every chosen layer as a Neuronpedia source folder, batch files of `batch_size` units each."""
    options = ctx.options
    batch_size, creator_id = options["batch_size"], options["creator_id"]
    created_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    facts = _model_facts(ctx)
    sql = rows_sql(explanation_columns(ctx.con))
    folders: dict[LayerRef, _Folder] = {}
    chunks: list[Chunk] = []
    for ref in ctx.layers:
        model_id, set_id = options["model_ids"][ref.model], options["set_ids"][(ref.model, ref.source)]
        source_id = f"{ref.layer}-{set_id}"
        folder = ctx.root / model_id / source_id
        for sub in ("features", "activations"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        model_facts = facts.get(ref.model, {})
        drop_bos = bool((model_facts.get("run") or {}).get("bos_excluded"))
        meta = _metadata(ref, model_id, set_id, source_id, model_facts, drop_bos, creator_id, created_at)
        for name, row in meta.items():
            ctx.write(folder / f"{name}.jsonl", (dumps(row) + "\n").encode())

        common = {"modelId": model_id, "layer": source_id}
        feature_middle = dumps({
            "creatorId": creator_id, "createdAt": created_at, "hasVector": False, "vector": [], "vectorLabel": None,
            "vectorDefaultSteerStrength": 10, "hookName": ref.info.get("hook_name"), "topkCosSimIndices": [],
            "topkCosSimValues": [], "neuron_alignment_indices": [], "neuron_alignment_values": [],
            "neuron_alignment_l1": [], "correlated_neurons_indices": [], "correlated_neurons_pearson": [],
            "correlated_neurons_l1": [], "correlated_features_indices": [], "correlated_features_pearson": [],
            "correlated_features_l1": [], "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": [],
            "decoder_weights_dist": [], "sourceSetName": set_id})
        activation_fields = {**common, "creatorId": creator_id, "createdAt": created_at, "dataSource": None,
                             "dataIndex": None, "dfaValues": [], "dfaTargetIndex": None, "dfaMaxValue": None,
                             "lossValues": [], "logitContributions": None, "zIndices": None, "zValues": None}
        params = [_prefix(common), '",' + feature_middle[1:-1] + ',"maxActApprox":', _prefix(activation_fields),
                  _prefix(common), f"{model_id}/{source_id}", 1 if drop_bos else 0, dumps(creator_id),
                  dumps(created_at)]
        folders[ref] = _Folder(folder, params)
        chunks += ctx.chunks(ref, multiple=batch_size)  # whole batches per query

    def render(cursor: duckdb.DuckDBPyConnection, chunk: Chunk) -> Files:
        ref, folder = chunk.ref, folders[chunk.ref]
        rows = cursor.execute(sql, [ref.model, ref.source, ref.layer, chunk.units[0], chunk.units[-1],
                                    *folder.params]).fetchall()
        files: Files = []
        for first in range(0, len(rows), batch_size):
            part = rows[first:first + batch_size]
            name = f"batch-{(chunk.first + first) // batch_size}.jsonl.gz"
            files.append((folder.path / "features" / name, _gzipped([row[1] for row in part])))
            files.append((folder.path / "activations" / name, _gzipped([row[2] for row in part if row[2]])))
            explained = [row[3] for row in part if row[3]]
            if explained:
                (folder.path / "explanations").mkdir(exist_ok=True)
                files.append((folder.path / "explanations" / name, _gzipped(explained)))
        return files

    ctx.run(chunks, render)
