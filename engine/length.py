"""Response length as a judge, and figures that control for it.

On the CIA graded responses, length alone predicts the gold score (docs/evaluation.md, "Length: a trap in
the reference data"), so a judge that learned "longer is better" looks good while judging nothing. These pure
functions give the length baseline (scored like any judge) and length-controlled figures to report beside a
judge:

    >>> length_baseline_scores([120, 40, 300, 40, 95]).tolist()   # the two 40s share mean rank 1.5
    [4, 2, 5, 2, 3]
    >>> length_baseline_pairwise([300, 50], [100, 50])["accuracy"]   # longer wins; equal length is a tie
    0.5

A length is any non-negative count the caller picks (characters, words, tokens), the same for every
response. A missing length is a data bug and raises; a missing prediction (`None`/NaN) is a parse failure,
as in `engine.metrics`: left out of correlations, counted wrong in accuracies. Degenerate input gives NaN.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import numpy as np
from scipy import stats

from engine.metrics import LEVELS, NAN, _missing, _ratio, pairwise_metrics, pairwise_outcomes

SIMILAR_LENGTH = 0.2  # two responses are "of similar length" when they differ by less than 20% of the longer
PARTIAL_METHODS = ("pearson", "spearman")


def _lengths(lengths: Sequence[float], name: str = "length") -> np.ndarray:
    """Lengths as floats; raises naming the first missing or negative one."""
    arr = np.array([NAN if x is None else x for x in lengths], dtype=float).reshape(len(lengths))
    bad = np.flatnonzero(np.isnan(arr) | (arr < 0))
    if bad.size:
        i = int(bad[0])
        state = "missing" if np.isnan(arr[i]) else f"negative ({arr[i]:g})"
        raise ValueError(f"item {i}: {name} is {state}")
    return arr


# ------------------------------------------------------------------ the length baseline


def length_baseline_scores(lengths: Sequence[float]) -> np.ndarray:
    """The length baseline's 1-5 score per response: the quintile of its length's rank in the dataset.

    Ranks are 1..n with ties sharing their mean rank (scipy's "average"), and rank r maps to
    `floor(5 * (r - 0.5) / n) + 1`: the position of the rank's midpoint in (0, 1), cut into fifths. So n
    distinct lengths give equal quintiles (n = 10: 1,1,2,2,...,5,5), equal lengths always share a score (a
    midpoint exactly on a quintile edge goes up: lengths 1,1,2,3,4 score 2,2,3,4,5), all-equal lengths all
    score 3, and the result depends only on the multiset of lengths (deterministic, order-free). Computed in integers
    (2r is an integer) so no rounding error moves a rank across a quintile edge.

    Returns:
        int array of 1..5, one per response (empty for no responses).
    """
    arr = _lengths(lengths)
    if arr.size == 0:
        return np.zeros(0, dtype=int)
    twice_rank = np.rint(2 * stats.rankdata(arr, method="average")).astype(np.int64)
    return (LEVELS * (twice_rank - 1)) // (2 * arr.size) + 1


def length_baseline_pairwise(len_chosen: Sequence[float], len_rejected: Sequence[float],
                             labels: Sequence[str] | None = None, *, bootstrap: int = 0,
                             seed: int = 0) -> dict[str, float]:
    """The length baseline on pairwise data: the longer response wins, equal lengths are a tie.

    The lengths are passed as the two sides' scores to `metrics.pairwise_metrics`, so the figures (accuracy,
    ties, tie_rate, tie_item_accuracy, ...) mean exactly what they mean for a judge: an A/B pair is correct
    when the chosen response is strictly longer, a pair labelled "tie" when both are equally long. For the
    per-pair outcomes (e.g. per section), call `metrics.pairwise_outcomes(len_chosen, len_rejected, labels)`.
    """
    chosen, rejected = _lengths(len_chosen, "chosen length"), _lengths(len_rejected, "rejected length")
    return pairwise_metrics(chosen.tolist(), rejected.tolist(), labels, bootstrap=bootstrap, seed=seed)


# ------------------------------------------------------------------ length-controlled figures


def _residuals(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """y minus its least-squares line on x (with intercept)."""
    dx = x - x.mean()
    slope = (dx @ (y - y.mean())) / (dx @ dx)
    return (y - y.mean()) - slope * dx


def _explained(y: np.ndarray, resid: np.ndarray) -> bool:
    # y is (up to float noise) a straight line in the control: nothing is left to correlate.
    return float(resid @ resid) <= 1e-12 * float(((y - y.mean()) ** 2).sum())


def partial_correlation(gold: Sequence[float], pred: Sequence[float | None], length: Sequence[float],
                        method: str = "pearson") -> float:
    """Correlation of the judge's score with gold once response length is controlled for.

    Both gold and pred are regressed (least squares, with intercept) on length, and the figure is the Pearson
    correlation of the two residuals; this equals the closed form
    `(r_gp - r_gl r_pl) / sqrt((1 - r_gl^2)(1 - r_pl^2))`. `method="spearman"` does the same on the ranks of
    all three (ties share their mean rank). Items without a prediction are left out first.

    A judge that knows nothing beyond length scores near 0, however well it correlates with gold. Note the
    control is linear (in length, or in its rank): a judge that equals gold still scores 1.

    Returns:
        NaN when fewer than 3 items have a prediction, any of the three is constant, or gold or pred is
        entirely a straight line in length (there is nothing beyond length left to agree on).

    Raises:
        ValueError: lengths differ, an unknown method, a missing gold score or a missing length.
    """
    if method not in PARTIAL_METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {PARTIAL_METHODS}")
    if not len(gold) == len(pred) == len(length):
        raise ValueError(f"gold, pred and length differ in length: {len(gold)}, {len(pred)}, {len(length)}")
    if any(_missing(g) for g in gold):
        raise ValueError("gold contains a missing score (None/NaN); drop those items before scoring")
    lengths = _lengths(length)
    keep = [i for i, p in enumerate(pred) if not _missing(p)]
    g = np.array([gold[i] for i in keep], dtype=float)
    p = np.array([pred[i] for i in keep], dtype=float)
    x = lengths[keep]
    if len(keep) < 3 or min(np.ptp(g), np.ptp(p), np.ptp(x)) == 0:
        return NAN
    if method == "spearman":
        g, p, x = stats.rankdata(g), stats.rankdata(p), stats.rankdata(x)
    rg, rp = _residuals(g, x), _residuals(p, x)
    if _explained(g, rg) or _explained(p, rp):
        return NAN
    r = (rg @ rp) / math.sqrt((rg @ rg) * (rp @ rp))
    return float(min(1.0, max(-1.0, r)))


def _similar_pairs(groups: Sequence[Hashable], lengths: np.ndarray, gold: np.ndarray,
                   max_difference: float) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) index arrays of the within-group pairs of similar length and different gold, i < j."""
    members: dict[Hashable, list[int]] = {}
    for i, key in enumerate(groups):
        if key is None:
            raise ValueError(f"item {i}: prompt (group key) is missing")
        members.setdefault(key, []).append(i)
    first, second = [], []
    for idx in members.values():
        a, b = np.triu_indices(len(idx), k=1)
        i, j = np.asarray(idx)[a], np.asarray(idx)[b]
        longer = np.maximum(lengths[i], lengths[j])
        gap = np.abs(lengths[i] - lengths[j])
        # gap / longer < 20%, as a quotient so an exact 20% (25 vs 125) is out, not decided by rounding;
        # two empty responses (0 vs 0) count as the same length.
        with np.errstate(invalid="ignore"):
            similar = (gap / longer < max_difference) | (longer == 0)
        keep = similar & (gold[i] != gold[j])
        first.append(i[keep])
        second.append(j[keep])
    if not first:
        return np.zeros(0, dtype=int), np.zeros(0, dtype=int)
    return np.concatenate(first), np.concatenate(second)


