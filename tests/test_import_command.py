"""`selfrat import` as a user runs it, on files these tests write in layouts the project has not seen:
instruction + input with several annotators, templates, constants, majority labels, duplicates and
conflicts, corrections (--replace), splits, encodings, JSON arrays under any name, and Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from engine.config import parse_run_config
from engine.iteration import Runner, create_run
from engine.sampling import FakeSampler
from engine.workspace import Workspace
from store import Store

from helpers import cli

RUBRIC = {"criteria": "Is it right?", "score1_description": "Wrong.", "score2_description": "Mostly wrong.",
          "score3_description": "Half right.", "score4_description": "Mostly right.",
          "score5_description": "Right."}  # fmt: skip


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def items(ws: Path, dataset: str) -> list[dict]:
    return Store.in_workspace(ws).dataset_items(dataset, limit=None).to_dicts()


# Alpaca / PandaLM layout: instruction + input, two responses, three annotators (1 = first better, 2 =
# second better, 0 = tie).
PANDALM = [
    {"instruction": "Summarise the passage in one sentence.", "input": "The committee met on Tuesday and "
     "approved the budget after a long debate.", "response1": "The committee approved the budget.",
     "response2": "A meeting.", "annotator1": 1, "annotator2": 1, "annotator3": 2},
    {"instruction": "Translate to French.", "input": "Good morning", "response1": "Bonjour",
     "response2": "Bonsoir", "annotator1": 1, "annotator2": 0, "annotator3": 2},
    {"instruction": "Add the numbers.", "input": "2 + 3", "response1": 5, "response2": "",
     "annotator1": 2, "annotator2": 2, "annotator3": 1},
]  # fmt: skip
PANDALM_ARGS = ["--map", "response_a=response1", "--map", "response_b=response2", "--label-majority",
                "annotator1,annotator2,annotator3", "--label-a", "1", "--label-b", "2"]  # fmt: skip


def test_input_and_majority_labels_reach_the_judge(tmp_path):
    ws, src = tmp_path / "ws", write_jsonl(tmp_path / "pandalm.jsonl", PANDALM)
    # Row 2 has no majority (1, 0, 2): named, nothing imported.
    out = cli(ws, "import", str(src), "--dataset", "p", "--split", "eval", *PANDALM_ARGS, code=2).output
    assert "row 2: no majority label among annotator1, annotator2, annotator3 (1, 0, 2)" in out
    assert "p" not in Store.in_workspace(ws).datasets()["name"].to_list()
    # With --label-tie, a row without a majority is a tie.
    out = cli(ws, "import", str(src), "--dataset", "p", "--split", "eval", *PANDALM_ARGS, "--label-tie", "0").output
    assert "imported as eval (--split eval): 3 new items" in out
    assert "1 empty (kept), 1 numbers/booleans turned into text" in out
    assert "1 row(s) without a majority label taken as ties" in out
    rows = items(ws, "p")
    assert [r["label"] for r in rows] == ["A", "tie", "B"]
    assert [r["input"] for r in rows] == [r["input"] for r in PANDALM]
    assert rows[2]["response"] == "5" and rows[2]["response_b"] == ""
    # The prompt `datasets show --prompt` prints is the judge's: the instruction, then the input.
    shown = cli(ws, "datasets", "show", "p", "--prompt", "--limit", "1").output
    assert "###The instruction to evaluate:\nSummarise the passage in one sentence.\n\nInput:\nThe committee" in shown


def recording_sampler(seen: list[str]):
    def script(messages, index, seed):
        seen.append(messages[-1]["content"])
        return "Fine. [RESULT] 4"

    return FakeSampler(script)


def test_judgments_of_an_instruction_input_file_are_made_on_prompts_with_the_input(tmp_path, tiny_model_dir):
    ws = tmp_path / "ws"
    rows = [{"instruction": "Correct the grammar.", "input": f"She go to school on day {i}.",
             "response": f"She goes to school on day {i}.", "gold_score": 1 + i % 5, **RUBRIC} for i in range(6)]
    cli(ws, "import", str(write_jsonl(tmp_path / "alpaca.jsonl", rows)), "--dataset", "a", "--split", "eval")
    cli(ws, "import", str(write_jsonl(tmp_path / "pairs.jsonl", PANDALM)), "--dataset", "p", "--split", "eval",
        *PANDALM_ARGS, "--label-tie", "0")
    w = Workspace.open(ws)
    cfg = parse_run_config({"model": str(tiny_model_dir), "eval_datasets": ["a", "p"], "iterations": 0,
                            "evaluation": {"bootstrap": 0, "pairwise_modes": ["absolute", "relative"]}})
    rid = create_run(w, cfg, "inputs")
    seen: list[str] = []
    Runner(w, rid, sampler_factory=lambda p: recording_sampler(seen), echo=False).run_all()
    for i in range(6):  # each absolute item's prompt holds its own input, under the instruction
        assert sum(f"Correct the grammar.\n\nInput:\nShe go to school on day {i}." in p for p in seen) == 1
    for r in PANDALM:  # both sides (absolute) and both orders (relative) of each pair
        assert sum(f"{r['instruction']}\n\nInput:\n{r['input']}" in p for p in seen) == 4
    assert len(seen) == 6 + 3 * 4


def test_templates_build_a_field_from_columns(tmp_path):
    ws = tmp_path / "ws"
    rows = [{"question": "Q1", "context": "C1", "answer": "A1", "score": 3, **RUBRIC},
            {"question": "Q2", "context": "", "answer": "A2", "score": 4, **RUBRIC},
            {"question": "Q3", "answer": "A3", "score": 5, **RUBRIC}]  # fmt: skip
    src = write_jsonl(tmp_path / "qa.jsonl", rows)
    cli(ws, "import", str(src), "--dataset", "qa", "--map", "instruction=Context: {context}\\nQuestion: {question}",
        "--map", "response=answer", "--map", "gold_score=score")
    got = [r["instruction"] for r in items(ws, "qa")]
    # A missing or empty column renders as empty; \n is a newline.
    assert got == ["Context: C1\nQuestion: Q1", "Context: \nQuestion: Q2", "Context: \nQuestion: Q3"]
    # A template whose every column is empty leaves the target empty: the row is invalid (instruction).
    rows.append({"question": "", "answer": "A4", "score": 2, **RUBRIC})
    out = cli(ws, "import", str(write_jsonl(tmp_path / "qa2.jsonl", rows)), "--dataset", "qa2", "--map",
              "instruction={context}{question}", "--map", "response=answer", "--map", "gold_score=score", code=2).output
    assert "row 4: instruction is empty" in out
    # A template column that is in no row at all is a typo, not an empty value.
    out = cli(ws, "import", str(src), "--dataset", "qa3", "--map", "instruction={questoin}", "--map",
              "response=answer", "--map", "gold_score=score", code=2).output
    assert "template column(s) questoin are in no row" in out


def test_set_tags_every_row_of_a_file_and_section_drives_breakdowns(tmp_path):
    ws = tmp_path / "ws"
    pairs = [{"prompt": f"P{i}", "chosen": f"good {i}", "rejected": f"bad {i}", "category": "x"} for i in range(4)]
    src = write_jsonl(tmp_path / "adv.jsonl", pairs)
    cli(ws, "import", str(src), "--dataset", "bench", "--split", "eval", "--set", "subset=adversarial",
        "--map", "section=category")
    metas = [json.loads(r["meta"]) for r in items(ws, "bench")]
    assert all(m["subset"] == "adversarial" and m["section"] == "x" for m in metas)
    out = cli(ws, "import", str(src), "--dataset", "b2", "--set", "oops", code=2).output
    assert "--set 'oops': expected NAME=VALUE" in out


def test_duplicates_and_conflicts_are_reported_with_row_numbers(tmp_path):
    ws = tmp_path / "ws"
    base = {"instruction": "Rate it.", **RUBRIC}
    rows = [{**base, "response": "r1", "gold_score": 3}, {**base, "response": "r2", "gold_score": 4},
            {**base, "response": "r1", "gold_score": 3}, {**base, "response": "r1", "gold_score": 3},
            {**base, "response": "r2", "gold_score": 2}, {**base, "response": "r3", "gold_score": 5}]  # fmt: skip
    src = write_jsonl(tmp_path / "d.jsonl", rows)
    out = cli(ws, "import", str(src), "--dataset", "d", code=2).output
    assert "1 conflict(s): the same content with different gold" in out and "row 2: 4.0, row 5: 2.0" in out
    assert "d" not in Store.in_workspace(ws).datasets()["name"].to_list()
    for policy, kept_gold in (("first", 4.0), ("last", 2.0), ("drop", None)):
        out = cli(ws, "import", str(src), "--dataset", f"d-{policy}", "--on-conflict", policy).output
        golds = {r["response"]: r["gold_score"] for r in items(ws, f"d-{policy}")}
        assert golds.get("r2") == kept_gold and golds["r1"] == 3.0 and golds["r3"] == 5.0
        # Every source row is accounted for: 6 = imported + present + merged + conflicting + skipped.
        n = 3 if kept_gold else 2
        assert (f"6 source rows = {n} imported + 0 already present + 2 duplicates merged + {4 - n} conflicting"
                " left out + 0 skipped") in out
        assert "duplicates merged into their first row: row 1 (+2)" in out


def test_a_corrected_label_mapping_replaces_instead_of_adding_a_contradicting_copy(tmp_path):
    ws, src = tmp_path / "ws", write_jsonl(tmp_path / "p.jsonl", PANDALM)
    common = ["--dataset", "p", "--split", "eval", "--map", "response_a=response1", "--map", "response_b=response2",
              "--label-majority", "annotator1,annotator2,annotator3", "--label-tie", "0"]
    cli(ws, "import", str(src), *common, "--label-a", "2", "--label-b", "1")  # the wrong way round
    out = cli(ws, "import", str(src), *common, "--label-a", "1", "--label-b", "2", code=2).output
    assert "already in dataset 'p' with another gold score or label" in out and "--replace" in out
    assert len(items(ws, "p")) == 3
    out = cli(ws, "import", str(src), *common, "--label-a", "1", "--label-b", "2", "--replace").output
    assert "replaced 3 earlier items" in out
    assert [r["label"] for r in items(ws, "p")] == ["A", "tie", "B"]
    # A run that uses the dataset blocks --replace, unless --force.
    Store.in_workspace(ws).create_run("r", "loop", {"train_dataset": "p", "eval_datasets": []})
    out = cli(ws, "import", str(src), *common, "--label-a", "2", "--label-b", "1", "--replace", code=2).output
    assert "used by run(s) r" in out and "--force" in out
    assert [r["label"] for r in items(ws, "p")] == ["A", "tie", "B"]
    cli(ws, "import", str(src), *common, "--label-a", "2", "--label-b", "1", "--replace", "--force")
    assert [r["label"] for r in items(ws, "p")] == ["B", "tie", "A"]


def test_another_split_is_refused_with_the_way_out_and_replace_moves(tmp_path):
    ws = tmp_path / "ws"
    src = write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"I{i}", "response": "r", "gold_score": 3, **RUBRIC}
                                             for i in range(3)])  # fmt: skip
    out = cli(ws, "import", str(src), "--dataset", "a").output
    assert "imported as train (no --split: the split column, else train): 3 new items" in out
    out = cli(ws, "import", str(src), "--dataset", "a", "--split", "eval", code=2).output
    assert "3 item(s) are already in dataset 'a' as train and this import gives them as eval" in out
    assert "--replace" in out
    cli(ws, "import", str(src), "--dataset", "a", "--split", "eval", "--replace")
    assert {r["split"] for r in items(ws, "a")} == {"eval"} and len(items(ws, "a")) == 3


def test_non_text_and_empty_responses_are_kept_and_an_empty_instruction_is_not(tmp_path):
    ws = tmp_path / "ws"
    rows = [{"instruction": "Is 7 prime?", "response": True, "gold_score": 5, **RUBRIC},
            {"instruction": "Say nothing.", "response": "", "gold_score": 5, **RUBRIC},
            {"instruction": "Count.", "response": 3.5, "gold_score": 2, **RUBRIC}]  # fmt: skip
    out = cli(ws, "import", str(write_jsonl(tmp_path / "n.jsonl", rows)), "--dataset", "n").output
    assert "responses: 1 empty (kept), 2 numbers/booleans turned into text" in out
    assert [r["response"] for r in items(ws, "n")] == ["true", "", "3.5"]
    rows.append({"instruction": " ", "response": "x", "gold_score": 1, **RUBRIC})
    out = cli(ws, "import", str(write_jsonl(tmp_path / "n2.jsonl", rows)), "--dataset", "n2", code=2).output
    assert "row 4: instruction is empty" in out


def test_encodings_name_file_and_line_and_the_option(tmp_path):
    ws = tmp_path / "ws"
    good = json.dumps({"instruction": "ok", "response": "fine", "gold_score": 3, **RUBRIC})
    bad = json.dumps({"instruction": "café", "response": "crème", "gold_score": 4, **RUBRIC}, ensure_ascii=False)
    src = tmp_path / "latin.jsonl"
    src.write_bytes((good + "\n" + bad + "\n").encode("latin-1"))
    out = cli(ws, "import", str(src), "--dataset", "l", code=2).output
    assert f"{src}: line 2 is not valid UTF-8" in out and "--encoding latin-1" in out
    cli(ws, "import", str(src), "--dataset", "l", "--encoding", "latin-1")
    assert items(ws, "l")[1]["instruction"] == "café"
    csv = tmp_path / "latin.csv"
    pl.DataFrame([json.loads(good), json.loads(bad)]).write_csv(csv)
    csv.write_bytes(csv.read_text().encode("latin-1"))
    out = cli(ws, "import", str(csv), "--dataset", "c", code=2).output
    assert "line 3 is not valid UTF-8" in out
    cli(ws, "import", str(csv), "--dataset", "c", "--encoding", "cp1252")
    assert items(ws, "c")[1]["response"] == "crème"
    cli(ws, "import", str(csv), "--dataset", "c2", "--encoding", "klingon", code=2)


@pytest.mark.parametrize("name", ["array.jsonl", "array.csv", "array.data"])
def test_a_json_array_is_recognised_by_content_under_any_name(tmp_path, name):
    ws = tmp_path / "ws"
    src = tmp_path / name
    src.write_text(json.dumps([{"instruction": f"I{i}", "response": "r", "gold_score": 2, **RUBRIC} for i in range(3)],
                              indent=1))
    out = cli(ws, "import", str(src), "--dataset", "arr").output
    assert "3 new items" in out


def test_import_json_report_is_strict_and_adds_up(tmp_path):
    ws = tmp_path / "ws"
    rows = [{"instruction": f"I{i % 4}", "response": "r", "gold_score": 3, **RUBRIC} for i in range(6)]
    out = cli(ws, "import", str(write_jsonl(tmp_path / "j.jsonl", rows)), "--dataset", "j", "--json").output
    report = json.loads(out, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert report["source_rows"] == 6 and report["inserted"] == 4 and report["duplicates"] == 2
    assert report["duplicate_groups"] == [[1, 1], [2, 1]] and report["split_counts"] == {"train": 4}
    assert (report["inserted"] + report["existing"] + report["duplicates"] + report["conflict_dropped"]
            + report["skipped"]) == report["source_rows"]


def test_ctrl_c_during_an_import_exits_130_and_writes_nothing(tmp_path):
    ws = tmp_path / "ws"
    spool = tmp_path / "tmp"
    spool.mkdir()
    src = tmp_path / "big.jsonl"
    with open(src, "w") as f:
        for i in range(400_000):
            f.write(json.dumps({"instruction": f"Instruction {i}", "response": "r", "gold_score": 1 + i % 5,
                                **RUBRIC}) + "\n")
    selfrat = Path(sys.executable).with_name("selfrat")
    proc = subprocess.Popen([str(selfrat), "--workspace", str(ws), "import", str(src), "--dataset", "big"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TMPDIR": str(spool)})  # fmt: skip
    deadline = time.monotonic() + 120
    while not any(spool.glob("selfrat-import-*/*.parquet")):  # the import is under way: its spool has files
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip() == "interrupted: nothing was written: dataset 'big' is as it was"
    assert "big" not in Store.in_workspace(ws).datasets()["name"].to_list()
    assert not any(spool.glob("selfrat-import-*"))  # the spool is cleaned up


@pytest.mark.slow
def test_a_million_rows_import_in_under_2_gb():
    bench = Path(__file__).resolve().parents[1] / "bench" / "import_scale.py"
    out = subprocess.run([sys.executable, str(bench), "--rows", "1000000"], capture_output=True, text=True, check=True)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["items"] == 1_000_000
    assert figures["peak_rss_mb"] < 2000, figures
