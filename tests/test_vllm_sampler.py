"""engine/vllm_sampler.py against a fake vllm (tests/fake_vllm: vLLM's documented offline API, recording every
engine and request, answering from a scripted model): our side of the contract, without a GPU. The last test
runs the real vLLM on a tiny model where a GPU and vllm are there."""

from __future__ import annotations

import importlib.util
import math
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from engine.config import VLLMConfig, parse_run_config
from engine.prompts import RESULT_MARKER
from engine.sampling import (
    VERDICTS,
    BackendUnavailable,
    Sample,
    SamplingParams,
    TransformersSampler,
    find_score_tokens,
    make_sampler,
)

FAKE_DIR = Path(__file__).resolve().parent / "fake_vllm"
SHORT = [{"role": "user", "content": "Rate the response 'Paris' to 'Capital of France?'"}]
OTHER = [{"role": "user", "content": "Is 2 + 2 = 5 correct? Judge it."}]
BACKGROUND = [0.0, 1.0, 2.0, 3.0, 4.0]  # score-token logits (minus 10) wherever a script does not name one
BACKGROUND_PROBS = torch.tensor(BACKGROUND).softmax(-1).tolist()
VERDICT_BACKGROUND = [2.0, 0.0]
VERDICT_PROBS = torch.tensor(VERDICT_BACKGROUND).softmax(-1).tolist()


def _drop_vllm_modules() -> None:
    for name in [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]:
        del sys.modules[name]


@pytest.fixture
def fake_vllm(monkeypatch):
    """The fake vllm package importable as `vllm` (first on sys.path), its records cleared."""
    _drop_vllm_modules()
    monkeypatch.syspath_prepend(str(FAKE_DIR))
    import vllm

    assert getattr(vllm, "FAKE", False)
    vllm._fake.reset()
    yield vllm
    vllm._fake.reset()
    _drop_vllm_modules()


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _prompt_ids(tok, messages) -> list[int]:
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tok.encode(text, add_special_tokens=False)


class Scripted:
    """The fake's model: writes `text` (then EOS); at any position t after the prompt, its logits name the
    script's token t (or EOS after it) at 10 and the score tokens at background - 10, like ScriptedLM below,
    so both backends see the same model."""

    def __init__(self, tok, text: str, prompt_len: int, score_ids, background):
        self.script = tok.encode(text, add_special_tokens=False)
        self.prompt_len, self.eos = prompt_len, tok.eos_token_id
        self.score_ids, self.background = list(score_ids), list(background)

    def free_tokens(self, prompt_token_ids, params, index, tokenizer):
        assert len(prompt_token_ids) == self.prompt_len
        return self.script

    def next_token_logits(self, prompt_token_ids, tokenizer):
        t = len(prompt_token_ids) - self.prompt_len
        logits = {i: b - 10 for i, b in zip(self.score_ids, self.background)}
        logits[self.script[t] if t < len(self.script) else self.eos] = 10.0
        return logits


class ScriptedLM(torch.nn.Module):
    """The same script as a torch model for TransformersSampler (as tests/test_sampling.py's stub): logits
    after t generated tokens favour script[t] (then EOS), score tokens at background - 10."""

    def __init__(self, config, tok, text: str, prompt_len: int, score_ids, background):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.config, self.generation_config = config, None
        self.script = tok.encode(text, add_special_tokens=False)
        self.prompt_len, self.vocab, self.eos = prompt_len, len(tok), tok.eos_token_id
        self.score_ids, self.background = list(score_ids), list(background)

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=True,
                logits_to_keep=0):
        steps = (position_ids[:, -1] - (self.prompt_len - 1)).tolist()
        logits = torch.full((len(steps), 1, self.vocab), -30.0)
        logits[:, 0, self.score_ids] = torch.tensor(self.background) - 10
        for r, t in enumerate(steps):
            logits[r, 0, self.script[t] if t < len(self.script) else self.eos] = 10.0
        return SimpleNamespace(logits=logits)


