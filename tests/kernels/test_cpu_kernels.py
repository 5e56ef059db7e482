"""C++ CPU kernels (engine._C via engine.cpu) against the plain-torch references.

Every case runs on each instruction-set path this CPU has (AVX-512 micro-kernels, AVX2+FMA, and
the portable C++ fallback). The oracle
is the reference evaluated in float64 on the very values the kernel reads (16-bit weights upcast),
so the tolerance only has to cover fp32 accumulation; a separate test bounds the error that 16-bit
storage adds against the fp32 weight.
"""
from __future__ import annotations

import contextlib
import math
import threading

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import engine
from engine import cpu
from engine.formats import BSR, CSR
from engine.reference import bsr_linear_ref, csr_linear_ref
from tests.fixtures import amd_zen4

ACTS = ("none", "relu", "gelu", "gelu_tanh")
WDTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Batches on both sides of the SpMV/SpMM switch (N >= 4), across a 64-column register chunk.
BATCHES = (1, 3, 4, 11, 70)
BLOCKS = ((1, 1), (1, 8), (8, 1), (4, 1), (2, 4), (3, 2), (8, 8), (16, 8), (16, 16), (32, 32))

# "avx512" runs the batched CSR kernels 512 bits wide, "avx512_256" the AVX2 (256-bit) ones under the
# AVX-512 ISA, as the engine picks by default on AMD Zen 4: every AVX-512 machine tests both.
ISAS = ["avx512", "avx512_256", "avx2", "portable"]


def _supported(name):
    return {"avx512": cpu._C.cpu_has_avx512, "avx512_256": cpu._C.cpu_has_avx512,
            "avx2": cpu._C.cpu_has_avx2}.get(name, lambda: True)()


@contextlib.contextmanager
def kernels(name):
    """The kernels ISAS names, for the duration of the block (the auto width restored after)."""
    before, bits = cpu.isa(), cpu.csr_bits()
    cpu.set_isa(name.split("_")[0])
    if name.startswith("avx512"):
        cpu.set_csr_bits(256 if name == "avx512_256" else 512)
    try:
        yield
    finally:
        cpu.set_isa(before)
        cpu.set_csr_bits(bits if before == "avx512" else "auto")


def csr_family(isa):
    """The batched CSR kernels' family: the 256-bit kernels under AVX-512 behave as the AVX2 ones."""
    return "avx2" if isa == "avx512_256" else isa


@pytest.fixture(autouse=True)
def _extension_built():
    # A missing extension is a failure here, not a skip: the product's install builds it.
    assert cpu.available(), f"engine._C did not import: {cpu.import_error()}"


@pytest.fixture(params=ISAS)
def isa(request):
    if not _supported(request.param):
        pytest.skip(f"this CPU cannot run the {request.param} kernels")
    with kernels(request.param):
        assert cpu.isa() == request.param.split("_")[0]
        assert cpu.csr_bits() == (512 if request.param == "avx512" else 256)
        yield request.param


