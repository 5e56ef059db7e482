"""Host-side steps every launcher shares: argument checks, the output buffer, the degenerate case,
and the stored values in a dtype the kernel can read. Plain tensors only: kernels/ is a leaf and
knows nothing of engine's formats (engine/gpu.py adapts them)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh")  # what epilogue.activate implements


def check_args(fn: str, x: torch.Tensor, shape, crow: torch.Tensor, col: torch.Tensor,
               values: torch.Tensor, value_dims: int, bias, activation: str) -> tuple[int, int]:
    """-> (O, I). Checks what a kernel would silently misread; the index contents are trusted."""
    o, i = (int(s) for s in shape)
    if x.dim() != 2:
        raise ValueError(f"{fn}: x must be 2-D (N, I), got shape {tuple(x.shape)}")
    if x.shape[1] != i:
        raise ValueError(f"{fn}: x has {x.shape[1]} features, weight shape is {(o, i)}")
    if values.dim() != value_dims:
        raise ValueError(f"{fn}: values must be {value_dims}-D, got shape {tuple(values.shape)}")
    for name, t in (("crow_indices", crow), ("col_indices", col)):
        if t.dtype not in (torch.int32, torch.int64) or t.dim() != 1:
            raise ValueError(f"{fn}: {name} must be a 1-D int32/int64 tensor, got {t.dtype} "
                             f"shape {tuple(t.shape)}")
    if col.numel() != values.shape[0]:
        raise ValueError(f"{fn}: col_indices has {col.numel()} entries, values {values.shape[0]}")
    if bias is not None and tuple(bias.shape) != (o,):
        raise ValueError(f"{fn}: bias must have shape ({o},), got {tuple(bias.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{fn}: unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    return o, i


def activate_torch(y: torch.Tensor, activation: str) -> torch.Tensor:
    """The epilogue's activations in torch, for launchers that have nothing to launch. (The same
    mapping as engine.reference.apply_activation, kept here on purpose: kernels/ is a leaf.)"""
    if activation == "relu":
        return torch.relu(y)
    if activation == "gelu":
        return F.gelu(y)
    if activation == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    return y


def prepare_output(fn: str, x: torch.Tensor, o: int, bias, activation: str, out: torch.Tensor | None,
                   stored: int) -> tuple[torch.Tensor, bool]:
    """-> (y, done). y is `out` or a new (N, O) tensor of x's dtype; done means there are no
    products to sum (empty batch, no outputs, nothing stored) and y already holds act(bias)."""
    n = x.shape[0]
    if out is not None and (out.shape != (n, o) or out.dtype != x.dtype or not out.is_contiguous()):
        raise ValueError(f"{fn}: out must be a contiguous ({n}, {o}) {x.dtype} tensor, got "
                         f"{tuple(out.shape)} {out.dtype}")
    if n == 0 or o == 0 or stored == 0:
        y = torch.zeros(n, o, dtype=x.dtype, device=x.device)
        if bias is not None:
            y += bias.to(x.dtype)
        y = activate_torch(y, activation)
        return (y if out is None else out.copy_(y)), True
    return (out if out is not None else torch.empty(n, o, dtype=x.dtype, device=x.device)), False


def values_for(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Stored values the kernel can cast to x's dtype exactly: 16-bit -> fp32 widens in registers;
    a narrowing cast (fp32 -> 16-bit, fp16 <-> bf16) is done here once, rounding to nearest even."""
    v = values
    if v.dtype != dtype and dtype != torch.float32:
        v = v.to(dtype)
    return v.contiguous()
