"""Numbered schema migrations; `migrate(con)` applies the missing ones and is safe to call at any time.

Add a migration by appending a (version, name, sql) entry; never edit one that has shipped.
"""

from __future__ import annotations

import duckdb

M001_CORE = """
CREATE TABLE datasets (
    name        VARCHAR PRIMARY KEY,
    kind        VARCHAR NOT NULL,            -- absolute | pairwise
    created_at  TIMESTAMP NOT NULL DEFAULT current_timestamp
);

CREATE TABLE imports (
    import_id   VARCHAR PRIMARY KEY,
    dataset     VARCHAR NOT NULL,
    source      VARCHAR NOT NULL,
    preset      VARCHAR,
    source_rows BIGINT,
    inserted    BIGINT,
    existing    BIGINT,
    skipped     VARCHAR,                     -- JSON list of {row, reason}
    imported_at TIMESTAMP NOT NULL DEFAULT current_timestamp
);

CREATE TABLE items (
    item_id            BIGINT PRIMARY KEY,   -- 60 bits of hash(dataset, content): re-imports are no-ops
    content_hash       VARCHAR NOT NULL,
    dataset            VARCHAR NOT NULL,
    split              VARCHAR NOT NULL,     -- train | eval
    kind               VARCHAR NOT NULL,     -- absolute | pairwise
    instruction        VARCHAR NOT NULL,
    response           VARCHAR NOT NULL,
    response_b         VARCHAR,
    label              VARCHAR,              -- A | B | tie (pairwise)
    reference          VARCHAR,
    criteria           VARCHAR,
    score1_description VARCHAR,
    score2_description VARCHAR,
    score3_description VARCHAR,
    score4_description VARCHAR,
    score5_description VARCHAR,
    gold_score         DOUBLE,
    gold_scores        VARCHAR,              -- JSON list when the source had several
    gold_feedback      VARCHAR,
    source_row         BIGINT,
    meta               VARCHAR,
    imported_at        TIMESTAMP NOT NULL DEFAULT current_timestamp
);

CREATE TABLE runs (
    run_id      VARCHAR PRIMARY KEY,
    kind        VARCHAR NOT NULL,            -- loop | evaluate
    config      VARCHAR NOT NULL,            -- resolved config, JSON
    status      VARCHAR NOT NULL,            -- pending | running | done | failed | cancelled
    run_dir     VARCHAR,
    pid         INTEGER,
    error       VARCHAR,
    created_at  TIMESTAMP NOT NULL DEFAULT current_timestamp,
    updated_at  TIMESTAMP NOT NULL DEFAULT current_timestamp,
    finished_at TIMESTAMP
);

-- Iteration 0 is the seed (evaluate only); iteration k samples with model k-1 and trains checkpoint k.
CREATE TABLE iterations (
    run_id          VARCHAR NOT NULL,
    iteration       INTEGER NOT NULL,
    sampler_model   VARCHAR,
    checkpoint      VARCHAR,
    sample_status   VARCHAR NOT NULL DEFAULT 'pending',   -- pending | running | done | failed | skipped
    curate_status   VARCHAR NOT NULL DEFAULT 'pending',
    train_status    VARCHAR NOT NULL DEFAULT 'pending',
    evaluate_status VARCHAR NOT NULL DEFAULT 'pending',
    curate_report   VARCHAR,                              -- JSON
    train_metrics   VARCHAR,                              -- JSON
    updated_at      TIMESTAMP NOT NULL DEFAULT current_timestamp,
    PRIMARY KEY (run_id, iteration)
);

CREATE TABLE judgments (
    judgment_id       BIGINT PRIMARY KEY,   -- hash of run/iteration/purpose/item/side/sample: a resume never duplicates
    run_id            VARCHAR NOT NULL,
    iteration         INTEGER NOT NULL,
    purpose           VARCHAR NOT NULL,     -- train | eval
    item_id           BIGINT NOT NULL,
    side              VARCHAR NOT NULL,     -- a | b (b = response_b of a pairwise item)
    sample_index      INTEGER NOT NULL,
    model             VARCHAR NOT NULL,
    temperature       DOUBLE,
    top_p             DOUBLE,
    max_new_tokens    INTEGER,
    seed              BIGINT,
    raw_text          VARCHAR,              -- what the model wrote freely
    text              VARCHAR,              -- raw_text plus a forced " [RESULT] k" when forced
    rationale         VARCHAR,
    score             INTEGER,              -- NULL when no score could be read (and none was forced)
    parse_status      VARCHAR NOT NULL,     -- ok | no_score | out_of_range | truncated | ambiguous
    forced            BOOLEAN NOT NULL DEFAULT false,
    p1 DOUBLE, p2 DOUBLE, p3 DOUBLE, p4 DOUBLE, p5 DOUBLE,  -- P(score = k) at the score position
    prompt_tokens     INTEGER,
    completion_tokens INTEGER,
    latency_s         DOUBLE,
    created_at        TIMESTAMP NOT NULL DEFAULT current_timestamp
);

-- What curation produced: immutable, and slim so 100k+ pairs are written in a tenth of a second.
CREATE TABLE pairs (
    pair_id     BIGINT NOT NULL,             -- hash of (chosen_id, rejected_id): unique by construction
    run_id      VARCHAR NOT NULL,
    iteration   INTEGER NOT NULL,
    item_id     BIGINT NOT NULL,
    chosen_id   BIGINT NOT NULL,
    rejected_id BIGINT NOT NULL,
    strategy    VARCHAR NOT NULL,
    params      VARCHAR,                     -- JSON
    margin      DOUBLE
);

-- A human's latest decision on a pair (no row = status auto). Every change is also in audit_log.
CREATE TABLE pair_reviews (
    pair_id          BIGINT PRIMARY KEY,
    run_id           VARCHAR NOT NULL,
    iteration        INTEGER NOT NULL,
    status           VARCHAR NOT NULL,       -- accepted | rejected | swapped | edited
    swapped          BOOLEAN NOT NULL DEFAULT false,  -- chosen and rejected exchanged
    edited_rationale VARCHAR,                -- the chosen side as a human rewrote it
    edited_score     INTEGER,
    note             VARCHAR,
    updated_by       VARCHAR NOT NULL,
    updated_at       TIMESTAMP NOT NULL
);

CREATE TABLE evaluations (
    run_id     VARCHAR NOT NULL,
    iteration  INTEGER NOT NULL,
    dataset    VARCHAR NOT NULL,
    metric     VARCHAR NOT NULL,
    value      DOUBLE,
    created_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
    PRIMARY KEY (run_id, iteration, dataset, metric)
);

-- Append-only: every human action on a pair, with the row before and after.
CREATE SEQUENCE audit_seq;
CREATE TABLE audit_log (
    audit_id  BIGINT PRIMARY KEY DEFAULT nextval('audit_seq'),
    created_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
    who       VARCHAR NOT NULL,
    action    VARCHAR NOT NULL,
    pair_id   BIGINT,
    run_id    VARCHAR,
    iteration INTEGER,
    before    VARCHAR,                     -- JSON
    after     VARCHAR,                     -- JSON
    note      VARCHAR
);
"""

