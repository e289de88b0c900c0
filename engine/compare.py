"""Paired comparison of two judges on the items both judged: did B judge better than A, on the same items?

    result = compare_judges(store, "r1:0", "r1:2", "demo")             # the seed vs iteration 2
    result = compare_judges(store, "r1:0:self-consistency-mean", "r1:2")  # the one dataset both judged
    result["metrics"]["pearson"]  # {"a", "b", "delta" (= b - a), "lo", "hi" (95% interval of delta), "p", "n"}

A judge is a spec string: `RUN:K`, iteration K's main (greedy) evaluation, or `RUN:K:METHOD`, a method
stored at that iteration (`METHODS`): greedy, expected, raw (the base model before the seed SFT), the
self-consistency mean / majority and best-of-N baselines, relative (A/B verdicts in both orders, pairwise
data) and length-baseline (response length alone). Each judge's per-item predictions come from its stored
judgments through the evaluation's own functions (`engine.evaluation.predictions`, `absolute_rows`,
`pairwise_rows`, `length_predictions`; `engine.relative.item_outcomes`), so `a` and `b` are the figures the
evaluation stored whenever both judges judged the same items and scored them all.

Figures (names as stored, `engine.metrics.HEADLINE_METRICS` order): absolute data `pearson`, `spearman`,
`kendall`, `partial_pearson` (given response length) over the items both judges scored, `exact` and
`within1` over every item both judged (a missing prediction is wrong); pairwise data `accuracy` (each side
scored, or relative verdicts; ties and failures wrong) and, with more than one section,
`section_mean_accuracy`. `n` is how many items a figure is over.

Uncertainty is a paired percentile bootstrap (`engine.metrics.percentile_bootstrap`, seeded): items are
resampled with replacement, both judges together with the same indices, and each resample gives
delta* = B* - A*. [lo, hi] is the 2.5th-97.5th percentile of delta*; the two-sided
p = min(1, 2 * (min(#(delta* <= 0), #(delta* >= 0)) + 1) / (R + 1)) over the R resamples where delta* is
defined (identical judges: p = 1; never below 2 / (R + 1)). docs/evaluation.md, "Paired comparisons".
No Streamlit here: the CLI (`selfrat compare`) and the app's pages call `compare_judges`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from engine.evaluation import (
    absolute_rows,
    item_sections,
    length_predictions,
    pairwise_rows,
    predictions,
    response_length,
)
from engine.length import partial_correlation
from engine.metrics import (
    CORRELATIONS,
    HEADLINE_METRICS,
    NAN,
    _rowwise_pearson,
    absolute_metrics,
    pairwise_outcomes,
    percentile_bootstrap,
    resampled_correlations,
    round_half_up,
    section_mean_accuracy,
)
from store.errors import SelfratError, UsageError

DEFAULT_BOOTSTRAP = 2000
# method -> (purpose of the judgments it reads, engine.evaluation.predictions method). The main figures of an
# iteration are "greedy" (RUN:K); length-baseline reads no judgment (its items: those the iteration evaluated);
# relative is scored by engine.relative.item_outcomes. "raw": the base model before the seed SFT, judged like
# greedy and stored with purpose "raw" (at iteration 0).
METHODS: dict[str, tuple[str | None, str | None]] = {
    "greedy": ("eval", "greedy"),
    "expected": ("eval", "expected"),
    "raw": ("raw", "greedy"),
    "self-consistency-mean": ("baseline", "self-consistency-mean"),
    "self-consistency-majority": ("baseline", "self-consistency-majority"),
    "best-of-n": ("baseline", "best-of-n"),
    "relative": ("relative", None),
    "length-baseline": (None, None),
}
EVALUATED = ("eval", "raw", "baseline", "relative")  # purposes whose items are the evaluated ones
ABSOLUTE_FIGURES = ("pearson", "spearman", "kendall", "exact", "within1", "partial_pearson")
PAIRWISE_FIGURES = ("accuracy", "section_mean_accuracy")
FIGURES = tuple(m for m in HEADLINE_METRICS if m in ABSOLUTE_FIGURES + PAIRWISE_FIGURES)
FIELDS = ("a", "b", "delta", "lo", "hi", "p", "n")
_LINEAR = 1e-12  # 1 - r^2 below this: one side is a straight line in length (engine.length: nothing left)


@dataclass(frozen=True)
class JudgeSpec:
    """One judge: a method's predictions from the judgments stored at (run, iteration)."""

    run_id: str
    iteration: int
    method: str = "greedy"

    def __str__(self) -> str:
        return f"{self.run_id}:{self.iteration}" + ("" if self.method == "greedy" else f":{self.method}")


