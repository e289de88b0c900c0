"""Import judge-evaluation data into items, all or nothing, with a report that accounts for every row.

    >>> res = read_items("../shared/data/cia/scored_responses_testset_biggen.tsv", dataset="cia-biggen")
    >>> res.kind, res.preset, res.items.height          # 250 prompts x 5 graded responses, less empty slots
    ('absolute', 'cia', 1242)
    >>> report = import_file(store, "pandalm.json", dataset="pandalm", split="eval",
    ...                      mapping={"response_a": "response1", "response_b": "response2"},
    ...                      label_majority=["annotator1", "annotator2", "annotator3"],
    ...                      label_a="1", label_b="2", label_tie="0")

A row goes through, in order:
  1. the source (`engine.sources`: JSON lines, JSON, CSV/TSV, Parquet, a datasets dir or hub id; streamed);
  2. `constants` (`--set NAME=VALUE`): a column with one value for every row of this file;
  3. `label_majority` (`--label-majority C1,C2,C3`): `label` = the value more than half of those columns hold;
     without such a majority the row is invalid, or a tie (the `label_tie` value) when label_tie is given;
  4. `mapping` (`--map TARGET=SOURCE` renames a column; `--map 'TARGET={a}\\n\\n{b}'` renders a template of
     columns, a missing or empty column as empty, the target empty when all of them are); the columns a
     mapping reads are consumed, so they are not also read under their own names;
  5. the preset (`engine.presets`, detected from the columns when not given), which builds the items;
  6. identity: `content_hash` covers the item's content and gold, `content_key` the content alone; `item_id`
     is 60 bits of sha256(dataset, content_hash). The same content_hash twice is a duplicate (merged into
     the first row, reported with that row's number); the same content_key with another label or gold is a
     conflict: refused (rows named), or resolved by `on_conflict` first | last | drop.

Every bad row is collected and named; with any, nothing is imported unless `skip_invalid`. Items that are
already in the workspace are checked by the store when they are written (`import_file`): a conflicting label
or another split is refused with the way out (`replace`, which swaps the dataset's items in one transaction).
Memory stays bounded: items are spooled to Parquet in batches, so a million-row file imports in under 2 GB.
"""

from __future__ import annotations

import hashlib
import json
import string
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import polars as pl

from engine.presets import (
    MAPPING_TARGETS,
    PRESET_SPECS,
    PRESETS,
    Bad,
    Ctx,
    _collect,
    _empty,
    _scalar_text,
    columns_of,
    detect,
    row_split,
    split_arg,
)
from engine.sources import ImportFailed, RowError, open_source
from store.store import ITEM_COLUMNS, RUBRIC_KEYS

__all__ = [
    "ITEM_COLUMNS", "ITEM_SCHEMA", "ON_CONFLICT", "PRESETS", "ImportFailed", "ImportResult", "RowError",
    "import_file", "parse_constants", "parse_mapping", "read_items",
]  # fmt: skip

ITEM_SCHEMA: dict[str, pl.DataType] = {
    c: (pl.Float64 if c == "gold_score" else pl.Int64 if c in ("source_row", "item_id") else pl.Utf8)
    for c in ITEM_COLUMNS
}
# Fields the content hash covers, in this order (never the dataset name, split, feedback or meta); an item's
# input is appended only when it has one, so items without input keep the ids they had before inputs existed.
HASH_FIELDS = ("instruction", "response", "response_b", "label", "reference", *RUBRIC_KEYS, "gold_score")
KEY_FIELDS = tuple(f for f in HASH_FIELDS if f not in ("label", "gold_score"))  # content without the gold
ON_CONFLICT = ("error", "first", "last", "drop")
MAX_ERRORS_SHOWN = 20  # rows listed in an ImportFailed message
SPOOL_ROWS = 50_000  # items kept in memory before the spool moves to Parquet files


