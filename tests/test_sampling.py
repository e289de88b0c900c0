"""engine.sampling: the custom decode loop on a tiny random Llama, its score state machine on a scripted
stub model, seeds, and the fake backend."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from engine.parsing import parse_judgment
from engine.sampling import (
    VERDICTS,
    FakeSampler,
    Sample,
    SamplingParams,
    TransformersSampler,
    find_score_tokens,
    judgment_seed,
    make_sampler,
    prefix_groups,
)

SHORT = [{"role": "user", "content": "Rate the response 'Paris' to 'Capital of France?'"}]
LONG = [
    {"role": "system", "content": "You are a fair judge."},
    {"role": "user", "content": "Rate this response on a 1-5 scale. " * 12},
]
THIRD = [{"role": "user", "content": "Is 2 + 2 = 5 correct? Judge it."}]


@pytest.fixture(scope="module")
def sampler(tiny_model_dir) -> TransformersSampler:
    return TransformersSampler(str(tiny_model_dir), device="cpu")


def _flat(out: list[list[Sample]]) -> list[Sample]:
    return [s for per in out for s in per]


# --------------------------------------------------------------------------------------- tiny random model


def test_shapes_and_bookkeeping(sampler):
    seeds = [[1, 2], [3, 4], [5, 6]]
    out = sampler.generate([SHORT, LONG, THIRD], 2, SamplingParams(max_new_tokens=6), seeds)
    assert [len(per) for per in out] == [2, 2, 2]
    assert [[s.seed for s in per] for per in out] == seeds
    for per, messages in zip(out, [SHORT, LONG, THIRD]):
        for s in per:
            assert s.prompt_tokens == len(sampler.encode_prompt(messages))
            assert 1 <= s.completion_tokens <= 6
            assert s.latency_s > 0
    assert sampler.generate([], 3, SamplingParams(), []) == []
    with pytest.raises(ValueError, match="seeds"):
        sampler.generate([SHORT], 2, SamplingParams(), [[1]])


def test_same_seeds_reproduce_across_calls_and_batch_compositions(sampler):
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=10, force_score=True)
    alone = sampler.generate([SHORT], 2, params, [[11, 12]])[0]
    again = sampler.generate([SHORT], 2, params, [[11, 12]])[0]
    # SHORT now sits between longer prompts (left padding) in a bigger batch.
    mixed = sampler.generate([LONG, SHORT, THIRD], 2, params, [[1, 2], [11, 12], [3, 4]])[1]
    for a, b, c in zip(alone, again, mixed):
        assert a.text == b.text == c.text
        assert a.score == b.score == c.score
        assert a.score_probs == pytest.approx(c.score_probs, abs=1e-5)


def test_different_seeds_differ(sampler):
    out = sampler.generate([SHORT], 4, SamplingParams(max_new_tokens=8), [[1, 2, 3, 4]])[0]
    assert len({s.raw_text for s in out}) == 4


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_matches_hf_generate_token_for_token(sampler, penalty):
    """Shared prefill, cache repetition and left padding are exact: greedy output equals HF's."""
    params = SamplingParams(temperature=0, max_new_tokens=12, repetition_penalty=penalty)
    ours = sampler.generate([LONG, SHORT], 2, params, [[1, 2], [3, 4]])
    tok = sampler.tokenizer
    for messages, per in zip([LONG, SHORT], ours):
        ids = torch.tensor([sampler.encode_prompt(messages)])
        gen = sampler.model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=12,
            repetition_penalty=penalty, eos_token_id=sorted(sampler.stop_ids), pad_token_id=sampler.pad_id,
        )
        new = [t for t in gen[0, ids.shape[1]:].tolist() if t not in sampler.stop_ids]
        expected = tok.decode(new, skip_special_tokens=True)
        for s in per:  # both samples of a prompt: greedy ignores the seed
            assert s.raw_text == expected
            assert s.completion_tokens == len(new)


