"""`sparse-engine bench --model ARTIFACT`: a converted model against its own dense twin, in fp32
and in bf16.

The twin is the same loaded module with every SparseLinear swapped for a dense torch linear layer
holding the same (pruned) weights, so the two differ only in the kernels that run. The bf16 twin is
that twin cast with `.to(torch.bfloat16)`, as a user would (torch runs it on oneDNN, with AMX where
the CPU has it): the speedup a user reads is against the faster of the two.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from .models import get_family
from .modules import SparseLinear
from .reference import apply_activation


class DenseLinear(nn.Module):
    """torch's own dense layer for one SparseLinear (same weights, bias, fused activation)."""

    def __init__(self, layer: SparseLinear):
        super().__init__()
        w = layer.sparse_weight
        # Buffers, so that .to(torch.bfloat16) casts them with the rest of the twin.
        self.register_buffer("weight", w if isinstance(w, torch.Tensor) else w.to_dense(torch.float32))
        self.register_buffer("bias", None if layer.bias is None else layer.bias.float())
        self.activation = layer.activation

    def forward(self, x):
        return apply_activation(F.linear(x, self.weight, self.bias), self.activation)


def dense_twin(model: nn.Module) -> nn.Module:
    twin = copy.deepcopy(model)
    for module in list(twin.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, SparseLinear):
                setattr(module, child_name, DenseLinear(child))
    return twin


def example_inputs(model: nn.Module, batch: int, seq: int) -> tuple:
    """Random inputs from the model's family (`seq` tokens per sequence where it takes sequences)."""
    arch = model.arch
    return get_family(arch["family"]).example_inputs(arch["config"], batch, torch.Generator().manual_seed(0),
                                                     seq=seq)


def _bf16(args: tuple) -> tuple:
    return tuple(a.to(torch.bfloat16) if a.is_floating_point() else a for a in args)


def run(path: str, batches: list[int], threads: int, seq: int = 128, min_time: float = 0.5) -> int:
    from . import cpu
    from .timing import time_interleaved
    from .runtime import load
    torch.set_num_threads(threads)
    model = load(path, device="cpu")
    twin = dense_twin(model)
    twin16 = copy.deepcopy(twin).to(torch.bfloat16)
    n_sparse = sum(isinstance(m, SparseLinear) for m in model.modules())
    isa = f"{cpu.isa_label()}, bf16 kernels {cpu.bf16_isa()}" if cpu.available() else "no C++ extension"
    print(f"model {path}: family {model.spec.get('family')}, {n_sparse} SparseLinear layers, "
          f"{threads} threads, torch {torch.__version__}")
    amx = cpu.available() and cpu.bf16_support()["amx"]
    print(f"engine: {isa}; dense: torch F.linear (fp32, and bf16 after .to(torch.bfloat16)), torch CPU "
          f"capability {torch.backends.cpu.get_cpu_capability()}{', AMX present (oneDNN bf16)' if amx else ''}; "
          f"'vs best' is against the faster dense")
    print(f"{'batch':>6} {'fp32 ms':>9} {'bf16 ms':>9} {'engine ms':>10} {'vs fp32':>8} {'vs best':>8} "
          f"{'max |diff|':>11}")
    for batch in batches:
        args = example_inputs(model, batch, seq)
        args16 = _bf16(args)
        with torch.inference_mode():
            diff = (model(*args).float() - twin(*args).float()).abs().max().item()
        t = time_interleaved({"dense": lambda: twin(*args), "bf16": lambda: twin16(*args16),
                              "engine": lambda: model(*args)}, min_time=min_time)
        best = min(t["dense"], t["bf16"])
        print(f"{batch:>6} {1e3 * t['dense']:>9.3f} {1e3 * t['bf16']:>9.3f} {1e3 * t['engine']:>10.3f} "
              f"{t['dense'] / t['engine']:>7.2f}x {best / t['engine']:>7.2f}x {diff:>11.2e}")
    return 0
