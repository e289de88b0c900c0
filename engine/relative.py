"""Relative (A/B) judging of pairwise items, with position swap, and its metrics.

Every pairwise item is judged in both orders: side "ab" shows ``response`` as A and ``response_b`` as B,
side "ba" shows them swapped. Each order's verdict is mapped back to the item's responses (in the item's
label terms: "A" = ``response``, "B" = ``response_b``). Both orders agree -> that is the prediction; they
disagree -> a tie (the judge followed the position, not the content); a missing verdict on either order ->
a failure (never guessed). A judge that always answers "A" thus ties every item and scores 0 on A/B-labelled
items, instead of the 50% that judging one order would credit it with.

    requests = relative_requests(items)          # 2 per item; sample them with SamplingParams(mode="relative")
    metrics = relative_metrics(items, judgments)  # accuracy, ties, position_consistency, ...
    rows = relative_breakdown(items, judgments)   # per section: group_by, group_value, metric, value

Sections come from the items' meta JSON (``section``, else ``subset``: RewardBench's subsets); items with
neither form the section "(none)". The caller adds the namespace (``eval/relative/accuracy``, ...).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

import polars as pl

from engine.prompts import relative_messages
from store.errors import UsageError

if TYPE_CHECKING:  # engine.judging loads the sampler (torch); the app reads relative metrics without it
    from engine.judging import JudgeRequest

SIDES = ("ab", "ba")
LABELS = ("A", "B", "tie")
NO_SECTION = "(none)"
NAN = float("nan")

# What a verdict means in the item's own terms, per order: on "ba" the judge's A is the item's response_b.
_TO_ITEM = {"ab": {"A": "A", "B": "B"}, "ba": {"A": "B", "B": "A"}}


def relative_requests(items: pl.DataFrame) -> list["JudgeRequest"]:
    """Two requests per pairwise item: side "ab" (A = response, B = response_b) and "ba" (swapped)."""
    from engine.judging import JudgeRequest

    out = []
    for item in items.iter_rows(named=True):
        if not isinstance(item.get("response_b"), str):
            raise UsageError(f"item {item['item_id']}: no response_b; relative judging needs pairwise items")
        out.append(JudgeRequest(item["item_id"], "ab", relative_messages(item)))
        out.append(JudgeRequest(item["item_id"], "ba", relative_messages(item, swap=True)))
    return out


# ------------------------------------------------------------------------------------------ per item


def _section(item: Mapping) -> str:
    """The item's section: meta JSON "section", else "subset", else NO_SECTION."""
    meta = item.get("meta")
    if isinstance(meta, str):
        try:
            meta = json.loads(meta) if meta.strip() else None
        except json.JSONDecodeError as e:
            raise ValueError(f"item {item['item_id']}: meta is not valid JSON ({e})") from None
    if not isinstance(meta, Mapping):
        return NO_SECTION
    for key in ("section", "subset"):
        value = meta.get(key)
        if value is not None and str(value).strip():
            return str(value)
    return NO_SECTION


def _order_preference(verdicts: list[str]) -> str | None:
    """One order's preference, in item terms, over its samples: the majority; a split is "tie"; none -> None."""
    counts = Counter(verdicts).most_common()
    if not counts:
        return None
    if len(counts) > 1 and counts[0][1] == counts[1][1]:
        return "tie"
    return counts[0][0]


def _verdicts_by_order(judgments: pl.DataFrame) -> dict[tuple[object, str], list[str]]:
    """(item_id, side) -> the verdicts written on that order (judgment rows without a verdict are left out)."""
    out: dict[tuple[object, str], list[str]] = {}
    rows = judgments.filter(pl.col("side").is_in(SIDES)).select("item_id", "side", "verdict")
    for row in rows.iter_rows(named=True):
        verdict = row["verdict"]
        if verdict is None:
            continue
        if verdict not in ("A", "B"):
            raise ValueError(f"judgment of item {row['item_id']} side {row['side']}: verdict {verdict!r} is not A or B")
        out.setdefault((row["item_id"], row["side"]), []).append(verdict)
    return out


