"""A plain-text summary of what a store holds, for `featureatlas info`."""

from __future__ import annotations

from pathlib import Path

from featureatlas.store.schema import open_store
from featureatlas.text import terminal_text


def describe(path: Path) -> str:
    """What the store holds, a line per run, source and table; every string from the store escaped."""
    con = open_store(path)
    t = terminal_text
    lines = [f"store: {path} ({path.stat().st_size / 1e6:.1f} MB)"]
    for model, corpus, n_tokens, n_contexts, ctx_len, k, dtype, device, tps, finished in con.execute(
            "SELECT model, corpus, n_tokens, n_contexts, context_length, top_k, dtype, device, tokens_per_second, "
            "finished_at FROM runs ORDER BY run_id").fetchall():
        lines.append(f"run: {t(model)} over {t(corpus)}: {n_tokens:,} tokens in {n_contexts:,} contexts of {ctx_len}, "
                     f"top {k}, {t(dtype)} on {t(device)}, {tps:,.0f} tokens/s, finished {finished:%Y-%m-%d %H:%M}")
    for model, source, n_layers, lo, hi, n_units, architecture, hook in con.execute(
            "SELECT model, source, count(*), min(layer), max(layer), sum(n_units), any_value(architecture), "
            "any_value(hook_name) FROM sources GROUP BY model, source ORDER BY model, source").fetchall():
        what = f" ({t(architecture)} on {t(hook)})" if architecture else ""
        where = f"{n_layers} layers ({lo}-{hi})" if n_layers > 1 else f"layer {lo}"
        lines.append(f"source: {t(model)} / {t(source)}{what}: {n_units:,} units in {where}")
    kinds = con.execute("SELECT example_kind, count(*) FROM examples GROUP BY ALL ORDER BY ALL").fetchall()
    lines.append("examples: " + ", ".join(f"{n:,} {t(kind)}" for kind, n in kinds))
    for name in ("units", "examples", "contexts", "documents"):
        lines.append(f"{name}: {con.execute(f'SELECT count(*) FROM {name}').fetchone()[0]:,} rows")
    con.close()
    return "\n".join(lines)
