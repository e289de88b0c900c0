"""Reading a judge's output back into (rationale, score): ``parse_judgment(text) -> Judgment``.

The score is read only from the END of the text. A judgment quotes the rubric ("Score 1: ...") and argues
about numbers ("this would score 4 because..."); a search that is not anchored at the end picks those up
(prometheus-eval issue #58: every output parsed as 5). So the tail is cleaned of whitespace, closing
punctuation and end-of-turn tokens, and then one verbose regex, anchored with ``\\Z``, must match it.

A failure is a status, never a number: ``score`` is None unless ``status`` is ``ParseStatus.OK``, and the
raw text is always kept for inspection.

    >>> parse_judgment("Clear and correct, but terse. [RESULT] 4").score
    4
    >>> parse_judgment("Score 1: poor ... Score 5: excellent").status
    <ParseStatus.NO_SCORE: 'no_score'>
    >>> parse_judgment("A is better. [RESULT] A", mode="relative").score
    'A'
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Literal


class ParseStatus(str, Enum):
    OK = "ok"
    NO_SCORE = "no_score"  # no score form at the end, or a marker followed by something unreadable
    OUT_OF_RANGE = "out_of_range"  # a score form holding a value off the scale: 0, 7, 4.5, 9/10, "C"
    TRUNCATED = "truncated"  # the generator hit its token budget before a valid score
    AMBIGUOUS = "ambiguous"  # the final score form holds two different values: "3 or 4", "A or B"


@dataclass(frozen=True)
class Judgment:
    raw: str  # the text as given, untouched
    rationale: str  # text before the score form, stripped (the whole text stripped when there is none)
    score: int | str | None  # 1..5 (absolute) or "A"/"B" (relative); None unless status is OK
    status: ParseStatus


# Only this many trailing characters are searched: every score form is short, and a bounded window keeps
# parsing linear-time on pathological inputs (megabytes of text, long runs of markers).
_TAIL_WINDOW = 2000

# Trailing junk that may follow the score: closing punctuation, markdown emphasis, quotes, and end-of-turn
# tokens a sampler did not skip (<|im_end|>, <|eot_id|>, </s>, <eos>, <end_of_turn>). "?" is kept on
# purpose: "[RESULT] 4?" is a question, not a score.
_TRAILING_CHARS = frozenset(".!*_)]}\"'`\u201d\u2019")
_END_TOKEN = re.compile(
    r"""
    (?:
        <\|[^<>|\s]{1,40}\|>        # <|im_end|>, <|eot_id|>, <|endoftext|>, <|end|>
      | </s> | <eos> | <end_of_turn>
    )
    \Z
    """,
    re.VERBOSE,
)

# What may sit between a marker and its value: spaces, newlines, colons, "=", markdown emphasis.
_GAP = r"[\s*_:=]*"
# Opening bracket or quote directly before a value: "(4", "[4", '"A'. Closers were stripped with the junk.
_OPEN = r"""(?:[(\["'\u201c][\s*_]*)?"""

# Words that announce a score only when a separator follows ("Score: 4", "score of 4", "score is 4"), so
# a rubric line cut short ("... Score 4") or a phrase like "scores 4" is not read as a verdict.
_WORD_MARKER = r"""
    (?<![A-Za-z])                           # a whole word: not the tail of "overscore"
    (?:(?:final|overall|total)\s+)?         # optional qualifier: "Final score", "overall score"
    (?:result|score|rating|grade)           # the marker word (case-insensitive)
    (?:
        [\s*_]*[:=]                         # "Score:", "**Score:**", "Score ="
      | \s+(?:is|of|would\s+be)(?![A-Za-z]) # "score is", "score of", "score would be"
    )
"""

# "[RESULT]" / "[SCORE]", the trained marker; no separator needed after it.
_BRACKET_MARKER = r"""\[\s*(?:result|score)\s*\]"""

_ABSOLUTE = re.compile(
    rf"""
    (?:
        [*_]*                                   # markdown emphasis opening the marker: "**Score:** 4"
        (?:{_BRACKET_MARKER}|{_WORD_MARKER})    # a score marker ...
        {_GAP}
        (?:(?:score|rating)\s*:?\s*)?           # ... tolerating "[RESULT] Score: 4"
        {_OPEN}
        (?P<values>                             # one value, or several joined ("3 or 4", "3-4")
            -?[0-9]+(?:\.[0-9]+)?               # first value; sign and decimals are kept to reject them
            (?:
                \s*(?:or|and|to|-|\u2013|\u2014|,|\|)\s*   # joiner: or, and, to, dashes, comma, pipe
                -?[0-9]+(?:\.[0-9]+)?
            )*
        )
        [\s*_]*[)\]]?                           # closing bracket before a denominator: "(4)/5"
        (?:[ \t]*(?:/|out[ \t]+of)[ \t]*(?P<denom>[0-9]+))?   # optional scale: "4/5", "4 out of 5"
      |
        # A bare fraction with no marker ("... Overall: 4/5" is caught above; "... so 4/5"). Only a 5- or
        # 10-point scale counts, so a closing fraction like "3/4 of the steps" is not taken for a score.
        (?<![0-9A-Za-z.\-/])
        (?P<bare>-?[0-9]+(?:\.[0-9]+)?)
        [ \t]*(?:/|out[ \t]+of)[ \t]*
        (?P<bare_denom>5|10)
    )
    \Z
    """,
    re.VERBOSE | re.IGNORECASE,
)

_RELATIVE = re.compile(
    rf"""
    [*_]*                                                   # markdown emphasis: "**Result:** A"
    (?:
        {_BRACKET_MARKER}                                   # "[RESULT]"
      | (?<![A-Za-z])
        (?:result|winner|verdict|(?:better|preferred)\s+response)
        (?:[\s*_]*[:=]|\s+is(?![A-Za-z]))                   # "Result:", "better response is"
    )
    {_GAP}
    (?:(?:response|output)\s+)?                             # "[RESULT] Response A"
    {_OPEN}
    (?P<values>
        (?-i:[A-Z])(?![A-Za-z])|[0-9]+                      # one capital letter ("A", not "a" or "Both") or a number
    )
    (?:
        \s*(?:or|and|/|,|-|\|)\s*                           # joiner: "A or B", "A/B"
        (?P<second>(?-i:[A-Z])(?![A-Za-z])|[0-9]+)
    )?
    \Z
    """,
    re.VERBOSE | re.IGNORECASE,
)

_JOINER = re.compile(r"\s*(?:or|and|to|-|\u2013|\u2014|,|\|)\s*", re.IGNORECASE)


def _clean_end(text: str) -> int:
    """Where the text ends once trailing whitespace, closing punctuation and end-of-turn tokens are cut."""
    # Works on an index, never on copies, so megabytes of trailing junk stay linear.
    end = len(text)
    while end > 0:
        ch = text[end - 1]
        if ch.isspace() or ch in _TRAILING_CHARS:
            end -= 1
            continue
        m = _END_TOKEN.search(text, max(0, end - 64), end)
        if m is None:
            break
        end = m.start()
    return end


def _split_values(values: str) -> list[str]:
    # The regex already guarantees the shape "v (joiner v)*"; split on the joiners, keeping signs:
    # "-1" stays one value, while "3-4" is two.
    parts = []
    pos = 0
    for m in _JOINER.finditer(values):
        if m.start() == pos:
            continue  # a leading "-" is a sign, not a joiner
        parts.append(values[pos : m.start()])
        pos = m.end()
    parts.append(values[pos:])
    return [p for p in parts if p]


def _absolute_value(value: str) -> int | None:
    """The integer score in 1..5, or None (decimal, sign, zero, off the scale)."""
    if not value.isdigit() or len(value) > 1:
        return None  # "4.5", "-1", "10", "0005"; checking the string avoids int() on huge digit runs
    n = int(value)
    return n if 1 <= n <= 5 else None


def _parse_absolute(text: str, pos: int, end: int) -> tuple[int | None, ParseStatus, int]:
    m = _ABSOLUTE.search(text, pos, end)
    if m is None:
        return None, ParseStatus.NO_SCORE, end
    if m.group("bare") is not None:
        values, denom = [m.group("bare")], m.group("bare_denom")
    else:
        values, denom = _split_values(m.group("values")), m.group("denom")
    if len(set(values)) > 1:
        return None, ParseStatus.AMBIGUOUS, m.start()
    score = _absolute_value(values[0])
    if score is None or (denom is not None and denom != "5"):
        return None, ParseStatus.OUT_OF_RANGE, m.start()
    return score, ParseStatus.OK, m.start()


def _parse_relative(text: str, pos: int, end: int) -> tuple[str | None, ParseStatus, int]:
    m = _RELATIVE.search(text, pos, end)
    if m is None:
        return None, ParseStatus.NO_SCORE, end
    first, second = m.group("values"), m.group("second")
    if second is not None and second != first:
        return None, ParseStatus.AMBIGUOUS, m.start()
    if first not in ("A", "B"):
        return None, ParseStatus.OUT_OF_RANGE, m.start()
    return first, ParseStatus.OK, m.start()


def parse_judgment(
    text: str, *, truncated: bool = False, mode: Literal["absolute", "relative"] = "absolute"
) -> Judgment:
    """Split a judge output into rationale and final score; never raises for a str input.

    ``truncated``: the generator stopped at its token budget; a text without a valid score is then
    reported as TRUNCATED (raise max_tokens) rather than NO_SCORE / OUT_OF_RANGE / AMBIGUOUS.
    ``mode``: "absolute" reads an integer 1..5, "relative" reads "A" or "B".
    """
    if mode not in ("absolute", "relative"):
        raise ValueError(f"mode must be 'absolute' or 'relative', got {mode!r}")
    end = _clean_end(text)
    # pos/endpos search the window in place: lookbehinds still see the text before the window, and \Z
    # matches at endpos.
    pos = max(0, end - _TAIL_WINDOW)
    parse = _parse_absolute if mode == "absolute" else _parse_relative
    score, status, start = parse(text, pos, end)
    rationale = text.strip() if status is ParseStatus.NO_SCORE else text[:start].strip()
    if status is not ParseStatus.OK and truncated:
        status = ParseStatus.TRUNCATED
    return Judgment(raw=text, rationale=rationale, score=score, status=status)
