"""AVX512-BF16 CSR kernel (csrc/bf16.cpp csr_linear_bf16): bf16 x with an unstructured bf16 weight,
against the float64 reference on the very bf16 values the kernel reads.

Tolerance (as tests/kernels/test_bf16_kernels.py): products of two bf16 are exact in fp32; summing
K terms in fp32 errs by at most K · 2^-24 · Σ|w||x|; the bf16 output is one rounding, 2^-8 · |y|;
GELU's slope is at most 1.13. Every regime runs: N = 1 gathers x pairs, N = 2..8 gathers 64-bit
quads of batch values (one or two groups), N >= 9 transposes X (batch tails inside a 32-row chunk, more than one
128-row Xᵀ panel, odd I).
Skipped, with the reason the extension reports, where the CPU lacks AVX512-BF16.
"""
from __future__ import annotations

import pytest
import torch

import engine
from engine import cpu
from engine.formats import BSR, CSR
from engine.reference import csr_linear_ref
from tests.fixtures import amd_zen4

U_BF16 = 2.0 ** -8
U_F32 = 2.0 ** -24
GELU_SLOPE = 1.13
ACTS = ("none", "relu", "gelu", "gelu_tanh")
KERNEL = "avx512_bf16_csr"
# (O, I, density): odd sizes, not multiples of 16 / 32; a single input feature; a dense-ish row
# mix; one wide layer whose Xᵀ (I x 128 rows) exceeds the per-panel budget, so 130 rows take 2 panels.
SHAPES = ((37, 53, 0.3), (130, 301, 0.1), (17, 1, 0.6), (50, 70, 0.9), (24, 4100, 0.05))
# 1: the 32-bit gather path; 2-8: the quad path, one group (4: full) or two (5: one row in the
# second, 8: full); 9 and 15: the Xᵀ path with a partial 32-row chunk; 16 and up: the Xᵀ path,
# 130 over two 128-row passes. Batches the dispatcher sends to the fp32-compute kernel on this CPU
# (cpu._BF16_CSR_FP32_BATCHES: 9-15 on Intel, 5-8 on Zen 4) call the kernel directly.
BATCHES = (1, 2, 3, 4, 5, 8, 9, 15, 16, 17, 64, 130)


@pytest.fixture(autouse=True)
def _extension_built():
    assert cpu.available(), f"engine._C did not import: {cpu.import_error()}"


@pytest.fixture
def bf16_csr():
    support = cpu.bf16_support()
    if not support["avx512_bf16"]:
        pytest.skip(f"avx512_bf16 cannot run here: {support['avx512_bf16_reason']}")
    before = cpu.bf16_isa()
    if before == "none":  # set_isa() narrowed, or set_bf16_isa("none") left by another test
        cpu.set_bf16_isa("auto")
    yield
    cpu.set_bf16_isa("auto" if before == "none" else before)


def poison_last_kernel():
    """Run a bf16 BSR call so last_bf16_kernel() names a BSR family: a later KERNEL is news."""
    w = BSR.from_dense(torch.randn(16, 32).bfloat16(), blocksize=(16, 32))
    engine.sparse_linear(torch.randn(1, 32).bfloat16(), w)
    assert cpu.last_bf16_kernel() in ("amx", "avx512_bf16")


def csr_weight(o, i, density, seed=0, empty_rows=(0,)):
    """Random bf16 CSR with rows of every parity, some rows empty, some with a single entry."""
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(o, i, generator=gen) < density
    for r in empty_rows:
        if r < o:
            keep[r] = False
    if o > 2 and i > 1:
        keep[1] = False
        keep[1, i - 1] = True  # a single entry on the last column: the pad reads x[I - 1]
    w = torch.randn(o, i, generator=gen) * keep
    return CSR.from_dense(w.bfloat16(), mask=keep)


def reference(x, w, bias, act):
    """float64 result on the stored bf16 values, and Σ|w||x| for the error bound."""
    w64 = CSR.trusted(w.crow_indices, w.col_indices, w.values.double(), w.shape)
    ref = csr_linear_ref(x.double(), w64, None if bias is None else bias.double(), act)
    mag = x.double().abs() @ w.to_dense(torch.float64).abs().T
    return ref, mag


def assert_within(y, ref, mag, k):
    bound = GELU_SLOPE * k * U_F32 * mag + U_BF16 * ref.abs() + 1e-6
    err = (y.double() - ref).abs()
    assert err.shape == ref.shape
    nan_y, nan_ref = torch.isnan(y), torch.isnan(ref)
    assert torch.equal(nan_y, nan_ref), "NaN where the reference has none, or a NaN lost"
    worst = (err - bound)[~nan_ref].max().item() if err.numel() else -1.0
    assert worst <= 0, f"error exceeds the bf16 bound by {worst}"


