"""`export --format json`: one JSON file per unit with everything its page shows, and index.json.

Layout: `<model-slug>/<source-slug>/<layer>/<unit>.json` (the site's folder names) and `index.json` at the top.
Each unit file is rendered whole by one DuckDB query per chunk of units (UNIT_SQL): floats in their shortest
exact form, strings through DuckDB's JSON writer, so what is stored comes back exactly.
docs/exports-and-annotations.md documents the shape; FORMAT and VERSION name it, and VERSION changes whenever a
reader would need to know.
"""

from __future__ import annotations

from typing import Any

import duckdb

from featureatlas.export.common import (
    EXAMPLE_ORDER,
    Chunk,
    ExportContext,
    Files,
    LayerRef,
    dumps,
    explanation_columns,
    in_chunk,
    parse_json_column,
    read_runs,
    sql_int,
    sql_json,
    sql_number,
    sql_numbers,
)
from featureatlas.store.schema import StoreError

FORMAT = "featureatlas.unit"
INDEX_FORMAT = "featureatlas.index"
VERSION = 1


def _logit_list(polarity: str) -> str:
    entry = (f"""'{{"token_id":' || {sql_int('token_id')} || ',"token":' || {sql_json('token')} || """
             f"""',"effect":' || {sql_number('effect')} || '}}'""")
    return f"'[' || coalesce(string_agg({entry}, ',' ORDER BY rank) FILTER (polarity = '{polarity}'), '') || ']'"


def unit_sql(explanations: dict[str, str] | None) -> str:
    """One row (unit, JSON text) per unit of a chunk, in unit order; parameters as `in_chunk`."""
    example = (
        f"""'{{"kind":' || {sql_json('e.example_kind')} || ',"rank":' || {sql_int('e.rank')} || """
        f"""',"interval":' || CASE WHEN e.interval_lo IS NULL AND e.interval_hi IS NULL THEN 'null' """
        f"""ELSE '[' || {sql_number('e.interval_lo')} || ',' || {sql_number('e.interval_hi')} || ']' END || """
        f"""',"max_activation":' || {sql_number('e.max_activation')} || """
        f"""',"max_position":' || {sql_int('e.max_position')} || ',"context_id":' || {sql_int('e.context_id')} || """
        f"""',"document":' || {sql_json('d.name')} || ',"start_token":' || {sql_int('c.start_token')} || """
        f"""',"tokens":' || {sql_json('c.tokens')} || """
        f"""',"activations":' || coalesce({sql_numbers('e.activations')}, 'null') || '}}'""")
    explanation_cte = "x AS (SELECT NULL::INTEGER AS unit, NULL::VARCHAR AS explanations WHERE false)"
    if explanations is not None:
        text, score = explanations["text"], explanations["score"]
        entry = (f"""'{{"text":' || {sql_json(text)} || ',"score":' || {sql_number(score)} || """
                 f"""',"score_kind":' || {sql_json(explanations['score_kind'])} || """
                 f"""',"author":' || {sql_json(explanations['author'])} || '}}'""")
        explanation_cte = (
            f"x AS (SELECT x.unit, '[' || string_agg({entry}, ',' ORDER BY {score} DESC NULLS LAST, {text}) || ']' "
            f"AS explanations FROM explanations x WHERE {in_chunk('x')} GROUP BY x.unit)")
    return f"""
        WITH st AS (
            SELECT s.unit, s.n_tokens, s.n_firing, s.frequency, s.mean, s.std, s.min_activation, s.max_activation,
                   u.n_examples
            FROM statistics s JOIN units u USING (model, source, layer, unit) WHERE {in_chunk('s')}),
        h AS (
            SELECT unit, '[' || string_agg('{{"bin":' || bin || ',"lo":' || {sql_number('lo')} || ',"hi":' ||
                                           {sql_number('hi')} || ',"count":' || count || '}}', ',' ORDER BY bin) || ']'
                         AS histogram
            FROM histograms WHERE {in_chunk()} GROUP BY unit),
        l AS (
            SELECT unit, {_logit_list('top')} AS top, {_logit_list('bottom')} AS bottom
            FROM logit_effects WHERE {in_chunk()} GROUP BY unit),
        e AS (
            SELECT e.unit, '[' || string_agg({example}, ',' ORDER BY {EXAMPLE_ORDER.format(a='e.')}) || ']' AS examples
            FROM examples e LEFT JOIN contexts c USING (context_id) LEFT JOIN documents d USING (document_id)
            WHERE {in_chunk('e')} GROUP BY e.unit),
        {explanation_cte}
        SELECT st.unit,
               $6 || st.unit ||
               ',"statistics":{{"n_tokens":' || {sql_int('st.n_tokens')} ||
               ',"n_firing":' || {sql_int('st.n_firing')} ||
               ',"frequency":' || {sql_number('st.frequency')} || ',"mean":' || {sql_number('st.mean')} ||
               ',"std":' || {sql_number('st.std')} || ',"min_activation":' || {sql_number('st.min_activation')} ||
               ',"max_activation":' || {sql_number('st.max_activation')} ||
               ',"n_examples":' || {sql_int('st.n_examples')} || '}}' ||
               ',"histogram":' || coalesce(h.histogram, '[]') ||
               ',"logits":{{"top":' || coalesce(l.top, '[]') || ',"bottom":' || coalesce(l.bottom, '[]') || '}}' ||
               ',"examples":' || coalesce(e.examples, '[]') ||
               ',"explanations":' || coalesce(x.explanations, '[]') || '}}' AS doc
        FROM st LEFT JOIN h USING (unit) LEFT JOIN l USING (unit) LEFT JOIN e USING (unit) LEFT JOIN x USING (unit)
        ORDER BY st.unit"""


