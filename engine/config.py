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
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from engine.devices import DEVICE_HELP, check_device
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

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        return check_device(v)


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


class TrainingConfig(_Strict):
    """DPO on the curated pairs (TRL DPOTrainer)."""

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
    lora: bool = Field(False, description="Train LoRA adapters (peft) and merge them into the checkpoint.")
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    reference: Literal["previous", "initial"] = Field(
        "previous", description="DPO reference model: the previous iteration's judge, or the initial judge "
        "(iteration 0's: `model`, or J_SFT with `sft:`). `seed` is a deprecated spelling of `initial`.",
    )
    seed: int = Field(0)
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto = fp32 on CPU (bf16 is ~10x slower on AVX2 CPUs), bf16 on GPU."
    )


    @model_validator(mode="before")
    @classmethod
    def _old_reference_name(cls, data):
        if isinstance(data, dict) and data.get("reference") == "seed":
            _renamed("training.reference: seed", "training.reference: initial")
            data = {**data, "reference": "initial"}
        return data


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
    baselines: list[Literal["self-consistency", "best-of-n"]] = Field(
        default_factory=list,
        description="Baselines evaluated on the initial judge (iteration 0), stored as '<method>/<metric>'.",
    )
    baseline_n: int = Field(5, ge=2, le=64, description="Samples per item for self-consistency and best-of-n.")
    baseline_temperature: float = Field(1.0, gt=0.0, le=2.0)
    bootstrap: int = Field(1000, ge=0, le=100000, description="Bootstrap resamples for 95% intervals (0 = off).")


class SFTConfig(_Strict):
    """Seed SFT (TRL SFTTrainer) on gold rationales + scores: the judge J_SFT the loop starts from."""

    dataset: str = Field(..., description="Imported absolute dataset with gold feedback (e.g. CIA, Feedback-Collection).")
    split: Literal["train", "eval", "all"] = Field("train")
    max_items: int | None = Field(None, ge=1, description="Use only the first N items (by id).")
    epochs: float = Field(1.0, gt=0.0)
    learning_rate: float = Field(1e-5, gt=0.0, description="Prometheus 2: 1e-5, cosine, warmup 0.1.")
    lr_scheduler_type: Literal["cosine", "linear", "constant"] = Field("cosine")
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_length: int = Field(2048, ge=32, description="Prompt + target tokens; longer examples are truncated.")
    lora: bool = Field(False)
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    seed: int = Field(0)
    precision: Literal["auto", "fp32", "bf16"] = Field("auto")


class RunConfig(_Strict):
    """A self-rationalization run: the initial judge's evaluation, then K x (sample, curate, train, evaluate)."""

    model: str = Field("embedded", description="'embedded' (SmolLM2-135M-Instruct), a local checkpoint dir or a hub id.")
    train_dataset: str | None = Field(None, description="Name of an imported dataset; its train split is sampled.")
    eval_datasets: list[str] = Field(default_factory=list, description="Imported datasets; their eval split is evaluated.")
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
        if self.sampling.force_score is None:
            self.sampling.force_score = self.model == "embedded"
        return self


class ConfigError(SelfratError, ValueError):
    """A config file that cannot be used; the message names the file and each bad field."""


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid config"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


def load_run_config(path: str | Path) -> RunConfig:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: cannot read config: {e}") from e
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: config must be a mapping of keys to values")
    return parse_run_config(raw, str(path))


def parse_run_config(raw: dict, source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None
