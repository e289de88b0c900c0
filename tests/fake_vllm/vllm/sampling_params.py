"""vllm.sampling_params: SamplingParams with vLLM's field names and defaults, checked as vLLM checks them;
an unknown keyword is a TypeError (as msgspec's "Unexpected keyword argument"), so a misspelled or a
not-yet-existing field fails the test that uses it.

The fields are those present throughout the range pyproject's gpu extra pins; newer additions
(logprob_token_ids, flat_logprobs, thinking_token_budget, ...) are left out on purpose: selfrat must not
depend on them."""

from dataclasses import dataclass, fields
from enum import Enum
from typing import Any

_SAMPLING_EPS = 1e-5


class RequestOutputKind(Enum):
    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass
class StructuredOutputsParams:
    """vLLM >= 0.12 (guided decoding before): exactly one constraint."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_additional_properties: bool = False
    whitespace_pattern: str | None = None
    structural_tag: str | None = None

    def __post_init__(self):
        count = sum(getattr(self, f) is not None
                    for f in ("json", "regex", "choice", "grammar", "json_object", "structural_tag"))
        if count != 1:
            raise ValueError(f"You must use exactly one kind of structured outputs constraint, got {count}")


@dataclass(kw_only=True)
class _Fields:
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    detokenize: bool = True
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    structured_outputs: StructuredOutputsParams | None = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    extra_args: dict[str, Any] | None = None
    bad_words: list[str] | None = None


FIELDS = tuple(f.name for f in fields(_Fields))


class SamplingParams(_Fields):
    def __init__(self, **kwargs):
        unknown = sorted(set(kwargs) - set(FIELDS))
        if unknown:
            raise TypeError(f"Unexpected keyword argument {unknown[0]!r} (SamplingParams has no such field)")
        super().__init__(**kwargs)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._verify()
        if self.temperature < _SAMPLING_EPS:  # greedy: vLLM resets the sampling knobs
            self.top_p, self.top_k, self.min_p = 1.0, 0, 0.0

    def _verify(self) -> None:
        def check(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)
        check(isinstance(self.n, int) and self.n >= 1, f"n must be at least 1, got {self.n}.")
        check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2]")
        check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2]")
        check(self.repetition_penalty > 0.0, "repetition_penalty must be greater than zero")
        check(self.temperature >= 0.0, "temperature must be non-negative")
        check(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}.")
        check(self.top_k >= -1, "top_k must be -1 (disable), 0 (disable) or at least 1")
        check(0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]")
        check(self.max_tokens is None or self.max_tokens >= 1, f"max_tokens must be at least 1, got {self.max_tokens}.")
        check(self.seed is None or isinstance(self.seed, int), "seed must be an int or None")
        check(self.logprobs is None or self.logprobs == -1 or self.logprobs >= 0, "logprobs must be non-negative")
        check(all(isinstance(t, int) for t in self.stop_token_ids), "stop_token_ids must be ints")
        check(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings")
        if self.allowed_token_ids is not None:
            check(len(self.allowed_token_ids) > 0 and all(isinstance(t, int) for t in self.allowed_token_ids),
                  "allowed_token_ids is not None and empty!")
        check(self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputsParams),
              "structured_outputs must be a StructuredOutputsParams")

    def __repr__(self) -> str:
        return "SamplingParams(" + ", ".join(f"{f}={getattr(self, f)!r}" for f in FIELDS) + ")"
