"""Distributed training (engine/distributed.py, engine/train_worker.py): the generated accelerate configs and
launch argv exactly, the combinations the config refuses (per field), a real 2-process DDP run on CPU (gloo) of
the runner's train stage on the tiny random Llama (rank 0 alone logs the loss lines, the checkpoint loads), a
cancelled launch that stops every rank, merging trained weights into a fresh base (the FSDP / ZeRO-3 / QLoRA
save path), and the trackers. FSDP and ZeRO-3 do not run on CPU (see engine/distributed.py): their configs
are tested here and their runs are GPU tests, skipped without CUDA."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from pydantic import ValidationError

from engine.config import ConfigError, DistributedConfig, RunConfig, SFTConfig, TrainingConfig, parse_run_config
from engine.distributed import (
    MARK,
    accelerate_config,
    check_launchable,
    launch_argv,
    launch_training,
    write_launch_files,
)
from store.errors import Cancelled, UsageError

CUDA = importlib.util.find_spec("torch") is not None and __import__("torch").cuda.is_available()

COMMON = {
    "compute_environment": "LOCAL_MACHINE",
    "debug": False,
    "downcast_bf16": "no",
    "machine_rank": 0,
    "main_process_port": 0,
    "main_training_function": "main",
    "num_machines": 1,
    "rdzv_backend": "static",
    "same_network": True,
    "tpu_env": [],
    "tpu_use_cluster": False,
    "tpu_use_sudo": False,
}


# ------------------------------------------------------------------ generated configs and argv


def test_ddp_cpu_config_is_torchrun_with_use_cpu():
    cfg = accelerate_config(DistributedConfig(num_processes=2, strategy="ddp"), "cpu", "fp32")
    assert cfg == {**COMMON, "distributed_type": "MULTI_GPU", "gpu_ids": "all", "mixed_precision": "no",
                   "num_processes": 2, "use_cpu": True}


def test_ddp_cuda_config_matches_trl_multi_gpu():
    cfg = accelerate_config(DistributedConfig(num_processes=8, strategy="ddp"), "cuda", "bf16")
    assert cfg == {**COMMON, "distributed_type": "MULTI_GPU", "gpu_ids": "all", "mixed_precision": "bf16",
                   "num_processes": 8, "use_cpu": False}


def test_fsdp_config_matches_trl_fsdp2():
    cfg = accelerate_config(DistributedConfig(num_processes=4, strategy="fsdp"), "cuda", "bf16")
    assert cfg == {**COMMON, "distributed_type": "FSDP", "enable_cpu_affinity": False, "mixed_precision": "bf16",
                   "num_processes": 4, "use_cpu": False, "fsdp_config": {
                       "fsdp_activation_checkpointing": False,
                       "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                       "fsdp_cpu_ram_efficient_loading": True,
                       "fsdp_offload_params": False,
                       "fsdp_reshard_after_forward": True,
                       "fsdp_state_dict_type": "SHARDED_STATE_DICT",
                       "fsdp_version": 2}}


def test_zero3_config_matches_trl_deepspeed_zero3():
    cfg = accelerate_config(DistributedConfig(num_processes=8, strategy="zero3"), "cuda", "bf16",
                            gradient_accumulation_steps=4)
    assert cfg == {**COMMON, "distributed_type": "DEEPSPEED", "mixed_precision": "bf16", "num_processes": 8,
                   "use_cpu": False, "deepspeed_config": {
                       "deepspeed_multinode_launcher": "standard",
                       "gradient_accumulation_steps": 4,
                       "offload_optimizer_device": "none",
                       "offload_param_device": "none",
                       "zero3_init_flag": True,
                       "zero3_save_16bit_model": True,
                       "zero_stage": 3}}


@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_sharding_strategies_are_refused_on_cpu(strategy):
    with pytest.raises(UsageError, match=f"strategy: {strategy} needs CUDA"):
        accelerate_config(DistributedConfig(num_processes=2, strategy=strategy), "cpu", "fp32")


def test_generated_configs_load_in_accelerate(tmp_path):
    """accelerate itself reads each generated file back (the launcher's own loader)."""
    from accelerate.commands.config.config_args import load_config_from_file

    for strategy, device in [("ddp", "cpu"), ("ddp", "cuda"), ("fsdp", "cuda"), ("zero3", "cuda")]:
        path = tmp_path / f"{strategy}-{device}.yaml"
        data = accelerate_config(DistributedConfig(num_processes=2, strategy=strategy), device, "bf16")
        path.write_text(yaml.safe_dump(data))
        loaded = load_config_from_file(str(path))
        assert str(loaded.distributed_type).endswith(data["distributed_type"])
        assert loaded.num_processes == 2 and loaded.use_cpu == (device == "cpu")


def test_launch_argv_is_accelerate_as_a_module_running_the_worker(tmp_path):
    argv = launch_argv(tmp_path / "accelerate.yaml", tmp_path / "spec.json")
    assert argv == [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                    str(tmp_path / "accelerate.yaml"), "-m", "engine.train_worker",
                    "--spec", str(tmp_path / "spec.json")]


def test_launch_files(tmp_path):
    cfg = TrainingConfig(distributed={"num_processes": 2}, report_to=["tensorboard"])
    pairs = [{"prompt": [{"role": "user", "content": "q"}], "chosen": "a [RESULT] 5", "rejected": "b [RESULT] 1"}]
    config_file, spec_file = write_launch_files(
        tmp_path / "w", kind="dpo", paths={"policy_path": "/m", "reference_path": None}, rows=pairs, cfg=cfg,
        dist=cfg.distributed, device="cpu", precision="fp32", out_dir=tmp_path / "ckpt", tb_dir=tmp_path / "tb",
        report_to=cfg.report_to)
    spec = json.loads(spec_file.read_text())
    assert spec["kind"] == "dpo" and spec["policy_path"] == "/m" and spec["reference_path"] is None
    assert (spec["device"], spec["precision"], spec["strategy"], spec["num_processes"]) == ("cpu", "fp32", "ddp", 2)
    assert spec["cfg"] == cfg.model_dump(mode="json") and spec["report_to"] == ["tensorboard"]
    assert spec["out_dir"] == str(tmp_path / "ckpt") and spec["tb_dir"] == str(tmp_path / "tb")
    assert [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()] == pairs
    assert yaml.safe_load(config_file.read_text()) == accelerate_config(cfg.distributed, "cpu", "fp32")


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is not None, reason="deepspeed is installed here")
def test_zero3_without_deepspeed_names_the_package(tmp_path):
    dist = DistributedConfig(num_processes=2, strategy="zero3")
    with pytest.raises(UsageError, match=r"zero3 needs the deepspeed package.*pip install deepspeed"):
        check_launchable(dist, "cuda")
    # the train stage refuses before it writes or starts anything
    with pytest.raises(UsageError, match="deepspeed"):
        launch_training("dpo", paths={"policy_path": "/m"}, rows=[], cfg=TrainingConfig(distributed=dist),
                        distributed=dist, device="cpu", out_dir=tmp_path / "o", tb_dir=None,
                        work_dir=tmp_path / "w", report_to=["none"], log=print, progress=None)
    assert not (tmp_path / "w").exists()


