"""Known-answer tests for engine.metrics (values worked out by hand in the comments)."""

from __future__ import annotations

import math
import time
import warnings

import numpy as np
import pytest
from scipy import stats

from engine import metrics as metrics_module
from engine.metrics import (
    absolute_metrics,
    bootstrap_mean,
    confusion_matrix,
    pairwise_metrics,
    pairwise_outcomes,
    percentile_bootstrap,
    resampled_correlations,
    round_half_up,
    section_mean_accuracy,
)


def test_correlations_known_answer():
    gold = [1, 2, 3, 4]
    pred = [2, 1, 4, 5]
    # Pearson: mean(gold) = 2.5, mean(pred) = 3
    #   d_gold = [-1.5, -0.5, 0.5, 1.5]   d_pred = [-1, -2, 1, 2]
    #   sum(d_gold * d_pred) = 1.5 + 1.0 + 0.5 + 3.0 = 6
    #   sum(d_gold^2) = 2.25 + 0.25 + 0.25 + 2.25 = 5      sum(d_pred^2) = 1 + 4 + 1 + 4 = 10
    #   r = 6 / sqrt(5 * 10) = 6 / sqrt(50) = 0.848528...
    # Spearman: ranks(gold) = [1, 2, 3, 4], ranks(pred) = [2, 1, 3, 4], d = [1, -1, 0, 0], sum d^2 = 2
    #   rho = 1 - 6 * 2 / (4 * (16 - 1)) = 1 - 12 / 60 = 0.8
    # Kendall: 6 pairs; only (item1, item2) is discordant (gold rises, pred falls 2 -> 1): C = 5, D = 1
    #   tau = (5 - 1) / 6 = 2/3 (no ties, so tau-b = tau-a)
    m = absolute_metrics(gold, pred)
    assert m["pearson"] == pytest.approx(6 / math.sqrt(50))
    assert m["spearman"] == pytest.approx(0.8)
    assert m["kendall"] == pytest.approx(2 / 3)
    # exact: no item matches (|diffs| are all 1) -> 0; within1: all 4 are within 1 -> 1
    assert m["exact"] == 0.0
    assert m["within1"] == 1.0
    assert m["n"] == 4 and m["n_scored"] == 4 and m["parse_failure_rate"] == 0.0
    assert m["mean_score"] == pytest.approx(3.0)


def test_failures_count_wrong_but_are_excluded_from_correlations():
    gold = [1, 2, 3, 4, 5]
    pred = [1, 3, None, 4, float("nan")]  # two parse failures (None and NaN)
    m = absolute_metrics(gold, pred)
    # exact over all 5: items 1 and 4 match -> 2/5; within1: items 1, 2, 4 -> 3/5
    assert m["exact"] == pytest.approx(2 / 5)
    assert m["within1"] == pytest.approx(3 / 5)
    assert m["parse_failure_rate"] == pytest.approx(2 / 5)
    assert m["n"] == 5 and m["n_scored"] == 3
    assert m["mean_score"] == pytest.approx((1 + 3 + 4) / 3)
    # correlations over the 3 scored pairs (1,1), (2,3), (4,4): ranks agree -> spearman = kendall = 1
    assert m["spearman"] == pytest.approx(1.0)
    assert m["kendall"] == pytest.approx(1.0)


def test_exact_rounds_gold_half_up():
    # gold 2.5 (a mean of annotators) rounds to 3, not to 2 as Python's round() would
    m = absolute_metrics([2.5, 3.4], [3, 3])
    assert m["exact"] == 1.0


def test_fractional_predictions_are_rounded_for_exact_and_within1_only():
    # A self-consistency mean or expected score of 2.5 stands for a 3; 4.4 for a 4. Unrounded, exact would
    # be 0 for any judge whose scores are means; the correlations keep the fractional values.
    gold = [3, 4, 1, 5]
    m = absolute_metrics(gold, [2.5, 4.4, 2.6, 3.9], bootstrap=0)
    assert m["exact"] == pytest.approx(2 / 4)  # 3 == 3, 4 == 4; 1 != 3, 5 != 4
    assert m["within1"] == pytest.approx(3 / 4)  # |1 - 3| = 2 misses (unrounded 1.6 would have hit)
    assert m["pearson"] == pytest.approx(np.corrcoef(gold, [2.5, 4.4, 2.6, 3.9])[0, 1])  # not of the rounded


