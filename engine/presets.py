"""Presets: how the columns of a known layout become items. Each has a column check and a row converter.

    feedback-collection  orig_instruction, orig_response, orig_reference_answer, orig_criteria,
                         orig_score1_description..orig_score5_description, orig_score, orig_feedback
    prometheus-prompt    a full absolute-grading prompt in `instruction`, parsed back into its parts by
                         `engine.prompts.parse_prometheus_prompt`; gold from gpt4_score (a list -> mean, list kept)
    prometheus-pairwise  chosen_instruction / rejected_instruction (two full prompts) -> one pair, label A
    cia                  input (+ system_prompt), reference_answer, specific_rubric (fallback general_rubric),
                         score_k_response / score_k_feedback -> 5 items with gold scores 1..5
    pairwise             prompt (or instruction) [+ input], chosen, rejected -> label A; or prompt, response_a,
                         response_b, label with label_a / label_b (/ label_tie) naming the raw label values
    (canonical)          instruction [+ input], response, gold_score, reference?, rubric or criteria + 5
                         descriptions; response_b + label (A/B/tie) make it pairwise

`detect` picks one from the columns. Rubrics default to DEFAULT_RUBRIC on pairwise data that has none.
Responses are kept when empty (a judge must be able to rate an empty answer) and numbers / booleans
become text; both are counted in `Ctx` for the import report. An empty instruction is invalid.
"""

from __future__ import annotations

import ast
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.prompts import parse_prometheus_prompt
from engine.sources import HF_SPLIT, SPLIT_ALIASES, ImportFailed
from store.store import RUBRIC_KEYS

PRESETS = ("feedback-collection", "prometheus-prompt", "prometheus-pairwise", "cia", "pairwise")
CANONICAL = "canonical"  # the preset name reported when the source already has canonical columns
DESCRIPTIONS = RUBRIC_KEYS[1:]
META_MAX_CHARS = 500  # leftover text fields longer than this are content, not metadata: left out of meta

# Raw field names each preset reads; with the canonical columns they are the allowed mapping targets.
_FC_FIELDS = ("orig_instruction", "orig_response", "orig_reference_answer", "orig_criteria",
              *(f"orig_{d}" for d in DESCRIPTIONS), "orig_score", "orig_feedback")  # fmt: skip
_CIA_FIELDS = ("input", "system_prompt", "reference_answer", "specific_rubric", "general_rubric",
               *(f"score_{k}_{w}" for k in range(1, 6) for w in ("response", "feedback")))  # fmt: skip
_PROMETHEUS_FIELDS = ("gpt4_score", "gpt4_feedback", "chosen_instruction", "rejected_instruction")
# Item fields a mapping may set, the other columns presets read, and the metadata that drives breakdowns:
# `section` (RewardBench's sections: accuracy per section and their mean) and `subset` (the finer grouping).
BREAKDOWN_KEYS = ("section", "subset", "capability", "task", "id")
ITEM_TARGETS = ("instruction", "input", "response", "response_b", "label", "reference", *RUBRIC_KEYS,
                "gold_score", "gold_scores", "gold_feedback", "split", "meta")  # fmt: skip
MAPPING_TARGETS = frozenset(
    [*ITEM_TARGETS, "prompt", "chosen", "rejected", "response_a", "rubric", *BREAKDOWN_KEYS,
     *_FC_FIELDS, *_CIA_FIELDS, *_PROMETHEUS_FIELDS]
)  # fmt: skip
# Columns of an exported items table that are recomputed on import (never copied into meta).
_RECOMPUTED = frozenset(["item_id", "content_hash", "content_key", "dataset", "kind", "source_row"])


class Bad(Exception):
    """A row (or one item of it) is invalid, for these reasons."""

    def __init__(self, *reasons: str):
        super().__init__("; ".join(reasons))
        self.reasons = list(reasons)


def _norm_newlines(s: str) -> str:
    return s.replace("\r\n", "\n").replace("\r", "\n")


