"""The app's read queries: small Polars frames (or dicts) computed in DuckDB.

Every function takes a `Store` first and leaves the work to SQL: filters, aggregates and LIMIT/OFFSET
pages run inside DuckDB, so a query never pulls a whole table into Python. On a workspace of 1M
judgments each answers in well under 300 ms on 2 cores (bench/app_scale.py), except a text search, which
must read every rationale once (~0.25 s per 1M). Functions that need several statements run them on one
connection (`_session`), since opening the file is the largest fixed cost (~40 ms).

Conventions: a gold score is rounded half up (`floor(gold + 0.5)`: engine.metrics.round_half_up in SQL); a
judgment "agrees" when its score equals the rounded gold and "disagrees" when it has a score that differs.
Pairs are read through `Store._PAIR_VIEW` (status coalesced to 'auto', chosen/rejected as a human swap
left them), never re-derived here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import polars as pl

from store.db import connect
from store.store import PAIR_STATUSES, STAGES, Store, StoreError

PARSE_STATUSES = ("ok", "no_score", "out_of_range", "truncated", "ambiguous")
AGREEMENTS = ("any", "agree", "disagree")
# Rounded half up: the same rule as engine.metrics.round_half_up, spelled in SQL because the store may not
# import the engine (tests/test_metrics.py checks that the two agree on the .5 cases).
GOLD = "floor(i.gold_score + 0.5)"
PREVIEW_CHARS = 200


@dataclass(frozen=True)
class JudgmentFilter:
    """What the Judgments page filters on; None (or agreement 'any') means no condition."""

    run_id: str
    iteration: int | None = None          # None = all iterations
    purpose: str | None = None            # "train" | "eval"
    dataset: str | None = None
    gold: int | None = None               # round(gold_score) == gold
    score: int | None = None
    parse_status: str | None = None       # ok | no_score | out_of_range | truncated | ambiguous
    agreement: str = "any"                # any | agree (score == round(gold)) | disagree (scored and !=)
    text: str | None = None               # case-insensitive substring of rationale/raw_text or the instruction
    forced: bool | None = None


# ------------------------------------------------------------------------------------------ plumbing

@contextmanager
def _session(store: Store) -> Iterator[Any]:
    with connect(store.path, store.timeout_s) as con:
        yield con


def _frame(con, sql: str, params: list[Any] | None = None) -> pl.DataFrame:
    return con.sql(sql, params=params or None).pl()


def _scalar(con, sql: str, params: list[Any] | None = None) -> Any:
    rows = con.execute(sql, params or []).fetchall()  # fetch all: DuckDB 2 refuses new work mid-result
    return rows[0][0] if rows else None


def _page_bounds(page: int, page_size: int) -> tuple[int, int]:
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    return max(int(page), 0) * int(page_size), int(page_size)


def _like(text: str) -> str:
    """An ILIKE pattern matching `text` literally anywhere (see `_ilike`)."""
    if "%" in text or "_" in text:
        text = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{text}%"


def _ilike(text: str) -> str:
    """The ILIKE operator for `_like(text)`: with ESCAPE only when the text holds a wildcard, because an
    ESCAPE clause makes DuckDB's ILIKE three times slower (and without one, a backslash is literal)."""
    return "ILIKE ? ESCAPE '\\'" if "%" in text or "_" in text else "ILIKE ?"


PAIRS = Store._PAIR_VIEW  # pairs as a human left them: status coalesced to 'auto', swaps applied


# ------------------------------------------------------------------------------------------ runs

def runs_overview(store: Store) -> pl.DataFrame:
    """One row per run (oldest first): run_id, kind, status, created_at, updated_at, error, iterations,
    last_iteration and the four stage statuses of its last iteration (sample_status ... evaluate_status)."""
    stages = ", ".join(f"l.{s}_status" for s in STAGES)
    return store._read(
        "WITH counts AS (SELECT run_id, count(*) AS iterations, max(iteration) AS last_iteration"
        " FROM iterations GROUP BY run_id)"
        f" SELECT r.run_id, r.kind, r.status, r.created_at, r.updated_at, r.error,"
        f" coalesce(c.iterations, 0) AS iterations, c.last_iteration, {stages}"
        " FROM runs r LEFT JOIN counts c USING (run_id)"
        " LEFT JOIN iterations l ON l.run_id = r.run_id AND l.iteration = c.last_iteration"
        " ORDER BY r.created_at, r.run_id"
    )


