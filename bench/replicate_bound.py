"""The least wall time a replication of given sizes can take on this machine: its model arithmetic over the
machine's matrix-multiply rate. It runs nothing of the replication.

    python bench/replicate_bound.py                      # the full sizes (bench/replicate.py's preset)
    python bench/replicate_bound.py --cia-items 100      # other sizes: bench/replicate.py's size flags
    python bench/replicate_bound.py --gflops 414.5       # another machine's rate (bench/limits.py there)

Why: bench/replicate.py's projection says how long our implementation takes; this says how long any
implementation must take, so "the 150-minute goal is not met" can be split into "our code is N x off the
bound" and "the machine cannot do it". The count is a lower bound on purpose:
- prompt and training token counts are exact (the selected items through the judge's chat template);
- only the matrix multiplies of the linear layers are counted, 2 FLOPs per weight per token: attention's
  QK/AV products, norms, activations and memory traffic (which bounds decoding) cost nothing here;
- the LM head (vocabulary x hidden) only where a token's logits are needed (generated and trained tokens;
  a prefill keeps the last position's);
- an item's N samples share its prefill (as engine/sampling.py does), a DPO pair computes its prompt once
  (engine/shared_prompt.py), the reference pass is one forward, backward = 2 x forward, no recompute;
- generated tokens per judgment and pairs per iteration are the full run's measured means (flags).
The rate is bench/limits.py's best 2048^3 matmul at the precision `precision: auto` picks here.
Prints a table on stderr and one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from limits import matmul_gflops  # noqa: E402
from replicate import DATA, EVAL_SETS, TooFew, add_size_flags, die, selections, sizes_of  # noqa: E402

# Measured in the full run (bench/results/replicate.md, diagnostics): mean tokens of a greedy evaluation
# judgment (J_SFT, 80.2) and of a sampled train judgment (91.3-94.8); pairs curated per iteration (51, 39) and
# by single-stage DPO (88).
EVAL_TOKENS, TRAIN_TOKENS = 80, 91
PAIRS = {1: 51, 2: 39, "single": 88}
GOAL_MIN = 150


def model_shape(model: str) -> dict:
    """Weights of the linear layers of the transformer blocks, and the LM head's hidden x vocabulary."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from engine.models import resolve_model

    path = resolve_model(model)
    cfg = AutoConfig.from_pretrained(path)
    with torch.device("meta"):  # shapes only: no memory, no weights read
        m = AutoModelForCausalLM.from_config(cfg)
    head = m.get_output_embeddings().weight
    embed = m.get_input_embeddings().weight
    linear = sum(p.numel() for name, p in m.named_parameters()
                 if p.dim() == 2 and p is not head and p is not embed)
    return {"path": path, "linear_weights": int(linear), "head_weights": int(head.numel())}


def token_counts(tokenizer, data: Path, s: dict) -> dict:
    """Exact prompt (and SFT target) token counts of a run of sizes `s`: one list per kind of request."""
    from engine.prompts import absolute_messages, meta_messages
    from engine.relative import relative_requests
    from engine.sampling import chat_prompt_ids

    sel = {name: chosen for name, (_r, chosen, _i) in selections(data, s).items()}

    def n(messages) -> int:
        return len(chat_prompt_ids(tokenizer, messages))

    abs_p, meta_p = [], []
    for name in EVAL_SETS:
        for it in sel[name].iter_rows(named=True):
            for key in ["response"] + (["response_b"] if it["kind"] == "pairwise" else []):
                abs_p.append(n(absolute_messages(it, response_key=key)))
                meta_p.append(n(meta_messages(it, "", response_key=key)))  # the rating's prompt, less its feedback
    rel_p = [n(r.messages) for name in EVAL_SETS[1:] for r in relative_requests(sel[name])] if s["relative"] else []
    sft = [min(s["max_length"], n(absolute_messages(it))
               + len(tokenizer.encode(f"{it['gold_feedback'] or ''} [RESULT] 5", add_special_tokens=False)))
           for it in sel["cia-sft"].iter_rows(named=True)]
    train_p = [n(absolute_messages(it)) for it in sel["cia-train"].iter_rows(named=True)]
    return {"abs": abs_p, "meta": meta_p, "rel": rel_p, "sft": sft, "train": train_p}


