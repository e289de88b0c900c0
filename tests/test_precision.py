"""`precision: auto` follows the hardware: the CPU probe decides, explicit choices and CUDA are respected."""

import pytest

from engine import precision


@pytest.fixture(autouse=True)
def _fresh_probe(monkeypatch):
    monkeypatch.delenv("SELFRAT_CPU_PRECISION", raising=False)
    precision.cpu_bf16_speedup.cache_clear()
    yield
    precision.cpu_bf16_speedup.cache_clear()


def _probe_says(monkeypatch, bf16_gflops: float, fp32_gflops: float):
    import torch

    rates = {torch.bfloat16: bf16_gflops, torch.float32: fp32_gflops}
    monkeypatch.setattr(precision, "_matmul_rate", lambda dtype, n, seconds: rates[dtype])


def test_cpu_with_native_bf16_picks_bf16(monkeypatch):
    _probe_says(monkeypatch, bf16_gflops=2475.0, fp32_gflops=355.0)  # an AMX machine
    assert precision.resolve_precision("auto", "cpu") == "bf16"


def test_cpu_with_emulated_bf16_picks_fp32(monkeypatch):
    _probe_says(monkeypatch, bf16_gflops=12.0, fp32_gflops=120.0)  # AVX2 only: bf16 ~10x slower
    assert precision.resolve_precision("auto", "cpu") == "fp32"
    _probe_says(monkeypatch, bf16_gflops=130.0, fp32_gflops=120.0)  # a near-tie is not worth bf16's rounding
    precision.cpu_bf16_speedup.cache_clear()
    assert precision.resolve_precision("auto", "cpu") == "fp32"


def test_probe_runs_once_per_process(monkeypatch):
    calls = []

    def rate(dtype, n, seconds):
        calls.append(dtype)
        return 1.0

    monkeypatch.setattr(precision, "_matmul_rate", rate)
    for _ in range(3):
        precision.resolve_precision("auto", "cpu")
    assert len(calls) == 8  # four interleaved bf16 / fp32 trials, then cached


def test_a_preempted_trial_does_not_flip_the_choice(monkeypatch):
    """Another job takes the cores during one bf16 trial: the best of each dtype's trials still decides."""
    import torch

    trials = {torch.bfloat16: iter([40.0, 300.0, 310.0, 290.0]), torch.float32: iter([120.0] * 4)}
    monkeypatch.setattr(precision, "_matmul_rate", lambda dtype, n, seconds: next(trials[dtype]))
    assert precision.resolve_precision("auto", "cpu") == "bf16"


def test_probe_times_one_thread_and_restores_the_thread_count(monkeypatch):
    import torch

    seen = []

    def rate(dtype, n, seconds):
        seen.append(torch.get_num_threads())
        return 1.0

    monkeypatch.setattr(precision, "_matmul_rate", rate)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        precision.cpu_bf16_speedup()
        assert set(seen) == {1} and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_rate_counts_the_thread_cpu_time_only(monkeypatch):
    """A trial preempted for a while is not slower in the thread's CPU time (what a busy machine does)."""
    import time

    import torch

    clock = iter(range(0, 10_000))
    monkeypatch.setattr(time, "thread_time", lambda: next(clock) * 0.001)  # 1 ms of CPU per call to the clock
    monkeypatch.setattr(time, "perf_counter", lambda: pytest.fail("wall time must not be used"))
    assert precision._matmul_rate(torch.float32, 8, 0.005) > 0


def test_explicit_choices_env_override_and_other_devices(monkeypatch):
    monkeypatch.setattr(precision, "_matmul_rate", lambda *a: pytest.fail("an explicit choice must not probe"))
    assert precision.resolve_precision("fp32", "cpu") == "fp32"
    assert precision.resolve_precision("bf16", "cpu") == "bf16"
    assert precision.resolve_precision("auto", "mps") == "fp32"
    monkeypatch.setenv("SELFRAT_CPU_PRECISION", "fp32")
    assert precision.resolve_precision("auto", "cpu") == "fp32"
    monkeypatch.setenv("SELFRAT_CPU_PRECISION", "fp16")
    with pytest.raises(ValueError, match="SELFRAT_CPU_PRECISION"):
        precision.resolve_precision("auto", "cpu")
    with pytest.raises(ValueError, match="expected one of"):
        precision.resolve_precision("half", "cpu")


def test_cuda_auto_follows_bf16_support(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert precision.resolve_precision("auto", "cuda:1") == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert precision.resolve_precision("auto", "cuda") == "fp32"


def test_real_probe_returns_a_choice():
    assert precision.resolve_precision("auto", "cpu") in ("fp32", "bf16")
    assert precision.cpu_bf16_speedup() > 0
