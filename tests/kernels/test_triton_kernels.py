"""Triton kernels (kernels/) against the plain-torch references, run in Triton's interpreter on CPU.

Triton picks interpreter or compiler when a kernel is decorated, so the kernel modules are
(re)imported here with TRITON_INTERPRET=1 and the variable is then restored: other test files in
the same process see the environment they started with. Each test sets it again (engine.ops reads
it to let backend="triton" take CPU tensors).
"""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

def _import_kernels_interpreted():
    """Import triton and kernels/ under TRITON_INTERPRET=1, then restore the environment.

    Triton fixes interpreter-or-compiler when each @triton.jit function is decorated, its own library
    helpers included (at `import triton`). If another test module imported them uninterpreted first,
    their pure-Python modules are dropped and imported again (the compiled core triton._C stays).
    """
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        std = sys.modules.get("triton.language.standard")
        if std is not None and any(type(v).__name__ == "JITFunction" for v in vars(std).values()):
            for name in list(sys.modules):
                top = name.split(".")[0]
                if (top == "triton" and not name.startswith("triton._C")) or top == "kernels":
                    del sys.modules[name]
        pytest.importorskip("triton", reason="the Triton kernels need the triton package")
        import kernels as k
        return k
    finally:
        if saved is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved


kernels = _import_kernels_interpreted()
from kernels import bsr_linear as bsr_mod, csr_linear as csr_mod, tuning  # noqa: E402

import engine  # noqa: E402
import engine.ops  # noqa: E402
from engine import gpu  # noqa: E402
from engine.formats import BSR, CSR  # noqa: E402
from engine.reference import apply_activation as activate_ref, bsr_linear_ref, csr_linear_ref  # noqa: E402

from hypothesis import given, settings, strategies as st  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Output rounding dominates: fp32 accumulation vs a float64 oracle, then one rounding to x's dtype
# (the interpreter rounds bf16 toward zero: up to one bf16 ulp, 2**-7 relative).
TOL = {torch.float32: dict(rtol=1e-5, atol=2e-5),
       torch.float16: dict(rtol=1e-3, atol=1e-4),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1e-3)}


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _block_mask(o, i, r, c, density, gen, empty_rows=()):
    keep = torch.rand(o // r, i // c, generator=gen) < density
    for b in empty_rows:
        keep[b] = False
    return keep.repeat_interleave(r, 0).repeat_interleave(c, 1)


def _bsr(o, i, block, density, dtype, gen, empty_rows=()):
    w = torch.randn(o, i, generator=gen)
    return BSR.from_dense(w, _block_mask(o, i, *block, density, gen, empty_rows), block).to(dtype=dtype)


def _csr(o, i, density, dtype, gen, empty_rows=()):
    w = torch.randn(o, i, generator=gen)
    keep = torch.rand(o, i, generator=gen) < density
    keep[list(empty_rows)] = False
    return CSR.from_dense(w, keep).to(dtype=dtype)


def _oracle(ref, x, w, bias, act):
    """float64 reference on the kernel's operands: w rounded to x's dtype first, as the kernel does."""
    return ref(x.double(), w.to(dtype=x.dtype), None if bias is None else bias.double(), act)


def _check(y, expect, dtype):
    assert y.dtype == dtype
    assert torch.isfinite(y).all(), "unwritten (poisoned) or non-finite outputs"
    torch.testing.assert_close(y.double(), expect, **TOL[dtype])


def _poisoned(n, o, dtype):
    return torch.full((n, o), float("nan"), dtype=dtype)


# --- BSR ------------------------------------------------------------------------------------------

BLOCKS = [(16, 16), (32, 32), (64, 64), (128, 128), (16, 64), (64, 16), (32, 128), (24, 8)]


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_bsr_sparse_linear_dispatches_to_triton(block, dtype):
    """Every block size and dtype through engine.sparse_linear, tuned defaults, odd sizes, bias+act."""
    gen = torch.Generator().manual_seed(1000 * block[0] + block[1] + DTYPES.index(dtype))
    r, c = block
    o, i = 3 * r, 5 * c
    w = _bsr(o, i, block, 0.5, dtype, gen, empty_rows=(1,))
    bias = torch.randn(o, generator=gen).to(dtype)
    for n, act in ((1, "relu"), (7, "gelu")):
        x = torch.randn(n, i, generator=gen).to(dtype)
        before = engine.ops.calls[("triton", "bsr")]
        y = engine.sparse_linear(x, w, bias, activation=act, backend="triton")
        assert engine.ops.calls[("triton", "bsr")] == before + 1
        _check(y, _oracle(bsr_linear_ref, x, w, bias, act), dtype)


# Each launch path: FMA (BLOCK_N < 16) and tl.dot, whole and split block rows, one and many blocks per
# step, x tiles with a ragged tail.
BSR_PATHS = [
    dict(BLOCK_N=1, ROWS=16, K=32, num_warps=4, num_stages=1),
    dict(BLOCK_N=4, ROWS=8, K=128, num_warps=4, num_stages=1),
    dict(BLOCK_N=16, ROWS=16, K=64, num_warps=4, num_stages=1),
    dict(BLOCK_N=32, ROWS=64, K=32, num_warps=4, num_stages=1),
]


ACTS = ("none", "relu", "gelu", "gelu_tanh")


@pytest.mark.parametrize("pi", range(len(BSR_PATHS)), ids=lambda i: "n{BLOCK_N}r{ROWS}k{K}".format(**BSR_PATHS[i]))
@pytest.mark.parametrize("di", range(3), ids=lambda i: str(DTYPES[i]))
def test_bsr_launch_paths(pi, di):
    params, dtype, act = BSR_PATHS[pi], DTYPES[di], ACTS[(pi + di) % 4]  # each dtype meets every act
    gen = torch.Generator().manual_seed(11)
    block = (32, 16)
    o, i, n = 5 * 32, 7 * 16, (3 if params["BLOCK_N"] == 1 else 37)
    w = _bsr(o, i, block, 0.6, dtype, gen, empty_rows=(0, 3))
    x = torch.randn(n, i, generator=gen).to(dtype)
    bias = None if act == "none" else torch.randn(o, generator=gen)
    y = gpu.bsr_linear_triton(x, w, bias, act, params=params, out=_poisoned(n, o, dtype))
    _check(y, _oracle(bsr_linear_ref, x, w, bias, act), dtype)


@pytest.mark.parametrize("xdt,wdt", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                     (torch.float16, torch.bfloat16), (torch.bfloat16, torch.float16)],
                         ids=str)
