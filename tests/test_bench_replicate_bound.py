"""bench/replicate_bound.py: the least wall time of a replication at a given matmul rate. A known-answer test
of the FLOP count per stage, and the script on the reference data with the tiny model."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rb():
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("bench_replicate_bound", ROOT / "bench" / "replicate_bound.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SIZES = {"items_per_iteration": 1, "n": 2, "baseline_n": 2, "meta_new_tokens": 4, "sft_epochs": 1.0,
         "max_length": 1000}
TOKENS = {"abs": [100, 200], "rel": [50], "meta": [120, 130], "sft": [300], "train": [40, 60]}


def test_bound_counts_each_stage_by_hand(rb):
    # f = 2 x 10 FLOPs per token through the blocks, h = 2 x 3 for the LM head; at 1 FLOP/s seconds = FLOPs
    out = rb.bound({"linear_weights": 10, "head_weights": 3}, TOKENS, SIZES, gflops=1e-9, eval_tokens=5,
                   train_tokens=7, pairs={1: 1, 2: 2, "single": 3})
    greedy = 20 * (100 + 200 + 50) + 26 * 3 * 5          # prefill at the last position only; 3 judgments x 5 tokens
    per_pair = 4 * 20 * (50 + 2 * 7) + 4 * 6 * 2 * 7     # prompt once + 2 completions: 3 x policy + 1 x reference
    want = {
        "seed SFT": 3 * 20 * 300,
        "seed evaluation, J_SFT": greedy,
        "baselines self-consistency / best-of-N sampling": 20 * 300 + 26 * 4 * 5,   # N = 2 share each prefill
        "baseline best-of-N meta-judge": 20 * 250 + 20 * 2 * 2 * 5 + 26 * 4 * 4,    # + 2 feedbacks read, 2 notes
        "iteration 1 sample": 20 * 40 + 26 * 2 * 7, "iteration 1 train (1 pairs)": per_pair,
        "iteration 1 evaluate": greedy,
        "iteration 2 sample": 20 * 60 + 26 * 2 * 7, "iteration 2 train (2 pairs)": 2 * per_pair,
        "iteration 2 evaluate": greedy,
        "single-stage DPO sample": 20 * 100 + 26 * 4 * 7, "single-stage DPO train (3 pairs)": 3 * per_pair,
        "single-stage DPO evaluate": greedy,
    }
    assert out["stages_s"] == pytest.approx(want)
    assert out["total_s"] == pytest.approx(sum(want.values()))
    assert out["optional_s"]["baseline raw (not asked by the issue)"] == pytest.approx(20 * 300 + 26 * 2 * 5)
    assert out["fits_goal"] is False  # ~100k s
    fast = rb.bound({"linear_weights": 10, "head_weights": 3}, TOKENS, SIZES, gflops=1e-9 * 100_000 / 9000,
                    eval_tokens=5, train_tokens=7, pairs={1: 1, 2: 2, "single": 3})
    assert fast["total_s"] < 9000 and fast["fits_goal"] is True


def test_bound_on_the_reference_data(rb, shared_data, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    md = tmp_path / "bound.md"
    out = rb.main(["--data", str(shared_data), "--model", str(tiny_model_dir), "--gflops", "100", "--out", str(md),
                   "--sft-items", "3", "--items-per-iteration", "2", "--cia-items", "4", "--rb-items", "2"])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    blocks = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and "embed" not in name)
    assert out["model"] == {"linear_weights": blocks, "head_weights": model.get_output_embeddings().weight.numel()}
    # 4 CIA items + 2 x 2 RewardBench pairs judged side by side (8) and A/B in both orders (8)
    assert out["tokens"]["eval_prompts"] == 4 + 8 + 8
    assert out["tokens"]["eval_prompt_tokens"] > 20 * 200  # real prompts: hundreds of tokens each
    assert 0 < out["tokens"]["sft_tokens"] <= 3 * out["sizes"]["max_length"]
    assert out["total_s"] == pytest.approx(sum(out["stages_s"].values()), abs=0.5)
    assert out["stages_s"]["seed evaluation, J_SFT"] == out["stages_s"]["iteration 2 evaluate"]
    assert out["gflops"] == 100 and "least wall time" in md.read_text()
