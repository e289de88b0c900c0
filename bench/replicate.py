"""Does the self-rationalization loop improve the judge? The paper's experiment, with paired answers.

    python bench/replicate.py --quick              # tiny numbers, end to end, into a new temporary directory
    python bench/replicate.py --estimate --workspace OUT/ws   # the full run's wall time here, from those costs
    python bench/replicate.py                      # the full configuration (hours on 2 CPU cores)
    python bench/replicate.py --resume             # continue it after an interruption (Ctrl-C, SIGTERM, a crash)
    python bench/replicate.py --report-only        # rewrite the report from what the workspace holds
    python bench/replicate.py --follow-up --dpo-lr 1e-4 --follow-up-iterations 1   # the same run, one change

--quick takes ~3 min on 2 idle cores, several times that when other jobs share them; its figures mean
nothing (n of 1-2 per set), it proves the script and measures the unit costs --estimate projects from.

On the embedded SmolLM2-135M-Instruct, through the same engine as `selfrat run`:

- seed SFT on gold CIA feedback (`cia-sft`: the odd rows of cia/scored_responses_testset_remaining.tsv) gives
  J_SFT;
- 2 iterations of sample -> curate (gold) -> DPO follow, each on its own fresh items (`cia-train`: the even
  rows of the same file, so no prompt is shared with the SFT items);
- the seed, iteration 1 and iteration 2 are evaluated on held-out CIA BiGGen (`cia-heldout`: one graded
  response per prompt, gold scores rotated 1..5) and RewardBench Chat / Chat_Hard (`rb-chat`, `rb-chat-hard`:
  an evenly spaced sample that keeps the subsets' shares), each side scored (absolute) and A/B in both orders
  (relative). Every eval item whose prompt (instruction + input, case and whitespace folded) occurs anywhere
  in the train file is dropped before the sample is drawn; the report says how many;
- beside them on the seed: raw (the model before SFT), the response-length baseline, the expected score,
  self-consistency (mean and majority of N), best-of-N (meta-judge), and single-stage DPO (one iteration from
  J_SFT on the items and pairs of both iterations at once, run `replicate-single-stage`).

The report (`--out`/replicate.md, replicate.json, replicate.html; one JSON line on stdout): table 1, each
judge's figures with 95% intervals and n per set; table 2, the paired differences (`engine.compare`) of
iterations 1 and 2 against J_SFT and each baseline, per set (delta, 95% CI, p, n; bold where the interval
excludes 0); diagnostics from the stored data (curation reports, DPO reward margins and accuracies, per-step
losses from the run log, score distributions and entropy); the wall time of each stage; the machine; and a
projection of the full run's wall time from the costs measured in this workspace.

Workspace: every stage records its status in the workspace's store, so `--resume` continues where an
interrupted run stopped (a stage half done picks up where its stored rows end); stage wall times accumulate
over sessions in WS/replicate-timings.json. The sizes of a run are fixed when it starts (WS/replicate-setup.json;
the datasets hold exactly the selected items): a start without --resume on a workspace that holds a run is
refused, and --resume keeps the stored sizes whatever the flags say.

Follow-up (`--follow-up` with the loop's size flags, e.g. --dpo-lr): when the loop does not beat J_SFT, one
change the stored data points to, tried in the same workspace as run `replicate-follow-up`: it starts from
the same J_SFT, samples the same train slices with the same seeds (its iteration 1 curates from the first
run's judgments again; the report counts how many are identical) and is evaluated on the same items, so table
2 pairs its iterations with J_SFT and with the first run's. One follow-up per workspace; both runs are
reported.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import math
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import get_args

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from engine.config import TrainingConfig, parse_run_config  # noqa: E402
from engine.importers import read_items  # noqa: E402
from engine.prompts import absolute_messages  # noqa: E402
from engine.workspace import Workspace  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
RUN_ID = "replicate"
SINGLE = f"{RUN_ID}-single-stage"
FOLLOW = f"{RUN_ID}-follow-up"
RUNS = (RUN_ID, SINGLE, FOLLOW)
SETUP_FILE = "replicate-setup.json"
TIMINGS_FILE = "replicate-timings.json"
# role -> file under --data
FILES = {
    "train": "cia/scored_responses_testset_remaining.tsv",
    "cia-heldout": "cia/scored_responses_testset_biggen.tsv",
    "rb-chat": "rewardbench/Chat.jsonl",
    "rb-chat-hard": "rewardbench/Chat_Hard.jsonl",
}
EVAL_SETS = ("cia-heldout", "rb-chat", "rb-chat-hard")
SET_TITLES = {"cia-heldout": "CIA held-out", "rb-chat": "RB Chat", "rb-chat-hard": "RB Chat_Hard"}

# The sizes of a run. full: the issue's scale; quick: proves the script end to end in ~10 min on 2 cores
# (its figures mean nothing: n is tiny, and it takes the shortest items of each set to stay fast).
PRESETS = {
    "full": {"sft_items": 128, "sft_epochs": 1.0, "sft_lr": 1e-4, "items_per_iteration": 64, "n": 4,
             "pairs_per_item": 2, "min_margin": 1, "dpo_lr": 1e-5, "max_new_tokens": 128, "cia_items": 150,
             "rb_items": 50, "eval_new_tokens": 96, "baseline_n": 5, "meta_new_tokens": 16, "max_length": 2048,
             "dpo_loss": "sigmoid", "bootstrap": 1000, "compare_bootstrap": 2000, "relative": True,
             "selection": "spread"},
    "quick": {"sft_items": 2, "sft_epochs": 1.0, "sft_lr": 1e-4, "items_per_iteration": 1, "n": 4,
              "pairs_per_item": 1, "min_margin": 1, "dpo_lr": 1e-5, "max_new_tokens": 8, "cia_items": 2,
              "rb_items": 1, "eval_new_tokens": 8, "baseline_n": 2, "meta_new_tokens": 2, "max_length": 1024,
              "dpo_loss": "sigmoid", "bootstrap": 200, "compare_bootstrap": 200, "relative": True,
              "selection": "shortest"},
}
SIZE_CHOICES = {"dpo_loss": get_args(TrainingConfig.model_fields["loss"].annotation)}  # the losses train_dpo takes
SIZE_HELP = {
    "sft_items": "seed SFT items (cia-sft)", "sft_epochs": "seed SFT epochs", "sft_lr": "seed SFT learning rate",
    "items_per_iteration": "fresh train items per iteration", "n": "judgments sampled per train item",
    "pairs_per_item": "curation cap on pairs per item", "min_margin": "gold curation margin",
    "dpo_lr": "DPO learning rate", "max_new_tokens": "token budget of a sampled judgment",
    "cia_items": "held-out CIA items", "rb_items": "pairs per RewardBench set",
    "eval_new_tokens": "token budget of an evaluation judgment", "baseline_n": "N of self-consistency / best-of-N",
    "meta_new_tokens": "best-of-N meta-judge note budget", "max_length": "SFT / DPO sequence length",
    "dpo_loss": "DPO loss: sigmoid, or sigmoid+sft (plus NLL on the chosen judgment)",
    "bootstrap": "bootstrap resamples of the stored 95%% intervals",
    "compare_bootstrap": "bootstrap resamples of the paired differences",
}


# The sizes a follow-up run may change (the loop's own); their place in the stored run config. The seed and
# the evaluation stay the first run's, so the two runs' iterations are judged on the same items.
FOLLOW_SIZES = {"items_per_iteration": ("train_items_per_iteration",), "n": ("sampling", "n"),
                "pairs_per_item": ("curation", "max_pairs_per_item"), "min_margin": ("curation", "min_margin"),
                "dpo_lr": ("training", "learning_rate"), "max_new_tokens": ("sampling", "max_new_tokens"),
                "max_length": ("training", "max_length"), "dpo_loss": ("training", "loss")}


class TooFew(ValueError):
    """A set that cannot give the items asked for."""


def die(message: str, code: int = 2) -> None:
    print(f"replicate: {message}", file=sys.stderr)
    raise SystemExit(code)


# ====================================================================== data: selection and import


def prompt_key(instruction: str | None, input_: str | None = None) -> str:
    """An item's prompt, case and whitespace folded (as the store's contamination check folds it)."""
    text = (instruction or "") + ("\n" + input_ if input_ else "")
    return " ".join(text.lower().split())


def _keys(items: pl.DataFrame) -> list[str]:
    return [prompt_key(i, x) for i, x in zip(items["instruction"], items["input"], strict=True)]


def _md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def _chars(messages: list[dict]) -> int:
    return sum(len(m.get("content") or "") for m in messages)


def _item_chars(items: pl.DataFrame) -> list[int]:
    """Characters of each item's judge prompt (absolute; a pairwise item: both sides)."""
    out = []
    for it in items.iter_rows(named=True):
        c = _chars(absolute_messages(it))
        if it["kind"] == "pairwise":
            c += _chars(absolute_messages(it, response_key="response_b"))
        out.append(c)
    return out


def drop_shared_prompts(items: pl.DataFrame, train_keys: set[str]) -> tuple[pl.DataFrame, int, int]:
    """`items` without those whose prompt occurs among `train_keys`: (kept, items dropped, prompts dropped)."""
    keys = _keys(items)
    shared = [k in train_keys for k in keys]
    kept = items.filter(~pl.Series(shared))
    return kept, sum(shared), len({k for k, s in zip(keys, shared, strict=True) if s})