@pytest.mark.parametrize("bn", [1, 16])
def test_bsr_mixed_dtypes(xdt, wdt, bn):
    gen = torch.Generator().manual_seed(5)
    w = _bsr(64, 96, (32, 32), 0.7, wdt, gen)
    x = torch.randn(19, 96, generator=gen).to(xdt)
    bias = torch.randn(64, generator=gen).to(wdt)
    params = dict(BLOCK_N=bn, ROWS=16, K=64, num_warps=4, num_stages=1)
    y = gpu.bsr_linear_triton(x, w, bias, "gelu", params=params)
    _check(y, _oracle(bsr_linear_ref, x, w, bias, "gelu"), xdt)


@pytest.mark.parametrize("density", [0.0, 1.0], ids=["empty", "dense"])
def test_bsr_fully_empty_and_fully_dense(density):
    gen = torch.Generator().manual_seed(2)
    w = _bsr(48, 80, (16, 16), density, torch.float32, gen)
    assert w.nnzb == (0 if density == 0 else 15)
    bias = torch.randn(48, generator=gen)
    x = torch.randn(9, 80, generator=gen)
    y = engine.sparse_linear(x, w, bias, activation="relu", backend="triton")
    _check(y, _oracle(bsr_linear_ref, x, w, bias, "relu"), torch.float32)


@pytest.mark.parametrize("n,o,i", [(0, 32, 48), (5, 0, 48), (5, 32, 0), (0, 0, 0)])
def test_bsr_size_zero(n, o, i):
    gen = torch.Generator().manual_seed(3)
    w = _bsr(o, i, (16, 16), 0.5, torch.float16, gen)
    x = torch.randn(n, i, generator=gen).half()
    for bias in (None, torch.randn(o, generator=gen).half()):
        y = gpu.bsr_linear_triton(x, w, bias, "gelu")
        assert y.shape == (n, o)
        _check(y, _oracle(bsr_linear_ref, x, w, bias, "gelu"), torch.float16)


