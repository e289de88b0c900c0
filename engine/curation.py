"""Curation: turn an iteration's sampled judgments into preference pairs.

Strategies (`CurationConfig.strategy`); a judgment is *usable* when it has a score (and, with
`use_forced=False`, the score was not forced), and, with `dedupe`, it is the first (lowest sample index) of
the judgments of its item with the same text: identical texts count once and are never paired.

- gold (the paper's main recipe): chosen = a judgment whose score equals the gold score (averaged golds,
  e.g. three GPT-4 grades, are rounded half up); rejected = one with |score - gold| >= min_margin.
- majority (no gold needed): the item's mode, the score most of its usable judgments give, stands in for
  the gold. When two or more scores tie for the top count there is no clear majority and the item is
  skipped ("tied_mode"): picking one of them would make up a verdict the samples do not support.
- meta: a meta-judge rated each judgment 1-5 (`ratings`, engine.meta). Per item the usable rated
  judgments are ranked by rating (ties: lower sample index first); the k-th highest is paired with the
  k-th lowest while rating_chosen - rating_rejected >= min_margin. The two ends never meet, so each
  judgment is in at most one pair.

For gold and majority each judgment is used at most once as chosen and at most once as rejected: the k-th
chosen (in sample order) is paired with the k-th rejected (largest miss first, then sample order). Every
strategy keeps at most max_pairs_per_item pairs per item; `balance_scores` then keeps, for each chosen
score, as many pairs as the rarest chosen score has (first pairs of items first, then by pair id, which is
a hash: a deterministic, order-free pick). Items left without a pair are counted by reason; the reasons and
the items with pairs add up to the items.

The report also measures length bias: DPO on pairs whose chosen rationales are much longer than the
rejected ones can teach the judge that long means right (docs/evaluation.md, "Length: a trap in the
reference data").

The work is whole-array numpy over integer columns, with no per-row Python: rows are grouped by item (the
store hands them back adjacent), and ranks inside an item come from per-item bitmasks of sample indices
(popcounts), so 1M judgments curate in about 0.15 s on 2 CPU cores (bench/curation_scale.py times the
whole read-curate-write).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from engine.config import ConfigError, CurationConfig
from engine.metrics import round_half_up

SKIP_REASONS = {
    "gold": ("no_gold", "no_scored_judgment", "no_chosen", "no_rejected"),
    "majority": ("no_scored_judgment", "tied_mode", "no_rejected"),
    "meta": ("no_scored_judgment", "no_ratings", "no_margin"),
}
BALANCED_OUT = "balanced_out"  # an item whose every pair balance_scores dropped
MAX_MISS = 4  # scores and golds are 1..5
NO_SCORE = -1000  # stands for a missing score or gold in integer arrays
LENGTH_RATIO_OK = (0.8, 1.25)  # mean chosen / rejected rationale length outside this draws a warning


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


@dataclass
class _Rows:
    """The judgments as numpy columns, with each row's item group."""

    item: np.ndarray
    gid: np.ndarray
    group_items: np.ndarray
    sample: np.ndarray
    jid: np.ndarray
    score: np.ndarray
    usable: np.ndarray
    text_hash: np.ndarray | None
    rationale_len: np.ndarray | None
    duplicates: int

    @property
    def n_groups(self) -> int:
        return len(self.group_items)


@dataclass
class _Pairs:
    """Row indices of chosen and rejected, each pair's rank k inside its item, its margin, and per-item
    skip masks (reason -> bool per group)."""

    ci: np.ndarray
    ri: np.ndarray
    k: np.ndarray
    margin: np.ndarray
    skipped: dict[str, np.ndarray]