M002_METHOD = """
-- Relative (A/B) judgments: side 'ab' (A = response) or 'ba' (A = response_b); the verdict as written.
ALTER TABLE judgments ADD COLUMN verdict VARCHAR;

-- A meta-judge's rating (1-5) of one judgment's rationale (meta curation, best-of-N).
CREATE TABLE meta_ratings (
    judgment_id   BIGINT NOT NULL,              -- the judgment rated
    rater_model   VARCHAR NOT NULL,
    run_id        VARCHAR NOT NULL,
    iteration     INTEGER NOT NULL,
    rating        INTEGER,                      -- NULL when nothing could be read (and none was forced)
    text          VARCHAR,
    parse_status  VARCHAR NOT NULL,
    forced        BOOLEAN NOT NULL DEFAULT false,
    p1 DOUBLE, p2 DOUBLE, p3 DOUBLE, p4 DOUBLE, p5 DOUBLE,
    created_at    TIMESTAMP NOT NULL DEFAULT current_timestamp,
    PRIMARY KEY (judgment_id, rater_model)
);

-- Metrics per group of items (rubric, capability, RewardBench section), per evaluation method.
CREATE TABLE evaluation_breakdowns (
    run_id      VARCHAR NOT NULL,
    iteration   INTEGER NOT NULL,
    dataset     VARCHAR NOT NULL,
    method      VARCHAR NOT NULL,               -- greedy | relative | self-consistency-mean | ...
    group_by    VARCHAR NOT NULL,               -- rubric | capability | section | ...
    group_value VARCHAR NOT NULL,
    metric      VARCHAR NOT NULL,
    value       DOUBLE,
    PRIMARY KEY (run_id, iteration, dataset, method, group_by, group_value, metric)
);

-- Run-level reports (contamination check, seed SFT data ...), JSON by name.
CREATE TABLE run_reports (
    run_id     VARCHAR NOT NULL,
    name       VARCHAR NOT NULL,
    report     VARCHAR NOT NULL,
    created_at TIMESTAMP NOT NULL DEFAULT current_timestamp,
    PRIMARY KEY (run_id, name)
);
"""

