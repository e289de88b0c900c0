"""Gold curation on fixed judgments with known answers."""

from __future__ import annotations

import polars as pl
import pytest

from engine.config import CurationConfig
from engine.curation import curate


ITEMS = {"x": 1, "nochosen": 2, "norejected": 3, "unscored": 4, "nogold": 5, "ok": 6}


def frames(rows):
    """rows: (item, sample_index, score, gold[, forced]) -> (judgments, golds) as the store returns them."""
    judgments = pl.DataFrame(
        {
            "judgment_id": [ITEMS[r[0]] * 100 + r[1] for r in rows],
            "item_id": [ITEMS[r[0]] for r in rows],
            "sample_index": [r[1] for r in rows],
            "score": [r[2] for r in rows],
            "forced": [r[4] if len(r) > 4 else False for r in rows],
        },
        schema_overrides={"score": pl.Int32},
    )
    golds = pl.DataFrame({"item_id": [ITEMS[r[0]] for r in rows], "gold_score": [r[3] for r in rows]},
                         schema_overrides={"gold_score": pl.Float64}).unique("item_id")
    return judgments, golds


def run(rows, **cfg):
    return curate(*frames(rows), CurationConfig(**cfg))


NAMES = {v: k for k, v in ITEMS.items()}


def pair_set(result):
    return {(NAMES[c // 100], c % 100, r % 100) for c, r in zip(result.pairs["chosen_id"], result.pairs["rejected_id"])}


def test_chosen_matches_gold_rejected_misses_by_margin():
    rows = [("x", 0, 3, 3.0), ("x", 1, 4, 3.0), ("x", 2, 1, 3.0), ("x", 3, 3, 3.0)]
    assert pair_set(run(rows, min_margin=1, max_pairs_per_item=4)) == {("x", 0, 2), ("x", 3, 1)}
    # margin 2: only the judgment that missed by 2 may be rejected, and it is used once
    assert pair_set(run(rows, min_margin=2, max_pairs_per_item=4)) == {("x", 0, 2)}


def test_cap_and_no_judgment_reused_in_a_role():
    rows = [("x", i, 5, 5.0) for i in range(3)] + [("x", 3 + i, 1, 5.0) for i in range(3)]
    res = run(rows, min_margin=1, max_pairs_per_item=2)
    assert res.pairs.height == 2
    assert res.pairs["chosen_id"].n_unique() == 2 and res.pairs["rejected_id"].n_unique() == 2
    assert set(res.pairs["margin"].to_list()) == {4.0}


def test_skipped_items_are_counted_by_reason():
    rows = [
        ("nochosen", 0, 2, 4.0), ("nochosen", 1, 1, 4.0),
        ("norejected", 0, 4, 4.0), ("norejected", 1, 4, 4.0),
        ("unscored", 0, None, 4.0),
        ("nogold", 0, 3, None),
        ("ok", 0, 4, 4.0), ("ok", 1, 2, 4.0),
    ]
    res = run(rows)
    assert res.report["skipped"] == {"no_gold": 1, "no_scored_judgment": 1, "no_chosen": 1, "no_rejected": 1}
    assert res.report["pairs"] == 1 and res.report["items"] == 5
    assert res.report["chosen_score_hist"]["4"] == 1


def test_averaged_gold_is_rounded_and_forced_can_be_excluded():
    rows = [("x", 0, 4, 3.67), ("x", 1, 2, 3.67, True), ("x", 2, 1, 3.67)]
    assert pair_set(run(rows, min_margin=1)) == {("x", 0, 2), }
    assert pair_set(run(rows, min_margin=1, use_forced=True, max_pairs_per_item=1)) == {("x", 0, 2)}
    res = run([("x", 0, 4, 4.0), ("x", 1, 1, 4.0, True)], use_forced=False)
    assert res.pairs.height == 0 and res.report["skipped"]["no_rejected"] == 1


def test_pair_ids_are_deterministic_and_order_of_rows_does_not_matter():
    rows = [("x", 0, 3, 3.0), ("x", 1, 1, 3.0), ("ok", 0, 1, 4.0), ("ok", 1, 4, 4.0), ("ok", 2, 2, 4.0)]
    a, b = run(rows), run(list(reversed(rows)))
    assert sorted(a.pairs["pair_id"].to_list()) == sorted(b.pairs["pair_id"].to_list())
    assert pair_set(a) == pair_set(b) == {("x", 0, 1), ("ok", 1, 0)}
    assert a.pairs["pair_id"].n_unique() == a.pairs.height


def test_reference_python_pass_agrees_on_random_judgments():
    """The vectorised curation equals a plain per-item loop over the same rules."""
    import random

    rng = random.Random(7)
    rows = []
    for i in range(300):
        gold = rng.choice([1, 2, 3, 4, 5, 2.5, None])
        for j in range(rng.randint(1, 8)):
            rows.append((i, j, rng.choice([1, 2, 3, 4, 5, None]), gold, rng.random() < 0.2))
    judgments = pl.DataFrame({"judgment_id": [r[0] * 100 + r[1] for r in rows], "item_id": [r[0] for r in rows],
                              "sample_index": [r[1] for r in rows], "score": [r[2] for r in rows],
                              "forced": [r[4] for r in rows]}, schema_overrides={"score": pl.Int32})
    golds = pl.DataFrame({"item_id": [r[0] for r in rows], "gold_score": [r[3] for r in rows]},
                         schema_overrides={"gold_score": pl.Float64}).unique("item_id")
    for margin, cap, use_forced in [(1, 2, True), (2, 3, False), (1, 1, True)]:
        cfg = CurationConfig(min_margin=margin, max_pairs_per_item=cap, use_forced=use_forced)
        got = curate(judgments, golds, cfg)
        expected = set()
        for i in range(300):
            js = [r for r in rows if r[0] == i and r[2] is not None and r[3] is not None and (use_forced or not r[4])]
            if not js:
                continue
            g = int(js[0][3] + 0.5)
            ch = [r for r in js if r[2] == g]
            rj = sorted((r for r in js if abs(r[2] - g) >= margin), key=lambda r: (-abs(r[2] - g), r[1]))
            expected |= {(c[0] * 100 + c[1], r[0] * 100 + r[1]) for c, r in list(zip(ch, rj))[:cap]}
        assert set(zip(got.pairs["chosen_id"].to_list(), got.pairs["rejected_id"].to_list())) == expected


def test_unknown_strategy_is_refused():
    with pytest.raises(Exception):
        CurationConfig(strategy="vibes")
