"""Shared builders for the tests: random sparse weights and small pruned models."""
import os

import torch


def amd_zen4() -> bool:
    """An AMD family-25 CPU with AVX-512 (Zen 4), read from /proc/cpuinfo, independently of engine._C."""
    if not os.path.exists("/proc/cpuinfo"):
        return False
    info = open("/proc/cpuinfo").read()
    return "AuthenticAMD" in info and "\ncpu family\t: 25\n" in info and " avx512f " in info


def random_sparse(o: int, i: int, sparsity: float, dtype=torch.float32, block=(1, 1)) -> torch.Tensor:
    """Random weight with about `sparsity` of its R×C blocks zeroed (unstructured when block is 1×1)."""
    r, c = block
    keep = torch.rand(o // r, i // c) >= sparsity
    keep = keep.repeat_interleave(r, 0).repeat_interleave(c, 1)
    return (torch.randn(o, i) * keep).to(dtype)
