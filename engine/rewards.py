"""Rewards for GRPO on judgments (`training.method: grpo`): plain functions with TRL's reward-function signature.

TRL's GRPOTrainer calls each reward function as ``fn(prompts=..., completions=..., completion_ids=..., **columns)``
with one value per completion in every list: ``columns`` are the dataset's columns, repeated for the
``num_generations`` completions of each prompt (plus TRL's own ``trainer_state``, ``log_extra``, ``log_metric``,
which these functions ignore). A completion is a string, or, for a conversational dataset, a list of messages
whose last one is the assistant's judgment. Each function returns one float per completion, or None where it
does not apply (TRL treats None as "not scored by this function").

The rows engine/grpo.py builds carry these columns (`grpo_rows`):

- ``kind``: "absolute" (one response, scored 1-5) or "pairwise" (responses A and B, verdict A/B);
- ``gold_score``: the absolute item's gold (None for pairwise);
- ``label``: the pairwise item's gold in the item's terms, "A" = ``response``, "B" = ``response_b``, or "tie"
  (None for absolute);
- ``order``: "a" for an absolute prompt; for a pairwise one "ab" (A = response) or "ba" (A = response_b: the
  same item with the responses swapped);
- ``pair_key``: the item id as a string, shared by the two orders of a pairwise item.

Every judgment is read with engine/parsing.py's ``parse_judgment`` (absolute mode for absolute rows, relative
mode for pairwise ones), the same parser the sampled judgments go through.

    >>> score_reward(["p"], ["Fine. [RESULT] 4"], gold_score=[5.0], kind=["absolute"])
    [0.75]

The rewards (each in [0, 1]):

- ``score_reward`` (absolute): 1 - |score - gold| / 4, 0 when no score parses.
- ``format_reward`` (all rows): 1 when the judgment parses (ends in ``[RESULT] n``, 1-5 or A/B by kind) within
  the token budget (a rollout cut by ``max_completion_length`` only counts if its score form was written), else 0.
- ``verdict_reward`` (pairwise): 1 when the verdict, mapped back through ``order``, is the gold label, 0 when it
  is the other response or nothing parses; None for tie-labelled items.
- ``consistency_reward`` (pairwise, J1): the judge should prefer the same *response* whichever order it is
  shown in. A completion is compared with the completions of the other order of the same item **in the same
  call**, i.e. the same optimizer step (engine/grpo.py packs both orders of an item into one step): the reward
  is the share of those that name the same underlying response (an unparsed one counts as disagreeing); 0 when
  this completion names none; None when the other order is not in the call.

``weighted_reward(weights)`` combines them into one TRL reward function: the weighted mean of the rewards that
apply to the row (weight > 0 and not None), so the total is in [0, 1]; the components' batch means are logged
through TRL's ``log_metric`` as ``rewards/<name>``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from engine.parsing import Judgment, ParseStatus, parse_judgment

RewardFn = Callable[..., list[float | None]]

# An order's verdict in the item's terms: on "ba" the judge's A is the item's response_b.
_TO_ITEM = {"ab": {"A": "A", "B": "B"}, "ba": {"A": "B", "B": "A"}}
NAMES = ("score", "format", "verdict", "consistency")


def completion_text(completion: Any) -> str:
    """The judgment text of one completion: a string as it is; a conversation's last message's content."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion:
        last = completion[-1]
        content = last.get("content") if isinstance(last, Mapping) else last
        if isinstance(content, list):  # content blocks: [{"type": "text", "text": ...}]
            return "".join(b.get("text", "") for b in content if isinstance(b, Mapping))
        return content if isinstance(content, str) else ""
    return ""


def parse_completion(text: str, kind: str, truncated: bool = False) -> Judgment:
    """The judgment as parse_judgment reads it: relative mode (A/B) for a pairwise prompt, absolute (1-5) else."""
    return parse_judgment(text, truncated=truncated, mode="relative" if kind == "pairwise" else "absolute")


def _column(kwargs: Mapping, name: str, n: int) -> list:
    values = kwargs.get(name)
    if values is None:
        return [None] * n
    values = list(values)
    if len(values) != n:
        raise ValueError(f"reward column {name!r} has {len(values)} values for {n} completions")
    return values


def _judgments(completions: Sequence, kinds: Sequence) -> list[Judgment]:
    return [parse_completion(completion_text(c), k or "absolute") for c, k in zip(completions, kinds)]


def _gold(value) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        gold = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(gold) else gold


def score_reward(prompts: Sequence, completions: Sequence, **kwargs) -> list[float | None]:
    """Absolute rows: 1 - |score - gold| / 4 (clipped to [0, 1]), 0 when no score parses; None for pairwise rows
    and rows without a gold score."""
    n = len(completions)
    kinds, golds = _column(kwargs, "kind", n), _column(kwargs, "gold_score", n)
    out: list[float | None] = []
    for j, kind, gold in zip(_judgments(completions, kinds), kinds, golds):
        gold = _gold(gold)
        if kind == "pairwise" or gold is None:
            out.append(None)
        elif j.status is ParseStatus.OK:
            out.append(min(1.0, max(0.0, 1.0 - abs(int(j.score) - gold) / 4)))
        else:
            out.append(0.0)
    return out


