"""parse_judgment: one table of realistic judge outputs (many must fail), then property tests."""

from __future__ import annotations

import string

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from engine.parsing import Judgment, ParseStatus, parse_judgment

OK, NO, OUT, TRUNC, AMB = (
    ParseStatus.OK,
    ParseStatus.NO_SCORE,
    ParseStatus.OUT_OF_RANGE,
    ParseStatus.TRUNCATED,
    ParseStatus.AMBIGUOUS,
)

RUBRIC = (
    "[Is the response factually correct?]\n"
    "Score 1: The response is mostly wrong.\n"
    "Score 2: The response has major errors.\n"
    "Score 3: The response is partly correct.\n"
    "Score 4: The response is correct with minor slips.\n"
    "Score 5: The response is fully correct."
)
FEEDBACK = "The response explains the cause clearly, but it misses the second step of the derivation."

# (text, mode, truncated, expected score, expected status)
CASES = [
    # --- accepted final forms ---------------------------------------------------------------------------
    (f"{FEEDBACK} [RESULT] 4", "absolute", False, 4, OK),
    (f"{FEEDBACK} [RESULT]: 4", "absolute", False, 4, OK),
    (f"{FEEDBACK} [RESULT] (4)", "absolute", False, 4, OK),
    (f"{FEEDBACK} [RESULT] 4/5", "absolute", False, 4, OK),
    (f"{FEEDBACK} [RESULT] 4 out of 5", "absolute", False, 4, OK),
    (f"{FEEDBACK} [RESULT] **4**", "absolute", False, 4, OK),
    (f"{FEEDBACK} [RESULT] Score: 2", "absolute", False, 2, OK),
    (f"{FEEDBACK}\n[RESULT]\n3", "absolute", False, 3, OK),
    (f"{FEEDBACK} [result] 1", "absolute", False, 1, OK),
    (f"{FEEDBACK}\nScore: 4", "absolute", False, 4, OK),
    (f"{FEEDBACK}\n**Score:** 5", "absolute", False, 5, OK),
    (f"{FEEDBACK}\n**Final Score: 3**", "absolute", False, 3, OK),
    (f"{FEEDBACK} It deserves a score of 4.", "absolute", False, 4, OK),
    ("Engaging but shallow on planetary detail. So the overall score is 3.", "absolute", False, 3, OK),
    (f"{FEEDBACK}\nResult: 4", "absolute", False, 4, OK),
    (f"{FEEDBACK} Rating = 2", "absolute", False, 2, OK),
    (f"{FEEDBACK} 4/5", "absolute", False, 4, OK),
    # trailing junk after the score
    (f"{FEEDBACK} [RESULT] 4.", "absolute", False, 4, OK),
    (f"{FEEDBACK} [RESULT] 4<|im_end|>", "absolute", False, 4, OK),
    (f"{FEEDBACK} [RESULT] 4</s>\n", "absolute", False, 4, OK),
    (f"{FEEDBACK} [RESULT] 5<|eot_id|><|end_of_text|>", "absolute", False, 5, OK),
    (f'"{FEEDBACK} [RESULT] 2"', "absolute", False, 2, OK),
    (f"{FEEDBACK} [RESULT] 3 \n\n  ", "absolute", False, 3, OK),
    # a valid score is kept even when the generator also hit its budget
    (f"{FEEDBACK} [RESULT] 3", "absolute", True, 3, OK),
    # the last marker wins; earlier ones are part of the rationale
    (f"First pass [RESULT] 2. On reflection: {FEEDBACK} [RESULT] 4", "absolute", False, 4, OK),
    # --- must fail: numbers that are not a final score --------------------------------------------------
    (RUBRIC, "absolute", False, None, NO),  # score only in the rubric text
    (f"{FEEDBACK}\n{RUBRIC}", "absolute", False, None, NO),
    ("Score 1: poor\nScore 2: weak\nScore 3: fair\nScore 4", "absolute", False, None, NO),  # cut rubric line
    ("The response scores 4 because it is mostly correct, though it omits the proof.", "absolute", False, None, NO),
    ("It would get a score of 4 if it cited sources; it does not.", "absolute", False, None, NO),
    (f"{FEEDBACK} [RESULT] 4\n\nNote: the reference answer is longer.", "absolute", False, None, NO),
    ("Feedback: (write a feedback for criteria) [RESULT] (an integer number between 1 and 5)", "absolute", False, None,
     NO),
    (f"{FEEDBACK} [RESULT]", "absolute", False, None, NO),
    (f"{FEEDBACK} [RESULT] excellent", "absolute", False, None, NO),
    (f"{FEEDBACK} [RESULT] four", "absolute", False, None, NO),
    (f"{FEEDBACK} [RESULT] 4?", "absolute", False, None, NO),
    ("Cut the cost by 3/4", "absolute", False, None, NO),
    ("Step 4", "absolute", False, None, NO),
    ("", "absolute", False, None, NO),
    ("   \n\t ", "absolute", False, None, NO),
    # out of range / not an integer score
    (f"{FEEDBACK} [RESULT] 7", "absolute", False, None, OUT),
    (f"{FEEDBACK} [RESULT] 0", "absolute", False, None, OUT),
    (f"{FEEDBACK} [RESULT] 10", "absolute", False, None, OUT),
    (f"{FEEDBACK} [RESULT] -1", "absolute", False, None, OUT),
    (f"{FEEDBACK} [RESULT] 4.5", "absolute", False, None, OUT),
    (f"{FEEDBACK} [RESULT] 4/10", "absolute", False, None, OUT),
    (f"{FEEDBACK} 9/10", "absolute", False, None, OUT),
    (f"{FEEDBACK} Score: 8/10", "absolute", False, None, OUT),
    (f"{FEEDBACK} [RESULT] 99999999999999999999999999", "absolute", False, None, OUT),
    # ambiguous
    (f"{FEEDBACK} [RESULT] 3 or 4", "absolute", False, None, AMB),
    (f"{FEEDBACK} [RESULT] 3-4", "absolute", False, None, AMB),
    (f"{FEEDBACK} Score: 2 to 3", "absolute", False, None, AMB),
    # truncated: the budget ran out before a valid score
    ("The response begins well, but the second paragraph", "absolute", True, None, TRUNC),
    (f"{FEEDBACK} [RESULT", "absolute", True, None, TRUNC),
    (f"{FEEDBACK} [RESULT] 7", "absolute", True, None, TRUNC),
    ("", "absolute", True, None, TRUNC),
    # --- relative mode ----------------------------------------------------------------------------------
    ("Response A cites the source; B does not. [RESULT] A", "relative", False, "A", OK),
    ("Both are short, but B answers the question. [RESULT] B<|im_end|>", "relative", False, "B", OK),
    ("B is more complete. [RESULT] Response B.", "relative", False, "B", OK),
    ("B is more complete. [RESULT] (B)", "relative", False, "B", OK),
    ("A is safer.\n**Result:** A", "relative", False, "A", OK),
    ("A is safer, so the better response is A", "relative", False, "A", OK),
    ("Response A is better.", "relative", False, None, NO),  # no marker: A is only mentioned
    ("[RESULT] Both", "relative", False, None, NO),
    ("[RESULT] Tie", "relative", False, None, NO),
    ("Neither is correct. [RESULT] a", "relative", False, None, NO),  # lowercase is not the label
    ("[RESULT] A or B", "relative", False, None, AMB),
    ("[RESULT] A/B", "relative", False, None, AMB),
    ("[RESULT] C", "relative", False, None, OUT),
    ("[RESULT] 4", "relative", False, None, OUT),
    ("B covers more ground, while A", "relative", True, None, TRUNC),
    # absolute markers do not carry over
    ("A is better. [RESULT] A", "absolute", False, None, NO),
]


