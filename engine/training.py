"""DPO on curated judgment pairs (TRL `DPOTrainer`), written as one idempotent stage.

    pairs = [{"prompt": [{"role": "system", ...}, {"role": "user", ...}],
              "chosen": "<rationale> [RESULT] 4", "rejected": "<rationale> [RESULT] 1"}, ...]
    metrics = train_dpo(policy_path="runs/r1/iter0", reference_path=None, pairs=pairs,
                        cfg=TrainingConfig(), out_dir=Path("runs/r1/iter1"))

The output dir is a plain full checkpoint (LoRA adapters are merged), so the next iteration samples from it
like from any model dir. It also carries `selfrat_checkpoint.json`: lineage (policy, reference), the
TrainingConfig, the pair count and the run's metrics. The dir appears atomically (trained in a `.tmp` sibling,
then `os.replace`d), so a present `selfrat_checkpoint.json` means a finished stage, and calling `train_dpo`
again returns its stored metrics without training.

Precision: the weights are always loaded and trained in fp32 (master weights); `bf16` means bf16 autocast
(TRL's `bf16=True`), not bf16 weights. With lr ~5e-6, Adam's per-step update is below bf16's resolution for
weights of size ~1e-2 (ulp ~8e-5), so pure-bf16 weights would silently drop most updates, and merging a small
LoRA delta into bf16 weights rounds it away the same way. fp32 copies of a 135M judge cost ~2 GB on GPU.
On CPU, `auto` is fp32: bf16 autocast makes a DPO step ~10x slower on AVX2 machines.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.config import TrainingConfig

if TYPE_CHECKING:  # heavy imports stay inside functions (the CLI and UI import this module)
    import datasets
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

CHECKPOINT_FILE = "selfrat_checkpoint.json"

# TRL's per-step log keys, averaged over the run and reported under "train/".
_TRL_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


def dpo_examples(pairs: Iterable[Mapping]) -> "datasets.Dataset":
    """Pairs -> TRL's conversational preference format: `prompt` is the chat (system + user), `chosen` and
    `rejected` are one assistant message each."""
    import datasets

    rows = []
    for i, p in enumerate(pairs):
        missing = {"prompt", "chosen", "rejected"} - set(p)
        if missing:
            raise ValueError(f"pair {i} lacks {sorted(missing)}")
        if not isinstance(p["prompt"], list) or not p["prompt"]:
            raise ValueError(f"pair {i}: prompt must be a non-empty list of chat messages")
        rows.append(
            {
                "prompt": [{"role": m["role"], "content": m["content"]} for m in p["prompt"]],
                "chosen": [{"role": "assistant", "content": p["chosen"]}],
                "rejected": [{"role": "assistant", "content": p["rejected"]}],
            }
        )
    return datasets.Dataset.from_list(rows)


def sequence_logprob(
    model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", messages: list[dict], completion: str
) -> float:
    """Sum of log p(completion tokens | prompt) under `model`, tokenized the way TRL's DPOTrainer does: the
    chat template over messages + the assistant turn, the completion starting where it diverges from the
    prompt rendered with the generation prompt (so the end-of-turn tokens count, as in training)."""
    import torch

    def ids(msgs: list[dict], **kw: Any) -> list[int]:
        return list(tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True, **kw)["input_ids"])

    prompt_ids = ids(messages, add_generation_prompt=True)
    full_ids = ids([*messages, {"role": "assistant", "content": completion}])
    start = 0
    while start < min(len(prompt_ids), len(full_ids)) and prompt_ids[start] == full_ids[start]:
        start += 1
    start = max(start, 1)  # the first token has no context to be predicted from
    device = next(model.parameters()).device
    input_ids = torch.tensor([full_ids], device=device)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits.float()  # (1, T, V)
    model.train(was_training)
    logps = torch.log_softmax(logits[0, :-1], dim=-1)  # (T-1, V): position t predicts token t+1
    targets = input_ids[0, 1:]  # (T-1,)
    token_logps = logps.gather(-1, targets[:, None])[:, 0]
    return float(token_logps[start - 1 :].sum())


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, not {device!r}")
    return device


def _same_model(a: str, b: str) -> bool:
    pa, pb = Path(a), Path(b)
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a == b


def _read_finished(out_dir: Path) -> dict | None:
    marker = out_dir / CHECKPOINT_FILE
    return json.loads(marker.read_text()) if marker.is_file() else None


def _summarize(log_history: list[dict], global_step: int, runtime_s: float) -> dict[str, float]:
    steps = [h for h in log_history if "loss" in h and "rewards/margins" in h]
    out = {}
    for key in _TRL_KEYS:
        vals = [float(h[key]) for h in steps if key in h]
        out[f"train/{key}"] = sum(vals) / len(vals) if vals else math.nan
    out["train/steps"] = float(global_step)
    out["train/runtime_s"] = float(runtime_s)
    return out


def train_dpo(
    *,
    policy_path: str,
    reference_path: str | None,
    pairs: Sequence[Mapping],
    cfg: TrainingConfig,
    out_dir: Path,
    device: str = "auto",
    log: Callable[[str], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """Train `policy_path` with DPO on `pairs` and save a full checkpoint to `out_dir`.

    Args:
        policy_path: the model to train (a checkpoint dir or hub id).
        reference_path: the DPO reference model. `None` or the policy's own path: a frozen copy of the
            policy (TRL's default; with LoRA, the policy with its adapter disabled).
        pairs: mappings with `prompt` (chat messages), `chosen` and `rejected` (judgment texts).
        cfg: beta, learning rate, epochs, batch size, LoRA, precision ...
        out_dir: where the checkpoint goes. If it already holds a finished checkpoint, nothing is trained
            and its stored metrics are returned.
        device: auto (cuda if available), cpu or cuda.
        log: receives one line per optimizer step ("step 3/8 loss=0.6931 margin=0.0012").
        progress: receives (steps done, total steps) at the start and after each logged step.

    Returns:
        TRL's step metrics averaged over the run, as `train/loss`, `train/rewards/{chosen,rejected,
        accuracies,margins}`, plus `train/steps` and `train/runtime_s`.
    """
    out_dir = Path(out_dir)
    say = log or (lambda _line: None)
    done = _read_finished(out_dir)
    if done is not None:
        say(f"{out_dir} already holds a finished checkpoint; not retraining")
        return {k: float(v) for k, v in done["metrics"].items()}
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not a finished selfrat checkpoint; move it away first")
    if len(pairs) == 0:
        raise ValueError("train_dpo got zero preference pairs: curation produced nothing to train on "
                         "(check the curation margin and that sampled judgments parse)")
    dataset = dpo_examples(pairs)

    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    dev = _resolve_device(device)
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if dev == "cuda" else "fp32")
    separate_ref = reference_path is not None and not _same_model(reference_path, policy_path)

    tmp_dir = out_dir.parent / f"{out_dir.name}.tmp"
    scratch = out_dir.parent / f".{out_dir.name}.trl"  # TRL's output_dir; nothing is saved there (save_strategy no)
    for d in (tmp_dir, scratch):
        shutil.rmtree(d, ignore_errors=True)  # leftovers of an interrupted run
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    load = dict(dtype=torch.float32, trust_remote_code=False)  # fp32 master weights: see the module docstring
    model = AutoModelForCausalLM.from_pretrained(policy_path, **load)
    ref_model = AutoModelForCausalLM.from_pretrained(reference_path, **load) if separate_ref else None
    tokenizer = AutoTokenizer.from_pretrained(policy_path, trust_remote_code=False)

    args = DPOConfig(
        output_dir=str(scratch),
        beta=cfg.beta,
        loss_type=["sigmoid"],
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        max_length=cfg.max_length,
        seed=cfg.seed,
        # TRL turns bf16 on unless told otherwise (even on CPU): always say which.
        bf16=precision == "bf16",
        fp16=False,
        use_cpu=dev == "cpu",
        # TRL defaults to (gradient) checkpointing; it only costs time on CPU-sized runs. transformers 5.24
        # renamed it `activation_checkpointing` and warns on the old name, which TRL's default sets.
        activation_checkpointing=dev == "cuda",
        trust_remote_code=False,
        report_to="none",
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=1,
        dataloader_num_workers=0,
        disable_tqdm=True,  # progress goes through `log`
    )
    peft_config = None
    if cfg.lora:
        peft_config = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha,
            target_modules="all-linear",  # every linear projection except the LM head
            task_type="CAUSAL_LM",
        )

    class _LineLog(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if progress:
                progress(0, state.max_steps)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if progress:
                progress(state.global_step, state.max_steps)
            if logs and "loss" in logs:
                say(
                    f"step {state.global_step}/{state.max_steps} loss={logs['loss']:.4f} "
                    f"margin={logs.get('rewards/margins', math.nan):.4f}"
                )

    say(
        f"DPO: {len(pairs)} pairs, policy={policy_path}, reference={reference_path if separate_ref else 'policy copy'}, "
        f"device={dev}, precision={precision}, lora={cfg.lora}"
    )
    try:
        trainer = DPOTrainer(
            model=model,
            ref_model=ref_model,
            args=args,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=[_LineLog()],
        )
        trainer.remove_callback(PrinterCallback)  # with tqdm off it prints every log dict; `log` replaces it
        result = trainer.train()
        metrics = _summarize(trainer.state.log_history, trainer.state.global_step, result.metrics["train_runtime"])

        trained = trainer.model
        if cfg.lora:
            trained = trained.merge_and_unload()  # plain weights: the next iteration needs no peft
        trained.config.use_cache = True
        trained.save_pretrained(tmp_dir)
        tokenizer.save_pretrained(tmp_dir)
        record = {
            "policy_path": str(policy_path),
            "reference_path": str(reference_path) if separate_ref else None,
            "n_pairs": len(pairs),
            "training": cfg.model_dump(),
            "device": dev,
            "precision": precision,
            "metrics": metrics,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        # The marker goes in last: a tmp dir without it is never mistaken for a finished checkpoint.
        (tmp_dir / CHECKPOINT_FILE).write_text(json.dumps(record, indent=2, allow_nan=True))
        if out_dir.exists():
            out_dir.rmdir()  # empty (checked above); os.replace would do it too, but only on POSIX
        os.replace(tmp_dir, out_dir)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)  # only still there if something failed
    say(f"saved {out_dir} ({metrics['train/steps']:.0f} steps, margin {metrics['train/rewards/margins']:.4f})")
    return metrics
