"""Known-answer tests for engine.metrics (values worked out by hand in the comments)."""

from __future__ import annotations

import math
import warnings

import pytest

from engine.metrics import absolute_metrics, pairwise_metrics


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