def test_a_failed_launch_names_the_ranks_exception(tmp_path):
    from engine.distributed import _rank_error

    log = tmp_path / "launch.log"
    log.write_text("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                   "[rank0]: ValueError: num_samples should be a positive integer value, but got num_samples=0\n"
                   "torch.distributed.elastic.multiprocessing.errors.ChildFailedError: \n"
                   "engine.train_worker FAILED\n")
    assert _rank_error(log) == "[rank0]: ValueError: num_samples should be a positive integer value, but got " \
        "num_samples=0"


def test_launched_check_refuses_a_strategy_accelerate_did_not_run():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from engine.training import Launched

    trainer = SimpleNamespace(accelerator=SimpleNamespace(distributed_type=DistributedType.MULTI_CPU,
                                                          num_processes=2))
    Launched("cpu", "fp32", "ddp", 2, True).check(trainer)
    with pytest.raises(RuntimeError, match="strategy fsdp x 2 as .*MULTI_CPU"):
        Launched("cpu", "fp32", "fsdp", 2, True).check(trainer)
    with pytest.raises(RuntimeError, match="ddp x 4"):
        Launched("cpu", "fp32", "ddp", 4, True).check(trainer)


# ------------------------------------------------------------------ config: options and combinations


def _errors(raw: dict, gpus: int | None = None) -> dict[str, str]:
    try:
        RunConfig.model_validate({"iterations": 0, **raw}, context=None if gpus is None else {"gpus": gpus})
    except ValidationError as e:
        return {".".join(map(str, err["loc"])): err["msg"] for err in e.errors()}
    return {}


