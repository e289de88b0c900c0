"""Benchmark: shared prompt prefixes computed once, against the plain left-padded prefill, on the same batches.

Two workloads of the embedded judge, the same batches both ways (only `min_shared_prefix` differs):
- meta: the best-of-N meta-judge rating N judgments of each item, a batch per item (engine.meta batches
  whole items); the N prompts share the item's instruction, response and rubric, and differ in the feedback;
- eval: absolute judging of distinct items, batches of 8; only the template's header is shared.
Each prints seconds both ways, the prompt tokens computed (the sampler's `prefill_tokens`) and whether every
output (text, score) is the same. The last line is one JSON object with the ratios.

    python bench/prefix_sharing.py                      # 4 items x 5 ratings, 16-token notes; 8 eval items
    python bench/prefix_sharing.py --items 6 --prompt-tokens 900

In bf16 "same outputs" can be false with no fault in the sharing: bf16 rounds differently with the batch's
shapes, so the plain prefill of one batch or one prompt at a time differs too; --precision fp32 shows them
equal. Run it on an otherwise idle machine: the ratio of two timings taken while another job shares the cores
means little.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from bench.sampling import ITEMS, _lengthen  # noqa: E402

FEEDBACK = [  # made-up judgments of different lengths, as a judge's N samples are
    "The response is correct and clear. [RESULT] 5",
    "It covers the main point but skips the details the rubric asks for, so it is incomplete. [RESULT] 3",
    "Mostly right. [RESULT] 4",
    "The explanation contains an error in its key step, and it does not address the level of the reader at "
    "all; the rubric's lower descriptions fit it better. [RESULT] 2",
    "Good overall, with a minor omission near the end. [RESULT] 4",
]


def _timed(sampler, batches, params, shared: bool) -> tuple[float, int, list]:
    sampler.min_shared_prefix = 32 if shared else None
    sampler.prefill_tokens = 0
    out, t0 = [], time.perf_counter()
    for prompts, seeds in batches:
        out += [(s.text, s.score) for per in sampler.generate(prompts, 1, params, seeds) for s in per]
    return time.perf_counter() - t0, sampler.prefill_tokens, out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--items", type=int, default=4, help="items rated (meta) and judged (eval: twice as many)")
    p.add_argument("--n", type=int, default=5, help="judgments rated per item (best-of-N's N)")
    p.add_argument("--meta-new-tokens", type=int, default=16)
    p.add_argument("--eval-new-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=850, help="lengthen each judge prompt to about this")
    p.add_argument("--precision", default="auto")
    args = p.parse_args(argv)

    from engine.models import resolve_model
    from engine.prompts import absolute_messages, meta_messages
    from engine.sampling import SamplingParams, TransformersSampler

    path = resolve_model(args.model, Path(os.environ.get("SELFRAT_HOME", ".selfrat")))
    sampler = TransformersSampler(path, device="cpu", precision=args.precision)

    def count(item):
        return len(sampler.encode_prompt(absolute_messages(item)))

    items = [_lengthen(ITEMS[i % len(ITEMS)], args.prompt_tokens, count) for i in range(2 * args.items)]
    greedy = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=args.meta_new_tokens, force_score=True)
    meta = [([meta_messages(it, FEEDBACK[j % len(FEEDBACK)]) for j in range(args.n)], [[j] for j in range(args.n)])
            for it in items[:args.items]]
    evals = [([absolute_messages(it) for it in items[k:k + 8]], [[0]] * len(items[k:k + 8]))
             for k in range(0, len(items), 8)]
    eval_params = SamplingParams(temperature=0.0, top_p=1.0, max_new_tokens=args.eval_new_tokens, force_score=True)
    sampler.generate(meta[0][0][:1], 1, SamplingParams(temperature=0.0, max_new_tokens=2), [[0]])  # warm-up
    print(f"model {path}, {sampler.precision}; meta: {args.items} items x {args.n} ratings; eval: {len(items)} "
          "items", flush=True)

    result = {"bench": "prefix_sharing", "precision": sampler.precision}
    for name, batches, params in (("meta", meta, greedy), ("eval", evals, eval_params)):
        plain_s, plain_tok, plain_out = _timed(sampler, batches, params, shared=False)
        shared_s, shared_tok, shared_out = _timed(sampler, batches, params, shared=True)
        same = plain_out == shared_out
        print(f"{name}: plain {plain_s:.1f} s ({plain_tok} prompt tokens), shared {shared_s:.1f} s ({shared_tok}); "
              f"ratio {plain_s / shared_s:.2f}; same outputs: {same}", flush=True)
        result.update({f"{name}_plain_s": round(plain_s, 2), f"{name}_shared_s": round(shared_s, 2),
                       f"{name}_ratio": round(plain_s / shared_s, 2), f"{name}_tokens_plain": plain_tok,
                       f"{name}_tokens_shared": shared_tok, f"{name}_same_outputs": same})
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
