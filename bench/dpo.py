"""Benchmark: one DPO pass over CIA-length pairs, our `train_dpo` against TRL's DPOTrainer with its defaults.

    python bench/dpo.py                       # embedded SmolLM2, 4 pairs, batch 2 (about 5 minutes on 2 cores)
    python bench/dpo.py --pairs 8 --batch-size 4 --model /path/to/checkpoint

Pairs: CIA graded responses (../shared/data/cia): the prompt is the Prometheus absolute prompt of one graded
response (about 1,000-1,500 tokens with its rubric and reference answer); chosen is its gold feedback with
its gold score, rejected the feedback and score of another response to the same instruction. Both sides
train the same model on the same pairs, one epoch, same seed and learning rate, each in its own process (so
each peak RSS is its own). The baseline is `DPOTrainer(model, args=DPOConfig(...defaults...))`, plus
`use_cpu=True` on a CPU (without it TRL's default bf16 refuses to start there) and `max_length` large enough
that no pair is cut (TRL's default 1024 keeps the start, which cuts every judgment of these prompts away).
Ours runs as the train stage does (`precision: auto`, and its reference log-probs in one batched no-grad pass
before training). The last line is one JSON object: ours_s_per_pair, trl_s_per_pair, ratio,
max_abs_loss_diff (per optimizer step), peak_rss_mb (ours), trl_peak_rss_mb, precision, tokens_per_pair,
and ours_fraction_of_bound: the model FLOPs ours achieved (8 x params x tokens: policy forward + backward,
reference forward) over the matmul bound of its precision from bench/limits.py.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
CIA = ROOT.parent / "shared" / "data" / "cia" / "scored_responses_testset_remaining.tsv"


def cia_pairs(n: int) -> list[dict]:
    """n DPO pairs at CIA length: gold feedback of one response (chosen) vs another response's feedback."""
    from engine.importers import read_items
    from engine.prompts import absolute_messages, format_judgment

    items = read_items(str(CIA), dataset="bench", preset="cia", on_conflict="drop").items
    by_instruction: dict[str, list[dict]] = {}
    for it in items.iter_rows(named=True):
        by_instruction.setdefault(it["instruction"], []).append(it)
    pairs = []
    for group in by_instruction.values():
        group = sorted(group, key=lambda it: it["gold_score"])
        if len(group) < 2:
            continue
        best, worst = group[-1], group[0]
        pairs.append({
            "prompt": absolute_messages(best),
            "chosen": format_judgment(best["gold_feedback"], int(best["gold_score"])),
            "rejected": format_judgment(worst["gold_feedback"], int(worst["gold_score"])),
        })
        if len(pairs) == n:
            return pairs
    raise SystemExit(f"only {len(pairs)} pairs in {CIA}")


