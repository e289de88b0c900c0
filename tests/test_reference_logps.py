"""DPO without a reference pass: the log-probs the sampler stores with each judgment are what TRL's DPO would
compute with the reference model, and training with them gives the losses of a live reference."""

from __future__ import annotations

import math

import pytest

from engine.prompts import absolute_messages
from engine.sampling import SamplingParams, TransformersSampler, completion_ids
from engine.training import token_logprobs

ITEM = {
    "instruction": "Name a primary colour.", "input": None, "response": "Blue.", "reference": "Red.",
    "criteria": "Is the answer correct?", "score1_description": "wrong", "score2_description": "weak",
    "score3_description": "partial", "score4_description": "good", "score5_description": "correct",
}


def _messages(i: int) -> list[dict]:
    return absolute_messages({**ITEM, "response": f"Blue number {i}."})


@pytest.fixture(scope="module")
def sampler(tiny_model_dir) -> TransformersSampler:
    return TransformersSampler(str(tiny_model_dir), device="cpu", precision="fp32")


@pytest.mark.parametrize("force", [True, False])
def test_stored_log_probs_equal_a_fresh_forward_over_trls_tokens(sampler, force):
    """Every ending (stop token, budget, forced " [RESULT] k", the end-of-turn tail) scores the same tokens
    TRL trains on, under the unmodified distribution (sampled at temperature 1.3, top-p 0.8, penalty 1.2)."""
    prompts = [_messages(i) for i in range(3)]
    params = SamplingParams(temperature=1.3, top_p=0.8, max_new_tokens=12, repetition_penalty=1.2,
                            force_score=force, score_completion=True)
    out = sampler.generate(prompts, 3, params, seeds=[[10 * i + j for j in range(3)] for i in range(3)])
    scored = 0
    for messages, samples in zip(prompts, out):
        for s in samples:
            target = completion_ids(sampler.tokenizer, messages, sampler.encode_prompt(messages), s.text)
            _, fresh = token_logprobs(sampler.model, sampler.tokenizer, messages, s.text)
            assert target is not None and len(fresh) == len(target)
            if s.ref_logp is None:  # the drawn tokens do not re-tokenize to themselves: TRL computes it
                continue
            scored += 1
            assert s.ref_tokens == len(target)
            assert sampler.tokenizer.decode(target[-2:]) == "<|im_end|>\n"  # the tail counts, as in training
            assert s.ref_logp == pytest.approx(math.fsum(fresh), abs=1e-3)
    assert scored >= 5, "most random-model judgments re-tokenize to their own tokens"
    assert any(s.forced for row in out for s in row) == force


def test_no_scoring_unless_asked(sampler):
    out = sampler.generate([_messages(0)], 2, SamplingParams(max_new_tokens=8), seeds=[[1, 2]])
    assert all(s.ref_logp is None and s.ref_tokens is None for s in out[0])


def test_scoring_changes_no_draw(sampler):
    """The tail is fed after a judgment is final: the judgments are the ones drawn without scoring."""
    params = SamplingParams(temperature=1.0, max_new_tokens=10, force_score=True)
    plain = sampler.generate([_messages(1)], 3, params, seeds=[[5, 6, 7]])
    scored = sampler.generate([_messages(1)], 3, SamplingParams(**{**params.__dict__, "score_completion": True}),
                              seeds=[[5, 6, 7]])
    assert [(s.text, s.score, s.score_probs) for s in plain[0]] == [(s.text, s.score, s.score_probs)
                                                                    for s in scored[0]]


def _pairs(sampler, n_items: int = 3) -> list[dict]:
    """DPO pairs of two sampled judgments per item, with the log-probs the sampler stored."""
    prompts = [_messages(i) for i in range(n_items)]
    params = SamplingParams(temperature=1.0, max_new_tokens=10, force_score=True, score_completion=True)
    out = sampler.generate(prompts, 2, params, seeds=[[100 + 2 * i, 101 + 2 * i] for i in range(n_items)])
    return [{"prompt": m, "chosen": a.text, "rejected": b.text, "ref_chosen_logps": a.ref_logp,
             "ref_rejected_logps": b.ref_logp} for m, (a, b) in zip(prompts, out)]


