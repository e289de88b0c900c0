"""Blinded side-by-side: the exported sheet is blind, the key unblinds it, scoring gives known win rates."""

from __future__ import annotations

import csv
import json

import polars as pl
import pytest

from engine.sxs import Spec, default_key_path, export_sheet, parse_spec, read_key, score_sheets
from engine.workspace import Workspace
from store import judgment_id
from store.store import ITEM_COLUMNS, JUDGMENT_COLUMNS

from helpers import cli

N_ITEMS = 6


def _items() -> pl.DataFrame:
    rows = []
    for i in range(N_ITEMS):
        row = {c: None for c in ITEM_COLUMNS}
        row.update(item_id=100 + i, content_hash=f"h{i}", dataset="d", split="eval", kind="absolute",
                   instruction=f"instruction {i}", response=f"response {i}", criteria="Is it correct?",
                   gold_score=3.0, source_row=i + 1)
        rows.append(row)
    return pl.DataFrame(rows, schema={c: (pl.Float64 if c == "gold_score" else pl.Int64
                                          if c in ("item_id", "source_row") else pl.String) for c in ITEM_COLUMNS})


def _judgments(run_id: str, iteration: int, items: range) -> list[dict]:
    rows = []
    for i in items:
        for k in (0, 1):  # sample 1 must never reach the sheet
            row = {c: None for c in JUDGMENT_COLUMNS}
            item = 100 + i
            row.update(judgment_id=judgment_id(run_id, iteration, "eval", item, "a", k), run_id=run_id,
                       iteration=iteration, purpose="eval", item_id=item, side="a", sample_index=k, model="m",
                       rationale=f"rationale {run_id} it{iteration} item{i} sample{k}",
                       text=f"text {run_id} {iteration} {i} {k}", score=1 + (i + iteration) % 5, parse_status="ok",
                       forced=False)
            rows.append(row)
    return rows


@pytest.fixture
def ws(tmp_path):
    workspace = Workspace.open(tmp_path / "ws")
    store = workspace.store()
    store.import_items("d", "absolute", _items(), source="x", preset=None, source_rows=N_ITEMS)
    store.insert_judgments(_judgments("r", 0, range(N_ITEMS)))
    store.insert_judgments(_judgments("r", 2, range(N_ITEMS - 1)))  # item 5 not judged by iteration 2
    store.insert_judgments(_judgments("s", 1, range(N_ITEMS)))
    return workspace


def _read(path) -> list[dict]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