def _empty(v: Any) -> bool:
    return v is None or (isinstance(v, str) and not v.strip()) or (isinstance(v, float) and math.isnan(v))


def _scalar_text(v: Any) -> str:
    """A number or boolean as the text a JSON file spells it (True -> "true", 3 -> "3")."""
    return json.dumps(v) if isinstance(v, bool) else str(v)


def _text(v: Any, name: str) -> str | None:
    """Normalised text (newlines unified, outer whitespace stripped) or None when empty."""
    if _empty(v):
        return None
    if isinstance(v, str):
        return _norm_newlines(v).strip()
    if isinstance(v, (int, float, bool)):
        return _scalar_text(v)
    raise Bad(f"{name} is a {type(v).__name__}, not text")


def _response(rec: dict, key: str, ctx: Ctx, *, chat: bool = False) -> str:
    """A response to judge: kept when empty (an empty answer is a legitimate case) and text when it was a
    number or boolean; both are counted for the import report. Lists / objects are invalid."""
    if key not in rec:
        raise Bad(f"missing {key}")
    v = rec[key]
    if chat:
        v = _messages_text(v, key, last=True) if isinstance(v, list) else v
    if _empty(v):
        ctx.empty_responses += 1
        return ""
    if isinstance(v, (int, float, bool)):
        ctx.non_text_responses += 1
        return _scalar_text(v)
    if not isinstance(v, str):
        raise Bad(f"{key} is a {type(v).__name__}, not text")
    text = _norm_newlines(v).strip()
    if not text:
        ctx.empty_responses += 1
    return text


def _required_text(rec: dict, key: str, name: str | None = None) -> str:
    name = name or key
    if key not in rec:
        raise Bad(f"missing {name}")
    t = _text(rec[key], name)
    if t is None:
        raise Bad(f"{name} is empty")
    return t


def _number(v: Any) -> float:
    if isinstance(v, bool):
        raise ValueError
    if isinstance(v, (int, float)):
        x = float(v)
    elif isinstance(v, str):
        x = float(v.strip())
    else:
        raise ValueError
    if not math.isfinite(x):
        raise ValueError
    return x


def _gold(value: Any, name: str = "gold score") -> tuple[float, str | None]:
    """A gold score, or a list of them (-> mean, and the list as JSON). Raises Bad."""
    if _empty(value):
        raise Bad(f"missing {name}")
    many = value
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            many = json.loads(value)
        except json.JSONDecodeError:
            raise Bad(f"{name} {value!r} is not a number or a JSON list of numbers") from None
    if isinstance(many, (list, tuple)):
        if not many:
            raise Bad(f"{name} is an empty list")
        try:
            scores = [_number(x) for x in many]
        except ValueError:
            raise Bad(f"{name} {_short(value)} has an entry that is not a number") from None
        bad = [x for x in scores if not 1 <= x <= 5]
        if bad:
            raise Bad(f"{name} {_short(value)} has a score outside 1..5")
        as_json = json.dumps([int(x) if x.is_integer() else x for x in scores])
        return sum(scores) / len(scores), as_json
    try:
        score = _number(value)
    except ValueError:
        raise Bad(f"{name} {_short(value)} is not a number") from None
    if not 1 <= score <= 5:
        raise Bad(f"{name} {_short(value)} is outside 1..5")
    return score, None


def _short(v: Any, n: int = 40) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def _rubric_value(v: Any, name: str = "rubric") -> dict:
    """A rubric from a dict, a JSON object string or a Python-dict string. Raises Bad."""
    obj = v
    if isinstance(v, str):
        try:
            obj = json.loads(v)
        except json.JSONDecodeError:
            try:
                obj = ast.literal_eval(v.strip())
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                raise Bad(f"{name} is not a JSON object or a Python dict") from None
    if not isinstance(obj, dict):
        raise Bad(f"{name} is not a JSON object or a Python dict")
    missing = [k for k in RUBRIC_KEYS if _empty(obj.get(k))]
    if missing:
        raise Bad(f"{name} lacks {', '.join(missing)}")
    return {k: _text(obj[k], f"{name} {k}") for k in RUBRIC_KEYS}


