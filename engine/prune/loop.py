"""One prune-and-train trial, and the accuracy-targeted search over sparsity that repeats it.

A trial starts from the dense trained model (post-pruning) or from a fresh initialisation
(pre-pruning), prunes one-shot or on the cubic schedule, fine-tunes, and measures validation and
test accuracy. The search decides on validation accuracy only; test accuracy is reported, never
used to choose.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

from torch import nn

from . import distributed
from .finetune import TrainConfig, evaluate, finetune
from .granularity import PruneError, check_sparsity, parse_granularity
from .masks import MaskSet
from .pruner import PruneConfig, calibration_batches, compute_masks
from .schedule import SCHEDULES, pruning_plan

WHEN = ("post", "pre")


@dataclass
class Task:
    """What to prune: a model factory (seed -> freshly initialised model) and the three loaders."""
    make_model: Callable[[int], nn.Module]
    train_loader: object
    val_loader: object
    test_loader: object
    loss_fn: Callable | None = None


@dataclass
class Trial:
    sparsity: float          # the target
    model: nn.Module
    masks: MaskSet
    history: list
    val_accuracy: float
    test_accuracy: float

    def summary(self) -> dict:
        return {"target_sparsity": self.sparsity, "sparsity": self.masks.sparsity(),
                "val_accuracy": self.val_accuracy, "test_accuracy": self.test_accuracy,
                "epochs": self.history}


def run_trial(task: Task, dense: nn.Module, sparsity: float, prune_cfg: PruneConfig, train_cfg: TrainConfig,
              *, when: str = "post", schedule: str = "oneshot", teacher: nn.Module | None = None) -> Trial:
    """Prune to `sparsity` and train; `dense` is the trained model (post) or ignored (pre)."""
    check_sparsity(sparsity)
    if when not in WHEN:
        raise PruneError(f"unknown pruning time {when!r}; choose 'post' (trained model) or 'pre' (at init)")
    if schedule not in SCHEDULES:
        raise PruneError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    gran = parse_granularity(prune_cfg.granularity)
    if gran.kind == "nm" and schedule == "gradual":
        raise PruneError("N:M sparsity is fixed at 1 - N/M, so it has no gradual schedule; use oneshot")
    model = copy.deepcopy(dense) if when == "post" else task.make_model(train_cfg.seed)
    calib = calibration_batches(task.train_loader, prune_cfg.calib_batches)

    def reprune(target: float, previous: MaskSet | None) -> MaskSet:
        progress = target / sparsity if sparsity else 1.0
        return compute_masks(model, target, prune_cfg, batches=calib, loss_fn=task.loss_fn,
                             previous=previous, progress=progress)

    per_rank = math.ceil(len(task.train_loader.dataset) / distributed.world_size())
    steps = train_cfg.epochs * math.ceil(per_rank / train_cfg.batch_size)
    plan = pruning_plan(schedule, sparsity, steps)
    masks, history = finetune(model, task.train_loader, task.val_loader, train_cfg, plan=plan,
                              reprune=reprune, teacher=teacher, loss_fn=task.loss_fn)
    return Trial(sparsity, model, masks, history, evaluate(model, task.val_loader),
                 evaluate(model, task.test_loader))


@dataclass
class SearchResult:
    best: Trial | None        # the highest sparsity that met the target (None: not even the lowest)
    trials: list[Trial]
    threshold: float          # the validation accuracy a trial had to reach


def search_sparsity(trial: Callable[[float], Trial], *, threshold: float, max_sparsity: float = 0.99,
                    tol: float = 0.01, max_trials: int = 10, on_trial: Callable[[Trial], None] | None = None
                    ) -> SearchResult:
    """Find the highest sparsity whose trial reaches `threshold` validation accuracy.

    Bisection in log-density (log(1 - s)): the interesting range is 80-99 %, where a linear
    bisection would spend most trials at low sparsity. It tries `max_sparsity` first, then halves
    the bracket [highest passing, lowest failing] until it is narrower than `tol` or `max_trials`
    trials ran. It assumes accuracy falls as sparsity rises; a noisy non-monotone curve can make
    it settle below the true highest passing sparsity, and every trial is reported either way."""
    check_sparsity(max_sparsity, "max_sparsity")
    if tol <= 0 or max_trials < 1:
        raise PruneError(f"need tol > 0 and max_trials >= 1, got {tol}, {max_trials}")
    trials, best = [], None
    lo, hi = 0.0, max_sparsity  # lo: highest known passing (dense passes by assumption)
    target = max_sparsity
    while len(trials) < max_trials:
        t = trial(target)
        trials.append(t)
        if on_trial:
            on_trial(t)
        if t.val_accuracy >= threshold:
            lo = target
            if best is None or target > best.sparsity:
                best = t
            if target >= hi:
                break
        else:
            hi = target
        if hi - lo <= tol:
            break
        target = 1.0 - math.sqrt((1.0 - lo) * (1.0 - hi))  # geometric mean of the two densities
        target = round(target, 4)
        if target <= lo or target >= hi:
            break
    return SearchResult(best, trials, threshold)
