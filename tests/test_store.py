"""The store: migrations, idempotent writes, pair actions with audit, and two processes sharing the file."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import duckdb
import polars as pl
import pytest

from store import Store, StoreError, judgment_id
from store.migrations import LATEST, MIGRATIONS, migrate
from store.store import ITEM_COLUMNS, JUDGMENT_COLUMNS, RUBRIC_KEYS


def make_items(dataset: str, n: int, kind: str = "absolute") -> pl.DataFrame:
    rows = []
    for i in range(n):
        row = {c: None for c in ITEM_COLUMNS}
        row.update(item_id=i + (10_000 if dataset != "d" else 0), content_hash=f"h{i}", dataset=dataset,
                   split="train" if i % 4 else "eval", kind=kind, instruction=f"instruction {i}",
                   response=f"response {i}", criteria="c", gold_score=float(i % 5 + 1), source_row=i + 1)
        rows.append(row)
    schema = {c: (pl.Float64 if c == "gold_score" else pl.Int64 if c in ("source_row", "item_id") else pl.Utf8)
              for c in ITEM_COLUMNS}
    return pl.DataFrame(rows, schema=schema)


def test_item_limit_is_per_section_where_the_data_has_sections(tmp_path):
    store = Store(tmp_path / "db.duckdb")
    items = make_items("rb", 9, "pairwise").with_columns(
        split=pl.lit("eval"), meta=pl.Series([f'{{"section": "{s}"}}' for s in "AAAAABBBC"]))
    store.import_items("rb", "pairwise", items, source="x", preset=None, source_rows=9)
    capped = store.items("rb", "eval", 2)
    # Two of A, two of B, the one C: a plain LIMIT 2 would have taken A's first two only.
    assert capped["item_id"].to_list() == [10_000, 10_001, 10_005, 10_006, 10_008]
    plain = make_items("d", 8)  # no sections: the first N as before
    store.import_items("d", "absolute", plain, source="x", preset=None, source_rows=8)
    assert store.items("d", None, 3)["item_id"].to_list() == [0, 1, 2]


def test_item_limit_takes_the_first_rows_in_source_order_per_subset(tmp_path):
    store = Store(tmp_path / "db.duckdb")
    # item_id (a hash) runs against the file's order: a cap by item_id would take the last rows.
    items = make_items("sub", 7).with_columns(
        split=pl.lit("eval"), item_id=pl.Series([900 - i for i in range(7)]),
        meta=pl.Series(['{"subset": "x"}', '{"subset": "y"}', '{"subset": "x"}', '{"subset": "y"}',
                        '{"subset": "x"}', '{"subset": "y"}', '{"section": "s", "subset": "x"}']))
    store.import_items("sub", "absolute", items, source="x", preset=None, source_rows=7)
    capped = store.items("sub", "eval", 2)
    # Rows 1, 3 of subset x; rows 2, 4 of subset y; row 7 is in section s (a section wins over a subset).
    assert sorted(capped["source_row"].to_list()) == [1, 2, 3, 4, 7]
    assert capped["item_id"].to_list() == sorted(capped["item_id"].to_list())  # returned by item_id, as before
    assert store.items("sub", "eval", 2).equals(capped)  # the same N, the same items
    assert store.items("sub", "eval").height == 7  # no limit: everything


def judgment_rows(run_id, iteration, item_ids, n, scores):
    rows = []
    for item in item_ids:
        for j in range(n):
            row = {c: None for c in JUDGMENT_COLUMNS}
            row.update(judgment_id=judgment_id(run_id, iteration, "train", item, "a", j), run_id=run_id,
                       iteration=iteration, purpose="train", item_id=item, side="a", sample_index=j, model="m",
                       text=f"t {item} {j} [RESULT] {scores(item, j)}", score=scores(item, j), parse_status="ok",
                       forced=False)
            rows.append(row)
    return rows


def test_migrate_blank_db_creates_schema_and_is_repeatable():
    con = duckdb.connect()
    assert migrate(con) == [v for v, _, _ in MIGRATIONS]
    assert migrate(con) == []
    tables = {t for (t,) in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    assert {"datasets", "items", "runs", "iterations", "judgments", "pairs", "evaluations", "audit_log",
            "imports", "schema_migrations"} <= tables
    assert con.execute("SELECT max(version) FROM schema_migrations").fetchone()[0] == LATEST


def test_import_is_idempotent_and_kind_is_checked(tmp_path):
    store = Store(tmp_path / "db.duckdb")
    items = make_items("d", 10)
    inserted = store.import_items("d", "absolute", items, source="x", preset=None, source_rows=10)
    assert inserted == {"inserted": 10, "existing": 0, "replaced": 0, "kept_stored": 0}
    again = store.import_items("d", "absolute", items, source="x", preset=None, source_rows=10)
    assert (again["inserted"], again["existing"]) == (0, 10)
    assert store.datasets().row(0, named=True)["items"] == 10
    with pytest.raises(StoreError, match="absolute"):
        store.import_items("d", "pairwise", make_items("d", 1, "pairwise"), source="x", preset=None, source_rows=1)
    with pytest.raises(StoreError, match="no dataset 'nope'"):
        store.items("nope")
    assert store.items("d", "eval").height == 3


def test_judgments_insert_or_ignore_keeps_first_write(tmp_path):
    store = Store(tmp_path / "db.duckdb")
    rows = judgment_rows("r", 1, [1, 2], 3, lambda i, j: j + 1)
    assert store.insert_judgments(rows) == 6
    again = judgment_rows("r", 1, [1, 2], 3, lambda i, j: 5)
    assert store.insert_judgments(again) == 0
    assert sorted(store.judgments("r", 1)["score"].to_list()) == [1, 1, 2, 2, 3, 3]
    assert store.judgment_keys("r", 1, "train") == {(i, "a", j) for i in (1, 2) for j in range(3)}


def _store_with_pairs(tmp_path):
    store = Store(tmp_path / "db.duckdb")
    store.import_items("d", "absolute", make_items("d", 2), source="x", preset=None, source_rows=2)
    store.create_run("r", "loop", {"model": "m"})
    store.ensure_iteration("r", 1)
    items = [0, 1]
    store.insert_judgments(judgment_rows("r", 1, items, 2, lambda i, j: 1 + 3 * j))
    pairs = pl.DataFrame({
        "pair_id": [100, 101], "run_id": ["r", "r"], "iteration": [1, 1], "item_id": items,
        "chosen_id": [judgment_id("r", 1, "train", i, "a", 0) for i in items],
        "rejected_id": [judgment_id("r", 1, "train", i, "a", 1) for i in items],
        "strategy": ["gold", "gold"], "params": ["{}", "{}"], "margin": [3.0, 3.0],
    })
    assert store.save_curation("r", 1, pairs, {"pairs": 2}) == 2
    assert store.save_curation("r", 1, pairs, {"pairs": 2}) == 0  # a rerun keeps what is there
    return store


def test_pair_actions_write_audit_rows_and_training_sees_human_decisions(tmp_path):
    store = _store_with_pairs(tmp_path)
    store.apply_pair_action(100, "swap", "alice", note="rationale contradicts score")
    store.apply_pair_action(101, "reject", "bob")
    pairs = {r["pair_id"]: r for r in store.pairs("r", 1).iter_rows(named=True)}
    assert pairs[100]["status"] == "swapped" and pairs[100]["chosen_id"] == judgment_id("r", 1, "train", 0, "a", 1)
    assert pairs[100]["updated_by"] == "alice" and pairs[100]["note"] == "rationale contradicts score"
    train = store.training_pairs("r", 1)
    assert train["pair_id"].to_list() == [100]
    assert train["chosen_score"].to_list() == [4]
    # Everything absolute_messages reads, so the DPO prompt is the prompt the judgment was sampled with.
    assert {"instruction", "input", "response", "reference", *RUBRIC_KEYS} <= set(train.columns)
    store.apply_pair_action(100, "edit", "alice", rationale="Better rationale.", score=2)
    row = store.training_pairs("r", 1).row(0, named=True)
    assert (row["status"], row["edited_rationale"], row["edited_score"]) == ("edited", "Better rationale.", 2)
    log = store.audit_log("r")
    assert log["action"].to_list() == ["swap", "reject", "edit"]
    assert log["who"].to_list() == ["alice", "bob", "alice"]
    with pytest.raises(StoreError, match="score between 1 and 5"):
        store.apply_pair_action(100, "edit", "alice", rationale="x", score=9)
    with pytest.raises(StoreError, match="no pair"):
        store.apply_pair_action(999, "accept", "alice")
    assert store.audit_log("r").height == 3  # failed actions leave no trace


def test_reads_and_writes_wait_for_another_process_instead_of_failing(tmp_path):
    """A job process holding the file (DuckDB's exclusive lock) makes the other side wait, not error."""
    store = _store_with_pairs(tmp_path)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import duckdb, time, sys
        con = duckdb.connect({str(store.path)!r})
        print("locked", flush=True)
        time.sleep(1.5)
        con.close()
    """)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    t0 = time.monotonic()
    store.apply_pair_action(100, "accept", "carol")   # must wait for the lock, then succeed
    waited = time.monotonic() - t0
    assert store.run_status("r")["iterations"][0]["pairs"]["accepted"] == 1
    holder.wait(timeout=10)
    assert waited > 0.5, "the write should have waited for the other process's lock"


def test_run_status_shape(tmp_path):
    store = _store_with_pairs(tmp_path)
    store.put_metrics("r", 1, "d", {"pearson": 0.5})
    s = store.run_status("r")
    assert s["id"] == "r" and s["status"] == "pending"
    it = s["iterations"][0]
    assert it["index"] == 1 and it["judgments"] == 4 and it["parsed"] == 4
    assert it["pairs"] == {"auto": 2, "accepted": 0, "rejected": 0, "swapped": 0, "edited": 0}
    assert it["metrics"] == {"d": {"pearson": 0.5}}
    assert store.all_status()["runs"][0]["id"] == "r"


def test_reviews_survive_and_block_a_redo_of_curation(tmp_path):
    store = _store_with_pairs(tmp_path)
    assert store.reset_curation("r", 1) == 2          # nobody reviewed yet: curation may be redone
    store = _store_with_pairs(tmp_path / "again")
    store.apply_pair_action(101, "note", "dana", note="check the reference")
    row = store.pairs("r", 1).filter(pl.col("pair_id") == 101).row(0, named=True)
    assert (row["status"], row["note"], row["updated_by"]) == ("auto", "check the reference", "dana")
    with pytest.raises(StoreError, match="human reviews"):
        store.reset_curation("r", 1)
    assert store.pairs("r", 1).height == 2


def test_bulk_action_is_all_or_nothing(tmp_path):
    store = _store_with_pairs(tmp_path)
    with pytest.raises(StoreError, match="no pair 999"):
        store.apply_pair_action([100, 999], "accept", "erin")
    assert store.pairs("r", 1)["status"].to_list() == ["auto", "auto"]
    assert store.audit_log("r").height == 0
    store.apply_pair_action([100, 101], "accept", "erin")
    assert store.pairs("r", 1)["status"].to_list() == ["accepted", "accepted"]