def _side(side: str, model: str, n: int, batch_size: int, max_length: int, out: Path) -> dict:
    """One side's run, in this process: seconds, per-step losses, precision."""
    import torch

    pairs = cia_pairs(n)
    t0 = time.perf_counter()
    if side == "ours":
        from engine.config import TrainingConfig
        from engine.training import train_dpo

        steps: list[float] = []
        cfg = TrainingConfig(batch_size=batch_size, max_length=max_length, learning_rate=5e-6)
        train_dpo(policy_path=model, reference_path=None, pairs=pairs, cfg=cfg, out_dir=out,
                  device="cpu" if not torch.cuda.is_available() else "auto",
                  log=lambda line: steps.append(float(line.split(" loss=")[1].split()[0]))
                  if line.startswith("step ") else None)
        record = json.loads((out / "selfrat_checkpoint.json").read_text())
        precision = record["precision"]
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import DPOConfig, DPOTrainer

        from engine.training import dpo_examples

        policy = AutoModelForCausalLM.from_pretrained(model)
        tokenizer = AutoTokenizer.from_pretrained(model)
        args = DPOConfig(output_dir=str(out), per_device_train_batch_size=batch_size, max_length=max_length,
                         learning_rate=5e-6, num_train_epochs=1, seed=0, logging_steps=1, report_to="none",
                         save_strategy="no", use_cpu=not torch.cuda.is_available())
        trainer = DPOTrainer(model=policy, args=args, train_dataset=dpo_examples(pairs), processing_class=tokenizer)
        trainer.train()
        steps = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        precision = "bf16" if args.bf16 else "fp32"
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "losses": steps, "precision": precision,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def two_sides(script: str, side_fn, count: str, default: int, description: str):
    """The command line both training benches share: `--model`, `--<count>`, `--batch-size`, `--max-length`.
    Runs `--side ours` then `--side trl` of `script`, each in its own process (so each peak RSS is its own);
    a side calls `side_fn(side, model, n, batch_size, max_length, out_dir)` and prints its result (a dict with
    at least `seconds` and `losses`) as one JSON line. Returns (args with `model_path`, {side: result}), or
    None inside a side."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--model", default="embedded")
    ap.add_argument(f"--{count}", type=int, default=default)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=2048)
    ap.add_argument("--side", choices=["ours", "trl"], help=argparse.SUPPRESS)  # internal: one side
    a = ap.parse_args()
    n = getattr(a, count)
    if a.side:
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps(side_fn(a.side, a.model, n, a.batch_size, a.max_length, Path(tmp) / "out")))
        return None

    from engine.models import resolve_model

    a.model_path = str(resolve_model(a.model))
    results = {}
    for side in ("ours", "trl"):
        proc = subprocess.run([sys.executable, script, "--side", side, "--model", a.model_path, f"--{count}", str(n),
                               "--batch-size", str(a.batch_size), "--max-length", str(a.max_length)],
                              capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
        if proc.returncode:
            raise SystemExit(f"{side} failed:\n{proc.stderr[-3000:]}")
        results[side] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{side}: {results[side]['seconds']:.1f} s, losses {results[side]['losses']}", file=sys.stderr)
    return a, results


def main() -> None:
    if (run := two_sides(__file__, _side, "pairs", 4, __doc__.split("\n\n")[0])) is None:
        return
    a, results = run
    model = a.model_path

    from bench.limits import matmul_gflops

    ours, trl = results["ours"], results["trl"]
    n_steps = min(len(ours["losses"]), len(trl["losses"]))
    out = {
        "pairs": a.pairs, "batch_size": a.batch_size, "model": a.model,
        "ours_s_per_pair": round(ours["seconds"] / a.pairs, 2),
        "trl_s_per_pair": round(trl["seconds"] / a.pairs, 2),
        "ratio": round(trl["seconds"] / ours["seconds"], 2),
        "max_abs_loss_diff": round(
            max((abs(x - y) for x, y in zip(ours["losses"], trl["losses"])), default=float("nan")), 4
        ),
        "steps_compared": n_steps,
        "peak_rss_mb": round(ours["peak_rss_mb"], 1), "trl_peak_rss_mb": round(trl["peak_rss_mb"], 1),
        "precision": ours["precision"], "trl_precision": trl["precision"],
    }
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    # Tokens a pair trains on: prompt + chosen and prompt + rejected (each side is its own sequence in TRL).
    tok = AutoTokenizer.from_pretrained(model)
    tokens = 0
    for p in cia_pairs(a.pairs):
        for side in ("chosen", "rejected"):
            msgs = [*p["prompt"], {"role": "assistant", "content": p[side]}]
            tokens += len(tok.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"])
    out["tokens_per_pair"] = round(tokens / a.pairs)
    with torch.device("meta"):
        meta_model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model))
        params = sum(x.numel() for x in meta_model.parameters())
    flops = 8 * params * tokens  # policy forward + backward (6) and reference forward (2) per token
    bound = matmul_gflops(torch.bfloat16 if ours["precision"] == "bf16" else torch.float32, seconds=1.0)
    out["ours_fraction_of_bound"] = round(flops / ours["seconds"] / 1e9 / bound, 3)
    out["bound_gflops"] = round(bound, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
