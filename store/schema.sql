-- featureatlas store, schema version 3.
-- Tables (prefixed t_) hold the data and may change between versions; the views below are the public,
-- documented interface: query them with `duckdb STORE.duckdb "SELECT ... FROM units ..."`.

CREATE TABLE t_meta (key VARCHAR PRIMARY KEY, value VARCHAR NOT NULL);

CREATE TABLE t_runs (
    run_id INTEGER PRIMARY KEY,
    model VARCHAR NOT NULL,            -- display name of the model
    model_ref VARCHAR NOT NULL,        -- what the user passed to --model
    model_type VARCHAR NOT NULL,       -- transformers config.model_type
    corpus VARCHAR NOT NULL,           -- corpus path as given
    n_documents BIGINT NOT NULL,
    n_contexts BIGINT NOT NULL,
    n_tokens BIGINT NOT NULL,          -- tokens run through the model, BOS and padding excluded
    context_length INTEGER NOT NULL,   -- tokens per context, BOS included
    top_k INTEGER NOT NULL,
    layers INTEGER[] NOT NULL,         -- layers whose MLP neurons were harvested
    batch_size INTEGER NOT NULL,
    dtype VARCHAR NOT NULL,
    device VARCHAR NOT NULL,
    bos_token VARCHAR,                 -- NULL when the tokenizer has none
    bos_excluded BOOLEAN NOT NULL,     -- the BOS position never counts (not for maxima, statistics or samples)
    seed BIGINT NOT NULL,              -- seeds the quantile and random samples (reproducible)
    settings JSON NOT NULL,            -- every harvest option, as given
    versions JSON NOT NULL,            -- library versions
    started_at TIMESTAMP NOT NULL,
    finished_at TIMESTAMP NOT NULL,
    tokens_per_second DOUBLE NOT NULL
);

CREATE TABLE t_sources (
    model VARCHAR NOT NULL,
    source VARCHAR NOT NULL,           -- 'mlp', 'resid', 'sae:<name>' or 'transcoder:<name>'
    layer INTEGER NOT NULL,
    n_units INTEGER NOT NULL,
    hook VARCHAR NOT NULL,             -- the transformers module read, and whether its input or output
    kind VARCHAR NOT NULL,             -- 'mlp' | 'resid' | 'sae' | 'transcoder'
    hook_name VARCHAR NOT NULL,        -- the hook in TransformerLens's names (or the dictionary's own name)
    hook_out_name VARCHAR,             -- transcoders: where the decoder writes
    signed BOOLEAN NOT NULL,           -- units go negative too: bottom examples and negative histogram bins
    histogram_every INTEGER NOT NULL,  -- the histogram counts every token of one context in this many
    dictionary_path VARCHAR,           -- the SAE / transcoder folder, as an absolute path
    dictionary_format VARCHAR,         -- 'saelens' | 'sparsify'
    architecture VARCHAR,              -- the dictionary's architecture, e.g. 'topk', 'jumprelu'
    config JSON,                       -- the dictionary's whole config file
    PRIMARY KEY (model, source, layer)
);

CREATE TABLE t_units (
    model VARCHAR NOT NULL,
    source VARCHAR NOT NULL,
    layer INTEGER NOT NULL,
    unit INTEGER NOT NULL,
    max_activation FLOAT,              -- over every counted token; NULL when no token was seen
    min_activation FLOAT,
    n_tokens BIGINT NOT NULL,          -- counted tokens (BOS and padding excluded)
    n_firing BIGINT NOT NULL,          -- counted tokens with activation > 0
    sum_activation DOUBLE NOT NULL,
    sum_squares DOUBLE NOT NULL,
    n_examples INTEGER NOT NULL        -- top examples kept
);

CREATE TABLE t_histograms (
    model VARCHAR NOT NULL,
    source VARCHAR NOT NULL,
    layer INTEGER NOT NULL,
    unit INTEGER NOT NULL,
    bins SMALLINT[] NOT NULL,          -- non-empty bins only, see the histograms view for the edges
    counts BIGINT[] NOT NULL
);