def _head(ref: LayerRef) -> str:
    """The start of every unit file of a layer, up to the unit number."""
    head = dumps({"format": FORMAT, "version": VERSION, "model": ref.model, "source": ref.source, "layer": ref.layer})
    return head[:-1] + ',"unit":'


def _layer_entry(ref: LayerRef) -> dict[str, Any]:
    """A layer's folder and unit count, and what the store's `sources` row says about it (hook, kind, ...)."""
    info = dict(ref.info)
    if "config" in info:
        info["config"] = parse_json_column(info["config"])
    return {"layer": ref.layer, "n_units": ref.n_units, "path": f"{ref.model_slug}/{ref.source_slug}/{ref.layer}",
            **info}


def write_index(ctx: ExportContext) -> None:
    """index.json: the formats' names and versions, the store's runs, and every model, source and layer exported,
    with its folder and unit count."""
    models: dict[str, dict[str, Any]] = {}
    for ref in ctx.layers:
        model = models.setdefault(ref.model, {"model": ref.model, "slug": ref.model_slug, "sources": {}})
        source = model["sources"].setdefault(ref.source, {"source": ref.source, "slug": ref.source_slug,
                                                          "layers": []})
        source["layers"].append(_layer_entry(ref))
    index = {"format": INDEX_FORMAT, "version": VERSION, "unit_format": FORMAT, "unit_version": VERSION,
             "store": ctx.store_path.name, "n_units": sum(ref.n_units for ref in ctx.layers),
             "runs": read_runs(ctx.con),
             "models": [{**m, "sources": list(m["sources"].values())} for m in models.values()]}
    ctx.write(ctx.root / "index.json", (dumps(index) + "\n").encode())


def write_json(ctx: ExportContext) -> None:
    """Every unit of every chosen layer as `<model>/<source>/<layer>/<unit>.json`, then index.json."""
    sql = unit_sql(explanation_columns(ctx.con))
    heads = {ref: _head(ref) for ref in ctx.layers}

    def render(cursor: duckdb.DuckDBPyConnection, chunk: Chunk) -> Files:
        ref = chunk.ref
        folder = ctx.root / ref.model_slug / ref.source_slug / str(ref.layer)
        rows = cursor.execute(sql, [ref.model, ref.source, ref.layer, chunk.units[0], chunk.units[-1],
                                    heads[ref]]).fetchall()
        files: Files = []
        for unit, doc in rows:
            if doc is None:  # a NULL the SQL does not expect: better a clear error than a missing file
                raise StoreError(f"{ctx.store_path}: unit {unit} of layer {ref.layer} of {ref.source!r} has an "
                                 "unexpected NULL; harvest the store again")
            files.append((folder / f"{unit}.json", doc.encode()))
        return files

    chunks = []
    for ref in ctx.layers:
        (ctx.root / ref.model_slug / ref.source_slug / str(ref.layer)).mkdir(parents=True, exist_ok=True)
        chunks += ctx.chunks(ref)
    ctx.run(chunks, render)
    write_index(ctx)
