"""Jobs as the app runs them: real `selfrat` processes on a tiny random Llama, watched through job.json,
run.log and progress.jsonl, cancelled with SIGTERM and resumed; `resume --iterations/--config`; the
curation preview; and the app editing pairs while a job writes to the same DuckDB file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from engine import jobs
from engine.config import ConfigError, CurationConfig, RunConfig, parse_run_config
from engine.demo import demo_data_path, ensure_demo_dataset
from engine.workspace import Workspace
from store import Store, StoreError

from helpers import cli, fake_sampled_run, merged, runner, tiny_run_config, wait_until

ROOT = Path(__file__).resolve().parents[1]


def tiny_cfg(model_dir: Path, **over) -> RunConfig:
    """The tiny run cut to 1 iteration evaluated on 2 demo items (seed 5, short rationales), validated."""
    cfg = tiny_run_config(model_dir, iterations=1, eval_datasets=["demo"], max_eval_items=2,
                          sampling={"max_new_tokens": 10, "seed": 5}, evaluation={"max_new_tokens": 8})
    return parse_run_config(merged(cfg, **over), "test config")


def wait_job(ws: Path, run_id: str, timeout_s: float = 150) -> dict:
    wait_until(lambda: jobs.current(ws, run_id) is None, timeout_s, f"job {run_id} to end", every=0.25)
    st = jobs.status(ws, run_id)
    assert st["returncode"] == 0, "\n".join(jobs.tail(ws, run_id, 40, which="out"))
    return st


def group_gone(pgid: int) -> bool:
    """No live process left in the group (a zombie awaiting its reaper is not running anything)."""
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                return False
        except (OSError, psutil.Error):  # exited while we looked
            continue
    return True


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("jobs") / "ws"
    ensure_demo_dataset(Workspace.open(root))
    return root


@pytest.fixture(scope="module")
def finished(ws, tiny_model_dir) -> dict:
    """A 1-iteration run launched as a job and run to the end: what the other tests build on."""
    t0 = time.monotonic()
    job = jobs.launch_run(ws, tiny_cfg(tiny_model_dir), "base")
    st = wait_job(ws, "base")
    return {"job": job, "status": st, "elapsed": time.monotonic() - t0}


def test_launched_run_runs_to_the_end_and_reports(ws, finished):
    job, st = finished["job"], finished["status"]
    cfg_path = ws / "configs" / "base.yaml"
    assert job.argv == jobs.command(ws, ["run", str(cfg_path), "--run-id", "base"])
    assert job.argv[:3] == [sys.executable, "-m", "selfrat"]
    saved = json.loads((ws / "runs" / "base" / "job.json").read_text())
    assert saved["pid"] == job.pid and saved["argv"] == job.argv and saved["returncode"] == 0
    # The job process is the runner itself (no shell in between): the store recorded its pid.
    store = Store.in_workspace(ws)
    assert store.run("base")["pid"] == job.pid
    model = Path(store.run("base")["config"]["model"])
    assert yaml.safe_load(cfg_path.read_text()) == tiny_cfg(model).model_dump(mode="json")
    assert st["running"] is False and st["run_status"] == "done" and st["pid"] == job.pid
    assert st["progress"]["stage"] == "evaluate" and st["progress"]["iteration"] == 1
    assert st["progress"]["done"] == st["progress"]["total"] == 2
    lines = jobs.tail(ws, "base", 5)
    assert len(lines) == 5 and lines[-1].endswith(" done")
    assert any("[iter 1] evaluate demo:" in line for line in lines)
    assert len(jobs.tail(ws, "base", 10_000)) == len((ws / "runs" / "base" / "run.log").read_text().splitlines())
    assert jobs.current(ws, "base") is None and jobs.cancel(ws, "base") is False
    with pytest.raises(StoreError, match="exists already"):
        jobs.launch_run(ws, tiny_cfg(model), "base")
    with pytest.raises(ConfigError, match="run id"):
        jobs.launch_run(ws, tiny_cfg(model), "../escape")
    status = store.run_status("base")
    assert status["iterations"][1]["train_judgments"] == 8 * 3
    assert status["iterations"][1]["stages"]["train"] == "done"


def test_cancel_during_sampling_then_next_iteration_completes(ws, tiny_model_dir):
    items, n = 6, 2
    # use_forced off: the untrained tiny judge only has forced scores, so no pairs and no slow DPO step.
    cfg = tiny_cfg(tiny_model_dir, eval_datasets=[], max_train_items=items, curation={"use_forced": False},
                   sampling={"n": n, "batch_size": 1, "max_new_tokens": 16})
    job = jobs.launch_run(ws, cfg, "cancelme")
    # One job per run: a second launch is refused while the first lives, whatever it would run.
    with pytest.raises(jobs.JobRunning):
        jobs.launch(ws, "cancelme", ["status", "cancelme"])
    with pytest.raises(jobs.JobRunning):
        jobs.launch_next_iteration(ws, "cancelme")
    progress = wait_until(
        lambda: (p := jobs.status(ws, "cancelme")["progress"]) and p["stage"] == "sample" and p["done"] >= 1 and p,
        what="sampling to start")
    assert progress["iteration"] == 1 and progress["total"] == items
    assert jobs.current(ws, "cancelme").pid == job.pid

    assert jobs.cancel(ws, "cancelme", timeout_s=60) is True
    assert group_gone(job.pid) and jobs.current(ws, "cancelme") is None
    st = jobs.status(ws, "cancelme")
    assert st["running"] is False and st["run_status"] == "cancelled" and st["returncode"] == 130
    store = Store.in_workspace(ws)
    assert store.iteration("cancelme", 1)["sample_status"] == "cancelled"
    partial = store.judgments("cancelme", 1, "train").height
    assert 0 < partial < items * n
    assert "cancelled" in jobs.tail(ws, "cancelme", 1)[0]

    # Continue with bigger batches (a --config the job applies to what is not done yet): same seeds, so
    # the stored samples are kept and only the missing ones are drawn.
    faster = cfg.model_copy(update={"sampling": cfg.sampling.model_copy(update={"batch_size": items})})
    nxt = jobs.launch_next_iteration(ws, "cancelme", faster)
    assert nxt.argv[-6:] == ["resume", "cancelme", "--iterations", "1", "--config",
                             str(ws / "configs" / "cancelme-iter1.yaml")]
    wait_job(ws, "cancelme")
    assert store.run("cancelme")["config"]["sampling"]["batch_size"] == items
    assert jobs.status(ws, "cancelme")["run_status"] == "done"
    judgments = store.judgments("cancelme", 1, "train")
    assert judgments.height == items * n  # nothing lost, nothing drawn twice
    assert judgments.select("item_id", "sample_index").unique().height == items * n
    assert store.iteration("cancelme", 1)["train_status"] == "skipped"


def test_jobs_and_cancel_commands_on_a_launched_run(ws, tiny_model_dir):
    """`selfrat jobs` lists what the app's job panel shows, and `selfrat cancel` is its Cancel button."""
    cfg = tiny_cfg(tiny_model_dir, eval_datasets=[], max_train_items=40, curation={"use_forced": False},
                   sampling={"n": 2, "batch_size": 1, "max_new_tokens": 16})
    planned = jobs.launch_run(ws, cfg, "clijob", dry_run=True)  # what the Launch page shows: nothing written
    assert planned.pid is None and not (ws / "configs" / "clijob.yaml").exists()
    assert not (ws / "runs" / "clijob").exists()
    job = jobs.launch_run(ws, cfg, "clijob")
    assert job.argv == planned.argv
    wait_until(lambda: (p := jobs.status(ws, "clijob")["progress"]) and p["stage"] == "sample" and p["done"] >= 1,
               what="sampling to start")

    res = cli(ws, "jobs", "--json")
    listed = {j["run_id"]: j for j in json.loads(res.stdout)["jobs"]}
    assert set(listed) == {"clijob"}
    mine = listed["clijob"]
    assert mine["pid"] == job.pid and mine["launched"] is True and mine["argv"] == job.argv
    assert mine["started_at"] == job.started_at and mine["progress"]["stage"] == "sample"
    text = cli(ws, "jobs").stdout
    assert text.startswith(f"clijob  pid {job.pid}  iteration 1 sample ") and f"started {job.started_at}" in text

    res = cli(ws, "cancel", "clijob")
    assert res.stdout == "cancelled clijob: `selfrat resume clijob` continues it\n"
    assert group_gone(job.pid) and jobs.current(ws, "clijob") is None
    assert jobs.status(ws, "clijob")["run_status"] == "cancelled"
    assert Store.in_workspace(ws).iteration("clijob", 1)["sample_status"] == "cancelled"
    assert cli(ws, "jobs").stdout == "no jobs running\n"
    assert cli(ws, "cancel", "clijob").stdout == "no job of clijob is running\n"
    res = cli(ws, "cancel", "nosuchrun", code=2)
    assert res.exit_code == 2 and "no run 'nosuchrun'" in res.stderr