def test_force_score_closes_every_judgment(sampler):
    params = SamplingParams(max_new_tokens=8, force_score=True)
    for s in _flat(sampler.generate([SHORT, THIRD], 3, params, [[1, 2, 3], [4, 5, 6]])):
        assert s.score in {1, 2, 3, 4, 5}
        assert len(s.score_probs) == 5 and math.isclose(sum(s.score_probs), 1.0, abs_tol=1e-5)
        assert all(p >= 0 for p in s.score_probs)
        # A random model writes no score: each one is forced, and the status describes the free text.
        assert s.forced
        assert s.text == f"{s.raw_text.rstrip()} [RESULT] {s.score}"
        assert parse_judgment(s.text).score == s.score
        assert s.parse_status in ("no_score", "truncated")
        assert s.parse_status == parse_judgment(s.raw_text, truncated=s.parse_status == "truncated").status.value
        assert s.verdict is None  # absolute mode


RELATIVE = [{"role": "user", "content": "Which is better? Response A: 'Paris'. Response B: 'Lyon'."}]


def test_relative_mode_forces_a_verdict(sampler):
    params = SamplingParams(max_new_tokens=8, force_score=True, mode="relative")
    for s in _flat(sampler.generate([RELATIVE, SHORT], 3, params, [[1, 2, 3], [4, 5, 6]])):
        assert s.verdict in VERDICTS and s.score is None and s.forced
        assert s.text == f"{s.raw_text.rstrip()} [RESULT] {s.verdict}"
        assert parse_judgment(s.text, mode="relative").score == s.verdict
        assert len(s.score_probs) == 2 and math.isclose(sum(s.score_probs), 1.0, abs_tol=1e-5)
        assert s.parse_status in ("no_score", "truncated")


def test_relative_mode_greedy_is_deterministic_and_takes_the_likelier_verdict(sampler):
    params = SamplingParams(temperature=0, max_new_tokens=8, force_score=True, mode="relative")
    a = sampler.generate([RELATIVE], 2, params, [[1, 2]])[0]
    b = sampler.generate([RELATIVE], 2, params, [[3, 4]])[0]
    assert len({(s.text, s.verdict) for s in a + b}) == 1  # greedy ignores the seed
    s = a[0]
    assert s.verdict == VERDICTS[max(range(2), key=lambda k: s.score_probs[k])]


def test_verdict_tokens_of_smollm2(sampler):
    st = find_score_tokens(sampler.tokenizer, VERDICTS)
    tok = sampler.tokenizer
    # SmolLM2 merges the space into the letter: " [RESULT]" then " A" / " B".
    assert st.marker == " [RESULT]"
    assert tok.encode(" [RESULT] B", add_special_tokens=False) == [*st.marker_ids, st.score_ids[1]]
    assert [tok.decode([i]) for i in st.score_ids] == [" A", " B"]
    assert sampler.result_tokens("relative") == st and sampler.result_tokens("absolute") == sampler.score_tokens


def test_without_force_score_a_random_model_has_no_score(sampler):
    for s in _flat(sampler.generate([SHORT, LONG], 2, SamplingParams(max_new_tokens=6), [[1, 2], [3, 4]])):
        assert s.score is None and s.score_probs is None and not s.forced
        assert s.parse_status in ("no_score", "truncated")
        assert s.text == s.raw_text


def test_score_tokens_of_smollm2(sampler):
    st = find_score_tokens(sampler.tokenizer)
    tok = sampler.tokenizer
    assert st.marker == " [RESULT] "
    assert list(st.score_ids) == [tok.convert_tokens_to_ids(str(k)) for k in range(1, 6)]
    assert tok.encode(" [RESULT] 4", add_special_tokens=False) == [*st.marker_ids, st.score_ids[3]]


def test_progress_bar_does_not_change_output(sampler):
    params = SamplingParams(max_new_tokens=4)
    a = sampler.generate([SHORT], 1, params, [[7]], progress=True)[0][0]
    b = sampler.generate([SHORT], 1, params, [[7]])[0][0]
    assert a.text == b.text


# ------------------------------------------------------------------------------------ shared prompt prefixes