# --------------------------------------------------------------------------------------------------
# Command-line specs: --map, --set
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Template:
    """`{column}` fields in literal text; `\\n` / `\\t` in the spec are a newline / a tab."""

    spec: str
    parts: tuple[tuple[str, str | None], ...]  # (literal, column or None)

    @classmethod
    def parse(cls, spec: str) -> Template:
        text = spec.replace("\\\\", "\0").replace("\\n", "\n").replace("\\t", "\t").replace("\0", "\\")
        try:
            parts = tuple((lit, name) for lit, name, _, _ in string.Formatter().parse(text))
        except ValueError as e:
            raise ImportFailed(f"--map template {spec!r}: {e} (write {{{{ and }}}} for literal braces)") from None
        if any(name == "" for _, name in parts):
            raise ImportFailed(f"--map template {spec!r}: '{{}}' names no column")
        return cls(spec, parts)

    @property
    def columns(self) -> list[str]:
        return [name for _, name in self.parts if name is not None]

    def render(self, rec: dict) -> str | None:
        values = {c: rec.get(c) for c in self.columns}
        if all(_empty(v) for v in values.values()):
            return None
        out = []
        for lit, name in self.parts:
            out.append(lit)
            if name is not None:
                v = values[name]
                out.append("" if _empty(v) else v if isinstance(v, str) else _scalar_text(v))
        return "".join(out)


def parse_mapping(pairs: Sequence[str]) -> dict[str, str]:
    """`--map TARGET=SOURCE` (or TARGET=TEMPLATE) strings into a mapping (ImportFailed on a malformed pair)."""
    out: dict[str, str] = {}
    for pair in pairs:
        target, sep, src = pair.partition("=")
        if not sep or not target.strip() or not src.strip():
            raise ImportFailed(f"--map {pair!r}: expected TARGET=SOURCE (e.g. instruction=question) or "
                               "TARGET=TEMPLATE (e.g. 'prompt={instruction}\\n\\n{input}')")
        out[target.strip()] = src if "{" in src else src.strip()
    return out


def parse_constants(pairs: Sequence[str]) -> dict[str, str]:
    """`--set NAME=VALUE` strings into a mapping (the value may be empty; the name may not)."""
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise ImportFailed(f"--set {pair!r}: expected NAME=VALUE, e.g. subset=adversarial")
        out[name.strip()] = value
    return out


@dataclass
class _Transform:
    """--set, --label-majority and --map, applied to each record before the preset sees it."""

    constants: dict[str, str]
    majority: list[str]
    renames: dict[str, str]  # target -> source column
    templates: dict[str, Template]  # target -> template
    label_tie: str | None
    majority_ties: int = 0  # rows with no majority, taken as a tie

    @classmethod
    def build(cls, mapping: Mapping[str, str] | None, constants: Mapping[str, str] | None,
              majority: Sequence[str] | None, label_tie: str | None) -> _Transform:
        mapping = dict(mapping or {})
        unknown = sorted(t for t in mapping if t not in MAPPING_TARGETS)
        if unknown:
            raise ImportFailed(f"unknown mapping target(s) {', '.join(unknown)}; targets: "
                               f"{', '.join(sorted(MAPPING_TARGETS))}")
        majority = [c.strip() for c in (majority or []) if c.strip()]
        if majority and len(majority) < 2:
            raise ImportFailed("--label-majority needs at least two columns, e.g. annotator1,annotator2,annotator3")
        if majority and "label" in mapping:
            raise ImportFailed("--label-majority sets the label: do not also --map label=...")
        templates = {t: Template.parse(s) for t, s in mapping.items() if "{" in s}
        renames = {t: s for t, s in mapping.items() if t not in templates}
        return cls(dict(constants or {}), majority, renames, templates, label_tie)

    @property
    def consumed(self) -> set[str]:
        cols = set(self.renames.values())
        for t in self.templates.values():
            cols.update(t.columns)
        return cols - set(self.renames) - set(self.templates)

    def __call__(self, rec: dict) -> dict:
        if self.constants:
            rec = {**rec, **self.constants}
        if self.majority:
            rec = {**rec, "label": self._majority(rec)}
        if not (self.renames or self.templates):
            return rec
        new = {k: v for k, v in rec.items() if k not in self.consumed}
        for target, col in self.renames.items():
            new[target] = rec.get(col)
        for target, tpl in self.templates.items():
            new[target] = tpl.render(rec)
        return new

    def _majority(self, rec: dict) -> str:
        votes = [str(v).strip() if not isinstance(v, (bool, float)) else _scalar_text(v)
                 for v in (rec.get(c) for c in self.majority) if not _empty(v)]
        if not votes:
            raise Bad(f"label columns {', '.join(self.majority)} are all empty")
        value, count = Counter(votes).most_common(1)[0]
        if 2 * count > len(votes):
            return value
        if self.label_tie is not None:
            self.majority_ties += 1
            return self.label_tie
        raise Bad(f"no majority label among {', '.join(self.majority)} ({', '.join(votes)}); "
                  "--label-tie makes such rows ties")


