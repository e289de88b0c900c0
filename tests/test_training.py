"""Training stages on the tiny random Llama (CPU, a few seconds per run). DPO: checkpoint layout, lineage,
idempotence, that the policy moves toward the chosen judgments, LoRA merging, a separate (seed) reference model,
and the loss options (sigmoid+sft, label smoothing) checked against hand-computed first-step losses. Seed SFT:
examples from gold feedback, that training raises the gold judgments' log-probability with the loss on the
completion only, and the checkpoint."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest

from engine.config import SFTConfig, TrainingConfig
from engine.prompts import absolute_messages
from engine.training import (
    CHECKPOINT_FILE,
    dpo_examples,
    dpo_loss_terms,
    invalid_sft_items,
    sequence_logprob,
    sft_examples,
    token_logprobs,
    train_dpo,
    train_sft,
)

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
        sequence_logprob(model, tok, p["prompt"], p["chosen"])
        - sequence_logprob(model, tok, p["prompt"], p["rejected"])
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


def test_initial_reference_is_used(trained, tiny_model_dir, tmp_path):
    """Iteration 2 with `reference: initial`: policy = iteration 1's checkpoint, reference = the initial
    judge. The policy already prefers the chosen judgments over the initial judge, so the very first step's
    margin is positive (with a copy of the policy as reference it would be exactly 0)."""
    policy, _, _ = trained
    out = tmp_path / "iter2"
    lines: list[str] = []
    cfg = FAST.model_copy(update={"epochs": 1.0, "batch_size": 4, "reference": "initial"})
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


# --- DPO loss options -------------------------------------------------------------------------------------


def _first_step(policy: str, reference: str | None, cfg: TrainingConfig, out: Path) -> tuple[dict, dict]:
    """One DPO step on all PAIRS (batch 4): (metrics, checkpoint record). With one step the run's averages
    are the first step's loss and margin, computed before any update."""
    cfg = cfg.model_copy(update={"epochs": 1.0, "batch_size": len(PAIRS), "max_length": 256})
    metrics = train_dpo(policy_path=policy, reference_path=reference, pairs=PAIRS, cfg=cfg, out_dir=out, device="cpu")
    assert metrics["train/steps"] == 1
    return metrics, json.loads((out / CHECKPOINT_FILE).read_text())


def test_dpo_loss_terms_map_onto_trl():
    assert dpo_loss_terms(TrainingConfig()) == {"loss_type": ["sigmoid"], "loss_weights": [1.0], "label_smoothing": 0.0}
    terms = dpo_loss_terms(TrainingConfig(loss="sigmoid+sft", sft_weight=0.5, label_smoothing=0.25))
    assert terms["loss_type"] == ["sigmoid", "robust", "sft"]
    assert terms["loss_weights"] == pytest.approx([1.5, -0.5, 0.5])
    assert terms["label_smoothing"] == 0.25


def _model_and_tokenizer(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)


def test_sigmoid_plus_sft_adds_the_chosen_nll(tiny_model_dir, tmp_path):
    """Policy == reference at step 1, so the DPO term is exactly log 2 (what plain sigmoid would log); the NLL
    term is TRL's mean over all chosen tokens of the batch, computed here by hand from the untrained model."""
    model, tok = _model_and_tokenizer(tiny_model_dir)
    chosen = [lp for p in PAIRS for lp in token_logprobs(model, tok, p["prompt"], p["chosen"])[1]]
    nll = -sum(chosen) / len(chosen)  # ~10.8 for the random model

    cfg = FAST.model_copy(update={"loss": "sigmoid+sft", "sft_weight": 0.5})
    metrics, record = _first_step(str(tiny_model_dir), None, cfg, tmp_path / "mixed")
    assert metrics["train/loss"] == pytest.approx(math.log(2) + 0.5 * nll, rel=1e-4), (metrics, nll)
    assert record["training"]["loss"] == "sigmoid+sft" and record["training"]["sft_weight"] == 0.5
    assert record["trl_loss"] == {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5], "label_smoothing": 0.0}