def rand_weight(o, i, sparsity, block=(1, 1)):
    r, c = block
    keep = torch.rand(o // r, i // c) >= sparsity
    keep = keep.repeat_interleave(r, 0).repeat_interleave(c, 1)
    return torch.randn(o, i) * keep, keep


def as_f64(w):
    cls = CSR if isinstance(w, CSR) else BSR
    return cls.trusted(w.crow_indices, w.col_indices, w.values.double(), w.shape)


def expected(x, w, bias, act):
    """float64 reference on the stored values, rounded to fp32 like the kernel's output."""
    ref = csr_linear_ref if isinstance(w, CSR) else bsr_linear_ref
    b = None if bias is None else bias.double()
    return ref(x.double(), as_f64(w), b, act).float()


def check(y, x, w, bias, act):
    # fp32 accumulation over I terms of size ~1: a few ulps of the running sum.
    atol = 2e-6 * math.sqrt(max(1, w.shape[1])) + 1e-6
    torch.testing.assert_close(y, expected(x, w, bias, act), rtol=2e-5, atol=atol)


def run(x, w, bias=None, act="none"):
    f = cpu.csr_linear_cpu if isinstance(w, CSR) else cpu.bsr_linear_cpu
    return f(x, w, bias, act)


# ---- CSR -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("n", BATCHES)
def test_csr_odd_shape_every_batch(isa, sparsity, n):
    w, _ = rand_weight(7, 96, sparsity)
    wc = CSR.from_dense(w)
    x = torch.randn(n, 96)
    check(run(x, wc), x, wc, None, "none")


@pytest.mark.parametrize("wdtype", WDTYPES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("n", (1, 11))
def test_csr_bias_activation_dtype(isa, wdtype, act, n):
    w, _ = rand_weight(37, 53, 0.7)
    wc = CSR.from_dense(w.to(wdtype))
    x, b = torch.randn(n, 53), torch.randn(37)
    check(run(x, wc, b, act), x, wc, b, act)


def test_csr_empty_rows_and_mask_zeros(isa):
    w, keep = rand_weight(40, 64, 0.6)
    w[::3] = 0            # every third output row has no stored entry...
    keep[::3] = False
    keep[1, :5] = True    # ...and row 1 stores explicit zeros the mask kept
    w[1, :5] = 0
    wc = CSR.from_dense(w, mask=keep)
    assert (wc.crow_indices[1:] == wc.crow_indices[:-1]).any()
    x, b = torch.randn(9, 64), torch.randn(40)
    for act in ("none", "relu"):
        y = run(x, wc, b, act)
        check(y, x, wc, b, act)
    # An empty row's output is exactly act(bias).
    torch.testing.assert_close(y[:, 0], torch.relu(b[0]).expand(9), rtol=0, atol=0)


@pytest.mark.parametrize("fill", ["dense", "empty"])
@pytest.mark.parametrize("n", (1, 8))
def test_csr_fully_dense_and_fully_empty(isa, fill, n):
    w = torch.randn(24, 40) if fill == "dense" else torch.zeros(24, 40)
    wc = CSR.from_dense(w, mask=torch.ones_like(w, dtype=torch.bool) if fill == "dense" else None)
    assert wc.nnz == (24 * 40 if fill == "dense" else 0)
    x, b = torch.randn(n, 40), torch.randn(24)
    y = run(x, wc, b, "gelu")
    check(y, x, wc, b, "gelu")


@pytest.mark.parametrize("n,o,i", [(0, 5, 8), (3, 0, 8), (3, 5, 0), (0, 0, 0), (9, 5, 0)])
def test_csr_size_zero(isa, n, o, i):
    w, _ = rand_weight(o, i, 0.5)
    wc = CSR.from_dense(w)
    x, b = torch.randn(n, i), torch.randn(o)
    y = run(x, wc, b, "relu")
    assert y.shape == (n, o)
    check(y, x, wc, b, "relu")


def test_csr_head_with_fewer_stored_values_than_inputs(isa):
    # A 10-output head over 4096 inputs at 95 %: ~2k stored values, fewer than the inputs, so a
    # batch of 64 reads X rows directly instead of packing all 64 x 4096 of them.
    w, keep = rand_weight(10, 4096, 0.95)
    wc = CSR.from_dense(w / 15, mask=keep)
    assert wc.values.numel() < 4096
    x, b = torch.randn(64, 4096), torch.randn(10)
    check(run(x, wc, b, "relu"), x, wc, b, "relu")


def test_csr_many_panels(isa):
    # Wide input: the packed-X panel holds 64 batch columns, so batch 130 takes three panels.
    w, _ = rand_weight(24, 4096, 0.9)
    wc = CSR.from_dense(w)
    x, b = torch.randn(130, 4096), torch.randn(24)
    check(run(x, wc, b, "relu"), x, wc, b, "relu")


# ---- BSR -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"{b[0]}x{b[1]}")
@pytest.mark.parametrize("n", BATCHES)
def test_bsr_every_block_size(isa, block, n):
    r, c = block
    o, i = 3 * 32, 2 * 48  # divisible by every block in BLOCKS
    w, keep = rand_weight(o, i, 0.6, block)
    wb = BSR.from_dense(w, mask=keep, blocksize=block)
    x, b = torch.randn(n, i), torch.randn(o)
    check(run(x, wb, b, "none"), x, wb, b, "none")


@pytest.mark.parametrize("block", [(16, 16), (16, 32), (16, 4), (16, 1)], ids=str)
@pytest.mark.parametrize("n", (128, 301))
@pytest.mark.parametrize("wdtype", WDTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS)
def test_bsr_16_row_blocks_at_large_batch(isa, block, n, wdtype, act):
    # From 128 rows, 16-row blocks on whole AVX-512 run batch-as-rows (no transposes; the last group
    # of 8 rows partial at 301), every activation in its epilogue. Every ISA must agree with the
    # reference, an empty block row and a NaN input included.
    w, keep = rand_weight(64, 64, 0.6, block)
    keep[16:32] = False    # an empty block row
    keep[0:16, 0:32] = True  # input 3 feeds block row 0: the NaN reaches the output
    wb = BSR.from_dense((torch.randn(64, 64) * keep).to(wdtype), mask=keep, blocksize=block)
    x, b = torch.randn(n, 64), torch.randn(64)
    x[7, 3] = float("nan")
    rows_major = cpu._blocks_t(wb, n) is not None  # the transposed copy the kernel reads
    assert rows_major == (isa.startswith("avx512") and not cpu._C.avx512_split())
    y = run(x, wb, b, act)
    ref = expected(x, wb, b, act)
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(y), nan) and nan[7].any() and not nan[8:].any()
    atol = 2e-6 * math.sqrt(64) + 1e-6
    torch.testing.assert_close(y[~nan], ref[~nan], rtol=2e-5, atol=atol)


def test_bsr_batch_as_rows_refused_where_it_cannot_run(isa):
    # The transposed copy asks for the batch-as-rows kernel; where it cannot run (8-row blocks, or
    # kernels other than AVX-512) the call fails instead of quietly taking another path.
    wb = BSR.from_dense(rand_weight(32, 32, 0.5, (8, 8))[0], blocksize=(8, 8))
    x, y = torch.randn(128, 32), torch.empty(128, 32)
    blocks_t = torch.zeros(wb.values.shape[0], 8, 16)
    with pytest.raises(ValueError, match="16-row blocks"):
        cpu._C.bsr_linear(y.data_ptr(), x.data_ptr(), 128, 32, 32, 8, 8, wb.crow_indices.data_ptr(),
                          wb.col_indices.data_ptr(), wb.values.data_ptr(), 0, 0, 0, 1, blocks_t.data_ptr())


@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.9, 0.99])
@pytest.mark.parametrize("block", [(1, 8), (8, 8), (16, 16)], ids=lambda b: f"{b[0]}x{b[1]}")
def test_bsr_sparsity_range(isa, sparsity, block):
    w, keep = rand_weight(64, 128, sparsity, block)
    wb = BSR.from_dense(w, mask=keep, blocksize=block)
    for n in (1, 11):
        x = torch.randn(n, 128)
        check(run(x, wb), x, wb, None, "none")


