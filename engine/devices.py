"""Which device a stage runs on: one rule for sampling, evaluation and training.

    auto      cuda when a GPU is visible, else cpu (never mps: ask for it by name)
    cpu
    cuda      the current CUDA device (GPU 0 unless torch.cuda.set_device or CUDA_VISIBLE_DEVICES says otherwise)
    cuda:N    GPU N
    mps       Apple silicon (Metal)

`check_device` checks the spelling only and imports nothing heavy, so the config and the app can call it;
`resolve_device` also checks that the device is there and turns `auto` into a concrete name.

    >>> check_device("cuda:1")
    'cuda:1'
    >>> resolve_device("cpu")
    'cpu'
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess

DEVICE_HELP = "auto (cuda if available, else cpu), cpu, cuda, cuda:N or mps"
_DEVICE = re.compile(r"^(?:auto|cpu|mps|cuda(?::\d+)?)$")


def check_device(name: str) -> str:
    """`name` if it is a device name this project accepts (see the module docstring); ValueError otherwise."""
    if not isinstance(name, str) or not _DEVICE.match(name):
        raise ValueError(f"device {name!r}: expected {DEVICE_HELP}")
    return name


def resolve_device(name: str = "auto") -> str:
    """The concrete device for `name`: 'auto' -> 'cuda' when a GPU is visible, else 'cpu'; an explicit name
    is returned as given once it is known to be there (ValueError naming what is missing otherwise)."""
    check_device(name)
    if name == "cpu":
        return name
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError("device 'mps': this machine has no usable Apple Metal backend; use cpu or auto")
        return name
    if not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: no CUDA device is visible here; use cpu or auto")
    index = int(name.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) are visible "
                         f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    return name


def use_device(device: str) -> None:
    """Make a resolved `cuda:N` the current CUDA device, for libraries that place work on "the" GPU
    themselves (TRL / accelerate take the current one); nothing to do for other devices."""
    if device.startswith("cuda:"):
        import torch

        torch.cuda.set_device(int(device.partition(":")[2]))


def _visible(count: int) -> int:
    """`count` GPUs as CUDA_VISIBLE_DEVICES narrows them ("" or "-1": none; unset: all)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return count
    ids = [v for v in visible.split(",") if v.strip()]
    if not ids or ids[0].strip() == "-1":
        return 0
    return min(count, len(ids))


@functools.cache
def _nvidia_smi_count() -> int:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return 0
    try:
        out = subprocess.run([exe, "-L"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))


def gpu_count() -> int:
    """CUDA GPUs this process may use, found without importing torch (the app and config checks call it):
    the lines `nvidia-smi -L` lists (0 when it is absent or fails), narrowed by CUDA_VISIBLE_DEVICES.
    `SELFRAT_GPU_COUNT=N` overrides it (tests; machines without nvidia-smi)."""
    forced = os.environ.get("SELFRAT_GPU_COUNT", "").strip()
    if forced:
        return int(forced)
    return _visible(_nvidia_smi_count())
