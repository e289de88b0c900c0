"""`Store`: every read and write of a selfrat workspace database.

The single-writer rule of DuckDB is handled in `store.db`: each method below opens the file, runs one
transaction and closes it, so a job process and the app take turns holding the file for milliseconds.
Writes are idempotent (deterministic ids + INSERT OR IGNORE), so a resumed stage never duplicates rows.
Reads return Polars frames or plain dicts. This package imports neither `engine` nor `ui`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from store.db import DEFAULT_TIMEOUT_S, connect, transaction
from store.errors import SelfratError
from store.migrations import migrate

DB_FILE = "selfrat.duckdb"
IMPORT_MEMORY_LIMIT = "768MB"
STAGES = ("sample", "curate", "train", "evaluate")
PAIR_STATUSES = ("auto", "accepted", "rejected", "swapped", "edited")
TRAINABLE_STATUSES = ("auto", "accepted", "swapped", "edited")
PAIR_ACTIONS = ("accept", "reject", "swap", "edit", "note")

JUDGMENT_COLUMNS = [
    "judgment_id", "run_id", "iteration", "purpose", "item_id", "side", "sample_index", "model",
    "temperature", "top_p", "max_new_tokens", "seed", "raw_text", "text", "rationale", "score",
    "parse_status", "forced", "p1", "p2", "p3", "p4", "p5", "prompt_tokens", "completion_tokens",
    "latency_s", "verdict", "precision", "ref_logp", "ref_tokens", "reward", "step", "group_index",
]
META_RATING_COLUMNS = [
    "judgment_id", "rater_model", "run_id", "iteration", "rating", "text", "parse_status", "forced",
    "p1", "p2", "p3", "p4", "p5",
]
BREAKDOWN_COLUMNS = ["group_by", "group_value", "metric", "value"]
PAIR_COLUMNS = [
    "pair_id", "run_id", "iteration", "item_id", "chosen_id", "rejected_id", "strategy", "params", "margin",
]
# The one definition of an item's columns (the importers build frames of exactly these).
ITEM_COLUMNS = [
    "item_id", "content_hash", "content_key", "dataset", "split", "kind", "instruction", "input", "response",
    "response_b", "label", "reference", "criteria", "score1_description", "score2_description",
    "score3_description", "score4_description", "score5_description", "gold_score", "gold_scores",
    "gold_feedback", "source_row", "meta",
]
RUBRIC_KEYS = ("criteria", *(f"score{k}_description" for k in range(1, 6)))


class StoreError(SelfratError, ValueError):
    """A request the store refuses (unknown run, dataset kind clash, bad pair action)."""


class DatasetInUse(StoreError):
    """`delete_dataset` refused: runs name the dataset in their config or have judgments of its items."""

    def __init__(self, dataset: str, runs: list[str], message: str | None = None):
        self.dataset, self.runs = dataset, runs
        super().__init__(message or f"dataset {dataset!r} is used by run(s) {', '.join(runs)}")


def judgment_id(run_id: str, iteration: int, purpose: str, item_id: int, side: str, sample_index: int) -> int:
    """A stable 63-bit id from the judgment's natural key, so a resumed stage writes the same ids."""
    key = f"{run_id}/{iteration}/{purpose}/{item_id}/{side}/{sample_index}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") >> 1


def _first(result) -> tuple | None:
    """First row of a result, consuming it (DuckDB 2 refuses new work while a result is half-read)."""
    rows = result.fetchall()
    return rows[0] if rows else None