def _rubric_columns(rec: dict, prefix: str = "") -> dict:
    missing = [prefix + k for k in RUBRIC_KEYS if _empty(rec.get(prefix + k))]
    if missing:
        raise Bad(f"empty {', '.join(missing)}")
    return {k: _text(rec[prefix + k], prefix + k) for k in RUBRIC_KEYS}


def _row_rubric(rec: dict) -> dict | None:
    """The row's own rubric (a rubric/score_rubric field, or criteria + descriptions), None if it has none."""
    for key in ("rubric", "score_rubric"):
        if not _empty(rec.get(key)):
            return _rubric_value(rec[key], key)
    if any(not _empty(rec.get(k)) for k in RUBRIC_KEYS):
        return _rubric_columns(rec)
    return None


def _messages_text(v: Any, name: str, *, last: bool) -> str | None:
    """Text of a chat-format field: a string, or a list of {role, content} messages (HF preference data).

    last=True gives the final message (the response); last=False renders the whole list (a prompt)."""
    if isinstance(v, list) and v and all(isinstance(m, dict) and "content" in m for m in v):
        if last:
            return _text(v[-1]["content"], name)
        return _render_messages(v, name)
    return _text(v, name)


def _render_messages(msgs: list[dict], name: str) -> str | None:
    if len(msgs) == 1:
        return _text(msgs[0]["content"], name)
    parts = [f"{str(m.get('role', 'user')).capitalize()}: {_text(m['content'], name) or ''}" for m in msgs]
    return "\n\n".join(parts)


def _meta(rec: dict, consumed: set[str] | frozenset[str]) -> dict:
    """Leftover scalar fields (id, capability, task, subset, ...); long text is content, not metadata."""
    meta: dict[str, Any] = {}
    raw = rec.get("meta")
    if isinstance(raw, str) and raw.strip().startswith("{"):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError:
            raw = None
    if isinstance(raw, dict):
        meta.update(raw)
    for k, v in rec.items():
        if k in consumed or k in _RECOMPUTED or k in ("meta", "split") or _empty(v):
            continue
        if k == HF_SPLIT:
            meta["hf_split"] = v
        elif isinstance(v, bool) or isinstance(v, (int, float)) and math.isfinite(v):
            meta[k] = v
        elif isinstance(v, str) and len(v) <= META_MAX_CHARS:
            meta[k] = v
    return meta


# --------------------------------------------------------------------------------------------------
# Presets: a column check and a row converter each
# --------------------------------------------------------------------------------------------------


@dataclass
class Ctx:
    label_a: str | None = None
    label_b: str | None = None
    label_tie: str | None = None
    pair_mode: str = "chosen"  # "chosen" (prompt/chosen/rejected) | "labelled" (response_a/response_b/label)
    empty_slots: list[str] = field(default_factory=list)  # CIA "row 6 score 2" slots without a response
    rubric_fallbacks: list[int] = field(default_factory=list)  # CIA rows that used general_rubric
    empty_responses: int = 0  # kept as "" and counted
    non_text_responses: int = 0  # numbers / booleans turned into text
    _default_rubric: dict | None = None

    def default_rubric(self) -> dict:
        if self._default_rubric is None:
            from engine.prompts import DEFAULT_RUBRIC  # lazy: prompts may import heavier things

            r = DEFAULT_RUBRIC
            self._default_rubric = {"criteria": r.criteria, **dict(zip(DESCRIPTIONS, r.descriptions, strict=True))}
        return self._default_rubric

    def notes(self) -> list[str]:
        out = []
        if self.empty_slots:
            shown = ", ".join(self.empty_slots[:10]) + (" ..." if len(self.empty_slots) > 10 else "")
            out.append(f"{len(self.empty_slots)} empty response slot(s) left out: {shown}")
        if self.rubric_fallbacks:
            out.append(f"{len(self.rubric_fallbacks)} row(s) used general_rubric (specific_rubric unreadable)")
        return out


