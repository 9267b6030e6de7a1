"""Merge stores into one: the shards of one harvest (`harvest --shard I/N`, or torchrun's ranks) exactly, and
catalogues of different models, dictionaries or corpora side by side.

Shards of one run (same model and options, distinct `--shard`) see disjoint contexts with the same context ids,
so every accumulator merges exactly from what the stores hold:
  - statistics: counts and sums add, min and max of the parts (sums in float64, in another order than a single
    run's: equal to about 1e-15 relative);
  - histograms: bin counts add;
  - top-k and bottom-k: the best k of the union, ties to the lower context id, as a single run ranks them;
  - quantile and random samples: each context's sampling key is recomputed from its id and the seed; the unit's
    interval range W is the power of two above the merged max; each interval keeps the smallest keys of the
    union (the smallest keys of a union are among the smallest of its parts), as a single run would;
  - logit effects: the same model gives the same effects: taken from the first shard.
Runs whose (model, source, layer) do not overlap are copied side by side; where their contexts come from another
corpus or tokenizer, their context and document ids are shifted so they stay distinct.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from featureatlas.errors import setting_name
from featureatlas.store.sampling import sampling_keys
from featureatlas.store.schema import StoreError, check_catalog, open_store
from featureatlas.store.writer import StoreWriter

# Options that may differ between the shards of one run; everything else must match.
_SHARD_ONLY = {"shard"}
# What fixes the context ids: stores that agree on these number the same contexts the same way.
_CONTEXT_KEYS = ("corpus", "context_length", "tokens", "text_field")
# An example's per-token activations as stored (store/encoding.py), copied as they are: a merged example is
# the shard's, bit for bit, so it reads exactly as in a single run.
_ENCODED = "activations_q, activations_levels, activations_exact"
_ENCODED_E = ", ".join(f"e.{name}" for name in _ENCODED.split(", "))
_EXAMPLE_COLUMNS = ("model, source, layer, unit, example_kind, interval_lo, interval_hi, rank, context_id, "
                    f"max_position, max_activation, {_ENCODED}")


@dataclass
class Part:
    path: Path
    alias: str
    run: dict
    settings: dict
    layers: set[tuple[str, str, int]]


@dataclass
class Family:
    """Stores that are shards of one run (a single store is a family of one)."""

    parts: list[Part] = field(default_factory=list)
    context_offset: int = 0
    document_offset: int = 0

    @property
    def first(self) -> Part:
        return self.parts[0]


def merge_stores(inputs: list[Path], out: Path, overwrite: bool = False) -> dict[str, int]:
    """Write the merge of `inputs` to `out` (atomically); returns counts for the CLI's summary line."""
    if len(inputs) < 1:
        raise StoreError("merge: name at least one store")
    if out.exists() and not overwrite:
        raise StoreError(f"{out}: a store is already there; pass {setting_name('overwrite')} to replace it, or "
                         f"choose another {setting_name('out')}")
    parts = [_read_part(Path(path), i) for i, path in enumerate(inputs)]
    families = _families(parts)
    with StoreWriter(out, attach=[part.path for part in parts]) as store:
        con = store.con
        for part in parts:
            con.execute(f"ATTACH '{_sql_string(str(part.path.resolve()))}' AS {part.alias} (READ_ONLY)")
            check_catalog(con, part.path, database=part.alias)  # the file read now, not only the one opened before
        _assign_offsets(con, families)
        for run_id, family in enumerate(families, start=1):
            _merge_family(con, family, run_id)
        for part in parts:
            con.execute(f"DETACH {part.alias}")
        counts = {name: con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]
                  for name, table in (("runs", "t_runs"), ("units", "t_units"), ("examples", "t_examples"))}
    return counts


def _sql_string(text: str) -> str:
    return text.replace("'", "''")