# --------------------------------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------------------------------


@dataclass
class Conflict:
    """Rows with the same content and different gold: (row, label or gold score) in row order."""

    rows: list[tuple[int, Any]]
    kept_row: int | None = None  # the row whose value was kept (None: refused or all dropped)

    def __str__(self) -> str:
        shown = ", ".join(f"row {r}: {v}" for r, v in self.rows[:6]) + (" ..." if len(self.rows) > 6 else "")
        return f"same content, different gold ({shown})"


@dataclass
class ImportResult:
    kind: str  # "absolute" | "pairwise"
    preset: str  # the preset used (detected when none was given)
    source_rows: int  # data rows in the source (JSON lines: non-blank lines)
    skipped: list[RowError]  # invalid rows left out (only with skip_invalid)
    notes: list[str] = field(default_factory=list)  # not errors: empty CIA slots, HF split names, ...
    split: str | None = None  # the --split given (None: from the data, else train)
    split_counts: dict[str, int] = field(default_factory=dict)  # items per split
    items_built: int = 0  # items the valid rows gave (CIA: five per row)
    duplicates: int = 0  # items merged into an earlier identical one
    duplicate_groups: list[tuple[int, int]] = field(default_factory=list)  # (first row, items merged into it)
    conflicts: list[Conflict] = field(default_factory=list)
    on_conflict: str = "error"
    conflict_dropped: int = 0  # items left out to resolve conflicts
    empty_responses: int = 0
    non_text_responses: int = 0
    majority_ties: int = 0
    _spool: _Spool | None = None
    _excluded: set[int] = field(default_factory=set)

    def frames(self) -> Iterator[pl.DataFrame]:
        """The items to write, in source order, a batch at a time (ITEM_COLUMNS)."""
        for frame in self._spool.frames() if self._spool else ():
            if self._excluded:
                frame = frame.filter(~pl.col("item_id").is_in(list(self._excluded)))
            if frame.height:
                yield frame

    @property
    def items(self) -> pl.DataFrame:
        frames = list(self.frames())
        return pl.concat(frames) if frames else pl.DataFrame(schema=ITEM_SCHEMA)

    def report(self) -> dict:
        """Counts for the store's import record and the CLI (JSON-safe)."""
        return {
            "kind": self.kind, "preset": self.preset, "source_rows": self.source_rows,
            "skipped": len(self.skipped), "items_built": self.items_built, "split": self.split,
            "split_counts": self.split_counts, "duplicates": self.duplicates,
            "duplicate_groups": [list(g) for g in self.duplicate_groups[:1000]],
            "conflicts": len(self.conflicts), "on_conflict": self.on_conflict,
            "conflict_dropped": self.conflict_dropped, "empty_responses": self.empty_responses,
            "non_text_responses": self.non_text_responses, "majority_ties": self.majority_ties,
            "notes": self.notes,
        }  # fmt: skip


