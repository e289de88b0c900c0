"""The meta-judge: its prompt, rate_judgments on a scripted sampler (stored, resumable, greedy by default),
self-ratings, meta curation through the Runner, and the real sampler on a tiny random Llama."""

from __future__ import annotations

import re

import polars as pl
import pytest

from engine.config import parse_run_config
from engine.demo import ensure_demo_dataset
from engine.meta import rate_judgments, stored_ratings
from engine.prompts import META_RUBRIC, absolute_messages, meta_messages
from engine.sampling import FakeSampler, SamplingParams
from engine.workspace import Workspace
from store import Store, judgment_id

ITEM = {"instruction": "Add 2 and 2.", "response": "5", "response_b": "4", "reference": "4",
        "criteria": "Is the arithmetic right?", **{f"score{k}_description": f"level {k}" for k in range(1, 6)}}


def test_meta_prompt_shows_the_task_the_judgment_and_both_rubrics():
    judgment = "The sum is wrong: 2 + 2 is 4. [RESULT] 1"
    user = meta_messages(ITEM, judgment)[1]["content"]
    for part in ("Add 2 and 2.", "###Response to evaluate:\n5\n", "###Reference Answer (Score 5):\n4",
                 "[Is the arithmetic right?]\nScore 1: level 1", f"###Feedback to rate:\n{judgment}\n",
                 META_RUBRIC.render(), "[RESULT] (an integer number between 1 and 5)"):
        assert part in user
    assert user.endswith("###Assessment: ")
    assert user.index("###Score Rubrics:") < user.index("###Feedback to rate:") < user.index("###Feedback Quality")
    # side b grades response_b; without a reference neither the section nor the task mentions one
    no_ref = meta_messages({**ITEM, "reference": None}, judgment, "response_b")[1]["content"]
    assert "###Response to evaluate:\n4\n" in no_ref and "Reference" not in no_ref and "reference" not in no_ref


# ------------------------------------------------------------------ rate_judgments on a scripted sampler


def rating_from_prompt(messages, index, seed) -> str:
    """A meta-judge that rates a judgment by the 'quality q' it claims (unrated when it claims none)."""
    feedback = messages[1]["content"].split("###Feedback to rate:\n")[1].split("\n\n###")[0]
    q = re.search(r"quality (\d)", feedback)
    return f"Checked the feedback. [RESULT] {q.group(1)}" if q else "I cannot tell."


class Recording(FakeSampler):
    """A FakeSampler that records each generate call's prompts and params, and can fail on a given call."""

    def __init__(self, script, model_name="rater", fail_on_call: int | None = None):
        super().__init__(script, model_name)
        self.calls, self.fail_on_call = [], fail_on_call

    def generate(self, prompts, n, params, seeds, progress=False):
        self.calls.append((len(prompts), params))
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise KeyboardInterrupt("killed")
        return super().generate(prompts, n, params, seeds, progress)


@pytest.fixture
def judged(tmp_path):
    """A store with the demo dataset, run r (iteration 1) and 6 train judgments of 2 items: qualities
    1..5 and one text without a quality claim; plus one judgment without text."""
    ws = Workspace.open(tmp_path / "ws")
    ensure_demo_dataset(ws)
    store = ws.store()
    items = store.items("demo", "train", 2)
    store.create_run("r", "loop", {"model": "m", "train_dataset": "demo"})
    store.ensure_iteration("r", 1)
    rows = []
    for i, item_id in enumerate(items["item_id"]):
        for j in range(4):
            q = [5, 2, 4, 1, 3, None, 3, None][i * 4 + j]
            text = None if (i, j) == (1, 3) else (f"Fine, quality {q}. [RESULT] 3" if q else "Hm. [RESULT] 2")
            rows.append({"judgment_id": judgment_id("r", 1, "train", item_id, "a", j), "run_id": "r", "iteration": 1,
                         "purpose": "train", "item_id": item_id, "side": "a", "sample_index": j, "model": "judge",
                         "text": text, "rationale": text, "score": 3, "parse_status": "ok", "forced": False})
    store.insert_judgments(pl.DataFrame(rows, infer_schema_length=None).with_columns(
        [pl.lit(None).alias(c) for c in ("temperature", "top_p", "max_new_tokens", "seed", "raw_text", "p1", "p2",
                                         "p3", "p4", "p5", "prompt_tokens", "completion_tokens", "latency_s")]))
    return store, items