@pytest.fixture
def vllm_run(fake_vllm, tiny_model_dir, tok):
    """run(text, n=2, seeds=[[1, 2]], **params) -> (samples of SHORT, the engine): the vLLM backend on the
    fake with `text` scripted (greedy unless temperature is given)."""
    from engine.vllm_sampler import VLLMSampler

    def run(text: str, n: int = 2, seeds=((1, 2),), settings=None, **params):
        relative = params.get("mode") == "relative"
        st = find_score_tokens(tok, VERDICTS) if relative else find_score_tokens(tok)
        background = VERDICT_BACKGROUND if relative else BACKGROUND
        fake_vllm._fake.MODEL = Scripted(tok, text, len(_prompt_ids(tok, SHORT)), st.score_ids, background)
        sampler = VLLMSampler(str(tiny_model_dir), settings=settings)
        params.setdefault("temperature", 0)
        out = sampler.generate([SHORT], n, SamplingParams(**params), [list(s) for s in seeds])[0]
        return out, fake_vllm._fake.LLMS[-1]

    return run


# ------------------------------------------------------------------------------------------- the engine


def test_vllm_engine_is_built_from_the_config(fake_vllm, tiny_model_dir):
    from engine.vllm_sampler import VLLMSampler

    cfg = parse_run_config({"iterations": 0, "sampling": {"backend": "vllm", "precision": "bf16", "vllm": {
        "tensor_parallel_size": 2, "gpu_memory_utilization": 0.5, "max_model_len": 2048,
        "enable_prefix_caching": True}}})
    sampler = VLLMSampler(str(tiny_model_dir), settings=cfg.sampling.vllm, precision=cfg.sampling.precision)
    (llm,) = fake_vllm._fake.LLMS
    assert llm.kwargs == {
        "model": str(tiny_model_dir), "tensor_parallel_size": 2, "dtype": "bfloat16", "gpu_memory_utilization": 0.5,
        "enable_prefix_caching": True, "logprobs_mode": "processed_logprobs", "trust_remote_code": False,
        "seed": 0, "max_model_len": 2048}
    assert sampler.precision == "bf16" and sampler.model_name == str(tiny_model_dir)
    # defaults: dtype follows precision auto (vLLM's own choice), no max_model_len (the model's)
    VLLMSampler(str(tiny_model_dir))
    kwargs = fake_vllm._fake.LLMS[-1].kwargs
    assert kwargs["dtype"] == "auto" and "max_model_len" not in kwargs and kwargs["enable_prefix_caching"] is True
    VLLMSampler(str(tiny_model_dir), settings={"dtype": "float16"}, precision="auto")
    assert fake_vllm._fake.LLMS[-1].kwargs["dtype"] == "float16"


def test_vllm_config_errors_are_named_per_field():
    from engine.config import ConfigError

    for sampling, where in [({"backend": "vllm", "device": "cpu"}, "sampling.device"),
                            ({"backend": "vllm", "device": "cuda:1"}, "sampling.device"),
                            ({"backend": "vllm", "precision": "fp32", "vllm": {"dtype": "bfloat16"}},
                             "sampling.vllm.dtype"),
                            ({"vllm": {"tensor_parallel_size": 0}}, "sampling.vllm.tensor_parallel_size"),
                            ({"vllm": {"gpu_memory_utilization": 1.5}}, "sampling.vllm.gpu_memory_utilization"),
                            ({"vllm": {"tensor_paralel_size": 2}}, "sampling.vllm.tensor_paralel_size")]:
        with pytest.raises(ConfigError, match=re.escape(where) + ":"):
            parse_run_config({"iterations": 0, "sampling": sampling})
    # the transformers backend ignores the vllm settings and runs anywhere
    cfg = parse_run_config({"iterations": 0, "sampling": {"device": "cpu", "vllm": {"dtype": "float16"}}})
    assert cfg.sampling.vllm.dtype == "float16"
    assert VLLMConfig().model_dump() == {"tensor_parallel_size": 1, "gpu_memory_utilization": 0.9,
                                         "max_model_len": None, "enable_prefix_caching": True, "dtype": "auto",
                                         "structured_outputs": False}