def curate(judgments: pl.DataFrame, golds: pl.DataFrame | None, cfg: CurationConfig,
           ratings: Mapping[int, int] | pl.DataFrame | None = None) -> CurationResult:
    """Pairs and a report for one iteration's judgments under `cfg`.

    `judgments`: judgment_id, item_id, sample_index, score, forced, plus text_hash (or text) when
    `cfg.dedupe`, and optionally rationale_len (for the length-bias report), as `Store.curation_inputs`
    returns them. `golds`: item_id, gold_score (strategy gold only). `ratings`: judgment_id -> meta rating
    1-5, as a mapping or a frame with judgment_id and rating (strategy meta only; a judgment without a
    rating is not used).

    The report (JSON-ready; stored as the iteration's curate_report): strategy, params, items, judgments,
    usable, duplicates (usable copies dropped by dedupe), pairs, items_with_pairs, skipped (reason -> items,
    SKIP_REASONS[strategy] plus balanced_out with balance_scores), chosen_score_hist, margin_hist (score miss,
    or rating gap for meta), balanced_away (pairs dropped by balance_scores), length_bias (chosen_mean_chars,
    rejected_mean_chars, ratio; None without rationale_len) and warnings (messages)."""
    rows = _rows(judgments, cfg)
    if cfg.strategy == "gold":
        if golds is None:
            raise ValueError("strategy gold needs the items' gold scores")
        found = _gold_pairs(rows, golds, cfg)
    elif cfg.strategy == "majority":
        found = _majority_pairs(rows, cfg)
    elif cfg.strategy == "meta":
        if ratings is None:
            raise ValueError("strategy meta needs meta ratings (engine.meta.rate_judgments writes them)")
        found = _meta_pairs(rows, _ratings_array(ratings, rows.jid), cfg)
    else:
        raise ValueError(f"curation strategy {cfg.strategy!r} is not available")

    ci, ri, k, margin = found.ci, found.ri, found.k, found.margin
    pid = pair_ids(rows.jid[ci], rows.jid[ri])
    skipped = found.skipped
    balanced_away = 0
    if cfg.balance_scores:
        had_pairs = np.bincount(rows.gid[ci], minlength=rows.n_groups) > 0
        if len(ci):
            keep = _balance(rows.score[ci], k, pid)
            balanced_away = int((~keep).sum())
            ci, ri, k, margin, pid = ci[keep], ri[keep], k[keep], margin[keep], pid[keep]
        skipped[BALANCED_OUT] = had_pairs & (np.bincount(rows.gid[ci], minlength=rows.n_groups) == 0)
    by_item = np.argsort(rows.gid[ci] * cfg.max_pairs_per_item + k, kind="stable")  # k < the cap
    ci, ri, margin, pid = ci[by_item], ri[by_item], margin[by_item], pid[by_item]
    pairs = pl.DataFrame({
        "pair_id": pid,
        "item_id": rows.item[ci],
        "chosen_id": rows.jid[ci],
        "rejected_id": rows.jid[ri],
        "margin": margin.astype(np.float64),
    })
    chosen_scores = rows.score[ci]
    report = {
        "strategy": cfg.strategy,
        "params": cfg.model_dump(),
        "items": rows.n_groups,
        "judgments": int(len(rows.item)),
        "usable": int(rows.usable.sum()),
        "duplicates": rows.duplicates,
        "pairs": int(len(ci)),
        "items_with_pairs": int(np.count_nonzero(np.diff(rows.gid[ci]))) + 1 if len(ci) else 0,  # ci is by item
        "skipped": {reason: int(skipped[reason].sum()) for reason in
                    (*SKIP_REASONS[cfg.strategy], *([BALANCED_OUT] if cfg.balance_scores else []))},
        "chosen_score_hist": {str(s): int((chosen_scores == s).sum()) for s in range(1, 6)},
        "margin_hist": {str(m): int((margin == m).sum()) for m in range(1, MAX_MISS + 1)},
    }
    if cfg.balance_scores:
        report["balanced_away"] = balanced_away
    report["length_bias"], report["warnings"] = _length_bias(rows.rationale_len, ci, ri)
    return CurationResult(pairs=pairs, report=report)


