"""Attention of one packed DPO pair (engine/shared_prompt.py) in three parts, each as small as it can be.

A packed pair is one row `prompt | chosen branch | rejected branch` under a 4-D mask: causal, and a branch
sees the prompt and itself only. With an explicit mask torch's CPU flash kernel computes every query x key
block of the row, so a CIA pair (~1,250 prompt and two ~180-token branches) pays for ~1,620^2 scores, half of
them masked. Here the row's attention is three SDPA calls:

    prompt:    its queries over its own keys, causal (no mask: the kernel skips the upper triangle)   P^2/2
    chosen:    its queries over the prompt's keys and its own, a [C, P+C] mask                         C(P+C)
    rejected:  likewise over the prompt's keys and its own                                              R(P+R)

about half the scores, the same attention (tests/test_branch_attention.py). It runs for a row that carries
its branch lengths (`selfrat_branches`, which transformers passes down to the attention); every other call
is transformers' SDPA. train_dpo switches the model to it for the training run (the activation checkpointing
recompute happens in the backward pass, outside any one forward).
"""

from __future__ import annotations

import torch

NAME = "selfrat_branches"


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
              selfrat_branches: tuple[int, int, int] | None = None, **kwargs):
    """transformers' attention interface: query [1, H, P+C+R, D]; key, value [1, Hkv, P+C+R, D]; returns
    ([1, P+C+R, H, D], None) as SDPA does."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def sdpa(q, k, v, mask, causal):
        return sdpa_attention_forward(module, q, k, v, mask, dropout=dropout, scaling=scaling, is_causal=causal,
                                      **kwargs)[0]

    if selfrat_branches is None or query.shape[0] != 1 or sum(selfrat_branches) != query.shape[2]:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    p, c, r = selfrat_branches
    parts = [sdpa(query[:, :, :p], key[:, :, :p], value[:, :, :p], None, True)]
    for start, n in ((p, c), (p + c, r)):
        if n == 0:
            continue
        own = slice(start, start + n)
        k = torch.cat([key[:, :, :p], key[:, :, own]], dim=2)
        v = torch.cat([value[:, :, :p], value[:, :, own]], dim=2)
        mask = torch.ones(n, p + n, dtype=torch.bool, device=query.device)
        mask[:, p:] = torch.ones(n, n, dtype=torch.bool, device=query.device).tril()
        parts.append(sdpa(query[:, :, own], k, v, mask[None, None], False))
    return torch.cat(parts, dim=1), None


def supported(model) -> bool:
    """An SDPA model (or one already switched to this) with plain full-attention layers."""
    from engine.cascade import plain_sdpa

    return plain_sdpa(model, also=(NAME,))


def branch_attention(model):
    """Within: `model`'s attention is this module's (SDPA for every call without `selfrat_branches`)."""
    from engine.cascade import switched_attention

    return switched_attention(model, NAME, attention)