def test_distributed_defaults_and_absent_means_one_process():
    assert TrainingConfig().distributed is None
    d = TrainingConfig(distributed={}).distributed
    assert (d.num_processes, d.strategy, d.mixed_precision) == (2, "ddp", None)
    assert TrainingConfig().report_to == ["none"] and TrainingConfig().precompute_ref_log_probs is True


def test_qlora_is_short_for_lora_with_4bit():
    t = TrainingConfig(qlora=True)
    assert (t.lora, t.quantization) == (True, "4bit")
    assert "qlora" not in t.model_dump()  # stored in the long form
    assert TrainingConfig.model_validate(t.model_dump()) == t
    s = SFTConfig(dataset="d", qlora=True)
    assert (s.lora, s.quantization) == (True, "4bit")
    with pytest.raises(ValidationError, match="needs|set lora: true"):
        TrainingConfig(quantization="4bit")
    with pytest.raises(ValidationError, match="contradicts lora: false"):
        TrainingConfig(qlora=True, lora=False)


def test_report_to():
    assert TrainingConfig(report_to=["tensorboard", "mlflow"]).report_to == ["tensorboard", "mlflow"]
    assert TrainingConfig(report_to=[]).report_to == ["none"]
    with pytest.raises(ValidationError, match="cannot be combined"):
        TrainingConfig(report_to=["none", "wandb"])
    with pytest.raises(ValidationError):
        TrainingConfig(report_to=["comet_ml"])


def test_invalid_combinations_are_named_per_field():
    assert set(_errors({"sampling": {"backend": "vllm", "device": "cpu"}})) == {"sampling.device"}
    assert set(_errors({"training": {"distributed": {"strategy": "zero3", "num_processes": 1}}})) == {
        "training.distributed.num_processes"}
    errors = _errors({"sampling": {"device": "cpu"}, "training": {"qlora": True},
                      "sft": {"dataset": "d", "qlora": True}})
    assert set(errors) == {"training.quantization", "sft.quantization"}
    assert "needs a CUDA GPU" in errors["training.quantization"]
    errors = _errors({"sampling": {"device": "cpu"}, "training": {"distributed": {"strategy": "fsdp"}}})
    assert set(errors) == {"training.distributed.strategy"} and "MULTI_CPU" in errors["training.distributed.strategy"]
    assert set(_errors({"sampling": {"device": "cuda:1"}, "training": {"distributed": {}}})) == {"training.distributed"}
    assert set(_errors({"training": {"precision": "fp32", "distributed": {"mixed_precision": "bf16"}}})) == {
        "training.distributed.mixed_precision"}
    assert _errors({"sampling": {"device": "cpu"}, "training": {"distributed": {"num_processes": 2}}}) == {}


