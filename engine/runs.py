"""What a command does to a run, as engine functions: start, resume (amending its config), one stage, curate
again with other settings, evaluate (an iteration, or any model standalone). The CLI calls one of these per
command and prints; `engine.jobs` starts the same commands as processes for the app.

    from engine import runs
    runs.start_run(ws, "run.yaml", "first")                   # selfrat run run.yaml --run-id first
    runs.resume_run(ws, "first", iterations=3)                # selfrat resume first --iterations 3
    runs.curate(ws, "first", 1, min_margin=2, dry_run=True)   # selfrat curate --run first --iteration 1 ...
    runs.evaluate(ws, model="embedded", datasets=["demo"])    # selfrat evaluate --model embedded --dataset demo

A run's config has three copies; only the store's is ever read back (see `save_run_config`).

This module stays light (the app imports it through `engine.jobs`): the runner, and with it torch, is
imported inside the functions that run stages.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable, TextIO

import yaml
from pydantic import ValidationError

from engine.config import (
    ConfigError,
    CurationConfig,
    RunConfig,
    format_validation_error,
    load_run_config,
    parse_run_config,
)
from engine.workspace import RunLog, Workspace
from store import Store, StoreError
from store.errors import UsageError

# A run id becomes a directory name under runs/ and a CLI argument: plain characters, no path.
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# What a later iteration may change; everything else decides what the run's numbers mean.
AMENDABLE = ("iterations", "sampling", "curation", "training", "evaluation")
# `selfrat evaluate --method`: what a standalone evaluation can run.
EVALUATE_METHODS = ("greedy", "expected", "self-consistency", "best-of-n", "relative")
# The stages `selfrat sample|train` run on their own (curate and evaluate have their own functions).
STAGES = ("sample", "train")
# Set (to the run id) in the environment of a stage the runner runs as a child process (backend vllm, see
# Runner.run_stage): that `selfrat evaluate --run` logs its progress to run.log as the runner itself would,
# and that `selfrat curate` does not take its own runner for another job of the run.
STAGE_PROCESS_ENV = "SELFRAT_STAGE_OF_RUN"


# ------------------------------------------------------------------ ids and configs


def check_run_id(run_id: str | None) -> str:
    """`run_id` if it is a plain name (letters, digits, '.', '_', '-'; starting with a letter or digit), else
    ConfigError: no '..', no slash or backslash, no absolute path, not empty, no leading dot."""
    if not RUN_ID.match(run_id or ""):
        raise ConfigError(f"run id {run_id!r}: use letters, digits, '.', '_' and '-' (start with a letter or digit)")
    return run_id


def save_run_config(run_dir: str | Path, cfg: RunConfig | dict, name: str = "config.yaml") -> Path:
    """Write a run config as YAML to `run_dir/name`; every writer of a config file goes through here.

    A run's config has three copies, and only the first is ever read back:
    1. the store's (`runs.config`, written by `Store.create_run` / `Store.update_run_config`): the one the
       runner, `selfrat resume`, every stage, `status` and the app READ;
    2. `runs/<id>/config.yaml` (this function, from `create_run` and whenever the store's copy changes):
       for humans, what the run ran with;
    3. `configs/<name>.yaml` (this function, from `engine.jobs` before a launch): the file the job's command
       names (`selfrat run configs/<id>.yaml`, `selfrat resume --config configs/<id>-iterK.yaml`), read once
       by that command.
    Editing 2 or 3 changes nothing about an existing run: `selfrat resume --config` amends it.
    """
    data = cfg.model_dump(mode="json") if isinstance(cfg, RunConfig) else cfg
    path = Path(run_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def done_iterations(store: Store, run_id: str) -> int:
    """How many iterations after the seed are complete (evaluated), counting from 1 without gaps."""
    done = 0
    for it in store.iterations(run_id):
        if it["iteration"] == done + 1 and it["evaluate_status"] == "done":
            done += 1
    return done


def amend_config(stored: dict, cfg: RunConfig | None = None, iterations: int | None = None,
                 done: int = 0) -> RunConfig:
    """The run's config for its remaining iterations: `cfg` may replace the fields in AMENDABLE only (the
    model and datasets define the run), and `iterations` never drops below the `done` ones."""
    merged = dict(stored)
    if cfg is not None:
        new = cfg.model_dump(mode="json")
        old = RunConfig.model_validate(stored).model_dump(mode="json")
        changed = [k for k in new if k not in AMENDABLE and new[k] != old.get(k)]
        if changed:
            detail = ", ".join(f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in changed)
            raise ConfigError(f"a run keeps its {', '.join(changed)} ({detail}); only "
                              f"{', '.join(AMENDABLE)} can change between iterations: start a new run instead")
        merged.update({k: new[k] for k in AMENDABLE})
    if iterations is not None:
        merged["iterations"] = iterations
    merged["iterations"] = max(int(merged["iterations"]), done)
    try:
        return RunConfig.model_validate(merged)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, "amended run config")) from None


def _refuse_other_job(ws: Workspace, run_id: str) -> None:
    """StoreError while a job of this run runs in another process (this process may be that job, or a stage
    that job's runner started as a child process)."""
    from engine import jobs  # jobs imports this module

    if os.environ.get(STAGE_PROCESS_ENV) == run_id:
        return
    job = jobs.current(ws.root, run_id)
    if job is not None and job.pid != os.getpid():
        raise StoreError(f"run {run_id} is running as job pid {job.pid}; cancel it first")


def _replace_config(ws: Workspace, run: dict, new: dict, message: str) -> None:
    """Store a run's new config (the copy that is read), mirror it into its run dir and log `message`."""
    ws.store().update_run_config(run["run_id"], new)
    run_dir = Path(run["run_dir"] or ws.run_dir(run["run_id"]))
    save_run_config(run_dir, new)
    RunLog(run_dir, echo=False)(message)


# ------------------------------------------------------------------ whole runs


def start_run(ws: Workspace, config: str | Path, run_id: str | None = None,
              echo: Callable[[str], None] = print) -> dict:
    """`selfrat run`: record a new run from a config file (`echo` gets "run <id>" once it is recorded), run
    it to the end and return its status."""
    from engine.iteration import Runner, create_run

    rid = create_run(ws, load_run_config(config), run_id)
    echo(f"run {rid}")
    Runner(ws, rid).run_all()
    return ws.store().run_status(rid)


def amend_run(ws: Workspace, run_id: str, iterations: int | None = None, config: str | Path | None = None) -> list[str]:
    """Give a run a new config before it continues: `iterations` and/or the AMENDABLE parts of the config
    file `config`. Returns what changed (empty: nothing to write), logged in its run.log."""
    store = ws.store()
    run = store.run(run_id)
    old = run["config"]
    new = amend_config(old, load_run_config(config) if config else None, iterations,
                       done_iterations(store, run_id)).model_dump(mode="json")
    changes = [f"{k}: {old.get(k)} -> {new[k]}" for k in new if new[k] != old.get(k)]
    if changes:
        _replace_config(ws, run, new, f"config updated{' from ' + str(config) if config else ''}; "
                        + "; ".join(changes))
    return changes


def resume_run(ws: Workspace, run_id: str, iterations: int | None = None, config: str | Path | None = None) -> dict:
    """`selfrat resume`: continue a stopped or failed run from where its stored rows end, after amending it
    (`amend_run`) when `iterations` or `config` is given; refused while a job of it runs elsewhere."""
    from engine.iteration import Runner

    _refuse_other_job(ws, run_id)
    if iterations is not None or config is not None:
        amend_run(ws, run_id, iterations, config)
    Runner(ws, run_id).run_all()
    return ws.store().run_status(run_id)


def run_stage(ws: Workspace, run_id: str, stage: str, iteration: int) -> dict | None:
    """`selfrat sample|train`: one stage of one iteration (a no-op when done); SIGTERM/SIGINT cancel it."""
    from engine.iteration import Runner

    if stage not in STAGES:
        raise UsageError(f"stage {stage!r}: expected one of {', '.join(STAGES)}")
    runner = Runner(ws, run_id)
    with runner.handling_signals():
        return getattr(runner, stage)(iteration)


# ------------------------------------------------------------------ curation


def curate(ws: Workspace, run_id: str, iteration: int, *, strategy: str | None = None, min_margin: int | None = None,
           max_pairs_per_item: int | None = None, dry_run: bool = False, echo: bool = True) -> dict:
    """`selfrat curate`: the curation report of a sampled iteration under the run's curation settings with
    these overrides. `dry_run` writes nothing (the app's preview); otherwise see `curate_again`."""
    store = ws.store()
    stored = store.run(run_id)["config"].get("curation") or {}
    sample_status = store.iteration(run_id, iteration)["sample_status"]
    if sample_status != "done":
        raise StoreError(
            f"iteration {iteration} of {run_id} is not sampled (sample: {sample_status}); nothing to curate"
        )
    overrides = {"strategy": strategy, "min_margin": min_margin, "max_pairs_per_item": max_pairs_per_item}
    try:
        cfg = CurationConfig.model_validate({**stored, **{k: v for k, v in overrides.items() if v is not None}})
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, "curate options")) from None
    if dry_run:
        from engine.curation import preview

        return preview(store, run_id, iteration, cfg)
    return curate_again(ws, run_id, iteration, cfg, echo=echo)


