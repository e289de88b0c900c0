"""One rank of a distributed train stage: `python -m engine.train_worker --spec spec.json`, started by
`accelerate launch` (engine.distributed writes the spec and reads the result). It never opens the store: its
inputs are the files the spec names. Rank 0 alone prints the step lines and progress (as `MARK` lines the
parent forwards to run.log), writes the checkpoint (engine.training._publish) and result.json.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

from engine.distributed import MARK


def _watch_parent(pid: int, every_s: float = 1.0) -> None:
    """Leave at once when the runner that launched us is gone (killed without a chance to stop the ranks)."""
    def watch():
        while True:
            time.sleep(every_s)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(143)
            except PermissionError:
                pass
    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def run(spec: dict) -> dict | None:
    """Train one rank per the spec; rank 0 returns the metrics (and writes result.json), the others None."""
    from accelerate import PartialState

    from engine.config import SFTConfig, TrainingConfig
    from engine.training import Launched, train_dpo, train_sft

    # Sets up this rank's process group (gloo on CPU, nccl on GPUs) before the model loads, as the trainer's
    # accelerator will find it.
    state = PartialState(cpu=spec["device"] == "cpu")
    main = state.is_main_process

    def emit(**msg) -> None:
        if main:
            print(MARK + json.dumps(msg), flush=True)

    launched = Launched(device=spec["device"], precision=spec["precision"], strategy=spec["strategy"],
                        num_processes=int(spec["num_processes"]), main=main)
    with open(spec["data"]) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    common = dict(out_dir=Path(spec["out_dir"]), device=spec["device"], launched=launched,
                  tb_dir=Path(spec["tb_dir"]) if spec.get("tb_dir") else None,
                  log=lambda line: emit(log=line), progress=lambda done, total: emit(progress=[done, total]))
    started = time.monotonic()
    if spec["kind"] == "dpo":
        metrics = train_dpo(policy_path=spec["policy_path"], reference_path=spec.get("reference_path"), pairs=rows,
                            cfg=TrainingConfig.model_validate(spec["cfg"]), **common)
    elif spec["kind"] == "sft":
        metrics = train_sft(model_path=spec["model_path"], examples=rows, cfg=SFTConfig.model_validate(spec["cfg"]),
                            report_to=spec.get("report_to") or ["none"], **common)
    else:
        raise ValueError(f"unknown train stage kind {spec['kind']!r}")
    if not main:
        return None
    result = {"metrics": metrics, "num_processes": state.num_processes,
              "distributed_type": str(state.distributed_type), "wall_s": time.monotonic() - started}
    out = Path(spec["result"])
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(result, indent=2, allow_nan=True))
    os.replace(tmp, out)
    return metrics


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m engine.train_worker", description=__doc__.split("\n")[0])
    parser.add_argument("--spec", required=True, help="spec.json written by engine.distributed")
    args = parser.parse_args(argv)
    spec = json.loads(Path(args.spec).read_text())
    if spec.get("parent_pid"):
        _watch_parent(int(spec["parent_pid"]))
    run(spec)


if __name__ == "__main__":
    main()