class _Spool:
    """Item batches: in memory while small, then Parquet files in a temporary directory."""

    def __init__(self) -> None:
        self._mem: list[pl.DataFrame] = []
        self._files: list[Path] = []
        self._rows = 0
        self._tmp: tempfile.TemporaryDirectory | None = None

    def add(self, rows: list[dict]) -> None:
        if not rows:
            return
        self._mem.append(pl.DataFrame(rows, schema=ITEM_SCHEMA))
        self._rows += len(rows)
        if self._rows > SPOOL_ROWS:
            if self._tmp is None:
                self._tmp = tempfile.TemporaryDirectory(prefix="selfrat-import-")
            for frame in self._mem:
                path = Path(self._tmp.name) / f"{len(self._files):06d}.parquet"
                frame.write_parquet(path, compression="lz4")
                self._files.append(path)
            self._mem = []

    def frames(self) -> Iterator[pl.DataFrame]:
        for path in self._files:
            yield pl.read_parquet(path)
        yield from self._mem


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def read_items(
    source: str,
    *,
    dataset: str,
    preset: str | None = None,
    mapping: Mapping[str, str] | None = None,
    constants: Mapping[str, str] | None = None,
    label_majority: Sequence[str] | None = None,
    split: str | None = None,
    label_a: str | None = None,
    label_b: str | None = None,
    label_tie: str | None = None,
    skip_invalid: bool = False,
    on_conflict: str = "error",
    encoding: str | None = None,
) -> ImportResult:
    """Read `source` into items for `dataset` (nothing is written; see `import_file`).

    preset: one of PRESETS; None detects it from the columns (canonical columns when nothing matches).
    mapping: TARGET=SOURCE renames or TARGET=TEMPLATE renderings; constants: NAME=VALUE columns.
    label_majority: columns whose majority value is the label (before label_a / label_b / label_tie apply).
    split: "train" or "eval" (test/validation mean eval) for every item; None = the source's `split`
        column or Hugging Face split names, else "train".
    label_a / label_b / label_tie: the raw label values meaning "A wins", "B wins", "tie".
    skip_invalid: False = any bad row fails the import; True = keep the good rows, list the rest.
    on_conflict: what to do with the same content under different gold: error | first | last | drop.
    encoding: the text encoding of the file (default UTF-8).
    """
    if not isinstance(dataset, str) or not dataset.strip():
        raise ImportFailed("dataset name is empty")
    if preset is not None and preset not in PRESETS:
        raise ImportFailed(f"unknown preset {preset!r}; presets: {', '.join(PRESETS)}")
    if on_conflict not in ON_CONFLICT:
        raise ImportFailed(f"on_conflict {on_conflict!r}: expected one of {', '.join(ON_CONFLICT)}")
    split_override = split_arg(split)
    transform = _Transform.build(mapping, constants, label_majority, label_tie)
    src = open_source(str(source), encoding=encoding, split=split_override)
    ctx = Ctx(label_a=label_a, label_b=label_b, label_tie=label_tie)
    ids = _Identity(dataset)
    spool = _Spool()
    errors: list[RowError] = []
    split_counts: Counter[str] = Counter()
    spec = used = None
    seen_columns: set[str] = set()

    for batch in src.batches():
        raw_columns = columns_of(batch)
        seen_columns.update(raw_columns)
        records = []
        for row, rec in batch:
            try:
                records.append((row, transform(rec)))
            except Bad as bad:
                errors.append(RowError(row, "; ".join(bad.reasons)))
        if spec is None:
            _check_sources(transform, raw_columns)
            columns = columns_of(records) or list(transform.renames) + list(transform.templates)
            used = preset or detect(columns, records)
            spec = PRESET_SPECS[used]
            spec.check(columns, records, ctx)
        out = []
        for row, rec in records:
            try:
                row_split_, partials = _collect(partial(row_split, rec, split_override),
                                                partial(spec.convert, rec, ctx, row))
                for item in _finish(partials, row, row_split_):
                    if ids.add(item):
                        out.append(item)
                        split_counts[row_split_] += 1
            except Bad as bad:
                errors.append(RowError(row, "; ".join(bad.reasons)))
        spool.add(out)

    if src.rows == 0:
        raise ImportFailed(f"{source}: no data rows")
    missing = sorted({c for t in transform.templates.values() for c in t.columns} - seen_columns)
    if missing:
        raise ImportFailed(f"--map template column(s) {', '.join(missing)} are in no row of {source}; "
                           f"found columns: {', '.join(sorted(seen_columns)) or '(none)'}")
    errors = sorted([*src.errors, *errors], key=lambda e: e.row)
    if errors and not skip_invalid:
        raise ImportFailed(_failure_message(str(source), errors, src.rows), errors)
    if ids.items == 0:
        raise ImportFailed(_failure_message(str(source), errors, src.rows, all_bad=True), errors)
    conflicts, excluded, dropped_splits = ids.resolve(on_conflict)
    if conflicts and on_conflict == "error":
        shown = [f"  {c}" for c in conflicts[:MAX_ERRORS_SHOWN]]
        more = [f"  ... and {len(conflicts) - MAX_ERRORS_SHOWN} more"] if len(conflicts) > MAX_ERRORS_SHOWN else []
        raise ImportFailed("\n".join([
            f"{source}: {len(conflicts)} conflict(s): the same content with different gold, nothing imported "
            "(--on-conflict first|last|drop keeps the first, keeps the last, or drops them all)", *shown, *more]))
    split_counts.subtract(dropped_splits)
    notes = list(src.notes) + ctx.notes()
    if ids.duplicates:
        groups = sorted(ids.dup_groups.items())
        shown = ", ".join(f"row {r} (+{n})" for r, n in groups[:10]) + (" ..." if len(groups) > 10 else "")
        notes.append(f"{ids.duplicates} duplicate item(s) merged into the first row with the same content: {shown}")
    return ImportResult(
        kind=spec.kind or ("pairwise" if ids.pairwise else "absolute"), preset=used, source_rows=src.rows,
        skipped=errors, notes=notes, split=split_override,
        split_counts={k: v for k, v in sorted(split_counts.items()) if v}, items_built=ids.built,
        duplicates=ids.duplicates, duplicate_groups=sorted(ids.dup_groups.items()), conflicts=conflicts,
        on_conflict=on_conflict, conflict_dropped=len(excluded), empty_responses=ctx.empty_responses,
        non_text_responses=ctx.non_text_responses, majority_ties=transform.majority_ties,
        _spool=spool, _excluded=excluded,
    )  # fmt: skip