def _require(columns: list[str], needed: list[str | tuple[str, ...]], preset: str) -> None:
    """Fail at once when a needed column (or every alternative of a tuple) is absent."""
    cols = set(columns)
    missing = [n if isinstance(n, str) else " or ".join(n) for n in needed
               if (n not in cols if isinstance(n, str) else not cols & set(n))]  # fmt: skip
    if missing:
        raise ImportFailed(
            f"{preset}: missing column(s): {', '.join(missing)}. "
            f"Expected: {', '.join(n if isinstance(n, str) else ' or '.join(n) for n in needed)}. "
            f"Found: {', '.join(columns) or '(none)'}"
        )


def _input(rec: dict) -> str | None:
    return _text(rec.get("input"), "input")


def _absolute(instruction, response, reference, rubric, gold, gold_scores, feedback, meta, input_=None) -> dict:
    return {"instruction": instruction, "input": input_, "response": response, "response_b": None, "label": None,
            "reference": reference, **rubric, "gold_score": gold, "gold_scores": gold_scores,
            "gold_feedback": feedback, "meta": meta}  # fmt: skip


def _pair(instruction, response, response_b, label, reference, rubric, meta, input_=None) -> dict:
    return {"instruction": instruction, "input": input_, "response": response, "response_b": response_b, "label": label,
            "reference": reference, **rubric, "gold_score": None, "gold_scores": None,
            "gold_feedback": None, "meta": meta}  # fmt: skip


def _collect(*getters: Callable[[], Any]) -> list[Any]:
    """Run each getter, collecting every Bad reason rather than stopping at the first."""
    values, reasons = [], []
    for g in getters:
        try:
            values.append(g())
        except Bad as bad:
            reasons.extend(bad.reasons)
            values.append(None)
    if reasons:
        raise Bad(*reasons)
    return values


# feedback-collection ------------------------------------------------------------------------------

_FC_REQUIRED = ["orig_instruction", "orig_response", "orig_criteria", *(f"orig_{d}" for d in DESCRIPTIONS),
                "orig_score"]  # fmt: skip


def _fc_check(columns, records, ctx):
    _require(columns, _FC_REQUIRED, "feedback-collection")


def _fc_convert(rec, ctx, row):
    instruction, response, rubric, (gold, golds) = _collect(
        lambda: _required_text(rec, "orig_instruction"),
        lambda: _response(rec, "orig_response", ctx),
        lambda: _rubric_columns(rec, "orig_"),
        lambda: _gold(rec.get("orig_score"), "orig_score"),
    )
    reference = _text(rec.get("orig_reference_answer"), "orig_reference_answer")
    feedback = _text(rec.get("orig_feedback"), "orig_feedback")
    # Feedback-Collection's own `instruction` / `output` are the rendered prompt and target: derived, not meta.
    meta = _meta(rec, {*_FC_FIELDS, "instruction", "output"})
    return [_absolute(instruction, response, reference, rubric, gold, golds, feedback, meta)]


# prometheus-prompt --------------------------------------------------------------------------------


def _pp_check(columns, records, ctx):
    _require(columns, ["instruction", ("gold_score", "gpt4_score")], "prometheus-prompt")


def _pp_convert(rec, ctx, row):
    def parsed():
        prompt = rec.get("instruction")
        if _empty(prompt):
            raise Bad("instruction (the full prompt) is empty")
        try:
            return parse_prometheus_prompt(prompt)
        except ValueError as e:
            raise Bad(f"instruction: {e}") from None

    gold_key = "gold_score" if "gold_score" in rec else "gpt4_score"
    parts, (gold, golds) = _collect(parsed, lambda: _gold(rec.get(gold_key), gold_key))
    fb = rec.get("gold_feedback", rec.get("gpt4_feedback"))
    if isinstance(fb, list):
        fb = fb[0] if fb else None
    rubric = {k: parts[k] for k in RUBRIC_KEYS}
    consumed = {"instruction", "gold_score", "gpt4_score", "gold_scores", "gold_feedback", "gpt4_feedback"}
    return [_absolute(parts["instruction"], parts["response"], parts["reference"], rubric, gold, golds,
                      _text(fb, "gpt4_feedback"), _meta(rec, consumed))]  # fmt: skip


