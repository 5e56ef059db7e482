"""Host-side steps every launcher shares: argument checks, the output buffer, the degenerate case,
and the stored values in a dtype the kernel can read."""
from __future__ import annotations

import torch

from engine.reference import apply_activation


def prepare_output(fn: str, x: torch.Tensor, w, bias, activation: str, out: torch.Tensor | None,
                   stored: int) -> tuple[torch.Tensor, bool]:
    """-> (y, done). y is `out` or a new (N, O) tensor of x's dtype; done means there are no
    products to sum (empty batch, no outputs, nothing stored) and y already holds act(bias)."""
    n, i = x.shape
    o = w.shape[0]
    if i != w.shape[1]:
        raise ValueError(f"{fn}: x has {i} features, weight shape is {tuple(w.shape)}")
    if out is not None and (out.shape != (n, o) or out.dtype != x.dtype or not out.is_contiguous()):
        raise ValueError(f"{fn}: out must be a contiguous ({n}, {o}) {x.dtype} tensor, got "
                         f"{tuple(out.shape)} {out.dtype}")
    if n == 0 or o == 0 or stored == 0:
        y = torch.zeros(n, o, dtype=x.dtype, device=x.device)
        if bias is not None:
            y += bias.to(x.dtype)
        y = apply_activation(y, activation)
        return (y if out is None else out.copy_(y)), True
    return (out if out is not None else torch.empty(n, o, dtype=x.dtype, device=x.device)), False


def values_for(w, dtype: torch.dtype) -> torch.Tensor:
    """Stored values the kernel can cast to x's dtype exactly: 16-bit -> fp32 widens in registers;
    a narrowing cast (fp32 -> 16-bit, fp16 <-> bf16) is done here once, rounding to nearest even."""
    v = w.values
    if v.dtype != dtype and dtype != torch.float32:
        v = v.to(dtype)
    return v.contiguous()
