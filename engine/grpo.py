"""GRPO on the judge's own rollouts (`training.method: grpo`), beside iterative DPO: TRL's `GRPOTrainer` with
the rewards of engine/rewards.py, as J1 trains generative judges (reward = the right score / verdict, and the
same verdict in both orders).

    items = store.items("cia", "train")
    grpo_rows(items)        # the prompts: 1 per absolute item, 2 per pairwise one (orders ab, ba)
    metrics = train_grpo(policy_path="runs/r1/checkpoints/iter-0-sft", items=items, cfg=TrainingConfig(
                             method="grpo"), out_dir=Path("runs/r1/checkpoints/iter-1"),
                         on_rollouts=lambda rollouts: store.insert_judgments(rollout_judgments(rollouts, ...)))

Prompts are the judge prompts of sampling and evaluation (engine/prompts.py): `absolute_messages` for an
absolute item, `relative_messages` in both orders for a pairwise one. Each optimizer step takes
`prompts_per_step` prompts, generates `num_generations` completions for each (one *group*), scores every
completion and updates the policy on the group-normalised rewards. Both orders of a pairwise item are always in
the same step (see `plan_rows`), which is what the consistency reward compares.

**Rollouts are judgments.** Every completion is handed to `on_rollouts` as a `Rollout` as soon as it is
scored: its item, order (side), step (1-based optimizer step it was generated for), group (the prompt's index in
the step), index in the group, text parsed by engine/parsing.py, reward and reward components. The runner stores
them as judgments of purpose `rollout` (`rollout_judgments`); `sample_index` is the rollout's position in the
whole training run, ((step - 1) x prompts_per_step + group) x num_generations + index, so its judgment id is
deterministic and a rerun writes the same ids.

**Checkpoints** are published as DPO's are (engine/training.py): trained in a `.tmp` sibling, marked with
`selfrat_checkpoint.json` (kind "grpo") and moved into place, so calling `train_grpo` on a finished `out_dir`
returns its stored metrics without training. A killed run restarts the stage from the start (`on_start` is
called first, before any rollout: the runner drops the killed attempt's rollouts there).

**Generation**: on a GPU with vllm installed (engine/backends.py `vllm_available`), TRL's vLLM in colocate mode
(`use_vllm=True, vllm_mode="colocate"`: the engine lives in the training process and gets the weights after each
step); otherwise the policy's own `generate`. Precision as every stage: `training.precision` resolved by
engine/precision.py (fp32 master weights, bf16 autocast where bf16 is native).

Batching: a step is one TRL generation batch of prompts_per_step x num_generations completions. On CPU it trains
as micro-batches of one completion accumulated into the step (as DPO's pairs); on GPU in micro-batches of
gcd(training.batch_size, completions per step).
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from engine.config import TrainingConfig
from engine.prompts import absolute_messages, relative_messages
from engine.rewards import completion_text, parse_completion, weighted_reward
from store.errors import UsageError

if TYPE_CHECKING:
    import polars as pl

ROLLOUT = "rollout"  # the judgments' purpose


@dataclass(frozen=True)
class Rollout:
    """One scored completion of a GRPO step (what `on_rollouts` receives)."""

    item_id: int
    side: str                 # "a" (absolute prompt), "ab" / "ba" (pairwise, responses in that order)
    kind: str                 # absolute | pairwise
    step: int                 # the optimizer step it was generated for, 1-based
    group_index: int          # its prompt's index within the step, 0-based
    index: int                # its index within the group, 0..num_generations-1
    sample_index: int         # its position in the whole run (see the module docstring)
    text: str
    completion_tokens: int | None
    truncated: bool           # the generation hit max_completion_length
    rationale: str
    score: int | None         # absolute: the parsed score
    verdict: str | None       # pairwise: the parsed verdict, as written (in the shown order)
    parse_status: str
    reward: float | None      # the total the trainer used (None: no reward applied)
    components: dict = field(default_factory=dict)  # reward name -> value (None where it does not apply)


# ------------------------------------------------------------------------------------------ the data


def grpo_rows(items: "pl.DataFrame | Sequence[Mapping]") -> list[dict]:
    """The prompts GRPO trains on, with the columns the rewards read (engine/rewards.py): an absolute item gives
    one row (order "a"), a pairwise item two (orders "ab" and "ba", the same pair_key). Rows keep the items'
    order."""
    rows = items.iter_rows(named=True) if hasattr(items, "iter_rows") else items
    out = []
    for it in rows:
        item_id = int(it["item_id"])
        base = {"item_id": item_id, "pair_key": str(item_id), "kind": it.get("kind") or "absolute"}
        if base["kind"] == "pairwise":
            if not isinstance(it.get("response_b"), str):
                raise UsageError(f"item {item_id}: a pairwise item without response_b")
            label = it.get("label") if it.get("label") in ("A", "B", "tie") else None
            for order, swap in (("ab", False), ("ba", True)):
                out.append({**base, "prompt": relative_messages(it, swap=swap), "order": order, "gold_score": None,
                            "label": label})
        else:
            gold = it.get("gold_score")
            out.append({**base, "prompt": absolute_messages(it), "order": "a",
                        "gold_score": None if gold is None else float(gold), "label": None})
    return out


def _units(rows: Sequence[dict]) -> list[list[dict]]:
    """Rows grouped into what must stay together: a pairwise item's two orders, or one absolute row."""
    units: list[list[dict]] = []
    for row in rows:
        if row["kind"] == "pairwise" and row["order"] == "ba" and units and units[-1][0]["pair_key"] == row["pair_key"]:
            units[-1].append(row)
        else:
            units.append([row])
    return units


