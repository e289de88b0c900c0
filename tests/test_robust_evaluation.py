"""Evaluation that cannot be fooled, wired into runs: the length baseline beside every judge, length-controlled
figures, calibration from the stored score probabilities, the expected-score method, score saturation, and
the named suite. (The pure functions have known-answer tests in test_length.py and test_calibration.py.)"""

from __future__ import annotations

import json

import polars as pl
import pytest

from engine.config import parse_run_config
from engine.iteration import Runner, create_run
from engine.sampling import FakeSampler
from engine.suites import IMPORT_COMMANDS
from engine.workspace import Workspace
from store import Store, queries

from helpers import cli


def always_five(messages, index, seed):
    return "Looks great. [RESULT] 5"


def test_a_saturated_judge_is_flagged_and_scored_beside_the_length_baseline(demo_chat_ws, tiny_model_dir):
    ws = demo_chat_ws
    w = Workspace.open(ws)
    cfg = parse_run_config({"model": str(tiny_model_dir), "eval_datasets": ["demo", "chat"], "iterations": 0,
                            "max_eval_items": 10, "evaluation": {"bootstrap": 0}})
    rid = create_run(w, cfg, "five")
    Runner(w, rid, sampler_factory=lambda p: FakeSampler(always_five), echo=False).run_all()
    store = Store.in_workspace(ws)
    m = store.run_status(rid)["iterations"][0]["metrics"]
    demo, chat = m["demo"], m["chat"]
    items = store.items("demo", "eval", 10)
    gold5 = sum(1 for g in items["gold_score"] if g == 5) / items.height
    # One-hot probabilities on score 5: confidence 1, right only where gold is 5.
    assert demo["exact"] == pytest.approx(gold5) and demo["ece"] == pytest.approx(1 - gold5)
    assert demo["mean_entropy"] == pytest.approx(0.0) and demo["share_5"] == 1.0 and demo["saturated"] == 1.0
    assert demo["expected/exact"] == demo["exact"]  # G-Eval's weighted score of one-hot 5s is 5
    for key in ("partial_pearson", "similar_length_accuracy", "similar_length_pairs"):
        assert key in demo
    assert demo["length-baseline/n"] == 10 and "length-baseline/pearson" in demo
    # Pairwise: equal scores are ties on both splits by length; the longer response wins for the baseline.
    # --max-items takes the first rows in source order: Chat's first 10 (alpacaeval-easy) all chose the longer
    # response, so there is no chosen-shorter pair to score (NaN, n 0).
    assert chat["n_chosen_longer"] == 10 and chat["n_chosen_shorter"] == 0
    assert chat["accuracy_chosen_longer"] == 0.0 and chat["accuracy_chosen_shorter"] != chat["accuracy_chosen_shorter"]
    assert chat["length-baseline/accuracy_chosen_longer"] == 1.0
    status = cli(ws, "status", rid).output
    assert "score saturation" in status and "demo length-baseline:" in status
    bins = queries.reliability(store, rid)
    assert bins.filter(bins["dataset"] == "demo")["confidence"].to_list() == [1.0]


def test_standard_suite_runs_in_one_go_and_names_missing_imports(tmp_path, shared_data, tiny_model_dir):
    ws = tmp_path / "ws"
    missing = cli(ws, "evaluate", "--suite", "standard", "--model", str(tiny_model_dir), ok=False)
    assert missing.exit_code == 2 and "cia-biggen, rewardbench, hhh" in missing.output
    assert IMPORT_COMMANDS["hhh"][0] in missing.output
    for commands in IMPORT_COMMANDS.values():  # the README's command sequence, pointed at ../shared/data
        for command in commands:
            args = command.split()[1:]
            args[1] = str(shared_data / args[1].split("/data/", 1)[1])
            cli(ws, *args)
    res = cli(ws, "evaluate", "--suite", "standard", "--model", str(tiny_model_dir), "--max-items", "8",
              "--max-new-tokens", "8", "--bootstrap", "0", "--json")
    metrics = json.loads(next(line for line in res.stdout.splitlines() if line.startswith("{")))["metrics"]
    assert set(metrics) == {"cia-biggen", "rewardbench", "hhh"}
    assert "partial_pearson" in metrics["cia-biggen"] and "length-baseline/pearson" in metrics["cia-biggen"]
    assert "section_mean_accuracy" in metrics["rewardbench"] and "accuracy_chosen_longer" in metrics["hhh"]
    store = Store.in_workspace(ws)
    rid = store.runs()["run_id"][0]
    sections = store.breakdowns(rid, 0).filter(pl.col("dataset") == "rewardbench")
    assert "section" in set(sections["group_by"])
