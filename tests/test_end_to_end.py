"""The embedded model end to end: SmolLM2-135M (GGUF) over Shakespeare → store → site, through the CLI."""

from __future__ import annotations

import re
from pathlib import Path

import duckdb
import pytest

from featureatlas.cli import main
from featureatlas.harvest.corpus import embedded_corpus


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    code = main(["demo", "--out", str(out), "--tokens", "1500", "--layers", "0,29", "--resid", "29", "--top-k", "5",
                 "--batch-size", "8", "--sae-layer", "15", "--sae-features", "64", "--sae-k", "8",
                 "--sae-tokens", "1500", "--sae-steps", "20"])
    assert code == 0
    return out


def test_store_holds_neurons_residual_dimensions_and_sae_features(demo: Path) -> None:
    con = duckdb.connect(str(demo / "store.duckdb"), read_only=True)
    run = con.execute("SELECT model, n_tokens, context_length, top_k, layers, bos_token, bos_excluded "
                      "FROM runs").fetchone()
    assert run == ("SmolLM2-135M-Instruct", 1500, 64, 5, [0, 29], "<|im_start|>", True)
    assert con.execute("SELECT source, layer, n_units, kind FROM sources ORDER BY source, layer").fetchall() == [
        ("mlp", 0, 1536, "mlp"), ("mlp", 29, 1536, "mlp"), ("resid", 29, 576, "resid"), ("sae:res15", 15, 64, "sae")]
    units = 3072 + 576 + 64
    assert con.execute("SELECT count(*), count(max_activation) FROM units").fetchone() == (units, units)
    kinds = dict(con.execute("SELECT example_kind, count(DISTINCT (source, layer, unit)) FROM examples "
                             "GROUP BY ALL").fetchall())
    assert kinds["top"] == units and kinds["bottom"] == 3072 + 576 and kinds["quantile"] > 0 and kinds["random"] > 0
    assert con.execute("SELECT count(*) FROM examples WHERE example_kind = 'top'").fetchone()[0] == units * 5
    assert con.execute("SELECT count(DISTINCT (source, layer, unit)) FROM logit_effects").fetchone()[0] == units
    assert (demo / "sae" / "blocks.15.hook_resid_post" / "cfg.json").is_file()
    # every example's stored max is its activation at max_position, and no other counted position beats it
    bad = con.execute("""
        SELECT count(*) FROM examples e JOIN contexts c USING (context_id)
        WHERE (e.example_kind != 'bottom' AND (e.activations[e.max_position + 1] != e.max_activation
                                               OR list_max(e.activations[2:]) != e.max_activation))
           OR (e.example_kind = 'bottom' AND (e.activations[e.max_position + 1] != e.max_activation
                                              OR list_min(e.activations[2:]) != e.max_activation))
           OR len(e.activations) != len(c.tokens) OR c.tokens[1] != '<|im_start|>'""").fetchone()[0]
    assert bad == 0
    # the display strings read back as the corpus text
    first_file = sorted(Path(str(embedded_corpus().parent)).glob("*_gut.txt"))[0].read_text()
    tokens = con.execute("SELECT tokens FROM contexts WHERE context_id = 0").fetchone()
    if tokens:
        assert first_file.startswith("".join(tokens[0][1:]))


def test_site_has_a_page_per_unit_with_highlighted_examples(demo: Path) -> None:
    site = demo / "site"
    pages = list(site.rglob("*.html"))
    assert len([p for p in pages if re.fullmatch(r"\d+\.html", p.name)]) == 3072 + 576 + 64  # a page per unit
    index = (site / "index.html").read_text()
    assert "SmolLM2-135M-Instruct" in index
    unit_pages = [p for p in pages if re.fullmatch(r"\d+\.html", p.name)]
    text = unit_pages[0].read_text()
    assert "Content-Security-Policy" in text and "<script>" not in text