def test_vllm_fake_rejects_unknown_arguments(fake_vllm, tiny_model_dir):
    """The contract has teeth: a misspelled engine argument or sampling field fails as it would in vLLM."""
    with pytest.raises(TypeError, match="enable_prefix_cache"):
        fake_vllm.LLM(str(tiny_model_dir), enable_prefix_cache=True)
    with pytest.raises(TypeError):
        fake_vllm.LLM(str(tiny_model_dir), 2)  # everything but the model is keyword-only
    with pytest.raises(TypeError, match="max_new_tokens"):
        fake_vllm.SamplingParams(max_new_tokens=8)
    with pytest.raises(TypeError, match="guided_decoding"):
        fake_vllm.SamplingParams(guided_decoding=None)  # the pre-0.12 name of structured_outputs
    llm = fake_vllm.LLM(str(tiny_model_dir))
    with pytest.raises(TypeError, match="TokensPrompt"):
        llm.generate(["a text prompt"], fake_vllm.SamplingParams())


# ------------------------------------------------------------------------------------------- requests


def test_vllm_one_request_per_judgment_with_its_seed_and_the_chat_template(fake_vllm, tiny_model_dir, tok):
    from engine.vllm_sampler import VLLMSampler

    fake_vllm._fake.MODEL = fake_vllm._fake.TextModel("Fine. [RESULT] 3")
    sampler = VLLMSampler(str(tiny_model_dir))
    seeds = [[11, 12, 13], [21, 22, 23]]
    params = SamplingParams(temperature=0.7, top_p=0.8, max_new_tokens=40, repetition_penalty=1.03)
    out = sampler.generate([SHORT, OTHER], 3, params, seeds)
    assert [[s.seed for s in per] for per in out] == seeds
    (llm,) = fake_vllm._fake.LLMS
    free = llm.calls[0]
    # one request per (item, sample), item-major, each the chat-templated prompt as token ids
    want = [_prompt_ids(tok, SHORT)] * 3 + [_prompt_ids(tok, OTHER)] * 3
    assert [p["prompt_token_ids"] for p in free["prompts"]] == want
    assert all(set(p) == {"prompt_token_ids"} for p in free["prompts"])
    assert [p.seed for p in free["params"]] == [11, 12, 13, 21, 22, 23]
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    for p in free["params"]:
        assert (p.n, p.temperature, p.top_p, p.max_tokens, p.repetition_penalty) == (1, 0.7, 0.8, 40, 1.03)
        assert tok.eos_token_id in p.stop_token_ids and im_end in p.stop_token_ids
        assert p.stop == [f"{RESULT_MARKER} {k}" for k in range(1, 6)] and p.include_stop_str_in_output
        assert p.allowed_token_ids is None and p.logprobs is None and p.structured_outputs is None
    assert out[1][2].prompt_tokens == len(_prompt_ids(tok, OTHER))
    assert all(s.score == 3 and not s.forced for per in out for s in per)


def test_vllm_greedy_requests_turn_nucleus_off(vllm_run):
    _, llm = vllm_run("Fine. [RESULT] 3", temperature=0, top_p=0.9)
    assert all((p.temperature, p.top_p) == (0, 1.0) for p in llm.calls[0]["params"])


# --------------------------------------------------------------------------------------- score handling


