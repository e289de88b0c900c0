"""Judge metrics: agreement of predicted scores with gold scores, and pairwise accuracy.

Pure functions over plain sequences (no DB, no model). A prediction of `None` is a parse failure: it is
never turned into a number. Correlations are computed over the items that have a prediction; accuracy-style
figures count failures as wrong, over all items (so a judge cannot look better by failing to parse).
Nothing here raises on degenerate input (empty lists, a single point, constant scores): the figure is NaN.

    >>> absolute_metrics([1, 2, 3, 4], [1, 3, None, 4])["exact"]
    0.5
    >>> pairwise_metrics([5, 3, None], [4, 3, 1])["accuracy"]   # win, tie, failure
    0.3333333333333333

The caller adds the namespace (`eval/pearson`, `eval/pairwise/accuracy`, ...).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
from scipy import stats

NAN = float("nan")


def _missing(x: float | None) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _round_half_up(x: float) -> int:
    # Python's round() rounds half to even (round(2.5) == 2); a gold mean of 2.5 should count as 3.
    return math.floor(x + 0.5)


def _ratio(num: float, den: int) -> float:
    return num / den if den else NAN


def _correlations(gold: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Pearson, Spearman and Kendall; NaN when fewer than 2 points or either side is constant."""
    if len(gold) < 2 or np.ptp(gold) == 0 or np.ptp(pred) == 0:
        return {"pearson": NAN, "spearman": NAN, "kendall": NAN}
    with warnings.catch_warnings():  # scipy warns (not raises) on near-degenerate input; we report NaN instead
        warnings.simplefilter("ignore")
        out = {
            "pearson": stats.pearsonr(gold, pred).statistic,
            "spearman": stats.spearmanr(gold, pred).statistic,
            "kendall": stats.kendalltau(gold, pred).statistic,  # tau-b: corrects for ties (1-5 scores tie a lot)
        }
    return {k: float(v) for k, v in out.items()}


def absolute_metrics(gold: Sequence[float], pred: Sequence[float | None]) -> dict[str, float]:
    """Agreement of predicted 1-5 scores with gold scores.

    Args:
        gold: gold scores, one per item (may be non-integer, e.g. a mean of annotators; rounded half up for `exact`).
        pred: the judge's score per item, `None` (or NaN) for a parse failure.

    Returns:
        pearson, spearman, kendall: over the items with a prediction (NaN if < 2 of them or a constant side).
        exact: round(gold) == pred, over all items (failures count as wrong).
        within1: |gold - pred| <= 1, over all items (failures count as wrong).
        parse_failure_rate: failures / n.  n: items.  n_scored: items with a prediction.
        mean_score: mean prediction over scored items (NaN if none): watch it for drift toward 5.

    Raises:
        ValueError: lengths differ, or a gold score is missing (a data bug, not a judge failure).
    """
    if len(gold) != len(pred):
        raise ValueError(f"gold and pred differ in length: {len(gold)} vs {len(pred)}")
    if any(_missing(g) for g in gold):
        raise ValueError("gold contains a missing score (None/NaN); drop those items before scoring")
    n = len(gold)
    scored = [(float(g), float(p)) for g, p in zip(gold, pred) if not _missing(p)]
    n_scored = len(scored)
    g_arr = np.array([g for g, _ in scored], dtype=float)
    p_arr = np.array([p for _, p in scored], dtype=float)

    exact = sum(1 for g, p in scored if _round_half_up(g) == p)
    within1 = sum(1 for g, p in scored if abs(g - p) <= 1)
    return {
        **_correlations(g_arr, p_arr),
        "exact": _ratio(exact, n),
        "within1": _ratio(within1, n),
        "parse_failure_rate": _ratio(n - n_scored, n),
        "n": float(n),
        "n_scored": float(n_scored),
        "mean_score": float(p_arr.mean()) if n_scored else NAN,
    }


def pairwise_metrics(chosen: Sequence[float | None], rejected: Sequence[float | None]) -> dict[str, float]:
    """Absolute-to-pairwise accuracy (Prometheus convention): the chosen response wins only if its score is
    strictly higher. A tie, or a parse failure on either side, counts as not correct.

    (Prometheus resamples ties up to twice before counting them wrong; that is the caller's job: pass the
    final scores here.)

    Returns:
        accuracy: wins / n.  ties: pairs scored on both sides with equal scores.  tie_rate: ties / n.
        failures: pairs with a failure on either side.  n: pairs.  All ratios NaN when n == 0.
    """
    if len(chosen) != len(rejected):
        raise ValueError(f"chosen and rejected differ in length: {len(chosen)} vs {len(rejected)}")
    n = len(chosen)
    wins = ties = failures = 0
    for c, r in zip(chosen, rejected):
        if _missing(c) or _missing(r):
            failures += 1
        elif c > r:
            wins += 1
        elif c == r:
            ties += 1
    return {
        "accuracy": _ratio(wins, n),
        "ties": float(ties),
        "tie_rate": _ratio(ties, n),
        "failures": float(failures),
        "n": float(n),
    }