@pytest.mark.parametrize(
    "gold, pred",
    [
        ([1, 2, 3, 4], [3, 3, 3, 3]),  # constant predictions (a judge that always says 3)
        ([4, 4, 4], [1, 2, 3]),  # constant gold
        ([1, 2], [5, None]),  # a single scored point
        ([1, 2], [None, None]),  # nothing scored
        ([], []),  # empty
    ],
)
def test_degenerate_inputs_give_nan_not_an_exception(gold, pred):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no scipy ConstantInputWarning leaking either
        m = absolute_metrics(gold, pred)
    for key in ("pearson", "spearman", "kendall"):
        assert math.isnan(m[key]), key
    assert m["n"] == len(gold)


def test_empty_and_all_failures():
    m = absolute_metrics([], [])
    assert math.isnan(m["exact"]) and math.isnan(m["parse_failure_rate"]) and math.isnan(m["mean_score"])
    m = absolute_metrics([1, 2], [None, None])
    assert m["exact"] == 0.0 and m["parse_failure_rate"] == 1.0 and math.isnan(m["mean_score"])


def test_bad_input_raises():
    with pytest.raises(ValueError, match="length"):
        absolute_metrics([1, 2], [1])
    with pytest.raises(ValueError, match="gold"):
        absolute_metrics([1, None], [1, 2])
    with pytest.raises(ValueError, match="length"):
        pairwise_metrics([1], [])


def test_pairwise_ties_and_failures():
    chosen = [5, 3, 4, None, 2, 4]
    rejected = [4, 3, 1, 2, None, 5]
    # pair: 1 win (5>4), 2 tie (3=3), 3 win (4>1), 4 failure, 5 failure, 6 loss (4<5)
    m = pairwise_metrics(chosen, rejected)
    assert m["accuracy"] == pytest.approx(2 / 6)
    assert m["ties"] == 1 and m["tie_rate"] == pytest.approx(1 / 6)
    assert m["failures"] == 2
    assert m["n"] == 6


def test_pairwise_nan_is_a_failure_and_empty_is_nan():
    m = pairwise_metrics([float("nan"), 3.0], [1.0, 2.0])
    assert m["failures"] == 1 and m["accuracy"] == 0.5
    m = pairwise_metrics([], [])
    assert m["n"] == 0 and math.isnan(m["accuracy"]) and math.isnan(m["tie_rate"])


# ------------------------------------------------------------------ correlations and their intervals


def test_five_point_correlations_by_hand():
    gold = [1, 2, 3, 4, 5]
    pred = [2, 1, 4, 3, 5]
    # Pearson: means 3 and 3; d_gold = [-2, -1, 0, 1, 2], d_pred = [-1, -2, 1, 0, 2]
    #   sum(d_gold * d_pred) = 2 + 2 + 0 + 0 + 4 = 8; sum(d_gold^2) = 10; sum(d_pred^2) = 1 + 4 + 1 + 0 + 4 = 10
    #   r = 8 / sqrt(10 * 10) = 0.8. Spearman: the values are their own ranks (no ties) -> 0.8 too.
    # Kendall: 10 pairs; discordant: (item1, item2) pred 2 -> 1 and (item3, item4) pred 4 -> 3: D = 2, C = 8
    #   tau = (8 - 2) / 10 = 0.6
    m = absolute_metrics(gold, pred, bootstrap=0)
    assert m["pearson"] == pytest.approx(0.8)
    assert m["spearman"] == pytest.approx(0.8)
    assert m["kendall"] == pytest.approx(0.6)
    assert "pearson_lo" not in m  # bootstrap=0: no interval keys


def _noisy(n, seed):
    rng = np.random.default_rng(seed)
    gold = rng.integers(1, 6, n).astype(float)
    pred = np.clip(gold + rng.integers(-1, 2, n), 1, 5)
    return gold.tolist(), pred.tolist()


