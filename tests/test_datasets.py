"""Datasets as objects: `selfrat datasets show` (items as stored, the judge prompts they render to, strict
JSON) and `selfrat datasets rm` (refused while a run uses the dataset, --force orphans and says what)."""

from __future__ import annotations

import json
import math

import polars as pl
import pytest

from store import Store, StoreError, judgment_id
from store.store import ITEM_COLUMNS, JUDGMENT_COLUMNS, DatasetInUse

from helpers import cli, strict_json

RUBRIC = {"criteria": "Is the summary faithful?", **{f"score{k}_description": f"level {k}" for k in range(1, 6)}}
LONG = "word " * 200  # 1000 characters: clipped in the text view, whole in --json


def frame(rows: list[dict]) -> pl.DataFrame:
    full = [{c: None for c in ITEM_COLUMNS} | r for r in rows]
    schema = {c: (pl.Float64 if c == "gold_score" else pl.Int64 if c in ("source_row", "item_id") else pl.Utf8)
              for c in ITEM_COLUMNS}
    return pl.DataFrame(full, schema=schema)


def absolute_items() -> pl.DataFrame:
    # item_id order (1, 2, 3) differs from source order (rows 3, 1, 2): show follows the source.
    base = {"dataset": "abs", "kind": "absolute", **RUBRIC}
    return frame([
        {**base, "item_id": 1, "content_hash": "h1", "split": "eval", "instruction": "Say hi", "response": "hi",
         "gold_score": 5.0, "source_row": 3},
        {**base, "item_id": 2, "content_hash": "h2", "split": "train", "instruction": "Summarise the text.",
         "input": "The cat sat on the mat all day long.", "response": "A cat sat.", "gold_score": 4.0,
         "reference": "A cat sat on a mat.", "meta": '{"capability": "summary"}', "source_row": 1},
        {**base, "item_id": 3, "content_hash": "h3", "split": "train", "instruction": "Write an essay.",
         "response": LONG, "gold_score": 2.0, "source_row": 2},
    ])


def pairwise_items() -> pl.DataFrame:
    return frame([{"dataset": "pw", "kind": "pairwise", "item_id": 10, "content_hash": "p1", "split": "eval",
                   "instruction": "Translate to French.", "input": "Good morning", "response": "Bonjour",
                   "response_b": "Bonsoir", "label": "A", "gold_score": math.nan, "source_row": 1}])


@pytest.fixture
def ws(tmp_path):
    """Items written through the store (not `selfrat import`: the importer has tests of its own)."""
    ws = tmp_path / "ws"
    store = Store.in_workspace(ws)
    store.import_items("abs", "absolute", absolute_items(), source="abs.jsonl", preset=None, source_rows=3)
    store.import_items("pw", "pairwise", pairwise_items(), source="pw.jsonl", preset=None, source_rows=1)
    return ws


def judgments(run_id: str, item_ids: list[int]) -> list[dict]:
    rows = []
    for item in item_ids:
        for k in range(2):
            row = {c: None for c in JUDGMENT_COLUMNS}
            row.update(judgment_id=judgment_id(run_id, 1, "train", item, "a", k), run_id=run_id, iteration=1,
                       purpose="train", item_id=item, side="a", sample_index=k, model="m",
                       text=f"t [RESULT] {k + 3}", score=k + 3, parse_status="ok", forced=False)
            rows.append(row)
    return rows


# ------------------------------------------------------------------ listing (unchanged)


def test_datasets_without_a_subcommand_still_lists(ws):
    out = cli(ws, "datasets").output
    assert "abs" in out and "pw" in out and "train" in out
    listing = json.loads(cli(ws, "datasets", "--json").output)
    assert {d["name"]: d["items"] for d in listing["datasets"]} == {"abs": 3, "pw": 1}


# ------------------------------------------------------------------ show


