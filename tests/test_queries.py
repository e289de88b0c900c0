"""The app's read queries (store/queries.py) on a hand-built workspace with known answers."""

from __future__ import annotations

import itertools
import math

import numpy as np
import polars as pl
import pytest

from store import Store, judgment_id
from store import queries as q
from store.queries import JudgmentFilter as F
from store.store import ITEM_COLUMNS, JUDGMENT_COLUMNS

# Item ids spread over several 2^50-wide buckets (as 60-bit content hashes are), so that pages cross
# the buckets judgments_page counts in.
A, B, C, N = (1 << 56) + 1, (3 << 56) + 2, (5 << 56) + 3, (7 << 56) + 4   # dataset d (train)
X, Y = (2 << 56) + 5, (4 << 56) + 6                                       # dataset e (eval)

ITEMS = [  # item, dataset, split, gold, instruction
    (A, "d", "train", 1.0, "Translate the POEM into French"),
    (B, "d", "train", 2.5, "Summarise the article"),            # gold 2.5 rounds (half up) to 3
    (C, "d", "train", 4.0, "Explain 100% of the proof_sketch"),  # wildcards for the text search
    (N, "d", "train", None, "Write a haiku"),                    # no gold: neither agrees nor disagrees
    (X, "e", "eval", 2.0, "Rate the summary"),
    (Y, "e", "eval", 4.0, "Rate the essay"),
]

# (iteration, purpose, item, sample, score, parse_status, forced): run "r"
JUDGMENTS = [
    (1, "train", A, 0, 1, "ok", False), (1, "train", A, 1, 3, "ok", False), (1, "train", A, 2, None, "no_score", False),
    (1, "train", B, 0, 3, "ok", False), (1, "train", B, 1, 3, "ok", False), (1, "train", B, 2, 1, "ok", False),
    (1, "train", C, 0, 4, "ok", False), (1, "train", C, 1, 1, "ok", True), (1, "train", C, 2, 5, "ok", False),
    (1, "train", N, 0, 2, "ok", False), (1, "train", N, 1, 2, "ok", False),
    (1, "train", N, 2, None, "out_of_range", False),
    (0, "eval", X, 0, 2, "ok", False), (0, "eval", Y, 0, 1, "ok", False),
    (1, "eval", X, 0, 3, "ok", False), (1, "eval", X, 1, 4, "ok", False), (1, "eval", Y, 0, 4, "ok", False),
    (2, "eval", X, 0, 3, "ok", False),
]
PROBS_A0 = (0.7, 0.1, 0.1, 0.05, 0.05)  # expected score 1.65


def rationale(it, purpose, item, sample):
    special = {(1, "train", A, 0): "A clear and FAITHFUL translation.",
               (1, "train", B, 1): "Mentions a faithful summary."}
    return special.get((it, purpose, item, sample), f"Judgment {it}/{purpose}/{item}/{sample}: adequate." + " x" * 150)


def jid(it, purpose, item, sample, run="r"):
    return judgment_id(run, it, purpose, item, "a", sample)


