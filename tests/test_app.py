"""The Streamlit app under AppTest, on a small workspace written through the Store (no model): every page
renders its key elements; pair reviews persist with who made them; the Launch form refuses bad input,
starts a real job (a tiny random Llama) and cancels it; the curation preview matches `curate`."""

from __future__ import annotations

import base64
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from streamlit.testing.v1 import AppTest

from engine import jobs
from engine.config import CurationConfig, RunConfig
from engine.curation import curate
from engine.demo import demo_data_path
from engine.importers import import_file
from store import Store, judgment_id

from helpers import wait_until

APP = str(Path(__file__).resolve().parents[1] / "ui" / "app.py")
RUN = "r1"
WHO = "tester"
N = 4  # samples per training item
TRAIN_ITEMS = 14  # 14 x 4 + 5 eval = 61 judgments in iteration 2: two pages of 50


def _judgment(run_id, iteration, purpose, item_id, k, score, parse_status="ok", forced=False) -> dict:
    rationale = f"Judgment {k} of item {item_id} at iteration {iteration}: the response earns a {score}."
    text = f"{rationale} [RESULT] {score}" if score is not None else rationale
    return {
        "judgment_id": judgment_id(run_id, iteration, purpose, item_id, "a", k), "run_id": run_id,
        "iteration": iteration, "purpose": purpose, "item_id": item_id, "side": "a", "sample_index": k,
        "model": "fake", "temperature": 1.0, "top_p": 0.9, "max_new_tokens": 64, "seed": k, "raw_text": text,
        "text": text, "rationale": rationale, "score": score, "parse_status": parse_status, "forced": forced,
        "p1": 0.2, "p2": 0.2, "p3": 0.2, "p4": 0.2, "p5": 0.2, "prompt_tokens": 100, "completion_tokens": 20,
        "latency_s": 0.1,
    }


def build_workspace(ws: Path, tmp_path: Path) -> Store:
    """TRAIN_ITEMS train + 5 eval demo items; run r1 with the seed evaluation and 2 sampled, curated, evaluated
    iterations (4 judgments per train item, one unparsed per item in iteration 2); metrics per iteration."""
    rows = [json.loads(line) for line in open(demo_data_path())]
    subset = [r for r in rows if r["split"] == "train"][:TRAIN_ITEMS] + [r for r in rows if r["split"] == "eval"][:5]
    src = tmp_path / "items.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in subset))
    store = Store.in_workspace(ws)
    import_file(store, str(src), dataset="demo")
    items = store.items("demo")
    train = items.filter(items["split"] == "train").select("item_id", "gold_score").rows()
    evals = items.filter(items["split"] == "eval").select("item_id", "gold_score").rows()

    cfg = RunConfig.model_validate({"model": "embedded", "train_dataset": "demo", "eval_datasets": ["demo"],
                                    "iterations": 2, "curation": {"min_margin": 1, "max_pairs_per_item": 2}})
    store.create_run(RUN, "loop", cfg.model_dump(mode="json"), str(ws / "runs" / RUN))
    judgments = []
    for it in (0, 1, 2):
        store.ensure_iteration(RUN, it, sampler_model="fake")
        for item_id, gold in evals:
            judgments.append(_judgment(RUN, it, "eval", item_id, 0, int(gold) if it == 2 else (int(gold) % 5) + 1))
        if it == 0:
            continue
        for item_id, gold in train:
            g = int(gold)
            scores = [g, (g % 5) + 1, ((g + 2) % 5) + 1, g]
            for k, s in enumerate(scores):
                unparsed = it == 2 and k == 2
                judgments.append(_judgment(RUN, it, "train", item_id, k, None if unparsed else s,
                                           "no_score" if unparsed else "ok"))
    store.insert_judgments(judgments)
    for it in (0, 1, 2):
        for stage in ("sample", "curate", "train"):
            if it == 0:
                store.set_stage(RUN, 0, stage, "skipped")
            elif stage != "curate":
                store.set_stage(RUN, it, stage, "done")
        store.set_stage(RUN, it, "evaluate", "done")
        store.put_metrics(RUN, it, "demo", {"pearson": 0.1 * it, "spearman": 0.2 * it, "kendall": 0.1,
                                            "exact": 0.3 + 0.1 * it, "within1": 0.8, "parse_failure_rate": 0.0})
    for it in (1, 2):
        j, g = store.curation_inputs(RUN, it, "demo")
        res = curate(j, g, cfg.curation)
        store.save_curation(RUN, it, res.pairs, res.report)
    store.update_run(RUN, status="done")
    return store


