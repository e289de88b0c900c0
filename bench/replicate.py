"""The paper's experiment at CPU scale: seed SFT -> 2 self-rationalization iterations, against baselines.

    python bench/replicate.py [--workspace DIR] [--out DIR] [--sft-items 32] [--items-per-iteration 16] ...

On the embedded SmolLM2-135M-Instruct: SFT on gold CIA feedback (scored_responses_testset_remaining.tsv,
train split) gives J_SFT; two iterations of sample -> curate (gold) -> DPO follow, each on fresh items. The
seed, iteration 1 and iteration 2 are evaluated on held-out CIA (scored_responses_testset_biggen.tsv) and
RewardBench Chat / Chat_Hard (each side scored, and A/B in both orders), beside the baselines on the
seed: self-consistency (mean and majority of N), best-of-N (meta-judge), and single-stage DPO (one
iteration on the data of both at once). Everything runs through the same engine as `selfrat run`, in a
workspace that a rerun resumes. Writes `replicate.md` (the table) and `replicate.html` (Plotly) to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.config import parse_run_config  # noqa: E402
from engine.importers import import_file  # noqa: E402
from engine.iteration import Runner, create_run, run_single_stage  # noqa: E402
from engine.workspace import Workspace  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
RUN_ID = "replicate"
# name -> (file, preset, split)
DATASETS = {
    "cia-train": ("cia/scored_responses_testset_remaining.tsv", "cia", "train"),
    "cia-heldout": ("cia/scored_responses_testset_biggen.tsv", "cia", "eval"),
    "rb-chat": ("rewardbench/Chat.jsonl", None, "eval"),
    "rb-chat-hard": ("rewardbench/Chat_Hard.jsonl", None, "eval"),
}


def import_data(ws: Workspace, data: Path) -> None:
    store = ws.store()
    have = set(store.datasets()["name"].to_list())
    for name, (file, preset, split) in DATASETS.items():
        if name in have:
            continue
        # CIA grades one response text at several scores in a few prompts: ambiguous gold, dropped.
        r = import_file(store, str(data / file), dataset=name, preset=preset, split=split, skip_invalid=True,
                        on_conflict="drop")
        print(f"imported {name}: {r['inserted']} items ({r['skipped']} rows skipped, {r['conflict_dropped']}"
              " conflicting items dropped)")


def config(a: argparse.Namespace) -> dict:
    return {
        "model": "embedded",
        "sft": {"dataset": "cia-train", "max_items": a.sft_items, "epochs": a.sft_epochs,
                "learning_rate": a.sft_lr, "batch_size": 4, "max_length": a.max_length},
        "train_dataset": "cia-train",
        "train_items_per_iteration": a.items_per_iteration,
        "eval_datasets": ["cia-heldout", "rb-chat", "rb-chat-hard"],
        "max_eval_items": a.eval_items,
        "iterations": 2,
        "sampling": {"n": a.n, "temperature": 1.0, "top_p": 0.9, "max_new_tokens": a.max_new_tokens,
                     "batch_size": 8, "force_score": True},
        # meta_max_new_tokens: the best-of-N meta-judge writes a short note, then its rating.
        "curation": {"strategy": "gold", "min_margin": a.min_margin, "max_pairs_per_item": a.pairs_per_item,
                     "meta_max_new_tokens": 16},
        # 2 pairs x 2 accumulation steps: 4 pairs of ~1,700-token judgments at once need >20 GB on CPU
        # (full-vocabulary logits over the prompt too); 2 at a time stay under ~10 GB.
        "training": {"beta": 0.1, "learning_rate": a.dpo_lr, "epochs": 1, "batch_size": 2,
                     "gradient_accumulation_steps": 2, "max_length": a.max_length, "reference": "previous"},
        "evaluation": {"n": 1, "temperature": 0.0, "max_new_tokens": a.eval_new_tokens,
                       "pairwise_modes": ["absolute", "relative"] if a.relative else ["absolute"],
                       "baselines": ["self-consistency", "best-of-n"],
                       "baseline_n": a.baseline_n, "bootstrap": 1000},
    }


# Rows of the table: (label, iteration of the run, metric prefix).
JUDGES = [
    ("response length alone (baseline)", 0, "length-baseline/"),
    ("J_SFT (seed, greedy)", 0, ""),
    ("J_SFT, expected score (G-Eval)", 0, "expected/"),
    ("self-consistency, mean of N", 0, "self-consistency-mean/"),
    ("self-consistency, majority of N", 0, "self-consistency-majority/"),
    ("best-of-N (meta-judge)", 0, "best-of-n/"),
    ("single-stage DPO", 0, "single-stage-dpo/"),
    ("iteration 1", 1, ""),
    ("iteration 2", 2, ""),
]
COLUMNS = [
    ("CIA held-out Pearson [95% CI]", "cia-heldout", "pearson"),
    ("partial r given length", "cia-heldout", "partial_pearson"),
    ("Spearman", "cia-heldout", "spearman"),
    ("Kendall", "cia-heldout", "kendall"),
    ("exact", "cia-heldout", "exact"),
    ("within-1", "cia-heldout", "within1"),
    ("RB Chat (abs)", "rb-chat", "accuracy"),
    ("RB Chat (A/B)", "rb-chat", "relative/accuracy"),
    ("RB Chat_Hard (abs)", "rb-chat-hard", "accuracy"),
    ("RB Chat_Hard (A/B)", "rb-chat-hard", "relative/accuracy"),
    ("CIA parse failures", "cia-heldout", "parse_failure_rate"),
]


def _fmt(v: float | None) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def table(status: dict) -> tuple[str, list[dict]]:
    its = {it["index"]: it["metrics"] for it in status["iterations"]}
    rows, records = [], []
    for label, k, prefix in JUDGES:
        metrics = its.get(k, {})
        cells, rec = [], {"judge": label}
        for _header, dataset, metric in COLUMNS:
            name = prefix + metric  # baselines without A/B figures show a dash there
            m = metrics.get(dataset, {})
            v = m.get(name)
            rec[f"{dataset}:{metric}"] = v
            cell = _fmt(v)
            if metric == "pearson" and not math.isnan(m.get(name + "_lo") or math.nan):
                cell += f" [{_fmt(m.get(name + '_lo'))}, {_fmt(m.get(name + '_hi'))}]"
            cells.append(cell)
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
        records.append(rec)
    head = "| judge | " + " | ".join(h for h, _, _ in COLUMNS) + " |"
    sep = "|---" * (len(COLUMNS) + 1) + "|"
    return "\n".join([head, sep, *rows]), records


def figure(records: list[dict], path: Path) -> None:
    import plotly.graph_objects as go

    fig = go.Figure()
    for key, title in [("cia-heldout:pearson", "CIA held-out Pearson"), ("rb-chat:accuracy", "RB Chat accuracy"),
                       ("rb-chat-hard:accuracy", "RB Chat_Hard accuracy")]:
        fig.add_bar(name=title, x=[r["judge"] for r in records],
                    y=[r.get(key) if r.get(key) is not None else float("nan") for r in records])
    fig.update_layout(barmode="group", title="Self-rationalization at CPU scale (SmolLM2-135M)",
                      yaxis_title="value", template="plotly_white")
    fig.write_html(path, include_plotlyjs=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workspace", type=Path, default=ROOT / "bench" / "results" / "replicate-ws")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--data", type=Path, default=DATA)
    # Defaults sized for ~1.5 h on 2 CPU cores: CIA prompts are ~1,500 tokens (the reference answer is a
    # full response), so one SFT example costs ~25 s of forward+backward and one DPO pair ~60 s.
    p.add_argument("--sft-items", type=int, default=16)
    p.add_argument("--sft-epochs", type=float, default=2.0)
    p.add_argument("--sft-lr", type=float, default=1e-4)
    p.add_argument("--items-per-iteration", type=int, default=8)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--pairs-per-item", type=int, default=1)
    p.add_argument("--min-margin", type=int, default=1)
    p.add_argument("--dpo-lr", type=float, default=1e-5)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--eval-items", type=int, default=12)
    p.add_argument("--eval-new-tokens", type=int, default=96)
    p.add_argument("--baseline-n", type=int, default=3)
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--relative", action="store_true", help="Also judge RewardBench A/B in both orders (~2x eval).")
    p.add_argument("--refresh", action="store_true",
                   help="Recompute every figure from the stored judgments (after a change to the metrics; "
                        "nothing is generated again), then write the table.")
    a = p.parse_args()

    t0 = time.time()
    ws = Workspace.open(a.workspace)
    import_data(ws, a.data)
    store = ws.store()
    if RUN_ID not in store.runs()["run_id"].to_list():
        create_run(ws, parse_run_config(config(a), "replicate"), RUN_ID)
    Runner(ws, RUN_ID).run_all()
    t_loop = time.time() - t0
    run_single_stage(ws, RUN_ID)  # also recorded as the parent's 'single-stage-dpo/<metric>'
    if a.refresh:  # every judgment and meta rating is stored, so evaluating again only recomputes figures
        for rid in (RUN_ID, f"{RUN_ID}-single-stage"):
            runner = Runner(ws, rid)
            for it in store.run_status(rid)["iterations"]:
                if it["metrics"]:  # evaluated before (the single-stage child skips its seed)
                    runner.evaluate_datasets(it["index"], runner.cfg.eval_datasets)
        run_single_stage(ws, RUN_ID)  # copies the child's refreshed figures into the parent
    elapsed = time.time() - t0

    status = store.run_status(RUN_ID)
    md, records = table(status)
    its = {it["index"]: it for it in status["iterations"]}
    sizes = (f"SFT: {a.sft_items} CIA items x {a.sft_epochs:g} epochs (lr {a.sft_lr:g}); iterations: 2 x "
             f"{a.items_per_iteration} fresh items x {a.n} judgments, gold curation (margin {a.min_margin}, "
             f"{a.pairs_per_item} pair/item), DPO lr {a.dpo_lr:g}; eval: first {a.eval_items} items per set, "
             f"greedy, {a.eval_new_tokens} tokens{', plus A/B in both orders' if a.relative else ''}; "
             f"baselines N = {a.baseline_n}")
    pairs = ", ".join(f"iteration {k}: {sum(its[k]['pairs'].values())} pairs" for k in (1, 2) if k in its)
    text = (f"# Replication at CPU scale\n\n{sizes}.\n\n{pairs}. Loop {t_loop / 60:.1f} min, all "
            f"{elapsed / 60:.1f} min.\n\n{md}\n")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "replicate.md").write_text(text)
    (a.out / "replicate.json").write_text(json.dumps(status, default=str))
    figure(records, a.out / "replicate.html")
    print(text)


if __name__ == "__main__":
    main()