def iterations_table(store: Store, run_id: str) -> pl.DataFrame:
    """Per iteration: iteration, sampler_model, checkpoint, the four stage statuses, train_judgments,
    eval_judgments, parse_rate (share of the iteration's judgments that parsed 'ok'; null without any)
    and pairs (all curated pairs, whatever their review status)."""
    stages = ", ".join(f"it.{s}_status" for s in STAGES)
    return store._read(
        "WITH j AS (SELECT iteration, count(*) FILTER (WHERE purpose = 'train') AS train_judgments,"
        " count(*) FILTER (WHERE purpose = 'eval') AS eval_judgments,"
        " count(*) FILTER (WHERE parse_status = 'ok') / count(*) AS parse_rate"
        " FROM judgments WHERE run_id = ? GROUP BY iteration),"
        " p AS (SELECT iteration, count(*) AS pairs FROM pairs WHERE run_id = ? GROUP BY iteration)"
        f" SELECT it.iteration, it.sampler_model, it.checkpoint, {stages},"
        " coalesce(j.train_judgments, 0) AS train_judgments, coalesce(j.eval_judgments, 0) AS eval_judgments,"
        " j.parse_rate, coalesce(p.pairs, 0) AS pairs"
        " FROM iterations it LEFT JOIN j USING (iteration) LEFT JOIN p USING (iteration)"
        " WHERE it.run_id = ? ORDER BY it.iteration",
        [run_id, run_id, run_id],
    )


def metrics_long(store: Store, run_id: str) -> pl.DataFrame:
    """iteration, dataset, metric, value: one row per stored evaluation metric (for line charts)."""
    return store._read(
        "SELECT iteration, dataset, metric, value FROM evaluations WHERE run_id = ?"
        " ORDER BY dataset, metric, iteration", [run_id])


def pair_counts(store: Store, run_id: str, iteration: int | None = None) -> pl.DataFrame:
    """iteration, status, n for every status in PAIR_STATUSES (in that order), zeros included: for
    `iteration`, or else for every iteration that has pairs or a finished curate stage."""
    statuses = ", ".join(f"('{s}', {k})" for k, s in enumerate(PAIR_STATUSES))
    if iteration is None:
        its = ("SELECT DISTINCT iteration FROM v UNION"
               " SELECT iteration FROM iterations WHERE run_id = ? AND curate_status = 'done'")
        cond, params = "run_id = ?", [run_id, run_id]
    else:
        its, cond, params = "SELECT ?::INTEGER AS iteration", "run_id = ? AND iteration = ?", \
            [run_id, int(iteration), int(iteration)]
    return store._read(
        f"WITH v AS (SELECT iteration, status FROM ({PAIRS}) WHERE {cond}), its AS ({its}),"
        f" st(status, ord) AS (VALUES {statuses}),"
        " n AS (SELECT iteration, status, count(*) AS n FROM v GROUP BY ALL)"
        " SELECT its.iteration, st.status, coalesce(n.n, 0) AS n FROM its CROSS JOIN st"
        " LEFT JOIN n ON n.iteration = its.iteration AND n.status = st.status ORDER BY its.iteration, st.ord",
        params,
    )


# ------------------------------------------------------------------------------------------ judgments

def _judgment_where(f: JudgmentFilter) -> tuple[str, list[Any], bool]:
    """(conditions over judgments `j` [and items `i`], params, whether they need `i` joined).

    Only gold and agreement need the item joined row by row; dataset and instruction text are semi-joins
    on the (smaller) items table."""
    if f.agreement not in AGREEMENTS:
        raise ValueError(f"agreement must be one of {AGREEMENTS}, got {f.agreement!r}")
    conds, params, needs_items = ["j.run_id = ?"], [f.run_id], False
    for column, value, kind in (("iteration", f.iteration, int), ("purpose", f.purpose, str),
                                ("score", f.score, int), ("parse_status", f.parse_status, str),
                                ("forced", f.forced, bool)):
        if value is not None:
            conds.append(f"j.{column} = ?")
            params.append(kind(value))  # plain Python values: a widget may hand over numpy scalars
    if f.dataset is not None:
        conds.append("j.item_id IN (SELECT item_id FROM items WHERE dataset = ?)")
        params.append(f.dataset)
    if f.gold is not None:
        conds.append(f"{GOLD} = ?")
        params.append(int(f.gold))
        needs_items = True
    if f.agreement == "agree":
        conds.append(f"j.score = {GOLD}")
        needs_items = True
    elif f.agreement == "disagree":
        conds.append(f"j.score <> {GOLD}")  # NULL on either side is neither agree nor disagree
        needs_items = True
    if f.text:
        like = _ilike(f.text)
        # The rationale is a stripped prefix of raw_text, so it needs its own (costly) scan only where
        # raw_text is missing; this halves a text search over 1M judgments.
        conds.append(f"(j.raw_text {like} OR (j.raw_text IS NULL AND j.rationale {like})"
                     f" OR j.item_id IN (SELECT item_id FROM items WHERE instruction {like}))")
        params += [_like(f.text)] * 3
    return " AND ".join(conds), params, needs_items


