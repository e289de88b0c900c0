"""engine.cascade: decode attention with N samples' shared prompt read once, the same as attention over
each row's repeated cache, and the sampler's judgments the same with it and without."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from engine import cascade
from engine.cascade import SharedPrompt, attention, cascade_attention, supported
from engine.sampling import SamplingParams, TransformersSampler

PROMPTS = [
    [{"role": "user", "content": "Rate the response 'Paris' to 'Capital of France?'"}],
    [{"role": "system", "content": "You are a fair judge."},
     {"role": "user", "content": "Rate this response on a 1-5 scale. " * 12}],
    [{"role": "user", "content": "Rate this response on a 1-5 scale. " * 12 + "It is short."}],
]


def _reference(q, pk, pv, pmask, own_k, own_v, own_mask, rows_prompt):
    """SDPA over each row's prompt (repeated) followed by its own tokens, GQA by repeating the KV heads."""
    g = q.shape[1] // pk.shape[1]
    k = torch.cat([pk[rows_prompt], own_k], 2).repeat_interleave(g, 1)
    v = torch.cat([pv[rows_prompt], own_v], 2).repeat_interleave(g, 1)
    mask = torch.cat([pmask[rows_prompt], own_mask], 1)[:, None, None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)


@pytest.mark.parametrize("drop", [False, True])
def test_attention_equals_sdpa_over_the_repeated_cache(drop):
    torch.manual_seed(0)
    b, n, kv, g, d, p, s = 3, 4, 2, 3, 16, 11, 5
    pk, pv = torch.randn(b, kv, p, d), torch.randn(b, kv, p, d)
    pmask = torch.ones(b, p, dtype=torch.long)
    pmask[0, :4] = 0  # left pads of a shorter prompt
    pmask[2, 3:5] = 0  # pads between a shared prefix and the rest
    shared = SharedPrompt.from_cache(SimpleNamespace(layers=[SimpleNamespace(keys=pk, values=pv)]), pmask, n)
    assert shared.bias[0, 0, 0, :5].tolist() == [float("-inf")] * 4 + [0.0]
    assert shared.slots.tolist() == list(range(b * n))
    rows = b * n
    if drop:  # rows 1, 4, 5 and 11 finished: the loop keeps the others, in order
        keep = torch.tensor([0, 2, 3, 6, 7, 8, 9, 10])
        shared.select(keep)
        rows = len(keep)
    own_k, own_v = torch.randn(rows, kv, s, d), torch.randn(rows, kv, s, d)
    own_mask = torch.ones(rows, s, dtype=torch.bool)
    q = torch.randn(rows, kv * g, 1, d)
    module = SimpleNamespace(layer_idx=0)
    got, weights = attention(module, q, own_k, own_v, own_mask[:, None, None, :], shared_prompt=shared)
    assert weights is None and got.shape == (rows, 1, kv * g, d)
    want = _reference(q, pk, pv, pmask.bool(), own_k, own_v, own_mask, shared.slots // n)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got_no_mask, _ = attention(module, q, own_k, own_v, None, shared_prompt=shared)  # all own tokens visible
    torch.testing.assert_close(got_no_mask, got)


def test_attention_without_a_shared_prompt_is_sdpa():
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 3, 8), torch.randn(2, 2, 3, 8)
    module = SimpleNamespace(layer_idx=0, num_key_value_groups=2, is_causal=True)
    got, _ = attention(module, q, k, v, None, scaling=0.3)
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True,
                                          scale=0.3).transpose(1, 2)
    torch.testing.assert_close(got, want)


@pytest.fixture(scope="module")
def samplers(tiny_model_dir):
    on = TransformersSampler(str(tiny_model_dir), device="cpu")
    off = TransformersSampler.from_loaded(on.model, on.tokenizer)
    off.cascade = False
    return on, off


def test_sampler_judgments_are_the_same_with_and_without_cascade(samplers, monkeypatch):
    """Sampled and greedy, absolute and relative, rows finishing at different steps, prefix sharing on:
    the cascade gives the judgments the repeated cache gives, and the model's attention is SDPA after."""
    on, off = samplers
    parts = []
    real = cascade._part
    monkeypatch.setattr(cascade, "_part", lambda *a: parts.append(a[0].shape) or real(*a))
    seeds = [[10 * i + j for j in range(3)] for i in range(len(PROMPTS))]
    for params in (SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=12, force_score=True),
                   SamplingParams(temperature=0.0, max_new_tokens=12, force_score=True),
                   SamplingParams(temperature=1.0, max_new_tokens=8, force_score=True, mode="relative")):
        parts.clear()
        got = on.generate(PROMPTS, 3, params, seeds)
        assert parts and parts[0][0] == len(PROMPTS)  # the prompt part ran one row per prompt
        assert on.model.config._attn_implementation == "sdpa"
        n_parts = len(parts)
        want = off.generate(PROMPTS, 3, params, seeds)
        assert len(parts) == n_parts  # cascade off: never called
        for g, w in zip((s for per in got for s in per), (s for per in want for s in per)):
            assert (g.raw_text, g.score, g.verdict, g.forced, g.completion_tokens) == (
                w.raw_text, w.score, w.verdict, w.forced, w.completion_tokens)
            assert g.score_probs == pytest.approx(w.score_probs, abs=1e-5)


def test_one_sample_per_prompt_keeps_the_plain_path(samplers, monkeypatch):
    on, _off = samplers
    monkeypatch.setattr(cascade, "_part", lambda *a: pytest.fail("cascade for n = 1"))
    on.generate(PROMPTS, 1, SamplingParams(temperature=0.0, max_new_tokens=4), [[1], [2], [3]])


def test_attention_implementation_is_restored_after_an_error(samplers):
    on, _off = samplers
    with pytest.raises(RuntimeError):
        with cascade_attention(on.model):
            assert on.model.config._attn_implementation == cascade.NAME
            raise RuntimeError("a step failed")
    assert on.model.config._attn_implementation == "sdpa"


def test_supported_only_for_sdpa_full_attention(samplers, monkeypatch):
    on, _off = samplers
    assert supported(on.model)
    monkeypatch.setattr(on.model.config, "sliding_window", 16, raising=False)
    assert not supported(on.model)
    monkeypatch.undo()
    monkeypatch.setattr(on.model.config, "_attn_implementation_internal", "eager")
    assert not supported(on.model)