def judgment_row(run, it, purpose, item, sample, score, status, forced):
    row = {c: None for c in JUDGMENT_COLUMNS}
    text = rationale(it, purpose, item, sample)
    raw = text + ("" if score is None else f" [RESULT] {score}")
    if (it, purpose, item, sample) == (1, "train", B, 1):
        raw = None  # stored without its raw text: the search must still find its rationale
    row.update(judgment_id=jid(it, purpose, item, sample, run), run_id=run, iteration=it, purpose=purpose,
               item_id=item, side="a", sample_index=sample, model="m", raw_text=raw, text=raw, rationale=text,
               score=score, parse_status=status, forced=forced)
    if (it, purpose, item, sample) == (1, "train", A, 0):
        row.update(zip(("p1", "p2", "p3", "p4", "p5"), PROBS_A0))
    return row


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    s = Store(tmp_path_factory.mktemp("ws") / "selfrat.duckdb")
    for ds in ("d", "e"):
        rows = []
        for k, (item, dataset, split, gold, instruction) in enumerate(ITEMS):
            if dataset != ds:
                continue
            row = {c: None for c in ITEM_COLUMNS}
            row.update(item_id=item, content_hash=f"h{k}", dataset=dataset, split=split, kind="absolute",
                       instruction=instruction, response=f"response {k}", reference=f"reference {k}",
                       criteria="Is it right?", gold_score=gold, source_row=k + 1)
            rows.append(row)
        schema = {c: pl.Float64 if c == "gold_score" else pl.Int64 if c in ("item_id", "source_row") else pl.Utf8
                  for c in ITEM_COLUMNS}
        s.import_items(ds, "absolute", pl.DataFrame(rows, schema=schema), source="t", preset=None,
                       source_rows=len(rows))
    s.create_run("r", "loop", {"model": "m"})
    s.create_run("o", "loop", {"model": "m"})
    for it in (0, 1, 2):
        s.ensure_iteration("r", it, "m")
    s.set_stage("r", 1, "sample", "done")
    s.set_stage("r", 2, "sample", "running")
    s.update_run("r", status="running")
    s.insert_judgments([judgment_row("r", *j) for j in JUDGMENTS])
    s.insert_judgments([judgment_row("o", 1, "train", A, 0, 5, "ok", False)])  # another run: never counted
    # Pair ids out of item order, so "ordered by pair_id" is visible.
    pairs = pl.DataFrame({
        "pair_id": [40, 10, 30, 20], "item_id": [A, B, C, C],
        "chosen_id": [jid(1, "train", A, 0), jid(1, "train", B, 0), jid(1, "train", C, 0), jid(1, "train", C, 0)],
        "rejected_id": [jid(1, "train", A, 1), jid(1, "train", B, 2), jid(1, "train", C, 1), jid(1, "train", C, 2)],
        "margin": [2.0, 2.0, 3.0, 1.0],
    })
    s.save_curation("r", 1, pairs, {"strategy": "gold", "pairs": 4})
    s.apply_pair_action(10, "swap", "alice", note="rationale contradicts its score")
    s.apply_pair_action(20, "reject", "bob")
    s.apply_pair_action(30, "edit", "alice", rationale="Better.", score=4)
    s.apply_pair_action(40, "note", "carol", note="check the reference")
    s.put_metrics("r", 0, "e", {"pearson": 0.1, "exact": 0.5})
    s.put_metrics("r", 1, "e", {"pearson": 0.4, "exact": 0.5, "within1": 1.0})
    return s


def ids(frame: pl.DataFrame) -> list[int]:
    return frame["judgment_id"].to_list()


# ------------------------------------------------------------------------------------------ runs

def test_runs_overview_has_counts_and_the_last_iterations_stages(store):
    runs = {r["run_id"]: r for r in q.runs_overview(store).iter_rows(named=True)}
    assert set(runs) == {"r", "o"}
    r = runs["r"]
    assert (r["kind"], r["status"], r["iterations"], r["last_iteration"]) == ("loop", "running", 3, 2)
    assert (r["sample_status"], r["curate_status"], r["train_status"], r["evaluate_status"]) == \
        ("running", "pending", "pending", "pending")
    assert runs["o"]["iterations"] == 0 and runs["o"]["last_iteration"] is None
    assert q.runs_overview(store)["run_id"].to_list() == ["r", "o"]  # oldest first


def test_iterations_table_counts_judgments_parse_rate_and_pairs(store):
    t = q.iterations_table(store, "r")
    assert t["iteration"].to_list() == [0, 1, 2]
    assert t["train_judgments"].to_list() == [0, 12, 0]
    assert t["eval_judgments"].to_list() == [2, 3, 1]
    assert t["parse_rate"].to_list() == pytest.approx([1.0, 13 / 15, 1.0])
    assert t["pairs"].to_list() == [0, 4, 0]
    assert t["sample_status"].to_list() == ["pending", "done", "running"]
    assert t["curate_status"].to_list() == ["pending", "done", "pending"]
    assert t["sampler_model"].to_list() == ["m", "m", "m"]