def _check_sources(transform: _Transform, columns: list[str]) -> None:
    """Renamed and majority columns must exist (checked on the first batch: a typo fails before any work)."""
    wanted = [*transform.renames.values(), *transform.majority]
    missing = sorted({c for c in wanted if c not in columns and c not in transform.constants})
    if missing:
        raise ImportFailed(f"mapped source column(s) not found: {', '.join(missing)}; "
                           f"found columns: {', '.join(columns) or '(none)'}")


def _finish(partials: list[dict], row: int, split: str) -> list[dict]:
    out, reasons = [], []
    for p in partials:
        pairwise = p["response_b"] is not None or p["label"] is not None
        # Responses may be empty (kept as ""); everything the judge needs besides them may not.
        need = ["instruction", *RUBRIC_KEYS] + (["label"] if pairwise else ["gold_score"])
        empty = [k for k in need if _empty(p.get(k))]
        if empty:
            reasons.append(f"empty {', '.join(empty)}")
            continue
        if pairwise and p["label"] not in ("A", "B", "tie"):
            reasons.append(f"label {p['label']!r} is not A, B or tie")
            continue
        meta = p.pop("meta") or {}
        out.append({**p, "split": split, "kind": "pairwise" if pairwise else "absolute", "source_row": row,
                    "meta": json.dumps(meta, ensure_ascii=False, sort_keys=True, default=str)})
    if reasons:
        raise Bad(*reasons)
    return out


