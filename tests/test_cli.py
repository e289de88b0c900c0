"""The CLI as the composition root: its error decorator (a project error is one line and exit 2, a cancel exit
130, anything else keeps its traceback), `selfrat pairs` doing what the Pairs page does (through the same store
call, with the same audit rows), and run ids checked wherever a run is created."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from engine import jobs
from engine.config import ConfigError, parse_run_config
from engine.demo import ensure_demo_dataset
from engine.workspace import Workspace
from selfrat.cli import cli_command
from store import Cancelled, Store, StoreError, queries

from helpers import cli, fake_sampled_run, runner

RUN = "rv"


# ------------------------------------------------------------------ the error decorator


def _tiny_app(exc: BaseException) -> typer.Typer:
    tiny = typer.Typer()

    @tiny.command()
    @cli_command
    def boom(name: str = "x") -> None:
        raise exc

    @tiny.command()
    @cli_command
    def fine() -> None:
        typer.echo("ok")
    return tiny


def test_a_project_error_is_one_line_and_exit_2():
    res = runner.invoke(_tiny_app(StoreError("no run 'nope' in this workspace")), ["boom"])
    assert res.exit_code == 2
    assert res.stderr == "error: no run 'nope' in this workspace\n" and "Traceback" not in res.output
    assert runner.invoke(_tiny_app(ConfigError("bad")), ["boom"]).exit_code == 2  # engine errors share the base


def test_a_cancel_is_exit_130():
    for exc in (Cancelled("signal 15"), KeyboardInterrupt()):
        res = runner.invoke(_tiny_app(exc), ["boom"])
        assert res.exit_code == 130 and res.stderr == "cancelled\n"


def test_an_unexpected_exception_keeps_its_traceback(tmp_path):
    res = runner.invoke(_tiny_app(RuntimeError("a bug")), ["boom"])
    assert res.exit_code == 1 and isinstance(res.exception, RuntimeError)  # not turned into a message
    # A plain ValueError is a bug too (the project's own errors say what to do; this one does not).
    res = runner.invoke(_tiny_app(ValueError("a bug")), ["boom"])
    assert isinstance(res.exception, ValueError) and "error:" not in res.output
    # In a real process: the project's error is one line on stderr, nothing else.
    out = subprocess.run([sys.executable, "-m", "selfrat", "--workspace", str(tmp_path / "ws"), "datasets", "show",
                          "nope"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stdout == "" and out.stderr.count("\n") == 1
    assert out.stderr.startswith("error: ") and "nope" in out.stderr and "Traceback" not in out.stderr


# ------------------------------------------------------------------ pairs: the Pairs page's actions


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A run with one sampled (fake judge) and curated iteration: pairs to review, no model."""

    def script(messages, index, seed):
        return f"Reasoning {seed}. [RESULT] {seed % 5 + 1}"

    root = tmp_path_factory.mktemp("pairs") / "ws"
    r = fake_sampled_run(root, RUN, script, max_train_items=12, n=4, curate=True)
    assert r.ws.store().pairs(RUN, 1).height >= 6
    return root


@pytest.fixture
def ws(template, tmp_path) -> Path:
    import shutil

    shutil.copytree(template, tmp_path / "ws")
    return tmp_path / "ws"


def _listed(ws: Path, *args: str) -> dict:
    return json.loads(cli(ws, "pairs", "list", "--run", RUN, "--iteration", "1", "--json", *args).stdout)


