"""Evaluation of one judge (one iteration) on one dataset, from the judgments stored for it.

Absolute datasets: each item's prediction is the mean score of its eval judgments (a parse failure with no
forced score is a missing prediction), compared with gold by `metrics.absolute_metrics`. Pairwise datasets:
both responses are scored separately and the chosen one must score strictly higher (`pairwise_metrics`).
"""

from __future__ import annotations

import polars as pl

from engine.metrics import absolute_metrics, pairwise_metrics
from engine.prompts import absolute_messages
from engine.judging import JudgeRequest

CHOSEN_SIDE = {"A": "a", "B": "b"}


def eval_requests(items: pl.DataFrame) -> list[JudgeRequest]:
    """Absolute items are judged once per sample; pairwise items once per side."""
    out = []
    for item in items.iter_rows(named=True):
        out.append(JudgeRequest(item["item_id"], "a", absolute_messages(item)))
        if item["kind"] == "pairwise":
            out.append(JudgeRequest(item["item_id"], "b", absolute_messages(item, response_key="response_b")))
    return out


def predictions(judgments: pl.DataFrame) -> pl.DataFrame:
    """Per (item, side): mean score over samples (null when none scored) and the parse-failure share."""
    return judgments.group_by("item_id", "side").agg(
        pred=pl.col("score").cast(pl.Float64).mean(),
        failures=(pl.col("parse_status") != "ok").sum(),
        samples=pl.len(),
    )


def dataset_metrics(items: pl.DataFrame, judgments: pl.DataFrame) -> dict[str, float]:
    preds = predictions(judgments)
    parse_failure_rate = float(preds["failures"].sum() / preds["samples"].sum()) if preds.height else float("nan")
    if items.height and items["kind"][0] == "pairwise":
        sides = preds.pivot(on="side", index="item_id", values="pred")
        for side in ("a", "b"):
            if side not in sides.columns:
                sides = sides.with_columns(pl.lit(None, dtype=pl.Float64).alias(side))
        joined = items.select("item_id", "label").join(sides, on="item_id", how="left")
        joined = joined.filter(pl.col("label").is_in(["A", "B"]))  # tie-labelled items: see METHOD.md, later issue
        chosen = [row["a"] if row["label"] == "A" else row["b"] for row in joined.iter_rows(named=True)]
        rejected = [row["b"] if row["label"] == "A" else row["a"] for row in joined.iter_rows(named=True)]
        out = pairwise_metrics(chosen, rejected)
    else:
        joined = items.select("item_id", "gold_score").join(
            preds.filter(pl.col("side") == "a"), on="item_id", how="left"
        )
        out = absolute_metrics(joined["gold_score"].to_list(), joined["pred"].to_list())
    out["parse_failure_rate"] = parse_failure_rate
    return {k: float(v) for k, v in out.items()}