# prometheus-pairwise ------------------------------------------------------------------------------


def _ppair_check(columns, records, ctx):
    _require(columns, ["chosen_instruction", "rejected_instruction"], "prometheus-pairwise")


def _ppair_convert(rec, ctx, row):
    def parsed(key):
        if _empty(rec.get(key)):
            raise Bad(f"{key} is empty")
        try:
            return parse_prometheus_prompt(rec[key])
        except ValueError as e:
            raise Bad(f"{key}: {e}") from None

    chosen, rejected = _collect(lambda: parsed("chosen_instruction"), lambda: parsed("rejected_instruction"))
    if chosen["instruction"] != rejected["instruction"]:
        raise Bad("chosen_instruction and rejected_instruction evaluate different instructions")
    rubric = {k: chosen[k] for k in RUBRIC_KEYS}
    meta = _meta(rec, {"chosen_instruction", "rejected_instruction"})
    return [_pair(chosen["instruction"], chosen["response"], rejected["response"], "A", chosen["reference"],
                  rubric, meta)]  # fmt: skip


# cia ----------------------------------------------------------------------------------------------


def _cia_check(columns, records, ctx):
    needed = ["input", *(f"score_{k}_response" for k in range(1, 6)), ("specific_rubric", "general_rubric")]
    _require(columns, needed, "cia")


def _cia_rubric(rec, ctx, row) -> dict:
    reasons = []
    for i, key in enumerate(("specific_rubric", "general_rubric")):
        if _empty(rec.get(key)):
            reasons.append(f"{key} is empty")
            continue
        try:
            rubric = _rubric_value(rec[key], key)
        except Bad as bad:
            reasons.extend(bad.reasons)
            continue
        if i == 1:
            ctx.rubric_fallbacks.append(row)
        return rubric
    raise Bad("unparseable rubric: " + "; ".join(reasons))


def _cia_convert(rec, ctx, row):
    def instruction():
        text = _required_text(rec, "input")
        system = _text(rec.get("system_prompt"), "system_prompt")
        return f"{system}\n\n{text}" if system else text

    instr, rubric = _collect(instruction, lambda: _cia_rubric(rec, ctx, row))
    reference = _text(rec.get("reference_answer"), "reference_answer")
    # id, capability and task are always there (null when the cell is empty) so reports can group by them.
    meta = {"id": None, "capability": None, "task": None, **_meta(rec, set(_CIA_FIELDS))}
    items = []
    for k in range(1, 6):
        response = _text(rec.get(f"score_{k}_response"), f"score_{k}_response")
        if response is None:  # a hole in the source (some CIA prompts lack a response for a score)
            ctx.empty_slots.append(f"row {row} score {k}")
            continue
        feedback = _text(rec.get(f"score_{k}_feedback"), f"score_{k}_feedback")
        items.append(_absolute(instr, response, reference, rubric, float(k), None, feedback, meta))
    return items  # may be empty: a prompt whose five responses are all missing (biggen row 190)


# pairwise -----------------------------------------------------------------------------------------

_PAIR_CONSUMED = {"prompt", "instruction", "input", "chosen", "rejected", "response_a", "response", "response_b",
                  "label", "reference", "rubric", "score_rubric", *RUBRIC_KEYS}  # fmt: skip


def _raw_labels(records, key="label", n=10) -> str:
    seen: dict[str, None] = {}
    for _, rec in records:
        if not _empty(rec.get(key)):
            seen.setdefault(repr(str(rec[key]).strip()), None)
        if len(seen) >= n:
            break
    return ", ".join(seen) or "(none)"