def run_kernel(x, w, bias, act):
    """The bf16 CSR kernel on x: through engine.sparse_linear, or called directly at the batch sizes
    for which the dispatcher keeps fp32 compute on this CPU, so every path is tested on every CPU."""
    if x.shape[0] in cpu._BF16_CSR_FP32_BATCHES:
        return cpu._csr_linear_bf16(x, w, bias, act)
    return engine.sparse_linear(x, w, bias, activation=act)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("n", BATCHES)
def test_bf16_csr_matches_reference(bf16_csr, shape, n):
    o, i, density = shape
    w = csr_weight(o, i, density, seed=n)
    x = torch.randn(n, i).bfloat16()
    gen_bias = torch.randn(o)
    for bias in (None, gen_bias):
        for act in ACTS:
            poison_last_kernel()
            y = run_kernel(x, w, bias, act)
            assert y.dtype == torch.bfloat16 and y.shape == (n, o)
            assert cpu.last_bf16_kernel() == KERNEL  # the fast path served it, no fallback
            ref, mag = reference(x, w, bias, act)
            assert_within(y, ref, mag, i)


@pytest.mark.parametrize("n", (1, 3, 6, 17, 64))
def test_nan_stays_nan_and_stays_in_its_rows(bf16_csr, n):
    # x[n-1, 7] = NaN: relu(NaN) is NaN in every output whose row stores column 7, and only there
    # (an odd row's zero pad sits on the row's own last column, never on another column).
    w = csr_weight(96, 40, 0.15, seed=5)
    x = torch.randn(n, 40).bfloat16()
    x[n - 1, 7] = float("nan")
    poison_last_kernel()
    y = run_kernel(x, w, torch.randn(96), "relu")
    assert cpu.last_bf16_kernel() == KERNEL
    reads7 = w.to_dense(torch.float32)[:, 7] != 0
    assert reads7.any() and not reads7.all()
    assert torch.isnan(y[n - 1, reads7]).all(), "relu(NaN) must be NaN, as in torch"
    assert not torch.isnan(y[n - 1, ~reads7]).any()
    assert not torch.isnan(y[: n - 1]).any()


def test_empty_weight_rows_give_the_activated_bias(bf16_csr):
    w = csr_weight(40, 64, 0.2, empty_rows=range(0, 40, 3))
    x, bias = torch.randn(19, 64).bfloat16(), torch.randn(40)
    poison_last_kernel()
    y = engine.sparse_linear(x, w, bias, activation="gelu")
    assert cpu.last_bf16_kernel() == KERNEL
    rows = list(range(0, 40, 3))
    want = torch.nn.functional.gelu(bias[rows]).expand(19, len(rows))
    torch.testing.assert_close(y[:, rows].float(), want.bfloat16().float(), atol=1e-2, rtol=U_BF16)


def test_pairs_layout(bf16_csr):
    # The prepared copy: every row's entries in order, an odd row padded with weight 0 on its own
    # last column; built once per weight and reused.
    w = csr_weight(33, 50, 0.3, seed=2)
    ptr, col, val = cpu._pairs(w)
    assert cpu._pairs(w)[1] is col
    crow = w.crow_indices.tolist()
    for r in range(w.shape[0]):
        k0, k1 = crow[r], crow[r + 1]
        got_c = col[ptr[r]:ptr[r + 1]].flatten().long() & 0xFFFF
        got_v = val[ptr[r]:ptr[r + 1]].flatten()
        assert got_c.numel() == k1 - k0 + (k1 - k0) % 2
        assert torch.equal(got_c[: k1 - k0], w.col_indices[k0:k1].long())
        assert torch.equal(got_v[: k1 - k0], w.values[k0:k1])
        if (k1 - k0) % 2:
            assert got_v[-1].item() == 0 and got_c[-1] == got_c[-2]


