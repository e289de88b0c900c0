"""Plain helpers the test files share (`from helpers import cli, ...`); the shared fixtures are in conftest.py.

- `cli(ws, ...)`: `selfrat --workspace WS ...` in this process, asserting its exit code.
- `strict_json(text)`: json.loads that refuses NaN / Infinity.
- `wait_until(predicate, ...)`: poll until the predicate holds, or fail the test.
- `kill_run_part_way(ws, cfg, ...)`: `selfrat run` as a child process, SIGKILLed once its progress is part way.
- `tiny_run_config(model_dir, ...)`: a run config small enough for the tiny random Llama on 2 CPU cores;
  `merged(cfg, ...)` overrides keys and sections of one.
- `fake_sampled_run(root, run_id, script, ...)`: the demo dataset and a run whose iteration 1 a scripted judge
  sampled (no model), to curate and review.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from click.testing import Result
from typer.testing import CliRunner

from engine.config import parse_run_config
from engine.workspace import Workspace
from selfrat.cli import app
from store import Store

if TYPE_CHECKING:
    from engine.iteration import Runner

runner = CliRunner()


def cli(ws: Path, *args: str, ok: bool = True, code: int = 0) -> Result:
    """Run `selfrat --workspace WS ARGS...`; unless `ok=False`, assert that it exits with `code`."""
    result = runner.invoke(app, ["--workspace", str(ws), *args])
    if ok:
        assert result.exit_code == code, result.output
    return result


def strict_json(text: str):
    """json.loads that refuses NaN / Infinity (what a strict parser, e.g. jq or JavaScript, would refuse)."""

    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def wait_until(predicate, timeout_s: float = 120, what: str = "condition", every: float = 0.1):
    """Call `predicate` every `every` s until it returns something true, and return that; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def kill_run_part_way(ws: Path, cfg_path: Path, run_id: str, progress: Callable[[Store], int],
                      part_way: Callable[[int], bool], timeout_s: float = 180) -> int:
    """Start `selfrat run CFG --run-id RUN` on workspace `ws` as a child process, read `progress(store)`
    while it writes (a read the job's lock or migration refuses is retried), and SIGKILL it as soon as
    `part_way(progress)` holds, or when it exits or `timeout_s` passes. Returns the last progress read: the
    test asserts it was part way (a kill too early or too late tests nothing)."""
    env = {**os.environ, "SELFRAT_HOME": str(ws)}
    proc = subprocess.Popen([sys.executable, "-m", "selfrat", "run", str(cfg_path), "--run-id", run_id],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store, seen = Store.in_workspace(ws), 0
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            try:
                seen = progress(store)
            except Exception:  # the database is busy, not migrated yet, or the run row not written yet
                continue
            if part_way(seen):
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    return seen


def tiny_run_config(model_dir: Path, **over) -> dict:
    """Two iterations on 8 demo items (3 samples each, 12 new tokens, seed 3: enough auto pairs with min_margin 1),
    evaluated on 6 items of "demo" and "chat". Each keyword replaces a key; a dict updates a section."""
    cfg = {
        "model": str(model_dir),
        "train_dataset": "demo",
        "eval_datasets": ["demo", "chat"],
        "iterations": 2,
        "max_train_items": 8,
        "max_eval_items": 6,
        "sampling": {"n": 3, "max_new_tokens": 12, "batch_size": 4, "force_score": True, "seed": 3},
        "curation": {"min_margin": 1, "max_pairs_per_item": 2},
        "training": {"epochs": 1, "batch_size": 4, "max_length": 512, "learning_rate": 1e-4},
    }
    return merged(cfg, **over)


def merged(cfg: dict, **over) -> dict:
    """`cfg` with each keyword replacing a key, or, for a dict, updating that section (a new section if none)."""
    out = dict(cfg)
    for k, v in over.items():
        out[k] = {**out.get(k, {}), **v} if isinstance(v, dict) else v
    return out


def fake_sampled_run(root: Path, run_id: str, script, *, max_train_items: int, n: int, curate: bool = False) -> Runner:
    """The demo dataset in workspace `root` and a 1-iteration run of a stand-in model, curation min_margin 1 and
    2 pairs per item, whose iteration 1 `script` (a FakeSampler script) has sampled; curated too if asked.
    Returns the run's Runner (`.ws`, `.cfg`; `.curate(1)` curates)."""
    from engine.demo import ensure_demo_dataset
    from engine.iteration import Runner, create_run  # torch comes with these: imported when used
    from engine.sampling import FakeSampler

    ws = Workspace.open(root)
    ensure_demo_dataset(ws)
    cfg = parse_run_config({"model": "some-org/judge", "train_dataset": "demo", "iterations": 1,
                            "max_train_items": max_train_items, "sampling": {"n": n, "max_new_tokens": 40},
                            "curation": {"min_margin": 1, "max_pairs_per_item": 2}})
    create_run(ws, cfg, run_id)
    r = Runner(ws, run_id, sampler_factory=lambda path: FakeSampler(script), echo=False)
    r.sample(1)
    if curate:
        r.curate(1)
    return r
