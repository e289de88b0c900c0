"""engine.relative: A/B judging in both orders (position swap), its metrics on hand-computed cases, a scripted
judge that always prefers A, and the verdict column written by sample_and_store."""

from __future__ import annotations

import json
import math

import polars as pl
import pytest

from engine.judging import sample_and_store
from engine.relative import item_outcomes, relative_breakdown, relative_metrics, relative_requests
from engine.sampling import FakeSampler, SamplingParams, TransformersSampler
from store import Store

ITEM_SCHEMA = {"item_id": pl.Int64, "instruction": pl.String, "response": pl.String, "response_b": pl.String,
               "label": pl.String, "reference": pl.String, "criteria": pl.String, "meta": pl.String}


def _items(rows: list[dict]) -> pl.DataFrame:
    base = {"instruction": "Name the capital of France.", "reference": None, "criteria": None, "meta": None}
    return pl.DataFrame([{**base, **r} for r in rows], schema=ITEM_SCHEMA)


def _judgments(rows: list[tuple[int, str, str | None]]) -> pl.DataFrame:
    return pl.DataFrame(rows, schema={"item_id": pl.Int64, "side": pl.String, "verdict": pl.String}, orient="row")


# The better response of each item says GOOD; the label names it (A = response, B = response_b).
PAIRS = _items([
    {"item_id": 1, "response": "GOOD: Paris.", "response_b": "Lyon.", "label": "A"},
    {"item_id": 2, "response": "Marseille.", "response_b": "GOOD: Paris.", "label": "B"},
    {"item_id": 3, "response": "GOOD: It is Paris.", "response_b": "Nice.", "label": "A"},
    {"item_id": 4, "response": "Toulouse.", "response_b": "GOOD: Paris, on the Seine.", "label": "B"},
])


def _shown(messages: list[dict], position: str) -> str:
    """The text shown as Response A or B in a relative prompt."""
    user = messages[-1]["content"]
    if position == "A":
        return user.split("###Response A:\n", 1)[1].split("\n\n###Response B:", 1)[0]
    return user.split("###Response B:\n", 1)[1].split("\n\n###", 1)[0]


# ------------------------------------------------------------------------------------------- requests


def test_requests_judge_both_orders():
    reqs = relative_requests(PAIRS)
    assert [(r.item_id, r.side) for r in reqs] == [(i, s) for i in (1, 2, 3, 4) for s in ("ab", "ba")]
    ab, ba = reqs[0], reqs[1]
    assert (_shown(ab.messages, "A"), _shown(ab.messages, "B")) == ("GOOD: Paris.", "Lyon.")
    assert (_shown(ba.messages, "A"), _shown(ba.messages, "B")) == ("Lyon.", "GOOD: Paris.")
    assert ab.messages[0] == ba.messages[0]  # same system prompt
    assert "[RESULT] (Either \"A\" or \"B\")" in ab.messages[-1]["content"]


def test_requests_refuse_an_item_without_response_b():
    items = _items([{"item_id": 7, "response": "Paris.", "response_b": None, "label": None}])
    with pytest.raises(ValueError, match="item 7: no response_b"):
        relative_requests(items)


# ----------------------------------------------------------------------------- scripted judges, end to end


def _always_a(messages, index, seed):
    return "Response A is better. [RESULT] A"


def _right(messages, index, seed):
    return "A is correct. [RESULT] A" if "GOOD" in _shown(messages, "A") else "B is correct. [RESULT] B"


def _judge(tmp_path, script, items=PAIRS, n=1, params=None, sampler=None) -> pl.DataFrame:
    store = Store(tmp_path / "db.duckdb")
    written = sample_and_store(
        store, sampler or FakeSampler(script), relative_requests(items), run_id="r", iteration=0, purpose="eval",
        n=n, params=params or SamplingParams(temperature=0, mode="relative"), base_seed=0, batch_size=3,
    )
    assert written == 2 * n * items.height
    return store.judgments("r", 0, "eval")


def test_a_judge_that_always_prefers_a_ties_every_item(tmp_path):
    judgments = _judge(tmp_path, _always_a)
    m = relative_metrics(PAIRS, judgments)
    assert m["accuracy"] == 0.0  # one order alone would have credited it with 50%
    assert (m["ties"], m["tie_rate"], m["failures"], m["n"]) == (4.0, 1.0, 0.0, 4.0)
    assert m["position_consistency"] == 0.0
    assert m["first_position_rate"] == 1.0
    assert m["section_mean_accuracy"] == 0.0
    assert [o["prediction"] for o in item_outcomes(PAIRS, judgments)] == ["tie"] * 4


