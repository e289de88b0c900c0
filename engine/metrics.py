"""Judge metrics: agreement of predicted scores with gold scores, and pairwise accuracy.

Pure functions over plain sequences (no DB, no model). A prediction of `None` is a parse failure: it is
never turned into a number. Correlations are computed over the items that have a prediction; accuracy-style
figures count failures as wrong, over all items (so a judge cannot look better by failing to parse).
Nothing here raises on degenerate input (empty lists, a single point, constant scores): the figure is NaN.

    >>> absolute_metrics([1, 2, 3, 4], [1, 3, None, 4], bootstrap=0)["exact"]
    0.5
    >>> pairwise_metrics([5, 3, None], [4, 3, 1])["accuracy"]   # win, tie, failure
    0.3333333333333333

95% intervals are percentile bootstraps over items resampled with replacement, seeded (same seed, same
interval): `percentile_bootstrap`, the one helper every interval of the project goes through. The caller
adds the namespace (`eval/pearson`, `eval/pairwise/accuracy`, ...).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np

NAN = float("nan")
CORRELATIONS = ("pearson", "spearman", "kendall")
PAIR_LABELS = ("A", "B", "tie")  # A/B: `chosen` is the better response; tie: neither (docs/evaluation.md, "Ties")
LEVELS = 5  # scores 1..5
# The figures a report leads with, in this order (the CLI's metric lines, the app's Evaluation table, the
# Overview chart's default, the demo's before/after table); each shows the ones a dataset has.
HEADLINE_METRICS = (
    "pearson", "spearman", "kendall", "exact", "within1", "partial_pearson", "similar_length_accuracy",
    "accuracy", "section_mean_accuracy", "accuracy_chosen_longer", "accuracy_chosen_shorter", "tie_rate",
    "position_consistency", "ece", "mean_entropy", "parse_failure_rate",
)
# Resampled values held in memory at once (resamples x items): ~8 MB per array whatever n is.
_CHUNK_CELLS = 1_000_000


def _missing(x: float | None) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def round_half_up(x):
    """The one rounding rule for scores (docs/evaluation.md, "Rounding"): x.5 goes up, so a gold mean of
    2.5 counts as 3 and a self-consistency mean of 3.5 as 4. Python's round() rounds half to even
    (round(2.5) == 2), which would move half of such scores down. A float gives an int; a numpy array gives
    an array of whole floats (NaN stays NaN).

    The store's SQL spells the same rule `floor(x + 0.5)` (store/queries.py `GOLD`; the store may not import
    the engine): tests/test_metrics.py checks that the two agree on the .5 cases.
    """
    if isinstance(x, np.ndarray):
        return np.floor(x + 0.5)
    return math.floor(x + 0.5)


def _ratio(num: float, den: int) -> float:
    return num / den if den else NAN


def _correlations(gold: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """Pearson, Spearman and Kendall; NaN when fewer than 2 points or either side is constant."""
    if len(gold) < 2 or np.ptp(gold) == 0 or np.ptp(pred) == 0:
        return {"pearson": NAN, "spearman": NAN, "kendall": NAN}
    from scipy import stats  # slow to import: the app's pages read only this module's names

    with warnings.catch_warnings():  # scipy warns (not raises) on near-degenerate input; we report NaN instead
        warnings.simplefilter("ignore")
        out = {
            "pearson": stats.pearsonr(gold, pred).statistic,
            "spearman": stats.spearmanr(gold, pred).statistic,
            "kendall": stats.kendalltau(gold, pred).statistic,  # tau-b: corrects for ties (1-5 scores tie a lot)
        }
    return {k: float(v) for k, v in out.items()}


# ------------------------------------------------------------------ bootstrap of the correlations
#
# Scores take few distinct values (1-5, or means of a few samples), so each resample is handled through
# value codes: ranks (Spearman) come from per-resample counts of each code, and Kendall's tau-b from the
# resample's gold x pred contingency table, both O(resamples x items) with numpy, no per-resample loop.
# Only when gold x pred has very many distinct value pairs (continuous scores) does Kendall fall back to
# scipy per resample (about 1 ms each for 1000 items).


def _rowwise_pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson per row of two (resamples, items) arrays; NaN for a row where either side is constant."""
    dx = x - x.mean(axis=1, keepdims=True)
    dy = y - y.mean(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (dx * dy).sum(axis=1) / np.sqrt((dx * dx).sum(axis=1) * (dy * dy).sum(axis=1))
    # Test constancy on the values, not on the sums: a constant row of 2.3333 leaves ~1e-16 residuals.
    r[(np.ptp(x, axis=1) == 0) | (np.ptp(y, axis=1) == 0)] = np.nan
    return np.clip(r, -1.0, 1.0)


def _code_counts(codes: np.ndarray, k: int) -> np.ndarray:
    """(resamples, items) codes in 0..k-1 -> (resamples, k) counts, one bincount for all rows."""
    b = codes.shape[0]
    flat = (codes + k * np.arange(b)[:, None]).ravel()
    return np.bincount(flat, minlength=b * k).reshape(b, k)


def _rowwise_ranks(codes: np.ndarray, k: int) -> np.ndarray:
    """Average ranks (ties share the mean rank, as scipy's rankdata) of each row's values."""
    counts = _code_counts(codes, k)
    below = np.cumsum(counts, axis=1) - counts  # values strictly smaller than each code
    mean_rank = below + (counts + 1) / 2.0
    return np.take_along_axis(mean_rank, codes, axis=1)


def _rowwise_kendall(g_codes: np.ndarray, p_codes: np.ndarray, kg: int, kp: int) -> np.ndarray:
    """Kendall's tau-b per row from the (kg x kp) contingency table of each row's (gold, pred) codes."""
    b, n = g_codes.shape
    table = _code_counts(g_codes * kp + p_codes, kg * kp).reshape(b, kg, kp).astype(float)
    # above_right[i, j] = pairs with gold code > i and pred code > j; above_left: gold > i and pred < j.
    ge_ge = table[:, ::-1, ::-1].cumsum(axis=1).cumsum(axis=2)[:, ::-1, ::-1]  # gold >= i, pred >= j
    ge_le = table[:, ::-1, :].cumsum(axis=1).cumsum(axis=2)[:, ::-1, :]  # gold >= i, pred <= j
    above_right = np.zeros_like(table)
    above_right[:, :-1, :-1] = ge_ge[:, 1:, 1:]
    above_left = np.zeros_like(table)
    above_left[:, :-1, 1:] = ge_le[:, 1:, :-1]
    concordant = (table * above_right).sum(axis=(1, 2))
    discordant = (table * above_left).sum(axis=(1, 2))
    n0 = n * (n - 1) / 2.0
    rows, cols = table.sum(axis=2), table.sum(axis=1)
    tied_gold = (rows * (rows - 1) / 2.0).sum(axis=1)
    tied_pred = (cols * (cols - 1) / 2.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        tau = (concordant - discordant) / np.sqrt((n0 - tied_gold) * (n0 - tied_pred))
    tau[(n0 - tied_gold == 0) | (n0 - tied_pred == 0)] = np.nan
    return np.clip(tau, -1.0, 1.0)


def _scipy_kendall_rows(g: np.ndarray, p: np.ndarray) -> np.ndarray:
    from scipy import stats

    out = np.full(g.shape[0], np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(g.shape[0]):
            if np.ptp(g[i]) and np.ptp(p[i]):
                out[i] = stats.kendalltau(g[i], p[i]).statistic
    return out


def resampled_correlations(gold: np.ndarray, pred: np.ndarray, idx: np.ndarray) -> dict[str, np.ndarray]:
    """Pearson, Spearman and Kendall tau-b of each resample `gold[idx[r]], pred[idx[r]]` (idx: resamples x
    items); NaN for a resample where either side is constant."""
    g_vals, g_codes = np.unique(gold, return_inverse=True)
    p_vals, p_codes = np.unique(pred, return_inverse=True)
    kg, kp = len(g_vals), len(p_vals)
    gc, pc = g_codes.ravel()[idx], p_codes.ravel()[idx]
    g, p = gold[idx], pred[idx]
    out = {
        "pearson": _rowwise_pearson(g, p),
        "spearman": _rowwise_pearson(_rowwise_ranks(gc, kg), _rowwise_ranks(pc, kp)),
    }
    small_table = idx.shape[0] * kg * kp <= _CHUNK_CELLS
    out["kendall"] = _rowwise_kendall(gc, pc, kg, kp) if small_table else _scipy_kendall_rows(g, p)
    # Constant rows by value (a resample of a non-constant set can be constant).
    const = (np.ptp(g, axis=1) == 0) | (np.ptp(p, axis=1) == 0)
    for v in out.values():
        v[const] = np.nan
    return out


def _percentile_interval(values: np.ndarray) -> tuple[float, float]:
    """2.5th and 97.5th percentiles of the defined (non-NaN) resample statistics; NaN if none is defined."""
    values = values[~np.isnan(values)]
    if values.size == 0:
        return NAN, NAN
    lo, hi = np.percentile(values, [2.5, 97.5])
    return float(lo), float(hi)


def percentile_bootstrap(statistics: Callable[[np.ndarray], dict[str, np.ndarray]], n: int, *, bootstrap: int,
                         seed: int) -> dict[str, tuple[float, float]]:
    """The project's one bootstrap (docs/evaluation.md, "Intervals"): 95% percentile intervals of some
    statistics over `bootstrap` resamples of n items drawn with replacement from
    `np.random.default_rng(seed)` (same seed, same intervals).

    `statistics(idx)` receives a (resamples, n) array of item indices, a chunk of resamples at a time (about
    a million indices, so memory stays flat whatever n is), and returns {name: one value per resample}. A
    NaN value marks a resample where the statistic is undefined (a constant side of a correlation): it is
    left out of the percentiles. Returns {name: (lo, hi)}, (NaN, NaN) for a statistic no resample defines;
    {} when n is 0 or bootstrap <= 0.
    """
    if n <= 0 or bootstrap <= 0:
        return {}
    rng = np.random.default_rng(seed)
    per_chunk = max(1, _CHUNK_CELLS // n)
    draws: dict[str, list[np.ndarray]] = {}
    for start in range(0, bootstrap, per_chunk):
        idx = rng.integers(0, n, size=(min(per_chunk, bootstrap - start), n))
        for name, values in statistics(idx).items():
            draws.setdefault(name, []).append(np.asarray(values, dtype=float))
    return {name: _percentile_interval(np.concatenate(values)) for name, values in draws.items()}


def bootstrap_mean(values: Sequence[float], bootstrap: int, seed: int) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean of per-item values (e.g. 1 = correct, 0 = not: an
    accuracy); (NaN, NaN) with no item or bootstrap <= 0."""
    arr = np.asarray(values, dtype=float)
    got = percentile_bootstrap(lambda idx: {"mean": arr[idx].mean(axis=1)}, len(arr), bootstrap=bootstrap,
                               seed=seed)
    return got.get("mean", (NAN, NAN))


def bootstrap_correlations(gold: np.ndarray, pred: np.ndarray, bootstrap: int, seed: int) -> dict[str, float]:
    """`<name>_lo` / `<name>_hi` for pearson, spearman, kendall: 95% percentile intervals over `bootstrap`
    resamples of the (gold, pred) pairs with replacement. NaN when the point estimate is undefined.
    Resamples where a side comes out constant are undefined and left out of the percentiles."""
    point = _correlations(gold, pred)
    out = {f"{name}_{end}": NAN for name in CORRELATIONS for end in ("lo", "hi")}
    if bootstrap <= 0 or all(math.isnan(point[k]) for k in CORRELATIONS):
        return out
    intervals = percentile_bootstrap(lambda idx: resampled_correlations(gold, pred, idx), len(gold),
                                     bootstrap=bootstrap, seed=seed)
    for name in CORRELATIONS:
        if not math.isnan(point[name]):
            out[f"{name}_lo"], out[f"{name}_hi"] = intervals[name]
    return out


# ------------------------------------------------------------------ absolute grading


def absolute_metrics(gold: Sequence[float], pred: Sequence[float | None], *, bootstrap: int = 1000,
                     seed: int = 0) -> dict[str, float]:
    """Agreement of predicted 1-5 scores with gold scores.

    Args:
        gold: gold scores, one per item (may be non-integer, e.g. a mean of annotators; rounded half up for `exact`).
        pred: the judge's score per item, `None` (or NaN) for a parse failure. A fractional prediction
            (self-consistency mean, expected score) keeps its value in the correlations and is rounded half
            up for exact and within1, as the 1-5 score it stands for.
        bootstrap: resamples for the 95% intervals of the correlations (0 = no intervals, no `_lo`/`_hi` keys).
        seed: the resampling seed (same seed, same intervals).

    Returns:
        pearson, spearman, kendall: over the items with a prediction (NaN if < 2 of them or a constant side),
            each with `_lo` and `_hi` (bootstrap over the scored items) when bootstrap > 0.
        exact: round(gold) == round(pred), over all items (failures count as wrong).
        within1: |gold - round(pred)| <= 1, over all items (failures count as wrong).
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

    exact = sum(1 for g, p in scored if round_half_up(g) == round_half_up(p))
    within1 = sum(1 for g, p in scored if abs(g - round_half_up(p)) <= 1)
    out = _correlations(g_arr, p_arr)
    if bootstrap > 0:
        out.update(bootstrap_correlations(g_arr, p_arr, bootstrap, seed))
    return {
        **out,
        "exact": _ratio(exact, n),
        "within1": _ratio(within1, n),
        "parse_failure_rate": _ratio(n - n_scored, n),
        "n": float(n),
        "n_scored": float(n_scored),
        "mean_score": float(p_arr.mean()) if n_scored else NAN,
    }


def confusion_matrix(gold: Sequence[float], pred: Sequence[float | None]) -> list[list[int]]:
    """5x5 counts: row = gold score - 1, column = predicted score - 1, both rounded half up (a mean of
    samples such as 3.5 lands in 4). Items without a prediction are left out (their count is
    `absolute_metrics(...)["n"] - ["n_scored"]`).

    Raises:
        ValueError: lengths differ, a gold score is missing, or a score rounds outside 1..5 (names the item).
    """
    if len(gold) != len(pred):
        raise ValueError(f"gold and pred differ in length: {len(gold)} vs {len(pred)}")
    matrix = [[0] * LEVELS for _ in range(LEVELS)]
    for i, (g, p) in enumerate(zip(gold, pred)):
        if _missing(g):
            raise ValueError(f"item {i}: gold score is missing")
        if _missing(p):
            continue
        row, col = round_half_up(float(g)), round_half_up(float(p))
        for name, value, raw in (("gold", row, g), ("predicted", col, p)):
            if not 1 <= value <= LEVELS:
                raise ValueError(f"item {i}: {name} score {raw} is outside 1..{LEVELS}")
        matrix[row - 1][col - 1] += 1
    return matrix


# ------------------------------------------------------------------ pairwise


def pairwise_outcomes(chosen: Sequence[float | None], rejected: Sequence[float | None],
                      labels: Sequence[str] | None = None) -> list[str]:
    """Per pair: "correct", "wrong", "tie" (an A/B pair scored equal: wrong, but reported) or "failure"
    (no score on a side: wrong). An A/B pair is correct when `chosen` scores strictly higher; a pair
    labelled "tie" is correct when both sides score the same (docs/evaluation.md, "Ties"), and then `chosen`/`rejected`
    are just its two sides. `labels=None` means every pair is an A/B pair."""
    if len(chosen) != len(rejected):
        raise ValueError(f"chosen and rejected differ in length: {len(chosen)} vs {len(rejected)}")
    if labels is None:
        labels = ["A"] * len(chosen)
    elif len(labels) != len(chosen):
        raise ValueError(f"labels and chosen differ in length: {len(labels)} vs {len(chosen)}")
    out = []
    for i, (c, r, label) in enumerate(zip(chosen, rejected, labels)):
        if label not in PAIR_LABELS:
            raise ValueError(f"pair {i}: label {label!r} is not one of {PAIR_LABELS}")
        if _missing(c) or _missing(r):
            out.append("failure")
        elif label == "tie":
            out.append("correct" if c == r else "wrong")
        else:
            out.append("correct" if c > r else "tie" if c == r else "wrong")
    return out


def pairwise_metrics(chosen: Sequence[float | None], rejected: Sequence[float | None],
                     labels: Sequence[str] | None = None, *, bootstrap: int = 0, seed: int = 0) -> dict[str, float]:
    """Absolute-to-pairwise accuracy (Prometheus convention): the chosen response wins only if its score is
    strictly higher. A tie on an A/B pair, or a parse failure on either side, counts as not correct; a pair
    labelled "tie" is correct when both sides score the same (see `pairwise_outcomes`).

    (Prometheus resamples ties up to twice before counting them wrong; that is the caller's job: pass the
    final scores here.)

    Returns:
        accuracy: correct / n (with `accuracy_lo` / `accuracy_hi`, a 95% bootstrap interval, when
            bootstrap > 0).  ties: A/B pairs scored equal.  tie_rate: ties / A/B pairs.
        failures: pairs with a failure on either side.  n: pairs.  tie_items: pairs labelled "tie", and
            tie_item_accuracy when there are any.  All ratios NaN when their count is 0.
    """
    outcomes = pairwise_outcomes(chosen, rejected, labels)
    n = len(outcomes)
    tie_items = sum(1 for label in labels or () if label == "tie")
    correct = outcomes.count("correct")
    out = {
        "accuracy": _ratio(correct, n),
        "ties": float(outcomes.count("tie")),
        "tie_rate": _ratio(outcomes.count("tie"), n - tie_items),
        "failures": float(outcomes.count("failure")),
        "n": float(n),
        "tie_items": float(tie_items),
    }
    if tie_items:
        tie_correct = sum(1 for o, label in zip(outcomes, labels) if label == "tie" and o == "correct")
        out["tie_item_accuracy"] = tie_correct / tie_items
    if bootstrap > 0:
        hits = [1.0 if o == "correct" else 0.0 for o in outcomes]
        out["accuracy_lo"], out["accuracy_hi"] = bootstrap_mean(hits, bootstrap, seed)
    return out


def section_mean_accuracy(section_accuracy: dict[str, float]) -> float:
    """RewardBench convention: the unweighted mean of the per-section accuracies (a small section weighs as
    much as a large one); sections whose accuracy is undefined are left out; NaN when none is left."""
    values = [v for v in section_accuracy.values() if not _missing(v)]
    return sum(values) / len(values) if values else NAN
