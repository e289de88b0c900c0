"""engine.evaluation on fixed judgments: prediction methods, metrics, breakdowns, the confusion matrix."""

from __future__ import annotations

import json
import math

import polars as pl
import pytest

from engine.evaluation import confusion_breakdown, dataset_metrics, evaluate_judgments, predictions
from store import Store
from store.store import ITEM_COLUMNS, JUDGMENT_COLUMNS

ITEM_SCHEMA = {c: (pl.Float64 if c == "gold_score" else pl.Int64 if c in ("item_id", "source_row") else pl.String)
               for c in ITEM_COLUMNS}


def items_frame(rows: list[dict], kind: str = "absolute") -> pl.DataFrame:
    out = []
    for i, r in enumerate(rows):
        row = {c: None for c in ITEM_COLUMNS}
        row.update(item_id=i + 1, content_hash=f"h{i}", dataset="d", split="eval", kind=kind,
                   instruction=f"q{i}", response=f"r{i}", criteria="Is it helpful?")
        meta = r.pop("meta", None)
        row.update(r)
        row["meta"] = None if meta is None else json.dumps(meta)
        out.append(row)
    return pl.DataFrame(out, schema=ITEM_SCHEMA)


def judgments_frame(scores: dict[tuple[int, str], list[int | None]]) -> pl.DataFrame:
    """(item_id, side) -> scores of samples 0, 1, ...; a None is a parse failure."""
    rows, jid = [], 0
    for (item, side), values in scores.items():
        for k, s in enumerate(values):
            jid += 1
            row = {c: None for c in JUDGMENT_COLUMNS}
            row.update(judgment_id=jid, run_id="r", iteration=0, purpose="eval", item_id=item, side=side,
                       sample_index=k, model="m", score=s, parse_status="ok" if s is not None else "no_score",
                       forced=False)
            rows.append(row)
    return pl.DataFrame(rows, schema={**{c: pl.String for c in JUDGMENT_COLUMNS},
                                      "judgment_id": pl.Int64, "iteration": pl.Int32, "item_id": pl.Int64,
                                      "sample_index": pl.Int32, "score": pl.Int32, "forced": pl.Boolean})


def pred_of(preds: pl.DataFrame, item: int, side: str = "a"):
    return preds.filter((pl.col("item_id") == item) & (pl.col("side") == side))["pred"].item()


# ------------------------------------------------------------------ prediction methods


def test_greedy_and_self_consistency_mean_average_the_scored_samples():
    judgments = judgments_frame({(1, "a"): [3, 4], (2, "a"): [5, None, 2], (3, "a"): [None]})
    for method in ("greedy", "self-consistency-mean"):
        preds = predictions(judgments, method)
        assert pred_of(preds, 1) == 3.5 and pred_of(preds, 2) == 3.5  # the failure adds nothing
        assert pred_of(preds, 3) is None
    assert predictions(judgments).filter(pl.col("item_id") == 2)["failures"].item() == 1


@pytest.mark.parametrize("scores, expected", [
    ([4, 2, 4, 5], 4),  # a clear mode
    ([2, 2, 4, 4, 5], 4),  # tie 2 vs 4: mean 3.4, 4 is closer (0.6 vs 1.4)
    ([1, 1, 3, 3], 1),  # tie 1 vs 3: mean 2, equally close -> the lower
    ([5, None, None, 3, 5], 5),  # failures do not vote
    ([None, None], None),  # nothing to vote on
])
def test_self_consistency_majority_tie_rule(scores, expected):
    preds = predictions(judgments_frame({(1, "a"): scores}), "self-consistency-majority")
    assert pred_of(preds, 1) == expected


def ratings_frame(rows: list[tuple[int, int | None]], rater: str = "m") -> pl.DataFrame:
    return pl.DataFrame({"judgment_id": [j for j, _ in rows], "rating": [r for _, r in rows],
                         "rater_model": [rater] * len(rows)}, schema={"judgment_id": pl.Int64, "rating": pl.Int32,
                                                                      "rater_model": pl.String})