def test_a_judge_right_in_both_orders_is_accurate(tmp_path):
    m = relative_metrics(PAIRS, _judge(tmp_path, _right))
    assert (m["accuracy"], m["ties"], m["failures"], m["position_consistency"]) == (1.0, 0.0, 0.0, 1.0)
    assert m["first_position_rate"] == 0.5  # each item: A on one order, B on the other


def test_sample_and_store_writes_the_verdict(tmp_path):
    judgments = _judge(tmp_path, _right, n=2)
    row = judgments.filter((pl.col("item_id") == 2) & (pl.col("side") == "ba")).row(0, named=True)
    assert (row["verdict"], row["score"], row["parse_status"], row["forced"]) == ("A", None, "ok", False)
    assert (row["p1"], row["p2"], row["p3"], row["p4"], row["p5"]) == (1.0, 0.0, None, None, None)
    assert row["text"] == "A is correct. [RESULT] A"
    assert judgments.height == 16 and set(judgments["verdict"]) == {"A", "B"}


def test_absolute_judgments_keep_an_empty_verdict(tmp_path):
    store = Store(tmp_path / "db.duckdb")
    from engine.judging import JudgeRequest

    reqs = [JudgeRequest(1, "a", [{"role": "user", "content": "Rate it."}])]
    sample_and_store(store, FakeSampler(lambda m, i, s: "Fine. [RESULT] 4"), reqs, run_id="r", iteration=0,
                     purpose="eval", n=1, params=SamplingParams(), base_seed=0, batch_size=1)
    row = store.judgments("r", 0, "eval").row(0, named=True)
    assert (row["score"], row["verdict"], row["p4"], row["p5"]) == (4, None, 1.0, 0.0)


def test_tiny_model_relative_mode_end_to_end(tmp_path, tiny_model_dir):
    sampler = TransformersSampler(str(tiny_model_dir), device="cpu")
    params = SamplingParams(temperature=0, max_new_tokens=6, force_score=True, mode="relative")
    items = PAIRS.head(2)
    judgments = _judge(tmp_path, None, items=items, params=params, sampler=sampler)
    assert set(judgments["verdict"]) <= {"A", "B"} and judgments["score"].null_count() == judgments.height
    for row in judgments.iter_rows(named=True):
        assert row["text"].endswith(f"[RESULT] {row['verdict']}") and row["forced"]
        assert math.isclose(row["p1"] + row["p2"], 1.0, abs_tol=1e-5) and row["p3"] is None
    m = relative_metrics(items, judgments)
    assert m["n"] == 2.0 and m["failures"] == 0.0


# ----------------------------------------------------------------------------------------- hand-computed

MIXED = _items([
    {"item_id": 1, "response": "x", "response_b": "y", "label": "A", "meta": json.dumps({"section": "chat"})},
    {"item_id": 2, "response": "x", "response_b": "y", "label": "B", "meta": json.dumps({"section": "chat"})},
    {"item_id": 3, "response": "x", "response_b": "y", "label": "A", "meta": json.dumps({"subset": "hard"})},
    {"item_id": 4, "response": "x", "response_b": "y", "label": "tie", "meta": json.dumps({"section": "hard"})},
    {"item_id": 5, "response": "x", "response_b": "y", "label": "B", "meta": json.dumps({"section": "hard"})},
    {"item_id": 6, "response": "x", "response_b": "y", "label": "B", "meta": None},
])
MIXED_JUDGMENTS = _judgments([
    (1, "ab", "A"), (1, "ba", "B"),  # both orders: response            -> A, correct
    (2, "ab", "A"), (2, "ba", "A"),  # orders disagree                  -> tie, wrong
    (3, "ab", "B"), (3, "ba", "A"),  # both: response_b                 -> B, wrong (consistent)
    (4, "ab", "A"), (4, "ba", "A"),  # orders disagree, tie label       -> tie, correct
    (5, "ab", None), (5, "ba", "A"),  # no verdict on "ab"              -> failure
    (6, "ab", "B"), (6, "ba", "A"),  # both: response_b                 -> B, correct
    (6, "a", None),                  # an absolute judgment of the item: ignored
])


