"""With backend vllm the runner runs the sample and evaluate stages as child processes (`selfrat sample|evaluate
--run R --iteration K`), so vLLM's GPU memory is released before training; a cancel stops the child too.
The children import the fake vllm (tests/fake_vllm on their PYTHONPATH) and see one GPU (SELFRAT_GPU_COUNT)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import yaml

from engine.config import parse_run_config
from engine.iteration import Runner, create_run
from engine.workspace import Workspace

from helpers import tiny_run_config, wait_until

FAKE_DIR = Path(__file__).resolve().parent / "fake_vllm"
TEXT = "Accurate. [RESULT] 4"  # within the 12-token budget of tiny_run_config


@pytest.fixture
def vllm_children(monkeypatch, tmp_path) -> Path:
    """Children of this test find the fake vllm and one GPU; returns the fake's event log (one JSON line per
    engine built and per generate call, with the pid of the process)."""
    log = tmp_path / "fake_vllm.jsonl"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in [str(FAKE_DIR), os.environ.get("PYTHONPATH")] if p))
    monkeypatch.setenv("SELFRAT_GPU_COUNT", "1")
    monkeypatch.setenv("FAKE_VLLM_LOG", str(log))
    monkeypatch.setenv("FAKE_VLLM_TEXT", TEXT)
    return log


def _config(model_dir: Path, backend: str = "vllm", iterations: int = 1, strategy: str = "gold") -> dict:
    return tiny_run_config(model_dir, eval_datasets=["demo"], iterations=iterations, max_train_items=3,
                           max_eval_items=3, sampling={"backend": backend, "n": 2, "device": "auto"},
                           curation={"strategy": strategy})


def _events(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_vllm_runner_samples_and_evaluates_in_child_processes(demo_ws, tiny_model_dir, vllm_children):
    """evaluate 0, sample 1 and the meta-judge's curation of 1 each run in a process of their own."""
    ws = Workspace.open(demo_ws)
    rid = create_run(ws, parse_run_config(_config(tiny_model_dir, strategy="meta")), "vllm-children")
    runner = Runner(ws, rid, echo=False)
    assert runner.in_child_processes()
    assert runner.stage_argv("sample", 1) == [sys.executable, "-m", "selfrat", "--workspace", str(ws.root),
                                              "sample", "--run", rid, "--iteration", "1"]
    with runner.handling_signals():
        runner.run_stage("evaluate", 0)
        runner.run_stage("sample", 1)
        runner.run_stage("curate", 1)

    store = ws.store()
    assert store.iteration(rid, 0)["evaluate_status"] == "done"
    assert store.iteration(rid, 1)["sample_status"] == "done"
    assert store.iteration(rid, 1)["curate_status"] == "done"
    assert store.iteration(rid, 1)["curate_report"]["rater_model"] == str(tiny_model_dir)
    train = store.judgments(rid, 1, "train")
    assert train.height == 3 * 2 and train["score"].to_list() == [4] * 6
    assert store.run_status(rid)["iterations"][0]["metrics"]["demo"]  # the evaluation's figures are stored

    events = _events(vllm_children)
    engines = [e for e in events if e["event"] == "llm"]
    assert len(engines) == 3 and len({e["pid"] for e in engines}) == 3  # one process per stage...
    assert os.getpid() not in {e["pid"] for e in events}  # ...neither of them this one
    assert all(e["kwargs"]["model"] == str(tiny_model_dir) and e["kwargs"]["logprobs_mode"] == "processed_logprobs"
               for e in engines)
    assert "vllm" not in sys.modules  # the runner never loaded vLLM itself

    log = (ws.run_dir(rid) / "run.log").read_text()
    assert log.count("in its own process (pid") == 3
    assert "[iter 1] sample: 6/6" in log or "[iter 1] sample: 3/3" in log  # the child's progress, in run.log
    assert "[iter 0] evaluate: " in log and "[iter 1] sample: done (6 judgments written)" in log

    # Done stages start no process again; curation without the meta-judge runs in this process.
    with runner.handling_signals():
        runner.run_stage("sample", 1)
        runner.run_stage("curate", 1)
        runner.run_stage("evaluate", 0)
    assert len(_events(vllm_children)) == len(events)
    gold = create_run(ws, parse_run_config(_config(tiny_model_dir)), "vllm-gold")
    assert Runner(ws, gold, echo=False)._stage_has_work("curate", 1) is False