def _sql_str(value: str | None) -> str:
    """A SQL string literal (for constants spliced into a bulk INSERT ... SELECT)."""
    return "NULL" if value is None else "'" + str(value).replace("'", "''") + "'"


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Store:
    """A workspace database. Creating one migrates the schema (safe at any time, from any process)."""

    def __init__(self, path: str | Path, timeout_s: float = DEFAULT_TIMEOUT_S):
        self.path = Path(path)
        self.timeout_s = timeout_s
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with connect(self.path, timeout_s) as con:
            migrate(con)

    @classmethod
    def in_workspace(cls, workspace: str | Path, **kw) -> "Store":
        return cls(Path(workspace) / DB_FILE, **kw)

    def _tx(self):
        return transaction(self.path, self.timeout_s)

    def _read(self, sql: str, params: Sequence[Any] = ()) -> pl.DataFrame:
        with connect(self.path, self.timeout_s) as con:
            return con.sql(sql, params=list(params) or None).pl()

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[dict]:
        return self._read(sql, params).to_dicts()

    def data_version(self) -> tuple[int, int]:
        """Changes whenever anything is written; read from file times, so it needs no lock."""
        out = []
        for p in (self.path, self.path.with_name(self.path.name + ".wal")):
            try:
                out.append(p.stat().st_mtime_ns)
            except FileNotFoundError:
                out.append(0)
        return tuple(out)

    # ------------------------------------------------------------------ writing: datasets and items

    def import_items(
        self, dataset: str, kind: str, items: pl.DataFrame | Iterable[pl.DataFrame], *, source: str,
        preset: str | None, source_rows: int, skipped: Sequence[dict] = (), replace: bool = False,
        force: bool = False, keep_stored_on_conflict: bool = False, split: str | None = None,
        report: dict | None = None,
    ) -> dict[str, int]:
        """Write the items of one import (a frame, or batches of frames) in one transaction: all or nothing.

        Items already stored (same item_id) are left alone and counted as `existing`. Refused (StoreError,
        nothing written): items stored under another split; items whose content is stored with another
        gold or label (same content_key) unless `keep_stored_on_conflict` (then the stored item stays, and
        the new one is counted in `kept_stored`); items of the other kind. `replace` swaps the dataset's
        items for these (the way to move splits or correct labels), refused while runs use the dataset
        unless `force` (DatasetInUse)."""
        frames = [items] if isinstance(items, pl.DataFrame) else items
        users = self.runs_using_dataset(dataset) if replace and self._has_dataset(dataset) else []
        if users and not force:
            raise DatasetInUse(dataset, users, (
                f"dataset {dataset!r} is used by run(s) {', '.join(users)}: replacing its items would leave their "
                "judgments pointing at items that are gone; nothing imported. --force replaces anyway"))
        cols = ", ".join(ITEM_COLUMNS)
        with self._tx() as con:
            # A large import is one transaction: cap DuckDB's memory so it spills to disk instead of growing.
            con.execute(f"SET memory_limit = '{IMPORT_MEMORY_LIMIT}'")
            row = _first(con.execute("SELECT kind FROM datasets WHERE name = ?", [dataset]))
            replaced = kept = total = 0
            if row and replace:
                replaced = _first(con.execute("SELECT count(*) FROM items WHERE dataset = ?", [dataset]))[0]
                con.execute("DELETE FROM items WHERE dataset = ?", [dataset])
                con.execute("UPDATE datasets SET kind = ? WHERE name = ?", [kind, dataset])
            elif row and row[0] != kind:
                raise StoreError(f"dataset {dataset!r} holds {row[0]} items; cannot add {kind} items to it "
                                 "(--replace replaces its items)")
            elif not row:
                con.execute("INSERT INTO datasets (name, kind) VALUES (?, ?)", [dataset, kind])
            before = _first(con.execute("SELECT count(*) FROM items WHERE dataset = ?", [dataset]))[0]
            for frame in frames:
                # Batch by batch, checked against what was stored before: the importer has already resolved
                # duplicates and conflicts inside the file, so no batch can clash with an earlier one.
                con.register("new_items", frame.select(ITEM_COLUMNS).to_arrow())
                total += frame.height
                if row and not replace:
                    _refuse_split_moves(con, dataset)
                    kept += _stored_conflicts(con, dataset, keep_stored_on_conflict)
                con.execute(f"INSERT OR IGNORE INTO items ({cols}) SELECT {cols} FROM new_items"
                            + (" WHERE item_id NOT IN (SELECT item_id FROM dropped)" if kept else ""))
                con.unregister("new_items")
            inserted = _first(con.execute("SELECT count(*) FROM items WHERE dataset = ?", [dataset]))[0] - before
            counts = {"inserted": inserted, "existing": total - kept - inserted, "replaced": replaced,
                      "kept_stored": kept}
            con.execute(
                "INSERT INTO imports (import_id, dataset, source, preset, source_rows, inserted, existing, skipped,"
                " split, report) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [f"{dataset}/{_now().isoformat()}", dataset, source, preset, source_rows, inserted,
                 counts["existing"], json.dumps(list(skipped)[:1000]), split,
                 json.dumps({**(report or {}), **counts}, default=str)],
            )
        return counts

    def _has_dataset(self, name: str) -> bool:
        return bool(self._rows("SELECT 1 FROM datasets WHERE name = ?", [name]))

    def delete_dataset(self, name: str, force: bool = False) -> dict:
        """Delete a dataset: its items, its imports history and its datasets row, in one transaction.

        Refused (`DatasetInUse`) while a run uses it (`runs_using_dataset`) unless `force`; runs, judgments
        and pairs are never deleted, so with `force` they are left pointing at items that are gone. Returns
        {dataset, items (deleted), runs (orphaned ids), judgments, pairs (pointing at deleted items)}."""
        with self._tx() as con:
            if not _first(con.execute("SELECT 1 FROM datasets WHERE name = ?", [name])):
                known = ", ".join(r[0] for r in con.execute("SELECT name FROM datasets ORDER BY name").fetchall())
                raise StoreError(f"no dataset {name!r} in this workspace (imported: {known or 'none'})")
            runs = _runs_using_dataset(con, name)
            if runs and not force:
                raise DatasetInUse(name, runs)
            in_items = "item_id IN (SELECT item_id FROM items WHERE dataset = ?)"
            judgments = _first(con.execute(f"SELECT count(*) FROM judgments WHERE {in_items}", [name]))[0]
            pairs = _first(con.execute(f"SELECT count(*) FROM pairs WHERE {in_items}", [name]))[0]
            items = _first(con.execute("SELECT count(*) FROM items WHERE dataset = ?", [name]))[0]
            con.execute("DELETE FROM items WHERE dataset = ?", [name])
            con.execute("DELETE FROM imports WHERE dataset = ?", [name])
            con.execute("DELETE FROM datasets WHERE name = ?", [name])
        return {"dataset": name, "items": int(items), "runs": runs, "judgments": int(judgments),
                "pairs": int(pairs)}

    # ------------------------------------------------------------------ writing: runs and iterations

    def create_run(self, run_id: str, kind: str, config: dict, run_dir: str | None = None) -> bool:
        """Record a run; returns False (and changes nothing) when it exists already."""
        with self._tx() as con:
            if _first(con.execute("SELECT 1 FROM runs WHERE run_id = ?", [run_id])):
                return False
            con.execute(
                "INSERT INTO runs (run_id, kind, config, status, run_dir) VALUES (?, ?, ?, 'pending', ?)",
                [run_id, kind, json.dumps(config), run_dir],
            )
        return True

    def update_run(self, run_id: str, *, status: str | None = None, pid: int | None = None,
                   error: str | None = None, clear_error: bool = False) -> None:
        sets, params = ["updated_at = ?"], [_now()]
        if status is not None:
            sets.append("status = ?")
            params.append(status)
            if status in ("done", "failed", "cancelled"):
                sets.append("finished_at = ?")
                params.append(_now())
        if pid is not None:
            sets.append("pid = ?")
            params.append(pid)
        if error is not None or clear_error:
            sets.append("error = ?")
            params.append(error)
        with self._tx() as con:
            con.execute(f"UPDATE runs SET {', '.join(sets)} WHERE run_id = ?", [*params, run_id])

    def update_run_config(self, run_id: str, config: dict) -> None:
        """Replace a run's stored config (`selfrat resume --iterations/--config`); the caller decides which
        fields may change. Stages already done keep their results: only later work reads the new config."""
        with self._tx() as con:
            if not _first(con.execute("SELECT 1 FROM runs WHERE run_id = ?", [run_id])):
                raise StoreError(f"no run {run_id!r} in this workspace")
            con.execute("UPDATE runs SET config = ?, updated_at = ? WHERE run_id = ?",
                        [json.dumps(config), _now(), run_id])

    def ensure_iteration(self, run_id: str, iteration: int, sampler_model: str | None = None) -> None:
        with self._tx() as con:
            con.execute(
                "INSERT OR IGNORE INTO iterations (run_id, iteration, sampler_model) VALUES (?, ?, ?)",
                [run_id, iteration, sampler_model],
            )
            if sampler_model is not None:
                con.execute(
                    "UPDATE iterations SET sampler_model = ? WHERE run_id = ? AND iteration = ?",
                    [sampler_model, run_id, iteration],
                )

    def set_stage(self, run_id: str, iteration: int, stage: str, status: str, *,
                  checkpoint: str | None = None, report: dict | None = None, precision: str | None = None) -> None:
        """Record a stage's status; `precision`: what a finished train stage computed in (bf16 / fp32)."""
        if stage not in STAGES:
            raise StoreError(f"unknown stage {stage!r}; expected one of {STAGES}")
        sets, params = [f"{stage}_status = ?", "updated_at = ?"], [status, _now()]
        if checkpoint is not None:
            sets.append("checkpoint = ?")
            params.append(checkpoint)
        if precision is not None:
            sets.append("train_precision = ?")
            params.append(precision)
        if report is not None:
            column = {"curate": "curate_report", "train": "train_metrics"}[stage]
            sets.append(f"{column} = ?")
            params.append(json.dumps(report))
        with self._tx() as con:
            con.execute(
                f"UPDATE iterations SET {', '.join(sets)} WHERE run_id = ? AND iteration = ?",
                [*params, run_id, iteration],
            )

    # ------------------------------------------------------------------ writing: judgments, pairs, metrics

    def insert_judgments(self, rows: pl.DataFrame | Sequence[dict]) -> int:
        """Insert judgments; ones already stored (same deterministic id) are kept as they were."""
        frame = rows if isinstance(rows, pl.DataFrame) else pl.DataFrame(list(rows), infer_schema_length=None)
        if frame.height == 0:
            return 0
        # absolute judgments have no verdict; fakes no precision and no reference log-probs; only GRPO rollouts
        # have a reward, step and group
        for optional, dtype in (("verdict", pl.String), ("precision", pl.String), ("ref_logp", pl.Float64),
                                ("ref_tokens", pl.Int64), ("reward", pl.Float64), ("step", pl.Int64),
                                ("group_index", pl.Int64)):
            if optional not in frame.columns:
                frame = frame.with_columns(pl.lit(None, dtype=dtype).alias(optional))
        frame = frame.select(JUDGMENT_COLUMNS)
        cols = ", ".join(JUDGMENT_COLUMNS)
        with self._tx() as con:
            con.register("new_judgments", frame.to_arrow())
            # An anti-join rather than INSERT OR IGNORE: the latter reorders rows, and curation relies on an
            # item's samples being stored next to each other (they are written in one batch).
            n = _first(con.execute(f"INSERT INTO judgments ({cols}) SELECT {cols} FROM new_judgments"
                                   " WHERE judgment_id NOT IN (SELECT judgment_id FROM judgments)"))
            con.unregister("new_judgments")
        return int(n[0]) if n else 0

    def delete_judgments(self, run_id: str, iteration: int, purpose: str) -> int:
        """Drop one iteration's judgments of one purpose; returns how many. For GRPO rollouts only (a train
        stage that starts again from scratch replaces the rollouts of its killed attempt, so the stored ones
        are those that trained the checkpoint); refused for a purpose that pairs or meta-ratings may point at."""
        if purpose != "rollout":
            raise StoreError(f"judgments of purpose {purpose!r} are kept; only rollouts can be dropped")
        with self._tx() as con:
            n = _first(con.execute("DELETE FROM judgments WHERE run_id = ? AND iteration = ? AND purpose = ?",
                                   [run_id, iteration, purpose]))
        return int(n[0]) if n else 0

    def save_curation(self, run_id: str, iteration: int, pairs: pl.DataFrame, report: dict) -> int:
        """Write an iteration's curated pairs and mark its curate stage done, in one transaction."""
        with self._tx() as con:
            return _save_pairs(con, run_id, iteration, pairs, report)

    def run_curation(self, run_id: str, iteration: int, dataset: str,
                     curate_fn: Callable[[pl.DataFrame, pl.DataFrame], tuple[pl.DataFrame, dict]]) -> dict:
        """Read the curation inputs, apply `curate_fn(judgments, golds) -> (pairs, report)` and save the
        pairs, on one connection and in one transaction (a consistent snapshot, one open instead of two)."""
        with self._tx() as con:
            judgments, golds = _curation_inputs(con, run_id, iteration, dataset)
            pairs, report = curate_fn(judgments, golds)
            _save_pairs(con, run_id, iteration, pairs, report)
        return report

    def reset_curation(self, run_id: str, iteration: int) -> int:
        """Drop an iteration's pairs so curation can run again (e.g. with other parameters). Refused once a
        human has reviewed any of them: their decisions must not vanish with the pairs."""
        with self._tx() as con:
            reviewed = _first(con.execute("SELECT count(*) FROM pair_reviews WHERE run_id = ? AND iteration = ?",
                                          [run_id, iteration]))[0]
            if reviewed:
                raise StoreError(f"{reviewed} pairs of {run_id} iteration {iteration} have human reviews;"
                                 " they are kept, so curation cannot be redone")
            n = _first(con.execute("DELETE FROM pairs WHERE run_id = ? AND iteration = ?", [run_id, iteration]))
            con.execute("UPDATE iterations SET curate_status = 'pending', curate_report = NULL, updated_at = ?"
                        " WHERE run_id = ? AND iteration = ?", [_now(), run_id, iteration])
        return int(n[0]) if n else 0

    def insert_meta_ratings(self, rows: pl.DataFrame | Sequence[dict]) -> int:
        """Store meta-judge ratings; a (judgment, rater) already rated keeps its first rating."""
        frame = rows if isinstance(rows, pl.DataFrame) else pl.DataFrame(list(rows), infer_schema_length=None)
        if frame.height == 0:
            return 0
        frame = frame.select(META_RATING_COLUMNS)
        cols = ", ".join(META_RATING_COLUMNS)
        with self._tx() as con:
            con.register("new_ratings", frame.to_arrow())
            n = _first(con.execute(
                f"INSERT INTO meta_ratings ({cols}) SELECT {cols} FROM new_ratings n WHERE NOT EXISTS"
                " (SELECT 1 FROM meta_ratings m WHERE m.judgment_id = n.judgment_id"
                " AND m.rater_model = n.rater_model)"))
            con.unregister("new_ratings")
        return int(n[0]) if n else 0

    def put_breakdowns(self, run_id: str, iteration: int, dataset: str, method: str,
                       rows: pl.DataFrame | Sequence[dict]) -> None:
        """Replace the per-group metrics of one (iteration, dataset, method): group_by, group_value, metric, value."""
        frame = rows if isinstance(rows, pl.DataFrame) else pl.DataFrame(
            list(rows), schema={"group_by": pl.String, "group_value": pl.String, "metric": pl.String,
                                "value": pl.Float64})
        with self._tx() as con:
            con.execute("DELETE FROM evaluation_breakdowns WHERE run_id = ? AND iteration = ? AND dataset = ?"
                        " AND method = ?", [run_id, iteration, dataset, method])
            if frame.height:
                con.register("new_breakdowns", frame.select(BREAKDOWN_COLUMNS).to_arrow())
                con.execute(
                    "INSERT INTO evaluation_breakdowns SELECT ?, ?, ?, ?, group_by, group_value, metric, value"
                    " FROM new_breakdowns", [run_id, iteration, dataset, method])
                con.unregister("new_breakdowns")

    def put_run_report(self, run_id: str, name: str, report: dict) -> None:
        with self._tx() as con:
            con.execute("INSERT OR REPLACE INTO run_reports (run_id, name, report) VALUES (?, ?, ?)",
                        [run_id, name, json.dumps(report)])

    def put_metrics(self, run_id: str, iteration: int, dataset: str, metrics: dict[str, float]) -> None:
        rows = [(run_id, iteration, dataset, k, None if v is None else float(v)) for k, v in metrics.items()]
        with self._tx() as con:
            con.executemany("INSERT OR REPLACE INTO evaluations (run_id, iteration, dataset, metric, value) "
                            "VALUES (?, ?, ?, ?, ?)", rows)

    def apply_pair_action(self, pair_ids: int | Iterable[int], action: str, who: str, *, note: str | None = None,
                          rationale: str | None = None, score: int | None = None) -> list[dict]:
        """A human decision on one or more pairs (of any run), written with an audit row each, in one
        transaction. See `review_pairs` for the actions; returns each pair's review as it is after the action."""
        _check_pair_action(action, who, rationale, score)
        ids = [int(pair_ids)] if isinstance(pair_ids, (int, np.integer)) else [int(p) for p in pair_ids]
        with self._tx() as con:
            return _apply_pair_action(con, ids, action, who, note=note, rationale=rationale, score=score)

    def review_pairs(self, run_id: str, iteration: int, action: str, who: str, pair_ids: Iterable[int] | None = None,
                     *, status: str | None = None, note: str | None = None, rationale: str | None = None,
                     score: int | None = None) -> list[dict]:
        """A human decision on pairs of one iteration, with an audit row each, in one transaction: the given
        `pair_ids` (each must belong to the iteration), or with `pair_ids=None` every pair whose status is
        `status` (None: every pair of the iteration), picked inside the same transaction. What the app's Pairs
        page and `selfrat pairs` both call.

        accept / reject set the status; swap exchanges chosen and rejected (swapping a swapped pair back
        leaves it accepted); edit replaces the chosen side's rationale and/or score (status edited; the part
        not given stays as it is: the earlier edit, else the chosen judgment's own); note only sets the note
        (any action may also set one). Returns each pair's review as it is after the action."""
        _check_pair_action(action, who, rationale, score)
        if status is not None and status not in PAIR_STATUSES:
            raise StoreError(f"status must be one of {', '.join(PAIR_STATUSES)}, got {status!r}")
        if pair_ids is not None and status is not None:
            raise StoreError("give pair ids or a status filter, not both")
        with self._tx() as con:
            if pair_ids is None:
                sql = f"SELECT pair_id FROM ({self._PAIR_VIEW}) WHERE run_id = ? AND iteration = ?"
                params: list[Any] = [run_id, int(iteration)]
                if status is not None:
                    sql += " AND status = ?"
                    params.append(status)
                ids = [int(r[0]) for r in con.execute(sql + " ORDER BY pair_id", params).fetchall()]
            else:
                ids = [int(p) for p in pair_ids]
                if ids:
                    found = {int(r[0]) for r in con.execute(
                        f"SELECT pair_id FROM pairs WHERE run_id = ? AND iteration = ? AND pair_id IN"
                        f" ({', '.join(str(i) for i in set(ids))})", [run_id, int(iteration)]).fetchall()}
                    missing = [i for i in ids if i not in found]
                    if missing:
                        raise StoreError(f"no pair {missing[0]} in run {run_id!r} iteration {iteration}")
            return _apply_pair_action(con, ids, action, who, note=note, rationale=rationale, score=score)

    # ------------------------------------------------------------------ reading

    def datasets(self) -> pl.DataFrame:
        return self._read(
            "SELECT d.name, d.kind, count(i.item_id) AS items,"
            " count(i.item_id) FILTER (WHERE i.split = 'train') AS train,"
            " count(i.item_id) FILTER (WHERE i.split = 'eval') AS eval, d.created_at"
            " FROM datasets d LEFT JOIN items i ON i.dataset = d.name GROUP BY ALL ORDER BY d.name"
        )

    def dataset_items(self, name: str, limit: int | None = 5, split: str | None = None) -> pl.DataFrame:
        """The first `limit` items of a dataset as stored (every item column), in source order
        (source_row, then item_id); `split` train | eval narrows it; limit None or 0 = all."""
        self.dataset_kind(name)
        sql, params = f"SELECT {', '.join(ITEM_COLUMNS)} FROM items WHERE dataset = ?", [name]
        if split and split != "all":
            sql += " AND split = ?"
            params.append(split)
        sql += " ORDER BY source_row NULLS LAST, item_id"
        if limit:
            sql += f" LIMIT {int(limit)}"
        return self._read(sql, params)

    def runs_using_dataset(self, name: str) -> list[str]:
        """Sorted ids of the runs that use a dataset: their config names it (train_dataset, eval_datasets,
        sft.dataset) or any of their judgments is of one of its items."""
        with connect(self.path, self.timeout_s) as con:
            return _runs_using_dataset(con, name)

    def dataset_kind(self, name: str) -> str:
        rows = self._rows("SELECT kind FROM datasets WHERE name = ?", [name])
        if not rows:
            known = ", ".join(self.datasets()["name"].to_list()) or "none"
            raise StoreError(f"no dataset {name!r} in this workspace (imported: {known})")
        return rows[0]["kind"]

    def items(self, dataset: str, split: str | None = None, limit: int | None = None) -> pl.DataFrame:
        """Items of a dataset, returned in a stable order (by item_id), optionally one split and a `limit`.

        `limit` N keeps the first N items in source order (source_row, the row number in the imported file,
        then item_id), per section where the data has sections: meta "section" (RewardBench), else meta
        "subset"; items with neither form one group. So a capped evaluation still covers every section and the
        mean of sections stays meaningful, and the same N always selects the same items."""
        self.dataset_kind(dataset)
        sql = f"SELECT {', '.join(ITEM_COLUMNS)} FROM items WHERE dataset = ?"
        params: list[Any] = [dataset]
        if split and split != "all":
            sql += " AND split = ?"
            params.append(split)
        if limit:
            sql += (" QUALIFY row_number() OVER (PARTITION BY coalesce(json_extract_string(meta, '$.section'),"
                    " json_extract_string(meta, '$.subset')) ORDER BY source_row NULLS LAST, item_id)"
                    f" <= {int(limit)}")
        return self._read(sql + " ORDER BY item_id", params)

    def run(self, run_id: str) -> dict:
        rows = self._rows("SELECT * FROM runs WHERE run_id = ?", [run_id])
        if not rows:
            raise StoreError(f"no run {run_id!r} in this workspace")
        row = rows[0]
        row["config"] = json.loads(row["config"])
        return row

    def runs(self) -> pl.DataFrame:
        return self._read("SELECT run_id, kind, status, created_at, updated_at, finished_at, error FROM runs"
                          " ORDER BY created_at")

    def iterations(self, run_id: str) -> list[dict]:
        rows = self._rows("SELECT * FROM iterations WHERE run_id = ? ORDER BY iteration", [run_id])
        for r in rows:
            for key in ("curate_report", "train_metrics"):
                r[key] = json.loads(r[key]) if r[key] else None
        return rows

    def iteration(self, run_id: str, iteration: int) -> dict:
        for r in self.iterations(run_id):
            if r["iteration"] == iteration:
                return r
        raise StoreError(f"run {run_id!r} has no iteration {iteration}")

    def judgment_keys(self, run_id: str, iteration: int, purpose: str) -> set[tuple[str, str, int]]:
        """(item_id, side, sample_index) already stored: what a resumed sampling stage skips."""
        with connect(self.path, self.timeout_s) as con:
            rows = con.execute(
                "SELECT item_id, side, sample_index FROM judgments WHERE run_id = ? AND iteration = ? AND purpose = ?",
                [run_id, iteration, purpose],
            ).fetchall()
        return {(a, b, int(c)) for a, b, c in rows}

    def judgments(self, run_id: str, iteration: int, purpose: str | None = None) -> pl.DataFrame:
        sql = "SELECT * FROM judgments WHERE run_id = ? AND iteration = ?"
        params: list[Any] = [run_id, iteration]
        if purpose:
            sql += " AND purpose = ?"
            params.append(purpose)
        return self._read(sql + " ORDER BY item_id, side, sample_index", params)

    def rollouts(self, run_id: str, iteration: int | None = None) -> pl.DataFrame:
        """GRPO rollouts (judgments of purpose 'rollout'), numbers only: judgment_id, iteration, step,
        group_index, item_id, side, sample_index, reward, score, verdict, parse_status, completion_tokens; in
        generation order (iteration, step, group, sample)."""
        sql = ("SELECT judgment_id, iteration, step, group_index, item_id, side, sample_index, reward, score,"
               " verdict, parse_status, completion_tokens FROM judgments WHERE run_id = ? AND purpose = 'rollout'")
        params: list[Any] = [run_id]
        if iteration is not None:
            sql += " AND iteration = ?"
            params.append(int(iteration))
        return self._read(sql + " ORDER BY iteration, step, group_index, sample_index", params)

    def curation_inputs(self, run_id: str, iteration: int, dataset: str) -> tuple[pl.DataFrame, pl.DataFrame]:
        """(judgments: judgment_id, item_id, sample_index, score, forced, text_hash, rationale_len of the
        iteration's training samples, in storage order; golds: item_id, gold_score of the dataset's items).
        Numeric columns only (texts as hashes and lengths), so 1M rows read in a few tens of ms."""
        with connect(self.path, self.timeout_s) as con:
            return _curation_inputs(con, run_id, iteration, dataset)

    # A pair as a human left it: its status, and chosen/rejected after any swap.
    _PAIR_VIEW = (
        "SELECT p.pair_id, p.run_id, p.iteration, p.item_id, p.strategy, p.params, p.margin,"
        " coalesce(r.status, 'auto') AS status, coalesce(r.swapped, false) AS swapped,"
        " CASE WHEN r.swapped THEN p.rejected_id ELSE p.chosen_id END AS chosen_id,"
        " CASE WHEN r.swapped THEN p.chosen_id ELSE p.rejected_id END AS rejected_id,"
        " r.edited_rationale, r.edited_score, r.note, r.updated_by, r.updated_at"
        " FROM pairs p LEFT JOIN pair_reviews r USING (pair_id)"
    )

    def pairs(self, run_id: str, iteration: int, status: str | None = None) -> pl.DataFrame:
        sql = f"SELECT * FROM ({self._PAIR_VIEW}) WHERE run_id = ? AND iteration = ?"
        params: list[Any] = [run_id, iteration]
        if status:
            sql += " AND status = ?"
            params.append(status)
        return self._read(sql + " ORDER BY pair_id", params)

    def training_pairs(self, run_id: str, iteration: int) -> pl.DataFrame:
        """Pairs that training may use, as the humans left them, with the item and both judgment texts."""
        return self.export_pairs(run_id, iteration, include_rejected=False)

    def export_pairs(self, run_id: str, iteration: int, include_rejected: bool = False) -> pl.DataFrame:
        allowed = PAIR_STATUSES if include_rejected else TRAINABLE_STATUSES
        statuses = ", ".join(f"'{s}'" for s in allowed)
        return self._read(
            "SELECT p.pair_id, p.item_id, p.status, p.strategy, p.margin, p.edited_rationale, p.edited_score,"
            " c.text AS chosen_text, c.score AS chosen_score, r.text AS rejected_text, r.score AS rejected_score,"
            " c.model AS chosen_model, c.ref_logp AS chosen_ref_logp, r.model AS rejected_model,"
            " r.ref_logp AS rejected_ref_logp,"
            " i.instruction, i.input, i.response, i.reference, " + ", ".join(f"i.{k}" for k in RUBRIC_KEYS) + ","
            " i.gold_score"
            f" FROM ({self._PAIR_VIEW}) p JOIN judgments c ON c.judgment_id = p.chosen_id"
            " JOIN judgments r ON r.judgment_id = p.rejected_id JOIN items i ON i.item_id = p.item_id"
            f" WHERE p.run_id = ? AND p.iteration = ? AND p.status IN ({statuses}) ORDER BY p.pair_id",
            [run_id, iteration],
        )

    def audit_log(self, run_id: str | None = None, pair_id: str | None = None) -> pl.DataFrame:
        sql, params = "SELECT * FROM audit_log WHERE 1=1", []
        if run_id:
            sql += " AND run_id = ?"
            params.append(run_id)
        if pair_id:
            sql += " AND pair_id = ?"
            params.append(pair_id)
        return self._read(sql + " ORDER BY audit_id", params)

    def overlapping_items(self, dataset: str, split: str | None, against: Sequence[str],
                          against_split: str | None) -> pl.DataFrame:
        """Items of `dataset` whose instruction (+ input) + response (case and whitespace folded) also occur in one of
        the `against` datasets (as response or response_b): item_id, source_row, other_dataset, other_item_id.
        The contamination check of a run: such items must never be trained on."""
        if not against:
            return pl.DataFrame(schema={"item_id": pl.Int64, "source_row": pl.Int64, "other_dataset": pl.String,
                                        "other_item_id": pl.Int64})
        # The instruction includes the item's input (an empty input adds nothing, so old hashes hold).
        norm = "md5(regexp_replace(lower(trim({i} || coalesce(chr(10) || input, ''))), '\\s+', ' ', 'g')"\
               " || chr(31) || regexp_replace(lower(trim({r})), '\\s+', ' ', 'g'))"
        names = ", ".join("?" for _ in against)
        split_sql = "" if split is None else " AND t.split = ?"
        other_split_sql = "" if against_split is None else " AND o.split = ?"
        sql = (
            f"WITH t AS (SELECT item_id, source_row, {norm.format(i='instruction', r='response')} AS h"
            f" FROM items t WHERE dataset = ?{split_sql}),"
            f" o AS (SELECT dataset, item_id, {norm.format(i='instruction', r='response')} AS h FROM items o"
            f" WHERE dataset IN ({names}){other_split_sql}"
            f" UNION ALL SELECT dataset, item_id, {norm.format(i='instruction', r='response_b')} FROM items o"
            f" WHERE dataset IN ({names}){other_split_sql} AND response_b IS NOT NULL)"
            " SELECT DISTINCT t.item_id, t.source_row, o.dataset AS other_dataset, o.item_id AS other_item_id"
            " FROM t JOIN o ON t.h = o.h ORDER BY t.item_id, other_dataset"
        )
        params: list[Any] = [dataset] + ([split] if split else [])
        for _ in range(2):
            params += list(against) + ([against_split] if against_split else [])
        return self._read(sql, params)

    def meta_ratings(self, run_id: str, iteration: int, purpose: str | None = None) -> pl.DataFrame:
        """Ratings of the judgments of (run, iteration[, purpose]) with the rated judgment's item, side, sample
        and score."""
        sql = ("SELECT m.*, j.item_id, j.side, j.sample_index, j.score, j.purpose FROM meta_ratings m"
               " JOIN judgments j USING (judgment_id) WHERE j.run_id = ? AND j.iteration = ?")
        params: list[Any] = [run_id, iteration]
        if purpose:
            sql += " AND j.purpose = ?"
            params.append(purpose)
        return self._read(sql + " ORDER BY j.item_id, j.side, j.sample_index, m.rater_model", params)

    def judged_items(self, run_id: str, iteration: int) -> pl.DataFrame:
        """dataset, purpose, items, rated: per dataset and judgment purpose of (run, iteration), how many items
        its judgments cover, and how many of those judgments carry a meta rating (best-of-N needs them)."""
        return self._read(
            "SELECT i.dataset, j.purpose, count(DISTINCT j.item_id) AS items, count(DISTINCT m.judgment_id) AS rated"
            " FROM judgments j JOIN items i ON i.item_id = j.item_id"
            " LEFT JOIN (SELECT DISTINCT judgment_id FROM meta_ratings) m ON m.judgment_id = j.judgment_id"
            " WHERE j.run_id = ? AND j.iteration = ? GROUP BY ALL ORDER BY i.dataset, j.purpose",
            [run_id, int(iteration)])

    def breakdowns(self, run_id: str, iteration: int | None = None) -> pl.DataFrame:
        sql, params = "SELECT * FROM evaluation_breakdowns WHERE run_id = ?", [run_id]
        if iteration is not None:
            sql += " AND iteration = ?"
            params.append(iteration)
        return self._read(sql + " ORDER BY iteration, dataset, method, group_by, group_value, metric", params)

    def run_reports(self, run_id: str) -> dict[str, dict]:
        return {r["name"]: json.loads(r["report"])
                for r in self._rows("SELECT name, report FROM run_reports WHERE run_id = ? ORDER BY name", [run_id])}

    def metrics(self, run_id: str) -> pl.DataFrame:
        return self._read("SELECT iteration, dataset, metric, value FROM evaluations WHERE run_id = ?"
                          " ORDER BY iteration, dataset, metric", [run_id])

    def run_status(self, run_id: str) -> dict:
        """The object `selfrat status RUN_ID --json` prints: one entry per iteration, 0 = the seed."""
        run = self.run(run_id)
        with connect(self.path, self.timeout_s) as con:
            counts = {
                (it, purpose): (n, parsed)
                for it, purpose, n, parsed in con.execute(
                    "SELECT iteration, purpose, count(*), count(*) FILTER (WHERE parse_status = 'ok')"
                    " FROM judgments WHERE run_id = ? GROUP BY ALL", [run_id]).fetchall()
            }
            rollout_stats = {it: (steps, reward) for it, steps, reward in con.execute(
                "SELECT iteration, max(step), avg(reward) FROM judgments WHERE run_id = ? AND purpose = 'rollout'"
                " GROUP BY iteration", [run_id]).fetchall()}
            sample_precision = dict(con.execute(
                "SELECT iteration, string_agg(DISTINCT precision, ',' ORDER BY precision) FROM judgments"
                " WHERE run_id = ? AND precision IS NOT NULL GROUP BY iteration", [run_id]).fetchall())
            pair_counts: dict[int, dict[str, int]] = {}
            for it, status, n in con.execute(
                "SELECT p.iteration, coalesce(r.status, 'auto'), count(*) FROM pairs p"
                " LEFT JOIN pair_reviews r USING (pair_id) WHERE p.run_id = ? GROUP BY ALL", [run_id]
            ).fetchall():
                pair_counts.setdefault(it, {})[status] = n
            metric_rows = con.execute(
                "SELECT iteration, dataset, metric, value FROM evaluations WHERE run_id = ?", [run_id]
            ).fetchall()
            iters = con.execute(
                "SELECT iteration, sampler_model, checkpoint, curate_report, train_precision, sample_status,"
                " curate_status, train_status, evaluate_status FROM iterations WHERE run_id = ? ORDER BY iteration",
                [run_id]).fetchall()
        metrics: dict[int, dict[str, dict[str, float | None]]] = {}
        for it, ds, metric, value in metric_rows:
            metrics.setdefault(it, {}).setdefault(ds, {})[metric] = value
        out = []
        for it, sampler, ckpt, curate_report, train_precision, *stage_status in iters:
            n_train, parsed_train = counts.get((it, "train"), (0, 0))
            n_eval, parsed_eval = counts.get((it, "eval"), (0, 0))
            by_purpose = {p: n for (i, p), (n, _) in counts.items() if i == it}
            out.append({
                "index": it,
                "judgments": sum(by_purpose.values()),
                "parsed": sum(parsed for (i, _), (_, parsed) in counts.items() if i == it),
                "train_judgments": n_train,
                "eval_judgments": n_eval,
                # GRPO: the rollouts the trainer generated and scored (purpose 'rollout'), its last step, mean reward
                "rollout_judgments": counts.get((it, "rollout"), (0, 0))[0],
                "rollout_steps": rollout_stats.get(it, (None, None))[0],
                "rollout_reward": rollout_stats.get(it, (None, None))[1],
                "judgments_by_purpose": by_purpose,
                "pairs": {s: pair_counts.get(it, {}).get(s, 0) for s in PAIR_STATUSES},
                "checkpoint": ckpt,
                "sampler_model": sampler,
                # what `precision: auto` chose: of the judgments (sampling / evaluation) and of the training
                "precision": {"judgments": sample_precision.get(it), "train": train_precision},
                "stages": dict(zip(STAGES, stage_status)),
                "curation_warnings": json.loads(curate_report).get("warnings", []) if curate_report else [],
                "metrics": metrics.get(it, {}),
            })
        return {
            "id": run_id, "kind": run["kind"], "status": run["status"], "error": run["error"],
            "created_at": str(run["created_at"]), "updated_at": str(run["updated_at"]), "iterations": out,
            "reports": self.run_reports(run_id),
        }

    def all_status(self) -> dict:
        return {"runs": [self.run_status(r) for r in self.runs()["run_id"].to_list()]}


