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


def demo_config(items: int = 32, n: int = 4, max_new_tokens: int = 96) -> dict:
    return {
        "model": "embedded",
        "train_dataset": DEMO_DATASET,
        "eval_datasets": [DEMO_DATASET],
        "iterations": 1,
        "max_train_items": items,
        "sampling": {"n": n, "temperature": 1.0, "top_p": 0.9, "max_new_tokens": max_new_tokens, "batch_size": 8},
        # One pair per item: a DPO step on 4 judge-length pairs costs ~65 s on 2 CPU cores.
        "curation": {"strategy": "gold", "min_margin": 1, "max_pairs_per_item": 1},
        "training": {"beta": 0.1, "learning_rate": 1e-5, "epochs": 1, "batch_size": 4, "max_length": 768},
        "evaluation": {"n": 1, "temperature": 0.0, "max_new_tokens": 64},
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


def run_demo(ws: Workspace, *, items: int = 32, n: int = 4, max_new_tokens: int = 96, run_id: str | None = None,
             echo: Callable[[str], None] = print) -> dict:
    from engine.iteration import Runner, create_run

    ensure_demo_dataset(ws)
    cfg = parse_run_config(demo_config(items, n, max_new_tokens), "demo config")
    rid = create_run(ws, cfg, run_id or ws.new_run_id("demo"))
    echo(f"demo run {rid}: {items} training items x {n} judgments, 1 iteration, embedded SmolLM2-135M-Instruct")
    status = Runner(ws, rid).run_all()
    echo(before_after_table(status))
    return status


def before_after_table(status: dict) -> str:
    iters = status["iterations"]
    lines = [f"{'dataset':<10} {'metric':<20} " + " ".join(f"{'iter ' + str(it['index']):>9}" for it in iters)]
    datasets = sorted({d for it in iters for d in it["metrics"]})
    for d in datasets:
        for m in [m for m in HEADLINE_METRICS if any(m in it["metrics"].get(d, {}) for it in iters)]:
            vals = [it["metrics"].get(d, {}).get(m) for it in iters]
            cells = " ".join(f"{'nan' if v is None or v != v else f'{v:.3f}':>9}" for v in vals)
            lines.append(f"{d:<10} {m:<20} {cells}")
    counts = {
        "train judgments": [it["train_judgments"] for it in iters],
        "pairs": [sum(it["pairs"].values()) for it in iters],
        "eval judgments": [it["eval_judgments"] for it in iters],
    }
    for label, vals in counts.items():
        lines.append(f"{'':<10} {label:<20} " + " ".join(f"{v:>9}" for v in vals))
    return "\n".join(lines)
