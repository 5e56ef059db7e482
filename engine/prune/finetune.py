"""The fine-tuning loop: masks enforced, optional re-pruning on a schedule, optional distillation
from the dense model, evaluation each epoch, and the best epoch's weights kept. Runs the same under
torchrun (DDP); see distributed.py."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from . import distributed
from .granularity import PruneError
from .masks import MaskSet, prunable_layers, unwrap

OPTIMIZERS = ("adam", "adamw", "sgd")
DISTILL = ("none", "logit", "hidden")


@dataclass
class TrainConfig:
    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 1e-4
    optimizer: str = "adam"
    batch_size: int = 32
    distill: str = "none"        # none | logit (KL on softened logits) | hidden (MSE on hidden layers)
    distill_alpha: float = 0.5   # weight of the distillation term; 1 - alpha goes to the task loss
    temperature: float = 2.0
    seed: int = 0
    progress: bool = False
    desc: str = "fine-tune"      # progress bar label

    def validate(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise PruneError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.distill not in DISTILL:
            raise PruneError(f"unknown distillation {self.distill!r}; choose one of {', '.join(DISTILL)}")
        if self.epochs < 0 or self.batch_size < 1 or self.lr <= 0:
            raise PruneError(f"need epochs >= 0, batch_size >= 1, lr > 0; got {self.epochs}, "
                             f"{self.batch_size}, {self.lr}")
        if not 0.0 <= self.distill_alpha <= 1.0 or self.temperature <= 0:
            raise PruneError(f"need distill_alpha in [0, 1] and temperature > 0; got "
                             f"{self.distill_alpha}, {self.temperature}")


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)


@torch.no_grad()
def evaluate(model: nn.Module, loader) -> float:
    """Top-1 accuracy of `model` over `loader` (every batch, on this process)."""
    model = unwrap(model)
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(dim=1) == y).sum())
        total += len(y)
    model.train(was_training)
    return correct / max(total, 1)


class _HiddenTap:
    """Records the outputs of the named layers on each forward pass."""

    def __init__(self, model: nn.Module, names: list[str]):
        modules = dict(unwrap(model).named_modules())
        self.outputs: dict[str, torch.Tensor] = {}
        self.handles = [modules[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name):
        def hook(_module, _inputs, output):
            self.outputs[name] = output
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def _train_loader(train_loader, cfg: TrainConfig):
    """Each rank's shard of the training data (a DistributedSampler) when distributed; otherwise a
    loader shuffled by its own seeded generator so runs repeat exactly."""
    dataset = train_loader.dataset
    if distributed.active():
        sampler = torch.utils.data.distributed.DistributedSampler(dataset, shuffle=True, seed=cfg.seed)
    else:
        sampler = torch.utils.data.RandomSampler(dataset, generator=torch.Generator().manual_seed(cfg.seed))
    if isinstance(dataset, torch.utils.data.TensorDataset):
        # Index a whole batch at once: per-sample fetch + collate costs more than a small MLP's step.
        batches = torch.utils.data.BatchSampler(sampler, cfg.batch_size, drop_last=False)
        loader = torch.utils.data.DataLoader(dataset, sampler=batches, batch_size=None)
    else:
        loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler)
    return loader, sampler if distributed.active() else None


def finetune(model: nn.Module, train_loader, val_loader, cfg: TrainConfig, *, masks: MaskSet | None = None,
             plan: dict[int, float] | None = None, reprune: Callable[[float, MaskSet | None], MaskSet] | None = None,
             teacher: nn.Module | None = None, loss_fn: Callable | None = None) -> tuple[MaskSet | None, list[dict]]:
    """Train `model` in place with `masks` enforced. Returns (final masks, per-epoch history).

    `plan` maps a training step to a target sparsity; at that step `reprune(sparsity, masks)` gives
    the new masks (the gradual schedule). The best validation epoch is kept, but only among epochs
    that end after the last pruning step, so a less sparse early epoch can never win."""
    cfg.validate()
    if cfg.distill != "none" and teacher is None:
        raise PruneError(f"distillation {cfg.distill!r} needs the dense teacher model")
    if plan and reprune is None:
        raise PruneError("a pruning plan needs a reprune function")
    loss_fn = loss_fn or nn.functional.cross_entropy
    plan = dict(plan or {})
    last_prune = max(plan) if plan else -1
    torch.manual_seed(cfg.seed)
    loader, sampler = _train_loader(train_loader, cfg)
    ddp = distributed.wrap(model)
    optimizer = make_optimizer(cfg, ddp.parameters())
    if 0 in plan:
        masks = reprune(plan.pop(0), masks)
    if masks is not None:
        masks.enforce(model, optimizer)

    taps = None
    if cfg.distill == "hidden":
        # Every prunable layer but the last (the logits, which the task loss already covers).
        names = list(prunable_layers(model))[:-1]
        if not names:
            raise PruneError("hidden-state distillation needs at least two prunable layers")
        taps = (_HiddenTap(model, names), _HiddenTap(teacher, names))
    if teacher is not None:
        teacher.eval()

    history, best_acc, best_state, step = [], -1.0, None, 0
    epochs = range(cfg.epochs)
    if cfg.progress and distributed.is_main():
        from tqdm.auto import tqdm
        epochs = tqdm(epochs, desc=cfg.desc, unit="epoch", leave=False)
    try:
        for epoch in epochs:
            if sampler is not None:
                sampler.set_epoch(epoch)
            ddp.train()
            total_loss, batches = 0.0, 0
            for x, y in loader:
                if step in plan:
                    masks = reprune(plan.pop(step), masks)
                    masks.enforce(model, optimizer)
                optimizer.zero_grad()
                out = ddp(x)
                loss = loss_fn(out, y)
                if teacher is not None and cfg.distill != "none":
                    with torch.no_grad():
                        t_out = teacher(x)
                    if cfg.distill == "logit":
                        t = cfg.temperature
                        kd = nn.functional.kl_div(nn.functional.log_softmax(out / t, dim=1),
                                                  nn.functional.softmax(t_out / t, dim=1),
                                                  reduction="batchmean") * t * t
                    else:
                        kd = sum(nn.functional.mse_loss(taps[0].outputs[n], taps[1].outputs[n])
                                 for n in taps[0].outputs) / len(taps[0].outputs)
                    loss = (1 - cfg.distill_alpha) * loss + cfg.distill_alpha * kd
                loss.backward()
                optimizer.step()
                total_loss += float(loss.detach())
                batches += 1
                step += 1
            val_acc = evaluate(model, val_loader)
            record = {"epoch": epoch + 1, "step": step, "train_loss": total_loss / max(batches, 1),
                      "val_accuracy": val_acc, "sparsity": masks.sparsity() if masks else 0.0}
            history.append(record)
            if hasattr(epochs, "set_postfix"):
                epochs.set_postfix(val=f"{val_acc:.4f}", sparsity=f"{record['sparsity']:.3f}")
            if step > last_prune and val_acc > best_acc:
                best_acc, best_state = val_acc, copy.deepcopy(unwrap(model).state_dict())
        if plan:  # fewer steps than planned (tiny data): reach the final sparsity anyway
            masks = reprune(plan[max(plan)], masks)
            masks.enforce(model, optimizer)
            best_state = None
    finally:
        if masks is not None:
            masks.release()
        if taps:
            taps[0].close(), taps[1].close()
    if best_state is not None:
        unwrap(model).load_state_dict(best_state)
    if masks is not None:
        masks.apply(model)
    distributed.check_ranks_agree(unwrap(model))
    return masks, history
