"""Judge prompts: the Prometheus-2 templates, rubrics, and the judgment format the judge is trained to write.

Absolute grading shows the judge one response and a five-level rubric and asks for
``<rationale> [RESULT] <1-5>``; relative grading shows responses A and B and the rubric's criteria line and
asks for ``<rationale> [RESULT] A|B``. The section headers follow Prometheus 2 (prometheus-eval) so that
Feedback-Collection / Preference-Collection data and the public Prometheus checkpoints read the same prompts.

Only text is built here: chat templates are applied by the sampler (``tokenizer.apply_chat_template``), and
judgments are read back by ``engine.parsing.parse_judgment``.

    >>> item = {"instruction": "Say hi.", "response": "Hi!", "reference": None, "criteria": None}
    >>> messages = absolute_messages(item)          # system + user, DEFAULT_RUBRIC since the item has none
    >>> format_judgment("Polite and complete. ", 5)
    'Polite and complete. [RESULT] 5'
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from store.store import RUBRIC_KEYS

SYSTEM_PROMPT = (
    "You are a fair judge assistant tasked with providing clear, objective feedback based on specific "
    "criteria, ensuring each assessment reflects the absolute standards set for performance."
)
RESULT_MARKER = "[RESULT]"


@dataclass(frozen=True)
class Rubric:
    """One criteria sentence plus the descriptions of scores 1..5 (``descriptions[0]`` is score 1)."""

    criteria: str
    descriptions: tuple[str, str, str, str, str]

    def __post_init__(self) -> None:
        # A rubric with four or six levels would silently shift every score the judge writes.
        if len(self.descriptions) != 5:
            raise ValueError(f"a rubric needs exactly 5 score descriptions, got {len(self.descriptions)}")

    def render(self) -> str:
        """The "###Score Rubrics:" block: ``[criteria]`` then one ``Score k: ...`` line per level."""
        lines = [f"[{self.criteria}]"]
        lines += [f"Score {k}: {d}" for k, d in enumerate(self.descriptions, start=1)]
        return "\n".join(lines)


# Used for pairwise data that carries no rubric (RewardBench, HHH): a generic helpfulness/quality scale.
DEFAULT_RUBRIC = Rubric(
    criteria=(
        "Is the response helpful, correct and relevant to the instruction, addressing what the user asked "
        "for completely and clearly?"
    ),
    descriptions=(
        "The response is irrelevant, incorrect or harmful, or does not address the instruction at all.",
        "The response addresses the instruction only partially, with major errors, omissions or confusion "
        "that leave it of little use.",
        "The response addresses the main request but has noticeable errors, gaps or unclear parts; it is "
        "somewhat useful.",
        "The response is correct and helpful, addressing the instruction well with only minor errors or "
        "omissions.",
        "The response addresses the instruction fully and correctly; it is clear, well organized and as "
        "helpful as it could be, with no meaningful errors.",
    ),
)

# --- Templates ------------------------------------------------------------------------------------------
# Placeholders: {instruction}, {response} / {response_a}, {response_b}, {reference}, {rubric} (absolute: the
# full rendered rubric; relative: the criteria line only). Values are substituted with str.format, which
# does not re-read braces inside the values, so instructions containing code are safe.
# A template is its task text, then one "###Header:" section a placeholder, then the "###Feedback: " cue:
#
#     ###The instruction to evaluate:
#     {instruction}
#
#     ###Response to evaluate:
#     {response}
#     ...
#     ###Feedback: <- the judge writes from here
#
# Each comes with and without a reference answer; without one, neither the task text (its "{given}" clause)
# nor a section mentions it.

_ABSOLUTE_TASK = """###Task Description:
An instruction (might include an Input inside it), a response to evaluate, {given}, and a score rubric representing an evaluation criteria are given.
1. Write a detailed feedback that assesses the quality of the response strictly based on the given score rubric, not evaluating in general.
2. After writing a feedback, write a score that is an integer between 1 and 5. You should refer to the score rubric.
3. The output format should look as follows: "Feedback: (write a feedback for criteria) [RESULT] (an integer number between 1 and 5)"
4. Please do not generate any other opening, closing, and explanations.
"""

_RELATIVE_TASK = """###Task Description:
An instruction (might include an Input inside it), two responses to evaluate (denoted as Response A and Response B), {given}, and an evaluation criteria are given.
1. Write a detailed feedback that assesses the quality of the two responses strictly based on the given evaluation criteria, not evaluating in general.
2. Make comparisons between Response A and Response B. Instead of examining them separately, go straight to the point and mention the commonalities and differences between them.
3. After writing the feedback, indicate the better response, either "A" or "B".
4. The output format should look as follows: "Feedback: (write a feedback for criteria) [RESULT] (Either "A" or "B")"
5. Please do not generate any other opening, closing, and explanations.
"""

# Section headers of the absolute template, which parse_prometheus_prompt (below) reads back.
_H_INSTRUCTION = "The instruction to evaluate"
_H_RESPONSE = "Response to evaluate"
_H_REFERENCE = "Reference Answer (Score 5)"
_H_RUBRIC = "Score Rubrics"
_H_FEEDBACK = "Feedback"


def _with_and_without_reference(
    task: str, given: str, sections: list[tuple[str, str]], reference_header: str
) -> tuple[str, str]:
    """The template with a reference answer and the one without, from the task text and its ``(header,
    placeholder)`` sections; the reference section goes just before the last (the rubric's)."""

    def build(head: str, body: list[tuple[str, str]]) -> str:
        return head + "".join(f"\n###{h}:\n{{{field}}}\n" for h, field in body) + f"\n###{_H_FEEDBACK}: "

    with_reference = [*sections[:-1], (reference_header, "reference"), sections[-1]]
    return build(task.replace("{given}", given), with_reference), build(task.replace(", {given},", ","), sections)


ABSOLUTE_TEMPLATE, ABSOLUTE_TEMPLATE_NO_REF = _with_and_without_reference(
    _ABSOLUTE_TASK,
    "a reference answer that gets a score of 5",
    [(_H_INSTRUCTION, "instruction"), (_H_RESPONSE, "response"), (_H_RUBRIC, "rubric")],
    _H_REFERENCE,
)
RELATIVE_TEMPLATE, RELATIVE_TEMPLATE_NO_REF = _with_and_without_reference(
    _RELATIVE_TASK,
    "a reference answer",
    [("Instruction", "instruction"), ("Response A", "response_a"), ("Response B", "response_b"),
     ("Score Rubric", "rubric")],
    "Reference Answer",
)


INPUT_HEADER = "Input:"


def instruction_text(item: Mapping) -> str:
    """What the judge reads as the instruction: the item's instruction, then its input when it has one.

    Alpaca / Self-Instruct / PandaLM data give a task (``instruction``) and the text it works on (``input``)
    apart; the Prometheus templates say "an instruction (might include an Input inside it)", so the input
    goes inside the instruction section, under its own "Input:" line.
    """
    instruction = item["instruction"]
    extra = item.get("input")
    if isinstance(extra, str) and extra.strip():
        return f"{instruction}\n\n{INPUT_HEADER}\n{extra}"
    return instruction


def _has_reference(reference: object) -> bool:
    # None, "" and whitespace count as "no reference"; so does a NaN that a pandas frame may hand us.
    return isinstance(reference, str) and reference.strip() != ""


def render_absolute(instruction: str, response: str, rubric: Rubric, reference: str | None = None) -> str:
    """The user turn for grading one response on the 1-5 rubric; the reference section only if given."""
    if _has_reference(reference):
        return ABSOLUTE_TEMPLATE.format(
            instruction=instruction, response=response, reference=reference, rubric=rubric.render()
        )
    return ABSOLUTE_TEMPLATE_NO_REF.format(instruction=instruction, response=response, rubric=rubric.render())


def render_relative(
    instruction: str, response_a: str, response_b: str, criteria: str, reference: str | None = None
) -> str:
    """The user turn for choosing between A and B; the rubric is the criteria line, in brackets."""
    fields = dict(instruction=instruction, response_a=response_a, response_b=response_b, rubric=f"[{criteria}]")
    if _has_reference(reference):
        return RELATIVE_TEMPLATE.format(reference=reference, **fields)
    return RELATIVE_TEMPLATE_NO_REF.format(**fields)


def rubric_from_item(item: Mapping) -> Rubric:
    """The item's rubric (keys ``criteria``, ``score1_description`` .. ``score5_description``).

    All six missing/None/empty -> ``DEFAULT_RUBRIC``. Some present and some missing raises ``ValueError``:
    patching the gaps with default text would grade against a rubric nobody wrote.
    """
    values = [item.get(k) for k in RUBRIC_KEYS]
    present = [isinstance(v, str) and v.strip() != "" for v in values]
    if not any(present):
        return DEFAULT_RUBRIC
    if not all(present):
        missing = [k for k, ok in zip(RUBRIC_KEYS, present) if not ok]
        raise ValueError(f"incomplete rubric: missing {', '.join(missing)}")
    return Rubric(criteria=values[0], descriptions=tuple(values[1:]))


def _criteria_from_item(item: Mapping) -> str:
    # Relative grading needs only the criteria line, so pairwise data with a criteria but no score
    # descriptions (Preference-Collection) is fine here.
    criteria = item.get("criteria")
    return criteria if isinstance(criteria, str) and criteria.strip() else DEFAULT_RUBRIC.criteria


def absolute_messages(item: Mapping, response_key: str = "response") -> list[dict]:
    """System + user messages grading ``item[response_key]`` (e.g. "response_b" for the other side of a pair)."""
    user = render_absolute(
        instruction_text(item), item[response_key], rubric_from_item(item), reference=item.get("reference")
    )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


def relative_messages(item: Mapping, swap: bool = False) -> list[dict]:
    """System + user messages comparing ``item["response"]`` (A) with ``item["response_b"]`` (B).

    ``swap=True`` shows them the other way round (A = response_b): judging both orders exposes position bias.
    """
    first, second = ("response_b", "response") if swap else ("response", "response_b")
    user = render_relative(
        instruction_text(item),
        item[first],
        item[second],
        _criteria_from_item(item),
        reference=item.get("reference"),
    )
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


_VALID_SCORES = {"1", "2", "3", "4", "5", "A", "B"}


def format_judgment(rationale: str, score: int | str) -> str:
    """``"<rationale> [RESULT] <score>"``, the judge's target output; ``parse_judgment`` reads it back.

    Raises ``ValueError`` for a score outside 1..5 / "A" / "B": a training target with an invalid score
    would teach the judge to write one.
    """
    if isinstance(score, bool) or str(score) not in _VALID_SCORES:
        raise ValueError(f"score must be an integer 1..5 or 'A'/'B', got {score!r}")
    rationale = rationale.strip()
    return f"{rationale} {RESULT_MARKER} {score}" if rationale else f"{RESULT_MARKER} {score}"


# --- Reading a rendered prompt back ------------------------------------------------------------------------
# Prometheus eval sets (vicuna, mt_bench, HHH) ship full absolute-grading prompts, not their parts: the
# inverse of ABSOLUTE_TEMPLATE lives here, beside it, and tests render-then-parse to keep the two in step.

_P_INSTRUCTION = f"###{_H_INSTRUCTION}:"
_P_RESPONSE = f"###{_H_RESPONSE}:"
_P_REFERENCE = f"###{_H_REFERENCE}:"
_P_RUBRIC = f"###{_H_RUBRIC}:"
_P_FEEDBACK = f"###{_H_FEEDBACK}:"
_P_RUBRIC_RE = re.compile(
    r"""
    \s*(?P<criteria>.*?)\s*        # "[criteria]" (brackets stripped later), up to the first score line
    ^Score\ 1:(?P<s1>.*?)          # each score line starts a line; a description may run over several
    ^Score\ 2:(?P<s2>.*?)
    ^Score\ 3:(?P<s3>.*?)
    ^Score\ 4:(?P<s4>.*?)
    ^Score\ 5:(?P<s5>.*)\Z         # the last one runs to the end of the section
    """,
    re.S | re.M | re.X,
)


def parse_prometheus_prompt(text: str) -> dict:
    """Split a Prometheus absolute-grading prompt back into its parts.

    Returns instruction, response, reference (None without a "###Reference Answer (Score 5):" section),
    criteria and score1_description..score5_description (an item's input, rendered inside the instruction
    section, stays part of the instruction). Raises ValueError naming a missing section.
    The later markers are searched from the end, because the template puts them last and a response may
    quote earlier text.
    """
    if not isinstance(text, str):
        raise ValueError("prompt is not text")
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    i = text.find(_P_INSTRUCTION)
    if i < 0:
        raise ValueError(f"prompt has no {_P_INSTRUCTION!r} section")
    r = text.find(_P_RESPONSE, i)
    if r < 0:
        raise ValueError(f"prompt has no {_P_RESPONSE!r} section")
    ru = text.rfind(_P_RUBRIC)
    if ru < r:
        raise ValueError(f"prompt has no {_P_RUBRIC!r} section")
    fb = text.rfind(_P_FEEDBACK)
    if fb < ru:
        fb = len(text)  # no "###Feedback:" cue: the rubric runs to the end
    ref = text.rfind(_P_REFERENCE, r, ru)

    out = {
        "instruction": text[i + len(_P_INSTRUCTION) : r].strip(),
        "response": text[r + len(_P_RESPONSE) : ref if ref >= 0 else ru].strip(),
        "reference": text[ref + len(_P_REFERENCE) : ru].strip() if ref >= 0 else None,
    }
    m = _P_RUBRIC_RE.match(text[ru + len(_P_RUBRIC) : fb])
    if not m:
        raise ValueError(f"the {_P_RUBRIC!r} section does not have lines 'Score 1:' .. 'Score 5:' in order")
    criteria = m["criteria"].strip()
    if criteria.startswith("[") and criteria.endswith("]"):
        criteria = criteria[1:-1].strip()
    if not criteria:
        raise ValueError(f"the {_P_RUBRIC!r} section has no [criteria] line")
    out["criteria"] = criteria
    for k in range(1, 6):
        out[f"score{k}_description"] = m[f"s{k}"].strip()
    return out


# --- Meta-judge --------------------------------------------------------------------------------------------
# The judge rates a judgment (feedback + score) of one response: meta curation ranks an item's sampled
# judgments by this rating, and best-of-N keeps the highest rated. The paper found its meta-judge favoured
# judgments with high scores, so the task says outright that the quality of the feedback is what is rated.

META_RUBRIC = Rubric(
    criteria=(
        "Is the feedback an accurate, specific assessment of the response against the score rubric, with a "
        "score that follows from it?"
    ),
    descriptions=(
        "The feedback is wrong about the response or ignores the score rubric, or its score contradicts what "
        "it says.",
        "The feedback is mostly generic or partly wrong about the response; its score is poorly supported.",
        "The feedback is broadly right but vague or incomplete on the rubric's criteria; its score is plausible "
        "but weakly justified.",
        "The feedback is accurate and grounded in the rubric, with minor gaps; its score follows from it.",
        "The feedback is accurate, specific and grounded in the rubric, naming what the response does well and "
        "badly; its score follows exactly from the feedback and the rubric.",
    ),
)

_META_TASK = """###Task Description:
An instruction (might include an Input inside it), a response to evaluate, {given}, a score rubric representing an evaluation criteria, and an evaluator's feedback on the response ending in the score it gave are given.
1. Write a short assessment of the quality of the feedback, not of the response: is it accurate about the response, grounded in the score rubric, specific, and does its score follow from it? A low score can be excellent feedback.
2. After the assessment, rate the feedback with an integer between 1 and 5. You should refer to the feedback quality rubric.
3. The output format should look as follows: "(a short assessment of the feedback) [RESULT] (an integer number between 1 and 5)"
4. Please do not generate any other opening, closing, and explanations.
"""

_META_SECTIONS = """
###The instruction to evaluate:
{instruction}

###Response to evaluate:
{response}
{reference_section}
###Score Rubrics:
{rubric}

###Feedback to rate:
{feedback}

###Feedback Quality Rubric:
{meta_rubric}

###Assessment: """

META_TEMPLATE = _META_TASK.replace("{given}", "a reference answer that gets a score of 5") + _META_SECTIONS
META_TEMPLATE_NO_REF = _META_TASK.replace(", {given},", ",") + _META_SECTIONS


def render_meta(instruction: str, response: str, rubric: Rubric, feedback: str, reference: str | None = None) -> str:
    """The user turn for rating one judgment (`feedback`: its text, "<rationale> [RESULT] <score>") 1-5."""
    fields = dict(instruction=instruction, response=response, rubric=rubric.render(), feedback=feedback.strip(),
                  meta_rubric=META_RUBRIC.render())
    if _has_reference(reference):
        return META_TEMPLATE.format(reference_section=f"\n###{_H_REFERENCE}:\n{reference}\n", **fields)
    return META_TEMPLATE_NO_REF.format(reference_section="", **fields)


def meta_messages(item: Mapping, judgment_text: str, response_key: str = "response") -> list[dict]:
    """System + user messages asking the meta-judge to rate a judgment of ``item[response_key]``."""
    user = render_meta(instruction_text(item), item[response_key], rubric_from_item(item), judgment_text,
                       reference=item.get("reference"))
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]