def curate_again(ws: Workspace, run_id: str, iteration: int, cfg: CurationConfig, echo: bool = True) -> dict:
    """Curate an iteration with `cfg`: settings that differ from the run's are saved in its config and the
    iteration's pairs are dropped first (refused once they were reviewed or trained on); the same settings
    on a curated iteration change nothing. Returns the curation report."""
    from engine.iteration import Runner

    store = ws.store()
    _refuse_other_job(ws, run_id)
    run = store.run(run_id)
    old = CurationConfig.model_validate(run["config"].get("curation") or {}).model_dump(mode="json")
    new = cfg.model_dump(mode="json")
    if new != old:
        train_status = store.iteration(run_id, iteration)["train_status"]
        if train_status in ("done", "skipped"):
            raise StoreError(
                f"iteration {iteration} of {run_id} is trained on its current pairs (train: {train_status});"
                " curating it again would leave them out of step with its checkpoint. Compare settings with"
                " --dry-run, or start a new run")
        dropped = store.reset_curation(run_id, iteration)  # refuses when humans reviewed pairs
        config = parse_run_config({**run["config"], "curation": new}, "curate options").model_dump(mode="json")
        changes = "; ".join(f"curation.{k}: {old.get(k)} -> {v}" for k, v in new.items() if v != old.get(k))
        _replace_config(ws, run, config, f"config updated by selfrat curate; {changes};"
                                         f" iteration {iteration}: {dropped} pairs dropped to curate again")
    runner = Runner(ws, run_id, echo=echo)
    with runner.handling_signals():
        return runner.curate(iteration)