def item_outcomes(items: pl.DataFrame, judgments: pl.DataFrame) -> list[dict]:
    """Per item: item_id, label, section, ab / ba (each order's preference in item terms: "A", "B", "tie" for
    a split of samples, None without a verdict), prediction ("A", "B", "tie", or None = failure), correct,
    and first / verdicts (how many of its verdicts picked position A, out of how many)."""
    by_order = _verdicts_by_order(judgments)
    out = []
    for item in items.iter_rows(named=True):
        item_id, label = item["item_id"], item.get("label")
        if label not in LABELS:
            raise ValueError(f"item {item_id}: label {label!r} is not A, B or tie")
        written = {side: by_order.get((item_id, side), []) for side in SIDES}
        prefs = {side: _order_preference([_TO_ITEM[side][v] for v in written[side]]) for side in SIDES}
        if None in prefs.values():
            prediction = None
        elif prefs["ab"] == prefs["ba"]:
            prediction = prefs["ab"]  # agreement ("tie" only when both orders split their samples)
        else:
            prediction = "tie"  # the orders disagree: position bias
        every = written["ab"] + written["ba"]
        out.append({
            "item_id": item_id, "label": label, "section": _section(item), **prefs, "prediction": prediction,
            "correct": prediction is not None and prediction == label,
            "first": sum(v == "A" for v in every), "verdicts": len(every),
        })
    return out


# ------------------------------------------------------------------------------------------- metrics


def _ratio(num: float, den: int) -> float:
    return num / den if den else NAN


def _summary(outcomes: Iterable[dict]) -> dict[str, float]:
    outcomes = list(outcomes)
    n = len(outcomes)
    answered = [o for o in outcomes if o["prediction"] is not None]
    # A tie from disagreement counts; so does one where an order split its samples (it did not agree).
    ties = sum(o["prediction"] == "tie" for o in answered)
    consistent = sum(o["ab"] == o["ba"] and o["ab"] != "tie" for o in answered)
    verdicts = sum(o["verdicts"] for o in outcomes)
    return {
        "accuracy": _ratio(sum(o["correct"] for o in outcomes), n),
        "ties": float(ties),
        "tie_rate": _ratio(ties, n),
        # Over items with a verdict on both orders: a failure says nothing about position bias.
        "position_consistency": _ratio(consistent, len(answered)),
        # Over single verdicts: 0.5 = no preference for the first position, 1.0 = always A.
        "first_position_rate": _ratio(sum(o["first"] for o in outcomes), verdicts),
        "failures": float(n - len(answered)),
        "n": float(n),
    }


def _by_section(outcomes: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for o in outcomes:
        groups.setdefault(o["section"], []).append(o)
    return dict(sorted(groups.items()))


def relative_metrics(items: pl.DataFrame, judgments: pl.DataFrame) -> dict[str, float]:
    """Accuracy of relative judging with position swap over `items` (columns item_id, label, meta).

    `judgments`: item_id, side ("ab"/"ba"; other sides are ignored), verdict ("A"/"B"/null), one row per
    sample. Returns accuracy (correct / n: a tie is correct only for a tie-labelled item; failures are
    wrong), ties, tie_rate, position_consistency (share of items, among those with verdicts on both orders,
    whose orders agree), first_position_rate (share of verdicts naming position A), failures, n, and
    section_mean_accuracy (unweighted mean of the sections' accuracies, RewardBench's convention).
    Ratios are NaN when their denominator is 0. Raises ValueError naming the item for a label outside
    A/B/tie, a verdict outside A/B, or meta that is not JSON.
    """
    outcomes = item_outcomes(items, judgments)
    out = _summary(outcomes)
    sections = _by_section(outcomes)
    accuracies = [_summary(group)["accuracy"] for group in sections.values()]
    out["section_mean_accuracy"] = sum(accuracies) / len(accuracies) if accuracies else NAN
    return out


def relative_breakdown(items: pl.DataFrame, judgments: pl.DataFrame) -> pl.DataFrame:
    """Per-section metrics as rows (group_by="section", group_value, metric, value), for put_breakdowns."""
    rows = [
        {"group_by": "section", "group_value": section, "metric": metric, "value": value}
        for section, group in _by_section(item_outcomes(items, judgments)).items()
        for metric, value in _summary(group).items()
    ]
    return pl.DataFrame(rows, schema={"group_by": pl.String, "group_value": pl.String, "metric": pl.String,
                                      "value": pl.Float64})
