"""The iteration runner: seed evaluation, then K x (sample -> curate -> train -> evaluate).

Iteration 0 evaluates the seed judge. Iteration k samples training judgments with the judge of iteration
k-1, curates pairs, trains checkpoint k with DPO and evaluates it. Every stage records its status in the
store: a stage marked done is skipped when run again, and a stage that was interrupted picks up where its
stored rows end (judgments are keyed by item and sample index; pairs and metrics are idempotent writes).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import yaml

from engine.config import RunConfig
from engine.curation import curate
from engine.evaluation import dataset_metrics, eval_requests
from engine.judging import JudgeRequest, sample_and_store
from engine.models import EMBEDDED, resolve_model
from engine.prompts import absolute_messages, format_judgment
from engine.sampling import Sampler, SamplingParams, make_sampler
from engine.workspace import RunLog, Workspace
from store import Store, StoreError


class Cancelled(Exception):
    """The job received SIGTERM/SIGINT; the current stage stops at a batch boundary and can be resumed."""


def create_run(ws: Workspace, cfg: RunConfig, run_id: str | None = None, kind: str = "loop") -> str:
    """Validate a config against the workspace and record a new run (its config saved in the run dir)."""
    store = ws.store()
    for name in [cfg.train_dataset, *cfg.eval_datasets]:
        if name:
            store.dataset_kind(name)  # raises naming the missing dataset
    if cfg.train_dataset and store.dataset_kind(cfg.train_dataset) != "absolute":
        raise StoreError(f"train_dataset {cfg.train_dataset!r} must hold absolute (gold-scored) items")
    if cfg.model != EMBEDDED:
        resolve_model(cfg.model, ws.root)  # a bad path fails now, not after the run is recorded
    run_id = run_id or ws.new_run_id("eval" if kind == "evaluate" else "run")
    run_dir = ws.run_dir(run_id)
    if not store.create_run(run_id, kind, cfg.model_dump(mode="json"), str(run_dir)):
        raise StoreError(f"run {run_id!r} exists already; use `selfrat resume {run_id}`")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return run_id


class Runner:
    """Runs the stages of one stored run. `sampler_factory(model_path)` lets tests inject a sampler."""

    def __init__(self, ws: Workspace, run_id: str, sampler_factory=None, echo: bool = True):
        self.ws = ws
        self.store: Store = ws.store()
        self.run_id = run_id
        run = self.store.run(run_id)
        self.cfg = RunConfig.model_validate(run["config"])
        self.run_dir = Path(run["run_dir"] or ws.run_dir(run_id))
        self.log = RunLog(self.run_dir, echo=echo)
        self._sampler_factory = sampler_factory
        self._samplers: dict[str, Sampler] = {}
        self._cancelled = False

    # -------------------------------------------------------------- the whole run

    def run_all(self) -> dict:
        self._install_signal_handlers()
        self.store.update_run(self.run_id, status="running", pid=os.getpid(), clear_error=True)
        self.log(f"run {self.run_id}: model={self.cfg.model} iterations={self.cfg.iterations}")
        try:
            self.evaluate(0)
            for k in range(1, self.cfg.iterations + 1):
                self.sample(k)
                self.curate(k)
                self.train(k)
                self.evaluate(k)
        except Cancelled:
            self.store.update_run(self.run_id, status="cancelled")
            self.log("cancelled; `selfrat resume` continues from here")
            raise
        except BaseException as e:
            self.store.update_run(self.run_id, status="failed", error=f"{type(e).__name__}: {e}")
            self.log(f"failed: {type(e).__name__}: {e}")
            raise
        self.store.update_run(self.run_id, status="done")
        self.log("done")
        return self.store.run_status(self.run_id)

    def _install_signal_handlers(self) -> None:
        def handler(signum, frame):
            self._cancelled = True
            raise Cancelled(f"signal {signum}")
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                signal.signal(sig, handler)
            except ValueError:  # not the main thread (e.g. under a test runner thread)
                pass

    # -------------------------------------------------------------- models

    def seed_model(self) -> str:
        return resolve_model(self.cfg.model, self.ws.root)

    def model_of(self, iteration: int) -> str:
        """The judge after `iteration` (0 = the seed)."""
        if iteration == 0:
            return self.seed_model()
        row = self.store.iteration(self.run_id, iteration)
        if row["train_status"] not in ("done", "skipped") or not row["checkpoint"]:
            raise StoreError(f"iteration {iteration} of {self.run_id} has no trained checkpoint yet")
        return row["checkpoint"]

    def sampler(self, model_path: str) -> Sampler:
        if model_path not in self._samplers:
            self._samplers.clear()  # one model in memory at a time
            if self._sampler_factory:
                self._samplers[model_path] = self._sampler_factory(model_path)
            else:
                self._samplers[model_path] = make_sampler(self.cfg.sampling.backend, model_path,
                                                          self.cfg.sampling.device)
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

    def _guarded(self, iteration: int, stage: str, fn):
        try:
            return fn()
        except Cancelled:
            self.store.set_stage(self.run_id, iteration, stage, "cancelled")
            raise
        except BaseException:
            self.store.set_stage(self.run_id, iteration, stage, "failed")
            raise

    # -------------------------------------------------------------- stages

    def sample(self, k: int) -> None:
        if k < 1:
            raise StoreError("sampling happens in iterations 1..K (iteration 0 is the seed evaluation)")
        if not self._stage(k, "sample"):
            return
        model = self.model_of(k - 1)
        self.store.ensure_iteration(self.run_id, k, sampler_model=model)

        def work():
            s = self.cfg.sampling
            items = self.store.items(self.cfg.train_dataset, "train", self.cfg.max_train_items)
            requests = [JudgeRequest(it["item_id"], "a", absolute_messages(it)) for it in items.iter_rows(named=True)]
            params = SamplingParams(temperature=s.temperature, top_p=s.top_p, max_new_tokens=s.max_new_tokens,
                                    repetition_penalty=s.repetition_penalty, force_score=bool(s.force_score))
            written = sample_and_store(
                self.store, self.sampler(model), requests, run_id=self.run_id, iteration=k, purpose="train",
                n=s.n, params=params, base_seed=s.seed + 1000 * k, batch_size=s.batch_size,
                progress=lambda d, t: self.log.progress(k, "sample", d, t),
            )
            self.store.set_stage(self.run_id, k, "sample", "done")
            self.log(f"[iter {k}] sample: done ({written} judgments written)")
        self._guarded(k, "sample", work)

    def curate(self, k: int) -> dict:
        if not self._stage(k, "curate"):
            return self.store.iteration(self.run_id, k)["curate_report"] or {}

        def work():
            def fn(judgments, golds):
                result = curate(judgments, golds, self.cfg.curation)
                return result.pairs, result.report
            report = self.store.run_curation(self.run_id, k, self.cfg.train_dataset, fn)
            self.log(f"[iter {k}] curate: {report['pairs']} pairs from {report['items']} items;"
                     f" skipped {report['skipped']}")
            return report
        return self._guarded(k, "curate", work)

    def train(self, k: int) -> dict:
        if not self._stage(k, "train"):
            return self.store.iteration(self.run_id, k)["train_metrics"] or {}

        def work():
            from engine.training import train_dpo  # heavy (TRL): imported only when training

            policy = self.model_of(k - 1)
            reference = self.seed_model() if self.cfg.training.reference == "seed" else policy
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
                pairs.append({"prompt": absolute_messages(row), "chosen": chosen, "rejected": row["rejected_text"]})
            out_dir = self.run_dir / "checkpoints" / f"iter-{k}"
            self.log(f"[iter {k}] train: DPO on {len(pairs)} pairs (policy {policy}, reference {reference})")
            self._samplers.clear()  # free the sampler's model before training
            metrics = train_dpo(policy_path=policy, reference_path=reference, pairs=pairs, cfg=self.cfg.training,
                                out_dir=out_dir, device=self.cfg.sampling.device, log=self.log,
                                progress=lambda d, t: self.log.progress(k, "train", d, t, echo=False))
            metrics = {**metrics, "train/pairs": len(pairs)}
            self.store.set_stage(self.run_id, k, "train", "done", checkpoint=str(out_dir), report=metrics)
            return metrics
        return self._guarded(k, "train", work)

    def evaluate(self, k: int) -> dict:
        if not self._stage(k, "evaluate"):
            return self.store.run_status(self.run_id)["iterations"][k]["metrics"]
        if k == 0:
            seed = self.seed_model()
            self.store.ensure_iteration(self.run_id, 0, sampler_model=seed)
            for stage in ("sample", "curate", "train"):
                self.store.set_stage(self.run_id, 0, stage, "skipped", checkpoint=seed if stage == "train" else None)

        def work():
            model = self.model_of(k)
            e, s = self.cfg.evaluation, self.cfg.sampling
            params = SamplingParams(temperature=e.temperature, top_p=s.top_p if e.temperature > 0 else 1.0,
                                    max_new_tokens=e.max_new_tokens or s.max_new_tokens,
                                    repetition_penalty=s.repetition_penalty, force_score=bool(s.force_score))
            results = {}
            for name in self.cfg.eval_datasets:
                items = self.store.items(name, None if self.cfg.eval_split == "all" else self.cfg.eval_split,
                                         self.cfg.max_eval_items)
                sample_and_store(
                    self.store, self.sampler(model), eval_requests(items), run_id=self.run_id, iteration=k,
                    purpose="eval", n=e.n, params=params, base_seed=e.seed, batch_size=s.batch_size,
                    progress=lambda d, t, name=name: self.log.progress(k, "evaluate", d, t, dataset=name),
                )
                judgments = self.store.judgments(self.run_id, k, "eval")
                judgments = judgments.filter(judgments["item_id"].is_in(items["item_id"].implode()))
                metrics = dataset_metrics(items, judgments)
                self.store.put_metrics(self.run_id, k, name, metrics)
                results[name] = metrics
                self.log(f"[iter {k}] evaluate {name}: " + " ".join(f"{m}={v:.3f}" for m, v in metrics.items()))
            self.store.set_stage(self.run_id, k, "evaluate", "done")
            return results
        return self._guarded(k, "evaluate", work)