def plan_steps(n_rows: int, prompts_per_step: int, max_steps: int | None, epochs: float) -> int:
    """Optimizer steps: max_steps, else enough for `epochs` passes over the rows (at least 1)."""
    if max_steps:
        return int(max_steps)
    return max(1, math.ceil(epochs * n_rows / prompts_per_step))


def plan_rows(rows: Sequence[dict], prompts_per_step: int, steps: int, seed: int = 0) -> list[dict]:
    """The training stream: `steps` x `prompts_per_step` rows, step after step, each pass over the rows in its
    own seeded order, and both orders of a pairwise item always in one step (a step with one slot left takes the
    next absolute row of the stream instead, so no filler is ever needed). TRL reads it in this order
    (shuffle_dataset off)."""
    units = _units(rows)
    if not units:
        raise UsageError("GRPO got no train items")
    if any(len(u) == 2 for u in units) and prompts_per_step % 2:
        raise UsageError(f"training.grpo.prompts_per_step is {prompts_per_step}: with pairwise items (two orders "
                         "each, in the same step) it must be even")

    def stream() -> Iterator[list[dict]]:
        rng = random.Random(seed)
        while True:  # pass after pass, each shuffled anew
            order = list(units)
            rng.shuffle(order)
            yield from order

    source, pending = stream(), deque()
    has_single = any(len(u) == 1 for u in units)
    out: list[dict] = []
    for _ in range(steps):
        room = prompts_per_step
        while room:
            if not pending:
                pending.append(next(source))
            unit = pending[0]
            if len(unit) <= room:
                pending.popleft()
            else:  # a pair with one slot left: the next absolute row fills it (one exists: the step is even)
                if not has_single:
                    raise AssertionError("unreachable: pairs only and an even step leave no odd slot")
                while True:
                    single = next((u for u in pending if len(u) == 1), None)
                    if single is not None:
                        pending.remove(single)
                        unit = single
                        break
                    pending.append(next(source))
            out.extend(unit)
            room -= len(unit)
    return out


# ------------------------------------------------------------------------------------------ rollouts


def rollout_judgments(rollouts: Sequence[Rollout], *, run_id: str, iteration: int, model: str,
                      cfg: TrainingConfig, precision: str | None = None) -> list[dict]:
    """Judgment rows (store.insert_judgments) for rollouts: purpose `rollout`, parsed like sampled judgments,
    with their reward, step and group; the judgment id from (run, iteration, purpose, item, side, sample_index)."""
    from store import judgment_id

    g = cfg.grpo
    return [{
        "judgment_id": judgment_id(run_id, iteration, ROLLOUT, r.item_id, r.side, r.sample_index),
        "run_id": run_id, "iteration": iteration, "purpose": ROLLOUT, "item_id": r.item_id, "side": r.side,
        "sample_index": r.sample_index, "model": model, "temperature": g.temperature, "top_p": g.top_p,
        "max_new_tokens": g.max_completion_length, "seed": cfg.seed, "raw_text": r.text, "text": r.text,
        "rationale": r.rationale, "score": r.score, "parse_status": r.parse_status, "forced": False,
        "p1": None, "p2": None, "p3": None, "p4": None, "p5": None, "prompt_tokens": None,
        "completion_tokens": r.completion_tokens, "latency_s": None, "verdict": r.verdict, "precision": precision,
        "reward": r.reward, "step": r.step, "group_index": r.group_index,
    } for r in rollouts]


