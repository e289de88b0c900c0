"""engine.lm_head: the decode loop's LM head in the layout the machine's BLAS runs faster, the same logits
and the same judgments as the model's own forward."""

from __future__ import annotations

import time

import pytest
import torch

from engine import lm_head
from engine.lm_head import choose_layout, head_logits, plain_head
from engine.sampling import SamplingParams, TransformersSampler

PROMPTS = [
    [{"role": "user", "content": "Rate the response 'Paris' to 'Capital of France?'"}],
    [{"role": "system", "content": "You are a fair judge."},
     {"role": "user", "content": "Rate this response on a 1-5 scale. " * 12}],
    [{"role": "user", "content": "Rate this response on a 1-5 scale. " * 12 + "It is short."}],
]


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_both_layouts_compute_the_linear_head(rows):
    torch.manual_seed(0)
    weight, hidden = torch.randn(1000, 48), torch.randn(rows, 48)
    want = torch.nn.functional.linear(hidden, weight)
    for layout in ("linear", "transposed"):
        got = head_logits(weight, hidden, layout)
        assert got.shape == (rows, 1000)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_choose_layout_takes_the_faster_one_and_keeps_linear_on_a_tie(monkeypatch):
    def timed(slow: str | None):
        def fake(weight, hidden, layout):
            time.sleep(0.012 if layout == slow else 0.006)
        return fake

    weight = torch.zeros(16, 4)
    monkeypatch.setattr(lm_head, "head_logits", timed("linear"))
    assert choose_layout(weight) == "transposed"
    monkeypatch.setattr(lm_head, "head_logits", timed("transposed"))
    assert choose_layout(weight) == "linear"
    monkeypatch.setattr(lm_head, "head_logits", timed(None))  # equally fast: no 10% gain, the usual call
    assert choose_layout(weight) == "linear"


def test_plain_head_only_where_logits_are_backbone_times_head(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    backbone, weight = plain_head(model)
    assert weight is model.get_output_embeddings().weight and backbone is model.model
    ids = torch.tensor([[5, 17, 300, 42]])
    with torch.inference_mode():
        want = model(input_ids=ids).logits[:, -1]
        got = head_logits(weight, backbone(input_ids=ids).last_hidden_state[:, -1], "transposed")
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    monkeypatch.setattr(model.config, "final_logit_softcapping", 30.0, raising=False)
    assert plain_head(model) is None  # logits are changed after the head
    monkeypatch.undo()
    model.lm_head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    assert plain_head(model) is None  # a bias the transposed product leaves out
    assert plain_head(torch.nn.Linear(4, 4)) is None  # no decoder at all


def test_sampler_judgments_are_the_same_with_either_head(tiny_model_dir):
    """Sampled, greedy and relative judgments, with prefix sharing and rows finishing at different steps:
    the transposed head gives what the model's own forward gives."""
    model_head = TransformersSampler(str(tiny_model_dir), device="cpu")
    model_head.head_layout = "model"
    model_head._head = model_head._choose_head()
    transposed = TransformersSampler.from_loaded(model_head.model, model_head.tokenizer)
    transposed.head_layout = "transposed"
    transposed._head = transposed._choose_head()
    assert model_head._head is None and transposed._head is not None

    seeds = [[10 * i + j for j in range(3)] for i in range(len(PROMPTS))]
    for params in (SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=12, force_score=True),
                   SamplingParams(temperature=0.0, max_new_tokens=12, force_score=True),
                   SamplingParams(temperature=1.0, max_new_tokens=8, force_score=True, mode="relative")):
        model_head.prefill_tokens = transposed.prefill_tokens = 0
        want = model_head.generate(PROMPTS, 3, params, seeds)
        got = transposed.generate(PROMPTS, 3, params, seeds)
        for g, w in zip((s for per in got for s in per), (s for per in want for s in per)):
            assert (g.raw_text, g.score, g.verdict, g.forced, g.completion_tokens) == (
                w.raw_text, w.score, w.verdict, w.forced, w.completion_tokens)
            assert g.score_probs == pytest.approx(w.score_probs, abs=1e-5)
        assert transposed.prefill_tokens == model_head.prefill_tokens > 0


def test_sampler_rejects_an_unknown_head_layout(tiny_model_dir):
    sampler = TransformersSampler(str(tiny_model_dir), device="cpu")
    assert sampler.head in ("model", "transposed")  # "auto" timed both on this machine
    sampler.head_layout = "sideways"
    with pytest.raises(ValueError, match="head_layout 'sideways'"):
        sampler._choose_head()
