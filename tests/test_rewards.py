"""engine/rewards.py: the GRPO reward functions on known answers (TRL's signature: prompts, completions and the
dataset's columns as keyword lists), their weighted combination, and conversational completions."""

from __future__ import annotations

import pytest

from engine.rewards import (
    combine,
    completion_text,
    component_rewards,
    consistency_reward,
    format_reward,
    score_reward,
    verdict_reward,
    weighted_reward,
)


def absolute(*texts, gold=4.0) -> dict:
    n = len(texts)
    return {"prompts": ["p"] * n, "completions": list(texts), "kind": ["absolute"] * n, "gold_score": [gold] * n,
            "order": ["a"] * n, "pair_key": ["1"] * n, "label": [None] * n}


def test_score_reward_is_one_minus_the_miss_over_four_and_zero_without_a_score():
    cols = absolute("Right on. [RESULT] 4", "Close. [RESULT] 5", "Far off. [RESULT] 1", "Never says.",
                    "Score 1: poor ... Score 5: great", "Out of range [RESULT] 7")
    assert score_reward(**cols) == [1.0, 0.75, 0.25, 0.0, 0.0, 0.0]
    # a fractional gold (a mean of graders) is used as it is
    assert score_reward(**absolute("[RESULT] 3", "[RESULT] 5", gold=3.5)) == [0.875, 0.625]
    # rows it does not apply to: pairwise, or no gold
    assert score_reward(["p"], ["[RESULT] 4"], kind=["pairwise"], gold_score=[None]) == [None]
    assert score_reward(["p"], ["[RESULT] 4"], kind=["absolute"], gold_score=[None]) == [None]


def test_format_reward_needs_the_score_form_of_the_rows_kind_at_the_end():
    cols = absolute("Fine. [RESULT] 4", "Fine. [RESULT] 4.5", "[RESULT] 3 or 4", "no score at all", "")
    assert format_reward(**cols) == [1.0, 0.0, 0.0, 0.0, 0.0]
    pair = {"kind": ["pairwise"] * 3, "order": ["ab"] * 3}
    assert format_reward(["p"] * 3, ["A wins. [RESULT] A", "[RESULT] 4", "[RESULT] A or B"], **pair) == [1.0, 0.0, 0.0]


def pairwise(texts_ab, texts_ba, label="A", key="7") -> dict:
    texts = list(texts_ab) + list(texts_ba)
    orders = ["ab"] * len(texts_ab) + ["ba"] * len(texts_ba)
    n = len(texts)
    return {"prompts": ["p"] * n, "completions": texts, "kind": ["pairwise"] * n, "gold_score": [None] * n,
            "order": orders, "pair_key": [key] * n, "label": [label] * n}


def test_verdict_reward_reads_the_verdict_through_the_order_it_was_shown_in():
    # label A = the item's `response`; in order "ba" the judge sees it as B
    cols = pairwise(["[RESULT] A", "[RESULT] B", "no verdict"], ["[RESULT] B", "[RESULT] A"])
    assert verdict_reward(**cols) == [1.0, 0.0, 0.0, 1.0, 0.0]
    tie = pairwise(["[RESULT] A"], ["[RESULT] B"], label="tie")
    assert verdict_reward(**tie) == [None, None]  # no correct verdict for a tie
    assert verdict_reward(**absolute("[RESULT] 4")) == [None]


