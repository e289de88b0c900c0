"""Training stages, each one idempotent and atomic: the seed SFT (TRL `SFTTrainer`) that makes J_SFT from gold
rationales, and DPO on curated judgment pairs (TRL `DPOTrainer`) for every later iteration.

    examples = sft_examples(store.items("cia", "train"))     # [{"prompt": [system, user], "completion": ...}]
    metrics = train_sft(model_path="HuggingFaceTB/SmolLM2-135M-Instruct", examples=examples,
                        cfg=SFTConfig(dataset="cia"), out_dir=Path("runs/r1/checkpoints/iter-0-sft"))

    pairs = [{"prompt": [{"role": "system", ...}, {"role": "user", ...}],
              "chosen": "<rationale> [RESULT] 4", "rejected": "<rationale> [RESULT] 1"}, ...]
    metrics = train_dpo(policy_path="runs/r1/iter0", reference_path=None, pairs=pairs,
                        cfg=TrainingConfig(), out_dir=Path("runs/r1/iter1"))

The output dir is a plain full checkpoint (LoRA adapters are merged), so the next iteration samples from it
like from any model dir. It also carries `selfrat_checkpoint.json`: its kind ("sft" or "dpo"), lineage, the
stage's config, the example/pair count and the run's metrics. The dir appears atomically (trained in a `.tmp`
sibling, then `os.replace`d), so a present `selfrat_checkpoint.json` means a finished stage, and calling the
stage again returns its stored metrics without training.

DPO loss (TRL 1.16 has no `rpo_alpha`, and its `sigmoid` loss ignores `label_smoothing`; both are built from
the loss types TRL combines as `sum(w_i * loss_i)`, see `dpo_loss_terms`):
- `loss: sigmoid+sft` adds TRL's `sft` term, the mean per-token NLL of the chosen judgment, with weight
  `sft_weight` (RPO / Self-Taught Evaluator).
- `label_smoothing: e` is conservative DPO (cDPO), -(1-e) log s(x) - e log s(-x) with x = beta * margin. TRL's
  `robust` loss with the same e is (-(1-e) log s(x) + e log s(-x)) / (1-2e), so
  cDPO = 2(1-e) * sigmoid - (1-2e) * robust exactly; written out, cDPO(x) = -log s(x) + e * x.

Precision: the weights are always loaded and trained in fp32 (master weights); `bf16` means bf16 autocast
(TRL's `bf16=True`), not bf16 weights. With lr ~5e-6, Adam's per-step update is below bf16's resolution for
weights of size ~1e-2 (ulp ~8e-5), so pure-bf16 weights would silently drop most updates, and merging a small
LoRA delta into bf16 weights rounds it away the same way. fp32 copies of a 135M judge cost ~2 GB on GPU.
`auto` follows the hardware (engine/precision.py): bf16 autocast on CUDA and on CPUs that compute bf16 natively
(AMX / AVX512-BF16: a DPO step ~3x faster), fp32 on AVX2-only CPUs, where bf16 autocast is ~10x slower.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine.config import DistributedConfig, SFTConfig, TrainingConfig
from engine.devices import resolve_device, use_device
from engine.metrics import round_half_up
from engine.precision import resolve_precision
from engine.prompts import absolute_messages, format_judgment
from store.errors import UsageError

if TYPE_CHECKING:  # heavy imports stay inside functions (the CLI and UI import this module)
    import datasets
    import polars as pl
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback

CHECKPOINT_FILE = "selfrat_checkpoint.json"

# TRL's per-step log keys, averaged over the run and reported under "train/".
_TRL_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


# --- Examples -------------------------------------------------------------------------------------------


def _sft_problem(item: Mapping) -> str | None:
    """Why `item` cannot be a seed SFT example, or None if it can."""
    feedback = item.get("gold_feedback")
    if not isinstance(feedback, str) or not feedback.strip():
        return "no gold_feedback"
    gold = item.get("gold_score")
    if gold is None or isinstance(gold, bool) or not isinstance(gold, (int, float)) or math.isnan(gold):
        return "no gold_score"
    if round_half_up(gold) not in range(1, 6):
        return f"gold_score {gold} is not in 1..5"
    try:
        absolute_messages(item)
    except (KeyError, ValueError) as e:  # a missing column or a half-filled rubric
        return f"cannot build the judge prompt: {e}"
    return None


def _item_name(item: Mapping) -> str:
    row = item.get("source_row")
    return f"item {item.get('item_id')}" + (f" (source row {row})" if row is not None else "")


def invalid_sft_items(items: "pl.DataFrame") -> dict[Any, str]:
    """item_id -> why the item cannot be a seed SFT example (no gold feedback, no gold score in 1..5, a broken
    rubric). A caller that prefers skipping to failing drops these ids and reports the reasons."""
    return {
        item.get("item_id"): problem
        for item in items.iter_rows(named=True)
        if (problem := _sft_problem(item)) is not None
    }


def sft_examples(items: "pl.DataFrame") -> list[dict]:
    """Items with gold feedback -> seed SFT examples in TRL's conversational prompt-completion shape:
    `{"item_id", "prompt": absolute_messages(item), "completion": "<gold_feedback> [RESULT] <gold>"}`, the gold
    score rounded half up (2.5 -> 3).

    Raises ValueError naming every unusable item (item_id, source row, reason): a silently shorter SFT set
    would hide an import problem. To skip them instead, filter out `invalid_sft_items(items)` first.
    """
    rows = list(items.iter_rows(named=True))
    bad = [f"{_item_name(it)}: {p}" for it in rows if (p := _sft_problem(it)) is not None]
    if bad:
        shown = "; ".join(bad[:10]) + (f"; ... and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise UsageError(f"{len(bad)} of {len(rows)} items cannot be seed SFT examples: {shown}")
    return [
        {
            "item_id": it.get("item_id"),
            "prompt": absolute_messages(it),
            "completion": format_judgment(it["gold_feedback"], round_half_up(it["gold_score"])),
        }
        for it in rows
    ]


def _sft_dataset(examples: Sequence[Mapping]) -> "datasets.Dataset":
    """Examples -> TRL's conversational prompt-completion format (the completion is one assistant message),
    for which SFTTrainer puts the loss on the completion tokens only."""
    import datasets

    rows = []
    for i, ex in enumerate(examples):
        missing = {"prompt", "completion"} - set(ex)
        if missing:
            raise ValueError(f"example {i} lacks {sorted(missing)}")
        if not isinstance(ex["prompt"], list) or not ex["prompt"]:
            raise ValueError(f"example {i}: prompt must be a non-empty list of chat messages")
        if not isinstance(ex["completion"], str) or not ex["completion"].strip():
            raise ValueError(f"example {i}: completion must be a non-empty string")
        rows.append(
            {
                "prompt": [{"role": m["role"], "content": m["content"]} for m in ex["prompt"]],
                "completion": [{"role": "assistant", "content": ex["completion"]}],
            }
        )
    return datasets.Dataset.from_list(rows)


def dpo_examples(pairs: Iterable[Mapping]) -> "datasets.Dataset":
    """Pairs -> TRL's conversational preference format: `prompt` is the chat (system + user), `chosen` and
    `rejected` are one assistant message each. Pairs may carry `ref_chosen_logps` / `ref_rejected_logps`
    (stored at sampling, None where not): they become the columns `StoredReferenceDPO` reads."""
    import datasets

    pairs = list(pairs)
    with_ref = any(REF_COLUMNS[0] in p for p in pairs)
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
        if with_ref:
            rows[-1].update({c: _finite_or_none(p.get(c)) for c in REF_COLUMNS})
    features = None
    if with_ref:  # float columns even when every value is missing (from_list would infer `null`)
        features = datasets.Dataset.from_list(rows[:1]).features.copy()
        features.update({c: datasets.Value("float64") for c in REF_COLUMNS})
    return datasets.Dataset.from_list(rows, features=features)


REF_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")


def _finite_or_none(x) -> float | None:
    return float(x) if x is not None and math.isfinite(float(x)) else None


def with_reference_logps(dataset: "datasets.Dataset", compute: Callable[["datasets.Dataset"], "datasets.Dataset"],
                         max_length: int | None) -> tuple["datasets.Dataset", int]:
    """The tokenized DPO dataset with both reference log-prob columns: the values stored at sampling where
    they are usable, `compute(subset)` (TRL's batched no-grad pass) for the rest. A stored value is usable
    when both sides have one and no side is cut by `max_length` (the stored sum covers the whole completion).
    Returns (dataset, how many pairs used stored values)."""
    if REF_COLUMNS[0] not in dataset.column_names:
        return compute(dataset), 0
    stored = {c: list(dataset[c]) for c in REF_COLUMNS}
    lengths = [len(p) + max(len(c), len(r)) for p, c, r in
               zip(dataset["prompt_ids"], dataset["chosen_ids"], dataset["rejected_ids"])]
    missing = [i for i in range(len(dataset))
               if any(stored[c][i] is None for c in REF_COLUMNS) or (max_length and lengths[i] > max_length)]
    base = dataset.remove_columns(list(REF_COLUMNS))
    if missing:
        computed = compute(base.select(missing))
        for c in REF_COLUMNS:
            for j, i in enumerate(missing):
                stored[c][i] = float(computed[c][j])
    for c in REF_COLUMNS:
        base = base.add_column(c, stored[c])
    return base, len(dataset) - len(missing)


def _stored_reference_dpo(shared_prompt: bool = False):
    """TRL's DPOTrainer, taking the reference log-probs the sampler stored with each judgment (`training.
    reference: previous`: the model that drew the judgments is the reference), and computing only the rest
    in one batched no-grad pass; `precompute_ref_log_probs` must be on. `_precompute_ref_logps` is TRL 1.16's
    one hook for both: it computes every pair, and passes its result between ranks through a cache file
    of the dataset, which an in-memory dataset keeps in each process's own temp dir (a DDP launch fails).
    Here every rank computes its shard and `gather_for_metrics` gives each rank all of them, in order.
    With `shared_prompt`, both the reference pass and the policy's forward run one row per pair
    (engine/shared_prompt.py) wherever that is exact."""
    import torch
    from torch.utils.data import DataLoader
    from trl import DPOTrainer

    from engine.shared_prompt import SharedPromptModel, supported

    class StoredReferenceDPO(DPOTrainer):
        stored_reference_pairs = 0
        shared_prompt_forward = shared_prompt  # read in __init__ already: TRL's reference pass runs there

        def _one_row_per_pair(self, model):
            if not self.shared_prompt_forward or not supported(model):
                return model
            return SharedPromptModel(model, self.processing_class.pad_token_id or 0, self.accelerator.autocast)

        def _compute_loss(self, model, inputs, return_outputs):
            return super()._compute_loss(self._one_row_per_pair(model), inputs, return_outputs)

        def compute_ref_log_probs(self, model, inputs):
            return super().compute_ref_log_probs(self._one_row_per_pair(model), inputs)

        def _precompute_ref_logps(self, dataset, name, batch_size):
            dataset, self.stored_reference_pairs = with_reference_logps(
                dataset, lambda sub: self._reference_pass(sub, batch_size), self.args.max_length)
            return dataset

        @torch.no_grad()
        def _reference_pass(self, dataset, batch_size):
            if self.ref_model is None and self.is_deepspeed_enabled:  # ZeRO: TRL's own pass wraps the model
                return super()._precompute_ref_logps(dataset, "train", batch_size)
            loader = self.accelerator.prepare(DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                                         collate_fn=self.data_collator, num_workers=0))
            model = self.ref_model or self.model
            chosen, rejected = [], []
            for batch in loader:
                c, r = self.accelerator.gather_for_metrics(self.compute_ref_log_probs(model, batch))
                chosen.append(c.float().cpu())
                rejected.append(r.float().cpu())
            return (dataset.add_column(REF_COLUMNS[0], torch.cat(chosen).tolist())
                    .add_column(REF_COLUMNS[1], torch.cat(rejected).tolist()))

    return StoredReferenceDPO


def _completion_head_sft():
    """TRL's SFTTrainer with the LM head run on the completion positions only (engine/completion_head.py):
    off Triton devices TRL's fused head scores the whole ~1,250-token judge prompt of every example too."""
    from trl import SFTTrainer

    from engine.completion_head import CompletionHeadModel, supported

    class CompletionHeadSFT(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if supported(model):
                model = CompletionHeadModel(model, self.accelerator.autocast)
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

    return CompletionHeadSFT


def token_logprobs(
    model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", messages: list[dict], completion: str
) -> tuple[list[float], list[float]]:
    """Per-token log-probabilities under `model` of (prompt tokens, completion tokens), tokenized the way
    TRL's DPOTrainer and SFTTrainer do: the chat template over messages + the assistant turn, the completion
    starting where it diverges from the prompt rendered with the generation prompt (so the end-of-turn tokens
    count, as in training). The first prompt token has no context and is left out."""
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
    token_logps = logps.gather(-1, targets[:, None])[:, 0].tolist()
    return token_logps[: start - 1], token_logps[start - 1 :]


def sequence_logprob(
    model: "PreTrainedModel", tokenizer: "PreTrainedTokenizerBase", messages: list[dict], completion: str
) -> float:
    """Sum of log p(completion tokens | prompt) under `model` (tokenized as in `token_logprobs`)."""
    return float(sum(token_logprobs(model, tokenizer, messages, completion)[1]))


# --- Shared by both stages ------------------------------------------------------------------------------




def _same_model(a: str, b: str) -> bool:
    pa, pb = Path(a), Path(b)
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a == b


def _read_finished(out_dir: Path) -> dict | None:
    marker = out_dir / CHECKPOINT_FILE
    return json.loads(marker.read_text()) if marker.is_file() else None


def checkpoint_precision(out_dir: Path) -> str | None:
    """The precision a finished checkpoint was trained in ("bf16" / "fp32"), None if it records none."""
    record = _read_finished(Path(out_dir))
    return record.get("precision") if record else None


def _stored_metrics(out_dir: Path, say: Callable[[str], None]) -> dict[str, float] | None:
    """The metrics of a finished checkpoint in `out_dir`, None if there is none yet. A non-empty dir without
    the marker is refused rather than overwritten: it may be someone's model."""
    done = _read_finished(out_dir)
    if done is not None:
        say(f"{out_dir} already holds a finished checkpoint; not retraining")
        return {k: float(v) for k, v in done["metrics"].items()}
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not a finished selfrat checkpoint; move it away first")
    return None


@contextmanager
def _checkpoint_dirs(out_dir: Path, main: bool = True) -> Iterator[tuple[Path, Path]]:
    """(tmp_dir, scratch): the checkpoint is written to tmp_dir and published by `_publish`; scratch is TRL's
    output_dir, where nothing is saved (save_strategy no). Both are removed on exit, success or not.
    `main`: this process owns the dirs (every rank but rank 0 of a distributed launch leaves them alone)."""
    tmp_dir = out_dir.parent / f"{out_dir.name}.tmp"
    scratch = out_dir.parent / f".{out_dir.name}.trl"
    if not main:
        yield tmp_dir, scratch
        return
    for d in (tmp_dir, scratch):
        shutil.rmtree(d, ignore_errors=True)  # leftovers of an interrupted run
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp_dir, scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)  # only still there if something failed


def activation_bytes_per_token(model) -> float:
    """A rough upper estimate of what one token's activations hold for the backward pass without activation
    checkpointing: per layer ~16 hidden-wide and ~4 intermediate-wide fp32 tensors (norms, projections, rotary,
    the MLP's gate, up and product). SmolLM2-135M: 1.8 MB a token; measured, one packed CIA pair of 1,620
    tokens in fp32 peaked 2.2 GB above the same step with checkpointing (estimate 3.0 GB)."""
    config = model.config.get_text_config()
    hidden = config.hidden_size
    intermediate = getattr(config, "intermediate_size", None) or 4 * hidden
    return config.num_hidden_layers * (16 * hidden + 4 * intermediate) * 4.0


def _checkpointing(cfg: SFTConfig | TrainingConfig, dev: str, model=None, sequences: int = 1) -> bool:
    """`activation_checkpointing: auto`. On CUDA: on. On CPU: off where one micro-batch (`sequences` of
    max_length) keeps activations that fit in half the memory available now (`activation_bytes_per_token`),
    else on. It trades memory for time: on 2 CPU cores (SmolLM2-135M, fp32) one packed CIA pair took 15-16 s
    a step with it and 11-12.5 s without, peaking at 2.6 against 4.9 GB. Without the model to size: on for
    max_length > 1024."""
    if cfg.activation_checkpointing != "auto":
        return bool(cfg.activation_checkpointing)
    if dev.startswith("cuda"):
        return True
    if model is None:
        return cfg.max_length > 1024
    import psutil

    need = activation_bytes_per_token(model) * cfg.max_length * sequences
    return need > psutil.virtual_memory().available / 2


def _sized_by(model, launched: "Launched | None"):
    """The model `activation_checkpointing: auto` sizes its activations by, or None under a distributed launch:
    there the ranks share the machine's memory, and each must decide the same."""
    return None if launched else model


def _trl_args(cfg: SFTConfig | TrainingConfig, *, scratch: Path, dev: str, precision: str,
              report_to: Sequence[str] = ("none",), model=None, rows: int = 1) -> dict[str, Any]:
    """TRL config fields that SFTConfig and DPOConfig share, from our SFT or DPO config. `model` and `rows`
    (sequences per example: 2 for a DPO pair) size `activation_checkpointing: auto`."""
    batch_size, gradient_accumulation_steps = cfg.batch_size, cfg.gradient_accumulation_steps
    # On CPU a batch runs as micro-batches of one example, accumulated to the same optimizer step: the cores are
    # busy with one ~1,500-token sequence already, so batching buys no speed there, while it pads every example
    # to the longest and holds all their activations at once (a batch of 4 CIA pairs: > 20 GB).
    micro_batch = 1 if dev == "cpu" else batch_size
    return dict(
        output_dir=str(scratch),
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.epochs,
        per_device_train_batch_size=micro_batch,
        gradient_accumulation_steps=gradient_accumulation_steps * (batch_size // micro_batch),
        max_length=cfg.max_length,
        seed=cfg.seed,
        # TRL turns bf16 on unless told otherwise (even on CPU): always say which.
        bf16=precision == "bf16",
        fp16=False,
        use_cpu=dev == "cpu",
        # TRL defaults to (gradient) checkpointing; where memory holds the activations it only costs time
        # (see `_checkpointing`).
        # transformers 5.24 renamed it `activation_checkpointing` and warns on the old name.
        activation_checkpointing=_checkpointing(cfg, dev, model, sequences=rows * micro_batch),
        trust_remote_code=False,
        report_to=list(report_to),  # training.report_to; tensorboard's dir is set by `_point_tensorboard`
        save_strategy="no",
        logging_strategy="steps",
        logging_steps=1,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # DDP only: every trained weight takes part in each step
        disable_tqdm=True,  # progress goes through `log`
    )


def _trainer(trainer_cls, cfg: SFTConfig | TrainingConfig, *, model, args, dataset, tokenizer, say, progress,
             launched, tb_dir: Path, line: Callable[[dict], str], **extra):
    """A TRL trainer (SFTTrainer / DPOTrainer) as both stages build it: LoRA from cfg, one log line per step
    (`line` formats it), TensorBoard in `tb_dir`, and under accelerate the check that the launch is what was
    asked for."""
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=_lora_config(cfg.lora_r, cfg.lora_alpha) if cfg.lora else None,
        callbacks=[_step_logger(say, progress, line)],
        **extra,
    )
    _point_tensorboard(trainer, tb_dir)
    if launched:
        launched.check(trainer)
    return trainer


def _publish_trained(trainer, tokenizer, cfg: SFTConfig | TrainingConfig, record: dict, *, base_path: str,
                     tmp_dir: Path, out_dir: Path, dev: str, precision: str, launched, metrics: dict) -> None:
    """`_publish` with what every checkpoint record holds: device, precision (what `auto` chose), the
    distributed launch, the metrics."""
    record = {**record, "device": dev, "precision": precision,
              "distributed": launched.record() if launched else None, "metrics": metrics}
    _publish(trainer, tokenizer, lora=cfg.lora, tmp_dir=tmp_dir, out_dir=out_dir, record=record,
             base_path=base_path, lora_config=_lora_config(cfg.lora_r, cfg.lora_alpha) if cfg.lora else None,
             quantized=cfg.quantization is not None)


def _lora_config(r: int, alpha: int):
    from peft import LoraConfig

    # every linear projection except the LM head
    return LoraConfig(r=r, lora_alpha=alpha, target_modules="all-linear", task_type="CAUSAL_LM")


def _step_logger(say: Callable[[str], None], progress: Callable[[int, int], None] | None,
                 line: Callable[[dict], str]) -> "TrainerCallback":
    """A callback that reports (done, total) steps and says "step i/n " + line(logs) after each step."""
    from transformers import TrainerCallback

    class _LineLog(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if progress:
                progress(0, state.max_steps)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if progress:
                progress(state.global_step, state.max_steps)
            if logs and "loss" in logs:
                say(f"step {state.global_step}/{state.max_steps} {line(logs)}")

    return _LineLog()


def _train(trainer) -> tuple[list[dict], int, float]:
    """Runs the trainer: (log history, steps, runtime in s)."""
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # with tqdm off it prints every log dict; `log` replaces it
    result = trainer.train()
    return trainer.state.log_history, trainer.state.global_step, float(result.metrics["train_runtime"])


def _publish(trainer, tokenizer, *, lora: bool, tmp_dir: Path, out_dir: Path, record: dict,
             base_path: str | None = None, lora_config=None, quantized: bool = False) -> None:
    """Saves the trained model (LoRA merged) with `record` as its marker and moves it into place.

    One process, or DDP: rank 0 saves its own full copy. FSDP / ZeRO-3: every rank joins in gathering the full
    state dict, and rank 0 loads it into a fresh fp32 copy of `base_path` (LoRA merged there). QLoRA: the
    trained adapters are merged into a fresh fp32 copy of `base_path` (not into the 4-bit weights)."""
    from accelerate.utils import DistributedType

    acc = trainer.accelerator
    sharded = acc.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    state, adapter_only = None, False
    if sharded:  # a collective: every rank must call it
        wrapped = trainer.model_wrapped if acc.distributed_type == DistributedType.DEEPSPEED else trainer.model
        state = acc.get_state_dict(wrapped)
    elif quantized:
        from peft import get_peft_model_state_dict

        state, adapter_only = get_peft_model_state_dict(acc.unwrap_model(trainer.model)), True
    if not acc.is_main_process:
        acc.wait_for_everyone()  # rank 0 writes; the others leave once it has
        return
    if state is not None:
        trained = rebuilt_model(base_path, state, lora_config if lora else None, adapter_only=adapter_only)
    else:
        trained = acc.unwrap_model(trainer.model)
        if lora:
            trained = trained.merge_and_unload()  # plain weights: the next stage needs no peft
    trained.config.use_cache = True
    trained.save_pretrained(tmp_dir)
    tokenizer.save_pretrained(tmp_dir)
    record = {**record, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    # The marker goes in last: a tmp dir without it is never mistaken for a finished checkpoint.
    (tmp_dir / CHECKPOINT_FILE).write_text(json.dumps(record, indent=2, allow_nan=True))
    if out_dir.exists():
        out_dir.rmdir()  # empty (checked by `_stored_metrics`); os.replace would do it too, but only on POSIX
    os.replace(tmp_dir, out_dir)
    acc.wait_for_everyone()


def rebuilt_model(base_path: str, state: Mapping[str, Any], lora_config=None, adapter_only: bool = False):
    """A plain fp32 model: `base_path` loaded afresh with the trained weights `state` put in (a full state dict
    as FSDP / ZeRO-3 gather it, peft's key names with LoRA; `adapter_only`: just the LoRA weights, as
    peft's `get_peft_model_state_dict` gives them), LoRA merged. Names any weight that did not fit."""
    model = _load(base_path)
    if lora_config is not None:
        from peft import get_peft_model, set_peft_model_state_dict

        model = get_peft_model(model, lora_config)
    state = {k: v.detach().float().cpu() for k, v in state.items()}
    if adapter_only:
        result = set_peft_model_state_dict(model, state)
        missing, unexpected = [k for k in result.missing_keys if "lora_" in k], list(result.unexpected_keys)
    else:
        missing, unexpected = model.load_state_dict(state, strict=False)
        tied = {k for k in missing if k.endswith("lm_head.weight")} if model.config.tie_word_embeddings else set()
        missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"the trained weights do not fit {base_path}: missing {sorted(missing)[:5]}, "
                           f"unexpected {sorted(unexpected)[:5]}")
    return model.merge_and_unload() if lora_config is not None else model


def _load(model_path: str, quantization: str | None = None, precision: str = "fp32"):
    import torch
    from transformers import AutoModelForCausalLM

    if quantization == "4bit":
        return _load_4bit(model_path, precision)
    # fp32 master weights: see the module docstring
    return AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, trust_remote_code=False)


def _load_4bit(model_path: str, precision: str):
    """QLoRA's base: NF4 weights with double quantization (bitsandbytes), computing in the stage's precision,
    on this process's GPU, prepared for k-bit training (norms in fp32, input grads for checkpointing)."""
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError("quantization: 4bit (QLoRA) needs the bitsandbytes package, which is not installed "
                         "here: pip install bitsandbytes (CUDA only)")
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if not torch.cuda.is_available():
        raise UsageError("quantization: 4bit (QLoRA) needs a CUDA GPU; none is visible here")
    compute = torch.bfloat16 if precision == "bf16" else torch.float32
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=compute)
    model = AutoModelForCausalLM.from_pretrained(model_path, quantization_config=quant, dtype=compute,
                                                 device_map={"": torch.cuda.current_device()},
                                                 trust_remote_code=False)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)


# Trackers (training.report_to) and the package each needs.
_TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "mlflow": ("mlflow",), "wandb": ("wandb",),
                     "trackio": ("trackio",)}


def _require_trackers(report_to: Sequence[str]) -> None:
    """UsageError naming each tracker in `report_to` whose package is not installed (before any training)."""
    import importlib.util

    missing = [f"{name} (pip install {pkgs[0]})" for name in report_to if name != "none"
               for pkgs in [_TRACKER_PACKAGES[name]] if not any(importlib.util.find_spec(p) for p in pkgs)]
    if missing:
        raise UsageError(f"training.report_to: not installed here: {', '.join(missing)}")


def _point_tensorboard(trainer, tb_dir: Path | None) -> None:
    """TensorBoard logs go to `tb_dir` (runs/<id>/tb/iter-k), not under TRL's scratch output dir."""
    if tb_dir is None:
        return
    from transformers.integrations import TensorBoardCallback

    for cb in trainer.callback_handler.callbacks:
        if isinstance(cb, TensorBoardCallback):
            Path(tb_dir).mkdir(parents=True, exist_ok=True)
            cb.logging_dir = str(tb_dir)


@dataclass(frozen=True)
class Launched:
    """How a rank of a distributed launch (engine.train_worker) trains: the device and precision the parent
    resolved, the strategy, and whether this is rank 0 (which owns the checkpoint dirs and writes them)."""

    device: str
    precision: str
    strategy: str
    num_processes: int
    main: bool

    def check(self, trainer) -> None:
        """Refuse a launch accelerate ran otherwise than asked (e.g. FSDP on CPU silently becomes DDP)."""
        from accelerate.utils import DistributedType

        expected = {"ddp": (DistributedType.MULTI_GPU, DistributedType.MULTI_CPU),
                    "fsdp": (DistributedType.FSDP,), "zero3": (DistributedType.DEEPSPEED,)}[self.strategy]
        acc = trainer.accelerator
        if acc.distributed_type not in expected or acc.num_processes != self.num_processes:
            raise RuntimeError(f"accelerate runs strategy {self.strategy} x {self.num_processes} as "
                               f"{acc.distributed_type} x {acc.num_processes}")

    def record(self) -> dict:
        return {"strategy": self.strategy, "num_processes": self.num_processes}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


# --- Seed SFT -------------------------------------------------------------------------------------------


def _summarize_sft(log_history: list[dict], global_step: int, runtime_s: float, n_examples: int) -> dict[str, float]:
    steps = [h for h in log_history if "loss" in h]  # per-step logs; the final summary has "train_loss"
    losses = [float(h["loss"]) for h in steps]
    out = {
        "sft/loss": _mean(losses),
        "sft/final_loss": losses[-1] if losses else math.nan,
        "sft/steps": float(global_step),
        "sft/runtime_s": runtime_s,
        "sft/examples": float(n_examples),
    }
    accuracies = [float(h["mean_token_accuracy"]) for h in steps if "mean_token_accuracy" in h]
    if accuracies:
        out["sft/token_accuracy"] = _mean(accuracies)
    return out


def _cut_examples(prepared, n_examples: int, max_length: int) -> int:
    """How many examples TRL cut at max_length (a cut judgment loses its "[RESULT] n" ending) or dropped
    (the prompt alone filled max_length, leaving no completion token to train)."""
    dropped = n_examples - len(prepared)
    return dropped + sum(1 for ids in prepared["input_ids"] if len(ids) >= max_length)


def train_sft(
    *,
    model_path: str,
    examples: Sequence[Mapping],
    cfg: SFTConfig,
    out_dir: Path,
    device: str = "auto",
    log: Callable[[str], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    distributed: DistributedConfig | None = None,
    report_to: Sequence[str] = ("none",),
    tb_dir: Path | None = None,
    work_dir: Path | None = None,
    launched: Launched | None = None,
) -> dict[str, float]:
    """Fine-tune `model_path` on gold judgments (the seed judge J_SFT) and save a full checkpoint to `out_dir`.

    Args:
        model_path: the model to train (a checkpoint dir or hub id).
        examples: mappings with `prompt` (chat messages) and `completion` (the target judgment text), as
            `sft_examples` makes them. The loss is on the completion tokens only (TRL's prompt-completion
            format), so the long judge prompt does not dilute it.
        cfg: learning rate, scheduler, warmup, epochs, batch size, LoRA, precision ...
        out_dir: where the checkpoint goes. If it already holds a finished checkpoint, nothing is trained
            and its stored metrics are returned.
        device: auto (cuda if available), cpu, cuda, cuda:N or mps (engine.devices).
        log: receives one line per optimizer step ("step 3/8 loss=2.1034 acc=0.4412").
        progress: receives (steps done, total steps) at the start and after each logged step.
        distributed: `training.distributed`: train in several processes with accelerate (engine.distributed:
            the examples go to `work_dir`, rank 0's lines come back through `log` / `progress`).
        report_to: `training.report_to` (trackers; TensorBoard logs go to `tb_dir`).
        launched: set by engine.train_worker inside a distributed launch, never by callers.

    Returns:
        `sft/loss` (mean over steps), `sft/final_loss`, `sft/steps`, `sft/runtime_s`, `sft/examples`, and
        `sft/token_accuracy` (mean over steps of TRL's completion-token accuracy).
    """
    out_dir, say = Path(out_dir), log or (lambda _line: None)
    if (stored := _stored_metrics(out_dir, say)) is not None:
        return stored
    if len(examples) == 0:
        raise UsageError("train_sft got zero examples: the SFT dataset has no items with gold feedback "
                         "(check the dataset, its split and max_items)")
    dataset = _sft_dataset(examples)
    _require_trackers(report_to)
    if distributed is not None and launched is None:
        from engine.distributed import launch_training

        return launch_training("sft", paths={"model_path": str(model_path)}, rows=examples, cfg=cfg,
                               distributed=distributed, device=device, out_dir=out_dir, tb_dir=tb_dir,
                               work_dir=work_dir, report_to=report_to, log=say, progress=progress)

    from transformers import AutoTokenizer
    from trl import SFTConfig as TRLSFTConfig

    dev = launched.device if launched else resolve_device(device)
    use_device(dev)
    precision = launched.precision if launched else resolve_precision(cfg.precision, dev)
    with _checkpoint_dirs(out_dir, main=launched is None or launched.main) as (tmp_dir, scratch):
        model = _load(model_path, cfg.quantization, precision)
        tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)
        args = TRLSFTConfig(
            **_trl_args(cfg, scratch=scratch, dev=dev, precision=precision, report_to=report_to,
                        model=_sized_by(model, launched)),
            lr_scheduler_type=cfg.lr_scheduler_type,
            warmup_steps=cfg.warmup_ratio,  # transformers 5 dropped warmup_ratio: a float < 1 is a fraction
            completion_only_loss=True,  # said, not left to TRL's guess from the column names
            packing=False,
        )
        say(f"SFT: {len(examples)} examples, model={model_path}, device={dev}, precision={precision}, lora={cfg.lora}"
            f", activation checkpointing {'on' if args.activation_checkpointing else 'off'}"
            + (f", quantization={cfg.quantization}" if cfg.quantization else "")
            + (f", {launched.strategy} x {launched.num_processes} processes" if launched else ""))
        trainer = _trainer(_completion_head_sft(), cfg, model=model, args=args, dataset=dataset, tokenizer=tokenizer,
                           say=say, progress=progress, launched=launched,
                           tb_dir=tb_dir or out_dir.parent / f"{out_dir.name}.tb", line=lambda logs: (
                               f"loss={logs['loss']:.4f} acc={logs.get('mean_token_accuracy', math.nan):.4f}"))
        n_cut = _cut_examples(trainer.train_dataset, len(examples), cfg.max_length)
        if n_cut:
            say(f"warning: {n_cut} of {len(examples)} examples are longer than max_length={cfg.max_length} "
                "tokens and were cut or dropped: their scores are not trained")
        history, steps, runtime_s = _train(trainer)
        metrics = _summarize_sft(history, steps, runtime_s, len(examples))
        record = {
            "kind": "sft",
            "model_path": str(model_path),
            "n_examples": len(examples),
            "n_cut": n_cut,
            "sft": cfg.model_dump(),
        }
        _publish_trained(trainer, tokenizer, cfg, record, base_path=str(model_path), tmp_dir=tmp_dir,
                         out_dir=out_dir, dev=dev, precision=precision, launched=launched, metrics=metrics)
    say(f"saved {out_dir} ({metrics['sft/steps']:.0f} steps, final loss {metrics['sft/final_loss']:.4f})")
    return metrics


# --- DPO ------------------------------------------------------------------------------------------------


def dpo_loss_terms(cfg: TrainingConfig) -> dict[str, Any]:
    """TRL DPOConfig fields (`loss_type`, `loss_weights`, `label_smoothing`) for cfg's loss options.

    >>> dpo_loss_terms(TrainingConfig(loss="sigmoid+sft", sft_weight=0.5, label_smoothing=0.1))
    {'loss_type': ['sigmoid', 'robust', 'sft'], 'loss_weights': [1.8, -0.8, 0.5], 'label_smoothing': 0.1}
    """
    e = cfg.label_smoothing
    if e == 0:
        types, weights = ["sigmoid"], [1.0]
    else:
        # cDPO from TRL's sigmoid and robust terms: see the module docstring for the algebra.
        types, weights = ["sigmoid", "robust"], [2 * (1 - e), -(1 - 2 * e)]
    if cfg.loss == "sigmoid+sft":
        types, weights = [*types, "sft"], [*weights, cfg.sft_weight]
    return {"loss_type": types, "loss_weights": weights, "label_smoothing": e}


def _summarize(log_history: list[dict], global_step: int, runtime_s: float) -> dict[str, float]:
    steps = [h for h in log_history if "loss" in h and "rewards/margins" in h]
    out = {f"train/{key}": _mean([float(h[key]) for h in steps if key in h]) for key in _TRL_KEYS}
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
    tb_dir: Path | None = None,
    work_dir: Path | None = None,
    launched: Launched | None = None,
) -> dict[str, float]:
    """Train `policy_path` with DPO on `pairs` and save a full checkpoint to `out_dir`.

    Args:
        policy_path: the model to train (a checkpoint dir or hub id).
        reference_path: the DPO reference model. `None` or the policy's own path: a frozen copy of the
            policy (TRL's default; with LoRA, the policy with its adapter disabled).
        pairs: mappings with `prompt` (chat messages), `chosen` and `rejected` (judgment texts).
        cfg: loss (sigmoid, sigmoid+sft), sft_weight, label_smoothing, beta, learning rate, epochs, batch
            size, LoRA, precision ... (see `dpo_loss_terms` for how the loss options map onto TRL).
        out_dir: where the checkpoint goes. If it already holds a finished checkpoint, nothing is trained
            and its stored metrics are returned.
        device: auto (cuda if available), cpu, cuda, cuda:N or mps (engine.devices).
        log: receives one line per optimizer step ("step 3/8 loss=0.6931 margin=0.0012").
        progress: receives (steps done, total steps) at the start and after each logged step.
        tb_dir: where TensorBoard logs go with `cfg.report_to: [tensorboard]` (default: beside out_dir).
        work_dir: with `cfg.distributed`, where the launch's files go (pairs, spec, accelerate config,
            launch.log, result.json; default: beside out_dir).
        launched: set by engine.train_worker inside a distributed launch, never by callers.

    Returns:
        TRL's step metrics averaged over the run, as `train/loss`, `train/rewards/{chosen,rejected,
        accuracies,margins}`, plus `train/steps` and `train/runtime_s`.
    """
    out_dir, say = Path(out_dir), log or (lambda _line: None)
    if (stored := _stored_metrics(out_dir, say)) is not None:
        return stored
    if len(pairs) == 0:
        raise ValueError("train_dpo got zero preference pairs: curation produced nothing to train on "
                         "(check the curation margin and that sampled judgments parse)")
    dataset = dpo_examples(pairs)
    _require_trackers(cfg.report_to)
    if cfg.distributed is not None and launched is None:
        from engine.distributed import launch_training

        return launch_training("dpo", paths={"policy_path": str(policy_path), "reference_path": (
                                   None if reference_path is None else str(reference_path))},
                               rows=pairs, cfg=cfg, distributed=cfg.distributed, device=device, out_dir=out_dir,
                               tb_dir=tb_dir, work_dir=work_dir, report_to=cfg.report_to, log=say, progress=progress)

    from transformers import AutoTokenizer
    from trl import DPOConfig

    from engine.branch_attention import branch_attention
    from engine.branch_attention import supported as branch_supported

    dev = launched.device if launched else resolve_device(device)
    use_device(dev)
    precision = launched.precision if launched else resolve_precision(cfg.precision, dev)
    separate_ref = reference_path is not None and not _same_model(reference_path, policy_path)
    loss_terms = dpo_loss_terms(cfg)
    with _checkpoint_dirs(out_dir, main=launched is None or launched.main) as (tmp_dir, scratch):
        model = _load(policy_path, cfg.quantization, precision)
        ref_model = _load(reference_path, cfg.quantization, precision) if separate_ref else None
        tokenizer = AutoTokenizer.from_pretrained(policy_path, trust_remote_code=False)
        args = DPOConfig(
            **_trl_args(cfg, scratch=scratch, dev=dev, precision=precision, report_to=cfg.report_to,
                        model=_sized_by(model, launched), rows=2),
            beta=cfg.beta,
            precompute_ref_log_probs=cfg.precompute_ref_log_probs,
            **loss_terms,
        )
        say(
            f"DPO: {len(pairs)} pairs, policy={policy_path}, "
            f"reference={reference_path if separate_ref else 'policy copy'}, device={dev}, precision={precision}, "
            f"lora={cfg.lora}, loss={'+'.join(loss_terms['loss_type'])} weights={loss_terms['loss_weights']}, "
            f"activation checkpointing {'on' if args.activation_checkpointing else 'off'}"
            + (f", quantization={cfg.quantization}" if cfg.quantization else "")
            + (", reference log-probs once before training" if cfg.precompute_ref_log_probs else "")
            + (f", {launched.strategy} x {launched.num_processes} processes" if launched else "")
        )
        trainer = _trainer(_stored_reference_dpo(cfg.shared_prompt_forward), cfg, model=model, args=args,
                           dataset=dataset, tokenizer=tokenizer, say=say, progress=progress, launched=launched,
                           ref_model=ref_model, tb_dir=tb_dir or out_dir.parent / f"{out_dir.name}.tb",
                           line=lambda logs: (f"loss={logs['loss']:.4f} "
                                              f"margin={logs.get('rewards/margins', math.nan):.4f}"))
        if cfg.precompute_ref_log_probs:
            trainer.ref_model = ref_model = None  # its log-probs are in the dataset now: free its memory
            say(f"reference log-probs: {trainer.stored_reference_pairs} of {len(pairs)} pairs stored at "
                "sampling, the rest computed before training")
        # A packed pair's attention in parts (engine/branch_attention.py), also where activation checkpointing
        # recomputes it during the backward pass; SDPA for every other forward.
        with branch_attention(model) if cfg.shared_prompt_forward and branch_supported(model) else nullcontext():
            history, steps, runtime_s = _train(trainer)
        metrics = _summarize(history, steps, runtime_s)
        record = {
            "kind": "dpo",
            "policy_path": str(policy_path),
            "reference_path": str(reference_path) if separate_ref else None,
            "n_pairs": len(pairs),
            "training": cfg.model_dump(),
            "trl_loss": loss_terms,  # what the loss options became in TRL's terms
        }
        _publish_trained(trainer, tokenizer, cfg, record, base_path=str(policy_path), tmp_dir=tmp_dir,
                         out_dir=out_dir, dev=dev, precision=precision, launched=launched, metrics=metrics)
    say(f"saved {out_dir} ({metrics['train/steps']:.0f} steps, margin {metrics['train/rewards/margins']:.4f})")
    return metrics
