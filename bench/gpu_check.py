"""GPU check: one prepared run on a single CUDA GPU (sized for one H200 machine: at most ~8 minutes, no
network, what it needs carried in at most 64 MiB). The last line of output is one JSON object of figures.

    python bench/gpu_check.py --dry-run          # the plan, on any machine (CPU): builds the tokenizer, checks
                                                 # the imports and the model size on the meta device, nothing else
    python bench/gpu_check.py --out DIR          # the check (CUDA); figures also in DIR/gpu_check.json
    python bench/gpu_check.py --cpu-smoke        # the same code path on CPU with a tiny model (ddp only), to
                                                 # catch mistakes before spending GPU time

What it runs, each phase timed and guarded (a failing phase is recorded in "errors", the others still run):

1. build   a randomly initialised Llama from a config, no download (hidden 2048, 16 layers, 16 heads / 8 KV
           heads, MLP 5632, vocab 32000: ~0.9B parameters) with a word-level tokenizer made here from the judge
           prompts' words (ChatML template, digits and "[RESULT]" as single tokens), saved in bf16;
2. sample  the transformers backend (engine.sampling.TransformersSampler) on cuda in bf16: generated tok/s for
           --prompts judge prompts x --n samples of --max-new-tokens (score forcing on);
3. sft     engine.training.train_sft in bf16 (autocast over fp32 master weights): s/step and peak GiB;
4. dpo     engine.training.train_dpo in bf16 (reference: a frozen policy copy): s/step and peak GiB;
5. launch  train_dpo through accelerate (engine.distributed) with one process per strategy that runs on one
           GPU: ddp x 1 and fsdp x 1 (zero3 needs >= 2 processes and the deepspeed package): wall s, steps, the
           loss lines rank 0 sent back;
6. qlora   train_dpo with qlora: true, only when bitsandbytes is importable there (it is not in the image).

The machine (nvidia-h200 kind) has torch 2.11 (CUDA), transformers 5.17, accelerate 1.15, peft, pandas,
pyarrow, tensorboard, but not trl, datasets, pydantic, polars or duckdb. Carry these wheels (pip download
--no-deps, Python 3.12, manylinux x86_64; ~19 MiB together), installed there with --no-deps into a folder on
PYTHONPATH: transformers 5.24.0 and accelerate 1.16.0 / peft 0.21.2 (the versions the code is written
against), trl 1.16.0, datasets 5.2.0, dill, multiprocess, pydantic, pydantic-core, annotated-types,
typing-inspection. polars (54 MiB runtime) and duckdb (25 MiB) do not fit: the training path needs only
`store.errors` and `store.store.RUBRIC_KEYS`, so without them the check writes a stand-in `store` package (the
real errors module, the constant read from store/store.py) first on PYTHONPATH, for itself and the ranks.
vLLM cannot be carried (its wheel is far over 64 MiB): its backend is not part of this check.

    pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \\
        --platform manylinux_2_28_x86_64 -d .gpu-wheels $(python bench/gpu_check.py --print-wheels)
    # on the GPU machine (carry .gpu-wheels):
    python3 -m pip install -q --no-deps --no-index --target /tmp/gpuw .gpu-wheels/*.whl
    PYTHONPATH=/tmp/gpuw python3 bench/gpu_check.py --out $OUT
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

# What the check machine lacks (or has in another version), pinned to what this code runs with here.
WHEELS = [
    "transformers==5.24.0", "accelerate==1.16.0", "peft==0.21.2", "trl==1.16.0", "datasets==5.2.0",
    "dill==0.4.1", "multiprocess==0.70.19", "pydantic==2.14.4", "pydantic-core==2.50.5", "annotated-types==0.8.0",
    "typing-inspection==0.4.5",
]
# A Llama of realistic width (TinyLlama-like: hidden 2048, MLP 5632, head dim 128, GQA), fewer layers.
MODEL = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16, num_attention_heads=16,
             num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096, tie_word_embeddings=False,
             rope_theta=10000.0)
SPECIALS = ["<unk>", "<pad>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# ------------------------------------------------------------------ environment


def stand_in_store(work: Path, force: bool = False) -> Path | None:
    """Without polars / duckdb (too large to carry), a `store` package holding just what the training path
    imports, written to work/stubs and put first on sys.path and PYTHONPATH (the accelerate ranks too)."""
    if not force and all(importlib.util.find_spec(m) is not None for m in ("polars", "duckdb")):
        return None
    stubs = work / "stubs"
    pkg = stubs / "store"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text('"""Stand-in for bench/gpu_check.py: errors and RUBRIC_KEYS only."""\n')
    shutil.copy(ROOT / "store" / "errors.py", pkg / "errors.py")
    tree = ast.parse((ROOT / "store" / "store.py").read_text())
    node = next(n for n in tree.body if isinstance(n, ast.Assign)
                and any(getattr(t, "id", None) == "RUBRIC_KEYS" for t in n.targets))
    value = eval(compile(ast.Expression(node.value), "store/store.py", "eval"), {})  # our own constant
    (pkg / "store.py").write_text(f"RUBRIC_KEYS = {tuple(value)!r}\n")
    sys.path.insert(0, str(stubs))
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(stubs), os.environ.get("PYTHONPATH")) if p)
    return stubs


def demo_items() -> list[dict]:
    with open(ROOT / "engine" / "data" / "demo.jsonl") as f:
        return [json.loads(line) for line in f if line.strip()]


def build_tokenizer(items: list[dict]):
    """A word-level tokenizer of exactly MODEL['vocab_size'] tokens: ChatML specials, every word of the judge
    prompts and gold judgments (so prompts tokenize without <unk>), then filler words. Every id decodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from engine.prompts import absolute_messages, format_judgment

    pre = pre_tokenizers.Whitespace()
    words: dict[str, None] = dict.fromkeys(["system", "user", "assistant", "[", "RESULT", "]", "1", "2", "3",
                                            "4", "5", "A", "B"])
    for item in items:
        texts = [m["content"] for m in absolute_messages(item)]
        texts.append(format_judgment(item["gold_feedback"], int(item["gold_score"])))
        for text in texts:
            words.update(dict.fromkeys(w for w, _ in pre.pre_tokenize_str(text)))
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for w in words:
        vocab.setdefault(w, len(vocab))
    i = 0
    while len(vocab) < MODEL["vocab_size"]:
        vocab.setdefault(f"w{i}", len(vocab))
        i += 1
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.add_special_tokens(SPECIALS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<|im_end|>", chat_template=CHAT_TEMPLATE)


def model_config(tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(**MODEL, bos_token_id=tokenizer.convert_tokens_to_ids("<|im_start|>"),
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


def examples(items: list[dict], k: int) -> tuple[list[dict], list[dict]]:
    """k SFT examples (gold judgments) and k DPO pairs (gold judgment vs another item's, misscored)."""
    from engine.prompts import absolute_messages, format_judgment

    usable = [it for it in items if it.get("gold_feedback") and it.get("gold_score") is not None][:k]
    sft, pairs = [], []
    for i, it in enumerate(usable):
        gold = int(it["gold_score"])
        chosen = format_judgment(it["gold_feedback"], gold)
        other = usable[(i + 1) % len(usable)]
        rejected = format_judgment(other["gold_feedback"], 1 if gold >= 3 else 5)
        sft.append({"prompt": absolute_messages(it), "completion": chosen})
        pairs.append({"prompt": absolute_messages(it), "chosen": chosen, "rejected": rejected})
    return sft, pairs


# ------------------------------------------------------------------ the plan


def plan(args) -> dict:
    return {
        "model": {**MODEL, "dtype_saved": "bf16"},
        "phases": [
            "build: random Llama from config + word-level tokenizer (no download)",
            f"sample: TransformersSampler cuda bf16, {args.prompts} prompts x n={args.n}, "
            f"{args.max_new_tokens} new tokens, force_score",
            f"sft: train_sft bf16, {args.steps} steps x batch {args.batch}, max_length {args.max_length}",
            f"dpo: train_dpo bf16, {args.steps} steps x batch {args.batch}, max_length {args.max_length}",
            "launch: train_dpo via accelerate, ddp x 1 and fsdp x 1",
            "qlora: train_dpo qlora (only if bitsandbytes is importable)",
        ],
        "budget_s": args.budget_s,
        "wheels": WHEELS,
        "not_carried": ["vllm (wheel far over 64 MiB)", "polars, duckdb (stand-in store package instead)",
                        "bitsandbytes, deepspeed (not in the image: qlora / zero3 are skipped)"],
    }


def dry_run(args) -> dict:
    """The plan, plus what can be checked on CPU: the imports, the tokenizer (score tokens, chat template) and
    the model's parameter count on the meta device."""
    import torch
    from transformers import LlamaForCausalLM

    from engine.sampling import find_score_tokens

    out = plan(args)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_dry_"))
    try:
        out["stand_in_store"] = stand_in_store(work) is not None
        missing = [m for m in ("trl", "datasets", "pydantic", "accelerate", "peft", "transformers")
                   if importlib.util.find_spec(m) is None]
        out["missing_here"] = missing
        items = demo_items()
        tok = build_tokenizer(items)
        st = find_score_tokens(tok)
        sft, pairs = examples(items, args.steps * args.batch)
        prompt_ids = tok.apply_chat_template(sft[0]["prompt"], add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"]
        with torch.device("meta"):
            n_params = sum(p.numel() for p in LlamaForCausalLM(model_config(tok)).parameters())
        out.update(tokenizer={"vocab": len(tok), "marker_ids": list(st.marker_ids), "score_ids": list(st.score_ids),
                              "prompt_tokens": len(prompt_ids),
                              "unk_in_prompt": sum(i == tok.unk_token_id for i in prompt_ids)},
                   params_b=round(n_params / 1e9, 3), examples=len(sft), pairs=len(pairs))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


# ------------------------------------------------------------------ the check


def _peak_gib() -> float:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else 0.0


def _reset_peak() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def check(args) -> dict:
    import torch

    figures: dict = {"errors": {}, "phase_s": {}}
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    figures["stand_in_store"] = stand_in_store(work, force=args.stand_in_store) is not None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    device, precision = ("cpu", "fp32") if args.cpu_smoke else ("cuda", "bf16")
    figures.update(gpu=torch.cuda.get_device_name(0) if device == "cuda" else "none (--cpu-smoke)",
                   torch=torch.__version__, python=platform.python_version(), device=device, precision=precision)
    import accelerate
    import transformers
    import trl

    figures.update(transformers=transformers.__version__, trl=trl.__version__, accelerate=accelerate.__version__)
    items = demo_items()
    state: dict = {}

    def phase(name: str, fn) -> None:
        left = args.budget_s - (time.monotonic() - started)
        if left < 30:
            figures["errors"][name] = f"skipped: {left:.0f}s of the budget left"
            return
        t0 = time.monotonic()
        try:
            fn()
        except Exception as e:  # recorded; the other phases still run
            figures["errors"][name] = f"{type(e).__name__}: {e}"[:600]
            traceback.print_exc()
        figures["phase_s"][name] = round(time.monotonic() - t0, 1)
        print(f"[gpu_check] {name}: {figures['phase_s'][name]}s", flush=True)

    def build():
        from transformers import LlamaForCausalLM

        tok = build_tokenizer(items)
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(model_config(tok)).to(torch.bfloat16)
        figures["params_b"] = round(sum(p.numel() for p in model.parameters()) / 1e9, 3)
        path = work / "model"
        model.save_pretrained(path)
        tok.save_pretrained(path)
        del model
        state["model"] = str(path)

    def sample():
        from engine.sampling import SamplingParams, TransformersSampler

        _reset_peak()
        sampler = TransformersSampler(state["model"], device=device, precision=precision)
        prompts = [[*m] for m in (ex["prompt"] for ex in examples(items, args.prompts)[0])]
        params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=args.max_new_tokens, force_score=True)
        seeds = [[1000 * i + j for j in range(args.n)] for i in range(len(prompts))]
        sampler.generate(prompts[:1], 1, params, [[0]])  # warm-up (kernels, allocator)
        _sync()
        t0 = time.perf_counter()
        out = sampler.generate(prompts, args.n, params, seeds)
        _sync()
        wall = time.perf_counter() - t0
        tokens = sum(s.completion_tokens for row in out for s in row)
        figures["sample"] = {"prompts": len(prompts), "n": args.n, "max_new_tokens": args.max_new_tokens,
                             "generated_tokens": tokens, "wall_s": round(wall, 2), "tok_s": round(tokens / wall, 1),
                             "prompt_tokens": out[0][0].prompt_tokens, "peak_gib": _peak_gib()}
        del sampler

    def train(kind: str, cfg_over: dict, distributed: dict | None = None, key: str | None = None):
        from engine.config import SFTConfig, TrainingConfig
        from engine.training import train_dpo, train_sft

        _reset_peak()
        sft, pairs = examples(items, args.steps * args.batch)
        lines: list[str] = []
        out_dir = work / f"ckpt-{key or kind}"
        common = dict(batch_size=args.batch, max_length=args.max_length, learning_rate=1e-5, epochs=1.0,
                      precision=precision, **cfg_over)
        t0 = time.perf_counter()
        if kind == "sft":
            metrics = train_sft(model_path=state["model"], examples=sft, cfg=SFTConfig(dataset="demo", **common),
                                out_dir=out_dir, device=device, log=lines.append)
        else:
            cfg = TrainingConfig(**common, distributed=distributed)
            metrics = train_dpo(policy_path=state["model"], reference_path=None, pairs=pairs, cfg=cfg,
                                out_dir=out_dir, device=device, log=lines.append, work_dir=work / f"launch-{key}")
        wall = time.perf_counter() - t0
        prefix = "sft/" if kind == "sft" else "train/"
        steps = metrics[f"{prefix}steps"]
        figures[key or kind] = {
            "steps": steps, "wall_s": round(wall, 1), "train_runtime_s": round(metrics[f"{prefix}runtime_s"], 2),
            "s_per_step": round(metrics[f"{prefix}runtime_s"] / max(steps, 1), 3),
            "loss": round(metrics[f"{prefix}loss"], 4),
            "loss_lines": sum(line.startswith("step ") for line in lines),
            # peak of this process: the in-process phases only (a launch trains in its ranks)
            **({"peak_gib": _peak_gib()} if distributed is None else {}),
            "finite": all(math.isfinite(v) for v in metrics.values()),
        }
        shutil.rmtree(out_dir, ignore_errors=True)

    phase("build", build)
    if "model" in state:
        phase("sample", sample)
        phase("sft", lambda: train("sft", {}))
        phase("dpo", lambda: train("dpo", {}))
        for strategy in ("ddp",) if args.cpu_smoke else ("ddp", "fsdp"):
            phase(f"accelerate_{strategy}", lambda s=strategy: train(
                "dpo", {}, distributed={"num_processes": 1, "strategy": s}, key=f"accelerate_{s}"))
        if importlib.util.find_spec("bitsandbytes") is not None:
            phase("qlora", lambda: train("dpo", {"qlora": True}, key="qlora"))
        else:
            figures["errors"]["qlora"] = "skipped: bitsandbytes is not installed"
    figures["total_s"] = round(time.monotonic() - started, 1)
    shutil.rmtree(work, ignore_errors=True)
    return figures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="print the plan and check what a CPU can (no GPU work)")
    p.add_argument("--print-wheels", action="store_true", help="the wheels to carry, one per argument")
    p.add_argument("--out", type=Path, help="also write the figures to OUT/gpu_check.json")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per training phase")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--budget-s", type=float, default=450, help="phases are skipped once less than 30 s is left")
    p.add_argument("--cpu-smoke", action="store_true", help="run the check's code path on CPU, tiny model")
    p.add_argument("--stand-in-store", action="store_true", help="use the stand-in store package even where "
                   "polars and duckdb are installed (to test it)")
    args = p.parse_args(argv)
    if args.cpu_smoke:  # a tiny model of the same shape family; the vocabulary stays (the tokenizer fills it)
        MODEL.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2)
    if args.print_wheels:
        print(" ".join(WHEELS))
        return 0
    if args.dry_run:
        result = dry_run(args)
    else:
        import torch

        if not args.cpu_smoke and not torch.cuda.is_available():
            print("gpu_check: no CUDA device here; use --dry-run for the plan", file=sys.stderr)
            return 2
        result = check(args)
    line = json.dumps(result, sort_keys=True)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / ("gpu_check_plan.json" if args.dry_run else "gpu_check.json")).write_text(line + "\n")
    print(line)
    return 1 if result.get("errors") and not args.dry_run and "build" in result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
