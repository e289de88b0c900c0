"""A fake `vllm` for tests without a GPU: the part of vLLM's offline API that engine/vllm_sampler.py uses,
with the names, signatures and output shapes of vLLM's documented API (see README.md beside this package),
recording every engine and request and answering from a scripted model (`vllm._fake`).

Put its parent directory (tests/fake_vllm) first on sys.path, or on PYTHONPATH for a child process."""

from vllm.entrypoints.llm import LLM
from vllm.inputs import TextPrompt, TokensPrompt
from vllm.logprobs import Logprob
from vllm.outputs import CompletionOutput, RequestOutput
from vllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

__version__ = "0.31.0+fake"
FAKE = True  # what a test checks to tell this package from the real one

__all__ = ["LLM", "CompletionOutput", "Logprob", "RequestOutput", "RequestOutputKind", "SamplingParams",
           "StructuredOutputsParams", "TextPrompt", "TokensPrompt"]
