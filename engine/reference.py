"""Plain-torch references for Y = act(X · Wᵀ + b): the oracle of every kernel test and the fallback
backend that always works (on any device, any dtype)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .formats import BSR, CSR, FormatError, format_of

ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh")


def check_activation(activation: str | None, fn: str = "sparse_linear") -> str:
    act = activation or "none"
    if act not in ACTIVATIONS:
        raise ValueError(f"{fn}: unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    return act


def apply_activation(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    act = activation or "none"
    if act == "relu":
        return torch.relu(y)
    if act == "gelu":
        return F.gelu(y)
    if act == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    return y


def linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               activation: str | None = None) -> torch.Tensor:
    """Dense reference, computed in x's dtype (pass float64 inputs for a high-precision oracle)."""
    y = F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    return apply_activation(y, activation)


def densified_linear(x, weight, bias=None, activation=None):
    """The torch backend of a sparse layout: densify W in x's dtype, then torch's GEMM."""
    return linear_ref(x, weight.to_dense(x.dtype), bias, activation)


def csr_linear_ref(x, weight: CSR, bias=None, activation=None):
    """Gathers each stored entry's input column and sums per output row: no dense W is formed."""
    o, _ = weight.shape
    rows = torch.repeat_interleave(torch.arange(o, device=x.device),
                                   (weight.crow_indices[1:] - weight.crow_indices[:-1]).long())
    contrib = x[..., weight.col_indices.long()] * weight.values.to(x.dtype)  # (..., nnz)
    y = torch.zeros(*x.shape[:-1], o, dtype=x.dtype, device=x.device)
    y.index_add_(-1, rows, contrib)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return apply_activation(y, activation)


def bsr_linear_ref(x, weight: BSR, bias=None, activation=None):
    """Per stored block: Y[:, rows of block] += X[:, cols of block] · blockᵀ."""
    o, i = weight.shape
    r, c = weight.blocksize
    brows = torch.repeat_interleave(torch.arange(o // r, device=x.device),
                                    (weight.crow_indices[1:] - weight.crow_indices[:-1]).long())
    lead = x.shape[:-1]
    xb = x.reshape(*lead, i // c, c)[..., weight.col_indices.long(), :]     # (..., nnzb, C)
    contrib = torch.einsum("...kc,krc->...kr", xb, weight.values.to(x.dtype))  # (..., nnzb, R)
    y = torch.zeros(*lead, o // r, r, dtype=x.dtype, device=x.device)
    y.index_add_(-2, brows, contrib)
    y = y.reshape(*lead, o)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return apply_activation(y, activation)


def sparse_linear_ref(x, weight, bias=None, activation=None):
    """The oracle of `weight`'s layout (its registered `reference`)."""
    fmt = format_of(weight)
    if fmt is None:
        raise FormatError(f"sparse_linear_ref: no registered layout for a {type(weight).__name__} weight")
    return fmt.reference_fn()(x, weight, bias, activation)
