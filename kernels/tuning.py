"""Tuned launch parameters, kept as data apart from the kernels.

Keyed by (op, device name, shape class). The shape class is the batch bucket of the call
(`shape_class(n)`), since batch is what moves a sparse linear from memory-bound (few rows: stream
each stored weight once, as many programs as possible) to compute-bound (many rows: big `tl.dot`
tiles). A device missing from the table gets the defaults and one warning per device.

`bench/gpu_check.py --tune` times every candidate of a kernel's `*_configs()` on the card it runs on
and prints entries in the form below, ready to paste into TUNED.
"""
from __future__ import annotations

import functools
import warnings

import torch

# Batch buckets: upper bound on N (rows of x) -> class name.
_BUCKETS = ((1, "n1"), (16, "n16"), (64, "n64"), (256, "n256"))


def shape_class(n: int) -> str:
    for bound, name in _BUCKETS:
        if n <= bound:
            return name
    return "large"


def device_name(x: torch.Tensor) -> str:
    if x.device.type == "cuda":
        return _cuda_name(x.device.index if x.device.index is not None else torch.cuda.current_device())
    return "interpreter"  # CPU tensors only reach the kernels under TRITON_INTERPRET=1


@functools.lru_cache(maxsize=None)
def _cuda_name(index: int) -> str:  # asked once per device: it sits on every launch's path
    return torch.cuda.get_device_name(index)


# bsr_linear parameters:
#   BLOCK_N  rows of x per program (< 16: FMA path, >= 16: tl.dot path)
#   ROWS     rows of a weight block per program (a block row is split among R/ROWS programs)
#   K        reduction elements per loop step (K // C blocks of one block row at once)
# csr_linear parameters:
#   BLOCK_N  rows of x per program;  BLOCK_K  stored entries per loop step
DEFAULTS: dict[tuple[str, str], dict] = {
    ("bsr_linear", "n1"): dict(BLOCK_N=1, ROWS=8, K=512, num_warps=4, num_stages=1),
    ("bsr_linear", "n16"): dict(BLOCK_N=16, ROWS=16, K=256, num_warps=4, num_stages=3),
    ("bsr_linear", "n64"): dict(BLOCK_N=64, ROWS=32, K=256, num_warps=4, num_stages=3),
    ("bsr_linear", "n256"): dict(BLOCK_N=64, ROWS=32, K=128, num_warps=4, num_stages=3),
    ("bsr_linear", "large"): dict(BLOCK_N=128, ROWS=64, K=64, num_warps=8, num_stages=3),
    ("csr_linear", "n1"): dict(BLOCK_N=1, BLOCK_K=256, num_warps=4, num_stages=2),
    ("csr_linear", "n16"): dict(BLOCK_N=16, BLOCK_K=64, num_warps=4, num_stages=2),
    ("csr_linear", "n64"): dict(BLOCK_N=32, BLOCK_K=64, num_warps=4, num_stages=2),
    ("csr_linear", "n256"): dict(BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2),
    ("csr_linear", "large"): dict(BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2),
}

# (op, device name, shape class) -> parameters measured on that device.
TUNED: dict[tuple[str, str, str], dict] = {
    # NVIDIA H200, triton 3.6, 2026-11-28: bench/gpu_check.py --tune (eager do_bench, 4096x4096, 90 %,
    # 64x64 blocks, bf16; see bench/RESULTS.md). The n1/n16 picks were within launch-overhead noise.
    ("bsr_linear", "NVIDIA H200", "n1"): dict(BLOCK_N=1, ROWS=2, K=1024, num_warps=2, num_stages=1),
    ("bsr_linear", "NVIDIA H200", "n16"): dict(BLOCK_N=16, ROWS=16, K=256, num_warps=4, num_stages=3),
    ("bsr_linear", "NVIDIA H200", "n256"): dict(BLOCK_N=128, ROWS=64, K=64, num_warps=4, num_stages=3),
    ("bsr_linear", "NVIDIA H200", "large"): dict(BLOCK_N=128, ROWS=64, K=64, num_warps=4, num_stages=4),
    ("csr_linear", "NVIDIA H200", "n1"): dict(BLOCK_N=1, BLOCK_K=64, num_warps=4, num_stages=2),
    ("csr_linear", "NVIDIA H200", "n16"): dict(BLOCK_N=16, BLOCK_K=32, num_warps=4, num_stages=2),
    ("csr_linear", "NVIDIA H200", "n256"): dict(BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2),
    ("csr_linear", "NVIDIA H200", "large"): dict(BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2),
    # The interpreter runs each program as Python: few, wide programs keep CI fast.
    ("bsr_linear", "interpreter", "n1"): dict(BLOCK_N=1, ROWS=16, K=64, num_warps=4, num_stages=1),
    ("bsr_linear", "interpreter", "n16"): dict(BLOCK_N=16, ROWS=16, K=64, num_warps=4, num_stages=1),
    ("bsr_linear", "interpreter", "n64"): dict(BLOCK_N=64, ROWS=32, K=64, num_warps=4, num_stages=1),
    ("bsr_linear", "interpreter", "n256"): dict(BLOCK_N=64, ROWS=64, K=64, num_warps=4, num_stages=1),
    ("bsr_linear", "interpreter", "large"): dict(BLOCK_N=128, ROWS=64, K=64, num_warps=4, num_stages=1),
    ("csr_linear", "interpreter", "n1"): dict(BLOCK_N=1, BLOCK_K=64, num_warps=4, num_stages=1),
    ("csr_linear", "interpreter", "n16"): dict(BLOCK_N=16, BLOCK_K=64, num_warps=4, num_stages=1),
    ("csr_linear", "interpreter", "n64"): dict(BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=1),
    ("csr_linear", "interpreter", "n256"): dict(BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=1),
    ("csr_linear", "interpreter", "large"): dict(BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=1),
}

_warned: set[tuple[str, str]] = set()


def launch_params(op: str, device: str, cls: str) -> dict:
    """Tuned parameters for (op, device, shape class); defaults with a one-time warning otherwise."""
    hit = TUNED.get((op, device, cls))
    if hit is not None:
        return dict(hit)
    if not any(k[0] == op and k[1] == device for k in TUNED) and (op, device) not in _warned:
        _warned.add((op, device))
        warnings.warn(f"kernels.tuning: no tuned {op} parameters for device {device!r}; using defaults "
                      "(run bench/gpu_check.py --tune on it and add the printed entries to TUNED)",
                      RuntimeWarning, stacklevel=3)
    return dict(DEFAULTS[(op, cls)])
