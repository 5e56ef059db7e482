"""Y = act(X · Wᵀ + b) with W in CSR (unstructured): one Triton kernel and its launcher.

Program (o, j) owns Y[j*BLOCK_N : +BLOCK_N, o]: it walks output row o's stored entries BLOCK_K at a
time, gathers the matching x columns (BLOCK_N, BLOCK_K) and reduces on the FMA units (an
unstructured row has no dense tile for tensor cores). One program per output row keeps the GPU busy
at batch 1 (O programs) and reads each stored value once per x tile; x stays in L2.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tuning
from .epilogue import activate
from .launch import check_args, prepare_output, values_for


@triton.jit
def csr_linear_kernel(
    # pointers
    x_ptr,          # (N, I) activations, any float dtype
    crow_ptr,       # (O + 1,) int32 row pointers
    col_ptr,        # (nnz,) int32 input-feature index of each stored value
    w_ptr,          # (nnz,) stored values
    bias_ptr,       # (O,) or a dummy when HAS_BIAS is False
    y_ptr,          # (N, O) output, x's dtype
    # sizes
    N,
    # strides (elements)
    stride_xn, stride_xi,
    stride_yn, stride_yo,
    # meta-parameters
    BLOCK_N: tl.constexpr,     # rows of x per program
    BLOCK_K: tl.constexpr,     # stored entries per loop step
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,  # "none" | "relu" | "gelu" | "gelu_tanh"
):
    row = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                    # (BLOCK_N,)
    n_mask = offs_n < N
    x_rows = x_ptr + offs_n.to(tl.int64)[:, None] * stride_xn           # (BLOCK_N, 1)

    start = tl.load(crow_ptr + row)
    end = tl.load(crow_ptr + row + 1)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(start, end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < end
        col = tl.load(col_ptr + offs_k, mask=k_mask, other=0)
        v = tl.load(w_ptr + offs_k, mask=k_mask, other=0.0)
        xt = tl.load(x_rows + col.to(tl.int64)[None, :] * stride_xi,
                     mask=n_mask[:, None] & k_mask[None, :], other=0.0)  # (BLOCK_N, BLOCK_K)
        # Round the weight to x's dtype as the reference does, then multiply in fp32.
        acc += xt.to(tl.float32) * v.to(xt.dtype).to(tl.float32)[None, :]
    y = tl.sum(acc, axis=1)                                              # (BLOCK_N,)

    if HAS_BIAS:
        y += tl.load(bias_ptr + row).to(tl.float32)
    y = activate(y, ACTIVATION)
    tl.store(y_ptr + offs_n.to(tl.int64) * stride_yn + row * stride_yo,
             y.to(y_ptr.dtype.element_ty), mask=n_mask)


def csr_linear_configs(cls: str) -> list[dict]:
    """Candidate launch parameters for one batch bucket; `bench/gpu_check.py --tune` times them."""
    if cls in ("n1", "n16"):
        bn = 1 if cls == "n1" else 16
        return [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=w, num_stages=2)
                for bk in ((64, 256) if bn == 1 else (32, 64)) for w in (2, 4)]
    return [dict(BLOCK_N=bn, BLOCK_K=bk, num_warps=4, num_stages=2) for bn, bk in ((32, 32), (32, 64), (64, 32))]


def csr_linear_triton(x: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor,
                      values: torch.Tensor, shape: tuple[int, int], bias: torch.Tensor | None = None,
                      activation: str = "none", *, params: dict | None = None,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """act(x @ Wᵀ + bias) for x (N, I) and W (O, I) in CSR; returns (N, O) in x's dtype.

    crow_indices (O + 1,) and col_indices (nnz,) int32, values (nnz,): a valid CSR layout on x's
    device (not re-checked here).
    params: launch parameters (see kernels.tuning); default: the tuning table for this device.
    out: optional (N, O) contiguous tensor of x's dtype to write into (checks poison it first).
    """
    fn = "csr_linear_triton"
    o, _ = check_args(fn, x, shape, crow_indices, col_indices, values, 1, bias, activation)
    y, done = prepare_output(fn, x, o, bias, activation, out, values.numel())
    if done:
        return y
    n = y.shape[0]
    p = params or tuning.launch_params("csr_linear", tuning.device_name(x), tuning.shape_class(n),
                                       tuning.block_key(None), tuning.dtype_key(x.dtype))
    grid = (o, triton.cdiv(n, p["BLOCK_N"]))
    csr_linear_kernel[grid](
        x, crow_indices, col_indices, values_for(values, x.dtype), bias if bias is not None else y, y,
        n,
        x.stride(0), x.stride(1),
        y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, ACTIVATION=activation,
        **p,
    )
    return y
