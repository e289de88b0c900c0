"""Checks on the shipped demo dataset (engine/data/demo.jsonl): shape, gold labels, splits, rubrics, length bias."""

from __future__ import annotations

import importlib.resources
import json
from collections import Counter, defaultdict

import pytest

from store.store import RUBRIC_KEYS

KEYS = {
    "instruction",
    "response",
    "reference",
    "criteria",
    "score1_description",
    "score2_description",
    "score3_description",
    "score4_description",
    "score5_description",
    "gold_score",
    "gold_feedback",
    "split",
    "rubric_name",
    "topic",
}
TEXT_KEYS = KEYS - {"gold_score"}
SCORES = {1, 2, 3, 4, 5}


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    resource = importlib.resources.files("engine") / "data" / "demo.jsonl"
    text = resource.read_bytes().decode("utf-8")
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        assert line.strip(), f"blank line {lineno}"
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as exc:  # pragma: no cover - message only
            pytest.fail(f"line {lineno} is not valid JSON: {exc}")
    return out


def _by_instruction(rows: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["instruction"]].append(r)
    return groups


def _ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties get the average rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _spearman(x: list[float], y: list[float]) -> float:
    rx, ry = _ranks(x), _ranks(y)
    n = len(x)
    mx, my = sum(rx) / n, sum(ry) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    return cov / (vx * vy) ** 0.5


def test_spearman_helper():
    assert _spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert _spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert _ranks([5, 1, 5, 3]) == [3.5, 1.0, 3.5, 2.0]


def test_rows_have_exact_keys_and_types(rows):
    assert rows, "demo.jsonl is empty"
    for i, r in enumerate(rows):
        assert set(r) == KEYS, f"row {i}: keys {sorted(set(r) ^ KEYS)}"
        assert type(r["gold_score"]) is int and r["gold_score"] in SCORES, f"row {i}: gold_score {r['gold_score']!r}"
        for k in TEXT_KEYS:
            assert isinstance(r[k], str) and r[k].strip(), f"row {i}: {k} empty or not a string"
        assert r["split"] in {"train", "eval"}, f"row {i}: split {r['split']!r}"


def test_one_response_per_score_and_single_split(rows):
    for instr, group in _by_instruction(rows).items():
        assert sorted(r["gold_score"] for r in group) == [1, 2, 3, 4, 5], instr
        for k in ("split", "reference", "rubric_name", "topic"):
            assert len({r[k] for r in group}) == 1, f"{instr!r}: {k} differs across its responses"


def test_rows_grouped_by_instruction(rows):
    seen: list[str] = []
    for r in rows:
        if not seen or seen[-1] != r["instruction"]:
            assert r["instruction"] not in seen, f"instruction split across the file: {r['instruction']!r}"
            seen.append(r["instruction"])


def test_counts(rows):
    groups = _by_instruction(rows)
    assert len(groups) >= 40
    rubrics = {r["rubric_name"] for r in rows}
    assert len(rubrics) >= 6
    assert {
        "factual_accuracy",
        "helpfulness",
        "harmlessness",
        "code_correctness",
        "conciseness",
        "instruction_following",
    } <= rubrics


def test_rubric_text_consistent(rows):
    texts: dict[str, set[tuple[str, ...]]] = defaultdict(set)
    for r in rows:
        texts[r["rubric_name"]].add(tuple(r[k] for k in RUBRIC_KEYS))
    for name, variants in texts.items():
        assert len(variants) == 1, f"rubric {name} has {len(variants)} different texts"
    # distinct rubric names must not share a criteria sentence
    criteria = [next(iter(v))[0] for v in texts.values()]
    assert len(set(criteria)) == len(criteria)


def test_splits(rows):
    rubrics = {r["rubric_name"] for r in rows}
    eval_rows = [r for r in rows if r["split"] == "eval"]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert {r["rubric_name"] for r in eval_rows} == rubrics, "eval split must cover every rubric"
    assert len(_by_instruction(eval_rows)) >= 8
    assert len(train_rows) >= 32
    assert {r["gold_score"] for r in train_rows} == SCORES
    assert Counter(r["gold_score"] for r in train_rows)[1] == len(train_rows) // 5


def test_no_duplicate_responses(rows):
    dupes = [resp for resp, n in Counter(r["response"] for r in rows).items() if n > 1]
    assert not dupes, dupes[:3]


def test_length_does_not_predict_score(rows):
    lengths = [len(r["response"]) for r in rows]
    scores = [r["gold_score"] for r in rows]
    rho = _spearman(lengths, scores)
    assert abs(rho) < 0.5, f"Spearman(length, gold) = {rho:.3f}"
    train = [r for r in rows if r["split"] == "train"]
    rho_train = _spearman([len(r["response"]) for r in train], [r["gold_score"] for r in train])
    assert abs(rho_train) < 0.5, f"train Spearman(length, gold) = {rho_train:.3f}"