# Items gain the text a task works on (`input`, the Alpaca / Self-Instruct layout) and the hash of their
# content without gold (`content_key`: two rows with one key and two golds are a conflict); imports keep their
# split and full report. Rows imported before M003 have no content_key and are never flagged as conflicts.
M003_IMPORTS = """
ALTER TABLE items ADD COLUMN input VARCHAR;
ALTER TABLE items ADD COLUMN content_key VARCHAR;
ALTER TABLE imports ADD COLUMN split VARCHAR;
ALTER TABLE imports ADD COLUMN report VARCHAR;
"""

# Each judgment records the precision its sampler computed in (`precision: auto` follows the hardware, so two
# runs of one config can differ), and the iteration the precision of the checkpoint it trained.
M004_PRECISION = """
ALTER TABLE judgments ADD COLUMN precision VARCHAR;
ALTER TABLE iterations ADD COLUMN train_precision VARCHAR;
"""

# DPO without a reference pass: each judgment's log-probability under the model that sampled it (the
# unmodified distribution: before temperature / top-p / repetition penalty, forced tokens included), summed
# over the completion tokens exactly as the DPO trainer tokenizes them, end-of-turn tail included; NULL when
# the sampler could not score them (the fake sampler, vLLM without prompt log-probs).
M005_REF_LOGP = """
ALTER TABLE judgments ADD COLUMN ref_logp DOUBLE;
ALTER TABLE judgments ADD COLUMN ref_tokens INTEGER;
"""

# GRPO rollouts (purpose 'rollout'): the reward the trainer gave the judgment, the optimizer step it was
# generated for (1-based) and its prompt's generation group within that step (0-based); NULL for every other
# purpose.
M006_ROLLOUTS = """
ALTER TABLE judgments ADD COLUMN reward DOUBLE;
ALTER TABLE judgments ADD COLUMN step INTEGER;
ALTER TABLE judgments ADD COLUMN group_index INTEGER;
"""

MIGRATIONS: list[tuple[int, str, str]] = [
    (1, "core", M001_CORE),
    (2, "method", M002_METHOD),
    (3, "imports", M003_IMPORTS),
    (4, "precision", M004_PRECISION),
    (5, "ref_logp", M005_REF_LOGP),
    (6, "rollouts", M006_ROLLOUTS),
]

LATEST = MIGRATIONS[-1][0]


def applied_versions(con: duckdb.DuckDBPyConnection) -> set[int]:
    con.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INTEGER PRIMARY KEY, name VARCHAR NOT NULL,"
        " applied_at TIMESTAMP NOT NULL DEFAULT current_timestamp)"
    )
    return {v for (v,) in con.execute("SELECT version FROM schema_migrations").fetchall()}


def migrate(con: duckdb.DuckDBPyConnection) -> list[int]:
    """Apply pending migrations in order, each in its own transaction; returns the versions applied."""
    done = applied_versions(con)
    applied = []
    for version, name, sql in MIGRATIONS:
        if version in done:
            continue
        con.begin()
        try:
            con.execute(sql)
            con.execute("INSERT INTO schema_migrations (version, name) VALUES (?, ?)", [version, name])
            con.commit()
        except BaseException:
            con.rollback()
            raise
        applied.append(version)
    return applied
