"""Run configuration: one pydantic model per stage, composed into `RunConfig`.

Fields that map onto TRL keep TRL's names (`beta`, `learning_rate`, `max_length`). Unknown keys are
rejected everywhere (`extra="forbid"`) so a typo in a YAML file fails loudly instead of being ignored.

Names: `seed` is always an RNG seed (sampling.seed, training.seed, sft.seed, evaluation.seed). The judge a
run starts from is the *initial judge* (iteration 0): `model` as it is, or J_SFT when the `sft:` section
trains it first; `evaluate_initial` evaluates it, and `training.reference: initial` makes it the DPO
reference. Configs written before the rename still load, with a `ConfigDeprecationWarning` naming the new
key: `seed: {sft: ...}` -> `sft: ...`, `evaluate_seed` -> `evaluate_initial`, `reference: seed` ->
`reference: initial`.
"""

from __future__ import annotations

import re
import sys
import warnings
from pathlib import Path
from typing import Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from engine.devices import DEVICE_HELP, check_device, gpu_count
from store.errors import SelfratError


class ConfigDeprecationWarning(DeprecationWarning):
    """A config key or value that was renamed; the old spelling still loads (see the module docstring)."""


if not sys.warnoptions:  # shown to the person whose config it is, unless they chose a -W policy themselves
    warnings.simplefilter("default", ConfigDeprecationWarning)


def _renamed(old: str, new: str) -> None:
    warnings.warn(f"config: `{old}` is deprecated, write `{new}` (the old spelling still loads for now)",
                  ConfigDeprecationWarning, stacklevel=2)


# A Hugging Face hub id ("org/name"); kept here, in a light module, for the CLI, the engine and the app.
HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class VLLMConfig(_Strict):
    """`sampling.backend: vllm` (engine/vllm_sampler.py): how vLLM's offline engine is set up. Ignored by the
    transformers backend."""

    tensor_parallel_size: int = Field(1, ge=1, le=64, description="GPUs one model is split over (tensor "
                                      "parallel); vLLM takes them from CUDA_VISIBLE_DEVICES.")
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0, description="Share of each GPU's memory vLLM "
                                          "reserves for weights, activations and the KV cache.")
    max_model_len: int | None = Field(None, ge=64, description="Prompt + generation tokens per sequence; None "
                                      "= the model's own limit (lower it when the KV cache does not fit).")
    enable_prefix_caching: bool = Field(True, description="Share the prompt's KV cache between the N samples "
                                        "of an item and the score probes (each judgment is its own request).")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weights and activations; auto = sampling.precision (bf16 -> bfloat16, fp32 -> "
        "float32), and under precision auto vLLM's own choice from the model config.")
    structured_outputs: bool = Field(False, description="Constrain the free text to end in ' [RESULT] k' with "
                                     "vLLM's structured outputs (a regex), instead of relying on forcing alone; "
                                     "a judgment cut by the token budget is still forced under force_score.")


VLLM_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}  # sampling.precision -> vLLM's dtype


