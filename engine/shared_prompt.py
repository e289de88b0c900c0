"""One forward per DPO pair: the prompt once, chosen and rejected as two branches over it.

TRL's DPO runs prompt+chosen and prompt+rejected as two rows, so a CIA pair (a ~1,250-token prompt, two
~180-token judgments) computes its prompt twice; and off Triton devices its fused LM head scores every
position, prompt included. Here each pair is one row

    prompt[:-1] | prompt[-1] chosen[:-1] | prompt[-1] rejected[:-1]

with position ids that restart each branch at the prompt's last position and a 4-D mask under which a
branch sees the shared prompt and itself only, so each branch token has exactly the context it has in
TRL's row; the LM head runs only on the positions that predict a completion token. The per-token fields
come back in TRL's layout (`(2B, L-1)`, zero off the completion), so TRL's loss code runs unchanged.
Same log-probs as the two rows (tests/test_shared_prompt.py), about half the tokens.

Used where it is exact and safe: one process (DDP, FSDP and ZeRO need their own forward: gradient sync,
parameter gathering), a plain (or PEFT) decoder with no logit scaling or soft-capping, chosen and rejected
rows of a pair with the same prompt tokens. Anything else takes TRL's own path.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch

# The fused head's per-token fields, in FusedCausalLMOutput's order after log_probs.
FIELDS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
# Config keys that change logits after the LM head (TRL's fused head applies them; this path does not).
_SCALED = ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


@dataclass
class Packed:
    input_ids: torch.Tensor  # (B, T): one row per pair
    position_ids: torch.Tensor  # (B, T)
    segments: torch.Tensor  # (B, T): 0 shared prompt, 1 chosen branch, 2 rejected branch, 3 padding
    src: torch.Tensor  # (N,): flat index into (B * T) of the hidden state predicting each completion token
    targets: torch.Tensor  # (N,): those tokens, in the row-major order of `dest`
    dest: torch.Tensor  # (2B, L-1) bool: where TRL's layout holds them (its shifted completion mask)


def _split(ids: torch.Tensor, real: torch.Tensor, completion: torch.Tensor) -> tuple[list[int], list[int]] | None:
    """(prompt ids, completion ids) of one right-padded row whose completion follows its prompt, else None."""
    n = int(real.sum())
    if not bool(real[:n].all()):
        return None
    comp = completion[:n].bool()
    p = int((~comp).sum())
    if bool(comp[:p].any()) or not bool(comp[p:].all()) or p == 0:
        return None
    row = ids[:n].tolist()
    return row[:p], row[p:]


def pack_pairs(input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor,
               pad_token_id: int = 0) -> Packed | None:
    """Pack TRL's preference batch (rows [chosen_0..chosen_B-1, rejected_0..rejected_B-1]) one row per pair.
    None when a pair's two rows do not share their prompt tokens (e.g. `truncation_mode: keep_end` cut them
    differently) or a row is not prompt-then-completion."""
    rows = input_ids.size(0)
    if rows % 2:
        return None
    b = rows // 2
    splits = [_split(input_ids[r], attention_mask[r], completion_mask[r]) for r in range(rows)]
    if any(s is None for s in splits):
        return None
    packed, positions, segments, starts = [], [], [], []
    for i in range(b):
        (prompt, chosen), (prompt_r, rejected) = splits[i], splits[i + b]
        if prompt != prompt_r:
            return None
        p = len(prompt)
        ids, pos, seg = list(prompt[:-1]), list(range(p - 1)), [0] * (p - 1)
        branch_starts = []
        for s, completion in ((1, chosen), (2, rejected)):
            # The branch feeds the prompt's last token and every completion token but the last: exactly the
            # positions whose next token is a completion token.
            branch = ([prompt[-1]] + completion[:-1]) if completion else []
            branch_starts.append(len(ids))
            ids += branch
            pos += range(p - 1, p - 1 + len(branch))
            seg += [s] * len(branch)
        packed.append(ids)
        positions.append(pos)
        segments.append(seg)
        starts.append(branch_starts)
    t = max(len(x) for x in packed)
    out_ids = torch.full((b, t), pad_token_id, dtype=input_ids.dtype)
    out_pos = torch.zeros((b, t), dtype=torch.long)
    out_seg = torch.full((b, t), 3, dtype=torch.long)
    for i in range(b):
        n = len(packed[i])
        out_ids[i, :n] = torch.tensor(packed[i], dtype=input_ids.dtype)
        out_pos[i, :n] = torch.tensor(positions[i])
        out_seg[i, :n] = torch.tensor(segments[i])
    src, targets = [], []
    for r in range(rows):  # row-major order of TRL's layout: every chosen row, then every rejected row
        i, side = (r, 0) if r < b else (r - b, 1)
        completion = splits[r][1]
        start = i * t + starts[i][side]
        src += range(start, start + len(completion))
        targets += completion
    dest = completion_mask[:, 1:].bool() & attention_mask[:, 1:].bool()
    device = input_ids.device
    return Packed(out_ids.to(device), out_pos.to(device), out_seg.to(device),
                  torch.tensor(src, dtype=torch.long, device=device),
                  torch.tensor(targets, dtype=torch.long, device=device), dest)


def branch_mask(segments: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool, True = may attend: causal, and a token sees the shared prompt and its own segment."""
    t = segments.size(1)
    causal = torch.ones(t, t, dtype=torch.bool, device=segments.device).tril()
    q, k = segments[:, :, None], segments[:, None, :]
    return (causal & ((k == 0) | (k == q)))[:, None]


