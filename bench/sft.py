"""Benchmark: the seed SFT on CIA-length examples, our `train_sft` against TRL's SFTTrainer on the same setup.

    python bench/sft.py                        # embedded SmolLM2, 6 examples (about 4 minutes on 2 cores)
    python bench/sft.py --examples 8 --batch-size 4 --model /path/to/checkpoint

Examples: the first CIA graded responses (../shared/data/cia) as `sft_examples` makes them: the Prometheus
absolute prompt (about 1,000-1,500 tokens with its rubric and reference answer) and the gold feedback with the
gold score as the completion. Both sides train the same model on the same examples, one epoch, same seed,
learning rate, precision (`precision: auto`), micro-batches of one example accumulated to `--batch-size`,
activation checkpointing and completion-only loss, each in its own process. So the one difference is
ours scoring only the completion positions with the LM head (engine/completion_head.py), where TRL's fused
head scores every position off Triton devices. The last line is one JSON object: ours_s_per_example,
trl_s_per_example, ratio, max_abs_loss_diff (per optimizer step), peak_rss_mb, trl_peak_rss_mb, precision,
tokens_per_example.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from bench.dpo import CIA, two_sides  # noqa: E402


def cia_examples(n: int) -> list[dict]:
    from engine.importers import read_items
    from engine.training import sft_examples

    items = read_items(str(CIA), dataset="bench", preset="cia", on_conflict="drop").items
    return sft_examples(items.head(n))


def _side(side: str, model: str, n: int, batch_size: int, max_length: int, out: Path) -> dict:
    """One side's run, in this process: seconds, per-step losses, precision."""
    import trl

    from engine.config import SFTConfig
    from engine.training import train_sft

    examples = cia_examples(n)
    cfg = SFTConfig(dataset="bench", batch_size=batch_size, max_length=max_length, learning_rate=1e-4, epochs=1)
    if side == "trl":  # the stage exactly as it runs, with TRL's own SFTTrainer in place of ours
        import engine.completion_head as ch

        ch.supported = lambda model: False
    losses: list[float] = []
    t0 = time.perf_counter()
    train_sft(model_path=model, examples=examples, cfg=cfg, out_dir=out, device="auto",
              log=lambda line: losses.append(float(line.split(" loss=")[1].split()[0]))
              if line.startswith("step ") else None)
    seconds = time.perf_counter() - t0
    precision = json.loads((out / "selfrat_checkpoint.json").read_text())["precision"]
    return {"seconds": seconds, "losses": losses, "precision": precision, "trl": trl.__version__,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    if (run := two_sides(__file__, _side, "examples", 6, __doc__.split("\n\n")[0])) is None:
        return
    a, results = run
    model = a.model_path

    from transformers import AutoTokenizer

    ours, base = results["ours"], results["trl"]
    tok = AutoTokenizer.from_pretrained(model)
    tokens = sum(len(tok.apply_chat_template([*ex["prompt"], {"role": "assistant", "content": ex["completion"]}],
                                             tokenize=True, return_dict=True)["input_ids"])
                 for ex in cia_examples(a.examples))
    print(json.dumps({
        "examples": a.examples, "batch_size": a.batch_size, "model": a.model,
        "ours_s_per_example": round(ours["seconds"] / a.examples, 2),
        "trl_s_per_example": round(base["seconds"] / a.examples, 2),
        "ratio": round(base["seconds"] / ours["seconds"], 2),
        "max_abs_loss_diff": round(max((abs(x - y) for x, y in zip(ours["losses"], base["losses"])),
                                       default=float("nan")), 5),
        "steps_compared": min(len(ours["losses"]), len(base["losses"])),
        "peak_rss_mb": round(ours["peak_rss_mb"], 1), "trl_peak_rss_mb": round(base["peak_rss_mb"], 1),
        "precision": ours["precision"], "trl": ours["trl"], "tokens_per_example": round(tokens / a.examples),
    }))


if __name__ == "__main__":
    main()
