"""Benchmark: one of the sampler's CPU options on against off, on whole judgments.

--option head           the LM head in the layout the BLAS runs faster (engine/lm_head.py) vs the model's forward
--option prefill-chunk  prefill 256 prompt tokens per forward vs each part at once (`_prefill_forward`)
--option cascade        N samples read their prompt's cache once per step (engine/cascade.py) vs repeated per row

Both sides are the same sampler with that one setting changed (the others at their defaults), judging the
same prompts with the same seeds (greedy evaluation by default: a batch of 8 judge prompts, one judgment
each, as the replication's evaluation runs), alternating A B A B so that the machine's drift hits both. It
prints each round's wall time, the ratio of the medians (off / on: > 1 means the option is faster) and
whether both wrote the same judgments. The last line is one JSON object.

    python bench/decode_options.py --option head                    # 8 prompts x 1, greedy, 96 tokens
    python bench/decode_options.py --option cascade --n 4 --temperature 1     # a sampling batch
    python bench/decode_options.py --option prefill-chunk --prompt-tokens 1200 --rounds 3
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


# option -> (TransformersSampler attribute, value off, value on)
OPTIONS = {
    "head": ("head_layout", "model", "transposed"),
    "prefill-chunk": ("prefill_chunk", None, 256),
    "cascade": ("cascade", False, True),
}


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--option", choices=sorted(OPTIONS), required=True)
    p.add_argument("--model", default="embedded", help="'embedded', a checkpoint dir or a hub id")
    p.add_argument("--prompts", type=int, default=8, help="distinct judge prompts, one batch")
    p.add_argument("--n", type=int, default=1, help="judgments per prompt")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (evaluation)")
    p.add_argument("--prompt-tokens", type=int, default=700, help="lengthen each prompt to about this many tokens")
    p.add_argument("--rounds", type=int, default=2, help="timed runs of each side, alternating")
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
    attr, off, on = OPTIONS[args.option]
    heads = {}
    for name, value in (("off", off), ("on", on)):
        sampler = TransformersSampler.from_loaded(auto.model, auto.tokenizer, model_name=path)
        setattr(sampler, attr, value)
        # the head as `auto` chose it once, unless it is the option measured
        sampler._head = sampler._choose_head() if args.option == "head" else auto._head
        heads[name] = sampler
    if args.option == "head" and heads["on"].head != "transposed":
        raise SystemExit("this model's head cannot run transposed (engine/lm_head.py: plain_head)")
    if args.option == "cascade" and not heads["on"]._can_cascade():
        raise SystemExit("this model cannot take the cascade (engine/cascade.py: supported)")

    count = lambda item: len(auto.encode_prompt(absolute_messages(item)))  # noqa: E731
    items = [ITEMS[i % len(ITEMS)] for i in range(args.prompts)]
    # Different lengths, as a real batch has: from 60% to 100% of --prompt-tokens.
    items = [_lengthen(it, int(args.prompt_tokens * (0.6 + 0.4 * i / max(1, args.prompts - 1))), count)
             for i, it in enumerate(items)]
    prompts = [absolute_messages(it) for it in items]
    lens = [count(it) for it in items]
    seeds = [[judgment_seed(0, f"decode-options-{i}", j) for j in range(args.n)] for i in range(args.prompts)]
    params = SamplingParams(temperature=args.temperature, max_new_tokens=args.max_new_tokens, force_score=True)
    print(f"model {path}, precision {auto.precision}, threads {torch.get_num_threads()}; {args.prompts} prompts "
          f"({min(lens)}-{max(lens)} tokens) x {args.n}, temperature {args.temperature}, "
          f"{args.max_new_tokens} tokens; {attr}: off {off!r}, on {on!r}; head_layout auto picks: {auto.head}",
          flush=True)

    for sampler in heads.values():  # warm-up: one-off allocator and kernel selection costs
        sampler.generate(prompts[:2], 1, SamplingParams(max_new_tokens=2), [[0], [1]])
    times, outputs = {k: [] for k in heads}, {}
    for r in range(args.rounds):
        for name, sampler in heads.items():
            t = time.perf_counter()
            outputs[name] = [s for per in sampler.generate(prompts, args.n, params, seeds) for s in per]
            times[name].append(time.perf_counter() - t)
            print(f"round {r + 1} {args.option} {name:3} {times[name][-1]:7.1f} s", flush=True)

    off_s, on_s = statistics.median(times["off"]), statistics.median(times["on"])
    same_text = sum(a.raw_text == b.raw_text for a, b in zip(outputs["off"], outputs["on"]))
    same_result = sum((a.score, a.verdict) == (b.score, b.verdict) for a, b in zip(outputs["off"], outputs["on"]))
    tokens = sum(s.completion_tokens for s in outputs["on"])
    judgments = len(outputs["off"])
    print(f"median: off {off_s:.1f} s, on {on_s:.1f} s; ratio {off_s / on_s:.2f}x; "
          f"same text {same_text}/{judgments}, same score {same_result}/{judgments}")
    print(json.dumps({
        "option": args.option, "off_s": [round(x, 2) for x in times["off"]],
        "on_s": [round(x, 2) for x in times["on"]],
        "ratio": round(off_s / on_s, 3), "auto_picks": auto.head, "precision": auto.precision,
        "same_text": same_text, "same_score": same_result, "judgments": judgments, "generated_tokens": tokens,
        "prompt_tokens": [min(lens), max(lens)], "n": args.n, "temperature": args.temperature,
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