def with_threads(count, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("n", (1, 6, 70))
def test_threads_split_rows_bitwise_equal(bf16_csr, n):
    # Each output is summed by one thread in a fixed order: the split must not change a bit.
    w = csr_weight(1024, 512, 0.2, seed=3)
    x, bias = torch.randn(n, 512).bfloat16(), torch.randn(1024)
    poison_last_kernel()
    y1, y2 = (with_threads(t, lambda: run_kernel(x, w, bias, "gelu")) for t in (1, 2))
    assert cpu.last_bf16_kernel() == KERNEL
    assert torch.equal(y1, y2)
    ref, mag = reference(x, w, bias, "gelu")
    assert_within(y2, ref, mag, 512)


@pytest.mark.parametrize("n", (3, 20))
def test_bf16_isa_none_runs_the_fp32_compute_path(bf16_csr, n):
    w = csr_weight(48, 80, 0.3, seed=4)
    x, bias = torch.randn(n, 80).bfloat16(), torch.randn(48)
    assert cpu.bf16_kernel_for(w, n) == KERNEL
    poison_last_kernel()
    fast = engine.sparse_linear(x, w, bias, activation="relu")
    assert cpu.last_bf16_kernel() == KERNEL
    poison_last_kernel()
    family = cpu.last_bf16_kernel()
    cpu.set_bf16_isa("none")
    try:
        assert cpu.bf16_kernel_for(w) == "none"
        slow = engine.sparse_linear(x, w, bias, activation="relu")
        assert cpu.last_bf16_kernel() == family  # no bf16 kernel ran
    finally:
        cpu.set_bf16_isa("auto")
    # The fp32-compute kernel on fp32 x, rounded once: exactly what the "none" path returns.
    fp32 = engine.sparse_linear(x.float(), w, bias, activation="relu").bfloat16()
    assert slow.dtype == torch.bfloat16 and torch.equal(slow, fp32)
    ref, mag = reference(x, w, bias, "relu")
    assert_within(fast, ref, mag, 80)
    assert_within(slow, ref, mag, 80)


def test_the_measured_batch_rule_follows_the_cpu():
    # Measured per CPU (bench/results/bf16.md): Intel keeps fp32 compute at 9-15 rows (the padded
    # Xᵀ path lost there), AMD Zen 4 at 5-8 (its slow 64-bit gathers cost the quad path).
    assert cpu._C.avx512_split() == amd_zen4()
    assert cpu._BF16_CSR_FP32_BATCHES == (range(5, 9) if amd_zen4() else range(9, 16))


@pytest.mark.parametrize("n", (5, 8, 9, 12, 15))
def test_the_rule_batches_keep_the_fp32_compute_kernel(bf16_csr, n):
    w = csr_weight(40, 72, 0.2, seed=n)
    x, bias = torch.randn(n, 72).bfloat16(), torch.randn(40)
    fp32 = n in cpu._BF16_CSR_FP32_BATCHES
    assert cpu.bf16_kernel_for(w, n) == ("none" if fp32 else KERNEL)
    assert cpu.bf16_kernel_for(w, 4) == cpu.bf16_kernel_for(w, 16) == cpu.bf16_kernel_for(w) == KERNEL
    poison_last_kernel()
    y = engine.sparse_linear(x, w, bias, activation="gelu")
    if fp32:
        assert torch.equal(y, engine.sparse_linear(x.float(), w, bias, activation="gelu").bfloat16())
    else:
        assert cpu.last_bf16_kernel() == KERNEL
        ref, mag = reference(x, w, bias, "gelu")
        assert_within(y, ref, mag, 72)


def test_dispatch_rules(bf16_csr):
    w = csr_weight(32, 64, 0.3)
    assert cpu.bf16_kernel_for(w) == KERNEL
    # fp32 weights: fp32 compute; inputs wider than uint16 pair columns: fp32 compute.
    assert cpu.bf16_kernel_for(CSR.from_dense(torch.randn(8, 16))) == "none"
    wide = CSR.from_dense(torch.zeros(2, 70000).index_fill_(1, torch.tensor([3, 69999]), 1.0).bfloat16())
    assert cpu.bf16_kernel_for(wide) == "none"
    xw = torch.randn(3, 70000).bfloat16()
    torch.testing.assert_close(engine.sparse_linear(xw, wide).float(),
                               (xw[:, 3].float() + xw[:, 69999].float()).bfloat16().float()[:, None].expand(3, 2))
    # The fp32-ISA override turns the bf16 kernels off (AVX2 machines keep fp32 compute).
    before = cpu.isa()
    try:
        cpu.set_isa("avx2")
        assert cpu.bf16_kernel_for(w) == "none"
        assert engine.sparse_linear(torch.randn(3, 64).bfloat16(), w).dtype == torch.bfloat16
    finally:
        cpu.set_isa(before)
    assert cpu.bf16_kernel_for(w) == KERNEL


def test_sparse_linear_module_takes_the_kernel(bf16_csr):
    # A bf16 model's CSR layer (SparseLinear built from a bf16 nn.Linear) runs the bf16 kernel.
    lin = torch.nn.Linear(96, 40).bfloat16()
    with torch.no_grad():
        lin.weight.mul_(torch.rand(40, 96) < 0.2)
    layer = engine.SparseLinear.from_linear(lin, format="csr")
    x = torch.randn(24, 96).bfloat16()
    poison_last_kernel()
    y = layer(x)
    assert cpu.last_bf16_kernel() == KERNEL and y.dtype == torch.bfloat16
    ref = x.double() @ lin.weight.double().T + lin.bias.double()
    assert ((y.double() - ref).abs() <= 96 * U_F32 * (x.double().abs() @ lin.weight.double().abs().T)
            + U_BF16 * ref.abs() + 1e-6).all()