def test_mixed_case_by_hand():
    m = relative_metrics(MIXED, MIXED_JUDGMENTS)
    assert [o["prediction"] for o in item_outcomes(MIXED, MIXED_JUDGMENTS)] == ["A", "tie", "B", "tie", None, "B"]
    assert m["accuracy"] == pytest.approx(3 / 6)
    assert (m["ties"], m["failures"], m["n"]) == (2.0, 1.0, 6.0)
    assert m["tie_rate"] == pytest.approx(2 / 6)
    assert m["position_consistency"] == pytest.approx(3 / 5)  # items 1, 3, 6 of the 5 with both verdicts
    assert m["first_position_rate"] == pytest.approx(8 / 11)  # 11 verdicts written, 8 of them "A"
    # chat 1/2, hard 1/3 (items 3, 4, 5), (none) 1/1
    assert m["section_mean_accuracy"] == pytest.approx((1 / 2 + 1 / 3 + 1) / 3)


def test_breakdown_rows_per_section():
    rows = relative_breakdown(MIXED, MIXED_JUDGMENTS)
    assert rows.columns == ["group_by", "group_value", "metric", "value"]
    assert set(rows["group_by"]) == {"section"}
    value = {(r["group_value"], r["metric"]): r["value"] for r in rows.iter_rows(named=True)}
    assert value[("chat", "accuracy")] == 0.5 and value[("chat", "ties")] == 1.0
    assert value[("hard", "accuracy")] == pytest.approx(1 / 3)
    assert (value[("hard", "n")], value[("hard", "failures")]) == (3.0, 1.0)
    assert value[("(none)", "accuracy")] == 1.0 and value[("(none)", "first_position_rate")] == 0.5
    assert rows.height == 3 * 7


def test_tie_labelled_items():
    items = _items([
        {"item_id": 1, "response": "x", "response_b": "y", "label": "tie"},
        {"item_id": 2, "response": "x", "response_b": "y", "label": "tie"},
    ])
    # Item 1: the orders disagree -> tie, correct. Item 2: both prefer response -> A, wrong for a tie label.
    judgments = _judgments([(1, "ab", "B"), (1, "ba", "B"), (2, "ab", "A"), (2, "ba", "B")])
    m = relative_metrics(items, judgments)
    assert (m["accuracy"], m["ties"], m["position_consistency"]) == (0.5, 1.0, 0.5)


def test_several_samples_per_order_take_the_majority():
    items = _items([
        {"item_id": 1, "response": "x", "response_b": "y", "label": "A"},
        {"item_id": 2, "response": "x", "response_b": "y", "label": "A"},
    ])
    judgments = _judgments([
        (1, "ab", "A"), (1, "ab", "A"), (1, "ab", "B"), (1, "ba", "B"),  # majority A; B -> response: agree
        (2, "ab", "A"), (2, "ab", "B"), (2, "ba", "B"), (2, "ba", "B"),  # "ab" split: no preference -> tie
    ])
    out = item_outcomes(items, judgments)
    assert [(o["ab"], o["ba"], o["prediction"]) for o in out] == [("A", "A", "A"), ("tie", "A", "tie")]
    m = relative_metrics(items, judgments)
    assert (m["accuracy"], m["ties"], m["position_consistency"]) == (0.5, 1.0, 0.5)
    assert m["first_position_rate"] == pytest.approx(3 / 8)


def test_an_item_without_judgments_is_a_failure():
    m = relative_metrics(PAIRS.head(2), _judgments([(1, "ab", "A"), (1, "ba", "B")]))
    assert (m["accuracy"], m["failures"], m["n"], m["position_consistency"]) == (0.5, 1.0, 2.0, 1.0)


def test_no_items_gives_nan():
    m = relative_metrics(PAIRS.head(0), _judgments([]))
    assert m["n"] == 0.0 and math.isnan(m["accuracy"]) and math.isnan(m["section_mean_accuracy"])
    assert relative_breakdown(PAIRS.head(0), _judgments([])).height == 0


@pytest.mark.parametrize("items, judgments, message", [
    (_items([{"item_id": 9, "response": "x", "response_b": "y", "label": "C"}]), _judgments([]),
     "item 9: label 'C' is not A, B or tie"),
    (_items([{"item_id": 9, "response": "x", "response_b": "y", "label": None}]), _judgments([]),
     "item 9: label None"),
    (_items([{"item_id": 9, "response": "x", "response_b": "y", "label": "A"}]), _judgments([(9, "ba", "C")]),
     "item 9 side ba: verdict 'C' is not A or B"),
    (_items([{"item_id": 9, "response": "x", "response_b": "y", "label": "A", "meta": "{oops"}]), _judgments([]),
     "item 9: meta is not valid JSON"),
])
def test_bad_input_names_the_item(items, judgments, message):
    with pytest.raises(ValueError, match=message):
        relative_metrics(items, judgments)
