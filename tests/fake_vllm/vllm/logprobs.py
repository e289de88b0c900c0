"""vllm.logprobs: one entry of a position's logprobs dict (token id -> Logprob)."""

from dataclasses import dataclass


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


# per generated position: {token_id: Logprob} (the top `logprobs` tokens, plus the sampled one)
SampleLogprobs = list[dict[int, Logprob]]
PromptLogprobs = list[dict[int, Logprob] | None]
