"""The vLLM sampling backend (``sampling.backend: vllm``): vLLM's offline ``LLM`` engine on CUDA GPUs, giving
the same ``Sample``s as ``TransformersSampler`` (engine/sampling.py: text, raw text, parse status, the score
parsed or forced, ``forced``, the five score probabilities, or A/B in relative mode), so curation, evaluation,
the store and the app do not know which backend drew a judgment.

    sampler = make_sampler("vllm", model_path, vllm=cfg.sampling.vllm)   # BackendUnavailable without vllm/GPU
    samples = sampler.generate(prompts, n=4, params=SamplingParams(force_score=True), seeds=seeds)

The vllm package is imported when a ``VLLMSampler`` is built, never at import of this module; whether it is
installed at all is ``engine.backends.vllm_available()`` (a look-up, light enough for the app).

How one ``generate`` call runs (two ``LLM.generate`` passes over the whole batch):

1. Free text. One request per judgment (item i, sample j): the item's chat-templated prompt as token ids
   (``chat_prompt_ids``, exactly as the transformers backend encodes it) with ``SamplingParams(n=1,
   seed=seeds[i][j], ...)``. Not one request per item with ``n``: vLLM seeds a request once, so the n samples
   of one request would share one random stream and a judgment's tokens would depend on its siblings; each
   judgment must replay from the seed stored with it (derived from its key). The N requests of an item still
   cost about one prefill: with ``enable_prefix_caching`` (on by default) they, and their score probes, reuse
   the KV-cache blocks of the prompt they share.
   A judgment stops at a stop token (EOS, <|im_end|>), at the budget (``max_tokens``; finish_reason "length",
   parsed as truncated), or right after it writes a result ("[RESULT] k": stop strings kept in the output),
   as the transformers loop stops after the score digit; the tokens are also cut after the first marker +
   label in token space, which is the transformers loop's own rule.
2. Score probe. Where a judgment has a score position (it closed itself; it wrote the marker and went on; or
   it is to be forced), one request of ``max_tokens=1`` on prompt + its tokens up to that position (+ the
   marker ids " [RESULT] " when it did not close itself), with ``allowed_token_ids`` = the five score tokens
   (relative: A, B) and ``logprobs`` = as many. The engine is built with
   ``logprobs_mode="processed_logprobs"`` (vLLM >= 0.10.2): logprobs are then taken after the allowed-token
   mask, so the top five are exactly the score tokens, renormalised over them (the default, raw mode, would
   return the top five of the whole vocabulary). The probe samples at temperature 1 / top_p 1 with no
   penalty, so those processed logprobs are the model's own next-token distribution over the five (the raw
   logits renormalised, as the transformers backend records); its sampled token is not used.
3. Forcing (``force_score``). A judgment without a valid result is closed with " [RESULT] k", k drawn from
   the probe's probabilities with a generator seeded with the judgment's seed (argmax when greedy);
   ``forced=True``.

``sampling.vllm.structured_outputs``: the free requests also carry ``StructuredOutputsParams(regex=...)`` (vLLM
>= 0.12 spelling; guided decoding before), so the text can only end in " [RESULT] k"; a judgment cut by the
token budget is still unclosed and is forced as above under ``force_score``.

Known difference from the transformers loop: vLLM's stop strings match the decoded text, so a result written
with other token boundaries than the marker's (e.g. "[RESULT]" then " 4") also stops generation; the
transformers loop would go on until EOS. The parse of the text is the same.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Sequence

import torch

from engine.backends import VLLM_INSTALL_HINT, vllm_available
from engine.config import VLLM_DTYPES, VLLMConfig
from engine.parsing import parse_judgment
from engine.prompts import RESULT_MARKER
from engine.sampling import (
    BackendUnavailable,
    ChatJudge,
    Sample,
    SamplingParams,
    ScoreTokens,
    _labels,
    _Row,
    _valid_score,
    draw_label,
    ends_with_marker,
    find_score_tokens,
    sample_from_row,
    stop_token_ids,
)

__all__ = ["VLLMSampler", "check_vllm_usable", "llm_kwargs", "result_regex", "vllm_available"]
_TORCH_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _visible_gpus() -> int:
    """CUDA GPUs this process can use: `engine.devices.gpu_count()` (nvidia-smi, which does not touch CUDA
    before vLLM starts its workers; or the SELFRAT_GPU_COUNT override), else torch's count."""
    from engine.devices import gpu_count

    return gpu_count() or torch.cuda.device_count()


