"""Drawing judgments from a judge: N samples per prompt, reproducible per sample, with score probabilities.

A ``Sampler`` takes chat prompts and returns ``[input][sample]`` lists of ``Sample``. Backends:
- ``TransformersSampler``: a custom decode loop on transformers (CPU or GPU), see below;
- ``FakeSampler``: a scripted backend for tests (no model);
- ``VLLMSampler`` (engine/vllm_sampler.py): vLLM's offline engine (GPU), the same samples as the transformers
  loop (the score marker, forcing and score probabilities as below); ``make_sampler("vllm", ...)`` raises
  ``BackendUnavailable`` where vllm is not installed or no GPU is visible.

    sampler = make_sampler("transformers", model_path)
    seeds = [[judgment_seed(0, item_id, j) for j in range(4)] for item_id in ids]
    samples = sampler.generate(prompts, n=4, params=SamplingParams(force_score=True), seeds=seeds)

Why not ``model.generate``: it can give none of the three things the loop below does.
1. Shared prefill. Each prompt is prefilled once (a left-padded batch of B prompts, 256 columns per
   forward), and its N samples decode over that one cache: each step reads a prompt's keys once for its N
   rows (engine/cascade.py; where that does not apply, the cache is repeated to B*N rows). Prefill
   dominates on CPU (a 470-token judge prompt costs SmolLM2-135M ~3.5 s), so N samples cost about one
   prefill, not N. Distinct prompts of a batch that share a long token prefix (a meta-judge's ratings of one
   response, the template header) compute it once too (``prefix_groups``, ``TransformersSampler._prefill``).
2. Per-sample seeds. Every row draws from its own ``torch.Generator``, one draw per free step, so a
   judgment is reproduced from its stored seed whatever else was in the batch. Tokens are drawn by an
   exponential race (argmax p_i / E_i, E_i ~ Exp(1)), which is exact multinomial sampling and, unlike an
   inverse-CDF draw, does not flip on the last-bit differences that batch padding causes in the logits.
3. Score forcing and score probabilities. When a row's text ends with the result marker (" [RESULT] "),
   the model's distribution over the five score tokens at the next position is recorded
   (``score_probs``, raw logits renormalised over "1".."5"). A row that ends (EOS or budget) with no
   recorded score position is, under ``force_score``, teacher-forced through " [RESULT] " in the same KV
   cache while the other rows keep generating; if its free text had no valid score, the score is drawn
   from those five probabilities (``forced=True``). A row stops as soon as it writes a score digit after
   the marker (so a "[RESULT] 10" would end as "[RESULT] 1"; the prompt asks for an integer 1-5).

Relative mode (``SamplingParams(mode="relative")``, A/B judging): the same loop with the verdicts "A"/"B" in
place of the five scores: the text is parsed as relative, ``score_probs`` is [P(A), P(B)], forcing closes
it with " [RESULT] A|B", and the result is ``Sample.verdict`` (``score`` stays None).
"""

from __future__ import annotations

import hashlib
import inspect
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, Protocol

import torch

from engine.parsing import Judgment, ParseStatus, parse_judgment
from engine.prompts import RESULT_MARKER
from store.errors import SelfratError