def test_vllm_runner_transformers_backend_stays_in_process(demo_ws, tiny_model_dir):
    ws = Workspace.open(demo_ws)
    cfg = parse_run_config(_config(tiny_model_dir, backend="transformers"))
    assert not Runner(ws, create_run(ws, cfg, "hf"), echo=False).in_child_processes()


def test_vllm_cancel_stops_the_stage_process(demo_ws, tiny_model_dir, vllm_children, tmp_path, monkeypatch):
    hang = tmp_path / "hang.pid"
    monkeypatch.setenv("FAKE_VLLM_HANG_FILE", str(hang))  # the child's generate writes its pid, then sleeps
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(_config(tiny_model_dir, iterations=0)))
    out = (tmp_path / "runner.out").open("w")
    runner = subprocess.Popen([sys.executable, "-m", "selfrat", "--workspace", str(demo_ws), "run", str(config),
                               "--run-id", "hang"], stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    child = None
    try:
        child = int(wait_until(lambda: hang.exists() and hang.read_text().strip(), timeout_s=180,
                               what="the evaluate stage's child process to start generating"))
        assert child != runner.pid and psutil.Process(child).ppid() == runner.pid
        os.kill(runner.pid, signal.SIGTERM)  # to the runner only: reaching the child is the runner's job
        assert runner.wait(timeout=90) == 130, (tmp_path / "runner.out").read_text()
        wait_until(lambda: not _alive(child), timeout_s=10, what="the child to be gone")
        store = Workspace.open(demo_ws).store()
        assert store.run("hang")["status"] == "cancelled"
        assert store.iteration("hang", 0)["evaluate_status"] == "cancelled"
    finally:
        for pid in (child, runner.pid):
            if pid and _alive(pid):
                os.kill(pid, signal.SIGKILL)
        out.close()


def _selfrat(ws: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "selfrat", "--workspace", str(ws), *args], capture_output=True,
                          text=True, timeout=600)


def test_vllm_evaluate_backend_option_reaches_the_sampler(demo_ws, tiny_model_dir, vllm_children):
    # Standalone: a new evaluate-only run with backend vllm, its evaluation in a child process; stdout keeps
    # only the JSON (the child's lines go to stderr).
    out = _selfrat(demo_ws, "evaluate", "--model", str(tiny_model_dir), "--dataset", "demo", "--max-items", "3",
                   "--max-new-tokens", "12", "--bootstrap", "0", "--backend", "vllm", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["metrics"]["demo"]["parse_failure_rate"] == 0.0  # every judgment the fake's "[RESULT] 4"
    store = Workspace.open(demo_ws).store()
    assert store.run(result["run_id"])["config"]["sampling"]["backend"] == "vllm"
    assert len([e for e in _events(vllm_children) if e["event"] == "llm"]) == 1
    # A run of the transformers backend, evaluated once with --backend vllm: this evaluation only.
    ws = Workspace.open(demo_ws)
    rid = create_run(ws, parse_run_config(_config(tiny_model_dir, backend="transformers", iterations=0)), "hf-run")
    out = _selfrat(demo_ws, "evaluate", "--run", rid, "--iteration", "0", "--backend", "vllm", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["metrics"]["demo"]["parse_failure_rate"] == 0.0
    assert len([e for e in _events(vllm_children) if e["event"] == "llm"]) == 2
    assert store.run(rid)["config"]["sampling"]["backend"] == "transformers"