@pytest.fixture(scope="module")
def template_ws(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("app_template")
    build_workspace(tmp / "ws", tmp)
    return tmp / "ws"


@pytest.fixture
def ws(workspace, template_ws) -> Path:
    """A fresh copy of the module's workspace for each test (its writes stay its own)."""
    shutil.copytree(template_ws, workspace)
    return workspace


def app(page: str | None = None, who: str = WHO) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["who"] = who
    at.run()
    if page:
        at.switch_page(f"views/{page}.py").run()
    assert not at.exception, [e.message for e in at.exception]
    return at


def texts(at: AppTest) -> str:
    parts = [e.value for kind in ("markdown", "caption", "text", "code", "title", "subheader")
             for e in at.get(kind) if isinstance(getattr(e, "value", None), str)]
    return "\n".join(parts)


def chart(at: AppTest, key: str):
    return next(c for c in at.get("plotly_chart") if c.key == key)


def traces(at: AppTest, key: str) -> list[dict]:
    """A Plotly chart's traces, with typed arrays (plotly 7 sends {dtype, bdata}) decoded to lists."""
    def decode(v):
        if isinstance(v, dict) and "bdata" in v:
            return np.frombuffer(base64.b64decode(v["bdata"]), dtype=v["dtype"]).tolist()
        return list(v) if isinstance(v, (list, tuple)) else v
    return [{k: decode(v) for k, v in t.items()} for t in json.loads(chart(at, key).proto.spec)["data"]]


def chart_keys(at: AppTest) -> set[str]:
    return {c.key for c in at.get("plotly_chart")}


def frame_with(at: AppTest, *columns: str):
    """The first dataframe shown with all these columns (dataframes without selection expose no key)."""
    return next(d.value for d in at.dataframe if set(columns) <= set(d.value.columns))


def click(at: AppTest, label: str) -> AppTest:
    return next(b for b in at.button if b.label == label).click().run()


def metric(at: AppTest, label: str) -> str:
    return next(m.value for m in at.metric if m.label == label)


# ------------------------------------------------------------------ every page renders


def test_overview_shows_runs_iterations_metrics_and_pair_counts(ws):
    at = app()
    assert at.title[0].value == "Overview"
    assert at.selectbox(key="_pick_run_id").value == RUN
    assert frame_with(at, "run_id", "kind")["run_id"].tolist() == [RUN]
    iters = frame_with(at, "iteration", "sample_status", "parse_failure_rate")
    assert iters["iteration"].tolist() == [0, 1, 2]
    assert iters["evaluate_status"].tolist() == ["done"] * 3
    assert iters["parse_failure_rate"].tolist()[2] == pytest.approx(TRAIN_ITEMS / (TRAIN_ITEMS * N + 5))
    assert chart_keys(at) == {"metrics_demo", "parse_failures", "pair_counts_chart"}
    # The metric chart draws one line per picked metric, x = iterations 0..2 (0 = seed).
    lines = traces(at, "metrics_demo")
    assert {t["name"] for t in lines} >= {"pearson", "exact"} and lines[0]["x"] == [0, 1, 2]
    store = Store.in_workspace(ws)
    counts = frame_with(at, "iteration", "auto")
    assert counts["iteration"].tolist() == [1, 2]
    assert counts["auto"].tolist() == [store.pairs(RUN, 1).height, store.pairs(RUN, 2).height]
    assert "No job running for r1" in texts(at)
    # Judges side by side: no seed SFT here, so the initial judge and each iteration, headline metrics as rows.
    judges = frame_with(at, "dataset", "metric", "initial", "iter 1", "iter 2")
    exact = judges[judges["metric"] == "exact"].iloc[0]
    assert [exact["initial"], exact["iter 1"], exact["iter 2"]] == pytest.approx([0.3, 0.4, 0.5])
    assert "raw" not in judges.columns


def test_overview_shows_the_raw_model_beside_j_sft(ws):
    store = Store.in_workspace(ws)
    store.set_stage(RUN, 0, "train", "done")  # iteration 0 trained: a seed SFT made J_SFT
    store.put_metrics(RUN, 0, "demo", {"raw/exact": 0.05, "raw/pearson": -0.1})
    judges = frame_with(app(), "dataset", "metric", "raw", "J_SFT", "iter 1", "iter 2")
    assert list(judges.columns)[2:] == ["raw", "J_SFT", "iter 1", "iter 2"]
    assert judges[judges["metric"] == "exact"].iloc[0]["raw"] == pytest.approx(0.05)


def test_judgments_page_filters_pages_and_opens_an_item(ws):
    at = app("judgments")
    assert at.title[0].value == "Judgments"
    assert at.selectbox(key="_pick_iteration").value == 2
    total = TRAIN_ITEMS * N + 5
    assert len(frame_with(at, "judgment_id", "rationale_preview")) == 50
    assert f"1–50 of {total} judgments (page 1 of 2)" in texts(at)
    at.number_input(key="j_page").set_value(2).run()
    assert len(frame_with(at, "judgment_id", "rationale_preview")) == total - 50
    assert f"51–{total} of {total} judgments (page 2 of 2)" in texts(at)
    at.selectbox(key="j_purpose").select("train").run()  # a new filter starts again at page 1
    assert at.number_input(key="j_page").value == 1
    at.selectbox(key="j_parse").select("no_score").run()
    table = frame_with(at, "judgment_id", "rationale_preview")
    assert len(table) == TRAIN_ITEMS and set(table["parse_status"]) == {"no_score"}
    at.selectbox(key="j_parse").select("any").run()
    at.selectbox(key="j_agreement").select("agree").run()
    assert f"of {2 * TRAIN_ITEMS} judgments" in texts(at)  # samples 0 and 3 of each item equal gold
    at.text_input(key="j_text").input("Judgment 3 of item").run()
    assert f"of {TRAIN_ITEMS} judgments" in texts(at)
    at.text_input(key="j_text").input("").run()

    # The item view: the item's instruction and rubric, and all N judgments side by side, gold matches badged.
    item_id = at.selectbox(key="j_item").value
    assert item_id in frame_with(at, "judgment_id", "rationale_preview")["item_id"].to_list()
    body = texts(at)
    assert "Instruction" in body and "Rubric" in body and "2/4 match gold" in body
    assert len([m for m in at.markdown if "matches gold" in m.value]) == 2
    assert len([m for m in at.markdown if m.value.startswith("**train #")]) == N
    assert chart_keys(at) == {"score_histogram", "confusion"}
    assert {t["name"] for t in traces(at, "score_histogram")} == {"1", "2"}  # bars grouped by iteration
    heat = traces(at, "confusion")[0]
    assert sum(map(sum, heat["z"])) == 3 * TRAIN_ITEMS  # iteration 2's scored train judgments


def test_picked_run_and_iteration_survive_page_switches(ws):
    at = app("judgments")
    at.selectbox(key="_pick_iteration").select(1).run()
    at.switch_page("views/overview.py").run()
    at.switch_page("views/judgments.py").run()
    assert at.selectbox(key="_pick_iteration").value == 1
    assert not at.exception


def test_reads_are_cached_until_another_process_writes(ws):
    at = app()
    assert frame_with(at, "run_id", "kind")["run_id"].tolist() == [RUN]
    # A write the app did not make (as a job would, from its own process): no cache clear, only the
    # database file's new modification time tells the app to read again.
    time.sleep(0.01)
    Store.in_workspace(ws).create_run("r2", "loop", {"model": "embedded"})
    at.run()
    assert frame_with(at, "run_id", "kind")["run_id"].tolist() == [RUN, "r2"]


def test_compare_page_shows_deltas_drift_and_a_rationale_diff(ws):
    at = app("compare")
    assert at.selectbox(key="_pick_compare_a").value == 0 and at.selectbox(key="_pick_compare_b").value == 2
    deltas = frame_with(at, "metric", "value_a", "value_b", "delta")
    assert dict(zip(deltas["metric"], deltas["delta"]))["exact"] == pytest.approx(0.2)
    assert metric(at, "Items judged in both") == "5"
    assert metric(at, "Changed score") == "5"  # eval scores were gold % 5 + 1 at 0 and gold at 2
    assert chart_keys(at) == {"drift_histogram", "drift_scatter"}
    drift = traces(at, "drift_histogram")[0]  # 4 items one lower (gold % 5 + 1 -> gold), gold 5 from 1 up 4
    assert dict(zip(drift["x"], drift["y"])) == {"-1.0": 4, "4.0": 1}
    assert len(frame_with(at, "item_id", "drift")) == 5
    assert at.selectbox(key="compare_item").value is not None
    assert any("iteration 0" in h.proto.body and "diff" in h.proto.body for h in at.get("html"))
    at.selectbox(key="compare_purpose").select("train").run()  # train judgments exist at 2 but not at 0
    assert "No item has train judgments in both iterations." in texts(at)


def test_an_items_input_shows_under_the_instruction_only_when_it_has_one(ws):
    at = app("judgments")
    assert "Instruction" in texts(at) and "**Input**" not in [m.value for m in at.markdown]  # demo: no input
    time.sleep(0.01)
    with Store.in_workspace(ws)._tx() as con:
        con.execute("UPDATE items SET input = 'The input of item ' || item_id::VARCHAR")
    at.run()
    item_id = at.selectbox(key="j_item").value
    assert "**Input**" in [m.value for m in at.markdown] and f"The input of item {item_id}" in texts(at)

    at = app("pairs")
    pair_item = Store.in_workspace(ws).pairs(RUN, 2)["item_id"][0]
    assert "**Input**" in [m.value for m in at.markdown] and f"The input of item {pair_item}" in texts(at)

    at = app("compare")
    picked = at.selectbox(key="compare_item").value[0]
    assert "**Input**" in [m.value for m in at.markdown] and f"The input of item {picked}" in texts(at)


# ------------------------------------------------------------------ pairs: every action persists


def _sample_of(store: Store, jid: int) -> int:
    return store.judgments(RUN, 2, "train").filter(pl.col("judgment_id") == jid)["sample_index"][0]


def test_pair_actions_persist_with_who(ws):
    store = Store.in_workspace(ws)
    pairs = store.pairs(RUN, 2)
    ids = pairs["pair_id"].to_list()
    original = {r["pair_id"]: r for r in pairs.iter_rows(named=True)}
    assert len(ids) >= 4
    at = app("pairs")
    assert at.selectbox(key="_pick_iteration").value == 2
    assert f"Pair 1 of {len(ids)}" in texts(at)

    at.button(key="p_accept").click().run()  # pair 1 accepted, moves on
    assert f"Pair 2 of {len(ids)}" in texts(at)
    at.button(key="p_reject").click().run()  # pair 2 rejected, moves on
    at.button(key="p_swap").click().run()    # pair 3 swapped, stays
    assert f"Pair 3 of {len(ids)}" in texts(at)
    third = ids[2]
    # The edit form starts from the chosen side as it is now: after the swap, the former rejected one.
    swapped_in = store.pairs(RUN, 2).filter(pl.col("pair_id") == third)["chosen_id"][0]
    assert swapped_in == original[third]["rejected_id"]
    assert at.text_area[0].value.startswith(f"Judgment {_sample_of(store, swapped_in)} of item")
    at.text_area[0].input("A careful rewrite of the chosen rationale.")
    next(n for n in at.number_input if n.label == "Score").set_value(4)
    click(at, "Save edit")
    next(t for t in at.main.text_input if t.label == "Note").input("checked by hand")
    click(at, "Save note")
    assert not at.exception

    now = {r["pair_id"]: r for r in store.pairs(RUN, 2).iter_rows(named=True)}
    assert now[ids[0]]["status"] == "accepted" and now[ids[1]]["status"] == "rejected"
    p3 = now[third]
    assert p3["swapped"] and p3["status"] == "edited"
    assert (p3["chosen_id"], p3["rejected_id"]) == (original[third]["rejected_id"], original[third]["chosen_id"])
    assert p3["edited_rationale"] == "A careful rewrite of the chosen rationale." and p3["edited_score"] == 4
    assert p3["note"] == "checked by hand" and p3["updated_by"] == WHO
    log = store.audit_log(RUN)
    assert log["action"].to_list() == ["accept", "reject", "swap", "edit", "note"]
    assert set(log["who"]) == {WHO}
    assert log["pair_id"].to_list() == [ids[0], ids[1], third, third, third]
    # The page shows the edit, and the history expander lists this pair's three actions.
    assert "Chosen (edited)" in texts(at)
    history = frame_with(at, "audit_id", "who", "action")
    assert history["action"].to_list() == ["note", "edit", "swap"]

    at.button(key="p_prev").click().run()
    assert f"Pair 2 of {len(ids)}" in texts(at)
    at.button(key="p_next").click().run()
    assert f"Pair 3 of {len(ids)}" in texts(at)


def test_bulk_reject_acts_on_the_whole_filter_after_confirming(ws):
    store = Store.in_workspace(ws)
    at = app("pairs")
    at.sidebar.text_input(key="who").input("alice").run()  # the sidebar's who is what the audit records
    at.button(key="p_accept").click().run()
    at.selectbox(key="p_status").select("auto").run()
    auto = store.pairs(RUN, 2, status="auto")["pair_id"].to_list()
    assert f"Pair 1 of {len(auto)}" in texts(at)
    assert at.button(key="p_bulk_reject").disabled  # nothing happens without the confirmation
    at.checkbox(key="p_bulk_confirm").check().run()
    at.button(key="p_bulk_reject").click().run()
    assert not at.exception
    assert store.pairs(RUN, 2, status="auto").height == 0
    assert sorted(store.pairs(RUN, 2, status="rejected")["pair_id"].to_list()) == sorted(auto)
    assert store.pairs(RUN, 2, status="accepted").height == 1
    log = store.audit_log(RUN)
    assert log.height == 1 + len(auto) and set(log["who"]) == {"alice"}
    assert "No pairs under this filter." in [i.value for i in at.info]  # the filter is empty now
    at.selectbox(key="p_status").select("all").run()
    assert at.checkbox(key="p_bulk_confirm").value is False  # one confirmation, one bulk action
    assert store.pairs(RUN, 1, status="auto").height == store.pairs(RUN, 1).height  # other iteration untouched


# ------------------------------------------------------------------ launch


def test_curation_preview_equals_curate_on_the_same_judgments(ws):
    at = app("launch")
    assert at.selectbox(key="_pick_run_id").value == RUN
    at.number_input(key="l_new_min_margin").set_value(2)
    at.number_input(key="l_new_max_pairs").set_value(2)
    click(at, "Check")
    store = Store.in_workspace(ws)
    judgments, golds = store.curation_inputs(RUN, 2, "demo")
    report = curate(judgments, golds, CurationConfig(min_margin=2, max_pairs_per_item=2)).report
    assert metric(at, "Pairs") == str(report["pairs"])
    assert metric(at, "Items with pairs") == str(report["items_with_pairs"])
    for reason, count in report["skipped"].items():
        assert metric(at, f"skipped: {reason.replace('_', ' ')}") == str(count)
    margins = traces(at, "preview_margin_hist")[0]
    assert dict(zip(margins["x"], margins["y"])) == report["margin_hist"]
    chosen = traces(at, "preview_chosen_hist")[0]
    assert dict(zip(chosen["x"], chosen["y"])) == report["chosen_score_hist"]
    assert report["pairs"] != Store.in_workspace(ws).pairs(RUN, 2).height  # other settings, other numbers


def test_next_iteration_form_is_prefilled_from_the_run_and_shows_its_command(ws):
    at = app("launch")
    assert at.number_input(key="l_new_max_pairs").value == 1  # a new run starts from the demo defaults
    at.radio(key="l_mode").set_value("next").run()
    assert at.number_input(key="l_next_r1_max_pairs").value == 2  # r1 was curated with 2 pairs per item
    assert at.number_input(key="l_next_r1_min_margin").value == 1
    assert [t.key for t in at.main.text_input] == []  # run id and model are the run's own: nothing to type
    expected = jobs.command(ws, ["resume", RUN, "--iterations", "3", "--config", str(ws / "configs" / "r1-iter3.yaml")])
    assert at.code[0].value == shlex.join(expected)


def test_launch_refuses_invalid_input_and_launches_nothing(ws):
    at = app("launch")
    at.text_input(key="l_new_run_id").input("bad id!")
    at.radio(key="l_new_model_source").set_value("hub id")
    at.text_input(key="l_new_hub_id").input("../outside")
    at.number_input(key="l_new_temperature").set_value(5.0)
    at.number_input(key="l_new_max_pairs").set_value(0)
    click(at, "Launch")
    assert not at.exception
    message = at.error[0].value
    assert "run id 'bad id!'" in message
    assert "model: '../outside' is neither 'embedded' nor a hub id" in message
    assert "sampling.temperature: Input should be less than or equal to 2" in message  # pydantic's own words
    assert "curation.max_pairs_per_item: Input should be greater than or equal to 1" in message
    assert "Nothing was launched." in [w.value for w in at.warning]
    assert not at.code  # no command offered for an invalid form
    assert Store.in_workspace(ws).runs()["run_id"].to_list() == [RUN]
    assert not (ws / "configs").exists() and jobs.current(ws, "bad id!") is None
    # An existing run id is refused too (continuing a run is the other mode).
    at.text_input(key="l_new_run_id").input(RUN)
    at.radio(key="l_new_model_source").set_value("embedded")
    at.number_input(key="l_new_temperature").set_value(1.0)
    at.number_input(key="l_new_max_pairs").set_value(1)
    click(at, "Launch")
    assert f"run id: '{RUN}' exists already" in at.error[0].value and jobs.current(ws, RUN) is None


def test_launch_hardware_combinations_are_named_per_field(ws, monkeypatch):
    """The hardware fields are validated against this machine (its GPU count, no torch): zero3 with one process,
    QLoRA and fsdp on CPU, each named by its field; nothing is offered to run."""
    monkeypatch.setenv("SELFRAT_GPU_COUNT", "0")
    at = app("launch")
    assert "this machine: 0 CUDA GPUs" in texts(at)
    at.selectbox(key="l_new_device").set_value("cpu")
    at.selectbox(key="l_new_strategy_dist").set_value("zero3")
    at.number_input(key="l_new_processes").set_value(1)
    at.checkbox(key="l_new_qlora").check()
    click(at, "Check")
    message = at.error[0].value
    assert "training.distributed.num_processes: zero3 shards the model across processes" in message
    assert "training.quantization: 4bit (QLoRA, bitsandbytes) needs a CUDA GPU" in message
    assert "training.distributed.strategy: zero3 needs CUDA GPUs" in message
    assert not at.code
    at.selectbox(key="l_new_strategy_dist").set_value("fsdp")
    at.checkbox(key="l_new_qlora").uncheck()
    click(at, "Check")
    assert "training.distributed.strategy: fsdp needs CUDA GPUs (accelerate runs CPU ranks as MULTI_CPU" \
        in at.error[0].value
    # device auto on a machine without GPUs is cpu: the same refusal
    at.selectbox(key="l_new_device").set_value("auto")
    click(at, "Check")
    assert "training.distributed.strategy: fsdp needs CUDA GPUs" in at.error[0].value


def test_launch_offers_vllm_only_where_installed_and_checks_gpus(ws, monkeypatch):
    import importlib.util

    monkeypatch.setenv("SELFRAT_GPU_COUNT", "0")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    at = app("launch")
    assert at.selectbox(key="l_new_backend").options == ["transformers"]

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real(name, *a))
    at = app("launch")
    assert at.selectbox(key="l_new_backend").options == ["transformers", "vllm"]
    at.selectbox(key="l_new_backend").set_value("vllm")
    click(at, "Check")
    assert "sampling.backend: vllm runs on CUDA GPUs only, and sampling.device is auto and this machine has 0 GPUs" \
        in at.error[0].value

    monkeypatch.setenv("SELFRAT_GPU_COUNT", "2")
    at = app("launch")
    at.selectbox(key="l_new_backend").set_value("vllm")
    at.selectbox(key="l_new_device").set_value("cuda")
    at.number_input(key="l_new_tp").set_value(4)
    at.selectbox(key="l_new_strategy_dist").set_value("ddp")
    at.number_input(key="l_new_processes").set_value(4)
    click(at, "Check")
    message = at.error[0].value
    assert "sampling.vllm.tensor_parallel_size: 4 GPUs per model, and this machine has 2" in message
    assert "training.distributed.num_processes: 4 processes need 4 GPUs (one each); this machine has 2" in message
    at.number_input(key="l_new_tp").set_value(2)
    at.number_input(key="l_new_processes").set_value(2)
    at.selectbox(key="l_new_precision").set_value("bf16")
    at.multiselect(key="l_new_report_to").select("tensorboard")
    click(at, "Check")
    assert not at.error, [e.value for e in at.error]
    run_id = at.text_input(key="l_new_run_id").value
    shown = [c.value for c in at.code]
    assert shown[0] == shlex.join(jobs.command(ws, ["run", str(ws / "configs" / f"{run_id}.yaml"), "--run-id", run_id]))
    work = f"runs/{run_id}/train/iter-K"
    assert shown[1] == shlex.join([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                                   f"{work}/accelerate.yaml", "-m", "engine.train_worker", "--spec",
                                   f"{work}/spec.json"])
    generated = yaml.safe_load(shown[2])
    assert (generated["distributed_type"], generated["num_processes"], generated["mixed_precision"],
            generated["use_cpu"]) == ("MULTI_GPU", 2, "bf16", False)
    assert f"tensorboard --logdir {ws / 'runs' / run_id / 'tb'}" in texts(at)


