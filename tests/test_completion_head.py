"""The LM head on the completion positions only (engine/completion_head.py): TRL's fused-head fields and
gradients, from the labelled positions alone, and the seed SFT trained through it with TRL's losses."""

from __future__ import annotations

import pytest
import torch


def _sft_batch(seed=0):
    """TRL's SFT collator layout: right-padded rows, labels -100 on the prompt and the padding."""
    g = torch.Generator().manual_seed(seed)
    rows = [(19, 6), (31, 1), (11, 13)]  # (prompt, completion) tokens; one completion of a single token
    width = max(p + c for p, c in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    attn, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for i, (p, c) in enumerate(rows):
        ids[i, :p + c] = torch.randint(10, 2000, (p + c,), generator=g)
        attn[i, :p + c] = 1
        labels[i, p:p + c] = ids[i, p:p + c]
    return {"input_ids": ids, "attention_mask": attn}, labels


@pytest.fixture
def head_rows(monkeypatch):
    """Rows the chunked log-prob kernel is given, per call (it runs the LM head over exactly these)."""
    from trl.kernels import ChunkedLogProbFunction

    rows: list[int] = []
    real = ChunkedLogProbFunction.apply
    monkeypatch.setattr(ChunkedLogProbFunction, "apply", lambda h, *a: rows.append(h.shape[0]) or real(h, *a))
    return rows


def test_same_fields_as_trl_head(fused_head_models, head_rows):
    from engine.completion_head import FIELDS, completion_forward

    _, ours, trl = fused_head_models
    inputs, labels = _sft_batch()
    with torch.no_grad():
        want = trl(**inputs, labels=labels, fused_lm_head=True, use_cache=False)
        assert head_rows == [labels[:, 1:].numel()]  # TRL on CPU: every position of every row
        got = completion_forward(ours, labels, **inputs)
    assert head_rows[1] == int((labels != -100).sum()) == 20  # ours: the completion tokens only
    assert torch.equal(got.label_mask, want.label_mask)
    assert torch.allclose(got.log_probs, want.log_probs, atol=1e-5)
    assert torch.allclose(got.loss, want.loss, atol=1e-5)
    for name in FIELDS:
        assert torch.allclose(getattr(got, name).float(), getattr(want, name).float(), atol=1e-4), name
    assert (got.log_probs[~got.label_mask] == 0).all() and (got.log_probs[got.label_mask] < 0).all()


def test_gradients_match_trl_head(fused_head_models):
    from engine.completion_head import completion_forward

    _, ours, trl = fused_head_models
    inputs, labels = _sft_batch(1)
    grads = []
    for model, fn in ((trl, lambda m: m(**inputs, labels=labels, fused_lm_head=True, use_cache=False)),
                      (ours, lambda m: completion_forward(m, labels, **inputs))):
        model.zero_grad()
        fn(model).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
        model.zero_grad()
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_stand_in_passes_other_calls_to_the_model(fused_head_models, head_rows):
    from engine.completion_head import CompletionHeadModel

    _, _, trl = fused_head_models
    inputs, labels = _sft_batch()
    wrapped = CompletionHeadModel(trl)
    with torch.no_grad():
        plain = wrapped(**inputs)  # no fused head: the model's own logits
        assert plain.logits.shape == (*inputs["input_ids"].shape, trl.config.vocab_size)
        shifted = wrapped(**inputs, labels=labels, fused_lm_head=True, use_cache=False,
                          shift_labels=labels)  # a kwarg this path does not know: TRL's head
        fused = wrapped(**inputs, labels=labels, fused_lm_head=True, use_cache=False)
    assert head_rows == [labels.numel(), int((labels != -100).sum())]
    assert shifted.log_probs.shape == labels.shape and fused.log_probs.shape == labels[:, 1:].shape
    assert wrapped.config is trl.config  # attributes read through


def test_seed_sft_trains_through_it_with_trls_losses(tiny_model_dir, tmp_path, head_rows, monkeypatch):
    """train_sft scores only the completion tokens of each example, and logs the same per-step losses and
    token accuracies as TRL's own head (the stand-in switched off)."""
    from transformers import AutoTokenizer

    import engine.completion_head as ch
    from engine.config import SFTConfig
    from engine.training import train_sft

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = [{"prompt": [{"role": "user", "content": f"Judge answer {i}: " + "words " * (30 + 9 * i)}],
                 "completion": f"Reasoning {i} about it. [RESULT] {1 + i % 5}"} for i in range(4)]
    cfg = SFTConfig(dataset="t", learning_rate=1e-2, epochs=1, batch_size=2, max_length=512, precision="fp32")
    lines = {}
    for on in (True, False):
        if not on:
            monkeypatch.setattr(ch, "supported", lambda model: False)
        out: list[str] = []
        train_sft(model_path=str(tiny_model_dir), examples=examples, cfg=cfg, out_dir=tmp_path / str(on),
                  device="cpu", log=out.append)
        lines[on] = [line for line in out if line.startswith("step ")]
        rows = list(head_rows)
        head_rows.clear()
        full = [len(tok.apply_chat_template([*ex["prompt"], {"role": "assistant", "content": ex["completion"]}],
                                            tokenize=True, return_dict=True)["input_ids"]) for ex in examples]
        if on:  # one micro-batch per example on CPU: its completion tokens only, far fewer than its length
            assert len(rows) == 4 and all(r < n / 3 for r, n in zip(sorted(rows), sorted(full))), (rows, full)
        else:
            assert sorted(rows) == sorted(n - 1 for n in full)

    def values(ls, key):
        return [float(x.split(f"{key}=")[1].split()[0]) for x in ls]

    assert len(lines[True]) == len(lines[False]) == 2
    assert values(lines[True], "loss") == pytest.approx(values(lines[False], "loss"), abs=1e-4)
    assert values(lines[True], "acc") == pytest.approx(values(lines[False], "acc"), abs=1e-4)


def test_not_under_a_process_group(fused_head_models, tmp_path):
    """DDP, FSDP and ZeRO hook the model's own forward (one rank too: a single-process DeepSpeed launch still
    partitions the weights), so under any process group TRL's head answers."""
    import torch.distributed as dist

    from engine.completion_head import supported

    _, ours, _ = fused_head_models
    assert supported(ours)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        assert not supported(ours)
    finally:
        dist.destroy_process_group()
    assert supported(ours)