def test_metrics_long_and_deltas(store):
    m = q.metrics_long(store, "r")
    assert m.columns == ["iteration", "dataset", "metric", "value"]
    assert m.height == 5
    assert m.filter(pl.col("metric") == "pearson")["value"].to_list() == [0.1, 0.4]
    d = {r["metric"]: r for r in q.metric_deltas(store, "r", 0, 1).iter_rows(named=True)}
    assert set(d) == {"exact", "pearson", "within1"}
    assert d["pearson"]["delta"] == pytest.approx(0.3) and d["exact"]["delta"] == 0.0
    assert (d["within1"]["value_a"], d["within1"]["value_b"], d["within1"]["delta"]) == (None, 1.0, None)
    assert q.metric_deltas(store, "r", 1, 0).filter(pl.col("metric") == "pearson")["delta"][0] == pytest.approx(-0.3)


def test_pair_counts_include_zero_statuses(store):
    pc = q.pair_counts(store, "r")
    assert pc.rows() == [(1, "auto", 1), (1, "accepted", 0), (1, "rejected", 1), (1, "swapped", 1), (1, "edited", 1)]
    assert q.pair_counts(store, "r", 1).rows() == pc.rows()
    assert q.pair_counts(store, "r", 2)["n"].to_list() == [0, 0, 0, 0, 0]
    assert q.pair_counts(store, "o").height == 0


# ------------------------------------------------------------------------------------------ judgments

def test_judgments_page_columns_order_and_values(store):
    page, total = q.judgments_page(store, F("r", iteration=1, purpose="train"), page=0, page_size=50)
    assert total == 12
    assert page.columns == ["judgment_id", "iteration", "purpose", "item_id", "dataset", "side", "sample_index",
                            "score", "gold_score", "parse_status", "forced", "rationale_preview", "expected_score"]
    assert list(zip(page["item_id"], page["sample_index"])) == [(i, s) for i in (A, B, C, N) for s in range(3)]
    first = page.row(0, named=True)
    assert first["expected_score"] == pytest.approx(1.65)
    assert first["dataset"] == "d" and first["gold_score"] == 1.0
    assert page["expected_score"].null_count() == 11
    long = page.filter(pl.col("item_id") == C)["rationale_preview"][0]
    assert len(long) == 200 and rationale(1, "train", C, 0).startswith(long)


def test_pagination_gives_page_two_of_three_and_the_total(store):
    f = F("r", iteration=1, purpose="train")
    everything = [jid(1, "train", i, s) for i in (A, B, C, N) for s in range(3)]
    pages = [q.judgments_page(store, f, page=p, page_size=5) for p in range(4)]
    assert [t for _, t in pages] == [12, 12, 12, 12]
    assert ids(pages[1][0]) == everything[5:10]   # B2, C0..C2, N0: crosses three buckets
    assert ids(pages[2][0]) == everything[10:]
    assert pages[3][0].height == 0 and pages[3][0].columns == pages[0][0].columns  # past the end: empty
    assert sum((ids(p) for p, _ in pages), []) == everything


