"""DPO vs GRPO from the same J_SFT, at equal wall-clock budget, on the same items (tracker issue 14).

    python bench/dpo_vs_grpo.py            # the experiment: ~25 min on 2 CPU cores
    python bench/dpo_vs_grpo.py --quick    # a smoke run of the same code path (~5-10 min): numbers mean nothing

On the embedded judge (SmolLM2-135M-Instruct), everything through the engine `selfrat run` uses, in a workspace
that a rerun resumes (stage by stage; the budget measured once is kept in the store):

1. **J_SFT** (run `sft`): SFT on the gold feedback of the first --sft-items CIA items
   (scored_responses_testset_remaining.tsv, dataset `cia-train`), evaluated as its iteration 0 on held-out CIA
   (scored_responses_testset_biggen.tsv, `cia-heldout`; --rewardbench adds RewardBench Chat_Hard).
2. **DPO** (run `dpo`): one iteration from J_SFT on the first --items items of `cia-rl` (the same CIA file
   imported again: item ids hash the dataset name, so its first items are another sample of CIA prompts than
   the SFT's; the overlap by content is reported): sample --n judgments per item, curate (gold), DPO. The wall
   clock of those three stages is the **budget**.
3. **GRPO** (run `grpo`): from the same J_SFT on the same items, `training.grpo.max_time_s` = the budget (it
   stops after the step that ends past it).
4. Both evaluated greedily on the same held-out items; engine.compare's paired bootstrap: GRPO - DPO, and each
   against J_SFT.

Prints one JSON line (strict: NaN as null) and writes `dpo_vs_grpo.md` to --out (default bench/results).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.config import parse_run_config  # noqa: E402
from engine.importers import import_file  # noqa: E402
from engine.iteration import Runner, create_run  # noqa: E402
from engine.workspace import Workspace  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
# name -> (file under --data, preset, split)
DATASETS = {
    "cia-train": ("cia/scored_responses_testset_remaining.tsv", "cia", "train"),
    "cia-rl": ("cia/scored_responses_testset_remaining.tsv", "cia", "train"),
    "cia-heldout": ("cia/scored_responses_testset_biggen.tsv", "cia", "eval"),
    "rb-chat-hard": ("rewardbench/Chat_Hard.jsonl", None, "eval"),
}
FIGURES = ("pearson", "spearman", "kendall", "exact", "within1", "accuracy", "parse_failure_rate")
# The experiment / --quick. Full: what bench/results/dpo_vs_grpo.md ran, 24 min on 2 cores (SFT ~12 min, three
# evaluations of 30 items ~2-4 min each, DPO ~2 min = the budget, GRPO the same). A J_SFT that parses needs ~48 items
# at lr 2e-4, and CIA's 150-250-token feedbacks need a 256-token budget: at 8 items and 128 tokens every judgment was
# cut before its score, so every GRPO reward was 0. Quick: a smoke run of the code path.
SIZES = {
    "sft_items": (48, 2), "sft_epochs": (1.0, 1.0), "items": (8, 2), "n": (4, 4), "max_new_tokens": (256, 24),
    "generations": (4, 2), "prompts_per_step": (1, 1), "eval_items": (30, 3), "eval_new_tokens": (256, 24),
    "bootstrap": (1000, 200),
}


def import_data(ws: Workspace, data: Path, names: list[str]) -> None:
    store = ws.store()
    have = set(store.datasets()["name"].to_list())
    for name in names:
        if name in have:
            continue
        file, preset, split = DATASETS[name]
        # CIA grades one response text at several scores in a few prompts: ambiguous gold, dropped.
        r = import_file(store, str(data / file), dataset=name, preset=preset, split=split, skip_invalid=True,
                        on_conflict="drop")
        print(f"imported {name}: {r['inserted']} items", file=sys.stderr)


def base_config(a: argparse.Namespace, model: str) -> dict:
    return {
        "model": model,
        "train_dataset": "cia-rl",
        "max_train_items": a.items,
        "eval_datasets": a.eval_sets,
        "max_eval_items": a.eval_items,
        "evaluate_initial": False,  # J_SFT is evaluated once, in the sft run
        "iterations": 1,
        "sampling": {"n": a.n, "temperature": 1.0, "top_p": 0.9, "max_new_tokens": a.max_new_tokens,
                     "batch_size": 8, "force_score": True},
        "curation": {"strategy": "gold", "min_margin": 1, "max_pairs_per_item": a.pairs_per_item},
        "evaluation": {"n": 1, "temperature": 0.0, "max_new_tokens": a.eval_new_tokens, "bootstrap": a.bootstrap},
    }


def sft_config(a: argparse.Namespace) -> dict:
    return {**base_config(a, "embedded"), "train_dataset": "cia-train", "iterations": 0, "evaluate_initial": True,
            "max_train_items": None,
            "sft": {"dataset": "cia-train", "max_items": a.sft_items, "epochs": a.sft_epochs,
                    "learning_rate": a.sft_lr, "batch_size": 4, "max_length": a.max_length}}


def dpo_config(a: argparse.Namespace, jsft: str) -> dict:
    return {**base_config(a, jsft), "training": {
        "method": "dpo", "beta": 0.1, "learning_rate": a.lr, "epochs": 1, "batch_size": 2,
        "max_length": a.max_length}}


def grpo_config(a: argparse.Namespace, jsft: str, budget_s: float) -> dict:
    return {**base_config(a, jsft), "training": {
        "method": "grpo", "learning_rate": a.lr, "max_length": a.max_length,
        "grpo": {"num_generations": a.generations, "prompts_per_step": a.prompts_per_step,
                 "max_completion_length": a.max_new_tokens, "temperature": 1.0, "top_p": 0.9, "beta": 0.0,
                 "max_steps": 10_000, "max_time_s": max(budget_s, 1.0)}}}


def ensure_run(ws: Workspace, run_id: str, cfg: dict) -> None:
    if run_id not in ws.store().runs()["run_id"].to_list():
        create_run(ws, parse_run_config(cfg, run_id), run_id)


def timed_stages(ws: Workspace, run_id: str, stages: tuple[str, ...]) -> dict[str, float]:
    """Run iteration 1 of `run_id` stage by stage (then evaluate it); the wall clock of each stage in `stages`
    that ran now, else the one stored by an earlier call (a rerun resumes: done stages take no time)."""
    store = ws.store()
    stored = store.run_reports(run_id).get("bench_timing", {})
    if store.run(run_id)["status"] == "done":  # a rerun: nothing to do, the times measured when it ran
        return {s: float(stored.get(s, 0.0)) for s in stages}
    r = Runner(ws, run_id, echo=False)
    store.update_run(run_id, status="running")
    with r.handling_signals():
        r.evaluate(0)  # marks iteration 0's stages (J_SFT is evaluated in the sft run)
        for stage in ("sample", "curate", "train"):
            t0 = time.monotonic()
            was = _status(store, run_id, stage)
            getattr(r, stage)(1)
            if stage in stages and was not in ("done", "skipped"):
                stored[stage] = time.monotonic() - t0
                store.put_run_report(run_id, "bench_timing", stored)
        r.evaluate(1)
    store.update_run(run_id, status="done")
    return {s: float(stored.get(s, 0.0)) for s in stages}


def _status(store, run_id: str, stage: str) -> str | None:
    try:
        return store.iteration(run_id, 1)[f"{stage}_status"]
    except Exception:  # no iteration row yet
        return None


def finite(v):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def headline(metrics: dict) -> dict:
    return {f"{d}:{m}": finite(ms.get(m)) for d, ms in metrics.items() for m in FIGURES if m in ms}


def overlap(ws: Workspace, sft_items: int, items: int) -> int:
    """Items of the RL slice whose content (without gold) is also among the SFT items."""
    store = ws.store()
    sft = set(store.items("cia-train").head(sft_items)["content_key"].to_list())
    rl = store.items("cia-rl").head(items)["content_key"].to_list()
    return sum(k in sft for k in rl if k is not None)


def paired(store, a: str, b: str, dataset: str, bootstrap: int) -> dict:
    try:
        from engine.compare import compare_judges
    except ImportError:  # no paired module: the figures side by side only
        return {}
    try:
        result = compare_judges(store, a, b, dataset, bootstrap=bootstrap, seed=0)
    except Exception as e:  # e.g. no item judged by both
        return {"error": str(e)}
    return {m: {k: finite(v) for k, v in f.items()} for m, f in result["metrics"].items()}


def _fmt(v) -> str:
    return "–" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def markdown(a, out: dict) -> str:
    cols = [c for c in out["j_sft"]["metrics"] if not c.endswith("parse_failure_rate")] + \
        [c for c in out["j_sft"]["metrics"] if c.endswith("parse_failure_rate")]
    rows = ["| judge | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for label, key in (("J_SFT (start of both)", "j_sft"), ("DPO, 1 iteration", "dpo"), ("GRPO, same budget", "grpo")):
        rows.append(f"| {label} | " + " | ".join(_fmt(out[key]["metrics"].get(c)) for c in cols) + " |")
    lines = []
    for name, figures in out["paired"].items():
        if not figures or "error" in figures:
            lines.append(f"- {name}: {figures.get('error', 'engine.compare not available') if figures else '–'}")
            continue
        parts = [f"{m} {_fmt(f.get('delta'))} [{_fmt(f.get('lo'))}, {_fmt(f.get('hi'))}] p={_fmt(f.get('p'))}"
                 for m, f in figures.items()]
        lines.append(f"- {name} (B - A, 95% paired bootstrap interval): " + "; ".join(parts))
    d, g = out["dpo"], out["grpo"]
    head = ("# DPO vs GRPO at equal wall clock (CPU scale)\n\n"
            + ("**Quick smoke run (`--quick`): tiny sizes that only show the code path works end to end; the "
               "figures mean nothing.** The experiment: `python bench/dpo_vs_grpo.py`.\n\n" if a.quick else ""))
    return (
        head
        + f"From one J_SFT (SmolLM2-135M-Instruct, SFT on {a.sft_items} CIA items x {a.sft_epochs:g} epoch(s)), on the "
        f"same {a.items} CIA train items ({out['overlap_with_sft']} of them also among the SFT items by content), "
        f"evaluated greedily on the first {a.eval_items} items of {', '.join(a.eval_sets)} "
        f"({a.eval_new_tokens} tokens, forced scores allowed).\n\n"
        f"- **DPO**: sample {a.n} judgments x {a.max_new_tokens} tokens per item, gold curation (margin 1, "
        f"{a.pairs_per_item} pair/item) -> {d['pairs']} pairs, DPO lr {a.lr:g}: {d['wall_s']:.0f} s "
        f"(sample {d['stages_s']['sample']:.0f} s, curate {d['stages_s']['curate']:.0f} s, train "
        f"{d['stages_s']['train']:.0f} s). This is the budget.\n"
        f"- **GRPO**: {a.generations} rollouts x {a.max_new_tokens} tokens for {a.prompts_per_step} prompt(s) per "
        f"step, rewards score 1.0 + format 0.2, lr {a.lr:g}, beta 0, max_time_s {out['budget_s']:.0f}: "
        f"{g['steps']} steps, {g['rollouts']} rollouts in {g['wall_s']:.0f} s; mean rollout reward "
        f"{_fmt(g['reward_first'])} at the first step, {_fmt(g['reward_last'])} at the last "
        f"(mean {_fmt(g['mean_reward'])}).\n\n"
        + "\n".join(rows) + "\n\n**Paired comparisons** (engine.compare, on the items both judged):\n\n"
        + "\n".join(lines)
        + f"\n\nThe experiment took {out['experiment_s'] / 60:.1f} min (the sft run's creation to the grpo run's "
        "end; a rerun resumes where the stored stages end, and only reports once all are done); "
        f"1-minute load average at the end "
        f"{out['load_average']:.1f} on {out['cpus']} CPUs. Command: `python bench/dpo_vs_grpo.py"
        + "".join(" " + shlex.quote(x) for x in sys.argv[1:]) + "`.\n"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="Tiny sizes: a smoke run of the code path (~5-10 min).")
    p.add_argument("--workspace", type=Path, default=None,
                   help="Default bench/results/dpo-vs-grpo-ws (dpo-vs-grpo-quick-ws with --quick).")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--data", type=Path, default=DATA)
    for name, (full, _quick) in SIZES.items():
        p.add_argument(f"--{name.replace('_', '-')}", type=type(full), default=None, help=f"default {full}")
    p.add_argument("--pairs-per-item", type=int, default=2)
    p.add_argument("--sft-lr", type=float, default=2e-4)
    p.add_argument("--lr", type=float, default=1e-5, help="DPO and GRPO learning rate.")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--rewardbench", action="store_true", help="Also evaluate on RewardBench Chat_Hard (each side).")
    a = p.parse_args()
    for name, (full, quick) in SIZES.items():
        if getattr(a, name) is None:
            setattr(a, name, quick if a.quick else full)
    a.eval_sets = ["cia-heldout"] + (["rb-chat-hard"] if a.rewardbench else [])
    workspace = a.workspace or ROOT / "bench" / "results" / ("dpo-vs-grpo-quick-ws" if a.quick else "dpo-vs-grpo-ws")

    t0 = time.monotonic()
    ws = Workspace.open(workspace)
    import_data(ws, a.data, ["cia-train", "cia-rl", *a.eval_sets])
    store = ws.store()

    ensure_run(ws, "sft", sft_config(a))
    if store.run("sft")["status"] != "done":
        Runner(ws, "sft", echo=False).run_all()  # J_SFT, evaluated as iteration 0
    jsft = Runner(ws, "sft", echo=False).initial_model()

    ensure_run(ws, "dpo", dpo_config(a, jsft))
    dpo_stages = timed_stages(ws, "dpo", ("sample", "curate", "train"))
    budget = sum(dpo_stages.values())

    ensure_run(ws, "grpo", grpo_config(a, jsft, budget))
    grpo_stages = timed_stages(ws, "grpo", ("train",))

    status = {rid: store.run_status(rid) for rid in ("sft", "dpo", "grpo")}
    dpo_it, grpo_it = status["dpo"]["iterations"][1], status["grpo"]["iterations"][1]
    grpo_train = store.iteration("grpo", 1)["train_metrics"] or {}
    out = {
        "bench": "dpo_vs_grpo", "quick": a.quick, "budget_s": round(budget, 1),
        "overlap_with_sft": overlap(ws, a.sft_items, a.items),
        "j_sft": {"checkpoint": jsft, "metrics": headline(status["sft"]["iterations"][0]["metrics"])},
        "dpo": {"wall_s": round(budget, 1), "stages_s": {k: round(v, 1) for k, v in dpo_stages.items()},
                "pairs": sum(dpo_it["pairs"].values()), "train": dpo_it["stages"]["train"],
                "metrics": headline(dpo_it["metrics"])},
        "grpo": {"wall_s": round(grpo_stages["train"], 1), "steps": int(grpo_train.get("train/steps", 0)),
                 "rollouts": grpo_it["rollout_judgments"], "mean_reward": finite(grpo_it["rollout_reward"]),
                 "reward_first": finite(grpo_train.get("train/reward_first")),
                 "reward_last": finite(grpo_train.get("train/reward_last")),
                 "stopped_by_time": bool(grpo_train.get("train/stopped_by_time")),
                 "metrics": headline(grpo_it["metrics"])},
    }
    out["paired"] = {f"{b} vs {x} on {d}": paired(store, f"{x}:{i}", f"{b}:1", d, a.bootstrap)
                     for d in a.eval_sets for b, x, i in (("grpo", "dpo", 1), ("dpo", "sft", 0), ("grpo", "sft", 0))}
    out["total_s"] = round(time.monotonic() - t0, 1)
    # the experiment's own wall clock, from the store (a rerun that only reports does not change it)
    out["experiment_s"] = round((store.run("grpo")["finished_at"] - store.run("sft")["created_at"]).total_seconds(), 1)
    out["load_average"], out["cpus"] = round(os.getloadavg()[0], 2), os.cpu_count()
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "dpo_vs_grpo.md").write_text(markdown(a, out))
    print(json.dumps(out, allow_nan=False, default=str))


if __name__ == "__main__":
    main()
