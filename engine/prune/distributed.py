"""DistributedDataParallel support: fine-tuning under `torchrun` (gloo on CPU, nccl on GPU).

Every rank builds the same model, masks are broadcast from rank 0 (so gradient-based criteria
cannot disagree across ranks), DDP averages gradients, and each rank evaluates the whole validation
set, so the "best epoch" decision is identical everywhere. Rank 0 alone writes files.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn


def init_from_env() -> bool:
    """Start the process group when launched by torchrun (WORLD_SIZE > 1); True if distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    backend = "nccl" if torch.cuda.is_available() and os.environ.get("PRUNE_BACKEND") != "gloo" else "gloo"
    dist.init_process_group(backend=backend)
    return dist.get_world_size() > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def broadcast_masks(masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rank 0's masks on every rank (no-op when not distributed)."""
    if not active():
        return masks
    out = {}
    for name in sorted(masks):  # the same order on every rank
        t = masks[name].to(torch.uint8).contiguous()
        dist.broadcast(t, src=0)
        out[name] = t.bool()
    return {name: out[name] for name in masks}


def wrap(model: nn.Module) -> nn.Module:
    """DDP-wrap `model` when distributed; its constructor broadcasts rank 0's parameters."""
    if not active():
        return model
    return nn.parallel.DistributedDataParallel(model)


def weights_checksum(model: nn.Module) -> torch.Tensor:
    """A float64 vector of per-tensor sums, to compare ranks cheaply."""
    return torch.stack([p.detach().double().sum() for p in model.state_dict().values()])


def check_ranks_agree(model: nn.Module) -> None:
    """Raise if any rank's weights differ from rank 0's (they must, after DDP training)."""
    if not active():
        return
    mine = weights_checksum(model)
    ref = mine.clone()
    dist.broadcast(ref, src=0)
    if not torch.equal(mine, ref):
        raise RuntimeError(f"rank {rank()}: weights diverged from rank 0 after distributed fine-tuning")


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