class SamplingConfig(_Strict):
    """How judgments are drawn (Prometheus defaults: temperature 1.0, top_p 0.9)."""

    n: int = Field(4, ge=1, le=64, description="Judgments sampled per item.")
    temperature: float = Field(1.0, gt=0.0, le=2.0, description="Softmax temperature (paper: ~1).")
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    max_new_tokens: int = Field(256, ge=8, le=4096, description="Budget for the rationale, in tokens.")
    repetition_penalty: float = Field(1.0, ge=1.0, le=2.0, description="1.0 = off (Prometheus uses 1.03).")
    seed: int = Field(0, description="Base seed; each judgment's seed derives from it, item and sample index.")
    backend: Literal["transformers", "vllm"] = Field(
        "transformers", description="transformers (CPU/GPU), vllm (GPU)."
    )
    batch_size: int = Field(8, ge=1, le=512, description="Prompts per generation batch (each expands to n rows).")
    force_score: bool | None = Field(
        None,
        description="Close a rationale without a valid score with ' [RESULT] ' and draw the score from the "
        "model's 1-5 distribution. None = on for `model: embedded`, off otherwise.",
    )
    device: str = Field("auto", description=f"{DEVICE_HELP}.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Weights for sampling and evaluation: auto = bf16 where the device computes it "
        "natively (CUDA; a CPU with AMX / AVX512-BF16, found by a timed probe), else fp32.")
    vllm: VLLMConfig = Field(default_factory=VLLMConfig, description="Settings of backend: vllm.")

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        return check_device(v)

    @model_validator(mode="after")
    def _vllm_combinations(self) -> "SamplingConfig":
        """What backend: vllm cannot run with, each error at the field to change."""
        if self.backend != "vllm":
            return self
        errors = []
        if self.device in ("cpu", "mps"):
            errors.append((("device",), f"backend vllm runs on CUDA GPUs only, not on {self.device}: use device "
                           "auto or cuda, or backend transformers", self.device))
        elif self.device.startswith("cuda:"):
            errors.append((("device",), "backend vllm places the model on the GPUs CUDA_VISIBLE_DEVICES shows "
                           f"(tensor_parallel_size of them): write device cuda and set CUDA_VISIBLE_DEVICES="
                           f"{self.device.partition(':')[2]}", self.device))
        dtype = self.vllm.dtype
        if dtype != "auto" and self.precision in VLLM_DTYPES and VLLM_DTYPES[self.precision] != dtype:
            errors.append((("vllm", "dtype"), f"{dtype} contradicts sampling.precision {self.precision} (leave "
                           "vllm.dtype auto to follow it)", dtype))
        _field_errors("SamplingConfig", errors)
        return self


class CurationConfig(_Strict):
    """How preference pairs are built from sampled judgments."""

    strategy: Literal["gold", "majority", "meta"] = Field(
        "gold",
        description="gold: chosen matches the gold score, rejected misses it; majority: chosen has the item's "
        "modal score, rejected is off the mode (no gold needed); meta: the judge rates each judgment's "
        "rationale, chosen = highest rated, rejected = lowest.",
    )
    min_margin: int = Field(
        1, ge=1, le=4,
        description="gold: |score_rejected - gold| >= m (paper: 2 beat 1); majority: |score_rejected - mode| >= m; "
        "meta: rating_chosen - rating_rejected >= m.",
    )
    max_pairs_per_item: int = Field(2, ge=1, le=64, description="Cap on pairs per item.")
    use_forced: bool = Field(True, description="Allow judgments whose score was forced.")
    balance_scores: bool = Field(
        False, description="Keep as many pairs per chosen score (1-5) as the rarest chosen score present has."
    )
    dedupe: bool = Field(True, description="Treat judgments with identical text for an item as one.")
    meta_max_new_tokens: int = Field(
        64, ge=1, le=4096, description="meta strategy: budget for the meta-judge's note before its rating."
    )


def _field_errors(title: str, errors: list[tuple[tuple, str, object]]) -> None:
    """Raise one ValidationError with an entry per (loc, message, input), so each bad field of a combination
    is named by its own path (pydantic nests `loc` under the enclosing sections)."""
    if errors:
        raise ValidationError.from_exception_data(title, [
            InitErrorDetails(type=PydanticCustomError("invalid_combination", msg), loc=loc, input=value)
            for loc, msg, value in errors])


REPORTERS = ("tensorboard", "mlflow", "wandb", "trackio", "none")