def preview(store, run_id: str, iteration: int, cfg: CurationConfig, rater_model: str | None = None) -> dict:
    """The report `curate` would write for an iteration's sampled judgments under `cfg`, writing nothing
    (the app's what-if preview and `selfrat curate --dry-run`). `store` is a `store.Store`; the dataset is
    the run's train_dataset. Strategy meta uses the ratings already stored (by `rater_model`; None = each
    judgment rated by the model that wrote it, as the runner does), since rating means generating."""
    dataset = store.run(run_id)["config"].get("train_dataset")
    if not dataset:
        raise ConfigError(f"run {run_id!r} has no train_dataset: there is nothing to curate")
    judgments, golds = store.curation_inputs(run_id, iteration, dataset)
    if cfg.strategy != "meta":
        return curate(judgments, golds, cfg).report
    from engine.meta import stored_ratings

    ratings = stored_ratings(store, run_id, iteration, rater_model)
    report = curate(judgments, golds, cfg, ratings=ratings).report
    if ratings.height == 0 and report["usable"]:
        report["warnings"].append("no meta ratings are stored for these judgments yet: curating (not a dry"
                                  " run) rates them with the previous iteration's judge first")
    return report


# ------------------------------------------------------------------ inputs


def _rows(judgments: pl.DataFrame, cfg: CurationConfig) -> _Rows:
    need = ["judgment_id", "item_id", "sample_index", "score", "forced"]
    missing = [c for c in need if c not in judgments.columns]
    if missing:
        raise ValueError(f"judgments lack column(s) {', '.join(missing)}")
    item = judgments["item_id"].to_numpy()
    sample = judgments["sample_index"].to_numpy()
    if len(sample) and (sample.min() < 0 or sample.max() >= 64):
        bad = int(np.flatnonzero((sample < 0) | (sample >= 64))[0])
        raise ValueError(f"judgment {judgments['judgment_id'][bad]}: sample_index {sample[bad]} is not in 0..63"
                         " (sampling.n is at most 64)")
    jid = judgments["judgment_id"].to_numpy()
    score = judgments["score"].fill_null(NO_SCORE).to_numpy()
    if score.dtype.kind == "f":  # e.g. a hand-built frame; a fractional score is an input error
        fractional = score != np.round(score)
        if fractional.any():
            bad = int(np.flatnonzero(fractional)[0])
            raise ValueError(f"judgment {jid[bad]}: score {score[bad]} is not an integer")
        score = score.astype(np.int64)
    forced = judgments["forced"].fill_null(False).to_numpy()
    group_items, gid = _group(item)

    usable = score != NO_SCORE
    out_of_range = usable & ((score < 1) | (score > 5))
    if out_of_range.any():
        bad = int(np.flatnonzero(out_of_range)[0])
        raise ValueError(f"judgment {jid[bad]}: score {score[bad]} is not in 1..5")
    if not cfg.use_forced:
        usable &= ~forced
    # Texts matter to dedupe, and to meta (which must not pair two copies of a text); for gold and majority
    # two copies of a text carry the same score, so they can never be paired anyway.
    text_hash, has_text = (_text_hash(judgments, required=cfg.dedupe) if cfg.dedupe or cfg.strategy == "meta"
                           else (None, None))
    duplicates = 0
    if cfg.dedupe and text_hash is not None:
        # Copies of a text share its score and forced flag, hence its usability: look among usable rows only.
        dup = _duplicates(gid, text_hash, sample, usable & has_text)
        duplicates = int(dup.sum())
        usable &= ~dup
    rationale_len = judgments["rationale_len"].fill_null(0).to_numpy() if "rationale_len" in judgments.columns else None
    return _Rows(item=item, gid=gid, group_items=group_items, sample=sample, jid=jid, score=score, usable=usable,
                 text_hash=text_hash, rationale_len=rationale_len, duplicates=duplicates)


