"""The LM head only where a label is: TRL's fused-head call, scoring just the positions that predict a
completion token.

TRL's fused LM head (`model(..., labels=labels, fused_lm_head=True)`) scores only the labelled positions on
Triton devices; elsewhere, the CPU included, it scores every position, prompt included (so that compilers which
recompile per shape see fixed tiles). A seed SFT example is a ~1,250-token judge prompt and a ~150-token
judgment, so on CPU most of the head's work, and of its per-token entropy and top-1 passes, is thrown away.
`CompletionHeadModel` stands in for the model in TRL's `compute_loss`: a fused-head call runs the decoder,
then the head on the labelled positions only, and hands back TRL's `FusedCausalLMOutput` in its layout (zero
off the labels), so TRL's loss and metrics code runs unchanged. Same fields and gradients as TRL's head
(tests/test_completion_head.py); bench/sft.py measures the step.

Used where it is exact and safe: no process group (DDP, FSDP and ZeRO hook their own forward), a plain (or PEFT)
decoder with no logit scaling or soft-capping. Anything else takes TRL's own path.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable

import torch

# The fused head's per-token fields, in FusedCausalLMOutput's order after log_probs.
FIELDS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
# Config keys that change logits after the LM head (TRL's fused head applies them; this path does not).
_SCALED = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
# Keyword arguments a fused-head call may carry here; any other (shift_labels under sequence parallelism,
# router logits, pixel values ...) goes to TRL's head.
_PLAIN_KWARGS = {"input_ids", "attention_mask", "position_ids", "use_cache"}


def backbone_and_head(model):
    """(decoder, LM head, config) of a causal LM or a PEFT model around one."""
    from peft import PeftModel

    net = model.get_base_model() if isinstance(model, PeftModel) else model
    return net.base_model, net.get_output_embeddings(), net.config


def supported(model) -> bool:
    """Whether `model` can take this path (see the module docstring)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        # DDP / FSDP / ZeRO hook their own forward (gradient sync, parameter gathering), one rank included
        return False
    try:
        backbone, head, config = backbone_and_head(model)
    except AttributeError:
        return False
    text = config.get_text_config()
    if any(getattr(text, key, None) not in (None, 1, 1.0) for key in _SCALED):
        return False
    if getattr(text, "output_router_logits", False) or head is None or backbone is model:
        return False
    from engine.branch_attention import NAME as BRANCHES  # SDPA for all but packed pairs, switched on by train_dpo

    return getattr(config, "_attn_implementation", "sdpa") in ("sdpa", "eager", BRANCHES)


def scored(hidden: torch.Tensor, head, targets: torch.Tensor, dest: torch.Tensor) -> Any:
    """TRL's `FusedCausalLMOutput` from the hidden states that predict `targets` only.

    hidden: (N, H), row i predicts targets[i]; dest: bool, N True entries, where TRL's layout holds them in
    row-major order. The loss is TRL's: minus the mean log-prob over the N tokens."""
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, FusedCausalLMOutput

    per_token = ChunkedLogProbFunction.apply(hidden, head.weight, head.bias, targets, 1.0,
                                             _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, FIELDS)

    def layout(x):
        # masked_scatter keeps an all-masked batch connected to the model (a differentiable zero)
        return None if x is None else x.new_zeros(dest.shape).masked_scatter(dest, x)

    log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1 = (layout(x) for x in per_token)
    loss = -log_probs.sum() / dest.sum().clamp(min=1)
    return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, log_sum_sq_probs=log_sum_sq_probs,
                               mean_logits=mean_logits, is_top1=is_top1, label_mask=dest, aux_loss=None)


def completion_forward(model, labels: torch.Tensor, **inputs) -> Any:
    """What `model(**inputs, labels=labels, fused_lm_head=True)` returns under TRL's fused head (labels shifted
    by one inside, as there), with the head run on the positions whose next-token label is not -100 only."""
    backbone, head, _ = backbone_and_head(model)
    hidden = backbone(**{**inputs, "use_cache": False}).last_hidden_state[:, :-1]
    labels = labels[:, 1:]
    dest = labels != -100
    return scored(hidden[dest], head, labels[dest], dest)


class CompletionHeadModel:
    """Stands in for the model in TRL's `compute_loss`: a fused-head call scores the labelled positions only;
    every other call goes to the model itself."""

    def __init__(self, model, autocast: Callable[[], Any] = nullcontext):
        # `autocast`: the mixed precision the model's own forward would run in. accelerate wraps `forward` in
        # it, and this path calls the decoder and the head directly, around that wrapper.
        self.model, self.autocast = model, autocast

    def _fused(self, labels: torch.Tensor, inputs: dict) -> Any:
        """The fused-head output of a call this path takes (engine/shared_prompt.py packs pairs first)."""
        return completion_forward(self.model, labels, **inputs)

    def __call__(self, *args, fused_lm_head: bool = False, labels=None, **kwargs):
        if fused_lm_head and not args and labels is not None and set(kwargs) <= _PLAIN_KWARGS:
            with self.autocast():
                return self._fused(labels, kwargs)
        return self.model(*args, fused_lm_head=fused_lm_head, labels=labels, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)
