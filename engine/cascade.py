"""Decode attention for N samples of one prompt: the prompt's keys and values read once per prompt.

The sampler draws N judgments per prompt from one prefill. Repeating the prompt's KV cache to the N rows
(``batch_repeat_interleave``) makes every decode step read it N times: at 8 prompts x 5 samples over ~740
tokens that is 1.4 GB a step, and on 2 CPU cores attention took about half of the step. Here the prompt's
cache stays one row per prompt and each row's own tokens go to a small cache of their own; a layer's
attention is computed in two parts, merged by their softmax normalisers (cascade attention, as FlashInfer
calls it):

    prompt part:  the N samples' queries of a prompt as one matrix against its keys   [B, Hkv, N*g, P]
    own part:     each row's queries against its own generated tokens                  [R, Hkv, g, S]

which is exact attention over the concatenation (tests/test_cascade.py). It runs only for one-token decode
steps that carry a ``SharedPrompt``; every other call goes to transformers' SDPA. The sampler switches the
model's attention implementation to ``NAME`` for its decode loop only (``cascade_attention``).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

NAME = "selfrat_cascade"


@dataclass
class SharedPrompt:
    """The prompts' cache, one row per prompt, as the decode steps' attention reads it."""

    keys: list[torch.Tensor]  # per layer [B, Hkv, P, D]
    values: list[torch.Tensor]
    bias: torch.Tensor  # [B, 1, 1, P] 0 where a prompt position is real, -inf at its pads (scores' dtype)
    n: int  # samples per prompt: row r of the first step is sample r % n of prompt r // n
    slots: torch.Tensor  # [R_live] each live row's slot prompt * n + sample, as rows finish and are dropped

    @classmethod
    def from_cache(cls, cache, mask: torch.Tensor, n: int) -> "SharedPrompt":
        """From the prefill's cache (plain layers, views [B, Hkv, P, D]) and its mask [B, P] (1 = real)."""
        keys = [layer.keys for layer in cache.layers]
        bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        bias = bias.masked_fill(mask == 0, float("-inf"))[:, None, None, :]
        slots = torch.arange(mask.shape[0] * n, device=mask.device)
        return cls(keys, [layer.values for layer in cache.layers], bias, n, slots)

    def select(self, rows: torch.Tensor) -> None:
        """Keep the live rows `rows` (indices into the current rows), as the decode loop drops finished ones."""
        self.slots = self.slots[rows]


def _part(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, bias: torch.Tensor | None):
    """Unnormalised attention of q [.., M, D] over k, v [.., L, D]: (output, row max, row sum), in fp32."""
    s = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    if bias is not None:
        s = s + bias
    m = s.amax(-1, keepdim=True)
    e = (s - m).exp_()
    return torch.matmul(e.to(v.dtype), v).float(), m, e.sum(-1, keepdim=True)


def attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
              shared_prompt: SharedPrompt | None = None, **kwargs):
    """transformers' attention interface: query [R, H, 1, D]; key, value [R, Hkv, S, D] (the rows' own
    tokens); returns ([R, 1, H, D], None) as SDPA's does."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if shared_prompt is None or query.shape[2] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    sp = shared_prompt
    r, h, _, d = query.shape
    kv_heads = key.shape[1]
    g = h // kv_heads
    scale = scaling if scaling is not None else d ** -0.5
    pk, pv = sp.keys[module.layer_idx], sp.values[module.layer_idx]
    b = pk.shape[0]
    # The prompt part: every slot's queries (finished rows' slots stay zero), grouped by prompt and KV head.
    q = query.new_zeros(b * sp.n, h, d)
    q[sp.slots] = query[:, :, 0]
    q = q.view(b, sp.n, kv_heads, g, d).transpose(1, 2).reshape(b, kv_heads, sp.n * g, d)
    o1, m1, l1 = _part(q, pk, pv, scale, sp.bias)

    def to_rows(x):  # [B, Hkv, N*g, X] -> the live rows' [R, Hkv, g, X]
        x = x.view(b, kv_heads, sp.n, g, -1).transpose(1, 2).reshape(b * sp.n, kv_heads, g, -1)
        return x[sp.slots]

    o1, m1, l1 = to_rows(o1), to_rows(m1), to_rows(l1)
    # The own part: each row's queries over its generated tokens (all of them visible to the new one).
    own_bias = None
    if attention_mask is not None:
        mask = attention_mask[..., -key.shape[2]:]
        own_bias = mask if mask.dtype != torch.bool else torch.zeros(
            mask.shape, dtype=torch.float32, device=mask.device).masked_fill(~mask, float("-inf"))
    o2, m2, l2 = _part(query.view(r, kv_heads, g, d), key, value, scale, own_bias)
    m = torch.maximum(m1, m2)
    a1, a2 = (m1 - m).exp_(), (m2 - m).exp_()
    out = (o1 * a1 + o2 * a2) / (l1 * a1 + l2 * a2)  # [R, Hkv, g, D]
    return out.to(query.dtype).reshape(r, 1, h, d), None


def plain_sdpa(model, also: tuple[str, ...] = ()) -> bool:
    """`model` attends through SDPA (or one of `also`, attention this project switched it to) with plain
    full-attention layers: no attention soft-capping, no sliding window, whose masks a replacement would not
    apply."""
    config = model.config.get_text_config()
    if getattr(model.config, "_attn_implementation", None) not in ("sdpa", *also):
        return False
    return not getattr(config, "attn_logit_softcapping", None) and not getattr(config, "sliding_window", None)


def supported(model) -> bool:
    """Whether the decode loop may switch `model` to this attention: `plain_sdpa`, and KV heads that group the
    query heads."""
    if not plain_sdpa(model):
        return False
    config = model.config.get_text_config()
    heads, kv = getattr(config, "num_attention_heads", None), getattr(config, "num_key_value_heads", None)
    return bool(heads) and (kv or heads) and heads % (kv or heads) == 0


@contextmanager
def switched_attention(model, name: str, function):
    """Within: `model`'s attention is `function`, registered as `name` (its masks built as SDPA's). The
    function must be SDPA for any call it does not handle itself."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if name not in ALL_ATTENTION_FUNCTIONS:
        ALL_ATTENTION_FUNCTIONS.register(name, function)
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    config = model.config
    before = config._attn_implementation_internal
    config._attn_implementation_internal = name
    try:
        yield
    finally:
        config._attn_implementation_internal = before


def cascade_attention(model):
    """Within: `model`'s attention (and its mask builder) is this module's, which is SDPA for any call
    without a `shared_prompt`."""
    return switched_attention(model, NAME, attention)