def _read_part(path: Path, i: int) -> Part:
    con = open_store(path)
    try:
        cursor = con.execute("SELECT * FROM runs")
        names = [d[0] for d in cursor.description]
        runs = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
        layers = {tuple(row) for row in con.execute("SELECT model, source, layer FROM sources").fetchall()}
    finally:
        con.close()
    if len(runs) != 1:
        raise StoreError(f"{path}: holds {len(runs)} runs; merge the stores it was made from instead "
                         "(a merged catalogue of several runs cannot be a shard)")
    run = runs[0]
    return Part(path, f"in{i}", run, json.loads(run["settings"]), layers)


def _run_key(part: Part) -> tuple:
    settings = {k: v for k, v in part.settings.items() if k not in _SHARD_ONLY}
    return (part.run["model"], part.run["model_type"], part.run["bos_token"], json.dumps(settings, sort_keys=True))


def _difference(a: Part, b: Part) -> str:
    """The first option in which two runs differ, as the user would name it."""
    for name in ("model", "model_type", "bos_token"):
        if a.run[name] != b.run[name]:
            return f"{name} ({a.run[name]!r} vs {b.run[name]!r})"
    for name in sorted(set(a.settings) | set(b.settings)):
        if name not in _SHARD_ONLY and a.settings.get(name) != b.settings.get(name):
            return f"--{name.replace('_', '-')} ({a.settings.get(name)!r} vs {b.settings.get(name)!r})"
    return "nothing"


def _families(parts: list[Part]) -> list[Family]:
    """Group shards of one run; refuse overlapping units of different runs, naming the difference."""
    families: dict[tuple, Family] = {}
    for part in parts:
        families.setdefault(_run_key(part), Family()).parts.append(part)
    result = list(families.values())
    for family in result:
        shards = [tuple(p.settings.get("shard") or (0, 1)) for p in family.parts]
        for i, shard in enumerate(shards):
            if shard in shards[:i]:
                other = family.parts[shards.index(shard)]
                raise StoreError(f"{family.parts[i].path}: is the same shard {shard[0]}/{shard[1]} as {other.path}; "
                                 "merge each shard once")
    for i, a in enumerate(result):
        for b in result[i + 1:]:
            overlap = set.union(*(p.layers for p in a.parts)) & set.union(*(p.layers for p in b.parts))
            if overlap:
                model, source, layer = sorted(overlap)[0]
                raise StoreError(f"{b.first.path}: holds {source} layer {layer} of {model} like {a.first.path}, but "
                                 f"their runs differ in {_difference(a.first, b.first)}; only shards of one run merge "
                                 "(same model, tokenizer and options; `featureatlas harvest --shard` parts)")
    return result


def _context_key(family: Family) -> tuple:
    return (family.first.run["model"],) + tuple(json.dumps(family.first.settings.get(k)) for k in _CONTEXT_KEYS)


def _assign_offsets(con: duckdb.DuckDBPyConnection, families: list[Family]) -> None:
    """Families numbering contexts alike share ids; the others are shifted past every id used before them."""
    seen: dict[tuple, tuple[int, int]] = {}
    next_context = next_document = 0
    for family in families:
        key = _context_key(family)
        if key in seen:
            family.context_offset, family.document_offset = seen[key]
        else:
            family.context_offset, family.document_offset = next_context, next_document
            seen[key] = (next_context, next_document)
        for part in family.parts:
            top_context, top_document = con.execute(
                f"SELECT (SELECT coalesce(max(context_id), -1) FROM {part.alias}.t_contexts), "
                f"(SELECT coalesce(max(document_id), -1) FROM {part.alias}.t_documents)").fetchall()[0]
            next_context = max(next_context, family.context_offset + top_context + 1)
            next_document = max(next_document, family.document_offset + top_document + 1)


def _union(family: Family, table: str, columns: str = "*", where: str = "") -> str:
    """SQL for the rows of `table` in every shard of a family, with a `part` column saying which."""
    clause = f" WHERE {where}" if where else ""
    return " UNION ALL ".join(f"SELECT {i} AS part, {columns} FROM {p.alias}.{table}{clause}"
                              for i, p in enumerate(family.parts))