def test_launch_writes_the_hardware_settings_it_shows(ws, monkeypatch):
    """A CPU DDP launch: the config the job runs carries the form's hardware fields (the job is cancelled at
    once; the real 2-process run is tests/test_distributed.py's)."""
    monkeypatch.setenv("SELFRAT_GPU_COUNT", "0")
    at = app("launch")
    at.text_input(key="l_new_run_id").input("hw")
    at.selectbox(key="l_new_device").set_value("cpu")
    at.selectbox(key="l_new_precision").set_value("fp32")
    at.selectbox(key="l_new_strategy_dist").set_value("ddp")
    at.number_input(key="l_new_processes").set_value(2)
    at.checkbox(key="l_new_lora").check()
    click(at, "Launch")
    assert not at.error, [e.value for e in at.error]
    try:
        saved = RunConfig.model_validate(yaml.safe_load((ws / "configs" / "hw.yaml").read_text()))
        assert shlex.join(jobs.current(ws, "hw").argv) in [c.value for c in at.code]
    finally:
        jobs.cancel(ws, "hw")
    assert saved.sampling.device == "cpu" and saved.sampling.backend == "transformers"
    assert saved.training.distributed.model_dump() == {"num_processes": 2, "strategy": "ddp", "mixed_precision": None}
    assert (saved.training.lora, saved.training.quantization, saved.training.precision) == (True, None, "fp32")
    assert saved.training.report_to == ["none"]


