"""Distributed training: `training.distributed` runs the train stage (DPO, and the seed SFT) as
`accelerate launch` of engine.train_worker, with an accelerate config generated from the strategy.

    training:
      distributed: {num_processes: 8, strategy: zero3}     # ddp | fsdp | zero3; mixed_precision: bf16 | fp32

The parent (the runner's train stage, in its own process) owns the store; the ranks never open it:

1. the parent writes the stage's inputs into a work dir (runs/<id>/train/iter-k/): `data.jsonl` (pairs or SFT
   examples), `spec.json` (paths, the stage config, the device and precision it resolved) and
   `accelerate.yaml` (`accelerate_config`);
2. it runs `launch_argv(...)`: `python -m accelerate.commands.launch --config_file accelerate.yaml -m
   engine.train_worker --spec spec.json`, an argument list (no shell), as its own process group;
3. every rank trains (TRL under accelerate); rank 0 alone prints the step lines and progress, as JSON lines
   marked with `MARK` on its stdout, which the parent forwards to run.log / progress.jsonl (everything else
   the ranks print goes to launch.log); rank 0 writes the checkpoint through `training._publish` and
   `result.json` (the metrics);
4. the parent waits, then reads `result.json`. If the parent is cancelled (SIGTERM / SIGINT to the runner),
   it stops the launcher's whole process group (every rank) before the stage is marked cancelled; a rank
   whose parent dies (SIGKILL) leaves by itself (`train_worker`'s watchdog).

The configs follow TRL's examples/accelerate_configs (multi_gpu.yaml, fsdp2.yaml, deepspeed_zero3.yaml). On
CPU only ddp runs: accelerate launches a `MULTI_CPU` config through mpirun only, so CPU DDP is written as
`MULTI_GPU` + `use_cpu: true` (torchrun starts the ranks; with `use_cpu`, accelerate makes each a MULTI_CPU
rank with the gloo backend), and FSDP is refused on CPU (accelerate turns FSDP into FSDP only on GPUs: on CPU
it silently becomes plain DDP; `training.Launched.check` refuses such a launch too).

This module imports nothing heavy (the app shows the generated config and argv).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from engine.config import DistributedConfig
from engine.devices import check_device
from store.errors import SelfratError, UsageError

WORKER_MODULE = "engine.train_worker"
# Rank 0's structured stdout lines: MARK + {"log": "..."} | {"progress": [done, total]}.
MARK = "@@selfrat "
# Seconds the ranks get to stop after SIGTERM before SIGKILL.
STOP_GRACE_S = 15.0
# What each strategy needs installed, beyond torch / accelerate / transformers.
STRATEGY_PACKAGES = {"zero3": "deepspeed"}


class LaunchError(SelfratError, RuntimeError):
    """A distributed train stage that could not start or did not finish; names launch.log."""


def _common(dist: DistributedConfig, device: str, precision: str) -> dict[str, Any]:
    return {
        "compute_environment": "LOCAL_MACHINE",
        "debug": False,
        "downcast_bf16": "no",
        "machine_rank": 0,
        # 0 = accelerate picks a free port: several launches (tests, two runs) can run side by side.
        "main_process_port": 0,
        "main_training_function": "main",
        "mixed_precision": "bf16" if precision == "bf16" else "no",
        "num_machines": 1,
        "num_processes": dist.num_processes,
        "rdzv_backend": "static",
        "same_network": True,
        "tpu_env": [],
        "tpu_use_cluster": False,
        "tpu_use_sudo": False,
        "use_cpu": device == "cpu",
    }


def accelerate_config(dist: DistributedConfig, device: str, precision: str,
                      gradient_accumulation_steps: int = 1) -> dict[str, Any]:
    """The accelerate config (as YAML data) for `dist` on `device` ("cpu" or "cuda") in `precision`
    ("bf16" or "fp32"), modelled on TRL's examples/accelerate_configs."""
    if device not in ("cpu", "cuda"):
        raise UsageError(f"training.distributed: runs on cpu or cuda, not {device}")
    if device == "cpu" and dist.strategy != "ddp":
        raise UsageError(f"training.distributed.strategy: {dist.strategy} needs CUDA GPUs; on cpu use ddp")
    cfg = _common(dist, device, precision)
    if dist.strategy == "ddp":
        # multi_gpu.yaml; on CPU the same launcher (torchrun) with use_cpu: see the module docstring.
        cfg.update(distributed_type="MULTI_GPU", gpu_ids="all")
    elif dist.strategy == "fsdp":
        # fsdp2.yaml: FSDP2, a layer per shard unit, parameters resharded after the forward pass. Activation
        # checkpointing stays with the trainer (TrainingArguments), as in TRL's config.
        cfg.update(distributed_type="FSDP", enable_cpu_affinity=False, fsdp_config={
            "fsdp_activation_checkpointing": False,
            "fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "fsdp_cpu_ram_efficient_loading": True,
            "fsdp_offload_params": False,
            "fsdp_reshard_after_forward": True,
            "fsdp_state_dict_type": "SHARDED_STATE_DICT",
            "fsdp_version": 2,
        })
    else:
        # deepspeed_zero3.yaml; zero3_save_16bit_model lets rank 0 gather the full weights at the end.
        cfg.update(distributed_type="DEEPSPEED", deepspeed_config={
            "deepspeed_multinode_launcher": "standard",
            "gradient_accumulation_steps": gradient_accumulation_steps,
            "offload_optimizer_device": "none",
            "offload_param_device": "none",
            "zero3_init_flag": True,
            "zero3_save_16bit_model": True,
            "zero_stage": 3,
        })
    return dict(sorted(cfg.items()))