def similar_length_pair_accuracy(groups: Sequence[Hashable], gold: Sequence[float],
                                 pred: Sequence[float | None], lengths: Sequence[float], *,
                                 max_difference: float = SIMILAR_LENGTH) -> dict[str, float]:
    """Accuracy on within-prompt pairs of responses of similar length, where length cannot decide.

    Pairs are every two responses with the same group key (pass the items' instruction, or a prompt id),
    whose lengths differ by less than `max_difference` of the longer one (|a - b| / max(a, b) < 0.2), and
    whose gold scores differ. A pair is correct when the judge orders it like gold, strictly; equal
    predictions are a tie (wrong, but reported) and a missing prediction on either side a failure (wrong).

    Returns:
        accuracy: correct / n_pairs (NaN when there are no pairs).  n_pairs.  ties, tie_rate (ties / n_pairs).
        failures: pairs with a missing prediction.  n_groups: groups holding at least one pair.

    Raises:
        ValueError: lengths differ, a missing group key, gold score or length (naming the item).
    """
    if not len(groups) == len(gold) == len(pred) == len(lengths):
        raise ValueError(f"groups, gold, pred and lengths differ in length: "
                         f"{len(groups)}, {len(gold)}, {len(pred)}, {len(lengths)}")
    for i, g in enumerate(gold):
        if _missing(g):
            raise ValueError(f"item {i}: gold score is missing")
    g = np.asarray(gold, dtype=float).reshape(len(gold))
    p = np.array([NAN if _missing(x) else float(x) for x in pred]).reshape(len(pred))
    i, j = _similar_pairs(groups, _lengths(lengths), g, max_difference)
    n = len(i)
    failed = np.isnan(p[i]) | np.isnan(p[j])
    tied = ~failed & (p[i] == p[j])
    correct = ~failed & (np.sign(p[i] - p[j]) == np.sign(g[i] - g[j]))
    return {
        "accuracy": _ratio(float(correct.sum()), n),
        "n_pairs": float(n),
        "ties": float(tied.sum()),
        "tie_rate": _ratio(float(tied.sum()), n),
        "failures": float(failed.sum()),
        "n_groups": float(len({groups[k] for k in i.tolist()})),
    }