def test_bsr_strided_x_and_leading_dims():
    gen = torch.Generator().manual_seed(4)
    w = _bsr(64, 64, (32, 32), 0.5, torch.float32, gen)
    x = torch.randn(70, 6, generator=gen).t()[:, 3:67]  # (6, 64) with stride (1, 6)
    assert x.stride() == (1, 6)
    y = gpu.bsr_linear_triton(x, w, None, "none",
                                  params=dict(BLOCK_N=16, ROWS=32, K=64, num_warps=4, num_stages=1))
    _check(y, _oracle(bsr_linear_ref, x, w, None, "none"), torch.float32)
    x3 = torch.randn(2, 3, 64, generator=gen)
    y3 = engine.sparse_linear(x3, w, backend="triton")
    assert y3.shape == (2, 3, 64)
    _check(y3, _oracle(bsr_linear_ref, x3, w, None, "none"), torch.float32)


@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 40), rb=st.integers(1, 4), cb=st.integers(1, 4),
       block=st.sampled_from([(16, 16), (16, 32), (32, 16)]), density=st.floats(0.0, 1.0),
       dtype=st.sampled_from(DTYPES), act=st.sampled_from(["none", "relu", "gelu", "gelu_tanh"]),
       seed=st.integers(0, 2**31 - 1))
def test_bsr_fuzz(n, rb, cb, block, density, dtype, act, seed):
    _bsr_fuzz_case(n, rb, cb, block, density, dtype, act, seed, params=None)


def _bsr_fuzz_case(n, rb, cb, block, density, dtype, act, seed, params):
    os.environ["TRITON_INTERPRET"] = "1"  # hypothesis reruns outside the fixture's scope too
    gen = torch.Generator().manual_seed(seed)
    o, i = rb * block[0], cb * block[1]
    w = _bsr(o, i, block, density, dtype, gen)
    x = torch.randn(n, i, generator=gen).to(dtype)
    bias = torch.randn(o, generator=gen)
    y = gpu.bsr_linear_triton(x, w, bias, act, params=params, out=_poisoned(n, o, dtype))
    _check(y, _oracle(bsr_linear_ref, x, w, bias, act), dtype)


# --- CSR ------------------------------------------------------------------------------------------

CSR_PATHS = [dict(BLOCK_N=1, BLOCK_K=16, num_warps=4, num_stages=1),
             dict(BLOCK_N=16, BLOCK_K=32, num_warps=4, num_stages=1),
             dict(BLOCK_N=64, BLOCK_K=8, num_warps=4, num_stages=1)]


@pytest.mark.parametrize("pi", range(len(CSR_PATHS)), ids=lambda i: "n{BLOCK_N}k{BLOCK_K}".format(**CSR_PATHS[i]))
@pytest.mark.parametrize("di", range(3), ids=lambda i: str(DTYPES[i]))
@pytest.mark.parametrize("shift", [0, 3])
def test_csr_launch_paths(pi, di, shift):
    params, dtype, act = CSR_PATHS[pi], DTYPES[di], ACTS[(pi + di + shift) % 4]  # every (dtype, act)
    gen = torch.Generator().manual_seed(7)
    o, i, n = 37, 53, (3 if params["BLOCK_N"] == 1 else 19)
    w = _csr(o, i, 0.3, dtype, gen, empty_rows=(0, 5, 36))
    x = torch.randn(n, i, generator=gen).to(dtype)
    bias = None if act == "none" else torch.randn(o, generator=gen).to(dtype)
    y = gpu.csr_linear_triton(x, w, bias, act, params=params, out=_poisoned(n, o, dtype))
    _check(y, _oracle(csr_linear_ref, x, w, bias, act), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 5, 70])
def test_csr_sparse_linear_dispatches_to_triton(dtype, n):
    gen = torch.Generator().manual_seed(n)
    w = _csr(29, 41, 0.2, dtype, gen, empty_rows=(2,))
    x = torch.randn(n, 41, generator=gen).to(dtype)
    bias = torch.randn(29, generator=gen).to(dtype)
    before = engine.ops.calls[("triton", "csr")]
    y = engine.sparse_linear(x, w, bias, activation="gelu", backend="triton")
    assert engine.ops.calls[("triton", "csr")] == before + 1
    _check(y, _oracle(csr_linear_ref, x, w, bias, "gelu"), dtype)