def test_vllm_judgment_that_closes_itself(vllm_run, tok):
    text = "Clear and correct. [RESULT] 4 and then it rambles on"
    out, llm = vllm_run(text, force_score=True)
    s = out[0]
    assert s.text == s.raw_text == "Clear and correct. [RESULT] 4"
    assert (s.score, s.parse_status, s.forced, s.verdict) == (4, "ok", False, None)
    assert max(range(5), key=lambda k: s.score_probs[k]) == 3 and sum(s.score_probs) == pytest.approx(1)
    # the probe: prompt + the tokens before the written "4", one token, the five score tokens with logprobs
    st = find_score_tokens(tok)
    probe = llm.calls[1]
    written = tok.encode("Clear and correct. [RESULT] 4", add_special_tokens=False)
    assert [p["prompt_token_ids"] for p in probe["prompts"]] == [_prompt_ids(tok, SHORT) + written[:-1]] * 2
    for p, seed in zip(probe["params"], [1, 2]):
        assert (p.max_tokens, p.allowed_token_ids, p.logprobs, p.seed) == (1, list(st.score_ids), 5, seed)
        assert (p.temperature, p.top_p, p.repetition_penalty) == (1.0, 1.0, 1.0)  # the model's own distribution
    assert s.completion_tokens == len(written)


def test_vllm_judgment_without_a_score_is_forced_from_the_probe(vllm_run, tok):
    out, llm = vllm_run("No verdict here.", force_score=True)
    s = out[0]
    assert s.raw_text == "No verdict here." and s.text == "No verdict here. [RESULT] 5"
    assert (s.score, s.parse_status, s.forced) == (5, "no_score", True)  # greedy: the probe's argmax
    assert s.score_probs == pytest.approx(BACKGROUND_PROBS, abs=1e-6)
    st = find_score_tokens(tok)
    free = tok.encode("No verdict here.", add_special_tokens=False)
    assert llm.calls[1]["prompts"][0]["prompt_token_ids"] == _prompt_ids(tok, SHORT) + free + list(st.marker_ids)
    assert s.completion_tokens == len(free) + len(st.marker_ids) + 1


def test_vllm_forced_score_is_drawn_per_seed(vllm_run):
    seeds = [list(range(40))]
    a, _ = vllm_run("No verdict.", n=40, seeds=seeds, temperature=1.0, force_score=True)
    b, _ = vllm_run("No verdict.", n=40, seeds=seeds, temperature=1.0, force_score=True)
    assert [x.score for x in a] == [x.score for x in b]
    assert set(x.score for x in a) <= {1, 2, 3, 4, 5} and len({x.score for x in a}) >= 3
    assert all(x.forced for x in a)


def test_vllm_budget_hit_is_truncated_then_forced(vllm_run, tok):
    out, llm = vllm_run("one two three four five six seven eight nine ten", force_score=True, max_new_tokens=4)
    s = out[0]
    assert (s.parse_status, s.forced, s.score) == ("truncated", True, 5)
    assert s.completion_tokens == 4 + len(find_score_tokens(tok).marker_ids) + 1
    assert s.text.endswith(f" {RESULT_MARKER} 5")
    assert all(p.max_tokens == 4 for p in llm.calls[0]["params"])


def test_vllm_without_forcing(vllm_run):
    out, llm = vllm_run("No verdict here.")
    assert (out[0].score, out[0].score_probs, out[0].forced) == (None, None, False)
    assert len(llm.calls) == 1  # nothing to probe
    out, _ = vllm_run("Hmm. [RESULT] 0 or so")  # a marker without a score: its probabilities are kept
    assert out[0].raw_text == "Hmm. [RESULT] 0 or so" and out[0].score is None
    assert out[0].score_probs == pytest.approx(BACKGROUND_PROBS, abs=1e-6) and not out[0].forced


def test_vllm_relative_mode(vllm_run, tok):
    out, llm = vllm_run("B is clearer. [RESULT] B and then it rambles on", force_score=True, mode="relative")
    s = out[0]
    assert s.text == s.raw_text == "B is clearer. [RESULT] B"
    assert (s.verdict, s.score, s.parse_status, s.forced) == ("B", None, "ok", False)
    assert len(s.score_probs) == 2 and s.score_probs[1] > 0.99
    st = find_score_tokens(tok, VERDICTS)
    assert llm.calls[0]["params"][0].stop == [f"{RESULT_MARKER} A", f"{RESULT_MARKER} B"]
    assert llm.calls[1]["params"][0].allowed_token_ids == list(st.score_ids) and llm.calls[1]["params"][0].logprobs == 2
    out, _ = vllm_run("No verdict here.", force_score=True, mode="relative")
    assert (out[0].verdict, out[0].forced, out[0].text) == ("A", True, "No verdict here. [RESULT] A")
    assert out[0].score_probs == pytest.approx(VERDICT_PROBS, abs=1e-6)