def test_prefix_groups_pick_the_split_that_saves_most():
    header = list(range(1000, 1040))  # 40 tokens every prompt has (system prompt, task description)
    a, b = header + list(range(100)), header + list(range(200, 300))  # two items' 140-token prefixes

    def p(prefix, *own):
        return prefix + list(own)

    ratings = [p(a, 1, 2), p(a, 3), p(a, 4, 5, 6), p(b, 7), p(b, 8, 9)]
    # each item's 140 tokens once (saves 2 * 140 + 1 * 140), not the 40-token header for all five (4 * 40)
    assert prefix_groups(ratings, 32) == [(140, [0, 1, 2]), (140, [3, 4])]
    assert prefix_groups(ratings, 141) == []  # nothing shared is long enough to be worth a second forward
    assert prefix_groups([p(a, 1), p(b, 2), p(a, 3)], 32) == [(40, [0, 1, 2])]  # runs are consecutive
    # identical prompts keep one token of their own: its logits start the generation
    assert prefix_groups([a, a, p(a, 1)], 32) == [(139, [0, 1, 2])]
    assert prefix_groups([a], 32) == [] and prefix_groups([], 32) == []


def _meta_like(item: str, feedback: str) -> list[dict]:
    body = f"###Instruction:\n{item}\n###Response:\n" + f"{item} is answered here in some detail. " * 5
    return [{"role": "user", "content": body + f"\n###Feedback to rate:\n{feedback}"}]


def test_shared_prefix_prefill_equals_the_unshared_one(tiny_model_dir):
    """Several ratings of one response (a meta-judge batch) compute their common prefix once, and every
    sample (sampled per seed, greedy, forced score probabilities) is what the plain left-padded prefill gives."""
    shared = TransformersSampler(str(tiny_model_dir), device="cpu")
    plain = TransformersSampler.from_loaded(shared.model, shared.tokenizer)
    plain.min_shared_prefix = None
    prompts = [_meta_like("Sort a list", f) for f in ("Good. [RESULT] 4", "Too vague.", "It misses the edge case "
                                                      "of an empty list entirely. [RESULT] 2")]
    prompts += [_meta_like("Name a prime", f) for f in ("Correct.", "Wrong, 9 is not prime at all. [RESULT] 1")]
    prompts += [SHORT]
    ids = [shared.encode_prompt(m) for m in prompts]
    groups = prefix_groups(ids, shared.min_shared_prefix)
    assert [members for _, members in groups] == [[0, 1, 2], [3, 4]]
    seeds = [[10 * i + j for j in range(2)] for i in range(len(prompts))]
    for params in (SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=10, force_score=True),
                   SamplingParams(temperature=0.0, max_new_tokens=10, force_score=True)):
        shared.prefill_tokens = plain.prefill_tokens = 0
        got, want = _flat(shared.generate(prompts, 2, params, seeds)), _flat(plain.generate(prompts, 2, params, seeds))
        for g, w in zip(got, want):
            assert (g.raw_text, g.score, g.forced, g.completion_tokens) == (w.raw_text, w.score, w.forced,
                                                                            w.completion_tokens)
            assert g.score_probs == pytest.approx(w.score_probs, abs=1e-5)
        assert plain.prefill_tokens == sum(len(i) for i in ids)
        assert shared.prefill_tokens == sum(len(i) for i in ids) - sum((len(m) - 1) * n for n, m in groups)


@pytest.mark.parametrize("share", [True, False])
def test_chunked_prefill_equals_one_forward(tiny_model_dir, share):
    """A left-padded batch (with and without shared prefixes) prefilled 7 columns per forward: the same
    cache, so the same samples, greedy texts and score probabilities as one forward per part."""
    chunked = TransformersSampler(str(tiny_model_dir), device="cpu")
    whole = TransformersSampler.from_loaded(chunked.model, chunked.tokenizer)
    chunked.prefill_chunk, whole.prefill_chunk = 7, None
    if not share:
        chunked.min_shared_prefix = whole.min_shared_prefix = None
    prompts = [_meta_like("Sort a list", f) for f in ("Good. [RESULT] 4", "Too vague.")] + [SHORT, LONG]
    ids = [chunked.encode_prompt(m) for m in prompts]
    assert min(len(i) for i in ids) > 7 and len({len(i) for i in ids}) == len(ids)  # several chunks, pads
    calls = []  # the width of every decoder forward, whichever head the samplers chose
    chunked.model.model.register_forward_pre_hook(lambda m, a, k: calls.append(k["input_ids"].shape[1]),
                                                  with_kwargs=True)
    seeds = [[10 * i + j for j in range(2)] for i in range(len(prompts))]
    for params in (SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=8, force_score=True),
                   SamplingParams(temperature=0.0, max_new_tokens=8, force_score=True)):
        calls.clear()
        got = _flat(chunked.generate(prompts, 2, params, seeds))
        assert max(calls) <= 7 and sum(c > 1 for c in calls) > 2  # the prefill did run in chunks
        calls.clear()
        want = _flat(whole.generate(prompts, 2, params, seeds))
        assert max(calls) > 7
        for g, w in zip(got, want):
            assert (g.raw_text, g.score, g.forced, g.completion_tokens) == (w.raw_text, w.score, w.forced,
                                                                            w.completion_tokens)
            assert g.score_probs == pytest.approx(w.score_probs, abs=1e-5)
        assert chunked.prefill_tokens == whole.prefill_tokens


