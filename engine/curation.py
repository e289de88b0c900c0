"""Curation: turn an iteration's sampled judgments into preference pairs.

Strategy `gold` (the paper's main recipe): per item, chosen = a judgment whose score equals the gold score;
rejected = a scored judgment with |score - gold| >= min_margin. Averaged gold scores (e.g. three GPT-4
grades) are rounded half up first. Each judgment is used at most once as chosen and at most once as
rejected: the k-th chosen (in sample order) is paired with the k-th rejected (largest miss first, then
sample order), for k < max_pairs_per_item. Items that yield no pair are counted by reason.

The work is whole-array numpy over integer columns, with no per-row Python: rows are grouped by item (the
store hands them back adjacent), and ranks inside an item come from per-item bitmasks of sample indices
(popcounts), so 1M judgments curate in about a tenth of a second (bench/curation_scale.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl

from engine.config import CurationConfig

SKIP_REASONS = ("no_gold", "no_scored_judgment", "no_chosen", "no_rejected")
MAX_MISS = 4  # scores and golds are 1..5
NO_SCORE = -1000  # stands for a missing score or gold in integer arrays


@dataclass
class CurationResult:
    pairs: pl.DataFrame    # pair_id, item_id, chosen_id, rejected_id, margin (strategy and params: in report)
    report: dict = field(default_factory=dict)


def pair_ids(chosen: np.ndarray, rejected: np.ndarray) -> np.ndarray:
    """Deterministic 63-bit ids from (chosen_id, rejected_id) (a splitmix64-style mix)."""
    with np.errstate(over="ignore"):
        x = chosen.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) ^ rejected.astype(np.uint64)
        x = (x ^ (x >> np.uint64(31))) * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(29))
    return (x >> np.uint64(1)).astype(np.int64)


def curate(judgments: pl.DataFrame, golds: pl.DataFrame, cfg: CurationConfig) -> CurationResult:
    """`judgments`: judgment_id, item_id, sample_index, score, forced; `golds`: item_id, gold_score
    (as `Store.curation_inputs` returns them)."""
    if cfg.strategy != "gold":
        raise ValueError(f"curation strategy {cfg.strategy!r} is not available")
    item = judgments["item_id"].to_numpy()
    sample = judgments["sample_index"].to_numpy()
    if len(sample) and (sample.min() < 0 or sample.max() >= 64):
        raise ValueError("sample_index must be in 0..63 (sampling.n is at most 64)")
    jid = judgments["judgment_id"].to_numpy()
    score = judgments["score"].fill_null(NO_SCORE).to_numpy()
    forced = judgments["forced"].fill_null(False).to_numpy()

    group_items, gid = _group(item)
    n_groups = len(group_items)
    group_gold = _lookup(golds["item_id"].to_numpy(), golds["gold_score"].cast(pl.Float64).fill_null(np.nan)
                         .to_numpy(), group_items)
    has_gold = ~np.isnan(group_gold)
    gold = np.where(has_gold, np.floor(group_gold + 0.5), NO_SCORE).astype(score.dtype)[gid]  # round half up

    usable = (score != NO_SCORE) & (gold != NO_SCORE)
    if not cfg.use_forced:
        usable &= ~forced
    miss = np.where(usable, np.abs(score - gold), -1)
    bit = np.left_shift(np.uint64(1), sample.astype(np.uint64))

    def sample_bits(rows: np.ndarray) -> np.ndarray:
        """Per item: the sample indices of `rows` as a 64-bit set. Bits are distinct within an item, so
        their OR is their sum, done as two exact float64 bincounts of 32-bit halves."""
        g, b = gid[rows], bit[rows]
        lo = np.bincount(g, weights=(b & np.uint64(0xFFFFFFFF)).astype(np.float64), minlength=n_groups)
        hi = np.bincount(g, weights=(b >> np.uint64(32)).astype(np.float64), minlength=n_groups)
        return (hi.astype(np.uint64) << np.uint64(32)) | lo.astype(np.uint64)

    def rank_in_item(rows: np.ndarray, bits: np.ndarray) -> np.ndarray:
        """For each of `rows`: how many rows of its item in `bits` have a smaller sample index."""
        return np.bitwise_count(bits[gid[rows]] & (bit[rows] - np.uint64(1))).astype(np.int64)

    chosen = np.flatnonzero(miss == 0)
    chosen_bits = sample_bits(chosen)
    chosen_rank = rank_in_item(chosen, chosen_bits)
    n_chosen = np.bitwise_count(chosen_bits)
    # Rejected: largest miss first, then sample order; rank = rejected rows of larger miss + rank at this miss.
    n_rejected = np.zeros(n_groups, dtype=np.int64)
    rejected_parts, rank_parts = [], []
    for m in range(MAX_MISS, cfg.min_margin - 1, -1):
        rows = np.flatnonzero(miss == m)
        bits = sample_bits(rows)
        rejected_parts.append(rows)
        rank_parts.append(n_rejected[gid[rows]] + rank_in_item(rows, bits))
        n_rejected += np.bitwise_count(bits)
    rejected = np.concatenate(rejected_parts) if rejected_parts else np.zeros(0, np.int64)
    rejected_rank = np.concatenate(rank_parts) if rank_parts else np.zeros(0, np.int64)

    cap = cfg.max_pairs_per_item
    keep_c, keep_r = chosen_rank < cap, rejected_rank < cap
    chosen, chosen_rank = chosen[keep_c], chosen_rank[keep_c]
    rejected, rejected_rank = rejected[keep_r], rejected_rank[keep_r]
    # The k-th chosen of an item meets the k-th rejected of the same item: a slot per (item, k).
    slot = np.full(n_groups * cap, -1, dtype=np.int64)
    slot[gid[chosen] * cap + chosen_rank] = chosen
    partner = slot[gid[rejected] * cap + rejected_rank]
    matched = partner >= 0
    ci, ri = partner[matched], rejected[matched]
    by_item = np.argsort(gid[ci], kind="stable")
    ci, ri = ci[by_item], ri[by_item]
    params = cfg.model_dump()
    pairs = pl.DataFrame({
        "pair_id": pair_ids(jid[ci], jid[ri]),
        "item_id": item[ci],
        "chosen_id": jid[ci],
        "rejected_id": jid[ri],
        "margin": miss[ri].astype(np.float64),
    })

    n_usable = np.bincount(gid[usable], minlength=n_groups)
    skipped = {
        "no_gold": int((~has_gold).sum()),
        "no_scored_judgment": int((has_gold & (n_usable == 0)).sum()),
        "no_chosen": int((has_gold & (n_usable > 0) & (n_chosen == 0)).sum()),
        "no_rejected": int((has_gold & (n_chosen > 0) & (n_rejected == 0)).sum()),
    }
    chosen_scores = score[ci]
    report = {
        "strategy": cfg.strategy,
        "params": params,
        "items": n_groups,
        "judgments": int(len(item)),
        "pairs": int(len(ci)),
        "items_with_pairs": int(np.count_nonzero(np.diff(gid[ci]))) + 1 if len(ci) else 0,  # ci is by item
        "skipped": skipped,
        "chosen_score_hist": {str(k): int((chosen_scores == k).sum()) for k in range(1, 6)},
        "margin_hist": {str(k): int((miss[ri] == k).sum()) for k in range(1, MAX_MISS + 1)},
    }
    return CurationResult(pairs=pairs, report=report)


def preview(store, run_id: str, iteration: int, cfg: CurationConfig) -> dict:
    """The report `curate` would write for an iteration's sampled judgments under `cfg`, writing nothing
    (the app's what-if preview). `store` is a `store.Store`; the dataset is the run's train_dataset."""
    dataset = store.run(run_id)["config"].get("train_dataset")
    if not dataset:
        raise ValueError(f"run {run_id!r} has no train_dataset: there is nothing to curate")
    judgments, golds = store.curation_inputs(run_id, iteration, dataset)
    return curate(judgments, golds, cfg).report


def _lookup(keys: np.ndarray, values: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """values[keys == w] for each w in wanted (NaN where absent), by binary search."""
    if np.any(keys[1:] < keys[:-1]):  # the store hands them sorted; anyone else may not
        order = np.argsort(keys)
        keys, values = keys[order], values[order]
    pos = np.clip(np.searchsorted(keys, wanted), 0, max(len(keys) - 1, 0))
    if not len(keys):
        return np.full(len(wanted), np.nan)
    return np.where(keys[pos] == wanted, values[pos], np.nan)


def _group(item: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct items, each row's index into them). The store returns an item's samples adjacent (they
    are written together), so the groups usually fall out of one pass; otherwise a sort finds them."""
    if not len(item):
        return item, np.zeros(0, np.int64)
    boundary = np.r_[True, item[1:] != item[:-1]]
    firsts = item[boundary]
    ordered = np.sort(firsts)
    if not np.any(ordered[1:] == ordered[:-1]):  # every item appears in one run of rows
        return firsts, np.cumsum(boundary) - 1
    groups, gid = np.unique(item, return_inverse=True)
    return groups, gid