class DistributedConfig(_Strict):
    """Training on several processes with accelerate (engine/distributed.py generates its config and launches
    `accelerate launch ... -m engine.train_worker`). ddp: a full copy per process (CPU with gloo, or one GPU
    each); fsdp: FSDP2 shards parameters, gradients and optimizer state (CUDA); zero3: DeepSpeed ZeRO-3 (CUDA,
    needs the deepspeed package)."""

    num_processes: int = Field(2, ge=1, le=64, description="Ranks: one per GPU on cuda, CPU processes on cpu.")
    strategy: Literal["ddp", "fsdp", "zero3"] = Field("ddp")
    mixed_precision: Literal["bf16", "fp32"] | None = Field(
        None, description="None = the stage's precision (training.precision / sft.precision, auto resolved).")


def _qlora_alias(section: str, data):
    """`qlora: true` is short for `lora: true, quantization: 4bit` (not stored: the dump keeps the long form)."""
    if isinstance(data, dict) and "qlora" in data:
        data = dict(data)
        qlora = data.pop("qlora")
        if qlora is True:
            if data.get("lora") is False:
                raise ValueError(f"{section}: qlora: true contradicts lora: false")
            if data.get("quantization") not in (None, "4bit"):
                raise ValueError(f"{section}: qlora: true contradicts quantization: {data['quantization']!r}")
            data.update(lora=True, quantization="4bit")
        elif qlora not in (False, None):
            raise ValueError(f"{section}.qlora: expected true or false, got {qlora!r}")
    return data


def _quantization_needs_lora(section, data) -> None:
    if data.quantization and not data.lora:
        _field_errors(section, [(("quantization",), "4bit (QLoRA) trains LoRA adapters on the frozen 4-bit "
                                 "model: set lora: true too (or qlora: true)", data.quantization)])


class GRPORewardWeights(_Strict):
    """`training.grpo.rewards`: how much each reward (engine/rewards.py) counts. A completion's reward is the
    weighted mean of the rewards that apply to its item (absolute: score, format; pairwise: verdict,
    consistency, format), each in [0, 1], so the total is in [0, 1] too; a weight of 0 leaves one out."""

    score: float = Field(1.0, ge=0.0, description="Absolute items: 1 - |score - gold| / 4 (gold as stored, a "
                         "fractional gold included), 0 when no score parses.")
    format: float = Field(0.2, ge=0.0, description="Every item: 1 when the judgment parses, ending in "
                          "`[RESULT] n` (1-5; A/B for a pairwise prompt) within max_completion_length tokens, else 0.")
    verdict: float = Field(1.0, ge=0.0, description="Pairwise items (A/B prompts): 1 for the correct verdict "
                           "(the gold label, read through the order the responses were shown in), 0 for the wrong "
                           "one or none; tie-labelled items get none.")
    consistency: float = Field(0.5, ge=0.0, description="Pairwise items (J1): the share of the step's completions "
                               "for the other order (A/B swapped) that name the same underlying response; 0 when "
                               "this one names none.")

    @model_validator(mode="after")
    def _some_weight(self) -> "GRPORewardWeights":
        if not any((self.score, self.format, self.verdict, self.consistency)):
            raise ValueError("at least one reward weight must be > 0")
        return self