@pytest.mark.parametrize("text, mode, truncated, score, status", CASES)
def test_table(text, mode, truncated, score, status):
    j = parse_judgment(text, truncated=truncated, mode=mode)
    assert (j.score, j.status) == (score, status)
    assert j.raw == text
    assert text.strip().startswith(j.rationale)
    if status is OK:
        assert not j.rationale.endswith(("[RESULT]", "[RESULT]:", "Score:"))


def test_rationale_is_text_before_marker():
    j = parse_judgment(f"  {FEEDBACK} [RESULT] 4  ")
    assert j == Judgment(raw=f"  {FEEDBACK} [RESULT] 4  ", rationale=FEEDBACK, score=4, status=OK)
    assert parse_judgment("**Score:** 4").rationale == ""


def test_failure_keeps_text():
    text = f"  {FEEDBACK} [RESULT] 3 or 4 "
    j = parse_judgment(text)
    assert j.raw == text and j.rationale == FEEDBACK and j.score is None
    assert parse_judgment(f" {FEEDBACK} ").rationale == FEEDBACK


def test_invalid_mode():
    with pytest.raises(ValueError):
        parse_judgment("[RESULT] 4", mode="pairwise")  # type: ignore[arg-type]


def test_huge_inputs_are_fast():
    import time

    t0 = time.perf_counter()
    assert parse_judgment("x" * 5_000_000 + " [RESULT] 4").score == 4
    assert parse_judgment(" " * 1_000_000).status is NO
    assert parse_judgment("[RESULT] 4" + "<|im_end|>" * 100_000).score == 4
    assert parse_judgment("Score: " * 200_000 + "x").status is NO
    assert parse_judgment("[RESULT] " + "1-" * 200_000 + "1").status in (AMB, NO)
    assert time.perf_counter() - t0 < 10


