"""Paired comparison of two judges (engine/compare.py, `selfrat compare`): known answers of the paired bootstrap
on judgments written straight into the store (no model), then the real CLI on a run whose iterations 0 and 1 and
seed baselines a scripted judge (FakeSampler) evaluated, checked against the figures the evaluation stored."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from engine.compare import (
    FIELDS,
    bootstrap_p,
    compare_judges,
    judge_datasets,
    parse_judge,
    significant,
    stored_judges,
)
from engine.demo import demo_data_path
from engine.importers import import_file
from engine.length import partial_correlation
from store import Store, UsageError, judgment_id

from helpers import cli, strict_json

RUN = "k"
ABSOLUTE = ["pearson", "spearman", "kendall", "exact", "within1", "partial_pearson"]


def off_by_one(gold: float) -> int:
    return int(gold) + 1 if gold < 5 else 4


def _judgment(iteration: int, purpose: str, item_id: int, k: int, score: int | None) -> dict:
    text = f"Judgment {k}. [RESULT] {score}"
    return {
        "judgment_id": judgment_id(RUN, iteration, purpose, item_id, "a", k), "run_id": RUN, "iteration": iteration,
        "purpose": purpose, "item_id": item_id, "side": "a", "sample_index": k, "model": "fake", "temperature": 0.0,
        "top_p": 1.0, "max_new_tokens": 64, "seed": k, "raw_text": text, "text": text, "rationale": "Judgment.",
        "score": score, "parse_status": "ok" if score is not None else "no_score", "forced": False,
        **{f"p{s}": float(s == score) for s in range(1, 6)},
        "prompt_tokens": 10, "completion_tokens": 5, "latency_s": 0.0,
    }


@pytest.fixture
def scored(tmp_path) -> Path:
    """12 demo eval items; run k: iteration 0 judges each one off by one, iteration 1 exactly (gold), and the
    raw model (purpose raw, iteration 0) exactly too. Written through the Store: no model, no evaluation run."""
    ws = tmp_path / "ws"
    rows = [json.loads(line) for line in open(demo_data_path())]
    src = tmp_path / "eval.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in [r for r in rows if r["split"] == "eval"][:12]))
    store = Store.in_workspace(ws)
    import_file(store, str(src), dataset="demo", split="eval")
    store.create_run(RUN, "loop", {"model": "fake", "eval_datasets": ["demo"]})
    judgments = []
    for it in (0, 1):
        store.ensure_iteration(RUN, it)
    for item_id, gold in store.items("demo").select("item_id", "gold_score").rows():
        judgments += [_judgment(0, "eval", item_id, 0, off_by_one(gold)), _judgment(1, "eval", item_id, 0, int(gold)),
                      _judgment(0, "raw", item_id, 0, int(gold))]
    store.insert_judgments(judgments)
    return ws


# ------------------------------------------------------------------ known answers of the paired bootstrap


def test_a_judge_against_itself_has_delta_0_interval_0_and_p_1(scored):
    res = compare_judges(Store.in_workspace(scored), f"{RUN}:1", f"{RUN}:1", "demo", bootstrap=500)
    assert res["items"] == 12 and res["only_a"] == res["only_b"] == 0
    assert list(res["metrics"]) == ABSOLUTE
    for name, f in res["metrics"].items():
        assert set(f) == set(FIELDS) and f["n"] == 12, name
        assert f["a"] == f["b"] and f["delta"] == 0 and (f["lo"], f["hi"]) == (0, 0) and f["p"] == 1, name
        assert not significant(f)


def test_a_judge_right_on_every_item_beats_one_off_by_one_and_the_order_negates(scored):
    store = Store.in_workspace(scored)
    forward = compare_judges(store, f"{RUN}:0", f"{RUN}:1", "demo", bootstrap=999, seed=3)
    exact = forward["metrics"]["exact"]
    assert (exact["a"], exact["b"], exact["delta"]) == (0.0, 1.0, 1.0)
    assert (exact["lo"], exact["hi"]) == (1.0, 1.0) and significant(exact)
    assert exact["p"] == pytest.approx(2 / 1000)  # no resample at or below 0: the smallest p 999 resamples give
    assert forward["metrics"]["within1"]["delta"] == 0 and forward["metrics"]["within1"]["p"] == 1
    pearson = forward["metrics"]["pearson"]
    assert pearson["b"] == pytest.approx(1.0) and 0 < pearson["a"] < 1 and pearson["delta"] > 0
    assert pearson["lo"] <= pearson["delta"] <= pearson["hi"]

    backward = compare_judges(store, f"{RUN}:1", f"{RUN}:0", "demo", bootstrap=999, seed=3)
    for name, f in forward["metrics"].items():
        g = backward["metrics"][name]
        assert (g["a"], g["b"], g["n"]) == (f["b"], f["a"], f["n"]), name
        assert g["delta"] == pytest.approx(-f["delta"]) and g["p"] == pytest.approx(f["p"]), name
        assert (g["lo"], g["hi"]) == (pytest.approx(-f["hi"]), pytest.approx(-f["lo"])), name
    # The same seed draws the same resamples: the same interval again; another seed, another draw.
    again = compare_judges(store, f"{RUN}:0", f"{RUN}:1", "demo", bootstrap=999, seed=3)
    assert json.dumps(again, sort_keys=True) == json.dumps(forward, sort_keys=True)
    other = compare_judges(store, f"{RUN}:0", f"{RUN}:1", "demo", bootstrap=999, seed=4)["metrics"]["pearson"]
    assert (other["lo"], other["hi"]) != (pearson["lo"], pearson["hi"]) and other["delta"] == pearson["delta"]


def test_p_counts_the_resamples_on_either_side_of_zero():
    assert bootstrap_p(np.zeros(50)) == 1.0
    assert bootstrap_p(np.ones(99)) == pytest.approx(2 / 100)
    assert bootstrap_p(np.array([-1.0] * 10 + [1.0] * 89)) == pytest.approx(2 * 11 / 100)
    assert bootstrap_p(np.array([np.nan, 1.0, 1.0, 1.0])) == pytest.approx(2 / 4)  # undefined ones left out
    assert math.isnan(bootstrap_p(np.array([np.nan])))


def test_resampled_partial_pearson_is_the_length_modules_figure():
    from engine.compare import _rowwise_partial

    rng = np.random.default_rng(1)
    gold = rng.integers(1, 6, 40).astype(float)
    pred = np.clip(gold + rng.integers(-1, 2, 40), 1, 5).astype(float)
    length = gold * 50 + rng.integers(0, 100, 40)
    idx = np.vstack([np.arange(40), rng.integers(0, 40, 40)])
    rows = _rowwise_partial(gold[idx], pred[idx], length[idx])
    for r, i in zip(rows, idx):
        assert r == pytest.approx(partial_correlation(gold[i], pred[i], length[i]), abs=1e-9)


def test_no_interval_without_resamples(scored):
    res = compare_judges(Store.in_workspace(scored), f"{RUN}:0", f"{RUN}:1", "demo", bootstrap=0)
    exact = res["metrics"]["exact"]
    assert exact["delta"] == 1.0 and all(math.isnan(exact[k]) for k in ("lo", "hi", "p"))


# ------------------------------------------------------------------ judges and their errors


def test_the_raw_model_is_a_judge_like_greedy(scored):
    store = Store.in_workspace(scored)
    assert stored_judges(store, RUN, 0, "demo") == [f"{RUN}:0", f"{RUN}:0:expected", f"{RUN}:0:raw",
                                                    f"{RUN}:0:length-baseline"]
    res = compare_judges(store, f"{RUN}:0:raw", f"{RUN}:1", bootstrap=200)  # the one dataset both judged
    assert res["dataset"] == "demo" and all(f["delta"] == 0 for f in res["metrics"].values())
    assert compare_judges(store, f"{RUN}:0", f"{RUN}:0:raw", "demo", metrics=["exact"],
                          bootstrap=200)["metrics"]["exact"]["delta"] == 1.0


@pytest.mark.parametrize("spec, message", [
    ("k", "judge 'k': expected RUN:ITERATION or RUN:ITERATION:METHOD"),
    ("k:one", "judge 'k:one': iteration 'one' is not a whole number"),
    ("k:-1", "judge 'k:-1': iteration '-1'"),
    ("k:0:vibes", "judge 'k:0:vibes': unknown method 'vibes'"),
    ("k:0:1:greedy", "judge 'k:0:1:greedy': expected"),
])
def test_a_bad_spec_is_named(spec, message):
    with pytest.raises(UsageError, match=message):
        parse_judge(spec)


def test_unknown_runs_iterations_methods_and_datasets_are_named(scored):
    store = Store.in_workspace(scored)
    for spec, message in (("nope:0", "judge 'nope:0': no run 'nope'"),
                          ("k:5", "judge 'k:5': run 'k' has no iteration 5"),
                          ("k:1:self-consistency-mean", "judge 'k:1:self-consistency-mean': no baseline judgments on"
                                                        " dataset 'demo'"),
                          ("k:1:raw", "no raw judgments")):
        with pytest.raises(UsageError, match=message):
            compare_judges(store, spec, "k:1", "demo")
    with pytest.raises(UsageError, match="relative .* needs a pairwise dataset"):
        compare_judges(store, "k:0:relative", "k:1", "demo")
    with pytest.raises(UsageError, match="metric 'accuracy' is not compared on absolute data"):
        compare_judges(store, "k:0", "k:1", "demo", metrics=["accuracy"])
    with pytest.raises(Exception, match="no dataset 'other'"):
        compare_judges(store, "k:0", "k:1", "other")
    assert judge_datasets(store, "k:0:length-baseline") == ["demo"]


# ------------------------------------------------------------------ the CLI on a run the evaluation scored


def _pairwise_file(path: Path) -> Path:
    rows = [{"instruction": f"Question {i}: tell me about topic {i}.",
             "response": "A full, careful answer. " * (1 + i % 3) + f"#{i}", "response_b": f"Short #{i}",
             "label": "A" if i % 2 == 0 else "B", "section": "easy" if i < 4 else "hard"} for i in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> Path:
    """demo (absolute) + pw (8 pairwise items, two sections); run r: iteration 0 (a judge off by one on greedy,
    its 3 baseline samples: off, gold, gold; relative: always A) with self-consistency and best-of-N, then
    iteration 1 (a judge exact on demo, scoring each chosen response higher) on a checkpoint it never trained."""
    from engine.config import parse_run_config
    from engine.iteration import Runner, create_run
    from engine.sampling import FakeSampler
    from engine.workspace import Workspace

    tmp = tmp_path_factory.mktemp("compare")
    ws = tmp / "ws"
    cli(ws, "import", demo_data_path(), "--dataset", "demo")
    cli(ws, "import", str(_pairwise_file(tmp / "pw.jsonl")), "--dataset", "pw", "--split", "eval")
    store = Store.in_workspace(ws)
    golds = {it["response"]: int(it["gold_score"]) for it in store.items("demo").iter_rows(named=True)}
    chosen = {(it["response"] if it["label"] == "A" else it["response_b"])
              for it in store.items("pw").iter_rows(named=True)}

    def judge(good: bool):
        def script(messages, index, seed):
            prompt = messages[-1]["content"]
            if "Response A" in prompt:
                return "A reads better. [RESULT] A"
            gold = next((g for r, g in golds.items() if r in prompt), None)
            if gold is None:  # a pairwise side
                return f"Side. [RESULT] {4 if good and any(c in prompt for c in chosen) else 2 if good else 3}"
            return f"Sample {index}. [RESULT] {gold if good or index in (1, 2) else off_by_one(gold)}"
        return script

    cfg = parse_run_config({"model": "some-org/judge", "train_dataset": "demo", "eval_datasets": ["demo", "pw"],
                            "iterations": 1, "max_eval_items": 12, "sampling": {"max_new_tokens": 40},
                            "evaluation": {"bootstrap": 0, "baselines": ["self-consistency", "best-of-n"],
                                           "baseline_n": 3, "pairwise_modes": ["absolute", "relative"]}})
    w = Workspace.open(ws)
    rid = create_run(w, cfg, "r")
    runner = Runner(w, rid, sampler_factory=lambda path: FakeSampler(judge(path == "ckpt-1")), echo=False)
    runner.evaluate(0)
    store.ensure_iteration(rid, 1)
    store.set_stage(rid, 1, "train", "done", checkpoint="ckpt-1")
    runner.evaluate(1)
    return ws


def _stored(ws: Path, iteration: int, dataset: str) -> dict[str, float]:
    return Store.in_workspace(ws).run_status("r")["iterations"][iteration]["metrics"][dataset]


def test_compare_json_is_strict_and_pairs_the_stored_figures(evaluated):
    out = strict_json(cli(evaluated, "compare", "r:0", "r:1", "--dataset", "demo", "--json").stdout)
    assert (out["a"], out["b"], out["dataset"], out["kind"], out["items"]) == ("r:0", "r:1", "demo", "absolute", 12)
    assert (out["bootstrap"], out["seed"]) == (2000, 0) and list(out["metrics"]) == ABSOLUTE
    seed, first = _stored(evaluated, 0, "demo"), _stored(evaluated, 1, "demo")
    for name, f in out["metrics"].items():
        assert set(f) == set(FIELDS), name
        assert f["a"] == pytest.approx(seed[name]) and f["b"] == pytest.approx(first[name]), name
    assert out["metrics"]["exact"]["delta"] == 1.0 and out["metrics"]["exact"]["lo"] > 0
    # What cannot be computed is null, never NaN: without resamples, no interval and no p.
    bare = strict_json(cli(evaluated, "compare", "r:0", "r:1", "--dataset", "demo", "--bootstrap", "0",
                           "--json").stdout)["metrics"]["exact"]
    assert (bare["delta"], bare["lo"], bare["hi"], bare["p"], bare["n"]) == (1.0, None, None, None, 12)

    # A baseline stored at iteration 0, on the one dataset both judged; a figure that cannot be computed is null.
    sc = strict_json(cli(evaluated, "compare", "r:0:self-consistency-mean", "r:1", "--dataset", "demo",
                         "--metric", "exact", "--metric", "pearson", "--bootstrap", "300", "--seed", "2",
                         "--json").stdout)
    assert list(sc["metrics"]) == ["pearson", "exact"] and sc["bootstrap"] == 300
    assert sc["metrics"]["exact"]["a"] == pytest.approx(seed["self-consistency-mean/exact"])
    bon = strict_json(cli(evaluated, "compare", "r:0:best-of-n", "r:0:self-consistency-majority", "--dataset",
                          "demo", "--json").stdout)
    assert bon["metrics"]["exact"]["a"] == pytest.approx(seed["best-of-n/exact"])
    assert bon["metrics"]["exact"]["b"] == pytest.approx(seed["self-consistency-majority/exact"])


def test_compare_pairwise_judges_scoring_sides_relative_verdicts_and_length(evaluated):
    seed, first = _stored(evaluated, 0, "pw"), _stored(evaluated, 1, "pw")
    out = strict_json(cli(evaluated, "compare", "r:0:relative", "r:1", "--dataset", "pw", "--json").stdout)
    assert list(out["metrics"]) == ["accuracy", "section_mean_accuracy"] and out["kind"] == "pairwise"
    acc = out["metrics"]["accuracy"]
    assert acc["a"] == seed["relative/accuracy"] == 0.0 and acc["b"] == first["accuracy"] == 1.0
    assert acc["n"] == 8 and acc["lo"] == acc["hi"] == 1.0 and acc["p"] < 0.01
    assert out["metrics"]["section_mean_accuracy"]["b"] == pytest.approx(first["section_mean_accuracy"])
    length = strict_json(cli(evaluated, "compare", "r:1:length-baseline", "r:1", "--dataset", "pw", "--json").stdout)
    assert length["metrics"]["accuracy"]["a"] == pytest.approx(first["length-baseline/accuracy"])


def test_compare_prints_a_table_marking_intervals_that_exclude_zero(evaluated):
    out = cli(evaluated, "compare", "r:0", "r:1", "--dataset", "demo", "--bootstrap", "500").stdout
    lines = out.splitlines()
    assert lines[0].startswith("demo (absolute): A = r:0, B = r:1; 12 items judged by both; 500 paired resamples")
    assert lines[1].split() == ["metric", "A", "B", "B-A", "95%", "CI", "p", "n"]
    exact = next(line for line in lines if line.split()[0] == "exact")
    assert exact.split() == ["exact", "0.000", "1.000", "+1.000", "[+1.000,", "+1.000]", "*", "0.004", "12"]
    within1 = next(line for line in lines if line.split()[0] == "within1")
    assert "*" not in within1 and within1.split()[-2:] == ["1.000", "12"]
    assert "excludes 0" in lines[-1]


def test_compare_errors_exit_2_naming_what_is_wrong(evaluated):
    several = cli(evaluated, "compare", "r:0", "r:1", ok=False, code=2)
    assert "judged several datasets in common: demo, pw; pick one with --dataset" in several.output
    for args, message in ((["r:zero", "r:1"], "judge 'r:zero'"), (["r:0", "r:1:vibes"], "judge 'r:1:vibes'"),
                          (["q:0", "r:1"], "judge 'q:0': no run 'q'"), (["r:0", "r:3"], "run 'r' has no iteration 3"),
                          (["r:1:best-of-n", "r:1", "--dataset", "demo"], "judge 'r:1:best-of-n': no baseline"),
                          (["r:0", "r:1", "--dataset", "pw", "--metric", "pearson"], "metric 'pearson' is not")):
        res = cli(evaluated, "compare", *args, ok=False, code=2)
        assert res.output.startswith("error: ") and message in res.output, res.output
        assert "Traceback" not in res.output


def test_an_interval_that_is_float_noise_around_zero_is_not_a_difference():
    assert not significant({"lo": -7e-15, "hi": -2e-15})
    assert significant({"lo": -0.2, "hi": -0.01}) and significant({"lo": 0.01, "hi": 0.3})
    assert not significant({"lo": None, "hi": 0.3}) and not significant({"lo": float("nan"), "hi": 0.3})