def test_vllm_needs_processed_logprobs(vllm_run, monkeypatch):
    """Without logprobs_mode processed_logprobs, vLLM's top five are over the whole vocabulary: refused."""
    import engine.vllm_sampler as vs

    plain = vs.llm_kwargs
    monkeypatch.setattr(vs, "llm_kwargs", lambda *a, **k: {k2: v for k2, v in plain(*a, **k).items()
                                                           if k2 != "logprobs_mode"})
    with pytest.raises(RuntimeError, match="processed_logprobs"):
        vllm_run("No verdict here.", force_score=True)


def test_vllm_structured_outputs_option(vllm_run):
    from engine.vllm_sampler import result_regex

    _, llm = vllm_run("Fine. [RESULT] 3", settings={"structured_outputs": True})
    so = llm.calls[0]["params"][0].structured_outputs
    assert so is not None and so.regex == result_regex((1, 2, 3, 4, 5))
    assert re.fullmatch(so.regex, "Feedback: fine\nreally. [RESULT] 3")
    assert not re.fullmatch(so.regex, "Feedback: fine. [RESULT] 6") and not re.fullmatch(so.regex, "no result")
    _, llm = vllm_run("Fine. [RESULT] 3")
    assert llm.calls[0]["params"][0].structured_outputs is None  # off by default


# ------------------------------------------------------------------------ the same samples as transformers


CASES = [
    ("Clear and correct. [RESULT] 4 and then it rambles on", dict(force_score=True)),
    ("No verdict here.", dict(force_score=True)),
    ("Mostly right. Score: 2", dict(force_score=True)),
    ("one two three four five six seven eight nine ten", dict(force_score=True, max_new_tokens=4)),
    ("Good answer. [RESULT] ", dict(force_score=True)),
    ("No verdict here.", dict()),
    ("Hmm. [RESULT] 0 or so", dict()),
    ("B is clearer. [RESULT] B and then it rambles on", dict(force_score=True, mode="relative")),
    ("Both fine. [RESULT] 4", dict(force_score=True, mode="relative")),
    ("No verdict here.", dict(mode="relative")),
]


@pytest.mark.parametrize("text,params", CASES, ids=[f"{c[0][:16]}-{sorted(c[1])}" for c in CASES])
def test_vllm_gives_the_samples_of_the_transformers_backend(vllm_run, tiny_model_dir, tok, text, params):
    from transformers import AutoConfig

    relative = params.get("mode") == "relative"
    st = find_score_tokens(tok, VERDICTS) if relative else find_score_tokens(tok)
    background = VERDICT_BACKGROUND if relative else BACKGROUND
    model = ScriptedLM(AutoConfig.from_pretrained(tiny_model_dir), tok, text, len(_prompt_ids(tok, SHORT)),
                       st.score_ids, background)
    hf = TransformersSampler.from_loaded(model, tok, "scripted")
    want = hf.generate([SHORT], 2, SamplingParams(temperature=0, **params), [[1, 2]])[0]
    got, _ = vllm_run(text, **params)
    for a, b in zip(want, got):
        fields = {f: getattr(a, f) for f in Sample.__dataclass_fields__ if f not in ("latency_s", "score_probs")}
        assert {f: getattr(b, f) for f in fields} == fields
        assert (a.score_probs is None) == (b.score_probs is None)
        if a.score_probs is not None:
            assert b.score_probs == pytest.approx(a.score_probs, abs=1e-5)


# ------------------------------------------------------------------------------------ availability