class GRPOConfig(_Strict):
    """`training.method: grpo`: online RL on verdict correctness (TRL GRPOTrainer, as J1), instead of sampling,
    curation and DPO. Each optimizer step samples `num_generations` judgments for each of `prompts_per_step`
    prompts with the policy itself, scores them with the rewards, and moves the policy toward the judgments that
    score above their group's mean. The rollouts are stored as judgments (purpose `rollout`)."""

    num_generations: int = Field(4, ge=2, le=64, description="Completions (judgments) per prompt: the group whose "
                                 "mean reward is the baseline of GRPO's advantage.")
    prompts_per_step: int = Field(2, ge=1, le=256, description="Prompts per optimizer step (x num_generations "
                                  "completions). A pairwise item is two prompts (both orders), always in the same "
                                  "step: with pairwise items this must be even.")
    max_completion_length: int = Field(256, ge=8, le=4096, description="Token budget of a rollout; a judgment "
                                       "that has not written its score by then gets no format or score reward.")
    temperature: float = Field(1.0, gt=0.0, le=2.0, description="Sampling temperature of the rollouts.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus mass of the rollouts (1.0 = off).")
    beta: float = Field(0.0, ge=0.0, description="KL coefficient against the starting policy; 0 (TRL's default) "
                        "loads no reference model.")
    learning_rate: float | None = Field(None, gt=0.0, description="AdamW learning rate; None = "
                                        "training.learning_rate.")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps; None = `epochs` passes over the "
                                  "iteration's train items.")
    epochs: float = Field(1.0, gt=0.0, description="Passes over the train items when max_steps is None.")
    max_time_s: float | None = Field(None, gt=0.0, description="Stop after the optimizer step that ends past this "
                                     "many seconds of training (a compute budget: the checkpoint is the policy at "
                                     "that step); None = run every planned step.")
    vllm_gpu_memory_utilization: float = Field(
        0.3, gt=0.0, le=1.0, description="On a GPU with vllm installed, rollouts come from vLLM colocated in the "
        "training process (TRL vllm_mode colocate); this share of the GPU is vLLM's.")
    rewards: GRPORewardWeights = Field(default_factory=GRPORewardWeights)


class TrainingConfig(_Strict):
    """DPO on the curated pairs (TRL DPOTrainer), or GRPO (`method: grpo`, `grpo:`). `distributed` and
    `report_to` apply to the seed SFT too."""

    method: Literal["dpo", "grpo"] = Field(
        "dpo", description="dpo: sample, curate pairs, DPO (the paper); grpo: online RL on the judge's own rollouts "
        "rewarded for the gold score / verdict (sampling and curation are skipped; settings in `grpo`).")
    grpo: GRPOConfig = Field(default_factory=GRPOConfig, description="Settings of method: grpo.")

    loss: Literal["sigmoid", "sigmoid+sft"] = Field(
        "sigmoid", description="sigmoid: DPO; sigmoid+sft: DPO plus NLL on the chosen judgment (Self-Taught Evaluator)."
    )
    sft_weight: float = Field(1.0, gt=0.0, description="Weight of the NLL term for loss sigmoid+sft.")
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5, description="Conservative DPO: assumed label noise.")
    beta: float = Field(0.1, gt=0.0, description="DPO beta (TRL default 0.1).")
    learning_rate: float = Field(5e-6, gt=0.0, description="AdamW learning rate.")
    epochs: float = Field(1.0, gt=0.0, description="Passes over the pairs.")
    batch_size: int = Field(4, ge=1, description="Pairs per device step.")
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_length: int = Field(1024, ge=32, description="Prompt + completion tokens; longer pairs are truncated.")
    activation_checkpointing: Literal["auto"] | bool = Field(
        "auto", description="Recompute activations in the backward pass instead of keeping them: ~30% more time "
        "on CPU, about half the peak memory for CIA-length (1,600-token) pairs. auto = on for CUDA; on CPU, off "
        "where one example's activations at max_length (estimated from the model's shape) fit in half the "
        "memory available, else on.")
    lora: bool = Field(False, description="Train LoRA adapters (peft) and merge them into the checkpoint.")
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    reference: Literal["previous", "initial"] = Field(
        "previous", description="DPO reference model: the previous iteration's judge, or the initial judge "
        "(iteration 0's: `model`, or J_SFT with `sft:`). `seed` is a deprecated spelling of `initial`.",
    )
    seed: int = Field(0)
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto = bf16 autocast where the device computes bf16 natively (CUDA; a CPU with "
        "AMX / AVX512-BF16, found by a timed probe), else fp32; master weights stay fp32."
    )
    quantization: Literal["4bit"] | None = Field(
        None, description="4bit: QLoRA (bitsandbytes NF4 base weights, LoRA adapters; CUDA only). `qlora: true` "
        "is short for `lora: true, quantization: 4bit`.")
    precompute_ref_log_probs: bool = Field(
        True, description="Reference log-probs once before training, not a reference forward at every step "
        "(the reference model leaves memory): the ones the sampler stored with each judgment when it is the "
        "reference (`reference: previous`), the rest in one batched no-grad pass (TRL DPOConfig). false: TRL's "
        "live reference forward.")
    shared_prompt_forward: bool = Field(
        True, description="Run each pair's prompt once, chosen and rejected as two branches over it, and the LM "
        "head only where a completion token is predicted (engine/shared_prompt.py): the same log-probs, about half "
        "the tokens at CIA length. Falls back to TRL's two rows where it does not apply (distributed, soft-capped "
        "logits, pairs cut differently). false: always TRL's rows.")
    report_to: list[Literal["tensorboard", "mlflow", "wandb", "trackio", "none"]] = Field(
        default_factory=lambda: ["none"],
        description="Run trackers, passed to TRL; tensorboard logs go to runs/<id>/tb/iter-k. ['none'] = off.")
    distributed: DistributedConfig | None = Field(
        None, description="Several processes with accelerate (DPO and the seed SFT); None = one process.")

    @model_validator(mode="before")
    @classmethod
    def _old_reference_name(cls, data):
        if isinstance(data, dict) and data.get("reference") == "seed":
            _renamed("training.reference: seed", "training.reference: initial")
            data = {**data, "reference": "initial"}
        return _qlora_alias("training", data)

    @field_validator("report_to")
    @classmethod
    def _none_alone(cls, v: list[str]) -> list[str]:
        if not v:
            return ["none"]
        if "none" in v and len(v) > 1:
            raise ValueError("'none' turns tracking off: it cannot be combined with trackers")
        if len(set(v)) < len(v):
            raise ValueError("a tracker is named twice")
        return v

    @model_validator(mode="after")
    def _combinations(self) -> "TrainingConfig":
        _quantization_needs_lora("TrainingConfig", self)
        if self.method == "grpo" and self.distributed is not None:
            _field_errors("TrainingConfig", [(("distributed",), "method grpo trains in one process (rollouts and "
                                              "updates in the same trainer): remove training.distributed",
                                              self.distributed.model_dump())])
        return self


