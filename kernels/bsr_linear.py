"""Y = act(X · Wᵀ + b) with W in BSR: one Triton kernel and its launcher.

Program (i, j) owns the output tile Y[i*BLOCK_N : +BLOCK_N, rows] where `rows` are ROWS rows of one
block row of W (a block row is split among cdiv(R, ROWS) programs, so even one input row keeps
O/ROWS programs busy and each stored block is read exactly once per x tile). Each loop step
gathers K // C stored blocks of the block row at once (a K-long slice of the reduction): the weight
tile is (K, ROWS), the matching x columns (BLOCK_N, K). BLOCK_N < 16 multiplies on the FMA units
(decode: memory-bound, tensor cores would idle on padding); BLOCK_N >= 16 uses `tl.dot` (prefill).
Weights are cast to x's dtype in registers (as the reference does) and accumulated in fp32.

Split-K (SPLIT_K > 1, meant for decode): each block row's stored blocks are also shared among
SPLIT_K programs (grid axis 2: program s sums the s-th contiguous chunk), so a block row is walked
in SPLIT_K times fewer dependent steps and SPLIT_K times more programs are in flight. Each program
writes fp32 partial sums to its own slice of a workspace (no atomics: the result does not depend on
program order); reduce_epilogue.py then adds the slices and applies bias and activation once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tuning
from .epilogue import activate
from .launch import check_args, prepare_output, values_for
from .reduce_epilogue import reduce_epilogue


@triton.jit
def bsr_linear_kernel(
    # pointers
    x_ptr,          # (N, I) activations, any float dtype
    crow_ptr,       # (O/R + 1,) int32 block-row pointers
    col_ptr,        # (nnzb,) int32 block-column indices
    w_ptr,          # (nnzb, R, C) stored blocks, row-major, contiguous
    bias_ptr,       # (O,) or a dummy when HAS_BIAS is False
    y_ptr,          # (N, O) output, x's dtype (unused when SPLIT_K > 1)
    part_ptr,       # (SPLIT_K, N, O) fp32 partial sums, contiguous, when SPLIT_K > 1; else a dummy
    # sizes
    N, O,
    # strides (elements)
    stride_xn, stride_xi,
    stride_yn, stride_yo,
    # meta-parameters
    R: tl.constexpr, C: tl.constexpr,    # block shape
    C_T: tl.constexpr,                   # next power of two >= C: columns of one block in a tile
    BLOCK_N: tl.constexpr,               # rows of x per program
    ROWS: tl.constexpr,                  # weight-block rows per program (power of two)
    K: tl.constexpr,                     # reduction elements per step: K // C_T blocks
    SPLIT_K: tl.constexpr,               # programs sharing one block row's blocks (1: no split)
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,            # "none" | "relu" | "gelu" | "gelu_tanh"
    DOT_PRECISION: tl.constexpr,         # "ieee" for fp32 x (tf32 would miss fp32 accuracy)
    DOT_FP32: tl.constexpr,              # interpreter only: its bf16 tl.dot is wrong, so dot in fp32
):
    SPLIT: tl.constexpr = (R + ROWS - 1) // ROWS
    BLOCKS_PER_STEP: tl.constexpr = K // C_T
    pid_r = tl.program_id(0)             # fastest: neighbours share the x tile in L2
    pid_n = tl.program_id(1)
    brow = pid_r // SPLIT
    r0 = (pid_r % SPLIT) * ROWS

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)                    # (BLOCK_N,)
    offs_r = r0 + tl.arange(0, ROWS)                                     # (ROWS,) within the block
    offs_k = tl.arange(0, K)                                             # (K,)
    blk_in_step = offs_k // C_T                                          # which block of the step
    c = offs_k % C_T                                                     # column within that block
    n_mask = offs_n < N
    r_mask = offs_r < R
    k_mask = c < C
    x_rows = x_ptr + offs_n.to(tl.int64)[:, None] * stride_xn           # (BLOCK_N, 1)

    start = tl.load(crow_ptr + brow)
    end = tl.load(crow_ptr + brow + 1)
    if SPLIT_K > 1:  # this program's chunk of the block row's stored blocks
        chunk = (end - start + SPLIT_K - 1) // SPLIT_K
        start = start + tl.program_id(2) * chunk
        end = tl.minimum(start + chunk, end)
    acc = tl.zeros((BLOCK_N, ROWS), dtype=tl.float32)
    for b0 in range(start, end, BLOCKS_PER_STEP):
        blk = b0 + blk_in_step                                           # (K,) stored block ids
        blk_ok = (blk < end) & k_mask
        col = tl.load(col_ptr + blk, mask=blk_ok, other=0)
        xi = col.to(tl.int64) * C + c                                    # input feature per k
        xt = tl.load(x_rows + xi[None, :] * stride_xi,
                     mask=n_mask[:, None] & blk_ok[None, :], other=0.0)  # (BLOCK_N, K)
        w_off = blk.to(tl.int64)[:, None] * (R * C) + offs_r[None, :] * C + c[:, None]
        wt = tl.load(w_ptr + w_off, mask=blk_ok[:, None] & r_mask[None, :], other=0.0)  # (K, ROWS)
        wt = wt.to(xt.dtype)
        if DOT_FP32:
            # bf16 products are exact in fp32: the same sums as the bf16 dot on a GPU.
            acc = tl.dot(xt.to(tl.float32), wt.to(tl.float32), acc, input_precision="ieee")
        elif BLOCK_N >= 16:
            acc = tl.dot(xt, wt, acc, input_precision=DOT_PRECISION)
        else:
            acc += tl.sum(xt.to(tl.float32)[:, :, None] * wt.to(tl.float32)[None, :, :], axis=1)

    offs_o = brow * R + offs_r                                           # (ROWS,) output features
    mask = n_mask[:, None] & r_mask[None, :]
    if SPLIT_K > 1:  # partial sums: bias and activation wait for the complete sum
        p_off = (tl.program_id(2) * N + offs_n.to(tl.int64))[:, None] * O + offs_o[None, :]
        tl.store(part_ptr + p_off, acc, mask=mask)
    else:
        if HAS_BIAS:
            b = tl.load(bias_ptr + offs_o, mask=r_mask, other=0.0).to(tl.float32)
            acc += b[None, :]
        acc = activate(acc, ACTIVATION)
        y_off = offs_n.to(tl.int64)[:, None] * stride_yn + offs_o[None, :] * stride_yo
        tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=mask)


def bsr_linear_configs(cls: str) -> list[dict]:
    """Candidate launch parameters for one batch bucket; `bench/gpu_check.py --tune` times them.

    Decode (n1, n16): latency-bound, so few dependent steps (large K, or split-K) and many programs
    (small ROWS). Prefill (n256, large): tl.dot tiles as wide as the block allows, software-pipelined.
    """
    if cls == "n1":
        return [dict(BLOCK_N=1, ROWS=r, K=k, SPLIT_K=s, num_warps=w, num_stages=1)
                for r, k, s, w in ((4, 512, 1, 4), (8, 512, 1, 4), (4, 1024, 1, 4), (8, 256, 1, 4), (16, 256, 1, 4),
                                   (2, 1024, 1, 2), (8, 256, 4, 4), (4, 512, 4, 4), (16, 128, 8, 4))]
    if cls == "n16":
        return [dict(BLOCK_N=bn, ROWS=r, K=k, SPLIT_K=sk, num_warps=4, num_stages=s)
                for bn, r, k, sk, s in ((16, 16, 256, 1, 3), (16, 16, 512, 1, 2), (16, 32, 256, 1, 3),
                                        (16, 16, 128, 1, 4), (16, 64, 128, 1, 3), (16, 16, 256, 4, 2),
                                        (4, 8, 256, 4, 1), (16, 16, 128, 8, 2))]
    if cls == "n64":
        return [dict(BLOCK_N=64, ROWS=r, K=k, num_warps=4, num_stages=s)
                for r, k, s in ((16, 256, 3), (16, 512, 2), (32, 256, 3), (16, 128, 4), (64, 128, 3))]
    if cls == "n256":  # few x tiles: split block rows so that the grid still fills the GPU
        return [dict(BLOCK_N=bn, ROWS=r, K=k, num_warps=4, num_stages=s)
                for bn, r, k, s in ((64, 32, 128, 3), (64, 64, 64, 4), (128, 32, 64, 4), (64, 16, 256, 3),
                                    (128, 64, 64, 3))]
    return [dict(BLOCK_N=bn, ROWS=r, K=k, num_warps=w, num_stages=s)
            for bn, r, k, w, s in ((128, 64, 64, 4, 4), (128, 64, 64, 8, 3), (256, 64, 64, 8, 3),
                                   (128, 128, 64, 8, 3), (64, 64, 128, 4, 3), (128, 64, 128, 8, 3))]


def _tile_params(blocksize: tuple[int, int], p: dict) -> dict:
    """Fit requested parameters to the block shape: powers of two, dot tiles at least 16 wide."""
    r, c = blocksize
    c_t = triton.next_power_of_2(c)
    rows = min(p["ROWS"], triton.next_power_of_2(r))
    k = max(p["K"], c_t)
    if p["BLOCK_N"] >= 16:
        rows, k = max(rows, 16), max(k, 16)
    split_k = int(p.get("SPLIT_K", 1))
    if split_k < 1:
        raise ValueError(f"bsr_linear_triton: SPLIT_K must be >= 1, got {split_k}")
    return dict(R=r, C=c, C_T=c_t, BLOCK_N=p["BLOCK_N"], ROWS=rows, K=k, SPLIT_K=split_k,
                num_warps=p["num_warps"], num_stages=p["num_stages"])


def bsr_linear_triton(x: torch.Tensor, crow_indices: torch.Tensor, col_indices: torch.Tensor,
                      values: torch.Tensor, shape: tuple[int, int], bias: torch.Tensor | None = None,
                      activation: str = "none", *, params: dict | None = None,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """act(x @ Wᵀ + bias) for x (N, I) and W (O, I) in BSR; returns (N, O) in x's dtype.

    crow_indices (O/R + 1,) and col_indices (nnzb,) int32, values (nnzb, R, C): a valid BSR layout
    on x's device (not re-checked here); the block size R×C is values' trailing shape.
    params: launch parameters (see kernels.tuning); default: the tuning table for this device.
      With SPLIT_K > 1 the sums are split-K (an fp32 (SPLIT_K, N, O) workspace, then a second pass).
    out: optional (N, O) contiguous tensor of x's dtype to write into (checks poison it first).
    """
    fn = "bsr_linear_triton"
    o, _ = check_args(fn, x, shape, crow_indices, col_indices, values, 3, bias, activation)
    y, done = prepare_output(fn, x, o, bias, activation, out, values.shape[0])
    if done:
        return y
    n = y.shape[0]
    block = (int(values.shape[1]), int(values.shape[2]))
    p = _tile_params(block, params or tuning.launch_params(
        "bsr_linear", tuning.device_name(x), tuning.shape_class(n), tuning.block_key(block),
        tuning.dtype_key(x.dtype)))
    r = p.pop("R")
    split_k = p["SPLIT_K"]
    partial = torch.empty(split_k, n, o, dtype=torch.float32, device=x.device) if split_k > 1 else y
    grid = (o // r * triton.cdiv(r, p["ROWS"]), triton.cdiv(n, p["BLOCK_N"]), split_k)
    bsr_linear_kernel[grid](
        x, crow_indices, col_indices, values_for(values, x.dtype), bias if bias is not None else y, y,
        partial,
        n, o,
        x.stride(0), x.stride(1),
        y.stride(0), y.stride(1),
        R=r, HAS_BIAS=bias is not None, ACTIVATION=activation,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        DOT_FP32=(p["BLOCK_N"] >= 16 and x.dtype == torch.bfloat16 and x.device.type == "cpu"),
        **p,
    )
    return reduce_epilogue(partial, bias, activation, y) if split_k > 1 else y
