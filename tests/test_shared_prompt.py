"""One row per DPO pair (engine/shared_prompt.py): the same per-token fields as TRL's two rows, the same
DPO losses, and TRL's path wherever packing does not apply."""

from __future__ import annotations

import copy

import pytest
import torch


def _batch(tok, pairs, max_length=None):
    """TRL's preference collator over `pairs` of (prompt ids, chosen ids, rejected ids)."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    collate = DataCollatorForPreference(pad_token_id=tok.pad_token_id or 0, max_length=max_length)
    return collate([{"prompt_ids": p, "chosen_ids": c, "rejected_ids": r} for p, c, r in pairs])


def _pairs(seed=0):
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(10, 2000, (n,), generator=g).tolist()

    # Prompts of different lengths, completions of different lengths (one of a single token).
    return [(ids(23), ids(7), ids(12)), (ids(31), ids(1), ids(5)), (ids(9), ids(14), ids(14))]


def test_pack_layout():
    from engine.shared_prompt import branch_mask, pack_pairs

    p, c, r = [5, 6, 7], [8, 9], [10, 11, 12]
    ids = torch.tensor([p + c + [0], p + r])
    attn = torch.tensor([[1] * 5 + [0], [1] * 6])
    comp = torch.tensor([[0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 1, 1]])
    packed = pack_pairs(ids, attn, comp)
    # prompt[:-1] | prompt[-1] chosen[:-1] | prompt[-1] rejected[:-1]
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 7, 10, 11]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 2, 3, 4]]
    assert packed.segments.tolist() == [[0, 0, 1, 1, 2, 2, 2]]
    assert packed.targets.tolist() == c + r
    assert packed.src.tolist() == [2, 3, 4, 5, 6]
    mask = branch_mask(packed.segments)[0, 0]
    assert mask[4].tolist() == [True, True, False, False, True, False, False]  # rejected sees prompt, not chosen
    assert mask[3].tolist() == [True, True, True, True, False, False, False]


def test_same_fields_as_trl_rows(fused_head_models):
    """Every per-token field TRL's DPO reads, in its layout, equal to its fused head over two rows each."""
    from engine.shared_prompt import FIELDS, shared_prompt_forward

    tok, ours, trl = fused_head_models
    batch = _batch(tok, _pairs())
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    with torch.no_grad():
        want = trl(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                   fused_lm_head=True, use_cache=False)
        got = shared_prompt_forward(ours, batch["input_ids"], batch["attention_mask"], labels)
    assert got is not None
    assert got.log_probs.shape == want.log_probs.shape
    assert torch.allclose(got.log_probs, want.log_probs, atol=1e-5)
    for name in FIELDS:
        a, b = getattr(got, name), getattr(want, name)
        assert torch.allclose(a.float(), b.float(), atol=1e-4), name
    assert torch.equal(got.label_mask, want.label_mask)
    assert (got.log_probs[~got.label_mask] == 0).all() and (got.log_probs[got.label_mask] < 0).all()


def test_gradients_match_trl_rows(fused_head_models):
    from engine.shared_prompt import shared_prompt_forward

    tok, ours, trl = fused_head_models
    batch = _batch(tok, _pairs(1))
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    grads = []
    for model, fn in ((trl, lambda m: m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                        labels=labels, fused_lm_head=True, use_cache=False)),
                      (ours, lambda m: shared_prompt_forward(m, batch["input_ids"], batch["attention_mask"], labels))):
        model.zero_grad()
        logps = fn(model).log_probs.sum(dim=1)
        chosen, rejected = logps.chunk(2)
        (-(torch.nn.functional.logsigmoid(0.1 * (chosen - rejected))).mean()).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        model.zero_grad()
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-3)


