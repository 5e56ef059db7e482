"""Importance scores: one non-negative score per weight, higher = more important.

- magnitude: |w|.
- gradient:  sum over calibration batches of |dL/dw| (sensitivity of the loss to the weight).
- taylor:    sum over batches of |w * dL/dw|, the first-order Taylor estimate of the loss change
             when w is set to zero (Molchanov et al.).
- snip:      |w * dL/dw| with the gradient summed over the batches *before* the absolute value,
             normalised to sum 1 over the model (SNIP, Lee et al. 2019). Meant to be computed at
             initialisation for pre-pruning; the normalisation makes scores comparable globally.
- random:    uniform noise from a seeded generator (a baseline).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from .granularity import PruneError
from .masks import unwrap, weight_2d

METHODS = ("magnitude", "gradient", "taylor", "snip", "random")
NEEDS_DATA = ("gradient", "taylor", "snip")


def check_method(method: str) -> str:
    if method not in METHODS:
        raise PruneError(f"unknown pruning method {method!r}; choose one of {', '.join(METHODS)}")
    return method


def _gradients(model: nn.Module, layers: dict[str, nn.Module], batches: Iterable, loss_fn: Callable,
               absolute_per_batch: bool, times_weight: bool) -> dict[str, torch.Tensor]:
    """Accumulate per-weight |g| or |w g| (per batch, or of the summed g) over `batches`, without
    touching the model's own .grad fields or its parameters."""
    weights = [m.weight for m in layers.values()]
    acc = {name: torch.zeros_like(weight_2d(m), dtype=torch.float32) for name, m in layers.items()}
    was_training = model.training
    model.eval()  # dropout / batch-norm updates would make the scores depend on noise
    n = 0
    try:
        for x, y in batches:
            loss = loss_fn(model(x), y)
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
            for (name, m), g in zip(layers.items(), grads):
                if g is None:
                    continue
                g = g.detach().reshape(acc[name].shape).float()
                if times_weight and absolute_per_batch:
                    g = g * weight_2d(m).detach().float()
                acc[name] += g.abs() if absolute_per_batch else g
            n += 1
    finally:
        model.train(was_training)
    if n == 0:
        raise PruneError("criteria: the calibration data yielded no batches")
    if not absolute_per_batch:
        for name, m in layers.items():
            acc[name] = (acc[name] * (weight_2d(m).detach().float() if times_weight else 1.0)).abs()
    return acc


def scores(method: str, model: nn.Module, layers: dict[str, nn.Module], *, batches: Iterable | None = None,
           loss_fn: Callable | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Scores (float32, each layer's W[out, in] shape) for every layer in `layers`."""
    check_method(method)
    model = unwrap(model)
    if method == "magnitude":
        return {name: weight_2d(m).detach().abs().float().clone() for name, m in layers.items()}
    if method == "random":
        gen = torch.Generator().manual_seed(seed)
        return {name: torch.rand(weight_2d(m).shape, generator=gen) for name, m in layers.items()}
    if batches is None:
        raise PruneError(f"method {method!r} needs calibration batches (an iterable of (x, y))")
    loss_fn = loss_fn or nn.functional.cross_entropy
    if method == "gradient":
        return _gradients(model, layers, batches, loss_fn, absolute_per_batch=True, times_weight=False)
    if method == "taylor":
        return _gradients(model, layers, batches, loss_fn, absolute_per_batch=True, times_weight=True)
    raw = _gradients(model, layers, batches, loss_fn, absolute_per_batch=False, times_weight=True)
    total = sum(float(s.sum()) for s in raw.values()) or 1.0
    return {name: s / total for name, s in raw.items()}