def _config_datasets(config: dict) -> set[str]:
    """The dataset names a stored run config refers to."""
    names = {config.get("train_dataset")} | set(config.get("eval_datasets") or [])
    old_section = config.get("seed")  # configs stored before `seed: {sft: ...}` became `sft: ...`
    for sft in (config.get("sft"), old_section.get("sft") if isinstance(old_section, dict) else None):
        if isinstance(sft, dict):
            names.add(sft.get("dataset"))
    return {n for n in names if isinstance(n, str)}


def _runs_using_dataset(con, name: str) -> list[str]:
    runs = {run_id for run_id, config in con.execute("SELECT run_id, config FROM runs").fetchall()
            if name in _config_datasets(json.loads(config or "{}"))}
    runs |= {r[0] for r in con.execute(
        "SELECT DISTINCT run_id FROM judgments WHERE item_id IN (SELECT item_id FROM items WHERE dataset = ?)",
        [name]).fetchall()}
    return sorted(runs)


def _curation_inputs(con, run_id: str, iteration: int, dataset: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Numbers only, so 1M judgments read in a blink: text_hash stands in for the text (dedupe; NULL when
    there is no text) and rationale_len (characters) for the rationale (the length-bias report)."""
    judgments = con.sql(
        "SELECT judgment_id, item_id, sample_index, score, forced,"
        " CASE WHEN text IS NULL THEN NULL ELSE (hash(text) >> 1)::BIGINT END AS text_hash,"
        " coalesce(length(rationale), 0)::INTEGER AS rationale_len FROM judgments"
        " WHERE run_id = ? AND iteration = ? AND purpose = 'train' AND side = 'a'",
        params=[run_id, iteration]).pl()
    golds = con.sql("SELECT item_id, gold_score FROM items WHERE dataset = ? ORDER BY item_id", params=[dataset]).pl()
    return judgments, golds


def _save_pairs(con, run_id: str, iteration: int, pairs: pl.DataFrame, report: dict) -> int:
    """Insert pairs not stored yet (a rerun after a crash neither duplicates pairs nor touches reviews) and
    mark the curate stage done. `pairs` holds pair_id, item_id, chosen_id, rejected_id, margin; strategy
    and params come from the report (one value per curation, so they never cross over row by row)."""
    cols = ", ".join(PAIR_COLUMNS)
    strategy, params = report.get("strategy", "unknown"), json.dumps(report.get("params", {}))
    con.register("new_pairs", pairs.select("pair_id", "item_id", "chosen_id", "rejected_id", "margin").to_arrow())
    sql = (f"INSERT INTO pairs ({cols}) SELECT pair_id, {_sql_str(run_id)}, {int(iteration)}, item_id,"
           f" chosen_id, rejected_id, {_sql_str(strategy)}, {_sql_str(params)}, margin FROM new_pairs")
    has_pairs = _first(con.execute("SELECT count(*) FROM pairs WHERE run_id = ? AND iteration = ?",
                                   [run_id, iteration]))[0]
    if has_pairs:  # the anti-join only when there is something to skip: the first write stays fast
        n = _first(con.execute(sql + " WHERE pair_id NOT IN (SELECT pair_id FROM pairs"
                               " WHERE run_id = ? AND iteration = ?)", [run_id, iteration]))
    else:
        n = _first(con.execute(sql))
    con.unregister("new_pairs")
    con.execute("UPDATE iterations SET curate_status = 'done', curate_report = ?, updated_at = ?"
                " WHERE run_id = ? AND iteration = ?", [json.dumps(report), _now(), run_id, iteration])
    return int(n[0]) if n else 0


def _check_pair_action(action: str, who: str, rationale: str | None, score: int | None) -> None:
    if action not in PAIR_ACTIONS:
        raise StoreError(f"unknown pair action {action!r}; expected one of {PAIR_ACTIONS}")
    if action == "edit":
        if rationale is None and score is None:
            raise StoreError("edit needs a rationale or a score (or both)")
        if rationale is not None and not rationale.strip():
            raise StoreError("edit needs a non-empty rationale")
        if score is not None and not 1 <= int(score) <= 5:
            raise StoreError(f"edit needs a score between 1 and 5, got {score!r}")
    if not who or not who.strip():
        raise StoreError("every pair action needs who made it")


_REVIEW_FIELDS = ("pair_id", "run_id", "iteration", "status", "swapped", "edited_rationale", "edited_score", "note")


def _apply_pair_action(con, ids: list[int], action: str, who: str, *, note: str | None, rationale: str | None,
                       score: int | None) -> list[dict]:
    """Apply one checked action to `ids` inside the caller's transaction; one review row and audit row each."""
    out = []
    for pid in ids:
        row = _first(con.execute(
            "SELECT p.pair_id, p.run_id, p.iteration, coalesce(r.status, 'auto'), coalesce(r.swapped, false),"
            " r.edited_rationale, r.edited_score, r.note, c.rationale, c.score FROM pairs p"
            " LEFT JOIN pair_reviews r USING (pair_id)"
            " LEFT JOIN judgments c ON c.judgment_id = CASE WHEN r.swapped THEN p.rejected_id ELSE p.chosen_id END"
            " WHERE p.pair_id = ?", [pid]))
        if row is None:
            raise StoreError(f"no pair {pid}")
        before = dict(zip(_REVIEW_FIELDS, row[:len(_REVIEW_FIELDS)]))
        chosen_rationale, chosen_score = row[len(_REVIEW_FIELDS):]
        after = dict(before)
        if action == "accept":
            after["status"] = "accepted"
        elif action == "reject":
            after["status"] = "rejected"
        elif action == "swap":
            after["swapped"] = not before["swapped"]
            after["status"] = "swapped" if after["swapped"] else "accepted"
            after["edited_rationale"], after["edited_score"] = None, None
        elif action == "edit":
            text = rationale if rationale is not None else (before["edited_rationale"] or chosen_rationale)
            value = score if score is not None else (before["edited_score"] or chosen_score)
            if not text or not str(text).strip():
                raise StoreError(f"pair {pid}: edit needs a non-empty rationale (the chosen side has none)")
            if value is None or not 1 <= int(value) <= 5:
                raise StoreError(f"pair {pid}: edit needs a score between 1 and 5 (the chosen side has {value!r})")
            after.update(status="edited", edited_rationale=str(text).strip(), edited_score=int(value))
        if note is not None:
            after["note"] = note
        con.execute(
            "INSERT OR REPLACE INTO pair_reviews (pair_id, run_id, iteration, status, swapped,"
            " edited_rationale, edited_score, note, updated_by, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [pid, after["run_id"], after["iteration"], after["status"], after["swapped"],
             after["edited_rationale"], after["edited_score"], after["note"], who, _now()],
        )
        con.execute(
            "INSERT INTO audit_log (who, action, pair_id, run_id, iteration, before, after, note)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [who, action, pid, before["run_id"], before["iteration"], json.dumps(before), json.dumps(after), note],
        )
        out.append(after)
    return out


