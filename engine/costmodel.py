"""Predicted time of one linear layer in each layout, from bytes moved and FLOPs (a roofline whose
bandwidths and FLOP rates are the ones each kernel family reaches), plus a per-call overhead.
`auto` format selection and `inspect`'s expected speedup both read it.

CPU constants were fitted to measurements on the development machine (2 cores, AVX-512/AVX2,
torch 2.13 MKL; bench/results/cpu.md, "cost model"): dense F.linear is memory-bound at batch 1
but far below its peak at batch 8-32 (small-N GEMM), the CSR kernel is gather-bound at batch
< 4 and L2-bound beyond, BSR streams its values at batch 1 and runs register-blocked FMAs beyond.
Rates for 2 threads; `predict_seconds(..., threads=1)` scales them for one thread.
"""
from __future__ import annotations

import math

# ---- CPU: rates for 2 threads ------------------------------------------------------------------
# B/s of weight + activation traffic; layers up to 64 MiB are partly cache-resident here (a 64 MiB
# GEMV streams at ~50 GB/s on 2 threads, a 256 MiB one at ~30 GB/s).
CPU_BANDWIDTH = {"dense": 48e9, "csr": 40e9, "bsr": 48e9}
# FLOP/s reached on stored values, by batch (log-interpolated between the measured batches).
CPU_RATE = {
    "dense": {1: 250e9, 8: 100e9, 32: 145e9, 128: 250e9},
    "csr": {1: 11e9, 3: 11e9, 4: 30e9, 8: 50e9, 32: 120e9, 128: 120e9},
    "bsr": {1: 60e9, 3: 60e9, 4: 60e9, 8: 86e9, 32: 200e9, 128: 200e9},
}
# Without AVX-512 the batched sparse micro-kernels run 8-wide (measured: ~0.55x at batch >= 32).
CPU_AVX2_ONLY = {"csr": {32: 0.9, 128: 0.85}, "bsr": {32: 0.7, 128: 0.55}}
# Seconds per call, the same for every layout: the Python in front of the kernels (module call,
# sparse_linear dispatch, wrapper) is not a property of the layout, and in a model it is paid per
# layer either way. Measured on tiny layers: F.linear ~4 us, engine.cpu wrapper ~6 us, through
# sparse_linear ~30 us (bench/results/cpu.md) -- dispatch cost, to be trimmed rather than modelled.
CPU_OVERHEAD = {"dense": 4e-6, "csr": 4e-6, "bsr": 4e-6}

GPU = {
    "dense": (3.0e12, 600e12),
    "csr": (1.5e12, 30e12),
    "bsr": (2.5e12, 300e12),
}
CALL_OVERHEAD_S = {"cpu": 4e-6, "cuda": 8e-6}


def _interp(table: dict[int, float], n: int) -> float:
    keys = sorted(table)
    if n <= keys[0]:
        return table[keys[0]]
    if n >= keys[-1]:
        return table[keys[-1]]
    for lo, hi in zip(keys, keys[1:]):
        if lo <= n <= hi:
            f = (math.log2(n) - math.log2(lo)) / (math.log2(hi) - math.log2(lo))
            return table[lo] * (table[hi] / table[lo]) ** f
    return table[keys[-1]]


def _cpu_has_avx512() -> bool:
    try:
        from . import cpu
        return cpu.available() and cpu.isa() == "avx512"
    except Exception:  # no extension: the model still answers, for the AVX-512 machine it describes
        return True


def _weight_bytes(fmt, o, i, stored, blocksize, value_bytes):
    if fmt == "dense":
        return o * i * value_bytes
    if fmt == "csr":
        # The kernels read uint16 column indices when I <= 65536 (prepared once), else int32.
        return stored * (value_bytes + (2 if i <= 65536 else 4)) + (o + 1) * 4
    r, c = blocksize
    return stored * value_bytes + (stored // max(1, r * c)) * 4 + (o // r + 1) * 4


def predict_seconds(fmt: str, shape: tuple[int, int], stored: int, batch: int,
                    blocksize: tuple[int, int] | None = None, value_bytes: int = 4,
                    device: str = "cpu", threads: int = 2) -> float:
    """fmt: "dense" | "csr" | "bsr"; shape (O, I); stored = values kept (nnz, or nnzb·R·C)."""
    if fmt not in ("dense", "csr", "bsr"):
        raise ValueError(f"predict_seconds: unknown format {fmt!r}")
    o, i = shape
    batch = max(1, int(batch))
    w_bytes = _weight_bytes(fmt, o, i, stored, blocksize, value_bytes)
    act_bytes = 4 * batch * (o + i)
    flops = 2.0 * batch * (o * i if fmt == "dense" else stored)
    if device == "cuda":
        bw, peak = GPU[fmt]
        return CALL_OVERHEAD_S["cuda"] + max((w_bytes + act_bytes) / bw, flops / peak)

    bw = CPU_BANDWIDTH[fmt]
    rate = _interp(CPU_RATE[fmt], batch)
    if fmt != "dense" and not _cpu_has_avx512():
        rate *= _interp(CPU_AVX2_ONLY[fmt], batch) if batch >= 32 else 1.0
    if fmt == "bsr":
        r, c = blocksize
        if batch < 4 and not (c % 8 == 0 or (c == 1 and r % 8 == 0)):
            rate *= 0.25   # no vector SpMV shape for this block: scalar loop
        elif batch >= 4 and r < 4:
            rate *= 0.75   # fewer rows share each loaded X vector
    if threads != 2:
        # Compute scales with cores; one core already draws most of the memory bandwidth.
        rate *= threads / 2
        bw *= min(1.0, 0.75 + 0.125 * threads)
    return CPU_OVERHEAD[fmt] + max((w_bytes + act_bytes) / bw, flops / rate)