def test_label_smoothing_is_conservative_dpo(trained, tiny_model_dir, tmp_path):
    """cDPO's loss is -log s(x) + e*x for x = beta * margin: computed by hand from the policy (iteration 1) and
    the reference (the seed), it must equal the first step's loss. Ignoring e (TRL's sigmoid alone) or TRL's
    robust loss (-log s(x) - e/(1-2e)*x) would miss it by 0.3 * mean(x) or more."""
    policy, ref = _model_and_tokenizer(trained[0]), _model_and_tokenizer(tiny_model_dir)

    def logratio(p: dict, side: str) -> float:
        return sequence_logprob(*policy, p["prompt"], p[side]) - sequence_logprob(*ref, p["prompt"], p[side])

    x = [FAST.beta * (logratio(p, "chosen") - logratio(p, "rejected")) for p in PAIRS]
    e = 0.3
    expected = sum(math.log1p(math.exp(-xi)) + e * xi for xi in x) / len(x)  # -log s(x) = log(1 + e^-x)

    cfg = FAST.model_copy(update={"label_smoothing": e})
    metrics, record = _first_step(str(trained[0]), str(tiny_model_dir), cfg, tmp_path / "smoothed")
    assert metrics["train/rewards/margins"] == pytest.approx(sum(x) / len(x), abs=1e-4)
    assert sum(x) / len(x) > 0.05  # the smoothing term is visible
    assert metrics["train/loss"] == pytest.approx(expected, abs=1e-4), (metrics, x)
    assert record["training"]["label_smoothing"] == e
    assert record["trl_loss"] == {"loss_type": ["sigmoid", "robust"], "loss_weights": pytest.approx([1.4, -0.4]),
                                  "label_smoothing": e}


# --- Seed SFT ---------------------------------------------------------------------------------------------


def _item(item_id: int, instruction: str, response: str, gold: float | None, feedback: str | None, **kw) -> dict:
    return {
        "item_id": item_id, "source_row": item_id + 100, "instruction": instruction, "response": response,
        "reference": None, "criteria": None, "score1_description": None, "score2_description": None,
        "score3_description": None, "score4_description": None, "score5_description": None,
        "gold_score": gold, "gold_feedback": feedback, **kw,
    }


ITEMS = [
    _item(1, "Add 2 and 3.", "5", 5.0, "The response gives the correct sum with no errors."),
    _item(2, "Name a primary colour.", "Green.", 2.5, "Green is not a primary colour of paint; partly off."),
    _item(3, "Capital of France?", "Lyon.", 1.0, "The response names the wrong city entirely."),
    _item(4, "Spell 'cat' backwards.", "tac", 4.4, "Correct reversal, though terse."),
]
# Short prompts (the real judge prompt is ~400 tokens, ~3 s a step here) and a high LR so the tiny random model
# visibly moves in 4 steps: 4 examples, 2 per step, 2 epochs; cosine with one warmup step.
SFT_EXAMPLES = [
    {"prompt": PAIRS[i]["prompt"], "completion": f"{it['gold_feedback']} [RESULT] {math.floor(it['gold_score'] + 0.5)}"}
    for i, it in enumerate(ITEMS)
]
SFT_FAST = SFTConfig(dataset="t", learning_rate=1e-2, epochs=2, batch_size=2, max_length=256, warmup_ratio=0.25)
SFT_KEYS = {"sft/loss", "sft/final_loss", "sft/steps", "sft/runtime_s", "sft/examples", "sft/token_accuracy"}


def _frame(items: list[dict]):
    import polars as pl

    return pl.DataFrame(items, infer_schema_length=None)


def test_sft_examples_prompt_and_rounded_target():
    examples = sft_examples(_frame(ITEMS))
    assert [e["item_id"] for e in examples] == [1, 2, 3, 4]
    assert examples[0]["prompt"] == absolute_messages(ITEMS[0])
    assert examples[1]["completion"] == "Green is not a primary colour of paint; partly off. [RESULT] 3"  # 2.5 -> 3
    assert examples[3]["completion"].endswith("[RESULT] 4")  # 4.4 -> 4