def test_machine_checks_need_the_gpu_count():
    """auto resolves against the machine only when its GPU count is given (a stored run opens anywhere)."""
    raw = {"sampling": {"backend": "vllm"}, "training": {"qlora": True, "distributed": {"num_processes": 4}}}
    assert _errors(raw) == {}
    assert set(_errors(raw, gpus=0)) == {"sampling.backend", "training.quantization"}
    assert "vllm runs on CUDA GPUs only" in _errors(raw, gpus=0)["sampling.backend"]
    tp = {"sampling": {"backend": "vllm", "vllm": {"tensor_parallel_size": 4}}}
    assert set(_errors(tp, gpus=2)) == {"sampling.vllm.tensor_parallel_size"} and _errors(tp, gpus=4) == {}
    errors = _errors(raw, gpus=2)
    assert errors == {"training.distributed.num_processes": "4 processes need 4 GPUs (one each); this machine has 2"}
    assert _errors(raw, gpus=8) == {}
    assert set(_errors({"sampling": {"device": "cuda"}}, gpus=0)) == {"sampling.device"}


def test_parse_run_config_machine_uses_the_gpu_count(monkeypatch):
    raw = {"iterations": 0, "sampling": {"backend": "vllm"}}
    assert parse_run_config(raw).sampling.backend == "vllm"
    monkeypatch.setenv("SELFRAT_GPU_COUNT", "0")
    with pytest.raises(ConfigError, match=r"sampling\.backend: vllm runs on CUDA GPUs only"):
        parse_run_config(raw, machine=True)
    monkeypatch.setenv("SELFRAT_GPU_COUNT", "1")
    assert parse_run_config(raw, machine=True).sampling.backend == "vllm"


