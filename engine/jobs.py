"""Jobs: a run started as a separate `selfrat` process, and how the app watches and stops it.

    from engine import jobs
    job = jobs.launch_run(ws, cfg, "first")          # python -m selfrat -w WS run configs/first.yaml --run-id first
    jobs.launch_run(ws, cfg, "first", dry_run=True)  # the same checks and argv, nothing written or started
    jobs.status(ws, "first")                         # {"running": True, "progress": {"stage": "sample", ...}, ...}
    jobs.running(ws)                                 # the status of every run with a live process
    jobs.tail(ws, "first", 20)                       # last lines of runs/first/run.log
    jobs.cancel(ws, "first")                         # SIGTERM to the job's process group: run status 'cancelled'
    jobs.launch_next_iteration(ws, "first")          # selfrat resume first --iterations K+1

The app never runs engine work in its own process (torch would live in the Streamlit server, and a page
rerun must not block on sampling). A launch writes `runs/<id>/job.json` ({pid, argv, started_at}) and
appends the process's stdout/stderr to `runs/<id>/job.out`; the runner itself writes `run.log` and
`progress.jsonl` there. Any process (a restarted app, a second browser tab) can find the job from those
files. Processes are watched and stopped with psutil and runs are locked with filelock, so this works (and
imports) on Linux, macOS and Windows. This module imports nothing heavy: it is safe to import in the app.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import psutil
from filelock import FileLock

from engine.config import RunConfig
from engine.runs import amend_config, check_run_id, done_iterations, save_run_config
from engine.workspace import RunLog
from store import Store, StoreError
from store.errors import SelfratError

JOB_FILE = "job.json"
OUT_FILE = "job.out"
LOCK_FILE = "job.lock"
POSIX = os.name == "posix"

# Popen objects of the jobs this process started: polling them reaps the child (no zombie) and gives its
# exit code. Module-level, so it survives Streamlit reruns (the module is imported once per server).
_children: dict[int, subprocess.Popen] = {}


class JobRunning(SelfratError, RuntimeError):
    """A job of this run is alive already; cancel it or wait for it before launching another."""


@dataclass
class Job:
    """A launched job; from a dry run, the job a launch would start (`pid` and `started_at` None)."""

    run_id: str
    pid: int | None
    argv: list[str]
    started_at: str | None
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
    """An exclusive lock on the run dir (flock on POSIX, msvcrt on Windows): a check-then-spawn is atomic
    across processes and threads."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(run_dir / LOCK_FILE)):
        yield


# ------------------------------------------------------------------ processes


def _process(pid: int) -> psutil.Process | None:
    """The live (non-zombie) process `pid`, or None."""
    try:
        proc = psutil.Process(pid)
        return None if proc.status() == psutil.STATUS_ZOMBIE else proc
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def _cmdline(pid: int) -> list[str] | None:
    try:
        return psutil.Process(pid).cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, ValueError):
        return None


def _create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def _reap(pid: int) -> int | None:
    """If `pid` is a child of this process that has exited, reap it (no zombie) and return its exit code;
    None while it runs or when it is not our child."""
    proc = _children.get(pid)
    if proc is not None:
        rc = proc.poll()
        if rc is not None:
            _children.pop(pid, None)
        return rc
    if not hasattr(os, "WNOHANG"):  # Windows: no zombies to reap
        return None
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return None
    return os.waitstatus_to_exitcode(status) if done else None


def _alive(pid: int, argv: list[str], created: float | None) -> bool:
    """True while `pid` is the process we started: same creation time and our argv. A pid the system reused
    for another program does not count, nor does a zombie."""
    proc = _process(pid)
    if proc is None:
        return False
    try:
        if created is not None and abs(proc.create_time() - created) > 0.01:
            return False
        cmd = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except psutil.AccessDenied:
        return created is not None
    # Empty for a moment while the system sets up an exec'd image; the creation time already vouches for it.
    return cmd == argv or (cmd == [] and created is not None)


