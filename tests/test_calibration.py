"""Known-answer tests for engine.calibration (values worked out by hand in the comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.calibration import (
    expected_calibration_error,
    expected_scores,
    mean_entropy,
    reliability_bins,
    saturation_warning,
    score_shares,
)

NAN = float("nan")
UNIFORM = [0.2] * 5

# ------------------------------------------------------------------ expected score


def test_expected_score_of_one_hot_is_the_score():
    one_hot = np.eye(5)  # row k puts all mass on score k + 1
    assert expected_scores(one_hot).tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]


def test_expected_score_weights_and_renormalises():
    probs = [
        [0.1, 0.2, 0.3, 0.2, 0.2],  # 0.1 + 0.4 + 0.9 + 0.8 + 1.0 = 3.2
        [2, 0, 0, 0, 2],  # sums to 4: renormalised to (0.5, ..., 0.5) -> 3
        [None] * 5,  # stored without probabilities: stays missing
        [0, 0, 0, 1, 3],  # (4 * 1 + 5 * 3) / 4 = 4.75
    ]
    out = expected_scores(probs)
    assert out[[0, 1, 3]] == pytest.approx([3.2, 3.0, 4.75])
    assert math.isnan(out[2])
    assert expected_scores([]).shape == (0,)


@pytest.mark.parametrize("probs, message", [
    ([[0.5, 0.5, 0, 0, 0], [0.5, None, 0.5, 0, 0]], "row 1: some of p1..p5 are missing"),
    ([[0.5, 0.7, -0.2, 0, 0]], "row 0: a probability is negative"),
    ([[0, 0, 0, 0, 0]], "row 0: probabilities sum to 0"),
    ([[1, 0, 0, 0, math.inf]], "row 0: a probability is infinite"),
    ([[0.5, 0.5]], r"shape \(1, 2\)"),
])
def test_bad_probabilities_raise_naming_the_row(probs, message):
    with pytest.raises(ValueError, match=message):
        expected_scores(probs)


# ------------------------------------------------------------------ entropy


def test_entropy_known_values():
    assert mean_entropy([UNIFORM]) == pytest.approx(math.log(5))
    assert mean_entropy([UNIFORM], normalised=True) == pytest.approx(1.0)
    assert mean_entropy([[0, 0, 1, 0, 0]]) == 0.0
    assert mean_entropy([[0.5, 0.5, 0, 0, 0]]) == pytest.approx(math.log(2))
    # mean over rows with probabilities: (log 5 + 0) / 2; the row without is left out
    assert mean_entropy([UNIFORM, [1, 0, 0, 0, 0], [NAN] * 5]) == pytest.approx(math.log(5) / 2)
    assert math.isnan(mean_entropy([[None] * 5]))


# ------------------------------------------------------------------ calibration


def test_reliability_bins_and_ece_hand_computed():
    # (dyadic probabilities, so no bin edge is decided by rounding)
    probs = [
        [0.875, 0.125, 0, 0, 0],  # top score 1 at 0.875 -> bin 8; gold 1: correct
        [0.0625, 0.9375, 0, 0, 0],  # top score 2 at 0.9375 -> bin 9; gold 3: wrong
        [0.125, 0.125, 0.5, 0.125, 0.125],  # top score 3 at 0.5 -> bin 5; gold 2.5 rounds half up to 3: correct
        [None] * 5,  # no probabilities: left out
        [0.25, 0.25, 0.25, 0.25, 0],  # four-way tie: the lowest, score 1, at 0.25 -> bin 2; gold 1: correct
    ]
    gold = [1, 3, 2.5, 4, 1]
    table = reliability_bins(probs, gold)
    assert [b["count"] for b in table] == [0, 0, 1, 0, 0, 1, 0, 0, 1, 1]
    assert (table[9]["lo"], table[9]["hi"]) == (0.9, 1.0)
    assert table[9]["confidence"] == 0.9375 and table[9]["accuracy"] == 0.0
    assert table[5]["confidence"] == 0.5 and table[5]["accuracy"] == 1.0
    assert math.isnan(table[0]["confidence"]) and math.isnan(table[0]["accuracy"])
    # ECE = 1/4 * (|1 - 0.875| + |0 - 0.9375| + |1 - 0.5| + |1 - 0.25|) = 2.3125 / 4
    assert expected_calibration_error(probs, gold) == pytest.approx(0.578125)
    # 2 bins: [0, 0.5) holds the 0.25 row; [0.5, 1] the rest: confidence (0.875 + 0.9375 + 0.5) / 3, accuracy 2/3
    two = reliability_bins(probs, gold, bins=2)
    assert [b["count"] for b in two] == [1, 3]
    assert two[1]["confidence"] == pytest.approx(2.3125 / 3) and two[1]["accuracy"] == pytest.approx(2 / 3)


def _draw_gold(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One gold score per row, drawn with the row's probabilities (inverse CDF)."""
    return (probs.cumsum(axis=1) < rng.random((len(probs), 1))).sum(axis=1) + 1