CREATE TABLE t_examples (
    model VARCHAR NOT NULL,
    source VARCHAR NOT NULL,
    layer INTEGER NOT NULL,
    unit INTEGER NOT NULL,
    example_kind VARCHAR NOT NULL,     -- 'top' | 'bottom' | 'quantile' | 'random' (features: only contexts where they fire)
    interval_lo FLOAT,                 -- quantile examples: the interval [lo, hi) their max falls in
    interval_hi FLOAT,
    rank INTEGER NOT NULL,             -- 1 is the strongest (top), the most negative (bottom), else sample order
    context_id BIGINT NOT NULL,
    max_position INTEGER NOT NULL,     -- 0-based index of the context's max token (its min, for bottom examples)
    max_activation FLOAT NOT NULL,     -- the context's max activation (its min, for bottom examples)
    -- The per-token activations, one per token of the context, in one of two forms (store/encoding.py): 16-bit
    -- codes on a grid of |max_activation| / activations_levels per step, which the examples view decodes, or,
    -- for an example the grid cannot hold (a NaN or infinity, a max of zero, ...), the float32 values themselves.
    activations_q SMALLINT[],          -- round(activation / step); NULL when activations_exact holds them
    activations_levels SMALLINT,       -- steps from 0 to |max_activation| (1,024..32,767); NULL likewise
    activations_exact FLOAT[]          -- the activations as harvested; NULL when activations_q holds them
);

CREATE TABLE t_logits (
    model VARCHAR NOT NULL,
    source VARCHAR NOT NULL,
    layer INTEGER NOT NULL,
    unit INTEGER NOT NULL,
    polarity VARCHAR NOT NULL,         -- 'top' (promoted) | 'bottom' (suppressed)
    rank INTEGER NOT NULL,
    token_id INTEGER NOT NULL,
    effect FLOAT NOT NULL              -- logit of the token for the unit's output direction, see docs/harvest.md
);

CREATE TABLE t_vocabulary (
    model VARCHAR NOT NULL,
    token_id INTEGER NOT NULL,
    token VARCHAR NOT NULL,            -- display string (only tokens some table refers to)
    PRIMARY KEY (model, token_id)
);

CREATE TABLE t_contexts (
    context_id BIGINT PRIMARY KEY,
    document_id BIGINT NOT NULL,
    start_token INTEGER NOT NULL,      -- offset of the context's first text token in its document
    token_ids INTEGER[] NOT NULL,
    tokens VARCHAR[] NOT NULL          -- display strings, whitespace kept as is
);

CREATE TABLE t_documents (
    document_id BIGINT PRIMARY KEY,
    name VARCHAR NOT NULL,             -- file (and line, for .jsonl / row for .parquet) it came from
    n_tokens BIGINT NOT NULL
);

CREATE VIEW runs AS SELECT * FROM t_runs;
CREATE VIEW sources AS SELECT * FROM t_sources;
CREATE VIEW units AS
    SELECT model, source, layer, unit, max_activation, min_activation,
           n_firing / nullif(n_tokens, 0) AS frequency, n_examples
    FROM t_units;
CREATE VIEW statistics AS
    SELECT model, source, layer, unit, n_tokens, n_firing, n_firing / nullif(n_tokens, 0) AS frequency,
           sum_activation / nullif(n_tokens, 0) AS mean,
           sqrt(greatest(sum_squares / nullif(n_tokens, 0) - (sum_activation / nullif(n_tokens, 0)) ^ 2, 0)) AS std,
           min_activation, max_activation
    FROM t_units;
