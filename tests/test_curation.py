"""Curation on fixed judgments with known answers: gold, majority (with a tied mode), meta (ranking and
margin), balance, dedupe, length bias, the report's counts, and bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from pydantic import ValidationError

from engine.config import CurationConfig
from engine.curation import curate, pair_ids

from helpers import cli, fake_sampled_run

ITEMS = {"x": 1, "nochosen": 2, "norejected": 3, "unscored": 4, "nogold": 5, "ok": 6, "a": 7, "b": 8, "c": 9,
         "d": 10, "e": 11, "tie": 12, "y": 13, "z": 14}
NAMES = {v: k for k, v in ITEMS.items()}


def frames(rows):
    """rows: (item, sample_index, score, gold[, forced[, text[, rationale_len]]]) -> (judgments, golds) as the
    store returns them. A text left out is unique to its row; rationale_len defaults to 100."""
    def opt(r, i, default):
        return r[i] if len(r) > i and r[i] is not None else default

    judgments = pl.DataFrame(
        {
            "judgment_id": [ITEMS[r[0]] * 100 + r[1] for r in rows],
            "item_id": [ITEMS[r[0]] for r in rows],
            "sample_index": [r[1] for r in rows],
            "score": [r[2] for r in rows],
            "forced": [opt(r, 4, False) for r in rows],
            "text_hash": [hash(opt(r, 5, f"{r[0]}/{r[1]}")) for r in rows],
            "rationale_len": [opt(r, 6, 100) for r in rows],
        },
        schema_overrides={"score": pl.Int32, "text_hash": pl.Int64},
    )
    golds = pl.DataFrame({"item_id": [ITEMS[r[0]] for r in rows], "gold_score": [r[3] for r in rows]},
                         schema_overrides={"gold_score": pl.Float64}).unique("item_id")
    return judgments, golds


def run(rows, ratings=None, **cfg):
    judgments, golds = frames(rows)
    if ratings is not None:  # {(item, sample): rating}
        ratings = {ITEMS[i] * 100 + s: r for (i, s), r in ratings.items()}
    return curate(judgments, golds, CurationConfig(**cfg), ratings=ratings)


def pair_set(result):
    return {(NAMES[c // 100], c % 100, r % 100) for c, r in zip(result.pairs["chosen_id"], result.pairs["rejected_id"])}


def partitions_items(report) -> bool:
    return report["items_with_pairs"] + sum(report["skipped"].values()) == report["items"]


# ------------------------------------------------------------------ gold


def test_chosen_matches_gold_rejected_misses_by_margin():
    rows = [("x", 0, 3, 3.0), ("x", 1, 4, 3.0), ("x", 2, 1, 3.0), ("x", 3, 3, 3.0)]
    assert pair_set(run(rows, min_margin=1, max_pairs_per_item=4)) == {("x", 0, 2), ("x", 3, 1)}
    # margin 2: only the judgment that missed by 2 may be rejected, and it is used once
    assert pair_set(run(rows, min_margin=2, max_pairs_per_item=4)) == {("x", 0, 2)}


def test_cap_and_no_judgment_reused_in_a_role():
    rows = [("x", i, 5, 5.0) for i in range(3)] + [("x", 3 + i, 1, 5.0) for i in range(3)]
    res = run(rows, min_margin=1, max_pairs_per_item=2)
    assert res.pairs.height == 2
    assert res.pairs["chosen_id"].n_unique() == 2 and res.pairs["rejected_id"].n_unique() == 2
    assert set(res.pairs["margin"].to_list()) == {4.0}


def test_skipped_items_are_counted_by_reason():
    rows = [
        ("nochosen", 0, 2, 4.0), ("nochosen", 1, 1, 4.0),
        ("norejected", 0, 4, 4.0), ("norejected", 1, 4, 4.0),
        ("unscored", 0, None, 4.0),
        ("nogold", 0, 3, None),
        ("ok", 0, 4, 4.0), ("ok", 1, 2, 4.0),
    ]
    res = run(rows)
    assert res.report["skipped"] == {"no_gold": 1, "no_scored_judgment": 1, "no_chosen": 1, "no_rejected": 1}
    assert res.report["pairs"] == 1 and res.report["items"] == 5
    assert res.report["chosen_score_hist"]["4"] == 1
    assert partitions_items(res.report)


def test_averaged_gold_is_rounded_and_forced_can_be_excluded():
    rows = [("x", 0, 4, 3.67), ("x", 1, 2, 3.67, True), ("x", 2, 1, 3.67)]
    assert pair_set(run(rows, min_margin=1)) == {("x", 0, 2), }
    assert pair_set(run(rows, min_margin=1, use_forced=True, max_pairs_per_item=1)) == {("x", 0, 2)}
    res = run([("x", 0, 4, 4.0), ("x", 1, 1, 4.0, True)], use_forced=False)
    assert res.pairs.height == 0 and res.report["skipped"]["no_rejected"] == 1


def test_pair_ids_are_deterministic_and_order_of_rows_does_not_matter():
    rows = [("x", 0, 3, 3.0), ("x", 1, 1, 3.0), ("ok", 0, 1, 4.0), ("ok", 1, 4, 4.0), ("ok", 2, 2, 4.0)]
    a, b = run(rows), run(list(reversed(rows)))
    assert sorted(a.pairs["pair_id"].to_list()) == sorted(b.pairs["pair_id"].to_list())
    assert pair_set(a) == pair_set(b) == {("x", 0, 1), ("ok", 1, 0)}
    assert a.pairs["pair_id"].n_unique() == a.pairs.height


# ------------------------------------------------------------------ majority


def test_majority_pairs_the_mode_with_the_judgments_off_it():
    rows = [("x", 0, 3, None), ("x", 1, 3, None), ("x", 2, 4, None), ("x", 3, 1, None), ("x", 4, 3, None)]
    # mode 3 (three votes); rejected by largest miss first: sample 3 (|1-3| = 2), then sample 2 (|4-3| = 1)
    res = run(rows, strategy="majority", min_margin=1, max_pairs_per_item=3)
    assert pair_set(res) == {("x", 0, 3), ("x", 1, 2)}
    assert sorted(res.pairs["margin"].to_list()) == [1.0, 2.0]
    assert pair_set(run(rows, strategy="majority", min_margin=2, max_pairs_per_item=3)) == {("x", 0, 3)}


def test_majority_skips_a_tied_mode_and_needs_no_gold():
    rows = [
        ("tie", 0, 2, 2.0), ("tie", 1, 5, 2.0), ("tie", 2, 2, 2.0), ("tie", 3, 5, 2.0),  # 2 and 5 tie at 2 votes
        ("nogold", 0, 1, None), ("nogold", 1, 1, None), ("nogold", 2, 5, None),
        ("norejected", 0, 4, 1.0), ("norejected", 1, 4, 1.0),
        ("unscored", 0, None, 3.0),
        ("ok", 0, 4, 4.0),  # one judgment: it is the mode, and nothing is off it
    ]
    res = run(rows, strategy="majority", min_margin=1)
    assert pair_set(res) == {("nogold", 0, 2)}  # gold plays no part: 'tie' has gold 2, and is skipped
    assert res.report["skipped"] == {"no_scored_judgment": 1, "tied_mode": 1, "no_rejected": 2}
    assert res.report["margin_hist"] == {"1": 0, "2": 0, "3": 0, "4": 1}
    assert res.report["chosen_score_hist"]["1"] == 1 and partitions_items(res.report)


def test_majority_counts_identical_texts_once():
    # Three copies of one text vote 2, two different texts vote 4: with dedupe the mode is 4.
    rows = [("x", 0, 2, None, False, "same"), ("x", 1, 2, None, False, "same"), ("x", 2, 2, None, False, "same"),
            ("x", 3, 4, None), ("x", 4, 4, None)]
    assert pair_set(run(rows, strategy="majority", dedupe=True, max_pairs_per_item=4)) == {("x", 3, 0)}
    assert pair_set(run(rows, strategy="majority", dedupe=False, max_pairs_per_item=4)) == {("x", 0, 3), ("x", 1, 4)}


# ------------------------------------------------------------------ meta


META_ROWS = [("x", s, 3, None) for s in range(5)] + [("y", 0, 2, None), ("y", 1, 4, None)] + \
            [("z", 0, 1, None), ("z", 1, 5, None)] + [("a", 0, 3, None), ("a", 1, None, None)]
META_RATINGS = {("x", 0): 3, ("x", 1): 5, ("x", 2): 1, ("x", 3): 5, ("x", 4): 2,
                ("y", 0): 4, ("y", 1): 4,       # equal ratings: no margin
                ("a", 0): 5, ("a", 1): 1}       # a's rated-low judgment has no score: not usable


def test_meta_pairs_highest_rated_with_lowest_rated_in_rank_order():
    # x by rating: s1 (5), s3 (5), s0 (3), s4 (2), s2 (1): best meets worst, second meets second worst.
    res = run(META_ROWS, META_RATINGS, strategy="meta", min_margin=1, max_pairs_per_item=4)
    assert pair_set(res) == {("x", 1, 2), ("x", 3, 4)}
    assert res.pairs.sort("margin")["margin"].to_list() == [3.0, 4.0]
    assert res.report["skipped"] == {"no_scored_judgment": 0, "no_ratings": 1, "no_margin": 2}  # z; y and a
    assert res.report["margin_hist"] == {"1": 0, "2": 0, "3": 1, "4": 1} and partitions_items(res.report)
    # the margin filter and the cap keep the top of the ranking
    assert pair_set(run(META_ROWS, META_RATINGS, strategy="meta", min_margin=4, max_pairs_per_item=4)) == {("x", 1, 2)}
    assert pair_set(run(META_ROWS, META_RATINGS, strategy="meta", min_margin=1, max_pairs_per_item=1)) == {("x", 1, 2)}


def test_meta_takes_a_ratings_frame_and_checks_it():
    judgments, _ = frames(META_ROWS)
    frame = pl.DataFrame({"judgment_id": [ITEMS[i] * 100 + s for i, s in META_RATINGS],
                          "rating": list(META_RATINGS.values())})
    res = curate(judgments, None, CurationConfig(strategy="meta", max_pairs_per_item=4), ratings=frame)
    assert pair_set(res) == {("x", 1, 2), ("x", 3, 4)}
    with pytest.raises(ValueError, match="judgment 101: meta rating 7 is not an integer in 1..5"):
        curate(judgments, None, CurationConfig(strategy="meta"), ratings={101: 7})
    with pytest.raises(ValueError, match="needs meta ratings"):
        curate(judgments, None, CurationConfig(strategy="meta"))


def test_meta_never_pairs_identical_texts():
    rows = [("x", 0, 3, None, False, "same"), ("x", 1, 3, None, False, "same")]
    ratings = {("x", 0): 5, ("x", 1): 1}  # a sampled meta-judge may rate one text twice, differently
    res = run(rows, ratings, strategy="meta", dedupe=False)
    assert res.pairs.height == 0 and res.report["skipped"]["no_margin"] == 1
    res = run(rows, ratings, strategy="meta", dedupe=True)
    assert res.pairs.height == 0 and res.report["duplicates"] == 1


# ------------------------------------------------------------------ options


def test_dedupe_keeps_the_first_copy_and_never_pairs_a_copy():
    rows = [("x", 0, 3, 3.0, False, "A"), ("x", 1, 3, 3.0, False, "A"), ("x", 2, 1, 3.0, False, "B"),
            ("x", 3, 1, 3.0, False, "B"), ("x", 4, 5, 3.0, False, "C")]
    on = run(rows, dedupe=True, max_pairs_per_item=4)
    assert pair_set(on) == {("x", 0, 2)}  # one chosen text, so one pair
    assert on.report["duplicates"] == 2 and on.report["usable"] == 3
    assert pair_set(run(list(reversed(rows)), dedupe=True, max_pairs_per_item=4)) == {("x", 0, 2)}
    off = run(rows, dedupe=False, max_pairs_per_item=4)
    assert pair_set(off) == {("x", 0, 2), ("x", 1, 3)} and off.report["duplicates"] == 0
    # the same text in two items is not a duplicate
    assert run([("x", 0, 3, 3.0, False, "A"), ("y", 0, 3, 3.0, False, "A")]).report["duplicates"] == 0


def test_dedupe_needs_the_text_hash():
    judgments, golds = frames([("x", 0, 3, 3.0), ("x", 1, 1, 3.0)])
    with pytest.raises(ValueError, match="dedupe needs a text_hash"):
        curate(judgments.drop("text_hash"), golds, CurationConfig(dedupe=True))
    with_text = judgments.drop("text_hash").with_columns(text=pl.Series(["A", "A"]))
    assert curate(with_text, golds, CurationConfig(dedupe=True)).report["duplicates"] == 1  # hashed here
    no_text = with_text.with_columns(text=pl.Series([None, None], dtype=pl.String))
    assert curate(no_text, golds, CurationConfig(dedupe=True)).report["duplicates"] == 0  # no text, no copy
    assert curate(judgments.drop("text_hash"), golds, CurationConfig(dedupe=False)).pairs.height == 1


BALANCE_ROWS = [
    ("a", 0, 2, 2.0), ("a", 1, 2, 2.0), ("a", 2, 5, 2.0), ("a", 3, 5, 2.0),  # two pairs, chosen score 2
    ("b", 0, 2, 2.0), ("b", 1, 4, 2.0),                                      # one pair, chosen 2
    ("c", 0, 5, 5.0), ("c", 1, 1, 5.0),                                      # one pair, chosen 5
    ("d", 0, 5, 5.0), ("d", 1, 3, 5.0),                                      # one pair, chosen 5
]


def test_balance_keeps_the_rarest_chosen_scores_count_first_pairs_first():
    plain = run(BALANCE_ROWS, max_pairs_per_item=2)
    assert plain.report["chosen_score_hist"] == {"1": 0, "2": 3, "3": 0, "4": 0, "5": 2}
    res = run(BALANCE_ROWS, max_pairs_per_item=2, balance_scores=True)
    # score 2 has 3 pairs, score 5 has 2: item a's second pair goes (first pairs of items go first)
    assert pair_set(res) == {("a", 0, 2), ("b", 0, 1), ("c", 0, 1), ("d", 0, 1)}
    assert res.report["chosen_score_hist"] == {"1": 0, "2": 2, "3": 0, "4": 0, "5": 2}
    assert res.report["balanced_away"] == 1 and res.report["skipped"]["balanced_out"] == 0


def test_balance_picks_by_pair_id_and_counts_items_balanced_out():
    rows = BALANCE_ROWS + [("e", 0, 2, 2.0), ("e", 1, 1, 2.0)]  # a third first pair with chosen score 2
    res = run(rows, max_pairs_per_item=2, balance_scores=True)
    firsts = {("a", 0, 2), ("b", 0, 1), ("e", 0, 1)}
    ids = {p: int(pair_ids(np.array([ITEMS[p[0]] * 100 + p[1]]), np.array([ITEMS[p[0]] * 100 + p[2]]))[0])
           for p in firsts}
    kept = set(sorted(firsts, key=ids.get)[:2])  # the two first pairs with the smaller pair ids
    assert pair_set(res) == kept | {("c", 0, 1), ("d", 0, 1)}
    assert res.report["balanced_away"] == 2 and res.report["skipped"]["balanced_out"] == 1
    assert partitions_items(res.report)
    assert pair_set(run(list(reversed(rows)), max_pairs_per_item=2, balance_scores=True)) == pair_set(res)
    empty = run([("x", 0, 3, 3.0)], balance_scores=True).report  # no pairs: nothing to balance, same keys
    assert empty["skipped"]["balanced_out"] == 0 and empty["balanced_away"] == 0 and empty["pairs"] == 0


# ------------------------------------------------------------------ report


def test_length_bias_warns_when_one_side_is_much_longer():
    def bias(chosen_len, rejected_len):
        rows = [("x", 0, 3, 3.0, False, None, chosen_len), ("x", 1, 1, 3.0, False, None, rejected_len),
                ("y", 0, 4, 4.0, False, None, chosen_len), ("y", 1, 2, 4.0, False, None, rejected_len)]
        return run(rows).report

    longer = bias(300, 100)
    assert longer["length_bias"] == {"chosen_mean_chars": 300.0, "rejected_mean_chars": 100.0, "ratio": 3.0}
    assert len(longer["warnings"]) == 1 and "chosen rationales are 3.00x as long as rejected" in longer["warnings"][0]
    shorter = bias(100, 200)
    assert shorter["length_bias"]["ratio"] == 0.5
    assert "rejected rationales are 2.00x as long as chosen" in shorter["warnings"][0]
    balanced = bias(100, 110)
    assert balanced["length_bias"]["ratio"] == pytest.approx(0.909, abs=1e-3) and balanced["warnings"] == []
    assert bias(125, 100)["warnings"] == []  # the edge of the band is still fine


def test_report_counts():
    rows = [
        ("x", 0, 3, 3.0, False, None, 200), ("x", 1, 3, 3.0, False, None, 220), ("x", 2, 1, 3.0, False, None, 100),
        ("x", 3, 5, 3.0, False, None, 80), ("x", 4, None, 3.0),
        ("ok", 0, 4, 4.0, False, "T"), ("ok", 1, 4, 4.0, False, "T"), ("ok", 2, 4, 4.0),
        ("nogold", 0, 2, None),
    ]
    r = run(rows, min_margin=2, max_pairs_per_item=2).report
    assert (r["strategy"], r["items"], r["judgments"], r["usable"], r["duplicates"]) == ("gold", 3, 9, 7, 1)
    assert (r["pairs"], r["items_with_pairs"]) == (2, 1)
    assert r["skipped"] == {"no_gold": 1, "no_scored_judgment": 0, "no_chosen": 0, "no_rejected": 1}
    assert r["chosen_score_hist"] == {"1": 0, "2": 0, "3": 2, "4": 0, "5": 0}
    assert r["margin_hist"] == {"1": 0, "2": 2, "3": 0, "4": 0}
    assert r["length_bias"] == {"chosen_mean_chars": 210.0, "rejected_mean_chars": 90.0, "ratio": 2.333}
    assert r["params"]["min_margin"] == 2 and "balanced_away" not in r


def test_bad_input_names_the_judgment():
    with pytest.raises(ValueError, match="judgment 100: score 7 is not in 1..5"):
        run([("x", 0, 7, 3.0)])
    judgments, golds = frames([("x", 0, 3, 3.0)])
    with pytest.raises(ValueError, match="sample_index 70"):
        curate(judgments.with_columns(sample_index=pl.lit(70)), golds, CurationConfig())
    with pytest.raises(ValueError, match="lack column"):
        curate(judgments.drop("forced"), golds, CurationConfig())


# ------------------------------------------------------------------ against plain Python


def _reference(rows, cfg, ratings):
    """A per-item Python loop over the rules in engine.curation's docstring."""
    out, by_item = set(), {}
    for r in rows:
        by_item.setdefault(r[0], []).append(r)
    for js in by_item.values():
        js = [r for r in sorted(js, key=lambda r: r[1]) if r[2] is not None and (cfg.use_forced or not r[4])]
        if cfg.dedupe:
            seen, first = set(), []
            for r in js:
                if r[5] not in seen:
                    seen.add(r[5])
                    first.append(r)
            js = first
        if not js:
            continue
        if cfg.strategy == "meta":
            rated = sorted((r for r in js if (r[0], r[1]) in ratings), key=lambda r: (-ratings[r[0], r[1]], r[1]))
            for k in range(min(cfg.max_pairs_per_item, len(rated) // 2)):
                c, w = rated[k], rated[len(rated) - 1 - k]
                if ratings[c[0], c[1]] - ratings[w[0], w[1]] >= cfg.min_margin and c[5] != w[5]:
                    out.add((c[0] * 100 + c[1], w[0] * 100 + w[1]))
            continue
        if cfg.strategy == "gold":
            if js[0][3] is None:
                continue
            target = int(js[0][3] + 0.5)
        else:
            votes = {s: sum(r[2] == s for r in js) for s in {r[2] for r in js}}
            top = max(votes.values())
            if list(votes.values()).count(top) > 1:
                continue
            target = next(s for s, v in votes.items() if v == top)
        ch = [r for r in js if r[2] == target]
        rj = sorted((r for r in js if abs(r[2] - target) >= cfg.min_margin), key=lambda r: (-abs(r[2] - target), r[1]))
        out |= {(c[0] * 100 + c[1], r[0] * 100 + r[1]) for c, r in list(zip(ch, rj))[:cfg.max_pairs_per_item]}
    return out


@pytest.mark.parametrize("strategy", ["gold", "majority", "meta"])
def test_vectorised_curation_equals_a_plain_python_pass(strategy):
    rng = random.Random(7)
    rows, ratings = [], {}
    for i in range(300):
        gold = rng.choice([1, 2, 3, 4, 5, 2.5, None])
        for j in range(rng.randint(1, 8)):
            score, forced = rng.choice([1, 2, 3, 4, 5, None]), rng.random() < 0.2
            # Some identical texts; like real ones, they carry the same score.
            text = hash((score, forced, rng.randint(0, 1))) if rng.random() < 0.3 else 1000 + j
            rows.append((i, j, score, gold, forced, text))
            if rng.random() < 0.8:
                ratings[i, j] = rng.randint(1, 5)
    judgments = pl.DataFrame({"judgment_id": [r[0] * 100 + r[1] for r in rows], "item_id": [r[0] for r in rows],
                              "sample_index": [r[1] for r in rows], "score": [r[2] for r in rows],
                              "forced": [r[4] for r in rows], "text_hash": [r[5] for r in rows]},
                             schema_overrides={"score": pl.Int32})
    golds = pl.DataFrame({"item_id": [r[0] for r in rows], "gold_score": [r[3] for r in rows]},
                         schema_overrides={"gold_score": pl.Float64}).unique("item_id")
    by_id = {i * 100 + j: v for (i, j), v in ratings.items()}
    for margin, cap, use_forced, dedupe in [(1, 2, True, True), (2, 3, False, False), (1, 1, True, False)]:
        cfg = CurationConfig(strategy=strategy, min_margin=margin, max_pairs_per_item=cap, use_forced=use_forced,
                             dedupe=dedupe)
        got = curate(judgments, golds, cfg, ratings=by_id)
        assert set(zip(got.pairs["chosen_id"].to_list(), got.pairs["rejected_id"].to_list())) == \
            _reference(rows, cfg, ratings)
        assert partitions_items(got.report)


def test_unknown_strategy_is_refused():
    with pytest.raises(ValidationError, match="strategy"):
        CurationConfig(strategy="vibes")


# ------------------------------------------------------------------ selfrat curate


@pytest.fixture
def sampled(tmp_path):
    """A workspace whose run 'c' (gold, margin 1, 2 pairs per item) has iteration 1 sampled by a scripted judge."""

    def script(messages, index, seed):
        return f"Reasoning {seed}{' at length' * (seed % 3)}. [RESULT] {seed % 5 + 1}"

    return fake_sampled_run(tmp_path / "ws", "c", script, max_train_items=30, n=6).ws.root


def curate_c(ws, *args, ok=True):
    """`selfrat curate --run c ARGS...` in workspace `ws`."""
    return cli(ws, "curate", "--run", "c", *args, ok=ok)


def snapshot(store):
    return (store.run("c")["config"], store.iterations("c"), store.pairs("c", 1).to_dicts(),
            store.audit_log("c").height)


def test_curate_dry_run_writes_nothing_and_prints_the_preview(sampled):
    from engine.curation import preview
    from store import Store

    store = Store.in_workspace(sampled)
    before = snapshot(store)
    out = curate_c(sampled, "--iteration", "1", "--dry-run", "--json", "--strategy", "majority",
                   "--min-margin", "2").output
    report = json.loads(out)
    assert report == preview(store, "c", 1, CurationConfig(strategy="majority", min_margin=2, max_pairs_per_item=2))
    assert report["strategy"] == "majority" and report["params"]["min_margin"] == 2 and report["judgments"] == 180
    assert snapshot(store) == before  # no pairs, no stage change, the run's config as it was
    assert store.iteration("c", 1)["curate_status"] == "pending"
    text = curate_c(sampled, "--iteration", "1", "--dry-run").output
    assert "curation of c iteration 1 (dry run: nothing written): strategy gold, min_margin 1" in text
    assert "pairs from" in text and "chosen score: 1=" in text and "rationale length: chosen" in text
    assert snapshot(store) == before


def test_curate_records_overrides_and_curates_again(sampled):
    from store import Store

    store = Store.in_workspace(sampled)
    first = json.loads(curate_c(sampled, "--iteration", "1", "--json").output)
    assert first["params"]["min_margin"] == 1 and store.pairs("c", 1).height == first["pairs"] > 0
    strict = json.loads(curate_c(sampled, "--iteration", "1", "--dry-run", "--json", "--min-margin", "3").output)
    again = json.loads(curate_c(sampled, "--iteration", "1", "--json", "--min-margin", "3").output)
    assert again == strict and 0 < again["pairs"] < first["pairs"]
    assert store.pairs("c", 1).height == again["pairs"] and set(store.pairs("c", 1)["margin"]) <= {3.0, 4.0}
    assert store.run("c")["config"]["curation"]["min_margin"] == 3
    assert "min_margin: 3" in (sampled / "runs" / "c" / "config.yaml").read_text()
    assert "curation.min_margin: 1 -> 3" in (sampled / "runs" / "c" / "run.log").read_text()
    # the same settings again: nothing to redo
    assert json.loads(curate_c(sampled, "--iteration", "1", "--json", "--min-margin", "3").output) == again


def test_curate_refuses_to_drop_reviewed_or_trained_pairs(sampled):
    from store import Store

    store = Store.in_workspace(sampled)
    curate_c(sampled, "--iteration", "1", "--json")
    pairs = store.pairs("c", 1)
    store.apply_pair_action(int(pairs["pair_id"][0]), "accept", "alice")
    res = curate_c(sampled, "--iteration", "1", "--min-margin", "2", ok=False)
    assert res.exit_code == 2 and "have human reviews" in res.output
    assert store.run("c")["config"]["curation"]["min_margin"] == 1 and store.pairs("c", 1).height == pairs.height
    store.set_stage("c", 1, "train", "done")
    res = curate_c(sampled, "--iteration", "1", "--strategy", "majority", ok=False)
    assert res.exit_code == 2 and "trained on its current pairs" in res.output


def test_curate_names_bad_options_and_unsampled_iterations(sampled):
    res = curate_c(sampled, "--iteration", "1", "--min-margin", "9", "--dry-run", ok=False)
    assert res.exit_code == 2 and "min_margin: Input should be less than or equal to 4" in res.output
    res = curate_c(sampled, "--iteration", "1", "--strategy", "vibes", "--dry-run", ok=False)
    assert res.exit_code == 2 and "strategy: Input should be 'gold', 'majority' or 'meta'" in res.output
    res = curate_c(sampled, "--iteration", "2", "--dry-run", ok=False)
    assert res.exit_code == 2 and "has no iteration 2" in res.output


def test_launch_page_previews_the_strategy_and_options_of_the_form(sampled, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from engine.curation import preview
    from store import Store

    monkeypatch.setenv("SELFRAT_HOME", str(sampled))
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "ui" / "app.py"), default_timeout=60)
    at.session_state["who"] = "tester"
    at.run()
    at.switch_page("views/launch.py").run()
    at.selectbox(key="l_new_strategy").select("majority")
    at.number_input(key="l_new_min_margin").set_value(2)
    at.checkbox(key="l_new_balance").check()
    next(b for b in at.button if b.label == "Check").click().run()
    assert not at.exception, [e.message for e in at.exception]
    want = preview(Store.in_workspace(sampled), "c", 1,
                   CurationConfig(strategy="majority", min_margin=2, max_pairs_per_item=1, balance_scores=True))
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Pairs"] == str(want["pairs"]) and metrics["skipped: tied mode"] == str(want["skipped"]["tied_mode"])
    assert metrics["skipped: balanced out"] == str(want["skipped"]["balanced_out"])
    assert metrics["Length ratio chosen / rejected"] == f"{want['length_bias']['ratio']:.2f}"
    assert [w.value for w in at.warning] == want["warnings"]