@pytest.mark.parametrize("f, expected", [
    (F("r"), 18),
    (F("r", iteration=0), 2),
    (F("r", purpose="eval"), 6),
    (F("r", dataset="e"), 6),
    (F("r", dataset="d", iteration=1), 12),
    (F("r", gold=3), 3),                     # B: 2.5 rounds half up to 3
    (F("r", gold=2), 4),                     # X at iterations 0, 1 (twice) and 2
    (F("r", score=3), 5),
    (F("r", parse_status="no_score"), 1),
    (F("r", parse_status="out_of_range"), 1),
    (F("r", forced=True), 1),
    (F("r", forced=False), 17),
    (F("r", agreement="agree", purpose="train"), 4),     # A0, B0, B1, C0
    (F("r", agreement="disagree", purpose="train"), 4),  # A1, B2, C1, C2 (unscored A2 and gold-less N: neither)
    (F("r", agreement="agree"), 6),                      # + X0 at iteration 0, Y at iteration 1
    (F("r", text="faithful"), 2),            # case-insensitive; B1 has no raw_text, only its rationale
    (F("r", text="poem"), 3),                # the instruction of A
    (F("r", text="100%"), 3),                # a literal %, in C's instruction
    (F("r", text="_"), 3),                   # a literal _ matches only "proof_sketch", not every row
    (F("r", text="%"), 3),
    (F("r", text="[RESULT] 5"), 1),          # raw text beyond the rationale
    (F("r", iteration=1, purpose="train", gold=4, score=1, forced=True, agreement="disagree", text="ADEQUATE"), 1),
    (F("r", iteration=1, gold=4, score=1, forced=False), 0),
    (F("r", iteration=np.int64(1), score=np.int64(3), forced=np.bool_(False)), 4),  # widget values
    (F("o"), 1),
    (F("nope"), 0),
])
def test_each_filter_and_combinations_count_exactly(store, f, expected):
    page, total = q.judgments_page(store, f, page_size=100)
    assert total == expected and page.height == expected


def test_filtered_pages_match_a_plain_reference_at_several_page_sizes(store):
    """Bucketed paging against a straightforward Polars filter + sort + slice of the whole (tiny) table."""
    full = store._read(
        "SELECT j.*, i.gold_score, i.instruction FROM judgments j JOIN items i USING (item_id) WHERE run_id = 'r'")
    gold = (pl.col("gold_score") + 0.5).floor()
    filters = {
        F("r"): pl.lit(True),
        F("r", agreement="disagree"): pl.col("score") != gold,
        F("r", text="adequate"): pl.col("rationale").str.to_lowercase().str.contains("adequate", literal=True),
        F("r", purpose="eval"): pl.col("purpose") == "eval",
    }
    for f, expr in filters.items():
        ref = full.filter(expr.fill_null(False)).sort("iteration", "item_id", "side", "sample_index")["judgment_id"]
        for size in (2, 7):  # pages that cross buckets and iterations
            got = []
            for p in range(math.ceil(ref.len() / size) + 1):
                page, total = q.judgments_page(store, f, page=p, page_size=size)
                assert total == ref.len()
                got += ids(page)
            assert got == ref.to_list(), (f, size)


def test_judgments_page_rejects_bad_arguments(store):
    with pytest.raises(ValueError, match="agreement"):
        q.judgments_page(store, F("r", agreement="maybe"))
    with pytest.raises(ValueError, match="page_size"):
        q.judgments_page(store, F("r"), page_size=0)


def test_judgment_datasets_item_detail_and_item_judgments(store):
    assert q.judgment_datasets(store, "r") == ["d", "e"]
    assert q.judgment_datasets(store, "o") == ["d"]
    assert q.judgment_datasets(store, "nope") == []
    item = q.item_detail(store, A)
    assert item["instruction"] == "Translate the POEM into French" and item["gold_score"] == 1.0
    assert set(item) >= set(ITEM_COLUMNS)
    assert q.item_detail(store, 12345) == {}
    js = q.item_judgments(store, "r", X)
    assert list(zip(js["iteration"], js["sample_index"])) == [(0, 0), (1, 0), (1, 1), (2, 0)]
    assert set(JUDGMENT_COLUMNS) <= set(js.columns)
    a = q.item_judgments(store, "r", A, iteration=1)
    assert a["score"].to_list() == [1, 3, None]
    assert a["p1"].to_list() == [0.7, None, None] and a["text"][0].endswith("[RESULT] 1")