def bound(shape: dict, tokens: dict, s: dict, gflops: float, eval_tokens: int = EVAL_TOKENS,
          train_tokens: int = TRAIN_TOKENS, pairs: dict | None = None) -> dict:
    """Least seconds of each stage of the replication (bench/replicate.py's stages) at `gflops`."""
    pairs = pairs or PAIRS
    f, h = 2 * shape["linear_weights"], 2 * shape["head_weights"]  # FLOPs per token forward: blocks, LM head
    m, N, L = s["items_per_iteration"], s["baseline_n"], s["max_length"]

    def prefill(ps) -> float:
        return f * sum(ps)

    def generate(judgments: int, per: int) -> float:
        return (f + h) * judgments * per

    def judge(ps, per_prompt: int = 1) -> float:  # evaluation judgments; a prompt's samples share its prefill
        return prefill(ps) + generate(per_prompt * len(ps), eval_tokens)

    greedy = judge(tokens["abs"] + tokens["rel"])

    def sample(ps) -> float:  # an item's n samples share its prefill
        return prefill(ps) + generate(len(ps) * s["n"], train_tokens)

    mean_train = sum(tokens["train"]) / max(1, len(tokens["train"]))

    def dpo(n_pairs: int) -> float:  # prompt once + both completions; policy fwd + bwd (3x) and a reference fwd
        per_pair = min(L, mean_train + 2 * train_tokens)
        return n_pairs * (4 * f * per_pair + 4 * h * 2 * train_tokens)

    sft_target = s["sft_epochs"] * sum(tokens["sft"])
    stages = {
        "seed SFT": 3 * f * sft_target,  # the LM head over the targets only: left out, a lower bound
        "seed evaluation, J_SFT": greedy,
        "baselines self-consistency / best-of-N sampling": judge(tokens["abs"], N),
        # an item's N ratings share its prompt up to the feedback; each rating reads its feedback, writes a note
        "baseline best-of-N meta-judge": prefill(tokens["meta"]) + f * N * len(tokens["meta"]) * eval_tokens
        + generate(N * len(tokens["meta"]), s["meta_new_tokens"]),
    }
    for k in (1, 2):
        stages[f"iteration {k} sample"] = sample(tokens["train"][(k - 1) * m:k * m])
        stages[f"iteration {k} train ({pairs[k]} pairs)"] = dpo(pairs[k])
        stages[f"iteration {k} evaluate"] = greedy
    stages["single-stage DPO sample"] = sample(tokens["train"])
    stages[f"single-stage DPO train ({pairs['single']} pairs)"] = dpo(pairs["single"])
    stages["single-stage DPO evaluate"] = greedy
    optional = {"baseline raw (not asked by the issue)": judge(tokens["abs"])}
    seconds = {k: v / gflops / 1e9 for k, v in stages.items()}
    total = sum(seconds.values())
    return {"gflops": gflops, "tflop": {k: round(v / 1e12, 1) for k, v in stages.items()},
            "stages_s": {k: round(v, 1) for k, v in seconds.items()},
            "optional_s": {k: round(v / gflops / 1e9, 1) for k, v in optional.items()},
            "total_s": round(total, 1), "total_min": round(total / 60, 1),
            "fits_goal": bool(total <= GOAL_MIN * 60),
            "tokens": {"eval_prompts": len(tokens["abs"]) + len(tokens["rel"]),
                       "eval_prompt_tokens": sum(tokens["abs"]) + sum(tokens["rel"]),
                       "sft_tokens": round(sft_target), "train_prompt_tokens": sum(tokens["train"]),
                       "meta_prompt_tokens": sum(tokens["meta"])}}


def markdown(result: dict, machine: dict | None) -> str:
    """The table; `machine` None: the rate was given (another machine's), so this one's flags say nothing."""
    rows = "\n".join(f"| {k} | {result['tflop'][k]} | {v / 60:.1f} min |" for k, v in result["stages_s"].items())
    opt = "\n".join(f"| {k} | | {v / 60:.1f} min |" for k, v in result["optional_s"].items())
    where = (f"Machine: {machine['capability']}, AMX {machine['amx']}, avx512_bf16 {machine['avx512_bf16']}, "
             f"{machine['threads']} threads; `precision: auto` = {machine['auto']}, matmul {result['gflops']:.1f} "
             "GFLOP/s (measured here)." if machine else f"Rate given: {result['gflops']:.1f} GFLOP/s (--gflops).")
    return (f"{where}\n\n| stage | TFLOP | least wall time |\n|---|---|---|\n{rows}\n| **total** | | "
            f"**{result['total_min']:.0f} min** |\n{opt}\n\nThe issue's {GOAL_MIN} minutes at this machine's matmul "
            f"rate: **{'possible' if result['fits_goal'] else 'impossible'}** (a lower bound: see the script's "
            "docstring for what is left out).")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--model", default="embedded")
    p.add_argument("--eval-tokens", type=int, default=EVAL_TOKENS, help="generated tokens per evaluation judgment")
    p.add_argument("--train-tokens", type=int, default=TRAIN_TOKENS, help="generated tokens per sampled judgment")
    p.add_argument("--gflops", type=float, help="the rate to divide by (default: measured here)")
    p.add_argument("--out", type=Path, help="also write the table to this markdown file")
    add_size_flags(p, skip=("bootstrap", "compare_bootstrap", "dpo_loss"))
    a = p.parse_args(argv)
    s, _given = sizes_of(a, "full")

    import torch
    from transformers import AutoTokenizer

    from engine.precision import cpu_flags, resolve_precision

    with contextlib.redirect_stdout(sys.stderr):
        shape = model_shape(a.model)
        tokenizer = AutoTokenizer.from_pretrained(shape["path"])
        try:
            tokens = token_counts(tokenizer, a.data, s)
        except TooFew as e:
            die(str(e))
        auto = resolve_precision("auto", "cpu")
        machine = {"threads": torch.get_num_threads(), **cpu_flags(), "auto": auto}
        gflops = a.gflops or matmul_gflops(torch.bfloat16 if auto == "bf16" else torch.float32)
        result = bound(shape, tokens, s, gflops, a.eval_tokens, a.train_tokens)
        text = markdown(result, None if a.gflops else machine)
        print(text)
        if a.out:
            a.out.write_text(text + "\n")
    summary = {"bench": "replicate_bound", **result, "machine": machine, "sizes": s,
               "model": {k: v for k, v in shape.items() if k != "path"}}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