# Judgments are paged through buckets of item_id (the top bits of a 60-bit content hash: ~1024 even
# buckets): one pass counts the matches per (iteration, bucket), which gives the total and says which
# buckets hold the requested page, and the page query then sorts only those buckets. A plain ORDER BY ...
# OFFSET keeps a heap of `offset` rows (0.4 s at page 10,000 of 1M) and would need a second full pass for
# the count. A text filter is evaluated once: its matches' keys go to a temporary table that both passes
# read, since re-scanning every rationale is the one costly step (~0.25 s per 1M).
_BUCKET_SHIFT = 50
_MATCH_KEYS = "j.judgment_id, j.iteration, j.item_id, j.side, j.sample_index"


def judgments_page(store: Store, f: JudgmentFilter, page: int = 0,
                   page_size: int = 50) -> tuple[pl.DataFrame, int]:
    """One page of judgments under `f`, ordered by iteration, item_id, side, sample_index, and the total
    count under `f`. Columns: judgment_id, iteration, purpose, item_id, dataset, side, sample_index, score,
    gold_score, parse_status, forced, rationale_preview (first 200 chars of the rationale), expected_score
    (sum k * p_k, null when the probabilities are missing). A page past the end is empty."""
    where, params, needs_items = _judgment_where(f)
    offset, limit = _page_bounds(page, page_size)
    matches = (f"SELECT {_MATCH_KEYS} FROM judgments j"
               + (" JOIN items i ON i.item_id = j.item_id" if needs_items else "") + f" WHERE {where}")
    bucket = f"(m.item_id >> {_BUCKET_SHIFT})"
    with _session(store) as con:
        if f.text:
            # Temporary tables live in memory and vanish with the connection; the file is not written.
            con.execute(f"CREATE TEMP TABLE matches AS {matches}", params).fetchall()
            source, params = "matches m", []
        else:
            source = f"({matches}) m"
        counts = con.execute(f"SELECT m.iteration, {bucket} AS b, count(*) FROM {source}"
                             " GROUP BY ALL ORDER BY 1, 2", params).fetchall()
        total = sum(n for _, _, n in counts)
        span = _bucket_span(counts, offset, limit)
        if span is None:
            return _page_rows(con, []), total
        (it0, b0), (it1, b1), skip = span
        if it0 == it1:
            in_span, span_params = f"m.iteration = ? AND {bucket} BETWEEN ? AND ?", [it0, b0, b1]
        else:
            in_span = (f"((m.iteration = ? AND {bucket} >= ?) OR (m.iteration > ? AND m.iteration < ?)"
                       f" OR (m.iteration = ? AND {bucket} <= ?))")
            span_params = [it0, b0, it0, it1, it1, b1]
        ids = con.execute(f"SELECT m.judgment_id FROM {source} WHERE {in_span}"
                           f" ORDER BY m.iteration, m.item_id, m.side, m.sample_index LIMIT {limit} OFFSET {skip}",
                           params + span_params).fetchall()
        return _page_rows(con, [r[0] for r in ids]), total


def _bucket_span(counts: list[tuple[int, int, int]], offset: int, limit: int):
    """((iteration, bucket) of the first and of the last bucket holding rows offset .. offset+limit-1 of the
    sorted matches, rows to skip inside the first), or None when the page is past the end."""
    seen, first, skip = 0, None, 0
    for it, b, n in counts:
        if first is None and seen + n > offset:
            first, skip = (it, b), offset - seen
        seen += n
        if first is not None and seen >= offset + limit:
            return first, (it, b), skip
    return (first, (counts[-1][0], counts[-1][1]), skip) if first is not None else None