def test_a_review_by_cli_is_what_the_page_reads_and_is_audited(ws):
    store = Store.in_workspace(ws)
    ids = store.pairs(RUN, 1)["pair_id"].to_list()
    a, b, c = ids[:3]
    base = ["--run", RUN, "--iteration", "1"]
    res = cli(ws, "pairs", "accept", *base, str(a), str(b), "--who", "carol")
    assert res.stdout.startswith(f"accept: 2 pairs of run {RUN} iteration 1 by carol")
    cli(ws, "pairs", "swap", *base, str(c), "--who", "carol")
    # edit with a score only: the chosen side's own rationale stays (without its score form).
    edit = json.loads(cli(ws, "pairs", "edit", *base, str(a), "--score", "2", "--who", "carol", "--json").stdout)
    (after,) = edit["pairs"]
    assert after["status"] == "edited" and after["edited_score"] == 2
    assert after["edited_rationale"].startswith("Reasoning ") and "[RESULT]" not in after["edited_rationale"]
    cli(ws, "pairs", "note", *base, str(b), "--note", "looks right", "--who", "carol")

    # What the Pairs page reads (store.queries), and its history panel.
    page, total = queries.pairs_page(store, RUN, 1, None, 0, 100)
    rows = {r["pair_id"]: r for r in page.to_dicts()}
    assert total == len(ids)
    assert (rows[a]["status"], rows[a]["edited_score"], rows[a]["updated_by"]) == ("edited", 2, "carol")
    assert (rows[b]["status"], rows[b]["note"]) == ("accepted", "looks right")
    assert rows[c]["status"] == "swapped" and rows[c]["swapped"] is True
    history = queries.audit_history(store, RUN, iteration=1)
    assert history["action"].to_list() == ["note", "edit", "swap", "accept", "accept"]
    assert set(history["who"]) == {"carol"}
    # The page's status filter sees them too.
    assert queries.pairs_page(store, RUN, 1, "accepted", 0, 100)[0]["pair_id"].to_list() == [b]

    # Pairs of another iteration, or none named, are refused: nothing changes.
    res = cli(ws, "pairs", "reject", "--run", RUN, "--iteration", "0", str(a), ok=False)
    assert res.exit_code == 2 and f"no pair {a} in run '{RUN}' iteration 0" in res.stderr
    res = cli(ws, "pairs", "reject", *base, ok=False)
    assert res.exit_code == 2 and "PAIR_IDs" in res.stderr
    assert store.audit_log(RUN).height == 5


def test_a_review_through_the_pages_store_call_shows_in_pairs_list(ws):
    store = Store.in_workspace(ws)
    ids = store.pairs(RUN, 1)["pair_id"].to_list()
    before = _listed(ws)
    assert before["total"] == len(ids) and {p["status"] for p in before["pairs"]} == {"auto"}
    # What ui/views/pairs.py calls for a button, and for a bulk action on its status filter.
    store.review_pairs(RUN, 1, "reject", "dave", [ids[0]], note="off topic")
    store.review_pairs(RUN, 1, "accept", "dave", None, status="auto")
    listed = {p["pair_id"]: p for p in _listed(ws)["pairs"]}
    assert (listed[ids[0]]["status"], listed[ids[0]]["note"], listed[ids[0]]["updated_by"]) == (
        "rejected", "off topic", "dave")
    assert {listed[i]["status"] for i in ids[1:]} == {"accepted"}
    assert [p["pair_id"] for p in _listed(ws, "--status", "rejected")["pairs"]] == [ids[0]]
    text = cli(ws, "pairs", "list", "--run", RUN, "--iteration", "1", "--status", "rejected").stdout
    assert text.splitlines()[0] == f"run {RUN} iteration 1: 1 pairs with status rejected"
    assert f"{ids[0]}  rejected" in text and "note: off topic" in text


def test_bulk_without_yes_changes_nothing(ws):
    store = Store.in_workspace(ws)
    n = store.pairs(RUN, 1).height
    base = ["--run", RUN, "--iteration", "1"]
    res = cli(ws, "pairs", "reject", *base, "--all", "--status", "auto", ok=False)
    assert res.exit_code == 2
    assert res.stderr == (f"error: --all would reject {n} pairs of run {RUN} iteration 1 with status auto;"
                          " add --yes to do it\n")
    assert store.audit_log(RUN).height == 0 and store.pairs(RUN, 1, status="auto").height == n
    res = cli(ws, "pairs", "reject", *base, "--all", "--status", "auto", "--yes", "--who", "erin")
    assert res.stdout.startswith(f"reject: {n} pairs")
    assert store.pairs(RUN, 1, status="rejected").height == n and store.audit_log(RUN).height == n
    res = cli(ws, "pairs", "accept", *base, "--all", "--status", "vibes", "--yes", ok=False)
    assert res.exit_code == 2 and "status must be one of" in res.stderr


