"""Import judge-evaluation data into canonical items (one Polars frame, `ITEM_COLUMNS`).

    >>> res = read_items("../shared/data/cia/scored_responses_testset_biggen.tsv", dataset="cia-biggen")
    >>> res.kind, res.preset, res.items.height          # 250 prompts x 5 graded responses, less empty slots
    ('absolute', 'cia', 1242)

Sources, chosen by what `source` is:
  *.jsonl / *.ndjson  read line by line, so a bad line is reported with its line number
  *.json              a list of records, or a dict of records keyed by id (BiGGen-Bench's layout)
  *.csv / *.tsv       Polars, every column read as text ('"' quoting, as the CIA files need)
  *.parquet           Polars
  a directory         `datasets.load_from_disk` (a Dataset or a DatasetDict)
  "org/name"          `datasets.load_dataset` (when no such path exists; the network may refuse)

Presets (`PRESETS`; None = detect from the columns) turn source records into items:
  feedback-collection  orig_instruction, orig_response, orig_reference_answer, orig_criteria,
                       orig_score1_description..orig_score5_description, orig_score, orig_feedback
  prometheus-prompt    a full absolute-grading prompt in `instruction`, parsed back into its parts by
                       `parse_prometheus_prompt`; gold from gpt4_score (a list -> mean, list kept)
  prometheus-pairwise  chosen_instruction / rejected_instruction (two full prompts) -> one pair, label A
  cia                  input (+ system_prompt), reference_answer, specific_rubric (fallback general_rubric),
                       score_k_response / score_k_feedback -> 5 items with gold scores 1..5
  pairwise             prompt, chosen, rejected -> label A; or prompt, response_a, response_b, label with
                       label_a / label_b (/ label_tie) naming the raw label values; rubric = DEFAULT_RUBRIC
  (canonical)          instruction, response, gold_score, reference?, rubric or criteria + 5 descriptions;
                       response_b + label (A/B/tie) make it pairwise

`mapping` renames columns first (TARGET=SOURCE, e.g. {"instruction": "question"}). Every row is checked
and all problems are collected: with any bad row nothing is imported (`ImportFailed` lists them) unless
`skip_invalid`, which returns the good rows and the skipped list. Missing columns fail at once.

Identity: `content_hash` = sha256 of the normalised content (instruction, response, response_b, label,
reference, rubric, gold score), `item_id` = the first 60 bits of sha256(dataset + NUL + content_hash), as an integer. The same content
twice in one source keeps the first row (a note, not an error), and re-importing a file gives the same ids
(the store inserts with INSERT OR IGNORE on item_id).
"""

from __future__ import annotations

import ast
import hashlib
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

ITEM_COLUMNS: list[str] = [
    "item_id", "content_hash", "dataset", "split", "kind",
    "instruction", "response", "response_b", "label", "reference",
    "criteria", "score1_description", "score2_description", "score3_description",
    "score4_description", "score5_description",
    "gold_score", "gold_scores", "gold_feedback", "source_row", "meta",
]  # fmt: skip
ITEM_SCHEMA: dict[str, pl.DataType] = {
    c: (pl.Float64 if c == "gold_score" else pl.Int64 if c in ("source_row", "item_id") else pl.Utf8) for c in ITEM_COLUMNS
}
PRESETS = ("feedback-collection", "prometheus-prompt", "prometheus-pairwise", "cia", "pairwise")
CANONICAL = "canonical"  # the preset name reported when the source already has canonical columns

DESCRIPTIONS = tuple(f"score{k}_description" for k in range(1, 6))
RUBRIC_KEYS = ("criteria", *DESCRIPTIONS)
# Fields the content hash covers, in this order (never the dataset name, split, feedback or meta).
HASH_FIELDS = ("instruction", "response", "response_b", "label", "reference", *RUBRIC_KEYS, "gold_score")

MAX_ERRORS_SHOWN = 20  # rows listed in an ImportFailed message
META_MAX_CHARS = 500  # leftover text fields longer than this are content, not metadata: left out of meta
SPLIT_ALIASES = {"train": "train", "eval": "eval", "test": "eval", "validation": "eval", "valid": "eval",
                 "val": "eval", "dev": "eval"}  # fmt: skip
HF_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")

