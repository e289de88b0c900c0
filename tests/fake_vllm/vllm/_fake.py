"""The fake's controls (not part of vLLM's API): what every fake engine recorded, and the scripted model
that answers requests.

In-process: `vllm._fake.LLMS` (every LLM built, each with `.kwargs` and `.calls`), `vllm._fake.MODEL` (set it
to a ScriptedModel; `reset()` clears all). A child process is driven by its environment:
    FAKE_VLLM_TEXT       the free text the default model writes for every request (default below)
    FAKE_VLLM_LOG        a file: one JSON line per LLM built and per generate call (pid, kwargs, requests)
    FAKE_VLLM_HANG_FILE  a file: generate writes this process's pid there, then sleeps (a cancel test)
"""

from __future__ import annotations

import json
import os
import time

DEFAULT_TEXT = "Feedback: The response is accurate and complete. [RESULT] 4"
FLOOR_LOGIT = -30.0  # the logit of every token a ScriptedModel does not name

LLMS: list = []  # every fake LLM built in this process, in order
MODEL = None  # the ScriptedModel of this process; None: TextModel(FAKE_VLLM_TEXT or DEFAULT_TEXT)


class ScriptedModel:
    """What the fake model does. Override either method.

    free_tokens(prompt_token_ids, params, index, tokenizer) -> list[int]: the tokens it writes after the
        prompt; the engine appends EOS after them and applies stop tokens, stop strings and max_tokens.
    next_token_logits(prompt_token_ids, tokenizer) -> {token_id: logit}: its next-token logits where a
        request reads a distribution (allowed_token_ids / logprobs); unnamed tokens have FLOOR_LOGIT."""

    def free_tokens(self, prompt_token_ids, params, index, tokenizer) -> list[int]:
        return []

    def next_token_logits(self, prompt_token_ids, tokenizer) -> dict[int, float]:
        return {}


class TextModel(ScriptedModel):
    """Writes `text` for every request; uniform over any allowed tokens."""

    def __init__(self, text: str):
        self.text = text

    def free_tokens(self, prompt_token_ids, params, index, tokenizer) -> list[int]:
        return list(tokenizer.encode(self.text, add_special_tokens=False))


def model() -> ScriptedModel:
    return MODEL if MODEL is not None else TextModel(os.environ.get("FAKE_VLLM_TEXT", DEFAULT_TEXT))


def reset() -> None:
    global MODEL
    LLMS.clear()
    MODEL = None


def log(event: dict) -> None:
    path = os.environ.get("FAKE_VLLM_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), **event}, default=str) + "\n")


def maybe_hang() -> None:
    path = os.environ.get("FAKE_VLLM_HANG_FILE")
    if not path:
        return
    with open(path, "w") as f:
        f.write(f"{os.getpid()}\n")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:  # until a signal ends it (or a test that forgot it, after 10 min)
        time.sleep(0.1)