def format_reward(prompts: Sequence, completions: Sequence, **kwargs) -> list[float | None]:
    """Every row: 1 when the judgment parses (its text ends in the score form of its kind), else 0."""
    kinds = _column(kwargs, "kind", len(completions))
    return [1.0 if j.status is ParseStatus.OK else 0.0 for j in _judgments(completions, kinds)]


def item_verdict(judgment: Judgment, order: str | None) -> str | None:
    """A relative judgment's verdict in the item's terms ("A" = response, "B" = response_b), None unparsed."""
    if judgment.status is not ParseStatus.OK or order not in _TO_ITEM:
        return None
    return _TO_ITEM[order].get(judgment.score)


def verdict_reward(prompts: Sequence, completions: Sequence, **kwargs) -> list[float | None]:
    """Pairwise rows with an A/B label: 1 for the gold verdict (mapped through `order`), 0 otherwise; None for
    absolute rows and tie-labelled (or unlabelled) items."""
    n = len(completions)
    kinds, labels, orders = _column(kwargs, "kind", n), _column(kwargs, "label", n), _column(kwargs, "order", n)
    out: list[float | None] = []
    for j, kind, label, order in zip(_judgments(completions, kinds), kinds, labels, orders):
        if kind != "pairwise" or label not in ("A", "B"):
            out.append(None)
        else:
            out.append(1.0 if item_verdict(j, order) == label else 0.0)
    return out


def consistency_reward(prompts: Sequence, completions: Sequence, **kwargs) -> list[float | None]:
    """Pairwise rows: the share of this call's completions for the same item in the other order that name the
    same underlying response (unparsed ones disagree); 0 when this one names none; None when the other order
    is not in the call, and for absolute rows."""
    n = len(completions)
    kinds, orders, keys = _column(kwargs, "kind", n), _column(kwargs, "order", n), _column(kwargs, "pair_key", n)
    verdicts = [item_verdict(j, o) for j, o in zip(_judgments(completions, kinds), orders)]
    by_order: dict[tuple, list[str | None]] = defaultdict(list)
    for kind, key, order, v in zip(kinds, keys, orders, verdicts):
        if kind == "pairwise":
            by_order[(key, order)].append(v)
    out: list[float | None] = []
    for kind, key, order, v in zip(kinds, keys, orders, verdicts):
        other = by_order.get((key, "ba" if order == "ab" else "ab")) if kind == "pairwise" else None
        if not other:
            out.append(None)
        elif v is None:
            out.append(0.0)
        else:
            out.append(sum(o == v for o in other) / len(other))
    return out


REWARDS: dict[str, RewardFn] = {"score": score_reward, "format": format_reward, "verdict": verdict_reward,
                                "consistency": consistency_reward}


def component_rewards(prompts: Sequence, completions: Sequence, weights: Mapping[str, float],
                      **kwargs) -> dict[str, list[float | None]]:
    """Each reward with a weight > 0, by name: one value (or None) per completion."""
    unknown = set(weights) - set(REWARDS)
    if unknown:
        raise ValueError(f"unknown reward(s) {sorted(unknown)}; expected {', '.join(NAMES)}")
    return {name: REWARDS[name](prompts, completions, **kwargs) for name in NAMES if weights.get(name, 0) > 0}


def combine(components: Mapping[str, Sequence[float | None]], weights: Mapping[str, float]) -> list[float | None]:
    """Per completion, the weighted mean of the components that apply to it (None: none does)."""
    names = [k for k in components if weights.get(k, 0) > 0]
    n = len(next(iter(components.values()))) if components else 0
    out: list[float | None] = []
    for i in range(n):
        parts = [(weights[k], components[k][i]) for k in names if components[k][i] is not None]
        total = sum(w for w, _ in parts)
        out.append(sum(w * v for w, v in parts) / total if total > 0 else None)
    return out


def weighted_reward(weights: Mapping[str, float],
                    on_scored: Callable[..., None] | None = None) -> RewardFn:
    """One TRL reward function `judge_reward` for `weights` (e.g. ``GRPORewardWeights.model_dump()``): the
    weighted mean of the components per completion. `on_scored(prompts=, completions=, components=, rewards=,
    **kwargs)` sees every call (engine/grpo.py stores the rollouts through it)."""
    weights = {k: float(v) for k, v in weights.items()}

    def judge_reward(prompts, completions, **kwargs) -> list[float | None]:
        parts = component_rewards(prompts, completions, weights, **kwargs)
        rewards = combine(parts, weights)
        log_metric = kwargs.get("log_metric")
        if callable(log_metric):
            for name, values in parts.items():
                scored = [v for v in values if v is not None]
                if scored:
                    log_metric(f"rewards/{name}", sum(scored) / len(scored))
        if on_scored is not None:
            on_scored(prompts=prompts, completions=completions, components=parts, rewards=rewards, **kwargs)
        return rewards

    return judge_reward


__all__ = [
    "NAMES", "REWARDS", "combine", "completion_text", "component_rewards", "consistency_reward", "format_reward",
    "item_verdict", "parse_completion", "score_reward", "verdict_reward", "weighted_reward",
]