def parse_judge(text: str | JudgeSpec) -> JudgeSpec:
    """'RUN:K' (iteration K's greedy evaluation) or 'RUN:K:METHOD' (METHODS); raises UsageError naming the spec."""
    if isinstance(text, JudgeSpec):
        return text
    parts = str(text).split(":")
    if len(parts) not in (2, 3) or not all(p.strip() for p in parts):
        raise UsageError(f"judge {text!r}: expected RUN:ITERATION or RUN:ITERATION:METHOD"
                         " (e.g. r1:2, r1:0:self-consistency-mean)")
    run_id, k = parts[0], parts[1]
    if not k.isdigit():
        raise UsageError(f"judge {text!r}: iteration {k!r} is not a whole number >= 0")
    method = parts[2] if len(parts) == 3 else "greedy"
    if method not in METHODS:
        raise UsageError(f"judge {text!r}: unknown method {method!r}; expected one of {', '.join(METHODS)}")
    return JudgeSpec(run_id, int(k), method)


# An interval this close to 0 is float noise (a degenerate correlation gives [-7e-15, -2e-15]), not a difference.
ZERO_TOLERANCE = 1e-9


def significant(figure: dict) -> bool:
    """The 95% interval of delta excludes 0 (by more than float noise)."""
    lo, hi = figure.get("lo"), figure.get("hi")
    return (lo is not None and hi is not None and not (math.isnan(lo) or math.isnan(hi))
            and (lo > ZERO_TOLERANCE or hi < -ZERO_TOLERANCE))


# ------------------------------------------------------------------ what a run holds


def _judged(store, spec: JudgeSpec) -> pl.DataFrame:
    """dataset, purpose, items, rated of the judge's (run, iteration); UsageError for an unknown run/iteration."""
    try:
        store.run(spec.run_id)
        store.iteration(spec.run_id, spec.iteration)
    except SelfratError as e:
        raise UsageError(f"judge {str(spec)!r}: {e}") from None
    return store.judged_items(spec.run_id, spec.iteration)


def _has(judged: pl.DataFrame, method: str) -> bool:
    purpose = METHODS[method][0]
    if purpose is None:
        return judged.filter(pl.col("purpose").is_in(EVALUATED)).height > 0
    rows = judged.filter(pl.col("purpose") == purpose)
    if method == "best-of-n":
        rows = rows.filter(pl.col("rated") > 0)
    return rows.height > 0


def judge_datasets(store, spec: str | JudgeSpec) -> list[str]:
    """The datasets a judge has predictions on (sorted)."""
    spec = parse_judge(spec)
    judged = _judged(store, spec)
    return sorted(d for d in set(judged["dataset"].to_list()) if _has(judged.filter(pl.col("dataset") == d),
                                                                    spec.method))


def stored_judges(store, run_id: str, iteration: int, dataset: str) -> list[str]:
    """Every judge (spec string, METHODS order) that (run, iteration) holds predictions for on `dataset`: its
    greedy and expected evaluation, raw, the baselines (best-of-N only where the meta-judge rated), relative,
    and the length baseline beside any of them."""
    judged = _judged(store, JudgeSpec(run_id, int(iteration))).filter(pl.col("dataset") == dataset)
    return [str(JudgeSpec(run_id, int(iteration), m)) for m in METHODS if _has(judged, m)]