def _write(path, rows: list[dict]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def test_export_is_blind_and_the_key_recovers_each_side(ws, tmp_path):
    sheet = tmp_path / "sxs.csv"
    res = export_sheet(ws.store(), "d", Spec("r", 0), Spec("r", 2), sheet, seed=3)
    assert res["rows"] == N_ITEMS - 1 and res["skipped"] == 1  # only items both judged
    rows, key = _read(sheet), read_key(default_key_path(sheet))
    assert [r["winner"] for r in rows] == [""] * len(rows)
    # blind: no column or cell names a run or an iteration
    assert "item_id" not in rows[0]
    text = sheet.read_text()
    assert "r:0" not in text and "r:2" not in text
    # the rationales shown are sample 0's; each row's sides are only known through the key
    sides = []
    for r in rows:
        entry = key["rows"][r["sheet_id"]]
        i = entry["item_id"] - 100
        assert r["instruction"] == f"instruction {i}"
        for side in ("left", "right"):
            run, it = entry[side].split(":")
            assert r[f"{side}_rationale"] == f"rationale {run} it{it} item{i} sample0"
            assert r[f"{side}_score"] == str(1 + (i + int(it)) % 5)
        sides.append(entry["left"])
    assert set(sides) == {"r:0", "r:2"}  # randomised: both systems appear on the left
    # the same seed writes the same sheet; another seed another assignment or order
    again = tmp_path / "again.csv"
    export_sheet(ws.store(), "d", Spec("r", 0), Spec("r", 2), again, seed=3)
    assert again.read_text() == text
    other = tmp_path / "other.csv"
    export_sheet(ws.store(), "d", Spec("r", 0), Spec("r", 2), other, seed=4)
    assert read_key(default_key_path(other))["rows"] != key["rows"]


def _fill(sheet, key: dict, winners_by_system: list[str]) -> None:
    """Fill row i so that system winners_by_system[i] wins ('tie' for a tie, '' to leave it empty)."""
    rows = _read(sheet)
    for r, want in zip(rows, winners_by_system):
        entry = key["rows"][r["sheet_id"]]
        r["winner"] = want if want in ("tie", "") else ("left" if entry["left"] == want else "right")
    _write(sheet, rows)


def test_score_gives_the_win_rate_of_a_filled_sheet(ws, tmp_path):
    sheet = tmp_path / "sxs.csv"
    export_sheet(ws.store(), "d", Spec("r", 0), Spec("r", 2), sheet, seed=1)
    key = read_key(default_key_path(sheet))
    # 5 rows: iteration 2 wins twice, iteration 0 once, one tie, one row left empty
    _fill(sheet, key, ["r:2", "r:2", "r:0", "tie", ""])
    res = score_sheets([sheet], default_key_path(sheet))
    assert res["annotations"] == 4 and res["unfilled"] == 1 and res["ties"] == 1
    first, second = res["systems"]
    assert first["system"] == "r:0" and second["system"] == "r:2"
    # ties count half: r:2 (2 + 0.5) / 4 = 0.625, r:0 (1 + 0.5) / 4 = 0.375; decisive: 2/3 and 1/3
    assert second["win_rate"] == pytest.approx(0.625) and first["win_rate"] == pytest.approx(0.375)
    assert (second["wins"], second["losses"], second["ties"]) == (2, 1, 1)
    assert second["decisive_win_rate"] == pytest.approx(2 / 3)
    assert second["win_rate_lo"] <= 0.625 <= second["win_rate_hi"]
    assert first["win_rate_lo"] == pytest.approx(1 - second["win_rate_hi"])
    # a second annotator who always prefers r:0: pooled over 8 annotations (2 + 0.5) / 8
    sheet2 = tmp_path / "annotator2.csv"
    sheet2.write_bytes(sheet.read_bytes())
    _fill(sheet2, key, ["r:0", "r:0", "r:0", "r:0", ""])
    both = score_sheets([sheet, sheet2], default_key_path(sheet))
    assert both["annotations"] == 8 and both["items"] == 4
    assert both["systems"][1]["win_rate"] == pytest.approx(2.5 / 8)


def test_invalid_winner_is_rejected_naming_the_row(ws, tmp_path):
    sheet = tmp_path / "sxs.csv"
    export_sheet(ws.store(), "d", Spec("r", 0), Spec("r", 2), sheet)
    rows = _read(sheet)
    rows[0]["winner"], rows[1]["winner"] = "Left ", "both"  # case and spaces are fine; 'both' is not
    _write(sheet, rows)
    with pytest.raises(ValueError, match=rf"row 3 \(sheet_id '{rows[1]['sheet_id']}'\): winner 'both'"):
        score_sheets([sheet], default_key_path(sheet))
    rows[1]["winner"], rows[2]["sheet_id"] = "tie", "s99"
    _write(sheet, rows)
    with pytest.raises(ValueError, match="row 4 .*not in the key"):
        score_sheets([sheet], default_key_path(sheet))


def test_two_runs_and_spec_parsing(ws, tmp_path):
    assert parse_spec("r:2") == Spec("r", 2) and parse_spec("2", default_run="r") == Spec("r", 2)
    assert parse_spec("a:b:1") == Spec("a:b", 1)
    for bad in ("2", "r:x", "r:-1"):
        with pytest.raises(ValueError, match="system"):
            parse_spec(bad)
    res = export_sheet(ws.store(), "d", Spec("r", 0), Spec("s", 1), tmp_path / "runs.csv", max_items=3)
    assert res["rows"] == 3
    assert set(read_key(tmp_path / "runs.key.json")["systems"]) == {"r:0", "s:1"}
    with pytest.raises(ValueError, match="both systems"):
        export_sheet(ws.store(), "d", Spec("r", 0), Spec("r", 0), tmp_path / "same.csv")
    with pytest.raises(ValueError, match="r:7 has no eval judgments"):
        export_sheet(ws.store(), "d", Spec("r", 0), Spec("r", 7), tmp_path / "none.csv")


def test_cli_export_and_score(ws, tmp_path):
    sheet = tmp_path / "cli.csv"
    res = cli(ws.root, "sxs", "export", "0", "2", "--run", "r", "--dataset", "d", "--out", str(sheet))
    assert "5 rows" in res.output
    key = json.loads(default_key_path(sheet).read_text())
    _fill(sheet, key, ["r:2"] * 5)
    res = cli(ws.root, "sxs", "score", str(sheet), "--key", str(default_key_path(sheet)), "--json")
    out = json.loads(res.output)
    assert out["systems"][1]["win_rate"] == 1.0 and out["annotations"] == 5
    rows = _read(sheet)
    rows[2]["winner"] = "x"
    _write(sheet, rows)
    res = cli(ws.root, "sxs", "score", str(sheet), "--key", str(default_key_path(sheet)), code=2)
    assert "row 4" in res.output
