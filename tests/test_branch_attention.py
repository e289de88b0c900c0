"""A packed DPO pair's attention in three parts (engine/branch_attention.py): the same attention as SDPA under
the pair's branch mask, the same gradients, and used by train_dpo for its forwards and their recomputation."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from engine.branch_attention import attention, branch_attention
from engine.shared_prompt import branch_mask


def _qkv(p, c, r, heads=6, kv_heads=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = p + c + r
    q = torch.randn(1, heads, t, d, generator=g, requires_grad=True)
    k = torch.randn(1, kv_heads, t, d, generator=g, requires_grad=True)
    v = torch.randn(1, kv_heads, t, d, generator=g, requires_grad=True)
    return q, k, v


def _segments(p, c, r):
    return torch.tensor([[0] * p + [1] * c + [2] * r])


@pytest.mark.parametrize(("p", "c", "r"), [(23, 7, 12), (5, 1, 9), (40, 13, 1)])
def test_equals_sdpa_under_the_branch_mask_with_gradients(p, c, r):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = SimpleNamespace(is_causal=True, num_key_value_groups=3, training=False)
    q, k, v = _qkv(p, c, r)
    mask = branch_mask(_segments(p, c, r))
    want = sdpa_attention_forward(module, q, k, v, mask)[0]
    got = attention(module, q, k, v, mask, selfrat_branches=(p, c, r))[0]
    assert got.shape == want.shape == (1, p + c + r, 6, 8)
    assert torch.allclose(got, want, atol=1e-5)
    w = torch.randn_like(want)
    grads = [torch.autograd.grad((out * w).sum(), (q, k, v)) for out in (want, got)]
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5)


def test_without_branches_it_is_sdpa():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = SimpleNamespace(is_causal=True, num_key_value_groups=3, training=False)
    q, k, v = _qkv(10, 3, 4)
    assert torch.equal(attention(module, q, k, v, None)[0], sdpa_attention_forward(module, q, k, v, None)[0])
    # lengths that do not cover the row (a padded batch): SDPA under the mask it was given
    mask = branch_mask(_segments(10, 3, 4))
    assert torch.equal(attention(module, q, k, v, mask, selfrat_branches=(10, 3, 3))[0],
                       sdpa_attention_forward(module, q, k, v, mask)[0])


@pytest.fixture
def branch_calls(monkeypatch):
    """The branch lengths of each attention call that took the three-part path."""
    import engine.branch_attention as ba

    calls: list[tuple] = []
    real = ba.attention

    def spy(*args, selfrat_branches=None, **kwargs):
        if selfrat_branches is not None:
            calls.append(selfrat_branches)
        return real(*args, selfrat_branches=selfrat_branches, **kwargs)

    monkeypatch.setattr(ba, "attention", spy)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if ba.NAME in ALL_ATTENTION_FUNCTIONS:
        monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, ba.NAME, spy)
    return calls


def test_reference_pass_uses_it_and_a_grad_forward_outside_a_run_does_not(tiny_model_dir, branch_calls):
    """No grad: switched on for the call (same log-probs). With grad and activation checkpointing outside
    train_dpo's run-level switch: plain SDPA, since the recomputation would come after the call."""
    from transformers import AutoModelForCausalLM

    from engine.shared_prompt import shared_prompt_forward

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    p, c, r = [5, 6, 7, 8, 9] * 4, [11, 12, 13], [14, 15, 16, 17]
    ids = torch.tensor([p + c + [0], p + r])
    attn = torch.tensor([[1] * 23 + [0], [1] * 24])
    labels = ids.masked_fill(torch.tensor([[0] * 20 + [1] * 3 + [0], [0] * 20 + [1] * 4]) == 0, -100)
    with torch.no_grad():
        got = shared_prompt_forward(model, ids, attn, labels)
    assert branch_calls and set(branch_calls) == {(19, 3, 4)}
    assert model.config._attn_implementation == "sdpa"  # switched back
    branch_calls.clear()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    out = shared_prompt_forward(model, ids, attn, labels)
    out.loss.backward()  # a recomputation under another attention would fail torch's checkpoint checks
    assert branch_calls == []
    assert torch.allclose(out.log_probs.detach(), got.log_probs, atol=1e-5)
    model.zero_grad()
    with branch_attention(model):  # as train_dpo runs it: the forward and its recomputation both in parts
        again = shared_prompt_forward(model, ids, attn, labels)
        again.loss.backward()
    layers = model.config.num_hidden_layers
    assert len(branch_calls) == 2 * layers and set(branch_calls) == {(19, 3, 4)}
    assert torch.allclose(again.loss, out.loss, atol=1e-6)


def test_train_dpo_trains_with_it_to_the_same_losses(tiny_model_dir, tmp_path, branch_calls, monkeypatch):
    """train_dpo with checkpointing: every forward and every recomputation of a pair in parts, the losses
    those of SDPA under the branch mask (branch attention reported unsupported)."""
    import engine.branch_attention as ba
    from engine.config import TrainingConfig
    from engine.training import train_dpo

    pairs = [{"prompt": [{"role": "user", "content": f"Judge answer {i}: " + "words " * (20 + 7 * i)}],
              "chosen": f"Fine reasoning number {i}. [RESULT] {1 + i % 5}",
              "rejected": "Bad. " * (1 + i) + f"[RESULT] {5 - i % 5}"} for i in range(4)]
    cfg = TrainingConfig(batch_size=2, learning_rate=1e-3, precision="fp32", activation_checkpointing=True)
    lines = {}
    for on in (True, False):
        if not on:
            monkeypatch.setattr(ba, "supported", lambda model: False)
        out: list[str] = []
        train_dpo(policy_path=str(tiny_model_dir), reference_path=None, pairs=copy.deepcopy(pairs), cfg=cfg,
                  out_dir=tmp_path / str(on), device="cpu", log=out.append)
        lines[on] = [line for line in out if line.startswith("step ")]
        # on: the reference pass (1 forward), each training forward and its recomputation (2), per pair and layer
        assert len(branch_calls) == (4 * 3 * 2 if on else 0), len(branch_calls)
        branch_calls.clear()
    assert lines[True] and len(lines[True]) == len(lines[False])

    def values(ls, key):
        return [float(x.split(f"{key}=")[1].split()[0]) for x in ls]

    assert values(lines[True], "loss") == pytest.approx(values(lines[False], "loss"), abs=1e-4)
    assert values(lines[True], "margin") == pytest.approx(values(lines[False], "margin"), abs=1e-4)
