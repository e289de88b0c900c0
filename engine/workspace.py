"""Where things live in a workspace: the database and one directory per run.

    $SELFRAT_HOME (default ./.selfrat)
      selfrat.duckdb            the store
      runs/<run_id>/            config.yaml, run.log, progress.jsonl, checkpoints/iter-<k>/

The embedded judge is not in the workspace: its plain checkpoint is built once per machine into the user
cache (`engine.models.cache_dir()`: $SELFRAT_CACHE, else $XDG_CACHE_HOME/selfrat, else ~/.cache/selfrat)
and shared by every workspace.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from store import Store


def default_workspace() -> Path:
    """The workspace when none is named: $SELFRAT_HOME, else ./.selfrat (the one rule; the CLI and the app
    both ask here)."""
    return Path(os.environ.get("SELFRAT_HOME") or "./.selfrat")


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def open(cls, root: str | Path | None = None) -> "Workspace":
        ws = cls(Path(root) if root else default_workspace())
        ws.root.mkdir(parents=True, exist_ok=True)
        return ws

    def run_dir(self, run_id: str) -> Path:
        return self.root / "runs" / run_id

    def store(self) -> Store:
        return Store.in_workspace(self.root)

    def new_run_id(self, prefix: str = "run") -> str:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        run_id = f"{prefix}-{stamp}"
        n = 1
        while self.run_dir(run_id).exists():
            n += 1
            run_id = f"{prefix}-{stamp}-{n}"
        return run_id


class RunLog:
    """The run's log file (human lines, tailed by the app) and progress.jsonl (one object per update)."""

    def __init__(self, run_dir: Path, echo: bool = True):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = run_dir / "run.log"
        self.progress_path = run_dir / "progress.jsonl"
        self.echo = echo

    def __call__(self, message: str) -> None:
        line = f"{datetime.now().isoformat(timespec='seconds')} {message}"
        with self.log_path.open("a") as f:
            f.write(line + "\n")
        if self.echo:
            print(line, flush=True)

    def progress(self, iteration: int, stage: str, done: int, total: int, echo: bool = True, **extra) -> None:
        """Record where a stage is (the app's job panel reads the last record); `echo` also logs a line."""
        record = {"t": time.time(), "iteration": iteration, "stage": stage, "done": done, "total": total, **extra}
        with self.progress_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if echo:
            self(f"[iter {iteration}] {stage}: {done}/{total}" + "".join(f" {k}={v}" for k, v in extra.items()))