def common_dataset(store, a: str | JudgeSpec, b: str | JudgeSpec) -> str:
    """The one dataset both judges have predictions on; UsageError naming them when there are none or several."""
    a, b = parse_judge(a), parse_judge(b)
    in_a, in_b = judge_datasets(store, a), judge_datasets(store, b)
    both = sorted(set(in_a) & set(in_b))
    if len(both) == 1:
        return both[0]
    if not both:
        raise UsageError(f"{a} and {b} judged no dataset in common ({a}: {', '.join(in_a) or 'none'};"
                         f" {b}: {', '.join(in_b) or 'none'})")
    raise UsageError(f"{a} and {b} judged several datasets in common: {', '.join(both)}; pick one with --dataset")


# ------------------------------------------------------------------ per-item predictions


def judge_items(store, spec: str | JudgeSpec, dataset: str, items: pl.DataFrame | None = None) -> pl.DataFrame:
    """One judge's per-item result on the dataset's items it judged, in item_id order, as the evaluation
    scores it: absolute data item_id, pred (null = no prediction); pairwise data item_id, correct (the
    pair's outcome is "correct": `metrics.pairwise_outcomes`, or relative `item_outcomes`).

    `items`: store.items(dataset) when already read. UsageError when the judge has nothing on the dataset."""
    spec = parse_judge(spec)
    judged = _judged(store, spec)
    if items is None:
        items = store.items(dataset)
    kind = items["kind"][0] if items.height else store.dataset_kind(dataset)
    purpose, method = METHODS[spec.method]
    if spec.method == "relative" and kind != "pairwise":
        raise UsageError(f"judge {str(spec)!r}: relative (A/B) judging needs a pairwise dataset; {dataset!r} is {kind}")
    mine = judged.filter(pl.col("dataset") == dataset)
    if not _has(mine, spec.method):
        what = ("no judgments" if purpose is None else
                "no meta-judge ratings of its baseline judgments" if spec.method == "best-of-n" and
                mine.filter(pl.col("purpose") == purpose).height else f"no {purpose} judgments")
        elsewhere = judge_datasets(store, spec)
        raise UsageError(f"judge {str(spec)!r}: {what} on dataset {dataset!r}"
                         + (f" (it has: {', '.join(elsewhere)})" if elsewhere else ""))
    ids = items["item_id"].implode()
    if purpose is None:  # the length baseline, over the items the iteration evaluated (its ranks depend on them)
        seen = pl.concat([store.judgments(spec.run_id, spec.iteration, p).select("item_id")
                          for p in mine.filter(pl.col("purpose").is_in(EVALUATED))["purpose"].to_list()])
        evaluated = items.filter(pl.col("item_id").is_in(seen["item_id"].implode()))
        return _per_item(evaluated, length_predictions(evaluated), kind)
    judgments = store.judgments(spec.run_id, spec.iteration, purpose).filter(pl.col("item_id").is_in(ids))
    evaluated = items.filter(pl.col("item_id").is_in(judgments["item_id"].implode()))
    if spec.method == "relative":
        from engine.relative import item_outcomes  # imports engine.judging (torch): only for relative judges

        outcomes = item_outcomes(evaluated, judgments)
        return pl.DataFrame({"item_id": [o["item_id"] for o in outcomes],
                             "correct": [bool(o["correct"]) for o in outcomes]},
                            schema={"item_id": pl.Int64, "correct": pl.Boolean}).sort("item_id")
    ratings = None
    if spec.method == "best-of-n":
        from engine.meta import stored_ratings

        ratings = stored_ratings(store, spec.run_id, spec.iteration, None, purpose)  # each judge rated its own
    return _per_item(evaluated, predictions(judgments, method, ratings), kind)