def test_best_of_n_takes_the_highest_rated_judgments_score():
    # judgment ids follow insertion order: item 1 -> 1..4, item 2 -> 5..7, item 3 -> 8..9
    judgments = judgments_frame({(1, "a"): [2, 5, 3, 1], (2, "a"): [4, 3, 1], (3, "a"): [2, 4]})
    ratings = ratings_frame([
        (1, 2), (2, 3), (3, 5), (4, 1),  # item 1: judgment 3 (score 3) rated highest, though 5 is higher
        (5, 4), (6, 4), (7, None),  # item 2: ratings tie -> lowest sample_index (judgment 5, score 4)
        # item 3: no rating at all -> no candidate -> no prediction
    ])
    preds = predictions(judgments, "best-of-n", ratings)
    assert pred_of(preds, 1) == 3
    assert pred_of(preds, 2) == 4
    assert pred_of(preds, 3) is None
    # an unrated judgment is no candidate even when it would win: rate only judgment 4 of item 1
    assert pred_of(predictions(judgments, "best-of-n", ratings_frame([(4, 1)])), 1) == 1
    # two raters: the mean rating decides (judgment 1: (5 + 1) / 2 = 3 < judgment 2: (4 + 4) / 2 = 4)
    two = pl.concat([ratings_frame([(1, 5), (2, 4)], "x"), ratings_frame([(1, 1), (2, 4)], "y")])
    assert pred_of(predictions(judgments, "best-of-n", two), 1) == 5


def test_method_errors():
    judgments = judgments_frame({(1, "a"): [3]})
    with pytest.raises(ValueError, match="unknown evaluation method 'vote'"):
        predictions(judgments, "vote")
    with pytest.raises(ValueError, match="ratings"):
        predictions(judgments, "best-of-n")


# ------------------------------------------------------------------ absolute datasets


def absolute_case():
    items = items_frame([
        {"gold_score": 1.0, "meta": {"capability": "reasoning", "rubric_name": "logic"}},
        {"gold_score": 2.0, "meta": {"capability": "reasoning", "task": "math"}},
        {"gold_score": 3.0, "meta": {"capability": "writing"}},
        {"gold_score": 4.0, "meta": {"capability": "writing"}, "criteria": "x" * 100},
        {"gold_score": 5.0},
    ])
    judgments = judgments_frame({(1, "a"): [2], (2, "a"): [1], (3, "a"): [4], (4, "a"): [3], (5, "a"): [5]})
    return items, judgments


def breakdown(result, group_by: str) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for r in result.breakdowns.filter(pl.col("group_by") == group_by).iter_rows(named=True):
        out.setdefault(r["group_value"], {})[r["metric"]] = r["value"]
    return out


def test_absolute_metrics_confusion_and_breakdowns():
    items, judgments = absolute_case()
    result = evaluate_judgments(items, judgments, bootstrap=200)
    m = result.metrics
    # gold 1..5 vs pred [2, 1, 4, 3, 5]: Pearson 0.8 and Kendall 0.6 (worked out in test_metrics)
    assert m["pearson"] == pytest.approx(0.8) and m["kendall"] == pytest.approx(0.6)
    assert m["pearson_lo"] <= m["pearson"] <= m["pearson_hi"]
    assert m["exact"] == pytest.approx(1 / 5) and m["within1"] == 1.0 and m["parse_failure_rate"] == 0.0
    expected = [[0] * 5 for _ in range(5)]
    for g, p in [(1, 2), (2, 1), (3, 4), (4, 3), (5, 5)]:
        expected[g - 1][p - 1] = 1
    assert result.confusion == expected
    cells = confusion_breakdown(result.confusion)
    assert cells.height == 25 and cells["value"].sum() == 5
    assert cells.filter((pl.col("group_value") == "gold 3") & (pl.col("metric") == "pred 4"))["value"].item() == 1
    assert set(result.breakdowns.columns) == {"group_by", "group_value", "metric", "value"}

    cap = breakdown(result, "capability")
    assert set(cap) == {"reasoning", "writing", "(none)"}
    # reasoning: gold [1, 2] vs pred [2, 1] -> exact 0, within1 1, pearson -1
    assert cap["reasoning"] == {"n": 2.0, "exact": 0.0, "within1": 1.0, "pearson": pytest.approx(-1.0)}
    assert cap["(none)"]["n"] == 1 and cap["(none)"]["exact"] == 1.0 and math.isnan(cap["(none)"]["pearson"])
    # rubric: a rubric_name wins; otherwise the criteria text, cut to 80 characters
    rubric = breakdown(result, "rubric")
    assert set(rubric) == {"logic", "Is it helpful?", "x" * 80}
    assert rubric["Is it helpful?"]["n"] == 3
    assert set(breakdown(result, "task")) == {"math", "(none)"}
    assert breakdown(result, "section") == {}  # absolute datasets have no sections