def _page_rows(con, ids: list[int]) -> pl.DataFrame:
    """The page's columns for these judgments. Both lookups use literal primary keys, so DuckDB reads
    them through its index (a join or a row-id list would scan every rationale of the table)."""
    js = _frame(
        con,
        "SELECT judgment_id, iteration, purpose, item_id, side, sample_index, score, parse_status, forced,"
        f" left(coalesce(rationale, raw_text), {PREVIEW_CHARS}) AS rationale_preview,"
        " p1 + 2 * p2 + 3 * p3 + 4 * p4 + 5 * p5 AS expected_score"
        f" FROM judgments WHERE judgment_id IN ({_id_list(ids)})",
    )
    items = _frame(con, "SELECT item_id, dataset, gold_score FROM items"
                        f" WHERE item_id IN ({_id_list(js['item_id'].to_list())})")
    return (js.join(items, on="item_id", how="left")
            .sort("iteration", "item_id", "side", "sample_index")
            .select("judgment_id", "iteration", "purpose", "item_id", "dataset", "side", "sample_index", "score",
                    "gold_score", "parse_status", "forced", "rationale_preview", "expected_score"))


def _id_list(ids) -> str:
    """Integer ids as a SQL list (ints only, so splicing them is safe); NULL for none (matches nothing)."""
    return ", ".join(str(int(x)) for x in sorted(set(ids))) or "NULL"


def judgment_datasets(store: Store, run_id: str) -> list[str]:
    """Datasets with at least one judgment in the run, sorted (the Judgments page's dataset select)."""
    frame = store._read(
        "SELECT DISTINCT i.dataset FROM items i WHERE i.item_id IN"
        " (SELECT DISTINCT item_id FROM judgments WHERE run_id = ?) ORDER BY i.dataset", [run_id])
    return frame["dataset"].to_list()


def item_detail(store: Store, item_id: int) -> dict:
    """Every column of one item; an empty dict when there is no such item."""
    rows = store._rows("SELECT * FROM items WHERE item_id = ?", [int(item_id)])
    return rows[0] if rows else {}


def item_judgments(store: Store, run_id: str, item_id: int, iteration: int | None = None) -> pl.DataFrame:
    """All of one item's judgments in the run (every column, texts and p1..p5 included), ordered by
    iteration, side, sample_index."""
    sql, params = "SELECT * FROM judgments WHERE run_id = ? AND item_id = ?", [run_id, int(item_id)]
    if iteration is not None:
        sql += " AND iteration = ?"
        params.append(int(iteration))
    return store._read(sql + " ORDER BY iteration, side, sample_index", params)


def score_histogram(store: Store, run_id: str, purpose: str | None = None) -> pl.DataFrame:
    """iteration, score (null = unscored), n: how often each score was given, per iteration."""
    sql, params = "SELECT iteration, score, count(*) AS n FROM judgments WHERE run_id = ?", [run_id]
    if purpose:
        sql += " AND purpose = ?"
        params.append(purpose)
    return store._read(sql + " GROUP BY ALL ORDER BY iteration, score NULLS LAST", params)


def confusion(store: Store, run_id: str, iteration: int, purpose: str | None = None) -> pl.DataFrame:
    """gold (rounded half up), score, n over the iteration's scored judgments of items with a gold score."""
    sql = (f"SELECT {GOLD}::INTEGER AS gold, j.score, count(*) AS n FROM judgments j"
           " JOIN items i ON i.item_id = j.item_id"
           " WHERE j.run_id = ? AND j.iteration = ? AND j.score IS NOT NULL AND i.gold_score IS NOT NULL")
    params: list[Any] = [run_id, int(iteration)]
    if purpose:
        sql += " AND j.purpose = ?"
        params.append(purpose)
    return store._read(sql + " GROUP BY ALL ORDER BY gold, j.score", params)


# ------------------------------------------------------------------------------------------ pairs

def _pair_where(run_id: str, iteration: int, status: str | None) -> tuple[str, list[Any]]:
    if status is not None and status not in PAIR_STATUSES:
        raise StoreError(f"status must be one of {', '.join(PAIR_STATUSES)}, got {status!r}")
    where, params = "run_id = ? AND iteration = ?", [run_id, int(iteration)]
    if status:
        where += " AND status = ?"
        params.append(status)
    return where, params