def test_intervals_contain_the_estimate_shrink_with_n_and_follow_the_seed():
    small, large = absolute_metrics(*_noisy(40, 1)), absolute_metrics(*_noisy(640, 1))
    for name in ("pearson", "spearman", "kendall"):
        for m in (small, large):
            assert m[f"{name}_lo"] < m[name] < m[f"{name}_hi"], name
        # 16x the items: the width shrinks by about sqrt(16) = 4; ask for at least 2
        assert (large[f"{name}_hi"] - large[f"{name}_lo"]) < (small[f"{name}_hi"] - small[f"{name}_lo"]) / 2
    gold, pred = _noisy(40, 1)
    assert absolute_metrics(gold, pred, seed=7) == absolute_metrics(gold, pred, seed=7)
    assert absolute_metrics(gold, pred, seed=7)["pearson_lo"] != absolute_metrics(gold, pred, seed=8)["pearson_lo"]


def test_intervals_are_nan_when_the_correlation_is_undefined():
    m = absolute_metrics([1, 2, 3, 4], [3, 3, 3, 3])  # constant predictions
    assert all(math.isnan(m[f"{k}_{e}"]) for k in ("pearson", "spearman", "kendall") for e in ("lo", "hi"))


@pytest.mark.parametrize("table_limit", [None, 1], ids=["contingency", "scipy-fallback"])
def test_vectorised_resample_correlations_match_scipy(monkeypatch, table_limit):
    if table_limit is not None:
        monkeypatch.setattr(metrics_module, "_CHUNK_CELLS", table_limit)  # forces Kendall through scipy
    rng = np.random.default_rng(3)
    gold = rng.integers(1, 6, 60).astype(float)
    pred = np.clip(gold + rng.integers(-2, 3, 60), 1, 5) / 1.0
    pred[::7] = 2.5  # a mean of two samples: a non-integer value among integers
    idx = rng.integers(0, 60, size=(25, 60))
    idx[0] = 0  # one resample of a single item repeated: constant -> NaN
    got = resampled_correlations(gold, pred, idx)
    assert all(math.isnan(got[k][0]) for k in got)
    for r in range(1, 25):
        g, p = gold[idx[r]], pred[idx[r]]
        assert got["pearson"][r] == pytest.approx(stats.pearsonr(g, p).statistic, abs=1e-12)
        assert got["spearman"][r] == pytest.approx(stats.spearmanr(g, p).statistic, abs=1e-12)
        assert got["kendall"][r] == pytest.approx(stats.kendalltau(g, p).statistic, abs=1e-12)


def test_thousand_resamples_of_thousand_items_is_fast():
    gold, pred = _noisy(1000, 2)
    start = time.perf_counter()
    m = absolute_metrics(gold, pred, bootstrap=1000)
    assert time.perf_counter() - start < 1.0
    assert m["kendall_lo"] < m["kendall"] < m["kendall_hi"]


# ------------------------------------------------------------------ confusion matrix


def test_confusion_counts_round_half_up_and_skip_failures():
    gold = [1, 1, 2, 5, 2.5, 4, 3]
    pred = [1, 2, 2, 3, 3.5, None, float("nan")]
    m = confusion_matrix(gold, pred)
    # (1,1) (1,2) (2,2) (5,3) and (2.5 -> 3, 3.5 -> 4); the two failures are not in the matrix
    expected = [[0] * 5 for _ in range(5)]
    for g, p in [(1, 1), (1, 2), (2, 2), (5, 3), (3, 4)]:
        expected[g - 1][p - 1] += 1
    assert m == expected
    assert sum(map(sum, m)) == 5


def test_confusion_rejects_scores_outside_the_scale_naming_the_item():
    with pytest.raises(ValueError, match="item 1: predicted score 6"):
        confusion_matrix([1, 2], [1, 6])
    with pytest.raises(ValueError, match="item 0: gold"):
        confusion_matrix([None], [1])


# ------------------------------------------------------------------ pairwise with tie labels and sections


def test_tie_labelled_items_are_correct_when_scored_equal():
    chosen = [4, 3, 3, 2, None]
    rejected = [2, 3, 3, 5, 1]
    labels = ["A", "A", "tie", "tie", "B"]
    # 1: A, 4 > 2 correct; 2: A, 3 = 3 a tie -> wrong, reported; 3: tie, 3 = 3 correct;
    # 4: tie, 2 != 5 wrong; 5: failure
    assert pairwise_outcomes(chosen, rejected, labels) == ["correct", "tie", "correct", "wrong", "failure"]
    m = pairwise_metrics(chosen, rejected, labels)
    assert m["accuracy"] == pytest.approx(2 / 5)
    assert m["ties"] == 1 and m["tie_rate"] == pytest.approx(1 / 3)  # over the 3 A/B pairs
    assert m["tie_items"] == 2 and m["tie_item_accuracy"] == pytest.approx(1 / 2)
    # the same scores without labels: item 3 becomes an A/B tie, wrong
    assert pairwise_metrics(chosen, rejected)["accuracy"] == pytest.approx(1 / 5)