BASELINES = ("self-consistency", "best-of-n")


class EvaluationConfig(_Strict):
    """How each iteration's judge is evaluated on the eval datasets."""

    n: int = Field(1, ge=1, le=16, description="Judgments per item; the prediction is their mean score.")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 = greedy (deterministic evaluation).")
    max_new_tokens: int | None = Field(None, ge=8, le=4096, description="None = sampling.max_new_tokens.")
    seed: int = Field(1234)
    greedy: bool = Field(True, description="Evaluate with the method of every iteration (the figures without a "
                         "'<method>/' prefix); off only for a standalone baseline evaluation.")
    pairwise_modes: list[Literal["absolute", "relative"]] = Field(
        default_factory=lambda: ["absolute"],
        description="Pairwise datasets: absolute = score each side, the higher wins; relative = A/B judging in "
        "both orders (disagreement = tie).",
    )
    baselines: list[Literal["self-consistency", "best-of-n", "raw"]] = Field(
        default_factory=list,
        description="Baselines evaluated at iteration 0, stored as '<method>/<metric>': self-consistency and "
        "best-of-n of the initial judge; raw = `model` before the seed SFT, judged like the initial judge (needs "
        "`sft:`), so a run shows raw, J_SFT and each iteration side by side.",
    )
    baseline_n: int = Field(5, ge=2, le=64, description="Samples per item for self-consistency and best-of-n.")
    baseline_temperature: float = Field(1.0, gt=0.0, le=2.0)
    bootstrap: int = Field(1000, ge=0, le=100000, description="Bootstrap resamples for 95% intervals (0 = off).")
    batch_size: int | None = Field(
        None, ge=1, le=512,
        description="Prompts per batch of the greedy evaluation (the judge, A/B and raw judgments); None = "
        "sampling.batch_size. Its requests run sorted by length, so a larger batch pads little and its decode "
        "steps' matrix products are less thin (bench/eval_batch.py: 16 vs 8 prompts 1.10x on 2 CPU cores).",
    )