def test_vllm_backend_unavailable_without_the_package(monkeypatch):
    _drop_vllm_modules()
    from engine.backends import vllm_available

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else _find(name, *a))
    assert vllm_available() is False
    with pytest.raises(BackendUnavailable, match=re.escape("pip install -e '.[gpu]'")):
        make_sampler("vllm", "any/model")
    with pytest.raises(NotImplementedError):  # BackendUnavailable is one (callers may catch either)
        make_sampler("vllm", "any/model")


_find = importlib.util.find_spec


def test_vllm_backend_unavailable_without_a_gpu(fake_vllm, monkeypatch):
    from engine import vllm_sampler

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setenv("SELFRAT_GPU_COUNT", "0")
    with pytest.raises(BackendUnavailable, match="needs a CUDA GPU and none is visible"):
        make_sampler("vllm", "any/model")
    with pytest.raises(BackendUnavailable, match="not on device cpu"):
        make_sampler("vllm", "any/model", device="cpu")
    monkeypatch.setenv("SELFRAT_GPU_COUNT", "1")
    with pytest.raises(BackendUnavailable, match="tensor_parallel_size 2: only 1 GPU"):
        vllm_sampler.check_vllm_usable("auto", VLLMConfig(tensor_parallel_size=2))
    vllm_sampler.check_vllm_usable("auto", VLLMConfig())  # one GPU, one-way: fine


def test_vllm_available_does_not_import_vllm(fake_vllm):
    """For the app: a look-up, no import of vllm, and engine.backends itself imports neither torch nor vllm."""
    import subprocess

    from engine.backends import vllm_available

    _drop_vllm_modules()
    assert vllm_available() is True and "vllm" not in sys.modules
    code = "import sys, engine.backends as b; b.vllm_available(); print(sorted({'torch', 'vllm'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_vllm_make_sampler_passes_the_settings(fake_vllm, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("SELFRAT_GPU_COUNT", "1")
    sampler = make_sampler("vllm", str(tiny_model_dir), precision="fp32",
                           vllm=VLLMConfig(gpu_memory_utilization=0.6))
    kwargs = fake_vllm._fake.LLMS[-1].kwargs
    assert (kwargs["gpu_memory_utilization"], kwargs["dtype"]) == (0.6, "float32")
    assert type(sampler).__name__ == "VLLMSampler"


# ------------------------------------------------------------------------------------------------- GPU


def _real_vllm() -> bool:
    spec = importlib.util.find_spec("vllm")
    return spec is not None and FAKE_DIR not in Path(spec.origin or "").parents


@pytest.mark.skipif(not torch.cuda.is_available() or not _real_vllm(), reason="needs a CUDA GPU and vllm")
def test_vllm_real_engine_on_a_tiny_model(tmp_path, smollm2_tokenizer_dir):
    """The real vLLM on a random 2-layer Llama (head dim 64) with the SmolLM2 tokenizer: the two passes run,
    every sample is scored (forced where needed) with five probabilities summing to one, seeds replay."""
    import shutil

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from engine.vllm_sampler import VLLMSampler

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path)
    for f in Path(smollm2_tokenizer_dir).iterdir():
        shutil.copy(f, tmp_path / f.name)
    sampler = VLLMSampler(str(tmp_path), settings=VLLMConfig(gpu_memory_utilization=0.3, max_model_len=1024))
    params = SamplingParams(temperature=1.0, max_new_tokens=16, force_score=True)
    a = sampler.generate([SHORT, OTHER], 3, params, [[1, 2, 3], [4, 5, 6]])
    b = sampler.generate([SHORT, OTHER], 3, params, [[1, 2, 3], [4, 5, 6]])
    for per_a, per_b in zip(a, b):
        for x, y in zip(per_a, per_b):
            assert x.score in {1, 2, 3, 4, 5} and x.score_probs is not None
            assert math.isclose(sum(x.score_probs), 1.0, abs_tol=1e-4)
            assert x.raw_text == y.raw_text and x.score == y.score  # per-request seeds replay
    assert sampler.precision in ("bf16", "fp16", "fp32")