# ------------------------------------------------------------------ evaluation


def standalone_eval_config(model: str, datasets: list[str], methods: list[str] | tuple[str, ...] = ("greedy",), *,
                           n: int = 5, split: str = "eval", max_items: int | None = None,
                           backend: str = "transformers", max_new_tokens: int = 256, force_score: bool | None = None,
                           bootstrap: int = 1000) -> RunConfig:
    """The config of an evaluate-only run (`selfrat evaluate --model M --dataset D --method ...`): greedy and
    expected are one greedy pass (pairwise data: each side scored), self-consistency / best-of-n are
    baselines with `n` samples, relative judges A/B on pairwise data."""
    if not model or not datasets:
        raise UsageError("standalone evaluate needs --model and --dataset or --suite (or --run and --iteration)")
    unknown = sorted(set(methods) - set(EVALUATE_METHODS))
    if unknown:
        raise UsageError(f"--method {', '.join(unknown)}: unknown; choose from {', '.join(EVALUATE_METHODS)}")
    greedy = bool({"greedy", "expected"} & set(methods))
    return parse_run_config({
        "model": model, "eval_datasets": list(datasets), "iterations": 0, "eval_split": split,
        "max_eval_items": max_items,
        "sampling": {"backend": backend, "max_new_tokens": max_new_tokens, "force_score": force_score},
        "evaluation": {
            "greedy": greedy, "bootstrap": bootstrap, "baseline_n": n,
            "baselines": [m for m in ("self-consistency", "best-of-n") if m in methods],
            "pairwise_modes": ["absolute"] * greedy + ["relative"] * ("relative" in methods),
        },
    }, "evaluate options")