def test_rate_judgments_stores_ratings_greedy_and_skips_textless(judged):
    store, items = judged
    sampler = Recording(rating_from_prompt)
    judgments = store.judgments("r", 1, "train")
    seen = []
    written = rate_judgments(store, sampler, judgments, items, run_id="r", iteration=1, batch_size=3,
                             progress=lambda d, t: seen.append((d, t)))
    assert written == 7  # 8 judgments, one without text
    # batches hold whole items where they fit (the sampler shares an item's prompt prefix): the first
    # item's 4 judgments split 3 + 1, the second's 3 go together, not 1 + 2 beside the first's leftover
    assert [n for n, _ in sampler.calls] == [3, 1, 3] and seen == [(0, 7), (3, 7), (4, 7), (7, 7)]
    assert all(p.temperature == 0 and p.force_score for _, p in sampler.calls)  # greedy, forced by default
    ratings = store.meta_ratings("r", 1).sort("item_id", "sample_index")
    assert set(ratings["rater_model"]) == {"rater"}
    got = {(r["sample_index"], r["item_id"] == items["item_id"][0]): (r["rating"], r["forced"], r["parse_status"])
           for r in ratings.iter_rows(named=True)}
    first, second = True, False
    assert [got[j, first] for j in range(4)] == [(5, False, "ok"), (2, False, "ok"), (4, False, "ok"), (1, False, "ok")]
    assert got[0, second] == got[2, second] == (3, False, "ok")
    forced = got[1, second]  # "I cannot tell.": no rating written, one drawn (force_score)
    assert forced[1] is True and forced[2] == "no_score" and 1 <= forced[0] <= 5
    assert (3, second) not in got
    # a second pass has nothing left to rate
    again = Recording(rating_from_prompt)
    assert rate_judgments(store, again, judgments, items, run_id="r", iteration=1) == 0 and again.calls == []


def test_rate_judgments_resumes_after_a_kill(judged):
    store, items = judged
    judgments = store.judgments("r", 1, "train")
    killed = Recording(rating_from_prompt, fail_on_call=3)
    with pytest.raises(KeyboardInterrupt):
        rate_judgments(store, killed, judgments, items, run_id="r", iteration=1, batch_size=2)
    assert store.meta_ratings("r", 1).height == 4  # two batches were stored before the kill
    resumed = Recording(rating_from_prompt)
    assert rate_judgments(store, resumed, judgments, items, run_id="r", iteration=1, batch_size=2) == 3
    assert sum(n for n, _ in resumed.calls) == 3  # only the judgments not yet rated
    assert store.meta_ratings("r", 1)["judgment_id"].n_unique() == 7
    # another rater rates everything again, beside the first one's ratings
    other = Recording(rating_from_prompt, model_name="other")
    assert rate_judgments(store, other, judgments, items, run_id="r", iteration=1) == 7
    assert stored_ratings(store, "r", 1, "other").height == stored_ratings(store, "r", 1, "rater").height == 7


def test_sampled_ratings_use_the_given_params_and_bad_input_is_named(judged):
    store, items = judged
    judgments = store.judgments("r", 1, "train")
    sampler = Recording(rating_from_prompt)
    params = SamplingParams(temperature=0.7, max_new_tokens=16)
    rate_judgments(store, sampler, judgments.head(2), items, run_id="r", iteration=1, params=params)
    assert sampler.calls[0][1] is params
    with pytest.raises(ValueError, match=r"judgment \d+: its item \d+ is not among the items given"):
        rate_judgments(store, Recording(rating_from_prompt, "x"), judgments, items.head(1), run_id="r", iteration=1)
    with pytest.raises(ValueError, match="iteration 1 is not 2"):
        rate_judgments(store, Recording(rating_from_prompt, "x"), judgments, items, run_id="r", iteration=2)
    with pytest.raises(ValueError, match="lack column"):
        rate_judgments(store, Recording(rating_from_prompt, "x"), judgments.drop("text"), items, run_id="r",
                       iteration=1)


def test_stored_ratings_default_to_self_ratings(judged):
    store, items = judged
    judgments = store.judgments("r", 1, "train")
    rate_judgments(store, Recording(rating_from_prompt, "judge"), judgments, items, run_id="r", iteration=1)
    rate_judgments(store, Recording(lambda m, i, s: "Bad. [RESULT] 1", "stranger"), judgments, items,
                   run_id="r", iteration=1)
    self_rated = stored_ratings(store, "r", 1)  # the judgments were written by "judge"
    assert self_rated.height == 7 and 5 in self_rated["rating"].to_list()
    assert stored_ratings(store, "r", 1, "stranger")["rating"].to_list() == [1] * 7


# ------------------------------------------------------------------ meta curation through the Runner


def loop_script(messages, index, seed) -> str:
    """Judgments claim a quality q = seed % 5 + 1 (the meta-judge's rating) and score (seed // 5) % 5 + 1."""
    if "###Feedback to rate:" in messages[1]["content"]:
        return rating_from_prompt(messages, index, seed)
    return f"Reasoning with quality {seed % 5 + 1}. [RESULT] {(seed // 5) % 5 + 1}"