def test_sliding_window_models_do_not_share_prefixes(sampler, monkeypatch):
    assert sampler._can_share_prefix()
    n = sampler.model.config.num_hidden_layers
    monkeypatch.setattr(sampler.model.config, "sliding_window", 16, raising=False)
    monkeypatch.setattr(sampler.model.config, "layer_types", ["sliding_attention"] * n, raising=False)
    assert not sampler._can_share_prefix()  # its window counts cache slots: a pad between parts would shift it


# ------------------------------------------------------------------------------ scripted stub: state machine

_BACKGROUND = [0.0, 1.0, 2.0, 3.0, 4.0]  # logits of the five score tokens wherever the script does not say
_BACKGROUND_PROBS = torch.tensor(_BACKGROUND).softmax(-1).tolist()
_VERDICT_BACKGROUND = [2.0, 0.0]  # relative mode: logits of " A", " B" (A is the likelier)
_VERDICT_PROBS = torch.tensor(_VERDICT_BACKGROUND).softmax(-1).tolist()


class ScriptedLM(torch.nn.Module):
    """Plays a token script back by position: the logits after t generated tokens favour script[t] (then
    EOS), with the score tokens at a known background ratio, so P(score) at a probe is known exactly."""

    def __init__(self, config, tokenizer, text: str, prompt_len: int, score_ids, background=_BACKGROUND):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.config, self.generation_config = config, None
        self.script = tokenizer.encode(text, add_special_tokens=False)
        self.prompt_len, self.vocab, self.eos = prompt_len, len(tokenizer), tokenizer.eos_token_id
        self.score_ids, self.background = list(score_ids), list(background)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=True,
                logits_to_keep=0):
        steps = (position_ids[:, -1] - (self.prompt_len - 1)).tolist()  # tokens generated so far, per row
        logits = torch.full((len(steps), 1, self.vocab), -30.0)
        logits[:, 0, self.score_ids] = torch.tensor(self.background) - 10
        for r, t in enumerate(steps):
            logits[r, 0, self.script[t] if t < len(self.script) else self.eos] = 10.0
        return SimpleNamespace(logits=logits)


@pytest.fixture(scope="module")
def scripted(tiny_model_dir, sampler):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir)
    tok = sampler.tokenizer
    prompt_len = len(sampler.encode_prompt(SHORT))

    def run(text: str, **params) -> Sample:
        if params.get("mode") == "relative":
            ids, background = find_score_tokens(tok, VERDICTS).score_ids, _VERDICT_BACKGROUND
        else:
            ids, background = find_score_tokens(tok).score_ids, _BACKGROUND
        model = ScriptedLM(config, tok, text, prompt_len, ids, background)
        s = TransformersSampler.from_loaded(model, tok, "scripted")
        out = s.generate([SHORT], 2, SamplingParams(temperature=0, **params), [[1, 2]])[0]
        assert out[0].text == out[1].text
        return out[0]

    return run


def test_scripted_stops_after_the_written_score(scripted):
    s = scripted("Clear and correct. [RESULT] 4 and then it rambles on", force_score=True)
    assert s.text == s.raw_text == "Clear and correct. [RESULT] 4"
    assert (s.score, s.parse_status, s.forced) == (4, "ok", False)
    assert max(range(5), key=lambda k: s.score_probs[k]) == 3  # the script put its mass on "4"


def test_scripted_no_score_is_forced_from_the_probe(scripted):
    s = scripted("No verdict here.", force_score=True)
    assert s.raw_text == "No verdict here."
    assert (s.score, s.parse_status, s.forced) == (5, "no_score", True)  # greedy: the argmax of the probe
    assert s.text == "No verdict here. [RESULT] 5"
    assert s.score_probs == pytest.approx(_BACKGROUND_PROBS, abs=1e-6)