def evaluate(ws: Workspace, *, run_id: str | None = None, iteration: int | None = None, model: str | None = None,
             datasets: list[str] | tuple[str, ...] = (), suite: str | None = None,
             methods: list[str] | tuple[str, ...] = ("greedy",), n: int = 5, split: str = "eval",
             max_items: int | None = None, backend: str | None = None, max_new_tokens: int = 256,
             force_score: bool | None = None, bootstrap: int = 1000, echo: bool = True,
             notify: Callable[[str], None] | None = None, progress: TextIO | None = None) -> dict:
    """`selfrat evaluate`: iteration `iteration` of run `run_id` (on `datasets`/`suite`, else the run's eval
    sets), or standalone `model` on `datasets`/`suite` as a new evaluate-only run. `notify` gets one line
    naming the run and its log before the work starts; progress lines (per batch, with an ETA) go to
    `progress` (default stderr). `backend`: the sampling backend (None: the run's, standalone transformers).
    Returns {"run_id", "iteration", "metrics": {dataset: {metric: value}}}."""
    notify = notify or (lambda line: None)
    datasets = list(datasets)
    if suite:
        from engine.suites import suite_datasets

        datasets += [d for d in suite_datasets(suite, ws.store().datasets()["name"].to_list()) if d not in datasets]
    if run_id is not None and iteration is None:
        raise UsageError("--run needs --iteration")
    # Bad options fail before the runner (and torch) is imported.
    cfg = None if run_id is not None else standalone_eval_config(
        model, datasets, methods, n=n, split=split, max_items=max_items, backend=backend or "transformers",
        max_new_tokens=max_new_tokens, force_score=force_score, bootstrap=bootstrap)
    from engine.iteration import ProgressLines, Runner, check_split_has_items, create_run

    # A stage child of a run (backend vllm) logs progress into run.log like its runner; else lines on stderr.
    on_progress = None if run_id and os.environ.get(STAGE_PROCESS_ENV) == run_id else ProgressLines(progress)
    if cfg is None:
        runner = Runner(ws, run_id, echo=echo, on_progress=on_progress)
        if backend and backend != runner.cfg.sampling.backend:  # this evaluation only; the run keeps its own
            try:
                runner.cfg.sampling.backend = backend
            except ValidationError as e:
                raise ConfigError(format_validation_error(e, f"--backend {backend} with run {run_id}")) from None
        check_split_has_items(ws.store(), datasets or runner.cfg.eval_datasets, runner.cfg.eval_split,
                              how=f"evaluate another dataset (run {run_id} evaluates its eval_split)")
        notify(f"evaluate: run {run_id} iteration {iteration}; full log in {runner.run_dir / 'run.log'}")
        with runner.handling_signals():
            metrics = (runner.evaluate_datasets(iteration, datasets, max_items) if datasets
                       else runner.evaluate(iteration))
        return {"run_id": run_id, "iteration": iteration, "metrics": metrics}
    check_split_has_items(ws.store(), datasets, cfg.eval_split)  # before anything is recorded
    rid = create_run(ws, cfg, kind="evaluate")
    notify(f"evaluate: run {rid}; full log in {ws.run_dir(rid) / 'run.log'}")
    Runner(ws, rid, echo=echo, on_progress=on_progress).run_all()
    return {"run_id": rid, "iteration": 0, "metrics": ws.store().run_status(rid)["iterations"][0]["metrics"]}


__all__ = [
    "AMENDABLE", "EVALUATE_METHODS", "amend_config", "amend_run", "check_run_id", "curate", "curate_again",
    "done_iterations", "evaluate", "resume_run", "run_stage", "save_run_config", "standalone_eval_config",
    "start_run",
]