def test_launch_page_links_a_runs_tensorboard_logs(ws):
    (ws / "runs" / RUN / "tb" / "iter-1").mkdir(parents=True)
    at = app("launch")
    assert shlex.join(["tensorboard", "--logdir", str(ws / "runs" / RUN / "tb")]) in [c.value for c in at.code]
    assert "TensorBoard logs of r1 (iter-1)" in texts(at)


def _run_status(store: Store, run_id: str) -> str | None:
    try:
        return store.run(run_id)["status"]
    except Exception:  # not created yet: the job's CLI records the run once it has started
        return None


def test_launch_starts_a_real_job_refuses_a_second_and_cancels_it(ws, tiny_model_dir):
    ckpt = ws / "runs" / "seed" / "checkpoints" / "iter-1"
    shutil.copytree(tiny_model_dir, ckpt)
    store = Store.in_workspace(ws)
    at = app("launch")
    at.text_input(key="l_new_run_id").input("t1")
    at.radio(key="l_new_model_source").set_value("workspace checkpoint")
    at.selectbox(key="l_new_checkpoint").select("runs/seed/checkpoints/iter-1")
    for name, value in {"max_train": 10, "max_eval": 5, "n": 4, "max_new_tokens": 64, "iterations": 1}.items():
        at.number_input(key=f"l_new_{name}").set_value(value)
    click(at, "Launch")
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert "Started t1" in at.success[0].value
    job = jobs.current(ws, "t1")
    assert job is not None
    assert job.argv == jobs.command(ws, ["run", str(ws / "configs" / "t1.yaml"), "--run-id", "t1"])
    assert shlex.join(job.argv) in [c.value for c in at.code]  # the command shown is the one that ran
    saved = RunConfig.model_validate(yaml.safe_load((ws / "configs" / "t1.yaml").read_text()))
    assert saved.model == str(ckpt.resolve()) and saved.max_train_items == 10 and saved.sampling.n == 4
    # The job is real: its runner records the run and starts working in the store.
    wait_until(lambda: _run_status(store, "t1") == "running", 120, "the job to start running", every=0.25)

    # No second job for the same run: the next-iteration launch is refused while this one runs.
    at.run()
    at.radio(key="l_mode").set_value("next").run()
    click(at, "Launch")
    assert any("already has a job running" in e.value for e in at.error)
    assert jobs.current(ws, "t1").pid == job.pid

    # The status panel shows the running job; its Cancel button stops it.
    at.radio(key="l_mode").set_value("new").run()
    assert any("**Running** `t1`" in m.value for m in at.markdown)
    at.button(key="cancel_t1").click().run()
    assert jobs.current(ws, "t1") is None
    assert _run_status(store, "t1") == "cancelled"
    assert any("No job running for t1" in c.value for c in at.caption)