def select_absolute(items: pl.DataFrame, n: int, selection: str) -> pl.DataFrame:
    """n graded responses spread over as many prompts as possible: prompts in a fixed pseudo-random order
    (md5 of the prompt), prompt j first contributes its response of gold (j mod 5) + 1, then the next score,
    and so on, so gold is balanced and no prompt gives a second response before every prompt gave one.
    "shortest": the n items with the shortest judge prompts (--quick: speed only)."""
    if selection == "shortest":
        return items.with_columns(_c=pl.Series(_item_chars(items))).sort("_c", "item_id").head(n).drop("_c")
    keys = _keys(items)
    order = {k: j for j, k in enumerate(sorted(set(keys), key=_md5))}
    j = pl.Series([order[k] for k in keys])
    gold = items["gold_score"].cast(pl.Float64).fill_null(3.0).round().cast(pl.Int64)
    rank = ((gold - 1 - j) % 5).alias("_rank")
    return items.with_columns(_rank=rank, _j=j).sort("_rank", "_j", "item_id").head(n).drop("_rank", "_j")


def select_pairs(items: pl.DataFrame, n: int, selection: str) -> pl.DataFrame:
    """n pairs evenly spaced over the file (source order), so every subset keeps its share.
    "shortest": the n pairs with the shortest judge prompts."""
    if selection == "shortest":
        return items.with_columns(_c=pl.Series(_item_chars(items))).sort("_c", "item_id").head(n).drop("_c")
    items = items.sort("source_row", "item_id")
    total = items.height
    if n >= total:
        return items
    return items[[int((i + 0.5) * total / n) for i in range(n)]]


def select_train(items: pl.DataFrame, n: int, selection: str) -> pl.DataFrame:
    """n train items: in item_id order (a hash: spread over prompts), or the shortest (--quick)."""
    if selection == "shortest":
        return items.with_columns(_c=pl.Series(_item_chars(items))).sort("_c", "item_id").head(n).drop("_c")
    return items.sort("item_id").head(n)


def read_file(data: Path, role: str, dataset: str):
    file = data / FILES[role]
    if not file.is_file():
        die(f"data file {file} not found (--data points at the folder with cia/ and rewardbench/)")
    cia = role in ("train", "cia-heldout")
    # CIA grades one response text at several scores in a few prompts: ambiguous gold, dropped.
    return read_items(str(file), dataset=dataset, preset="cia" if cia else None,
                      split="train" if role == "train" else "eval", skip_invalid=True,
                      on_conflict="drop" if cia else "error")


def selections(data: Path, s: dict) -> dict:
    """The items of each dataset of a run of sizes `s` (nothing is written): {name: (result, items, info)}."""
    train = read_file(data, "train", "cia-sft")
    items = train.items
    train_keys = set(_keys(items))
    out = {}
    odd = items.filter(pl.col("source_row") % 2 == 1)
    even_result = read_file(data, "train", "cia-train")  # item ids depend on the dataset name
    even = even_result.items.filter(pl.col("source_row") % 2 == 0)
    need = {"cia-sft": (odd, s["sft_items"], train), "cia-train": (even, 2 * s["items_per_iteration"], even_result)}
    for name, (pool, n, result) in need.items():
        chosen = select_train(pool, n, s["selection"])
        if chosen.height < n:
            raise TooFew(f"{name}: {n} items asked for, the file's {'odd' if name == 'cia-sft' else 'even'} rows "
                         f"give {pool.height}")
        out[name] = (result, chosen, {"file": FILES["train"], "rows": "odd" if name == "cia-sft" else "even",
                                      "pool": pool.height, "selected": chosen.height,
                                      "prompts": len(set(_keys(chosen)))})
    for name in EVAL_SETS:
        result = read_file(data, name, name)
        kept, dropped, dropped_prompts = drop_shared_prompts(result.items, train_keys)
        n = s["cia_items"] if name == "cia-heldout" else s["rb_items"]
        chosen = (select_absolute if name == "cia-heldout" else select_pairs)(kept, n, s["selection"])
        if chosen.height < n:
            raise TooFew(f"{name}: {n} items asked for, {kept.height} left after dropping shared prompts")
        out[name] = (result, chosen, {"file": FILES[name], "source_items": result.items.height,
                                      "dropped_shared_prompt": dropped, "dropped_prompts": dropped_prompts,
                                      "selected": chosen.height, "prompts": len(set(_keys(chosen)))})
    return out


def import_data(store, data: Path, s: dict) -> dict:
    """Import exactly the selected items of each dataset (so `max_eval_items` is not needed and the sets keep
    their sizes); returns {dataset: info} (selection counts and the shared-prompt drops)."""
    report = {}
    have = set(store.datasets()["name"].to_list())
    for name, (result, chosen, info) in selections(data, s).items():
        if name not in have:
            store.import_items(name, result.kind, chosen, source=str(data / info["file"]), preset=result.preset,
                               source_rows=result.source_rows, split=result.split,
                               report={**result.report(), "replicate_selection": info})
        report[name] = info
        drop = (f", {info['dropped_shared_prompt']} dropped for a prompt shared with the train file"
                if "dropped_shared_prompt" in info else "")
        print(f"{name}: {info['selected']} items over {info['prompts']} prompts{drop}", file=sys.stderr)
    return report


# ====================================================================== the run


def config(s: dict, model: str = "embedded") -> dict:
    return {
        "model": model,
        "sft": {"dataset": "cia-sft", "max_items": s["sft_items"], "epochs": s["sft_epochs"],
                "learning_rate": s["sft_lr"], "batch_size": 4, "max_length": s["max_length"]},
        "train_dataset": "cia-train",
        "train_items_per_iteration": s["items_per_iteration"],
        "eval_datasets": list(EVAL_SETS),
        "iterations": 2,
        "sampling": {"n": s["n"], "temperature": 1.0, "top_p": 0.9, "max_new_tokens": s["max_new_tokens"],
                     "batch_size": 8, "force_score": True},
        # meta_max_new_tokens: the best-of-N meta-judge writes a short note, then its rating.
        "curation": {"strategy": "gold", "min_margin": s["min_margin"], "max_pairs_per_item": s["pairs_per_item"],
                     "meta_max_new_tokens": s["meta_new_tokens"]},
        # 2 pairs x 2 accumulation steps: 4 pairs of ~1,700-token judgments at once need >20 GB on CPU
        # (full-vocabulary logits over the prompt too); 2 at a time stay under ~10 GB.
        "training": {"beta": 0.1, "learning_rate": s["dpo_lr"], "loss": s.get("dpo_loss", "sigmoid"),
                     "epochs": 1, "batch_size": 2,
                     "gradient_accumulation_steps": 2, "max_length": s["max_length"], "reference": "previous"},
        "evaluation": {"n": 1, "temperature": 0.0, "max_new_tokens": s["eval_new_tokens"],
                       "pairwise_modes": ["absolute", "relative"] if s["relative"] else ["absolute"],
                       "baselines": ["self-consistency", "best-of-n", "raw"],
                       "baseline_n": s["baseline_n"], "bootstrap": s["bootstrap"],
                       # 16 prompts a batch (the committed run: 8): the same judgments in fp32, 1.10x faster
                       # on 2 AVX2 cores (bench/eval_batch.py); the baselines' 5 samples stay 8 prompts a batch
                       "batch_size": 16},
    }