def pairs_page(store: Store, run_id: str, iteration: int, status: str | None = None, page: int = 0,
               page_size: int = 20) -> tuple[pl.DataFrame, int]:
    """One page of the iteration's pairs (ordered by pair_id) as a human left them, and the total under
    the filter. Columns: pair_id, item_id, status, swapped, margin, note, updated_by, updated_at,
    chosen_id, rejected_id (after any swap), chosen_text, chosen_score, rejected_text, rejected_score,
    edited_rationale, edited_score, gold_score, instruction, response, reference, criteria, input."""
    where, params = _pair_where(run_id, iteration, status)
    offset, limit = _page_bounds(page, page_size)
    with _session(store) as con:
        total = int(_scalar(con, f"SELECT count(*) FROM ({PAIRS}) WHERE {where}", params))
        # Pick the page's ids first (a top-N of bare ids), then read its rows: carrying every column
        # through the top-N costs 0.4 s at page 5,000 of 200k pairs.
        ids = con.execute(f"SELECT pair_id FROM ({PAIRS}) WHERE {where} ORDER BY pair_id"
                          f" LIMIT {limit} OFFSET {offset}", params).fetchall()
        page_rows = _frame(con, f"SELECT * FROM ({PAIRS}) WHERE pair_id IN ({_id_list(r[0] for r in ids)})"
                                " AND run_id = ? AND iteration = ? ORDER BY pair_id", params[:2])
        # Judgment texts for this page only, fetched by primary key (literal ids let DuckDB use its index).
        jids = page_rows["chosen_id"].to_list() + page_rows["rejected_id"].to_list()
        texts = _frame(con, f"SELECT judgment_id, text, score FROM judgments WHERE judgment_id IN ({_id_list(jids)})")
        item_rows = _frame(con, "SELECT item_id, gold_score, instruction, response, reference, criteria, input"
                                " FROM items"
                                f" WHERE item_id IN ({_id_list(page_rows['item_id'].to_list())})")
    chosen = texts.rename({"judgment_id": "chosen_id", "text": "chosen_text", "score": "chosen_score"})
    rejected = texts.rename({"judgment_id": "rejected_id", "text": "rejected_text", "score": "rejected_score"})
    out = (page_rows.join(chosen, on="chosen_id", how="left").join(rejected, on="rejected_id", how="left")
           .join(item_rows, on="item_id", how="left").sort("pair_id"))
    columns = ["pair_id", "item_id", "status", "swapped", "margin", "note", "updated_by", "updated_at",
               "chosen_id", "rejected_id", "chosen_text", "chosen_score", "rejected_text", "rejected_score",
               "edited_rationale", "edited_score", "gold_score", "instruction", "response", "reference",
               "criteria", "input"]
    return out.select(columns), total


def pair_ids(store: Store, run_id: str, iteration: int, status: str | None = None) -> list[int]:
    """Every pair id under the filter, ordered (what a bulk accept/reject acts on)."""
    where, params = _pair_where(run_id, iteration, status)
    with _session(store) as con:
        ids = con.execute(f"SELECT pair_id FROM ({PAIRS}) WHERE {where} ORDER BY pair_id",
                          params).fetchnumpy()["pair_id"]
    return ids.tolist()  # via numpy: 200k ids in 40 ms, where Python tuples take 0.2 s


def audit_history(store: Store, run_id: str, iteration: int | None = None, pair_id: int | None = None,
                  limit: int = 200) -> pl.DataFrame:
    """The newest `limit` audit rows of the run (optionally one iteration or one pair), newest first:
    audit_id, created_at, who, action, pair_id, iteration, note, before, after (JSON text)."""
    sql, params = "SELECT audit_id, created_at, who, action, pair_id, iteration, note, before, after" \
                  " FROM audit_log WHERE run_id = ?", [run_id]
    if iteration is not None:
        sql += " AND iteration = ?"
        params.append(int(iteration))
    if pair_id is not None:
        sql += " AND pair_id = ?"
        params.append(int(pair_id))
    return store._read(sql + f" ORDER BY audit_id DESC LIMIT {max(int(limit), 0)}", params)


# ------------------------------------------------------------------------------------------ compare