SCORES = (1, 2, 3, 4, 5)
VERDICTS = ("A", "B")  # relative mode: the better response, as the judge names it


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 => greedy
    top_p: float = 0.9  # nucleus mass; 1.0 = off
    max_new_tokens: int = 256  # budget for the free text (the forced " [RESULT] k" comes on top)
    repetition_penalty: float = 1.0  # HF/vLLM semantics over prompt + generated tokens; 1.0 = off
    force_score: bool = False  # close a rationale that lacks a valid score with " [RESULT] k"
    mode: Literal["absolute", "relative"] = "absolute"  # relative: the result is a verdict "A"/"B", not 1-5
    # Also score each judgment as the DPO trainer will see it (Sample.ref_logp): training then needs no
    # reference pass when the sampling model is the DPO reference (`training.reference: previous`).
    score_completion: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("absolute", "relative"):
            raise ValueError(f"mode must be 'absolute' or 'relative', got {self.mode!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


@dataclass
class Sample:
    text: str  # final judgment text (free text, plus " [RESULT] k" when the score was forced)
    raw_text: str  # exactly what the model generated freely (special tokens stripped)
    rationale: str
    score: int | None  # parsed score, else the forced score when force_score, else None; None in relative mode
    parse_status: str  # ParseStatus value of parse_judgment(raw_text, truncated=hit_budget, mode=mode)
    forced: bool
    # P(score=1..5) at the score position (relative mode: [P(A), P(B)]); None: no marker, no forcing
    score_probs: list[float] | None
    prompt_tokens: int
    completion_tokens: int  # tokens of `text` after the prompt (free tokens, + marker and score if forced)
    latency_s: float  # this sample's share of its batch's wall time
    seed: int
    verdict: str | None = None  # relative mode: "A"/"B" as for `score` (parsed, else forced); None in absolute
    # With params.score_completion: log P(completion | prompt) under the model's unmodified distribution (no
    # temperature, top-p or repetition penalty; forced tokens included), summed over the completion tokens as
    # the DPO trainer tokenizes `text` (chat template, end-of-turn tail included); ref_tokens: how many. None
    # where the backend cannot score or the template does not re-tokenize to the same context.
    ref_logp: float | None = None
    ref_tokens: int | None = None


class Sampler(Protocol):
    model_name: str

    def generate(
        self,
        prompts: Sequence[list[dict]],
        n: int,
        params: SamplingParams,
        seeds: Sequence[Sequence[int]],
        progress: bool = False,
    ) -> list[list[Sample]]:
        """prompts: chat messages per input; seeds[i][j] seeds sample j of prompt i; returns [input][sample]."""
        ...


def judgment_seed(base_seed: int, key: str, sample_index: int) -> int:
    """A stable seed in [0, 2**31) for sample `sample_index` of `key` (e.g. "item-17/a") under `base_seed`."""
    digest = hashlib.blake2b(f"{base_seed}\x1f{key}\x1f{sample_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % (2**31)


def _check_seeds(prompts: Sequence, n: int, seeds: Sequence[Sequence[int]]) -> None:
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if len(seeds) != len(prompts) or any(len(s) != n for s in seeds):
        raise ValueError(f"seeds must be {len(prompts)} lists of {n} seeds (one per prompt and sample)")


def _labels(mode: str) -> tuple:
    """What the token after the result marker can be: the five scores, or the two verdicts."""
    return VERDICTS if mode == "relative" else SCORES


def _valid_score(j: Judgment, labels: tuple = SCORES) -> bool:
    # parse_judgment has already checked the range; `labels` guards against a mode mix-up.
    return j.status is ParseStatus.OK and not isinstance(j.score, bool) and j.score in labels


def _split_result(result: int | str | None, mode: str) -> tuple[int | None, str | None]:
    """(score, verdict) for a Sample: the result goes to the field of the mode, the other stays None."""
    return (None, result) if mode == "relative" else (result, None)


def _forced_text(raw_text: str, score: int | str) -> str:
    """The free text closed with " [RESULT] k" (just " k" when it already ends with the marker)."""
    text = raw_text.rstrip()
    if text.endswith(RESULT_MARKER):
        return f"{text} {score}"
    return f"{text} {RESULT_MARKER} {score}" if text else f"{RESULT_MARKER} {score}"


# ------------------------------------------------------------------------------------------ score tokens


@dataclass(frozen=True)
class ScoreTokens:
    """How this tokenizer writes " [RESULT] k": the marker's ids and one single-token id per label (the
    scores 1..5, or the verdicts A, B)."""

    marker: str  # " [RESULT] " (digits follow directly) or " [RESULT]" (scores are " 1".." 5")
    marker_ids: tuple[int, ...]
    score_ids: tuple[int, ...]  # one id per label, in order: scores 1..5 (absolute) or A, B (relative)

    @property
    def tail(self) -> str:
        """What decoded free text ends with right before the score: the marker without its lead space."""
        return self.marker.lstrip()


def find_score_tokens(tokenizer, labels: Sequence[int | str] = SCORES) -> ScoreTokens:
    """Work out the marker and the token ids of `labels` (default: scores 1..5; ``VERDICTS`` for A/B) from
    the tokenizer (no model-specific constants)."""

    def enc(s: str) -> list[int]:
        return list(tokenizer.encode(s, add_special_tokens=False))

    # Preferred: " [RESULT] " then a bare label token (SmolLM2, Llama-3: digits are single tokens).
    # Fallback: " [RESULT]" then " k" as one token (tokenizers that merge the space into the label; SmolLM2
    # does so for letters: " [RESULT] A" ends in the token " A").
    for marker, score_text in ((f" {RESULT_MARKER} ", "{k}"), (f" {RESULT_MARKER}", " {k}")):
        marker_ids = enc(marker)
        score_ids = []
        for k in labels:
            full = enc(marker + score_text.format(k=k))
            if full[: len(marker_ids)] == marker_ids and len(full) == len(marker_ids) + 1:
                score_ids.append(full[-1])
        if marker_ids and len(set(score_ids)) == len(labels):
            return ScoreTokens(marker, tuple(marker_ids), tuple(score_ids))
    example = f" {RESULT_MARKER} {labels[-1]}"
    raise ValueError(
        f"this tokenizer does not write {', '.join(map(str, labels))} after {RESULT_MARKER!r} as single tokens "
        f"(encode({example!r}) = {enc(example)}); score forcing needs them"
    )


# ------------------------------------------------------------------------ shared by every model backend


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Chat template with the generation prompt, as token ids (the template carries its own specials): how
    every model backend (transformers, vLLM) turns a judge prompt into the tokens it conditions on."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer.encode(text, add_special_tokens=False))


def stop_token_ids(tokenizer, generation_config=None) -> frozenset[int]:
    """Where free generation ends: the tokenizer's EOS, the generation config's EOS id(s), and ChatML's
    <|im_end|> when the vocabulary has it."""
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(generation_config, "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    return frozenset(i for i in ids if i is not None)


def completion_ids(tokenizer, messages: list[dict], prompt_ids: Sequence[int], text: str) -> list[int] | None:
    """The tokens TRL's DPO trainer trains on for `text` as the assistant's answer to `messages`: the chat
    template of the whole conversation after the templated prompt (so the end-of-turn tail, e.g. ChatML's
    "<|im_end|>\n", is included). None when the conversation does not start with `prompt_ids`, the context
    the judgment was sampled in (a template that renders the prompt differently alone)."""
    full = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": text}], tokenize=True,
                                         return_dict=True)["input_ids"]
    full = list(full[0] if full and isinstance(full[0], list) else full)
    n = len(prompt_ids)
    return full[n:] if full[:n] == list(prompt_ids) and len(full) > n else None


def ends_with_marker(tokenizer, tokens: Sequence[int], st: ScoreTokens, token_text=None) -> bool:
    """Whether the decoded `tokens` end with the result marker, i.e. the next position is the score position.
    `token_text(id)` (optional, e.g. a cache) decodes one token for the cheap pre-check."""
    if not tokens:
        return False
    last = token_text(tokens[-1]) if token_text else tokenizer.decode([tokens[-1]])
    if not last.endswith(st.tail[-1]):
        return False  # cheap pre-check: the last token must end like the marker
    tail = tokenizer.decode(list(tokens[-(len(st.marker_ids) + 2):]), skip_special_tokens=True)
    return tail.endswith(st.tail)


def draw_label(probs: Sequence[float], temperature: float, generator: torch.Generator) -> int:
    """The index of a forced result drawn from the probe's probabilities: argmax when greedy (temperature 0),
    else one multinomial draw from `generator` (the judgment's own, seeded with its seed)."""
    t = torch.tensor(list(probs), dtype=torch.float32, device=generator.device)
    if temperature == 0:
        return int(t.argmax())
    return int(torch.multinomial(t, 1, generator=generator).item())


# ------------------------------------------------------------------------------------- token selection


def _apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """HF semantics: a seen token's logit is divided by `penalty` if positive, multiplied if negative."""
    # logits: [R, V] float; seen: [R, V] bool
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


# A row whose nucleus fits in its top _FAST_K tokens (a trained model, almost always) is sampled among those
# alone; otherwise (near-flat distributions, e.g. random test models) over the whole vocabulary. The path
# is chosen per row, so a row's draws never depend on the other rows in its batch.
_FAST_K = 256


def _top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Mask (to -inf) the tokens outside each row's nucleus; as HF's TopPLogitsWarper, keeps >= 1 token."""
    sorted_logits, order = logits.sort(dim=-1)  # ascending: [R, V]
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cum <= (1 - top_p)
    drop_sorted[:, -1] = False  # the most likely token always stays
    drop = drop_sorted.scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _race(probs: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """Exponential race: argmax_i p_i / E_i with E_i ~ Exp(1) picks i with probability p_i / sum(p)."""
    # probs: [R, C]; each row consumes exactly C draws of its own generator
    noise = torch.empty_like(probs)
    for r, gen in enumerate(generators):
        noise[r].exponential_(generator=gen)
    return (probs / noise).argmax(dim=-1)


def _select_tokens(
    logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator]
) -> torch.Tensor:
    """One token per row: greedy when temperature == 0, else temperature + top_p + the row's generator."""
    # logits: [R, V] float32, repetition penalty already applied
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    out = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    fast = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    k = min(_FAST_K, logits.shape[-1])
    if params.top_p < 1 and k < logits.shape[-1]:
        top_logits, top_ids = logits.topk(k, dim=-1)  # [R, K], descending
        top_probs = (top_logits - logits.logsumexp(dim=-1, keepdim=True)).exp()  # true probabilities
        above = top_probs.cumsum(dim=-1) - top_probs  # mass strictly above each candidate
        fast = above[:, -1] + top_probs[:, -1] >= params.top_p  # the nucleus ends inside the top K
        if fast.any():
            rows = fast.nonzero().squeeze(1)
            kept = top_probs[rows].masked_fill(above[rows] >= params.top_p, 0.0)  # HF's nucleus, in the top K
            pick = _race(kept, [generators[r] for r in rows.tolist()])
            out[rows] = top_ids[rows].gather(1, pick[:, None]).squeeze(1)
    if not fast.all():
        rows = (~fast).nonzero().squeeze(1)
        slow = logits[rows]
        if params.top_p < 1:
            slow = _top_p_filter(slow, params.top_p)
        out[rows] = _race(slow.softmax(dim=-1), [generators[r] for r in rows.tolist()])
    return out


# ------------------------------------------------------------------------------------------- row state

FREE, PROBE, TAIL, DONE = "free", "probe", "tail", "done"


@dataclass
class _Row:
    """One sample being generated: its tokens and where it stands in the free -> probe -> done machine."""

    seed: int
    generator: torch.Generator
    tokens: list[int] = field(default_factory=list)  # freely generated tokens (stop token excluded)
    state: str = FREE
    hit_budget: bool = False
    at_score: bool = False  # the last fed token completed the marker: the next logits are the score position
    score_probs: list[float] | None = None
    queue: list[int] = field(default_factory=list)  # PROBE: marker tokens still to feed
    probe_tokens: int = 0  # marker tokens fed by the probe
    free_score_token: int | None = None  # the score digit the row wrote itself after the marker
    forced_score: int | str | None = None  # a score 1..5, or a verdict "A"/"B" in relative mode
    judgment: Judgment | None = None  # parse of the free text, set when free generation ends
    # params.score_completion: the completion as the DPO trainer tokenizes it (`target`, from `complete`),
    # the tokens fed after the prompt (`fed`), and log P of target[i] given the tokens before it (`lps`).
    complete: Callable[[str], list[int] | None] | None = None
    fed: list[int] = field(default_factory=list)
    lps: list[float] = field(default_factory=list)
    target: list[int] | None = None
    ref_logp: float | None = None


# ---------------------------------------------------------------------------------------- transformers


def prefix_groups(prompt_ids: Sequence[Sequence[int]], min_shared: int) -> list[tuple[int, list[int]]]:
    """Runs of consecutive prompts that share a token prefix worth computing once: [(prefix length,
    member indices)], [] when no sharing saves anything.

    Chosen to compute the fewest prompt tokens: a run of m prompts sharing p tokens saves (m - 1) * p, and a
    dynamic program over the runs picks the best split (so two items' meta-ratings in one batch share each
    item's long prefix, not only the header both items have). A prefix always leaves every member at least
    one token of its own, whose logits start the generation. Prompts in no run are absent."""
    b = len(prompt_ids)
    # best[j]: the most tokens saved over prompts[:j]; cut[j]: where the last run of that split starts
    best, cut, length = [0] * (b + 1), [0] * (b + 1), {}
    for j in range(1, b + 1):
        best[j], cut[j] = best[j - 1], j - 1  # prompt j-1 alone
        p = len(prompt_ids[j - 1]) - 1
        for i in range(j - 2, -1, -1):  # the run i..j-1
            p = min(p, len(os.path.commonprefix([prompt_ids[i], prompt_ids[j - 1]])), len(prompt_ids[i]) - 1)
            if p < min_shared:
                break  # a longer run only shares less
            saved = best[i] + (j - 1 - i) * p
            if saved > best[j]:
                best[j], cut[j], length[(i, j)] = saved, i, p
    groups, j = [], b
    while j > 0:
        i = cut[j]
        if (i, j) in length and j - i > 1:
            groups.append((length[(i, j)], list(range(i, j))))
        j = i
    return groups[::-1]


def _preallocated_cache(config, capacity: int):
    """A DynamicCache whose full-attention layers append in place into buffers of `capacity` positions.

    DynamicLayer appends with torch.cat, copying the whole cache every step; at 16 rows x 600 tokens that
    copy was ~45% of a SmolLM2 decode step on CPU. Other layer kinds (sliding window, ...) are kept as is."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    class SpareRoomLayer(DynamicLayer):
        # keys/values are views [R, H, len, D] into buffers [R, H, cap, D]; the buffers grow if ever full.
        def __init__(self, capacity: int):
            super().__init__()
            self.capacity = capacity
            self._k = self._v = None
            self._len = 0

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self._len + key_states.shape[-2]
            if self._k is None or end > self._k.shape[-2]:
                self._resize(key_states, max(end, self.capacity, 2 * self._len))
            self._k[:, :, self._len:end] = key_states
            self._v[:, :, self._len:end] = value_states
            self._len = end
            self._views()
            return self.keys, self.values

        def _resize(self, like, cap):
            shape = (like.shape[0], like.shape[1], cap, like.shape[3])
            k, v = like.new_empty(shape), like.new_empty(shape)
            if self._len:
                k[:, :, :self._len] = self._k[:, :, :self._len]
                v[:, :, :self._len] = self._v[:, :, :self._len]
            self._k, self._v = k, v

        def _views(self):
            self.keys, self.values = self._k[:, :, :self._len], self._v[:, :, :self._len]

        def batch_repeat_interleave(self, repeats):
            if self._len:
                self._k = self._k.repeat_interleave(repeats, dim=0)
                self._v = self._v.repeat_interleave(repeats, dim=0)
                self._views()

        def batch_select_indices(self, indices):
            if self._len:
                self._k, self._v = self._k[indices], self._v[indices]
                self._views()

        def crop(self, tokens_to_remove):
            raise NotImplementedError("not needed by the sampler")

    cache = DynamicCache(config=config)
    cache.layers = [SpareRoomLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


class ChatJudge:
    """What the real backends share: prompts go through the tokenizer's chat template, and the result tokens
    of a mode are found once. Subclasses set `tokenizer`, `score_tokens` and `_verdict_tokens = None`."""

    tokenizer: Any
    score_tokens: ScoreTokens
    _verdict_tokens: ScoreTokens | None

    def result_tokens(self, mode: str) -> ScoreTokens:
        """The marker and label tokens of `mode`: scores 1..5 (absolute) or verdicts A, B (relative)."""
        if mode != "relative":
            return self.score_tokens
        if self._verdict_tokens is None:
            self._verdict_tokens = find_score_tokens(self.tokenizer, VERDICTS)
        return self._verdict_tokens

    def encode_prompt(self, messages: list[dict]) -> list[int]:
        """Chat template with the generation prompt, as token ids (the template carries its own specials)."""
        return chat_prompt_ids(self.tokenizer, messages)

    def generate(self, prompts: Sequence[list[dict]], n: int, params: SamplingParams,
                 seeds: Sequence[Sequence[int]], progress: bool = False) -> list[list[Sample]]:
        """The `Sampler` protocol: checks, the chat-templated prompt ids, then the backend's `_judge`."""
        _check_seeds(prompts, n, seeds)
        if not prompts:
            return []
        t0 = time.perf_counter()
        st = self.result_tokens(params.mode)
        prompt_ids = [self.encode_prompt(m) for m in prompts]
        completes = None
        if params.score_completion:
            completes = [partial(completion_ids, self.tokenizer, m, p) for m, p in zip(prompts, prompt_ids)]
        return self._judge(prompt_ids, n, params, st, seeds, progress, t0, completes=completes)

    def _judge(self, prompt_ids: list[list[int]], n: int, params: SamplingParams, st: ScoreTokens,
               seeds: Sequence[Sequence[int]], progress: bool, t0: float,
               completes: Sequence[Callable[[str], list[int] | None]] | None = None) -> list[list[Sample]]:
        """[prompt][sample] judgments of already-encoded prompts (t0: when `generate` began, for latency).
        `completes[i](text)`: the completion ids of prompt i as the DPO trainer tokenizes `text` (with
        params.score_completion; a backend that cannot score leaves Sample.ref_logp None)."""
        raise NotImplementedError


class TransformersSampler(ChatJudge):
    """Judgments from a local/hub checkpoint with transformers; see the module docstring for the loop.

    ``generate`` runs all given prompts as one batch (B prompts -> B*n rows); callers chunk by batch size."""

    # Shared prefixes shorter than this are not worth a second forward; None turns prefix sharing off.
    min_shared_prefix: int | None = 32
    # The LM head's layout on CPU (engine/lm_head.py): "auto" times both once at load, "transposed" forces
    # (W @ h^T)^T, "model" keeps the model's own forward.
    head_layout: str = "auto"
    # Prompt tokens per prefill forward (None: a whole prompt at once); see `_prefill_forward`.
    prefill_chunk: int | None = 256
    # N samples of a prompt read its cache once per decode step (engine/cascade.py); False repeats it per row.
    cascade: bool = True

    def __init__(self, model_path: str, device: str = "auto", dtype: torch.dtype | None = None,
                 precision: str = "auto"):
        from engine.models import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(model_path, device=device, dtype=dtype, precision=precision)
        self._setup(model, tokenizer, model_path)

    @classmethod
    def from_loaded(cls, model, tokenizer, model_name: str = "loaded") -> "TransformersSampler":
        """Wrap a model and tokenizer already in memory (eval mode, pad token set)."""
        self = cls.__new__(cls)
        self._setup(model, tokenizer, model_name)
        return self

    def _setup(self, model, tokenizer, model_name: str) -> None:
        self.model_name = model_name
        self.model, self.tokenizer = model, tokenizer
        self.device = next(model.parameters()).device
        # recorded with every judgment: what `precision: auto` chose (logits are read in fp32 either way)
        self.precision = "bf16" if next(model.parameters()).dtype == torch.bfloat16 else "fp32"
        self.score_tokens = find_score_tokens(tokenizer)
        self._verdict_tokens: ScoreTokens | None = None  # found on first relative call: absolute needs none
        self.stop_ids = self._stop_ids()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._token_texts: dict[int, str] = {}
        # transformers 5.2x renamed forward's `past_key_values` to `cache`; accept either.
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._head = self._choose_head()  # (backbone, its cache keyword, head weight) or None: the model's forward
        self.prefill_tokens = 0  # prompt positions computed, shared prefixes once (what prefix sharing saves)

    @property
    def head(self) -> str:
        """The LM head's layout in use, for benches and logs: "transposed" or "model" (the model's forward)."""
        return "transposed" if self._head else "model"

    def _choose_head(self):
        from engine.lm_head import choose_layout, plain_head

        if self.head_layout not in ("auto", "transposed", "model"):
            raise ValueError(f"head_layout {self.head_layout!r}: expected auto, transposed or model")
        found = plain_head(self.model) if self.head_layout != "model" else None
        if found is None:
            return None
        backbone, weight = found
        if self.head_layout == "auto" and choose_layout(weight) != "transposed":
            return None
        params = inspect.signature(backbone.forward).parameters
        return backbone, "cache" if "cache" in params else "past_key_values", weight

    def _last_logits(self, cache, **inputs) -> torch.Tensor:
        """One forward over `inputs` that extends `cache`: the last position's logits [B, V] in fp32."""
        if self._head is None:
            out = self.model(**inputs, use_cache=True, logits_to_keep=1, **{self._cache_kw: cache})
            return out.logits[:, -1, :].float()
        from engine.lm_head import head_logits

        backbone, cache_kw, weight = self._head
        hidden = backbone(**inputs, use_cache=True, **{cache_kw: cache}).last_hidden_state[:, -1, :]
        return head_logits(weight, hidden, "transposed").float()

    def _stop_ids(self) -> frozenset[int]:
        return stop_token_ids(self.tokenizer, getattr(self.model, "generation_config", None))

    def _judge(self, prompt_ids: list[list[int]], n: int, params: SamplingParams, st: ScoreTokens,
               seeds: Sequence[Sequence[int]], progress: bool, t0: float,
               completes: Sequence[Callable[[str], list[int] | None]] | None = None) -> list[list[Sample]]:
        flat_seeds = [int(s) for per_prompt in seeds for s in per_prompt]
        rows = self._decode(prompt_ids, n, params, st, flat_seeds, progress, completes)
        share = (time.perf_counter() - t0) / len(rows)
        return [
            [self._to_sample(rows[i * n + j], params, st, len(prompt_ids[i]), share) for j in range(n)]
            for i in range(len(prompt_ids))
        ]

    # ------------------------------------------------------------------ the loop

    @torch.inference_mode()
    def _decode(
        self, prompt_ids: list[list[int]], n: int, params: SamplingParams, st: ScoreTokens, seeds: list[int],
        progress: bool, completes: Sequence[Callable[[str], list[int] | None]] | None = None,
    ) -> list[_Row]:
        # st: the result marker and label tokens of params.mode, used by every row's state machine
        dev = self.device
        rows = [_Row(seed=s, generator=torch.Generator(device=dev).manual_seed(s),
                     complete=completes[r // n] if completes else None) for r, s in enumerate(seeds)]

        # room for the free tokens and a probed " [RESULT] k" after the prompt
        # (+ the end-of-turn tail the completion is scored with; the cache grows if a template needs more)
        room = params.max_new_tokens + len(st.marker_ids) + 4
        cascade = n > 1 and self._can_cascade()
        logits, cache, mask, pos = self._prefill(prompt_ids, 0 if cascade else room)
        logits = logits.repeat_interleave(n, dim=0)  # [R=B*n, V]
        next_pos = pos[:, -1].repeat_interleave(n) + 1  # [R]
        shared, extra = None, {}
        if cascade:
            # The prompts' cache stays one row per prompt (engine/cascade.py); the rows' own tokens go to a
            # cache of their own (so the prompts' needs no room), and the mask covers those only.
            from engine.cascade import SharedPrompt

            shared = SharedPrompt.from_cache(cache, mask, n)
            cache, mask = _preallocated_cache(self.model.config, room), mask.new_zeros(len(rows), 0)
            extra = {"shared_prompt": shared}
        else:
            cache.batch_repeat_interleave(n)  # every layer's K/V: [B, ...] -> [R, ...]
            mask = mask.repeat_interleave(n, dim=0)  # [R, L]
        seen = None  # [R, V] bool: tokens in prompt + generation, for the repetition penalty
        if params.repetition_penalty != 1.0:
            seen = torch.zeros(len(prompt_ids), logits.shape[-1], dtype=torch.bool, device=dev)
            for b, p in enumerate(prompt_ids):
                seen[b, torch.tensor(p, device=dev)] = True
            seen = seen.repeat_interleave(n, dim=0)

        live = list(range(len(rows)))  # batch position -> row index (finished rows are compacted away)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=params.max_new_tokens, desc="decode", unit="tok", leave=False)
        step = 0
        while True:
            feed = self._advance([rows[i] for i in live], logits, params, st, seen)  # [R_live] token ids
            keep = [k for k, i in enumerate(live) if rows[i].state != DONE]
            if not keep:
                break
            if len(keep) < len(live):  # drop finished rows from the batch: later steps cost less
                sel = torch.tensor(keep, device=dev)
                cache.batch_select_indices(sel)
                if shared is not None:
                    shared.select(sel)
                feed, mask, next_pos = feed[sel], mask[sel], next_pos[sel]
                seen = seen[sel] if seen is not None else None
                live = [live[k] for k in keep]
            mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)  # [R_live, L + step + 1]
            with self._attention(shared):
                logits = self._last_logits(cache, input_ids=feed[:, None], attention_mask=mask,
                                           position_ids=next_pos[:, None], **extra)  # [R_live, V]
            next_pos = next_pos + 1
            step += 1
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        return rows

    def _prefill(self, prompt_ids: list[list[int]], room: int):
        """Prefill B prompts: (last-position logits [B, V] fp32, cache, mask [B, W], position ids [B, W]).

        Prompts that share a long token prefix (a meta-judge's N ratings of one item, the template's header)
        compute it once: the groups' prefixes run as one left-padded batch, each row's cache is then the
        copy of its group's, and the rest of every prompt runs after it, left-padded to its own width. The
        pads inside a row are masked and position ids count real tokens only, so every token sees exactly
        what it sees unshared. Otherwise: one left-padded batch, one forward."""
        groups = prefix_groups(prompt_ids, self.min_shared_prefix) if self._can_share_prefix() else []
        shared = {i: length for length, members in groups for i in members}  # row -> its prefix length
        r_ids, r_mask = self._left_pad([p[shared.get(i, 0):] for i, p in enumerate(prompt_ids)])  # [B, Wr]
        mask, prefix_tokens = r_mask, 0
        if groups:
            prefixes = [prompt_ids[members[0]][:length] for length, members in groups]
            p_ids, p_mask = self._left_pad(prefixes)  # [G, Wp]
            cache = _preallocated_cache(self.model.config, p_ids.shape[1] + r_ids.shape[1] + room)
            self._prefill_forward(cache, p_ids, p_mask, (p_mask.cumsum(-1) - 1).clamp(min=0), logits=False)
            # row -> its group's cache row; a row with no shared prefix takes any (all of it masked for the row)
            group_of = {i: g for g, (_length, members) in enumerate(groups) for i in members}
            index = torch.tensor([group_of.get(i, 0) for i in range(len(prompt_ids))], device=self.device)
            cache.batch_select_indices(index)
            p_mask = p_mask[index] * torch.tensor([i in shared for i in range(len(prompt_ids))],
                                                  device=self.device)[:, None]
            mask = torch.cat([p_mask, r_mask], dim=1)  # [B, Wp + Wr], pads at the left and between the parts
            prefix_tokens = sum(len(p) for p in prefixes)
        else:
            cache = _preallocated_cache(self.model.config, r_ids.shape[1] + room)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # real tokens at 0..len-1, whatever pads lie between
        logits = self._prefill_forward(cache, r_ids, mask, pos)
        self.prefill_tokens += prefix_tokens + int(r_mask.sum())
        return logits, cache, mask, pos

    def _prefill_forward(self, cache, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                         logits: bool = True) -> torch.Tensor | None:
        """Run `ids` [B, W], the last W columns of `mask` / `pos` [B, W'], into `cache`, `prefill_chunk`
        columns per forward; the last position's logits (fp32) when `logits`.

        Why chunks: a left-padded batch (or a prompt after a shared prefix) needs an explicit attention mask,
        and under one CPU's SDPA kernel computes every query x key block, the causal upper triangle included
        (the unmasked causal path skips it): a 4 x 1,000-token batch spent 1.7x the attention time of the
        same batch unpadded. Run in chunks, a chunk's keys end where it ends, so only each chunk's own
        triangle is wasted. Same attention as one forward (tests/test_sampling.py), only plain full-attention
        caches (sliding windows count their slots, see `_can_share_prefix`)."""
        w, offset = ids.shape[1], mask.shape[1] - ids.shape[1]
        chunked = self.prefill_chunk and self.device.type == "cpu" and self._plain_cache()  # a CPU kernel's cost
        step = self.prefill_chunk if chunked else w
        out = None
        for s in range(0, w, step):
            e = min(s + step, w)
            inputs = dict(input_ids=ids[:, s:e], attention_mask=mask[:, :offset + e],
                          position_ids=pos[:, offset + s:offset + e])
            if e < w or not logits:
                self._backbone_forward(cache, **inputs)
            else:
                out = self._last_logits(cache, **inputs)
        return out

    def _backbone_forward(self, cache, **inputs) -> None:
        """A forward that only extends `cache` (no LM head where the model has a plain one)."""
        if self._head is None:
            self.model(**inputs, use_cache=True, logits_to_keep=1, **{self._cache_kw: cache})
        else:
            backbone, cache_kw, _weight = self._head
            backbone(**inputs, use_cache=True, **{cache_kw: cache})

    def _can_cascade(self) -> bool:
        from engine.cascade import supported

        # CPU only: the case it was measured for (bench/decode_options.py); GPUs keep SDPA over the repeated cache
        return self.cascade and self.device.type == "cpu" and self._plain_cache() and supported(self.model)

    def _attention(self, shared):
        """The decode step's attention: engine/cascade.py's over a shared prompt, else the model's own."""
        if shared is None:
            return nullcontext()
        from engine.cascade import cascade_attention

        return cascade_attention(self.model)

    def _plain_cache(self) -> bool:
        # Sliding-window (and other non-plain) layers count their window in cache slots, pads included, so a
        # pad between the parts of a shared prefix would shift it: only plain full-attention caches share
        # prefixes or prefill in chunks.
        from transformers.cache_utils import DynamicCache, DynamicLayer

        return all(type(layer) is DynamicLayer for layer in DynamicCache(config=self.model.config).layers)

    def _can_share_prefix(self) -> bool:
        return self.min_shared_prefix is not None and self._plain_cache()

    def _advance(
        self, rows: list[_Row], logits: torch.Tensor, params: SamplingParams, st: ScoreTokens,
        seen: torch.Tensor | None,
    ) -> torch.Tensor:
        """One step of every row's state machine, given its next-token logits; returns the tokens to feed."""
        # logits: [R, V]; rows[k] is batch position k
        score_ids = torch.tensor(st.score_ids, device=logits.device)
        # the unmodified distribution the completion is scored under (params.score_completion)
        logp = logits.log_softmax(-1) if params.score_completion else None
        free = [k for k, row in enumerate(rows) if row.state == FREE]
        sampled = None
        if free:
            lg = logits[free]
            if seen is not None:
                lg = _apply_repetition_penalty(lg, seen[free], params.repetition_penalty)
            sampled = _select_tokens(lg, params, [rows[k].generator for k in free]).tolist()
            if seen is not None:
                seen[torch.tensor(free, device=logits.device), torch.tensor(sampled, device=logits.device)] = True
        chosen = dict(zip(free, sampled or []))

        feed = [self.pad_id] * len(rows)
        for k, row in enumerate(rows):
            if row.state == TAIL:
                feed[k] = self._tail_step(row, logp[k])
                continue
            feed[k] = self._step(row, logits[k], score_ids, chosen.get(k), params, st)
            if logp is not None:
                feed[k] = self._score(row, logp[k], feed[k], params, st)
        return torch.tensor(feed, device=logits.device)

    def _step(self, row: _Row, logits_k: torch.Tensor, score_ids: torch.Tensor, tok: int | None,
              params: SamplingParams, st: ScoreTokens) -> int:
        """One row's state machine for one step (`tok`: the token drawn for a FREE row); returns what to feed."""
        recorded_now = False
        if row.at_score:  # these logits are the score position: record P(1..5) (relative: P(A), P(B))
            row.score_probs = logits_k[score_ids].float().softmax(-1).tolist()
            row.at_score = False
            recorded_now = True
        if row.state == PROBE:
            if recorded_now:  # the probe is complete
                self._close_probe(row, params)
                return self.pad_id
            row.at_score = len(row.queue) == 1
            return row.queue.pop(0)
        if row.state != FREE:
            return self.pad_id
        if tok in self.stop_ids:
            return self._end_free(row, params, st, pending=None, at_score_now=recorded_now)
        row.tokens.append(tok)
        if recorded_now and tok in st.score_ids:  # the row wrote its own score: complete
            row.free_score_token = tok
            return self._end_free(row, params, st, pending=None, at_score_now=True)
        if len(row.tokens) >= params.max_new_tokens:
            row.hit_budget = True
            return self._end_free(row, params, st, pending=tok, at_score_now=False)
        row.at_score = self._ends_with_marker(row.tokens, st)
        return tok

    def _score(self, row: _Row, logp_k: torch.Tensor, tok: int, params: SamplingParams, st: ScoreTokens) -> int:
        """What params.score_completion adds to a step: the log-prob of the token fed, and once the judgment
        is final, its remaining completion tokens (a score not fed, the end-of-turn tail) fed and scored."""
        if row.state in (FREE, PROBE):  # a token of the judgment is fed now: its log-prob is at hand
            row.fed.append(tok)
            row.lps.append(float(logp_k[tok]))
        elif row.state == DONE and row.complete is not None:
            target = row.complete(sample_from_row(row, params, st, 0, 0.0).text)
            row.complete = None
            if target is not None and len(target) > len(row.fed) and target[:len(row.fed)] == row.fed:
                row.target = target
                return self._tail_step(row, logp_k)
        return tok

    def _tail_step(self, row: _Row, logp_k: torch.Tensor) -> int:
        """Score target[len(lps)] with this step's logits; feed it unless it was the last token."""
        j = len(row.lps)
        row.lps.append(float(logp_k[row.target[j]]))
        if len(row.lps) == len(row.target):
            row.state, row.ref_logp = DONE, math.fsum(row.lps)
            return self.pad_id
        row.state = TAIL
        row.fed.append(row.target[j])
        return row.target[j]

    def _end_free(
        self, row: _Row, params: SamplingParams, st: ScoreTokens, pending: int | None, at_score_now: bool
    ) -> int:
        """Free generation ended (stop token, score written, or budget): parse, then probe or finish.

        `pending`: the last sampled token, not yet fed (budget end). `at_score_now`: this step's logits
        were the score position (score_probs fresh). Returns the token to feed now."""
        row.judgment = parse_judgment(self._text(row.tokens), truncated=row.hit_budget, mode=params.mode)
        if row.free_score_token is not None or not params.force_score:
            return self._finish(row)
        if _valid_score(row.judgment, _labels(params.mode)) and row.score_probs is not None:
            return self._finish(row)
        if at_score_now:  # stopped right after writing the marker: the probe's reading is already here
            self._close_probe(row, params)
            return self.pad_id
        # Probe: feed (pending token +) the marker, read P(1..5) at the score position.
        row.state, row.score_probs = PROBE, None
        marker = list(st.marker_ids)
        if pending is not None and self._ends_with_marker(row.tokens, st):
            marker = []  # the budget ran out right on the marker: the score position is next
        row.probe_tokens = len(marker)
        row.queue = ([pending] if pending is not None else []) + marker
        tok = row.queue.pop(0)
        row.at_score = not row.queue
        return tok

    def _close_probe(self, row: _Row, params: SamplingParams) -> None:
        """The probe read P(1..5) (or P(A), P(B)); draw the result from it (row generator; argmax when greedy)
        unless the free text had a valid one of its own."""
        labels = _labels(params.mode)
        if not _valid_score(row.judgment, labels):
            row.forced_score = labels[draw_label(row.score_probs, params.temperature, row.generator)]
        self._finish(row)

    def _finish(self, row: _Row) -> int:
        row.state = DONE
        row.at_score = False
        return self.pad_id

    # ------------------------------------------------------------------ helpers

    def _token_text(self, token: int) -> str:
        text = self._token_texts.get(token)
        if text is None:
            text = self._token_texts[token] = self.tokenizer.decode([token])
        return text

    def _text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _ends_with_marker(self, tokens: list[int], st: ScoreTokens) -> bool:
        return ends_with_marker(self.tokenizer, tokens, st, self._token_text)

    def _left_pad(self, prompt_ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompt_ids)
        ids = torch.full((len(prompt_ids), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
        for b, p in enumerate(prompt_ids):
            ids[b, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[b, width - len(p):] = 1
        return ids.to(self.device), mask.to(self.device)

    def _to_sample(
        self, row: _Row, params: SamplingParams, st: ScoreTokens, prompt_tokens: int, latency_s: float
    ) -> Sample:
        return sample_from_row(row, params, st, prompt_tokens, latency_s)


def sample_from_row(row: _Row, params: SamplingParams, st: ScoreTokens, prompt_tokens: int,
                    latency_s: float) -> Sample:
    """A finished row as a Sample: the parsed result, else the probe's forced one; shared by the model
    backends (the vLLM backend fills a _Row from its two passes)."""
    judgment = row.judgment
    labels = _labels(params.mode)
    score = judgment.score if _valid_score(judgment, labels) else None  # the result: a score or a verdict
    text, forced, completion = judgment.raw, False, len(row.tokens)
    if score is None and row.forced_score is not None:  # closed by the probe
        score, forced = row.forced_score, True
        text = _forced_text(judgment.raw, score)
        completion += row.probe_tokens + 1
    elif score is None and params.force_score and row.free_score_token is not None:
        # The row wrote "[RESULT] k" itself but the parser rejects the whole (e.g. ambiguous): keep
        # the text, take the digit the model drew at the score position.
        score, forced = labels[st.score_ids.index(row.free_score_token)], True
    score, verdict = _split_result(score, params.mode)
    return Sample(
        text=text,
        raw_text=judgment.raw,
        rationale=judgment.rationale,
        score=score,
        parse_status=judgment.status.value,
        forced=forced,
        score_probs=row.score_probs,
        prompt_tokens=prompt_tokens,
        completion_tokens=completion,
        latency_s=latency_s,
        seed=row.seed,
        verdict=verdict,
        ref_logp=row.ref_logp,
        ref_tokens=len(row.target) if row.ref_logp is not None else None,
    )


# ------------------------------------------------------------------------------------------------ fake


class FakeSampler:
    """A scripted sampler for tests: ``script(messages, sample_index, seed) -> text``, no model.

    The text is parsed like a model's (as relative under ``mode="relative"``: a verdict A/B). Scored texts get
    one-hot ``score_probs``; under ``force_score`` a text without a valid score gets a score (verdict) drawn
    from its seed and uniform probabilities. A text longer than ``max_new_tokens`` whitespace tokens is cut
    there and parsed as truncated. Token counts are whitespace word counts."""

    def __init__(self, script: Callable[[list[dict], int, int], str], model_name: str = "fake"):
        self.script = script
        self.model_name = model_name

    def generate(self, prompts: Sequence[list[dict]], n: int, params: SamplingParams,
                 seeds: Sequence[Sequence[int]], progress: bool = False) -> list[list[Sample]]:
        _check_seeds(prompts, n, seeds)
        return [[self._one(m, j, int(seeds[i][j]), params) for j in range(n)] for i, m in enumerate(prompts)]

    def _one(self, messages: list[dict], index: int, seed: int, params: SamplingParams) -> Sample:
        raw = self.script(messages, index, seed)
        words = raw.split()
        truncated = len(words) > params.max_new_tokens
        if truncated:
            raw = " ".join(words[: params.max_new_tokens])
        judgment = parse_judgment(raw, truncated=truncated, mode=params.mode)
        labels = _labels(params.mode)
        text, forced, score, probs = raw, False, None, None
        if _valid_score(judgment, labels):
            score = judgment.score
            probs = [1.0 if k == score else 0.0 for k in labels]
        elif params.force_score:
            score, forced = random.Random(seed).choice(labels), True
            probs = [1.0 / len(labels)] * len(labels)
            text = _forced_text(raw, score)
        score, verdict = _split_result(score, params.mode)
        return Sample(
            text=text,
            raw_text=raw,
            rationale=judgment.rationale,
            score=score,
            parse_status=judgment.status.value,
            forced=forced,
            score_probs=probs,
            prompt_tokens=sum(len(str(m.get("content", "")).split()) for m in messages),
            completion_tokens=len(text.split()),
            latency_s=0.0,
            seed=seed,
            verdict=verdict,
        )


# ----------------------------------------------------------------------------------------------- factory


class BackendUnavailable(SelfratError, NotImplementedError):
    """A sampling backend the config may name but this machine cannot run (vLLM without the vllm package, or
    without a GPU); the message says what is missing."""


def make_sampler(backend: str, model_path: str, device: str = "auto", precision: str = "auto",
                 vllm=None) -> Sampler:
    """The sampler for a config's ``backend``: "transformers" (CPU/GPU) or "vllm" (GPU; `vllm`: the
    ``sampling.vllm`` settings, a ``VLLMConfig`` or None for its defaults). (Tests build
    ``FakeSampler(script)`` directly and hand it to the runner as ``sampler_factory``: it is no backend.)"""
    if backend == "transformers":
        return TransformersSampler(model_path, device=device, precision=precision)
    if backend == "vllm":
        from engine.vllm_sampler import VLLMSampler, check_vllm_usable

        check_vllm_usable(device, vllm)  # BackendUnavailable before anything heavy is loaded
        return VLLMSampler(model_path, settings=vllm, precision=precision)
    raise ValueError(f"unknown sampling backend {backend!r}: expected transformers or vllm")
