"""Jobs: a run started as a separate `selfrat` process, and how the app watches and stops it.

    from engine import jobs
    job = jobs.launch_run(ws, cfg, "first")          # python -m engine.cli --workspace WS run configs/first.yaml --run-id first
    jobs.status(ws, "first")                         # {"running": True, "progress": {"stage": "sample", ...}, ...}
    jobs.tail(ws, "first", 20)                       # last lines of runs/first/run.log
    jobs.cancel(ws, "first")                         # SIGTERM to the job's process group: run status 'cancelled'
    jobs.launch_next_iteration(ws, "first")          # selfrat resume first --iterations K+1

The app never runs engine work in its own process (torch would live in the Streamlit server, and a page
rerun must not block on sampling). A launch writes `runs/<id>/job.json` ({pid, argv, started_at}) and
appends the process's stdout/stderr to `runs/<id>/job.out`; the runner itself writes `run.log` and
`progress.jsonl` there. Any process (a restarted app, a second browser tab) can find the job from those
files. This module imports nothing heavy: it is safe to import in the app.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import yaml
from pydantic import ValidationError

from engine.config import ConfigError, RunConfig, format_validation_error
from engine.workspace import RunLog
from store import Store, StoreError

JOB_FILE = "job.json"
OUT_FILE = "job.out"
LOCK_FILE = "job.lock"
# A run id becomes a directory name and a CLI argument: keep it to plain characters.
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
# What a later iteration may change; everything else decides what the run's numbers mean.
AMENDABLE = ("iterations", "sampling", "curation", "training", "evaluation")

# Popen objects of the jobs this process started: polling them reaps the child (no zombie) and gives its
# exit code. Module-level, so it survives Streamlit reruns (the module is imported once per server).
_children: dict[int, subprocess.Popen] = {}


class JobRunning(RuntimeError):
    """A job of this run is alive already; cancel it or wait for it before launching another."""


@dataclass
class Job:
    run_id: str
    pid: int
    argv: list[str]
    started_at: str
    log_path: Path


# ------------------------------------------------------------------ paths and files


def _run_dir(workspace: str | Path, run_id: str) -> Path:
    return Path(workspace) / "runs" / run_id


def _write_json_atomic(path: Path, data: dict) -> None:
    # A reader (the app's status panel) must never see half a file: write aside, then rename.
    # Per process and thread: Streamlit serves each browser session from its own thread.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _read_job_file(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / JOB_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _last_lines(path: Path, n: int, block: int = 8192) -> list[str]:
    """The last n lines of a file, reading backwards from its end (logs grow without bound)."""
    if n <= 0:
        return []
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            pos = f.tell()
            data = b""
            while pos > 0 and data.count(b"\n") <= n:
                step = min(block, pos)
                pos -= step
                f.seek(pos)
                data = f.read(step) + data
    except FileNotFoundError:
        return []
    return data.decode("utf-8", errors="replace").splitlines()[-n:]


@contextlib.contextmanager
def _run_lock(run_dir: Path):
    """An exclusive advisory lock on the run dir: a check-then-spawn is atomic across processes."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK_FILE, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


# ------------------------------------------------------------------ processes


def _cmdline(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return raw.decode(errors="replace").split("\0")[:-1] if raw else []  # a zombie's cmdline is empty


def _reap(pid: int) -> int | None:
    """If `pid` is a child of this process that has exited, reap it (no zombie) and return its exit code;
    None while it runs or when it is not our child."""
    proc = _children.get(pid)
    if proc is not None:
        rc = proc.poll()
        if rc is not None:
            _children.pop(pid, None)
        return rc
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    return os.waitstatus_to_exitcode(status) if done else None


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks since boot) from /proc/<pid>/stat, or None if there is no such pid."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw[raw.rindex(")") + 2:].split()  # after "pid (comm) ": comm may hold spaces and parens
    return fields[0], int(fields[19])


def _alive(pid: int, argv: list[str], start: int | None) -> bool:
    """True while `pid` is the process we started: same start time and our argv. A pid the kernel reused
    for another program does not count, nor does a zombie."""
    stat = _stat(pid)
    if stat is None or stat[0] == "Z" or (start is not None and stat[1] != start):
        return False
    cmd = _cmdline(pid)
    # Empty for a moment while the kernel sets up an exec'd image; the start time already vouches for it.
    return cmd == argv or (cmd == [] and start is not None)