# ------------------------------------------------------------------ run ids


BAD_RUN_IDS = ("../x", "a/b", "a\\b", ".hidden", "")


def _outside(tmp_path: Path, ws: Path) -> set[Path]:
    """Every path under tmp_path except the workspace's own files (the store, runs/<id>, configs/<id>)."""
    return {p for p in tmp_path.rglob("*") if p != ws and ws not in p.parents}


def test_run_ids_are_checked_wherever_a_run_is_created(tmp_path, monkeypatch):
    from engine.iteration import create_run

    ws = tmp_path / "deep" / "ws"
    w = Workspace.open(ws)
    ensure_demo_dataset(w)
    cfg_dict = {"model": "some-org/judge", "train_dataset": "demo", "iterations": 1, "max_train_items": 4}
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(json.dumps(cfg_dict))
    cfg = parse_run_config(cfg_dict)
    absolute = str(tmp_path / "abs-run")
    before = _outside(tmp_path, ws)
    for bad in (*BAD_RUN_IDS, absolute):
        # The CLI: selfrat run CONFIG --run-id BAD.
        res = cli(ws, "run", str(cfg_path), "--run-id", bad, ok=False)
        assert res.exit_code == 2 and f"run id {bad!r}" in res.stderr, res.output
        # A config through the engine (what every path in ends in), and the app's launch (which also names
        # its config file after the run id), dry or not.
        with pytest.raises(ConfigError, match="run id"):
            create_run(w, cfg, bad)
        for dry_run in (True, False):
            with pytest.raises(ConfigError, match="run id"):
                jobs.launch_run(ws, cfg, bad, dry_run=dry_run)
    assert Store.in_workspace(ws).runs().height == 0
    assert not (ws / "runs").exists() or not any((ws / "runs").iterdir())
    assert not (ws / "configs").exists()
    assert _outside(tmp_path, ws) == before  # nothing written beside the workspace (no ../x, no abs-run)
    # A plain id still works, and single-stage checks the id it is given too.
    assert create_run(w, cfg, "ok-1.b_2") == "ok-1.b_2" and (ws / "runs" / "ok-1.b_2" / "config.yaml").is_file()
    res = cli(ws, "single-stage", "ok-1.b_2", "--run-id", "../x", ok=False)
    assert res.exit_code == 2 and "run id '../x'" in res.stderr
    assert _outside(tmp_path, ws) == before


# ------------------------------------------------------------------ the default workspace


def test_selfrat_home_is_the_default_workspace_and_empty_means_unset(tmp_path, monkeypatch):
    """engine.workspace.default_workspace() is the one resolver: $SELFRAT_HOME when set and not empty, else
    ./.selfrat; --workspace wins over both."""
    from selfrat.cli import app

    home = tmp_path / "home"
    ensure_demo_dataset(Workspace.open(home))
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)

    def listed(*args: str, env: dict) -> list[str]:
        res = runner.invoke(app, [*args, "datasets", "--json"], env=env)
        assert res.exit_code == 0, res.output
        return [d["name"] for d in json.loads(res.stdout)["datasets"]]

    assert listed(env={"SELFRAT_HOME": str(home)}) == ["demo"]
    assert not (cwd / ".selfrat").exists()
    for unset in ({"SELFRAT_HOME": ""}, {"SELFRAT_HOME": None}):
        assert listed(env=unset) == []  # ./.selfrat, made on first use
        assert (cwd / ".selfrat" / "selfrat.duckdb").is_file()
    assert listed("--workspace", str(home), env={"SELFRAT_HOME": str(cwd / "other")}) == ["demo"]
    assert not (cwd / "other").exists()