def test_falls_back_when_prompts_differ(fused_head_models, monkeypatch):
    """A pair whose two rows were cut differently (keep_end truncation) does not pack: it runs as TRL's two
    rows, with the head on their completion positions only (engine/completion_head.py), same fields."""
    import engine.completion_head as ch
    from engine.shared_prompt import SharedPromptModel, pack_pairs

    tok, ours, trl = fused_head_models
    batch = _batch(tok, _pairs())
    ids = batch["input_ids"].clone()
    ids[3, 0] += 1  # the rejected row of pair 0 now has another prompt
    assert pack_pairs(ids, batch["attention_mask"], batch["completion_mask"]) is None
    labels = ids.masked_fill(batch["completion_mask"] == 0, -100)
    rows = []
    real = ch.completion_forward
    monkeypatch.setattr(ch, "completion_forward", lambda m, lab, **kw: rows.append(lab.shape[0]) or real(m, lab, **kw))
    with torch.no_grad():
        out = SharedPromptModel(trl)(input_ids=ids, attention_mask=batch["attention_mask"], labels=labels,
                                     fused_lm_head=True, use_cache=False)
        want = trl(input_ids=ids, attention_mask=batch["attention_mask"], labels=labels, fused_lm_head=True,
                   use_cache=False)
    assert rows == [ids.shape[0]]
    assert torch.equal(out.label_mask, want.label_mask)
    assert torch.allclose(out.log_probs, want.log_probs, atol=1e-5)


def test_unsupported_models_take_trl_path(fused_head_models):
    from engine.shared_prompt import supported

    tok, ours, _ = fused_head_models
    assert supported(ours)
    capped = copy.deepcopy(ours)
    capped.config.final_logit_softcapping = 30.0
    assert not supported(capped)
    assert not supported(ours.model)  # a bare decoder has no LM head


def test_dpo_losses_equal_with_and_without(tiny_model_dir, tmp_path, monkeypatch):
    """train_dpo with `shared_prompt_forward` on and off: the same per-step losses and margins."""
    import engine.shared_prompt as sp
    from engine.config import TrainingConfig
    from engine.training import train_dpo

    packed_calls = []
    real = sp.shared_prompt_forward
    monkeypatch.setattr(sp, "shared_prompt_forward", lambda *a, **k: packed_calls.append(1) or real(*a, **k))

    pairs = [{"prompt": [{"role": "user", "content": f"Judge answer {i}: " + "words " * (20 + 7 * i)}],
              "chosen": f"Fine reasoning number {i}. [RESULT] {1 + i % 5}",
              "rejected": "Bad. " * (1 + i) + f"[RESULT] {5 - i % 5}"} for i in range(6)]
    lines = {}
    for flag in (True, False):
        out = []
        cfg = TrainingConfig(batch_size=2, learning_rate=1e-3, precision="fp32", shared_prompt_forward=flag)
        train_dpo(policy_path=str(tiny_model_dir), reference_path=None, pairs=pairs, cfg=cfg,
                  out_dir=tmp_path / str(flag), device="cpu", log=out.append)
        lines[flag] = [line for line in out if line.startswith("step ")]
        # on: the reference pass and every training forward went one row per pair (on CPU both run micro-batches
        # of one pair: 6 + 6); off: none
        assert len(packed_calls) == (12 if flag else 0)
        packed_calls.clear()

    def values(ls, key):
        return [float(x.split(f"{key}=")[1].split()[0]) for x in ls]

    assert len(lines[True]) == len(lines[False]) == 3
    assert values(lines[True], "loss") == pytest.approx(values(lines[False], "loss"), abs=1e-4)
    assert values(lines[True], "margin") == pytest.approx(values(lines[False], "margin"), abs=1e-4)
    assert values(lines[True], "loss")[-1] < values(lines[True], "loss")[0]  # it trains


def test_bf16_reference_pass_and_training_agree(tiny_model_dir, tmp_path):
    """Under bf16 autocast the packed training forward runs in the trainer's mixed precision, as the reference
    pass does: at step 1 policy == reference, so the loss is log 2 (a policy pass left in fp32 misses it)."""
    import math

    from engine.config import TrainingConfig
    from engine.training import train_dpo

    pairs = [{"prompt": [{"role": "user", "content": "Judge: " + "long words here " * 40}],
              "chosen": "Reasoning that runs for a while, sentence after sentence. " * 3 + "[RESULT] 4",
              "rejected": "Other reasoning, also long enough to matter here. " * 3 + "[RESULT] 1"}]
    out = []
    cfg = TrainingConfig(batch_size=1, learning_rate=1e-3, precision="bf16")
    train_dpo(policy_path=str(tiny_model_dir), reference_path=None, pairs=pairs, cfg=cfg, out_dir=tmp_path / "o",
              device="cpu", log=out.append)
    first = next(line for line in out if line.startswith("step "))
    assert float(first.split("loss=")[1].split()[0]) == pytest.approx(math.log(2), abs=1e-4)
