"""Import sources: a file, a saved `datasets` directory or a hub id, read as numbered records in batches.

    src = open_source("pairs.jsonl")
    for batch in src.batches():          # lists of (row, record), BATCH_ROWS at a time
        ...
    src.rows, src.errors, src.notes      # complete once batches() is exhausted

The format is decided by content where the name can lie: a file whose first character is `[` is a JSON
array whatever its extension, `PAR1` starts Parquet, `{` starts JSON lines (or one JSON object of records
keyed by id, BiGGen-Bench's layout, for a .json file). Otherwise the extension decides (.csv / .tsv).
JSON lines, CSV/TSV and Parquet stream: memory stays bounded by one batch, whatever the file's size.
A JSON array or object is one value and is read whole.

Text is decoded as UTF-8 (a BOM is dropped) unless `encoding` names another codec; bytes that do not decode
fail the whole import with the file, line and byte, and the option to pass.
"""

from __future__ import annotations

import codecs
import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from store.errors import SelfratError

BATCH_ROWS = 20_000
HF_NAME = re.compile(r"^[\w.-]+/[\w.-]+$")
HF_SPLIT = "__hf_split__"  # record key carrying a Hugging Face split name (into meta as hf_split)
SPLIT_ALIASES = {"train": "train", "eval": "eval", "test": "eval", "validation": "eval", "valid": "eval",
                 "val": "eval", "dev": "eval"}  # fmt: skip
FORMATS = ".jsonl, .json, .csv, .tsv, .parquet, a saved datasets directory or a hub id org/name"


class ImportFailed(SelfratError, ValueError):
    """Nothing was imported. `errors` holds the bad rows (empty for file-level problems)."""

    def __init__(self, message: str, errors: list[RowError] | None = None):
        super().__init__(message)
        self.errors: list[RowError] = list(errors or [])


@dataclass
class RowError:
    """One bad source row: `row` is the 1-based data row (the line number for JSON lines)."""

    row: int
    reason: str

    def __str__(self) -> str:
        return f"row {self.row}: {self.reason}"


@dataclass
class Source:
    """Numbered records of one source; `rows`, `errors` and `notes` grow while `batches()` runs."""

    name: str
    _batches: Callable[[Source], Iterator[list[tuple[int, dict]]]]
    rows: int = 0  # data rows seen, readable or not
    errors: list[RowError] = field(default_factory=list)  # unreadable rows (bad JSON lines)
    notes: list[str] = field(default_factory=list)

    def batches(self) -> Iterator[list[tuple[int, dict]]]:
        return self._batches(self)


def open_source(source: str, *, encoding: str | None = None, split: str | None = None) -> Source:
    """Open `source` for reading. `split` (train/eval) picks the matching splits of a Hugging Face DatasetDict."""
    codec = _codec(encoding)
    path = Path(source)
    if path.is_dir():
        return Source(source, lambda s: _hf_batches(s, source, split, from_disk=True))
    if path.is_file():
        kind = _sniff(path)
        if kind == "json-array":
            return Source(source, lambda s: _json_batches(s, path, codec))
        if kind == "parquet":
            return Source(source, lambda s: _parquet_batches(s, path))
        ext = path.suffix.lower()
        if kind == "json-object" and ext == ".json":
            return Source(source, lambda s: _json_batches(s, path, codec))
        if kind == "json-object" or ext in (".jsonl", ".ndjson"):
            return Source(source, lambda s: _jsonl_batches(s, path, codec))
        if ext in (".csv", ".tsv"):
            sep = "\t" if ext == ".tsv" else ","
            return Source(source, lambda s: _delimited_batches(s, path, sep, codec))
        if ext == ".json":
            return Source(source, lambda s: _json_batches(s, path, codec))
        raise ImportFailed(f"{source}: unsupported file type {ext or '(no extension)'} (and its content is not JSON "
                           f"or Parquet); expected {FORMATS}")
    if HF_NAME.match(source):
        return Source(source, lambda s: _hf_batches(s, source, split, from_disk=False))
    raise ImportFailed(f"{source}: no such file or directory (and not a Hugging Face 'org/name')")


def _codec(encoding: str | None) -> str:
    if encoding is None:
        return "utf-8-sig"
    try:
        name = codecs.lookup(encoding).name
    except LookupError:
        raise ImportFailed(f"--encoding {encoding!r}: unknown encoding (e.g. utf-8, latin-1, cp1252, utf-16)") from None
    return "utf-8-sig" if name == "utf-8" else name