class Timings:
    """Wall seconds per (run, stage key), summed over sessions, in WS/replicate-timings.json."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {"runs": {}, "sessions": []}

    def add(self, run_id: str, key: str, seconds: float, save: bool = True) -> None:
        runs = self.data["runs"].setdefault(run_id, {})
        runs[key] = runs.get(key, 0.0) + float(seconds)
        if save:
            self.save()

    def get(self, run_id: str, key: str) -> float | None:
        return self.data["runs"].get(run_id, {}).get(key)

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)


def timed_runner(ws: Workspace, run_id: str, clock: Timings, **kw):
    """A Runner that times each stage it runs (a stage found done adds nothing) and, within an evaluation,
    each method (eval, relative, raw, baseline, meta-judge) by the progress records between batches."""
    from engine.iteration import ProgressLines, Runner
    from store import StoreError

    class TimedRunner(Runner):
        def __init__(self):
            super().__init__(ws, run_id, **kw)
            self.on_progress = self._event
            self._lines = ProgressLines()
            self._mark: float | None = None

        def _pending(self, k: int, stage: str) -> bool:
            try:
                return self.store.iteration(self.run_id, k)[f"{stage}_status"] not in ("done", "skipped")
            except StoreError:
                return True

        def _timed(self, k: int, stage: str, fn):
            if not self._pending(k, stage):
                return fn()
            start = self._mark = time.perf_counter()
            try:
                return fn()
            finally:
                now = time.perf_counter()
                if stage == "evaluate":
                    clock.add(self.run_id, f"{k}:evaluate:rest", now - self._mark, save=False)
                self._mark = None
                clock.add(self.run_id, f"{k}:{stage}", now - start)

        def _event(self, iteration, stage, done, total, **extra):
            self._lines(iteration, stage, done, total, **extra)
            if self._mark is not None and stage == "evaluate":
                now = time.perf_counter()
                clock.add(self.run_id, f"{iteration}:evaluate:{extra.get('method', 'eval')}", now - self._mark,
                          save=False)
                self._mark = now

        def sft(self):
            return self._timed(0, "train", super().sft)

        def run_stage(self, stage, k):
            return self._timed(k, stage, lambda: super(TimedRunner, self).run_stage(stage, k))

        def train(self, k):
            return self._timed(k, "train", lambda: super(TimedRunner, self).train(k))

    return TimedRunner()


def runs_in(store) -> list[str]:
    return store.runs()["run_id"].to_list()


def run_experiment(ws: Workspace, clock: Timings, sampler_factory=None, refresh: bool = False,
                   echo: bool = True) -> None:
    """The loop, then the single-stage baseline (copied into the parent as 'single-stage-dpo/<metric>')."""
    from engine.iteration import Runner, create_run, run_single_stage, single_stage_config

    store = ws.store()
    kw = {"sampler_factory": sampler_factory, "echo": echo}
    timed_runner(ws, RUN_ID, clock, **kw).run_all()
    if SINGLE not in runs_in(store):
        parent = Runner(ws, RUN_ID, echo=False)
        create_run(ws, single_stage_config(parent.cfg, parent.initial_model()), SINGLE)
    timed_runner(ws, SINGLE, clock, **kw).run_all()
    run_single_stage(ws, RUN_ID, sampler_factory=sampler_factory, echo=False)  # done: copies its figures
    if refresh:  # every judgment and meta rating is stored, so evaluating again only recomputes figures
        for rid in [r for r in RUNS if r in runs_in(store)]:
            runner = Runner(ws, rid, sampler_factory=sampler_factory, echo=echo)
            for it in store.run_status(rid)["iterations"]:
                if it["metrics"]:  # evaluated before (the single-stage child skips its seed)
                    runner.evaluate_datasets(it["index"], runner.cfg.eval_datasets)
        run_single_stage(ws, RUN_ID, sampler_factory=sampler_factory, echo=False)


def follow_up_config(store, changes: dict, iterations: int):
    """The follow-up run: the first run's config (seeds, items, evaluation) with `changes` (FOLLOW_SIZES keys)
    applied, started from its J_SFT (no seed SFT, no seed evaluation, no baselines). Iteration k samples the
    same train slice with the same seed as the first run's iteration k, so its iteration 1 curates from the
    same judgments; what differs first is what the change touches."""
    from engine.config import RunConfig

    unknown = sorted(set(changes) - set(FOLLOW_SIZES))
    if unknown:
        raise ValueError(f"a follow-up changes only the loop's sizes ({', '.join(sorted(FOLLOW_SIZES))}); "
                         f"not {', '.join(unknown)}: those would judge other items or another seed")
    if not changes:
        raise ValueError("a follow-up needs a change: give it as a size flag, e.g. --dpo-lr 1e-4")
    data = copy.deepcopy(store.run(RUN_ID)["config"])
    if not 1 <= iterations <= data["iterations"]:  # its train slices (and table 2's pairs) are the first run's
        raise ValueError(f"a follow-up runs 1 to {data['iterations']} iterations (the first run's train slices), "
                         f"not {iterations}")
    for key, value in changes.items():
        *parents, leaf = FOLLOW_SIZES[key]
        target = data
        for part in parents:
            target = target[part]
        target[leaf] = value
    sft = store.iteration(RUN_ID, 0)
    if sft["train_status"] != "done" or not sft["checkpoint"]:
        raise ValueError(f"the first run's seed SFT is not done yet (status {sft['train_status']}): a follow-up "
                         "starts from its J_SFT")
    data.update(model=sft["checkpoint"], sft=None, evaluate_initial=False, iterations=iterations)
    data["evaluation"]["baselines"] = []
    return RunConfig.model_validate(data)


def follow_up_label(changes: dict) -> str:
    return ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in sorted(changes.items()))


def run_follow_up(ws: Workspace, clock: Timings, follow: dict, sampler_factory=None, echo: bool = True) -> None:
    """Create (first time) and run the follow-up (`follow`: {"changes", "iterations"}) to its end, or resume it."""
    from engine.iteration import create_run

    store = ws.store()
    if FOLLOW not in runs_in(store):
        create_run(ws, follow_up_config(store, follow["changes"], follow["iterations"]), FOLLOW)
    timed_runner(ws, FOLLOW, clock, sampler_factory=sampler_factory, echo=echo).run_all()


# label, compare spec, (run, iteration, metric prefix) of its stored figures, spec of its A/B judge
JUDGES = [
    ("raw model (before SFT)", f"{RUN_ID}:0:raw", (RUN_ID, 0, "raw/"), None),
    ("response length alone", f"{RUN_ID}:0:length-baseline", (RUN_ID, 0, "length-baseline/"), None),
    ("J_SFT (seed, greedy)", f"{RUN_ID}:0", (RUN_ID, 0, ""), f"{RUN_ID}:0:relative"),
    ("J_SFT, expected score", f"{RUN_ID}:0:expected", (RUN_ID, 0, "expected/"), None),
    ("self-consistency, mean of N", f"{RUN_ID}:0:self-consistency-mean", (RUN_ID, 0, "self-consistency-mean/"),
     None),
    ("self-consistency, majority of N", f"{RUN_ID}:0:self-consistency-majority",
     (RUN_ID, 0, "self-consistency-majority/"), None),
    ("best-of-N (meta-judge)", f"{RUN_ID}:0:best-of-n", (RUN_ID, 0, "best-of-n/"), None),
    ("single-stage DPO", f"{SINGLE}:1", (SINGLE, 1, ""), f"{SINGLE}:1:relative"),
    ("iteration 1", f"{RUN_ID}:1", (RUN_ID, 1, ""), f"{RUN_ID}:1:relative"),
    ("iteration 2", f"{RUN_ID}:2", (RUN_ID, 2, ""), f"{RUN_ID}:2:relative"),
]
ITERATIONS = [j for j in JUDGES if j[0].startswith("iteration")]


def judges_of(setup: dict) -> list[tuple]:
    """JUDGES, and the follow-up run's iterations when the workspace has one."""
    follow = setup.get("follow_up")
    if not follow:
        return list(JUDGES)
    label = follow_up_label(follow["changes"])
    return [*JUDGES, *[(f"follow-up iteration {k} ({label})", f"{FOLLOW}:{k}", (FOLLOW, k, ""),
                        f"{FOLLOW}:{k}:relative") for k in range(1, follow["iterations"] + 1)]]


# (column title, dataset, metric, with interval)
COLUMNS = [
    ("CIA Pearson [95% CI]", "cia-heldout", "pearson", True),
    ("partial r given length", "cia-heldout", "partial_pearson", False),
    ("Spearman", "cia-heldout", "spearman", False),
    ("exact", "cia-heldout", "exact", False),
    ("within-1", "cia-heldout", "within1", False),
    ("CIA parse fail", "cia-heldout", "parse_failure_rate", False),
    ("RB Chat abs [95% CI]", "rb-chat", "accuracy", True),
    ("RB Chat A/B [95% CI]", "rb-chat", "relative/accuracy", True),
    ("RB Chat_Hard abs [95% CI]", "rb-chat-hard", "accuracy", True),
    ("RB Chat_Hard A/B [95% CI]", "rb-chat-hard", "relative/accuracy", True),
]


def _num(v) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def _fmt(v, signed: bool = False) -> str:
    v = _num(v)
    return "–" if v is None else (f"{v:+.3f}" if signed else f"{v:.3f}")


def stored_metrics(store) -> dict[tuple[str, int], dict]:
    out = {}
    for rid in RUNS:
        if rid in runs_in(store):
            for it in store.run_status(rid)["iterations"]:
                out[(rid, it["index"])] = it["metrics"]
    return out


def relative_interval(store, spec: str, dataset: str, bootstrap: int, seed: int) -> tuple[float, float] | None:
    """95% percentile-bootstrap interval of a judge's A/B accuracy (the evaluation stores none), over its
    pairs as `engine.compare` reads them (a tie or failure is wrong)."""
    from engine.compare import judge_items
    from engine.metrics import bootstrap_mean
    from store.errors import UsageError

    try:
        correct = judge_items(store, spec, dataset)["correct"].cast(pl.Float64).to_list()
    except UsageError:
        return None
    return bootstrap_mean(correct, bootstrap, seed) if correct and bootstrap > 0 else None


def judge_table(store, bootstrap: int = 1000, judges: list[tuple] = JUDGES) -> list[dict]:
    """Table 1's records: per judge, per column the value, its interval and n (None where not stored). The
    A/B accuracy's interval is computed here (`relative_interval`, the evaluation's seed)."""
    stored = stored_metrics(store)
    seed = int(store.run(RUN_ID)["config"]["evaluation"]["seed"]) if RUN_ID in runs_in(store) else 0
    records = []
    for label, spec, (rid, k, prefix), rel in judges:
        metrics = stored.get((rid, k), {})
        rec = {"judge": label, "spec": spec, "figures": {}}
        for _title, dataset, metric, _ci in COLUMNS:
            m = metrics.get(dataset, {})
            if metric.startswith("relative/") and prefix:
                v = lo = hi = n = None  # baselines judge each side only (no A/B judgments)
            else:
                name = prefix + metric
                v, lo, hi = m.get(name), m.get(name + "_lo"), m.get(name + "_hi")
                base = prefix + ("relative/" if metric.startswith("relative/") else "")
                n = m.get(base + "n")
                if metric in ("pearson", "partial_pearson", "spearman"):
                    n = m.get(prefix + "n_scored", n)
                if metric == "relative/accuracy" and rel and v is not None and lo is None:
                    lo, hi = relative_interval(store, rel, dataset, bootstrap, seed) or (None, None)
            rec["figures"][f"{dataset}:{metric}"] = {"value": _num(v), "lo": _num(lo), "hi": _num(hi),
                                                      "n": None if n is None else int(n)}
        records.append(rec)
    return records