def _digest(values: list) -> str:
    content = json.dumps(values, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(content.encode("utf-8")).hexdigest()


class _Identity:
    """Ids for items, and the duplicates and conflicts among them, in bounded memory (ints, not texts)."""

    def __init__(self, dataset: str):
        self.dataset = dataset
        self.first_row: dict[int, int] = {}  # item_id -> first row
        # content_key (64 bits) -> [first id, first row, first value, last id, first split]
        self.by_key: dict[int, list] = {}
        self.variants: dict[int, list[tuple[int, Any, int]]] = {}  # conflicting key -> [(row, value, item_id)]
        self.dup_groups: Counter[int] = Counter()
        self.split_of: dict[int, str] = {}  # only for ids in conflicts, to correct the split counts
        self.built = self.items = self.duplicates = 0
        self.pairwise = False

    def add(self, item: dict) -> bool:
        """Give `item` its ids; False when it duplicates an earlier item (merged into it)."""
        self.built += 1
        item["dataset"] = self.dataset
        extra = [{"input": item["input"]}] if item.get("input") is not None else []
        item["content_hash"] = _digest([item[k] for k in HASH_FIELDS] + extra)
        item["content_key"] = _digest([item[k] for k in KEY_FIELDS] + extra)
        # 60 bits as an integer: integer keys keep joins and curation over millions of judgments fast.
        item_id = int(hashlib.sha256(f"{self.dataset}\0{item['content_hash']}".encode()).hexdigest()[:15], 16)
        item["item_id"] = item_id
        key = int(item["content_key"][:16], 16)
        value = item["label"] if item["kind"] == "pairwise" else item["gold_score"]
        self.pairwise |= item["kind"] == "pairwise"
        entry = self.by_key.get(key)
        if item_id in self.first_row:
            self.duplicates += 1
            self.dup_groups[self.first_row[item_id]] += 1
            if entry is not None:
                entry[3] = item_id
                if key in self.variants:
                    self.variants[key].append((item["source_row"], value, item_id))
            return False
        self.first_row[item_id] = item["source_row"]
        self.items += 1
        if entry is None:
            self.by_key[key] = [item_id, item["source_row"], value, item_id, item["split"]]
        else:
            if key not in self.variants:
                self.variants[key] = [(entry[1], entry[2], entry[0])]
                self.split_of[entry[0]] = entry[4]
            self.variants[key].append((item["source_row"], value, item_id))
            self.split_of[item_id] = item["split"]
            entry[3] = item_id
        return True

    def resolve(self, policy: str) -> tuple[list[Conflict], set[int], Counter[str]]:
        conflicts, excluded = [], set()
        for key, rows in self.variants.items():
            first_id, _, _, last_id, _ = self.by_key[key]
            keep = {"first": first_id, "last": last_id}.get(policy)
            ids = {i for _, _, i in rows}
            excluded |= ids - {keep}
            kept_row = next((r for r, _, i in rows if i == keep), None) if policy != "error" else None
            conflicts.append(Conflict([(r, v) for r, v, _ in rows], kept_row))
        conflicts.sort(key=lambda c: c.rows[0][0])
        # Split counts were taken as items were added; take out the excluded ones (their split is recorded).
        dropped: Counter[str] = Counter()
        for i in excluded:
            dropped[self.split_of[i]] += 1
        return conflicts, excluded, dropped


def _failure_message(source: str, errors: list[RowError], rows: int, *, all_bad: bool = False) -> str:
    if all_bad:
        head = f"{source}: no valid rows ({len(errors)} of {rows} invalid)" if errors else f"{source}: no items"
    else:
        head = (f"{source}: {len(errors)} of {rows} row(s) invalid, nothing imported "
                "(--skip-invalid imports the valid rows)")  # fmt: skip
    lines = [head, *(f"  {e}" for e in errors[:MAX_ERRORS_SHOWN])]
    if len(errors) > MAX_ERRORS_SHOWN:
        lines.append(f"  ... and {len(errors) - MAX_ERRORS_SHOWN} more ({len(errors)} in all)")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def import_file(store, source: str, *, dataset: str, replace: bool = False, force: bool = False,
                **options: Any) -> dict:
    """Read `source` (options as `read_items`) and write its items to `store`, all or nothing.

    Returns the import report: the reader's counts plus `inserted`, `existing` (already in the dataset),
    `replaced` (items removed by `replace`) and `kept_stored` (conflicts with stored items resolved by
    on_conflict=first in favour of the stored one). Refused by the store: a different split for items already
    stored, a conflicting gold against stored items (unless on_conflict=first), items of the other kind, and
    `replace` of a dataset that runs use (unless `force`)."""
    result = read_items(source, dataset=dataset, **options)
    counts = store.import_items(
        dataset, result.kind, result.frames(), source=str(source), preset=result.preset,
        source_rows=result.source_rows, skipped=[{"row": e.row, "reason": e.reason} for e in result.skipped],
        replace=replace, force=force, keep_stored_on_conflict=options.get("on_conflict") == "first",
        split=result.split, report=result.report(),
    )
    return {**result.report(), **counts, "dataset": dataset, "source": str(source),
            "skipped_rows": [{"row": e.row, "reason": e.reason} for e in result.skipped]}