def test_show_prints_the_first_items_in_source_order(ws):
    out = cli(ws, "datasets", "show", "abs").output
    assert "absolute, 3 items (train 2, eval 1)" in out
    rows = [line for line in out.splitlines() if line.startswith("--- row")]
    assert [r.split()[2] for r in rows] == ["1", "2", "3"]  # source rows, not item ids
    assert "input: The cat sat on the mat all day long." in out
    assert "reference: A cat sat on a mat." in out and "criteria: Is the summary faithful?" in out
    assert 'meta: {"capability": "summary"}' in out and "gold_score: 4.0" in out
    assert LONG not in out and "more chars]" in out  # long fields clipped
    assert "[prompt:" not in out and "input: None" not in out  # null columns are left out

    first = cli(ws, "datasets", "show", "abs", "--limit", "1").output
    assert first.count("--- row") == 1 and "Summarise the text." in first
    evals = cli(ws, "datasets", "show", "abs", "--split", "eval").output
    assert evals.count("--- row") == 1 and "instruction: Say hi" in evals
    bad = cli(ws, "datasets", "show", "abs", "--split", "test", ok=False)
    assert bad.exit_code == 2 and "--split" in bad.output


def test_show_prompt_is_the_exact_judge_prompt_with_the_input(ws):
    from engine.prompts import absolute_messages, relative_messages

    out = cli(ws, "datasets", "show", "abs", "--limit", "1", "--prompt").output
    item = Store.in_workspace(ws).dataset_items("abs", limit=1).row(0, named=True)
    prompt = absolute_messages(item)[-1]["content"]
    assert "[prompt: absolute]\n" + prompt in out
    assert "Summarise the text." in prompt and "The cat sat on the mat all day long." in prompt

    pw = cli(ws, "datasets", "show", "pw", "--prompt").output
    pitem = Store.in_workspace(ws).dataset_items("pw").row(0, named=True)
    for label, messages in (("absolute_a", absolute_messages(pitem, "response")),
                            ("absolute_b", absolute_messages(pitem, "response_b")),
                            ("relative", relative_messages(pitem))):
        assert f"[prompt: {label}]\n" + messages[-1]["content"] in pw
        assert "Translate to French." in messages[-1]["content"] and "Good morning" in messages[-1]["content"]
    assert "label: A" in pw and "response_b: Bonsoir" in pw


def test_show_json_is_strict_and_complete(ws):
    data = strict_json(cli(ws, "datasets", "show", "abs", "--json", "--prompt").output)
    assert (data["dataset"], data["kind"]) == ("abs", "absolute")
    assert data["counts"] == {"items": 3, "train": 2, "eval": 1}
    assert [i["source_row"] for i in data["items"]] == [1, 2, 3]
    assert data["items"][1]["response"] == LONG  # not clipped
    first = data["items"][0]
    assert first["input"] == "The cat sat on the mat all day long." and first["gold_score"] == 4.0
    assert "The cat sat on the mat all day long." in first["prompts"]["absolute"]

    pw = strict_json(cli(ws, "datasets", "show", "pw", "--json").output)  # a NaN gold is stored in pw
    assert pw["items"][0]["gold_score"] is None and "prompts" not in pw["items"][0]
    assert pw["counts"] == {"items": 1, "train": 0, "eval": 1}


def test_show_unknown_dataset_lists_the_known_ones(ws):
    res = cli(ws, "datasets", "show", "nope", ok=False)
    assert res.exit_code == 2 and "nope" in res.output and "abs, pw" in res.output


# ------------------------------------------------------------------ rm


def test_rm_deletes_an_unused_dataset_and_nothing_else(ws):
    res = cli(ws, "datasets", "rm", "abs")
    assert "deleted dataset 'abs': 3 items" in res.output and "orphaned" not in res.output
    store = Store.in_workspace(ws)
    assert store.datasets()["name"].to_list() == ["pw"]
    assert store._rows("SELECT count(*) AS n FROM items WHERE dataset = 'abs'")[0]["n"] == 0
    assert store._rows("SELECT dataset FROM imports") == [{"dataset": "pw"}]
    assert store.dataset_items("pw")["item_id"].to_list() == [10]
    res = cli(ws, "datasets", "rm", "abs", ok=False)
    assert res.exit_code == 2 and "no dataset 'abs'" in res.output and "pw" in res.output