-- Histogram bins: 0 holds exact zeros; bin b > 0 holds positive activations, b < 0 the mirror-image negatives.
-- |b| = 1 is (0, 2^-16); |b| = 2..129 split [2^-16, 2^16) into 4 bins an octave with edges 2^e * (1, 1.25,
-- 1.5, 1.75); |b| = 130 is [2^16, inf). `lo`/`hi` give the edges by absolute value, `sign` the side.
CREATE VIEW histograms AS
    WITH flat AS (SELECT model, source, layer, unit, unnest(bins) AS bin, unnest(counts) AS count FROM t_histograms)
    SELECT model, source, layer, unit, bin, sign(bin) AS sign,
           CASE WHEN abs(bin) <= 1 THEN 0.0
                ELSE 2.0 ^ ((abs(bin) - 2) // 4 - 16) * (1 + ((abs(bin) - 2) % 4) / 4) END AS lo,
           CASE WHEN bin = 0 THEN 0.0 WHEN abs(bin) = 1 THEN 2.0 ^ -16 WHEN abs(bin) = 130 THEN 'inf'::DOUBLE
                ELSE 2.0 ^ ((abs(bin) - 1) // 4 - 16) * (1 + ((abs(bin) - 1) % 4) / 4) END AS hi,
           count
    FROM flat;
-- activations: decoded, as float32, from the grid (see t_examples): within half a step of the harvested value,
-- the max (min) itself exact; or the stored float32 values.
CREATE VIEW examples AS
    SELECT model, source, layer, unit, example_kind, interval_lo, interval_hi, rank, context_id, max_position,
           max_activation,
           coalesce(activations_exact, list_transform(activations_q, lambda q:
               (q * (abs(max_activation::DOUBLE) / activations_levels))::FLOAT)) AS activations
    FROM t_examples;
CREATE VIEW logit_effects AS
    SELECT l.model, l.source, l.layer, l.unit, l.polarity, l.rank, l.token_id, v.token, l.effect
    FROM t_logits l LEFT JOIN t_vocabulary v USING (model, token_id);
CREATE VIEW contexts AS SELECT * FROM t_contexts;
CREATE VIEW documents AS SELECT * FROM t_documents;

-- Explanations: what a person or an explainer model wrote about a unit, loaded by `featureatlas annotate` (a unit
-- may have several). It was added to version 2 without changing the version: annotate runs this part, from this
-- comment to the end marker, on stores written before it (store/schema.py's EXPLANATIONS_SQL): IF NOT EXISTS.
CREATE TABLE IF NOT EXISTS t_explanations (
    model VARCHAR NOT NULL,
    source VARCHAR NOT NULL,
    layer INTEGER NOT NULL,
    unit INTEGER NOT NULL,
    text VARCHAR NOT NULL,             -- verbatim from the input (untrusted: escape it wherever it is shown)
    score DOUBLE,                      -- how well the explanation predicts the unit, as the input gives it; NULL: none
    score_kind VARCHAR,                -- what the score measures, e.g. 'delphi detection accuracy'; NULL: unknown
    author VARCHAR,                    -- who or what wrote it: --author, the input's author, or the explainer model
    file VARCHAR NOT NULL,             -- name of the file (or delphi folder) it was loaded from; --replace matches it
    added_at TIMESTAMP NOT NULL        -- when annotate loaded it (UTC)
);
CREATE VIEW IF NOT EXISTS explanations AS
    SELECT model, source, layer, unit, text, score, score_kind, author, file, added_at FROM t_explanations;
-- End of explanations.

-- Neighbours: each unit's most similar units of the same model, by weights (cosine of decoder rows, encoder
-- columns, or a neuron's row of the MLP output projection) or by firing on the same tokens (Jaccard index over
-- counted tokens, dictionary features only; fewer than k where a feature fires with fewer others). Within a source
-- but for 'decoder_across' (harvest --neighbours-across): a dictionary feature's nearest features in the other
-- dictionaries of the same width, by decoder cosine, other_source and other_layer naming where each is. Written by
-- harvest; stores written before it have none (the table and view are then absent). A merge keeps all but the
-- co-occurrence rows (store/merge.py).
CREATE TABLE IF NOT EXISTS t_neighbours (
    model VARCHAR NOT NULL,
    source VARCHAR NOT NULL,
    layer INTEGER NOT NULL,
    unit INTEGER NOT NULL,
    kind VARCHAR NOT NULL,             -- 'decoder' | 'encoder' | 'output' | 'cooccurrence' | 'decoder_across'
    rank INTEGER NOT NULL,             -- 1 = the most similar
    other_source VARCHAR NOT NULL,
    other_layer INTEGER NOT NULL,
    other_unit INTEGER NOT NULL,
    score FLOAT NOT NULL               -- cosine similarity, or Jaccard index
);
CREATE VIEW IF NOT EXISTS neighbours AS
    SELECT model, source, layer, unit, kind, rank, other_source, other_layer, other_unit, score FROM t_neighbours;

-- Layout: a 2-D map of a source's units (UMAP over the cosine of their directions, harvest/layout.py): units
-- whose directions are alike lie close. Written by harvest; stores written before it have none (the table and
-- view are then absent).
CREATE TABLE IF NOT EXISTS t_layout (
    model VARCHAR NOT NULL,
    source VARCHAR NOT NULL,
    layer INTEGER NOT NULL,
    unit INTEGER NOT NULL,
    x FLOAT NOT NULL,
    y FLOAT NOT NULL,
    kind VARCHAR NOT NULL              -- the directions it was computed from: 'decoder' | 'output'
);
CREATE VIEW IF NOT EXISTS map AS SELECT model, source, layer, unit, x, y, kind FROM t_layout;

-- Ablations: for each unit's top examples, what removing the unit's contribution at the example's max token does to
-- the tokens after it (harvest/ablation.py). Filled by `harvest --ablation-effects` (empty otherwise); stores
-- written before it lack the table and view.
CREATE TABLE IF NOT EXISTS t_ablations (
    model VARCHAR NOT NULL,
    source VARCHAR NOT NULL,
    layer INTEGER NOT NULL,
    unit INTEGER NOT NULL,
    context_id BIGINT NOT NULL,        -- the top example's context
    position INTEGER NOT NULL,         -- the position ablated: the example's max_position
    effects FLOAT[] NOT NULL           -- [i]: change in log p(the token at position + 1 + i), ablated minus as run
);
CREATE VIEW IF NOT EXISTS ablations AS
    SELECT model, source, layer, unit, context_id, position, effects FROM t_ablations;

-- Attributions: for the examples of attention heads (source 'attn') and of dictionaries on blocks.L.attn.hook_z,
-- what each earlier position of the context contributed at the example's max token (harvest/attention.py). One
-- row per (unit, context, max token): join it to `examples` on (model, source, layer, unit, context_id,
-- max_position = position). The arrays cover positions 0..position (causal attention gives later ones nothing).
-- Written by harvest; stores written before it have none (the table and view are then absent).
CREATE TABLE IF NOT EXISTS t_attributions (
    model VARCHAR NOT NULL,
    source VARCHAR NOT NULL,
    layer INTEGER NOT NULL,
    unit INTEGER NOT NULL,
    context_id BIGINT NOT NULL,
    position INTEGER NOT NULL,         -- the query token: the example's max_position
    kind VARCHAR NOT NULL,             -- 'head' | 'dictionary'
    weights FLOAT[],                   -- heads: the attention weights from `position` to each position; else NULL
    shares FLOAT[] NOT NULL,           -- heads: weight x ||v_h(s) W_O[h]||, each position's share of the write;
                                       -- dictionaries: each position's direct feature attribution
    constant FLOAT                     -- dictionaries: the pre-activation's part no position carries; else NULL
);
CREATE VIEW IF NOT EXISTS attributions AS
    SELECT model, source, layer, unit, context_id, position, kind, weights, shares, constant FROM t_attributions;
