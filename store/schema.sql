-- featureatlas store, schema version 1.
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
    layers INTEGER[] NOT NULL,
    batch_size INTEGER NOT NULL,
    dtype VARCHAR NOT NULL,
    device VARCHAR NOT NULL,
    bos_token VARCHAR,                 -- NULL when the tokenizer has none
    bos_excluded BOOLEAN NOT NULL,     -- the BOS position never counts as a context's max
    settings JSON NOT NULL,            -- every harvest option, as given
    versions JSON NOT NULL,            -- library versions
    started_at TIMESTAMP NOT NULL,
    finished_at TIMESTAMP NOT NULL,
    tokens_per_second DOUBLE NOT NULL
);

CREATE TABLE t_sources (
    model VARCHAR NOT NULL,
    source VARCHAR NOT NULL,           -- 'mlp' for MLP neurons
    layer INTEGER NOT NULL,
    n_units INTEGER NOT NULL,
    hook VARCHAR NOT NULL,             -- module path and what is read there
    PRIMARY KEY (model, source, layer)
);

CREATE TABLE t_units (
    model VARCHAR NOT NULL,
    source VARCHAR NOT NULL,
    layer INTEGER NOT NULL,
    unit INTEGER NOT NULL,
    max_activation FLOAT,              -- NULL when no context was seen
    n_examples INTEGER NOT NULL
);

CREATE TABLE t_examples (
    model VARCHAR NOT NULL,
    source VARCHAR NOT NULL,
    layer INTEGER NOT NULL,
    unit INTEGER NOT NULL,
    rank INTEGER NOT NULL,             -- 1 is the strongest
    context_id BIGINT NOT NULL,
    max_position INTEGER NOT NULL,     -- 0-based index into the context's tokens
    max_activation FLOAT NOT NULL,
    activations FLOAT[] NOT NULL       -- one per token of the context
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
CREATE VIEW units AS SELECT * FROM t_units;
CREATE VIEW examples AS SELECT * FROM t_examples;
CREATE VIEW contexts AS SELECT * FROM t_contexts;
CREATE VIEW documents AS SELECT * FROM t_documents;