def _recorder(on_rollouts: Callable[[list[Rollout]], None] | None, *, num_generations: int, prompts_per_step: int,
              max_completion_length: int, eos_ids: set[int]) -> Callable[..., None]:
    """`weighted_reward`'s on_scored hook: every scored completion as a Rollout, to `on_rollouts`. One call is
    one step's generation batch, in TRL's order: prompt after prompt, each repeated num_generations times."""

    def on_scored(*, prompts, completions, components, rewards, trainer_state=None, completion_ids=None,
                  **columns) -> None:
        if on_rollouts is None:
            return
        step = (trainer_state.global_step if trainer_state is not None else 0) + 1
        out = []
        for i, completion in enumerate(completions):
            group, index = divmod(i, num_generations)
            kind, order = columns["kind"][i], columns["order"][i]
            ids = list(completion_ids[i]) if completion_ids is not None else None
            truncated = bool(ids) and len(ids) >= max_completion_length and ids[-1] not in eos_ids
            text = completion_text(completion)
            j = parse_completion(text, kind, truncated=truncated)
            out.append(Rollout(
                item_id=int(columns["item_id"][i]), side=order, kind=kind, step=step, group_index=group,
                index=index, sample_index=((step - 1) * prompts_per_step + group) * num_generations + index,
                text=text, completion_tokens=len(ids) if ids is not None else None, truncated=truncated,
                rationale=j.rationale, score=j.score if kind != "pairwise" else None,
                verdict=j.score if kind == "pairwise" else None, parse_status=j.status.value, reward=rewards[i],
                components={name: values[i] for name, values in components.items()}))
        on_rollouts(out)

    return on_scored


# ------------------------------------------------------------------------------------------ training


def _summarize(log_history: list[dict], global_step: int, runtime_s: float, n_items: int, n_rows: int,
               rollouts: int) -> dict[str, float]:
    steps = [h for h in log_history if "loss" in h and "reward" in h]

    def mean(key: str) -> float | None:
        values = [float(h[key]) for h in steps if key in h and h[key] is not None and not math.isnan(float(h[key]))]
        return sum(values) / len(values) if values else None

    out = {"train/loss": mean("loss"), "train/reward": mean("reward"), "train/reward_std": mean("reward_std"),
           "train/reward_first": float(steps[0]["reward"]) if steps else None,
           "train/reward_last": float(steps[-1]["reward"]) if steps else None,
           "train/completion_length": mean("completions/mean_length"), "train/kl": mean("kl"),
           **{f"train/{k}": mean(k) for k in sorted({k for h in steps for k in h if k.startswith("rewards/")
                                                     and not k.startswith("rewards/judge_reward")})},
           "train/steps": float(global_step), "train/runtime_s": float(runtime_s), "train/items": float(n_items),
           "train/prompts": float(n_rows), "train/rollouts": float(rollouts)}
    return {k: v for k, v in out.items() if v is not None}