def _per_item(items: pl.DataFrame, preds: pl.DataFrame, kind: str) -> pl.DataFrame:
    if kind == "pairwise":
        rows, chosen, rejected, labels = pairwise_rows(items, preds)
        correct = [o == "correct" for o in pairwise_outcomes(chosen, rejected, labels)]
        return pl.DataFrame({"item_id": rows["item_id"], "correct": pl.Series(correct, dtype=pl.Boolean)})
    return absolute_rows(items, preds).select("item_id", pl.col("pred").cast(pl.Float64))


# ------------------------------------------------------------------ the paired bootstrap


def bootstrap_p(deltas: np.ndarray) -> float:
    """Two-sided p of a resampled difference: min(1, 2 * (min(#(d <= 0), #(d >= 0)) + 1) / (R + 1)) over the
    R defined (non-NaN) resamples; NaN when none is defined. All-zero differences give 1."""
    d = np.asarray(deltas, dtype=float)
    d = d[~np.isnan(d)]
    if d.size == 0:
        return NAN
    tail = min(int((d <= 0).sum()), int((d >= 0).sum()))
    return min(1.0, 2.0 * (tail + 1) / (d.size + 1))


def paired_bootstrap(deltas: Callable[[np.ndarray], dict[str, np.ndarray]], n: int, *, bootstrap: int,
                     seed: int) -> dict[str, tuple[float, float, float]]:
    """{name: (lo, hi, p)} of differences B* - A* that `deltas(idx)` computes per resample of n items (idx:
    resamples x n indices, both judges' values taken at the same indices). The resamples are those of
    `percentile_bootstrap` (the project's one bootstrap: same seed, same draws); {} when n or bootstrap is 0."""
    draws: dict[str, list[np.ndarray]] = {}

    def statistics(idx: np.ndarray) -> dict[str, np.ndarray]:
        out = deltas(idx)
        for name, values in out.items():
            draws.setdefault(name, []).append(np.asarray(values, dtype=float))
        return out

    intervals = percentile_bootstrap(statistics, n, bootstrap=bootstrap, seed=seed)
    return {name: (lo, hi, bootstrap_p(np.concatenate(draws[name]))) for name, (lo, hi) in intervals.items()}


def _rowwise_partial(gold: np.ndarray, pred: np.ndarray, length: np.ndarray) -> np.ndarray:
    """partial_pearson per resample row: (r_gp - r_gl r_pl) / sqrt((1 - r_gl^2)(1 - r_pl^2)), the closed form
    of engine.length.partial_correlation; NaN where a side is constant or a straight line in length."""
    r_gp, r_gl, r_pl = _rowwise_pearson(gold, pred), _rowwise_pearson(gold, length), _rowwise_pearson(pred, length)
    den = (1 - r_gl**2) * (1 - r_pl**2)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = (r_gp - r_gl * r_pl) / np.sqrt(den)
    out[~((1 - r_gl**2 > _LINEAR) & (1 - r_pl**2 > _LINEAR)) | (gold.shape[1] < 3)] = np.nan
    return np.clip(out, -1.0, 1.0)


def _figure(a: float, b: float, n: int, interval: tuple[float, float, float] | None) -> dict[str, float]:
    a, b = float(a), float(b)
    delta = b - a
    lo, hi, p = interval if interval is not None and not math.isnan(delta) else (NAN, NAN, NAN)
    return {"a": a, "b": b, "delta": delta, "lo": float(lo), "hi": float(hi), "p": float(p), "n": int(n)}


