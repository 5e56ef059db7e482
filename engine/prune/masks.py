"""Which layers are prunable, and keeping their masks enforced through training and export.

A `MaskSet` maps a layer name (as in `model.named_modules()`) to a bool keep-mask of the layer's
weight shape. `enforce(model, optimizer)` makes pruned weights stay exactly zero with any optimizer:
gradients of pruned weights are zeroed as they are computed, and the weights are re-masked after
every optimizer step, because weight decay and momentum (Adam, AdamW, SGD with momentum) move a
weight even when its gradient is zero.
"""
from __future__ import annotations

import torch
from torch import nn

from .granularity import PruneError


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel (or DataParallel) wrapper, so names carry no
    'module.' prefix."""
    return getattr(model, "module", model) if isinstance(
        model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def is_prunable(module: nn.Module) -> bool:
    """nn.Linear, and 1x1 nn.Conv2d (a Linear over channels) without groups."""
    if isinstance(module, nn.Linear):
        return True
    return (isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1)
            and module.groups == 1)


def prunable_layers(model: nn.Module, skip: list[str] | tuple[str, ...] = ()) -> dict[str, nn.Module]:
    """Prunable layers by name, minus `skip`. Every name in `skip` must exist, so a typo fails
    loudly instead of silently pruning the layer it meant to protect."""
    model = unwrap(model)
    all_layers = {name: m for name, m in model.named_modules() if is_prunable(m)}
    unknown = [s for s in skip if s not in all_layers]
    if unknown:
        raise PruneError(f"cannot skip {unknown}: no prunable layer has that name; prunable layers "
                         f"are {list(all_layers)}")
    if not all_layers:
        raise PruneError(f"{type(model).__name__} has no prunable layers (nn.Linear or 1x1 nn.Conv2d)")
    return {name: m for name, m in all_layers.items() if name not in skip}


def weight_2d(module: nn.Module) -> torch.Tensor:
    """The weight viewed as W[out, in] (a 1x1 conv's (out, in, 1, 1) weight flattened)."""
    w = module.weight
    return w.reshape(w.shape[0], -1)


class MaskSet:
    """Keep-masks per layer name, and the machinery that keeps them applied."""

    def __init__(self, masks: dict[str, torch.Tensor] | None = None):
        self.masks: dict[str, torch.Tensor] = dict(masks or {})
        self._handles: list = []

    # -- applying -----------------------------------------------------------------------------
    def _layers(self, model: nn.Module) -> dict[str, nn.Module]:
        modules = dict(unwrap(model).named_modules())
        missing = [n for n in self.masks if n not in modules]
        if missing:
            raise PruneError(f"masks name layers the model lacks: {missing}")
        return {n: modules[n] for n in self.masks}

    def _mask_for(self, module: nn.Module, name: str) -> torch.Tensor:
        mask = self.masks[name]
        w = module.weight
        if mask.numel() != w.numel() or mask.shape[0] != w.shape[0]:
            raise PruneError(f"mask of layer {name!r} has shape {tuple(mask.shape)}, weight has "
                             f"{tuple(w.shape)}")
        return mask.reshape(w.shape).to(w.device)

    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Zero every pruned weight in place."""
        for name, module in self._layers(model).items():
            module.weight.mul_(self._mask_for(module, name))

    def enforce(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> "MaskSet":
        """Apply now, then mask gradients as they are computed and re-mask after each step of
        `optimizer`. Call `release()` (or enforce again) to remove the hooks."""
        self.release()
        self.apply(model)
        for name, module in self._layers(model).items():
            mask = self._mask_for(module, name)
            self._handles.append(module.weight.register_hook(lambda g, m=mask: g * m))
        if optimizer is not None:
            self._handles.append(optimizer.register_step_post_hook(lambda *_: self.apply(model)))
        return self

    def release(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # -- reporting ----------------------------------------------------------------------------
    def layer_stats(self) -> dict[str, dict]:
        return {name: {"shape": list(m.shape), "kept": int(m.sum()), "total": m.numel(),
                       "sparsity": 1.0 - int(m.sum()) / max(m.numel(), 1)}
                for name, m in self.masks.items()}

    def sparsity(self) -> float:
        """Fraction of all masked weights that are pruned."""
        total = sum(m.numel() for m in self.masks.values())
        kept = sum(int(m.sum()) for m in self.masks.values())
        return 1.0 - kept / total if total else 0.0


def model_sparsity(model: nn.Module, skip: tuple[str, ...] = ()) -> dict[str, float]:
    """Measured fraction of exact zeros in each prunable layer's weight (not what a mask claims)."""
    return {name: float((m.weight == 0).sum()) / m.weight.numel()
            for name, m in prunable_layers(model).items() if name not in skip}


# -- export / import ------------------------------------------------------------------------
MASK_SUFFIX = "_mask"


def export_state_dict(model: nn.Module, masks: MaskSet, style: str = "zeros") -> dict[str, torch.Tensor]:
    """A plain state_dict of the pruned model.

    style="zeros" (default): every tensor of `model.state_dict()` with pruned weights exactly zero,
    plus a bool `<layer>.weight_mask` beside each pruned layer's `<layer>.weight`.
    style="torch-prune": torch.nn.utils.prune's layout, `<layer>.weight_orig` + `<layer>.weight_mask`
    (float 0/1) instead of `<layer>.weight`."""
    if style not in ("zeros", "torch-prune"):
        raise PruneError(f"unknown export style {style!r}; choose 'zeros' or 'torch-prune'")
    model = unwrap(model)
    masks.apply(model)
    state = {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}
    layers = masks._layers(model)
    for name, module in layers.items():
        key = f"{name}.weight" if name else "weight"
        mask = masks._mask_for(module, name).cpu()
        if style == "zeros":
            state[key + MASK_SUFFIX] = mask.clone()
        else:
            state[key + "_orig"] = state.pop(key)
            state[key + MASK_SUFFIX] = mask.to(state[key + "_orig"].dtype)
    return state


def split_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], MaskSet]:
    """Read either export style (or torch.nn.utils.prune's own) back into a plain state_dict with
    zeros in place, plus the masks by layer name."""
    plain, masks = {}, {}
    for key, value in state.items():
        if key.endswith(".weight_orig") or key == "weight_orig":
            continue
        if key.endswith("weight" + MASK_SUFFIX):
            continue
        plain[key] = value
    for key, value in state.items():
        if not key.endswith("weight" + MASK_SUFFIX):
            continue
        wkey = key[:-len(MASK_SUFFIX)]
        layer = wkey[:-len(".weight")] if wkey.endswith(".weight") else ""
        mask = value != 0
        if wkey + "_orig" in state:
            weight = state[wkey + "_orig"]
            plain[wkey] = weight * mask.to(weight.dtype)
        elif wkey not in plain:
            raise PruneError(f"mask {key!r} has no weight {wkey!r} or {wkey + '_orig'!r} beside it")
        if tuple(mask.shape) != tuple(plain[wkey].shape):
            raise PruneError(f"mask {key!r} has shape {tuple(mask.shape)}, weight has "
                             f"{tuple(plain[wkey].shape)}")
        plain[wkey] = plain[wkey] * mask.to(plain[wkey].dtype)
        masks[layer] = mask
    return plain, MaskSet(masks)