def command(workspace: str | Path, args: list[str]) -> list[str]:
    """The exact argv a launch runs (the app shows it before the button is pressed)."""
    return [sys.executable, "-m", "selfrat", "--workspace", str(workspace), *args]


def current(workspace: str | Path, run_id: str) -> Job | None:
    """The live job of a run, or None."""
    run_dir = _run_dir(workspace, run_id)
    info = _read_job_file(run_dir)
    if not info or "pid" not in info:
        return None
    pid, argv = int(info["pid"]), list(info["argv"])
    if _alive(pid, argv, info.get("create_time")):
        return Job(run_id=run_id, pid=pid, argv=argv, started_at=info["started_at"], log_path=run_dir / "run.log")
    # Not running (checked first, so a job that exits between two checks is still reaped): if it was our
    # child, reap it. Only the launching process learns the exit code: keep it for status() in any process.
    rc = _reap(pid)
    if rc is not None:
        _write_json_atomic(run_dir / JOB_FILE, {**info, "returncode": rc,
                                                "ended_at": datetime.now().isoformat(timespec="seconds")})
        return None
    if pid in _children:
        # Our child whose main thread has exited while other threads still wind down: it shows as a zombie,
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
    cmd = _cmdline(int(pid)) if _process(int(pid)) else None
    if cmd and any("selfrat" in a for a in cmd):
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
            # by a shell. A new session (POSIX) makes the job its own process group, so cancel() reaches any
            # children it starts, and Ctrl-C in the app's terminal does not reach the job; on Windows a new
            # process group keeps Ctrl-C away likewise.
            detach = ({"start_new_session": True} if POSIX
                      else {"creationflags": getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)})
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, close_fds=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"}, **detach,
            )
        _children[proc.pid] = proc
        job = Job(run_id=run_id, pid=proc.pid, argv=argv, started_at=started_at, log_path=run_dir / "run.log")
        _write_json_atomic(run_dir / JOB_FILE, {"pid": proc.pid, "argv": argv, "started_at": started_at,
                                                "create_time": _create_time(proc.pid)})
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


def running(workspace: str | Path) -> list[dict]:
    """What is running in the workspace (`selfrat jobs`): the `status()` of every run with a live job, and
    of runs a `selfrat run/resume` started elsewhere (a terminal) is running (`"launched": False`), by run id."""
    out = {}
    for job_file in sorted(Path(workspace).glob(f"runs/*/{JOB_FILE}")):
        run_id = job_file.parent.name
        if current(workspace, run_id) is not None:
            out[run_id] = {"run_id": run_id, "launched": True, **status(workspace, run_id)}
    if (Path(workspace) / "selfrat.duckdb").exists():  # listing jobs must not create a workspace
        with contextlib.suppress(StoreError):
            runs = Store.in_workspace(workspace).runs()
            for run_id in runs.filter(runs["status"] == "running")["run_id"].to_list():
                pid = None if run_id in out else _foreign_runner(workspace, run_id)
                if pid is not None:
                    st = status(workspace, run_id)
                    created = _create_time(pid)
                    out[run_id] = {"run_id": run_id, "launched": False, **st, "running": True, "pid": pid,
                                   "argv": _cmdline(pid), "returncode": None,
                                   "started_at": datetime.fromtimestamp(created).isoformat(timespec="seconds")
                                   if created else None}
    return [out[k] for k in sorted(out)]


def cancel(workspace: str | Path, run_id: str, timeout_s: float = 60) -> bool:
    """Stop a run's job: SIGTERM to its process group on POSIX, terminate() to it and its children on Windows
    (the runner stops where it is and marks the run cancelled); SIGKILL / kill() to what is left after
    timeout_s. True if a job was running; StoreError for a run the workspace does not have."""
    job = current(workspace, run_id)
    if job is None:
        if not _run_dir(workspace, run_id).is_dir():
            Store.in_workspace(workspace).run(run_id)  # raises naming the unknown run
        return False
    _signal_job(job.pid, kill=False)
    # The leader first; then its helpers (e.g. multiprocessing's resource tracker ignores SIGTERM and
    # leaves once the leader's pipes close).
    if not _wait(lambda: current(workspace, run_id) is None and not _group(job.pid), timeout_s):
        _signal_job(job.pid, kill=True)
        _wait(lambda: current(workspace, run_id) is None and not _group(job.pid), 10)
    # A job stopped before the runner installed its handler (or killed) could not record it.
    with contextlib.suppress(StoreError):
        store = Store.in_workspace(workspace)
        if store.run(run_id)["status"] in ("pending", "running"):
            store.update_run(run_id, status="cancelled")
            RunLog(_run_dir(workspace, run_id), echo=False)("cancelled (the job was stopped before it could say so)")
    return True


