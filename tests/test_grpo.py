"""engine/grpo.py and `training.method: grpo`: the prompt rows and their packing into steps, rollouts stored as
judgments (M006: reward, step, group), `train_grpo` on a tiny random Llama (pairwise items in both orders), a
GRPO iteration end to end through `selfrat run`, and resume after a SIGKILL during GRPO training."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import yaml

from engine.config import ConfigError, TrainingConfig, parse_run_config
from engine.demo import demo_data_path
from engine.grpo import Rollout, grpo_rows, plan_rows, plan_steps, rollout_judgments
from store import Store, StoreError

from helpers import cli, kill_run_part_way, tiny_run_config


def demo_items(n: int) -> list[dict]:
    rows = [json.loads(line) for line in open(demo_data_path())][:n]
    return [{**r, "item_id": 100 + i, "kind": "absolute"} for i, r in enumerate(rows)]


def pairwise_item(item_id: int, label: str = "A") -> dict:
    base = demo_items(1)[0]
    return {**base, "item_id": item_id, "kind": "pairwise", "response_b": "A shorter, worse answer.",
            "label": label, "gold_score": None}


def grpo_run_config(model_dir: Path, **grpo) -> dict:
    """One GRPO iteration on 4 demo items (2 steps x 2 prompts x 2 generations of 8 tokens), evaluated on 2."""
    return tiny_run_config(model_dir, iterations=1, eval_datasets=["demo"], max_train_items=4, max_eval_items=2,
                           sampling={"max_new_tokens": 8},
                           evaluation={"bootstrap": 0},
                           training={"method": "grpo", "learning_rate": 1e-4,
                                     "grpo": {"num_generations": 2, "prompts_per_step": 2,
                                              "max_completion_length": 8, "max_steps": 2, **grpo}})


# ------------------------------------------------------------------ config and data, no model


def test_config_method_grpo_and_what_it_refuses():
    cfg = parse_run_config(grpo_run_config(Path("m")))
    assert cfg.training.method == "grpo" and cfg.training.grpo.num_generations == 2
    assert TrainingConfig().method == "dpo" and TrainingConfig().grpo.beta == 0.0  # DPO stays the default
    assert TrainingConfig().grpo.rewards.model_dump() == {"score": 1.0, "format": 0.2, "verdict": 1.0,
                                                          "consistency": 0.5}
    zero = {"score": 0, "format": 0, "verdict": 0, "consistency": 0}
    bad = {"train_dataset": "d", "training": {"method": "grpo", "distributed": {"num_processes": 2},
                                             "grpo": {"num_generations": 1, "rewards": zero}}}
    with pytest.raises(ConfigError) as e:
        parse_run_config(bad)
    message = str(e.value)
    assert "training.grpo.num_generations" in message and "training.grpo.rewards" in message
    with pytest.raises(ConfigError, match="training.distributed: method grpo trains in one process"):
        parse_run_config({**bad, "training": {"method": "grpo", "distributed": {"num_processes": 2}}})
    with pytest.raises(ConfigError, match="training.grpo.steps: unknown key"):
        parse_run_config({"train_dataset": "d", "training": {"grpo": {"steps": 3}}})


def test_rows_carry_the_reward_columns_and_steps_keep_both_orders_together():
    items = demo_items(3) + [pairwise_item(7), pairwise_item(8, "tie")]
    rows = grpo_rows(items)
    assert [(r["item_id"], r["order"]) for r in rows] == [(100, "a"), (101, "a"), (102, "a"), (7, "ab"), (7, "ba"),
                                                          (8, "ab"), (8, "ba")]
    ab, ba = rows[3], rows[4]
    assert ab["pair_key"] == ba["pair_key"] == "7" and ab["label"] == "A" and ab["gold_score"] is None
    assert "Response A" in ab["prompt"][1]["content"] and ab["prompt"] != ba["prompt"]  # the swapped order
    assert rows[0]["gold_score"] == float(items[0]["gold_score"]) and rows[0]["label"] is None
    assert rows[0]["prompt"][0]["role"] == "system" and "[RESULT]" in rows[0]["prompt"][1]["content"]

    steps = plan_steps(len(rows), 4, None, 2.0)
    assert steps == 4  # two passes over 7 prompts, 4 a step
    stream = plan_rows(rows, 4, steps, seed=1)
    assert len(stream) == 16 and stream == plan_rows(rows, 4, steps, seed=1)  # deterministic
    assert stream != plan_rows(rows, 4, steps, seed=2)
    for s in range(steps):
        step = stream[4 * s:4 * s + 4]
        orders = Counter((r["pair_key"], r["order"]) for r in step if r["kind"] == "pairwise")
        for key, order in orders:  # both orders of an item, in the same step
            assert orders[(key, "ba" if order == "ab" else "ab")] == orders[(key, order)]
    first_pass = {(r["item_id"], r["order"]) for r in stream[:8]}
    assert first_pass >= {(r["item_id"], r["order"]) for r in rows} - {(100, "a"), (101, "a"), (102, "a")}
    with pytest.raises(Exception, match="must be even"):
        plan_rows(rows, 3, 2)
    assert plan_steps(7, 4, 5, 1.0) == 5


def test_trl_args_micro_batches_and_vllm_colocate_on_a_gpu(tmp_path):
    from engine.grpo import grpo_args

    cfg = TrainingConfig(method="grpo", learning_rate=3e-6, batch_size=4, grpo={
        "num_generations": 4, "prompts_per_step": 3, "beta": 0.02, "max_completion_length": 64})
    cpu = grpo_args(cfg, dev="cpu", precision="fp32", scratch=tmp_path, steps=5, use_vllm=False)
    assert (cpu["per_device_train_batch_size"], cpu["gradient_accumulation_steps"]) == (1, 12)  # one step: 3 x 4
    assert (cpu["max_steps"], cpu["learning_rate"], cpu["beta"], cpu["num_generations"]) == (5, 3e-6, 0.02, 4)
    assert cpu["use_vllm"] is False and "vllm_mode" not in cpu and "max_length" not in cpu
    assert cpu["shuffle_dataset"] is False and cpu["use_cpu"] is True and cpu["bf16"] is False
    gpu = grpo_args(cfg, dev="cuda", precision="bf16", scratch=tmp_path, steps=5, use_vllm=False)
    assert (gpu["per_device_train_batch_size"], gpu["gradient_accumulation_steps"]) == (4, 3)  # gcd(4, 12)
    assert gpu["bf16"] is True and gpu["use_vllm"] is False
    colocated = grpo_args(cfg.model_copy(update={"grpo": cfg.grpo.model_copy(update={"learning_rate": 1e-6})}),
                          dev="cuda", precision="bf16", scratch=tmp_path, steps=5, use_vllm=True)
    assert (colocated["use_vllm"], colocated["vllm_mode"], colocated["vllm_gpu_memory_utilization"]) == (
        True, "colocate", 0.3)
    assert colocated["learning_rate"] == 1e-6  # grpo.learning_rate over training.learning_rate


def rollout(step, group, index, reward, item_id=100, side="a", score=4, status="ok") -> Rollout:
    return Rollout(item_id=item_id, side=side, kind="absolute", step=step, group_index=group, index=index,
                   sample_index=((step - 1) * 2 + group) * 2 + index, text=f"t [RESULT] {score}", completion_tokens=5,
                   truncated=False, rationale="t", score=score, verdict=None, parse_status=status, reward=reward,
                   components={"score": reward})


def test_rollouts_are_stored_as_judgments_with_reward_step_and_group(tmp_path):
    store = Store(tmp_path / "db.duckdb")
    store.create_run("g", "loop", {}, None)
    cfg = TrainingConfig(method="grpo", seed=3)
    batch = [rollout(1, 0, 0, 1.0), rollout(1, 0, 1, 0.25, score=1), rollout(1, 1, 0, 0.0, item_id=101, score=None,
                                                                           status="no_score")]
    rows = rollout_judgments(batch, run_id="g", iteration=1, model="m", cfg=cfg, precision="fp32")
    assert store.insert_judgments(rows) == 3
    assert store.insert_judgments(rollout_judgments(batch, run_id="g", iteration=1, model="m", cfg=cfg)) == 0
    got = store.rollouts("g", 1)
    assert got.select("step", "group_index", "sample_index", "reward").rows() == [(1, 0, 0, 1.0), (1, 0, 1, 0.25),
                                                                                  (1, 1, 2, 0.0)]
    j = store.judgments("g", 1, "rollout").row(0, named=True)
    assert (j["purpose"], j["seed"], j["max_new_tokens"], j["precision"], j["forced"]) == ("rollout", 3, 256,
                                                                                           "fp32", False)
    it = store.run_status("g")
    assert it["iterations"] == []  # no iteration row yet: status lists recorded iterations only
    store.ensure_iteration("g", 1)
    it1 = store.run_status("g")["iterations"][0]
    assert (it1["rollout_judgments"], it1["rollout_steps"], it1["judgments_by_purpose"]) == (3, 1, {"rollout": 3})
    assert it1["rollout_reward"] == pytest.approx(1.25 / 3)
    # other purposes' judgments have no reward, step or group
    store.insert_judgments([{**rows[0], "judgment_id": 1, "purpose": "train", "reward": None, "step": None,
                             "group_index": None}])
    assert store.judgments("g", 1, "train").select("reward", "step", "group_index").row(0) == (None, None, None)
    with pytest.raises(StoreError, match="only rollouts can be dropped"):
        store.delete_judgments("g", 1, "train")
    assert store.delete_judgments("g", 1, "rollout") == 3 and store.rollouts("g").height == 0


# ------------------------------------------------------------------ training on the tiny model


def test_train_grpo_on_both_orders_stores_rollouts_and_publishes_a_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM
    from trl.kernels import ChunkedLogProbFunction

    from engine.grpo import train_grpo

    head_rows: list[int] = []  # rows the LM head scored per call (engine/completion_head.py: completions only)
    real = ChunkedLogProbFunction.apply
    monkeypatch.setattr(ChunkedLogProbFunction, "apply", lambda h, *a: head_rows.append(h.shape[0]) or real(h, *a))

    # 2 steps planned, but a time budget that the first step exhausts: training stops after it
    cfg = TrainingConfig(method="grpo", learning_rate=1e-4, grpo={
        "num_generations": 2, "prompts_per_step": 2, "max_completion_length": 8, "max_steps": 2, "max_time_s": 0.01})
    out = tmp_path / "checkpoints" / "iter-1"
    got, started, lines = [], [], []
    metrics = train_grpo(policy_path=str(tiny_model_dir), items=[pairwise_item(7)], cfg=cfg, out_dir=out,
                         device="cpu", log=lines.append, on_rollouts=got.extend, on_start=lambda: started.append(1))
    assert started == [1] and len(got) == 4
    assert [(r.step, r.group_index, r.index, r.side) for r in got] == [(1, 0, 0, "ab"), (1, 0, 1, "ab"),
                                                                     (1, 1, 0, "ba"), (1, 1, 1, "ba")]
    assert [r.sample_index for r in got] == [0, 1, 2, 3]
    for r in got:  # both orders in the step: every reward applies (a random model parses nothing: all 0)
        assert r.components == {"score": None, "format": 0.0, "verdict": 0.0, "consistency": 0.0}
        assert r.reward == 0.0
        assert r.completion_tokens <= 8 and r.parse_status in ("no_score", "truncated", "out_of_range", "ambiguous")
    assert metrics["train/steps"] == 1 and metrics["train/rollouts"] == 4 and metrics["train/prompts"] == 2
    # 4 rollouts of <= 8 tokens over judge prompts of hundreds: the head never ran over a prompt
    assert head_rows and all(0 < n <= 4 * 8 for n in head_rows), head_rows
    assert metrics["train/stopped_by_time"] == 1.0
    assert any(line.startswith("step 1/2 reward=") for line in lines)
    assert any(line.startswith("time budget of 0 s reached after step 1") for line in lines)
    record = json.loads((out / "selfrat_checkpoint.json").read_text())
    assert record["kind"] == "grpo" and record["precision"] == "fp32" and record["generation"] == "transformers"
    AutoModelForCausalLM.from_pretrained(out)  # a plain checkpoint
    again = train_grpo(policy_path=str(tiny_model_dir), items=[pairwise_item(7)], cfg=cfg, out_dir=out,
                       device="cpu", on_rollouts=got.extend, on_start=lambda: started.append(2))
    assert again == metrics and started == [1] and len(got) == 4  # finished: nothing trained or sampled


def test_a_grpo_iteration_end_to_end_through_selfrat_run(demo_ws, tiny_model_dir, tmp_path):
    ws = demo_ws
    cfg_path = tmp_path / "grpo.yaml"
    cfg_path.write_text(yaml.safe_dump(grpo_run_config(tiny_model_dir)))
    cli(ws, "run", str(cfg_path), "--run-id", "g")
    status = json.loads(cli(ws, "status", "g", "--json").output)
    assert status["status"] == "done" and [it["index"] for it in status["iterations"]] == [0, 1]
    it1 = status["iterations"][1]
    assert it1["stages"] == {"sample": "skipped", "curate": "skipped", "train": "done", "evaluate": "done"}
    assert it1["train_judgments"] == 0 and sum(it1["pairs"].values()) == 0
    assert (it1["rollout_judgments"], it1["rollout_steps"]) == (2 * 2 * 2, 2)
    assert it1["judgments_by_purpose"] == {"rollout": 8, "eval": 2}
    assert set(it1["metrics"]["demo"]) >= {"pearson", "exact", "parse_failure_rate"}  # evaluated like DPO's
    assert f"GRPO rollouts: 8 over 2 steps, mean reward {it1['rollout_reward']:.3f}" in cli(ws, "status", "g").output

    store = Store.in_workspace(ws)
    rollouts = store.rollouts("g", 1)
    assert rollouts["reward"].is_not_null().all() and rollouts["reward"].is_between(0, 1).all()
    assert sorted(Counter(rollouts["step"].to_list()).items()) == [(1, 4), (2, 4)]
    assert sorted(Counter(zip(rollouts["step"], rollouts["group_index"])).values()) == [2, 2, 2, 2]
    assert rollouts["sample_index"].to_list() == list(range(8))
    judged = store.judgments("g", 1, "rollout")
    assert set(judged["model"]) == {str(tiny_model_dir.resolve())} and set(judged["precision"]) == {"fp32"}
    assert judged["raw_text"].is_not_null().all() and judged["parse_status"].is_not_null().all()
    train_items = set(store.items("demo", "train").head(4)["item_id"].to_list())
    assert set(judged["item_id"].to_list()) <= train_items

    row = store.iteration("g", 1)
    assert row["curate_report"]["method"] == "grpo" and "no curation" in row["curate_report"]["reason"]
    assert row["train_metrics"]["train/steps"] == 2 and row["train_metrics"]["train/rollouts"] == 8
    ckpt = Path(it1["checkpoint"])
    assert ckpt == ws / "runs" / "g" / "checkpoints" / "iter-1"
    assert json.loads((ckpt / "selfrat_checkpoint.json").read_text())["kind"] == "grpo"
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(ckpt)
    log = (ws / "runs" / "g" / "run.log").read_text()
    assert "[iter 1] sample: skipped (training.method grpo" in log and "[iter 1] train: GRPO on 4 items" in log
    # a rerun changes nothing
    cli(ws, "resume", "g")
    assert store.rollouts("g", 1).height == 8 and "[iter 1] train: already done" in (
        ws / "runs" / "g" / "run.log").read_text()


def test_resume_after_sigkill_during_grpo_training(demo_ws, tiny_model_dir, tmp_path):
    ws = demo_ws
    cfg = grpo_run_config(tiny_model_dir, prompts_per_step=1)  # 2 steps x 1 prompt x 2 generations
    cfg["evaluate_initial"] = False  # straight to training
    cfg_path = tmp_path / "grpo.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    seen = kill_run_part_way(ws, cfg_path, "k", lambda store: store.rollouts("k", 1).height, bool, timeout_s=240)
    assert 0 < seen < 4, f"never caught GRPO half-way (saw {seen} rollouts)"
    store = Store.in_workspace(ws)
    assert store.run("k")["status"] == "running"  # killed hard: nothing got to mark it
    assert store.iteration("k", 1)["train_status"] == "running"
    assert not (ws / "runs" / "k" / "checkpoints" / "iter-1").exists()
    cli(ws, "resume", "k")
    rollouts = store.rollouts("k", 1)
    assert rollouts.height == 4 and rollouts["judgment_id"].n_unique() == 4  # none lost, none twice
    assert sorted(Counter(rollouts["step"].to_list()).items()) == [(1, 2), (2, 2)]
    it1 = store.run_status("k")["iterations"][1]
    assert it1["stages"]["train"] == "done" and it1["rollout_judgments"] == 4
    assert store.run("k")["status"] == "done"
    assert "dropped 2 rollouts of an interrupted attempt" in (ws / "runs" / "k" / "run.log").read_text()