def _losses(lines: list[str]) -> list[float]:
    return [float(line.split(" loss=")[1].split()[0]) for line in lines if line.startswith("step ")]


def test_dpo_with_stored_reference_log_probs_has_the_losses_of_a_live_reference(sampler, tiny_model_dir,
                                                                                 tmp_path):
    from engine.config import TrainingConfig
    from engine.training import train_dpo

    pairs = _pairs(sampler)
    n_stored = sum(p["ref_chosen_logps"] is not None and p["ref_rejected_logps"] is not None for p in pairs)
    assert n_stored >= 1
    runs = {}
    for name, rows, precompute in (("stored", pairs, True), ("live", [
            {k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs], False)):
        lines: list[str] = []
        cfg = TrainingConfig(batch_size=1, max_length=1024, learning_rate=1e-3, precompute_ref_log_probs=precompute,
                             precision="fp32")
        train_dpo(policy_path=str(tiny_model_dir), reference_path=str(tiny_model_dir), pairs=rows, cfg=cfg,
                  out_dir=tmp_path / name, device="cpu", log=lines.append)
        runs[name] = lines
    assert f"reference log-probs: {n_stored} of {len(pairs)} pairs stored at sampling" in "\n".join(runs["stored"])
    stored, live = _losses(runs["stored"]), _losses(runs["live"])
    assert len(stored) == len(live) == len(pairs)
    assert stored == pytest.approx(live, abs=1e-4)
    assert abs(stored[0] - math.log(2)) < 1e-3  # step 1: policy == reference, so the margin is 0


def test_unusable_stored_values_are_computed(sampler, tiny_model_dir):
    """A missing value, or a pair the trainer cuts at max_length, takes TRL's pass; the rest stay as stored."""
    from transformers import AutoTokenizer
    from trl import DPOConfig

    from engine.training import _stored_reference_dpo, dpo_examples

    pairs = _pairs(sampler, 3)
    pairs[0] = {**pairs[0], "ref_chosen_logps": 123.0, "ref_rejected_logps": 456.0}  # marked: must survive
    pairs[1] = {**pairs[1], "ref_rejected_logps": None}
    pairs[2] = {**pairs[2], "ref_chosen_logps": 1.0, "ref_rejected_logps": 2.0}
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)

    def length(p: dict) -> int:  # prompt + its longer side, in the trainer's tokens
        prompt = sampler.encode_prompt(p["prompt"])
        return len(prompt) + max(len(completion_ids(tok, p["prompt"], prompt, p[s])) for s in ("chosen", "rejected"))

    max_length = max(length(p) for p in pairs)  # every pair fits ...
    grown = pairs[2]["prompt"][1]["content"] + " pad" * (max_length - length(pairs[2]) + 1)  # ... but the third
    pairs[2]["prompt"] = [pairs[2]["prompt"][0], {**pairs[2]["prompt"][1], "content": grown}]
    assert length(pairs[2]) > max_length > len(sampler.encode_prompt(pairs[2]["prompt"]))
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    args = DPOConfig(output_dir="/tmp/unused-dpo", precompute_ref_log_probs=True, max_length=max_length,
                     use_cpu=True, bf16=False, report_to="none", per_device_train_batch_size=1)
    trainer = _stored_reference_dpo()(model=model, args=args, train_dataset=dpo_examples(pairs),
                                      processing_class=tok)
    ds = trainer.train_dataset
    assert trainer.stored_reference_pairs == 1
    assert (ds["ref_chosen_logps"][0], ds["ref_rejected_logps"][0]) == (123.0, 456.0)
    for i in (1, 2):
        fresh_c = token_logprobs(model, tok, pairs[i]["prompt"], pairs[i]["chosen"])[1]
        assert ds["ref_chosen_logps"][i] < 0 and ds["ref_chosen_logps"][i] != 1.0
        if i == 1:
            assert ds["ref_chosen_logps"][i] == pytest.approx(math.fsum(fresh_c), abs=1e-3)
