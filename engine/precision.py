"""Which precision a stage computes in: `auto` follows the hardware, never a constant.

On CUDA `auto` is bf16 (fp32 where the GPU has no bf16). On CPU it depends on the chip, and both kinds occur
on machines of the same name: with AMX or AVX512-BF16 a bf16 matmul runs 3-7x faster than fp32 (measured
here: 2,475 vs 355 GFLOP/s with AMX), while on an AVX2-only chip bf16 is emulated and ~10x *slower*. So on
CPU, `auto` times a short fp32 and bf16 matmul once per process (~50 ms) and picks bf16 only when it is
clearly faster; the CPU flags are reported beside the choice but not trusted alone (a flag can be present
while the kernels torch ships do not use it). `SELFRAT_CPU_PRECISION=fp32|bf16` overrides the probe.

What the choice means differs by stage: inference (sampling, evaluation) loads bf16 weights; training keeps
fp32 master weights and runs bf16 autocast (see engine/training.py for why).
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path

PRECISIONS = ("auto", "fp32", "bf16")
# bf16 must beat fp32 by this factor to be chosen: a near-tie is not worth bf16's rounding.
MIN_BF16_SPEEDUP = 1.3


def cpu_flags() -> dict[str, bool | str]:
    """What the CPU says it has: torch's kernel capability, AMX tiles, AVX512-BF16 (Linux flags)."""
    import torch

    flags: dict[str, bool | str] = {"capability": torch.backends.cpu.get_cpu_capability()}
    try:
        flags["amx"] = bool(torch.cpu._is_amx_tile_supported())
    except Exception:  # a private API: absent on some builds
        flags["amx"] = False
    cpuinfo = Path("/proc/cpuinfo")
    text = cpuinfo.read_text(errors="replace") if cpuinfo.exists() else ""
    flags["avx512_bf16"] = " avx512_bf16" in text
    return flags


def _matmul_rate(dtype, n: int, seconds: float) -> float:
    """GFLOP/s of an n x n matmul in `dtype` per second of this thread's CPU time, over about `seconds` of
    it (after one warm-up call). CPU time, not wall time: time the thread spent preempted is not counted."""
    import torch

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dtype)
    b = torch.randn(n, n, generator=gen).to(dtype)
    a @ b
    calls, start = 0, time.thread_time()
    while (elapsed := time.thread_time() - start) < seconds or calls < 2:
        a @ b
        calls += 1
    return 2 * n**3 * calls / elapsed / 1e9


@functools.cache
def cpu_bf16_speedup(rounds: int = 4) -> float:
    """bf16 / fp32 matmul throughput of one core of this CPU, timed once per process (~100 ms): the best of
    `rounds` interleaved short trials of each, on one thread, in that thread's CPU time. A busy machine must
    not flip the choice: timed in wall time on both cores beside a 2-thread job, 2 of 15 probes gave < 1 on
    an AVX512-BF16 CPU whose true ratio is 2.1 (the kernels' threads wait for each other while one is
    preempted); one thread timed in its own CPU time gave 2.06-2.12 in all 15."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = {torch.bfloat16: 0.0, torch.float32: 0.0}
        for _ in range(rounds):
            for dtype in best:
                best[dtype] = max(best[dtype], _matmul_rate(dtype, 384, 0.012))
    finally:
        torch.set_num_threads(threads)
    return best[torch.bfloat16] / best[torch.float32]


def resolve_precision(precision: str, device: str) -> str:
    """'fp32' or 'bf16' for a stage on `device` ('cpu', 'cuda', 'cuda:N', 'mps')."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    device = str(device)
    if device.startswith("cuda"):
        import torch

        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device != "cpu":
        return "fp32"
    forced = os.environ.get("SELFRAT_CPU_PRECISION", "").strip().lower()
    if forced:
        if forced not in ("fp32", "bf16"):
            raise ValueError(f"SELFRAT_CPU_PRECISION={forced!r}: expected fp32 or bf16")
        return forced
    return "bf16" if cpu_bf16_speedup() >= MIN_BF16_SPEEDUP else "fp32"


def torch_dtype(precision: str):
    import torch

    return {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