def _absolute_figures(gold: np.ndarray, pa: np.ndarray, pb: np.ndarray, length: np.ndarray, bootstrap: int,
                      seed: int) -> dict[str, dict]:
    """exact / within1 over all n items (no prediction = wrong), the correlations and partial_pearson over
    the items both judges scored (as the evaluation: correlations over scored items)."""
    out = {}
    # Per-item hits, by the rules of metrics.absolute_metrics (rounded half up; a missing prediction misses).
    hits = {}
    for side, p in (("a", pa), ("b", pb)):
        rounded = round_half_up(p)
        hits[side] = {"exact": rounded == round_half_up(gold), "within1": np.abs(gold - rounded) <= 1}
    hits = {name: (hits["a"][name].astype(float), hits["b"][name].astype(float)) for name in ("exact", "within1")}
    n = len(gold)
    boot = paired_bootstrap(lambda idx: {k: hb[idx].mean(axis=1) - ha[idx].mean(axis=1)
                                         for k, (ha, hb) in hits.items()}, n, bootstrap=bootstrap, seed=seed)
    for name, (ha, hb) in hits.items():
        out[name] = _figure(ha.mean() if n else NAN, hb.mean() if n else NAN, n, boot.get(name))

    both = ~np.isnan(pa) & ~np.isnan(pb)
    g, xa, xb, ln = gold[both], pa[both], pb[both], length[both]
    m = len(g)

    def deltas(idx: np.ndarray) -> dict[str, np.ndarray]:
        ra, rb = resampled_correlations(g, xa, idx), resampled_correlations(g, xb, idx)
        d = {k: rb[k] - ra[k] for k in CORRELATIONS}
        d["partial_pearson"] = _rowwise_partial(g[idx], xb[idx], ln[idx]) - _rowwise_partial(g[idx], xa[idx], ln[idx])
        return d

    boot = paired_bootstrap(deltas, m, bootstrap=bootstrap, seed=seed)
    point_a, point_b = absolute_metrics(g, xa, bootstrap=0), absolute_metrics(g, xb, bootstrap=0)
    for name in CORRELATIONS:
        out[name] = _figure(point_a[name], point_b[name], m, boot.get(name))
    out["partial_pearson"] = _figure(partial_correlation(g, xa, ln), partial_correlation(g, xb, ln), m,
                                     boot.get("partial_pearson"))
    return out


def _section_mean(hits: np.ndarray, codes: np.ndarray, k: int, idx: np.ndarray) -> np.ndarray:
    """section_mean_accuracy per resample row: the unweighted mean of the sections present in the row."""
    h, c = hits[idx], codes[idx]
    acc = np.full((idx.shape[0], k), np.nan)
    for s in range(k):
        mask = c == s
        count = mask.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            acc[:, s] = np.where(count > 0, (h * mask).sum(axis=1) / count, np.nan)
    with warnings.catch_warnings():  # a row without any section cannot happen (n >= 1), but stay quiet
        warnings.simplefilter("ignore", RuntimeWarning)
        return np.nanmean(acc, axis=1)


def _pairwise_figures(ca: np.ndarray, cb: np.ndarray, sections: Sequence[str], bootstrap: int,
                      seed: int) -> dict[str, dict]:
    """accuracy over all n pairs, and section_mean_accuracy (more than one section only)."""
    ha, hb = ca.astype(float), cb.astype(float)
    n = len(ha)
    names, codes = np.unique(np.asarray(sections, dtype=object).astype(str), return_inverse=True)
    k = len(names)

    def deltas(idx: np.ndarray) -> dict[str, np.ndarray]:
        d = {"accuracy": hb[idx].mean(axis=1) - ha[idx].mean(axis=1)}
        if k > 1:
            d["section_mean_accuracy"] = _section_mean(hb, codes, k, idx) - _section_mean(ha, codes, k, idx)
        return d

    boot = paired_bootstrap(deltas, n, bootstrap=bootstrap, seed=seed)
    out = {"accuracy": _figure(ha.mean() if n else NAN, hb.mean() if n else NAN, n, boot.get("accuracy"))}
    if k > 1:
        point = [section_mean_accuracy({s: float(h[codes == i].mean()) for i, s in enumerate(names)})
                 for h in (ha, hb)]
        out["section_mean_accuracy"] = _figure(point[0], point[1], n, boot.get("section_mean_accuracy"))
    return out