def check_vllm_usable(device: str = "auto", settings: VLLMConfig | dict | None = None) -> None:
    """BackendUnavailable, saying what is missing, unless backend vllm can run here: the vllm package, a
    CUDA device (not cpu / mps), and at least tensor_parallel_size visible GPUs."""
    settings = _settings(settings)
    if not vllm_available():
        raise BackendUnavailable(f"sampling.backend vllm: the vllm package is not installed here; install the GPU "
                                 f"extra ({VLLM_INSTALL_HINT}) on a CUDA machine, or use backend transformers")
    if device in ("cpu", "mps"):
        raise BackendUnavailable(f"sampling.backend vllm runs on CUDA GPUs, not on device {device}; use device "
                                 "auto or cuda, or backend transformers")
    gpus = _visible_gpus()
    if gpus == 0:
        raise BackendUnavailable("sampling.backend vllm needs a CUDA GPU and none is visible here (check "
                                 "nvidia-smi and CUDA_VISIBLE_DEVICES), or use backend transformers")
    if settings.tensor_parallel_size > gpus:
        raise BackendUnavailable(f"sampling.vllm.tensor_parallel_size {settings.tensor_parallel_size}: only "
                                 f"{gpus} GPU(s) are visible here")


def _settings(settings: VLLMConfig | dict | None) -> VLLMConfig:
    if settings is None:
        return VLLMConfig()
    return settings if isinstance(settings, VLLMConfig) else VLLMConfig.model_validate(settings)


def llm_kwargs(model_path: str, settings: VLLMConfig, precision: str = "auto") -> dict:
    """The keyword arguments of ``vllm.LLM`` for `model_path` under `settings` (``sampling.vllm``)."""
    dtype = settings.dtype if settings.dtype != "auto" else VLLM_DTYPES.get(precision, "auto")
    kwargs = dict(
        model=model_path,
        tensor_parallel_size=settings.tensor_parallel_size,
        dtype=dtype,
        gpu_memory_utilization=settings.gpu_memory_utilization,
        enable_prefix_caching=settings.enable_prefix_caching,
        # score probabilities: logprobs after the allowed_token_ids mask (see the module docstring, step 2)
        logprobs_mode="processed_logprobs",
        trust_remote_code=False,
        seed=0,  # the engine's default stream; every request carries its own seed
    )
    if settings.max_model_len is not None:
        kwargs["max_model_len"] = settings.max_model_len
    return kwargs


def result_regex(labels: Sequence[int | str]) -> str:
    """What structured outputs let a free text be: anything, ending in " [RESULT] k" (k one of `labels`)."""
    return r"[\s\S]*" + re.escape(f" {RESULT_MARKER} ") + "[" + "".join(map(str, labels)) + "]"


