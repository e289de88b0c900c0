"""bench/gpu_check.py: the plan on CPU (`--dry-run`: imports, tokenizer, model size; nothing runs on a GPU) and,
slow, the check's whole code path on CPU with a tiny model (`--cpu-smoke`, the stand-in store package too)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


def _run(*args: str, timeout: int) -> dict:
    out = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_dry_run_prints_the_plan(tmp_path):
    plan = _run("--dry-run", "--out", str(tmp_path), timeout=300)
    assert plan["model"]["hidden_size"] == 2048 and plan["model"]["num_hidden_layers"] == 16
    assert 0.8 < plan["params_b"] < 1.0  # counted on the meta device
    tok = plan["tokenizer"]
    assert tok["vocab"] == plan["model"]["vocab_size"] and tok["unk_in_prompt"] == 0
    assert len(tok["score_ids"]) == 5  # score forcing works with the made-up tokenizer
    assert plan["missing_here"] == []
    assert any(p.startswith("launch:") and "fsdp x 1" in p for p in plan["phases"])
    assert "trl==1.16.0" in plan["wheels"] and any(w.startswith("vllm") for w in plan["not_carried"])
    assert json.loads((tmp_path / "gpu_check_plan.json").read_text()) == plan


def test_print_wheels():
    out = subprocess.run([sys.executable, str(SCRIPT), "--print-wheels"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "transformers==" in out.stdout and "datasets==" in out.stdout


@pytest.mark.slow
def test_cpu_smoke_runs_every_phase_the_cpu_can(tmp_path):
    figures = _run("--cpu-smoke", "--stand-in-store", "--prompts", "1", "--n", "2", "--max-new-tokens", "8",
                   "--steps", "1", "--batch", "2", "--max-length", "512", "--out", str(tmp_path), timeout=600)
    assert figures["stand_in_store"] is True
    assert set(figures["errors"]) == {"qlora"}  # skipped: no bitsandbytes
    assert figures["sample"]["generated_tokens"] > 0
    for phase in ("sft", "dpo", "accelerate_ddp"):
        assert figures[phase]["finite"] and figures[phase]["steps"] == 1 and figures[phase]["loss_lines"] == 1
