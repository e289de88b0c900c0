"""Sample judgments for a list of (item, side) requests and store them batch by batch.

One code path serves training samples (N per item at temperature ~1) and evaluation (greedy by default).
Each batch is written in one transaction right after it is generated, and requests whose judgments are
already stored are skipped, so a stage killed half-way resumes without duplicates or gaps. Seeds derive
from (base seed, item, side, sample index), so a resumed judgment is drawn with the seed it would have had.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from tqdm import tqdm

from engine.sampling import Sampler, SamplingParams, judgment_seed
from store import Store, judgment_id


@dataclass(frozen=True)
class JudgeRequest:
    item_id: str
    side: str                 # "a" = response, "b" = response_b of a pairwise item; relative (A/B) judging:
                              # "ab" (A = response) or "ba" (A = response_b), see engine.relative
    messages: list[dict]


def _five(probs: Sequence[float] | None) -> list[float | None]:
    """p1..p5: P(1..5), or P(A), P(B) then nulls for a relative judgment, or all null without probabilities."""
    probs = list(probs or [])
    return probs + [None] * (5 - len(probs))


def sample_and_store(
    store: Store, sampler: Sampler, requests: Sequence[JudgeRequest], *, run_id: str, iteration: int,
    purpose: str, n: int, params: SamplingParams, base_seed: int, batch_size: int,
    progress: Callable[[int, int], None] | None = None,
) -> int:
    """Generate the missing judgments of `requests` (n each); returns how many were written.

    Relative mode (``params.mode == "relative"``) stores the verdict A/B in ``verdict`` and P(A), P(B) in
    p1, p2 (p3..p5 null); ``score`` is null."""
    have = store.judgment_keys(run_id, iteration, purpose)
    # Group requests by which sample indices are missing, so one generate() call shares one n.
    todo: dict[tuple[int, ...], list[JudgeRequest]] = defaultdict(list)
    for req in requests:
        missing = tuple(j for j in range(n) if (req.item_id, req.side, j) not in have)
        if missing:
            todo[missing].append(req)
    total = len(requests)
    done = total - sum(len(v) for v in todo.values())
    written = 0
    if progress:
        progress(done, total)
    bar = tqdm(total=total, initial=done, desc=f"{purpose} judgments (iteration {iteration})", unit="item",
               disable=not sys.stderr.isatty())
    for indices, reqs in todo.items():
        # Batches of similar prompt length waste less on left padding. Each judgment has its own seed, so the
        # order changes no draw.
        reqs = sorted(reqs, key=lambda r: sum(len(m["content"]) for m in r.messages))
        for start in range(0, len(reqs), batch_size):
            batch = reqs[start:start + batch_size]
            seeds = [[judgment_seed(base_seed, f"{r.item_id}/{r.side}", j) for j in indices] for r in batch]
            t0 = time.perf_counter()
            samples = sampler.generate([r.messages for r in batch], len(indices), params, seeds)
            elapsed = time.perf_counter() - t0
            rows = []
            for req, per_item in zip(batch, samples):
                for j, s in zip(indices, per_item):
                    probs = _five(s.score_probs)
                    rows.append({
                        "judgment_id": judgment_id(run_id, iteration, purpose, req.item_id, req.side, j),
                        "run_id": run_id, "iteration": iteration, "purpose": purpose, "item_id": req.item_id,
                        "side": req.side, "sample_index": j, "model": sampler.model_name,
                        "temperature": params.temperature, "top_p": params.top_p,
                        "max_new_tokens": params.max_new_tokens, "seed": s.seed, "raw_text": s.raw_text,
                        "text": s.text, "rationale": s.rationale, "score": s.score, "parse_status": s.parse_status,
                        "forced": s.forced, **{f"p{k + 1}": probs[k] for k in range(5)},
                        "prompt_tokens": s.prompt_tokens, "completion_tokens": s.completion_tokens,
                        "latency_s": s.latency_s if s.latency_s is not None else elapsed / max(1, len(batch)),
                        "verdict": s.verdict, "precision": getattr(sampler, "precision", None),
                        "ref_logp": s.ref_logp, "ref_tokens": s.ref_tokens,
                    })
            written += store.insert_judgments(rows)
            done += len(batch)
            bar.update(len(batch))
            if progress:
                progress(done, total)
    bar.close()
    return written
