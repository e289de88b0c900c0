"""The iteration runner: seed evaluation, then K x (sample -> curate -> train -> evaluate).

Iteration 0 evaluates the seed judge. Iteration k samples training judgments with the judge of iteration
k-1, curates pairs, trains checkpoint k with DPO and evaluates it. Every stage records its status in the
store: a stage marked done is skipped when run again, and a stage that was interrupted picks up where its
stored rows end (judgments are keyed by item and sample index; pairs and metrics are idempotent writes).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import polars as pl

from engine.config import RunConfig
from engine.curation import curate
from engine.evaluation import eval_requests
from engine.judging import JudgeRequest, sample_and_store
from engine.models import EMBEDDED, resolve_model
from engine.prompts import absolute_messages, format_judgment
from engine.runs import STAGE_PROCESS_ENV, check_run_id, save_run_config
from engine.sampling import Sampler, SamplingParams, make_sampler
from engine.workspace import RunLog, Workspace
from store import Store, StoreError
from store.errors import Cancelled

# The figures a finished evaluation writes to the run log, for each method (everything is in the store).
LOGGED = ("pearson", "exact", "within1", "accuracy", "parse_failure_rate")


def _split(split: str | None) -> str | None:
    return None if split in (None, "all") else split


def check_split_has_items(store: Store, datasets: list[str], split: str, how: str = "pass --split {other}") -> None:
    """Raise StoreError (one line) when a dataset holds no items in `split` ("all": none at all), naming the
    dataset, the split and what the other split holds, so an evaluation never runs on nothing (n=0, NaN).
    `how` says how to pick the other split ({other} is filled in)."""
    counts = {r["name"]: r for r in store.datasets().iter_rows(named=True)}
    for name in datasets:
        store.dataset_kind(name)  # raises naming a missing dataset
        row = counts[name]
        have = {"train": int(row["train"] or 0), "eval": int(row["eval"] or 0)}
        if split in (None, "all"):
            if not sum(have.values()):
                raise StoreError(f"dataset {name} has no items; import some first "
                                 f"(selfrat import FILE --dataset {name})")
            continue
        if have.get(split, 0):
            continue
        other = "train" if split == "eval" else "eval"
        raise StoreError(f"dataset {name} has no {split} items (it holds {have[other]} {other} items); import with "
                         f"--split {split}, or " + how.replace("{other}", other))


class ProgressLines:
    """A runner's progress as plain lines on stderr, one per batch, so stdout stays clean for --json:
    "[iter 0] evaluate demo (eval): 8/20 done, 12s elapsed, ETA 18s". The ETA is the pace since this
    stage started in this process (work found done on resume does not count). Lines go through
    `tqdm.write`, so they print above a live tqdm bar instead of through it."""

    def __init__(self, stream=None):
        self.stream = stream
        self._start: dict[tuple, tuple[float, int]] = {}
        self._last: dict[tuple, int] = {}

    def __call__(self, iteration: int, stage: str, done: int, total: int, **extra) -> None:
        from tqdm import tqdm

        key = (iteration, stage, *extra.values())
        if not total or self._last.get(key) == done:
            return
        now = time.monotonic()
        if done < self._last.get(key, 0):  # the same stage again (e.g. the next dataset): a new pass
            self._start.pop(key, None)
        t0, d0 = self._start.setdefault(key, (now, done))
        self._last[key] = done
        what = " ".join(str(v) for k, v in extra.items() if k != "method")
        method = f" ({extra['method']})" if "method" in extra else ""
        line = f"[iter {iteration}] {stage}{' ' + what if what else ''}{method}: {done}/{total} done"
        if done > d0:
            elapsed = now - t0
            line += f", {_duration(elapsed)} elapsed"
            if done < total:
                line += f", ETA {_duration(elapsed / (done - d0) * (total - done))}"
        tqdm.write(line, file=self.stream or sys.stderr)
        (self.stream or sys.stderr).flush()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def contamination_report(store: Store, cfg: RunConfig) -> dict:
    """Which training inputs (train items, seed-SFT items) also occur in an evaluated eval set, by
    instruction + response (case and whitespace folded)."""
    sources = []
    if cfg.train_dataset:
        sources.append(("train", cfg.train_dataset, "train"))
    if cfg.sft:
        sources.append(("sft", cfg.sft.dataset, _split(cfg.sft.split)))
    report: dict = {"eval_datasets": list(cfg.eval_datasets), "eval_split": cfg.eval_split, "sources": {},
                    "overlapping_items": 0, "allowed": cfg.allow_contamination}
    for role, dataset, split in sources:
        overlap = store.overlapping_items(dataset, split, cfg.eval_datasets, _split(cfg.eval_split))
        n = overlap["item_id"].n_unique()
        report["sources"][role] = {
            "dataset": dataset, "split": split or "all", "overlapping_items": n,
            "by_eval_dataset": {d: int(c) for d, c in overlap.group_by("other_dataset").agg(pl.len())
                                .iter_rows()},
            "examples": overlap.unique("item_id", keep="first", maintain_order=True).head(5).to_dicts(),
        }
        report["overlapping_items"] += n
    return report


def create_run(ws: Workspace, cfg: RunConfig, run_id: str | None = None, kind: str = "loop") -> str:
    """Validate a config against the workspace and record a new run (its config saved in the run dir).

    Refuses a run id that is not a plain name (it becomes a directory under runs/: no '..', no slash, no
    absolute path), whichever way it came in: `selfrat run --run-id`, `single-stage --run-id`, the app, a job.
    Refuses a run whose training inputs overlap its eval sets unless `allow_contamination` is set; with it,
    the overlapping items are left out of training (never sampled for pairs, never SFT'd on) and reported.
    """
    if run_id is not None:
        check_run_id(run_id)
    store = ws.store()
    sft = cfg.sft
    for name in [cfg.train_dataset, *cfg.eval_datasets, sft.dataset if sft else None]:
        if name:
            store.dataset_kind(name)  # raises naming the missing dataset
    if cfg.train_dataset and store.dataset_kind(cfg.train_dataset) != "absolute" and cfg.training.method != "grpo":
        raise StoreError(f"train_dataset {cfg.train_dataset!r} must hold absolute (gold-scored) items (training."
                         "method grpo also trains on pairwise items: verdict and consistency rewards)")
    if sft and store.dataset_kind(sft.dataset) != "absolute":
        raise StoreError(f"sft.dataset {sft.dataset!r} must hold absolute items with gold feedback")
    if cfg.model != EMBEDDED:
        resolve_model(cfg.model, ws.root)  # a bad path fails now, not after the run is recorded
    contamination = contamination_report(store, cfg)
    if contamination["overlapping_items"] and not cfg.allow_contamination:
        lines = [f"{src['overlapping_items']} {role} items of {src['dataset']!r} (split {src['split']}) also occur "
                 f"in the eval sets {src['by_eval_dataset']}; e.g. source rows "
                 f"{[e['source_row'] for e in src['examples']]}"
                 for role, src in contamination["sources"].items() if src["overlapping_items"]]
        raise StoreError("contamination: " + "; ".join(lines) + ". Use other splits, or set "
                         "allow_contamination: true to run anyway (those items are then left out of training).")
    run_id = run_id or ws.new_run_id("eval" if kind == "evaluate" else "run")
    run_dir = ws.run_dir(run_id)
    if not store.create_run(run_id, kind, cfg.model_dump(mode="json"), str(run_dir)):
        raise StoreError(f"run {run_id!r} exists already; use `selfrat resume {run_id}`")
    store.put_run_report(run_id, "contamination", contamination)
    save_run_config(run_dir, cfg)
    return run_id


def single_stage_config(cfg: RunConfig, initial_model: str) -> RunConfig:
    """The single-stage DPO baseline of a K-iteration run: one iteration from the same seed judge that
    samples, at once, what the K iterations sampled (their K slices of items, or K x n samples of the same
    items when every iteration sampled all of them) and trains once on all the pairs."""
    k = max(cfg.iterations, 1)
    data = cfg.model_dump(mode="json")
    data.update(model=initial_model, iterations=1, sft=None, evaluate_initial=False)
    if cfg.train_items_per_iteration:
        data["train_items_per_iteration"] = cfg.train_items_per_iteration * k
    else:
        data["sampling"]["n"] = min(64, cfg.sampling.n * k)
    data["curation"]["max_pairs_per_item"] = min(64, cfg.curation.max_pairs_per_item * k)
    data["evaluation"]["baselines"] = []
    data["sampling"]["force_score"] = cfg.sampling.force_score  # as resolved for the original model
    return RunConfig.model_validate(data)


def run_single_stage(ws: Workspace, run_id: str, new_run_id: str | None = None, sampler_factory=None,
                     echo: bool = True) -> dict:
    """The single-stage DPO baseline of `run_id` (see `single_stage_config`), run to the end (or resumed);
    its iteration-1 figures are also recorded as the parent's iteration-0 metrics 'single-stage-dpo/<metric>'."""
    parent = Runner(ws, run_id, echo=False)
    store = ws.store()
    new_run_id = new_run_id or f"{run_id}-single-stage"
    if new_run_id not in store.runs()["run_id"].to_list():
        create_run(ws, single_stage_config(parent.cfg, parent.initial_model()), new_run_id)
    Runner(ws, new_run_id, sampler_factory=sampler_factory, echo=echo).run_all()
    metrics = store.run_status(new_run_id)["iterations"][1]["metrics"]
    for dataset, values in metrics.items():
        store.put_metrics(run_id, 0, dataset, {f"single-stage-dpo/{m}": v for m, v in values.items()
                                               if not m.startswith("length-baseline/")})  # the parent has it
    return metrics


class StageProcessError(StoreError):
    """A stage run in a child process (backend vllm) exited with an error; its run.log lines say why."""


def _stderr_fd() -> int | None:
    """This process's stderr as a file descriptor for a child's stdout (None: inherit, where stderr has none,
    e.g. under a test runner that replaced it)."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def _stop_child(proc: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM to a stage's child (its runner marks the stage cancelled and exits), SIGKILL to it and what it
    started (vLLM's engine processes) if it is not gone after `grace_s`. Further signals to this process
    while it waits do not interrupt the stopping."""
    import psutil

    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    deadline = time.monotonic() + grace_s
    while proc.poll() is None:
        if time.monotonic() > deadline:
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(proc.pid).children(recursive=True):
                    child.kill()
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            deadline = float("inf")
        try:
            proc.wait(timeout=0.2)
        except subprocess.TimeoutExpired:
            pass
        except (Cancelled, KeyboardInterrupt):  # a second cancel while stopping: keep stopping
            pass


class Runner:
    """Runs the stages of one stored run. `sampler_factory(model_path)` lets tests inject a sampler.
    `on_progress(iteration, stage, done, total, **extra)` (e.g. `ProgressLines()`) also gets the sampling /
    evaluation progress records, per batch; with it, those records are no longer echoed by the run log."""

    def __init__(self, ws: Workspace, run_id: str, sampler_factory=None, echo: bool = True, on_progress=None):
        self.ws = ws
        self.store: Store = ws.store()
        self.run_id = run_id
        run = self.store.run(run_id)
        self.cfg = RunConfig.model_validate(run["config"])
        self.run_dir = Path(run["run_dir"] or ws.run_dir(run_id))
        self.log = RunLog(self.run_dir, echo=echo)
        self.on_progress = on_progress
        self._sampler_factory = sampler_factory
        self._samplers: dict[str, Sampler] = {}
        self._cancelled = False

    # -------------------------------------------------------------- the whole run

    def run_all(self) -> dict:
        with self.handling_signals():
            return self._run_all()

    def _run_all(self) -> dict:
        self.store.update_run(self.run_id, status="running", pid=os.getpid(), clear_error=True)
        self.log(f"run {self.run_id}: model={self.cfg.model} iterations={self.cfg.iterations}")
        try:
            self.sft()
            self.run_stage("evaluate", 0)
            for k in range(1, self.cfg.iterations + 1):
                self.run_stage("sample", k)
                self.run_stage("curate", k)
                self.train(k)
                self.run_stage("evaluate", k)
        except BaseException as e:
            if self._cancelled:
                self.store.update_run(self.run_id, status="cancelled")
                self.log("cancelled; `selfrat resume` continues from here")
                raise self._as_cancelled(e)  # noqa: B904 (_as_cancelled keeps e as the cause)
            self.store.update_run(self.run_id, status="failed", error=f"{type(e).__name__}: {e}")
            self.log(f"failed: {type(e).__name__}: {e}")
            raise
        self.store.update_run(self.run_id, status="done")
        self.log("done")
        return self.store.run_status(self.run_id)

    def _as_cancelled(self, e: BaseException) -> BaseException:
        """The signal handler's Cancelled may arrive wrapped: DuckDB turns an exception raised while a query
        runs into RuntimeError('Query interrupted'). After a signal, any error is the cancellation."""
        if isinstance(e, Cancelled):
            return e
        c = Cancelled(f"cancelled ({type(e).__name__}: {e})")
        c.__cause__ = e
        return c

    @contextlib.contextmanager
    def handling_signals(self):
        """Within the block, SIGTERM / SIGINT stop the current stage at a batch boundary: it is marked
        cancelled and `Cancelled` is raised (the run resumes from there). `run_all` uses it; wrap single
        stage calls (`runner.sample(k)`, ...) in it to get the same. The previous handlers come back after."""
        def handler(signum, frame):
            self._cancelled = True
            raise Cancelled(f"signal {signum}")
        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                previous[sig] = signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. under a test runner thread)
                pass
        try:
            yield self
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    # -------------------------------------------------------------- stages in their own process

    def in_child_processes(self) -> bool:
        """Whether run_all runs the stages that load the judge for sampling (sample, evaluate, and curate with
        the meta strategy) as child processes: with backend vllm, whose engine does not give its GPU memory
        back within a process, so that training (in this process) starts on free GPUs. The transformers
        backend (and an injected test sampler) samples in this process."""
        return self.cfg.sampling.backend == "vllm" and self._sampler_factory is None

    def run_stage(self, stage: str, k: int):
        """`stage` ("sample", "curate" or "evaluate") of iteration k as run_all runs it: in a child process
        (`stage_argv`) when `in_child_processes()`, the stage samples and there is work to do; else
        `self.sample(k)` / `self.curate(k)` / `self.evaluate(k)` in this process."""
        if stage not in ("sample", "curate", "evaluate"):
            raise ValueError(f"run_stage: {stage!r} is not a stage that samples (sample, curate, evaluate)")
        if not self.in_child_processes() or not self._stage_has_work(stage, k):
            return getattr(self, stage)(k)
        self._run_child(stage, k)
        return None

    def _stage_has_work(self, stage: str, k: int) -> bool:
        if stage == "evaluate" and k == 0 and not self.cfg.evaluate_initial:
            return False  # marked skipped in this process; nothing to load
        if stage in ("sample", "curate") and self.cfg.training.method == "grpo":
            return False  # skipped in this process: the GRPO trainer samples its own rollouts
        if stage == "curate" and self.cfg.curation.strategy != "meta":
            return False  # no judge involved: in this process
        try:
            status = self.store.iteration(self.run_id, k)[f"{stage}_status"]
        except StoreError:  # no row yet: the child creates it
            return True
        return status not in ("done", "skipped")

    def stage_argv(self, stage: str, k: int) -> list[str]:
        """The command of a stage's child process: the CLI's own `sample` / `curate` / `evaluate --run`."""
        return [sys.executable, "-m", "selfrat", "--workspace", str(self.ws.root), stage, "--run", self.run_id,
                "--iteration", str(k)]

    def _run_child(self, stage: str, k: int) -> None:
        """Run the child and wait for it. Its runner writes the stage's rows, status and progress to the store,
        run.log and progress.jsonl as this process would; its console output goes to this process's stderr
        (stdout stays clean for --json). A cancel (SIGTERM / SIGINT here) terminates the child first."""
        argv = self.stage_argv(stage, k)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", STAGE_PROCESS_ENV: self.run_id}
        # The child stays in this process group, so a job cancel (SIGTERM to the group) reaches it as well.
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=_stderr_fd(), env=env)
        self.log(f"[iter {k}] {stage}: in its own process (pid {proc.pid}; backend vllm frees its GPU memory "
                 f"when the process exits): {' '.join(argv)}")
        try:
            code = proc.wait()
        except BaseException:
            _stop_child(proc)
            with contextlib.suppress(StoreError):  # the child marks it when it can; a killed child cannot
                if self.store.iteration(self.run_id, k)[f"{stage}_status"] == "running":
                    self.store.set_stage(self.run_id, k, stage, "cancelled" if self._cancelled else "failed")
            raise
        if code != 0:
            with contextlib.suppress(StoreError):
                if self.store.iteration(self.run_id, k)[f"{stage}_status"] == "running":
                    self.store.set_stage(self.run_id, k, stage, "failed")
            raise StageProcessError(f"[iter {k}] {stage}: its process (pid {proc.pid}) exited with code {code}; "
                                    f"see {self.log.log_path}")

    # -------------------------------------------------------------- models

    def base_model(self) -> str:
        """`model` of the config: the seed judge itself, or what the seed SFT starts from."""
        return resolve_model(self.cfg.model, self.ws.root)

    def initial_model(self) -> str:
        """The judge of iteration 0: J_SFT when the config has a seed SFT, else the base model."""
        return self.model_of(0)

    def model_of(self, iteration: int) -> str:
        """The judge after `iteration` (0 = the seed)."""
        if iteration == 0 and self.cfg.sft is None:
            return self.base_model()
        row = self.store.iteration(self.run_id, iteration)
        if row["train_status"] not in ("done", "skipped") or not row["checkpoint"]:
            what = "seed SFT" if iteration == 0 else f"iteration {iteration}"
            raise StoreError(f"{what} of {self.run_id} has no trained checkpoint yet")
        return row["checkpoint"]

    def reference_of(self, k: int) -> str:
        """Iteration k's DPO reference model: the initial judge, or the policy it trains (k - 1's judge)."""
        return self.initial_model() if self.cfg.training.reference == "initial" else self.model_of(k - 1)

    def sampler(self, model_path: str) -> Sampler:
        if model_path not in self._samplers:
            self._samplers.clear()  # one model in memory at a time
            if self._sampler_factory:
                self._samplers[model_path] = self._sampler_factory(model_path)
            else:
                self._samplers[model_path] = make_sampler(self.cfg.sampling.backend, model_path,
                                                          self.cfg.sampling.device, self.cfg.sampling.precision,
                                                          vllm=self.cfg.sampling.vllm)
        return self._samplers[model_path]

    def _stage(self, iteration: int, stage: str) -> bool:
        """Mark a stage running; False when it is done already (nothing to do)."""
        self.store.ensure_iteration(self.run_id, iteration)
        row = self.store.iteration(self.run_id, iteration)
        if row[f"{stage}_status"] in ("done", "skipped"):
            self.log(f"[iter {iteration}] {stage}: already done")
            return False
        self.store.set_stage(self.run_id, iteration, stage, "running")
        self.log(f"[iter {iteration}] {stage}: start")
        self.log.progress(iteration, stage, 0, 0, echo=False)  # the job panel shows the new stage at once
        return True

    def _progress(self, iteration: int, stage: str, done: int, total: int, **extra) -> None:
        """A progress record for run.log / progress.jsonl, and for `on_progress` when there is one."""
        self.log.progress(iteration, stage, done, total, echo=self.on_progress is None, **extra)
        if self.on_progress is not None:
            self.on_progress(iteration, stage, done, total, **extra)

    def _guarded(self, iteration: int, stage: str, fn):
        try:
            return fn()
        except BaseException as e:
            if self._cancelled:
                self.store.set_stage(self.run_id, iteration, stage, "cancelled")
                raise self._as_cancelled(e)  # noqa: B904 (_as_cancelled keeps e as the cause)
            self.store.set_stage(self.run_id, iteration, stage, "failed")
            raise

    # -------------------------------------------------------------- inputs

    def _uncontaminated(self, items: pl.DataFrame, dataset: str, split: str | None, role: str) -> pl.DataFrame:
        """`items` without those that also occur in an evaluated eval set (see `create_run`)."""
        overlap = self.store.overlapping_items(dataset, split, self.cfg.eval_datasets, _split(self.cfg.eval_split))
        if overlap.height == 0:
            return items
        kept = items.filter(~pl.col("item_id").is_in(overlap["item_id"].implode()))
        if kept.height < items.height:
            self.log(f"{role}: left out {items.height - kept.height} items that occur in the eval sets")
        return kept

    def train_items(self, k: int) -> pl.DataFrame:
        """The train items iteration k samples: the train split without eval overlap, the first
        `max_train_items`, and with `train_items_per_iteration` = m the k-th slice of m of them."""
        items = self.store.items(self.cfg.train_dataset, "train")
        items = self._uncontaminated(items, self.cfg.train_dataset, "train", "sampling")
        if self.cfg.max_train_items:
            items = items.head(self.cfg.max_train_items)
        m = self.cfg.train_items_per_iteration
        if m:
            total = items.height
            items = items.slice((k - 1) * m, m)
            if items.height == 0:
                raise StoreError(f"iteration {k} has no train items left: {total} usable train items at "
                                 f"{m} per iteration cover {total // m} iterations")
        return items

    # -------------------------------------------------------------- stages

    def sft(self) -> dict:
        """The seed SFT (config `sft:`): trains J_SFT from `model` on gold rationales + scores, as
        iteration 0's train stage. A no-op without `sft:` or when done."""
        sft = self.cfg.sft
        if sft is None:
            return {}
        self.store.ensure_iteration(self.run_id, 0, sampler_model=self.base_model())
        if not self._stage(0, "train"):
            return self.store.iteration(self.run_id, 0)["train_metrics"] or {}

        def work():
            from engine.training import checkpoint_precision, invalid_sft_items, sft_examples, train_sft  # heavy

            items = self.store.items(sft.dataset, _split(sft.split))
            items = self._uncontaminated(items, sft.dataset, _split(sft.split), "seed SFT")
            # Items without gold feedback cannot teach a rationale: left out, counted and reported.
            invalid = invalid_sft_items(items)
            if invalid:
                items = items.filter(~pl.col("item_id").is_in(list(invalid)))
                self.log(f"[iter 0] seed SFT: left out {len(invalid)} items without usable gold judgments")
            if sft.max_items:
                items = items.head(sft.max_items)
            if items.height == 0:
                raise StoreError(f"seed SFT: dataset {sft.dataset!r} (split {sft.split}) has no item with gold "
                                 "feedback and a 1-5 gold score")
            self.store.put_run_report(self.run_id, "seed_sft", {
                "dataset": sft.dataset, "split": sft.split, "examples": items.height,
                "left_out": {str(k): v for k, v in list(invalid.items())[:50]}, "left_out_count": len(invalid)})
            examples = sft_examples(items)
            out_dir = self.run_dir / "checkpoints" / "iter-0-sft"
            self.log(f"[iter 0] seed SFT: {len(examples)} gold judgments of {sft.dataset} -> {out_dir}")
            self._samplers.clear()
            metrics = train_sft(model_path=self.base_model(), examples=examples, cfg=sft, out_dir=out_dir,
                                device=self.cfg.sampling.device, log=self.log,
                                progress=lambda d, t: self.log.progress(0, "train", d, t, echo=False),
                                distributed=self.cfg.training.distributed, report_to=self.cfg.training.report_to,
                                tb_dir=self.run_dir / "tb" / out_dir.name,
                                work_dir=self.run_dir / "train" / out_dir.name)
            self.store.set_stage(self.run_id, 0, "train", "done", checkpoint=str(out_dir), report=metrics,
                                 precision=checkpoint_precision(out_dir))
            return metrics
        return self._guarded(0, "train", work)

    def sample(self, k: int) -> None:
        if k < 1:
            raise StoreError("sampling happens in iterations 1..K (iteration 0 is the seed evaluation)")
        if self.cfg.training.method == "grpo":
            self._skip_for_grpo(k, "sample")
            return
        if not self._stage(k, "sample"):
            return
        model = self.model_of(k - 1)
        self.store.ensure_iteration(self.run_id, k, sampler_model=model)

        def work():
            s = self.cfg.sampling
            items = self.train_items(k)
            requests = [JudgeRequest(it["item_id"], "a", absolute_messages(it)) for it in items.iter_rows(named=True)]
            # Judgments drawn by the DPO reference carry their reference log-probs: no reference pass in training.
            t = self.cfg.training
            scored = t.precompute_ref_log_probs and self.reference_of(k) == model
            params = SamplingParams(temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens,
                                    repetition_penalty=s.repetition_penalty, force_score=bool(s.force_score),
                                    score_completion=scored)
            written = sample_and_store(
                self.store, self.sampler(model), requests, run_id=self.run_id, iteration=k, purpose="train",
                n=s.n, params=params, base_seed=s.seed + 1000 * k, batch_size=s.batch_size,
                progress=lambda d, t: self._progress(k, "sample", d, t),
            )
            self.store.set_stage(self.run_id, k, "sample", "done")
            self.log(f"[iter {k}] sample: done ({written} judgments written)")
        self._guarded(k, "sample", work)

    def curate(self, k: int) -> dict:
        if self.cfg.training.method == "grpo":
            return self._skip_for_grpo(k, "curate")
        if not self._stage(k, "curate"):
            return self.store.iteration(self.run_id, k)["curate_report"] or {}

        def work():
            c = self.cfg.curation
            ratings, rater = None, None
            if c.strategy == "meta":
                # The judge that wrote the judgments (iteration k-1's) rates them first; stored as it goes,
                # so an interrupted curate resumes rating where it stopped.
                from engine.meta import rate_for_curation

                s = self.cfg.sampling
                sampler = self.sampler(self.model_of(k - 1))
                rater = sampler.model_name
                self.log(f"[iter {k}] curate: meta-judge {rater} rates the judgments")
                params = self._meta_params()
                ratings = rate_for_curation(
                    self.store, sampler, run_id=self.run_id, iteration=k, dataset=self.cfg.train_dataset,
                    curation=c, params=params, batch_size=s.batch_size,
                    progress=lambda d, t: self.log.progress(k, "curate", d, t, echo=False, step="meta"))

            def fn(judgments, golds):
                result = curate(judgments, golds, c, ratings=ratings)
                report = result.report if rater is None else {**result.report, "rater_model": rater}
                return result.pairs, report
            report = self.store.run_curation(self.run_id, k, self.cfg.train_dataset, fn)
            self.log(f"[iter {k}] curate: {report['pairs']} pairs from {report['items']} items;"
                     f" skipped {report['skipped']}")
            for warning in report.get("warnings", []):
                self.log(f"[iter {k}] curate: warning: {warning}")
            return report
        return self._guarded(k, "curate", work)

    def train(self, k: int) -> dict:
        if not self._stage(k, "train"):
            return self.store.iteration(self.run_id, k)["train_metrics"] or {}
        if self.cfg.training.method == "grpo":
            return self._guarded(k, "train", lambda: self._train_grpo(k))

        def work():
            from engine.training import checkpoint_precision, train_dpo  # heavy (TRL): imported only when training

            policy, reference = self.model_of(k - 1), self.reference_of(k)
            rows = self.store.training_pairs(self.run_id, k)
            if rows.height == 0:
                # Nothing to learn from: the judge carries over unchanged, and the log says so.
                self.store.set_stage(self.run_id, k, "train", "skipped", checkpoint=policy,
                                     report={"train/pairs": 0})
                self.log(f"[iter {k}] train: no trainable pairs; judge carried over from iteration {k - 1}")
                return {"train/pairs": 0}
            pairs = []
            for row in rows.iter_rows(named=True):
                chosen = row["chosen_text"]
                if row["status"] == "edited":
                    chosen = format_judgment(row["edited_rationale"], row["edited_score"])
                pairs.append({"prompt": absolute_messages(row), "chosen": chosen, "rejected": row["rejected_text"],
                              # stored at sampling: valid for an unedited judgment that the reference drew
                              "ref_chosen_logps": row["chosen_ref_logp"] if row["status"] != "edited"
                              and row["chosen_model"] == reference else None,
                              "ref_rejected_logps": row["rejected_ref_logp"]
                              if row["rejected_model"] == reference else None})
            out_dir = self.run_dir / "checkpoints" / f"iter-{k}"
            self.log(f"[iter {k}] train: DPO on {len(pairs)} pairs (policy {policy}, reference {reference})")
            self._samplers.clear()  # free the sampler's model before training
            metrics = train_dpo(policy_path=policy, reference_path=reference, pairs=pairs, cfg=self.cfg.training,
                                out_dir=out_dir, device=self.cfg.sampling.device, log=self.log,
                                progress=lambda d, t: self.log.progress(k, "train", d, t, echo=False),
                                tb_dir=self.run_dir / "tb" / out_dir.name,
                                work_dir=self.run_dir / "train" / out_dir.name)
            metrics = {**metrics, "train/pairs": len(pairs)}
            self.store.set_stage(self.run_id, k, "train", "done", checkpoint=str(out_dir), report=metrics,
                                 precision=checkpoint_precision(out_dir))
            return metrics
        return self._guarded(k, "train", work)

    # -------------------------------------------------------------- GRPO (training.method: grpo)

    GRPO_SKIP = {"sample": "GRPO samples its own rollouts while it trains (purpose rollout), so nothing is "
                           "sampled beforehand",
                 "curate": "GRPO learns from rewarded rollouts, not from curated preference pairs: no curation"}

    def _skip_for_grpo(self, k: int, stage: str) -> dict:
        """Mark iteration k's sample or curate stage skipped under method grpo (the curate report says why)."""
        report = ({"method": "grpo", "strategy": "none (grpo)", "pairs": 0, "reason": self.GRPO_SKIP[stage]}
                  if stage == "curate" else None)
        self.store.ensure_iteration(self.run_id, k, sampler_model=self.model_of(k - 1))
        if self.store.iteration(self.run_id, k)[f"{stage}_status"] not in ("done", "skipped"):  # (done: under dpo)
            self.store.set_stage(self.run_id, k, stage, "skipped", report=report)
            self.log(f"[iter {k}] {stage}: skipped (training.method grpo: {self.GRPO_SKIP[stage]})")
        return report or {}

    def _train_grpo(self, k: int) -> dict:
        """Iteration k's checkpoint by GRPO from k-1's judge on the iteration's train items; the rollouts are
        stored as judgments (purpose rollout, with reward, step and group) as each step scores them. A train
        stage killed half-way starts again from scratch: its rollouts are dropped first (`on_start`), so the
        stored ones are those of the attempt that made the checkpoint (their ids are deterministic as well)."""
        from engine.devices import resolve_device
        from engine.grpo import ROLLOUT, rollout_judgments, train_grpo  # heavy (TRL): imported only when training
        from engine.precision import resolve_precision
        from engine.training import checkpoint_precision

        t = self.cfg.training
        policy = self.model_of(k - 1)
        self.store.ensure_iteration(self.run_id, k, sampler_model=policy)
        items = self.train_items(k)
        out_dir = self.run_dir / "checkpoints" / f"iter-{k}"
        self.log(f"[iter {k}] train: GRPO on {items.height} items (policy {policy}; {t.grpo.num_generations} "
                 f"rollouts per prompt, {t.grpo.prompts_per_step} prompts per step)")
        self._samplers.clear()  # free the sampler's model before training

        def on_start() -> None:
            dropped = self.store.delete_judgments(self.run_id, k, ROLLOUT)
            if dropped:
                self.log(f"[iter {k}] train: dropped {dropped} rollouts of an interrupted attempt")

        # what the rollouts are generated in: the training precision (train_grpo resolves it the same way)
        precision = resolve_precision(t.precision, resolve_device(self.cfg.sampling.device))

        def on_rollouts(rollouts) -> None:
            self.store.insert_judgments(rollout_judgments(rollouts, run_id=self.run_id, iteration=k, model=policy,
                                                          cfg=t, precision=precision))

        metrics = train_grpo(policy_path=policy, items=items, cfg=t, out_dir=out_dir, device=self.cfg.sampling.device,
                             log=self.log, progress=lambda d, n: self.log.progress(k, "train", d, n, echo=False),
                             on_rollouts=on_rollouts, on_start=on_start, tb_dir=self.run_dir / "tb" / out_dir.name)
        self.store.set_stage(self.run_id, k, "train", "done", checkpoint=str(out_dir), report=metrics,
                             precision=checkpoint_precision(out_dir))
        self.log(f"[iter {k}] train: GRPO done ({int(metrics.get('train/rollouts', 0))} rollouts)")
        return metrics

    def evaluate(self, k: int) -> dict:
        if k == 0:
            self._mark_seed_stages()
            if not self.cfg.evaluate_initial:
                self.store.set_stage(self.run_id, 0, "evaluate", "skipped")
                return {}
        if not self._stage(k, "evaluate"):
            return self.store.run_status(self.run_id)["iterations"][k]["metrics"]

        def work():
            model = self.model_of(k)
            results = {}
            for name in self.cfg.eval_datasets:
                items = self.store.items(name, _split(self.cfg.eval_split), self.cfg.max_eval_items)
                results[name] = metrics = self._evaluate_dataset(k, name, items, model)
                self.log(f"[iter {k}] evaluate {name}: " + " ".join(
                    f"{m}={metrics[m]:.3f}" for m in metrics if m.rsplit("/", 1)[-1] in LOGGED))
            self.store.set_stage(self.run_id, k, "evaluate", "done")
            return results
        return self._guarded(k, "evaluate", work)

    def evaluate_datasets(self, k: int, datasets: list[str], max_items: int | None = None) -> dict:
        """Evaluate iteration k's judge on `datasets` (e.g. a suite) beside the run's own eval sets: stored
        per iteration like them, resumable, leaving the evaluate stage's status alone."""
        model = self.model_of(k)
        results = {}
        for name in datasets:
            items = self.store.items(name, _split(self.cfg.eval_split), max_items or self.cfg.max_eval_items)
            results[name] = self._evaluate_dataset(k, name, items, model)
        return results

    def _mark_seed_stages(self) -> None:
        """Iteration 0 samples and curates nothing; it trains only when the config has a seed SFT."""
        self.store.ensure_iteration(self.run_id, 0, sampler_model=self.base_model())
        row = self.store.iteration(self.run_id, 0)
        for stage in ("sample", "curate", "train"):
            if stage == "train" and self.cfg.sft is not None:
                continue
            if row[f"{stage}_status"] != "skipped":
                self.store.set_stage(self.run_id, 0, stage, "skipped",
                                     checkpoint=self.base_model() if stage == "train" else None)

    def _evaluate_dataset(self, k: int, name: str, items: pl.DataFrame, model: str) -> dict[str, float]:
        """Every evaluation method the config asks for on one dataset; metrics stored as '<method>/<metric>'
        (no prefix for the main, greedy figures) and per-group breakdowns beside them."""
        from engine.evaluation import EvalResult, confusion_breakdown, evaluate_judgments, length_baseline
        from engine.relative import relative_breakdown, relative_metrics, relative_requests

        e, s = self.cfg.evaluation, self.cfg.sampling
        pairwise = items.height > 0 and items["kind"][0] == "pairwise"
        sampler = self.sampler(model)
        metrics: dict[str, float] = {}
        budget = e.max_new_tokens or s.max_new_tokens
        greedy = SamplingParams(temperature=e.temperature, top_p=s.top_p if e.temperature > 0 else 1.0,
                                max_new_tokens=budget, repetition_penalty=s.repetition_penalty,
                                force_score=bool(s.force_score))

        eval_batch = e.batch_size or s.batch_size  # the greedy evaluation's; the baselines' N samples: sampling's

        def judge(purpose: str, requests, n: int, params: SamplingParams, seed: int, batch_size: int) -> pl.DataFrame:
            sample_and_store(
                self.store, sampler, requests, run_id=self.run_id, iteration=k, purpose=purpose, n=n,
                params=params, base_seed=seed, batch_size=batch_size,
                progress=lambda d, t: self._progress(k, "evaluate", d, t, dataset=name, method=purpose),
            )
            judgments = self.store.judgments(self.run_id, k, purpose)
            return judgments.filter(pl.col("item_id").is_in(items["item_id"].implode()))

        def record(method: str, result, prefix: str) -> None:
            metrics.update({prefix + m: v for m, v in result.metrics.items()})
            rows = result.breakdowns
            if result.confusion is not None:  # stored as group_by "confusion" rows
                rows = pl.concat([rows, confusion_breakdown(result.confusion)], how="vertical_relaxed")
            self.store.put_breakdowns(self.run_id, k, name, method, rows)

        if e.greedy and (not pairwise or "absolute" in e.pairwise_modes):
            judgments = judge("eval", eval_requests(items), e.n, greedy, e.seed, eval_batch)
            for method, prefix in (("greedy", ""), ("expected", "expected/")):  # expected: same judgments
                record(method, evaluate_judgments(items, judgments, method=method, bootstrap=e.bootstrap,
                                                  seed=e.seed), prefix)
        # What response length alone scores, beside every judge (no model involved, so every iteration).
        record("length-baseline", length_baseline(items, bootstrap=e.bootstrap, seed=e.seed), "length-baseline/")
        if pairwise and "relative" in e.pairwise_modes:
            judgments = judge("relative", relative_requests(items), e.n, replace(greedy, mode="relative"), e.seed,
                             eval_batch)
            record("relative", EvalResult(relative_metrics(items, judgments), relative_breakdown(items, judgments),
                                          None), "relative/")
        if k == 0 and "raw" in e.baselines and (not pairwise or "absolute" in e.pairwise_modes):
            # The model before the seed SFT, judged as the initial judge is (same requests, params and seed).
            raw_sampler = self.sampler(self.base_model())
            sample_and_store(self.store, raw_sampler, eval_requests(items), run_id=self.run_id, iteration=k,
                             purpose="raw", n=e.n, params=greedy, base_seed=e.seed, batch_size=eval_batch,
                             progress=lambda d, t: self._progress(k, "evaluate", d, t, dataset=name, method="raw"))
            raw = self.store.judgments(self.run_id, k, "raw")
            raw = raw.filter(pl.col("item_id").is_in(items["item_id"].implode()))
            record("raw", evaluate_judgments(items, raw, method="greedy", bootstrap=e.bootstrap, seed=e.seed), "raw/")
        if k == 0 and {"self-consistency", "best-of-n"} & set(e.baselines):
            sampled = SamplingParams(temperature=e.baseline_temperature, top_p=s.top_p, max_new_tokens=budget,
                                     repetition_penalty=s.repetition_penalty, force_score=bool(s.force_score))
            judgments = judge("baseline", eval_requests(items), e.baseline_n, sampled, e.seed + 1, s.batch_size)
            if "self-consistency" in e.baselines:
                for method in ("self-consistency-mean", "self-consistency-majority"):
                    record(method, evaluate_judgments(items, judgments, method=method, bootstrap=e.bootstrap,
                                                      seed=e.seed), f"{method}/")
            if "best-of-n" in e.baselines:
                ratings = self._meta_ratings(k, "baseline", judgments, items, sampler)
                record("best-of-n", evaluate_judgments(items, judgments, method="best-of-n", ratings=ratings,
                                                       bootstrap=e.bootstrap, seed=e.seed), "best-of-n/")
        self.store.put_metrics(self.run_id, k, name, metrics)
        return metrics

    def _meta_params(self) -> SamplingParams:
        """Meta-judge ratings: greedy, and always forced, so every judgment gets a rating to rank by."""
        return SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=self.cfg.curation.meta_max_new_tokens,
                              repetition_penalty=self.cfg.sampling.repetition_penalty, force_score=True)

    def _meta_ratings(self, k: int, purpose: str, judgments: pl.DataFrame, items: pl.DataFrame,
                      sampler: Sampler) -> pl.DataFrame:
        """The judge's meta-ratings of `judgments` (rated now where missing), by this judge only."""
        from engine.meta import rate_judgments

        rate_judgments(self.store, sampler, judgments, items, run_id=self.run_id, iteration=k,
                       params=self._meta_params(), batch_size=self.cfg.sampling.batch_size,
                       progress=lambda d, t: self._progress(k, "evaluate", d, t, method="meta-judge"))
        ratings = self.store.meta_ratings(self.run_id, k, purpose)
        return ratings.filter(pl.col("rater_model") == sampler.model_name)
