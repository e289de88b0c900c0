"""Judge prompt templates, rubrics and the judgment format (round trip through parse_judgment)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.parsing import ParseStatus, parse_judgment
from engine.prompts import (
    ABSOLUTE_TEMPLATE,
    ABSOLUTE_TEMPLATE_NO_REF,
    DEFAULT_RUBRIC,
    RELATIVE_TEMPLATE,
    RELATIVE_TEMPLATE_NO_REF,
    RESULT_MARKER,
    SYSTEM_PROMPT,
    Rubric,
    absolute_messages,
    format_judgment,
    instruction_text,
    parse_prometheus_prompt,
    relative_messages,
    render_absolute,
    render_relative,
    rubric_from_item,
)

RUBRIC = Rubric(
    criteria="Does the answer explain photosynthesis correctly?",
    descriptions=("wrong", "major gaps", "partly right", "right, minor slips", "fully right"),
)
ITEM = {
    "instruction": "Explain photosynthesis in one paragraph. Use {braces} freely.",
    "response": "Plants turn light into sugar.",
    "response_b": "Photosynthesis converts light, water and CO2 into glucose and oxygen.",
    "reference": "Photosynthesis is the process by which plants convert light energy ...",
    "criteria": RUBRIC.criteria,
    **{f"score{k}_description": d for k, d in enumerate(RUBRIC.descriptions, start=1)},
}

ABS_SECTIONS = [
    "###Task Description:",
    "###The instruction to evaluate:",
    "###Response to evaluate:",
    "###Reference Answer (Score 5):",
    "###Score Rubrics:",
    "###Feedback: ",
]
REL_SECTIONS = [
    "###Task Description:",
    "###Instruction:",
    "###Response A:",
    "###Response B:",
    "###Reference Answer:",
    "###Score Rubric:",
    "###Feedback: ",
]


def assert_in_order(text: str, parts: list[str]) -> None:
    pos = 0
    for part in parts:
        found = text.find(part, pos)
        assert found >= 0, f"{part!r} missing or out of order"
        pos = found + len(part)


def test_system_prompt():
    assert SYSTEM_PROMPT.startswith("You are a fair judge assistant")
    assert RESULT_MARKER == "[RESULT]"


@pytest.mark.parametrize(
    "template", [ABSOLUTE_TEMPLATE, ABSOLUTE_TEMPLATE_NO_REF, RELATIVE_TEMPLATE, RELATIVE_TEMPLATE_NO_REF]
)
def test_templates_end_with_feedback_cue_and_state_the_format(template):
    assert template.endswith("###Feedback: ")
    assert "[RESULT]" in template
    assert "Please do not generate any other opening, closing, and explanations." in template


def test_template_sections_are_the_prometheus_layout():
    # The sections are built from (header, placeholder) pairs: pin the text they make, blank lines included.
    abs_sections = "\n###The instruction to evaluate:\n{instruction}\n\n###Response to evaluate:\n{response}\n\n"
    rel_sections = (
        "\n###Instruction:\n{instruction}\n\n###Response A:\n{response_a}\n\n###Response B:\n{response_b}\n\n"
    )
    assert ABSOLUTE_TEMPLATE.endswith(
        abs_sections + "###Reference Answer (Score 5):\n{reference}\n\n###Score Rubrics:\n{rubric}\n\n###Feedback: "
    )
    assert ABSOLUTE_TEMPLATE_NO_REF.endswith(abs_sections + "###Score Rubrics:\n{rubric}\n\n###Feedback: ")
    assert RELATIVE_TEMPLATE.endswith(
        rel_sections + "###Reference Answer:\n{reference}\n\n###Score Rubric:\n{rubric}\n\n###Feedback: "
    )
    assert RELATIVE_TEMPLATE_NO_REF.endswith(rel_sections + "###Score Rubric:\n{rubric}\n\n###Feedback: ")
    assert "a reference answer that gets a score of 5, and a score rubric" in ABSOLUTE_TEMPLATE
    assert "a response to evaluate, and a score rubric" in ABSOLUTE_TEMPLATE_NO_REF
    assert "(denoted as Response A and Response B), a reference answer, and" in RELATIVE_TEMPLATE
    assert "(denoted as Response A and Response B), and an evaluation criteria" in RELATIVE_TEMPLATE_NO_REF


def test_absolute_with_reference():
    text = render_absolute(ITEM["instruction"], ITEM["response"], RUBRIC, reference=ITEM["reference"])
    assert_in_order(
        text,
        [ABS_SECTIONS[0], "[RESULT] (an integer number between 1 and 5)", ABS_SECTIONS[1], ITEM["instruction"],
         ABS_SECTIONS[2], ITEM["response"], ABS_SECTIONS[3], ITEM["reference"], ABS_SECTIONS[4],
         f"[{RUBRIC.criteria}]", *(f"Score {k}: {d}" for k, d in enumerate(RUBRIC.descriptions, 1)), ABS_SECTIONS[5]],
    )
    assert text.endswith("###Feedback: ")
    assert "reference answer that gets a score of 5" in text


@pytest.mark.parametrize("reference", [None, "", "  \n"])
def test_absolute_without_reference(reference):
    text = render_absolute(ITEM["instruction"], ITEM["response"], RUBRIC, reference=reference)
    assert "###Reference Answer" not in text
    assert "reference answer" not in text  # the task text must not promise one either
    assert_in_order(text, [s for s in ABS_SECTIONS if "Reference" not in s])
    assert "\nScore 1: wrong\nScore 2: major gaps\nScore 3: partly right\n" in text


def test_relative_with_and_without_reference():
    text = render_relative(ITEM["instruction"], "resp A", "resp B", RUBRIC.criteria, reference="ref")
    assert_in_order(text, [REL_SECTIONS[0], '[RESULT] (Either "A" or "B")', REL_SECTIONS[1], ITEM["instruction"],
                           REL_SECTIONS[2], "resp A", REL_SECTIONS[3], "resp B", REL_SECTIONS[4], "ref",
                           REL_SECTIONS[5], f"[{RUBRIC.criteria}]", REL_SECTIONS[6]])
    assert "Score 1:" not in text  # relative grading shows the criteria line only
    no_ref = render_relative(ITEM["instruction"], "resp A", "resp B", RUBRIC.criteria, reference="")
    assert "###Reference Answer" not in no_ref and "reference answer" not in no_ref
    assert_in_order(no_ref, [s for s in REL_SECTIONS if "Reference" not in s])


def test_values_with_braces_are_not_formatted():
    text = render_absolute("Use {x} and {response}", "{rubric}", RUBRIC)
    assert "Use {x} and {response}" in text and "###Response to evaluate:\n{rubric}\n" in text


def test_rubric_from_item():
    assert rubric_from_item(ITEM) == RUBRIC
    assert rubric_from_item({"instruction": "x"}) is DEFAULT_RUBRIC
    blank = {"criteria": None, **{f"score{k}_description": None for k in range(1, 6)}}
    assert rubric_from_item(blank) is DEFAULT_RUBRIC
    with pytest.raises(ValueError, match="score3_description"):
        rubric_from_item({**ITEM, "score3_description": ""})


def test_default_rubric_shape():
    assert len(DEFAULT_RUBRIC.descriptions) == 5 and all(DEFAULT_RUBRIC.descriptions)
    with pytest.raises(ValueError):
        Rubric("c", ("1", "2", "3", "4"))  # type: ignore[arg-type]


def test_absolute_messages_picks_response_key():
    msgs = absolute_messages(ITEM)
    assert [m["role"] for m in msgs] == ["system", "user"]
    assert msgs[0]["content"] == SYSTEM_PROMPT
    assert "###Response to evaluate:\nPlants turn light into sugar.\n" in msgs[1]["content"]
    assert "###Reference Answer (Score 5):" in msgs[1]["content"]
    msgs_b = absolute_messages(ITEM, response_key="response_b")
    assert f"###Response to evaluate:\n{ITEM['response_b']}\n" in msgs_b[1]["content"]
    assert ITEM["response"] not in msgs_b[1]["content"]


def test_absolute_messages_without_reference_or_rubric():
    item = {"instruction": "Say hi.", "response": "Hi!", "reference": None}
    user = absolute_messages(item)[1]["content"]
    assert "###Reference Answer" not in user
    assert f"[{DEFAULT_RUBRIC.criteria}]" in user and f"Score 5: {DEFAULT_RUBRIC.descriptions[4]}" in user


def test_relative_messages():
    user = relative_messages(ITEM)[1]["content"]
    assert_in_order(user, ["###Response A:\n" + ITEM["response"], "###Response B:\n" + ITEM["response_b"]])
    assert f"[{RUBRIC.criteria}]" in user
    user_default = relative_messages({"instruction": "q", "response": "a", "response_b": "b"})[1]["content"]
    assert f"[{DEFAULT_RUBRIC.criteria}]" in user_default and "###Reference Answer" not in user_default


@pytest.mark.parametrize("score", [1, 2, 3, 4, 5, "1", "5"])
def test_format_judgment_round_trip_absolute(score):
    text = format_judgment("  Clear and mostly correct.\n", score)
    assert text == f"Clear and mostly correct. [RESULT] {score}"
    j = parse_judgment(text)
    assert (j.score, j.status, j.rationale) == (int(score), ParseStatus.OK, "Clear and mostly correct.")


@pytest.mark.parametrize("label", ["A", "B"])
def test_format_judgment_round_trip_relative(label):
    j = parse_judgment(format_judgment("B misses the point; A does not.", label), mode="relative")
    assert (j.score, j.status) == (label, ParseStatus.OK)


@pytest.mark.parametrize("bad", [0, 6, "C", "4.5", True, None])
def test_format_judgment_rejects_invalid_scores(bad):
    with pytest.raises(ValueError):
        format_judgment("x", bad)


def test_format_judgment_empty_rationale():
    assert format_judgment("  ", 3) == "[RESULT] 3"


@settings(max_examples=200, deadline=None)
@given(rationale=st.text(), score=st.sampled_from([1, 2, 3, 4, 5, "A", "B"]))
def test_format_judgment_round_trip_any_rationale(rationale, score):
    mode = "relative" if isinstance(score, str) else "absolute"
    j = parse_judgment(format_judgment(rationale, score), mode=mode)
    assert (j.score, j.status, j.rationale) == (score, ParseStatus.OK, rationale.strip())


# ---------------------------------------------------------------------------------------------------
# Reading a rendered prompt back (the inverse of ABSOLUTE_TEMPLATE, used to import Prometheus eval sets)


@pytest.mark.parametrize("with_input", [False, True], ids=["no-input", "input"])
@pytest.mark.parametrize("with_reference", [False, True], ids=["no-reference", "reference"])
def test_render_then_parse_gives_the_item_back(with_input, with_reference):
    item = {**ITEM, "instruction": "Summarise the text below.\nKeep it to {two} sentences.",
            "response": "Plants make sugar from light.\n\nThey also release oxygen.",
            "input": "Photosynthesis converts light energy into chemical energy ..." if with_input else None,
            "reference": ITEM["reference"] if with_reference else None}
    got = parse_prometheus_prompt(absolute_messages(item)[1]["content"])
    assert got == {
        "instruction": instruction_text(item),  # the input sits inside the instruction section
        "response": item["response"],
        "reference": item["reference"],
        "criteria": RUBRIC.criteria,
        **{f"score{k}_description": d for k, d in enumerate(RUBRIC.descriptions, start=1)},
    }
    if with_input:
        assert got["instruction"].endswith("Input:\n" + item["input"])


def test_parse_prometheus_prompt_reads_a_hand_written_prompt_and_names_missing_sections():
    rubric = (
        "[Is it kind?]\nScore 1: Rude.\nScore 2: Curt.\nScore 3: Neutral.\nScore 4: Kind.\n"
        "Score 5: Very kind,\nacross two lines."
    )
    prompt = (
        "###Task Description:\nAn instruction ... Score 1 to 5 ...\n\n"
        "###The instruction to evaluate:\nGreet me.\n\n###Response to evaluate:\nHello, friend!\n\n"
        f"###Reference Answer (Score 5):\nHello there, friend!\n\n###Score Rubrics:\n{rubric}\n\n###Feedback: "
    )
    got = parse_prometheus_prompt(prompt)
    assert got == {
        "instruction": "Greet me.", "response": "Hello, friend!", "reference": "Hello there, friend!",
        "criteria": "Is it kind?", "score1_description": "Rude.", "score2_description": "Curt.",
        "score3_description": "Neutral.", "score4_description": "Kind.",
        "score5_description": "Very kind,\nacross two lines.",
    }  # fmt: skip
    no_ref = prompt.replace("###Reference Answer (Score 5):\nHello there, friend!\n\n", "")
    assert parse_prometheus_prompt(no_ref)["reference"] is None
    assert parse_prometheus_prompt(no_ref)["response"] == "Hello, friend!"
    for section in ["###The instruction to evaluate:", "###Response to evaluate:", "###Score Rubrics:"]:
        with pytest.raises(ValueError, match="no '" + section):
            parse_prometheus_prompt(prompt.replace(section, "###Something else:"))
    with pytest.raises(ValueError, match="Score 1:"):
        parse_prometheus_prompt(prompt.replace("Score 3:", "Level 3:"))