def _text_hash(judgments: pl.DataFrame, required: bool) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(one int64 per row that is equal for equal texts, whether the row has a text); a missing text gets a
    value of its own. (None, None) when the frame has neither text_hash nor text and `required` is false."""
    if "text_hash" in judgments.columns:
        col = judgments["text_hash"]
    elif "text" in judgments.columns:
        text = pl.col("text")  # polars hashes a null too: keep it null
        col = judgments.select(pl.when(text.is_null()).then(None).otherwise(text.hash())).to_series()
    elif not required:
        return None, None
    else:
        raise ValueError("dedupe needs a text_hash (or text) column in the judgments; set dedupe: false to"
                         " curate without it")
    if col.null_count() == len(col):
        return -1 - np.arange(len(col), dtype=np.int64), np.zeros(len(col), dtype=bool)
    null = col.is_null().to_numpy()
    h = col.fill_null(0).to_numpy().astype(np.int64, copy=False)  # a uint64 hash wraps: equality is kept
    if null.any():
        h = h.copy()
        h[null] = -1 - np.flatnonzero(null)  # distinct from each other (and, but for 2**-64, from any hash)
    return h, ~null


def _duplicates(gid: np.ndarray, text_hash: np.ndarray, sample: np.ndarray, among: np.ndarray) -> np.ndarray:
    """True for each row of `among` whose item has another row of `among` with the same text and a lower
    sample index.

    One 64-bit key per (item, text); a sort of the keys (~20 ms for 1M) says whether any key repeats, which
    is rare, and only rows with a repeated key get the exact (item, text) comparison."""
    out = np.zeros(len(gid), dtype=bool)
    rows = np.flatnonzero(among)
    if len(rows) < 2:
        return out
    with np.errstate(over="ignore"):
        key = gid[rows].astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) ^ text_hash[rows].view(np.uint64)
    ordered = np.sort(key)
    repeated = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
    if not len(repeated):
        return out
    pos = np.clip(np.searchsorted(repeated, key), 0, len(repeated) - 1)
    cand = rows[repeated[pos] == key]
    o = cand[np.lexsort((sample[cand], text_hash[cand], gid[cand]))]
    same = (gid[o[1:]] == gid[o[:-1]]) & (text_hash[o[1:]] == text_hash[o[:-1]])
    out[o[1:][same]] = True
    return out


def _ratings_array(ratings: Mapping[int, int] | pl.DataFrame, jid: np.ndarray) -> np.ndarray:
    """Each row's rating as float (NaN = not rated), checked to be 1..5."""
    if isinstance(ratings, pl.DataFrame):
        missing = [c for c in ("judgment_id", "rating") if c not in ratings.columns]
        if missing:
            raise ValueError(f"ratings lack column(s) {', '.join(missing)}")
        keys = ratings["judgment_id"].to_numpy().astype(np.int64)
        values = ratings["rating"].cast(pl.Float64).fill_null(np.nan).to_numpy()
    else:
        keys = np.fromiter(ratings.keys(), dtype=np.int64, count=len(ratings))
        values = np.array([np.nan if v is None else float(v) for v in ratings.values()], dtype=np.float64)
    bad = ~np.isnan(values) & ~np.isin(values, [1, 2, 3, 4, 5])
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"judgment {keys[i]}: meta rating {values[i]:g} is not an integer in 1..5")
    return _lookup(keys, values, jid)


# ------------------------------------------------------------------ strategies


def _gold_pairs(rows: _Rows, golds: pl.DataFrame, cfg: CurationConfig) -> _Pairs:
    group_gold = _lookup(golds["item_id"].to_numpy(), golds["gold_score"].cast(pl.Float64).fill_null(np.nan)
                         .to_numpy(), rows.group_items)
    has_gold = ~np.isnan(group_gold)
    target = np.where(has_gold, round_half_up(group_gold), NO_SCORE).astype(rows.score.dtype)
    found, n_usable, n_chosen, n_rejected = _target_pairs(rows, target, cfg)
    found.skipped = {
        "no_gold": ~has_gold,
        "no_scored_judgment": has_gold & (n_usable == 0),
        "no_chosen": has_gold & (n_usable > 0) & (n_chosen == 0),
        "no_rejected": has_gold & (n_chosen > 0) & (n_rejected == 0),
    }
    return found