@pytest.mark.parametrize("xdt,wdt", [(torch.float32, torch.float16), (torch.bfloat16, torch.float32)], ids=str)
def test_csr_mixed_dtypes(xdt, wdt):
    gen = torch.Generator().manual_seed(8)
    w = _csr(23, 31, 0.4, wdt, gen)
    x = torch.randn(6, 31, generator=gen).to(xdt)
    y = gpu.csr_linear_triton(x, w, None, "relu")
    _check(y, _oracle(csr_linear_ref, x, w, None, "relu"), xdt)


@pytest.mark.parametrize("n,o,i,density", [(0, 8, 9, 0.5), (4, 0, 9, 0.5), (4, 8, 0, 0.5),
                                           (4, 8, 9, 0.0), (4, 8, 9, 1.0)])
def test_csr_degenerate_empty_and_dense(n, o, i, density):
    gen = torch.Generator().manual_seed(9)
    w = _csr(o, i, density, torch.float32, gen)
    x = torch.randn(n, i, generator=gen)
    bias = torch.randn(o, generator=gen)
    y = gpu.csr_linear_triton(x, w, bias, "gelu_tanh")
    assert y.shape == (n, o)
    _check(y, _oracle(csr_linear_ref, x, w, bias, "gelu_tanh"), torch.float32)


# --- BSR split-K (decode) -------------------------------------------------------------------------

def _splitk(bn, rows, k, split_k):
    return dict(BLOCK_N=bn, ROWS=rows, K=k, SPLIT_K=split_k, num_warps=4, num_stages=1)


# Odd shapes: blocks that are not powers of two, more splits than a block row has blocks (empty
# chunks must still write their zero partials), ragged x tiles, one and several blocks per step,
# the FMA and the tl.dot inner products.
SPLITK_CASES = [((16, 16), 1, _splitk(1, 16, 32, 2)), ((16, 16), 5, _splitk(4, 8, 16, 3)),
                ((24, 8), 7, _splitk(2, 8, 32, 2)), ((8, 24), 3, _splitk(1, 8, 64, 5)),
                ((32, 16), 16, _splitk(16, 16, 32, 8)), ((16, 48), 13, _splitk(4, 16, 64, 4)),
                ((16, 16), 11, _splitk(16, 16, 64, 3))]


@pytest.mark.parametrize("ci", range(len(SPLITK_CASES)),
                         ids=lambda i: "b{0[0]}x{0[1]}_n{1}_n{2[BLOCK_N]}s{2[SPLIT_K]}".format(*SPLITK_CASES[i]))
@pytest.mark.parametrize("di", range(3), ids=lambda i: str(DTYPES[i]))
def test_bsr_splitk_odd_shapes(ci, di):
    block, n, params = SPLITK_CASES[ci]
    dtype, act = DTYPES[di], ACTS[(ci + di) % 4]
    gen = torch.Generator().manual_seed(100 * ci + di)
    o, i = 5 * block[0], 7 * block[1]
    w = _bsr(o, i, block, 0.6, dtype, gen, empty_rows=(1, 4))
    x = torch.randn(n, i, generator=gen).to(dtype)
    bias = None if act == "none" else torch.randn(o, generator=gen).to(dtype)
    y = kernels.bsr_linear_triton(x, w.crow_indices, w.col_indices, w.values, w.shape, bias, act,
                                  params=params, out=_poisoned(n, o, dtype))
    _check(y, _oracle(bsr_linear_ref, x, w, bias, act), dtype)


