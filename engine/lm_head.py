"""The last position's logits for a decode loop, with the LM head laid out for the machine's BLAS.

A decode step multiplies R hidden rows (R = live judgments, 1 to ~40) by the (vocab x hidden) head. Through
``F.linear`` that is MKL's ``x @ W^T``; for SmolLM2's 49,152 x 576 head on an AVX2 EPYC it reads the weights at
~3 GB/s at R = 8 (36 ms, a fifth of a greedy decode step), while the same product asked as ``(W @ x^T)^T``
streams them at ~8 GB/s (14 ms). Which layout wins depends on the CPU, the BLAS and the dtype (bf16 goes
through oneDNN), so ``choose_layout`` times both once on the loaded head rather than assuming one.
`bench/decode_options.py --option head` measures the effect on whole greedy judgments.

Only where it is the same computation: a plain decoder (backbone + bias-free linear head, no logit scaling or
soft-capping, see engine/shared_prompt.py) on CPU. Elsewhere the model's own forward runs.
"""

from __future__ import annotations

import time
from typing import Literal

import torch

Layout = Literal["linear", "transposed"]
LAYOUTS: tuple[Layout, ...] = ("linear", "transposed")


def head_logits(weight: torch.Tensor, hidden: torch.Tensor, layout: Layout) -> torch.Tensor:
    """hidden [R, H] -> logits [R, V] in the head's dtype: `hidden @ weight.T` in the given layout."""
    if layout == "transposed":
        return (weight @ hidden.t()).t()
    return torch.nn.functional.linear(hidden, weight)


def plain_head(model) -> tuple[torch.nn.Module, torch.Tensor] | None:
    """(backbone, head weight) where `model(...).logits` is exactly `backbone(...) @ weight.T`, else None."""
    from engine.completion_head import backbone_and_head, supported

    try:
        if not supported(model):
            return None
        backbone, head, _config = backbone_and_head(model)
    except (AttributeError, ImportError):
        return None
    if type(head) is not torch.nn.Linear or head.bias is not None or head.weight.device.type != "cpu":
        return None
    return backbone, head.weight


@torch.inference_mode()
def choose_layout(weight: torch.Tensor, rows: int = 8, repeats: int = 3) -> Layout:
    """The faster layout for `rows` hidden rows on this machine: the best of `repeats` timings each,
    interleaved; "transposed" only when it is at least 10% faster (a tie keeps the usual call)."""
    hidden = torch.randn(rows, weight.shape[1], dtype=weight.dtype, device=weight.device)
    best = {layout: float("inf") for layout in LAYOUTS}
    for layout in LAYOUTS:  # first calls pay one-off kernel selection
        head_logits(weight, hidden, layout)
    for _ in range(repeats):
        for layout in LAYOUTS:
            t = time.perf_counter()
            head_logits(weight, hidden, layout)
            best[layout] = min(best[layout], time.perf_counter() - t)
    return "transposed" if best["transposed"] < 0.9 * best["linear"] else "linear"