def pairwise_by_length(chosen_pred: Sequence[float | None], rejected_pred: Sequence[float | None],
                       len_chosen: Sequence[float], len_rejected: Sequence[float],
                       labels: Sequence[str] | None = None) -> dict[str, float]:
    """Pairwise accuracy split by whether the chosen response is the longer one.

    A judge with a length bias is right far more often when the chosen response is longer than when it is
    shorter. Outcomes are `metrics.pairwise_outcomes` (ties and failures are wrong). Pairs labelled "tie"
    have no chosen side and are left out; A/B pairs of equal length form a third group.

    Returns:
        accuracy_chosen_longer, n_chosen_longer, accuracy_chosen_shorter, n_chosen_shorter,
        accuracy_equal_length, n_equal_length (accuracies NaN when their n is 0).
    """
    outcomes = pairwise_outcomes(chosen_pred, rejected_pred, labels)
    if not len(len_chosen) == len(len_rejected) == len(outcomes):
        raise ValueError(f"lengths and predictions differ in length: "
                         f"{len(len_chosen)}, {len(len_rejected)}, {len(outcomes)}")
    lc, lr = _lengths(len_chosen, "chosen length"), _lengths(len_rejected, "rejected length")
    labels = labels if labels is not None else ["A"] * len(outcomes)
    counts = {name: [0, 0] for name in ("chosen_longer", "chosen_shorter", "equal_length")}  # correct, n
    for outcome, label, c, r in zip(outcomes, labels, lc, lr):
        if label == "tie":
            continue
        name = "chosen_longer" if c > r else "chosen_shorter" if c < r else "equal_length"
        counts[name][0] += outcome == "correct"
        counts[name][1] += 1
    out = {}
    for name, (correct, n) in counts.items():
        out[f"accuracy_{name}"] = _ratio(correct, n)
        out[f"n_{name}"] = float(n)
    return out