def test_bsr_splitk_size_zero_strided_x_and_bad_split():
    gen = torch.Generator().manual_seed(21)
    for n, o, i in ((0, 32, 48), (3, 0, 48), (3, 32, 0)):
        w = _bsr(o, i, (16, 16), 0.5, torch.float32, gen)
        x = torch.randn(n, i, generator=gen)
        bias = torch.randn(o, generator=gen)
        y = gpu.bsr_linear_triton(x, w, bias, "gelu", params=_splitk(1, 16, 32, 4))
        assert y.shape == (n, o)
        _check(y, _oracle(bsr_linear_ref, x, w, bias, "gelu"), torch.float32)
    w = _bsr(48, 64, (16, 32), 0.7, torch.bfloat16, gen)
    x = torch.randn(70, 9, generator=gen).t()[:, 2:66].to(torch.bfloat16)  # (9, 64), column-major
    y = gpu.bsr_linear_triton(x, w, params=_splitk(4, 16, 64, 3))
    _check(y, _oracle(bsr_linear_ref, x, w, None, "none"), torch.bfloat16)
    with pytest.raises(ValueError, match="bsr_linear_triton: SPLIT_K must be >= 1, got 0"):
        gpu.bsr_linear_triton(x, w, params=_splitk(4, 16, 64, 0))


@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 16), rb=st.integers(1, 4), cb=st.integers(1, 6),
       block=st.sampled_from([(16, 16), (8, 24), (24, 16)]), density=st.floats(0.0, 1.0),
       split_k=st.integers(1, 7), dtype=st.sampled_from(DTYPES),
       act=st.sampled_from(["none", "relu", "gelu", "gelu_tanh"]), seed=st.integers(0, 2**31 - 1))
def test_bsr_splitk_fuzz(n, rb, cb, block, density, split_k, dtype, act, seed):
    _bsr_fuzz_case(n, rb, cb, block, density, dtype, act, seed, params=_splitk(4, 8, 32, split_k))


@pytest.mark.parametrize("act", ACTS)
def test_reduce_epilogue_sums_in_order_then_applies_bias_and_activation(act):
    """The second pass alone: odd (S, N, O), several programs with a ragged last one, a strided y,
    NaN and ±inf among the partials; float64 torch is the oracle."""
    from kernels.reduce_epilogue import reduce_epilogue
    gen = torch.Generator().manual_seed(50)
    part = torch.randn(3, 7, 45, generator=gen)
    part[0, 1, 2], part[2, 3, 4], part[1, 5, 6] = float("nan"), float("inf"), float("-inf")
    bias = torch.randn(45, generator=gen).half()
    y = torch.full((45, 7), float("nan"), dtype=torch.bfloat16).t()  # (7, 45) with strides (1, 7)
    out = reduce_epilogue(part, bias, act, y, block=64)
    assert out is y
    expect = activate_ref(part.double().sum(0) + bias.double(), act)
    torch.testing.assert_close(y.double(), expect, equal_nan=True, **TOL[torch.bfloat16])
    assert torch.isnan(y[1, 2]) and not torch.isnan(y).all()


def test_tuned_split_k_entry_makes_sparse_linear_run_split_k(monkeypatch):
    """A table entry with SPLIT_K > 1 (what --tune writes when split-K wins) runs split-K: the
    second pass runs, once, on (SPLIT_K, N, O) partial sums; other keys keep the one-pass kernel."""
    passes = []
    real = bsr_mod.reduce_epilogue
    monkeypatch.setattr(bsr_mod, "reduce_epilogue", lambda part, *a: passes.append(part.shape) or real(part, *a))
    key = ("bsr_linear", "interpreter", "n1", "32x16", "fp32")
    monkeypatch.setitem(tuning.TUNED, key, _splitk(1, 16, 32, 3))
    gen = torch.Generator().manual_seed(22)
    w = _bsr(96, 80, (32, 16), 0.6, torch.float32, gen)
    x, bias = torch.randn(1, 80, generator=gen), torch.randn(96, generator=gen)
    y = engine.sparse_linear(x, w, bias, activation="gelu_tanh", backend="triton")
    assert passes == [(3, 1, 96)]
    _check(y, _oracle(bsr_linear_ref, x, w, bias, "gelu_tanh"), torch.float32)
    engine.sparse_linear(torch.randn(2, 80, generator=gen), w, backend="triton")  # n16: one pass
    engine.sparse_linear(x.half(), w.to(dtype=torch.float16), backend="triton")  # fp16: one pass
    assert len(passes) == 1


# --- plain tensors in, NaN and ±inf out as torch gives them --------------------------------------

