"""Python side of the Triton kernels (kernels/): engine's CSR/BSR formats handed to launchers that
take plain tensors, as engine/cpu.py hands raw buffers to the C++ kernels. The one module of
engine that knows kernels/; kernels/ knows nothing of engine.

kernels/ is imported on first use, not at `import engine`: importing triton costs about a second.
"""
from __future__ import annotations

import torch

from .formats import BSR, CSR


def _kernels():
    # Looked up per call (a dict hit once imported): tests re-import kernels/ under the interpreter.
    import kernels
    return kernels


def available() -> bool:
    return _kernels().available()


def import_error() -> str | None:
    return _kernels().import_error()


def csr_linear_triton(x2: torch.Tensor, w: CSR, bias: torch.Tensor | None = None,
                      activation: str | None = "none", *, params: dict | None = None,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """act(x2 @ Wᵀ + bias) for x2 (N, I) and W a CSR (O, I) on x2's device; (N, O) in x2's dtype.

    params: launch parameters (kernels.tuning); default: the tuning table for this device.
    out: optional (N, O) contiguous tensor of x2's dtype to write into.
    """
    return _kernels().csr_linear_triton(x2, w.crow_indices, w.col_indices, w.values, w.shape, bias,
                                        activation or "none", params=params, out=out)


def bsr_linear_triton(x2: torch.Tensor, w: BSR, bias: torch.Tensor | None = None,
                      activation: str | None = "none", *, params: dict | None = None,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """act(x2 @ Wᵀ + bias) for x2 (N, I) and W a BSR (O, I) on x2's device; (N, O) in x2's dtype.

    params: launch parameters (kernels.tuning); default: the tuning table entry for this device,
    batch class, block size and dtype (an entry with SPLIT_K > 1 runs split-K).
    out: optional (N, O) contiguous tensor of x2's dtype to write into.
    """
    return _kernels().bsr_linear_triton(x2, w.crow_indices, w.col_indices, w.values, w.shape, bias,
                                        activation or "none", params=params, out=out)