def test_runs_using_dataset_by_config_and_by_judgments(ws):
    store = Store.in_workspace(ws)
    store.create_run("train-run", "loop", {"model": "m", "train_dataset": "abs", "eval_datasets": []})
    store.create_run("eval-run", "evaluate", {"model": "m", "eval_datasets": ["pw", "abs"]})
    store.create_run("sft-run", "loop", {"model": "m", "train_dataset": "other", "sft": {"dataset": "abs"}})
    # A config stored before `seed: {sft: ...}` became `sft: ...` still counts.
    store.create_run("old-sft-run", "loop",
                     {"model": "m", "train_dataset": "other", "seed": {"sft": {"dataset": "abs"}}})
    store.create_run("other", "loop", {"model": "m", "train_dataset": "other", "sft": None})
    store.create_run("judged", "loop", {"model": "m", "train_dataset": "gone"})
    store.insert_judgments(judgments("judged", [2]))
    assert store.runs_using_dataset("abs") == ["eval-run", "judged", "old-sft-run", "sft-run", "train-run"]
    assert store.runs_using_dataset("pw") == ["eval-run"]
    assert store.runs_using_dataset("nothing") == []


def test_rm_is_refused_while_a_run_uses_the_dataset(ws):
    store = Store.in_workspace(ws)
    store.create_run("r1", "loop", {"model": "m", "train_dataset": "abs", "eval_datasets": ["abs"]})
    res = cli(ws, "datasets", "rm", "abs", ok=False)
    assert res.exit_code == 2 and "r1" in res.output and "--force" in res.output
    assert store.datasets()["name"].to_list() == ["abs", "pw"]
    assert store.dataset_items("abs", limit=0).height == 3
    assert len(store._rows("SELECT * FROM imports WHERE dataset = 'abs'")) == 1
    with pytest.raises(DatasetInUse) as e:
        store.delete_dataset("abs")
    assert e.value.runs == ["r1"] and isinstance(e.value, StoreError)


def test_rm_force_deletes_and_says_what_it_orphans(ws):
    store = Store.in_workspace(ws)
    store.create_run("r1", "loop", {"model": "m", "train_dataset": "abs", "eval_datasets": []})
    store.create_run("r2", "evaluate", {"model": "m", "eval_datasets": ["pw"]})
    store.insert_judgments(judgments("r1", [1, 2]))  # 4 judgments of abs items
    store.insert_judgments(judgments("r2", [10]))
    j = store.judgments("r1", 1).filter(pl.col("item_id") == 2)["judgment_id"].to_list()
    store.save_curation("r1", 1, pl.DataFrame({"pair_id": [7], "item_id": [2], "chosen_id": [j[1]],
                                               "rejected_id": [j[0]], "margin": [1.0]}),
                        {"strategy": "margin"})
    res = cli(ws, "datasets", "rm", "abs", "--force")
    assert "deleted dataset 'abs': 3 items" in res.output
    assert "orphaned run(s) r1: 4 judgments and 1 pairs point at deleted items" in res.output
    assert "r2" not in res.output
    assert store.datasets()["name"].to_list() == ["pw"]
    assert store._rows("SELECT count(*) AS n FROM items WHERE dataset = 'abs'")[0]["n"] == 0
    # Runs, judgments and pairs are kept; the other dataset's items and judgments too.
    assert store.runs()["run_id"].to_list() == ["r1", "r2"]
    assert store.judgments("r1", 1).height == 4 and store.pairs("r1", 1).height == 1
    assert store.judgments("r2", 1).height == 2 and store.dataset_items("pw").height == 1
    assert store.runs_using_dataset("pw") == ["r2"]