def test_bad_pair_label_names_the_pair():
    with pytest.raises(ValueError, match="pair 1: label 'C'"):
        pairwise_metrics([1, 2], [0, 1], ["A", "C"])


def test_section_mean_is_unweighted():
    # Chat: 2 of 2 correct (1.0); Chat Hard: 4 of 8 (0.5): pooled accuracy 6/10 = 0.6, section mean 0.75
    assert section_mean_accuracy({"Chat": 1.0, "Chat Hard": 0.5}) == pytest.approx(0.75)
    assert section_mean_accuracy({"Chat": 1.0, "Empty": float("nan")}) == 1.0
    assert math.isnan(section_mean_accuracy({}))


def test_accuracy_interval():
    chosen, rejected = [2] * 30 + [1] * 10, [1] * 40  # 30 of 40 correct
    m = pairwise_metrics(chosen, rejected, bootstrap=1000, seed=0)
    assert m["accuracy_lo"] < 0.75 < m["accuracy_hi"]
    assert 0.55 < m["accuracy_lo"] and m["accuracy_hi"] < 0.9  # binomial sd = sqrt(.75 * .25 / 40) = 0.068
    assert bootstrap_mean([1.0] * 30 + [0.0] * 10, 1000, 0) == (m["accuracy_lo"], m["accuracy_hi"])
    assert "accuracy_lo" not in pairwise_metrics(chosen, rejected)


def test_percentile_bootstrap_is_seeded_chunked_and_skips_undefined_resamples(monkeypatch):
    values = np.arange(50, dtype=float)

    def stats_of(idx):
        mean = values[idx].mean(axis=1)
        return {"mean": mean, "never": np.full(len(mean), np.nan)}

    a = percentile_bootstrap(stats_of, 50, bootstrap=500, seed=3)
    assert a == percentile_bootstrap(stats_of, 50, bootstrap=500, seed=3)
    assert a["mean"] != percentile_bootstrap(stats_of, 50, bootstrap=500, seed=4)["mean"]
    assert a["mean"][0] < values.mean() < a["mean"][1]
    assert all(math.isnan(v) for v in a["never"])  # no resample defines it
    monkeypatch.setattr(metrics_module, "_CHUNK_CELLS", 120)  # two resamples per chunk: same draws, same interval
    assert percentile_bootstrap(stats_of, 50, bootstrap=500, seed=3)["mean"] == a["mean"]
    assert percentile_bootstrap(stats_of, 0, bootstrap=500, seed=3) == {}
    assert percentile_bootstrap(stats_of, 50, bootstrap=0, seed=3) == {}
    assert all(math.isnan(v) for v in bootstrap_mean([], 100, 0))


HALVES = [-0.5, 0.5, 1.5, 2.5, 3.5, 4.5, 2.4999999, 2.5000001, 3.0, 1.25, 4.75]


def test_round_half_up_goes_up_on_every_half():
    assert [round_half_up(x) for x in HALVES] == [0, 1, 2, 3, 4, 5, 2, 3, 3, 1, 5]
    assert round(2.5) == 2  # why the rule exists: Python rounds half to even
    assert round_half_up(np.array(HALVES)).tolist() == [float(round_half_up(x)) for x in HALVES]


def test_round_half_up_agrees_with_the_stores_sql_rule():
    # The store may not import the engine, so it spells the rule in SQL; the two copies must agree.
    import duckdb

    from store.queries import GOLD

    sql = GOLD.replace("i.gold_score", "x")
    rows = duckdb.sql(f"SELECT x, {sql} AS r FROM (SELECT unnest(?::DOUBLE[]) AS x)", params=[HALVES]).fetchall()
    assert {x: int(r) for x, r in rows} == {x: round_half_up(x) for x in HALVES}