def _compare_cte(run_id: str, a: int, b: int, purpose: str) -> tuple[str, list[Any]]:
    """CTE `judged`: per (item_id, side) with judgments in both iterations, score_a and score_b (means of
    the scored samples) and drift."""
    a, b = int(a), int(b)
    sql = ("WITH per AS (SELECT item_id, side,"
           " avg(score) FILTER (WHERE iteration = ?) AS score_a, avg(score) FILTER (WHERE iteration = ?) AS score_b,"
           " count(*) FILTER (WHERE iteration = ?) AS n_a, count(*) FILTER (WHERE iteration = ?) AS n_b"
           " FROM judgments WHERE run_id = ? AND purpose = ? AND iteration IN (?, ?) GROUP BY item_id, side),"
           " judged AS (SELECT *, score_b - score_a AS drift FROM per WHERE n_a > 0 AND n_b > 0)")
    return sql, [a, b, a, b, run_id, purpose, a, b]


def compare_iterations(store: Store, run_id: str, a: int, b: int, purpose: str = "eval", limit: int = 500,
                       offset: int = 0) -> pl.DataFrame:
    """Per (item_id, side) judged in both iterations: item_id, side, dataset, gold_score, score_a, score_b
    (mean over samples; null when none scored), drift = score_b - score_a, rationale_a, rationale_b (of
    sample 0) and instruction. Largest |drift| first (then item_id, side), `limit` rows from `offset`:
    `compare_summary` and `drift_histogram` cover all of them."""
    a, b = int(a), int(b)
    cte, params = _compare_cte(run_id, a, b, purpose)
    with _session(store) as con:
        page = _frame(con, f"{cte} SELECT item_id, side, score_a, score_b, drift FROM judged"
                           " ORDER BY abs(drift) DESC NULLS LAST, item_id, side"
                           f" LIMIT {max(int(limit), 0)} OFFSET {max(int(offset), 0)}", params)
        item_ids = _id_list(page["item_id"].to_list())
        # The page's first-sample rationales: a scan on cheap columns (run, purpose, iteration, item) reads
        # text only for matching rows, where a primary-key lookup of 1000 ids in a freshly opened file
        # spends 0.1-0.3 s loading the index.
        texts = _frame(con, "SELECT item_id, side, iteration, rationale FROM judgments WHERE run_id = ?"
                            " AND purpose = ? AND iteration IN (?, ?) AND sample_index = 0"
                            f" AND item_id IN ({item_ids})", [run_id, purpose, a, b])
        items = _frame(con, "SELECT item_id, dataset, gold_score, instruction FROM items"
                            f" WHERE item_id IN ({item_ids})")
    keys = ["item_id", "side"]
    side_a = texts.filter(pl.col("iteration") == a).select(*keys, rationale_a="rationale")
    side_b = texts.filter(pl.col("iteration") == b).select(*keys, rationale_b="rationale")
    return (page.with_row_index("_row").join(side_a, on=keys, how="left").join(side_b, on=keys, how="left")
            .join(items, on="item_id", how="left").sort("_row")
            .select("item_id", "side", "dataset", "gold_score", "score_a", "score_b", "drift", "rationale_a",
                    "rationale_b", "instruction"))


def compare_summary(store: Store, run_id: str, a: int, b: int, purpose: str = "eval") -> dict:
    """Over every (item, side) judged in both: items, mean_drift, mean_abs_drift, changed (|drift| > 0),
    up, down; for the headline numbers above the (paged) comparison table."""
    cte, params = _compare_cte(run_id, a, b, purpose)
    with _session(store) as con:
        row = con.execute(
            f"{cte} SELECT count(*), avg(drift), avg(abs(drift)), count(*) FILTER (WHERE drift <> 0),"
            " count(*) FILTER (WHERE drift > 0), count(*) FILTER (WHERE drift < 0) FROM judged", params).fetchall()[0]
    keys = ("items", "mean_drift", "mean_abs_drift", "changed", "up", "down")
    return dict(zip(keys, row))


def drift_histogram(store: Store, run_id: str, a: int, b: int, purpose: str = "eval") -> pl.DataFrame:
    """drift (rounded to 0.1; null when a side has no score), n over every (item, side) judged in both."""
    cte, params = _compare_cte(run_id, a, b, purpose)
    return store._read(f"{cte} SELECT round(drift, 1) AS drift, count(*) AS n FROM judged GROUP BY 1"
                       " ORDER BY 1 NULLS LAST", params)