def _merge_family(con: duckdb.DuckDBPyConnection, family: Family, run_id: int) -> None:
    settings = family.first.settings
    layers = sorted(set.union(*(p.layers for p in family.parts)))
    for model, source, layer in layers:
        key = f"model = '{_sql_string(model)}' AND source = '{_sql_string(source)}' AND layer = {int(layer)}"
        con.execute(f"INSERT INTO t_sources SELECT * EXCLUDE (part) FROM ({_union(family, 't_sources', '*', key)}) "
                    "ORDER BY part LIMIT 1")
        _merge_units(con, family, key)
        _merge_examples(con, family, key, settings)
        con.execute(f"""INSERT INTO t_logits SELECT * EXCLUDE (part) FROM ({_union(family, 't_logits', '*', key)})
                        WHERE part = (SELECT min(part) FROM ({_union(family, 't_sources', '*', key)}))""")
    offset_c, offset_d = family.context_offset, family.document_offset
    con.execute(f"""INSERT INTO t_contexts
        SELECT DISTINCT ON (context_id) context_id + {offset_c}, document_id + {offset_d}, start_token, token_ids,
               tokens
        FROM ({_union(family, 't_contexts')})
        WHERE context_id + {offset_c} IN (SELECT context_id FROM t_examples)
          AND context_id + {offset_c} NOT IN (SELECT context_id FROM t_contexts)
        ORDER BY context_id""")
    con.execute(f"""INSERT INTO t_documents
        SELECT DISTINCT ON (document_id) document_id + {offset_d}, name, n_tokens FROM ({_union(family, 't_documents')})
        WHERE document_id + {offset_d} NOT IN (SELECT document_id FROM t_documents) ORDER BY document_id""")
    con.execute(f"""INSERT INTO t_vocabulary SELECT DISTINCT ON (model, token_id) model, token_id, token
        FROM ({_union(family, 't_vocabulary')}) v
        WHERE NOT EXISTS (SELECT 1 FROM t_vocabulary t WHERE t.model = v.model AND t.token_id = v.token_id)""")
    _merge_optional(con, family, "t_explanations", "model, source, layer, unit, text, author, score_kind")
    # Weight neighbours and layouts are the same in every shard; co-occurrence lists of shards cannot be added up
    # (each holds its top k, not every count), so a merge leaves them out.
    _merge_optional(con, family, "t_neighbours", "model, source, layer, unit, kind, rank", "kind <> 'cooccurrence'")
    _merge_optional(con, family, "t_layout", "model, source, layer, unit, kind")
    example = ["model", "source", "layer", "unit", "context_id"]
    # ablation effects of top examples; attributions of a head's examples of any kind and a dictionary's top ones,
    # as a single run writes them (harvest/ablation.py, harvest/attention.py)
    _merge_per_example(con, family, "t_ablations", example, "e.example_kind = 'top'")
    _merge_per_example(con, family, "t_attributions", [*example, "position"],
                       "(x.kind = 'head' OR e.example_kind = 'top')")
    _merge_run(con, family, run_id)


def _merge_units(con: duckdb.DuckDBPyConnection, family: Family, key: str) -> None:
    con.execute(f"""INSERT INTO t_units
        SELECT model, source, layer, unit, max(max_activation), min(min_activation), sum(n_tokens), sum(n_firing),
               sum(sum_activation ORDER BY part), sum(sum_squares ORDER BY part), 0
        FROM ({_union(family, 't_units', '*', key)}) GROUP BY model, source, layer, unit""")
    con.execute(f"""INSERT INTO t_histograms
        SELECT model, source, layer, unit, list(bin ORDER BY bin), list(count ORDER BY bin) FROM (
            SELECT model, source, layer, unit, bin, sum(count)::BIGINT AS count FROM (
                SELECT model, source, layer, unit, unnest(bins) AS bin, unnest(counts) AS count
                FROM ({_union(family, 't_histograms', '*', key)}))
            GROUP BY ALL)
        GROUP BY model, source, layer, unit""")