class SFTConfig(_Strict):
    """Seed SFT (TRL SFTTrainer) on gold rationales + scores: the judge J_SFT the loop starts from."""

    dataset: str = Field(
        ..., description="Imported absolute dataset with gold feedback (e.g. CIA, Feedback-Collection)."
    )
    split: Literal["train", "eval", "all"] = Field("train")
    max_items: int | None = Field(None, ge=1, description="Use only the first N items (by id).")
    epochs: float = Field(1.0, gt=0.0)
    learning_rate: float = Field(1e-5, gt=0.0, description="Prometheus 2: 1e-5, cosine, warmup 0.1.")
    lr_scheduler_type: Literal["cosine", "linear", "constant"] = Field("cosine")
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_length: int = Field(2048, ge=32, description="Prompt + target tokens; longer examples are truncated.")
    activation_checkpointing: Literal["auto"] | bool = Field(
        "auto", description="Recompute activations in the backward pass instead of keeping them: ~30% more time "
        "on CPU, about half the peak memory for CIA-length (1,600-token) pairs. auto = on for CUDA; on CPU, off "
        "where one example's activations at max_length (estimated from the model's shape) fit in half the "
        "memory available, else on.")
    lora: bool = Field(False)
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    seed: int = Field(0)
    precision: Literal["auto", "fp32", "bf16"] = Field("auto")
    quantization: Literal["4bit"] | None = Field(
        None, description="4bit: QLoRA (CUDA only; `qlora: true` is short for lora: true, quantization: 4bit).")

    @model_validator(mode="before")
    @classmethod
    def _qlora(cls, data):
        return _qlora_alias("sft", data)

    @model_validator(mode="after")
    def _combinations(self) -> "SFTConfig":
        _quantization_needs_lora("SFTConfig", self)
        return self


