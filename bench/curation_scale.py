"""Gold curation at scale: 1M judgments (100k items x 10 samples) in a workspace store.

    python bench/curation_scale.py [--items 100000] [--samples 10] [--workspace DIR]

Times our curation end to end (read the judgments from DuckDB, curate as whole-frame Polars operations,
write the pairs) against a plain row-by-row Python pass over the same rows (fetch tuples, group in dicts,
pick pairs in loops, write the pairs the same way). Goal: ours <= 0.3 s and >= 5x. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.config import CurationConfig
from engine.curation import curate
from store import Store
from store.db import connect
from store.store import ITEM_COLUMNS, JUDGMENT_COLUMNS


def build(store: Store, n_items: int, n_samples: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    ids = rng.choice(2**60, n_items, replace=False).astype(np.int64)  # hashed ids, like real imports
    gold = rng.integers(1, 6, n_items)
    items = pl.DataFrame({"item_id": ids, "content_hash": ids.astype(str), "dataset": "bench", "split": "train",
                          "kind": "absolute", "instruction": "i", "response": "r", "gold_score": gold.astype(float),
                          "source_row": np.arange(1, n_items + 1)})
    items = items.with_columns([pl.lit(None, dtype=pl.Utf8).alias(c) for c in ITEM_COLUMNS if c not in items.columns])
    store.import_items("bench", "absolute", items, source="synthetic", preset=None, source_rows=n_items)
    # Scores: right with p=0.4, else a uniform miss; 3% parse failures.
    n = n_items * n_samples
    g = np.repeat(gold, n_samples)
    score = np.where(rng.random(n) < 0.4, g, rng.integers(1, 6, n)).astype(float)
    score[rng.random(n) < 0.03] = np.nan
    item_col = np.repeat(ids, n_samples)
    sample = np.tile(np.arange(n_samples), n_items)
    frame = pl.DataFrame({"item_id": item_col, "sample_index": sample, "score": score}).with_columns(
        pl.col("score").fill_nan(None).cast(pl.Int32),
    ).with_columns(
        judgment_id=pl.Series(rng.choice(2**62, n, replace=False).astype(np.int64)), run_id=pl.lit("bench"),
        iteration=pl.lit(1, dtype=pl.Int32), purpose=pl.lit("train"), side=pl.lit("a"), model=pl.lit("synthetic"),
        parse_status=pl.when(pl.col("score").is_null()).then(pl.lit("no_score")).otherwise(pl.lit("ok")),
        forced=pl.lit(False),
    )
    frame = frame.with_columns([pl.lit(None).alias(c) for c in JUDGMENT_COLUMNS if c not in frame.columns])
    store.create_run("bench", "loop", {"model": "synthetic"})
    store.ensure_iteration("bench", 1)
    # Written in chunks, as sampling writes them (a batch of items with all their samples at a time).
    chunk = 2000 * n_samples
    for start in range(0, frame.height, chunk):
        store.insert_judgments(frame.slice(start, chunk))


def ours(store: Store, cfg: CurationConfig) -> int:
    def fn(judgments, golds):
        result = curate(judgments, golds, cfg)
        return result.pairs, result.report
    return store.run_curation("bench", 1, "bench", fn)["pairs"]


def baseline(store: Store, cfg: CurationConfig) -> int:
    """A plain row-by-row pass: fetch tuples, group in a dict, pick pairs in loops, write the same way."""
    with connect(store.path) as con:
        rows = con.execute(
            "SELECT j.judgment_id, j.item_id, j.sample_index, j.score, j.forced, i.gold_score FROM judgments j"
            " JOIN items i USING (item_id) WHERE j.run_id = 'bench' AND j.iteration = 1 AND j.purpose = 'train'"
        ).fetchall()
    by_item = defaultdict(list)
    for row in rows:
        by_item[row[1]].append(row)
    out = []
    params = json.dumps(cfg.model_dump())
    for item, js in by_item.items():
        js.sort(key=lambda r: r[2])
        gold = int(js[0][5] + 0.5)
        chosen = [r for r in js if r[3] is not None and r[3] == gold]
        rejected = sorted((r for r in js if r[3] is not None and abs(r[3] - gold) >= cfg.min_margin),
                          key=lambda r: (-abs(r[3] - gold), r[2]))
        for c, r in list(zip(chosen, rejected))[: cfg.max_pairs_per_item]:
            out.append({"pair_id": hash((c[0], r[0])) >> 1, "run_id": "bench", "iteration": 1,
                        "item_id": item, "chosen_id": c[0], "rejected_id": r[0], "strategy": "gold",
                        "params": params, "margin": float(abs(r[3] - gold))})
    meta = {"strategy": "gold", "params": cfg.model_dump(), "pairs": len(out)}
    store.save_curation("bench", 1, pl.DataFrame(out), meta)
    return len(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--workspace", type=Path, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    ws = args.workspace or Path(tempfile.mkdtemp(prefix="selfrat-bench-"))
    store = Store.in_workspace(ws)
    t0 = time.perf_counter()
    build(store, args.items, args.samples)
    print(f"built {args.items * args.samples:,} judgments in {time.perf_counter() - t0:.1f} s ({ws})")
    cfg = CurationConfig(strategy="gold", min_margin=1, max_pairs_per_item=2)
    times_ours, times_base = [], []
    for _ in range(args.repeats):
        store.reset_curation("bench", 1)  # untimed: each timing writes its pairs afresh
        t0 = time.perf_counter()
        n_ours = ours(store, cfg)
        times_ours.append(time.perf_counter() - t0)
        store.reset_curation("bench", 1)
        t0 = time.perf_counter()
        n_base = baseline(store, cfg)
        times_base.append(time.perf_counter() - t0)
    if n_ours != n_base:
        raise SystemExit(f"ours made {n_ours} pairs, the baseline {n_base}: they must agree")
    o, b = min(times_ours), min(times_base)
    print(f"ours      {o:.3f} s  (runs: {', '.join(f'{t:.3f}' for t in times_ours)})")
    print(f"baseline  {b:.3f} s  (runs: {', '.join(f'{t:.3f}' for t in times_base)})")
    print(json.dumps({"ours_s": round(o, 4), "baseline_s": round(b, 4), "ratio": round(b / o, 2), "pairs": n_ours,
                      "judgments": args.items * args.samples}))


if __name__ == "__main__":
    main()