def command(workspace: str | Path, args: list[str]) -> list[str]:
    """The exact argv a launch runs (the app shows it before the button is pressed)."""
    return [sys.executable, "-m", "engine.cli", "--workspace", str(workspace), *args]


def current(workspace: str | Path, run_id: str) -> Job | None:
    """The live job of a run, or None."""
    run_dir = _run_dir(workspace, run_id)
    info = _read_job_file(run_dir)
    if not info or "pid" not in info:
        return None
    pid, argv = int(info["pid"]), list(info["argv"])
    if _alive(pid, argv, info.get("start")):
        return Job(run_id=run_id, pid=pid, argv=argv, started_at=info["started_at"], log_path=run_dir / "run.log")
    # Not running (checked first, so a job that exits between two checks is still reaped): if it was our
    # child, reap it. Only the launching process learns the exit code: keep it for status() in any process.
    rc = _reap(pid)
    if rc is not None:
        _write_json_atomic(run_dir / JOB_FILE, {**info, "returncode": rc,
                                                "ended_at": datetime.now().isoformat(timespec="seconds")})
        return None
    if pid in _children:
        # Our child whose main thread has exited while other threads still wind down: /proc shows a zombie,
        # but it cannot be reaped yet. It is still ending; the next poll gets its exit code.
        return Job(run_id=run_id, pid=pid, argv=argv, started_at=info["started_at"], log_path=run_dir / "run.log")
    return None


def _foreign_runner(workspace: str | Path, run_id: str) -> int | None:
    """The pid of a `selfrat run/resume` of this run started elsewhere (a terminal), if it is alive."""
    try:
        run = Store.in_workspace(workspace).run(run_id)
    except StoreError:
        return None
    pid = run.get("pid")
    if run["status"] != "running" or not pid or pid == os.getpid():
        return None
    cmd = _cmdline(int(pid))
    if cmd and any("selfrat" in a or a == "engine.cli" for a in cmd):
        return int(pid)
    return None


def launch(workspace: str | Path, run_id: str, args: list[str]) -> Job:
    """Start `selfrat <args>` for a run as a detached process; JobRunning while one of this run is alive."""
    run_dir = _run_dir(workspace, run_id)
    argv = command(workspace, args)
    with _run_lock(run_dir):
        job = current(workspace, run_id)
        if job is not None:
            raise JobRunning(f"run {run_id} already has a job running (pid {job.pid}, started {job.started_at})")
        other = _foreign_runner(workspace, run_id)
        if other is not None:
            raise JobRunning(f"run {run_id} is being run by another selfrat process (pid {other})")
        started_at = datetime.now().isoformat(timespec="seconds")
        with (run_dir / OUT_FILE).open("a") as out:
            out.write(f"--- {started_at} $ {' '.join(argv)}\n")
            out.flush()
            # An argument list, never through a shell: run ids and paths come from a form and must not be parsed
            # by a shell. A new session makes the job its own process group, so cancel() reaches any
            # children it starts, and Ctrl-C in the app's terminal does not reach the job.
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                close_fds=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        _children[proc.pid] = proc
        job = Job(run_id=run_id, pid=proc.pid, argv=argv, started_at=started_at, log_path=run_dir / "run.log")
        stat = _stat(proc.pid)
        _write_json_atomic(run_dir / JOB_FILE, {"pid": proc.pid, "argv": argv, "started_at": started_at,
                                                "start": stat[1] if stat else None})
    return job


def status(workspace: str | Path, run_id: str) -> dict:
    """What the app's job panel shows; cheap enough to poll every two seconds."""
    run_dir = _run_dir(workspace, run_id)
    job = current(workspace, run_id)  # first: it reaps and records the exit code
    info = _read_job_file(run_dir) or {}
    progress = None
    for line in reversed(_last_lines(run_dir / "progress.jsonl", 3)):
        try:
            progress = json.loads(line)
            break
        except json.JSONDecodeError:  # a line being written right now
            continue
    run_status, error = None, None
    if (Path(workspace) / "selfrat.duckdb").exists():  # a status poll must not create a workspace
        try:
            run = Store.in_workspace(workspace).run(run_id)
            run_status, error = run["status"], run["error"]
        except StoreError:
            pass
    return {
        "running": job is not None,
        "pid": info.get("pid"),
        "argv": info.get("argv"),
        "started_at": info.get("started_at"),
        "returncode": None if job is not None else info.get("returncode"),
        "progress": progress,
        "run_status": run_status,
        "error": error,
        "log_path": str(run_dir / "run.log"),
        "out_path": str(run_dir / OUT_FILE),
    }