def judge_markdown(records: list[dict]) -> str:
    head = "| judge | " + " | ".join(t for t, *_ in COLUMNS) + " |"
    rows = [head, "|---" * (len(COLUMNS) + 1) + "|"]
    for rec in records:
        cells = []
        for _title, dataset, metric, ci in COLUMNS:
            f = rec["figures"][f"{dataset}:{metric}"]
            cell = _fmt(f["value"])
            if ci and f["lo"] is not None and f["hi"] is not None:
                cell += f" [{_fmt(f['lo'])}, {_fmt(f['hi'])}]"
            if f["n"] is not None and metric in ("pearson", "accuracy", "relative/accuracy"):
                cell += f" n={f['n']}"
            cells.append(cell)
        rows.append(f"| {rec['judge']} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


# ====================================================================== table 2: paired differences


# (column title, dataset, metric, A/B judges)
PAIRED = [
    ("CIA Pearson", "cia-heldout", "pearson", False),
    ("CIA partial r", "cia-heldout", "partial_pearson", False),
    ("CIA exact", "cia-heldout", "exact", False),
    ("CIA within-1", "cia-heldout", "within1", False),
    ("RB Chat abs", "rb-chat", "accuracy", False),
    ("RB Chat A/B", "rb-chat", "accuracy", True),
    ("RB Chat_Hard abs", "rb-chat-hard", "accuracy", False),
    ("RB Chat_Hard A/B", "rb-chat-hard", "accuracy", True),
]


def excludes_0(figure: dict, significant) -> bool:
    """engine.compare's `significant`, except for an interval that is 0 up to rounding (two degenerate
    judges, e.g. partial r at n = 3, differ by ~1e-15 in every resample: not a difference)."""
    lo, hi = _num(figure.get("lo")), _num(figure.get("hi"))
    return significant(figure) and lo is not None and hi is not None and max(abs(lo), abs(hi)) > 1e-9


def paired_plan(judges: list[tuple]) -> list[tuple[tuple, tuple]]:
    """(B, A) judges of table 2: each iteration against J_SFT, every baseline and (iteration 2) iteration 1; a
    follow-up's iteration k against J_SFT, the first run's iteration k and its own iteration k - 1."""
    plan = [(b, a) for b in ITERATIONS for a in JUDGES if a[1] != b[1] and a[0] != "iteration 2"]
    by = {j[0]: j for j in JUDGES}
    follow = judges[len(JUDGES):]
    for i, b in enumerate(follow):
        k = int(b[1].rsplit(":", 1)[1])
        plan += [(b, by["J_SFT (seed, greedy)"]), (b, by[f"iteration {k}"]), *([(b, follow[i - 1])] if i else [])]
    return plan


def paired_table(store, bootstrap: int, seed: int = 0, judges: list[tuple] = JUDGES) -> list[dict]:
    """Table 2's records (the pairs of `paired_plan`), per eval set and mode: {"b", "a", "b_spec", "a_spec",
    "cells": {"<dataset>:<mode>:<metric>": figure or None}}, a figure being compare_judges' {a, b, delta, lo,
    hi, p, n} plus "excludes_0". A/B cells exist for judges with A/B judgments (J_SFT, single-stage DPO, the
    iterations)."""
    from engine.compare import compare_judges, significant
    from store.errors import UsageError

    cache: dict[tuple, dict | None] = {}

    def compare(a: str, b: str, dataset: str) -> dict | None:
        key = (a, b, dataset)
        if key not in cache:
            try:
                cache[key] = compare_judges(store, a, b, dataset, bootstrap=bootstrap, seed=seed)["metrics"]
            except UsageError as e:  # a judge not (yet) evaluated on the set: an empty cell
                print(f"paired {b} vs {a} on {dataset}: {e}", file=sys.stderr)
                cache[key] = None
        return cache[key]

    records = []
    for (b_label, b_spec, _, b_rel), (a_label, a_spec, _, a_rel) in paired_plan(judges):
        cells = {}
        for _title, dataset, metric, ab in PAIRED:
            a, b = (a_rel, b_rel) if ab else (a_spec, b_spec)
            figure = compare(a, b, dataset) if a and b else None
            f = (figure or {}).get(metric)
            cells[f"{dataset}:{'relative' if ab else 'absolute'}:{metric}"] = (
                None if f is None else {**{k: _num(v) if k != "n" else v for k, v in f.items()},
                                        "excludes_0": excludes_0(f, significant)})
        records.append({"b": b_label, "a": a_label, "b_spec": b_spec, "a_spec": a_spec, "cells": cells})
    return records


def paired_markdown(records: list[dict]) -> str:
    head = "| B | against A | " + " | ".join(t for t, *_ in PAIRED) + " |"
    rows = [head, "|---" * (len(PAIRED) + 2) + "|"]
    for rec in records:
        cells = []
        for _title, dataset, metric, ab in PAIRED:
            f = rec["cells"][f"{dataset}:{'relative' if ab else 'absolute'}:{metric}"]
            if f is None or f["delta"] is None:
                cells.append("–")
                continue
            text = (f"{_fmt(f['delta'], True)} [{_fmt(f['lo'], True)}, {_fmt(f['hi'], True)}] p={_fmt(f['p'])}"
                    f" n={f['n']}")
            cells.append(f"**{text}**" if f["excludes_0"] else text)
        rows.append(f"| {rec['b']} | {rec['a']} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


# ====================================================================== diagnostics


STEP = re.compile(r"step (\d+)/(\d+) loss=([-\d.naif]+)(?: margin=([-\d.naif]+))?")


def train_steps(run_dir: Path) -> dict[int, list[dict]]:
    """Per-step lines of the run log ("step i/n loss=... [margin=...]") by iteration: each training's lines
    follow its "[iter k] train: DPO on" / "[iter 0] seed SFT:" line."""
    log = run_dir / "run.log"
    out: dict[int, list[dict]] = {}
    current = None
    if not log.is_file():
        return out
    for line in log.read_text(errors="replace").splitlines():
        m = re.search(r"\[iter (\d+)\] (?:train: DPO on|train: GRPO on|seed SFT: \d+)", line)
        if m:
            current = int(m.group(1))
            out[current] = []  # a training that started again (resume) replaces the earlier lines
            continue
        s = STEP.search(line)
        if s and current is not None:
            out[current].append({"step": int(s.group(1)), "steps": int(s.group(2)), "loss": float(s.group(3)),
                                 "margin": float(s.group(4)) if s.group(4) else None})
    return out


def _scores(j: pl.DataFrame) -> dict:
    """Score distribution, parse / forced rates and mean entropy (nats, over p1..p5) of judgments."""
    if j.height == 0:
        return {"n": 0}
    scored = j.filter(pl.col("score").is_not_null())
    p = j.select([f"p{k}" for k in range(1, 6)]).to_numpy().astype(float)
    ok = ~np.isnan(p).any(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.nansum(np.where(p[ok] > 0, p[ok] * np.log(p[ok]), 0.0), axis=1)
    return {"n": j.height, "share": {str(k): round(float((scored["score"] == k).sum()) / max(1, scored.height), 3)
                                     for k in range(1, 6)},
            "mean_score": _num(scored["score"].mean()) if scored.height else None,
            "parse_ok": round(float((j["parse_status"] == "ok").mean()), 3),
            "forced": round(float(j["forced"].mean()), 3),
            "mean_entropy": round(float(ent.mean()), 3) if ok.any() else None,
            "mean_completion_tokens": _num(j["completion_tokens"].mean())}


def _cap_room(store, rid: str, k: int, cfg: dict) -> dict:
    """Items whose judgments would give more pairs than the cap lets through (min(chosen, rejected) > cap)."""
    from engine.metrics import round_half_up

    j = store.judgments(rid, k, "train").filter(pl.col("score").is_not_null())
    if j.height == 0:
        return {"items_over_cap": 0, "pairs_left_by_cap": 0}
    items = store.items(cfg["train_dataset"]).select("item_id", "gold_score")
    j = j.join(items, on="item_id")
    gold = round_half_up(j["gold_score"].cast(pl.Float64).to_numpy())
    miss = np.abs(j["score"].to_numpy() - gold)
    per = (j.select("item_id").with_columns(c=pl.Series(miss == 0), r=pl.Series(miss >= cfg["curation"]["min_margin"]))
           .group_by("item_id").agg(pl.col("c").sum().cast(pl.Int64), pl.col("r").sum().cast(pl.Int64)))
    cap = cfg["curation"]["max_pairs_per_item"]
    possible = np.minimum(per["c"].to_numpy(), per["r"].to_numpy()).astype(np.int64)
    return {"items_over_cap": int((possible > cap).sum()),
            "pairs_left_by_cap": int(np.maximum(possible - cap, 0).sum()),
            "items_at_cap": int((np.minimum(possible, cap) == cap).sum())}


def same_as_first_run(store, k: int) -> dict:
    """How many of the follow-up's iteration-k train judgments (item, sample, text) and pairs (item, chosen and
    rejected sample) are the first run's: iteration 1 samples with the same judge, seed and items."""
    def read(rid):
        j = store.judgments(rid, k, "train").select("judgment_id", "item_id", "side", "sample_index", "raw_text")
        key = {r["judgment_id"]: (r["item_id"], r["side"], r["sample_index"]) for r in j.iter_rows(named=True)}
        pairs = {(key.get(r["chosen_id"]), key.get(r["rejected_id"]))
                 for r in store.pairs(rid, k).iter_rows(named=True)}
        return {(r["item_id"], r["side"], r["sample_index"], r["raw_text"]) for r in j.iter_rows(named=True)}, pairs

    (fj, fp), (oj, op) = read(FOLLOW), read(RUN_ID)
    return {"judgments": len(fj & oj), "judgments_of": len(fj), "pairs": len(fp & op), "pairs_of": len(fp)}


def diagnostics(store, ws: Workspace) -> dict:
    """Per run and iteration, from the stored data: the seed SFT, curation, DPO, score distributions."""
    out: dict = {}
    names = store.datasets()["name"].to_list()
    cia = set(store.items("cia-heldout")["item_id"].to_list()) if "cia-heldout" in names else set()
    for rid in RUNS:
        if rid not in runs_in(store):
            continue
        run = store.run(rid)
        cfg = run["config"]
        steps = train_steps(Path(run["run_dir"] or ws.run_dir(rid)))
        reports = store.run_reports(rid)
        per = {}
        for it in store.iterations(rid):
            k = it["iteration"]
            d: dict = {"stages": {s: it[f"{s}_status"] for s in ("sample", "curate", "train", "evaluate")},
                       "train_metrics": it["train_metrics"], "train_precision": it.get("train_precision"),
                       "steps": steps.get(k, [])}
            if k == 0 and "seed_sft" in reports:
                d["seed_sft"] = reports["seed_sft"]
            if it["curate_report"]:
                r = it["curate_report"]
                d["curation"] = {key: r.get(key) for key in ("items", "judgments", "usable", "pairs",
                                                             "items_with_pairs", "skipped", "chosen_score_hist",
                                                             "margin_hist", "length_bias", "warnings")}
                d["curation"].update(_cap_room(store, rid, k, cfg))
            if k > 0:
                d["train_samples"] = _scores(store.judgments(rid, k, "train"))
                if rid == FOLLOW and d["train_samples"]["n"]:
                    d["same_as_first_run"] = same_as_first_run(store, k)
            ev = store.judgments(rid, k, "eval")
            if ev.height:
                d["eval_cia"] = _scores(ev.filter(pl.col("item_id").is_in(list(cia))))
            if k == 0:
                raw = store.judgments(rid, 0, "raw")
                if raw.height:
                    d["raw_cia"] = _scores(raw.filter(pl.col("item_id").is_in(list(cia))))
            per[str(k)] = d
        out[rid] = per
    return out


def _hist(share: dict | None) -> str:
    return "/".join(f"{100 * share[str(k)]:.0f}" for k in range(1, 6)) if share else "–"


def diagnostics_markdown(diag: dict) -> str:
    lines = []
    for rid, per in diag.items():
        for k, d in per.items():
            name = f"{rid} iteration {k}" if rid != RUN_ID else ("seed (iteration 0)" if k == "0" else f"iteration {k}")
            parts = []
            tm = d.get("train_metrics") or {}
            if k == "0" and "sft/loss" in tm:
                parts.append(f"seed SFT: {int(tm.get('sft/examples', 0))} examples, {int(tm.get('sft/steps', 0))} "
                             f"steps, loss {_fmt(tm.get('sft/loss'))} (final {_fmt(tm.get('sft/final_loss'))}), "
                             f"token accuracy {_fmt(tm.get('sft/token_accuracy'))}, {d.get('train_precision') or '?'}")
            c = d.get("curation")
            if c:
                lb = c.get("length_bias") or {}
                skipped = ", ".join(f"{r} {v}" for r, v in (c.get("skipped") or {}).items() if v)
                parts.append(
                    f"curation: {c['pairs']} pairs from {c['items']} items ({c['items_with_pairs']} with pairs; "
                    f"{c.get('items_at_cap', 0)} at the cap, {c.get('items_over_cap', 0)} with more possible "
                    f"[{c.get('pairs_left_by_cap', 0)} pairs left by the cap]); skipped: {skipped or 'none'}; "
                    f"margins {c.get('margin_hist')}; chosen scores {c.get('chosen_score_hist')}; rationale length "
                    f"chosen/rejected {lb.get('chosen_mean_chars')}/{lb.get('rejected_mean_chars')} chars "
                    f"(ratio {lb.get('ratio')})" + "".join(f"; warning: {w}" for w in c.get("warnings") or []))
            if k != "0" and tm:
                if tm.get("train/pairs") == 0:
                    parts.append("DPO: no pairs, the judge carried over")
                else:
                    parts.append(
                        f"DPO: {int(tm.get('train/pairs', 0))} pairs, {int(tm.get('train/steps', 0))} steps; mean "
                        f"over steps: loss {_fmt(tm.get('train/loss'))}, reward margin "
                        f"{_fmt(tm.get('train/rewards/margins'))}, reward accuracy "
                        f"{_fmt(tm.get('train/rewards/accuracies'))}, chosen {_fmt(tm.get('train/rewards/chosen'))}"
                        f", rejected {_fmt(tm.get('train/rewards/rejected'))}; {d.get('train_precision') or '?'}")
            if d.get("steps"):
                parts.append("per step (loss" + (", margin" if d["steps"][0]["margin"] is not None else "") + "): "
                             + "; ".join(f"{s['step']}: {s['loss']:.3f}" + (f", {s['margin']:+.3f}" if s["margin"]
                                                                           is not None else "")
                                         for s in d["steps"]))
            for key, title in (("train_samples", "sampled train judgments"), ("eval_cia", "greedy CIA judgments"),
                               ("raw_cia", "raw model's CIA judgments")):
                sc = d.get(key)
                if sc and sc.get("n"):
                    parts.append(f"{title}: n {sc['n']}, scores 1-5 % {_hist(sc.get('share'))}, mean "
                                 f"{_fmt(sc.get('mean_score'))}, entropy {_fmt(sc.get('mean_entropy'))} nats, "
                                 f"parsed {_fmt(sc.get('parse_ok'))}, forced {_fmt(sc.get('forced'))}, "
                                 f"{_fmt(sc.get('mean_completion_tokens'))} tokens")
            same = d.get("same_as_first_run")
            if same:
                parts.append(f"the same as the first run's iteration {k}: {same['judgments']} of "
                             f"{same['judgments_of']} sampled train judgments, {same['pairs']} of "
                             f"{same['pairs_of']} pairs")
            if parts:
                lines.append(f"- **{name}**:\n" + "\n".join(f"  - {p}" for p in parts))
    return "\n".join(lines)


# ====================================================================== machine and timings


def machine() -> dict:
    import torch

    from engine.precision import cpu_flags, resolve_precision

    model = platform.processor() or "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    out = {"cpu": model, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), **cpu_flags(),
           "auto_precision_cpu": resolve_precision("auto", "cpu"), "python": platform.python_version(),
           "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    with contextlib.suppress(OSError):
        out["load_avg_1m"] = round(os.getloadavg()[0], 2)
    return out


def stored_precisions(store) -> dict:
    out = {}
    for rid in RUNS:
        if rid in runs_in(store):
            status = store.run_status(rid)
            out[rid] = {str(it["index"]): it["precision"] for it in status["iterations"]}
    return out


STAGE_ROWS = [  # (label, run, key)
    ("seed SFT", RUN_ID, "0:train"),
    ("seed evaluation, all (J_SFT + baselines)", RUN_ID, "0:evaluate"),
    ("  J_SFT absolute (eval)", RUN_ID, "0:evaluate:eval"),
    ("  J_SFT A/B (relative)", RUN_ID, "0:evaluate:relative"),
    ("  baseline raw", RUN_ID, "0:evaluate:raw"),
    ("  baselines self-consistency / best-of-N: sampling", RUN_ID, "0:evaluate:baseline"),
    ("  baseline best-of-N: meta-judge ratings", RUN_ID, "0:evaluate:meta-judge"),
    ("  metrics, loading, rest", RUN_ID, "0:evaluate:rest"),
    *[(f"iteration {k} {s}", RUN_ID, f"{k}:{s}") for k in (1, 2) for s in ("sample", "curate", "train", "evaluate")],
    *[(f"baseline single-stage DPO {s}", SINGLE, f"1:{s}") for s in ("sample", "curate", "train", "evaluate")],
    *[(f"follow-up iteration {k} {s}", FOLLOW, f"{k}:{s}") for k in (1, 2) for s in ("sample", "curate", "train",
                                                                                   "evaluate")],
]


def _dur(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def timings_markdown(clock: Timings) -> tuple[str, float]:
    """The stage table (– = not run in any session of this workspace, e.g. found done) and the total."""
    rows, total = ["| stage | wall time |", "|---|---|"], 0.0
    for label, rid, key in [("import and selection of the data", RUN_ID, "import"), *STAGE_ROWS]:
        v = clock.get(rid, key)
        if rid == FOLLOW and v is None:  # no follow-up (or not that far)
            continue
        if ":" not in key.partition(":")[2] and v:
            total += v
        rows.append(f"| {label} | {_dur(v)} |")
    rows.append(f"| **all stages** | **{_dur(total)}** |")
    return "\n".join(rows), total


# ====================================================================== projection of the full run


def _nnls2(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    from scipy.optimize import nnls

    coef, _ = nnls(x, y)
    return float(coef[0]), float(coef[1])


def measured_costs(store, ws: Workspace, clock: Timings) -> dict:
    """Unit costs measured in this workspace: seconds per judgment = a * prompt tokens / n (an item's n samples
    share its prefill) + b * generated tokens, fitted (non-negative least squares) on every stored judgment's
    share of its batch's wall time and on the meta-judge's timed ratings; training seconds per token (SFT,
    DPO: the trainer's own runtime over the tokens it saw); the overhead of each kind of stage (its wall time
    less the above: model loads, metrics); chars per prompt token; P(a sample hits gold), P(it misses by >=
    margin)."""
    from engine.metrics import round_half_up

    cfg = store.run(RUN_ID)["config"]
    n_of = {"train": cfg["sampling"]["n"], "baseline": cfg["evaluation"]["baseline_n"]}
    margin = cfg["curation"]["min_margin"]
    by_id = {it["item_id"]: it for d in store.datasets()["name"].to_list()
             for it in store.items(d).iter_rows(named=True)}
    xs: list[list[float]] = []
    ys: list[float] = []
    gen: dict[tuple[str, int, str], float] = {}  # generation seconds per (run, iteration, purpose)
    chars = toks = 0.0
    hits = misses = sampled = 0
    runs = [r for r in (RUN_ID, SINGLE) if r in runs_in(store)]
    for rid in runs:
        for it in store.iterations(rid):
            k = it["iteration"]
            j = store.judgments(rid, k).filter(pl.col("latency_s").is_not_null()
                                               & pl.col("prompt_tokens").is_not_null())
            for (purpose,), grp in j.group_by("purpose"):
                n = n_of.get(purpose, 1)
                xs += [[p / n, c] for p, c in zip(grp["prompt_tokens"], grp["completion_tokens"].fill_null(0),
                                                  strict=True)]
                ys += grp["latency_s"].to_list()
                gen[(rid, k, purpose)] = float(grp["latency_s"].sum())
                if purpose in ("eval", "train", "raw"):  # chars per token of absolute prompts
                    for iid, side, p in grp.filter(pl.col("sample_index") == 0).select(
                            "item_id", "side", "prompt_tokens").iter_rows():
                        if iid in by_id:
                            key = "response_b" if side == "b" else "response"
                            chars += _chars(absolute_messages(by_id[iid], response_key=key))
                            toks += p
                if purpose == "train":
                    scored = grp.filter(pl.col("score").is_not_null())
                    s_arr = scored["score"].to_numpy().astype(float)
                    g_arr = round_half_up(np.array([by_id[i]["gold_score"] for i in scored["item_id"]], dtype=float))
                    hits += int((s_arr == g_arr).sum())
                    misses += int((np.abs(s_arr - g_arr) >= margin).sum())
                    sampled += grp.height
    x, y = np.array(xs, dtype=float).reshape(-1, 2), np.array(ys, dtype=float)
    meta_s = clock.get(RUN_ID, "0:evaluate:meta-judge")
    ratings = store.meta_ratings(RUN_ID, 0, "baseline")
    if meta_s and ratings.height:
        rated = store.judgments(RUN_ID, 0, "baseline")
        rated = rated.filter(pl.col("judgment_id").is_in(ratings["judgment_id"].implode()))
        w = math.sqrt(ratings.height)  # one aggregate row that weighs as much as its ratings
        mean_p = float((rated["prompt_tokens"] + rated["completion_tokens"].fill_null(0)).mean())
        x = np.vstack([x, [mean_p * w, cfg["curation"]["meta_max_new_tokens"] * w]])
        y = np.append(y, meta_s / ratings.height * w)
    a, b = _nnls2(x, y) if len(y) >= 2 else (math.nan, math.nan)
    ratio = chars / toks if toks else 3.5

    sft_rate = math.nan
    dpo_runtime = dpo_tokens = 0.0
    overhead: dict[str, list[float]] = {"train": [], "evaluate": [], "sample": [], "curate": []}
    for rid in runs:
        rcfg = store.run(rid)["config"]
        L = rcfg["training"]["max_length"]
        for it in store.iterations(rid):
            k, tm = it["iteration"], it["train_metrics"] or {}
            wall = {s: clock.get(rid, f"{k}:{s}") for s in overhead}
            if k == 0 and "sft/runtime_s" in tm and rcfg.get("sft"):
                sft = rcfg["sft"]
                items = store.items(sft["dataset"]).head(sft["max_items"] or 10**9)
                tokens = sft["epochs"] * sum(
                    min(sft["max_length"], (_chars(absolute_messages(i)) + len(i["gold_feedback"] or "") + 12) / ratio)
                    for i in items.iter_rows(named=True))
                sft_rate = tm["sft/runtime_s"] / tokens if tokens else math.nan
                if wall["train"]:
                    overhead["train"].append(max(0.0, wall["train"] - tm["sft/runtime_s"]))
            if k > 0 and tm.get("train/runtime_s") and tm.get("train/pairs"):
                pairs = store.pairs(rid, k)
                tok = {jid: (p or 0) + (c or 0) for jid, p, c in store.judgments(rid, k, "train").select(
                    "judgment_id", "prompt_tokens", "completion_tokens").iter_rows()}
                seen = rcfg["training"]["epochs"] * sum(min(L, tok.get(c, 0)) + min(L, tok.get(r, 0))
                                                        for c, r in zip(pairs["chosen_id"], pairs["rejected_id"],
                                                                        strict=True))
                if seen:
                    dpo_runtime += tm["train/runtime_s"]
                    dpo_tokens += seen
                if wall["train"]:
                    overhead["train"].append(max(0.0, wall["train"] - tm["train/runtime_s"]))
            if wall["sample"] and k > 0:
                overhead["sample"].append(max(0.0, wall["sample"] - gen.get((rid, k, "train"), 0.0)))
            if wall["evaluate"] and (k > 0 or rcfg.get("evaluate_initial", True)):
                spent = sum(gen.get((rid, k, p), 0.0) for p in ("eval", "relative", "raw", "baseline"))
                spent += (meta_s or 0.0) if (rid, k) == (RUN_ID, 0) else 0.0
                overhead["evaluate"].append(max(0.0, wall["evaluate"] - spent))
            if wall["curate"] and k > 0:
                overhead["curate"].append(wall["curate"])
    return {"a_s_per_prompt_token": a, "b_s_per_generated_token": b, "judgments_fitted": int(len(ys)),
            "chars_per_token": ratio, "sft_s_per_token": sft_rate,
            "dpo_s_per_token": dpo_runtime / dpo_tokens if dpo_tokens else math.nan,
            "overhead_s": {s: (float(np.mean(v)) if v else 0.0) for s, v in overhead.items()},
            "p_hit_gold": hits / sampled if sampled else None, "p_miss": misses / sampled if sampled else None,
            "train_judgments": sampled}


def expected_pairs(n: int, cap: int, p_hit: float, p_miss: float) -> float:
    """E[min(cap, chosen, rejected)] per item for n samples, each hitting gold with p_hit and missing it by
    >= margin with p_miss (gold curation matches the k-th chosen with the k-th rejected)."""
    from math import comb

    q = p_miss / (1 - p_hit) if p_hit < 1 else 0.0
    total = 0.0
    for m in range(n + 1):
        pm = comb(n, m) * p_hit**m * (1 - p_hit) ** (n - m)
        for r in range(n - m + 1):
            total += pm * comb(n - m, r) * q**r * (1 - q) ** (n - m - r) * min(cap, m, r)
    return total


def _meta_suffix_chars() -> int:
    """Characters of a meta-judge prompt after the feedback's heading, less the feedback: its own part."""
    from engine.prompts import meta_messages

    heading = "###Feedback to rate:\n"
    text = meta_messages({"instruction": "i", "response": "r", "criteria": "c",
                          **{f"score{k}_description": "d" for k in range(1, 6)}}, "")[1]["content"]
    return len(text) - text.index(heading) - len(heading)


def project(costs: dict, data: Path, s: dict) -> dict:
    """Projected wall seconds of a run of sizes `s` on the machine `costs` were measured on, per stage."""
    from engine.relative import relative_requests

    a, b, ratio = costs["a_s_per_prompt_token"], costs["b_s_per_generated_token"], costs["chars_per_token"]
    over = costs["overhead_s"]
    sel = {name: chosen for name, (_r, chosen, _i) in selections(data, s).items()}
    L, ce, cs, N = s["max_length"], s["eval_new_tokens"], s["max_new_tokens"], s["baseline_n"]
    meta_own = _meta_suffix_chars() / ratio  # tokens of a meta prompt after the feedback's heading, bar the feedback

    def tok(c: float) -> float:
        return c / ratio

    abs_p = [tok(c) for name in EVAL_SETS for it in sel[name].iter_rows(named=True)
             for c in ([_chars(absolute_messages(it))] + ([_chars(absolute_messages(it, response_key="response_b"))]
                                                          if it["kind"] == "pairwise" else []))]
    rel_p = [tok(_chars(r.messages)) for name in EVAL_SETS[1:] for r in relative_requests(sel[name])] \
        if s["relative"] else []
    greedy = sum(a * p + b * ce for p in abs_p + rel_p) + over["evaluate"]
    train_p = [tok(_chars(absolute_messages(it))) for it in sel["cia-train"].iter_rows(named=True)]
    m = s["items_per_iteration"]
    hit, miss = costs["p_hit_gold"], costs["p_miss"]
    if hit is None or miss is None:
        hit, miss = 0.3, 0.5  # no sampled judgments measured: a guess, said so in the assumptions
    per_item = expected_pairs(s["n"], s["pairs_per_item"], hit, miss)
    per_item_ss = expected_pairs(s["n"], 2 * s["pairs_per_item"], hit, miss)
    mean_train_p = float(np.mean(train_p)) if train_p else 0.0

    def sample(ps: list[float]) -> float:
        return sum(a * p + s["n"] * b * cs for p in ps) + over["sample"]

    def dpo(pairs: float) -> float:
        return pairs * 2 * min(L, mean_train_p + cs) * costs["dpo_s_per_token"] + over["train"]

    sft_tokens = sum(min(L, tok(_chars(absolute_messages(it)) + len(it["gold_feedback"] or "") + 12))
                     for it in sel["cia-sft"].iter_rows(named=True)) * s["sft_epochs"]
    out = {
        "seed SFT": sft_tokens * costs["sft_s_per_token"] + over["train"],
        "seed evaluation, J_SFT": greedy,
        "baseline raw": sum(a * p + b * ce for p in abs_p),
        "baselines self-consistency / best-of-N sampling": sum(a * p + N * b * ce for p in abs_p),
        # an item's N ratings share its prompt up to the feedback (computed once), then feedback + meta rubric
        "baseline best-of-N meta-judge": sum(a * (p + N * (ce + meta_own)) + N * b * s["meta_new_tokens"]
                                             for p in abs_p),
    }
    for k in (1, 2):
        out[f"iteration {k} sample"] = sample(train_p[(k - 1) * m:k * m])
        out[f"iteration {k} curate"] = over["curate"]
        out[f"iteration {k} train ({per_item * m:.0f} pairs)"] = dpo(per_item * m)
        out[f"iteration {k} evaluate"] = greedy
    out["single-stage DPO sample"] = sample(train_p)
    out[f"single-stage DPO train ({per_item_ss * 2 * m:.0f} pairs)"] = dpo(per_item_ss * 2 * m)
    out["single-stage DPO evaluate"] = greedy
    total = sum(out.values())
    return {"stages_s": {k: round(v, 1) for k, v in out.items()}, "total_s": round(total, 1),
            "total_h": round(total / 3600, 2), "fits_150_min": bool(total <= 150 * 60),
            "judgments": {"eval_requests_per_judge": len(abs_p) + len(rel_p), "abs_requests": len(abs_p),
                          "train_samples_per_iteration": m * s["n"]},
            "pairs_per_item": round(per_item, 2),
            "assumptions": [
                "judgments run to their token budget (force_score); prompt tokens from the selected items' "
                f"characters at {ratio:.2f} chars/token",
                f"pairs per item from P(hit gold) {hit:.2f}, P(miss >= margin) {miss:.2f} of the measured samples",
                "the measuring machine's load; training cost linear in tokens (attention's square ignored)"]}


def projection_markdown(costs: dict, proj: dict, source: str) -> str:
    stages = "\n".join(f"| {k} | {v / 60:.1f} min |" for k, v in proj["stages_s"].items())
    return (f"Measured in {source}: {_fmt(costs['a_s_per_prompt_token'] * 1000)} ms per prompt token (prefill, "
            f"shared by an item's samples) + {_fmt(costs['b_s_per_generated_token'])} s per generated token "
            f"(fitted on {costs['judgments_fitted']} judgments); SFT {_fmt(costs['sft_s_per_token'] * 1000)} ms "
            f"and DPO {_fmt(costs['dpo_s_per_token'] * 1000)} ms per trained token (a DPO pair = 2 sequences); "
            f"overhead per stage {', '.join(f'{k} {v:.0f} s' for k, v in costs['overhead_s'].items())}.\n\n"
            f"| stage | projected |\n|---|---|\n{stages}\n| **total** | **{proj['total_s'] / 60:.0f} min "
            f"({proj['total_h']:.1f} h)** |\n\nFits 150 minutes: **{'yes' if proj['fits_150_min'] else 'no'}**. "
            "Assumptions: " + "; ".join(proj["assumptions"]) + ".")


# ====================================================================== the report


def figure(records: list[dict], path: Path) -> None:
    import plotly.graph_objects as go

    fig = go.Figure()
    for key, title in [("cia-heldout:pearson", "CIA held-out Pearson"), ("rb-chat:accuracy", "RB Chat (abs)"),
                       ("rb-chat-hard:accuracy", "RB Chat_Hard (abs)"), ("rb-chat:relative/accuracy", "RB Chat (A/B)"),
                       ("rb-chat-hard:relative/accuracy", "RB Chat_Hard (A/B)")]:
        ys, lo, hi = [], [], []
        for r in records:
            f = r["figures"][key]
            v = f["value"] if f["value"] is not None else float("nan")
            ys.append(v)
            lo.append(v - f["lo"] if f["lo"] is not None else 0)
            hi.append(f["hi"] - v if f["hi"] is not None else 0)
        fig.add_bar(name=title, x=[r["judge"] for r in records], y=ys,
                    error_y={"type": "data", "symmetric": False, "array": hi, "arrayminus": lo})
    fig.update_layout(barmode="group", title="Self-rationalization (SmolLM2-135M): each judge, 95% intervals",
                      yaxis_title="value", template="plotly_white")
    fig.write_html(path, include_plotlyjs=True)


def sizes_line(s: dict, setup: dict) -> str:
    info = setup.get("datasets", {})

    def dropped(name):
        i = info.get(name, {})
        return (f"{i.get('dropped_shared_prompt', '?')} of its {i.get('source_items', '?')} items dropped for a prompt "
                f"shared with the train file")

    return (f"Seed SFT: {s['sft_items']} CIA items (cia-sft) x {s['sft_epochs']:g} epoch(s), lr {s['sft_lr']:g}. "
            f"Iterations: 2 x {s['items_per_iteration']} fresh items (cia-train, no prompt shared with the SFT items) "
            f"x {s['n']} judgments ({s['max_new_tokens']} tokens), gold curation (margin {s['min_margin']}, up to "
            f"{s['pairs_per_item']} pairs per item), DPO ({s.get('dpo_loss', 'sigmoid')}) lr {s['dpo_lr']:g}, "
            "reference = previous judge. "
            f"Evaluation, greedy, {s['eval_new_tokens']} tokens: held-out CIA BiGGen {s['cia_items']} items "
            f"({dropped('cia-heldout')}), RewardBench Chat and Chat_Hard {s['rb_items']} pairs each "
            f"({dropped('rb-chat')}; {dropped('rb-chat-hard')}), each side scored (abs)"
            f"{' and A/B in both orders' if s['relative'] else ''}. Baselines: raw, length, expected score, "
            f"self-consistency and best-of-N with N = {s['baseline_n']}, single-stage DPO. Intervals: "
            f"{s['bootstrap']} bootstrap resamples (table 1), {s['compare_bootstrap']} paired (table 2); max length "
            f"{s['max_length']}; items selected by `{s['selection']}`." + follow_up_line(setup))


def follow_up_line(setup: dict) -> str:
    follow = setup.get("follow_up")
    if not follow:
        return ""
    return (f"\n\nFollow-up run (`{FOLLOW}`): {follow['iterations']} iteration(s) from the same J_SFT on the same "
            f"train slices, seeds and evaluation, with one change: {follow_up_label(follow['changes'])}.")


class ReadCache:
    """The store, with the reads the report repeats (each opens a connection) remembered: ~70 paired
    comparisons read the same judges' judgments over and over. Read-only use only; results are copies."""

    CACHED = {"items", "judgments", "run", "iteration", "iterations", "judged_items", "meta_ratings",
              "dataset_kind", "datasets", "runs", "run_status", "run_reports", "pairs"}

    def __init__(self, store):
        self._store, self._memo = store, {}

    def __getattr__(self, name):
        attr = getattr(self._store, name)
        if name not in self.CACHED:
            return attr

        def read(*args, **kw):
            key = (name, args, tuple(sorted(kw.items())))
            if key not in self._memo:
                self._memo[key] = attr(*args, **kw)
            value = self._memo[key]
            return copy.deepcopy(value) if isinstance(value, dict | list) else value
        return read


def report(ws: Workspace, out: Path, setup: dict, clock: Timings, preset: str, data: Path, wall_s: float,
           with_machine: bool = True) -> dict:
    """Write replicate.md / .json / .html to `out` from what the workspace holds; returns the summary."""
    store = ReadCache(ws.store())
    s = setup["sizes"]
    status = store.run_status(RUN_ID) if RUN_ID in runs_in(store) else {"status": "not started", "iterations": []}
    judges = judges_of(setup)
    records = judge_table(store, s["bootstrap"], judges)
    paired = paired_table(store, s["compare_bootstrap"], judges=judges)
    diag = diagnostics(store, ws)
    times, total = timings_markdown(clock)
    mach = machine() if with_machine else {}
    precisions = stored_precisions(store)
    costs = proj = None
    try:
        costs = measured_costs(store, ws, clock)
        proj = project(costs, data, PRESETS["full"])
    except Exception as e:  # e.g. a workspace without finished stages has nothing to measure yet
        print(f"replicate: no projection of the full run: {type(e).__name__}: {e}", file=sys.stderr)
    stages_done = {it["index"]: it["stages"] for it in status["iterations"]}
    quick_note = ("**--quick run: it proves the script end to end; with n this small (and the shortest items of "
                  "each set) its figures mean nothing.**\n\n" if preset == "quick" else "")
    text = f"""# Does the loop improve the judge? (bench/replicate.py, preset {preset})

{quick_note}{sizes_line(s, setup)}

Run status: {status['status']}; stages {json.dumps(stages_done)}. Wall time of this session {wall_s / 60:.1f} min,
of all stages over all sessions {total / 60:.1f} min.

## Table 1: each judge (95% bootstrap intervals; n = items, or pairs)

Pearson and Spearman are over the items with a score (n_scored); exact / within-1 count a missing score as
wrong; RewardBench accuracy counts ties and failures as wrong. A/B = relative judging in both orders (a
disagreement is a tie); baselines judge each side only.

{judge_markdown(records)}

## Table 2: paired differences, B - A on the same items (engine.compare)

delta [95% paired-bootstrap interval] p n; **bold**: the interval excludes 0. Correlations are over the items
both judges scored. A/B cells compare the judges' A/B verdicts (J_SFT, single-stage DPO, the iterations).

{paired_markdown(paired)}

## Diagnostics (from the stored data)

Score shares are % of scored judgments for 1/2/3/4/5; entropy is the mean entropy of the stored 1-5
distribution at the score position (ln 5 = 1.609 is uniform).

{diagnostics_markdown(diag)}

## Wall time per stage

{times}

## Machine

{json.dumps(mach)}; precision of the stored judgments / training per run and iteration: {json.dumps(precisions)}.
"""
    if proj is not None:
        text += (f"\n## Projection of the full configuration on this machine\n\n"
                 f"{projection_markdown(costs, proj, 'this workspace')}\n")
    out.mkdir(parents=True, exist_ok=True)
    (out / "replicate.md").write_text(text)
    full = {"preset": preset, "setup": setup, "status": status, "table1": records, "table2": paired,
            "diagnostics": diag, "timings": clock.data, "machine": mach, "precisions": precisions,
            "costs": costs, "projection": proj}
    (out / "replicate.json").write_text(json.dumps(full, default=str, indent=1))
    with contextlib.suppress(Exception):
        figure(records, out / "replicate.html")
    headline = {r["judge"]: {k: r["figures"][k]["value"] for k in ("cia-heldout:pearson", "rb-chat:accuracy",
                                                                    "rb-chat-hard:accuracy")} for r in records}
    vs_sft = [{"b": r["b"], "cell": cell, **{k: f[k] for k in ("delta", "lo", "hi", "p", "n", "excludes_0")}}
              for r in paired if r["a"].startswith("J_SFT (seed") for cell, f in r["cells"].items() if f]
    return {"bench": "replicate", "preset": preset, "status": status["status"], "out": str(out),
            "workspace": str(ws.root), "session_wall_s": round(wall_s, 1), "stages_wall_s": round(total, 1),
            "judges": headline, "paired_vs_J_SFT": vs_sft,
            "projection_full": None if proj is None else {"total_min": round(proj["total_s"] / 60, 1),
                                                          "fits_150_min": proj["fits_150_min"]},
            "machine": {k: mach.get(k) for k in ("cpu", "cores", "amx", "avx512_bf16", "auto_precision_cpu",
                                                 "load_avg_1m")}}


# ====================================================================== command line


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workspace", type=Path, help="default: bench/results/replicate-ws; --quick: OUT/ws")
    p.add_argument("--out", type=Path, help="default: bench/results; --quick: a new temporary directory")
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--quick", action="store_true", help="Tiny sizes (a few items, short budgets), end to end.")
    p.add_argument("--resume", action="store_true", help="Continue the workspace's run where it stopped.")
    p.add_argument("--refresh", action="store_true",
                   help="Recompute every figure from the stored judgments (after a change to the metrics; "
                        "nothing is generated again), then write the report.")
    p.add_argument("--report-only", action="store_true", help="Write the report from the workspace; run nothing.")
    p.add_argument("--estimate", action="store_true",
                   help="Project the full configuration's wall time (or the sizes given) from the unit costs "
                        "measured in --workspace (e.g. a --quick run's); run nothing.")
    add_size_flags(p)
    p.add_argument("--follow-up", action="store_true",
                   help="Run (or resume) the workspace's follow-up: iterations from the same J_SFT, train slices, "
                        "seeds and evaluation with the loop sizes given as flags changed (e.g. --dpo-lr 1e-4), "
                        "reported beside the first run. It needs the first run's seed SFT done.")
    p.add_argument("--follow-up-iterations", type=int, default=2, help="iterations of the follow-up (default 2)")
    p.add_argument("--model", default="embedded", help="The judge to start from (default: the embedded SmolLM2).")
    return p.parse_args(argv)


def add_size_flags(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    """One flag per size of PRESETS (bar `skip`), default None (= the preset's), and --no-relative: read
    back with sizes_of."""
    for key, value in PRESETS["full"].items():
        if key in ("selection", "relative", *skip):
            continue
        p.add_argument("--" + key.replace("_", "-"), type=type(value), default=None, choices=SIZE_CHOICES.get(key),
                       help=f"{SIZE_HELP[key]} (full {value}, quick {PRESETS['quick'][key]})")
    p.add_argument("--no-relative", action="store_true", help="Skip the A/B mode on RewardBench.")


def sizes_of(a: argparse.Namespace, preset: str) -> tuple[dict, dict]:
    """The sizes (preset, overridden by the flags given) and the flags given."""
    given = {k: getattr(a, k) for k in PRESETS["full"] if getattr(a, k, None) is not None}
    if a.no_relative:
        given["relative"] = False
    return {**PRESETS[preset], **given}, given


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def prepare(ws: Workspace, data: Path, sizes: dict, preset: str, model: str, clock: Timings) -> dict:
    """A new workspace's datasets (the selected items), its setup file and the run; returns the setup. Also
    finishes a start that was interrupted between the import and the run (the setup file is there)."""
    from engine.iteration import create_run

    store = ws.store()
    path = ws.root / SETUP_FILE
    if path.is_file():
        setup = json.loads(path.read_text())
    else:
        t = time.perf_counter()
        datasets = import_data(store, data, sizes)
        setup = {"preset": preset, "model": model, "sizes": sizes, "datasets": datasets,
                 "created": time.strftime("%Y-%m-%d %H:%M")}
        path.write_text(json.dumps(setup, indent=1))
        clock.add(RUN_ID, "import", time.perf_counter() - t)
    if RUN_ID not in runs_in(store):
        create_run(ws, parse_run_config(config(setup["sizes"], setup.get("model", "embedded")), "replicate"), RUN_ID)
    return setup


def main(argv: list[str] | None = None, sampler_factory=None) -> dict:
    a = parse(argv)
    started = time.time()
    preset = "quick" if a.quick else "full"
    if a.quick:
        out = a.out or Path(tempfile.mkdtemp(prefix="selfrat-replicate-quick-"))
        if (out.resolve() / "replicate.md") == (ROOT / "bench" / "results" / "replicate.md").resolve():
            die("--quick does not write over bench/results/replicate.md (the full run's report): pick another --out")
        workspace = a.workspace or out / "ws"
    else:
        out, workspace = a.out or ROOT / "bench" / "results", a.workspace or ROOT / "bench" / "results" / "replicate-ws"
    sizes, given = sizes_of(a, preset)

    if a.estimate:
        if not (workspace / SETUP_FILE).is_file():
            die(f"{workspace} holds no replication run to measure costs from: run `python bench/replicate.py "
                "--quick` first (its workspace is OUT/ws), then --estimate --workspace OUT/ws")
        ws = Workspace.open(workspace)
        sizes = {**PRESETS["full"], **given}
        with contextlib.redirect_stdout(sys.stderr):
            costs = measured_costs(ws.store(), ws, Timings(ws.root / TIMINGS_FILE))
            try:
                proj = project(costs, a.data, sizes)
            except TooFew as e:
                die(str(e))
            print(projection_markdown(costs, proj, str(workspace)))
        summary = {"bench": "replicate", "estimate": proj, "costs": costs, "sizes": sizes, "workspace": str(workspace)}
        print(json.dumps(summary, default=str))
        return summary

    if a.follow_up and (a.resume or a.report_only or a.refresh):
        die("--follow-up runs, or continues, the follow-up by itself (and then writes the report): give it without "
            "--resume, --report-only or --refresh")
    setup_path = workspace / SETUP_FILE
    ws = Workspace.open(workspace)
    store = ws.store()
    has_run = RUN_ID in runs_in(store)
    if a.report_only or a.refresh:
        if not has_run:
            die(f"{workspace} holds no replication run (nothing to report or refresh)")
    elif a.follow_up:
        pass  # checked below
    elif a.resume:
        if not setup_path.is_file():
            die(f"nothing to resume in {workspace} (no {SETUP_FILE}): start a run without --resume")
    elif has_run or setup_path.is_file():
        st = store.run_status(RUN_ID)["status"] if has_run else "data imported, not started"
        die(f"{workspace} already holds a replication run (status: {st}). Continue it with --resume, or start "
            "afresh with another --workspace (or after deleting that directory).")
    elif set(store.datasets()["name"].to_list()) & {"cia-sft", "cia-train", *EVAL_SETS}:
        die(f"{workspace} holds datasets of an earlier replication (an older version of this script?): start "
            "afresh with another --workspace")
    if not a.report_only:
        for rid in RUNS:
            run = store.run(rid) if rid in runs_in(store) else {}
            pid = run.get("pid")
            if run.get("status") == "running" and pid and pid != os.getpid() and _alive(pid):
                die(f"process {pid} is running {rid} in {workspace} now: wait for it, or stop it (its stages "
                    "resume from where they stop)")
    if a.follow_up:
        if not setup_path.is_file() or not has_run:
            die(f"{workspace} holds no replication run to follow up: run the replication first")
        setup = json.loads(setup_path.read_text())
        follow = {"changes": given, "iterations": a.follow_up_iterations}
        stored = setup.get("follow_up")
        if stored and given and stored != follow:
            die(f"{workspace} holds a follow-up already ({follow_up_label(stored['changes'])}, {stored['iterations']} "
                "iteration(s)); continue it with --follow-up and no size flags, or use another workspace")
        if not stored:
            try:
                follow_up_config(store, given, a.follow_up_iterations)  # refuse a bad change before storing it
            except ValueError as e:
                die(str(e))
            setup["follow_up"] = follow
            setup_path.write_text(json.dumps(setup, indent=1))
    clock = Timings(ws.root / TIMINGS_FILE)
    with contextlib.redirect_stdout(sys.stderr):  # stdout: the one JSON line
        if setup_path.is_file() or not has_run:
            try:
                setup = prepare(ws, a.data, sizes, preset, a.model, clock)
            except TooFew as e:
                die(str(e))
        else:  # a run made by an older version of this script (no setup file): report what it holds
            setup = {"preset": "?", "sizes": {**sizes, "selection": "?"}, "datasets": {}}
        differ = {k: (setup["sizes"].get(k), v) for k, v in given.items() if setup["sizes"].get(k) != v}
        if differ and (a.resume or a.report_only or a.refresh) and not a.follow_up:
            print(f"replicate: the stored run keeps its sizes; ignored (stored, given): {differ}", file=sys.stderr)
        if not a.report_only:
            from store.errors import Cancelled

            try:
                if a.follow_up:
                    run_follow_up(ws, clock, setup["follow_up"], sampler_factory=sampler_factory)
                else:
                    run_experiment(ws, clock, sampler_factory=sampler_factory, refresh=a.refresh)
            except Cancelled as e:
                clock.save()
                again = " ".join(["python bench/replicate.py", *(["--quick"] if a.quick else []),
                                  "--follow-up" if a.follow_up else "--resume",
                                  "--workspace", str(workspace), "--out", str(out)])
                die(f"interrupted ({e}); every finished stage is stored. Continue with: {again}", code=130)
        clock.data["sessions"].append({"start": time.strftime("%Y-%m-%d %H:%M", time.localtime(started)),
                                       "wall_s": round(time.time() - started, 1),
                                       "argv": list(sys.argv[1:] if argv is None else argv)})
        clock.save()
        summary = report(ws, out, setup, clock, setup.get("preset", preset), a.data, time.time() - started,
                         with_machine=sampler_factory is None)
    print(json.dumps(summary, default=str))
    return summary


if __name__ == "__main__":
    main()
