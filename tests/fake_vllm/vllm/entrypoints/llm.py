"""vllm.entrypoints.llm.LLM (exported as vllm.LLM): the offline engine. The constructor's explicit keyword
parameters are vLLM's; `**kwargs` go to EngineArgs, of which the fake knows the fields listed in
ENGINE_ARGS (any other name is a TypeError, as EngineArgs(...) would raise for a misspelled one)."""

from __future__ import annotations

import inspect
import itertools
import math
import random
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

from vllm import _fake
from vllm.inputs import TOKENS_PROMPT_KEYS
from vllm.logprobs import Logprob
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import SamplingParams

# EngineArgs fields the fake accepts through **kwargs, with a check of the value.
ENGINE_ARGS: dict[str, Callable[[Any], bool]] = {
    "max_model_len": lambda v: v is None or (isinstance(v, int) and v > 0),
    "enable_prefix_caching": lambda v: v is None or isinstance(v, bool),
    "logprobs_mode": lambda v: v in ("raw_logprobs", "raw_logits", "processed_logprobs", "processed_logits"),
    "max_logprobs": lambda v: isinstance(v, int),
    "max_num_seqs": lambda v: v is None or (isinstance(v, int) and v > 0),
    "max_num_batched_tokens": lambda v: v is None or (isinstance(v, int) and v > 0),
    "enable_chunked_prefill": lambda v: v is None or isinstance(v, bool),
    "disable_log_stats": lambda v: isinstance(v, bool),
    "generation_config": lambda v: isinstance(v, str),
    "pipeline_parallel_size": lambda v: isinstance(v, int) and v >= 1,
    "distributed_executor_backend": lambda v: v in (None, "mp", "ray", "uni", "external_launcher"),
    "kv_cache_dtype": lambda v: isinstance(v, str),
    "block_size": lambda v: v is None or isinstance(v, int),
}
DTYPES = ("auto", "half", "float16", "bfloat16", "float", "float32")


def _signature(
    model: str,
    *,
    runner: str = "auto",
    convert: str = "auto",
    tokenizer: str | None = None,
    tokenizer_mode: str = "auto",
    skip_tokenizer_init: bool = False,
    trust_remote_code: bool = False,
    allowed_local_media_path: str = "",
    allowed_media_domains: list[str] | None = None,
    tensor_parallel_size: int = 1,
    dtype: str = "auto",
    quantization: str | None = None,
    revision: str | None = None,
    tokenizer_revision: str | None = None,
    seed: int = 0,
    gpu_memory_utilization: float = 0.9,
    swap_space: float = 4,
    cpu_offload_gb: float = 0,
    enforce_eager: bool = False,
    enable_return_routed_experts: bool = False,
    disable_custom_all_reduce: bool = False,
    hf_token: bool | str | None = None,
    hf_overrides: Any = None,
    mm_processor_kwargs: dict[str, Any] | None = None,
    pooler_config: Any = None,
    structured_outputs_config: Any = None,
    profiler_config: Any = None,
    attention_config: Any = None,
    kv_cache_memory_bytes: int | None = None,
    compilation_config: Any = None,
    logits_processors: list | None = None,
    **kwargs: Any,
) -> None:
    """LLM.__init__'s parameters in vLLM (model positional, the rest keyword-only; **kwargs: EngineArgs)."""


_SIGNATURE = inspect.signature(_signature)