def _majority_pairs(rows: _Rows, cfg: CurationConfig) -> _Pairs:
    u = np.flatnonzero(rows.usable)
    counts = np.bincount(rows.gid[u] * 5 + (rows.score[u] - 1), minlength=rows.n_groups * 5).reshape(-1, 5)
    top = counts.max(axis=1)
    clear = (top > 0) & ((counts == top[:, None]).sum(axis=1) == 1)
    target = np.where(clear, counts.argmax(axis=1) + 1, NO_SCORE).astype(rows.score.dtype)
    found, n_usable, _, n_rejected = _target_pairs(rows, target, cfg)
    found.skipped = {
        "no_scored_judgment": n_usable == 0,
        "tied_mode": (n_usable > 0) & ~clear,
        "no_rejected": clear & (n_rejected == 0),
    }
    return found


def _target_pairs(rows: _Rows, group_target: np.ndarray, cfg: CurationConfig):
    """gold and majority: chosen hits the item's target score, rejected misses it by >= min_margin.
    Returns (pairs without skip masks, usable / chosen / rejected counts per item)."""
    gid, sample, n_groups = rows.gid, rows.sample, rows.n_groups
    target = group_target[gid]
    usable = rows.usable & (target != NO_SCORE)
    miss = np.where(usable, np.abs(rows.score - target), -1)
    bit = np.left_shift(np.uint64(1), sample.astype(np.uint64))

    def sample_bits(sel: np.ndarray) -> np.ndarray:
        """Per item: the sample indices of rows `sel` as a 64-bit set. Bits are distinct within an item, so
        their OR is their sum, done as two exact float64 bincounts of 32-bit halves."""
        g, b = gid[sel], bit[sel]
        lo = np.bincount(g, weights=(b & np.uint64(0xFFFFFFFF)).astype(np.float64), minlength=n_groups)
        hi = np.bincount(g, weights=(b >> np.uint64(32)).astype(np.float64), minlength=n_groups)
        return (hi.astype(np.uint64) << np.uint64(32)) | lo.astype(np.uint64)

    def rank_in_item(sel: np.ndarray, bits: np.ndarray) -> np.ndarray:
        """For each of rows `sel`: how many rows of its item in `bits` have a smaller sample index."""
        return np.bitwise_count(bits[gid[sel]] & (bit[sel] - np.uint64(1))).astype(np.int64)

    chosen = np.flatnonzero(miss == 0)
    chosen_bits = sample_bits(chosen)
    chosen_rank = rank_in_item(chosen, chosen_bits)
    n_chosen = np.bitwise_count(chosen_bits)
    # Rejected: largest miss first, then sample order; rank = rejected rows of larger miss + rank at this miss.
    n_rejected = np.zeros(n_groups, dtype=np.int64)
    rejected_parts, rank_parts = [], []
    for m in range(MAX_MISS, cfg.min_margin - 1, -1):
        sel = np.flatnonzero(miss == m)
        bits = sample_bits(sel)
        rejected_parts.append(sel)
        rank_parts.append(n_rejected[gid[sel]] + rank_in_item(sel, bits))
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
    ci, ri, k = partner[matched], rejected[matched], rejected_rank[matched]
    n_usable = np.bincount(gid[rows.usable], minlength=n_groups)  # with or without a target
    found = _Pairs(ci=ci, ri=ri, k=k, margin=miss[ri], skipped={})
    return found, n_usable, n_chosen, n_rejected


