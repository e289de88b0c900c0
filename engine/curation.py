"""Curation: turn an iteration's sampled judgments into preference pairs.

Strategy `gold` (the paper's main recipe): per item, chosen = a judgment whose score equals the gold score;
rejected = a scored judgment with |score - gold| >= min_margin. Averaged gold scores (e.g. three GPT-4
grades) are rounded half up first. Each judgment is used at most once as chosen and at most once as
rejected: the k-th chosen (in sample order) is paired with the k-th rejected (largest miss first, then
sample order), for k < max_pairs_per_item. Items that yield no pair are counted by reason.

The work is whole-array numpy over integer columns (one stable argsort to group by item, then cumulative
sums), so 1M judgments curate in a fraction of a second (bench/curation_scale.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from engine.config import CurationConfig

SKIP_REASONS = ("no_gold", "no_scored_judgment", "no_chosen", "no_rejected")
MAX_MISS = 4  # scores and golds are 1..5


@dataclass
class CurationResult:
    pairs: pl.DataFrame                      # columns of store.PAIR_COLUMNS
    report: dict = field(default_factory=dict)


def pair_ids(chosen: np.ndarray, rejected: np.ndarray) -> np.ndarray:
    """Deterministic 63-bit ids from (chosen_id, rejected_id) (a splitmix64-style mix)."""
    with np.errstate(over="ignore"):
        x = chosen.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) ^ rejected.astype(np.uint64)
        x = (x ^ (x >> np.uint64(31))) * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(29))
    return (x >> np.uint64(1)).astype(np.int64)


def _rank_within(mask: np.ndarray, gid: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """0-based rank of each masked row among the masked rows of its group, in row order."""
    c = np.cumsum(mask, dtype=np.int64)
    before_group = c[starts] - mask[starts]
    return c - 1 - before_group[gid]


def curate(judgments: pl.DataFrame, golds: pl.DataFrame, cfg: CurationConfig, *, run_id: str,
           iteration: int) -> CurationResult:
    """`judgments`: judgment_id, item_id, sample_index, score, forced; `golds`: item_id, gold_score
    (as `Store.curation_inputs` returns them)."""
    if cfg.strategy != "gold":
        raise ValueError(f"curation strategy {cfg.strategy!r} is not available")
    item = judgments["item_id"].to_numpy()
    sample = judgments["sample_index"].to_numpy()
    jid = judgments["judgment_id"].to_numpy()
    score = judgments["score"].cast(pl.Float64).fill_null(np.nan).to_numpy()
    forced = judgments["forced"].fill_null(False).to_numpy()
    # Group rows by item (a stable sort keeps the storage order inside an item, which is sample order
    # whenever the item's samples were written together); sort fully only when that does not hold.
    order = np.argsort(item, kind="stable")
    item, sample = item[order], sample[order]
    same_item = item[1:] == item[:-1]
    if not np.all(~same_item | (sample[1:] > sample[:-1])):
        resort = np.lexsort((sample, item))
        order, item, sample = order[resort], item[resort], sample[resort]
    jid, score, forced = jid[order], score[order], forced[order]

    start_flags = np.r_[True, item[1:] != item[:-1]] if len(item) else np.zeros(0, bool)
    starts = np.flatnonzero(start_flags)
    gid = np.cumsum(start_flags) - 1
    group_items = item[starts]
    group_gold = _lookup(golds["item_id"].to_numpy(), golds["gold_score"].cast(pl.Float64).fill_null(np.nan)
                         .to_numpy(), group_items)
    group_gold = np.floor(group_gold + 0.5)  # round half up: 3.5 -> 4
    gold = group_gold[gid]

    usable = ~np.isnan(score) & ~np.isnan(gold)
    if not cfg.use_forced:
        usable &= ~forced
    miss = np.where(usable, np.abs(np.nan_to_num(score) - np.nan_to_num(gold)), -1).astype(np.int64)

    is_chosen = miss == 0
    chosen_rank = _rank_within(is_chosen, gid, starts)
    # Rejected: largest miss first, then sample order; rank = rejected rows of larger miss + rank at this miss.
    is_rejected = miss >= cfg.min_margin
    rejected_rank = np.zeros(len(miss), dtype=np.int64)
    ahead = np.zeros(len(starts), dtype=np.int64)
    for m in range(MAX_MISS, cfg.min_margin - 1, -1):
        at_m = miss == m
        rejected_rank = np.where(at_m, ahead[gid] + _rank_within(at_m, gid, starts), rejected_rank)
        ahead += np.add.reduceat(at_m.astype(np.int64), starts) if len(starts) else 0

    cap = cfg.max_pairs_per_item
    ci = np.flatnonzero(is_chosen & (chosen_rank < cap))
    ri = np.flatnonzero(is_rejected & (rejected_rank < cap))
    # Both index lists are sorted by (group, rank): match them on that key.
    _, cpos, rpos = np.intersect1d(gid[ci] * 1024 + chosen_rank[ci], gid[ri] * 1024 + rejected_rank[ri],
                                   assume_unique=True, return_indices=True)
    ci, ri = ci[cpos], ri[rpos]
    params = cfg.model_dump()
    pairs = pl.DataFrame({
        "pair_id": pair_ids(jid[ci], jid[ri]),
        "item_id": item[ci],
        "chosen_id": jid[ci],
        "rejected_id": jid[ri],
        "margin": miss[ri].astype(np.float64),
    }).with_columns(
        run_id=pl.lit(run_id), iteration=pl.lit(iteration, dtype=pl.Int32), strategy=pl.lit(cfg.strategy),
        params=pl.lit(json.dumps(params)),
    )

    def per_group(mask):
        return np.add.reduceat(mask.astype(np.int64), starts) if len(starts) else np.zeros(0, np.int64)

    skipped = {
        "no_gold": int(np.isnan(group_gold).sum()),
        "no_scored_judgment": int(((per_group(usable) == 0) & ~np.isnan(group_gold)).sum()),
    }
    scored = (per_group(usable) > 0) & ~np.isnan(group_gold)
    n_chosen, n_rejected = per_group(is_chosen), per_group(is_rejected)
    skipped["no_chosen"] = int((scored & (n_chosen == 0)).sum())
    skipped["no_rejected"] = int((scored & (n_chosen > 0) & (n_rejected == 0)).sum())
    chosen_scores = score[ci].astype(np.int64)
    report = {
        "strategy": cfg.strategy,
        "params": params,
        "items": int(len(starts)),
        "judgments": int(len(item)),
        "pairs": int(len(ci)),
        "items_with_pairs": int(len(np.unique(gid[ci]))),
        "skipped": skipped,
        "chosen_score_hist": {str(k): int((chosen_scores == k).sum()) for k in range(1, 6)},
        "margin_hist": {str(k): int((miss[ri] == k).sum()) for k in range(1, MAX_MISS + 1)},
    }
    return CurationResult(pairs=pairs, report=report)


def _lookup(keys: np.ndarray, values: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """values[keys == w] for each w in wanted (NaN where absent), by binary search."""
    order = np.argsort(keys)
    keys, values = keys[order], values[order]
    pos = np.clip(np.searchsorted(keys, wanted), 0, max(len(keys) - 1, 0))
    if not len(keys):
        return np.full(len(wanted), np.nan)
    return np.where(keys[pos] == wanted, values[pos], np.nan)