def test_score_histogram_counts_unscored_as_null(store):
    h = q.score_histogram(store, "r", purpose="train")
    assert h.rows() == [(1, 1, 3), (1, 2, 2), (1, 3, 3), (1, 4, 1), (1, 5, 1), (1, None, 2)]
    everything = q.score_histogram(store, "r")
    assert everything.filter(pl.col("iteration") == 0).rows() == [(0, 1, 1), (0, 2, 1)]
    assert everything["n"].sum() == 18


def test_confusion_counts_scored_judgments_with_gold(store):
    assert q.confusion(store, "r", 1, purpose="train").rows() == [
        (1, 1, 1), (1, 3, 1), (3, 1, 1), (3, 3, 2), (4, 1, 1), (4, 4, 1), (4, 5, 1)]
    assert q.confusion(store, "r", 1).rows() == [
        (1, 1, 1), (1, 3, 1), (2, 3, 1), (2, 4, 1), (3, 1, 1), (3, 3, 2), (4, 1, 1), (4, 4, 2), (4, 5, 1)]
    assert q.confusion(store, "r", 0, purpose="train").height == 0


# ------------------------------------------------------------------------------------------ pairs

def test_pairs_page_shows_texts_as_the_human_left_them(store):
    page, total = q.pairs_page(store, "r", 1, page=0, page_size=3)
    assert total == 4 and page["pair_id"].to_list() == [10, 20, 30]
    assert page.columns[:10] == ["pair_id", "item_id", "status", "swapped", "margin", "note", "updated_by",
                                 "updated_at", "chosen_id", "rejected_id"]
    swapped = page.row(0, named=True)
    # Pair 10 was curated as chosen B0 (score 3) over rejected B2 (score 1); alice swapped it.
    assert (swapped["status"], swapped["swapped"], swapped["updated_by"]) == ("swapped", True, "alice")
    assert swapped["chosen_id"] == jid(1, "train", B, 2) and swapped["chosen_score"] == 1
    assert swapped["chosen_text"] == rationale(1, "train", B, 2) + " [RESULT] 1"
    assert swapped["rejected_score"] == 3 and swapped["rejected_text"].endswith("[RESULT] 3")
    assert swapped["note"] == "rationale contradicts its score"
    assert (swapped["gold_score"], swapped["instruction"], swapped["reference"], swapped["criteria"]) == \
        (2.5, "Summarise the article", "reference 1", "Is it right?")
    edited = page.row(2, named=True)
    assert (edited["status"], edited["edited_rationale"], edited["edited_score"]) == ("edited", "Better.", 4)
    assert edited["chosen_score"] == 4 and edited["rejected_score"] == 1
    rest, total = q.pairs_page(store, "r", 1, page=1, page_size=3)
    assert rest["pair_id"].to_list() == [40] and rest["status"].to_list() == ["auto"] and total == 4
    only, total = q.pairs_page(store, "r", 1, status="rejected")
    assert only["pair_id"].to_list() == [20] and total == 1 and only["updated_by"].to_list() == ["bob"]
    empty, total = q.pairs_page(store, "r", 2)
    assert empty.height == 0 and total == 0 and empty.columns == page.columns
    with pytest.raises(ValueError, match="status"):
        q.pairs_page(store, "r", 1, status="maybe")


def test_bulk_ids_honour_the_filter(store):
    assert q.pair_ids(store, "r", 1) == [10, 20, 30, 40]
    assert q.pair_ids(store, "r", 1, status="auto") == [40]
    assert q.pair_ids(store, "r", 1, status="accepted") == []
    assert q.pair_ids(store, "r", 2) == []