def test_sft_examples_name_every_bad_item():
    bad = [
        ITEMS[0],
        _item(7, "q", "a", 3.0, None),
        _item(8, "q", "a", 3.0, "   "),
        _item(9, "q", "a", None, "fine"),
        _item(10, "q", "a", 0.4, "fine"),  # rounds to 0
        _item(11, "q", "a", 3.0, "fine", criteria="half a rubric"),
    ]
    with pytest.raises(ValueError) as err:
        sft_examples(_frame(bad))
    msg = str(err.value)
    assert msg.startswith("5 of 6 items cannot be seed SFT examples")
    for part in ("item 7 (source row 107): no gold_feedback", "item 8 (source row 108): no gold_feedback",
                 "item 9 (source row 109): no gold_score", "item 10 (source row 110): gold_score 0.4 is not in 1..5",
                 "item 11 (source row 111): cannot build the judge prompt"):
        assert part in msg, msg
    assert "item 1 " not in msg
    assert set(invalid_sft_items(_frame(bad))) == {7, 8, 9, 10, 11}
    assert invalid_sft_items(_frame(ITEMS)) == {}


def _gold_logprob(model_dir: Path) -> float:
    """Sum over SFT_EXAMPLES of log p(completion | prompt) under the model in `model_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    return sum(sequence_logprob(model, tok, ex["prompt"], ex["completion"]) for ex in SFT_EXAMPLES)


@pytest.fixture(scope="module")
def sft_trained(tiny_model_dir, tmp_path_factory):
    """One seed SFT run: (out_dir, metrics, log lines, progress calls, the labels TRL trained on)."""
    import trl

    class Recording(trl.SFTTrainer):
        """Keeps the prepared dataset: its `labels` are what the loss is computed on (-100 = ignored)."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            recorded.extend(self.train_dataset)

    recorded: list[dict] = []
    out = tmp_path_factory.mktemp("sft") / "iter-0-sft"
    lines: list[str] = []
    seen: list[tuple[int, int]] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trl, "SFTTrainer", Recording)
        metrics = train_sft(model_path=str(tiny_model_dir), examples=SFT_EXAMPLES, cfg=SFT_FAST, out_dir=out,
                            device="cpu", log=lines.append, progress=lambda d, t: seen.append((d, t)))
    return out, metrics, lines, seen, recorded


def test_sft_raises_the_gold_judgments_logprob(sft_trained, tiny_model_dir):
    """The 4 targets have ~70 tokens at ~-10.8 nats each under the random model; 4 steps at lr 1e-2 gain ~1.4
    nats a token (~100 in all); 50 leaves room for numeric differences between machines."""
    out = sft_trained[0]
    before, after = _gold_logprob(tiny_model_dir), _gold_logprob(out)
    assert after > before + 50, (before, after)