def _sniff(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.startswith(b"PAR1"):
        return "parquet"
    for bom in (codecs.BOM_UTF8, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):
        if head.startswith(bom):
            head = head[len(bom):].replace(b"\x00", b"") if bom != codecs.BOM_UTF8 else head[len(bom):]
            break
    first = head.lstrip()[:1]
    return {b"[": "json-array", b"{": "json-object"}.get(first, "other")


def _decode_error(
    path: Path, data: bytes, err: UnicodeDecodeError, codec: str, line: int | None = None
) -> ImportFailed:
    line = line if line is not None else data.count(b"\n", 0, err.start) + 1
    byte = data[err.start : err.start + 1].hex()
    shown = "UTF-8" if codec == "utf-8-sig" else codec
    hint = ("the file may be latin-1 or cp1252: pass --encoding latin-1 (or the file's encoding)"
            if codec == "utf-8-sig" else "pass --encoding with the file's encoding")
    return ImportFailed(f"{path}: line {line} is not valid {shown} (byte 0x{byte}: {err.reason}); {hint}")


def _jsonl_batches(src: Source, path: Path, codec: str) -> Iterator[list[tuple[int, dict]]]:
    batch: list[tuple[int, dict]] = []
    decoder = codecs.getincrementaldecoder(codec)()
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                line = decoder.decode(raw)
            except UnicodeDecodeError as e:
                raise _decode_error(path, raw, e, codec, line=lineno) from None
            if not line.strip():
                continue
            src.rows += 1
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                src.errors.append(RowError(lineno, f"bad JSON line: {e.msg} (column {e.colno})"))
                continue
            if not isinstance(rec, dict):
                src.errors.append(RowError(lineno, f"line is a JSON {type(rec).__name__}, not an object"))
                continue
            batch.append((lineno, rec))
            if len(batch) >= BATCH_ROWS:
                yield batch
                batch = []
    if batch:
        yield batch


def _json_batches(src: Source, path: Path, codec: str) -> Iterator[list[tuple[int, dict]]]:
    data = path.read_bytes()
    try:
        text = data.decode(codec)
    except UnicodeDecodeError as e:
        raise _decode_error(path, data, e, codec) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # several JSON values: JSON lines under a .json name
            yield from _jsonl_batches(src, path, codec)
            return
        raise ImportFailed(f"{path}: not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    del text, data
    if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
        # A dict of records keyed by id (BiGGen-Bench): the key becomes `id` when the record has none.
        value = [{"id": k, **v} if "id" not in v else v for k, v in value.items()]
    if not isinstance(value, list):
        raise ImportFailed(f"{path}: expected a JSON list of records or a dict of records keyed by id")
    src.rows = len(value)
    for start in range(0, len(value), BATCH_ROWS):
        batch = []
        for i, rec in enumerate(value[start : start + BATCH_ROWS], start=start + 1):
            if isinstance(rec, dict):
                batch.append((i, rec))
            else:
                src.errors.append(RowError(i, f"record is a JSON {type(rec).__name__}, not an object"))
        yield batch


def _delimited_batches(src: Source, path: Path, sep: str, codec: str) -> Iterator[list[tuple[int, dict]]]:
    fmt = "TSV" if sep == "\t" else "CSV"
    target: Path | io.BytesIO = path
    if codec != "utf-8-sig":  # polars reads UTF-8 only: decode with the given codec first
        data = path.read_bytes()
        try:
            target = io.BytesIO(data.decode(codec).encode("utf-8"))
        except UnicodeDecodeError as e:
            raise _decode_error(path, data, e, codec) from None
    try:
        # All columns as text; '"' quoting (CIA cells hold tabs, newlines and quotes); empty cells -> null.
        df = pl.read_csv(target, separator=sep, infer_schema=False, quote_char='"', encoding="utf8")
    except Exception as e:  # polars raises several error types for malformed files
        if "utf-8" in str(e).lower() or "utf8" in str(e).lower():
            raise _first_undecodable_line(path, codec) from None
        raise ImportFailed(f"{path}: could not read as {fmt}: {e}") from None
    src.rows = df.height
    for start in range(0, df.height, BATCH_ROWS):
        chunk = df.slice(start, BATCH_ROWS)
        yield [(i, rec) for i, rec in enumerate(chunk.iter_rows(named=True), start=start + 1)]


def _first_undecodable_line(path: Path, codec: str) -> ImportFailed:
    decoder = codecs.getincrementaldecoder(codec)()
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                decoder.decode(raw)
            except UnicodeDecodeError as e:
                return _decode_error(path, raw, e, codec, line=lineno)
    return ImportFailed(f"{path}: not valid UTF-8; pass --encoding with the file's encoding")


def _parquet_batches(src: Source, path: Path) -> Iterator[list[tuple[int, dict]]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise ImportFailed(f"{path}: could not read as Parquet: {e}") from None
    row = 0
    for rb in pf.iter_batches(batch_size=BATCH_ROWS):
        recs = rb.to_pylist()
        src.rows += len(recs)
        yield [(row + i, rec) for i, rec in enumerate(recs, start=1)]
        row += len(recs)


def _hf_batches(src: Source, source: str, split: str | None, *, from_disk: bool) -> Iterator[list[tuple[int, dict]]]:
    import datasets  # heavy: only for directories and hub names

    try:
        ds = datasets.load_from_disk(source) if from_disk else datasets.load_dataset(source)
    except Exception as e:
        how = "datasets.load_from_disk" if from_disk else "datasets.load_dataset (network or cache)"
        raise ImportFailed(f"{source}: could not load with {how}: {type(e).__name__}: {e}") from None
    parts = dict(ds.items()) if isinstance(ds, datasets.DatasetDict) else {"train": ds}
    if split is not None:
        chosen = {n: d for n, d in parts.items() if SPLIT_ALIASES.get(n.lower()) == split}
        parts = chosen or parts  # no split maps to it: take all, labelled with the given split
    batch: list[tuple[int, dict]] = []
    for name, d in parts.items():
        if split is None and name.lower() not in SPLIT_ALIASES:
            src.notes.append(f"Hugging Face split {name!r} has no train/eval meaning: imported as train")
        for rec in d:
            src.rows += 1
            batch.append((src.rows, {**rec, HF_SPLIT: name}))
            if len(batch) >= BATCH_ROWS:
                yield batch
                batch = []
    if batch:
        yield batch
