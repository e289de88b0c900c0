"""`selfrat demo`: the shipped demo dataset and one self-rationalization iteration on the embedded judge.

The demo dataset (engine/data/demo.jsonl) was written for this project: graded responses to instructions
under six rubrics, every instruction answered at each score 1-5, split by instruction into train and eval.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Callable

from engine.config import parse_run_config
from engine.metrics import HEADLINE_METRICS
from engine.workspace import Workspace

DEMO_DATASET = "demo"


def demo_data_path() -> str:
    return str(importlib.resources.files("engine") / "data" / "demo.jsonl")


def ensure_demo_dataset(ws: Workspace) -> None:
    """Import the demo dataset unless it is there already (a re-import would be a no-op anyway)."""
    from engine.importers import import_file

    store = ws.store()
    if DEMO_DATASET in store.datasets()["name"].to_list():
        return
    import_file(store, demo_data_path(), dataset=DEMO_DATASET)


def demo_config(items: int = 32, n: int = 4, max_new_tokens: int = 96, sft_items: int = 48) -> dict:
    """The demo run: a seed SFT on the demo's gold rationales (J_SFT), then one iteration, evaluated on the eval
    split beside the raw model (baseline `raw`). The raw 135M model rarely closes a judgment with
    "[RESULT] n" itself (every score is forced, and nothing moves); after the SFT it does."""
    return {
        "model": "embedded",
        "train_dataset": DEMO_DATASET,
        "eval_datasets": [DEMO_DATASET],
        "iterations": 1,
        "max_train_items": items,
        # Gold feedback here is one sentence (~25 tokens): a short, high-rate SFT teaches the format.
        "sft": {"dataset": DEMO_DATASET, "max_items": sft_items, "epochs": 1, "learning_rate": 2e-4,
                "batch_size": 4, "max_length": 1024},
        "sampling": {"n": n, "temperature": 1.0, "top_p": 0.9, "max_new_tokens": max_new_tokens, "batch_size": 8},
        "curation": {"strategy": "gold", "min_margin": 1, "max_pairs_per_item": 1},
        "training": {"beta": 0.1, "learning_rate": 1e-5, "epochs": 1, "batch_size": 4, "max_length": 768},
        "evaluation": {"n": 1, "temperature": 0.0, "max_new_tokens": 96, "baselines": ["raw"]},
    }


def prepare_demo(ws: Workspace, echo: Callable[[str], None] = print) -> str:
    """Everything the demo needs before its first launch: the dataset and the embedded checkpoint (built
    once, ~30 s), so the app's Launch page starts sampling at once. Returns the checkpoint path."""
    from engine.models import EMBEDDED, resolve_model  # torch: only here, demo_config() stays light

    ensure_demo_dataset(ws)
    echo(f"demo dataset {DEMO_DATASET!r} ready in {ws.root}")
    path = resolve_model(EMBEDDED, ws.root)
    echo(f"embedded judge ready: {path}")
    return path


def run_demo(ws: Workspace, *, items: int = 32, n: int = 4, max_new_tokens: int = 96, sft_items: int = 48,
             run_id: str | None = None, echo: Callable[[str], None] = print) -> dict:
    from engine.iteration import Runner, create_run

    ensure_demo_dataset(ws)
    cfg = parse_run_config(demo_config(items, n, max_new_tokens, sft_items), "demo config")
    rid = create_run(ws, cfg, run_id or ws.new_run_id("demo"))
    echo(f"demo run {rid}: seed SFT on {sft_items} gold rationales, then {items} training items x {n} judgments, "
         "1 iteration, embedded SmolLM2-135M-Instruct")
    status = Runner(ws, rid).run_all()
    echo(before_after_table(status))
    return status


def judge_columns(status: dict) -> list[tuple[str, int, str]]:
    """(label, iteration, metric prefix) of each judge in a run, in order: the raw model when the run
    evaluated it (baseline `raw`), the initial judge (J_SFT after a seed SFT), then each iteration."""
    iters = status["iterations"]
    has_sft = bool(iters) and iters[0]["stages"]["train"] == "done"  # iteration 0 trained: a seed SFT
    cols = []
    if iters and any(m.startswith("raw/") for d in iters[0]["metrics"].values() for m in d):
        cols.append(("raw", 0, "raw/"))
    for it in iters:
        label = ("J_SFT" if has_sft else "initial") if it["index"] == 0 else f"iter {it['index']}"
        cols.append((label, it["index"], ""))
    return cols


def side_by_side(status: dict, metrics=HEADLINE_METRICS) -> list[dict]:
    """One row per (dataset, metric) that some judge has: {"dataset", "metric", <judge label>: value or None},
    judges as `judge_columns` orders them (the CLI's before/after table and the app's Overview)."""
    iters = {it["index"]: it for it in status["iterations"]}
    cols = judge_columns(status)
    rows = []
    for d in sorted({d for it in iters.values() for d in it["metrics"]}):
        for m in metrics:
            vals = {label: iters[k]["metrics"].get(d, {}).get(prefix + m) for label, k, prefix in cols}
            if any(v is not None for v in vals.values()):
                rows.append({"dataset": d, "metric": m, **vals})
    return rows


def before_after_table(status: dict) -> str:
    iters = {it["index"]: it for it in status["iterations"]}
    cols = judge_columns(status)
    lines = [f"{'dataset':<10} {'metric':<20} " + " ".join(f"{label:>9}" for label, _, _ in cols)]
    for row in side_by_side(status):
        cells = " ".join(f"{'nan' if v is None or v != v else f'{v:.3f}':>9}"
                         for v in (row[label] for label, _, _ in cols))
        lines.append(f"{row['dataset']:<10} {row['metric']:<20} {cells}")
    counts = {
        "train judgments": lambda k, p: "" if p else iters[k]["train_judgments"],
        "pairs": lambda k, p: "" if p else sum(iters[k]["pairs"].values()),
        "eval judgments": lambda k, p: "" if p else iters[k]["eval_judgments"],
    }
    for label, get in counts.items():
        lines.append(f"{'':<10} {label:<20} " + " ".join(f"{get(k, p)!s:>9}" for _, k, p in cols))
    return "\n".join(lines)