def test_bulk_action_on_filtered_ids_changes_only_those(tmp_path_factory, store):
    # A copy of the workspace, so the module's fixture keeps its state.
    copy = tmp_path_factory.mktemp("copy") / "selfrat.duckdb"
    for suffix in ("", ".wal"):
        src = store.path.with_name(store.path.name + suffix)
        if src.exists():
            copy.with_name(copy.name + suffix).write_bytes(src.read_bytes())
    s = Store(copy)
    s.apply_pair_action(q.pair_ids(s, "r", 1, status="auto"), "accept", "dora")
    assert q.pair_counts(s, "r", 1).rows() == [
        (1, "auto", 0), (1, "accepted", 1), (1, "rejected", 1), (1, "swapped", 1), (1, "edited", 1)]
    assert q.pair_ids(s, "r", 1, status="accepted") == [40]


def test_audit_history_newest_first_with_filters(store):
    h = q.audit_history(store, "r")
    assert h["action"].to_list() == ["note", "edit", "reject", "swap"]
    assert h["who"].to_list() == ["carol", "alice", "bob", "alice"]
    assert q.audit_history(store, "r", pair_id=10)["action"].to_list() == ["swap"]
    assert q.audit_history(store, "r", iteration=1, limit=2)["pair_id"].to_list() == [40, 30]
    assert q.audit_history(store, "r", iteration=0).height == 0
    assert q.audit_history(store, "o").height == 0


def test_curate_report(store):
    assert q.curate_report(store, "r", 1) == {"strategy": "gold", "pairs": 4}
    assert q.curate_report(store, "r", 0) is None


# ------------------------------------------------------------------------------------------ compare

def test_compare_iterations_drift_and_rationales(store):
    c = q.compare_iterations(store, "r", 0, 1)
    assert c.columns == ["item_id", "side", "dataset", "gold_score", "score_a", "score_b", "drift",
                         "rationale_a", "rationale_b", "instruction"]
    # Y: 1 -> 4; X: 2 -> mean(3, 4) = 3.5. Largest |drift| first.
    assert c.select("item_id", "score_a", "score_b", "drift").rows() == [(Y, 1.0, 4.0, 3.0), (X, 2.0, 3.5, 1.5)]
    x = c.row(1, named=True)
    assert x["rationale_a"] == rationale(0, "eval", X, 0) and x["rationale_b"] == rationale(1, "eval", X, 0)
    assert (x["dataset"], x["gold_score"], x["instruction"]) == ("e", 2.0, "Rate the summary")
    # Only items judged in both: Y has no judgment at iteration 2.
    later = q.compare_iterations(store, "r", 1, 2)
    assert later.select("item_id", "score_a", "score_b", "drift").rows() == [(X, 3.5, 3.0, -0.5)]
    assert q.compare_iterations(store, "r", 0, 1, limit=1)["item_id"].to_list() == [Y]
    assert q.compare_iterations(store, "r", 0, 1, limit=1, offset=1)["item_id"].to_list() == [X]
    assert q.compare_iterations(store, "r", 0, 1, purpose="train").height == 0


def test_compare_summary_and_drift_histogram(store):
    s = q.compare_summary(store, "r", 0, 1)
    assert s == {"items": 2, "mean_drift": 2.25, "mean_abs_drift": 2.25, "changed": 2, "up": 2, "down": 0}
    assert q.drift_histogram(store, "r", 0, 1).rows() == [(1.5, 1), (3.0, 1)]
    assert q.compare_summary(store, "r", 1, 2)["down"] == 1


def test_every_query_reads_only_its_run(store):
    """Run "o" shares item A with run "r"; none of its rows may leak into r's answers and vice versa."""
    assert q.item_judgments(store, "o", A)["score"].to_list() == [5]
    assert q.score_histogram(store, "o").rows() == [(1, 5, 1)]
    assert q.iterations_table(store, "o").height == 0
    for combo in itertools.product([None, 1], [None, "train"]):
        assert q.judgments_page(store, F("o", iteration=combo[0], purpose=combo[1]))[1] == 1