def _backbone_and_head(model):
    from peft import PeftModel

    net = model.get_base_model() if isinstance(model, PeftModel) else model
    return net.base_model, net.get_output_embeddings(), net.config


def supported(model) -> bool:
    """Whether `model` can take this path (see the module docstring)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return False  # DDP / FSDP / ZeRO hook their own forward (gradient sync, parameter gathering)
    try:
        backbone, head, config = _backbone_and_head(model)
    except AttributeError:
        return False
    text = config.get_text_config()
    if any(getattr(text, key, None) not in (None, 1, 1.0) for key in _SCALED):
        return False
    if getattr(text, "output_router_logits", False) or head is None or backbone is model:
        return False
    return getattr(config, "_attn_implementation", "sdpa") in ("sdpa", "eager")


def shared_prompt_forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                          pad_token_id: int = 0) -> Any | None:
    """What `model(input_ids=..., attention_mask=..., labels=labels, fused_lm_head=True)` returns under TRL's
    fused LM head (a FusedCausalLMOutput, same layout), computed one row per pair. None where the batch does
    not pack (the caller then takes TRL's path)."""
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE, FusedCausalLMOutput

    packed = pack_pairs(input_ids, attention_mask, (labels != -100).long(), pad_token_id)
    if packed is None:
        return None
    backbone, head, config = _backbone_and_head(model)
    mask = branch_mask(packed.segments)
    if getattr(config, "_attn_implementation", "sdpa") == "eager":  # eager adds the mask to the scores
        dtype = torch.get_autocast_dtype(input_ids.device.type) if torch.is_autocast_enabled(
            input_ids.device.type) else head.weight.dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    hidden = backbone(input_ids=packed.input_ids, attention_mask=mask, position_ids=packed.position_ids,
                      use_cache=False).last_hidden_state
    hidden = hidden.reshape(-1, hidden.size(-1))[packed.src]
    per_token = ChunkedLogProbFunction.apply(hidden, head.weight, head.bias, packed.targets, 1.0,
                                             _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, FIELDS)
    dest = packed.dest

    def layout(x):
        return None if x is None else x.new_zeros(dest.shape).masked_scatter(dest, x)

    log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1 = (layout(x) for x in per_token)
    loss = -log_probs.sum() / dest.sum().clamp(min=1)
    return FusedCausalLMOutput(loss=loss, log_probs=log_probs, entropy=entropy, log_sum_sq_probs=log_sum_sq_probs,
                               mean_logits=mean_logits, is_top1=is_top1, label_mask=dest, aux_loss=None)


class SharedPromptModel:
    """Stands in for the model in TRL's `_compute_loss` / `compute_ref_log_probs`: a fused-head call goes
    one row per pair; every other call, and a batch that does not pack, goes to the model itself."""

    def __init__(self, model, pad_token_id: int = 0, autocast: Callable[[], Any] = nullcontext):
        # `autocast`: the mixed precision the model's own forward would run in. accelerate wraps `forward` in
        # it, and this path calls the decoder and the head directly, around that wrapper.
        self.model, self.pad_token_id, self.autocast = model, pad_token_id, autocast

    def __call__(self, *args, fused_lm_head: bool = False, labels=None, **kwargs):
        extra = set(kwargs) - {"input_ids", "attention_mask", "use_cache"}
        if fused_lm_head and not args and not extra and labels is not None:
            with self.autocast():
                out = shared_prompt_forward(self.model, kwargs["input_ids"], kwargs["attention_mask"], labels,
                                            self.pad_token_id)
            if out is not None:
                return out
        return self.model(*args, fused_lm_head=fused_lm_head, labels=labels, **kwargs)

    def __getattr__(self, name):
        return getattr(self.model, name)
