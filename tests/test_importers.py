"""engine.importers: real reference data (../shared/data, by path), every file format, presets, broken files.

    python -m pytest -q tests/test_importers.py
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import polars as pl
import pytest

from engine.importers import (
    ITEM_COLUMNS,
    ITEM_SCHEMA,
    PRESETS,
    ImportFailed,
    ImportResult,
    RowError,
    parse_mapping,
    read_items,
)

FIXTURES = Path(__file__).parent / "fixtures" / "import"
DESC = ["Bad.", "Weak.", "Fair.", "Good.", "Excellent."]
RUBRIC_COLS = {"criteria": "Is it right?", **{f"score{k}_description": d for k, d in enumerate(DESC, start=1)}}


def _check_frame(res: ImportResult) -> None:
    """Every result has the canonical columns, dtypes and unique ids."""
    assert res.items.columns == ITEM_COLUMNS
    assert dict(res.items.schema) == ITEM_SCHEMA
    assert res.items["item_id"].n_unique() == res.items.height
    assert res.items["item_id"].dtype == pl.Int64 and res.items["item_id"].min() >= 0
    assert set(res.items["split"].unique()) <= {"train", "eval"}
    for c in ["instruction", "response", "criteria", "score1_description", "score5_description", "meta"]:
        assert res.items[c].null_count() == 0, c
    if res.kind == "absolute":
        assert res.items["gold_score"].null_count() == 0
        assert res.items["gold_score"].is_between(1, 5).all()
        assert res.items["response_b"].null_count() == res.items.height
    else:
        assert res.items["gold_score"].null_count() == res.items.height
        assert set(res.items["label"].unique()) <= {"A", "B", "tie"}
        assert res.items["response_b"].null_count() == 0


# ---------------------------------------------------------------------------------------------------
# Real reference data
# ---------------------------------------------------------------------------------------------------

# CIA: 250 prompts x 5 responses, but some response cells are empty in the source (19 in remaining, 8 in
# biggen, including biggen row 190 with none at all). Those slots are left out with a note.
# Some prompts repeat one response text under several scores (remaining: 6 prompts, 14 items; biggen: 5, 10):
# the same content with different gold, a conflict that is refused unless --on-conflict says what to keep.
CIA_FILES = [("scored_responses_testset_remaining.tsv", 19, 6, 14), ("scored_responses_testset_biggen.tsv", 8, 5, 10)]


@pytest.mark.parametrize(("name", "empty_slots", "conflicts", "conflict_items"), CIA_FILES)
def test_cia_expands_each_row_into_five_graded_items(shared_data, name, empty_slots, conflicts, conflict_items):
    path = shared_data / "cia" / name
    with pytest.raises(ImportFailed, match=f"{conflicts} conflict"):
        read_items(str(path), dataset="cia")
    res = read_items(str(path), dataset="cia", on_conflict="drop")
    _check_frame(res)
    assert (res.preset, res.kind, res.source_rows) == ("cia", "absolute", 250)
    assert len(res.conflicts) == conflicts and res.conflict_dropped == conflict_items
    assert res.items.height == 1250 - empty_slots - conflict_items == res.split_counts["train"]
    assert any(f"{empty_slots} empty response slot" in n for n in res.notes)
    # Balanced gold scores: 250 of each, less the empty slots and the conflicting items.
    counts = dict(res.items.group_by("gold_score").len().iter_rows())
    assert set(counts) == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert sum(250 - n for n in counts.values()) == empty_slots + conflict_items
    # Each source row gives distinct gold scores with one rubric, instruction and reference.
    per_row = res.items.group_by("source_row").agg(
        pl.col("gold_score").n_unique().alias("scores"), pl.len().alias("n"),
        pl.col("criteria").n_unique().alias("rubrics"), pl.col("instruction").n_unique().alias("instr"),
    )  # fmt: skip
    assert (per_row["scores"] == per_row["n"]).all()
    assert (per_row["rubrics"] == 1).all() and (per_row["instr"] == 1).all()
    assert res.items["source_row"].min() == 1 and res.items["source_row"].max() == 250
    # Rubrics parsed (the biggen file's specific_rubric is a Python-dict string), not raw dict text.
    assert not res.items["criteria"].str.starts_with("{").any()
    src = pl.read_csv(path, separator="\t", infer_schema=False)
    first = src.row(0, named=True)
    want = ast.literal_eval(first["specific_rubric"])
    item = res.items.filter(pl.col("source_row") == 1).sort("gold_score").row(0, named=True)
    assert item["criteria"] == want["criteria"].strip()
    assert item["score3_description"] == want["score3_description"].strip()
    assert item["response"] == first["score_1_response"].strip()
    assert item["gold_feedback"] == first["score_1_feedback"].strip()
    assert item["reference"] == first["reference_answer"].strip()
    if first["system_prompt"]:  # biggen: the system prompt is prepended
        assert item["instruction"] == f"{first['system_prompt'].strip()}\n\n{first['input'].strip()}"
    else:
        assert item["instruction"] == first["input"].strip()
    meta = json.loads(item["meta"])
    assert meta["id"] == first["id"] and meta["capability"] == first["capability"] and "task" in meta
    assert "general_rubric" not in meta and "score_1_response" not in meta


def test_cia_preset_given_or_detected_gives_same_ids(shared_data):
    path = str(shared_data / "cia" / "scored_responses_testset_biggen.tsv")
    a = read_items(path, dataset="cia-biggen", on_conflict="first")
    b = read_items(path, dataset="cia-biggen", preset="cia", split="eval", on_conflict="first")
    assert a.items["item_id"].to_list() == b.items["item_id"].to_list()
    assert b.items["split"].unique().to_list() == ["eval"]


@pytest.mark.parametrize("name", ["vicuna_eval.json", "mt_bench_eval.json"])
def test_prometheus_prompt_eval_sets(shared_data, name):
    path = shared_data / "prometheus" / name
    res = read_items(str(path), dataset=name)
    _check_frame(res)
    assert (res.preset, res.kind, res.items.height) == ("prometheus-prompt", "absolute", 320)
    raw = json.loads(path.read_text())
    # Gold = mean of the 3 GPT-4 scores, the list kept; feedback = the first.
    for i in (0, 5, 319):
        item, rec = res.items.row(i, named=True), raw[i]
        assert item["gold_score"] == pytest.approx(sum(rec["gpt4_score"]) / 3)
        assert json.loads(item["gold_scores"]) == rec["gpt4_score"]
        assert item["gold_feedback"] == rec["gpt4_feedback"][0].strip()
        assert json.loads(item["meta"]) == {"idx": rec["idx"], "response_source": rec["response_source"],
                                            "category": rec["category"]}  # fmt: skip
        assert "###" not in item["instruction"] + item["response"] + item["reference"] + item["score5_description"]
    assert res.items["reference"].null_count() == 0


def test_prometheus_prompt_spot_check_vicuna_first_record(shared_data):
    res = read_items(str(shared_data / "prometheus" / "vicuna_eval.json"), dataset="vicuna", preset="prometheus-prompt")
    item = res.items.row(0, named=True)
    assert item["instruction"] == "How can I improve my time management skills?"
    assert item["response"].startswith("Improving your time management skills can help you")
    assert item["response"].endswith("become more productive and efficient.")
    assert item["reference"].startswith("To improve your time management skills, start by setting clear goals.")
    assert item["reference"].endswith("also involves taking care of your mental health.")
    assert item["criteria"] == (
        "Does the response provide detailed and actionable steps grounded on real-world scenarios?"
    )
    assert item["score1_description"] == (
        "The response lacks detail and provides no actionable steps or real-world context."
    )
    assert item["score5_description"].startswith("The response is comprehensive, offering detailed")
    assert (item["gold_score"], item["gold_scores"]) == (5.0, "[5, 5, 5]")


def test_mt_bench_mean_of_three(shared_data):
    res = read_items(str(shared_data / "prometheus" / "mt_bench_eval.json"), dataset="mt")
    item = res.items.row(5, named=True)  # gpt4_score [3, 2, 2]
    assert item["gold_scores"] == "[3, 2, 2]"
    assert item["gold_score"] == pytest.approx(7 / 3)
    assert item["response"] == "Character, Time Travel, Mystery, Adventure, Discovery, Consequences"


def test_hhh_prometheus_pairwise(shared_data):
    path = shared_data / "prometheus" / "hhh_alignment_eval.json"
    res = read_items(str(path), dataset="hhh")
    _check_frame(res)
    assert (res.preset, res.kind, res.items.height, res.source_rows) == ("prometheus-pairwise", "pairwise", 221, 221)
    assert res.items["label"].unique().to_list() == ["A"]
    assert res.items["reference"].null_count() == 221  # the HHH prompts carry no reference
    item = res.items.row(0, named=True)
    assert item["instruction"].startswith("Can you tell me what kind of knife is large enough")
    assert item["response"].startswith("Sorry, I'm not interested in helping you with that.")
    assert item["response_b"] == "Why would you want to do something like that?"
    assert item["criteria"].startswith("Does the model's response avoid causing any potential harm")
    assert json.loads(item["meta"]) == {"source": "harmless"}
    same = read_items(str(path), dataset="hhh", preset="prometheus-pairwise")
    assert same.items["item_id"].to_list() == res.items["item_id"].to_list()


def test_rewardbench_chat_pairwise(shared_data):
    from engine.prompts import DEFAULT_RUBRIC

    path = str(shared_data / "rewardbench" / "Chat.jsonl")
    auto = read_items(path, dataset="rb-chat")
    given = read_items(path, dataset="rb-chat", preset="pairwise", split="eval")
    for res in (auto, given):
        _check_frame(res)
        assert (res.preset, res.kind, res.items.height) == ("pairwise", "pairwise", 358)
        assert res.items["label"].unique().to_list() == ["A"]
    assert auto.items["item_id"].to_list() == given.items["item_id"].to_list()
    item = auto.items.row(0, named=True)
    assert item["instruction"] == "How do I detail a car?"
    assert item["criteria"] == DEFAULT_RUBRIC.criteria
    assert item["score4_description"] == DEFAULT_RUBRIC.descriptions[3]
    meta = [json.loads(m) for m in auto.items["meta"]]
    assert all(m["section"] == "Chat" and "subset" in m and "id" in m for m in meta)
    assert {m["subset"] for m in meta} >= {"alpacaeval-easy", "mt-bench-easy"}


# ---------------------------------------------------------------------------------------------------
# Presets on small fixtures
# ---------------------------------------------------------------------------------------------------


def test_feedback_collection_fixture():
    res = read_items(str(FIXTURES / "feedback_collection.jsonl"), dataset="fc")
    _check_frame(res)
    assert (res.preset, res.items.height) == ("feedback-collection", 3)
    assert res.items["gold_score"].to_list() == [5.0, 1.0, 4.0]
    first, last = res.items.row(0, named=True), res.items.row(2, named=True)
    assert first["instruction"] == "What is the capital of France?" and first["response"] == "Paris."
    assert first["reference"] == "The capital of France is Paris."
    assert first["criteria"] == "Is the answer factually correct?" and first["score5_description"] == "Entirely right."
    assert first["gold_feedback"] == "The response is correct and concise."
    assert last["reference"] is None and last["gold_feedback"] is None
    # Feedback-Collection's rendered prompt (`instruction`) and target (`output`) are derived: not meta.
    assert json.loads(first["meta"]) == {}


def test_pairwise_with_raw_label_values():
    path = str(FIXTURES / "pairwise_labels.csv")
    res = read_items(path, dataset="arena", mapping={"label": "winner"}, label_a="model_a", label_b="model_b",
                     label_tie="tie")  # fmt: skip
    _check_frame(res)
    assert (res.preset, res.kind) == ("pairwise", "pairwise")
    assert res.items["label"].to_list() == ["A", "B", "tie"]
    assert res.items["response_b"].to_list() == ["Rain.", "21", "Hello."]
    assert json.loads(res.items["meta"][0]) == {"question_id": "q1"}
    # label_a / label_b missing: a clear error naming them and the values found.
    with pytest.raises(ImportFailed, match=r"label_a and label_b.*'model_a', 'model_b', 'tie'"):
        read_items(path, dataset="arena", mapping={"label": "winner"})
    # A value outside label_a/label_b (no label_tie given): a row error with the row number.
    with pytest.raises(ImportFailed) as exc:
        read_items(path, dataset="arena", mapping={"label": "winner"}, label_a="model_a", label_b="model_b")
    assert [(e.row, e.reason) for e in exc.value.errors] == [
        (3, "label 'tie' is not one of label_a='model_a', label_b='model_b'")
    ]


def test_canonical_pairwise_and_chat_format_chosen_rejected(tmp_path):
    rows = [{"instruction": "Q1", "response": "a", "response_b": "b", "label": "b"},
            {"instruction": "Q2", "response": "a", "response_b": "b", "label": "TIE"}]  # fmt: skip
    p = tmp_path / "pairs.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows))
    res = read_items(str(p), dataset="d")
    assert (res.preset, res.kind, res.items["label"].to_list()) == ("canonical", "pairwise", ["B", "tie"])

    user = {"role": "user", "content": "Hi?"}
    chat = [{"chosen": [user, {"role": "assistant", "content": "Hello!"}],
             "rejected": [user, {"role": "assistant", "content": "Go away."}]}]  # fmt: skip
    p = tmp_path / "chat.json"
    p.write_text(json.dumps(chat))
    item = read_items(str(p), dataset="d").items.row(0, named=True)
    got = (item["instruction"], item["response"], item["response_b"], item["label"])
    assert got == ("Hi?", "Hello!", "Go away.", "A")


def test_mapping_renames_columns(tmp_path):
    df = pl.DataFrame({"question": ["What is 1+1?"], "answer": ["2"], "score": ["5"], "ref": ["2"],
                       "rubric_json": [json.dumps(RUBRIC_COLS)], "topic": ["math"]})  # fmt: skip
    p = tmp_path / "custom.csv"
    df.write_csv(p)
    mapping = parse_mapping(["instruction=question", "response=answer", "gold_score=score", "reference=ref",
                             "rubric=rubric_json"])  # fmt: skip
    res = read_items(str(p), dataset="custom", mapping=mapping)
    _check_frame(res)
    item = res.items.row(0, named=True)
    got = (item["instruction"], item["response"], item["reference"], item["gold_score"])
    assert got == ("What is 1+1?", "2", "2", 5.0)
    assert item["criteria"] == "Is it right?" and item["score2_description"] == "Weak."
    assert json.loads(item["meta"]) == {"topic": "math"}  # renamed source columns are not leftovers
    with pytest.raises(ImportFailed, match=r"mapped source column\(s\) not found: nope; found columns: question"):
        read_items(str(p), dataset="custom", mapping={**mapping, "gold_feedback": "nope"})
    with pytest.raises(ImportFailed, match="unknown mapping target"):
        read_items(str(p), dataset="custom", mapping={"instrution": "question"})
    with pytest.raises(ValueError, match="TARGET=SOURCE"):
        parse_mapping(["instruction"])


# ---------------------------------------------------------------------------------------------------
# Formats, identity, splits
# ---------------------------------------------------------------------------------------------------


def _canonical_table() -> pl.DataFrame:
    return pl.DataFrame({
        "instruction": ["Write a list, with commas.", 'Quote "this"\nand a\ttab.', "Plain."],
        "response": ["a, b, c", 'He said "ok".\nDone.', "Fine."],
        "reference": ["a, b, c, d", None, "Very fine."],
        **{k: [v, v, v] for k, v in RUBRIC_COLS.items()},
        "gold_score": [4.0, 2.5, 1.0],
        "split": ["train", "test", "eval"],
        "topic": ["lists", "quotes", "misc"],
    })  # fmt: skip


def _write(df: pl.DataFrame, path: Path) -> None:
    ext = path.suffix
    if ext == ".csv":
        df.write_csv(path)
    elif ext == ".tsv":
        df.write_csv(path, separator="\t")
    elif ext == ".parquet":
        df.write_parquet(path)
    elif ext == ".json":
        path.write_text(json.dumps(df.to_dicts()))
    elif ext == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in df.to_dicts()))


def test_round_trips_across_formats_give_identical_ids(tmp_path):
    df = _canonical_table()
    results = {}
    for ext in [".csv", ".tsv", ".parquet", ".json", ".jsonl"]:
        path = tmp_path / f"items{ext}"
        _write(df, path)
        results[ext] = read_items(str(path), dataset="rt")
        _check_frame(results[ext])
    base = results[".jsonl"].items.drop("meta")  # meta differs only in value types ("4.0" in CSV)
    for ext, res in results.items():
        assert res.preset == "canonical" and res.items.height == 3, ext
        assert res.items.drop("meta").equals(base), ext
    assert base["split"].to_list() == ["train", "eval", "eval"]
    assert base["reference"].to_list()[1] is None
    assert base["instruction"][1] == 'Quote "this"\nand a\ttab.'


def test_idempotent_and_dataset_scoped_ids(shared_data, tmp_path):
    path = str(shared_data / "rewardbench" / "Chat.jsonl")
    a, b = read_items(path, dataset="rb"), read_items(path, dataset="rb")
    assert a.items.equals(b.items)
    other = read_items(path, dataset="rb-copy")
    assert other.items["content_hash"].to_list() == a.items["content_hash"].to_list()
    assert not set(other.items["item_id"]) & set(a.items["item_id"])
    # Same content in two formats or with different whitespace/newlines: same ids.
    df = _canonical_table()
    _write(df, tmp_path / "x.jsonl")
    crlf = df.with_columns(pl.col("response").str.replace_all("\n", "\r\n") + "  ")
    _write(crlf, tmp_path / "y.parquet")
    assert (read_items(str(tmp_path / "x.jsonl"), dataset="d").items["item_id"].to_list()
            == read_items(str(tmp_path / "y.parquet"), dataset="d").items["item_id"].to_list())  # fmt: skip


def test_duplicates_keep_first_with_a_note(tmp_path):
    df = _canonical_table()
    _write(pl.concat([df, df.head(1)]), tmp_path / "dup.csv")
    res = read_items(str(tmp_path / "dup.csv"), dataset="d")
    assert res.items.height == 3 and res.source_rows == 4
    assert res.items["source_row"].to_list() == [1, 2, 3]
    assert res.duplicates == 1 and res.duplicate_groups == [(1, 1)]  # row 4 merged into row 1
    assert any("1 duplicate item(s) merged" in n and "row 1 (+1)" in n for n in res.notes)
    assert res.skipped == []


def test_hf_load_from_disk_dataset_dict(tmp_path):
    import datasets

    recs = _canonical_table().drop("split").to_dicts()
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(recs[:2]),
                               "test": datasets.Dataset.from_list(recs[2:])})  # fmt: skip
    out = tmp_path / "hfdir"
    dd.save_to_disk(str(out))
    res = read_items(str(out), dataset="hf")
    _check_frame(res)
    assert res.items["split"].to_list() == ["train", "train", "eval"]
    assert json.loads(res.items["meta"][2])["hf_split"] == "test"
    only_eval = read_items(str(out), dataset="hf", split="eval")
    assert only_eval.items["instruction"].to_list() == ["Plain."]
    # Same content as the JSONL file: same ids.
    _write(_canonical_table().drop("split"), tmp_path / "same.jsonl")
    assert read_items(str(tmp_path / "same.jsonl"), dataset="hf").items["item_id"].to_list() == res.items[
        "item_id"
    ].to_list()
    # A single Dataset directory (no splits) works too.
    datasets.Dataset.from_list(recs).save_to_disk(str(tmp_path / "single"))
    assert read_items(str(tmp_path / "single"), dataset="hf").items.height == 3


def test_json_dict_of_records_keyed_by_id(shared_data, tmp_path):
    records = {f"task_{i}": {"instruction": f"Q{i}", "response": f"A{i}", "gold_score": i, "score_rubric": RUBRIC_COLS}
               for i in (1, 2)}  # fmt: skip
    p = tmp_path / "keyed.json"
    p.write_text(json.dumps(records))
    res = read_items(str(p), dataset="k")
    assert [json.loads(m)["id"] for m in res.items["meta"]] == ["task_1", "task_2"]
    assert res.items["criteria"].to_list() == ["Is it right?"] * 2
    # BiGGen-Bench's sample responses have no gold score: the error names what is missing and what was found.
    biggen = str(shared_data / "prometheus" / "biggen_bench_sample_responses.json")
    with pytest.raises(ImportFailed, match=r"missing column\(s\): gold_score or gold_scores.*Found: id, capability"):
        read_items(biggen, dataset="b", mapping={"instruction": "input", "reference": "reference_answer"})


def test_split_column_and_argument(tmp_path):
    df = _canonical_table().with_columns(pl.Series("split", ["validation", "bogus", "TRAIN"]))
    _write(df, tmp_path / "s.jsonl")
    with pytest.raises(ImportFailed) as exc:
        read_items(str(tmp_path / "s.jsonl"), dataset="d")
    assert [e.row for e in exc.value.errors] == [2] and "split 'bogus'" in exc.value.errors[0].reason
    assert read_items(str(tmp_path / "s.jsonl"), dataset="d", split="train").items["split"].unique().to_list() == [
        "train"
    ]
    with pytest.raises(ImportFailed, match="expected train or eval"):
        read_items(str(tmp_path / "s.jsonl"), dataset="d", split="holdout")


# ---------------------------------------------------------------------------------------------------
# Broken files
# ---------------------------------------------------------------------------------------------------


def test_missing_columns_are_listed():
    with pytest.raises(ImportFailed) as exc:
        read_items(str(FIXTURES / "missing_columns.tsv"), dataset="d")
    msg = str(exc.value)
    assert "missing column(s): response, rubric or score_rubric or criteria" in msg
    assert "Found: instruction, answer, gold_score" in msg
    with pytest.raises(ImportFailed, match=r"cia: missing column\(s\): input, score_1_response"):
        read_items(str(FIXTURES / "missing_columns.tsv"), dataset="d", preset="cia")


def test_bad_scores_report_row_numbers():
    with pytest.raises(ImportFailed) as exc:
        read_items(str(FIXTURES / "bad_scores.csv"), dataset="d")
    errors = exc.value.errors
    assert [e.row for e in errors] == [2, 4]  # row 5's empty response is kept: a judge can rate an empty answer
    assert errors[0] == RowError(2, "gold score 'x' is not a number")
    assert errors[1].reason == "gold score '7' is outside 1..5"
    msg = str(exc.value)
    assert "2 of 5 row(s) invalid, nothing imported" in msg and "row 2: gold score 'x' is not a number" in msg


def test_bad_json_lines_report_line_numbers():
    with pytest.raises(ImportFailed) as exc:
        read_items(str(FIXTURES / "bad_lines.jsonl"), dataset="d")
    errors = exc.value.errors
    assert [e.row for e in errors] == [2, 4]
    assert errors[0].reason.startswith("bad JSON line")
    assert errors[1].reason == "line is a JSON list, not an object"


def test_skip_invalid_returns_valid_rows_and_lists_skipped():
    res = read_items(str(FIXTURES / "bad_scores.csv"), dataset="d", skip_invalid=True)
    _check_frame(res)
    assert res.items["source_row"].to_list() == [1, 3, 5]
    assert res.items["reference"].to_list() == [None, "1, 2, 3", None]
    assert res.items["response"][2] == "" and res.empty_responses == 1
    assert [e.row for e in res.skipped] == [2, 4] and res.source_rows == 5
    lines = read_items(str(FIXTURES / "bad_lines.jsonl"), dataset="d", skip_invalid=True)
    assert lines.items["source_row"].to_list() == [1, 5] and [e.row for e in lines.skipped] == [2, 4]
    assert lines.source_rows == 4  # non-blank lines


def test_many_errors_are_all_collected_and_the_message_is_capped(tmp_path):
    df = pl.DataFrame({"instruction": ["q"] * 30, "response": [f"r{i}" for i in range(30)], "gold_score": ["9"] * 30,
                       **{k: [v] * 30 for k, v in RUBRIC_COLS.items()}})  # fmt: skip
    _write(df, tmp_path / "many.csv")
    with pytest.raises(ImportFailed) as exc:
        read_items(str(tmp_path / "many.csv"), dataset="d")
    assert len(exc.value.errors) == 30
    assert "... and 10 more (30 in all)" in str(exc.value)
    with pytest.raises(ImportFailed, match="no valid rows"):
        read_items(str(tmp_path / "many.csv"), dataset="d", skip_invalid=True)


def test_cia_rubric_fallback_and_unparseable_rubric(tmp_path):
    good = json.dumps(RUBRIC_COLS)
    base = {"id": "x", "input": "Q?", "reference_answer": "R.", "system_prompt": "",
            **{f"score_{k}_response": f"resp {k}" for k in range(1, 6)},
            **{f"score_{k}_feedback": f"fb {k}" for k in range(1, 6)}}  # fmt: skip
    rows = [{**base, "specific_rubric": "{'criteria': 'broken", "general_rubric": good},
            {**base, "input": "Q2?", "specific_rubric": "not a dict", "general_rubric": "[]"}]  # fmt: skip
    _write(pl.DataFrame(rows), tmp_path / "cia.tsv")
    with pytest.raises(ImportFailed) as exc:
        read_items(str(tmp_path / "cia.tsv"), dataset="c")
    assert [e.row for e in exc.value.errors] == [2]
    assert exc.value.errors[0].reason.startswith("unparseable rubric: specific_rubric is not a JSON object")
    res = read_items(str(tmp_path / "cia.tsv"), dataset="c", skip_invalid=True)
    assert res.items.height == 5 and res.items["criteria"].unique().to_list() == ["Is it right?"]
    assert any("general_rubric" in n for n in res.notes)


def test_source_problems_fail_clearly(tmp_path):
    with pytest.raises(ImportFailed, match="no such file"):
        read_items(str(tmp_path / "nope.csv"), dataset="d")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ImportFailed, match="unsupported file type .txt"):
        read_items(str(tmp_path / "x.txt"), dataset="d")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ImportFailed, match="no data rows"):
        read_items(str(tmp_path / "empty.jsonl"), dataset="d")
    with pytest.raises(ImportFailed, match="unknown preset"):
        read_items(str(tmp_path / "empty.jsonl"), dataset="d", preset="alpaca")
    assert "pairwise" in PRESETS


def test_hub_name_failure_is_wrapped(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ImportFailed, match="no-such-dataset: could not load with datasets.load_dataset"):
        read_items("selfrat-test-org/no-such-dataset", dataset="d")
