"""Calibration of a judge from the five score probabilities stored with each judgment (p1..p5).

At the score position the sampler keeps the distribution over "1".."5" (engine/sampling.py). From it:
- the expected score, sum_k k * p_k (G-Eval's probability-weighted score), an evaluation method of its own;
- expected calibration error and reliability bins: is the judge's confidence in its top score (max p_k)
  matched by how often that score equals the gold score (rounded half up)? Standard top-label ECE;
- the mean entropy of the distribution (a collapsing entropy across iterations flags overconfidence);
- score shares and a saturation warning (one score taking over while gold is spread out).

    >>> expected_scores([[0, 0, 1, 0, 0], [0.5, 0, 0, 0, 0.5]]).tolist()
    [3.0, 3.0]
    >>> round(mean_entropy([[0.2] * 5], normalised=True), 6)
    1.0

`probs` is an (n, 5) array-like of p1..p5 per judgment. A row with all five missing (None/NaN: a judgment
stored without probabilities) is left out, never turned into a number; a row with only some missing,
a negative or infinite value, or a zero sum raises, naming the row. Rows are renormalised to sum to 1 (the
stored values may carry rounding, or cover only the five digits). Degenerate input gives NaN, as in
`engine.metrics`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from engine.metrics import LEVELS, NAN, _missing, _ratio, round_half_up

SCORES = np.arange(1, LEVELS + 1, dtype=float)
ECE_BINS = 10  # equal-width confidence bins on [0, 1]
DOMINANT_SHARE = 0.5  # saturation: one score takes more than half of all judgments ...
BALANCED_GOLD = 0.35  # ... while no gold score takes more than 35% (five equal scores would take 20% each)


def score_probabilities(probs) -> tuple[np.ndarray, np.ndarray]:
    """The (n, 5) probabilities renormalised per row, and the (n,) mask of rows that have them (rows
    without are all NaN in the first array)."""
    arr = np.array(probs, dtype=float)  # None -> NaN
    if arr.size == 0:
        return np.zeros((0, LEVELS)), np.zeros(0, dtype=bool)
    if arr.ndim != 2 or arr.shape[1] != LEVELS:
        raise ValueError(f"probs must be an (n, {LEVELS}) array of p1..p{LEVELS}; got shape {arr.shape}")
    missing = np.isnan(arr)
    valid = ~missing.any(axis=1)
    _check_rows(arr, missing, valid)
    out = np.full_like(arr, NAN)
    out[valid] = arr[valid] / arr[valid].sum(axis=1, keepdims=True)
    return out, valid


def _check_rows(arr: np.ndarray, missing: np.ndarray, valid: np.ndarray) -> None:
    checks = (
        (missing.any(axis=1) & ~missing.all(axis=1), "some of p1..p5 are missing (all or none must be)"),
        (valid & np.isinf(arr).any(axis=1), "a probability is infinite"),
        (valid & (arr < 0).any(axis=1), "a probability is negative"),
        (valid & (np.where(missing, 0.0, arr).sum(axis=1) == 0), "probabilities sum to 0"),
    )
    for bad, why in checks:
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise ValueError(f"row {i}: {why}: {arr[i].tolist()}")


def expected_scores(probs) -> np.ndarray:
    """Probability-weighted score per row, sum_k k * p_k (in [1, 5]); NaN for a row without probabilities."""
    p, valid = score_probabilities(probs)
    out = np.full(len(p), NAN)
    out[valid] = p[valid] @ SCORES
    return out


def _gold_levels(gold: Sequence[float], n: int) -> np.ndarray:
    """Gold scores rounded half up, checked to lie in 1..5 (raises naming the item)."""
    if len(gold) != n:
        raise ValueError(f"probs and gold differ in length: {n} vs {len(gold)}")
    out = np.zeros(n, dtype=int)
    for i, g in enumerate(gold):
        if _missing(g):
            raise ValueError(f"item {i}: gold score is missing")
        out[i] = round_half_up(float(g))
        if not 1 <= out[i] <= LEVELS:
            raise ValueError(f"item {i}: gold score {g} is outside 1..{LEVELS}")
    return out


def reliability_bins(probs, gold: Sequence[float], bins: int = ECE_BINS) -> list[dict]:
    """Top-label reliability: per equal-width confidence bin, how often the top score is the gold score.

    Confidence is a row's largest probability and its prediction that score (the lowest score on a tie);
    it is correct when it equals gold rounded half up. A row falls in bin floor(confidence * bins) (the
    last bin also takes confidence 1.0), so bins below 1/5 stay empty. Rows without probabilities are
    left out.

    Returns:
        one dict per bin, in order: lo, hi (bin edges), confidence (mean), accuracy (share correct), count;
        confidence and accuracy are NaN for an empty bin. Plot accuracy against confidence: the diagonal is
        perfect calibration, points below it overconfidence.
    """
    if not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a positive integer, got {bins!r}")
    p, valid = score_probabilities(probs)
    target = _gold_levels(gold, len(p))[valid]
    p = p[valid]
    confidence = p.max(axis=1) if len(p) else np.zeros(0)
    correct = (p.argmax(axis=1) + 1 == target) if len(p) else np.zeros(0, dtype=bool)
    index = np.minimum((confidence * bins).astype(int), bins - 1)
    out = []
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        out.append({
            "lo": b / bins,
            "hi": (b + 1) / bins,
            "confidence": float(confidence[members].mean()) if count else NAN,
            "accuracy": float(correct[members].mean()) if count else NAN,
            "count": count,
        })
    return out


def expected_calibration_error(probs, gold: Sequence[float], bins: int = ECE_BINS) -> float:
    """Top-label ECE: sum over bins of (count / n) * |accuracy - confidence| (see `reliability_bins`).
    0 for a perfectly calibrated judge; NaN when no row has probabilities."""
    table = reliability_bins(probs, gold, bins)
    n = sum(b["count"] for b in table)
    if n == 0:
        return NAN
    return float(sum(b["count"] / n * abs(b["accuracy"] - b["confidence"]) for b in table if b["count"]))


def mean_entropy(probs, *, normalised: bool = False) -> float:
    """Mean entropy of the score distribution over rows that have probabilities, in nats (0 for a one-hot
    row, log 5 = 1.609 for a uniform one). `normalised=True` divides by log 5, giving 0..1. NaN when no
    row has probabilities."""
    p, valid = score_probabilities(probs)
    p = p[valid]
    if len(p) == 0:
        return NAN
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, -p * np.log(p), 0.0)  # 0 * log 0 = 0
    value = float(terms.sum(axis=1).mean())
    return value / math.log(LEVELS) if normalised else value


# ------------------------------------------------------------------ saturation


def score_shares(scores: Sequence[float | None]) -> dict[int, float]:
    """Share of each score 1..5 among the scores given (rounded half up, so a mean of 3.5 counts as 4).
    Missing scores (parse failures) are left out, so the shares sum to 1; all NaN when none is left.

    Raises:
        ValueError: a score rounds outside 1..5 (naming the item).
    """
    counts = dict.fromkeys(range(1, LEVELS + 1), 0)
    for i, s in enumerate(scores):
        if _missing(s):
            continue
        level = round_half_up(float(s))
        if level not in counts:
            raise ValueError(f"item {i}: score {s} is outside 1..{LEVELS}")
        counts[level] += 1
    n = sum(counts.values())
    return {k: _ratio(c, n) for k, c in counts.items()}


def saturation_warning(scores: Sequence[float | None], gold: Sequence[float], *,
                       dominant: float = DOMINANT_SHARE, balanced: float = BALANCED_GOLD) -> str | None:
    """A warning when one score takes more than `dominant` (half) of the judge's scores while gold is
    balanced, i.e. no gold score takes more than `balanced` (35%); else None (also when either side has
    no scores). On skewed gold a dominant score may be right, so it is not flagged.

    Args:
        scores: the judgments' scores on one dataset for one iteration (None for a parse failure).
        gold: the dataset's gold scores (one per item; rounded half up).
    """
    for i, g in enumerate(gold):
        if _missing(g):
            raise ValueError(f"item {i}: gold score is missing")
    judged, truth = score_shares(scores), score_shares(gold)
    if any(math.isnan(v) for v in (*judged.values(), *truth.values())):
        return None
    top = max(judged, key=lambda k: (judged[k], -k))  # the lower score on a tie
    gold_top = max(truth, key=lambda k: (truth[k], -k))
    if judged[top] <= dominant or truth[gold_top] > balanced:
        return None
    n = sum(1 for s in scores if not _missing(s))
    return (f"score saturation: score {top} takes {judged[top]:.0%} of {n} judgments while gold is balanced "
            f"(its largest share is {truth[gold_top]:.0%}, score {gold_top})")