def default_who() -> str:
    return os.environ.get("SELFRAT_USER") or os.environ.get("USER") or "unknown"


def _refuse_split_moves(con, dataset: str) -> None:
    moved = con.execute(
        "SELECT count(*), any_value(i.split), any_value(n.split), min(n.source_row) FROM new_items n"
        " JOIN items i USING (item_id) WHERE i.split <> n.split").fetchone()
    if moved[0]:
        raise StoreError(
            f"{moved[0]} item(s) are already in dataset {dataset!r} as {moved[1]} and this import gives them as"
            f" {moved[2]} (first at row {moved[3]}); nothing imported. --replace replaces the dataset's items"
            f" with this file's (moving them to {moved[2]}), or import with --split {moved[1]}")


def _stored_conflicts(con, dataset: str, keep_stored: bool) -> int:
    """New items whose content is stored with another gold/label: refused, or dropped in favour of the stored."""
    sql = ("FROM new_items n JOIN items i ON i.dataset = ? AND i.content_key = n.content_key"
           " AND i.item_id <> n.item_id")
    rows = con.execute(
        f"SELECT n.source_row, coalesce(i.label, CAST(i.gold_score AS VARCHAR)),"
        f" coalesce(n.label, CAST(n.gold_score AS VARCHAR)) {sql} ORDER BY n.source_row", [dataset]).fetchall()
    if not rows:
        return 0
    if keep_stored:
        con.execute("CREATE TEMP TABLE IF NOT EXISTS dropped (item_id BIGINT)")
        con.execute(f"INSERT INTO dropped SELECT n.item_id {sql}", [dataset])
        return len(rows)
    shown = "; ".join(f"row {r}: stored {a}, file {b}" for r, a, b in rows[:5]) + (" ..." if len(rows) > 5 else "")
    raise StoreError(
        f"{len(rows)} item(s) of this import are already in dataset {dataset!r} with another gold score or"
        f" label ({shown}); nothing imported. --replace replaces the dataset's items with this file's (a"
        " corrected file), --on-conflict first keeps the stored ones")

