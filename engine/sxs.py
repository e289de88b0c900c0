"""Rationale quality by blinded side-by-side: a sheet a person fills in, and the win rate it gives.

    selfrat sxs export run1:0 run1:2 --dataset cia-biggen --out sxs.csv      # writes sxs.csv + sxs.key.json
    (a person fills the `winner` column of sxs.csv: left | right | tie)
    selfrat sxs score sxs.csv --key sxs.key.json

The two systems are (run, iteration) specs, written RUN:ITERATION; they may be two iterations of one run or
iterations of different runs. Each sheet row shows one item (instruction, response, reference, rubric
criteria) and the two systems' eval judgments of it (sample 0, side a: rationale and score), left and right
at random per row (seeded). The sheet never says which system is which: that is in the key file, which the
rater must not see.

Scoring: a win counts 1, a tie 1/2 (ties are also reported separately, with the win rate over decisive rows);
rows with an empty `winner` are not filled yet and are counted, not scored. Several sheets (annotators) of
one key may be scored together; the 95% interval is a percentile bootstrap over items (each item carries all
its annotations), so annotators of the same item are not taken for independent evidence.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from engine.metrics import percentile_bootstrap
from store.errors import UsageError

KEY_FORMAT = "selfrat-sxs-key/1"
WINNERS = ("left", "right", "tie")
SHEET_COLUMNS = [
    "sheet_id", "instruction", "response", "reference", "criteria",
    "left_rationale", "left_score", "right_rationale", "right_score", "winner", "note",
]
SAMPLE_INDEX, SIDE = 0, "a"  # the judgment compared: the first eval sample of the graded response


@dataclass(frozen=True)
class Spec:
    """One system of the comparison: an iteration of a run."""

    run_id: str
    iteration: int

    def __str__(self) -> str:
        return f"{self.run_id}:{self.iteration}"


def parse_spec(text: str, default_run: str | None = None) -> Spec:
    """'RUN:ITERATION', or 'ITERATION' alone when `default_run` is given."""
    run, sep, it = text.rpartition(":")
    if not sep:
        run, it = default_run or "", text
    if not run:
        raise UsageError(f"system {text!r}: expected RUN:ITERATION (or ITERATION with --run)")
    try:
        iteration = int(it)
    except ValueError:
        raise UsageError(f"system {text!r}: iteration {it!r} is not an integer") from None
    if iteration < 0:
        raise UsageError(f"system {text!r}: iteration must be >= 0")
    return Spec(run, iteration)


def default_key_path(sheet: str | Path) -> Path:
    sheet = Path(sheet)
    return sheet.with_name(sheet.stem + ".key.json")


# ------------------------------------------------------------------ export


def _judgments(store, spec: Spec, item_ids: pl.Series, purpose: str) -> pl.DataFrame:
    rows = store.judgments(spec.run_id, spec.iteration, purpose)
    rows = rows.filter((pl.col("sample_index") == SAMPLE_INDEX) & (pl.col("side") == SIDE)
                       & pl.col("item_id").is_in(item_ids.implode()))
    if rows.height == 0:
        raise UsageError(f"{spec} has no {purpose} judgments (sample {SAMPLE_INDEX}, side {SIDE}) on these items")
    # The rationale as parsed; a judgment where none could be split off shows its whole text.
    shown = pl.coalesce(pl.col("rationale"), pl.col("text"), pl.col("raw_text"), pl.lit(""))
    return rows.select("item_id", rationale=shown, score=pl.col("score"))


def export_sheet(store, dataset: str, first: Spec, second: Spec, sheet_path: str | Path,
                 key_path: str | Path | None = None, *, seed: int = 0, max_items: int | None = None,
                 purpose: str = "eval") -> dict:
    """Write the blinded sheet (CSV) and its key (JSON) for the items both systems judged.

    Rows come in a seeded random order, each with a seeded coin for which system is left; `max_items` keeps
    the first N of that order (a random sample). Returns {rows, sheet, key, skipped}: skipped = items of the
    dataset that only one system (or neither) judged.
    """
    if first == second:
        raise UsageError(f"both systems are {first}: compare two different iterations or runs")
    key_path = Path(key_path) if key_path else default_key_path(sheet_path)
    if Path(sheet_path).resolve() == key_path.resolve():
        raise UsageError("the key must be a different file from the sheet")
    items = store.items(dataset)
    a = _judgments(store, first, items["item_id"], purpose)
    b = _judgments(store, second, items["item_id"], purpose)
    rows = (items.select("item_id", "instruction", "response", "reference", "criteria")
            .join(a, on="item_id").join(b, on="item_id", suffix="_second").sort("item_id"))
    if rows.height == 0:
        raise UsageError(f"{first} and {second} judged no item of {dataset!r} in common")
    rng = np.random.default_rng(seed)
    order = rng.permutation(rows.height)[: max_items or rows.height]
    first_left = rng.random(len(order)) < 0.5
    width = len(str(len(order)))
    sheet, key_rows = [], {}
    for n, (i, left_is_first) in enumerate(zip(order, first_left), 1):
        r = rows.row(int(i), named=True)
        sides = [(r["rationale"], r["score"]), (r["rationale_second"], r["score_second"])]
        if not left_is_first:
            sides.reverse()
        sheet_id = f"s{n:0{width}d}"
        sheet.append({
            "sheet_id": sheet_id, "instruction": r["instruction"], "response": r["response"],
            "reference": r["reference"] or "", "criteria": r["criteria"] or "",
            "left_rationale": sides[0][0], "left_score": _cell(sides[0][1]),
            "right_rationale": sides[1][0], "right_score": _cell(sides[1][1]), "winner": "", "note": "",
        })
        left, right = (first, second) if left_is_first else (second, first)
        key_rows[sheet_id] = {"item_id": r["item_id"], "left": str(left), "right": str(right)}
    _write_csv(sheet_path, sheet)
    key = {"format": KEY_FORMAT, "dataset": dataset, "purpose": purpose, "sample_index": SAMPLE_INDEX,
           "side": SIDE, "seed": seed, "systems": [str(first), str(second)], "rows": key_rows}
    key_path.parent.mkdir(parents=True, exist_ok=True)
    key_path.write_text(json.dumps(key, indent=1))
    return {"rows": len(sheet), "sheet": str(sheet_path), "key": str(key_path),
            "skipped": items.height - rows.height}


def _cell(score) -> str:
    return "" if score is None else str(int(score))


def _write_csv(path: str | Path, rows: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # utf-8-sig: spreadsheet programs read the BOM as "this is UTF-8" and show non-ASCII text correctly.
    with path.open("w", newline="", encoding="utf-8-sig") as f:
        writer = csv.DictWriter(f, fieldnames=SHEET_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


# ------------------------------------------------------------------ score


def read_key(path: str | Path) -> dict:
    try:
        key = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: not a JSON key file ({e})") from None
    if not isinstance(key, dict) or key.get("format") != KEY_FORMAT:
        raise UsageError(f"{path}: not a side-by-side key (expected format {KEY_FORMAT!r})")
    return key


def read_sheet(path: str | Path, key: dict) -> list[tuple[str, str]]:
    """(sheet_id, winner) of each filled row; winner '' for a row not filled yet. Spreadsheet row numbers
    (the header is row 1) name a bad row."""
    out, seen = [], set()
    with Path(path).open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        missing = {"sheet_id", "winner"} - set(reader.fieldnames or ())
        if missing:
            raise UsageError(f"{path}: no column(s) {sorted(missing)}")
        for row_no, row in enumerate(reader, 2):
            sheet_id = (row["sheet_id"] or "").strip()
            winner = (row["winner"] or "").strip().lower()
            where = f"{path} row {row_no} (sheet_id {sheet_id!r})"
            if sheet_id not in key["rows"]:
                raise UsageError(f"{where}: sheet_id is not in the key")
            if sheet_id in seen:
                raise UsageError(f"{where}: sheet_id appears twice")
            if winner and winner not in WINNERS:
                raise UsageError(f"{where}: winner {row['winner']!r} is not one of {', '.join(WINNERS)} (or empty)")
            seen.add(sheet_id)
            out.append((sheet_id, winner))
    return out


def score_sheets(sheets: list[str | Path], key_path: str | Path, *, bootstrap: int = 2000, seed: int = 0) -> dict:
    """Win rates of the two systems from one or more filled sheets of one key.

    Returns {dataset, annotations, items, unfilled, ties, systems: [{system, wins, losses, ties, win_rate,
    win_rate_lo, win_rate_hi, decisive_win_rate}, ...], sheets: {path: {annotations, unfilled}}}.
    win_rate = (wins + ties / 2) / annotations; decisive_win_rate = wins / (wins + losses).
    """
    key = read_key(key_path)
    first = key["systems"][0]
    per_item: dict[str, list[float]] = {}  # sheet_id -> first system's points per annotation (1, 0.5, 0)
    unfilled, per_sheet = 0, {}
    wins = {s: 0 for s in key["systems"]}
    ties = 0
    for path in sheets:
        filled = 0
        rows = read_sheet(path, key)
        for sheet_id, winner in rows:
            if not winner:
                unfilled += 1
                continue
            filled += 1
            if winner == "tie":
                ties += 1
                points = 0.5
            else:
                winner_system = key["rows"][sheet_id][winner]
                wins[winner_system] += 1
                points = 1.0 if winner_system == first else 0.0
            per_item.setdefault(sheet_id, []).append(points)
        per_sheet[str(path)] = {"annotations": filled, "unfilled": len(rows) - filled}
    n = sum(len(v) for v in per_item.values())
    rate = sum(sum(v) for v in per_item.values()) / n if n else float("nan")
    lo, hi = _item_bootstrap(list(per_item.values()), bootstrap, seed)
    systems = []
    for s, other in zip(key["systems"], reversed(key["systems"])):
        is_first = s == first
        decisive = wins[s] + wins[other]
        systems.append({
            "system": s, "wins": wins[s], "losses": wins[other], "ties": ties,
            "win_rate": rate if is_first else 1 - rate,
            "win_rate_lo": lo if is_first else 1 - hi,
            "win_rate_hi": hi if is_first else 1 - lo,
            "decisive_win_rate": wins[s] / decisive if decisive else float("nan"),
        })
    return {"dataset": key["dataset"], "annotations": n, "items": len(per_item), "unfilled": unfilled,
            "ties": ties, "systems": systems, "sheets": per_sheet}


def _item_bootstrap(points: list[list[float]], bootstrap: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of sum(points) / count(points) with items (not annotations) resampled."""
    sums = np.array([sum(p) for p in points], dtype=float)
    counts = np.array([len(p) for p in points], dtype=float)
    got = percentile_bootstrap(lambda idx: {"win_rate": sums[idx].sum(axis=1) / counts[idx].sum(axis=1)},
                               len(points), bootstrap=bootstrap, seed=seed)
    return got.get("win_rate", (float("nan"), float("nan")))