def _merge_examples(con: duckdb.DuckDBPyConnection, family: Family, key: str, settings: dict) -> None:
    offset = family.context_offset
    examples = _union(family, "t_examples", "*", key)
    top_k = int(settings.get("top_k", 20))
    bottom_k = settings.get("bottom_k")
    bottom_k = top_k if bottom_k is None else int(bottom_k)
    for kind, k, order in (("top", top_k, "max_activation DESC"), ("bottom", bottom_k, "max_activation ASC")):
        con.execute(f"""INSERT INTO t_examples ({_EXAMPLE_COLUMNS})
            SELECT model, source, layer, unit, example_kind, interval_lo, interval_hi, r, context_id + {offset},
                   max_position, max_activation, {_ENCODED}
            FROM (SELECT *, row_number() OVER (PARTITION BY unit ORDER BY {order}, context_id) AS r
                  FROM ({examples}) WHERE example_kind = '{kind}')
            WHERE r <= {k}""")
    con.execute(f"""UPDATE t_units SET n_examples = (SELECT count(*) FROM t_examples e
        WHERE e.model = t_units.model AND e.source = t_units.source AND e.layer = t_units.layer
          AND e.unit = t_units.unit AND e.example_kind = 'top') WHERE {key}""")
    seed = int(settings.get("seed", 0))
    samples = (("quantile", int(settings.get("intervals", 12)), int(settings.get("per_interval", 2))),
               ("random", 1, int(settings.get("random_examples", 4))))
    for kind, n_bins, per_bin in samples:
        chosen = _resample(con, examples, kind, key, n_bins, per_bin, seed)
        if chosen is None:
            continue
        con.register("featureatlas_chosen", chosen)
        try:
            con.execute(f"""INSERT INTO t_examples ({_EXAMPLE_COLUMNS})
                SELECT e.model, e.source, e.layer, e.unit, e.example_kind, c.lo, c.hi, c.rank,
                       e.context_id + {offset}, e.max_position, e.max_activation,
                       {_ENCODED_E}
                FROM ({examples}) e JOIN featureatlas_chosen c USING (part, unit, context_id)
                WHERE e.example_kind = '{kind}'""")
        finally:
            con.unregister("featureatlas_chosen")


def _resample(con: duckdb.DuckDBPyConnection, examples: str, kind: str, key: str, n_bins: int, per_bin: int,
              seed: int) -> pa.Table | None:
    """Which sampled examples the merged run keeps, with their interval and rank (see the module docstring)."""
    rows = con.execute(f"""SELECT e.part, e.unit, e.context_id, e.max_activation, u.max_activation AS unit_max
        FROM ({examples}) e JOIN t_units u ON u.unit = e.unit AND u.{key.replace(' AND ', ' AND u.')}
        WHERE e.example_kind = '{kind}'""").fetchnumpy()
    if len(rows["unit"]) == 0:
        return None
    part, unit, context = (np.asarray(rows[n]) for n in ("part", "unit", "context_id"))
    value = np.asarray(rows["max_activation"], np.float32)
    if n_bins > 1:  # W = 2^e, the power of two above the unit's max (Reservoir._grow's frexp)
        _, exponent = np.frexp(np.asarray(rows["unit_max"], np.float32))
        bins = np.floor(np.ldexp(value, -exponent).astype(np.float32) * np.float32(n_bins))
        bins = np.clip(bins, 0, n_bins - 1).astype(np.int64)
        width = (np.ldexp(np.float32(1), exponent).astype(np.float32) / np.float32(n_bins)).astype(np.float32)
        lo, hi = (width * bins.astype(np.float32)).astype(np.float32), (width * (bins + 1)).astype(np.float32)
    else:
        bins = np.zeros(len(unit), np.int64)
        lo = hi = np.full(len(unit), np.nan, np.float32)
    keys = sampling_keys(context, seed)
    order = np.lexsort((keys, bins, unit))
    group = unit[order] * (n_bins + 1) + bins[order]
    starts = np.r_[0, np.nonzero(np.diff(group))[0] + 1]
    within = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    keep = order[within < per_bin]
    rank = within[within < per_bin] + 1
    return pa.table({"part": part[keep].astype(np.int32), "unit": unit[keep].astype(np.int32),
                     "context_id": context[keep].astype(np.int64), "rank": rank.astype(np.int32),
                     "lo": pa.array(lo[keep], from_pandas=True) if n_bins > 1 else pa.nulls(len(keep), pa.float32()),
                     "hi": pa.array(hi[keep], from_pandas=True) if n_bins > 1 else pa.nulls(len(keep), pa.float32())})


