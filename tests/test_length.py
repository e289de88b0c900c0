"""Known-answer tests for engine.length (values worked out by hand in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from engine.length import (
    length_baseline_pairwise,
    length_baseline_scores,
    pairwise_by_length,
    partial_correlation,
    similar_length_pair_accuracy,
)
from engine.metrics import absolute_metrics

# ------------------------------------------------------------------ the baseline's scores


def test_baseline_scores_are_quintiles_of_the_length_rank():
    # 10 distinct lengths, ranks r = 1..10: floor(5 * (r - 0.5) / 10) + 1 = 1,1,2,2,3,3,4,4,5,5
    lengths = [30, 10, 100, 50, 20, 90, 60, 40, 80, 70]  # ranks 3,1,10,5,2,9,6,4,8,7
    assert length_baseline_scores(lengths).tolist() == [2, 1, 5, 3, 1, 5, 3, 2, 4, 4]


def test_baseline_scores_ties_share_the_mean_rank():
    # 1,1 share rank 1.5: (1.5 - 0.5) / 5 = 0.2, exactly on the first quintile edge -> 2; 2,3,4 -> ranks 3,4,5
    assert length_baseline_scores([1, 1, 2, 3, 4]).tolist() == [2, 2, 3, 4, 5]
    # all equal: mean rank (n + 1) / 2, the middle -> 3
    assert length_baseline_scores([7, 7, 7, 7]).tolist() == [3, 3, 3, 3]
    assert length_baseline_scores([]).tolist() == []


def test_baseline_scores_do_not_depend_on_order():
    rng = np.random.default_rng(3)
    lengths = rng.integers(0, 50, size=37)  # many ties
    perm = rng.permutation(37)
    assert length_baseline_scores(lengths)[perm].tolist() == length_baseline_scores(lengths[perm]).tolist()


@pytest.mark.parametrize("lengths, message", [
    ([10, None, 30], "item 1: length is missing"),
    ([10, 20, float("nan")], "item 2: length is missing"),
    ([10, -5], r"item 1: length is negative \(-5\)"),
])
def test_baseline_scores_reject_bad_lengths(lengths, message):
    with pytest.raises(ValueError, match=message):
        length_baseline_scores(lengths)


def test_baseline_pairwise_longer_wins():
    # pair 1: 300 > 100, correct; pair 2: A/B of equal length, a tie (wrong); pair 3: labelled B so chosen is
    # the 80, shorter than 120: wrong; pair 4: labelled tie, equal lengths: correct.  accuracy 2 / 4
    m = length_baseline_pairwise([300, 50, 80, 100], [100, 50, 120, 100], ["A", "A", "B", "tie"])
    assert m["accuracy"] == 0.5
    assert m["ties"] == 1.0 and m["tie_item_accuracy"] == 1.0 and m["n"] == 4.0
    with pytest.raises(ValueError, match="item 0: rejected length is missing"):
        length_baseline_pairwise([3], [None])


# ------------------------------------------------------------------ partial correlation

GOLD = [1, 3, 2, 5, 4]
PRED = [2, 1, 4, 3, 5]
LENGTH = [1, 2, 3, 4, 5]


def test_partial_correlation_hand_computed():
    # All three have mean 3.  d_len = [-2,-1,0,1,2], sum d_len^2 = 10.
    # gold: d = [-2,0,-1,2,1], slope on length = (4+0+0+2+2)/10 = 0.8, residual = d - 0.8 d_len
    #   = [-0.4, 0.8, -1, 1.2, -0.6]
    # pred: d = [-1,-2,1,0,2], slope = (2+2+0+0+4)/10 = 0.8, residual = [0.6, -1.2, 1, -0.8, 0.4]
    # residual . residual' = -0.24 - 0.96 - 1 - 0.96 - 0.24 = -3.4; both squared norms = 3.6
    # r = -3.4 / 3.6 = -17/18.  Closed form: r_gp = 3/10, r_gl = r_pl = 8/10:
    #   (0.3 - 0.64) / sqrt(0.36 * 0.36) = -0.34 / 0.36 = -17/18
    assert stats.pearsonr(GOLD, PRED).statistic == pytest.approx(0.3)  # positive before controlling for length
    assert partial_correlation(GOLD, PRED, LENGTH) == pytest.approx(-17 / 18)
    # a sixth item without a prediction is left out
    assert partial_correlation(GOLD + [5], PRED + [None], LENGTH + [9]) == pytest.approx(-17 / 18)


def test_partial_spearman_is_partial_pearson_on_ranks():
    # strictly increasing transforms leave every rank as in the hand-computed case: -17/18 again
    gold = [g * g for g in GOLD]  # 1, 9, 4, 25, 16
    pred = [10, 1, 1000, 100, 10_000]  # ranks 2, 1, 4, 3, 5
    length = [x ** 3 for x in LENGTH]
    assert partial_correlation(gold, pred, length, method="spearman") == pytest.approx(-17 / 18)
    assert partial_correlation(gold, pred, length) != pytest.approx(-17 / 18)


def test_a_length_only_judge_scores_near_zero():
    # Gold rises with length (plus a little of what length cannot see); the length baseline ranks it almost
    # perfectly, yet it knows nothing beyond length: partial correlation ~0 (sd ~ 1/sqrt(n) = 0.022).
    rng = np.random.default_rng(0)
    n = 2000
    length = rng.integers(50, 2000, size=n).astype(float)
    gold = 1 + 4 * (length - 50) / 1950 + rng.normal(0, 0.05, size=n)
    baseline = length_baseline_scores(length).tolist()
    assert stats.spearmanr(baseline, gold).statistic > 0.95
    for method in ("pearson", "spearman"):
        assert abs(partial_correlation(gold.tolist(), baseline, length.tolist(), method)) < 0.1
    # a judge that sees the part length cannot: clearly positive
    informed = (gold + rng.normal(0, 0.05, size=n)).tolist()
    assert partial_correlation(gold.tolist(), informed, length.tolist()) > 0.5


def test_perfect_length_baseline_leaves_nothing_to_correlate():
    # gold is exactly a straight line in length (length = 100 * gold) and the baseline reproduces it:
    # after length there is nothing left, so the figure is undefined (NaN), not a number made of float noise
    gold = [1, 2, 3, 4, 5] * 4
    length = [100 * g for g in gold]
    baseline = length_baseline_scores(length).tolist()
    assert baseline == gold
    assert absolute_metrics(gold, baseline, bootstrap=0)["exact"] == 1.0  # scored like any judge
    assert math.isnan(partial_correlation(gold, baseline, length))


@pytest.mark.parametrize("gold, pred, length", [
    ([1, 2], [1, 2], [1, 2]),  # fewer than 3 points
    ([1, 2, 3], [1, None, 3], [1, 2, 3]),  # 2 left with a prediction
    ([1, 2, 3], [4, 4, 4], [1, 2, 5]),  # constant prediction
    ([1, 2, 3], [1, 3, 2], [7, 7, 7]),  # constant length
    ([1, 2, 3, 1], [1, 3, 2, 2], [1, 2, 3, 1]),  # gold is a line in length
])
def test_partial_correlation_nan_when_undefined(gold, pred, length):
    assert math.isnan(partial_correlation(gold, pred, length))


def test_partial_correlation_rejects_bad_input():
    with pytest.raises(ValueError, match="differ in length"):
        partial_correlation([1, 2, 3], [1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="unknown method"):
        partial_correlation([1, 2, 3], [1, 2, 3], [1, 2, 3], method="kendall")
    with pytest.raises(ValueError, match="item 2: length is missing"):
        partial_correlation([1, 2, 3], [1, 2, 3], [1, 2, None])
    with pytest.raises(ValueError, match="gold contains a missing score"):
        partial_correlation([1, None, 3], [1, 2, 3], [1, 2, 3])


# ------------------------------------------------------------------ similar-length pairs


def test_similar_length_pair_accuracy_hand_made():
    groups = ["q1", "q1", "q1", "q1", "q2", "q2", "q2", "q3", "q4", "q4"]
    lengths = [100, 110, 200, 90, 100, 120, 125, 100, 50, 55]
    gold = [2, 4, 5, 2, 1, 3, 5, 1, 1, 2]
    pred = [1, 3, 3, 2, 4, 4, 1, 5, None, 2]
    # q1: (0,1) 10/110 < 0.2, gold 2<4, pred 1<3: correct.  (0,2) 100/200: too far.  (0,3) 10/100 but equal
    #     gold: out.  (1,3) 20/110 = 0.18: gold 4>2, pred 3>2: correct.  (1,2), (2,3): too far.
    # q2: (4,5) 20/120: gold 1<3, pred 4=4: tie.  (4,6) 25/125 = exactly 20%: out.  (5,6) 5/125: gold 3<5,
    #     pred 4>1: wrong.
    # q3: one response, no pair (item 7 is as long as item 0 but answers another prompt).
    # q4: (8,9) 5/55: gold 1<2, no prediction on item 8: failure.
    m = similar_length_pair_accuracy(groups, gold, pred, lengths)
    assert m == {"accuracy": 2 / 5, "n_pairs": 5.0, "ties": 1.0, "tie_rate": 1 / 5, "failures": 1.0,
                 "n_groups": 3.0}


def test_similar_length_pairs_none_and_errors():
    # lengths 100 and 300 are never similar: no pair, accuracy undefined
    m = similar_length_pair_accuracy(["a", "a"], [1, 5], [1, 5], [100, 300])
    assert math.isnan(m["accuracy"]) and m["n_pairs"] == 0.0
    # two empty responses count as the same length
    assert similar_length_pair_accuracy(["a", "a"], [1, 5], [2, 3], [0, 0])["accuracy"] == 1.0
    with pytest.raises(ValueError, match="item 1: prompt"):
        similar_length_pair_accuracy(["a", None], [1, 5], [1, 5], [100, 100])
    with pytest.raises(ValueError, match="item 0: gold score is missing"):
        similar_length_pair_accuracy(["a", "a"], [None, 5], [1, 5], [100, 100])


# ------------------------------------------------------------------ pairwise split by length


def test_pairwise_by_length_hand_made():
    chosen = [5, 3, 4, 2, None, 3, 3]
    rejected = [4, 4, 4, 1, 2, 3, 3]
    len_chosen = [200, 200, 100, 50, 300, 80, 100]
    len_rejected = [100, 100, 150, 100, 100, 80, 50]
    labels = ["A", "B", "A", "A", "B", "A", "tie"]
    # longer chosen: pairs 0 (5>4 correct), 1 (3<4 wrong), 4 (failure) -> 1/3
    # shorter chosen: pairs 2 (4=4 tie, wrong), 3 (2>1 correct) -> 1/2
    # equal length: pair 5 (3=3 tie, wrong) -> 0; pair 6 is labelled tie: no chosen side, left out
    m = pairwise_by_length(chosen, rejected, len_chosen, len_rejected, labels)
    assert m == {"accuracy_chosen_longer": 1 / 3, "n_chosen_longer": 3.0,
                 "accuracy_chosen_shorter": 0.5, "n_chosen_shorter": 2.0,
                 "accuracy_equal_length": 0.0, "n_equal_length": 1.0}


def test_pairwise_by_length_empty_groups_are_nan():
    m = pairwise_by_length([5], [1], [10], [20])  # one pair, chosen shorter
    assert m["accuracy_chosen_shorter"] == 1.0
    assert math.isnan(m["accuracy_chosen_longer"]) and m["n_chosen_longer"] == 0.0
    with pytest.raises(ValueError, match="differ in length"):
        pairwise_by_length([5, 4], [1, 1], [10], [20])