def test_sft_loss_is_on_the_completion_only(sft_trained, tiny_model_dir):
    """Every prompt token is masked out (-100) and every completion token (through the end of turn) is a label:
    training on the whole sequence would leave the labels equal to the input ids."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    rows = sft_trained[4]
    assert len(rows) == len(SFT_EXAMPLES)
    for ex, row in zip(SFT_EXAMPLES, rows):
        prompt = tok.apply_chat_template(ex["prompt"], tokenize=True, return_dict=True, add_generation_prompt=True)
        n = len(prompt["input_ids"])
        ids, labels = row["input_ids"], row["labels"]
        assert ids[:n] == list(prompt["input_ids"])
        assert labels[:n] == [-100] * n
        assert labels[n:] == ids[n:] and len(ids) > n + 5
        assert tok.decode(ids[n:]).startswith(ex["completion"])


def test_sft_checkpoint_and_log(sft_trained, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    out, metrics, lines, seen, _ = sft_trained
    assert set(metrics) == SFT_KEYS
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert metrics["sft/steps"] == 4 and metrics["sft/examples"] == 4  # 4 examples / batch 2 * 2 epochs
    assert metrics["sft/final_loss"] < metrics["sft/loss"]  # the mean includes the early, higher losses
    assert 0.0 <= metrics["sft/token_accuracy"] <= 1.0
    record = json.loads((out / CHECKPOINT_FILE).read_text())
    assert record["kind"] == "sft"
    assert record["model_path"] == str(tiny_model_dir)
    assert record["n_examples"] == 4 and record["n_cut"] == 0
    assert record["sft"] == SFT_FAST.model_dump()
    assert record["metrics"] == metrics
    assert not out.with_name(out.name + ".tmp").exists()
    assert not any(p.name.endswith(".trl") for p in out.parent.iterdir())
    AutoModelForCausalLM.from_pretrained(out)
    step_lines = [line for line in lines if line.startswith("step ")]
    assert len(step_lines) == 4
    assert re.fullmatch(r"step 1/4 loss=\d+\.\d+ acc=\d\.\d+", step_lines[0])
    assert seen[0] == (0, 4) and seen[-1] == (4, 4)


def test_sft_second_call_is_a_noop(sft_trained, tiny_model_dir):
    out, metrics, _, _, _ = sft_trained
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    lines: list[str] = []
    again = train_sft(model_path=str(tiny_model_dir), examples=SFT_EXAMPLES, cfg=SFT_FAST, out_dir=out,
                      device="cpu", log=lines.append)
    assert again == metrics
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    assert not any(line.startswith("step ") for line in lines)


def test_sft_reports_examples_cut_at_max_length(tiny_model_dir, tmp_path):
    """max_length between the longest prompt and the shortest prompt + completion: every judgment loses its end."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = [len(tok.apply_chat_template(ex["prompt"], tokenize=True, return_dict=True, add_generation_prompt=True)
                   ["input_ids"]) for ex in SFT_EXAMPLES]
    cfg = SFT_FAST.model_copy(update={"max_length": max(prompts) + 3, "epochs": 1.0, "batch_size": 4})
    lines: list[str] = []
    train_sft(model_path=str(tiny_model_dir), examples=SFT_EXAMPLES, cfg=cfg, out_dir=tmp_path / "o", device="cpu",
              log=lines.append)
    assert any(line.startswith("warning: 4 of 4 examples are longer than max_length") for line in lines), lines
    assert json.loads((tmp_path / "o" / CHECKPOINT_FILE).read_text())["n_cut"] == 4


def test_sft_bad_input(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="zero examples"):
        train_sft(model_path=str(tiny_model_dir), examples=[], cfg=SFT_FAST, out_dir=tmp_path / "o")
    with pytest.raises(ValueError, match="example 1 lacks"):
        train_sft(model_path=str(tiny_model_dir), examples=[SFT_EXAMPLES[0], {"prompt": [SYSTEM]}], cfg=SFT_FAST,
                  out_dir=tmp_path / "o")
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(
    not __import__("torch").cuda.is_available(), reason="needs a CUDA device (bf16 autocast path)"
)
def test_sft_cuda_bf16_smoke(tiny_model_dir, tmp_path):
    cfg = SFT_FAST.model_copy(update={"lora": True})
    metrics = train_sft(model_path=str(tiny_model_dir), examples=SFT_EXAMPLES, cfg=cfg, out_dir=tmp_path / "o",
                        device="cuda")
    record = json.loads((tmp_path / "o" / CHECKPOINT_FILE).read_text())
    assert record["precision"] == "bf16" and record["device"] == "cuda"
    assert all(math.isfinite(v) for v in metrics.values())
    assert not (tmp_path / "o" / "adapter_config.json").exists()  # LoRA merged