def test_scripted_free_score_without_marker_is_kept_and_probed(scripted):
    s = scripted("Mostly right. Score: 2", force_score=True)
    assert (s.score, s.parse_status, s.forced) == (2, "ok", False)
    assert s.text == s.raw_text
    assert s.score_probs == pytest.approx(_BACKGROUND_PROBS, abs=1e-6)


def test_scripted_budget_end_is_truncated_then_forced(scripted):
    s = scripted("one two three four five six seven eight nine ten", force_score=True, max_new_tokens=4)
    assert s.completion_tokens == 4 + 5 + 1  # free tokens + " [RESULT] " + the score
    assert (s.parse_status, s.forced, s.score) == ("truncated", True, 5)
    assert s.text.endswith(" [RESULT] 5")


def test_scripted_eos_right_after_the_marker(scripted):
    s = scripted("Good answer. [RESULT] ", force_score=True)
    assert s.text == "Good answer. [RESULT] 5" and s.forced
    assert s.score_probs == pytest.approx(_BACKGROUND_PROBS, abs=1e-6)


def test_scripted_without_forcing(scripted):
    s = scripted("No verdict here.")
    assert (s.score, s.score_probs, s.forced, s.parse_status) == (None, None, False, "no_score")
    # A marker was written (then no score digit): its probabilities are kept, generation goes on.
    s = scripted("Hmm. [RESULT] 0 or so")
    assert s.raw_text == "Hmm. [RESULT] 0 or so"
    assert s.score is None and s.score_probs is not None and not s.forced


def test_scripted_relative_stops_after_the_written_verdict(scripted):
    s = scripted("B is clearer. [RESULT] B and then it rambles on", force_score=True, mode="relative")
    assert s.text == s.raw_text == "B is clearer. [RESULT] B"
    assert (s.verdict, s.score, s.parse_status, s.forced) == ("B", None, "ok", False)
    assert len(s.score_probs) == 2 and s.score_probs[1] > 0.99  # the script put its mass on " B"


def test_scripted_relative_no_verdict_is_forced_from_the_probe(scripted):
    s = scripted("No verdict here.", force_score=True, mode="relative")
    assert (s.verdict, s.score, s.parse_status, s.forced) == ("A", None, "no_score", True)  # argmax: A
    assert s.text == "No verdict here. [RESULT] A"
    assert s.score_probs == pytest.approx(_VERDICT_PROBS, abs=1e-6)
    # A score where a verdict belongs is no verdict: forced too, from the probe after the marker.
    s = scripted("Both fine. [RESULT] 4", force_score=True, mode="relative")
    assert (s.verdict, s.parse_status, s.forced) == ("A", "out_of_range", True)


def test_scripted_relative_without_forcing(scripted):
    s = scripted("No verdict here.", mode="relative")
    assert (s.verdict, s.score, s.score_probs, s.forced) == (None, None, None, False)


def test_scripted_forced_score_is_drawn_per_seed(tiny_model_dir, sampler):
    from transformers import AutoConfig

    tok = sampler.tokenizer
    model = ScriptedLM(AutoConfig.from_pretrained(tiny_model_dir), tok, "No verdict.",
                       len(sampler.encode_prompt(SHORT)), find_score_tokens(tok).score_ids)
    s = TransformersSampler.from_loaded(model, tok)
    params = SamplingParams(temperature=1.0, force_score=True)
    seeds = [list(range(40))]
    a = [x.score for x in s.generate([SHORT], 40, params, seeds)[0]]
    b = [x.score for x in s.generate([SHORT], 40, params, seeds)[0]]
    assert a == b and set(a) <= {1, 2, 3, 4, 5} and len(set(a)) >= 3


# ------------------------------------------------------------------------------------------ seeds, params


def test_judgment_seed_is_stable_and_in_range():
    assert judgment_seed(0, "item-1/a", 0) == 1349242991  # fixed forever: stored seeds must replay
    assert judgment_seed(0, "item-1/a", 1) == 1363328853
    assert judgment_seed(1, "item-1/a", 0) == 148556636
    seeds = {judgment_seed(b, f"item-{i}", j) for b in range(3) for i in range(30) for j in range(5)}
    assert len(seeds) == 3 * 30 * 5
    assert all(0 <= s < 2**31 for s in seeds)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(max_new_tokens=0),
                                 dict(repetition_penalty=0), dict(mode="pairwise")])
