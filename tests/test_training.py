"""DPO stage on the tiny random Llama (CPU, a few seconds per run): checkpoint layout, lineage, idempotence,
that the policy moves toward the chosen judgments, LoRA merging, and a separate (seed) reference model."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from engine.config import TrainingConfig
from engine.training import CHECKPOINT_FILE, dpo_examples, sequence_logprob, train_dpo

SYSTEM = {"role": "system", "content": "You are a fair judge. Write feedback, then [RESULT] and a score 1-5."}
PAIRS = [
    {
        "prompt": [SYSTEM, {"role": "user", "content": f"Instruction: {q}\nResponse: {a}\nFeedback:"}],
        "chosen": f"The response answers correctly and clearly. [RESULT] {good}",
        "rejected": f"It is off topic and wrong. [RESULT] {bad}",
    }
    for q, a, good, bad in [
        ("Add 2 and 3.", "5", 5, 1),
        ("Name a primary colour.", "Red.", 4, 1),
        ("Capital of France?", "Paris.", 5, 2),
        ("Spell 'cat' backwards.", "tac", 5, 1),
    ]
]
# High LR and a few epochs so the tiny random model visibly moves; 2 pairs per step -> 2 steps per epoch.
FAST = TrainingConfig(learning_rate=1e-3, epochs=2, batch_size=2, max_length=128)
METRIC_KEYS = {
    "train/loss",
    "train/rewards/chosen",
    "train/rewards/rejected",
    "train/rewards/accuracies",
    "train/rewards/margins",
    "train/steps",
    "train/runtime_s",
}


def _margin(model_dir: Path) -> float:
    """Sum over PAIRS of log p(chosen) - log p(rejected) under the model in `model_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    return sum(
        sequence_logprob(model, tok, p["prompt"], p["chosen"]) - sequence_logprob(model, tok, p["prompt"], p["rejected"])
        for p in PAIRS
    )


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """One full fine-tuning run shared by the tests below: (out_dir, metrics, log lines)."""
    out = tmp_path_factory.mktemp("dpo") / "iter1"
    lines: list[str] = []
    metrics = train_dpo(
        policy_path=str(tiny_model_dir), reference_path=None, pairs=PAIRS, cfg=FAST, out_dir=out,
        device="cpu", log=lines.append,
    )
    return out, metrics, lines


def test_dpo_examples_conversational_format():
    ds = dpo_examples(PAIRS)
    assert ds.column_names == ["prompt", "chosen", "rejected"]
    row = ds[0]
    assert row["prompt"][0]["role"] == "system" and row["prompt"][1]["role"] == "user"
    assert row["chosen"] == [{"role": "assistant", "content": PAIRS[0]["chosen"]}]
    assert row["rejected"] == [{"role": "assistant", "content": PAIRS[0]["rejected"]}]
    with pytest.raises(ValueError, match="pair 0 lacks"):
        dpo_examples([{"prompt": PAIRS[0]["prompt"], "chosen": "x"}])


def test_checkpoint_is_loadable_and_carries_lineage(trained, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, metrics, lines = trained
    assert set(metrics) == METRIC_KEYS
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert metrics["train/steps"] == 4  # 4 pairs / batch 2 * 2 epochs
    assert not out.with_name(out.name + ".tmp").exists()
    assert not any(p.name.endswith(".trl") for p in out.parent.iterdir())  # the TRL scratch dir is cleaned up

    record = json.loads((out / CHECKPOINT_FILE).read_text())
    assert record["policy_path"] == str(tiny_model_dir)
    assert record["reference_path"] is None
    assert record["n_pairs"] == len(PAIRS)
    assert record["training"] == FAST.model_dump()
    assert record["metrics"] == metrics
    assert record["created_at"]
    AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)

    step_lines = [line for line in lines if line.startswith("step ")]
    assert len(step_lines) == 4
    assert re.fullmatch(r"step 1/4 loss=\d+\.\d+ margin=-?\d+\.\d+", step_lines[0])


def test_policy_moves_toward_chosen(trained, tiny_model_dir):
    out, _, _ = trained
    before, after = _margin(tiny_model_dir), _margin(out)
    assert after > before + 1.0, (before, after)


def test_second_call_is_a_noop(trained, tiny_model_dir):
    out, metrics, _ = trained
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    lines: list[str] = []
    again = train_dpo(
        policy_path=str(tiny_model_dir), reference_path=None, pairs=PAIRS, cfg=FAST, out_dir=out,
        device="cpu", log=lines.append,
    )
    assert again == metrics
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    assert not any(line.startswith("step ") for line in lines)


def test_seed_reference_is_used(trained, tiny_model_dir, tmp_path):
    """Iteration 2 with `reference: seed`: policy = iteration 1's checkpoint, reference = the seed. The
    policy already prefers the chosen judgments over the seed, so the very first step's margin is positive
    (with a copy of the policy as reference it would be exactly 0)."""
    policy, _, _ = trained
    out = tmp_path / "iter2"
    lines: list[str] = []
    cfg = FAST.model_copy(update={"epochs": 1.0, "batch_size": 4, "reference": "seed"})
    metrics = train_dpo(
        policy_path=str(policy), reference_path=str(tiny_model_dir), pairs=PAIRS, cfg=cfg, out_dir=out,
        device="cpu", log=lines.append,
    )
    record = json.loads((out / CHECKPOINT_FILE).read_text())
    assert record["reference_path"] == str(tiny_model_dir)
    first = next(line for line in lines if line.startswith("step 1/"))
    assert float(first.rsplit("margin=", 1)[1]) > 0.05, first
    assert metrics["train/rewards/margins"] > 0


def test_lora_is_merged_into_a_plain_checkpoint(tiny_model_dir, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "iter1"
    stale = tmp_path / "iter1.tmp"  # leftover of an interrupted run: cleared, not mistaken for output
    stale.mkdir()
    (stale / "junk").write_text("x")
    cfg = FAST.model_copy(update={"lora": True, "lora_r": 4, "lora_alpha": 8, "epochs": 1.0})
    metrics = train_dpo(
        policy_path=str(tiny_model_dir), reference_path=str(tiny_model_dir), pairs=PAIRS, cfg=cfg, out_dir=out,
        device="cpu",
    )
    assert all(math.isfinite(v) for v in metrics.values())
    assert not stale.exists()
    assert not (out / "adapter_config.json").exists() and not (out / "adapter_model.safetensors").exists()
    # the same path as the policy means "a frozen copy" (with LoRA: the adapter disabled), recorded as None
    assert json.loads((out / CHECKPOINT_FILE).read_text())["reference_path"] is None

    merged = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    merged_sd, base_sd = merged.state_dict(), base.state_dict()
    assert set(merged_sd) == set(base_sd)  # no lora_A / lora_B / base_layer keys
    changed = [k for k in base_sd if not torch.equal(base_sd[k], merged_sd[k])]
    assert any("q_proj" in k for k in changed) and any("down_proj" in k for k in changed), changed
    assert not any("embed_tokens" in k or "norm" in k for k in changed), changed  # only adapted layers moved


def test_zero_pairs_is_an_error(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="zero preference pairs"):
        train_dpo(policy_path=str(tiny_model_dir), reference_path=None, pairs=[], cfg=FAST, out_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_refuses_to_overwrite_a_foreign_dir(tiny_model_dir, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(FileExistsError):
        train_dpo(policy_path=str(tiny_model_dir), reference_path=None, pairs=PAIRS, cfg=FAST, out_dir=out)


@pytest.mark.skipif(
    not __import__("torch").cuda.is_available(), reason="needs a CUDA device (bf16 autocast path)"
)
def test_cuda_bf16_smoke(tiny_model_dir, tmp_path):
    cfg = FAST.model_copy(update={"epochs": 1.0})
    metrics = train_dpo(
        policy_path=str(tiny_model_dir), reference_path=None, pairs=PAIRS, cfg=cfg, out_dir=tmp_path / "o",
        device="cuda",
    )
    record = json.loads((tmp_path / "o" / CHECKPOINT_FILE).read_text())
    assert record["precision"] == "bf16" and record["device"] == "cuda"
    assert all(math.isfinite(v) for v in metrics.values())


def test_progress_reports_steps(tiny_model_dir, tmp_path):
    """The app's job panel follows training through these (steps done, total) calls."""
    from engine.config import TrainingConfig
    from engine.training import train_dpo

    seen = []
    pairs = [{"prompt": [{"role": "user", "content": f"q{i}"}], "chosen": f"good {i} [RESULT] 5",
              "rejected": f"bad {i} [RESULT] 1"} for i in range(4)]
    train_dpo(policy_path=str(tiny_model_dir), reference_path=None, pairs=pairs,
              cfg=TrainingConfig(batch_size=2, max_length=64), out_dir=tmp_path / "ckpt",
              progress=lambda d, t: seen.append((d, t)))
    assert seen[0] == (0, 2) and seen[-1] == (2, 2)