def test_absolute_failures_and_no_meta_keys():
    items = items_frame([{"gold_score": 1.0}, {"gold_score": 5.0}])
    result = evaluate_judgments(items, judgments_frame({(1, "a"): [1, None]}), bootstrap=0)
    # item 2 was never judged, item 1 has one failure in two samples
    assert result.metrics["exact"] == 0.5 and result.metrics["n_scored"] == 1
    assert result.metrics["parse_failure_rate"] == 0.5  # over judgments: 1 of 2
    assert sum(map(sum, result.confusion)) == 1
    assert set(result.breakdowns["group_by"].unique()) == {"rubric"}  # no capability/task keys anywhere


def test_dataset_metrics_is_the_greedy_metrics_dict():
    items, judgments = absolute_case()
    assert dataset_metrics(items, judgments, bootstrap=50) == evaluate_judgments(items, judgments, bootstrap=50).metrics


def test_absolute_input_errors_name_the_item():
    items = items_frame([{"gold_score": 1.0}, {"gold_score": None}])
    with pytest.raises(ValueError, match="item 2: no gold score"):
        evaluate_judgments(items, judgments_frame({(1, "a"): [1]}))
    items = items_frame([{"gold_score": 1.0}]).with_columns(meta=pl.lit("{not json"))
    with pytest.raises(ValueError, match="item 1: meta is not valid JSON"):
        evaluate_judgments(items, judgments_frame({(1, "a"): [1]}))


def test_methods_change_the_prediction_on_the_same_judgments():
    items = items_frame([{"gold_score": 2.0}, {"gold_score": 4.0}])
    judgments = judgments_frame({(1, "a"): [2, 2, 5], (2, "a"): [4, 1, 4]})
    mean = evaluate_judgments(items, judgments, method="self-consistency-mean", bootstrap=0).metrics
    vote = evaluate_judgments(items, judgments, method="self-consistency-majority", bootstrap=0).metrics
    assert mean["exact"] == 0.0 and mean["mean_score"] == pytest.approx((3 + 3) / 2)  # means 3 and 3
    assert vote["exact"] == 1.0  # modes 2 and 4


# ------------------------------------------------------------------ pairwise datasets


def pairwise_case():
    # Chat (2 items, both correct) and Chat Hard (4 items, 2 correct): pooled 4/6, section mean 0.75
    items = items_frame([
        {"label": "A", "meta": {"section": "Chat", "subset": "alpacaeval-easy"}},
        {"label": "B", "meta": {"section": "Chat", "subset": "alpacaeval-easy"}},
        {"label": "A", "meta": {"section": "Chat Hard", "subset": "llmbar-natural"}},
        {"label": "tie", "meta": {"section": "Chat Hard", "subset": "llmbar-natural"}},
        {"label": "B", "meta": {"section": "Chat Hard", "subset": "mt-bench-hard"}},
        {"label": "A", "meta": {"section": "Chat Hard", "subset": "mt-bench-hard"}},
    ], kind="pairwise")
    judgments = judgments_frame({
        (1, "a"): [5], (1, "b"): [2],  # A, a higher: correct
        (2, "a"): [1], (2, "b"): [4],  # B, b higher: correct
        (3, "a"): [3], (3, "b"): [3],  # A, equal: a tie, wrong
        (4, "a"): [4], (4, "b"): [4],  # tie label, equal: correct
        (5, "a"): [5], (5, "b"): [1],  # B, a higher: wrong
        (6, "a"): [4], (6, "b"): [2],  # A, a higher: correct
    })
    return items, judgments


def test_pairwise_sections_ties_and_subsets():
    items, judgments = pairwise_case()
    # relative (A/B) judgments of the same items are another mode's rows and must be ignored here
    relative = judgments_frame({(1, "ab"): [1]}).with_columns(judgment_id=pl.lit(999, dtype=pl.Int64))
    result = evaluate_judgments(items, pl.concat([judgments, relative]), bootstrap=200)
    m = result.metrics
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["section_mean_accuracy"] == pytest.approx((1.0 + 0.5) / 2)
    assert m["ties"] == 1 and m["tie_rate"] == pytest.approx(1 / 5) and m["tie_items"] == 1
    assert m["accuracy_lo"] < m["accuracy"] < m["accuracy_hi"]
    assert result.confusion is None
    sections = breakdown(result, "section")
    assert sections["Chat"] == {"n": 2.0, "accuracy": 1.0, "ties": 0.0}
    assert sections["Chat Hard"] == {"n": 4.0, "accuracy": 0.5, "ties": 1.0}
    subsets = breakdown(result, "subset")
    assert subsets["llmbar-natural"]["accuracy"] == 0.5 and subsets["mt-bench-hard"]["accuracy"] == 0.5
    assert subsets["alpacaeval-easy"]["accuracy"] == 1.0