def launch_argv(config_file: str | Path, spec_file: str | Path) -> list[str]:
    """The train stage's command: accelerate's launcher as a module of this interpreter (the venv's accelerate,
    no PATH lookup), running engine.train_worker as a module in every rank."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
            "-m", WORKER_MODULE, "--spec", str(spec_file)]


def launch_device(device: str) -> str:
    """'cpu' or 'cuda' for a distributed stage on `device` (sampling.device); UsageError for the others."""
    check_device(device)
    if device.startswith("cuda:"):
        raise UsageError(f"training.distributed: runs one process per GPU from the first visible one; "
                         f"sampling.device {device} names a single GPU: use cuda (CUDA_VISIBLE_DEVICES picks GPUs)")
    if device == "mps":
        raise UsageError("training.distributed: runs on cpu (ddp) or cuda, not mps")
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def check_launchable(dist: DistributedConfig, device: str) -> None:
    """UsageError, before anything starts, for what this machine cannot launch: a strategy's missing package
    (zero3: deepspeed), a sharding strategy on CPU, more processes than visible GPUs."""
    package = STRATEGY_PACKAGES.get(dist.strategy)
    if package and importlib.util.find_spec(package) is None:
        raise UsageError(f"training.distributed.strategy: {dist.strategy} needs the {package} package, which is not "
                         f"installed for {sys.executable}: pip install {package} (CUDA machines only)")
    if device == "cpu" and dist.strategy != "ddp":
        raise UsageError(f"training.distributed.strategy: {dist.strategy} needs CUDA GPUs; on cpu use ddp")
    if dist.strategy == "zero3" and dist.num_processes < 2:
        raise UsageError("training.distributed.num_processes: zero3 shards the model across processes: it needs "
                         "num_processes >= 2")
    if device == "cuda":
        import torch

        n = torch.cuda.device_count()
        if dist.num_processes > n:
            raise UsageError(f"training.distributed.num_processes: {dist.num_processes} processes need "
                             f"{dist.num_processes} GPUs (one each); {n} are visible")


def write_launch_files(work_dir: Path, *, kind: str, paths: Mapping[str, str | None], rows: Sequence[Mapping],
                       cfg, dist: DistributedConfig, device: str, precision: str, out_dir: Path,
                       tb_dir: Path | None, report_to: Sequence[str]) -> tuple[Path, Path]:
    """data.jsonl, spec.json and accelerate.yaml in `work_dir`: (accelerate config file, spec file)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    data = work_dir / "data.jsonl"
    with data.open("w") as f:
        for row in rows:
            f.write(json.dumps(dict(row), default=str) + "\n")
    spec = {
        "kind": kind,
        **paths,
        "data": str(data),
        "cfg": cfg.model_dump(mode="json"),
        "device": device,
        "precision": precision,
        "strategy": dist.strategy,
        "num_processes": dist.num_processes,
        "out_dir": str(out_dir),
        "tb_dir": None if tb_dir is None else str(tb_dir),
        "report_to": list(report_to),
        "result": str(work_dir / "result.json"),
        "parent_pid": os.getpid(),
    }
    spec_file = work_dir / "spec.json"
    spec_file.write_text(json.dumps(spec, indent=2))
    config_file = work_dir / "accelerate.yaml"
    config_file.write_text(yaml.safe_dump(
        accelerate_config(dist, device, precision, getattr(cfg, "gradient_accumulation_steps", 1)), sort_keys=False))
    return config_file, spec_file


