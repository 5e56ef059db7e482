"""Python side of the C++ CPU kernels (engine._C): checks once at the boundary, then hands raw
buffers to the extension. Kernels compute in fp32; weights may be stored as fp32, bf16 or fp16."""
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


def _prepare(fn, x, w, bias):
    if w.device.type != "cpu":
        raise ValueError(f"{fn}: weight is on {w.device}, the C++ kernels need CPU tensors")
    out_dtype = x.dtype
    x = x.to(torch.float32).contiguous()
    b = None if bias is None else bias.to(torch.float32).contiguous()
    y = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32)
    return x, b, y, out_dtype


def csr_linear_cpu(x: torch.Tensor, w: CSR, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """x (N, I) -> act(x · Wᵀ + b) (N, O)."""
    x, b, y, out_dtype = _prepare("csr_linear_cpu", x, w, bias)
    _C.csr_linear(y.data_ptr(), x.data_ptr(), x.shape[0], w.shape[1], w.shape[0],
                  w.crow_indices.data_ptr(), w.col_indices.data_ptr(), w.values.data_ptr(),
                  _WDTYPE[w.values.dtype], 0 if b is None else b.data_ptr(), _ACT[activation],
                  torch.get_num_threads())
    return y.to(out_dtype)


def bsr_linear_cpu(x: torch.Tensor, w: BSR, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """x (N, I) -> act(x · Wᵀ + b) (N, O) for W in R×C blocks."""
    x, b, y, out_dtype = _prepare("bsr_linear_cpu", x, w, bias)
    r, c = w.blocksize
    _C.bsr_linear(y.data_ptr(), x.data_ptr(), x.shape[0], w.shape[1], w.shape[0], r, c,
                  w.crow_indices.data_ptr(), w.col_indices.data_ptr(), w.values.data_ptr(),
                  _WDTYPE[w.values.dtype], 0 if b is None else b.data_ptr(), _ACT[activation],
                  torch.get_num_threads())
    return y.to(out_dtype)