def test_pairwise_sections_fall_back_to_subset_then_one_section_and_bad_label_names_item():
    items, judgments = pairwise_case()
    plain = items.with_columns(meta=pl.lit(None, dtype=pl.String))
    result = evaluate_judgments(plain, judgments, bootstrap=0)
    # no sections: the whole set is one section "(none)" (as engine.relative does): mean = pooled accuracy
    assert result.metrics["section_mean_accuracy"] == pytest.approx(4 / 6)
    assert set(breakdown(result, "section")) == {"(none)"} and breakdown(result, "subset") == {}
    subsets_only = items.with_columns(meta=pl.Series([json.dumps({"subset": s}) for s in "xxyyyy"]))
    result = evaluate_judgments(subsets_only, judgments, bootstrap=0)
    assert result.metrics["section_mean_accuracy"] == pytest.approx(0.75)  # x: 2/2, y: 2/4
    assert set(breakdown(result, "section")) == {"x", "y"}
    with pytest.raises(ValueError, match="item 2: label 'b'"):
        evaluate_judgments(items.with_columns(label=pl.Series(["A", "b", "A", "A", "A", "A"])), judgments)


def test_failure_counts_agree_with_the_rates_when_scores_are_forced():
    # Under force_score every side gets a score: no pair lacks one, yet no judgment parsed. The counts must
    # say so (failures = judgments not parsed ok), not "failures: 0" beside parse_failure_rate 1.0.
    items, judgments = pairwise_case()
    forced = judgments.with_columns(parse_status=pl.lit("no_score"), forced=pl.lit(True))
    m = evaluate_judgments(items, forced, bootstrap=0).metrics
    assert m["judgments"] == 12 and m["failures"] == 12 and m["parse_failure_rate"] == 1.0
    assert m["forced"] == 12 and m["forced_rate"] == 1.0
    assert m["unscored_pairs"] == 0  # pairs without a score on a side: none, they were forced
    # Half forced, one side never scored: each count matches its rate; unscored pairs are counted apart.
    some = forced.with_columns(
        parse_status=pl.when(pl.col("item_id") <= 3).then(pl.lit("ok")).otherwise(pl.lit("truncated")),
        forced=pl.col("item_id") > 3,
        score=pl.when((pl.col("item_id") == 6) & (pl.col("side") == "b")).then(None).otherwise(pl.col("score")))
    some = some.with_columns(forced=pl.col("forced") & pl.col("score").is_not_null())
    m = evaluate_judgments(items, some, bootstrap=0).metrics
    assert (m["judgments"], m["failures"], m["forced"], m["unscored_pairs"]) == (12, 6, 5, 1)
    assert m["parse_failure_rate"] == m["failures"] / m["judgments"] == 0.5
    assert m["forced_rate"] == pytest.approx(5 / 12)
    # Absolute data: the same counts, over every sample.
    items = items_frame([{"gold_score": 1.0}, {"gold_score": 5.0}])
    judgments = judgments_frame({(1, "a"): [1, None], (2, "a"): [3]}).with_columns(
        forced=pl.Series([False, False, True]), parse_status=pl.Series(["ok", "no_score", "no_score"]))
    m = evaluate_judgments(items, judgments, bootstrap=0).metrics
    assert (m["judgments"], m["failures"], m["forced"]) == (3, 2, 1)
    assert m["parse_failure_rate"] == pytest.approx(2 / 3) and m["forced_rate"] == pytest.approx(1 / 3)


def test_breakdowns_round_trip_through_the_store(tmp_path):
    items, judgments = pairwise_case()
    result = evaluate_judgments(items, judgments, bootstrap=0)
    store = Store(tmp_path / "db.duckdb")
    store.put_breakdowns("r", 0, "d", "greedy", result.breakdowns)
    back = store.breakdowns("r", 0)
    assert back.height == result.breakdowns.height
    row = back.filter((pl.col("group_value") == "Chat Hard") & (pl.col("metric") == "accuracy"))
    assert row["value"].item() == 0.5 and row["method"].item() == "greedy"