def test_gpu_count_without_torch(monkeypatch):
    from engine import devices

    monkeypatch.delenv("SELFRAT_GPU_COUNT", raising=False)
    monkeypatch.setattr(devices, "_nvidia_smi_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert devices.gpu_count() == 4
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,2")
    assert devices.gpu_count() == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert devices.gpu_count() == 0


# ------------------------------------------------------------------ the real thing: DDP on CPU


def _script(messages, index, seed):
    return f"Feedback on the response, sample {index}. [RESULT] {index % 5 + 1}"


@pytest.fixture(scope="module")
def ddp_run(tiny_model_dir, tmp_path_factory):
    """The runner's train stage of iteration 1 as a 2-process DDP launch (gloo on CPU) on the tiny model: a
    stand-in judge sampled (5 judgments per item, scores 1..5, so every item has a chosen gold match), real
    curation, then DPO. Returns (runner, metrics, wall seconds)."""
    from engine.demo import ensure_demo_dataset
    from engine.iteration import Runner, create_run
    from engine.sampling import FakeSampler
    from engine.workspace import Workspace

    ws = Workspace.open(tmp_path_factory.mktemp("ddp") / "ws")
    ensure_demo_dataset(ws)
    cfg = parse_run_config({
        "model": str(tiny_model_dir), "train_dataset": "demo", "iterations": 1, "max_train_items": 4,
        "sampling": {"n": 5, "max_new_tokens": 40, "device": "cpu"},
        "curation": {"min_margin": 1, "max_pairs_per_item": 1},
        "training": {"batch_size": 1, "epochs": 1, "max_length": 512, "learning_rate": 1e-3,
                     "distributed": {"num_processes": 2, "strategy": "ddp"}},
    })
    create_run(ws, cfg, "ddp")
    runner = Runner(ws, "ddp", sampler_factory=lambda path: FakeSampler(_script), echo=False)
    runner.sample(1)
    runner.curate(1)
    started = time.monotonic()
    metrics = runner.train(1)
    return runner, metrics, time.monotonic() - started


def test_ddp_trains_a_loadable_checkpoint(ddp_run):
    from transformers import AutoModelForCausalLM

    runner, metrics, wall = ddp_run
    pairs = int(metrics["train/pairs"])
    assert pairs == 4
    # 4 pairs, 1 per process per step, 2 processes: 2 optimizer steps
    assert metrics["train/steps"] == 2
    ckpt = Path(runner.store.iteration("ddp", 1)["checkpoint"])
    assert ckpt == runner.run_dir / "checkpoints" / "iter-1"
    record = json.loads((ckpt / "selfrat_checkpoint.json").read_text())
    assert record["distributed"] == {"strategy": "ddp", "num_processes": 2}
    assert record["n_pairs"] == 4 and record["device"] == "cpu"
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    assert model.config.num_hidden_layers == 2
    result = json.loads((runner.run_dir / "train" / "iter-1" / "result.json").read_text())
    assert result["num_processes"] == 2 and result["distributed_type"].endswith("MULTI_CPU")
    print(f"DDP 2x CPU: {wall:.1f}s wall for the stage, train_runtime {metrics['train/runtime_s']:.2f}s")


def test_ddp_loss_lines_come_from_rank_0_only(ddp_run):
    runner, metrics, _ = ddp_run
    log = (runner.run_dir / "run.log").read_text().splitlines()
    steps = [line for line in log if re.search(r"\bstep \d+/\d+ loss=", line)]
    assert [re.search(r"step (\d+)/(\d+)", line).groups() for line in steps] == [("1", "2"), ("2", "2")]
    print("\n".join(steps))
    assert sum("DPO: 4 pairs" in line for line in log) == 1  # the stage header: once, not per rank
    assert not any(MARK.strip() in line for line in log)
    # progress reached progress.jsonl through the parent
    progress = [json.loads(line) for line in (runner.run_dir / "progress.jsonl").read_text().splitlines()]
    train = [p for p in progress if p.get("stage") == "train" and p.get("iteration") == 1]
    assert train and train[-1]["done"] == train[-1]["total"] == 2
    # everything else the ranks printed is in launch.log, not in run.log
    launch_log = (runner.run_dir / "train" / "iter-1" / "launch.log").read_text()
    assert "accelerate.commands.launch" in launch_log


def test_finished_distributed_stage_is_not_relaunched(ddp_run, tmp_path):
    runner, metrics, _ = ddp_run
    again = runner.train(1)
    assert again == runner.store.iteration("ddp", 1)["train_metrics"]


def _rank_processes(spec_file: Path) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if str(spec_file) in (p.info["cmdline"] or []) and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.Error:
            continue
    return out


def test_cancel_stops_every_rank(tiny_model_dir, tmp_path):
    """A cancel (the runner's signal handler raises Cancelled while the parent reads the ranks' lines) stops
    the launcher's process group: no rank outlives it. Seed SFT, so the SFT side of the worker runs too."""
    from engine.training import train_sft

    system = {"role": "system", "content": "You are a fair judge."}
    examples = [{"prompt": [system, {"role": "user", "content": f"Rate answer {i}."}],
                 "completion": f"Feedback {i}. [RESULT] {i % 5 + 1}"} for i in range(64)]
    seen: list[str] = []

    def log(line: str) -> None:
        seen.append(line)
        if re.match(r"step 1/", line):
            assert len(_rank_processes(tmp_path / "w" / "spec.json")) >= 2  # both ranks are training
            raise Cancelled("signal 15")

    cfg = SFTConfig(dataset="d", batch_size=1, epochs=2, max_length=128, learning_rate=1e-3)
    with pytest.raises(Cancelled):
        train_sft(model_path=str(tiny_model_dir), examples=examples, cfg=cfg, out_dir=tmp_path / "o", device="cpu",
                  log=log, distributed=DistributedConfig(num_processes=2), work_dir=tmp_path / "w")
    assert any(line.startswith("SFT: 64 examples") for line in seen)
    assert _rank_processes(tmp_path / "w" / "spec.json") == []
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ saving sharded / quantized training


@pytest.mark.parametrize("adapter_only", [False, True])
def test_rebuilt_model_merges_lora_like_peft(tiny_model_dir, adapter_only):
    """The FSDP / ZeRO-3 save (a gathered full state dict) and the QLoRA save (adapter weights only) rebuild
    the same plain model that peft's own merge gives."""
    import torch
    from peft import get_peft_model, get_peft_model_state_dict
    from transformers import AutoModelForCausalLM

    from engine.training import _lora_config, rebuilt_model

    torch.manual_seed(0)
    lora = _lora_config(4, 8)
    lora.init_lora_weights = False  # random B: a merge that changes the weights
    trained = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora)
    state = get_peft_model_state_dict(trained) if adapter_only else trained.state_dict()
    rebuilt = rebuilt_model(str(tiny_model_dir), state, _lora_config(4, 8), adapter_only=adapter_only)
    expected = trained.merge_and_unload().state_dict()
    got = rebuilt.state_dict()
    assert set(got) == set(expected)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    changed = [k for k in expected if not torch.equal(base[k], expected[k])]
    assert changed  # the LoRA delta is there ...
    for k in expected:
        torch.testing.assert_close(got[k], expected[k])  # ... and the same in the rebuilt model


