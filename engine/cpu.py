"""Python side of the C++ CPU kernels (engine._C): checks once at the boundary, then hands raw
buffers to the extension. Kernels compute in fp32; weights may be stored as fp32, bf16 or fp16.

The kernels pick their instruction set at import: AVX2+FMA+F16C where the CPU has it, portable C++
otherwise. SPARSE_ENGINE_ISA=portable (environment) or `set_isa("portable")` forces the fallback.
"""
from __future__ import annotations

import torch

from .formats import BSR, CSR

try:
    from . import _C
    _IMPORT_ERROR = None
except ImportError as e:  # the extension is optional: engine imports and falls back without it
    _C = None
    _IMPORT_ERROR = str(e)

_ACT = {"none": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3}
_WDTYPE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def available() -> bool:
    return _C is not None


def import_error() -> str | None:
    return _IMPORT_ERROR


def isa() -> str:
    """Instruction set the kernels run with now: "avx2" or "portable"."""
    return _C.get_isa()


def set_isa(name: str) -> None:
    """Select "auto", "avx2" or "portable" for later calls (process-wide; for tests and benchmarks)."""
    _C.set_isa(name)


def _prepare(fn, x, w, bias):
    if w.device.type != "cpu":
        raise ValueError(f"{fn}: weight is on {w.device}, the C++ kernels need CPU tensors")
    if w.values.dtype not in _WDTYPE:
        raise TypeError(f"{fn}: weight values must be float32/bfloat16/float16, got {w.values.dtype}")
    out_dtype = x.dtype
    x = x.to(torch.float32).contiguous()
    b = None if bias is None else bias.to(torch.float32).contiguous()
    y = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32)
    # No-ops for layouts built by engine.formats; they guard hand-made views.
    crow, col, val = (t.contiguous() for t in (w.crow_indices, w.col_indices, w.values))
    return x, b, y, out_dtype, (crow, col, val)


def prepare_weight(w: CSR | BSR) -> CSR | BSR:
    """One-time layout work for the C++ kernels, cached on `w` and reused by every later call.

    CSR with in_features <= 65536: a uint16 copy of the column indices (2 bytes less per stored
    value on the memory-bound small-batch path). Called lazily by the first csr_linear_cpu call;
    call it at construction (SparseLinear) to keep that cost out of the first inference.
    """
    if isinstance(w, CSR) and w.shape[1] <= 65536 and w.device.type == "cpu":
        _col16(w)
    return w


def _col16(w: CSR) -> torch.Tensor | None:
    """uint16 column indices for w, cached on it together with the int32 tensor they mirror."""
    cached = getattr(w, "_cpu_col16", None)
    if cached is not None and cached[0] is w.col_indices:
        return cached[1]
    if w.shape[1] > 65536:
        return None
    # int32 -> int16 keeps the low 16 bits, i.e. the uint16 value for indices < 65536.
    c16 = w.col_indices.to(torch.int16).contiguous()
    w._cpu_col16 = (w.col_indices, c16)
    return c16


def csr_linear_cpu(x: torch.Tensor, w: CSR, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """x (N, I) -> act(x · Wᵀ + b) (N, O)."""
    x, b, y, out_dtype, (crow, col, val) = _prepare("csr_linear_cpu", x, w, bias)
    c16 = _col16(w)
    _C.csr_linear(y.data_ptr(), x.data_ptr(), x.shape[0], w.shape[1], w.shape[0],
                  crow.data_ptr(), col.data_ptr(), val.data_ptr(), _WDTYPE[val.dtype],
                  0 if b is None else b.data_ptr(), _ACT[activation], torch.get_num_threads(),
                  0 if c16 is None else c16.data_ptr())
    return y.to(out_dtype)


def bsr_linear_cpu(x: torch.Tensor, w: BSR, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """x (N, I) -> act(x · Wᵀ + b) (N, O) for W in R×C blocks."""
    x, b, y, out_dtype, (crow, col, val) = _prepare("bsr_linear_cpu", x, w, bias)
    r, c = w.blocksize
    _C.bsr_linear(y.data_ptr(), x.data_ptr(), x.shape[0], w.shape[1], w.shape[0], r, c,
                  crow.data_ptr(), col.data_ptr(), val.data_ptr(), _WDTYPE[val.dtype],
                  0 if b is None else b.data_ptr(), _ACT[activation], torch.get_num_threads())
    return y.to(out_dtype)
