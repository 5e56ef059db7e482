"""Y = act(X · Wᵀ + b) with W in BSR, split-K for decode (N <= 16): one kernel and its launcher.

At decode the row-split kernel (bsr_linear.py) has O/ROWS programs, each walking a whole block row
one dependent step after another. Here each block row's stored blocks are also shared among SPLIT_K
programs (program (i, j, s) sums the s-th contiguous chunk of them), so a layer with few output
rows still gets many programs in flight and each walks a chunk SPLIT_K times shorter. Every program
writes its fp32 partial sums to its own slice of a workspace (no atomics: the result does not
depend on program order); the second pass (reduce_epilogue.py) adds the SPLIT_K slices, then bias
and activation, and casts. The products run on the FMA units, as bsr_linear's BLOCK_N < 16 path.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tuning
from .launch import check_args, prepare_output, values_for
from .reduce_epilogue import reduce_epilogue


@triton.jit
def bsr_linear_splitk_kernel(
    # pointers
    x_ptr,          # (N, I) activations, any float dtype
    crow_ptr,       # (O/R + 1,) int32 block-row pointers
    col_ptr,        # (nnzb,) int32 block-column indices
    w_ptr,          # (nnzb, R, C) stored blocks, row-major, contiguous
    part_ptr,       # (SPLIT_K, N, O) fp32 partial sums, contiguous; every element written
    # sizes
    N, O,
    # strides (elements)
    stride_xn, stride_xi,
    # meta-parameters
    R: tl.constexpr, C: tl.constexpr,    # block shape
    C_T: tl.constexpr,                   # next power of two >= C: columns of one block in a tile
    BLOCK_N: tl.constexpr,               # rows of x per program
    ROWS: tl.constexpr,                  # weight-block rows per program (power of two)
    K: tl.constexpr,                     # reduction elements per step: K // C_T blocks
    SPLIT_K: tl.constexpr,               # programs sharing one block row's blocks
):
    SPLIT: tl.constexpr = (R + ROWS - 1) // ROWS
    BLOCKS_PER_STEP: tl.constexpr = K // C_T
    pid_r = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    brow = pid_r // SPLIT
    r0 = (pid_r % SPLIT) * ROWS

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                    # (BLOCK_N,)
    offs_r = r0 + tl.arange(0, ROWS)                                     # (ROWS,) within the block
    offs_k = tl.arange(0, K)                                             # (K,)
    blk_in_step = offs_k // C_T
    c = offs_k % C_T
    n_mask = offs_n < N
    r_mask = offs_r < R
    x_rows = x_ptr + offs_n.to(tl.int64)[:, None] * stride_xn           # (BLOCK_N, 1)

    # this program's chunk [lo, hi) of the block row's stored blocks
    start = tl.load(crow_ptr + brow)
    end = tl.load(crow_ptr + brow + 1)
    chunk = (end - start + SPLIT_K - 1) // SPLIT_K
    lo = start + pid_k * chunk
    hi = tl.minimum(lo + chunk, end)
    acc = tl.zeros((BLOCK_N, ROWS), dtype=tl.float32)
    for b0 in range(lo, hi, BLOCKS_PER_STEP):
        blk = b0 + blk_in_step                                           # (K,) stored block ids
        blk_ok = (blk < hi) & (c < C)
        col = tl.load(col_ptr + blk, mask=blk_ok, other=0)
        xt = tl.load(x_rows + (col.to(tl.int64) * C + c)[None, :] * stride_xi,
                     mask=n_mask[:, None] & blk_ok[None, :], other=0.0)  # (BLOCK_N, K)
        wt = tl.load(w_ptr + blk.to(tl.int64)[:, None] * (R * C) + offs_r[None, :] * C + c[:, None],
                     mask=blk_ok[:, None] & r_mask[None, :], other=0.0)  # (K, ROWS)
        # weight rounded to x's dtype as the reference does, products and sums in fp32
        acc += tl.sum(xt.to(tl.float32)[:, :, None] * wt.to(xt.dtype).to(tl.float32)[None, :, :], axis=1)

    offs_o = brow * R + offs_r                                           # (ROWS,) output features
    p_off = (pid_k * N + offs_n.to(tl.int64))[:, None] * O + offs_o[None, :]
    tl.store(part_ptr + p_off, acc, mask=n_mask[:, None] & r_mask[None, :])


def bsr_linear_splitk_configs(cls: str) -> list[dict]:
    """Candidate launch parameters for a decode batch bucket; `bench/gpu_check.py --tune` times them."""
    bn = 1 if cls == "n1" else 4
    return [dict(BLOCK_N=bn, ROWS=r, K=k, SPLIT_K=s, num_warps=4, num_stages=1)
            for r, k, s in ((8, 256, 2), (8, 256, 4), (4, 512, 4), (16, 128, 8), (8, 128, 8))]


def bsr_linear_splitk_triton(x: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor,
                             values: torch.Tensor, shape: tuple[int, int], bias: torch.Tensor | None = None,
                             activation: str = "none", *, params: dict | None = None,
                             out: torch.Tensor | None = None) -> torch.Tensor:
    """bsr_linear_triton's operation and arguments, summed split-K (meant for N <= 16).

    Extra memory: an fp32 (SPLIT_K, N, O) workspace per call.
    """
    fn = "bsr_linear_splitk_triton"
    o, _ = check_args(fn, x, shape, crow_indices, col_indices, values, 3, bias, activation)
    y, done = prepare_output(fn, x, o, bias, activation, out, values.shape[0])
    if done:
        return y
    n = y.shape[0]
    block = (int(values.shape[1]), int(values.shape[2]))
    # larger batches are not this kernel's regime; they borrow the n16 parameters
    p = params or tuning.launch_params("bsr_linear_splitk", tuning.device_name(x),
                                       tuning.shape_class(min(n, 16)), tuning.block_key(block),
                                       tuning.dtype_key(x.dtype))
    split_k = int(p["SPLIT_K"])
    if split_k < 1:
        raise ValueError(f"{fn}: SPLIT_K must be >= 1, got {split_k}")
    r, c = block
    c_t = triton.next_power_of_2(c)
    rows = min(p["ROWS"], triton.next_power_of_2(r))  # FMA tiles: no 16-wide minimum as for tl.dot
    partial = torch.empty(split_k, n, o, dtype=torch.float32, device=x.device)
    grid = (o // r * triton.cdiv(r, rows), triton.cdiv(n, p["BLOCK_N"]), split_k)
    bsr_linear_splitk_kernel[grid](
        x, crow_indices, col_indices, values_for(values, x.dtype), partial,
        n, o,
        x.stride(0), x.stride(1),
        R=r, C=c, C_T=c_t, BLOCK_N=p["BLOCK_N"], ROWS=rows, K=max(p["K"], c_t), SPLIT_K=split_k,
        num_warps=p["num_warps"], num_stages=p["num_stages"],
    )
    return reduce_epilogue(partial, bias, activation, y)