class LLM:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        import torch
        from transformers import AutoTokenizer

        bound = _SIGNATURE.bind(*args, **kwargs)  # TypeError: a second positional, or no model
        self.kwargs = dict(bound.arguments) | bound.arguments.get("kwargs", {})  # exactly what was passed
        self.kwargs.pop("kwargs", None)
        bound.apply_defaults()
        a = dict(bound.arguments)
        engine = a.pop("kwargs")
        unknown = sorted(set(engine) - set(ENGINE_ARGS))
        if unknown:
            raise TypeError(f"EngineArgs.__init__() got an unexpected keyword argument {unknown[0]!r}")
        bad = [k for k, v in engine.items() if not ENGINE_ARGS[k](v)]
        if bad:
            raise ValueError(f"invalid EngineArgs value {bad[0]}={engine[bad[0]]!r}")
        if not isinstance(a["tensor_parallel_size"], int) or a["tensor_parallel_size"] < 1:
            raise ValueError(f"tensor_parallel_size must be a positive int, got {a['tensor_parallel_size']!r}")
        if not 0 < a["gpu_memory_utilization"] <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {a['gpu_memory_utilization']}")
        if a["dtype"] not in DTYPES:
            raise ValueError(f"Unknown dtype: {a['dtype']!r}")
        self.logprobs_mode = engine.get("logprobs_mode", "raw_logprobs")
        self.max_logprobs = engine.get("max_logprobs", 20)
        self.max_model_len = engine.get("max_model_len")
        self.tokenizer = AutoTokenizer.from_pretrained(a["tokenizer"] or a["model"],
                                                       trust_remote_code=a["trust_remote_code"])
        torch_dtype = {"half": torch.float16, "float16": torch.float16, "float": torch.float32,
                       "float32": torch.float32}.get(a["dtype"], torch.bfloat16)  # auto: as on a bf16 GPU
        self.model_config = SimpleNamespace(model=a["model"], dtype=torch_dtype,
                                            max_model_len=self.max_model_len or 8192)
        self.calls: list[dict] = []
        self._ids = itertools.count()
        _fake.LLMS.append(self)
        _fake.log({"event": "llm", "kwargs": self.kwargs})

    def get_tokenizer(self):
        return self.tokenizer

    def generate(
        self,
        prompts,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool | Callable = True,
        lora_request: Any = None,
        priority: list[int] | None = None,
        tokenization_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        prompts = [prompts] if isinstance(prompts, (str, dict)) else list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params = (list(sampling_params) if isinstance(sampling_params, Sequence)
                  else [sampling_params] * len(prompts))
        if len(params) != len(prompts):
            raise ValueError(f"The lengths of prompts ({len(prompts)}) and sampling_params ({len(params)}) "
                             "must be the same.")
        for p in prompts:
            if not isinstance(p, dict) or "prompt_token_ids" not in p:
                raise TypeError(f"the fake takes TokensPrompt prompts only (selfrat sends token ids), got {p!r:.80}")
            extra = set(p) - TOKENS_PROMPT_KEYS
            if extra:
                raise TypeError(f"TokensPrompt has no keys {sorted(extra)}")
            if not p["prompt_token_ids"] or not all(isinstance(t, int) for t in p["prompt_token_ids"]):
                raise ValueError("prompt_token_ids must be a non-empty list of ints")
        for sp in params:
            if not isinstance(sp, SamplingParams):
                raise TypeError(f"sampling_params must be vllm.SamplingParams, got {type(sp).__name__}")
            if sp.logprobs is not None and sp.logprobs > self.max_logprobs:
                raise ValueError(f"Requested sample logprobs of {sp.logprobs}, which is greater than max "
                                 f"allowed: {self.max_logprobs}")
            vocab = len(self.tokenizer)
            if sp.allowed_token_ids is not None and not all(0 <= t < vocab for t in sp.allowed_token_ids):
                raise ValueError("allowed_token_ids contains out-of-vocab token id!")
        self.calls.append({"prompts": prompts, "params": params, "use_tqdm": use_tqdm})
        _fake.log({"event": "generate", "requests": len(prompts), "seeds": [sp.seed for sp in params],
                   "max_tokens": [sp.max_tokens for sp in params]})
        _fake.maybe_hang()
        out = []
        for p, sp in zip(prompts, params):
            ids = list(p["prompt_token_ids"])
            if self.max_model_len is not None and len(ids) >= self.max_model_len:
                raise ValueError(f"The decoder prompt (length {len(ids)}) is longer than the maximum model "
                                 f"length of {self.max_model_len}.")
            completions = [self._complete(ids, sp, i) for i in range(sp.n)]
            out.append(RequestOutput(request_id=str(next(self._ids)), prompt=p.get("prompt"), prompt_token_ids=ids,
                                     prompt_logprobs=None, outputs=completions, finished=True,
                                     num_cached_tokens=0))
        return out

    # ------------------------------------------------------------------ the scripted model

    def _complete(self, ids: list[int], sp: SamplingParams, index: int) -> CompletionOutput:
        model = _fake.model()
        if sp.allowed_token_ids is not None:  # one position, its distribution masked to the allowed ids
            if sp.max_tokens != 1:
                raise NotImplementedError("the fake answers allowed_token_ids for max_tokens=1 only")
            return self._one_token(ids, sp, model)
        script = list(model.free_tokens(ids, sp, index, self.tokenizer)) + [self.tokenizer.eos_token_id]
        stops = set(sp.stop_token_ids) | ({self.tokenizer.eos_token_id} if not sp.ignore_eos else set())
        out: list[int] = []
        finish, reason, text = None, None, None
        for tok in script:
            out.append(tok)
            if tok in stops and len(out) > sp.min_tokens:
                finish = "stop"
                reason = tok if tok in sp.stop_token_ids and tok != self.tokenizer.eos_token_id else None
                break
            decoded = self._decode(out, sp)
            hit = [(decoded.find(s), s) for s in sp.stop if s in decoded]
            if hit:
                at, s = min(hit)
                finish, reason = "stop", s
                text = decoded[: at + len(s)] if sp.include_stop_str_in_output else decoded[:at]
                break
            if sp.max_tokens is not None and len(out) >= sp.max_tokens:
                finish = "length"
                break
        if text is None:
            text = self._decode(out, sp)
        logprobs = None
        if sp.logprobs is not None:  # the scripted token is certain
            logprobs = [{t: Logprob(0.0, 1, self.tokenizer.decode([t]))} for t in out]
        return CompletionOutput(index=index, text=text, token_ids=out, cumulative_logprob=0.0 if logprobs else None,
                                logprobs=logprobs, finish_reason=finish, stop_reason=reason)

    def _one_token(self, ids: list[int], sp: SamplingParams, model) -> CompletionOutput:
        named = model.next_token_logits(ids, self.tokenizer)
        allowed = list(dict.fromkeys(sp.allowed_token_ids))
        masked = {t: float(named.get(t, _fake.FLOOR_LOGIT)) for t in allowed}
        processed = _log_softmax(masked)
        if sp.temperature < 1e-5:
            token = max(processed, key=processed.get)
        else:
            rng = random.Random(sp.seed)
            token = rng.choices(list(processed), weights=[math.exp(v) for v in processed.values()])[0]
        logprobs = None
        if sp.logprobs is not None:
            if self.logprobs_mode == "processed_logprobs":
                dist = processed
            else:  # raw: before the mask, over the whole vocabulary (unnamed tokens at the floor logit)
                full = {t: float(v) for t, v in named.items()}
                floor_ids = [t for t in range(len(self.tokenizer)) if t not in full][: max(sp.logprobs, 1)]
                full.update({t: _fake.FLOOR_LOGIT for t in floor_ids})
                rest = (len(self.tokenizer) - len(full)) * math.exp(_fake.FLOOR_LOGIT)
                dist = _log_softmax(full, extra_mass=rest)
            ranked = sorted(dist, key=lambda t: -dist[t])
            top = ranked[: sp.logprobs]
            entry = {t: Logprob(dist[t], ranked.index(t) + 1, self.tokenizer.decode([t])) for t in top}
            if token not in entry:
                entry[token] = Logprob(dist.get(token, -math.inf), ranked.index(token) + 1 if token in dist else None,
                                       self.tokenizer.decode([token]))
            logprobs = [entry]
        return CompletionOutput(index=0, text=self.tokenizer.decode([token]), token_ids=[token],
                                cumulative_logprob=None, logprobs=logprobs, finish_reason="length")

    def _decode(self, tokens: list[int], sp: SamplingParams) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=sp.skip_special_tokens)


def _log_softmax(logits: dict[int, float], extra_mass: float = 0.0) -> dict[int, float]:
    top = max(logits.values())
    z = sum(math.exp(v - top) for v in logits.values()) + extra_mass * math.exp(-top)
    return {t: v - top - math.log(z) for t, v in logits.items()}