def test_resume_adds_iterations_and_amends_config(ws, finished, tmp_path):
    store = Store.in_workspace(ws)
    model = store.run("base")["config"]["model"]
    bad = tmp_path / "other_model.yaml"
    bad.write_text(yaml.safe_dump(tiny_cfg(Path(model)).model_dump(mode="json") | {"model": "embedded"}))
    res = cli(ws, "resume", "base", "--config", str(bad), code=2)
    assert res.exit_code == 2 and "keeps its model" in res.output and "start a new run" in res.output
    assert store.run("base")["config"]["model"] == model

    # Iteration 2 with another curation (no forced scores: no pairs, so no slow DPO step): the store,
    # config.yaml and run.log all carry the change, and iteration 2 is curated with it.
    new = tmp_path / "next.yaml"
    new.write_text(yaml.safe_dump(tiny_cfg(Path(model), curation={"min_margin": 2, "use_forced": False})
                                  .model_dump(mode="json")))
    cli(ws, "resume", "base", "--iterations", "2", "--config", str(new))
    config = store.run("base")["config"]
    assert config["iterations"] == 2 and config["curation"]["min_margin"] == 2
    assert yaml.safe_load((ws / "runs" / "base" / "config.yaml").read_text()) == config
    assert "config updated from" in (ws / "runs" / "base" / "run.log").read_text()
    status = store.run_status("base")
    assert status["status"] == "done" and [it["index"] for it in status["iterations"]] == [0, 1, 2]
    assert status["iterations"][2]["train_judgments"] == 8 * 3
    report2 = store.iteration("base", 2)["curate_report"]
    assert report2["params"]["min_margin"] == 2 and report2["params"]["use_forced"] is False
    assert report2["pairs"] == 0 and status["iterations"][2]["stages"]["train"] == "skipped"
    assert store.iteration("base", 1)["curate_report"]["params"]["min_margin"] == 1  # done stays done
    assert status["iterations"][2]["sampler_model"] == status["iterations"][1]["checkpoint"]
    assert set(status["iterations"][2]["metrics"]) == {"demo"}

    # --iterations never drops below what is done.
    cli(ws, "resume", "base", "--iterations", "1")
    assert store.run("base")["config"]["iterations"] == 2
    with pytest.raises(ConfigError, match="eval_datasets"):
        jobs.launch_next_iteration(ws, "base", tiny_cfg(Path(model), eval_datasets=[]))
    assert jobs.current(ws, "base") is None
    # An evaluate-only run has no training data: there is no next iteration to launch, and no job starts.
    store.create_run("evalonly", "evaluate", {"model": model, "eval_datasets": ["demo"], "iterations": 0})
    with pytest.raises(ConfigError, match="train_dataset is required"):
        jobs.launch_next_iteration(ws, "evalonly")
    assert not (ws / "runs" / "evalonly" / "job.json").exists()


