"""When to prune how much: one-shot, or Zhu & Gupta's cubic schedule (arXiv:1710.01878).

The cubic schedule raises sparsity from s_i to s_f over n pruning steps spaced dt apart, from
training step t0:  s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt))^3.
It prunes fast while many redundant weights remain and slowly near the target, leaving the network
time to recover between steps.
"""
from __future__ import annotations

from .granularity import PruneError, check_sparsity

SCHEDULES = ("oneshot", "gradual")


def cubic_sparsity(step: int, final: float, *, initial: float = 0.0, begin: int = 0,
                   n_steps: int = 10, every: int = 1) -> float:
    """Target sparsity at training step `step` (before `begin`: `initial`; after: `final`)."""
    check_sparsity(final, "final sparsity")
    check_sparsity(initial, "initial sparsity")
    if n_steps < 1 or every < 1:
        raise PruneError(f"cubic schedule needs n_steps >= 1 and every >= 1, got {n_steps}, {every}")
    if step < begin:
        return initial
    progress = min((step - begin) / (n_steps * every), 1.0)
    return final + (initial - final) * (1.0 - progress) ** 3


def pruning_plan(schedule: str, final: float, total_steps: int, *, initial: float = 0.0,
                 n_prunes: int = 10, ramp_fraction: float = 0.5) -> dict[int, float]:
    """{training step: target sparsity} at which to (re)prune.

    oneshot: {0: final}. gradual: `n_prunes` + 1 steps spread over the first `ramp_fraction` of
    training (the rest fine-tunes at the final sparsity), following the cubic schedule."""
    if schedule not in SCHEDULES:
        raise PruneError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    check_sparsity(final)
    if schedule == "oneshot" or final == initial:
        return {0: final}
    if total_steps < 1:
        raise PruneError(f"a gradual schedule needs training steps, got {total_steps}")
    n = max(1, min(n_prunes, total_steps))
    every = max(1, int(total_steps * ramp_fraction) // n)
    return {k * every: cubic_sparsity(k * every, final, initial=initial, n_steps=n, every=every)
            for k in range(n + 1)}