# ------------------------------------------------------------------ the comparison


def compare_judges(store, a: str | JudgeSpec, b: str | JudgeSpec, dataset: str | None = None, *,
                   metrics: Iterable[str] | None = None, bootstrap: int = DEFAULT_BOOTSTRAP,
                   seed: int = 0) -> dict:
    """Judge B against judge A on the items of `dataset` both judged (None: the one dataset both judged).

    Returns {"a", "b" (the specs), "dataset", "kind", "items" (judged by both), "only_a", "only_b" (judged by
    one of them: left out), "bootstrap", "seed", "metrics": {name: {"a", "b", "delta", "lo", "hi", "p", "n"}}}
    in HEADLINE_METRICS order; a figure that cannot be computed is NaN (lo/hi/p too, and with bootstrap 0).
    `metrics` narrows the figures (UsageError for one not compared on this dataset's kind).
    Raises UsageError naming the spec for a bad spec, an unknown run or iteration, a dataset the judge has
    nothing on, or no item judged by both.
    """
    a, b = parse_judge(a), parse_judge(b)
    if bootstrap < 0:
        raise UsageError(f"bootstrap must be >= 0, got {bootstrap}")
    dataset = dataset or common_dataset(store, a, b)
    items = store.items(dataset)
    kind = items["kind"][0] if items.height else store.dataset_kind(dataset)
    available = ABSOLUTE_FIGURES if kind == "absolute" else PAIRWISE_FIGURES
    wanted = list(dict.fromkeys(metrics or ()))
    for name in wanted:
        if name not in available:
            raise UsageError(f"metric {name!r} is not compared on {kind} data ({dataset!r}); expected one of"
                             f" {', '.join(m for m in FIGURES if m in available)}")
    ra, rb = judge_items(store, a, dataset, items), judge_items(store, b, dataset, items)
    both = ra.join(rb, on="item_id", how="inner", suffix="_b").sort("item_id")
    if both.height == 0:
        raise UsageError(f"{a} and {b} judged no item of {dataset!r} in common")
    rows = items.filter(pl.col("item_id").is_in(both["item_id"].implode())).sort("item_id")
    if kind == "absolute":
        figures = _absolute_figures(rows["gold_score"].cast(pl.Float64).to_numpy(),
                                    both["pred"].fill_null(NAN).to_numpy(), both["pred_b"].fill_null(NAN).to_numpy(),
                                    response_length(rows["response"]).to_numpy(), bootstrap, seed)
    else:
        figures = _pairwise_figures(both["correct"].to_numpy(), both["correct_b"].to_numpy(), item_sections(rows),
                                    bootstrap, seed)
    order = [m for m in FIGURES if m in figures and (not wanted or m in wanted)]
    return {"a": str(a), "b": str(b), "dataset": dataset, "kind": kind, "items": both.height,
            "only_a": ra.height - both.height, "only_b": rb.height - both.height, "bootstrap": int(bootstrap),
            "seed": int(seed), "metrics": {m: figures[m] for m in order}}


def paired_rows(result: dict) -> list[dict]:
    """`compare_judges`'s figures as table rows (the app's paired tables): metric, A, B, B - A, 95% CI (text),
    p, n, significant ("*" when the interval excludes 0). A figure that cannot be computed is None."""
    def num(v):
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else v

    rows = []
    for name, f in result["metrics"].items():
        lo, hi = num(f["lo"]), num(f["hi"])
        rows.append({"metric": name, "A": num(f["a"]), "B": num(f["b"]), "B - A": num(f["delta"]),
                     "95% CI": f"[{lo:+.3f}, {hi:+.3f}]" if lo is not None and hi is not None else "",
                     "p": num(f["p"]), "n": f["n"], "significant": "*" if significant(f) else ""})
    return rows