def metric_deltas(store: Store, run_id: str, a: int, b: int) -> pl.DataFrame:
    """dataset, metric, value_a, value_b, delta = value_b - value_a (null when either is missing), for
    every metric stored at a or b."""
    return store._read(
        "SELECT coalesce(x.dataset, y.dataset) AS dataset, coalesce(x.metric, y.metric) AS metric,"
        " x.value AS value_a, y.value AS value_b, y.value - x.value AS delta"
        " FROM (SELECT dataset, metric, value FROM evaluations WHERE run_id = ? AND iteration = ?) x"
        " FULL OUTER JOIN (SELECT dataset, metric, value FROM evaluations WHERE run_id = ? AND iteration = ?) y"
        " ON x.dataset = y.dataset AND x.metric = y.metric ORDER BY dataset, metric",
        [run_id, int(a), run_id, int(b)],
    )


def curate_report(store: Store, run_id: str, iteration: int) -> dict | None:
    """The report the iteration's curation stored (pairs, skipped by reason, histograms), or None."""
    rows = store._rows("SELECT curate_report FROM iterations WHERE run_id = ? AND iteration = ?",
                       [run_id, int(iteration)])
    return json.loads(rows[0]["curate_report"]) if rows and rows[0]["curate_report"] else None


# ------------------------------------------------------------------------------------------ evaluation


# A stored metric name is '<method>/<metric>' (no prefix: the iteration's own, greedy figures); the method
# may itself hold a slash ('single-stage-dpo/relative/accuracy').
_METHOD = "CASE WHEN contains(metric, '/') THEN regexp_extract(metric, '^(.*)/[^/]*$', 1) ELSE 'greedy' END"
_BASE_METRIC = "regexp_extract(metric, '([^/]*)$', 1)"


def judge_metrics(store: Store, run_id: str, dataset: str | None = None) -> pl.DataFrame:
    """iteration, dataset, method, metric, value, lo, hi: every judge a run evaluated (each iteration's
    judge, and the baselines recorded on the seed), one row per figure; lo/hi = its 95% bootstrap interval
    when one was stored (as '<metric>_lo' / '<metric>_hi')."""
    where, params = "run_id = ?", [run_id]
    if dataset:
        where += " AND dataset = ?"
        params.append(dataset)
    return store._read(
        f"WITH m AS (SELECT iteration, dataset, {_METHOD} AS method, {_BASE_METRIC} AS metric, value"
        f" FROM evaluations WHERE {where})"
        " SELECT v.iteration, v.dataset, v.method, v.metric, v.value, lo.value AS lo, hi.value AS hi FROM m v"
        " LEFT JOIN m lo ON lo.iteration = v.iteration AND lo.dataset = v.dataset AND lo.method = v.method"
        "  AND lo.metric = v.metric || '_lo'"
        " LEFT JOIN m hi ON hi.iteration = v.iteration AND hi.dataset = v.dataset AND hi.method = v.method"
        "  AND hi.metric = v.metric || '_hi'"
        " WHERE NOT (v.metric LIKE '%\\_lo' ESCAPE '\\' OR v.metric LIKE '%\\_hi' ESCAPE '\\')"
        " ORDER BY v.dataset, v.iteration, v.method, v.metric", params)


def breakdown_groups(store: Store, run_id: str, dataset: str) -> list[str]:
    rows = store._rows("SELECT DISTINCT group_by FROM evaluation_breakdowns WHERE run_id = ? AND dataset = ?"
                       " ORDER BY 1", [run_id, dataset])
    return [r["group_by"] for r in rows]


def breakdown(store: Store, run_id: str, dataset: str, group_by: str) -> pl.DataFrame:
    """iteration, method, group_value, metric, value for one grouping (rubric, capability, section ...)."""
    return store._read(
        "SELECT iteration, method, group_value, metric, value FROM evaluation_breakdowns"
        " WHERE run_id = ? AND dataset = ? AND group_by = ? ORDER BY iteration, method, group_value, metric",
        [run_id, dataset, group_by])


def run_reports(store: Store, run_id: str) -> dict[str, dict]:
    return store.run_reports(run_id)


def reliability(store: Store, run_id: str) -> pl.DataFrame:
    """iteration, dataset, bin, confidence, accuracy, n: the reliability diagram of each iteration's greedy
    judgments (stored as breakdown rows group_by 'reliability')."""
    return store._read(
        "PIVOT (SELECT iteration, dataset, group_value AS bin, metric, value FROM evaluation_breakdowns"
        " WHERE run_id = ? AND method = 'greedy' AND group_by = 'reliability')"
        " ON metric IN ('confidence', 'accuracy', 'n') USING first(value) ORDER BY iteration, dataset, bin",
        [run_id])
