"""Predicted time of one linear layer in each layout, from bytes moved and FLOPs (a roofline with
measured efficiencies). `auto` format selection and `inspect`'s expected speedup both read it.

Constants describe the development machine (2 cores, AVX2/FMA); `calibrate` would refit them.
"""
from __future__ import annotations

# name: (memory bandwidth B/s, arithmetic peak FLOP/s) as achieved by each kernel family.
CPU = {
    "dense": (12e9, 90e9),   # torch F.linear (MKL/oneDNN sgemm)
    "csr": (9e9, 18e9),      # gathers X per non-zero: far below FMA peak
    "bsr": (11e9, 60e9),     # block inner loops vectorise over C
}
GPU = {
    "dense": (3.0e12, 600e12),
    "csr": (1.5e12, 30e12),
    "bsr": (2.5e12, 300e12),
}
CALL_OVERHEAD_S = {"cpu": 4e-6, "cuda": 8e-6}


def predict_seconds(fmt: str, shape: tuple[int, int], stored: int, batch: int,
                    blocksize: tuple[int, int] | None = None, value_bytes: int = 4,
                    device: str = "cpu") -> float:
    """fmt: "dense" | "csr" | "bsr"; shape (O, I); stored = values kept (nnz, or nnzb·R·C)."""
    o, i = shape
    bw, peak = (GPU if device == "cuda" else CPU)[fmt]
    if fmt == "dense":
        w_bytes = o * i * value_bytes
        flops = 2.0 * batch * o * i
    elif fmt == "csr":
        w_bytes = stored * (value_bytes + 4) + (o + 1) * 4
        flops = 2.0 * batch * stored
    elif fmt == "bsr":
        r, c = blocksize
        w_bytes = stored * value_bytes + (stored // max(1, r * c)) * 4 + (o // r + 1) * 4
        flops = 2.0 * batch * stored
        peak *= min(1.0, c / 8)  # blocks narrower than one AVX2 vector waste lanes
    else:
        raise ValueError(f"predict_seconds: unknown format {fmt!r}")
    act_bytes = 4 * batch * (o + i)
    return CALL_OVERHEAD_S.get(device, 4e-6) + max((w_bytes + act_bytes) / bw, flops / peak)