class VLLMSampler(ChatJudge):
    """Judgments drawn by vLLM's offline engine; see the module docstring. ``generate`` submits all given
    prompts x n as one batch of requests (vLLM schedules them itself)."""

    def __init__(self, model_path: str, settings: VLLMConfig | dict | None = None, precision: str = "auto"):
        from transformers import AutoTokenizer, GenerationConfig
        from vllm import LLM

        self.model_name = model_path
        self.settings = _settings(settings)
        self.tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=False)
        try:
            generation_config = GenerationConfig.from_pretrained(model_path)
        except (OSError, ValueError):  # no generation_config.json: the tokenizer's EOS only
            generation_config = None
        self.stop_ids = stop_token_ids(self.tokenizer, generation_config)
        self.score_tokens = find_score_tokens(self.tokenizer)
        self._verdict_tokens: ScoreTokens | None = None
        self._token_texts: dict[int, str] = {}
        self.llm_kwargs = llm_kwargs(model_path, self.settings, precision)
        self.llm = LLM(**self.llm_kwargs)
        self.precision = self._precision()

    def _precision(self) -> str | None:
        """What the engine computes in (recorded with every judgment, as the transformers backend does)."""
        dtype = getattr(getattr(self.llm, "model_config", None), "dtype", None)
        if dtype in _TORCH_DTYPE_NAMES:
            return _TORCH_DTYPE_NAMES[dtype]
        return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(self.llm_kwargs["dtype"])

    # ------------------------------------------------------------------ public: ChatJudge.generate

    def _judge(self, prompt_ids: list[list[int]], n: int, params: SamplingParams, st: ScoreTokens,
               seeds: Sequence[Sequence[int]], progress: bool, t0: float,
               completes=None) -> list[list[Sample]]:
        # `completes` (params.score_completion) is not used: vLLM judgments carry no reference log-probs, so
        # DPO computes them in one batched pass before training.
        from vllm import TokensPrompt

        keys = [(i, j) for i in range(len(prompt_ids)) for j in range(n)]
        rows = [_Row(seed=int(seeds[i][j]), generator=torch.Generator().manual_seed(int(seeds[i][j])))
                for i, j in keys]

        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=prompt_ids[i]) for i, _ in keys],
                                    [self._free_params(params, st, row.seed) for row in rows], use_tqdm=progress)
        self._check_outputs(outputs, len(keys), "free text")
        probes = [self._end_free(row, out.outputs[0], params, st) for row, out in zip(rows, outputs)]

        wanted = [k for k, tail in enumerate(probes) if tail is not None]
        if wanted:
            probe_outputs = self.llm.generate(
                [TokensPrompt(prompt_token_ids=prompt_ids[keys[k][0]] + probes[k]) for k in wanted],
                [self._probe_params(st, rows[k].seed) for k in wanted], use_tqdm=progress)
            self._check_outputs(probe_outputs, len(wanted), "score probe")
            for k, out in zip(wanted, probe_outputs):
                self._close(rows[k], self._probe_probs(out.outputs[0], st), params)

        share = (time.perf_counter() - t0) / len(rows)
        return [
            [sample_from_row(rows[i * n + j], params, st, len(prompt_ids[i]), share) for j in range(n)]
            for i in range(len(prompt_ids))
        ]

    # ------------------------------------------------------------------ requests

    def _free_params(self, params: SamplingParams, st: ScoreTokens, seed: int):
        from vllm import SamplingParams as VLLMParams

        labels = _labels(params.mode)
        kwargs = dict(
            n=1,
            seed=seed,
            temperature=params.temperature,
            top_p=params.top_p if params.temperature > 0 else 1.0,
            max_tokens=params.max_new_tokens,
            repetition_penalty=params.repetition_penalty,
            stop_token_ids=sorted(self.stop_ids),
            stop=[f"{RESULT_MARKER} {label}" for label in labels],  # stop after a written result...
            include_stop_str_in_output=True,  # ...keeping it
            skip_special_tokens=True,
        )
        if self.settings.structured_outputs:
            from vllm.sampling_params import StructuredOutputsParams

            kwargs["structured_outputs"] = StructuredOutputsParams(regex=result_regex(labels))
        return VLLMParams(**kwargs)

    def _probe_params(self, st: ScoreTokens, seed: int):
        from vllm import SamplingParams as VLLMParams

        return VLLMParams(n=1, seed=seed, temperature=1.0, top_p=1.0, max_tokens=1,
                          allowed_token_ids=list(st.score_ids), logprobs=len(st.score_ids))

    @staticmethod
    def _check_outputs(outputs, expected: int, what: str) -> None:
        if len(outputs) != expected or any(len(o.outputs) != 1 for o in outputs):
            raise RuntimeError(f"vLLM returned {len(outputs)} {what} outputs for {expected} requests of n=1")

    # ------------------------------------------------------------------ per judgment

    def _end_free(self, row: _Row, completion, params: SamplingParams, st: ScoreTokens) -> list[int] | None:
        """Take a judgment's free text from its completion, parse it, and say where to probe: the tokens
        after the prompt up to the score position (None: no probe)."""
        tokens = list(completion.token_ids)
        if tokens and tokens[-1] in self.stop_ids:  # the stop token ends the text, it is not part of it
            tokens.pop()
            row.hit_budget = False
        else:
            row.hit_budget = completion.finish_reason == "length"
        # The first result written in token space ends the text (the transformers loop stops there).
        for k in range(1, len(tokens)):
            if tokens[k] in st.score_ids and self._at_marker(tokens[:k], st):
                tokens, row.free_score_token, row.hit_budget = tokens[:k + 1], tokens[k], False
                break
        row.tokens = tokens
        row.judgment = parse_judgment(self.tokenizer.decode(tokens, skip_special_tokens=True),
                                      truncated=row.hit_budget, mode=params.mode)
        if row.free_score_token is not None:  # closed itself: P(score) where it wrote the digit
            return tokens[:-1]
        # Where the free text last completed the marker (what the transformers loop records as it goes; a
        # marker right at the budget's end is not, there the probe below reads it).
        ends = len(tokens) - 1 if row.hit_budget else len(tokens)
        last_mark = next((k for k in range(ends, 0, -1) if self._at_marker(tokens[:k], st)), None)
        if params.force_score and not (_valid_score(row.judgment, _labels(params.mode)) and last_mark is not None):
            marker = [] if self._at_marker(tokens, st) else list(st.marker_ids)
            row.probe_tokens = len(marker)
            row.state = "force"  # _close draws a result unless the text has a valid one
            return tokens + marker
        if last_mark is not None:
            return tokens[:last_mark]
        return None

    def _probe_probs(self, completion, st: ScoreTokens) -> list[float]:
        """P(label) for the labels of `st`, from the probe's logprobs at its one position."""
        logprobs = completion.logprobs[0] if completion.logprobs else {}
        missing = [i for i in st.score_ids if i not in logprobs]
        if missing:
            raise RuntimeError(f"vLLM's score probe returned logprobs for {sorted(logprobs)}, not for the score "
                               f"tokens {list(st.score_ids)}: the engine needs logprobs_mode='processed_logprobs'")
        values = [logprobs[i].logprob for i in st.score_ids]
        top = max(values)
        weights = [math.exp(v - top) for v in values]
        return [w / sum(weights) for w in weights]

    @staticmethod
    def _close(row: _Row, probs: list[float], params: SamplingParams) -> None:
        row.score_probs = probs
        if row.state == "force" and not _valid_score(row.judgment, _labels(params.mode)):
            row.forced_score = _labels(params.mode)[draw_label(probs, params.temperature, row.generator)]
        row.state = "done"

    def _at_marker(self, tokens: list[int], st: ScoreTokens) -> bool:
        return ends_with_marker(self.tokenizer, tokens, st, self._token_text)

    def _token_text(self, token: int) -> str:
        text = self._token_texts.get(token)
        if text is None:
            text = self._token_texts[token] = self.tokenizer.decode([token])
        return text