def test_consistency_reward_compares_with_the_other_order_in_the_same_call():
    # ab: A, A, unparsed; ba: B, A. In item terms: ab -> A, A, None; ba -> A, B.
    cols = pairwise(["[RESULT] A", "It is A. [RESULT] A", "rambling"], ["[RESULT] B", "[RESULT] A"])
    assert consistency_reward(**cols) == [0.5, 0.5, 0.0, 2 / 3, 0.0]  # ba's 2nd names item B: no ab does
    # judged inconsistently across orders: the judge picks position A both times -> other response each time
    flip = pairwise(["[RESULT] A", "[RESULT] A"], ["[RESULT] A", "[RESULT] A"])
    assert consistency_reward(**flip) == [0.0, 0.0, 0.0, 0.0]
    assert verdict_reward(**flip) == [1.0, 1.0, 0.0, 0.0]  # right in one order only
    # consistent, whatever the label: the same response in both orders
    same = pairwise(["[RESULT] B"], ["[RESULT] A"], label="A")
    assert consistency_reward(**same) == [1.0, 1.0] and verdict_reward(**same) == [0.0, 0.0]
    # the other order is not in this call, or another item's is: nothing to compare with
    alone = pairwise(["[RESULT] A"], [])
    other = pairwise([], ["[RESULT] B"], key="8")
    both = {k: alone[k] + other[k] for k in alone}
    assert consistency_reward(**both) == [None, None]
    assert consistency_reward(**absolute("[RESULT] 4")) == [None]


def test_weighted_reward_is_the_weighted_mean_of_what_applies_and_logs_the_components():
    weights = {"score": 1.0, "format": 0.5, "verdict": 1.0, "consistency": 0.5}
    abs_cols = absolute("[RESULT] 5", "unparsed")  # score 0.75 / format 1; score 0 / format 0
    pair_cols = pairwise(["[RESULT] A"], ["[RESULT] A"])  # ab right (item A); ba says item B: wrong, inconsistent
    cols = {k: abs_cols[k] + pair_cols[k] for k in abs_cols}
    parts = component_rewards(**cols, weights=weights)
    assert parts == {"score": [0.75, 0.0, None, None], "format": [1.0, 0.0, 1.0, 1.0],
                     "verdict": [None, None, 1.0, 0.0], "consistency": [None, None, 0.0, 0.0]}
    assert combine(parts, weights) == pytest.approx([(0.75 + 0.5) / 1.5, 0.0, (0.5 + 1.0) / 2.0, 0.5 / 2.0])

    logged, seen = {}, []
    fn = weighted_reward(weights, on_scored=lambda **kw: seen.append(kw))
    assert fn.__name__ == "judge_reward"
    out = fn(cols["prompts"], cols["completions"], **{k: v for k, v in cols.items() if k not in ("prompts",
                                                                                               "completions")},
             log_metric=logged.__setitem__, trainer_state=None)
    assert out == pytest.approx(combine(parts, weights))
    assert logged == pytest.approx({"rewards/score": 0.375, "rewards/format": 0.75, "rewards/verdict": 0.5,
                                    "rewards/consistency": 0.0})
    assert seen[0]["rewards"] == out and seen[0]["components"] == parts and seen[0]["kind"] == cols["kind"]
    # a zero weight leaves a component out; a row nothing applies to gets None
    assert combine(component_rewards(**abs_cols, weights={"verdict": 1.0}), {"verdict": 1.0}) == [None, None]
    assert weighted_reward({"score": 1.0, "format": 0.0})(**abs_cols) == [0.75, 0.0]


def test_conversational_completions_read_the_assistant_message():
    conv = [[{"role": "assistant", "content": "Good. [RESULT] 4"}],
            [{"role": "assistant", "content": [{"type": "text", "text": "Bad. "},
                                               {"type": "text", "text": "[RESULT] 1"}]}]]
    assert [completion_text(c) for c in conv] == ["Good. [RESULT] 4", "Bad. [RESULT] 1"]
    assert score_reward(["p", "p"], conv, kind=["absolute"] * 2, gold_score=[4, 4]) == [1.0, 0.25]
    with pytest.raises(ValueError, match="has 1 values for 2 completions"):
        score_reward(["p", "p"], conv, kind=["absolute"], gold_score=[4, 4])
    with pytest.raises(ValueError, match="unknown reward"):
        component_rewards(["p"], ["x"], {"length": 1.0})
