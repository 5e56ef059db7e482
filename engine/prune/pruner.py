"""Scores -> masks for a whole model: criterion, granularity, scope, overrides and skipped layers."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch
from torch import nn

from . import distributed
from .criteria import NEEDS_DATA, check_method, scores
from .granularity import PruneError, check_fits, check_sparsity, global_masks, layer_masks, parse_granularity
from .masks import MaskSet, prunable_layers, weight_2d

SCOPES = ("layer", "global")


@dataclass
class PruneConfig:
    method: str = "magnitude"
    granularity: str = "unstructured"   # unstructured | block:RxC | nm:N:M
    scope: str = "layer"                # rank within each layer, or across all layers together
    skip: tuple[str, ...] = ()          # layer names left dense (e.g. the classifier head)
    layer_sparsity: dict[str, float] = field(default_factory=dict)  # per-layer overrides
    calib_batches: int = 8              # batches scored by gradient / taylor / snip
    seed: int = 0                       # for the random criterion

    def validate(self, model: nn.Module) -> dict[str, nn.Module]:
        """Check every argument against the model once, up front; return the layers to prune."""
        check_method(self.method)
        gran = parse_granularity(self.granularity)
        if self.scope not in SCOPES:
            raise PruneError(f"unknown scope {self.scope!r}; choose one of {', '.join(SCOPES)}")
        layers = prunable_layers(model, tuple(self.skip))
        unknown = [n for n in self.layer_sparsity if n not in layers]
        if unknown:
            raise PruneError(f"per-layer sparsity names {unknown}, which are not prunable layers being "
                             f"pruned; those are {list(layers)}")
        for name, s in self.layer_sparsity.items():
            check_sparsity(s, f"sparsity of layer {name!r}")
            if gran.kind == "nm":
                raise PruneError(f"per-layer sparsity (layer {name!r}) does not apply to N:M, whose "
                                 f"sparsity is fixed at 1 - N/M")
        for name, m in layers.items():
            check_fits(name, tuple(weight_2d(m).shape), gran)
        if self.calib_batches < 1:
            raise PruneError(f"calib_batches must be >= 1, got {self.calib_batches}")
        return layers


def calibration_batches(train_loader, n: int) -> list:
    """The first `n` batches of the training data in a fixed (unshuffled) order."""
    fixed = torch.utils.data.DataLoader(train_loader.dataset, batch_size=train_loader.batch_size or 32,
                                        shuffle=False)
    return list(itertools.islice(fixed, n))


def compute_masks(model: nn.Module, sparsity: float, cfg: PruneConfig, *, batches=None, loss_fn=None,
                  previous: MaskSet | None = None, progress: float = 1.0) -> MaskSet:
    """Masks reaching `sparsity` (overridden layers reach `progress` x their own sparsity).

    With `previous`, weights it pruned stay pruned: they score -inf, so a gradual schedule only
    ever removes more."""
    check_sparsity(sparsity)
    layers = cfg.validate(model)
    gran = parse_granularity(cfg.granularity)
    if cfg.method in NEEDS_DATA and batches is None:
        raise PruneError(f"method {cfg.method!r} needs calibration batches")
    s = scores(cfg.method, model, layers, batches=batches, loss_fn=loss_fn, seed=cfg.seed)
    if previous is not None:
        for name, keep in previous.masks.items():
            if name in s:
                s[name] = s[name].masked_fill(~keep.reshape(s[name].shape).to(s[name].device), float("-inf"))
    overridden = {n: s.pop(n) for n in list(s) if n in cfg.layer_sparsity}
    if cfg.scope == "global":
        masks = global_masks(s, gran, sparsity)
    else:
        masks = layer_masks(s, gran, sparsity)
    masks.update(layer_masks(overridden, gran, {n: cfg.layer_sparsity[n] * progress for n in overridden}))
    masks = {name: masks[name].reshape(layers[name].weight.shape).cpu() for name in layers}
    return MaskSet(distributed.broadcast_masks(masks))
