"""Runs through the CLI, end to end on a tiny random Llama: import -> run 2 iterations -> status -> export;
stage commands and resume (after a real SIGKILL too); standalone `evaluate`; config and input errors that name
what is wrong."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import yaml

from engine.demo import demo_data_path
from store import Store

from helpers import cli, kill_run_part_way, strict_json, tiny_run_config


def test_full_loop_two_iterations_status_and_export(demo_chat_ws, tiny_model_dir, tmp_path):
    ws = demo_chat_ws
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_run_config(tiny_model_dir)))
    cli(ws, "run", str(cfg_path), "--run-id", "tiny")  # (speed is bench/'s business, not a unit test's)

    status = json.loads(cli(ws, "status", "tiny", "--json").output)
    assert status["id"] == "tiny" and status["status"] == "done"
    assert [it["index"] for it in status["iterations"]] == [0, 1, 2]
    seed, it1, it2 = status["iterations"]
    # Seed: evaluation only (6 demo items x 1 + 6 chat items x 2 sides).
    assert seed["train_judgments"] == 0 and seed["eval_judgments"] == 6 + 12
    for it in (it1, it2):
        assert it["train_judgments"] == 8 * 3  # n x items, nothing lost or duplicated
        assert it["stages"] == {"sample": "done", "curate": "done", "train": "done", "evaluate": "done"}
        assert sum(it["pairs"].values()) > 0 and it["pairs"]["auto"] == sum(it["pairs"].values())
        assert Path(it["checkpoint"], "selfrat_checkpoint.json").is_file()
    for it in status["iterations"]:
        assert set(it["metrics"]) == {"demo", "chat"}
        demo_metrics = set(it["metrics"]["demo"])
        assert {"pearson", "spearman", "kendall", "exact", "within1", "parse_failure_rate"} <= demo_metrics
        assert {"accuracy", "ties", "n"} <= set(it["metrics"]["chat"])
        assert it["metrics"]["chat"]["n"] == 6
    # What `precision: auto` chose is recorded with the judgments and the checkpoint (the suite pins auto to
    # fp32, conftest) and shown by `status`.
    assert it1["precision"] == {"judgments": "fp32", "train": "fp32"}
    assert "precision: judgments=fp32 train=fp32" in cli(ws, "status", "tiny").output
    # Iteration 2 samples with iteration 1's checkpoint: the lineage is stored.
    assert it2["sampler_model"] == it1["checkpoint"]
    assert seed["checkpoint"] == str(tiny_model_dir.resolve())

    store = Store.in_workspace(ws)
    judgments = store.judgments("tiny", 1, "train")
    assert judgments.select("item_id", "sample_index").unique().height == judgments.height
    assert judgments["score"].is_between(1, 5).all()  # forced scores keep a tiny model usable
    assert judgments.select(["p1", "p2", "p3", "p4", "p5"]).sum_horizontal().is_between(0.999, 1.001).all()
    # Train judgments carry their reference log-prob (the sampler is the DPO reference): the train stage reads
    # them instead of a reference pass. Evaluation judgments are never trained on and carry none.
    scored = judgments.filter(pl.col("ref_logp").is_not_null())
    assert scored.height >= judgments.height // 2
    assert (scored["ref_logp"] < 0).all() and (scored["ref_tokens"] > 2).all()
    assert store.judgments("tiny", 1, "eval")["ref_logp"].is_null().all()
    log = (ws / "runs" / "tiny" / "run.log").read_text()
    stored = [int(line.split("reference log-probs: ")[1].split()[0]) for line in log.splitlines()
              if "reference log-probs: " in line]
    assert len(stored) == 2 and all(n > 0 for n in stored), log

    out = tmp_path / "export"
    cli(ws, "export", "tiny", "--iteration", "1", "--out", str(out))
    lines = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    assert len(lines) == it1["pairs"]["auto"]
    first = lines[0]
    assert first["prompt"][0]["role"] == "system" and first["chosen"][0]["role"] == "assistant"
    assert {"item_id", "chosen_score", "rejected_score", "gold_score", "strategy", "status"} <= set(first)
    assert first["chosen_score"] == round(first["gold_score"]) != first["rejected_score"]
    import datasets

    ds = datasets.load_from_disk(str(out / "dataset"))
    assert ds.num_rows == len(lines) and {"prompt", "chosen", "rejected"} <= set(ds.column_names)
    progress = [json.loads(line) for line in (ws / "runs" / "tiny" / "progress.jsonl").read_text().splitlines()]
    stages = {(p["iteration"], p["stage"]) for p in progress}
    assert {(1, "sample"), (1, "curate"), (1, "train"), (1, "evaluate"), (2, "train")} <= stages
    last_train = [p for p in progress if p["stage"] == "train" and p["iteration"] == 1][-1]
    assert last_train["done"] == last_train["total"] > 0  # the app's job panel can follow training


def test_rerunning_a_finished_stage_changes_nothing(demo_chat_ws, tiny_model_dir, tmp_path):
    ws = demo_chat_ws
    cfg = tiny_run_config(tiny_model_dir, iterations=1, eval_datasets=["demo"])
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    cli(ws, "run", str(cfg_path), "--run-id", "once")
    before = json.loads(cli(ws, "status", "once", "--json").output)
    for stage in ("sample", "curate", "train"):
        cli(ws, stage, "--run", "once", "--iteration", "1")
    cli(ws, "resume", "once")
    after = json.loads(cli(ws, "status", "once", "--json").output)
    for b, a in zip(before["iterations"], after["iterations"]):
        for key in ("judgments", "pairs", "checkpoint", "metrics"):
            assert b[key] == a[key], key
    log = (ws / "runs" / "once" / "run.log").read_text()
    assert "[iter 1] sample: already done" in log and "[iter 1] train: already done" in log


def test_resume_after_sigkill_during_sampling(demo_chat_ws, tiny_model_dir, tmp_path):
    ws = demo_chat_ws
    n, items = 3, 24
    cfg = tiny_run_config(tiny_model_dir, iterations=1, eval_datasets=["demo"], max_train_items=items,
                      sampling={"n": n, "batch_size": 1, "max_new_tokens": 48})
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    def written(store) -> int:
        its = store.run_status("killed")["iterations"]
        return its[1]["train_judgments"] if len(its) > 1 else 0

    seen = kill_run_part_way(ws, cfg_path, "killed", written, lambda w: n * 3 <= w < n * items)
    assert n * 3 <= seen < n * items, f"never caught sampling half-way (saw {seen})"
    store = Store.in_workspace(ws)
    assert store.run("killed")["status"] == "running"  # killed hard: nothing got to mark it
    cli(ws, "resume", "killed")
    judgments = store.judgments("killed", 1, "train")
    assert judgments.height == n * items
    assert judgments.select("item_id", "sample_index").unique().height == n * items
    assert store.run_status("killed")["status"] == "done"


def test_config_errors_name_the_field(demo_chat_ws, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"model": "embedded", "train_dataset": "demo",
                                   "sampling": {"n": 0, "temprature": 1}}))
    res = cli(demo_chat_ws, "run", str(bad), ok=False)
    assert res.exit_code == 2
    assert "sampling.temprature: unknown key" in res.output and "sampling.n" in res.output
    missing = tmp_path / "missing.yaml"
    missing.write_text(yaml.safe_dump({"model": "embedded", "train_dataset": "nope"}))
    res = cli(demo_chat_ws, "run", str(missing), ok=False)
    assert res.exit_code == 2 and "no dataset 'nope'" in res.output
    res = cli(demo_chat_ws, "run", str(tmp_path / "absent.yaml"), ok=False)
    assert res.exit_code == 2 and "absent.yaml" in res.output


def test_import_reports_bad_rows_and_is_idempotent(tmp_path):
    ws = tmp_path / "ws"
    bad = tmp_path / "bad.jsonl"
    good = {"instruction": "Say hi", "response": "hi", "gold_score": 5, "criteria": "Is it a greeting?",
            **{f"score{k}_description": f"level {k}" for k in range(1, 6)}}
    rows = [json.dumps(good), json.dumps({**good, "response": "x", "gold_score": 9}), "{not json"]
    bad.write_text("\n".join(rows) + "\n")
    res = cli(ws, "import", str(bad), "--dataset", "b", ok=False)
    assert res.exit_code == 2 and "row 2" in res.output and "row 3" in res.output
    assert Store.in_workspace(ws).datasets().height == 0  # nothing half-written
    res = cli(ws, "import", str(bad), "--dataset", "b", "--skip-invalid")
    assert "1 new items" in res.output and "skipped row 2" in res.output
    assert "3 source rows = 1 imported + 0 already present" in res.output
    res = cli(ws, "import", str(bad), "--dataset", "b", "--skip-invalid")
    assert "0 new items" in res.output and "= 0 imported + 1 already present" in res.output
    listing = json.loads(cli(ws, "datasets", "--json").output)
    assert listing["datasets"][0]["items"] == 1


def test_standalone_evaluate_prints_metrics(demo_chat_ws, tiny_model_dir):
    res = cli(demo_chat_ws, "evaluate", "--model", str(tiny_model_dir), "--dataset", "demo", "--dataset", "chat",
              "--max-items", "4", "--max-new-tokens", "8", "--json")
    out = strict_json(res.stdout)  # the whole of stdout: one strict object, progress went to stderr
    assert set(out) == {"run_id", "iteration", "metrics"} and out["iteration"] == 0
    metrics = out["metrics"]
    assert metrics["demo"]["n"] == 4 and metrics["chat"]["n"] == 4
    assert "pearson" in metrics["demo"] and "accuracy" in metrics["chat"]
    runs = json.loads(cli(demo_chat_ws, "status", "--json").output)["runs"]
    assert [r["kind"] for r in runs] == ["evaluate"]  # kept in the store like any run
    assert [r["id"] for r in runs] == [out["run_id"]]  # ... under the id the output names
    res = cli(demo_chat_ws, "evaluate", "--model", "no/such/dir/../x", "--dataset", "demo", ok=False)
    assert res.exit_code == 2


def test_evaluate_json_is_strict_counts_agree_and_progress_goes_to_stderr(demo_chat_ws, tiny_model_dir):
    res = cli(demo_chat_ws, "evaluate", "--model", str(tiny_model_dir), "--dataset", "demo", "--max-items", "3",
              "--max-new-tokens", "8", "--no-force-score", "--bootstrap", "0", "--json")
    assert "NaN" not in res.stdout
    out = strict_json(res.stdout)
    demo = out["metrics"]["demo"]
    assert demo["pearson"] is None  # a random model parses nothing: NaN comes out as null
    assert demo["failures"] == demo["judgments"] * demo["parse_failure_rate"] == 3  # counts agree with rates
    assert demo["n_scored"] == 0 and demo["forced"] == 0
    run_log = demo_chat_ws / "runs" / out["run_id"] / "run.log"
    assert run_log.is_file() and f"full log in {run_log}" in res.stderr
    assert "[iter 0] evaluate demo (eval): 3/3 done" in res.stderr  # progress: stderr, not stdout
    # Without --json (and through --run): metrics on stdout, progress on stderr all the same. Nothing parsed
    # and nothing was forced: 4 failed judgments (2 sides x 2 items) leave both pairs without a score.
    res = cli(demo_chat_ws, "evaluate", "--run", out["run_id"], "--iteration", "0", "--dataset", "chat",
              "--max-items", "2")
    assert "[iter 0] evaluate chat (eval): 4/4 done" in res.stderr and "4/4 done" not in res.stdout
    assert "chat: accuracy=" in res.stdout and "parse_failure_rate=1.000" in res.stdout
    chat = Store.in_workspace(demo_chat_ws).run_status(out["run_id"])["iterations"][0]["metrics"]["chat"]
    assert chat["failures"] == chat["judgments"] == 4 and chat["unscored_pairs"] == 2


def test_evaluate_on_an_empty_split_exits_2_and_records_nothing(tmp_path, tiny_model_dir):
    ws = tmp_path / "ws"
    cli(ws, "import", demo_data_path(), "--dataset", "mine", "--split", "train")
    held = Store.in_workspace(ws).datasets().row(0, named=True)["train"]
    for extra in ([], ["--json"]):
        res = cli(ws, "evaluate", "--model", str(tiny_model_dir), "--dataset", "mine", *extra, ok=False)
        assert res.exit_code == 2 and res.stdout == ""
        assert res.stderr.strip() == (f"error: dataset mine has no eval items (it holds {held} train items); "
                                      "import with --split eval, or pass --split train")
    assert Store.in_workspace(ws).runs().height == 0 and not (ws / "runs").exists()
    res = cli(ws, "evaluate", "--model", str(tiny_model_dir), "--dataset", "mine", "--split", "train",
              "--max-items", "2", "--max-new-tokens", "8", "--bootstrap", "0", "--json")
    assert strict_json(res.stdout)["metrics"]["mine"]["n"] == 2


def test_progress_lines_report_done_total_and_eta(monkeypatch):
    import io

    from engine import iteration

    clock = iter([100.0, 110.0, 130.0, 140.0, 200.0])
    monkeypatch.setattr(iteration.time, "monotonic", lambda: next(clock))
    stream = io.StringIO()
    progress = iteration.ProgressLines(stream)
    progress(0, "evaluate", 0, 30, dataset="demo", method="eval")
    progress(0, "evaluate", 0, 30, dataset="demo", method="eval")  # the same record again: no new line
    progress(0, "evaluate", 10, 30, dataset="demo", method="eval")
    progress(0, "evaluate", 30, 30, dataset="demo", method="eval")
    progress(0, "evaluate", 4, 8, method="meta-judge")
    assert stream.getvalue().splitlines() == [
        "[iter 0] evaluate demo (eval): 0/30 done",
        "[iter 0] evaluate demo (eval): 10/30 done, 10s elapsed, ETA 20s",
        "[iter 0] evaluate demo (eval): 30/30 done, 30s elapsed",
        "[iter 0] evaluate (meta-judge): 4/8 done",
    ]