def test_preview_counts_equal_what_curate_writes(tmp_path):
    from engine.curation import preview

    def script(messages, index, seed):  # scores spread over 1..5, a few unparsable
        return "Too short." if seed % 7 == 0 else f"Reasoning {seed}. [RESULT] {seed % 5 + 1}"

    r = fake_sampled_run(tmp_path / "ws", "pv", script, max_train_items=30, n=6)
    rid = r.run_id
    store = r.ws.store()
    loose = preview(store, rid, 1, r.cfg.curation)
    strict = preview(store, rid, 1, CurationConfig(min_margin=3, max_pairs_per_item=1))
    assert 0 < strict["pairs"] < loose["pairs"] and strict["params"]["min_margin"] == 3
    assert store.pairs(rid, 1).height == 0 and store.iteration(rid, 1)["curate_status"] == "pending"

    written = r.curate(1)
    assert loose == written == store.iteration(rid, 1)["curate_report"]
    assert store.pairs(rid, 1).height == loose["pairs"]
    assert loose["judgments"] == 30 * 6 and loose["items"] == 30
    assert sum(loose["margin_hist"].values()) == sum(loose["chosen_score_hist"].values()) == loose["pairs"]


def test_a_signal_during_a_store_query_still_cancels(tmp_path):
    """DuckDB turns the handler's Cancelled, raised while a query runs, into RuntimeError('Query
    interrupted'): the run must still end 'cancelled' (exit 130, resumable), not 'failed'."""
    import signal
    import threading

    import duckdb

    from engine.iteration import Cancelled, Runner, create_run
    from engine.sampling import FakeSampler

    w = Workspace.open(tmp_path / "ws")
    ensure_demo_dataset(w)
    rid = create_run(w, parse_run_config({"model": "some-org/judge", "train_dataset": "demo", "iterations": 1,
                                          "max_train_items": 4, "sampling": {"n": 2}}), "sig")

    def script(messages, index, seed):
        # The cancel signal lands while a long query runs, as when the job writes a batch of judgments.
        threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
        duckdb.connect().execute("SELECT count(*) FROM range(100000000000) t(x) WHERE x % 7 = 3").fetchall()
        return "unreachable [RESULT] 3"

    previous = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(Cancelled, match="Query interrupted"):
            Runner(w, rid, sampler_factory=lambda path: FakeSampler(script), echo=False).run_all()
    finally:
        signal.signal(signal.SIGINT, previous)
    store = w.store()
    assert store.run(rid)["status"] == "cancelled"
    assert store.iteration(rid, 1)["sample_status"] == "cancelled"