def _pairwise_check(columns, records, ctx):
    cols = set(columns)
    if "response_a" in cols:
        ctx.pair_mode = "labelled"
        _require(columns, [("prompt", "instruction"), "response_a", "response_b", "label"], "pairwise")
        if ctx.label_a is None or ctx.label_b is None:
            raise ImportFailed(
                "pairwise data with response_a/response_b/label needs label_a and label_b (--label-a/--label-b) "
                f"naming the raw label values for 'A wins' and 'B wins' (and label_tie for ties); "
                f"label values found: {_raw_labels(records)}"
            )
        return
    ctx.pair_mode = "chosen"
    first = next((r.get("chosen") for _, r in records if r.get("chosen") is not None), None)
    chat = isinstance(first, list)  # chat-format chosen/rejected carry their own prompt
    _require(columns, ["chosen", "rejected"] + ([] if chat else [("prompt", "instruction")]), "pairwise")


def _map_label(raw: Any, ctx: Ctx, canonical_ok: bool) -> str:
    if _empty(raw):
        raise Bad("missing label")
    value = str(raw).strip()
    if ctx.label_a is not None and ctx.label_b is not None:
        table = {str(ctx.label_a).strip(): "A", str(ctx.label_b).strip(): "B"}
        if ctx.label_tie is not None:
            table[str(ctx.label_tie).strip()] = "tie"
        if value in table:
            return table[value]
        allowed = f"label_a={ctx.label_a!r}, label_b={ctx.label_b!r}" + (
            f", label_tie={ctx.label_tie!r}" if ctx.label_tie is not None else ""
        )
        raise Bad(f"label {value!r} is not one of {allowed}")
    if canonical_ok and value.lower() in ("a", "b", "tie"):
        return "tie" if value.lower() == "tie" else value.upper()
    raise Bad(f"label {value!r} is not A, B or tie (give label_a/label_b to map raw values)")


def _pairwise_convert(rec, ctx, row):
    prompt_key = "prompt" if "prompt" in rec else "instruction"

    def instruction():
        if not _empty(rec.get(prompt_key)):
            return _messages_text(rec[prompt_key], prompt_key, last=False)
        chosen = rec.get("chosen")
        if isinstance(chosen, list) and len(chosen) > 1 and all(isinstance(m, dict) for m in chosen):
            return _render_messages(chosen[:-1], "chosen")  # the conversation before the final answer
        raise Bad(f"{prompt_key} is empty")

    def side(key):
        return _response(rec, key, ctx, chat=True)

    if ctx.pair_mode == "labelled":
        instr, a, b, label, rubric = _collect(
            instruction, lambda: side("response_a"), lambda: side("response_b"),
            lambda: _map_label(rec.get("label"), ctx, canonical_ok=False), lambda: _row_rubric(rec),
        )  # fmt: skip
    else:
        instr, a, b, rubric = _collect(instruction, lambda: side("chosen"), lambda: side("rejected"),
                                       lambda: _row_rubric(rec))  # fmt: skip
        label = "A"
    reference = _text(rec.get("reference"), "reference")
    return [_pair(instr, a, b, label, reference, rubric or ctx.default_rubric(), _meta(rec, _PAIR_CONSUMED),
                  _input(rec))]


# canonical ----------------------------------------------------------------------------------------

_CANON_CONSUMED = {"instruction", "input", "response", "response_b", "label", "reference", "rubric", "score_rubric",
                   *RUBRIC_KEYS, "gold_score", "gold_scores", "gold_feedback"}  # fmt: skip


def _canonical_check(columns, records, ctx):
    cols = set(columns)
    if "response_b" in cols:
        _require(columns, ["instruction", "response", "response_b", "label"], "canonical pairwise columns")
        return
    rubric = [("rubric", "score_rubric", "criteria")]
    if "rubric" not in cols and "score_rubric" not in cols and "criteria" in cols:
        rubric = ["criteria", *DESCRIPTIONS]
    _require(columns, ["instruction", "response", ("gold_score", "gold_scores"), *rubric],
             "canonical columns (no preset matched)")


