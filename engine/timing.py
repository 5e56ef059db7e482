"""Interleaved timing: the one timer of the bench verb, the bench/ scripts and the tests.

Every provider runs in the same process, round by round, so a burst of load from other processes
lands on all alike; results are medians. `measure_machine` gives the bandwidth and FMA peak that
roofline bounds are drawn against."""
from __future__ import annotations

import platform
import statistics
import time
from typing import Callable

import torch


# Seconds of idle before the slot after a provider that runs its own thread pool (ONNX Runtime,
# DeepSparse): ORT's intra-op workers keep spinning for 30-100 ms after a run and, on a 2-core
# machine, halved the speed of whichever provider was timed next (BERT 2x768 batch 1: 18 ms right
# after ORT, 8 ms after 0.1 s idle; 2026-12-07, AMD EPYC Zen 4, bench/results/peers_zen4.md).
SPIN_IDLE_S = 0.15


def time_rounds(timers: dict[str, Callable[[int], float]], min_time: float = 0.4, rounds: int = 7,
                idle_after: frozenset[str] | set[str] = frozenset()) -> dict[str, list[float]]:
    """Seconds per call of each provider, one sample per round; timed(n) runs n calls back to back
    and returns seconds per call (in this process, or in another that times itself). Each round runs
    every provider in turn (enough calls to fill min_time/rounds), so a burst of load from other
    processes lands on all providers alike. After a provider named in idle_after the machine is left
    idle for SPIN_IDLE_S, so the next one does not share the cores with its spinning threads."""
    reps = {}
    for name, timed in timers.items():
        timed(1)  # warm-up: first calls pack and cache
        reps[name] = max(1, min(2000, int(min_time / rounds / max(timed(1), 1e-6))))
    samples: dict[str, list[float]] = {k: [] for k in timers}
    for _ in range(rounds):
        for name, timed in timers.items():
            samples[name].append(timed(reps[name]))
            if name in idle_after:
                time.sleep(SPIN_IDLE_S)
    return samples


def calls_timer(fn: Callable, clock: Callable[[], float] = time.perf_counter) -> Callable[[int], float]:
    """fn -> timed(n) for time_rounds: seconds per call of n back-to-back calls of fn by `clock`."""
    def timed(n: int) -> float:
        t0 = clock()
        for _ in range(n):
            fn()
        return (clock() - t0) / n
    return timed


def time_samples(fns: dict[str, Callable], min_time: float = 0.4, rounds: int = 7,
                 clock: Callable[[], float] = time.perf_counter, idle_after=frozenset()) -> dict[str, list[float]]:
    """Seconds per call of each fn, one sample per round (time_rounds, under inference_mode).
    clock=time.thread_time counts only this thread's CPU time: immune to time slices lost to other
    processes, but valid for single-threaded runs only (--cpu-time)."""
    with torch.inference_mode():
        return time_rounds({k: calls_timer(fn, clock) for k, fn in fns.items()}, min_time, rounds, idle_after)


def time_interleaved(fns: dict[str, Callable], min_time: float = 0.4, rounds: int = 7,
                     clock: Callable[[], float] = time.perf_counter, idle_after=frozenset()) -> dict[str, float]:
    """Median seconds per call of each fn (see time_samples)."""
    return {k: statistics.median(v) for k, v in time_samples(fns, min_time, rounds, clock, idle_after).items()}


def median_and_min(samples: dict[str, list[float]]) -> dict[str, tuple[float, float]]:
    """(median, minimum) per fn: on a shared machine the minimum is the least disturbed estimate."""
    return {k: (statistics.median(v), min(v)) for k, v in samples.items()}


def measure_machine(threads: int, seconds: float = 1.0, clock: Callable[[], float] = time.perf_counter
                    ) -> dict[str, float]:
    """Streaming read bandwidth (B/s) and FMA peak (FLOP/s), both with `threads` threads.

    Bandwidth: the faster of a sum over a 256 MiB fp32 vector and a GEMV over a 64 MiB fp32
    matrix (the largest layer of the grid, re-read every call: whatever cache level holds it helps
    dense and sparse alike, so this is the rate a bound for these layers must assume). Peak:
    torch's sgemm at 2048³ (MKL, AVX-512 here), the practical FMA peak of dense torch."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        big = torch.ones(64 * 1024 * 1024)
        mat, vec = torch.ones(4096, 4096), torch.ones(4096)
        a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
        t = time_interleaved({"sum": lambda: big.sum(), "mv": lambda: torch.mv(mat, vec), "mm": lambda: a @ b},
                             min_time=seconds, rounds=5, clock=clock)
        bw = max(big.numel() * 4 / t["sum"], mat.numel() * 4 / t["mv"])
        return {"bandwidth": bw, "peak": 2.0 * 2048 ** 3 / t["mm"]}
    finally:
        torch.set_num_threads(old)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