def test_launchers_take_plain_tensors_from_torch_sparse_layouts():
    """torch's own CSR/BSR layouts (int64 indices), no engine format anywhere, dense fp64 oracle."""
    gen = torch.Generator().manual_seed(30)
    keep = (torch.rand(6, 5, generator=gen) < 0.5).repeat_interleave(8, 0).repeat_interleave(16, 1)
    dense = torch.randn(48, 80, generator=gen) * keep
    x = torch.randn(3, 80, generator=gen)
    bias = torch.randn(48, generator=gen)
    expect = torch.nn.functional.gelu(torch.nn.functional.linear(x.double(), dense.double(), bias.double()))
    b = dense.to_sparse_bsr((8, 16))
    y = kernels.bsr_linear_triton(x, b.crow_indices(), b.col_indices(), b.values(), tuple(b.shape), bias, "gelu")
    _check(y, expect, torch.float32)
    ys = kernels.bsr_linear_triton(x, b.crow_indices(), b.col_indices(), b.values(), tuple(b.shape),
                                   bias, "gelu", params=_splitk(2, 8, 32, 3))
    _check(ys, expect, torch.float32)
    c = dense.to_sparse_csr()
    yc = kernels.csr_linear_triton(x, c.crow_indices(), c.col_indices(), c.values(), tuple(c.shape), bias, "gelu")
    _check(yc, expect, torch.float32)
    with pytest.raises(ValueError, match="bsr_linear_triton: x has 80 features, weight shape is \\(48, 64\\)"):
        kernels.bsr_linear_triton(x, b.crow_indices(), b.col_indices(), b.values(), (48, 64))
    with pytest.raises(ValueError, match="csr_linear_triton: unknown activation 'tanh'"):
        kernels.csr_linear_triton(x, c.crow_indices(), c.col_indices(), c.values(), (48, 80), None, "tanh")
    with pytest.raises(ValueError, match="values must be 3-D"):
        kernels.bsr_linear_triton(x, c.crow_indices(), c.col_indices(), c.values(), (48, 80))


NONFINITE_PATHS = {
    "csr_n4": ("csr", dict(BLOCK_N=4, BLOCK_K=16, num_warps=4, num_stages=1)),
    "csr_n16": ("csr", dict(BLOCK_N=16, BLOCK_K=32, num_warps=4, num_stages=1)),
    "bsr_fma": ("bsr", dict(BLOCK_N=4, ROWS=8, K=64, num_warps=4, num_stages=1)),
    "bsr_dot": ("bsr", dict(BLOCK_N=16, ROWS=16, K=64, num_warps=4, num_stages=1)),
    "bsr_splitk": ("bsr", _splitk(2, 8, 32, 3)),
}


@pytest.mark.parametrize("path", NONFINITE_PATHS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("di", range(3), ids=lambda i: str(DTYPES[i]))
def test_nan_and_inf_propagate_through_every_activation(path, act, di):
    """Issue 16: a fused activation must not turn NaN into a number (max(NaN, 0) = 0 did for ReLU).
    Non-finite values enter through the bias (straight into the epilogue) and through x (through the
    sums); the float64 torch oracle decides every element, NaN and ±inf positions included."""
    fmt, params = NONFINITE_PATHS[path]
    dtype = DTYPES[di]
    gen = torch.Generator().manual_seed(40 + di)
    o, i, n = 32, 64, 6
    w = _csr(o, i, 0.4, dtype, gen) if fmt == "csr" else _bsr(o, i, (16, 16), 0.6, dtype, gen)
    x = torch.randn(n, i, generator=gen)
    x[1, 3], x[2, 17], x[3, 40], x[4, 41] = float("nan"), float("inf"), float("-inf"), float("inf")
    x[4, 42] = float("-inf")  # inf - inf in one sum: NaN
    bias = torch.randn(o, generator=gen)
    bias[0], bias[1], bias[2] = float("nan"), float("inf"), float("-inf")
    x, bias = x.to(dtype), bias.to(dtype)
    launch = gpu.csr_linear_triton if fmt == "csr" else gpu.bsr_linear_triton
    y = launch(x, w, bias, act, params=params, out=_poisoned(n, o, dtype).fill_(7.0))
    expect = _oracle(csr_linear_ref if fmt == "csr" else bsr_linear_ref, x, w, bias, act)
    assert torch.isnan(expect).any() and not torch.isnan(expect).all()
    if act in ("none", "gelu", "gelu_tanh"):
        assert torch.isposinf(expect).any()
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), expect, equal_nan=True, **TOL[dtype])


