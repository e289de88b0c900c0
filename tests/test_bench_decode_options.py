"""bench/decode_options.py: each CPU option of the sampler off and on, on the same prompts and seeds."""

from __future__ import annotations

import json

import pytest


@pytest.mark.parametrize("option", ["head", "prefill-chunk", "cascade"])
def test_bench_runs_an_option_off_and_on_on_the_same_prompts(tiny_model_dir, capsys, option):
    from bench.decode_options import main

    assert main(["--option", option, "--model", str(tiny_model_dir), "--prompts", "2", "--n", "2",
                 "--max-new-tokens", "4", "--prompt-tokens", "300", "--rounds", "1"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["option"] == option and out["judgments"] == 4 and len(out["off_s"]) == len(out["on_s"]) == 1
    assert out["same_text"] == out["same_score"] == 4  # fp32: both sides write the same judgments
    assert out["auto_picks"] in ("model", "transposed") and out["ratio"] > 0