def tail(workspace: str | Path, run_id: str, n: int = 40, which: str = "log") -> list[str]:
    """The last n lines of the run's run.log (which="log") or of the job's stdout/stderr (which="out",
    where a crash before the runner started, e.g. a bad argument, shows up)."""
    name = {"log": "run.log", "out": OUT_FILE}[which]
    return _last_lines(_run_dir(workspace, run_id) / name, n)


def cancel(workspace: str | Path, run_id: str, timeout_s: float = 60) -> bool:
    """Stop a run's job: SIGTERM to its process group (the runner stops where it is and marks the run cancelled),
    SIGKILL to what is left of the group after timeout_s. True if a job was running."""
    job = current(workspace, run_id)
    if job is None:
        return False
    pgid = job.pid  # start_new_session: the job leads its own group
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    # The leader first; then its helpers (e.g. multiprocessing's resource tracker ignores SIGTERM and
    # leaves once the leader's pipes close).
    if not _wait(lambda: current(workspace, run_id) is None and not _group(pgid), timeout_s):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        _wait(lambda: current(workspace, run_id) is None and not _group(pgid), 10)
    # A job stopped before the runner installed its handler (or SIGKILLed) could not record it.
    with contextlib.suppress(StoreError):
        store = Store.in_workspace(workspace)
        if store.run(run_id)["status"] in ("pending", "running"):
            store.update_run(run_id, status="cancelled")
            RunLog(_run_dir(workspace, run_id), echo=False)("cancelled (the job was stopped before it could say so)")
    return True


def _group(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            raw = (d / "stat").read_text()
        except OSError:  # exited while we looked
            continue
        fields = raw[raw.rindex(")") + 2:].split()  # state, ppid, pgrp, ...
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(d.name))
    return out


def _wait(done, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# ------------------------------------------------------------------ runs


def check_run_id(run_id: str) -> str:
    if not _RUN_ID.match(run_id or ""):
        raise ConfigError(f"run id {run_id!r}: use letters, digits, '.', '_' and '-' (start with a letter or digit)")
    return run_id


def _write_config(workspace: str | Path, name: str, cfg: RunConfig) -> Path:
    path = Path(workspace) / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path


def launch_run(workspace: str | Path, cfg: RunConfig, run_id: str) -> Job:
    """Start a new run as a job; refuses a run id that exists (use launch_next_iteration to continue it)."""
    check_run_id(run_id)
    store = Store.in_workspace(workspace)
    try:
        store.run(run_id)
    except StoreError:
        pass
    else:
        raise StoreError(f"run {run_id!r} exists already; continue it with the next iteration instead")
    for name in [cfg.train_dataset, *cfg.eval_datasets]:  # fail here, not in a job the user must go and read
        if name:
            store.dataset_kind(name)
    path = _write_config(workspace, run_id, cfg)
    return launch(workspace, run_id, ["run", str(path), "--run-id", run_id])


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


def launch_next_iteration(workspace: str | Path, run_id: str, cfg: RunConfig | None = None) -> Job:
    """Continue a run up to one iteration past its completed ones (finishing a cancelled one first), with
    `cfg`'s sampling/curation/training/evaluation for what is not done yet."""
    job = current(workspace, run_id)
    if job is not None:  # before reading the store: a run just launched may not be recorded there yet
        raise JobRunning(f"run {run_id} already has a job running (pid {job.pid}, started {job.started_at})")
    store = Store.in_workspace(workspace)
    run = store.run(run_id)
    nxt = done_iterations(store, run_id) + 1
    args = ["resume", run_id, "--iterations", str(nxt)]
    amend_config(run["config"], cfg, nxt, nxt - 1)  # refuse a bad change now, not inside the job
    if cfg is not None:
        args += ["--config", str(_write_config(workspace, f"{run_id}-iter{nxt}", cfg))]
    return launch(workspace, run_id, args)


__all__ = [
    "Job", "JobRunning", "amend_config", "cancel", "command", "current", "done_iterations", "launch",
    "launch_next_iteration", "launch_run", "status", "tail",
]