def test_ece_of_a_calibrated_judge_is_near_zero_and_of_an_overconfident_one_is_not():
    rng = np.random.default_rng(0)
    truth = rng.dirichlet(np.full(5, 0.7), size=20_000)
    gold = _draw_gold(truth, rng)
    # the judge states the probabilities the outcomes were drawn with: top score right as often as claimed
    assert expected_calibration_error(truth, gold) < 0.02
    # the same judge, sharpened (p^3, renormalised): claims more than it knows
    sharp = truth ** 3
    assert expected_calibration_error(sharp, gold) > 0.15
    over = [b for b in reliability_bins(sharp, gold) if b["count"] > 100]
    assert all(b["accuracy"] < b["confidence"] for b in over)  # every well-filled bin below the diagonal


def test_calibration_degenerate_and_bad_input():
    assert math.isnan(expected_calibration_error([[None] * 5], [3]))
    with pytest.raises(ValueError, match="differ in length"):
        expected_calibration_error([UNIFORM], [1, 2])
    with pytest.raises(ValueError, match="item 1: gold score is missing"):
        expected_calibration_error([UNIFORM, UNIFORM], [1, None])
    with pytest.raises(ValueError, match="item 0: gold score 6 is outside"):
        expected_calibration_error([UNIFORM], [6])
    with pytest.raises(ValueError, match="bins must be a positive integer"):
        reliability_bins([UNIFORM], [1], bins=0)


# ------------------------------------------------------------------ saturation


def test_score_shares():
    # failures are left out (5 scores counted); 3.5 rounds half up to 4
    shares = score_shares([5, 5, 4, None, 3.5, 1])
    assert shares == {1: 0.2, 2: 0.0, 3: 0.0, 4: 0.4, 5: 0.4}
    assert all(math.isnan(v) for v in score_shares([None]).values())
    with pytest.raises(ValueError, match="item 1: score 6 is outside"):
        score_shares([5, 6])


BALANCED = [1, 2, 3, 4, 5] * 20  # 20% each


def test_saturation_warning_fires_on_a_collapsed_distribution():
    collapsed = [5] * 60 + [4] * 40
    message = saturation_warning(collapsed, BALANCED)
    assert message is not None and "score 5 takes 60% of 100 judgments" in message


def test_saturation_warning_silent_when_spread_or_gold_skewed():
    assert saturation_warning(BALANCED, BALANCED) is None  # the judge spreads like gold
    skewed_gold = [5] * 60 + [1, 2, 3, 4] * 10  # 60% fives: a judge giving 60% fives may be right
    assert saturation_warning([5] * 60 + [4] * 40, skewed_gold) is None
    assert saturation_warning([None, None], BALANCED) is None  # nothing scored


def test_saturation_warning_thresholds():
    at_35 = [3] * 35 + [1] * 20 + [2, 4, 5] * 15  # largest gold share exactly 35%: still balanced
    at_36 = [3] * 36 + [1] * 19 + [2, 4, 5] * 15
    assert saturation_warning([5] * 51 + [4] * 49, at_35) is not None
    assert saturation_warning([5] * 51 + [4] * 49, at_36) is None
    assert saturation_warning([5] * 50 + [4] * 50, at_35) is None  # exactly half is not "more than half"
