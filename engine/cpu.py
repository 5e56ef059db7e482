"""Python side of the C++ CPU kernels (engine._C): checks once at the boundary, then hands raw
buffers to the extension. Kernels compute in fp32; weights may be stored as fp32, bf16 or fp16.

The kernels pick their instruction set at import: AVX-512F micro-kernels where the CPU has them,
else AVX2+FMA+F16C, else portable C++. SPARSE_ENGINE_ISA=avx2|portable (environment) or
`set_isa(...)` forces a narrower one (tests run every path).

Per call the only Python work is the launch: a weight's buffer addresses (and, for CSR, a uint16
copy of its column indices) are prepared once and cached on the weight object (`prepare_weight`).
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
_U16_MAX_COLS = 65536  # uint16 column indices address at most this many input features


def available() -> bool:
    return _C is not None


def import_error() -> str | None:
    return _IMPORT_ERROR


def isa() -> str:
    """Instruction set the kernels run with now: "avx512", "avx2" or "portable"."""
    return _C.get_isa()


def set_isa(name: str) -> None:
    """Select "auto", "avx512", "avx2" or "portable" for later calls (process-wide)."""
    _C.set_isa(name)


class _Prepared:
    """Kernel-ready view of one weight: contiguous buffers kept alive, and their addresses."""

    __slots__ = ("src", "keep", "crow", "col", "val", "col16", "wdtype")

    def __init__(self, fn: str, w: CSR | BSR):
        if w.device.type != "cpu":
            raise ValueError(f"{fn}: weight is on {w.device}, the C++ kernels need CPU tensors")
        if w.values.dtype not in _WDTYPE:
            raise TypeError(f"{fn}: weight values must be float32/bfloat16/float16, got {w.values.dtype}")
        self.src = (w.crow_indices, w.col_indices, w.values)
        crow, col, val = (t.contiguous() for t in self.src)
        keep = [crow, col, val]
        self.col16 = 0
        if isinstance(w, CSR) and w.shape[1] <= _U16_MAX_COLS:
            # 2 bytes less per stored value on the memory-bound small-batch path. int32 -> int16
            # keeps the low 16 bits: the uint16 value of every index < 65536.
            c16 = col.to(torch.int16)
            keep.append(c16)
            self.col16 = c16.data_ptr()
        self.keep = keep
        self.crow, self.col, self.val = crow.data_ptr(), col.data_ptr(), val.data_ptr()
        self.wdtype = _WDTYPE[val.dtype]

    def fresh(self, w) -> bool:
        s = self.src
        return s[0] is w.crow_indices and s[1] is w.col_indices and s[2] is w.values


def _prepared(fn: str, w: CSR | BSR) -> _Prepared:
    p = getattr(w, "_cpu_prepared", None)
    if p is None or not p.fresh(w):
        p = _Prepared(fn, w)
        w._cpu_prepared = p
    return p


def prepare_weight(w: CSR | BSR) -> CSR | BSR:
    """Prepare `w` for the C++ kernels once (cached on it; later calls reuse it). The first
    kernel call does this lazily; SparseLinear calls it at construction to keep that cost out of
    the first inference. Extra memory: 2 bytes per stored value for CSR (uint16 indices)."""
    _prepared("prepare_weight", w)
    return w


def _io(x: torch.Tensor, bias: torch.Tensor | None, o: int):
    if x.dtype is not torch.float32 or not x.is_contiguous():
        x = x.to(torch.float32).contiguous()
    if bias is not None and (bias.dtype is not torch.float32 or not bias.is_contiguous()):
        bias = bias.to(torch.float32).contiguous()
    return x, bias, torch.empty((x.shape[0], o), dtype=torch.float32)


def csr_linear_cpu(x: torch.Tensor, w: CSR, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """x (N, I) -> act(x · Wᵀ + b) (N, O), in x's dtype."""
    p = _prepared("csr_linear_cpu", w)
    out_dtype = x.dtype
    x, b, y = _io(x, bias, w.shape[0])
    _C.csr_linear(y.data_ptr(), x.data_ptr(), x.shape[0], w.shape[1], w.shape[0], p.crow, p.col,
                  p.val, p.wdtype, 0 if b is None else b.data_ptr(), _ACT[activation],
                  torch.get_num_threads(), p.col16)
    return y if out_dtype is torch.float32 else y.to(out_dtype)


def bsr_linear_cpu(x: torch.Tensor, w: BSR, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """x (N, I) -> act(x · Wᵀ + b) (N, O), in x's dtype, for W in R×C blocks."""
    p = _prepared("bsr_linear_cpu", w)
    out_dtype = x.dtype
    x, b, y = _io(x, bias, w.shape[0])
    r, c = w.values.shape[1], w.values.shape[2]
    _C.bsr_linear(y.data_ptr(), x.data_ptr(), x.shape[0], w.shape[1], w.shape[0], r, c, p.crow,
                  p.col, p.val, p.wdtype, 0 if b is None else b.data_ptr(), _ACT[activation],
                  torch.get_num_threads())
    return y if out_dtype is torch.float32 else y.to(out_dtype)
