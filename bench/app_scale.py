"""The app at scale: every page's queries and its full render on a workspace of 1M judgments.

    python bench/app_scale.py [--items 100000] [--samples 10] [--eval-items 5000] [--workspace DIR]
                              [--queries-only]

Builds (or reuses, when DIR already holds one) a workspace: 100k training items x 10 sampled judgments
(`build()` from bench/curation_scale.py, then rationales and score probabilities filled in so text search
and previews have real text to chew on), curated with `Store.run_curation` + `engine.curation.curate`, an
eval dataset judged at iterations 0 and 1, metrics and a few pair reviews. Then it prints:

1. each `store.queries` function alone (best of 3), including the costly cases a page issues only on
   demand (a deep page, a text search, the train comparison);
2. per page of ui/app.py (and the Judgments page with a text filter typed in): the queries the page
   issued and their times, read by wrapping every query function before the app imports it;
3. a table: query_s (those times summed) and render_s (the page's full `AppTest` render with a cold
   `st.cache_data`, after one untimed warm-up run that pays for imports), warm_s (the rerun, cached).

Goal: every page renders in <= 2 s. The LAST line is one JSON object
{"pages": {name: {"query_s", "render_s"}}, "judgments": ..., "max_render_s": ..., ...}.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from curation_scale import build  # noqa: E402

from engine.config import CurationConfig, RunConfig  # noqa: E402
from engine.curation import curate  # noqa: E402
from store import Store, judgment_id  # noqa: E402
from store import queries as q  # noqa: E402
from store.db import connect  # noqa: E402
from store.store import ITEM_COLUMNS, JUDGMENT_COLUMNS  # noqa: E402

RUN = "bench"  # build() writes run "bench", iteration 1, dataset "bench"
EVAL = "bench-eval"

PHRASES = [  # varied rationales, so text search scans real strings, not one dictionary entry
    "The response addresses the instruction but leaves out key details that the reference answer covers.",
    "The answer is accurate, complete and well organised; it follows the rubric closely throughout.",
    "The response is partly wrong and ignores the score criteria in several places, though it is fluent.",
    "It gives a vague, unsupported answer with factual errors and does not use the reference at all.",
]


# ---------------------------------------------------------------------------------------------- workspace

def build_workspace(ws: Path, n_items: int, n_samples: int, n_eval: int) -> Store:
    store = Store.in_workspace(ws)
    t0 = time.perf_counter()
    build(store, n_items, n_samples)
    print(f"  judgments: {n_items * n_samples:,} in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    phrases = "[" + ", ".join("'" + p.replace("'", "''") + "'" for p in PHRASES) + "]"
    with connect(store.path) as con:
        con.execute("SET enable_progress_bar = false")
        # What sampling would have written: a rationale, the text with its score form, P(score = k).
        con.execute(
            f"UPDATE judgments SET rationale = 'Sample ' || sample_index || ' of item ' || item_id || ': '"
            f" || {phrases}[1 + ((item_id + sample_index) % 4)::INTEGER],"
            " p1 = CASE WHEN score IS NULL THEN 0.2 WHEN score = 1 THEN 0.6 ELSE 0.1 END,"
            " p2 = CASE WHEN score IS NULL THEN 0.2 WHEN score = 2 THEN 0.6 ELSE 0.1 END,"
            " p3 = CASE WHEN score IS NULL THEN 0.2 WHEN score = 3 THEN 0.6 ELSE 0.1 END,"
            " p4 = CASE WHEN score IS NULL THEN 0.2 WHEN score = 4 THEN 0.6 ELSE 0.1 END,"
            " p5 = CASE WHEN score IS NULL THEN 0.2 WHEN score = 5 THEN 0.6 ELSE 0.1 END"
        ).fetchall()
        con.execute("UPDATE judgments SET raw_text = rationale || coalesce(' [RESULT] ' || score, ''),"
                    " text = rationale || coalesce(' [RESULT] ' || score, '')").fetchall()
        con.execute("UPDATE items SET instruction = 'Instruction ' || source_row || ': explain how a judge should"
                    " grade this answer against the rubric.', response = 'Response ' || source_row || '.',"
                    " criteria = 'Is the answer correct and complete?' WHERE dataset = 'bench'").fetchall()
    print(f"  texts filled in {time.perf_counter() - t0:.1f} s")

    # An eval dataset judged by the seed (iteration 0) and by checkpoint 1, one greedy sample each.
    rng = np.random.default_rng(1)
    ids = rng.choice(2**60, n_eval, replace=False).astype(np.int64)
    gold = rng.integers(1, 6, n_eval)
    items = pl.DataFrame({
        "item_id": ids, "content_hash": [f"e{i}" for i in range(n_eval)], "dataset": EVAL, "split": "eval",
        "kind": "absolute", "instruction": [f"Eval instruction {i}: summarise the passage." for i in range(n_eval)],
        "response": [f"Eval response {i}." for i in range(n_eval)], "criteria": "Is the summary faithful?",
        "gold_score": gold.astype(float), "source_row": np.arange(1, n_eval + 1),
    })
    items = items.with_columns([pl.lit(None, dtype=pl.Utf8).alias(c) for c in ITEM_COLUMNS if c not in items.columns])
    store.import_items(EVAL, "absolute", items, source="synthetic", preset=None, source_rows=n_eval)
    for it, p_right in ((0, 0.3), (1, 0.5)):
        store.ensure_iteration(RUN, it, "synthetic" if it == 0 else "iter-0")
        score = np.where(rng.random(n_eval) < p_right, gold, rng.integers(1, 6, n_eval))
        rows = pl.DataFrame({
            "judgment_id": [judgment_id(RUN, it, "eval", int(i), "a", 0) for i in ids],
            "run_id": RUN, "iteration": it, "purpose": "eval", "item_id": ids, "side": "a", "sample_index": 0,
            "model": "synthetic", "temperature": 0.0,
            "rationale": [f"Iteration {it} on eval item {k}: {PHRASES[(k + it) % 4]}" for k in range(n_eval)],
            "score": score.astype(np.int32), "parse_status": "ok", "forced": False,
        }).with_columns(text=pl.col("rationale") + " [RESULT] " + pl.col("score").cast(pl.Utf8))
        rows = rows.with_columns(raw_text=pl.col("text"))
        rows = rows.with_columns([pl.lit(None).alias(c) for c in JUDGMENT_COLUMNS if c not in rows.columns])
        store.insert_judgments(rows)
        truth, pred = gold.astype(float), score.astype(float)
        store.put_metrics(RUN, it, EVAL, {
            "pearson": float(np.corrcoef(truth, pred)[0, 1]), "exact": float(np.mean(truth == pred)),
            "within1": float(np.mean(np.abs(truth - pred) <= 1)), "parse_rate": 1.0,
        })
        store.set_stage(RUN, it, "evaluate", "done")

    t0 = time.perf_counter()
    cfg = CurationConfig(strategy="gold", min_margin=1, max_pairs_per_item=2)
    report = store.run_curation(RUN, 1, "bench", lambda j, g: (lambda r: (r.pairs, r.report))(curate(j, g, cfg)))
    print(f"  curated {report['pairs']:,} pairs in {time.perf_counter() - t0:.1f} s")
    store.set_stage(RUN, 1, "sample", "done")
    store.set_stage(RUN, 1, "train", "done", checkpoint=str(ws / "runs" / RUN / "checkpoints" / "iter-1"))
    store.update_run(RUN, status="done")
    # build() records a bare config; the Launch page pre-fills its form from a full one and previews
    # curation on the run's train_dataset.
    config = RunConfig.model_validate({"model": "embedded", "train_dataset": "bench", "eval_datasets": [EVAL],
                                       "iterations": 1, "sampling": {"n": n_samples},
                                       "curation": {"min_margin": 1, "max_pairs_per_item": 2}})
    with connect(store.path) as con:
        con.execute("UPDATE runs SET config = ?, run_dir = ? WHERE run_id = ?",
                    [json.dumps(config.model_dump(mode="json")), str(ws / "runs" / RUN), RUN]).fetchall()

    # A few human decisions, so the review join and the audit log are not empty.
    ids = store.pairs(RUN, 1)["pair_id"].head(12).to_list()
    store.apply_pair_action(ids[0:3], "accept", "bench")
    store.apply_pair_action(ids[3:5], "reject", "bench")
    store.apply_pair_action(ids[5:7], "swap", "bench", note="rationale contradicts its score")
    store.apply_pair_action(ids[7], "edit", "bench", rationale="A rewritten, better rationale.", score=3)
    store.apply_pair_action(ids[8], "note", "bench", note="check the reference")
    return store


# ---------------------------------------------------------------------------------------------- timing

CALLS: list[tuple[str, str, float]] = []  # (function, arguments, seconds) of the render being measured
_DEPTH = [0]  # calls made inside a timed call (preview -> Store.run) are part of its time, not counted again


def _timed(fn):
    @functools.wraps(fn)  # keeps __module__/__qualname__: ui.state.cached resolves functions by that name
    def wrapper(*args, **kwargs):
        _DEPTH[0] += 1
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _DEPTH[0] -= 1
            if _DEPTH[0] == 0:
                shown = [a for a in args if not isinstance(a, Store)] + [f"{k}={v}" for k, v in kwargs.items()]
                CALLS.append((fn.__qualname__, ", ".join(map(str, shown))[:70], time.perf_counter() - t0))
    return wrapper


def instrument() -> None:
    """Wrap every read a page can issue (store.queries, the Store reads pages call, the curation preview)
    before the app imports them, so the render measures its own queries."""
    import engine.curation

    for name in dir(q):
        fn = getattr(q, name)
        if callable(fn) and getattr(fn, "__module__", None) == q.__name__ and not name.startswith("_") \
                and not isinstance(fn, type):
            setattr(q, name, _timed(fn))
    for name in ("datasets", "run", "runs", "iterations", "pairs", "metrics", "run_status"):
        setattr(Store, name, _timed(getattr(Store, name)))
    engine.curation.preview = _timed(engine.curation.preview)


def direct_timings(store: Store) -> list[tuple[str, float]]:
    """Each query alone, best of 3, including the costly cases a page issues only on demand."""
    f = q.JudgmentFilter
    first = q.judgments_page(store, f(RUN, iteration=1))[0]["item_id"][0]
    pair = q.pair_ids(store, RUN, 1)[0]
    cases = [
        ("runs_overview", lambda: q.runs_overview(store)),
        ("iterations_table", lambda: q.iterations_table(store, RUN)),
        ("metrics_long", lambda: q.metrics_long(store, RUN)),
        ("pair_counts", lambda: q.pair_counts(store, RUN)),
        ("judgments_page iteration=1", lambda: q.judgments_page(store, f(RUN, iteration=1))),
        ("judgments_page all, page 10000", lambda: q.judgments_page(store, f(RUN), page=10_000)),
        ("judgments_page disagree", lambda: q.judgments_page(store, f(RUN, agreement="disagree"))),
        ("judgments_page gold=3 score=1 train",
         lambda: q.judgments_page(store, f(RUN, gold=3, score=1, purpose="train"))),
        ("judgments_page dataset", lambda: q.judgments_page(store, f(RUN, dataset="bench"))),
        ("judgments_page text (25% hit)", lambda: q.judgments_page(store, f(RUN, text="factual errors"))),
        ("judgments_page text (rare)", lambda: q.judgments_page(store, f(RUN, text="Instruction 777:"))),
        ("judgment_datasets", lambda: q.judgment_datasets(store, RUN)),
        ("item_detail", lambda: q.item_detail(store, first)),
        ("item_judgments", lambda: q.item_judgments(store, RUN, first)),
        ("score_histogram", lambda: q.score_histogram(store, RUN)),
        ("confusion", lambda: q.confusion(store, RUN, 1)),
        ("pairs_page", lambda: q.pairs_page(store, RUN, 1)),
        ("pairs_page page 5000", lambda: q.pairs_page(store, RUN, 1, page=5000)),
        ("pair_ids (all ~200k)", lambda: q.pair_ids(store, RUN, 1)),
        ("audit_history", lambda: q.audit_history(store, RUN, pair_id=pair)),
        ("compare_iterations", lambda: q.compare_iterations(store, RUN, 0, 1)),
        ("compare_iterations train 1 vs 1 (1M)", lambda: q.compare_iterations(store, RUN, 1, 1, "train")),
        ("compare_summary train 1 vs 1 (1M)", lambda: q.compare_summary(store, RUN, 1, 1, "train")),
        ("compare_summary", lambda: q.compare_summary(store, RUN, 0, 1)),
        ("drift_histogram", lambda: q.drift_histogram(store, RUN, 0, 1)),
        ("metric_deltas", lambda: q.metric_deltas(store, RUN, 0, 1)),
    ]
    out = []
    for name, call in cases:
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            call()
            best = min(best, time.perf_counter() - t0)
        out.append((name, best))
    return out


def app_pages() -> dict[str, str]:
    """{name: path relative to ui/app.py} of the pages app.py declares with st.Page("...")."""
    found = re.findall(r"""st\.Page\(\s*["']([^"']+\.py)["']""", (ROOT / "ui" / "app.py").read_text())
    if not found:
        raise SystemExit("ui/app.py declares no st.Page(...) files")
    return {Path(p).stem: p for p in found}


def render_pages(ws: Path) -> tuple[dict, list[str]]:
    """Per page: its cold render (st.cache_data cleared) and the queries it issued, then a warm rerun."""
    os.environ["SELFRAT_HOME"] = str(ws)
    import streamlit as st
    import streamlit.logger
    from streamlit.testing.v1 import AppTest

    streamlit.logger.set_log_level("error")  # "missing ScriptRunContext" while AppTest sets up (bare mode)
    at = AppTest.from_file(str(ROOT / "ui" / "app.py"), default_timeout=60)
    at.session_state["who"] = "bench"
    at.run()
    pages = app_pages()
    for path in pages.values():  # warm-up: imports (plotly, pydantic) are paid once per app process, untimed
        at.switch_page(path).run()
    results, errors = {}, []

    def measure(name: str, step) -> None:
        # AppTest runs without a server runtime, and Streamlit warns about it on each cache clear; an app
        # run resets the log level, so it is lowered here each time.
        streamlit.logger.set_log_level("error")
        st.cache_data.clear()
        CALLS.clear()
        t0 = time.perf_counter()
        step()
        render = time.perf_counter() - t0
        calls = list(CALLS)
        t0 = time.perf_counter()
        at.run()  # the same page again, now from the cache
        warm = time.perf_counter() - t0
        errors.extend(f"{name}: {e.message}" for e in at.exception)
        results[name] = {"query_s": round(sum(s for _, _, s in calls), 3), "render_s": round(render, 3),
                         "warm_s": round(warm, 3), "calls": calls}

    for page, path in pages.items():
        measure(page, lambda path=path: at.switch_page(path).run())
    if "judgments" in pages:  # the heaviest filter a user can type: text over every rationale of the iteration
        at.switch_page(pages["judgments"]).run()
        measure("judgments+text", lambda: at.text_input(key="j_text").set_value("factual errors").run())
    return results, errors


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=100_000)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--eval-items", type=int, default=5_000)
    ap.add_argument("--workspace", type=Path, default=None,
                    help="kept, and reused when it already holds a workspace (default: a temporary one, removed)")
    ap.add_argument("--queries-only", action="store_true", help="skip the AppTest renders")
    args = ap.parse_args()
    ws = args.workspace or Path(tempfile.mkdtemp(prefix="selfrat-app-bench-"))
    if (ws / "selfrat.duckdb").exists():
        store = Store.in_workspace(ws)
        print(f"reusing {ws}")
    else:
        print(f"building {ws}")
        t0 = time.perf_counter()
        store = build_workspace(ws, args.items, args.samples, args.eval_items)
        print(f"  built in {time.perf_counter() - t0:.1f} s")
    print(f"load average (1 min): {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    n_judgments = int(store._read("SELECT count(*) AS n FROM judgments WHERE purpose = 'train'")["n"][0])
    n_eval = int(store._read("SELECT count(*) AS n FROM judgments WHERE purpose = 'eval'")["n"][0])

    print("\nqueries alone (best of 3, ms):")
    for name, s in direct_timings(store):
        print(f"  {name:40s} {s * 1000:8.1f}{'' if s <= 0.3 else '   > 300 ms'}")

    if args.queries_only:
        if args.workspace is None:
            shutil.rmtree(ws, ignore_errors=True)
        return
    instrument()
    results, errors = render_pages(ws)
    print("\nqueries each page issued (cold cache, ms):")
    for page, r in results.items():
        for fn, shown, s in r["calls"]:
            print(f"  {page:15s} {fn:22s} {s * 1000:8.1f}  ({shown})")
    print(f"\n{'page':16s} {'queries':>7s} {'query_s':>8s} {'render_s':>9s} {'warm_s':>7s}")
    for page, r in results.items():
        print(f"{page:16s} {len(r['calls']):7d} {r['query_s']:8.3f} {r['render_s']:9.3f} {r['warm_s']:7.3f}")
    for e in errors:
        print(f"ERROR {e}")
    out = {"pages": {p: {"query_s": r["query_s"], "render_s": r["render_s"]} for p, r in results.items()},
           "judgments": n_judgments, "eval_judgments": n_eval,
           "max_render_s": max(r["render_s"] for r in results.values()),
           "loadavg_1m": round(os.getloadavg()[0], 2)}  # the 2 cores are shared: read timings against it
    if errors:
        out["errors"] = errors
    if args.workspace is None:  # a temporary workspace is ~300 MB: keep one only when asked for it
        shutil.rmtree(ws, ignore_errors=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