def _stop(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """Stop the launcher and every rank: SIGTERM to its process group, SIGKILL to what is left after grace_s."""
    if os.name != "posix":
        import psutil

        with contextlib.suppress(psutil.Error):
            procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            for p in procs:
                with contextlib.suppress(psutil.Error):
                    p.kill()
        proc.wait()
        return
    pgid = proc.pid  # start_new_session: the launcher leads its own group

    def signal_group(sig) -> bool:
        try:
            os.killpg(pgid, sig)
            return True
        except ProcessLookupError:  # the group is empty: all stopped
            return False
        except PermissionError:
            return True

    signal_group(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        proc.poll()  # reap the leader, so an exited one does not count as alive
        if proc.returncode is not None and not signal_group(0):
            return
        time.sleep(0.1)
    signal_group(signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=5)


def _parse(line: str) -> dict | None:
    if not line.startswith(MARK):
        return None
    try:
        msg = json.loads(line[len(MARK):])
    except json.JSONDecodeError:
        return None
    return msg if isinstance(msg, dict) else None


def _tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def _rank_error(path: Path) -> str | None:
    """The last exception a rank printed (torchrun's own summary at the end does not name it)."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    pattern = re.compile(r"^(?:\[rank\d+\]:\s*)?([\w.]+(?:Error|Exception)): \S")
    found = [line.strip() for line in lines
             if (m := pattern.match(line)) and not m.group(1).endswith("ChildFailedError")]
    return found[-1] if found else None


def launch_training(kind: str, *, paths: Mapping[str, str | None], rows: Sequence[Mapping], cfg,
                    distributed: DistributedConfig, device: str, out_dir: Path, tb_dir: Path | None,
                    work_dir: Path | None, report_to: Sequence[str], log: Callable[[str], None],
                    progress: Callable[[int, int], None] | None) -> dict[str, float]:
    """Run a train stage ("dpo" or "sft") as an accelerate launch and return rank 0's metrics (see the module
    docstring). `paths`: policy_path / reference_path (dpo) or model_path (sft); `rows`: the pairs or SFT
    examples; `cfg`: the TrainingConfig / SFTConfig."""
    from engine.precision import resolve_precision

    out_dir = Path(out_dir)
    work_dir = Path(work_dir) if work_dir is not None else out_dir.parent / f".{out_dir.name}.launch"
    dev = launch_device(device)
    check_launchable(distributed, dev)
    precision = distributed.mixed_precision or resolve_precision(cfg.precision, dev)
    config_file, spec_file = write_launch_files(
        work_dir, kind=kind, paths=paths, rows=rows, cfg=cfg, dist=distributed, device=dev, precision=precision,
        out_dir=out_dir, tb_dir=tb_dir, report_to=report_to)
    result_file = work_dir / "result.json"
    result_file.unlink(missing_ok=True)
    launch_log = work_dir / "launch.log"
    argv = launch_argv(config_file, spec_file)
    log(f"{kind}: {distributed.strategy} x {distributed.num_processes} processes on {dev} ({precision}); "
        f"launch log {launch_log}")
    # The ranks import engine from this checkout (after the caller's own PYTHONPATH, which keeps precedence:
    # bench/gpu_check.py puts carried wheels and stand-ins there).
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), root) if p)}
    detach = ({"start_new_session": True} if os.name == "posix"
              else {"creationflags": getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)})
    started = time.monotonic()
    with launch_log.open("a") as raw:
        raw.write(f"--- $ {' '.join(argv)}\n")
        raw.flush()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", bufsize=1, env=env, **detach)
        try:
            for line in proc.stdout:
                msg = _parse(line)
                if msg is None:
                    raw.write(line)
                    raw.flush()
                elif "log" in msg:
                    log(str(msg["log"]))
                elif "progress" in msg and progress is not None:
                    progress(*msg["progress"])
            rc = proc.wait()
        except BaseException:  # cancelled (the runner's signal handler) or anything else: no rank outlives us
            _stop(proc)
            raise
        finally:
            proc.stdout.close()
    if rc != 0:
        error = _rank_error(launch_log)
        raise LaunchError(f"{kind}: the {distributed.strategy} launch exited with code {rc} after "
                          f"{time.monotonic() - started:.0f}s" + (f" ({error})" if error else "")
                          + f"; see {launch_log}. Last lines:\n{_tail(launch_log)}")
    try:
        result = json.loads(result_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise LaunchError(f"{kind}: the launch finished without a result ({e}); see {launch_log}") from None
    return {k: float(v) for k, v in result["metrics"].items()}


__all__ = ["MARK", "WORKER_MODULE", "LaunchError", "accelerate_config", "check_launchable", "launch_argv",
           "launch_device", "launch_training", "write_launch_files"]