def _canonical_convert(rec, ctx, row):
    instr_get = lambda: _required_text(rec, "instruction")  # noqa: E731
    resp_get = lambda: _response(rec, "response", ctx)  # noqa: E731
    if "response_b" in rec:
        instr, a, b, label, rubric = _collect(
            instr_get, resp_get, lambda: _response(rec, "response_b", ctx),
            lambda: _map_label(rec.get("label"), ctx, canonical_ok=True), lambda: _row_rubric(rec),
        )  # fmt: skip
        return [_pair(instr, a, b, label, _text(rec.get("reference"), "reference"), rubric or ctx.default_rubric(),
                      _meta(rec, _CANON_CONSUMED), _input(rec))]  # fmt: skip

    def gold():
        if not _empty(rec.get("gold_score")):
            score, _ = _gold(rec["gold_score"], "gold score")
            golds = None
            if not _empty(rec.get("gold_scores")):
                _, golds = _gold(rec["gold_scores"], "gold_scores")
            return score, golds
        return _gold(rec.get("gold_scores") if "gold_scores" in rec else None, "gold score")

    def rubric():
        r = _row_rubric(rec)
        if r is None:
            raise Bad("missing rubric (rubric, or criteria and score1..5_description)")
        return r

    instr, resp, (score, golds), rub = _collect(instr_get, resp_get, gold, rubric)
    return [_absolute(instr, resp, _text(rec.get("reference"), "reference"), rub, score, golds,
                      _text(rec.get("gold_feedback"), "gold_feedback"), _meta(rec, _CANON_CONSUMED),
                      _input(rec))]  # fmt: skip


@dataclass(frozen=True)
class PresetSpec:
    kind: str | None  # None: decided by the columns (canonical)
    check: Callable[[list[str], list[tuple[int, dict]], Ctx], None]
    convert: Callable[[dict, Ctx, int], list[dict]]


PRESET_SPECS: dict[str, PresetSpec] = {
    "feedback-collection": PresetSpec("absolute", _fc_check, _fc_convert),
    "prometheus-prompt": PresetSpec("absolute", _pp_check, _pp_convert),
    "prometheus-pairwise": PresetSpec("pairwise", _ppair_check, _ppair_convert),
    "cia": PresetSpec("absolute", _cia_check, _cia_convert),
    "pairwise": PresetSpec("pairwise", _pairwise_check, _pairwise_convert),
    CANONICAL: PresetSpec(None, _canonical_check, _canonical_convert),
}


def columns_of(records: list[tuple[int, dict]]) -> list[str]:
    seen: dict[str, None] = {}
    for _, rec in records:
        for k in rec:
            if k != HF_SPLIT:
                seen.setdefault(k, None)
    return list(seen)


def detect(columns: list[str], records: list[tuple[int, dict]]) -> str:
    cols = set(columns)
    if "orig_instruction" in cols:
        return "feedback-collection"
    if "score_1_response" in cols:
        return "cia"
    if "chosen_instruction" in cols:
        return "prometheus-pairwise"
    if {"chosen", "rejected"} <= cols or {"response_a", "response_b"} <= cols:
        return "pairwise"
    if "instruction" in cols and "response" not in cols:
        first = next((r.get("instruction") for _, r in records if isinstance(r.get("instruction"), str)), "")
        if "###The instruction to evaluate:" in first and "###Score Rubrics:" in first:
            return "prometheus-prompt"
    return CANONICAL


def split_arg(split: str | None) -> str | None:
    if split is None:
        return None
    norm = SPLIT_ALIASES.get(str(split).strip().lower())
    if norm is None:
        raise ImportFailed(f"split {split!r}: expected train or eval (test/validation mean eval)")
    return norm


def row_split(rec: dict, override: str | None) -> str:
    if override is not None:
        return override
    hf = rec.get(HF_SPLIT)
    if hf is not None:
        return SPLIT_ALIASES.get(str(hf).lower(), "train")
    raw = rec.get("split")
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return "train"
    norm = SPLIT_ALIASES.get(str(raw).strip().lower())
    if norm is None:
        raise Bad(f"split {raw!r} is not train/eval/test/validation")
    return norm