def test_the_app_process_never_imports_torch_or_the_engine_runner(ws):
    # Run every page in a fresh interpreter (this one has torch loaded by other tests) and list what got in.
    code = (
        "import sys\n"
        "from streamlit.testing.v1 import AppTest\n"
        f"at = AppTest.from_file({APP!r}, default_timeout=60)\n"
        "at.run()\n"
        "for page in ('judgments', 'pairs', 'launch', 'compare'):\n"
        "    at.switch_page(f'views/{page}.py').run()\n"
        "    assert not at.exception, (page, [e.message for e in at.exception])\n"
        "heavy = ('torch', 'transformers', 'trl', 'peft', 'engine.sampling', 'engine.training', 'engine.iteration')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_evaluation_page_sets_judges_and_baselines_side_by_side(ws):
    store = Store.in_workspace(ws)
    store.put_metrics(RUN, 0, "demo", {"pearson_lo": -0.2, "pearson_hi": 0.3,
                                       "self-consistency-mean/pearson": 0.25, "self-consistency-mean/pearson_lo": 0.05,
                                       "self-consistency-mean/pearson_hi": 0.45, "best-of-n/pearson": 0.15,
                                       "single-stage-dpo/pearson": 0.12})
    store.put_breakdowns(RUN, 0, "demo", "greedy", [
        {"group_by": "rubric", "group_value": "accuracy", "metric": "exact", "value": 0.5},
        {"group_by": "rubric", "group_value": "tone", "metric": "exact", "value": 0.25},
        *[{"group_by": "confusion", "group_value": f"gold {g}", "metric": f"pred {p}", "value": float(g == p)}
          for g in range(1, 6) for p in range(1, 6)]])
    store.put_run_report(RUN, "contamination", {"overlapping_items": 3})
    at = app("evaluation")
    assert at.title[0].value == "Evaluation"
    assert any("3 training items" in w.value for w in at.warning)
    judges = frame_with(at, "judge", "pearson")
    assert set(judges["judge"]) >= {"iteration 0 · greedy", "iteration 0 · self-consistency-mean",
                                     "iteration 0 · best-of-n", "iteration 0 · single-stage-dpo",
                                     "iteration 2 · greedy"}
    bars = traces(at, "judges_chart")
    sc = next(t for t in bars if t["name"] == "self-consistency-mean")
    err = sc["error_y"]["array"]
    err = np.frombuffer(base64.b64decode(err["bdata"]), dtype=err["dtype"]).tolist() if "bdata" in err else err
    assert sc["y"] == [pytest.approx(0.25)] and err == [pytest.approx(0.2)]
    assert {t["name"] for t in traces(at, "breakdown_chart")} == {"iteration 0 · greedy"}
    at.selectbox(key="breakdown_group").set_value("confusion").run()
    heat = traces(at, "confusion_chart")[0]
    assert np.array(heat["z"]).reshape(5, 5).trace() == 5


def test_overview_shows_calibration_entropy_and_saturation(ws):
    store = Store.in_workspace(ws)
    for it, entropy in ((0, 1.2), (1, 0.6), (2, 0.1)):
        store.put_metrics(RUN, it, "demo", {"mean_entropy": entropy, "saturated": float(it == 2)})
        store.put_breakdowns(RUN, it, "demo", "greedy", [
            {"group_by": "reliability", "group_value": b, "metric": m, "value": v}
            for b, conf, acc in (("0.4-0.5", 0.45, 0.3), ("0.9-1.0", 0.95, 0.5))
            for m, v in (("confidence", conf), ("accuracy", acc), ("n", 10.0))])
    at = app()
    assert {"reliability", "entropy"} <= chart_keys(at)
    assert [w.value for w in at.warning if "saturation" in w.value] == [
        "Iteration 2, demo: score saturation (one score takes more than half of the judgments while gold is balanced)."]
    lines = {t["name"]: t for t in traces(at, "reliability")}
    assert lines["iteration 2 · demo"]["x"] == [0.45, 0.95] and lines["iteration 2 · demo"]["y"] == [0.3, 0.5]
    assert traces(at, "entropy")[0]["y"] == [1.2, 0.6, 0.1]


def test_compare_page_pairs_the_headline_figures_with_intervals(ws):
    at = app("compare")
    paired = frame_with(at, "metric", "A", "B", "B - A", "95% CI", "p", "n", "significant")
    assert paired["metric"].tolist() == ["pearson", "spearman", "kendall", "exact", "within1", "partial_pearson"]
    exact = paired.set_index("metric").loc["exact"]
    # Iteration 0 scored every eval item gold % 5 + 1 (never gold), iteration 2 gold itself.
    assert (exact["A"], exact["B"], exact["B - A"], exact["n"]) == (0.0, 1.0, 1.0, 5)
    assert exact["95% CI"] == "[+1.000, +1.000]" and exact["significant"] == "*" and exact["p"] < 0.01
    assert paired.set_index("metric").loc["within1", "significant"] == ""
    assert any("Every stored metric" in e.label for e in at.expander)  # the raw dump, behind an expander
    at.selectbox(key="_pick_compare_b").select(1).run()  # 0 and 1 scored alike: no difference
    same = frame_with(at, "metric", "B - A", "significant").set_index("metric")
    assert same.loc["exact", "B - A"] == 0 and same.loc["exact", "p"] == 1 and set(same["significant"]) == {""}


def test_evaluation_page_pairs_an_iteration_with_the_seed_and_its_baselines(ws):
    store = Store.in_workspace(ws)
    evals = store.items("demo").filter(pl.col("split") == "eval").select("item_id", "gold_score").rows()
    # Seed baselines: 3 samples per item, gold twice, so the majority is gold and the mean within one of it.
    store.insert_judgments([_judgment(RUN, 0, "baseline", item_id, k, int(gold) if k < 2 else (int(gold) % 5) + 1)
                            for item_id, gold in evals for k in range(3)])
    at = app("evaluation")
    assert at.selectbox(key="paired_iteration").value == 2
    table = frame_with(at, "against", "metric", "B - A", "95% CI", "significant")
    assert list(dict.fromkeys(table["against"])) == [
        "iteration 0 · greedy", "iteration 0 · expected", "iteration 0 · self-consistency-mean",
        "iteration 0 · self-consistency-majority", "iteration 0 · length-baseline"]
    rows = table.set_index(["against", "metric"])
    seed = rows.loc[("iteration 0 · greedy", "exact")]
    assert (seed["B - A"], seed["significant"]) == (1.0, "*")
    majority = rows.loc[("iteration 0 · self-consistency-majority", "exact")]
    assert (majority["A"], majority["B - A"], majority["p"], majority["significant"]) == (1.0, 0.0, 1.0, "")
    at.selectbox(key="paired_iteration").set_value(0).run()  # the seed itself against its baselines
    assert "iteration 0 · greedy" not in set(frame_with(at, "against", "B - A")["against"])


# ------------------------------------------------------------------ GRPO iterations (training.method: grpo)

GRPO_RUN = "g1"


def add_grpo_run(ws: Path) -> Store:
    """Run g1 beside r1: its iteration 1 trained with GRPO (sample and curate skipped, the curate report saying
    why) with 2 steps x 2 prompts x 2 rollouts stored as judgments, rewards rising from step 1 to step 2."""
    from engine.grpo import Rollout, rollout_judgments

    store = Store.in_workspace(ws)
    cfg = RunConfig.model_validate({"model": "embedded", "train_dataset": "demo", "eval_datasets": ["demo"],
                                    "iterations": 1, "training": {"method": "grpo", "grpo": {
                                        "num_generations": 2, "prompts_per_step": 2, "max_steps": 2}}})
    store.create_run(GRPO_RUN, "loop", cfg.model_dump(mode="json"), str(ws / "runs" / GRPO_RUN))
    items = store.items("demo", "train").head(2)["item_id"].to_list()
    for it in (0, 1):
        store.ensure_iteration(GRPO_RUN, it, sampler_model="fake")
    for stage in ("sample", "curate", "train"):
        store.set_stage(GRPO_RUN, 0, stage, "skipped")
    store.set_stage(GRPO_RUN, 1, "sample", "skipped")
    store.set_stage(GRPO_RUN, 1, "curate", "skipped", report={
        "method": "grpo", "strategy": "none (grpo)", "pairs": 0,
        "reason": "GRPO learns from rewarded rollouts, not from curated preference pairs: no curation"})
    rollouts = [Rollout(item_id=item, side="a", kind="absolute", step=step, group_index=group, index=index,
                        sample_index=((step - 1) * 2 + group) * 2 + index, text=f"Rollout. [RESULT] {step + index}",
                        completion_tokens=6, truncated=False, rationale="Rollout.", score=step + index,
                        verdict=None, parse_status="ok", reward=0.25 * step + 0.25 * index)
                for step in (1, 2) for group, item in enumerate(items) for index in (0, 1)]
    store.insert_judgments(rollout_judgments(rollouts, run_id=GRPO_RUN, iteration=1, model="fake", cfg=cfg.training))
    store.set_stage(GRPO_RUN, 1, "train", "done", checkpoint=str(ws / "runs" / GRPO_RUN / "checkpoints" / "iter-1"),
                    report={"train/reward": 0.5, "train/steps": 2.0})
    for it in (0, 1):
        store.put_metrics(GRPO_RUN, it, "demo", {"pearson": 0.1 * it, "exact": 0.3, "parse_failure_rate": 0.0})
        store.set_stage(GRPO_RUN, it, "evaluate", "done")
    store.update_run(GRPO_RUN, status="done")
    return store


def test_judgments_page_browses_grpo_rollouts_with_reward_step_and_group(ws):
    add_grpo_run(ws)
    at = app("judgments")
    assert at.selectbox(key="_pick_run_id").value == GRPO_RUN and at.selectbox(key="_pick_iteration").value == 1
    assert "rollout" in at.selectbox(key="j_purpose").options
    at.selectbox(key="j_purpose").select("rollout").run()
    assert not at.exception, [e.message for e in at.exception]
    table = frame_with(at, "judgment_id", "step", "group_index", "reward")
    assert len(table) == 8 and set(table["purpose"]) == {"rollout"}
    assert sorted(zip(table["step"], table["group_index"])) == [(1, 0)] * 2 + [(1, 1)] * 2 + [(2, 0)] * 2 + [(2, 1)] * 2
    assert sorted(table["reward"]) == [0.25] * 2 + [0.5] * 4 + [0.75] * 2
    # the item's rollouts, each with its reward, step and group
    captions = [c.value for c in at.caption if "reward" in c.value]
    assert "parse: ok · reward 0.250 · step 1 · group 0" in captions
    # reward per step: mean, min, max (and the share that parses) over steps 1, 2
    assert "GRPO rollouts" in texts(at) and "8 rollouts over 2 steps" in texts(at)
    lines = {t["name"]: t for t in traces(at, "rollout_rewards")}
    assert set(lines) == {"mean", "min", "max", "parsed"}
    assert lines["mean"]["x"] == [1, 2] and lines["mean"]["y"] == pytest.approx([0.375, 0.625])
    assert lines["max"]["y"] == pytest.approx([0.5, 0.75])
    # r1 (DPO) has no rollouts: no such chart
    at.selectbox(key="_pick_run_id").select(RUN).run()
    assert "rollout_rewards" not in chart_keys(at)


def test_pairs_page_says_curation_is_skipped_for_a_grpo_iteration(ws):
    add_grpo_run(ws)
    at = app("pairs")
    assert at.selectbox(key="_pick_run_id").value == GRPO_RUN
    infos = [i.value for i in at.info]
    assert any(i.startswith("Iteration 1 trained with GRPO: curation is skipped (GRPO learns from rewarded "
                            "rollouts") and "Judgments page (purpose rollout)" in i for i in infos), infos
    assert any("has no curated iteration yet" in i for i in infos)
    for page in ("overview", "compare", "evaluation"):  # the other pages render a GRPO run too
        at.switch_page(f"views/{page}.py").run()
        assert not at.exception, (page, [e.message for e in at.exception])


def test_launch_offers_grpo_and_writes_its_settings(ws, monkeypatch):
    monkeypatch.setenv("SELFRAT_GPU_COUNT", "0")
    at = app("launch")
    assert at.selectbox(key="l_new_method").options == ["dpo", "grpo"]
    assert at.selectbox(key="l_new_method").value == "dpo"
    at.text_input(key="l_new_run_id").input("gr")
    at.selectbox(key="l_new_method").set_value("grpo")
    at.selectbox(key="l_new_strategy_dist").set_value("ddp")
    click(at, "Check")
    assert "training.distributed: method grpo trains in one process" in at.error[0].value
    at.selectbox(key="l_new_strategy_dist").set_value("one process")
    for name, value in {"grpo_generations": 2, "grpo_prompts": 4, "grpo_steps": 3, "grpo_tokens": 64}.items():
        at.number_input(key=f"l_new_{name}").set_value(value)
    at.number_input(key="l_new_grpo_beta").set_value(0.04)
    at.number_input(key="l_new_grpo_lr").set_value(2e-6)
    at.number_input(key="l_new_grpo_w_consistency").set_value(0.0)
    at.selectbox(key="l_new_device").set_value("cpu")
    click(at, "Launch")
    assert not at.error, [e.value for e in at.error]
    try:
        saved = RunConfig.model_validate(yaml.safe_load((ws / "configs" / "gr.yaml").read_text()))
    finally:
        jobs.cancel(ws, "gr")
    g = saved.training.grpo
    assert saved.training.method == "grpo"
    assert (g.num_generations, g.prompts_per_step, g.max_steps, g.max_completion_length) == (2, 4, 3, 64)
    assert (g.beta, g.learning_rate) == (pytest.approx(0.04), pytest.approx(2e-6))
    assert g.rewards.model_dump() == {"score": 1.0, "format": 0.2, "verdict": 1.0, "consistency": 0.0}


def test_launch_offers_the_seed_sft_and_the_raw_baseline(ws, monkeypatch):
    """A new run starts from the demo's recipe (seed SFT + raw baseline); unticking the SFT drops both."""
    monkeypatch.setenv("SELFRAT_GPU_COUNT", "0")
    at = app("launch")
    assert at.checkbox(key="l_new_sft_on").value is True and at.selectbox(key="l_new_sft_dataset").value == "demo"
    for run_id, on in (("with-sft", True), ("without-sft", False)):
        at.text_input(key="l_new_run_id").input(run_id)
        at.checkbox(key="l_new_sft_on").set_value(on)
        at.number_input(key="l_new_sft_items").set_value(5)
        click(at, "Launch")
        assert not at.error, [e.value for e in at.error]
        try:
            saved = RunConfig.model_validate(yaml.safe_load((ws / "configs" / f"{run_id}.yaml").read_text()))
        finally:
            jobs.cancel(ws, run_id)
        if on:
            assert (saved.sft.dataset, saved.sft.max_items) == ("demo", 5) and "raw" in saved.evaluation.baselines
        else:
            assert saved.sft is None and "raw" not in saved.evaluation.baselines
