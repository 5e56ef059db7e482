"""Tuned launch parameters, kept as data apart from the kernels.

Keyed by everything that changes the answer: (op, device name, shape class, block size, dtype).
  shape class  the batch bucket of the call (`shape_class(n)`): batch is what moves a sparse linear
               from memory-bound (few rows: stream each stored weight once, as many programs as
               possible) to compute-bound (many rows: big `tl.dot` tiles)
  block size   "RxC" of a BSR weight (`block_key`); "1x1" for CSR
  dtype        x's dtype: "fp32" | "fp16" | "bf16" (`dtype_key`)
A table key may hold "*" for block size or dtype: it then serves any value there. Lookup takes the
most specific entry: exact, then any dtype, then any block size, then both "*". A device with no
entry for the op gets DEFAULTS and one warning per (op, device).

`bench/gpu_check.py --tune` times every candidate of a kernel's `*_configs()` on the card it runs on
and prints entries in the form below, ready to paste into TUNED.
"""
from __future__ import annotations

import functools
import warnings

import torch

ANY = "*"
# Batch buckets: upper bound on N (rows of x) -> class name.
_BUCKETS = ((1, "n1"), (16, "n16"), (64, "n64"), (256, "n256"))
_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def shape_class(n: int) -> str:
    for bound, name in _BUCKETS:
        if n <= bound:
            return name
    return "large"


def block_key(blocksize: tuple[int, int] | None) -> str:
    """"RxC" for a BSR block, "1x1" for CSR (None)."""
    r, c = blocksize or (1, 1)
    return f"{r}x{c}"


def dtype_key(dtype: torch.dtype) -> str:
    return _DTYPES.get(dtype) or str(dtype).replace("torch.", "")


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
#   SPLIT_K  optional, default 1: programs sharing one block row's blocks (split-K: partial sums,
#            then one reduction pass); meant for decode, none measured on a GPU yet
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


def _entries(op: str, device: str, block: str, dtype: str, by_class: dict[str, dict]) -> dict:
    return {(op, device, cls, block, dtype): p for cls, p in by_class.items()}


# NVIDIA H200, triton 3.6, 2026-11-28: bench/gpu_check.py --tune (eager do_bench, 4096x4096, 90 %,
# bf16; bench/results/gpu_h200_2026-11-28*.txt). The n1/n16 picks were within launch-overhead noise.
_H200_BSR_64 = {
    "n1": dict(BLOCK_N=1, ROWS=2, K=1024, num_warps=2, num_stages=1),
    "n16": dict(BLOCK_N=16, ROWS=16, K=256, num_warps=4, num_stages=3),
    "n256": dict(BLOCK_N=128, ROWS=64, K=64, num_warps=4, num_stages=3),
    "large": dict(BLOCK_N=128, ROWS=64, K=64, num_warps=4, num_stages=4),
}
_H200_BSR_32 = {**_H200_BSR_64, "n16": dict(BLOCK_N=16, ROWS=16, K=512, num_warps=4, num_stages=2)}
del _H200_BSR_32["n256"]  # not measured with 32x32 blocks: falls back to the "*" entry
_H200_CSR = {
    "n1": dict(BLOCK_N=1, BLOCK_K=64, num_warps=4, num_stages=2),
    "n16": dict(BLOCK_N=16, BLOCK_K=32, num_warps=4, num_stages=2),
    "n256": dict(BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2),
    "large": dict(BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2),
}

# (op, device name, shape class, block size, dtype) -> parameters measured on that device.
TUNED: dict[tuple[str, str, str, str, str], dict] = {
    **_entries("bsr_linear", "NVIDIA H200", "64x64", "bf16", _H200_BSR_64),
    **_entries("bsr_linear", "NVIDIA H200", "32x32", "bf16", _H200_BSR_32),
    # other blocks and dtypes on the H200: the 64x64 picks (not measured there)
    **_entries("bsr_linear", "NVIDIA H200", ANY, ANY, _H200_BSR_64),
    **_entries("csr_linear", "NVIDIA H200", "1x1", ANY, _H200_CSR),
    # The interpreter runs each program as Python: few, wide programs keep CI fast.
    **_entries("bsr_linear", "interpreter", ANY, ANY, {
        "n1": dict(BLOCK_N=1, ROWS=16, K=64, num_warps=4, num_stages=1),
        "n16": dict(BLOCK_N=16, ROWS=16, K=64, num_warps=4, num_stages=1),
        "n64": dict(BLOCK_N=64, ROWS=32, K=64, num_warps=4, num_stages=1),
        "n256": dict(BLOCK_N=64, ROWS=64, K=64, num_warps=4, num_stages=1),
        "large": dict(BLOCK_N=128, ROWS=64, K=64, num_warps=4, num_stages=1)}),
    **_entries("csr_linear", "interpreter", ANY, ANY, {
        cls: dict(BLOCK_N=bn, BLOCK_K=64, num_warps=4, num_stages=1)
        for cls, bn in (("n1", 1), ("n16", 16), ("n64", 64), ("n256", 64), ("large", 64))}),
}

_warned: set[tuple[str, str]] = set()


def lookup(op: str, device: str, cls: str, block: str = ANY, dtype: str = ANY) -> dict | None:
    """The most specific TUNED entry for the call, or None."""
    for key in ((op, device, cls, block, dtype), (op, device, cls, block, ANY),
                (op, device, cls, ANY, dtype), (op, device, cls, ANY, ANY)):
        hit = TUNED.get(key)
        if hit is not None:
            return dict(hit)
    return None


def launch_params(op: str, device: str, cls: str, block: str = ANY, dtype: str = ANY) -> dict:
    """Tuned parameters for the call; the defaults otherwise, with a one-time warning when the
    device has no entry at all for the op."""
    hit = lookup(op, device, cls, block, dtype)
    if hit is not None:
        return hit
    if not any(k[0] == op and k[1] == device for k in TUNED) and (op, device) not in _warned:
        _warned.add((op, device))
        warnings.warn(f"kernels.tuning: no tuned {op} parameters for device {device!r}; using defaults "
                      "(run bench/gpu_check.py --tune on it and add the printed entries to TUNED)",
                      RuntimeWarning, stacklevel=3)
    return dict(DEFAULTS[(op, cls)])