class RunConfig(_Strict):
    """A self-rationalization run: the initial judge's evaluation, then K x (sample, curate, train, evaluate)."""

    model: str = Field(
        "embedded", description="'embedded' (SmolLM2-135M-Instruct), a local checkpoint dir or a hub id."
    )
    train_dataset: str | None = Field(None, description="Name of an imported dataset; its train split is sampled.")
    eval_datasets: list[str] = Field(
        default_factory=list, description="Imported datasets; their eval split is evaluated."
    )
    iterations: int = Field(1, ge=0, le=20,
                            description="Self-rationalization iterations after iteration 0 (0 = evaluate only).")
    max_train_items: int | None = Field(None, ge=1, description="Use only the first N train items (by id).")
    max_eval_items: int | None = Field(None, ge=1, description="Use only the first N items per eval dataset.")
    eval_split: Literal["eval", "train", "all"] = Field("eval")
    train_items_per_iteration: int | None = Field(
        None, ge=1,
        description="Iteration k samples its own slice of the train items (k-1)*m .. k*m-1 (paper: fresh inputs "
        "per iteration); None = every iteration samples all of them.",
    )
    allow_contamination: bool = Field(
        False,
        description="Allow train/SFT items whose instruction+response also occur in an eval dataset (they are "
        "still never used for training; the overlap is reported). False = refuse such a run.",
    )
    sft: SFTConfig | None = Field(
        None, description="Train the initial judge J_SFT from `model` on gold rationales + scores before "
        "iteration 0; None = the loop starts from `model` as it is.",
    )
    evaluate_initial: bool = Field(True, description="Evaluate the initial judge as iteration 0 (off for a "
                                   "baseline run whose initial judge another run has evaluated already).")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    curation: CurationConfig = Field(default_factory=CurationConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)

    @model_validator(mode="before")
    @classmethod
    def _old_names(cls, data):
        """Configs written before the rename: `seed: {sft: ...}` and `evaluate_seed`. An integer `seed` here
        is not the old section: it is refused, pointing at the sections that take an RNG seed."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if "seed" in data:
            section = data["seed"]
            if section is not None and not isinstance(section, dict):
                raise ValueError(f"seed: {section!r} is not a run-level setting; an RNG seed goes in sampling.seed, "
                                 "training.seed, sft.seed or evaluation.seed (and the initial judge's SFT in `sft:`)")
            section = dict(section or {})
            unknown = sorted(set(section) - {"sft"})
            if unknown:
                raise ValueError(f"seed (deprecated section, now `sft:`): unknown key(s) {', '.join(unknown)}")
            if "sft" in data:
                raise ValueError("both `seed:` (the deprecated spelling) and `sft:` are given: keep `sft:` only")
            _renamed("seed: {sft: ...}", "sft: ...")
            del data["seed"]
            data["sft"] = section.get("sft")
        if "evaluate_seed" in data:
            if "evaluate_initial" in data:
                raise ValueError("both `evaluate_seed` (the deprecated spelling) and `evaluate_initial` are given")
            _renamed("evaluate_seed", "evaluate_initial")
            data["evaluate_initial"] = data.pop("evaluate_seed")
        return data

    @model_validator(mode="after")
    def _defaults_that_depend_on_model(self) -> "RunConfig":
        if self.iterations > 0 and not self.train_dataset:
            raise ValueError("train_dataset is required when iterations > 0")
        if "raw" in self.evaluation.baselines and self.sft is None:
            raise ValueError("evaluation.baselines: raw is the model before the seed SFT, and there is no `sft:`")
        if self.sampling.force_score is None:
            self.sampling.force_score = self.model == "embedded"
        return self

    @model_validator(mode="after")
    def _device_combinations(self, info: ValidationInfo) -> "RunConfig":
        """Settings that cannot run together, each named by its field. With `context={"gpus": N}` (the
        machine's GPU count, `parse_run_config(..., machine=True)`) `device: auto` and GPU counts are checked
        too; a stored run's config is loaded without it, so a GPU run still opens on a laptop."""
        gpus = (info.context or {}).get("gpus") if info is not None else None
        _field_errors("RunConfig", combination_errors(self, gpus))
        return self


def _where(device: str, gpus: int | None) -> str | None:
    """Where the stages run: 'cpu', 'mps', 'cuda', or None when `auto` cannot be told without the machine."""
    if device == "auto":
        return None if gpus is None else ("cuda" if gpus > 0 else "cpu")
    return "cuda" if device.startswith("cuda") else device


def combination_errors(cfg: RunConfig, gpus: int | None = None) -> list[tuple[tuple, str, object]]:
    """(field path, message, value) for each setting that cannot run with the others on the device the run
    trains and samples on (`sampling.device`): vLLM without a GPU, QLoRA without a GPU, FSDP / ZeRO-3 on CPU,
    more processes than GPUs (`gpus`: None = unknown, skip the checks that need it)."""
    s, t = cfg.sampling, cfg.training
    where = _where(s.device, gpus)
    no_gpu = where in ("cpu", "mps") or (where == "cuda" and gpus == 0)
    on = f"sampling.device is {s.device}" + (f" and this machine has {gpus} GPUs" if gpus is not None else "")
    errors: list[tuple[tuple, str, object]] = []
    if where == "cuda" and gpus == 0:
        errors.append((("sampling", "device"), f"{s.device}: no CUDA GPU here (nvidia-smi -L lists none); use "
                       "cpu or auto", s.device))
    # (device cpu / mps / cuda:N with vllm: SamplingConfig's own check; here what needs the machine)
    if s.backend == "vllm" and s.device == "auto" and gpus == 0:
        errors.append((("sampling", "backend"), f"vllm runs on CUDA GPUs only, and {on}: use backend "
                       "transformers here", s.backend))
    vllm = getattr(s, "vllm", None)
    tp = getattr(vllm, "tensor_parallel_size", 1)
    if s.backend == "vllm" and gpus and tp > gpus:
        errors.append((("sampling", "vllm", "tensor_parallel_size"), f"{tp} GPUs per model, and this machine "
                       f"has {gpus}", tp))
    sections = [("training", t)] + ([("sft", cfg.sft)] if cfg.sft is not None else [])
    for name, sec in sections:
        if sec.quantization and no_gpu:
            errors.append(((name, "quantization"), f"{sec.quantization} (QLoRA, bitsandbytes) needs a CUDA GPU, "
                           f"and {on}: use lora without quantization here", sec.quantization))
        if sec.quantization and t.distributed is not None and t.distributed.strategy != "ddp":
            errors.append(((name, "quantization"), f"{sec.quantization} with training.distributed.strategy "
                           f"{t.distributed.strategy} is not supported: use ddp, or one process", sec.quantization))
    d = t.distributed
    if d is None:
        return errors
    if d.strategy == "zero3" and d.num_processes < 2:
        errors.append((("training", "distributed", "num_processes"), "zero3 shards the model across processes: it "
                       "needs num_processes >= 2 (one process: ddp, fsdp, or no `distributed:` at all)",
                       d.num_processes))
    if where == "mps":
        errors.append((("training", "distributed"), "distributed training runs on cpu (ddp) or cuda; "
                       "sampling.device is mps", d.model_dump()))
    if s.device.startswith("cuda:"):
        errors.append((("training", "distributed"), f"runs one process per GPU from the first visible one, while "
                       f"sampling.device {s.device} names a single GPU: use cuda (CUDA_VISIBLE_DEVICES picks the "
                       "GPUs)", d.model_dump()))
    if d.strategy != "ddp" and (where in ("cpu", "mps") or (where == "cuda" and gpus == 0)):
        why = ("accelerate runs CPU ranks as MULTI_CPU (plain DDP) only" if d.strategy == "fsdp"
               else "DeepSpeed ZeRO-3 runs on GPUs")
        errors.append((("training", "distributed", "strategy"), f"{d.strategy} needs CUDA GPUs ({why}), and {on}: "
                       "use ddp here", d.strategy))
    if where == "cuda" and gpus is not None and 0 < gpus < d.num_processes:
        errors.append((("training", "distributed", "num_processes"), f"{d.num_processes} processes need "
                       f"{d.num_processes} GPUs (one each); this machine has {gpus}", d.num_processes))
    if d.mixed_precision is not None:
        for name, sec in sections:
            if sec.precision != "auto" and sec.precision != d.mixed_precision:
                errors.append((("training", "distributed", "mixed_precision"), f"{d.mixed_precision} contradicts "
                               f"{name}.precision: {sec.precision}; leave one of them unset (auto / null)",
                               d.mixed_precision))
    return errors


class ConfigError(SelfratError, ValueError):
    """A config file that cannot be used; the message names the file and each bad field."""


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid config"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


def load_run_config(path: str | Path, machine: bool = False) -> RunConfig:
    """The config in a YAML file; `machine`: also check it against this machine (see `parse_run_config`)."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read config: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: config must be a mapping of keys to values")
    return parse_run_config(raw, str(path), machine=machine)


def parse_run_config(raw: dict, source: str = "config", machine: bool = False) -> RunConfig:
    """A validated RunConfig (ConfigError naming each bad field). `machine`: also refuse what this machine
    cannot run (`combination_errors` with its GPU count: vllm or QLoRA without a GPU, more processes than
    GPUs); off for stored runs, whose configs must open anywhere."""
    try:
        return RunConfig.model_validate(raw, context={"gpus": gpu_count()} if machine else None)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None