# Raw field names each preset reads; with the canonical columns they are the allowed mapping targets.
_FC_FIELDS = ("orig_instruction", "orig_response", "orig_reference_answer", "orig_criteria",
              *(f"orig_{d}" for d in DESCRIPTIONS), "orig_score", "orig_feedback")  # fmt: skip
_CIA_FIELDS = ("input", "system_prompt", "reference_answer", "specific_rubric", "general_rubric",
               *(f"score_{k}_{w}" for k in range(1, 6) for w in ("response", "feedback")))  # fmt: skip
_PROMETHEUS_FIELDS = ("gpt4_score", "gpt4_feedback", "chosen_instruction", "rejected_instruction")
MAPPING_TARGETS = frozenset(
    [c for c in ITEM_COLUMNS if c not in ("item_id", "content_hash", "dataset", "kind", "source_row")]
    + ["prompt", "chosen", "rejected", "response_a", "rubric", "gold_scores", "split"]
    + [*_FC_FIELDS, *_CIA_FIELDS, *_PROMETHEUS_FIELDS]
)
# Columns of an exported items table that are recomputed on import (never copied into meta).
_RECOMPUTED = frozenset(["item_id", "content_hash", "dataset", "kind", "source_row"])


@dataclass
class RowError:
    """One bad source row: `row` is the 1-based data row (the line number for JSONL)."""

    row: int
    reason: str

    def __str__(self) -> str:
        return f"row {self.row}: {self.reason}"


class ImportFailed(ValueError):
    """Nothing was imported. `errors` holds the bad rows (empty for file-level problems)."""

    def __init__(self, message: str, errors: list[RowError] | None = None):
        super().__init__(message)
        self.errors: list[RowError] = list(errors or [])


@dataclass
class ImportResult:
    items: pl.DataFrame  # ITEM_COLUMNS, in source order
    skipped: list[RowError]  # rows left out (only with skip_invalid)
    source_rows: int  # data rows in the source (JSONL: non-blank lines)
    kind: str  # "absolute" | "pairwise"
    preset: str = CANONICAL  # the preset used (detected when none was given)
    notes: list[str] = field(default_factory=list)  # not errors: duplicates dropped, empty CIA slots, ...