_known: dict[int, set[psutil.Process]] = {}  # Windows: a job's processes seen so far (no process groups)


def _signal_job(pid: int, kill: bool) -> None:
    """SIGTERM (kill: SIGKILL) to the job's process group; on Windows, to the job and its descendants."""
    if POSIX:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL if kill else signal.SIGTERM)
        return
    procs = _known.setdefault(pid, set())
    with contextlib.suppress(psutil.Error):
        leader = psutil.Process(pid)
        procs.update([leader, *leader.children(recursive=True)])
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill() if kill else proc.terminate()


def _group(pgid: int) -> list[int]:
    """Live (non-zombie) processes of the job led by `pgid`: its process group on POSIX; on Windows the
    processes `_signal_job` found (the job and its descendants)."""
    if not POSIX:
        return [p.pid for p in _known.get(pgid, ()) if _process(p.pid) is not None]
    out = []
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) == pgid and _process(pid) is not None:
                out.append(pid)
        except (ProcessLookupError, PermissionError):  # exited while we looked
            continue
    return out


def _wait(done, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# ------------------------------------------------------------------ runs


def _config_path(workspace: str | Path, name: str) -> Path:
    return Path(workspace) / "configs" / f"{name}.yaml"


def _planned(workspace: str | Path, run_id: str, args: list[str]) -> Job:
    return Job(run_id=run_id, pid=None, argv=command(workspace, args), started_at=None,
               log_path=_run_dir(workspace, run_id) / "run.log")


def launch_run(workspace: str | Path, cfg: RunConfig, run_id: str, dry_run: bool = False) -> Job:
    """Start a new run as a job; refuses a run id that exists (use launch_next_iteration to continue it).
    `dry_run`: the same checks, and the Job it would start (its argv: what the app shows), starting nothing
    and writing nothing."""
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
    path = _config_path(workspace, run_id)
    args = ["run", str(path), "--run-id", run_id]
    if dry_run:
        return _planned(workspace, run_id, args)
    save_run_config(path.parent, cfg, path.name)
    return launch(workspace, run_id, args)


def launch_next_iteration(workspace: str | Path, run_id: str, cfg: RunConfig | None = None,
                          dry_run: bool = False) -> Job:
    """Continue a run up to one iteration past its completed ones (finishing a cancelled one first), with
    `cfg`'s sampling/curation/training/evaluation for what is not done yet. `dry_run`: the same checks, and
    the Job it would start, starting nothing and writing nothing."""
    job = current(workspace, run_id)
    if job is not None:  # before reading the store: a run just launched may not be recorded there yet
        raise JobRunning(f"run {run_id} already has a job running (pid {job.pid}, started {job.started_at})")
    store = Store.in_workspace(workspace)
    run = store.run(run_id)
    nxt = done_iterations(store, run_id) + 1
    args = ["resume", run_id, "--iterations", str(nxt)]
    amend_config(run["config"], cfg, nxt, nxt - 1)  # refuse a bad change now, not inside the job
    if cfg is not None:
        path = _config_path(workspace, f"{run_id}-iter{nxt}")
        args += ["--config", str(path)]
        if not dry_run:
            save_run_config(path.parent, cfg, path.name)
    return _planned(workspace, run_id, args) if dry_run else launch(workspace, run_id, args)


__all__ = [
    "Job", "JobRunning", "amend_config", "cancel", "check_run_id", "command", "current", "done_iterations",
    "launch", "launch_next_iteration", "launch_run", "running", "status", "tail",
]
