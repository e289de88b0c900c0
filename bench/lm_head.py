"""Benchmark: the sampler with the LM head transposed (engine/lm_head.py) against the model's own forward.

Both judge the same prompts with the same seeds in the same sampler (greedy evaluation by default: a batch of
8 judge prompts, one judgment each, as the replication's evaluation runs), alternating A B A B so that the
machine's drift hits both. It prints each round's wall time, the ratio of the medians (model / transposed:
> 1 means the transposed head is faster), whether the two heads wrote the same judgments, and what
``head_layout: auto`` picks on this machine. The last line is one JSON object.

    python bench/lm_head.py                              # embedded SmolLM2, 8 prompts x 1, greedy, 96 tokens
    python bench/lm_head.py --n 4 --temperature 1        # sampling: 4 judgments per prompt share a prefill
    python bench/lm_head.py --prompt-tokens 1200 --rounds 3
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
    p.add_argument("--prompts", type=int, default=8, help="distinct judge prompts, one batch")
    p.add_argument("--n", type=int, default=1, help="judgments per prompt")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (evaluation)")
    p.add_argument("--prompt-tokens", type=int, default=700, help="lengthen each prompt to about this many tokens")
    p.add_argument("--rounds", type=int, default=2, help="timed runs of each head, alternating")
    p.add_argument("--precision", default="auto", help="auto (follows the hardware), fp32 or bf16")
    return p


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)

    import torch

    from bench.sampling import ITEMS, _lengthen
    from engine.models import resolve_model
    from engine.prompts import absolute_messages
    from engine.sampling import SamplingParams, TransformersSampler, judgment_seed

    path = resolve_model(args.model, Path(os.environ.get("SELFRAT_HOME", ".selfrat")))
    auto = TransformersSampler(path, device="cpu", precision=args.precision)  # head_layout "auto": timed at load
    heads = {}
    for layout in ("model", "transposed"):
        sampler = TransformersSampler.from_loaded(auto.model, auto.tokenizer, model_name=path)
        sampler.head_layout = layout
        sampler._head = sampler._choose_head()
        sampler.head = "transposed" if sampler._head else "model"
        heads[layout] = sampler
    if heads["transposed"].head != "transposed":
        raise SystemExit("this model's head cannot run transposed (engine/lm_head.py: plain_head)")

    count = lambda item: len(auto.encode_prompt(absolute_messages(item)))  # noqa: E731
    items = [ITEMS[i % len(ITEMS)] for i in range(args.prompts)]
    # Different lengths, as a real batch has: from 60% to 100% of --prompt-tokens.
    items = [_lengthen(it, int(args.prompt_tokens * (0.6 + 0.4 * i / max(1, args.prompts - 1))), count)
             for i, it in enumerate(items)]
    prompts = [absolute_messages(it) for it in items]
    lens = [count(it) for it in items]
    seeds = [[judgment_seed(0, f"lm-head-{i}", j) for j in range(args.n)] for i in range(args.prompts)]
    params = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens, force_score=True)
    print(f"model {path}, precision {auto.precision}, threads {torch.get_num_threads()}; {args.prompts} prompts "
          f"({min(lens)}-{max(lens)} tokens) x {args.n}, temperature {args.temperature}, "
          f"{args.max_new_tokens} tokens; head_layout auto picks: {auto.head}", flush=True)

    for sampler in heads.values():  # warm-up: one-off allocator and kernel selection costs
        sampler.generate(prompts[:2], 1, SamplingParams(max_new_tokens=2), [[0], [1]])
    times, outputs = {k: [] for k in heads}, {}
    for r in range(args.rounds):
        for name, sampler in heads.items():
            t = time.perf_counter()
            outputs[name] = [s for per in sampler.generate(prompts, args.n, params, seeds) for s in per]
            times[name].append(time.perf_counter() - t)
            print(f"round {r + 1} {name:10} {times[name][-1]:7.1f} s", flush=True)

    model_s, transposed_s = statistics.median(times["model"]), statistics.median(times["transposed"])
    same_text = sum(a.raw_text == b.raw_text for a, b in zip(outputs["model"], outputs["transposed"]))
    same_result = sum((a.score, a.verdict) == (b.score, b.verdict)
                      for a, b in zip(outputs["model"], outputs["transposed"]))
    tokens = sum(s.completion_tokens for s in outputs["transposed"])
    judgments = len(outputs["model"])
    print(f"median: model {model_s:.1f} s, transposed {transposed_s:.1f} s; ratio {model_s / transposed_s:.2f}x; "
          f"same text {same_text}/{judgments}, same score {same_result}/{judgments}")
    print(json.dumps({
        "model_s": [round(x, 2) for x in times["model"]], "transposed_s": [round(x, 2) for x in times["transposed"]],
        "ratio": round(model_s / transposed_s, 3), "auto_picks": auto.head, "precision": auto.precision,
        "same_text": same_text, "same_score": same_result, "judgments": judgments, "generated_tokens": tokens,
        "prompt_tokens": [min(lens), max(lens)], "n": args.n, "temperature": args.temperature,
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
