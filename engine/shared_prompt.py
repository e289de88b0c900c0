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

Used where it is exact and safe: no process group (DDP, FSDP and ZeRO need their own forward: gradient sync,
parameter gathering), a plain (or PEFT) decoder with no logit scaling or soft-capping, chosen and rejected
rows of a pair with the same prompt tokens. A batch that does not pack runs two rows per pair, still with
the head on the completion positions only (engine/completion_head.py); an unsupported model takes TRL's path.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch

from engine.completion_head import FIELDS, CompletionHeadModel, backbone_and_head, scored, supported

__all__ = ["FIELDS", "Packed", "SharedPromptModel", "branch_mask", "pack_pairs", "shared_prompt_forward",
           "supported"]


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


@contextmanager
def _branch_attention(backbone, packed: Packed):
    """For a batch of one pair on an SDPA model: the branch lengths for engine/branch_attention.py. Its
    attention is on where the caller switched it on (train_dpo, for the whole run), or switched on here for a
    forward without gradients (a reference pass); a forward with gradients outside such a run stays SDPA, since
    activation checkpointing recomputes it later, outside this call. Else nothing."""
    from engine import branch_attention as ba

    segments = packed.segments[0]
    counts = tuple(int((segments == s).sum()) for s in (0, 1, 2))
    on = backbone.config._attn_implementation == ba.NAME
    if (packed.segments.shape[0] != 1 or sum(counts) != segments.numel() or not ba.supported(backbone)
            or (not on and torch.is_grad_enabled())):
        yield {}
        return
    with nullcontext() if on else ba.branch_attention(backbone):
        yield {"selfrat_branches": counts}


def shared_prompt_forward(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                          pad_token_id: int = 0) -> Any | None:
    """What `model(input_ids=..., attention_mask=..., labels=labels, fused_lm_head=True)` returns under TRL's
    fused LM head (a FusedCausalLMOutput, same layout), computed one row per pair. None where the batch does
    not pack (the caller then runs its two rows)."""
    packed = pack_pairs(input_ids, attention_mask, (labels != -100).long(), pad_token_id)
    if packed is None:
        return None
    backbone, head, config = backbone_and_head(model)
    mask = branch_mask(packed.segments)
    if getattr(config, "_attn_implementation", "sdpa") == "eager":  # eager adds the mask to the scores
        dtype = torch.get_autocast_dtype(input_ids.device.type) if torch.is_autocast_enabled(
            input_ids.device.type) else head.weight.dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    with _branch_attention(backbone, packed) as extra:
        hidden = backbone(input_ids=packed.input_ids, attention_mask=mask, position_ids=packed.position_ids,
                          use_cache=False, **extra).last_hidden_state
    hidden = hidden.reshape(-1, hidden.size(-1))[packed.src]
    return scored(hidden, head, packed.targets, packed.dest)


class SharedPromptModel(CompletionHeadModel):
    """Stands in for the model in TRL's `_compute_loss` / `compute_ref_log_probs`: a fused-head call goes
    one row per pair; a batch that does not pack goes two rows per pair with the head on the completion
    positions only (engine/completion_head.py), and every other call to the model itself."""

    def __init__(self, model, pad_token_id: int = 0, autocast: Callable[[], Any] = nullcontext):
        super().__init__(model, autocast)
        self.pad_token_id = pad_token_id

    def _fused(self, labels: torch.Tensor, inputs: dict) -> Any:
        if set(inputs) <= {"input_ids", "attention_mask", "use_cache"} and "attention_mask" in inputs:
            out = shared_prompt_forward(self.model, inputs["input_ids"], inputs["attention_mask"], labels,
                                        self.pad_token_id)
            if out is not None:
                return out
        return super()._fused(labels, inputs)
