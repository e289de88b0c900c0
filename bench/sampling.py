"""Benchmark: our TransformersSampler against one-at-a-time HF ``model.generate``, in generated tokens/s.

Both draw the same number of judgments (prompts x n) with the same temperature, top_p and token budget on
realistic judge prompts (Prometheus absolute template, full rubric, ~450 tokens each). Ours runs them as
one batch: each prompt is prefilled once and shared by its n samples. The baseline runs one prompt and one
sample per ``generate`` call, so it prefills every judgment. The last line of output is one JSON object
with ``ours_tok_s``, ``baseline_tok_s`` and ``ratio`` (goal: >= 3 on the embedded model, CPU defaults).

    python bench/sampling.py                                   # embedded SmolLM2, 4 prompts x 4, 64 tokens
    python bench/sampling.py --prompts 2 --n 4 --max-new-tokens 32
    python bench/sampling.py --model /path/to/checkpoint --device cuda

The embedded checkpoint is built once per machine (~30 s) into the user cache (engine.models.cache_dir()).
Ours runs in the precision `auto` picks here (or --precision); the baseline loads the checkpoint plainly.
--prompt-tokens N lengthens the prompts to about N tokens (long-prompt judging).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

# Made-up items with full rubrics, so prompts have the length of real Feedback-Collection items.
ITEMS = [
    {
        "instruction": "Explain to a high-school student why the sky is blue, in one or two paragraphs.",
        "response": "The sky looks blue because sunlight is made of many colours, and when it passes through "
        "the air the tiny gas molecules scatter the shorter wavelengths, like blue and violet, much more than "
        "the longer ones such as red. This is called Rayleigh scattering. Our eyes are more sensitive to blue "
        "than violet, and some violet is absorbed high in the atmosphere, so the scattered light that reaches "
        "us from every direction of the sky appears blue. At sunset the light travels through more air, so "
        "most of the blue is scattered away before it reaches us and the sky looks red and orange.",
        "reference": "Sunlight contains all visible colours. Air molecules are much smaller than the wavelength "
        "of light and scatter short wavelengths far more strongly (Rayleigh scattering, proportional to one "
        "over the wavelength to the fourth power). Blue light is therefore scattered across the whole sky and "
        "reaches our eyes from every direction, while our eyes' lower sensitivity to violet makes the sky look "
        "blue rather than violet. Near sunset, light crosses more atmosphere, blue is scattered out of the "
        "direct beam, and the remaining light looks red and orange.",
        "criteria": "Does the response explain the physics correctly and at a level a high-school student "
        "can follow?",
        "score1_description": "The explanation is wrong or missing; it gives a myth (e.g. the sky reflects "
        "the ocean) or no reason at all.",
        "score2_description": "The explanation mentions scattering but is mostly confused or contains a "
        "major physical error.",
        "score3_description": "The explanation is broadly right but skips why blue is scattered more, or is "
        "pitched at the wrong level for a student.",
        "score4_description": "The explanation is correct and clear, naming Rayleigh scattering and the "
        "wavelength dependence, with minor omissions.",
        "score5_description": "The explanation is correct, clear and complete, including why the sky is not "
        "violet and why sunsets are red, at the right level for a student.",
    },
    {
        "instruction": "Write a Python function that returns the n-th Fibonacci number efficiently, and say "
        "what its time complexity is.",
        "response": "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
        "This runs in O(n) time and O(1) memory because it keeps only the last two numbers instead of "
        "recursing. A naive recursive version would take exponential time since it recomputes the same "
        "values many times. For very large n you could use matrix exponentiation or fast doubling to get "
        "O(log n) arithmetic operations, although the numbers themselves grow large.",
        "reference": "An iterative loop keeping two variables computes F(n) in O(n) additions and O(1) extra "
        "space; fast doubling (F(2k) = F(k)(2F(k+1) - F(k)), F(2k+1) = F(k)^2 + F(k+1)^2) gives O(log n) "
        "arithmetic operations. The answer should give correct code and state the complexity.",
        "criteria": "Is the code correct and efficient, and is the complexity analysis accurate?",
        "score1_description": "The code does not run or returns wrong values, and the complexity is missing "
        "or wrong.",
        "score2_description": "The code has a serious bug (off-by-one on most inputs, infinite recursion) or "
        "uses an exponential algorithm presented as efficient.",
        "score3_description": "The code is correct but inefficient or the complexity analysis is wrong or "
        "missing.",
        "score4_description": "The code is correct and linear-time with a correct complexity statement, but "
        "the explanation is thin.",
        "score5_description": "The code is correct and efficient, the complexity is stated and justified, "
        "and faster alternatives are mentioned accurately.",
    },
    {
        "instruction": "A customer writes: 'My order arrived damaged and I need it for a birthday on "
        "Saturday.' Draft a reply from the support team.",
        "response": "Hi, thanks for reaching out. We're really sorry your order arrived damaged, especially "
        "with a birthday coming up. We've already arranged a free replacement with express shipping, so it "
        "should reach you by Friday; you'll get a tracking number by email within the hour. There's no need "
        "to send the damaged item back. If anything goes wrong with the delivery, reply to this message and "
        "we'll make it right, including a full refund if you prefer. Have a wonderful celebration!",
        "reference": "Apologise sincerely, acknowledge the deadline, offer a concrete fix that meets it "
        "(expedited replacement with a delivery date and tracking), remove friction (no return needed or a "
        "prepaid label), offer an alternative such as a refund, and close warmly.",
        "criteria": "Does the reply resolve the customer's problem with empathy and concrete next steps?",
        "score1_description": "The reply is rude, dismissive or irrelevant, or offers no help.",
        "score2_description": "The reply apologises but offers no concrete solution or ignores the deadline.",
        "score3_description": "The reply offers a solution but it is vague (no timing, no steps) or adds "
        "friction for the customer.",
        "score4_description": "The reply is empathetic with a concrete solution that meets the deadline, "
        "missing one useful detail.",
        "score5_description": "The reply is empathetic, meets the deadline with a concrete plan, removes "
        "friction and offers an alternative, in a warm tone.",
    },
    {
        "instruction": "Summarise the main causes of the French Revolution in about five sentences.",
        "response": "The French Revolution was caused mainly by the king wanting more power. People were "
        "also angry about taxes. There were some new ideas going around. In the end the people stormed the "
        "Bastille in 1799 and the king was executed soon after.",
        "reference": "Causes include a fiscal crisis after costly wars (including support for the American "
        "Revolution), an unequal tax burden on the Third Estate while clergy and nobility were largely "
        "exempt, poor harvests and high bread prices in 1788-89, Enlightenment ideas challenging absolute "
        "monarchy and privilege, and the political deadlock of the Estates-General in 1789 that led to the "
        "National Assembly. The Bastille fell on 14 July 1789.",
        "criteria": "Is the summary accurate and does it cover the main causes with appropriate detail?",
        "score1_description": "The summary is mostly inaccurate or off-topic.",
        "score2_description": "The summary names one or two causes vaguely and contains factual errors.",
        "score3_description": "The summary names several causes but is vague or has a minor factual error.",
        "score4_description": "The summary is accurate and covers most main causes with some detail.",
        "score5_description": "The summary is accurate, concise and covers the fiscal, social, economic, "
        "intellectual and political causes.",
    },
]


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded", help="'embedded', a checkpoint dir or a hub id")
    p.add_argument("--prompts", type=int, default=4, help="distinct judge prompts (cycled from the built-in items)")
    p.add_argument("--n", type=int, default=4, help="judgments per prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--precision", default="auto", help="ours: auto (follows the hardware), fp32 or bf16; the "
                   "baseline always loads the checkpoint as transformers does by default")
    p.add_argument("--prompt-tokens", type=int, default=0,
                   help="lengthen each prompt (its response and reference) to about this many tokens (0 = as is)")
    return p


def _lengthen(item: dict, tokens: int, count) -> dict:
    """The item with its response and reference repeated until its prompt has about `tokens` tokens."""
    item, base = dict(item), (item["response"], item["reference"])
    k = 1
    while count(item) < tokens:
        k += 1
        item["response"] = "\n\n".join([base[0]] * k)
        item["reference"] = "\n\n".join([base[1]] * k)
    return item


def _fraction_of_bound(sampler, prompt_lens: list[int], n: int, tokens: int, seconds: float) -> dict:
    """Model FLOPs ours achieved (2 x params per token processed: each prompt once, every generated token)
    over the matmul bound of its precision (bench/limits.py)."""
    import torch

    from bench.limits import matmul_gflops

    params = sum(p.numel() for p in sampler.model.parameters())
    flops = 2 * params * (sum(prompt_lens) + tokens)
    bound = matmul_gflops(torch.bfloat16 if sampler.precision == "bf16" else torch.float32, seconds=1.0)
    return {"ours_fraction_of_bound": round(flops / seconds / 1e9 / bound, 3), "bound_gflops": round(bound, 1)}


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)

    import torch

    from engine.models import resolve_model
    from engine.prompts import absolute_messages
    from engine.sampling import SamplingParams, TransformersSampler, judgment_seed

    workspace = Path(os.environ.get("SELFRAT_HOME", ".selfrat"))
    path = resolve_model(args.model, workspace)
    sampler = TransformersSampler(path, device=args.device, precision=args.precision)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path).to(sampler.device).eval()  # the plain way: default dtype
    items = [ITEMS[i % len(ITEMS)] for i in range(args.prompts)]
    if args.prompt_tokens:
        items = [_lengthen(it, args.prompt_tokens, lambda x: len(sampler.encode_prompt(absolute_messages(x))))
                 for it in items]
    prompts = [absolute_messages(it) for it in items]
    seeds = [[judgment_seed(args.seed, f"bench-{i}", j) for j in range(args.n)] for i in range(args.prompts)]
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens)
    prompt_lens = [len(sampler.encode_prompt(m)) for m in prompts]
    judgments = args.prompts * args.n
    print(f"model {path} on {sampler.device}; {args.prompts} prompts x {args.n} = {judgments} judgments, "
          f"prompt tokens {min(prompt_lens)}-{max(prompt_lens)}, max_new_tokens {args.max_new_tokens}, "
          f"threads {torch.get_num_threads()}", flush=True)

    # Warm-up (one-off allocator / kernel selection costs), for both paths.
    warm = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_new_tokens=2)
    sampler.generate(prompts[:1], 1, warm, [[0]])

    # Ours: every prompt x n in one batch.
    t0, c0 = time.perf_counter(), time.process_time()
    samples = sampler.generate(prompts, args.n, params, seeds)
    ours_s, ours_cpu = time.perf_counter() - t0, time.process_time() - c0
    ours_tokens = sum(s.completion_tokens for per in samples for s in per)
    scored = sum(s.score is not None for per in samples for s in per)

    # Baseline: one prompt, one sample per model.generate call.
    stop = sorted(sampler.stop_ids)
    base_tokens = 0
    t0, c0 = time.perf_counter(), time.process_time()
    for i, messages in enumerate(prompts):
        ids = torch.tensor([sampler.encode_prompt(messages)], device=sampler.device)
        for j in range(args.n):
            torch.manual_seed(seeds[i][j])
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), do_sample=args.temperature > 0,
                temperature=args.temperature if args.temperature > 0 else None, top_p=args.top_p, top_k=0,
                max_new_tokens=args.max_new_tokens, eos_token_id=stop, pad_token_id=sampler.pad_id,
            )
            new = out[0, ids.shape[1]:].tolist()
            base_tokens += sum(1 for t in new if t not in sampler.stop_ids)
    base_s, base_cpu = time.perf_counter() - t0, time.process_time() - c0

    ours_tok_s = ours_tokens / ours_s
    base_tok_s = base_tokens / base_s
    rows = [
        ("ours (shared prefill, batched)", judgments, ours_tokens, ours_s, ours_tok_s),
        ("baseline (HF generate, 1 x 1)", judgments, base_tokens, base_s, base_tok_s),
    ]
    cpus = (ours_cpu, base_cpu)
    print(f"{'method':34} {'judgments':>9} {'tokens':>7} {'wall s':>8} {'cpu s':>8} {'tok/s':>8} {'judg/s':>7}")
    for (name, j, t, s, ts), cpu in zip(rows, cpus):
        print(f"{name:34} {j:9d} {t:7d} {s:8.1f} {cpu:8.1f} {ts:8.1f} {j / s:7.3f}")
    print(f"ours: {scored}/{judgments} judgments wrote a score freely; "
          f"speed-up {ours_tok_s / base_tok_s:.2f}x in tokens/s (wall), "
          f"{(ours_tokens / ours_cpu) / (base_tokens / base_cpu):.2f}x in tokens per CPU-second")
    # On a shared machine the wall-clock ratio moves with other processes' load; the CPU-time ratio less so.
    print(json.dumps({
        "ours_tok_s": round(ours_tok_s, 2), "baseline_tok_s": round(base_tok_s, 2),
        "ratio": round(ours_tok_s / base_tok_s, 2), "ours_s": round(ours_s, 2), "baseline_s": round(base_s, 2),
        "ratio_cpu_time": round((ours_tokens / ours_cpu) / (base_tokens / base_cpu), 2),
        "ours_cpu_s": round(ours_cpu, 2), "baseline_cpu_s": round(base_cpu, 2),
        "ours_tokens": ours_tokens, "baseline_tokens": base_tokens, "prompts": args.prompts, "n": args.n,
        "max_new_tokens": args.max_new_tokens, "prompt_tokens_mean": round(sum(prompt_lens) / len(prompt_lens), 1),
        "device": str(sampler.device), "model": args.model, "precision": sampler.precision,
        "baseline_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        **_fraction_of_bound(sampler, prompt_lens, args.n, ours_tokens, ours_s),
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