def test_rebuilt_model_names_weights_that_do_not_fit(tiny_model_dir):
    from engine.training import rebuilt_model

    with pytest.raises(RuntimeError, match="do not fit"):
        rebuilt_model(str(tiny_model_dir), {"model.not_a_weight": __import__("torch").zeros(1)})


# ------------------------------------------------------------------ trackers


def test_missing_tracker_package_is_named(tiny_model_dir, tmp_path):
    from engine.training import train_dpo

    wanted = [t for t in ("wandb", "mlflow", "trackio") if importlib.util.find_spec(t) is None]
    if not wanted:
        pytest.skip("every tracker is installed here")
    pairs = [{"prompt": [{"role": "user", "content": "q"}], "chosen": "a [RESULT] 5", "rejected": "b [RESULT] 1"}]
    with pytest.raises(UsageError, match=f"training.report_to: not installed here: {wanted[0]} "):
        train_dpo(policy_path=str(tiny_model_dir), reference_path=None, pairs=pairs,
                  cfg=TrainingConfig(report_to=[wanted[0]]), out_dir=tmp_path / "o", device="cpu")


def test_tensorboard_logs_go_to_the_given_dir(tiny_model_dir, tmp_path, monkeypatch):
    """report_to: [tensorboard] reaches TRL, whose TensorBoard callback writes to tb_dir (runs/<id>/tb/iter-k).
    TensorBoard is not installed here: a stand-in SummaryWriter (tensorboardX's name) records the calls."""
    import types

    from transformers.integrations import integration_utils

    from engine.training import train_dpo

    writers = []

    class SummaryWriter:
        def __init__(self, log_dir=None, **kw):
            self.log_dir, self.scalars = log_dir, []
            writers.append(self)

        def add_scalar(self, tag, value, step):
            self.scalars.append((tag, step))

        def add_text(self, *a, **kw):
            pass

        def flush(self):
            pass

        def close(self):
            pass

    if importlib.util.find_spec("tensorboard") is None and importlib.util.find_spec("tensorboardX") is None:
        monkeypatch.setitem(sys.modules, "tensorboardX", types.SimpleNamespace(SummaryWriter=SummaryWriter))
        monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails: tensorboardX is used
        monkeypatch.setattr(integration_utils, "is_tensorboard_available", lambda: True)
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, _real=importlib.util.find_spec: (
            object() if name == "tensorboardX" else _real(name, *a)))
        fake = True
    else:
        fake = False
    pairs = [{"prompt": [{"role": "user", "content": f"q{i}"}], "chosen": "a [RESULT] 5", "rejected": "b [RESULT] 1"}
             for i in range(2)]
    tb = tmp_path / "run" / "tb" / "iter-1"
    train_dpo(policy_path=str(tiny_model_dir), reference_path=None, pairs=pairs, out_dir=tmp_path / "run" / "iter-1",
              cfg=TrainingConfig(report_to=["tensorboard"], batch_size=1, max_length=64), device="cpu", tb_dir=tb)
    assert tb.is_dir()
    if fake:
        assert [w.log_dir for w in writers] == [str(tb)]
        assert ("train/loss", 1) in writers[0].scalars and ("train/loss", 2) in writers[0].scalars
    else:
        assert any(tb.iterdir())


