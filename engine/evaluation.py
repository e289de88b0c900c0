"""Evaluation of one judge (one iteration) on one dataset, from the judgments stored for it.

    result = evaluate_judgments(items, store.judgments(run, k, "eval"), method="greedy")
    result.metrics["pearson"], result.metrics["pearson_lo"], result.breakdowns, result.confusion

A method turns an item's judgments (per side) into one predicted score:
- greedy / self-consistency-mean: the mean score of its judgments (the same arithmetic; they differ in how
  the judgments were drawn: one greedy judgment vs N sampled ones);
- self-consistency-majority: the modal score; on a tie between modes, the mode closest to the mean of the
  scores, and on a tie in distance the lower score (so 1,1,3,3 -> 1 and 2,2,4,4,5 -> 4);
- best-of-n: the score of the judgment the meta-judge rated highest (ties: lowest sample_index; several
  raters' ratings of one judgment are averaged; unrated judgments are not candidates). Its score may be
  missing: a parse failure stays a failure.
A judgment without a score (a parse failure with no forced score) adds nothing to a mean or a vote; a side
with no scored judgment is a missing prediction.

Absolute datasets are compared with gold by `metrics.absolute_metrics` (with bootstrap intervals) plus a
confusion matrix. Pairwise datasets score both responses separately (absolute-to-pairwise): for A/B items
the chosen one must score strictly higher, tie-labelled items are correct when both sides score the same
(`metrics.pairwise_metrics`), and `section_mean_accuracy` is the unweighted mean of per-section accuracies
(RewardBench). An item's section is meta "section", else "subset", else "(none)" (one more section), as in
`engine.relative`, so both pairwise modes report comparable figures. Breakdowns (group_by, group_value,
metric, value) hold the same figures per rubric / capability / task (absolute) or per section / subset
(pairwise), read from each item's `meta` JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import polars as pl

from engine import calibration
from engine.length import (
    length_baseline_scores,
    pairwise_by_length,
    partial_correlation,
    similar_length_pair_accuracy,
)
from engine.metrics import (
    PAIR_LABELS,
    absolute_metrics,
    confusion_matrix,
    pairwise_metrics,
    section_mean_accuracy,
)
from engine.prompts import absolute_messages
from store.errors import UsageError

if TYPE_CHECKING:  # engine.judging brings torch (engine.sampling): the app reads predictions without it
    from engine.judging import JudgeRequest

CHOSEN_SIDE = {"A": "a", "B": "b"}
METHODS = ("greedy", "self-consistency-mean", "self-consistency-majority", "best-of-n", "expected")
PROBS = [f"p{k}" for k in range(1, 6)]
NO_GROUP = "(none)"  # group value of an item that lacks the meta key others have
RUBRIC_CHARS = 80  # a rubric without a name is grouped by its criteria text, cut to this length
ABSOLUTE_GROUPS = ("rubric", "capability", "task")
PAIRWISE_GROUPS = ("section", "subset")
ABSOLUTE_GROUP_METRICS = ("exact", "within1", "pearson")
BREAKDOWN_SCHEMA = {"group_by": pl.String, "group_value": pl.String, "metric": pl.String, "value": pl.Float64}


@dataclass
class EvalResult:
    metrics: dict[str, float]  # flat, un-prefixed: pearson, pearson_lo, ..., exact, within1, accuracy, ...
    breakdowns: pl.DataFrame  # group_by, group_value, metric, value
    confusion: list[list[int]] | None  # absolute datasets only: rows gold 1..5, columns predicted 1..5


def eval_requests(items: pl.DataFrame) -> list[JudgeRequest]:
    """Absolute items are judged once per sample; pairwise items once per side."""
    from engine.judging import JudgeRequest

    out = []
    for item in items.iter_rows(named=True):
        out.append(JudgeRequest(item["item_id"], "a", absolute_messages(item)))
        if item["kind"] == "pairwise":
            out.append(JudgeRequest(item["item_id"], "b", absolute_messages(item, response_key="response_b")))
    return out


# ------------------------------------------------------------------ predictions


def predictions(judgments: pl.DataFrame, method: str = "greedy", ratings: pl.DataFrame | None = None) -> pl.DataFrame:
    """Per (item, side): `pred` (null when the method finds no score), and `failures` / `samples` (judgments
    not parsed ok / all judgments). Only sides a and b count (relative A/B judgments are scored elsewhere)."""
    if method not in METHODS:
        raise ValueError(f"unknown evaluation method {method!r}; expected one of {METHODS}")
    judgments = judgments.filter(pl.col("side").is_in(["a", "b"]))
    base = judgments.group_by("item_id", "side").agg(
        failures=(pl.col("parse_status") != "ok").sum(),
        samples=pl.len(),
    )
    if method in ("greedy", "self-consistency-mean"):
        pred = judgments.group_by("item_id", "side").agg(pred=pl.col("score").cast(pl.Float64).mean())
    elif method == "self-consistency-majority":
        pred = _majority(judgments)
    elif method == "expected":
        pred = _expected(judgments)
    else:
        pred = _best_of_n(judgments, ratings)
    return base.join(pred, on=["item_id", "side"], how="left").sort("item_id", "side")


def _expected(judgments: pl.DataFrame) -> pl.DataFrame:
    """G-Eval's probability-weighted score sum_k k p_k per judgment, averaged over an item's judgments;
    judgments stored without probabilities add nothing."""
    expected = calibration.expected_scores(judgments.select(PROBS).to_numpy()) if judgments.height else []
    return (judgments.select("item_id", "side").with_columns(pl.Series("pred", expected, dtype=pl.Float64))
            .group_by("item_id", "side").agg(pl.col("pred").fill_nan(None).mean()))


def _majority(judgments: pl.DataFrame) -> pl.DataFrame:
    scored = judgments.filter(pl.col("score").is_not_null()).with_columns(pl.col("score").cast(pl.Float64))
    votes = scored.group_by("item_id", "side", "score").agg(votes=pl.len()).join(
        scored.group_by("item_id", "side").agg(mean=pl.col("score").mean()), on=["item_id", "side"])
    ranked = votes.with_columns(distance=(pl.col("score") - pl.col("mean")).abs()).sort(
        ["item_id", "side", "votes", "distance", "score"], descending=[False, False, True, False, False])
    return ranked.group_by("item_id", "side", maintain_order=True).first().select("item_id", "side",
                                                                                  pred=pl.col("score"))


def _best_of_n(judgments: pl.DataFrame, ratings: pl.DataFrame | None) -> pl.DataFrame:
    if ratings is None:
        raise ValueError("best-of-n needs the meta-judge's ratings (store.meta_ratings(...))")
    missing = {"judgment_id", "rating"} - set(ratings.columns)
    if missing:
        raise ValueError(f"ratings lack column(s) {sorted(missing)}")
    mean_rating = (ratings.filter(pl.col("rating").is_not_null())
                   .group_by("judgment_id").agg(rating=pl.col("rating").cast(pl.Float64).mean()))
    candidates = judgments.join(mean_rating, on="judgment_id", how="inner").sort(
        ["item_id", "side", "rating", "sample_index"], descending=[False, False, True, False])
    return candidates.group_by("item_id", "side", maintain_order=True).first().select(
        "item_id", "side", pred=pl.col("score").cast(pl.Float64))


# ------------------------------------------------------------------ evaluation


def evaluate_judgments(items: pl.DataFrame, judgments: pl.DataFrame, *, method: str = "greedy",
                       ratings: pl.DataFrame | None = None, bootstrap: int = 1000, seed: int = 0) -> EvalResult:
    """Metrics, per-group breakdowns and (absolute) the confusion matrix of one method's predictions.

    Args:
        items: store.items(...) rows of one dataset (all absolute or all pairwise).
        judgments: store.judgments(...) rows for those items (score may be null; sides a/b; sample_index).
        method: one of METHODS (see the module docstring).
        ratings: best-of-n only: store.meta_ratings(...) rows (judgment_id, rating).
        bootstrap, seed: resamples and seed of the 95% intervals (0 = none).

    `parse_failure_rate` is the share of judgments not parsed ok (over all samples, not items). The counts
    beside it agree with it: `failures` / `judgments` == parse_failure_rate, `forced` / `judgments` ==
    forced_rate (see the comment in the body for which is which).
    Raises ValueError naming the item for a missing gold score, a bad label or unreadable meta.
    """
    kinds = set(items["kind"].unique().to_list()) if items.height else {"absolute"}
    if len(kinds) > 1:
        raise UsageError(f"items mix kinds {sorted(kinds)}; evaluate one dataset at a time")
    preds = predictions(judgments, method, ratings)
    samples = int(preds["samples"].sum()) if preds.height else 0
    failures = int(preds["failures"].sum()) if preds.height else 0
    judged = judgments.filter(pl.col("side").is_in(["a", "b"]))
    forced = int(judged["forced"].fill_null(False).sum()) if "forced" in judged.columns else 0
    if kinds == {"pairwise"}:
        result = _pairwise(items, preds, bootstrap, seed)
    else:
        result = _absolute(items, preds, bootstrap, seed)
        if method != "best-of-n":  # its prediction is one judgment's score, its probabilities are not chosen
            _calibration(result, items, judgments)
    result.metrics.update(_shares(items, judgments.filter(pl.col("side").is_in(["a", "b"]))))
    # Counts over judgments (sides a/b, every sample), each with its rate, so a count never contradicts a rate:
    #   judgments: all of them, the denominator of both rates.
    #   failures: judgments whose text did not parse ok (parse_status != "ok"); parse_failure_rate is
    #     failures / judgments. Under force_score such a judgment still gets a score, so it is not missing.
    #   forced: judgments whose score had to be forced (the probe closed a rationale without a valid score);
    #     forced_rate is forced / judgments. Forced judgments are among the failures: a failure either got a
    #     forced score (counted here, and scored) or stayed without a score (failures - forced of them).
    # Items (absolute: n - n_scored) or pairs (pairwise: unscored_pairs) left without a score even after forcing
    # are what exact / accuracy count as wrong; they are a count of items, not of judgments.
    nan = float("nan")
    result.metrics.update({
        "judgments": samples, "failures": failures, "parse_failure_rate": failures / samples if samples else nan,
        "forced": forced, "forced_rate": forced / samples if samples else nan,
    })
    result.metrics = {k: float(v) for k, v in result.metrics.items()}
    return result


def dataset_metrics(items: pl.DataFrame, judgments: pl.DataFrame, *, bootstrap: int = 1000,
                    seed: int = 0) -> dict[str, float]:
    """The greedy metrics dict of `evaluate_judgments` (kept for callers that need only the numbers)."""
    return evaluate_judgments(items, judgments, method="greedy", bootstrap=bootstrap, seed=seed).metrics


def absolute_rows(items: pl.DataFrame, preds: pl.DataFrame) -> pl.DataFrame:
    """What absolute metrics compare, one row per item in item_id order: item_id, gold_score, criteria, meta and
    pred (side a's prediction from `predictions`; null = none). Raises UsageError naming an item without gold."""
    side_a = preds.filter(pl.col("side") == "a").select("item_id", "pred")
    rows = items.select("item_id", "gold_score", "criteria", "meta").join(side_a, on="item_id", how="left")
    rows = rows.sort("item_id")
    for r in rows.filter(pl.col("gold_score").is_null()).head(1).iter_rows(named=True):
        raise UsageError(f"item {r['item_id']}: no gold score; absolute evaluation needs one per item")
    return rows


def _absolute(items: pl.DataFrame, preds: pl.DataFrame, bootstrap: int, seed: int) -> EvalResult:
    rows = absolute_rows(items, preds)
    gold, pred = rows["gold_score"].to_list(), rows["pred"].to_list()
    metrics = absolute_metrics(gold, pred, bootstrap=bootstrap, seed=seed)
    # Responses to one prompt: the instruction and its input together (one instruction, many inputs is common).
    prompt = pl.concat_str([pl.col("instruction"), pl.col("input").fill_null("")], separator="\n")
    lengths = rows.join(items.select("item_id", prompt.alias("prompt"), "response"), on="item_id", how="left",
                        maintain_order="left")
    length = response_length(lengths["response"]).to_list()
    metrics["partial_pearson"] = partial_correlation(gold, pred, length, "pearson")
    metrics["partial_spearman"] = partial_correlation(gold, pred, length, "spearman")
    similar = similar_length_pair_accuracy(lengths["prompt"].to_list(), gold, pred, length)
    metrics["similar_length_accuracy"] = similar["accuracy"]
    metrics["similar_length_pairs"] = similar["n_pairs"]
    groups = _groups(rows, ABSOLUTE_GROUPS)
    breakdown = []
    for group_by, values in groups.items():
        for value, idx in _members(values).items():
            m = absolute_metrics([gold[i] for i in idx], [pred[i] for i in idx], bootstrap=0)
            breakdown += _rows(group_by, value, {"n": len(idx), **{k: m[k] for k in ABSOLUTE_GROUP_METRICS}})
    return EvalResult(metrics, _frame(breakdown), confusion_matrix(gold, pred))


def pairwise_rows(items: pl.DataFrame, preds: pl.DataFrame) -> tuple[pl.DataFrame, list, list, list[str]]:
    """What pairwise (absolute-to-pairwise) metrics compare: rows (item_id, label, criteria, meta, and a / b,
    each side's prediction from `predictions`) in item_id order, and per row the chosen and the rejected side's
    prediction and the label, as `metrics.pairwise_outcomes` takes them. Raises UsageError for a bad label."""
    sides = {s: preds.filter(pl.col("side") == s).select("item_id", pl.col("pred").alias(s)) for s in ("a", "b")}
    rows = (items.select("item_id", "label", "criteria", "meta")
            .join(sides["a"], on="item_id", how="left").join(sides["b"], on="item_id", how="left").sort("item_id"))
    chosen, rejected, labels = [], [], []
    for r in rows.iter_rows(named=True):
        if r["label"] not in PAIR_LABELS:
            raise UsageError(f"item {r['item_id']}: label {r['label']!r} is not one of {PAIR_LABELS}")
        flip = r["label"] == "B"  # chosen = response_b; tie items keep (a, b)
        chosen.append(r["b"] if flip else r["a"])
        rejected.append(r["a"] if flip else r["b"])
        labels.append(r["label"])
    return rows, chosen, rejected, labels


def _pairwise(items: pl.DataFrame, preds: pl.DataFrame, bootstrap: int, seed: int) -> EvalResult:
    rows, chosen, rejected, labels = pairwise_rows(items, preds)
    metrics = pairwise_metrics(chosen, rejected, labels, bootstrap=bootstrap, seed=seed)
    # Pairs missing a score on a side (counted wrong): items, not judgments; `failures` is kept for the
    # judgment count that goes with parse_failure_rate (see evaluate_judgments).
    metrics["unscored_pairs"] = metrics.pop("failures")
    sized = rows.join(items.select("item_id", "response", "response_b"), on="item_id", how="left",
                      maintain_order="left")
    len_a, len_b = response_length(sized["response"]).to_list(), response_length(sized["response_b"]).to_list()
    flip = [label == "B" for label in labels]
    metrics.update(pairwise_by_length(chosen, rejected, [b if f else a for a, b, f in zip(len_a, len_b, flip)],
                                      [a if f else b for a, b, f in zip(len_a, len_b, flip)], labels))
    groups = _groups(rows, PAIRWISE_GROUPS)
    breakdown = []
    for group_by, values in groups.items():
        accuracy = {}
        for value, idx in _members(values).items():
            m = pairwise_metrics([chosen[i] for i in idx], [rejected[i] for i in idx], [labels[i] for i in idx])
            accuracy[value] = m["accuracy"]
            breakdown += _rows(group_by, value, {"n": len(idx), "accuracy": m["accuracy"], "ties": m["ties"]})
        if group_by == "section":
            metrics["section_mean_accuracy"] = section_mean_accuracy(accuracy)
    return EvalResult(metrics, _frame(breakdown), None)


def response_length(responses: pl.Series) -> pl.Series:
    """The length every length figure uses: characters (tokenizer-free, the same for every judge)."""
    return responses.fill_null("").str.len_chars().cast(pl.Float64)


def _calibration(result: EvalResult, items: pl.DataFrame, judgments: pl.DataFrame) -> None:
    """ECE and mean entropy of the stored score distributions vs gold (absolute data), and the reliability
    diagram's bins as breakdown rows (group_by "reliability")."""
    rows = judgments.filter((pl.col("side") == "a") & pl.col("p1").is_not_null()).join(
        items.select("item_id", "gold_score"), on="item_id", how="inner")
    if rows.height == 0:
        return
    probs, gold = rows.select(PROBS).to_numpy(), rows["gold_score"].to_list()
    result.metrics["ece"] = calibration.expected_calibration_error(probs, gold)
    result.metrics["mean_entropy"] = calibration.mean_entropy(probs)
    bins = [_rows("reliability", f"{b['lo']:.1f}-{b['hi']:.1f}",
                  {"confidence": b["confidence"], "accuracy": b["accuracy"], "n": b["count"]})
            for b in calibration.reliability_bins(probs, gold) if b["count"]]
    result.breakdowns = pl.concat([result.breakdowns, _frame([r for rs in bins for r in rs])],
                                  how="vertical_relaxed")


def _shares(items: pl.DataFrame, judgments: pl.DataFrame) -> dict[str, float]:
    """share_1..share_5 of the judgments' scores, and (absolute data) `saturated` = 1 when one score takes
    more than half of them while gold is balanced (calibration.saturation_warning)."""
    scores = judgments["score"].to_list()
    out = {f"share_{k}": v for k, v in calibration.score_shares(scores).items()}
    if items.height and items["kind"][0] == "absolute" and scores:
        out["saturated"] = float(calibration.saturation_warning(scores, items["gold_score"].to_list()) is not None)
    return out


def length_baseline(items: pl.DataFrame, *, bootstrap: int = 1000, seed: int = 0) -> EvalResult:
    """The response-length baseline scored like a judge: absolute data, score = the rank of the response's
    length within the dataset mapped onto 1-5; pairwise data, the longer response wins."""
    if items.height == 0:
        return EvalResult({}, _frame([]), None)
    preds = length_predictions(items)
    if items["kind"][0] == "pairwise":
        return _pairwise(items, preds, bootstrap, seed)
    return _absolute(items, preds, bootstrap, seed)


def length_predictions(items: pl.DataFrame) -> pl.DataFrame:
    """The length baseline's `predictions` (item_id, side, pred, failures, samples) for `items` (one dataset):
    absolute, the rank of the response's length among these items mapped onto 1-5 (so it depends on the item
    set); pairwise, each side's length (the longer response wins)."""
    if items.height and items["kind"][0] == "pairwise":
        preds = pl.concat([items.select("item_id", side=pl.lit("a"), pred=response_length(items["response"])),
                           items.select("item_id", side=pl.lit("b"), pred=response_length(items["response_b"]))])
        return preds.with_columns(failures=pl.lit(0), samples=pl.lit(1))
    scores = length_baseline_scores(response_length(items["response"]).to_list())
    return items.select("item_id", side=pl.lit("a"), pred=pl.Series(scores, dtype=pl.Float64))


def confusion_breakdown(confusion: list[list[int]]) -> pl.DataFrame:
    """A confusion matrix as breakdown rows (group_by "confusion", group_value "gold k", metric "pred j",
    value = count), so it can be stored with `store.put_breakdowns` beside the other groups."""
    return _frame([{"group_by": "confusion", "group_value": f"gold {g}", "metric": f"pred {p}", "value": float(n)}
                   for g, row in enumerate(confusion, 1) for p, n in enumerate(row, 1)])


# ------------------------------------------------------------------ groups


def item_sections(rows: pl.DataFrame) -> list[str]:
    """Each row's section as the pairwise breakdown groups it (meta "section", else "subset", else "(none)");
    rows: item_id, criteria, meta (e.g. from `pairwise_rows`)."""
    return _groups(rows, ("section",))["section"]


def _meta(item_id: int, raw: str | None) -> dict:
    if raw is None or raw == "":
        return {}
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"item {item_id}: meta is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"item {item_id}: meta must be a JSON object, got {type(meta).__name__}")
    return meta


def _group_value(key: str, meta: dict, criteria: str | None) -> str | None:
    if key == "rubric":
        name = meta.get("rubric_name")
        if name not in (None, ""):
            return str(name)
        return (criteria or "").strip()[:RUBRIC_CHARS] or None
    value = meta.get(key)
    if key == "section" and value in (None, ""):
        value = meta.get("subset")  # RewardBench files without a section column still carry the subset
    return None if value in (None, "") else str(value)


def _groups(rows: pl.DataFrame, keys: tuple[str, ...]) -> dict[str, list[str]]:
    """group_by -> the group value of each row (NO_GROUP where the item lacks it), for the keys at least one
    item has; "section" always (pairwise data without sections is one section, "(none)")."""
    metas = [_meta(r["item_id"], r["meta"]) for r in rows.iter_rows(named=True)]
    criteria = rows["criteria"].to_list()
    out = {}
    for key in keys:
        values = [_group_value(key, m, c) for m, c in zip(metas, criteria)]
        if key == "section" or any(v is not None for v in values):
            out[key] = [NO_GROUP if v is None else v for v in values]
    return out


def _members(values: list[str]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i, v in enumerate(values):
        out.setdefault(v, []).append(i)
    return dict(sorted(out.items()))


def _rows(group_by: str, value: str, metrics: dict[str, float]) -> list[dict]:
    return [{"group_by": group_by, "group_value": value, "metric": k, "value": float(v)} for k, v in metrics.items()]


def _frame(rows: list[dict]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema=BREAKDOWN_SCHEMA)