class _Bad(Exception):
    """Internal: a row (or one item of it) is invalid, for these reasons."""

    def __init__(self, *reasons: str):
        super().__init__("; ".join(reasons))
        self.reasons = list(reasons)


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def read_items(
    source: str,
    *,
    dataset: str,
    preset: str | None = None,
    mapping: Mapping[str, str] | None = None,
    split: str | None = None,
    label_a: str | None = None,
    label_b: str | None = None,
    label_tie: str | None = None,
    skip_invalid: bool = False,
) -> ImportResult:
    """Read `source` into canonical items for `dataset`.

    preset: one of PRESETS; None detects it from the columns (canonical columns when nothing matches).
    mapping: TARGET=SOURCE column renames applied before the preset (None = none).
    split: "train" or "eval" (test/validation mean eval) for every item; None = the source's `split`
        column or Hugging Face split names, else "train". For a DatasetDict it selects the splits that map
        to it when there are any.
    label_a / label_b / label_tie: the raw label values meaning "A wins", "B wins", "tie" (pairwise data
        with response_a / response_b / label columns; both of label_a and label_b are needed there).
    skip_invalid: False = any bad row fails the import; True = import the good rows, list the rest.
    """
    if not isinstance(dataset, str) or not dataset.strip():
        raise ImportFailed("dataset name is empty")
    if preset is not None and preset not in PRESETS:
        raise ImportFailed(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    split_override = _split_arg(split)
    mapping = _check_mapping(mapping)

    src = _read_source(str(source), split_override)
    if src.rows == 0:
        raise ImportFailed(f"{source}: no data rows")
    records = _apply_mapping(src, mapping)
    columns = _columns(records)

    used = preset or _detect(columns, records)
    ctx = _Ctx(label_a=label_a, label_b=label_b, label_tie=label_tie)
    spec = _PRESET_SPECS[used]
    spec.check(columns, records, ctx)

    errors = list(src.errors)
    items: list[dict] = []
    for row, rec in records:
        try:
            row_split, partials = _collect(lambda: _row_split(rec, split_override), lambda: spec.convert(rec, ctx, row))
            items.extend(_finish_row(partials, rec, row, dataset, row_split))
        except _Bad as bad:
            errors.append(RowError(row, "; ".join(bad.reasons)))
    errors.sort(key=lambda e: e.row)

    if errors and not skip_invalid:
        raise ImportFailed(_failure_message(str(source), errors, src.rows), errors)
    if not items:
        raise ImportFailed(_failure_message(str(source), errors, src.rows, all_bad=True), errors)

    unique: dict[str, dict] = {}
    for it in items:
        unique.setdefault(it["item_id"], it)
    notes = list(src.notes) + ctx.notes()
    if len(unique) < len(items):
        notes.append(f"{len(items) - len(unique)} duplicate item(s) dropped (same content as an earlier row)")
    frame = pl.DataFrame(list(unique.values()), schema=ITEM_SCHEMA)
    return ImportResult(
        items=frame.select(ITEM_COLUMNS),
        skipped=errors,
        source_rows=src.rows,
        kind=spec.kind or ("pairwise" if "response_b" in columns else "absolute"),
        preset=used,
        notes=notes,
    )


def parse_prometheus_prompt(text: str) -> dict:
    """Split a Prometheus absolute-grading prompt back into its parts.

    Returns instruction, response, reference (None without a "###Reference Answer (Score 5):" section),
    criteria and score1_description..score5_description. Raises ValueError naming a missing section.
    The later markers are searched from the end, because the template puts them last and a response may
    quote earlier text.
    """
    if not isinstance(text, str):
        raise ValueError("prompt is not text")
    text = _norm_newlines(text)
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


def parse_mapping(pairs: list[str] | tuple[str, ...]) -> dict[str, str]:
    """Turn CLI `--map TARGET=SOURCE` strings into a mapping (ValueError on a malformed pair)."""
    out: dict[str, str] = {}
    for pair in pairs:
        target, sep, src = pair.partition("=")
        if not sep or not target.strip() or not src.strip():
            raise ValueError(f"--map {pair!r}: expected TARGET=SOURCE, e.g. instruction=question")
        out[target.strip()] = src.strip()
    return out


# --------------------------------------------------------------------------------------------------
# The Prometheus prompt layout
# --------------------------------------------------------------------------------------------------

_P_INSTRUCTION = "###The instruction to evaluate:"
_P_RESPONSE = "###Response to evaluate:"
_P_REFERENCE = "###Reference Answer (Score 5):"
_P_RUBRIC = "###Score Rubrics:"
_P_FEEDBACK = "###Feedback:"
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


# --------------------------------------------------------------------------------------------------
# Reading sources into (row number, record) pairs
# --------------------------------------------------------------------------------------------------


@dataclass
class _Source:
    records: list[tuple[int, dict]]
    errors: list[RowError]  # unreadable rows (bad JSON lines)
    rows: int  # data rows seen, readable or not
    notes: list[str] = field(default_factory=list)


_HF_SPLIT = "__hf_split__"  # record key carrying a Hugging Face split name (into meta as hf_split)


def _read_source(source: str, split_override: str | None) -> _Source:
    path = Path(source)
    if path.is_dir():
        return _read_hf(source, split_override, from_disk=True)
    if path.is_file():
        ext = path.name.lower().rsplit(".", 1)[-1] if "." in path.name else ""
        readers: dict[str, Callable[[Path], _Source]] = {
            "jsonl": _read_jsonl, "ndjson": _read_jsonl, "json": _read_json,
            "csv": lambda p: _read_delimited(p, ","), "tsv": lambda p: _read_delimited(p, "\t"),
            "parquet": _read_parquet,
        }  # fmt: skip
        if ext not in readers:
            raise ImportFailed(
                f"{source}: unsupported file type {('.' + ext) if ext else '(no extension)'}; "
                "expected .jsonl, .json, .csv, .tsv, .parquet, a saved datasets directory or org/name"
            )
        return readers[ext](path)
    if HF_NAME.match(source):
        return _read_hf(source, split_override, from_disk=False)
    raise ImportFailed(f"{source}: no such file or directory (and not a Hugging Face 'org/name')")


def _read_jsonl(path: Path) -> _Source:
    records, errors, rows = [], [], 0
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            rows += 1
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                errors.append(RowError(lineno, f"bad JSON line: {e.msg} (column {e.colno})"))
                continue
            if not isinstance(rec, dict):
                errors.append(RowError(lineno, f"line is a JSON {type(rec).__name__}, not an object"))
                continue
            records.append((lineno, rec))
    return _Source(records, errors, rows)


def _read_json(path: Path) -> _Source:
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several JSON values: JSON lines under a .json name
            return _read_jsonl(path)
        raise ImportFailed(f"{path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    if isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
        # A dict of records keyed by id (BiGGen-Bench): the key becomes `id` when the record has none.
        data = [{"id": k, **v} if "id" not in v else v for k, v in data.items()]
    if not isinstance(data, list):
        raise ImportFailed(f"{path}: expected a JSON list of records or a dict of records keyed by id")
    records, errors = [], []
    for i, rec in enumerate(data, start=1):
        if isinstance(rec, dict):
            records.append((i, rec))
        else:
            errors.append(RowError(i, f"record is a JSON {type(rec).__name__}, not an object"))
    return _Source(records, errors, len(data))


def _read_delimited(path: Path, separator: str) -> _Source:
    try:
        # All columns as text; '"' quoting (CIA cells hold tabs, newlines and quotes); empty cells -> null.
        df = pl.read_csv(path, separator=separator, infer_schema=False, quote_char='"', encoding="utf8")
    except Exception as e:  # polars raises several error types for malformed files
        fmt = "TSV" if separator == "\t" else "CSV"
        raise ImportFailed(f"{path}: could not read as {fmt}: {e}") from None
    return _Source([(i, rec) for i, rec in enumerate(df.iter_rows(named=True), start=1)], [], df.height)


def _read_parquet(path: Path) -> _Source:
    try:
        df = pl.read_parquet(path)
    except Exception as e:
        raise ImportFailed(f"{path}: could not read as Parquet: {e}") from None
    return _Source([(i, rec) for i, rec in enumerate(df.iter_rows(named=True), start=1)], [], df.height)


def _read_hf(source: str, split_override: str | None, *, from_disk: bool) -> _Source:
    import datasets  # heavy: only for directories and hub names

    try:
        ds = datasets.load_from_disk(source) if from_disk else datasets.load_dataset(source)
    except Exception as e:
        how = "datasets.load_from_disk" if from_disk else "datasets.load_dataset (network or cache)"
        raise ImportFailed(f"{source}: could not load with {how}: {type(e).__name__}: {e}") from None
    parts = dict(ds.items()) if isinstance(ds, datasets.DatasetDict) else {"train": ds}
    notes = []
    if split_override is not None:
        chosen = {n: d for n, d in parts.items() if SPLIT_ALIASES.get(n.lower()) == split_override}
        parts = chosen or parts  # no split maps to it: take all, labelled with the override
    records, row = [], 0
    for name, d in parts.items():
        if split_override is None and name.lower() not in SPLIT_ALIASES:
            notes.append(f"Hugging Face split {name!r} has no train/eval meaning: imported as train")
        for rec in d.to_list():
            row += 1
            records.append((row, {**rec, _HF_SPLIT: name}))
    return _Source(records, [], row, notes)


# --------------------------------------------------------------------------------------------------
# Columns, mapping, detection, split
# --------------------------------------------------------------------------------------------------


def _columns(records: list[tuple[int, dict]]) -> list[str]:
    seen: dict[str, None] = {}
    for _, rec in records:
        for k in rec:
            if k != _HF_SPLIT:
                seen.setdefault(k, None)
    return list(seen)


def _check_mapping(mapping: Mapping[str, str] | None) -> dict[str, str]:
    mapping = dict(mapping or {})
    unknown = sorted(t for t in mapping if t not in MAPPING_TARGETS)
    if unknown:
        raise ImportFailed(
            f"unknown mapping target(s) {', '.join(unknown)}; targets: {', '.join(sorted(MAPPING_TARGETS))}"
        )
    return mapping


def _apply_mapping(src: _Source, mapping: dict[str, str]) -> list[tuple[int, dict]]:
    if not mapping:
        return src.records
    found = _columns(src.records)
    missing = sorted({s for s in mapping.values() if s not in found})
    if missing:
        raise ImportFailed(
            f"mapped source column(s) not found: {', '.join(missing)}; found columns: {', '.join(found)}"
        )
    sources = set(mapping.values())
    out = []
    for row, rec in src.records:
        new = {k: v for k, v in rec.items() if k not in sources or k in mapping}
        for target, col in mapping.items():
            new[target] = rec.get(col)
        out.append((row, new))
    return out


def _detect(columns: list[str], records: list[tuple[int, dict]]) -> str:
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
        if _P_INSTRUCTION in first and _P_RUBRIC in first:
            return "prometheus-prompt"
    return CANONICAL


def _split_arg(split: str | None) -> str | None:
    if split is None:
        return None
    norm = SPLIT_ALIASES.get(str(split).strip().lower())
    if norm is None:
        raise ImportFailed(f"split {split!r}: expected train or eval (test/validation mean eval)")
    return norm


def _row_split(rec: dict, override: str | None) -> str:
    if override is not None:
        return override
    hf = rec.get(_HF_SPLIT)
    if hf is not None:
        return SPLIT_ALIASES.get(str(hf).lower(), "train")
    raw = rec.get("split")
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        return "train"
    norm = SPLIT_ALIASES.get(str(raw).strip().lower())
    if norm is None:
        raise _Bad(f"split {raw!r} is not train/eval/test/validation")
    return norm


# --------------------------------------------------------------------------------------------------
# Value helpers
# --------------------------------------------------------------------------------------------------


def _norm_newlines(s: str) -> str:
    return s.replace("\r\n", "\n").replace("\r", "\n")


def _empty(v: Any) -> bool:
    return v is None or (isinstance(v, str) and not v.strip()) or (isinstance(v, float) and math.isnan(v))


def _text(v: Any, name: str) -> str | None:
    """Normalised text (newlines unified, outer whitespace stripped) or None when empty."""
    if _empty(v):
        return None
    if isinstance(v, str):
        return _norm_newlines(v).strip()
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    raise _Bad(f"{name} is a {type(v).__name__}, not text")


def _required_text(rec: dict, key: str, name: str | None = None) -> str:
    name = name or key
    if key not in rec:
        raise _Bad(f"missing {name}")
    t = _text(rec[key], name)
    if t is None:
        raise _Bad(f"{name} is empty")
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
    """A gold score, or a list of them (-> mean, and the list as JSON). Raises _Bad."""
    if _empty(value):
        raise _Bad(f"missing {name}")
    many = value
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            many = json.loads(value)
        except json.JSONDecodeError:
            raise _Bad(f"{name} {value!r} is not a number or a JSON list of numbers") from None
    if isinstance(many, (list, tuple)):
        if not many:
            raise _Bad(f"{name} is an empty list")
        try:
            scores = [_number(x) for x in many]
        except ValueError:
            raise _Bad(f"{name} {_short(value)} has an entry that is not a number") from None
        bad = [x for x in scores if not 1 <= x <= 5]
        if bad:
            raise _Bad(f"{name} {_short(value)} has a score outside 1..5")
        as_json = json.dumps([int(x) if x.is_integer() else x for x in scores])
        return sum(scores) / len(scores), as_json
    try:
        score = _number(value)
    except ValueError:
        raise _Bad(f"{name} {_short(value)} is not a number") from None
    if not 1 <= score <= 5:
        raise _Bad(f"{name} {_short(value)} is outside 1..5")
    return score, None


def _short(v: Any, n: int = 40) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def _rubric_value(v: Any, name: str = "rubric") -> dict:
    """A rubric from a dict, a JSON object string or a Python-dict string. Raises _Bad."""
    obj = v
    if isinstance(v, str):
        try:
            obj = json.loads(v)
        except json.JSONDecodeError:
            try:
                obj = ast.literal_eval(v.strip())
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                raise _Bad(f"{name} is not a JSON object or a Python dict") from None
    if not isinstance(obj, dict):
        raise _Bad(f"{name} is not a JSON object or a Python dict")
    missing = [k for k in RUBRIC_KEYS if _empty(obj.get(k))]
    if missing:
        raise _Bad(f"{name} lacks {', '.join(missing)}")
    return {k: _text(obj[k], f"{name} {k}") for k in RUBRIC_KEYS}


def _rubric_columns(rec: dict, prefix: str = "") -> dict:
    missing = [prefix + k for k in RUBRIC_KEYS if _empty(rec.get(prefix + k))]
    if missing:
        raise _Bad(f"empty {', '.join(missing)}")
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
        if k == _HF_SPLIT:
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
class _Ctx:
    label_a: str | None = None
    label_b: str | None = None
    label_tie: str | None = None
    pair_mode: str = "chosen"  # "chosen" (prompt/chosen/rejected) | "labelled" (response_a/response_b/label)
    empty_slots: list[str] = field(default_factory=list)  # CIA "row 6 score 2" slots without a response
    rubric_fallbacks: list[int] = field(default_factory=list)  # CIA rows that used general_rubric
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


def _absolute(instruction, response, reference, rubric, gold, gold_scores, feedback, meta) -> dict:
    return {"instruction": instruction, "response": response, "response_b": None, "label": None,
            "reference": reference, **rubric, "gold_score": gold, "gold_scores": gold_scores,
            "gold_feedback": feedback, "meta": meta}  # fmt: skip


def _pair(instruction, response, response_b, label, reference, rubric, meta) -> dict:
    return {"instruction": instruction, "response": response, "response_b": response_b, "label": label,
            "reference": reference, **rubric, "gold_score": None, "gold_scores": None,
            "gold_feedback": None, "meta": meta}  # fmt: skip


def _collect(*getters: Callable[[], Any]) -> list[Any]:
    """Run each getter, collecting every _Bad reason rather than stopping at the first."""
    values, reasons = [], []
    for g in getters:
        try:
            values.append(g())
        except _Bad as bad:
            reasons.extend(bad.reasons)
            values.append(None)
    if reasons:
        raise _Bad(*reasons)
    return values


# feedback-collection ------------------------------------------------------------------------------

_FC_REQUIRED = ["orig_instruction", "orig_response", "orig_criteria", *(f"orig_{d}" for d in DESCRIPTIONS),
                "orig_score"]  # fmt: skip


def _fc_check(columns, records, ctx):
    _require(columns, _FC_REQUIRED, "feedback-collection")


def _fc_convert(rec, ctx, row):
    instruction, response, rubric, (gold, golds) = _collect(
        lambda: _required_text(rec, "orig_instruction"),
        lambda: _required_text(rec, "orig_response"),
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
            raise _Bad("instruction (the full prompt) is empty")
        try:
            return parse_prometheus_prompt(prompt)
        except ValueError as e:
            raise _Bad(f"instruction: {e}") from None

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
            raise _Bad(f"{key} is empty")
        try:
            return parse_prometheus_prompt(rec[key])
        except ValueError as e:
            raise _Bad(f"{key}: {e}") from None

    chosen, rejected = _collect(lambda: parsed("chosen_instruction"), lambda: parsed("rejected_instruction"))
    if chosen["instruction"] != rejected["instruction"]:
        raise _Bad("chosen_instruction and rejected_instruction evaluate different instructions")
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
        except _Bad as bad:
            reasons.extend(bad.reasons)
            continue
        if i == 1:
            ctx.rubric_fallbacks.append(row)
        return rubric
    raise _Bad("unparseable rubric: " + "; ".join(reasons))


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

_PAIR_CONSUMED = {"prompt", "instruction", "chosen", "rejected", "response_a", "response", "response_b", "label",
                  "reference", "rubric", "score_rubric", *RUBRIC_KEYS}  # fmt: skip


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


def _map_label(raw: Any, ctx: _Ctx, canonical_ok: bool) -> str:
    if _empty(raw):
        raise _Bad("missing label")
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
        raise _Bad(f"label {value!r} is not one of {allowed}")
    if canonical_ok and value.lower() in ("a", "b", "tie"):
        return "tie" if value.lower() == "tie" else value.upper()
    raise _Bad(f"label {value!r} is not A, B or tie (give label_a/label_b to map raw values)")


def _pairwise_convert(rec, ctx, row):
    prompt_key = "prompt" if "prompt" in rec else "instruction"

    def instruction():
        if not _empty(rec.get(prompt_key)):
            return _messages_text(rec[prompt_key], prompt_key, last=False)
        chosen = rec.get("chosen")
        if isinstance(chosen, list) and len(chosen) > 1 and all(isinstance(m, dict) for m in chosen):
            return _render_messages(chosen[:-1], "chosen")  # the conversation before the final answer
        raise _Bad(f"{prompt_key} is empty")

    def side(key):
        t = _messages_text(rec.get(key), key, last=True)
        if t is None:
            raise _Bad(f"{key} is empty")
        return t

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
    return [_pair(instr, a, b, label, reference, rubric or ctx.default_rubric(), _meta(rec, _PAIR_CONSUMED))]


# canonical ----------------------------------------------------------------------------------------

_CANON_CONSUMED = {"instruction", "response", "response_b", "label", "reference", "rubric", "score_rubric",
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
    resp_get = lambda: _required_text(rec, "response")  # noqa: E731
    if "response_b" in rec:
        instr, a, b, label, rubric = _collect(
            instr_get, resp_get, lambda: _required_text(rec, "response_b"),
            lambda: _map_label(rec.get("label"), ctx, canonical_ok=True), lambda: _row_rubric(rec),
        )  # fmt: skip
        return [_pair(instr, a, b, label, _text(rec.get("reference"), "reference"), rubric or ctx.default_rubric(),
                      _meta(rec, _CANON_CONSUMED))]  # fmt: skip

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
            raise _Bad("missing rubric (rubric, or criteria and score1..5_description)")
        return r

    instr, resp, (score, golds), rub = _collect(instr_get, resp_get, gold, rubric)
    return [_absolute(instr, resp, _text(rec.get("reference"), "reference"), rub, score, golds,
                      _text(rec.get("gold_feedback"), "gold_feedback"), _meta(rec, _CANON_CONSUMED))]  # fmt: skip


@dataclass(frozen=True)
class _PresetSpec:
    kind: str | None  # None: decided by the columns (canonical)
    check: Callable[[list[str], list[tuple[int, dict]], _Ctx], None]
    convert: Callable[[dict, _Ctx, int], list[dict]]


_PRESET_SPECS: dict[str, _PresetSpec] = {
    "feedback-collection": _PresetSpec("absolute", _fc_check, _fc_convert),
    "prometheus-prompt": _PresetSpec("absolute", _pp_check, _pp_convert),
    "prometheus-pairwise": _PresetSpec("pairwise", _ppair_check, _ppair_convert),
    "cia": _PresetSpec("absolute", _cia_check, _cia_convert),
    "pairwise": _PresetSpec("pairwise", _pairwise_check, _pairwise_convert),
    CANONICAL: _PresetSpec(None, _canonical_check, _canonical_convert),
}


# --------------------------------------------------------------------------------------------------
# Validation, identity, messages
# --------------------------------------------------------------------------------------------------


def _finish_row(partials: list[dict], rec: dict, row: int, dataset: str, split: str) -> list[dict]:
    out, reasons = [], []
    for p in partials:
        pairwise = p["response_b"] is not None or p["label"] is not None
        need = ["instruction", "response", *RUBRIC_KEYS] + (["response_b", "label"] if pairwise else ["gold_score"])
        empty = [k for k in need if _empty(p.get(k))]
        if empty:
            reasons.append(f"empty {', '.join(empty)}")
            continue
        if pairwise and p["label"] not in ("A", "B", "tie"):
            reasons.append(f"label {p['label']!r} is not A, B or tie")
            continue
        content = json.dumps([p[k] for k in HASH_FIELDS], ensure_ascii=False, separators=(",", ":"))
        content_hash = hashlib.sha256(content.encode("utf-8")).hexdigest()
        # 60 bits as an integer: integer keys keep joins and curation over millions of judgments fast.
        item_id = int(hashlib.sha256(f"{dataset}\0{content_hash}".encode()).hexdigest()[:15], 16)
        meta = p.pop("meta") or {}
        out.append({**p, "item_id": item_id, "content_hash": content_hash, "dataset": dataset, "split": split,
                    "kind": "pairwise" if pairwise else "absolute", "source_row": row,
                    "meta": json.dumps(meta, ensure_ascii=False, sort_keys=True, default=str)})  # fmt: skip
    if reasons:
        raise _Bad(*reasons)
    return out


def _failure_message(source: str, errors: list[RowError], rows: int, *, all_bad: bool = False) -> str:
    if all_bad:
        head = f"{source}: no valid rows ({len(errors)} of {rows} invalid)" if errors else f"{source}: no items"
    else:
        head = (f"{source}: {len(errors)} of {rows} row(s) invalid, nothing imported "
                "(skip_invalid / --skip-invalid imports the valid rows)")  # fmt: skip
    lines = [head, *(f"  {e}" for e in errors[:MAX_ERRORS_SHOWN])]
    if len(errors) > MAX_ERRORS_SHOWN:
        lines.append(f"  ... and {len(errors) - MAX_ERRORS_SHOWN} more ({len(errors)} in all)")
    return "\n".join(lines)
