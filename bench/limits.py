"""The machine's bounds, which every throughput bench is measured against.

    python bench/limits.py            # one JSON line

Keys: threads, capability (torch's CPU kernel level), amx, avx512_bf16, fp32_gflops and bf16_gflops (a
2048^3 matmul, best of a few timed seconds), mem_gbs (streaming copy of a 256 MB tensor: read + write
bytes per second), and `auto` (the precision `precision: auto` picks here, engine/precision.py).
Other benches import `measure()` and print their throughput as a fraction of these bounds.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _best(fn, seconds: float) -> float:
    """Shortest time of one call of fn over about `seconds` (after a warm-up call)."""
    fn()
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def matmul_gflops(dtype, n: int = 2048, seconds: float = 2.0) -> float:
    import torch

    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return 2 * n**3 / _best(lambda: a @ b, seconds) / 1e9


def memory_gbs(mb: int = 256, seconds: float = 2.0) -> float:
    import torch

    src = torch.ones(mb * 2**20 // 4)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / _best(lambda: dst.copy_(src), seconds) / 1e9


def measure(seconds: float = 2.0) -> dict:
    import torch

    from engine.precision import cpu_flags, resolve_precision

    flags = cpu_flags()
    return {
        "threads": torch.get_num_threads(), **flags,
        "fp32_gflops": round(matmul_gflops(torch.float32, seconds=seconds), 1),
        "bf16_gflops": round(matmul_gflops(torch.bfloat16, seconds=seconds), 1),
        "mem_gbs": round(memory_gbs(seconds=seconds), 1),
        "auto": resolve_precision("auto", "cpu"),
    }


if __name__ == "__main__":
    print(json.dumps(measure()))
