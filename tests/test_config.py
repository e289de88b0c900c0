"""engine.config: the run config's names (`sft:`, `evaluate_initial`, `reference: initial`), the deprecated
spellings that still load, devices and backends."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import yaml

from engine.config import ConfigDeprecationWarning, ConfigError, RunConfig, load_run_config, parse_run_config

OLD = {
    "model": "embedded", "iterations": 0,
    "seed": {"sft": {"dataset": "cia", "max_items": 8, "seed": 3}},  # the section, with an RNG seed inside it
    "evaluate_seed": False,
    "training": {"reference": "seed"},
}


def test_a_config_written_before_the_rename_still_loads_with_a_deprecation_warning(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(OLD))
    with pytest.warns(DeprecationWarning) as caught:
        cfg = load_run_config(path)
    messages = [str(w.message) for w in caught if issubclass(w.category, ConfigDeprecationWarning)]
    assert any("`seed: {sft: ...}`" in m and "`sft: ...`" in m for m in messages)
    assert any("evaluate_initial" in m for m in messages) and any("reference: initial" in m for m in messages)
    assert cfg.sft.dataset == "cia" and cfg.sft.max_items == 8 and cfg.sft.seed == 3
    assert cfg.evaluate_initial is False and cfg.training.reference == "initial"
    dumped = cfg.model_dump(mode="json")  # what a new run stores: the new names only
    assert "seed" not in dumped and "evaluate_seed" not in dumped and dumped["sft"]["dataset"] == "cia"
    assert RunConfig.model_validate(dumped) == cfg


def test_the_old_default_section_loads_as_no_sft():
    # Every run stored before the rename carries `seed: {sft: null}` (the old default, dumped).
    with pytest.warns(ConfigDeprecationWarning):
        cfg = parse_run_config({"iterations": 0, "seed": {"sft": None}, "evaluate_seed": True})
    assert cfg.sft is None and cfg.evaluate_initial is True


def test_the_new_names_load_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg = parse_run_config({"iterations": 0, "sft": {"dataset": "cia"}, "evaluate_initial": False,
                                "training": {"reference": "initial", "seed": 4}, "sampling": {"seed": 5}})
    assert cfg.sft.dataset == "cia" and cfg.training.seed == 4 and cfg.sampling.seed == 5


@pytest.mark.parametrize("raw, message", [
    ({"seed": 3}, "an RNG seed goes in sampling.seed"),  # an int is not mistaken for the old section
    ({"seed": {"sft": None}, "sft": None}, "keep `sft:` only"),
    ({"seed": {"sft": None, "n": 2}}, "unknown key"),
    ({"evaluate_seed": True, "evaluate_initial": True}, "both `evaluate_seed`"),
    ({"training": {"reference": "seedling"}}, "training.reference"),
])
def test_confusing_or_doubled_names_are_refused(raw, message):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConfigDeprecationWarning)
        with pytest.raises(ConfigError, match=message):
            parse_run_config({"iterations": 0, **raw})


def test_the_deprecation_is_visible_to_a_person_running_the_cli():
    # Python hides DeprecationWarning outside __main__ by default; ours is shown unless -W says otherwise.
    code = "from engine.config import parse_run_config; parse_run_config({'iterations': 0, 'seed': {'sft': None}})"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "ConfigDeprecationWarning" in res.stderr and "write `sft: ...`" in res.stderr
    quiet = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, check=True)
    assert quiet.stderr == ""


def test_fake_is_not_a_backend_a_config_can_name():
    with pytest.raises(ConfigError, match="sampling.backend"):
        parse_run_config({"iterations": 0, "sampling": {"backend": "fake"}})
    assert parse_run_config({"iterations": 0, "sampling": {"backend": "vllm"}}).sampling.backend == "vllm"


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_every_device_the_loaders_accept_is_a_valid_config(device):
    assert parse_run_config({"iterations": 0, "sampling": {"device": device}}).sampling.device == device


def test_an_unknown_device_is_refused_with_the_accepted_names():
    with pytest.raises(ConfigError, match=r"sampling.device: .*cuda:N"):
        parse_run_config({"iterations": 0, "sampling": {"device": "gpu0"}})