def test_runner_meta_curation_rates_with_the_previous_judge_and_pairs_by_rating(tmp_path):
    from engine.curation import preview
    from engine.iteration import Runner, create_run

    ws = Workspace.open(tmp_path / "ws")
    ensure_demo_dataset(ws)
    cfg = parse_run_config({"model": "some-org/judge", "train_dataset": "demo", "iterations": 1,
                            "max_train_items": 12, "sampling": {"n": 5, "max_new_tokens": 40},
                            "curation": {"strategy": "meta", "min_margin": 2, "max_pairs_per_item": 2,
                                         "meta_max_new_tokens": 48}})
    rid = create_run(ws, cfg, "meta")
    paths, samplers = [], []

    def factory(path):
        paths.append(path)
        samplers.append(Recording(loop_script, model_name=f"fake:{path}"))
        return samplers[-1]

    r = Runner(ws, rid, sampler_factory=factory, echo=False)
    r.sample(1)
    store = ws.store()
    before = preview(store, rid, 1, cfg.curation)  # nothing rated yet: a dry run cannot rate
    assert before["pairs"] == 0 and before["skipped"]["no_ratings"] == 12 and "no meta ratings" in before["warnings"][0]

    report = r.curate(1)
    assert paths == ["some-org/judge"]  # the seed (iteration 0's judge) sampled and rated: one model loaded
    meta_calls = [p for _, p in samplers[0].calls if p.max_new_tokens == 48]
    assert meta_calls and all(p.temperature == 0 for p in meta_calls)  # greedy, with the meta budget
    # Identical texts of an item count once (dedupe): only their first copies are rated.
    judgments = store.judgments(rid, 1, "train").sort("item_id", "sample_index").unique(
        ["item_id", "text"], keep="first", maintain_order=True)
    assert 48 <= judgments.height < 60  # the script repeats itself within some items
    ratings = store.meta_ratings(rid, 1, "train")
    assert set(ratings["rater_model"]) == {"fake:some-org/judge"}
    assert set(ratings["judgment_id"]) == set(judgments["judgment_id"])
    assert report["strategy"] == "meta" and report["rater_model"] == "fake:some-org/judge"
    assert report["duplicates"] == 60 - judgments.height

    # Expected by hand from the script: per item, rank by quality (ties: sample order), pair best with worst.
    quality = {row["judgment_id"]: int(re.search(r"quality (\d)", row["text"]).group(1))
               for row in judgments.iter_rows(named=True)}
    expected = set()
    for _, group in judgments.group_by("item_id"):
        ranked = sorted(group.iter_rows(named=True),
                        key=lambda row: (-quality[row["judgment_id"]], row["sample_index"]))
        for k in range(2):
            best, worst = ranked[k], ranked[len(ranked) - 1 - k]
            if quality[best["judgment_id"]] - quality[worst["judgment_id"]] >= 2:
                expected.add((best["judgment_id"], worst["judgment_id"]))
    pairs = store.pairs(rid, 1)
    assert set(zip(pairs["chosen_id"].to_list(), pairs["rejected_id"].to_list())) == expected and expected
    assert report["pairs"] == len(expected) and set(pairs["strategy"]) == {"meta"}
    assert report["items_with_pairs"] + sum(report["skipped"].values()) == 12
    # The report matches a dry run now that the ratings are stored; a rerun neither rates nor pairs again.
    assert {k: v for k, v in report.items() if k != "rater_model"} == preview(store, rid, 1, cfg.curation)
    assert r.curate(1) == report and store.meta_ratings(rid, 1).height == judgments.height


# ------------------------------------------------------------------ the real sampler


def test_tiny_model_rates_with_a_forced_rating(tmp_path, tiny_model_dir):
    from engine.meta import default_params
    from engine.sampling import TransformersSampler

    store = Store(tmp_path / "db.duckdb")
    store.create_run("r", "loop", {"model": "m"})
    item = {**ITEM, "item_id": 7}
    text = "The response says 5 but 2 + 2 is 4. [RESULT] 1"
    store.insert_judgments([{
        "judgment_id": 1, "run_id": "r", "iteration": 1, "purpose": "eval", "item_id": 7, "side": "a",
        "sample_index": 0, "model": "m", "temperature": 0.0, "top_p": 1.0, "max_new_tokens": 8, "seed": 0,
        "raw_text": text, "text": text, "rationale": text, "score": 1, "parse_status": "ok", "forced": False,
        **{f"p{k}": None for k in range(1, 6)}, "prompt_tokens": 1, "completion_tokens": 1, "latency_s": 0.0}])
    sampler = TransformersSampler(str(tiny_model_dir), device="cpu")
    n = rate_judgments(store, sampler, store.judgments("r", 1), pl.DataFrame([item]), run_id="r", iteration=1,
                       params=default_params(max_new_tokens=6))
    row = store.meta_ratings("r", 1).row(0, named=True)
    assert n == 1 and 1 <= row["rating"] <= 5 and row["rater_model"] == str(tiny_model_dir)
    assert abs(sum(row[f"p{k}"] for k in range(1, 6)) - 1) < 1e-3  # the rating's distribution is kept
    assert absolute_messages(item)[1]["content"] not in meta_messages(item, text)[1]["content"]  # its own prompt