def _parts_with(con: duckdb.DuckDBPyConnection, family: Family, table: str) -> list:
    """The parts whose store has `table` (the optional tables are absent from older stores)."""
    return [p for p in family.parts
            if con.execute("SELECT count(*) FROM duckdb_tables() WHERE database_name = ? AND table_name = ?",
                           [p.alias, table]).fetchall()[0][0]]


def _merge_optional(con: duckdb.DuckDBPyConnection, family: Family, table: str, key: str, where: str = "") -> None:
    """Rows of an optional table from every part that has it, each `key` once."""
    with_table = _parts_with(con, family, table)
    if not with_table:
        return
    clause = f" WHERE {where}" if where else ""
    union = " UNION ALL ".join(f"SELECT * FROM {p.alias}.{table}{clause}" for p in with_table)
    match = " AND ".join(f"t.{c} IS NOT DISTINCT FROM x.{c}" for c in key.split(", "))
    con.execute(f"""INSERT INTO {table} SELECT DISTINCT ON ({key}) * FROM ({union}) x
                    WHERE NOT EXISTS (SELECT 1 FROM {table} t WHERE {match})""")


def _merge_per_example(con: duckdb.DuckDBPyConnection, family: Family, table: str, key: list[str], kept: str
                       ) -> None:
    """Rows of an optional table about examples (at their max position), for the examples the merge keeps (`kept`:
    which of them, in SQL on the example e and the row x), each computed by the shard that found the example,
    their context ids shifted as the examples' are; each `key` once."""
    with_table = _parts_with(con, family, table)
    if not with_table:
        return
    offset = family.context_offset
    union = " UNION ALL ".join(f"SELECT * REPLACE (context_id + {offset} AS context_id) FROM {p.alias}.{table}"
                               for p in with_table)
    match = " AND ".join(f"t.{c} = x.{c}" for c in key)
    con.execute(f"""INSERT INTO {table}
        SELECT DISTINCT ON ({", ".join(key)}) * FROM ({union}) x
        WHERE EXISTS (SELECT 1 FROM t_examples e WHERE e.model = x.model AND e.source = x.source
                      AND e.layer = x.layer AND e.unit = x.unit AND e.context_id = x.context_id
                      AND e.max_position = x.position AND {kept})
          AND NOT EXISTS (SELECT 1 FROM {table} t WHERE {match})""")


def _merge_run(con: duckdb.DuckDBPyConnection, family: Family, run_id: int) -> None:
    runs = [p.run for p in family.parts]
    first = dict(runs[0])
    settings = dict(family.first.settings)
    if len(runs) > 1 or settings.get("shard"):
        shards = sorted(tuple(p.settings.get("shard") or (0, 1)) for p in family.parts)
        settings["shard"] = None if len(shards) == shards[0][1] else [list(s) for s in shards]
    offset_d = family.document_offset
    n_documents = con.execute(f"""SELECT count(*) FROM t_documents WHERE document_id >= {offset_d}
        AND document_id <= {offset_d} + (SELECT max(document_id) FROM ({_union(family, 't_documents')}))""").fetchall()
    first.update(run_id=run_id, n_tokens=sum(r["n_tokens"] for r in runs),
                 n_contexts=sum(r["n_contexts"] for r in runs),
                 n_documents=n_documents[0][0], settings=json.dumps(settings),
                 started_at=min(r["started_at"] for r in runs), finished_at=max(r["finished_at"] for r in runs),
                 tokens_per_second=sum(r["tokens_per_second"] for r in runs))
    names = list(first)
    con.execute(f"INSERT INTO t_runs ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                [first[n] for n in names])