class _TimeBudget:
    """`grpo.max_time_s`: asks the trainer to stop after the first optimizer step that ends past the budget."""

    def __init__(self, seconds: float, say: Callable[[str], None]):
        self.seconds, self.say, self.stopped, self.t0 = seconds, say, False, None

    def callback(self):
        from transformers import TrainerCallback

        budget = self

        class _Stop(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                budget.t0 = time.monotonic()

            def on_step_end(self, args, state, control, **kwargs):
                elapsed = time.monotonic() - (budget.t0 or time.monotonic())
                if elapsed >= budget.seconds and state.global_step < state.max_steps:
                    budget.stopped = control.should_training_stop = True
                    budget.say(f"time budget of {budget.seconds:.0f} s reached after step {state.global_step} "
                               f"({elapsed:.0f} s): stopping")

        return _Stop()


def _finished_metrics(out_dir: Path, say: Callable[[str], None]) -> dict[str, float] | None:
    from engine.training import _stored_metrics

    return _stored_metrics(out_dir, say)


def grpo_args(cfg: TrainingConfig, *, dev: str, precision: str, scratch: Path, steps: int,
              use_vllm: bool) -> dict:
    """TRL GRPOConfig fields: those every stage shares (engine.training `_trl_args`: precision, device, logging,
    no saving) and GRPO's own. One optimizer step is one generation batch of prompts_per_step x num_generations
    completions, in micro-batches of 1 on CPU (as DPO's pairs) and of gcd(batch_size, completions) on GPU;
    `use_vllm` (a GPU with vllm installed): rollouts from vLLM colocated in this process."""
    from engine.training import _trl_args

    g = cfg.grpo
    completions = g.prompts_per_step * g.num_generations
    micro = 1 if dev == "cpu" else math.gcd(cfg.batch_size, completions)
    args = _trl_args(cfg, scratch=scratch, dev=dev, precision=precision, report_to=cfg.report_to)
    args.pop("max_length")  # GRPO budgets the completion only (max_completion_length)
    args.update(
        learning_rate=g.learning_rate or cfg.learning_rate, num_train_epochs=1, max_steps=steps,
        per_device_train_batch_size=micro, gradient_accumulation_steps=completions // micro,
        num_generations=g.num_generations, max_completion_length=g.max_completion_length,
        temperature=g.temperature, top_p=g.top_p, beta=g.beta,
        shuffle_dataset=False,  # plan_rows ordered the stream: both orders of an item in one step
        use_vllm=use_vllm,
    )
    if use_vllm:
        args.update(vllm_mode="colocate", vllm_gpu_memory_utilization=g.vllm_gpu_memory_utilization)
    return args


def _completion_head_grpo():
    """TRL's GRPOTrainer with the LM head run on the completion positions only (engine/completion_head.py):
    off Triton devices TRL's fused head scores each rollout's whole judge prompt too."""
    from trl import GRPOTrainer

    from engine.completion_head import CompletionHeadModel, supported

    class CompletionHeadGRPO(GRPOTrainer):
        def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
            if supported(model):
                model = CompletionHeadModel(model, self.accelerator.autocast)
            return super()._get_per_token_logps_and_entropies(model, *args, **kwargs)

    return CompletionHeadGRPO


def train_grpo(
    *,
    policy_path: str,
    items: "pl.DataFrame | Sequence[Mapping]",
    cfg: TrainingConfig,
    out_dir: Path,
    device: str = "auto",
    log: Callable[[str], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_rollouts: Callable[[list[Rollout]], None] | None = None,
    on_start: Callable[[], None] | None = None,
    tb_dir: Path | None = None,
) -> dict[str, float]:
    """Train `policy_path` with GRPO on `items` and save a full checkpoint to `out_dir`.

    Args:
        policy_path: the judge to train (a checkpoint dir or hub id); it also generates the rollouts.
        items: train items (store.items rows): absolute ones are scored 1-5 against gold_score, pairwise ones
            judged A/B in both orders against label.
        cfg: `training`: its `grpo` section (generations, prompts per step, completion budget, temperature,
            beta, learning rate, steps or epochs, `max_time_s`, reward weights) and what GRPO shares with DPO
            (seed, precision, LoRA, report_to, and learning_rate when grpo.learning_rate is None).
        out_dir: where the checkpoint goes; a finished one there is returned without training.
        device: auto, cpu, cuda, cuda:N (engine.devices).
        log: one line per optimizer step ("step 3/8 reward=0.412 loss=0.0123").
        progress: (steps done, total steps) at the start and after each step.
        on_rollouts: every step's scored completions, as `Rollout`s, right after they are scored.
        on_start: called once training really starts (not when `out_dir` is finished already).
        tb_dir: TensorBoard logs with `report_to: [tensorboard]` (default: beside out_dir).

    Returns:
        `train/reward` (mean over steps of the batch mean reward), `train/reward_first`, `train/reward_last`,
        `train/reward_std`, `train/rewards/<component>`, `train/loss`, `train/completion_length`, `train/kl`
        (beta > 0), `train/steps`, `train/runtime_s`, `train/items`, `train/prompts`, `train/rollouts`, and
        with max_time_s `train/stopped_by_time` (1: the budget ended training before the planned steps).
    """
    out_dir, say = Path(out_dir), log or (lambda _line: None)
    if (stored := _finished_metrics(out_dir, say)) is not None:
        return stored
    g = cfg.grpo
    if cfg.distributed is not None:
        raise UsageError("method grpo trains in one process: remove training.distributed")
    rows = grpo_rows(items)
    if not rows:
        raise UsageError("train_grpo got zero items: the iteration has no train items")
    weights = g.rewards.model_dump()
    kinds = {r["kind"] for r in rows}
    for kind, names in (("absolute", ("score", "format")), ("pairwise", ("verdict", "consistency", "format"))):
        if kind in kinds and not any(weights[n] > 0 for n in names):
            raise UsageError(f"training.grpo.rewards: every reward that applies to {kind} items ({', '.join(names)}) "
                             "has weight 0")
    steps = plan_steps(len(rows), g.prompts_per_step, g.max_steps, g.epochs)
    stream = plan_rows(rows, g.prompts_per_step, steps, seed=cfg.seed)

    import datasets
    from transformers import AutoTokenizer
    from trl import GRPOConfig as TRLGRPOConfig

    from engine.backends import vllm_available
    from engine.devices import resolve_device, use_device
    from engine.precision import resolve_precision
    from engine.training import _checkpoint_dirs, _load, _publish_trained, _require_trackers, _train, _trainer

    _require_trackers(cfg.report_to)
    dev = resolve_device(device)
    use_device(dev)
    precision = resolve_precision(cfg.precision, dev)
    use_vllm = dev.startswith("cuda") and vllm_available()
    dataset = datasets.Dataset.from_list(stream)
    if on_start is not None:
        on_start()
    counted = {"rollouts": 0}

    def store(rollouts: list[Rollout]) -> None:
        counted["rollouts"] += len(rollouts)
        if on_rollouts is not None:
            on_rollouts(rollouts)

    with _checkpoint_dirs(out_dir) as (tmp_dir, scratch):
        model = _load(policy_path, cfg.quantization, precision)
        tokenizer = AutoTokenizer.from_pretrained(policy_path, trust_remote_code=False)
        eos = model.generation_config.eos_token_id
        eos_ids = {tokenizer.eos_token_id, *([eos] if isinstance(eos, int) else (eos or []))} - {None}
        args = TRLGRPOConfig(**grpo_args(cfg, dev=dev, precision=precision, scratch=scratch, steps=steps,
                                         use_vllm=use_vllm))
        reward = weighted_reward(weights, on_scored=_recorder(
            store, num_generations=g.num_generations, prompts_per_step=g.prompts_per_step,
            max_completion_length=g.max_completion_length, eos_ids=eos_ids))
        say(f"GRPO: {len(rows)} prompts of {len({r['pair_key'] for r in rows})} items, {steps} steps x "
            f"{g.prompts_per_step} prompts x {g.num_generations} generations, policy={policy_path}, device={dev}, "
            f"precision={precision}, generation={'vllm colocate' if use_vllm else 'transformers generate'}, "
            f"beta={g.beta}, lora={cfg.lora}, rewards={ {k: v for k, v in weights.items() if v > 0} }")
        budget = _TimeBudget(g.max_time_s, say) if g.max_time_s else None
        trainer = _trainer(_completion_head_grpo(), cfg, model=model, args=args, dataset=dataset, tokenizer=tokenizer,
                           say=say, progress=progress, launched=None,
                           tb_dir=tb_dir or out_dir.parent / f"{out_dir.name}.tb",
                           line=lambda logs: (f"reward={logs.get('reward', math.nan):.3f} "
                                              f"loss={logs['loss']:.4f}"),
                           reward_funcs=[reward])
        if budget is not None:
            trainer.add_callback(budget.callback())
        history, done_steps, runtime_s = _train(trainer)
        metrics = _summarize(history, done_steps, runtime_s, len({r["pair_key"] for r in rows}), len(rows),
                             counted["rollouts"])
        if budget is not None:
            metrics["train/stopped_by_time"] = float(budget.stopped)
        record = {
            "kind": "grpo",
            "policy_path": str(policy_path),
            "n_items": len({r["pair_key"] for r in rows}),
            "n_prompts": len(rows),
            "steps": steps,
            "generation": "vllm-colocate" if use_vllm else "transformers",
            "training": cfg.model_dump(),
        }
        _publish_trained(trainer, tokenizer, cfg, record, base_path=str(policy_path), tmp_dir=tmp_dir,
                         out_dir=out_dir, dev=dev, precision=precision, launched=None, metrics=metrics)
    say(f"saved {out_dir} ({metrics['train/steps']:.0f} steps, mean reward "
        f"{metrics.get('train/reward', math.nan):.3f})")
    return metrics


__all__ = ["ROLLOUT", "Rollout", "grpo_args", "grpo_rows", "plan_rows", "plan_steps", "rollout_judgments", "train_grpo"]
