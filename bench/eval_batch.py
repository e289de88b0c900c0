"""Benchmark: greedy evaluation of the same prompts in batches of different sizes (`evaluation.batch_size`).

A decode step's matrix products are as thin as the batch: on one AVX2 machine a 576 x 1,536 linear layer ran
at 51 GFLOP/s for 8 rows and 103 for 32, so larger batches should decode cheaper per judgment. Against that,
a batch pads its prompts to the longest. The evaluation sorts its requests by prompt length
(engine/judging.py), so a batch of the replication's 550 prompts spans little; this bench gives every batch
size prompts of about the same length (95-100% of --prompt-tokens) to measure that case. Each batch size judges
the same prompts with the same seeds, in rounds that alternate the sizes so the machine's drift hits all.
It prints each round's wall time per judgment, the medians, each size's ratio to the first (> 1 = faster
than the first) and how many judgments match the first size's. The last line is one JSON object.

    python bench/eval_batch.py                                   # 32 prompts of ~900 tokens, batches 8,16,32
    python bench/eval_batch.py --prompts 64 --batch-sizes 8,64 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded", help="'embedded', a checkpoint dir or a hub id")
    p.add_argument("--prompts", type=int, default=32, help="distinct judge prompts, one judgment each")
    p.add_argument("--batch-sizes", default="8,16,32", help="comma-separated; the first is the baseline")
    p.add_argument("--prompt-tokens", type=int, default=900, help="lengthen each prompt to 95-100%% of this")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--rounds", type=int, default=2, help="timed runs of each size, alternating")
    p.add_argument("--precision", default="auto", help="auto (follows the hardware), fp32 or bf16")
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    sizes = [int(x) for x in args.batch_sizes.split(",")]

    import torch

    from bench.sampling import ITEMS, _lengthen
    from engine.models import resolve_model
    from engine.prompts import absolute_messages
    from engine.sampling import SamplingParams, TransformersSampler, judgment_seed

    path = resolve_model(args.model, Path(os.environ.get("SELFRAT_HOME", ".selfrat")))
    sampler = TransformersSampler(path, device="cpu", precision=args.precision)
    count = lambda item: len(sampler.encode_prompt(absolute_messages(item)))  # noqa: E731
    k = args.prompts
    items = [_lengthen(ITEMS[i % len(ITEMS)], int(args.prompt_tokens * (0.95 + 0.05 * i / max(1, k - 1))), count)
             for i in range(k)]
    prompts = [absolute_messages(it) for it in items]
    lens = [count(it) for it in items]
    seeds = [[judgment_seed(0, f"eval-batch-{i}", 0)] for i in range(k)]
    params = SamplingParams(temperature=0.0, max_new_tokens=args.max_new_tokens, force_score=True)
    print(f"model {path}, precision {sampler.precision}, threads {torch.get_num_threads()}; {k} prompts "
          f"({min(lens)}-{max(lens)} tokens), greedy, {args.max_new_tokens} tokens; batch sizes {sizes}",
          flush=True)

    sampler.generate(prompts[:2], 1, SamplingParams(max_new_tokens=2), [[0], [1]])  # one-off warm-up costs
    times, outputs = {b: [] for b in sizes}, {}
    for r in range(args.rounds):
        for b in sizes:
            t = time.perf_counter()
            outputs[b] = [s for start in range(0, k, b)
                          for (s,) in sampler.generate(prompts[start:start + b], 1, params, seeds[start:start + b])]
            times[b].append(time.perf_counter() - t)
            print(f"round {r + 1} batch {b:3}: {times[b][-1]:7.1f} s, {times[b][-1] / k:.2f} s per judgment",
                  flush=True)

    base = statistics.median(times[sizes[0]])
    summary = {}
    for b in sizes:
        med = statistics.median(times[b])
        same = sum(x.raw_text == y.raw_text for x, y in zip(outputs[sizes[0]], outputs[b]))
        summary[b] = {"s": [round(x, 2) for x in times[b]], "per_judgment_s": round(med / k, 3),
                      "ratio": round(base / med, 3), "same_text": same}
        print(f"batch {b:3}: median {med:.1f} s ({med / k:.2f} s per judgment), {base / med:.2f}x batch "
              f"{sizes[0]}; same text as batch {sizes[0]} {same}/{k}")
    print(json.dumps({
        "batch_sizes": summary, "precision": sampler.precision, "prompts": k, "prompt_tokens": [min(lens), max(lens)],
        "generated_tokens": sum(s.completion_tokens for s in outputs[sizes[0]]),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
