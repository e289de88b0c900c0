"""bench/sft.py: the seed SFT, ours (the LM head on the completion positions) against TRL's head, same setup."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_trains_both_sides_to_the_same_losses(tiny_model_dir, shared_data):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "sft.py"), "--model", str(tiny_model_dir),
                           "--examples", "2", "--batch-size", "1"], capture_output=True, text=True, check=True)
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["examples"] == 2 and out["steps_compared"] == 2
    assert out["max_abs_loss_diff"] < 1e-3  # the same training, only the head's work differs
    assert out["ratio"] > 0 and out["precision"] in ("fp32", "bf16")
    assert 500 < out["tokens_per_example"] < 2500  # CIA-length examples