# --- property tests ---------------------------------------------------------------------------------------

# Fragments that judge outputs are made of, so that fuzzing hits the regex's edges more often than
# uniform random text would.
FRAGMENTS = [
    "[RESULT]", "[RESULT", "RESULT]", "Score", "score of", "Result", ":", " ", "\n", "(", ")", "[", "]", "*",
    "**", ".", "/", "/5", "/10", "out of", " or ", "-", "1", "3", "4", "5", "7", "0", "4.5", "A", "B",
    "Response", "<|im_end|>", "</s>", "\u0664", "\uff14", "é", "is", "the response",
]
judge_like = st.one_of(
    st.text(),
    st.lists(st.sampled_from(FRAGMENTS), max_size=30).map("".join),
    st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=5)), max_size=20).map("".join),
)
FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(text=judge_like, truncated=st.booleans(), mode=st.sampled_from(["absolute", "relative"]))
@example(text="", truncated=False, mode="absolute")
@example(text="[RESULT] \u0664", truncated=False, mode="absolute")  # Arabic-Indic four is not "4"
def test_never_raises_and_never_invents(text, truncated, mode):
    j = parse_judgment(text, truncated=truncated, mode=mode)
    assert j.raw == text
    assert isinstance(j.status, ParseStatus)
    assert (j.score is None) == (j.status is not OK)
    if j.score is not None:
        allowed = {1, 2, 3, 4, 5} if mode == "absolute" else {"A", "B"}
        assert j.score in allowed
        # the rationale is a prefix of the text and the score literally follows it, near the end
        body = text.strip()
        assert body.startswith(j.rationale)
        after = body[len(j.rationale) :]
        assert str(j.score) in after
        assert str(j.score) in text.rstrip()[-2000:]


@FAST
@given(text=judge_like, k=st.integers(1, 5))
def test_appended_result_wins(text, k):
    assume("[RESULT]" not in text)
    j = parse_judgment(f"{text}\n[RESULT] {k}")
    assert (j.score, j.status) == (k, OK)
    assert j.rationale == text.strip()


@FAST
@given(text=judge_like, label=st.sampled_from(["A", "B"]))
def test_appended_label_wins(text, label):
    assume("[RESULT]" not in text)
    j = parse_judgment(f"{text}\n[RESULT] {label}", mode="relative")
    assert (j.score, j.status) == (label, OK)


# Rubric descriptions: prose without marker words (no "r": no result/score/rating/grade) and no digits.
description = st.text(alphabet=string.ascii_letters.replace("r", "").replace("R", "") + " ,;", max_size=60)
UNPARSEABLE_TAILS = [
    "", "The response is accurate but", "[RESULT]", "[RESULT] excellent", "Score", "Score 4", "scores 4 because",
    "(an integer number between 1 and 5)", "[RESULT] 4 and then some", ")", "**", "<|im_end|>",
]


@FAST
@given(
    descriptions=st.lists(description, min_size=5, max_size=5),
    tail=st.one_of(st.sampled_from(UNPARSEABLE_TAILS), judge_like),
    truncated=st.booleans(),
)
def test_rubric_prefix_never_yields_a_score(descriptions, tail, truncated):
    assume(parse_judgment(tail).score is None)
    rubric = "\n".join(f"Score {k}: {d}." for k, d in enumerate(descriptions, start=1))
    j = parse_judgment(f"{rubric}\n{tail}", truncated=truncated)
    assert j.score is None
    assert j.status is not OK
