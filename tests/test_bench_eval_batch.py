"""bench/eval_batch.py: the same greedy evaluation prompts in batches of different sizes."""

from __future__ import annotations

import json


def test_bench_judges_the_same_prompts_at_every_batch_size(tiny_model_dir, capsys):
    from bench.eval_batch import main

    assert main(["--model", str(tiny_model_dir), "--prompts", "4", "--batch-sizes", "1,4", "--prompt-tokens", "300",
                 "--max-new-tokens", "4", "--rounds", "1"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    sizes = out["batch_sizes"]
    assert list(sizes) == ["1", "4"] and out["prompts"] == 4
    assert sizes["1"]["ratio"] == 1.0 and sizes["4"]["ratio"] > 0 and len(sizes["4"]["s"]) == 1
    assert 285 <= out["prompt_tokens"][0] <= out["prompt_tokens"][1]  # lengthened to ~95-100% of 300
    assert sizes["4"]["same_text"] == 4  # fp32 greedy: batching (and its padding) changes no judgment
    assert out["generated_tokens"] > 0