def test_pair_edits_and_status_reads_while_a_job_writes(ws, finished, tiny_model_dir):
    """THE concurrency test: the app (this process) reviews pairs of a finished run and `selfrat status`
    reads, while a job process writes judgments batch by batch to the same DuckDB file."""
    store = Store.in_workspace(ws)
    pairs = store.pairs("base", 1)["pair_id"].to_list()
    assert len(pairs) >= 3
    audit_before = store.audit_log("base").height
    cfg = tiny_cfg(tiny_model_dir, eval_datasets=[], max_train_items=150,
                   sampling={"n": 2, "batch_size": 1, "max_new_tokens": 24})
    job = jobs.launch_run(ws, cfg, "busy")
    wait_until(lambda: (p := jobs.status(ws, "busy")["progress"]) and p["stage"] == "sample" and p["done"] >= 1,
               what="the busy job to write judgments")
    written_before = store.judgments("busy", 1, "train").height

    readers = []
    actions = ["accept", "reject", "swap", "edit", "note"] * 8
    applied = []
    for i, action in enumerate(actions):
        if i % 15 == 0:  # `selfrat status --json` in its own process, overlapping the edits and the job
            readers.append(subprocess.Popen(
                [sys.executable, "-m", "selfrat", "--workspace", str(ws), "status", "--json"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        pid = pairs[i % len(pairs)]
        kw = {"note": f"note {i}"} if action == "note" else {}
        if action == "edit":
            kw = {"rationale": f"Rewritten rationale {i}.", "score": i % 5 + 1}
        (after,) = store.apply_pair_action(pid, action, "tester", **kw)
        applied.append((pid, action, after))
    for p in readers:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        runs = {r["id"]: r for r in json.loads(out)["runs"]}
        assert {"base", "busy"} <= set(runs)
    still = jobs.current(ws, "busy")
    assert still is not None and still.pid == job.pid, "the job ended before the edits: no concurrency was tested"
    # The job keeps writing around the edits (on a loaded machine a batch can take longer than the edits).
    wait_until(lambda: store.judgments("busy", 1, "train").height > written_before,
               what="the busy job to write more judgments")
    assert jobs.cancel(ws, "busy") is True and jobs.status(ws, "busy")["run_status"] == "cancelled"
    assert group_gone(job.pid)

    audit = store.audit_log("base")
    assert audit.height - audit_before == 40
    rows = audit.tail(40).to_dicts()
    assert [(r["pair_id"], r["action"], r["who"]) for r in rows] == [(p, a, "tester") for p, a, _ in applied]
    assert [json.loads(r["after"]) for r in rows] == [json.loads(json.dumps(after)) for _, _, after in applied]
    final = {r["pair_id"]: r for r in store.pairs("base", 1).to_dicts()}
    last = {pid: after for pid, _, after in applied}
    for pid, after in last.items():
        got = final[pid]
        assert (got["status"], got["swapped"], got["edited_rationale"], got["edited_score"], got["note"]) == (
            after["status"], after["swapped"], after["edited_rationale"], after["edited_score"], after["note"])


def test_jobs_module_stays_light():
    code = ("import sys, engine.jobs, engine.demo, engine.curation; engine.demo.demo_config();"
            "print(sorted(m for m in ('torch', 'transformers', 'trl', 'engine.iteration', 'engine.sampling')"
            " if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def test_app_command_execs_streamlit_with_the_workspace(tmp_path, monkeypatch):
    import selfrat.cli

    seen = {}

    def fake_exec(file, argv, env):
        seen.update(file=file, argv=argv, env=env, cwd=os.getcwd())
        raise SystemExit(0)

    monkeypatch.setattr(selfrat.cli.os, "execvpe", fake_exec)
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(selfrat.cli.app, ["app", "--port", "8765", "--workspace", "rel_ws"])  # no global -w
    assert res.exit_code == 0, res.output
    # The app is found by module name (ui.app), not by a path computed from the engine.
    assert seen["argv"] == [sys.executable, "-m", "streamlit", "run", str(ROOT / "ui" / "app.py"),
                            "--server.address", "127.0.0.1", "--server.port", "8765", "--server.headless", "true",
                            "--browser.gatherUsageStats", "false"]
    assert seen["env"]["SELFRAT_HOME"] == str(tmp_path / "rel_ws")  # absolute: the cwd changes
    assert seen["cwd"] == str(ROOT) and (ROOT / ".streamlit" / "config.toml").is_file()


def test_app_command_serves_the_real_app(tmp_path):
    if not (ROOT / "ui" / "app.py").is_file():
        pytest.skip("ui/app.py is not there yet")
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "selfrat", "app", "--port", str(port), "--workspace",
                             str(tmp_path / "ws")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        def healthy():
            try:
                return urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=1).read() == b"ok"
            except OSError:
                return False
        wait_until(healthy, 60, "the app to answer", every=0.25)
        cmd = psutil.Process(proc.pid).cmdline()
        assert "streamlit" in cmd and "run" in cmd  # exec'd in place: the pid we started is streamlit
        assert psutil.Process(proc.pid).environ()["SELFRAT_HOME"] == str(tmp_path / "ws")
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


@pytest.mark.slow
def test_demo_prepare_only_builds_everything_but_runs_nothing(tmp_path):
    res = subprocess.run([sys.executable, "-m", "selfrat", "--workspace", str(tmp_path / "ws"), "demo",
                          "--prepare-only"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    store = Store.in_workspace(tmp_path / "ws")
    assert store.datasets()["name"].to_list() == ["demo"] and store.runs().height == 0
    from engine.models import EMBEDDED_DIRNAME, MARKER_FILE, cache_dir

    # Built once per machine into the shared user cache (slow tests keep the real one), not the workspace.
    assert (cache_dir() / EMBEDDED_DIRNAME / MARKER_FILE).is_file() and "embedded judge ready" in res.stdout
    assert f"embedded judge ready: {cache_dir() / EMBEDDED_DIRNAME}" in res.stdout
    assert not (tmp_path / "ws" / "models").exists()
    assert demo_data_path().endswith("demo.jsonl")
