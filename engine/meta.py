"""Meta-judge: a judge rates judgments (feedback + score) 1-5 with the meta prompt (engine.prompts.meta_messages).

Meta curation ranks an iteration's sampled judgments by these ratings (the rater is the judge that wrote
them, as in the paper), and the best-of-N baseline keeps the highest-rated of N samples. Ratings use the
absolute machinery unchanged: the meta-judge writes "<assessment> [RESULT] <n>", parsed like a judgment,
with `force_score` closing an assessment that has no rating. Greedy by default, so a rating is a property of
(judgment, rater). Ratings are stored per (judgment, rater) as they are made, batch by batch: a killed
rating stage resumes where it stopped and never rates a judgment twice.

    written = rate_judgments(store, sampler, judgments, items, run_id="r1", iteration=1)
    ratings = stored_ratings(store, "r1", 1, sampler.model_name)   # judgment_id, rating

This module imports torch only when it generates (engine.sampling), so the app can read ratings cheaply.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import polars as pl

from engine.prompts import meta_messages

if TYPE_CHECKING:
    from engine.config import CurationConfig
    from engine.sampling import Sampler, SamplingParams
    from store import Store

META_SEED = 0  # base seed of sampled (non-greedy) ratings; each judgment's seed derives from it and its id
RESPONSE_KEY = {"a": "response", "b": "response_b"}  # the side of an item a judgment grades


def default_params(max_new_tokens: int = 64, force_score: bool = True) -> "SamplingParams":
    """Greedy meta-judging: one deterministic rating per (judgment, rater)."""
    from engine.sampling import SamplingParams

    return SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=max_new_tokens, force_score=force_score)


def rate_judgments(
    store: "Store", sampler: "Sampler", judgments: pl.DataFrame, items: pl.DataFrame, *, run_id: str,
    iteration: int, params: "SamplingParams | None" = None, batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None, base_seed: int = META_SEED,
) -> int:
    """Rate each judgment not yet rated by `sampler.model_name`; returns how many ratings were written.

    `judgments`: judgment_id, item_id, text (and side, "a" when absent) of judgments of (run_id, iteration),
    e.g. `store.judgments(...)`; a judgment without text has nothing to rate and is passed over. `items`: the
    items they grade (instruction, response(_b), reference, rubric columns), e.g. `store.items(dataset)`.
    `params`: None = `default_params()` (greedy, forced rating)."""
    from engine.sampling import judgment_seed

    params = params or default_params()
    todo = _todo(store, sampler.model_name, judgments, run_id, iteration)
    by_id = {row["item_id"]: row for row in items.iter_rows(named=True)}
    missing = [(j, i) for j, i in zip(todo["judgment_id"], todo["item_id"]) if i not in by_id]
    if missing:
        raise ValueError(f"judgment {missing[0][0]}: its item {missing[0][1]} is not among the items given"
                         f" ({len(missing)} judgments lack their item)")
    total, written, done = todo.height, 0, 0
    if progress:
        progress(0, total)
    for batch in _batches(todo, batch_size):
        prompts = [meta_messages(by_id[j["item_id"]], j["text"], RESPONSE_KEY[j["side"]]) for j in batch]
        seeds = [[judgment_seed(base_seed, f"meta/{j['judgment_id']}", 0)] for j in batch]
        samples = sampler.generate(prompts, 1, params, seeds)
        rows = []
        for j, (s,) in zip(batch, samples):
            probs = s.score_probs or [None] * 5
            rows.append({
                "judgment_id": j["judgment_id"], "rater_model": sampler.model_name, "run_id": run_id,
                "iteration": iteration, "rating": s.score, "text": s.text, "parse_status": s.parse_status,
                "forced": s.forced, **{f"p{k + 1}": probs[k] for k in range(5)},
            })
        written += store.insert_meta_ratings(rows)
        done += len(batch)
        if progress:
            progress(done, total)
    return written


def _batches(todo: pl.DataFrame, batch_size: int) -> list[list[dict]]:
    """Batches of whole (item, side) groups, up to `batch_size` judgments (a larger group is split): the
    ratings of one response share its long prompt prefix, which the sampler then computes once."""
    groups: dict[tuple, list[dict]] = {}
    for j in todo.to_dicts():
        groups.setdefault((j["item_id"], j["side"]), []).append(j)
    batches, batch = [], []
    for group in groups.values():
        while group:
            if batch and len(batch) + len(group) > batch_size:
                batches.append(batch)
                batch = []
            take = batch_size - len(batch)
            batch, group = batch + group[:take], group[take:]
    return batches + ([batch] if batch else [])


def _todo(store: "Store", rater: str, judgments: pl.DataFrame, run_id: str, iteration: int) -> pl.DataFrame:
    """The judgments still to rate: with text, not rated by `rater` yet; checked for what rating needs."""
    missing = [c for c in ("judgment_id", "item_id", "text") if c not in judgments.columns]
    if missing:
        raise ValueError(f"judgments to rate lack column(s) {', '.join(missing)}")
    if "side" not in judgments.columns:
        judgments = judgments.with_columns(side=pl.lit("a"))
    for col, want in (("run_id", run_id), ("iteration", iteration)):
        if col in judgments.columns:
            other = judgments.filter(pl.col(col) != want)
            if other.height:
                raise ValueError(f"judgment {other['judgment_id'][0]}: {col} {other[col][0]!r} is not {want!r};"
                                 " ratings are stored under the rated judgments' run and iteration")
    bad_side = judgments.filter(~pl.col("side").is_in(list(RESPONSE_KEY)))
    if bad_side.height:
        raise ValueError(f"judgment {bad_side['judgment_id'][0]}: side {bad_side['side'][0]!r} is not rated"
                         " (meta ratings are for absolute judgments, sides 'a' and 'b')")
    done = stored_ratings(store, run_id, iteration, rater)["judgment_id"]
    return (judgments.filter(pl.col("text").is_not_null() & ~pl.col("judgment_id").is_in(done.implode()))
            .select("judgment_id", "item_id", "side", "text"))


def stored_ratings(store: "Store", run_id: str, iteration: int, rater_model: str | None = None,
                   purpose: str | None = None) -> pl.DataFrame:
    """judgment_id, rating of the stored ratings of (run, iteration[, purpose])'s judgments by
    `rater_model`; None = self-ratings, each judgment rated by the model that wrote it (how the runner's
    meta curation rates). A rating that could not be read is null."""
    ratings = store.meta_ratings(run_id, iteration, purpose)
    if rater_model is None:
        if ratings.height == 0:
            return pl.DataFrame(schema={"judgment_id": pl.Int64, "rating": pl.Int32})
        writers = store.judgments(run_id, iteration, purpose).select(
            "judgment_id", pl.col("model").alias("rater_model"))
        ratings = ratings.join(writers, on=["judgment_id", "rater_model"], how="semi")
    else:
        ratings = ratings.filter(pl.col("rater_model") == rater_model)
    return ratings.select(pl.col("judgment_id").cast(pl.Int64), pl.col("rating").cast(pl.Int32))


def rate_for_curation(
    store: "Store", sampler: "Sampler", *, run_id: str, iteration: int, dataset: str, curation: "CurationConfig",
    params: "SamplingParams", batch_size: int, progress: Callable[[int, int], None] | None = None,
) -> pl.DataFrame:
    """Rate the iteration's train judgments that meta curation can use (scored, forced only if allowed, and
    with dedupe only the first copy of a text) and return the ratings by this sampler's model."""
    judgments = store.judgments(run_id, iteration, "train").filter(
        (pl.col("side") == "a") & pl.col("score").is_not_null())
    if not curation.use_forced:
        judgments = judgments.filter(~pl.col("forced"))
    if curation.dedupe:  # the copies are dropped by curation anyway; rating them is wasted generation
        judgments = judgments.sort("item_id", "sample_index").unique(["item_id", "text"], keep="first",
                                                                      maintain_order=True)
    items = store.items(dataset).filter(pl.col("item_id").is_in(judgments["item_id"].implode()))
    rate_judgments(store, sampler, judgments, items, run_id=run_id, iteration=iteration, params=params,
                   batch_size=batch_size, progress=progress)
    return stored_ratings(store, run_id, iteration, sampler.model_name, "train")