def test_precompute_ref_log_probs_reaches_trl(tiny_model_dir, tmp_path, monkeypatch):
    from trl import DPOConfig

    from engine.training import train_dpo

    seen = []
    real_init = DPOConfig.__init__

    def spy(self, *a, **kw):
        seen.append(kw.get("precompute_ref_log_probs"))
        real_init(self, *a, **kw)

    monkeypatch.setattr(DPOConfig, "__init__", spy)
    pairs = [{"prompt": [{"role": "user", "content": f"q{i}"}], "chosen": "a [RESULT] 5", "rejected": "b [RESULT] 1"}
             for i in range(2)]
    lines: list[str] = []
    metrics = train_dpo(policy_path=str(tiny_model_dir), reference_path=None, pairs=pairs, out_dir=tmp_path / "o",
                        cfg=TrainingConfig(precompute_ref_log_probs=True, batch_size=2, max_length=64), device="cpu",
                        log=lines.append)
    assert seen == [True] and metrics["train/steps"] == 1
    assert any("reference log-probs once before training" in line for line in lines)
    assert "reference log-probs: 0 of 2 pairs stored at sampling, the rest computed before training" in lines


def test_qlora_stops_with_a_clear_error_without_a_gpu(tiny_model_dir, tmp_path):
    """The config refuses QLoRA on cpu; a caller that builds TrainingConfig alone gets the same news from the
    loader: bitsandbytes missing, or no CUDA GPU."""
    from engine.training import train_dpo

    pairs = [{"prompt": [{"role": "user", "content": "q"}], "chosen": "a [RESULT] 5", "rejected": "b [RESULT] 1"}]
    with pytest.raises(UsageError, match=r"4bit \(QLoRA\) needs (the bitsandbytes package|a CUDA GPU)"):
        train_dpo(policy_path=str(tiny_model_dir), reference_path=None, pairs=pairs, out_dir=tmp_path / "o",
                  cfg=TrainingConfig(qlora=True), device="cpu")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ GPU runs (skipped without CUDA)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA GPUs (FSDP / bf16 launches)")
def test_one_gpu_launch(strategy, tiny_model_dir, tmp_path):
    """One process on one GPU per strategy that runs there; the checkpoint is a plain fp32 model either way
    (FSDP: gathered, rebuilt on rank 0)."""
    from transformers import AutoModelForCausalLM

    from engine.training import train_dpo

    pairs = [{"prompt": [{"role": "user", "content": f"q{i}"}], "chosen": "a [RESULT] 5", "rejected": "b [RESULT] 1"}
             for i in range(4)]
    cfg = TrainingConfig(batch_size=2, max_length=64, distributed={"num_processes": 1, "strategy": strategy})
    lines: list[str] = []
    metrics = train_dpo(policy_path=str(tiny_model_dir), reference_path=None, pairs=pairs, cfg=cfg,
                        out_dir=tmp_path / "o", device="cuda", log=lines.append)
    assert metrics["train/steps"] == 2
    assert sum(bool(re.match(r"step \d+/2 loss=", line)) for line in lines) == 2
    record = json.loads((tmp_path / "o" / "selfrat_checkpoint.json").read_text())
    assert record["distributed"] == {"strategy": strategy, "num_processes": 1} and record["precision"] == "bf16"
    AutoModelForCausalLM.from_pretrained(tmp_path / "o")