def test_cpu_batches_run_as_accumulated_micro_batches(tmp_path):
    """On CPU a batch of B examples is B micro-batches of one, accumulated into the same optimizer step (no
    padding to the longest, one example's activations at a time); on CUDA the batch stays whole."""
    from engine.training import _trl_args

    cfg = TrainingConfig(batch_size=4, gradient_accumulation_steps=2)
    cpu = _trl_args(cfg, scratch=tmp_path, dev="cpu", precision="fp32")
    assert (cpu["per_device_train_batch_size"], cpu["gradient_accumulation_steps"]) == (1, 8)
    gpu = _trl_args(cfg, scratch=tmp_path, dev="cuda", precision="bf16")
    assert (gpu["per_device_train_batch_size"], gpu["gradient_accumulation_steps"]) == (4, 2)


@pytest.mark.parametrize(("setting", "max_length", "dev", "on"), [
    ("auto", 768, "cpu", False), ("auto", 2048, "cpu", True), ("auto", 768, "cuda", True),
    (False, 2048, "cuda", False), (True, 512, "cpu", True)])
def test_activation_checkpointing_follows_sequence_length_and_device(tmp_path, setting, max_length, dev, on):
    """Without a model to size the activations by (GRPO's arguments): on CUDA, and for max_length > 1024."""
    from engine.training import _trl_args

    for cfg in (TrainingConfig(max_length=max_length, activation_checkpointing=setting),
                SFTConfig(dataset="d", max_length=max_length, activation_checkpointing=setting)):
        assert _trl_args(cfg, scratch=tmp_path, dev=dev, precision="fp32")["activation_checkpointing"] is on


def test_activation_checkpointing_on_cpu_follows_the_memory_its_activations_need(tiny_model_dir, tmp_path,
                                                                                 monkeypatch):
    """auto on CPU with the model to size it: off where one example's activations at max_length (x2 rows for a
    DPO pair) fit in half the available memory, on where they do not; CUDA always on; a setting is kept."""
    from types import SimpleNamespace

    import psutil
    from transformers import AutoModelForCausalLM

    from engine.training import _trl_args, activation_bytes_per_token

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    per_token = activation_bytes_per_token(model)
    c = model.config
    assert per_token == c.num_hidden_layers * (16 * c.hidden_size + 4 * c.intermediate_size) * 4
    sft, dpo = SFTConfig(dataset="d", max_length=1000), TrainingConfig(max_length=1000, batch_size=4)
    sft_need, dpo_need = per_token * 1000, per_token * 1000 * 2  # CPU: micro-batches of one example

    def on(cfg, available, dev="cpu", rows=1):
        monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=available))
        return _trl_args(cfg, scratch=tmp_path, dev=dev, precision="fp32", model=model,
                         rows=rows)["activation_checkpointing"]

    assert on(sft, 2 * sft_need + 1) is False and on(sft, 2 * sft_need - 1) is True
    assert on(dpo, 2 * dpo_need + 1, rows=2) is False and on(dpo, 2 * dpo_need - 1, rows=2) is True
    assert on(dpo, 2 * dpo_need * 4 - 1, dev="mps", rows=2) is True  # elsewhere the whole batch at once
    assert on(sft, 10 ** 15, dev="cuda") is True
    assert on(sft.model_copy(update={"activation_checkpointing": True}), 10 ** 15) is True


def test_checkpointed_dpo_step_has_the_same_loss(tiny_model_dir, tmp_path):
    """Checkpointing recomputes activations; it must not change what is trained."""
    losses = {}
    for on in (False, True):
        lines: list[str] = []
        train_dpo(policy_path=str(tiny_model_dir), reference_path=None, pairs=PAIRS[:2], out_dir=tmp_path / str(on),
                  cfg=TrainingConfig(batch_size=2, max_length=256, learning_rate=1e-3, activation_checkpointing=on),
                  device="cpu", log=lines.append)
        losses[on] = [line for line in lines if line.startswith("step ")]
    assert losses[True] == losses[False] and losses[True]
