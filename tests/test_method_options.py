"""The paper-complete method wired into runs: contamination guard, fresh items per iteration, seed SFT,
baselines on the seed, relative A/B evaluation, single-stage DPO, standalone `evaluate --method`.

Most tests script the judge with `FakeSampler` (known scores -> known metrics); the model-dependent ones
use the tiny random Llama."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from engine.config import parse_run_config
from engine.iteration import Runner, create_run, run_single_stage
from engine.sampling import FakeSampler
from engine.workspace import Workspace
from store import Store, StoreError

from helpers import cli


def demo_items(ws: Path, split: str) -> pl.DataFrame:
    return Store.in_workspace(ws).items("demo", split)


def leak_file(tmp_path: Path, items: pl.DataFrame) -> Path:
    """Train items re-typed as an eval set, with case and spacing changed (still the same text)."""
    path = tmp_path / "leak.jsonl"
    rows = []
    for it in items.iter_rows(named=True):
        rows.append({"instruction": "  " + it["instruction"].upper(), "response": it["response"].replace(" ", "  "),
                     "gold_score": it["gold_score"], "criteria": it["criteria"],
                     **{f"score{k}_description": it[f"score{k}_description"] for k in range(1, 6)}})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def gold_script(ws: Path, right_samples: int = 2):
    """A judge that gives the gold score on samples < right_samples and gold+2 (or -2) otherwise."""
    golds = {it["response"]: int(it["gold_score"]) for it in Store.in_workspace(ws).items("demo").iter_rows(named=True)}

    def script(messages, index, seed):
        prompt = messages[-1]["content"]
        gold = next((g for r, g in golds.items() if r in prompt), 3)  # 3 for items not in demo
        score = gold if index < right_samples else (gold + 2 if gold <= 3 else gold - 2)
        return f"Feedback for sample {index}. [RESULT] {score}"
    return script


def config(model, **over) -> dict:
    cfg = {"model": str(model), "train_dataset": "demo", "eval_datasets": ["demo"], "iterations": 0,
           "max_eval_items": 10, "sampling": {"n": 3, "max_new_tokens": 12, "batch_size": 4, "force_score": True},
           "evaluation": {"bootstrap": 200}}
    cfg.update(over)
    return cfg


# ---------------------------------------------------------------------------------------- contamination


def test_contaminated_run_is_refused_and_allowed_runs_never_train_on_overlap(demo_ws, tmp_path, tiny_model_dir):
    leaked = demo_items(demo_ws, "train").head(3)
    cli(demo_ws, "import", str(leak_file(tmp_path, leaked)), "--dataset", "leak", "--split", "eval")
    w = Workspace.open(demo_ws)
    cfg = config(tiny_model_dir, eval_datasets=["leak"], iterations=1, max_train_items=6)
    with pytest.raises(StoreError, match=r"contamination: 3 train items of 'demo'.*leak"):
        create_run(w, parse_run_config(cfg))
    assert Store.in_workspace(demo_ws).runs().height == 0  # nothing recorded

    rid = create_run(w, parse_run_config({**cfg, "allow_contamination": True}), "leaky")
    store = Store.in_workspace(demo_ws)
    report = store.run_reports(rid)["contamination"]
    assert report["overlapping_items"] == 3 and report["sources"]["train"]["by_eval_dataset"] == {"leak": 3}
    r = Runner(w, rid, sampler_factory=lambda p: FakeSampler(gold_script(demo_ws)), echo=False)
    items = r.train_items(1)
    assert items.height == 6
    assert not set(items["item_id"]) & set(leaked["item_id"])
    r.sample(1)
    sampled = set(store.judgments(rid, 1, "train")["item_id"])
    assert sampled and not sampled & set(leaked["item_id"])  # the overlap never reaches training


def test_seed_sft_items_are_checked_too(demo_ws, tmp_path, tiny_model_dir):
    leaked = demo_items(demo_ws, "eval").head(2)
    cli(demo_ws, "import", str(leak_file(tmp_path, leaked)), "--dataset", "leak", "--split", "eval")
    cfg = config(tiny_model_dir, eval_datasets=["leak"], sft={"dataset": "demo", "split": "all"})
    with pytest.raises(StoreError, match=r"2 sft items of 'demo' \(split all\)"):
        create_run(Workspace.open(demo_ws), parse_run_config(cfg))


# ---------------------------------------------------------------------------------------- items per iteration


def test_each_iteration_samples_its_own_slice_of_items(demo_ws, tiny_model_dir):
    w = Workspace.open(demo_ws)
    cfg = parse_run_config(config(tiny_model_dir, iterations=2, train_items_per_iteration=4))
    rid = create_run(w, cfg, "sliced")
    r = Runner(w, rid, sampler_factory=lambda p: FakeSampler(gold_script(demo_ws)), echo=False)
    first, second = r.train_items(1), r.train_items(2)
    all_train = demo_items(demo_ws, "train")
    assert first["item_id"].to_list() == all_train["item_id"].to_list()[:4]
    assert second["item_id"].to_list() == all_train["item_id"].to_list()[4:8]
    many = all_train.height // 4 + 1
    with pytest.raises(StoreError, match=f"iteration {many} has no train items left"):
        r.train_items(many)


# ---------------------------------------------------------------------------------------- baselines, relative


def ab_script(ws: Path, right_samples: int = 2):
    """Absolute prompts: as gold_script. Relative prompts: always answers A (pure position bias)."""
    absolute = gold_script(ws, right_samples)

    def script(messages, index, seed):
        if "Response A" in messages[-1]["content"]:
            return "A reads better. [RESULT] A"
        return absolute(messages, index, seed)
    return script


def test_seed_baselines_are_recorded_as_method_metrics(demo_ws, tiny_model_dir):
    w = Workspace.open(demo_ws)
    cfg = config(tiny_model_dir, evaluation={"bootstrap": 200, "baselines": ["self-consistency"], "baseline_n": 3})
    rid = create_run(w, parse_run_config(cfg), "baselines")
    Runner(w, rid, sampler_factory=lambda p: FakeSampler(ab_script(demo_ws)), echo=False).run_all()
    m = Store.in_workspace(demo_ws).run_status(rid)["iterations"][0]["metrics"]["demo"]
    # Greedy = sample 0 = gold; majority of (gold, gold, gold +- 2) = gold; the mean misses by 2/3.
    assert m["exact"] == 1.0 and m["pearson"] == pytest.approx(1.0)
    assert m["self-consistency-majority/exact"] == 1.0
    assert m["self-consistency-mean/exact"] == 0.0 and m["self-consistency-mean/within1"] == 1.0
    assert m["pearson_lo"] - 1e-9 <= m["pearson"] <= m["pearson_hi"] + 1e-9
    store = Store.in_workspace(demo_ws)
    assert store.judgments(rid, 0, "baseline").height == 10 * 3
    methods = set(store.breakdowns(rid, 0)["method"])
    assert {"greedy", "self-consistency-mean", "self-consistency-majority"} <= methods


def test_evaluation_batch_size_sets_the_greedy_evaluations_batches_only(demo_ws, tiny_model_dir):
    """evaluation.batch_size: the greedy evaluation's prompts per generate call; the baselines' N samples keep
    sampling.batch_size; the figures do not depend on it."""
    calls = []

    class Counting(FakeSampler):
        def generate(self, prompts, n, params, seeds):
            calls.append((n, len(prompts)))
            return super().generate(prompts, n, params, seeds)

    metrics = {}
    for name, eval_batch in (("batched", 5), ("default", None)):
        calls.clear()
        w = Workspace.open(demo_ws)
        cfg = config(tiny_model_dir, sampling={"n": 3, "max_new_tokens": 12, "batch_size": 2, "force_score": True},
                     evaluation={"bootstrap": 0, "baselines": ["self-consistency"], "baseline_n": 3,
                                 "batch_size": eval_batch})
        rid = create_run(w, parse_run_config(cfg), name)
        Runner(w, rid, sampler_factory=lambda p: Counting(ab_script(demo_ws)), echo=False).run_all()
        metrics[name] = Store.in_workspace(demo_ws).run_status(rid)["iterations"][0]["metrics"]["demo"]
        greedy = [size for n, size in calls if n == 1]
        assert sum(greedy) == 10 and [size for n, size in calls if n == 3] == [2] * 5
        assert greedy == ([5, 5] if eval_batch else [2] * 5)  # None: sampling.batch_size, as before
    assert metrics["batched"] == metrics["default"]


def test_best_of_n_keeps_the_sample_the_meta_judge_rates_highest(demo_ws, tiny_model_dir):
    import re

    judge = gold_script(demo_ws, right_samples=0)  # every sample misses the gold by 2 ...
    golds = {it["response"]: int(it["gold_score"]) for it in demo_items(demo_ws, None).iter_rows(named=True)}

    def script(messages, index, seed):
        prompt = messages[-1]["content"]
        rated = re.search(r"Feedback for sample (\d+)\. \[RESULT\] (\d)", prompt)
        if rated:  # the meta-judge: 5 for a judgment that hits the gold, else 1
            gold = next(g for r, g in golds.items() if r in prompt)
            return f"Checked. [RESULT] {5 if int(rated.group(2)) == gold else 1}"
        if index == 2:  # ... except sample 2, which hits it
            return f"Feedback for sample 2. [RESULT] {next(g for r, g in golds.items() if r in prompt)}"
        return judge(messages, index, seed)

    w = Workspace.open(demo_ws)
    cfg = config(tiny_model_dir, evaluation={"bootstrap": 0, "baselines": ["self-consistency", "best-of-n"],
                                             "baseline_n": 3})
    rid = create_run(w, parse_run_config(cfg), "bon")
    Runner(w, rid, sampler_factory=lambda p: FakeSampler(script, model_name="judge"), echo=False).run_all()
    m = Store.in_workspace(demo_ws).run_status(rid)["iterations"][0]["metrics"]["demo"]
    assert m["exact"] == 0.0 and m["self-consistency-majority/exact"] == 0.0
    assert m["best-of-n/exact"] == 1.0
    ratings = Store.in_workspace(demo_ws).meta_ratings(rid, 0, "baseline")
    assert ratings.height == 10 * 3 and set(ratings["rater_model"]) == {"judge"}
    assert sorted(set(ratings["rating"])) == [1, 5]


def test_relative_mode_in_runs_exposes_position_bias(demo_ws, shared_data, tiny_model_dir):
    cli(demo_ws, "import", str(shared_data / "rewardbench" / "Chat.jsonl"), "--dataset", "chat", "--split", "eval")
    w = Workspace.open(demo_ws)
    cfg = config(tiny_model_dir, eval_datasets=["chat"], max_eval_items=6,
                 evaluation={"bootstrap": 0, "pairwise_modes": ["absolute", "relative"]})
    rid = create_run(w, parse_run_config(cfg), "ab")
    Runner(w, rid, sampler_factory=lambda p: FakeSampler(ab_script(demo_ws)), echo=False).run_all()
    m = Store.in_workspace(demo_ws).run_status(rid)["iterations"][0]["metrics"]["chat"]
    assert m["relative/accuracy"] == 0.0 and m["relative/tie_rate"] == 1.0
    assert m["relative/position_consistency"] == 0.0 and m["relative/first_position_rate"] == 1.0
    assert "accuracy" in m  # the absolute-to-pairwise figure beside it
    rel = Store.in_workspace(demo_ws).judgments(rid, 0, "relative")
    assert sorted(set(rel["side"])) == ["ab", "ba"] and set(rel["verdict"]) == {"A"}


def test_standalone_evaluate_method_self_consistency(demo_ws, tiny_model_dir):
    res = cli(demo_ws, "evaluate", "--model", str(tiny_model_dir), "--dataset", "demo", "--method", "self-consistency",
              "--n", "2", "--max-items", "3", "--max-new-tokens", "8", "--bootstrap", "0", "--json")
    metrics = json.loads(next(line for line in res.stdout.splitlines() if line.startswith("{")))["metrics"]["demo"]
    assert metrics["self-consistency-mean/n"] == 3 and "self-consistency-majority/exact" in metrics
    assert "pearson" not in metrics  # no greedy pass was asked for
    bad = cli(demo_ws, "evaluate", "--model", str(tiny_model_dir), "--dataset", "demo", "--method", "vibes", ok=False)
    assert bad.exit_code == 2 and "vibes" in bad.output


# ---------------------------------------------------------------------------------------- seed SFT, single stage


def test_seed_sft_becomes_the_judge_of_iteration_zero_and_single_stage_baseline(demo_ws, tiny_model_dir):
    w = Workspace.open(demo_ws)
    cfg = config(tiny_model_dir, iterations=1, train_items_per_iteration=3, max_eval_items=4,
                 sft={"dataset": "demo", "max_items": 4, "epochs": 1, "learning_rate": 1e-3, "max_length": 768},
                 curation={"min_margin": 1, "max_pairs_per_item": 1},
                 training={"epochs": 1, "batch_size": 4, "max_length": 768, "learning_rate": 1e-4})
    rid = create_run(w, parse_run_config(cfg), "sft")
    seen: list[str] = []

    def factory(path):
        seen.append(path)
        return FakeSampler(gold_script(w.root, right_samples=1), model_name=path)
    Runner(w, rid, sampler_factory=factory, echo=False).run_all()
    store = Store.in_workspace(demo_ws)
    it0, it1 = store.iterations(rid)[:2]
    sft_dir = Path(it0["checkpoint"])
    assert it0["train_status"] == "done" and sft_dir.name == "iter-0-sft"
    marker = json.loads((sft_dir / "selfrat_checkpoint.json").read_text())
    assert marker["kind"] == "sft" and marker["n_examples"] == 4
    assert it0["train_metrics"]["sft/examples"] == 4
    # J_SFT judged the seed evaluation and sampled iteration 1; DPO started from it.
    assert seen[0] == str(sft_dir) and it1["sampler_model"] == str(sft_dir)
    dpo = json.loads((Path(it1["checkpoint"]) / "selfrat_checkpoint.json").read_text())
    assert dpo["policy_path"] == str(sft_dir)
    assert store.run_reports(rid)["seed_sft"]["examples"] == 4

    # Single-stage DPO: one iteration from J_SFT on the items of all iterations at once (3 x 1 here).
    single = run_single_stage(w, rid, sampler_factory=factory, echo=False)
    child = store.run_status(f"{rid}-single-stage")
    assert child["status"] == "done" and len(child["iterations"]) == 2
    child_cfg = store.run(f"{rid}-single-stage")["config"]
    assert child_cfg["model"] == str(sft_dir) and child_cfg["sft"] is None
    assert child["iterations"][0]["stages"]["evaluate"] == "skipped"  # J_SFT was evaluated by the parent
    parent0 = store.run_status(rid)["iterations"][0]["metrics"]["demo"]
    assert parent0["single-stage-dpo/exact"] == single["demo"]["exact"]


def test_raw_baseline_judges_the_model_before_the_seed_sft(demo_ws, tiny_model_dir):
    """`baselines: [raw]` judges the base model as J_SFT is judged (same items, params, seeds), stored as
    'raw/<metric>' at iteration 0; the before/after table shows raw, J_SFT and each iteration."""
    from engine.demo import before_after_table, judge_columns

    w = Workspace.open(demo_ws)
    cfg = config(tiny_model_dir, max_eval_items=4, evaluation={"bootstrap": 0, "baselines": ["raw"]},
                 sft={"dataset": "demo", "max_items": 2, "epochs": 1, "learning_rate": 1e-3, "max_length": 768})
    rid = create_run(w, parse_run_config(cfg), "raw")
    gold = gold_script(w.root, right_samples=1)

    def factory(path):  # the raw model misses every gold score by 2; J_SFT hits it
        return FakeSampler(gold if path != str(tiny_model_dir) else (lambda m, i, s: gold(m, 1, s)), model_name=path)
    Runner(w, rid, sampler_factory=factory, echo=False).run_all()
    store = Store.in_workspace(demo_ws)
    status = store.run_status(rid)
    m = status["iterations"][0]["metrics"]["demo"]
    assert m["exact"] == 1.0 and m["raw/exact"] == 0.0 and m["raw/n"] == m["n"] == 4
    raw = store.judgments(rid, 0, "raw")
    assert raw.height == 4 and set(raw["model"]) == {str(tiny_model_dir)}
    assert [c[0] for c in judge_columns(status)] == ["raw", "J_SFT"]
    header, *rows = before_after_table(status).splitlines()
    assert header.split()[2:] == ["raw", "J_SFT"]
    exact = next(r for r in rows if r.split()[:2] == ["demo", "exact"]).split()[2:]
    assert exact == ["0.000", "1.000"]
    with pytest.raises(ValueError, match="raw is the model before the seed SFT"):
        parse_run_config(config(tiny_model_dir, evaluation={"baselines": ["raw"]}))