def _meta_pairs(rows: _Rows, rating: np.ndarray, cfg: CurationConfig) -> _Pairs:
    gid, n_groups = rows.gid, rows.n_groups
    rated = np.flatnonzero(rows.usable & ~np.isnan(rating))
    # By item, then rating high to low, then sample order: position p of n is the p-th best.
    order = rated[np.lexsort((rows.sample[rated], -rating[rated], gid[rated]))]
    g = gid[order]
    n_rated = np.bincount(g, minlength=n_groups)
    start = np.cumsum(n_rated) - n_rated
    pos = np.arange(len(order)) - start[g]
    n = n_rated[g]
    # The p-th best meets the p-th worst; past the middle they would swap roles, so stop before it.
    take = (pos < cfg.max_pairs_per_item) & (2 * pos < n - 1)
    ci = order[take]
    ri = order[start[g[take]] + n[take] - 1 - pos[take]]
    k = pos[take]
    gap = rating[ci] - rating[ri]
    keep = gap >= cfg.min_margin
    if rows.text_hash is not None:
        keep &= rows.text_hash[ci] != rows.text_hash[ri]  # identical texts teach nothing (dedupe off)
    ci, ri, k, gap = ci[keep], ri[keep], k[keep], gap[keep]
    n_usable = np.bincount(gid[rows.usable], minlength=n_groups)
    has_pair = np.bincount(gid[ci], minlength=n_groups) > 0
    skipped = {
        "no_scored_judgment": n_usable == 0,
        "no_ratings": (n_usable > 0) & (n_rated == 0),
        "no_margin": (n_rated > 0) & ~has_pair,
    }
    return _Pairs(ci=ci, ri=ri, k=k, margin=gap.astype(np.int64), skipped=skipped)


# ------------------------------------------------------------------ options and report


def _balance(chosen_score: np.ndarray, k: np.ndarray, pid: np.ndarray) -> np.ndarray:
    """Which pairs to keep so that every chosen score present has as many pairs as the rarest one: per
    score, the items' first pairs before their second ones, then by pair id (a hash of the two judgment ids,
    so the pick does not depend on row order)."""
    counts = np.bincount(chosen_score, minlength=6)
    quota = counts[counts > 0].min()
    order = np.lexsort((pid, k, chosen_score))
    s = chosen_score[order]
    first = np.searchsorted(s, s, side="left")  # s is sorted: where each score's run starts
    keep = np.zeros(len(order), dtype=bool)
    keep[order[np.arange(len(order)) - first < quota]] = True
    return keep


def _length_bias(rationale_len: np.ndarray | None, ci: np.ndarray, ri: np.ndarray) -> tuple[dict | None, list[str]]:
    """Mean rationale length (chars) of the chosen vs the rejected side of the pairs, and a warning when
    their ratio leaves LENGTH_RATIO_OK."""
    if rationale_len is None:
        return None, []
    if not len(ci):
        return {"chosen_mean_chars": None, "rejected_mean_chars": None, "ratio": None}, []
    chosen, rejected = float(rationale_len[ci].mean()), float(rationale_len[ri].mean())
    ratio = chosen / rejected if rejected > 0 else None
    bias = {"chosen_mean_chars": round(chosen, 1), "rejected_mean_chars": round(rejected, 1),
            "ratio": None if ratio is None else round(ratio, 3)}
    lo, hi = LENGTH_RATIO_OK
    note = " on average; DPO on these pairs may teach the judge to prefer {} rationales"
    if ratio is None and chosen > 0:
        return bias, [f"length bias: chosen rationales average {chosen:.0f} chars, rejected ones are empty"]
    if ratio is not None and ratio > hi:
        return bias, [f"length bias: chosen rationales are {ratio:.2f}x as long as rejected ones ({chosen:.0f}"
                      f" vs {rejected:.0f} chars)" + note.format("longer")]
    if ratio is not None and ratio < lo:
        return bias, [f"length bias: rejected rationales are {1 / ratio:.2f}x as long as chosen ones"
                      f" ({rejected:.0f} vs {chosen:.0f} chars)" + note.format("shorter")]
    return bias, []


# ------------------------------------------------------------------ helpers


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
