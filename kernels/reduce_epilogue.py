"""Second pass of split-K (bsr_linear with SPLIT_K > 1): Y = act(sum_s P[s] + b), one kernel and
its launcher.

The fused epilogue runs here, after the reduction: bias and activation are applied once to the
complete sum (never to partial sums), then the result is cast to Y's dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .epilogue import activate


@triton.jit
def reduce_epilogue_kernel(
    # pointers
    part_ptr,       # (SPLIT_K, N, O) fp32 partial sums, contiguous
    bias_ptr,       # (O,) or a dummy when HAS_BIAS is False
    y_ptr,          # (N, O) output
    # sizes
    N, O,
    # strides (elements)
    stride_yn, stride_yo,
    # meta-parameters
    SPLIT_K: tl.constexpr,
    BLOCK: tl.constexpr,       # output elements per program
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,  # "none" | "relu" | "gelu" | "gelu_tanh"
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # flat index into (N, O)
    mask = offs < N * O
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    p = part_ptr + offs
    for _ in range(SPLIT_K):  # fixed order: the sum does not depend on which program ran first
        acc += tl.load(p, mask=mask, other=0.0)
        p += N * O
    o = offs % O
    if HAS_BIAS:
        acc += tl.load(bias_ptr + o, mask=mask, other=0.0).to(tl.float32)
    acc = activate(acc, ACTIVATION)
    tl.store(y_ptr + (offs // O) * stride_yn + o * stride_yo, acc.to(y_ptr.dtype.element_ty), mask=mask)


def reduce_epilogue(partial: torch.Tensor, bias: torch.Tensor | None, activation: str,
                    y: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """y (N, O) <- act(partial.sum(0) + bias), partial (SPLIT_K, N, O) fp32 contiguous; returns y."""
    split_k, n, o = partial.shape
    if partial.dtype != torch.float32 or not partial.is_contiguous() or y.shape != (n, o):
        raise ValueError(f"reduce_epilogue: partial must be a contiguous fp32 (S, N, O) tensor and y "
                         f"(N, O); got {partial.dtype} {tuple(partial.shape)} and {tuple(y.shape)}")
    if y.numel() == 0:
        return y
    reduce_epilogue_kernel[(triton.cdiv(n * o, block),)](
        partial, bias if bias is not None else y, y,
        n, o,
        y.stride(0), y.stride(1),
        SPLIT_K=split_k, BLOCK=block, HAS_BIAS=bias is not None, ACTIVATION=activation,
    )
    return y