def test_sampling_params_are_checked(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_make_sampler_backends(tiny_model_dir):
    from engine.backends import vllm_available

    if not vllm_available():  # the vLLM backend itself: tests/test_vllm_sampler.py
        with pytest.raises(NotImplementedError, match="the vllm package is not installed"):
            make_sampler("vllm", "any/model")
    with pytest.raises(ValueError, match="expected transformers or vllm"):
        make_sampler("fake", "any/model")  # tests build FakeSampler directly: it is not a user-facing backend
    with pytest.raises(ValueError, match="unknown"):
        make_sampler("tgi", "any/model")


# ------------------------------------------------------------------------------------------------- fake


def _script(messages, index, seed):
    return ["Accurate and complete. [RESULT] 4", "I cannot decide.", "word " * 50][index]


def test_fake_sampler_parses_scores():
    out = FakeSampler(_script).generate([SHORT, THIRD], 3, SamplingParams(max_new_tokens=20), [[1, 2, 3], [4, 5, 6]])
    assert [len(per) for per in out] == [3, 3]
    ok, none, long = out[0]
    assert (ok.score, ok.parse_status, ok.forced, ok.score_probs) == (4, "ok", False, [0, 0, 0, 1, 0])
    assert ok.rationale == "Accurate and complete." and ok.completion_tokens == 5
    assert (none.score, none.parse_status, none.score_probs) == (None, "no_score", None)
    assert long.parse_status == "truncated" and long.completion_tokens == 20
    assert out[1][0].seed == 4 and ok.prompt_tokens == len(SHORT[0]["content"].split())


def test_fake_sampler_force_score_is_deterministic_from_seed():
    fake = FakeSampler(_script, model_name="fake-judge")
    params = SamplingParams(force_score=True, max_new_tokens=20)
    a = fake.generate([SHORT], 3, params, [[1, 2, 3]])[0]
    b = fake.generate([SHORT], 3, params, [[1, 2, 3]])[0]
    assert fake.model_name == "fake-judge"
    assert [s.score for s in a] == [s.score for s in b]
    assert not a[0].forced and a[1].forced and a[2].forced
    assert a[1].text == f"I cannot decide. [RESULT] {a[1].score}" and a[1].parse_status == "no_score"
    assert a[1].score_probs == [0.2] * 5
    forced = {fake.generate([SHORT], 3, params, [[s, s, s]])[0][1].score for s in range(30)}
    assert len(forced) > 1


def _relative_script(messages, index, seed):
    return ["Response B is clearer. [RESULT] B", "I cannot decide.", "Both fine. [RESULT] 4"][index]


def test_fake_sampler_relative_mode():
    fake = FakeSampler(_relative_script)
    params = SamplingParams(max_new_tokens=20, mode="relative")
    ok, none, score = fake.generate([SHORT], 3, params, [[1, 2, 3]])[0]
    assert (ok.verdict, ok.score, ok.parse_status, ok.score_probs, ok.forced) == ("B", None, "ok", [0.0, 1.0], False)
    assert ok.rationale == "Response B is clearer."
    assert (none.verdict, none.parse_status, none.score_probs) == (None, "no_score", None)
    assert (score.verdict, score.score, score.parse_status) == (None, None, "out_of_range")  # a score is no verdict

    forcing = SamplingParams(max_new_tokens=20, mode="relative", force_score=True)
    forced = fake.generate([SHORT], 3, forcing, [[1, 2, 3]])[0]
    assert not forced[0].forced and forced[1].forced and forced[2].forced
    assert forced[1].verdict in VERDICTS and forced[1].score is None and forced[1].score_probs == [0.5, 0.5]
    assert forced[1].text == f"I cannot decide. [RESULT] {forced[1].verdict}"
    # Absolute mode reads the third text's score and has no verdict.
    absolute = fake.generate([SHORT], 3, SamplingParams(max_new_tokens=20), [[1, 2, 3]])[0]
    assert (absolute[2].score, absolute[2].verdict, absolute[0].score) == (4, None, None)