# --- dispatch, tuning table, GPU script -----------------------------------------------------------

def test_backend_triton_refuses_cpu_tensor_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    gen = torch.Generator().manual_seed(1)
    w = _bsr(32, 32, (16, 16), 0.5, torch.float32, gen)
    with pytest.raises(engine.ops.BackendUnavailable, match="TRITON_INTERPRET"):
        engine.sparse_linear(torch.randn(2, 32), w, backend="triton")
    with pytest.raises(engine.ops.BackendUnavailable, match="TRITON_INTERPRET"):
        engine.sparse_linear(torch.randn(2, 32), CSR.from_dense(torch.randn(8, 32)), backend="triton")


def test_tuning_table_defaults_warn_once_per_unknown_device():
    assert [tuning.shape_class(n) for n in (1, 2, 16, 17, 64, 256, 257, 4096)] == \
        ["n1", "n16", "n16", "n64", "n64", "n256", "large", "large"]
    assert tuning.launch_params("bsr_linear", "interpreter", "n1") == \
        tuning.TUNED[("bsr_linear", "interpreter", "n1", "*", "*")]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        p = tuning.launch_params("bsr_linear", "Imaginary GPU 9000", "n16")
        tuning.launch_params("bsr_linear", "Imaginary GPU 9000", "large")
    assert p == tuning.DEFAULTS[("bsr_linear", "n16")]
    assert len([w for w in seen if "Imaginary GPU 9000" in str(w.message)]) == 1
    # keys name op, device, batch class, block size and dtype; the most specific entry wins
    assert tuning.block_key((32, 16)) == "32x16" and tuning.block_key(None) == "1x1"
    assert tuning.dtype_key(torch.bfloat16) == "bf16"
    h200 = tuning.TUNED[("bsr_linear", "NVIDIA H200", "n16", "32x32", "bf16")]
    assert tuning.launch_params("bsr_linear", "NVIDIA H200", "n16", "32x32", "bf16") == h200
    assert tuning.launch_params("bsr_linear", "NVIDIA H200", "n16", "64x64", "bf16") != h200
    assert tuning.launch_params("bsr_linear", "NVIDIA H200", "n16", "16x16", "fp16") == \
        tuning.TUNED[("bsr_linear", "NVIDIA H200", "n16", "*", "*")]
    for op, cls in tuning.DEFAULTS:
        configs = (bsr_mod.bsr_linear_configs if op == "bsr_linear" else csr_mod.csr_linear_configs)(cls)
        assert configs and all({"BLOCK_N", "num_warps", "num_stages"} <= set(c) for c in configs)


def test_gpu_check_tiny_runs_end_to_end_in_interpreter(tmp_path):
    out = tmp_path / "table.txt"
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--tiny", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert "correctness: all" in proc.stdout and "FAIL" not in text
    assert "bsr" in text and "csr" in text and "dense" in text


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("fmt", ["csr", "bsr"])
def test_nan_input_stays_nan_through_every_epilogue(fmt, act):
    """A NaN in x reaches exactly the outputs whose stored weights read it, through bias and every
    activation. (The interpreter's NumPy maximum keeps NaN where the GPU's maxnum would not; the
    epilogue avoids tl.maximum, see kernels/epilogue.py.)"""
    gen = torch.Generator().manual_seed(ACTS.index(act))
    w = _csr(48, 64, 0.5, torch.float32, gen) if fmt == "csr" else _bsr(48, 64, (16, 16), 0.5, torch.float32, gen)
    ref = csr_linear_ref if fmt == "csr" else bsr_linear_ref
    bias = torch.randn(48, generator=gen)
    read = int(w.col_indices[0]) * (1 if fmt == "csr" else 16)  # an input column a stored weight reads
    for n in (1, 7):
        x = torch.randn(n, 64, generator=gen)
        x[0, read] = float("nan")  # row 0 only: the other rows stay finite
        y = engine.sparse_linear(x, w, bias, activation=act, backend="triton")
        expect = _oracle(ref, x, w, bias, act)
        assert expect[0].isnan().any() and not expect[1:].isnan().any()
        assert torch.equal(y.isnan(), expect.isnan())
        torch.testing.assert_close(y.double(), expect, equal_nan=True, **TOL[torch.float32])