@pytest.mark.parametrize("wdtype", WDTYPES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("block", [(1, 8), (8, 1), (8, 8), (3, 2)], ids=lambda b: f"{b[0]}x{b[1]}")
def test_bsr_bias_activation_dtype(isa, wdtype, act, block):
    w, keep = rand_weight(48, 64, 0.5, block)
    wb = BSR.from_dense(w.to(wdtype), mask=keep, blocksize=block)
    for n in (2, 13):
        x, b = torch.randn(n, 64), torch.randn(48)
        check(run(x, wb, b, act), x, wb, b, act)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("layout", ["csr", (1, 8), (4, 4), (16, 16)])
@pytest.mark.parametrize("n", BATCHES)
def test_nan_input_stays_nan_through_every_epilogue(isa, act, layout, n):
    # A NaN in X must reach exactly the outputs whose stored weights read it, through bias and
    # every activation (a max(v, 0) ReLU turned NaN into 0: a wrong, finite answer).
    block = (1, 1) if layout == "csr" else layout
    w, keep = rand_weight(48, 64, 0.5, block)
    wt = CSR.from_dense(w, mask=keep) if layout == "csr" else BSR.from_dense(w, mask=keep, blocksize=block)
    x, b = torch.randn(n, 64), torch.randn(48)
    x[0, 3] = x[-1, 40] = float("nan")
    y = run(x, wt, b, act)
    want = expected(x, wt, b, act)
    assert want.isnan().any() and not want.isnan().all()
    assert torch.equal(y.isnan(), want.isnan())
    torch.testing.assert_close(y, want, rtol=2e-5, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("fill", ["dense", "empty", "empty-block-rows"])
@pytest.mark.parametrize("n", (1, 9))
def test_bsr_fully_dense_empty_and_empty_block_rows(isa, fill, n):
    w = torch.randn(32, 48)
    keep = torch.ones_like(w, dtype=torch.bool)
    if fill == "empty":
        keep[:] = False
    elif fill == "empty-block-rows":
        keep[8:16] = False
        keep[24:] = False
    wb = BSR.from_dense(w * keep, mask=keep, blocksize=(8, 8))
    x, b = torch.randn(n, 48), torch.randn(32)
    y = run(x, wb, b, "gelu_tanh")
    check(y, x, wb, b, "gelu_tanh")


@pytest.mark.parametrize("n,o,i", [(0, 16, 16), (4, 0, 16), (4, 16, 0), (1, 16, 0)])
def test_bsr_size_zero(isa, n, o, i):
    w = torch.randn(o, i)
    wb = BSR.from_dense(w, blocksize=(8, 8))
    x, b = torch.randn(n, i), torch.randn(o)
    y = run(x, wb, b, "none")
    assert y.shape == (n, o)
    check(y, x, wb, b, "none")


def test_bsr_many_panels(isa):
    w, keep = rand_weight(32, 4096, 0.9, (8, 8))
    wb = BSR.from_dense(w, mask=keep, blocksize=(8, 8))
    x, b = torch.randn(150, 4096), torch.randn(32)
    check(run(x, wb, b, "relu"), x, wb, b, "relu")


# ---- 16-bit storage error, bounded by the weights' own rounding ------------------------------------

@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fmt", ["csr", "bsr"])
def test_16bit_error_within_weight_rounding(isa, wdtype, fmt):
    w, keep = rand_weight(64, 256, 0.8, (1, 1) if fmt == "csr" else (8, 8))
    x = torch.randn(17, 256)
    make = (lambda t: CSR.from_dense(t, mask=keep)) if fmt == "csr" else (
        lambda t: BSR.from_dense(t, mask=keep, blocksize=(8, 8)))
    y16 = run(x, make(w.to(wdtype)))
    y32 = (x.double() @ w.double().T)
    # |Σ (w16 - w) x| <= u · Σ |w| |x|, u = unit roundoff of the storage type.
    u = 2.0 ** -8 if wdtype == torch.bfloat16 else 2.0 ** -11
    bound = u * (x.double().abs() @ w.double().abs().T) + 1e-4
    assert ((y16.double() - y32).abs() <= bound).all()
    # ...and it really is the 16-bit weights at work, not an fp32 copy.
    assert not torch.allclose(y16.double(), y32, rtol=0, atol=1e-7)


# ---- through engine.sparse_linear -------------------------------------------------------------------

def test_sparse_linear_leading_dims_and_call_counter(isa):
    w, keep = rand_weight(24, 32, 0.7, (8, 8))
    wc, wb = CSR.from_dense(w), BSR.from_dense(w, mask=keep, blocksize=(8, 8))
    x, b = torch.randn(2, 3, 5, 32), torch.randn(24)
    for weight, key in ((wc, ("cpu", "csr")), (wb, ("cpu", "bsr"))):
        before = engine.ops.calls[key]
        y = engine.sparse_linear(x, weight, b, activation="relu", backend="cpu")
        assert engine.ops.calls[key] == before + 1, "the C++ path did not run"
        assert y.shape == (2, 3, 5, 24)
        check(y.reshape(-1, 24), x.reshape(-1, 32), weight, b, "relu")


def test_sparse_linear_keeps_input_dtype(isa):
    w, _ = rand_weight(16, 24, 0.5)
    wc = CSR.from_dense(w)
    x = torch.randn(5, 24, dtype=torch.float64)
    y = engine.sparse_linear(x, wc, backend="cpu")
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, expected(x, wc, None, "none").double(), rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("n", (1, 3, 40))
def test_threads_follow_torch_and_agree(isa, n):
    # Large enough (~100k stored values) that every path splits its rows across the threads.
    w, keep = rand_weight(512, 384, 0.5, (8, 8))
    wc, wb = CSR.from_dense(w), BSR.from_dense(w, mask=keep, blocksize=(8, 8))
    x = torch.randn(n, 384)
    old = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append((run(x, wc), run(x, wb)))
    finally:
        torch.set_num_threads(old)
    for yc, yb in outs:
        check(yc, x, wc, None, "none")
        check(yb, x, wb, None, "none")


def test_concurrent_python_threads_match_serial(isa):
    cases = []
    for k in range(6):
        w, keep = rand_weight(96, 80, 0.75, (8, 8))
        weight = CSR.from_dense(w) if k % 2 else BSR.from_dense(w, mask=keep, blocksize=(8, 8))
        cases.append((torch.randn((1, 5, 33)[k % 3], 80), weight, torch.randn(96)))
    serial = [run(x, w, b, "gelu") for x, w, b in cases]
    results, errors = {}, []

    def worker(tid):
        try:
            for rep in range(20):
                k = (tid + rep) % len(cases)
                x, w, b = cases[k]
                results.setdefault(k, []).append(run(x, w, b, "gelu"))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sum(len(v) for v in results.values()) == 120
    for k, ys in results.items():
        for y in ys:
            torch.testing.assert_close(y, serial[k], rtol=0, atol=0)


# ---- hypothesis: shapes no test hard-codes ---------------------------------------------------------

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(0, 80), o_blocks=st.integers(0, 12), i_blocks=st.integers(0, 12),
       r=st.sampled_from([1, 2, 3, 4, 8, 16]), c=st.sampled_from([1, 2, 5, 8, 16]),
       sparsity=st.floats(0.0, 1.0), fmt=st.sampled_from(["csr", "bsr"]),
       wdtype=st.sampled_from(WDTYPES), act=st.sampled_from(ACTS), with_bias=st.booleans(),
       isa=st.sampled_from(ISAS), seed=st.integers(0, 2**31 - 1))
def test_fuzz_against_reference(n, o_blocks, i_blocks, r, c, sparsity, fmt, wdtype, act, with_bias,
                                isa, seed):
    if not _supported(isa):
        isa = "portable"
    g = torch.Generator().manual_seed(seed)
    o, i = o_blocks * r, i_blocks * c
    block = (r, c) if fmt == "bsr" else (1, 1)
    keep = (torch.rand(o // block[0], i // block[1], generator=g) >= sparsity)
    keep = keep.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    w = (torch.randn(o, i, generator=g) * keep).to(wdtype)
    weight = CSR.from_dense(w, mask=keep) if fmt == "csr" else BSR.from_dense(w, mask=keep, blocksize=block)
    x = torch.randn(n, i, generator=g)
    b = torch.randn(o, generator=g) if with_bias else None
    with kernels(isa):
        y = run(x, weight, b, act)
    check(y, x, weight, b, act)


# ---- prepared weights: uint16 indices, int32 beyond 65536 inputs, cache follows the buffers ---------

@pytest.mark.parametrize("n", (1, 9))
def test_csr_wide_input_uses_int32_indices(isa, n):
    # I > 65536: uint16 indices cannot address it, so the kernels read the int32 ones.
    w, _ = rand_weight(5, 70_001, 0.999)
    w[2, 70_000] = 1.5  # an index that uint16 would wrap
    wc = CSR.from_dense(w)
    x, b = torch.randn(n, 70_001), torch.randn(5)
    y = run(x, wc, b, "none")
    assert cpu._col16(wc) is None
    check(y, x, wc, b, "none")


def test_prepare_weight_cache_follows_buffers(isa):
    w1, _ = rand_weight(16, 32, 0.5)
    wc = cpu.prepare_weight(CSR.from_dense(w1))
    c16 = cpu._col16(wc)
    assert c16 is not None and torch.equal(c16.long(), wc.col_indices.long())
    # A fresh view over the same buffers (what SparseLinear builds per call) reuses the copy.
    assert cpu._col16(CSR.trusted(wc.crow_indices, wc.col_indices, wc.values, wc.shape)) is c16
    x = torch.randn(6, 32)
    check(run(x, wc), x, wc, None, "none")
    # In-place update of the buffers (load_state_dict) must not leave a stale copy behind.
    w2, _ = rand_weight(16, 32, 0.0)
    full = CSR.from_dense(w2, mask=torch.ones(16, 32, dtype=torch.bool))
    w1_full = CSR.from_dense(w1, mask=torch.ones(16, 32, dtype=torch.bool))
    cpu.prepare_weight(w1_full)
    for mine, new in ((w1_full.crow_indices, full.crow_indices), (w1_full.col_indices, full.col_indices),
                      (w1_full.values, full.values)):
        mine.copy_(new)
    w1_full.col_indices[:16].copy_(torch.arange(16, 32, dtype=torch.int32))  # row 0 now reads cols 16..31
    w1_full.col_indices[16:32].copy_(torch.arange(0, 16, dtype=torch.int32))
    w1_full.values[:32] = torch.randn(32)
    check(run(x, w1_full), x, w1_full, None, "none")


@pytest.mark.parametrize("n,sparsity,o,avx512,avx2", [
    (48, 0.5, 40, "groups", "panels"),
    (48, 0.88, 40, "groups", "panels"),
    (64, 0.88, 130, "groups", "panels"),
    (144, 0.95, 130, "groups", "panels"),  # ~6 entries per row-panel: enough for 4 vectors a chunk...
    (48, 0.95, 130, "rows", "panels"),     # ...not for 3
    (16, 0.5, 40, "rows", "panels"),      # one 16-column vector per chunk: never grouped
    (33, 0.5, 40, "rows", "panels"),      # 40 columns padded: not whole 16-column vectors
    (130, 0.88, 130, "rows", "panels"),   # 136 columns padded: neither
    (144, 0.99, 40, "rows", "rows")])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_csr_panelled_and_grouped_batched_paths(isa, n, sparsity, o, avx512, avx2, wdtype):
    # Dense enough and wide enough for the panel-major (AVX-512, AVX2) / grouped (AVX-512) copies;
    # I = 600 leaves a partial last panel, O = 130 a partial 64-row window, and some rows are empty.
    w, keep = rand_weight(o, 600, sparsity)
    keep[5:9] = False
    w = (w * keep).to(wdtype)
    wc = CSR.from_dense(w, mask=keep)
    chosen = cpu._batched_layout(wc, n)
    assert chosen == {"avx512": avx512, "avx2": avx2}.get(csr_family(isa), "rows")
    x, b = torch.randn(n, 600), torch.randn(o)
    # The 512-bit kernels also run the panel-major copy they no longer choose (bench/csr_layouts.py
    # measures it against the grouped one).
    for layout in [chosen] + (["panels"] if isa == "avx512" and chosen != "rows" else []):
        with forced_layout(layout):
            check(run(x, wc, b, "gelu"), x, wc, b, "gelu")
    # The copy follows in-place updates of the values.
    with torch.no_grad():
        wc.values.mul_(-0.5)
    check(run(x, wc, b, "relu"), x, wc, b, "relu")


def test_grouped_layout_needs_the_512_bit_kernels(isa):
    if csr_family(isa) != "avx2":
        pytest.skip("the 256-bit kernels refuse the grouped copy")
    w, keep = rand_weight(40, 600, 0.5)
    wc = CSR.from_dense(w, mask=keep)
    with forced_layout("groups"), pytest.raises(ValueError, match="512-bit"):
        run(torch.randn(32, 600), wc)


@contextlib.contextmanager
def forced_layout(*layouts):
    """cpu._batched_layout returns `layouts` in turn (the last one from then on) inside the block."""
    real, calls = cpu._batched_layout, []

    def pick(w, batch):
        calls.append(w)
        return layouts[min(len(calls), len(layouts)) - 1] if real(w, batch) != "rows" else "rows"
    cpu._batched_layout = pick
    try:
        yield
    finally:
        cpu._batched_layout = real


# ---- two CSR layers in one call (cpu.csr_pair_cpu): the hidden activations stay packed --------------

def check_pair(y, x, w1, b1, act1, w2, b2, act2):
    """The pair against its second layer in float64 on the first layer's one-layer kernel output
    (itself checked against float64 above), within check()'s fp32 tolerance: the weights are
    scaled so the hidden units are of order 1, as check() assumes of its inputs."""
    check(y, run(x, w1, b1, act1), w2, b2, act2)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", (16, 33, 48, 130))
def test_csr_pair_equals_the_two_layers(isa, act, wdtype, n):
    # I = 600 and F = 520 leave partial last input panels, O = 130 a partial row tile; rows 5-8 of
    # W1 are empty (their hidden units are act(b1) alone) and rows 3-4 of W2 too.
    w1, keep1 = rand_weight(520, 600, 0.6)
    w2, keep2 = rand_weight(130, 520, 0.7)
    w1, w2 = w1 / 15, w2 / 12  # ~1 / sqrt(stored entries per row)
    keep1[5:9], keep2[3:5] = False, False
    c1 = CSR.from_dense((w1 * keep1).to(wdtype), mask=keep1)
    c2 = CSR.from_dense((w2 * keep2).to(wdtype), mask=keep2)
    b1, b2, x = torch.randn(520), torch.randn(130), torch.randn(n, 600)
    fits = cpu.pair_fits(x, c1, c2)
    # 512-bit: grouped layers only, at 48 rows (16: one vector a chunk; 33 and 130: not whole vectors)
    assert fits == (csr_family(isa) == "avx2" or (isa == "avx512" and n == 48))
    # At 16 rows the 512-bit rule prefers the row loop, but the kernel runs the pair panel-major.
    if not fits and not (isa == "avx512" and n == 16):
        with pytest.raises(RuntimeError if isa == "portable" else ValueError):
            cpu.csr_pair_cpu(x, c1, b1, act, c2, b2)  # the kernel refuses what pair_fits rules out
        return
    check_pair(cpu.csr_pair_cpu(x, c1, b1, act, c2, b2, "relu"), x, c1, b1, act, c2, b2, "relu")


def test_csr_pair_many_panels_and_what_does_not_fit(isa):
    if isa == "portable":
        pytest.skip("no panel-major layout on the portable kernels")
    # batch 1040 takes several packed-X panels (4096 inputs x 64 columns each); at 80 % W1 is
    # panel-major for the 256-bit kernels and grouped for the 512-bit ones
    w1, _ = rand_weight(264, 4096, 0.8)
    w2, _ = rand_weight(300, 264, 0.5)
    c1, c2 = CSR.from_dense(w1 / 20), CSR.from_dense(w2 / 11)
    b1, b2 = torch.randn(264), torch.randn(300)
    x = torch.randn(1040, 4096)
    assert cpu.pair_fits(x, c1, c2)
    check_pair(cpu.csr_pair_cpu(x, c1, b1, "gelu", c2, b2), x, c1, b1, "gelu", c2, b2, "none")
    assert not cpu.pair_fits(x[:8], c1, c2)                              # below the batched layout
    assert not cpu.pair_fits(x.bfloat16(), c1, c2)                       # bf16 x: the bf16 kernels
    assert not cpu.pair_fits(x, c1, CSR.from_dense(w2.bfloat16()))      # two weight dtypes
    assert not cpu.pair_fits(x, c1, CSR.from_dense(rand_weight(300, 264, 0.99)[0]))  # too sparse: rows


def test_csr_grouped_at_95_percent_from_64_rows(isa):
    if isa != "avx512":
        pytest.skip("the grouped layout is the 512-bit kernels'")
    # 95 %: 6.4 entries per row per 128-input panel, the row loop at 48 rows, grouped from 64 alone
    # and in the pair; O = 200 and F = 330 leave partial 64-row windows, I = 700 a partial panel.
    w1, _ = rand_weight(330, 700, 0.95)
    w2, _ = rand_weight(200, 330, 0.95)
    c1, c2 = CSR.from_dense(w1 / 6), CSR.from_dense(w2 / 5)
    b1, b2, x = torch.randn(330), torch.randn(200), torch.randn(144, 700)
    assert cpu._batched_layout(c1, 48) == "rows" and cpu._batched_layout(c1, 64) == "groups"
    assert not cpu.pair_fits(x[:48], c1, c2) and cpu.pair_fits(x, c1, c2)
    check(run(x, c1, b1, "gelu"), x, c1, b1, "gelu")
    check_pair(cpu.csr_pair_cpu(x, c1, b1, "gelu", c2, b2), x, c1, b1, "gelu", c2, b2, "none")


@pytest.mark.parametrize("first,second", [("groups", "panels"), ("panels", "groups"), ("panels", "panels")])
def test_csr_pair_mixed_layouts(isa, first, second):
    if isa != "avx512":
        pytest.skip("the 512-bit kernels read either copy")
    w1, keep1 = rand_weight(330, 700, 0.85)
    w2, keep2 = rand_weight(200, 330, 0.8)
    keep1[7:12], keep2[:3] = False, False
    c1 = CSR.from_dense(w1 * keep1 / 10, mask=keep1)
    c2 = CSR.from_dense(w2 * keep2 / 8, mask=keep2)
    b1, b2, x = torch.randn(330), torch.randn(200), torch.randn(80, 700)
    with forced_layout(first, second):
        y = cpu.csr_pair_cpu(x, c1, b1, "relu", c2, b2, "gelu")
    check_pair(y, x, c1, b1, "relu", c2, b2, "gelu")


# ---- attention straight from the QKV projection's output (cpu.attention_cpu) -------------------------

@pytest.mark.parametrize("b,s,heads,hs", [(1, 128, 12, 32), (2, 33, 3, 64), (3, 7, 5, 8), (1, 1, 2, 24),
                                          (2, 17, 1, 16), (0, 5, 2, 8)])
def test_attention_matches_sdpa(isa, b, s, heads, hs):
    h = heads * hs
    qkv = torch.randn(b * s, 3 * h) * 2
    fits = cpu.attention_fits(qkv, heads)
    assert fits == (isa != "portable")
    if not fits:
        with pytest.raises(RuntimeError, match="AVX2"):
            cpu.attention_cpu(qkv, b, s, heads)
        return
    y = cpu.attention_cpu(qkv, b, s, heads)
    q, k, v = qkv.view(b, s, 3, heads, hs).permute(2, 0, 3, 1, 4).unbind(0)
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double())
    # torch's own fp32 SDPA is within 1.5e-5 of float64 on these inputs
    torch.testing.assert_close(y, ref.transpose(1, 2).reshape(b * s, h).float(), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("s", (20, 5))
def test_attention_propagates_nan_as_the_math_does(isa, s):
    # softmax(q·kᵀ/√d)·v written out: a NaN in a query makes its output row NaN; a NaN in a key, every
    # query row of its sequence and head (never silently dropped as a zero weight). 20 keys: the
    # 8-lane row max and a scalar tail; 5: the scalar tail alone.
    if isa == "portable":
        pytest.skip("attention runs on the AVX2 / AVX-512 kernels only")
    qkv = torch.randn(2 * s, 3 * 16)
    qkv[3, 3] = float("nan")               # a query of sequence 0, head 0
    qkv[s + 1, 16 + 8 + 2] = float("nan")  # a key of sequence 1, head 1
    y = cpu.attention_cpu(qkv, 2, s, 2)
    q, k, v = qkv.double().view(2, s, 3, 2, 8).permute(2, 0, 3, 1, 4).unbind(0)
    ref = (torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, -1) @ v).transpose(1, 2).reshape(2 * s, 16)
    nan = torch.isnan(ref)
    assert nan[3, :8].all() and nan[s:, 8:].all() and nan.sum() == 8 + 8 * s  # what the math gives
    assert torch.equal(torch.isnan(y), nan)
    torch.testing.assert_close(y[~nan].double(), ref[~nan], atol=1e-5, rtol=1e-5)


def test_attention_fits_only_what_it_runs():
    qkv = torch.randn(10, 3 * 40)
    assert cpu.attention_fits(qkv, 5) == (cpu.isa() != "portable")  # head size 8
    assert not cpu.attention_fits(qkv, 4)                             # head size 10
    assert not cpu.attention_fits(qkv, 7)                             # 120 columns are not 3 x 7 heads
    assert not cpu.attention_fits(qkv.double(), 5)
    assert not cpu.attention_fits(qkv.view(2, 5, 120), 5)


# ---- residual add + LayerNorm in one pass (cpu.add_layer_norm_) --------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n,h,affine", [(7, 40, True), (3, 13, True), (5, 8, False), (300, 384, True), (1, 1, True)])
def test_add_layer_norm_matches_float64(isa, dtype, n, h, affine):
    # LayerNorm(h + r) of the very values stored, in float64; ours sums h + r in fp32 unrounded and
    # rounds the output once (fp32: within 4e-6 of float64; bf16: one rounding, 2^-8 relative).
    x, r = (torch.randn(n, h) * 3 + 1).to(dtype), torch.randn(n, h).to(dtype)
    w, b = (torch.randn(h).to(dtype), torch.randn(h).to(dtype)) if affine else (None, None)
    fits = cpu.add_norm_fits(x, r, w, b)
    assert fits == (isa != "portable")
    if not fits:
        return
    ref = torch.nn.functional.layer_norm(x.double() + r.double(), (h,), None if w is None else w.double(),
                                         None if b is None else b.double(), 1e-5)
    y = x.clone()
    out = cpu.add_layer_norm_(y, r, w, b, 1e-5)
    assert out is y and y.dtype is dtype  # in place
    if dtype is torch.float32:
        torch.testing.assert_close(y.double(), ref, atol=4e-6, rtol=4e-6)
    else:
        assert ((y.double() - ref).abs() <= 2.0 ** -8 * ref.abs() + 1e-6).all()


def test_add_layer_norm_nan_and_constant_rows(isa):
    if isa == "portable":
        pytest.skip("add_layer_norm runs on the AVX2 / AVX-512 kernels only")
    x, r = torch.randn(4, 20), torch.zeros(4, 20)
    x[1, 7] = float("nan")   # its row: all NaN, as torch
    x[2] = 5.0               # zero variance: (v - mean) · rsqrt(eps) = 0, then + beta
    w, b = torch.randn(20), torch.randn(20)
    ref = torch.nn.functional.layer_norm(x + r, (20,), w, b, 1e-5)
    y = cpu.add_layer_norm_(x.clone(), r, w, b, 1e-5)
    assert torch.isnan(y[1]).all() and not torch.isnan(y[[0, 2, 3]]).any()
    torch.testing.assert_close(y[[0, 2, 3]], ref[[0, 2, 3]], atol=4e-6, rtol=4e-6)


def test_add_norm_fits_only_what_it_runs():
    x = torch.randn(6, 16)
    ok = cpu.isa() != "portable"
    assert cpu.add_norm_fits(x, x.clone(), torch.ones(16), None) == ok
    assert not cpu.add_norm_fits(x, x.bfloat16(), None, None)           # two dtypes
    assert not cpu.add_norm_fits(x.double(), x.double(), None, None)    # float64
    assert not cpu.add_norm_fits(x.t(), x.t().clone(), None, None)      # not contiguous
    assert not cpu.add_norm_fits(x, x[:5], None, None)                  # two shapes
    assert not cpu.add_norm_fits(x, x.clone(), torch.ones(15), None)    # a weight of another width
    assert not cpu.add_norm_fits(x.view(2, 3, 16), x.view(2, 3, 16), None, None)


# ---- the `sparse-engine bench` verb runs end to end (tiny grid; timings are not asserted) -----------

def test_bench_verb_prints_the_comparison_table(capsys):
    import argparse

    from engine import bench
    parser = argparse.ArgumentParser()
    bench.configure(parser)
    args = parser.parse_args(["--shapes", "64x96", "--batch", "1,9", "--sparsity", "0.9",
                              "--blocks", "8x8,1x8", "--threads", "1", "--min-time", "0.01", "--no-onnx"])
    threads = torch.get_num_threads()
    try:
        assert bench.main(args) == 0
    finally:
        torch.set_num_threads(threads)  # main() sets the benchmark's thread count process-wide
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| 64x96 |")]
    assert len(rows) == 2
    header = next(line for line in out.splitlines() if line.startswith("| shape"))
    for name in ("torch.sparse csr", "engine csr", "engine bsr 8x8", "engine bsr 1x8", "torch.sparse bsr 8x8"):
        assert name in header


# ---- the vectorised erf-GELU epilogue (batched paths) against torch's exact GELU ------------------

@pytest.mark.parametrize("fmt,n", [("csr", 1), ("csr", 16), ("csr", 37), ("bsr", 1), ("bsr", 16), ("bsr", 37),
                                   ("bsr16", 128)])
def test_gelu_epilogue_matches_exact_gelu_over_its_range(isa, fmt, n):
    """Identity weights, so y = gelu(x) alone: within 3e-7 · max(1, |x|) of the float64 reference
    from -12 to 12 and at ±1e30 / ±3e38 (the batched epilogues use an erf approximation — ymm, and
    zmm in the 16-row BSR kernel at 128 rows —, the SpMV path std::erf), and (CSR) nan / ±inf / -0 as
    torch gives them."""
    eye = torch.eye(256)
    w = (CSR.from_dense(eye, mask=eye != 0) if fmt == "csr"
         else BSR.from_dense(eye, mask=eye != 0, blocksize=(16, 16) if fmt == "bsr16" else (8, 8)))
    x = torch.linspace(-12, 12, n * 256).reshape(n, 256)
    x[-1, -4:] = torch.tensor([1e30, -1e30, 3e38, -3e38])
    if fmt == "csr":  # one stored weight per output (a block's zeros would turn inf into nan: 0 · inf)
        x[0, :6] = torch.tensor([float("nan"), float("inf"), float("-inf"), -0.0, 0.0, -40.0])
    y = run(x, w, None, "gelu")
    ref = torch.nn.functional.gelu(x.double())
    finite = torch.isfinite(ref)
    assert ((y.double() - ref).abs()[finite] <= 3e-7 * x.double().abs().clamp(min=1)[finite]).all()
    torch.testing.assert_close(y[~finite], ref[~finite].float(), rtol=0, atol=0, equal_nan=True)


# ---- the batched CSR kernels' vector width -----------------------------------------------------------

def test_csr_width_is_256_bits_on_zen4_and_512_on_other_avx512_cpus():
    before = cpu.isa()
    try:
        cpu.set_csr_bits("auto")
        if not cpu._C.cpu_has_avx512():
            assert cpu.csr_bits() == 256
            with pytest.raises(RuntimeError, match="AVX-512"):
                cpu.set_csr_bits(512)
            return
        cpu.set_isa("avx512")
        assert cpu.csr_bits() == (256 if amd_zen4() else 512)
        assert cpu.isa_label() == ("avx512 (256-bit batched CSR)" if amd_zen4() else "avx512")
        cpu.set_csr_bits(512)
        cpu.set_isa("avx2")
        assert cpu.csr_bits() == 256  # the width setting applies under the AVX-512 ISA only
        with pytest.raises(ValueError, match="256 or 512"):
            cpu.set_csr_bits(128)
    finally:
        cpu.set_isa(before)
        cpu.set_csr_bits("auto")
