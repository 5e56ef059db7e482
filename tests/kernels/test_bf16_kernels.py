"""bf16-compute BSR kernels (csrc/bf16.cpp): AMX tiles and AVX512-BF16, against the float64
reference on the very bf16 values the kernel reads.

Tolerances, from bf16's unit roundoff u = 2^-8 (8 significand bits) and fp32's 2^-24:
  * products of two bf16 are exact in fp32; summing K = I terms in fp32 errs by at most
    K · 2^-24 · Σ|w||x| (a loose, worst-case bound);
  * the bf16 output is one rounding of the fp32 result: u · |y|;
  * x given in fp32 is rounded to bf16 once: u · Σ|w||x| more;
  * GELU's slope is at most 1.13, so an error before it grows by at most that factor.
A path that is not present on this CPU is skipped with the reason the extension reports.
"""
from __future__ import annotations

import pytest
import torch

import engine
from engine import cpu
from engine.formats import BSR
from engine.reference import bsr_linear_ref

U_BF16 = 2.0 ** -8
U_F32 = 2.0 ** -24
GELU_SLOPE = 1.13
ACTS = ("none", "relu", "gelu", "gelu_tanh")
# (O, I, R, C): the 16x32 tile block; half-width K; partial tiles in both dimensions (R < 16,
# C < 32, odd multiples); a single block row.
SHAPES = ((64, 96, 16, 32), (48, 64, 16, 16), (30, 50, 6, 10), (16, 34, 16, 2), (40, 24, 8, 4))
# 0, 1, odd, one full tile, one over, across the 64-row AMX chunk group (4 tiles).
BATCHES = (0, 1, 3, 16, 17, 70, 130)


@pytest.fixture(autouse=True)
def _extension_built():
    assert cpu.available(), f"engine._C did not import: {cpu.import_error()}"


def selected(family: str):
    """Select a bf16 kernel family for one test (skipped, with the extension's reason, where this
    CPU cannot run it); restores the previous selection after."""
    support = cpu.bf16_support()
    if not support[family]:
        pytest.skip(f"{family} cannot run here: {support[family + '_reason']}")
    before = cpu.bf16_isa()
    cpu.set_bf16_isa(family)
    assert cpu.bf16_isa() == family
    yield family
    cpu.set_bf16_isa("auto" if before == "none" else before)


@pytest.fixture(params=["amx", "avx512_bf16"])
def bf16_isa(request):
    yield from selected(request.param)


def bf16_weight(o, i, r, c, sparsity=0.6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(o // r, i // c, generator=gen) >= sparsity
    keep[0, 0] = True
    keep = keep.repeat_interleave(r, 0).repeat_interleave(c, 1)
    w = (torch.randn(o, i, generator=gen) * keep).bfloat16()
    return BSR.from_dense(w, mask=keep, blocksize=(r, c))


def reference(x, w, bias, act):
    """float64 reference on the stored bf16 values, and Σ|w||x| for the error bound."""
    w64 = BSR.trusted(w.crow_indices, w.col_indices, w.values.double(), w.shape)
    b = None if bias is None else bias.double()
    ref = bsr_linear_ref(x.double(), w64, b, act)
    mag = x.double().abs() @ w64.to_dense(torch.float64).abs().T
    return ref, mag


def assert_within(y, ref, mag, k, x_rounded):
    slope = GELU_SLOPE
    bound = slope * (k * U_F32 + (U_BF16 if x_rounded else 0.0)) * mag + U_BF16 * ref.abs() + 1e-6
    err = (y.double() - ref).abs()
    assert err.shape == ref.shape
    worst = (err - bound).max().item() if err.numel() else -1.0
    assert worst <= 0, f"error exceeds the bf16 bound by {worst}"


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("n", BATCHES)
def test_bf16_path_matches_reference(bf16_isa, shape, n):
    o, i, r, c = shape
    w = bf16_weight(o, i, r, c)
    x = torch.randn(n, i).bfloat16()
    bias = torch.randn(o)
    for act in ACTS:
        y = engine.sparse_linear(x, w, bias, activation=act)
        assert y.dtype == torch.bfloat16 and y.shape == (n, o)
        # Proof that the bf16 kernel served the call, not the fp32-compute fallback.
        assert cpu.last_bf16_kernel() == bf16_isa
        ref, mag = reference(x, w, bias, act)
        assert_within(y, ref, mag, i, x_rounded=False)


@pytest.mark.parametrize("n", (1, 17, 70))
def test_fp32_x_rounded_in_kernel_and_fp32_out(bf16_isa, n):
    # The raw kernel API also takes fp32 x (rounded to bf16 once per call) and writes fp32 y.
    o, i, r, c = 48, 96, 16, 32
    w = bf16_weight(o, i, r, c, seed=1)
    x, bias = torch.randn(n, i), torch.randn(o)
    y = torch.full((n, o), float("nan"))
    packed = cpu._vnni(w)
    cpu._C.bsr_linear_bf16(y.data_ptr(), x.data_ptr(), n, i, o, r, c, w.crow_indices.data_ptr(),
                           w.col_indices.data_ptr(), packed.data_ptr(), bias.data_ptr(), 0, 2)
    ref, mag = reference(x, w, bias, "none")
    assert_within(y, ref, mag, i, x_rounded=True)
    # ...and really in bf16: the result differs from the fp32-x result by more than fp32 rounding.
    assert (y.double() - ref).abs().max() > 1e-4


def test_nan_propagates_through_relu(bf16_isa):
    w = bf16_weight(32, 64, 16, 32, sparsity=0.0)
    x = torch.randn(5, 64).bfloat16()
    x[2, 7] = float("nan")
    y = engine.sparse_linear(x, w, None, activation="relu")
    assert cpu.last_bf16_kernel() == bf16_isa
    assert torch.isnan(y[2]).all(), "relu(NaN) must be NaN, as in torch"
    assert not torch.isnan(y[[0, 1, 3, 4]]).any()


def test_empty_block_rows_and_zero_weight(bf16_isa):
    w = bf16_weight(64, 64, 16, 32, sparsity=1.0)  # only block (0, 0) kept
    x = torch.randn(9, 64).bfloat16()
    bias = torch.randn(64)
    y = engine.sparse_linear(x, w, bias)
    assert cpu.last_bf16_kernel() == bf16_isa
    torch.testing.assert_close(y[:, 16:].float(), bias[16:].bfloat16().float().expand(9, 48))


def test_dispatch_rules(bf16_isa):
    w = bf16_weight(32, 64, 16, 32)
    assert cpu.bf16_kernel_for(w) == bf16_isa
    # Blocks larger than a tile, fp32 weights: the fp32-compute kernels.
    big = BSR.from_dense(torch.randn(64, 64).bfloat16(), blocksize=(32, 32))
    assert cpu.bf16_kernel_for(big) == "none"
    assert cpu.bf16_kernel_for(bf16_weight(32, 64, 16, 32).to(dtype=torch.float32)) == "none"
    # The fp32-ISA override turns the bf16 kernels off too (AVX2 machines keep fp32 compute).
    before = cpu.isa()
    try:
        cpu.set_isa("avx2")
        assert cpu.bf16_isa() == "none" and cpu.bf16_kernel_for(w) == "none"
        y = engine.sparse_linear(torch.randn(3, 64).bfloat16(), w)
        assert y.dtype == torch.bfloat16
    finally:
        cpu.set_isa(before)
    assert cpu.bf16_isa() == bf16_isa


def test_bf16_isa_knob_errors():
    with pytest.raises(ValueError, match="expected 'auto', 'amx', 'avx512_bf16' or 'none'"):
        cpu.set_bf16_isa("tiles")
    support = cpu.bf16_support()
    for name in ("amx", "avx512_bf16"):
        # Either usable with no reason, or not usable with a reason a user can read.
        assert support[name] == (support[name + "_reason"] == "")
        if not support[name]:
            with pytest.raises(RuntimeError, match="set_bf16_isa"):
                cpu.set_bf16_isa(name)


# ---- cost model: bf16 compute rates (engine.costmodel.CPU_BF16) ------------------------------------

def _times(shape, density, batch, block=(16, 32)):
    from engine import costmodel as cm
    full = shape[0] * shape[1]
    stored = int(full * density)
    kw = dict(value_bytes=2, compute="bf16")
    return {"dense": cm.predict_seconds("dense", shape, full, batch, **kw),
            "bsr": cm.predict_seconds("bsr", shape, stored, batch, block, **kw),
            "csr": cm.predict_seconds("csr", shape, stored, batch, **kw)}


def test_costmodel_bf16_picks_tiles_where_they_pay():
    # 90% sparse tiles beat dense bf16 from batch 1 to 1024 tokens (bench/results/bf16.md) ...
    for shape, batch in (((4096, 4096), 1), ((4096, 4096), 64), ((3072, 768), 128), ((3072, 768), 1024)):
        t = _times(shape, 0.1, batch)
        assert min(t, key=t.get) == "bsr", (shape, batch, t)
    # ... at half density dense bf16 (oneDNN AMX) is faster on a large batch: nothing sparse pays.
    t = _times((3072, 768), 0.5, 1024)
    assert min(t, key=t.get) == "dense", t
    # Unstructured (CSR computes in fp32) loses to dense bf16 on BERT-sized token batches from two
    # sequences (the measured crossover, bench/results/bf16.md: 1.03x at one sequence of 128 tokens).
    for batch in (256, 1024):
        assert _times((3072, 768), 0.1, batch)["csr"] > _times((3072, 768), 0.1, batch)["dense"], batch


def test_costmodel_bf16_rows_only_where_a_bf16_kernel_serves():
    from engine import costmodel as cm
    shape, stored = (1024, 1024), 1024 * 1024 // 10
    tile = cm.predict_seconds("bsr", shape, stored, 64, (16, 32), value_bytes=2, compute="bf16")
    big = cm.predict_seconds("bsr", shape, stored, 64, (32, 32), value_bytes=2, compute="bf16")
    fp32_big = cm.predict_seconds("bsr", shape, stored, 64, (32, 32), value_bytes=2)
    assert tile < big  # 32x32 blocks do not fit a tile: the fp32 BSR rates apply
    assert big == pytest.approx(fp32_big, rel=0.05)  # only the activation bytes differ
    with pytest.raises(ValueError, match="compute must be 'fp32' or 'bf16'"):
        cm.predict_seconds("dense", shape, 1024 * 1024, 1, compute="fp16")


def test_costmodel_bf16_half_depth_tiles_cost_a_whole_tile():
    # 16x16 blocks fill half of each TDPBF16PS's depth: measured ~0.48 vs ~0.9 TFLOP/s on stored
    # values (bench/results/bf16.md, 2026-12-07); compute-bound batches predict about twice the time.
    from engine import costmodel as cm
    shape, stored = (1152, 384), 1152 * 384 // 10
    half, full = (cm.predict_seconds("bsr", shape, stored, 4096, b, value_bytes=2, compute="bf16")
                  for b in ((16, 16), (16, 32)))
    assert half == pytest.approx(2 * full, rel=0.1)


def test_amx_refused_falls_back_with_reason():
    # SPARSE_ENGINE_NO_AMX=1 stands in for a kernel that refuses the tile permission: the process
    # must report why, serve bf16 calls with the next family, and refuse to force AMX.
    import os
    import subprocess
    import sys
    code = """
import torch, engine
from engine import cpu
from engine.formats import BSR
s = cpu.bf16_support()
assert not s["amx"] and s["amx_reason"] == "disabled by SPARSE_ENGINE_NO_AMX=1", s
want = "avx512_bf16" if s["avx512_bf16"] else "none"
assert cpu.bf16_isa() == want, cpu.bf16_isa()
w = BSR.from_dense(torch.randn(32, 64).bfloat16(), blocksize=(16, 32))
x = torch.randn(3, 64).bfloat16()
y = engine.sparse_linear(x, w)
ref = x.double() @ w.to_dense(torch.float64).T
assert ((y.double() - ref).abs() <= 2 ** -8 * ref.abs() + 64 * 2 ** -24 * (x.double().abs() @ w.to_dense(torch.float64).abs().T) + 1e-6).all()
if want != "none":
    assert cpu.last_bf16_kernel() == want
try:
    cpu.set_bf16_isa("amx")
    raise SystemExit("set_bf16_isa('amx') should have raised")
except RuntimeError as e:
    assert "SPARSE_ENGINE_NO_AMX" in str(e), e
print("ok")
"""
    env = dict(os.environ, SPARSE_ENGINE_NO_AMX="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh"])
def test_vector_gelu_epilogue_accuracy(bf16_isa, act):
    # W = identity (32x32: two 16x32 blocks), no bias, fp32 output: y = act(bf16(x)) probes the
    # epilogue alone over [-30, 30], tiny values and zero; one row holds a NaN (the matmul spreads
    # it over its row, in the reference too). Bound: erf by Abramowitz & Stegun 7.1.26 errs by
    # <= 1.5e-7, i.e. <= 0.75e-7 |v| in gelu; the exp and division chain adds a few fp32 ulps
    # (2^-21 |v|).
    eye = torch.eye(32)
    w = BSR.from_dense(eye.bfloat16(), blocksize=(16, 32))
    v = torch.cat([torch.linspace(-30, 30, 20001), torch.tensor([1e-30, -1e-30, 0.0, 1e-3, -1e-3] * 3)])
    v = torch.cat([v, torch.zeros(-v.numel() % 32)]).reshape(-1, 32)
    v = torch.cat([v, torch.randn(1, 32)]).bfloat16().float()
    v[-1, 5] = float("nan")
    y = torch.empty_like(v)
    cpu._C.bsr_linear_bf16(y.data_ptr(), v.data_ptr(), v.shape[0], 32, 32, 16, 32,
                           w.crow_indices.data_ptr(), w.col_indices.data_ptr(), cpu._vnni(w).data_ptr(),
                           0, {"gelu": 2, "gelu_tanh": 3}[act], 1)
    assert cpu.last_bf16_kernel() == bf16_isa
    ref = torch.nn.functional.gelu(v.double() @ eye.double(), approximate="none" if act == "gelu" else "tanh")
    assert torch.isnan(y[-1]).all(), "NaN must propagate through the GELU epilogue"
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    ok = ~torch.isnan(ref)
    bound = (0.75e-7 + 2.0 ** -21) * v.double().abs() + 1e-30
    assert ((y.double() - ref).abs()[ok] <= bound[ok]).all()


def test_bf16_output_gelu_epilogue_accuracy(bf16_isa):
    # The same probe with a bf16 output: erf-GELU by the cheaper approximation (csrc/bf16.cpp
    # gelu512<true>, < 1e-4 |v| before rounding) is still within one bf16 rounding: 2^-9 |y| (half an
    # ulp), bounded here by 2^-8 |ref| + 1e-4 |v|.
    eye = torch.eye(32)
    w = BSR.from_dense(eye.bfloat16(), blocksize=(16, 32))
    v = torch.cat([torch.linspace(-30, 30, 20001), torch.tensor([1e-30, -1e-30, 0.0, 1e-3, -1e-3] * 3)])
    v = torch.cat([v, torch.zeros(-v.numel() % 32)]).reshape(-1, 32)
    v = torch.cat([v, torch.randn(1, 32)]).bfloat16()
    v[-1, 5] = float("nan")
    y = engine.sparse_linear(v, w, activation="gelu")
    assert y.dtype is torch.bfloat16 and cpu.last_bf16_kernel() == bf16_isa
    ref = torch.nn.functional.gelu(v.double() @ eye.double())
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.isnan(y[-1]).all()
    ok = ~torch.isnan(ref)
    err = (y.double() - ref).abs()[ok]
    bound = (U_BF16 * ref.abs() + 1e-4 * v.double().abs() + 1e-30)[ok]
    assert (err <= bound).all(), f"worst excess {(err - bound).max().item()}"
    # and no worse than torch's own bf16 GELU on the same values, to within one rounding
    assert err.max() <= (torch.nn.functional.gelu(v).double() - ref).abs()[ok].max() + U_BF16 * 30


@pytest.mark.parametrize("n", (70, 200), ids=("block-rows-split", "batch-rows-split"))
def test_threads_split_bitwise_equal(bf16_isa, n):
    # Large enough for a 2-thread team (csrc/common.h pick_threads); each output is computed by one
    # thread in a fixed order, so the split must not change a single bit, and both match the bound.
    # AMX splits the batch rows from 64 rows a thread (200 rows: 13 tiles, 6 and 7 per thread, the
    # last one partial), the block rows below that; AVX512-BF16 always the block rows.
    w = bf16_weight(512, 512, 16, 32, sparsity=0.5, seed=3)
    x, bias = torch.randn(n, 512).bfloat16(), torch.randn(512)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = engine.sparse_linear(x, w, bias, activation="gelu")
        torch.set_num_threads(2)
        y2 = engine.sparse_linear(x, w, bias, activation="gelu")
    finally:
        torch.set_num_threads(before)
    assert cpu.last_bf16_kernel() == bf16_isa
    assert torch.equal(y1, y2)
    ref, mag = reference(x, w, bias, "gelu")
    assert_within(y2, ref, mag, 512, x_rounded=False)


# ---- attention on AMX tiles (cpu.attention_cpu on bf16 QKV) -----------------------------------------

@pytest.fixture
def amx():
    yield from selected("amx")


def attention_ref(qkv, b, s, heads):
    """float64 softmax(q·kᵀ/√d)·v of the very bf16 values the kernel reads, (B·S, H); and per output
    element the largest |v| of its sequence and head (the scale of the P-rounding error)."""
    hs = qkv.shape[1] // 3 // heads
    q, k, v = qkv.double().view(b, s, 3, heads, hs).permute(2, 0, 3, 1, 4).unbind(0)
    ref = torch.softmax(q @ k.transpose(-1, -2) / hs ** 0.5, -1) @ v
    vmax = v.abs().amax(dim=(2, 3), keepdim=True).expand_as(ref)
    return ref.transpose(1, 2).reshape(b * s, heads * hs), vmax.transpose(1, 2).reshape(b * s, heads * hs)


# (B, S, heads, head size): MiniLM's heads (32) and BERT's (64); partial 16-query blocks and 32-key
# chunks (S = 37, 17, 200); one token; three 32-dim chunks; an empty batch.
@pytest.mark.parametrize("b,s,heads,hs", [(1, 128, 12, 32), (2, 37, 3, 64), (3, 1, 2, 32), (1, 17, 1, 96),
                                          (2, 200, 4, 32), (0, 5, 2, 32)])
def test_amx_attention_within_bf16_rounding(amx, b, s, heads, hs):
    # Errors: P rounded to bf16 (half an ulp, 2^-9 relative: at most 2^-9 · max|v| on an output) and
    # the output rounded to bf16 (2^-9 |y|); scores, exp (relative error < 4e-5) and sums in fp32.
    # Bounded here by U_BF16 = 2^-8 times each: twice the half-ulp terms.
    qkv = (torch.randn(b * s, 3 * heads * hs) * 2).bfloat16()
    assert cpu.attention_fits(qkv, heads)
    y = cpu.attention_cpu(qkv, b, s, heads)
    assert y.dtype is torch.bfloat16 and y.shape == (b * s, heads * hs)
    assert cpu.last_bf16_kernel() == "amx_attention"
    ref, vmax = attention_ref(qkv, b, s, heads)
    err = (y.double() - ref).abs()
    assert (err <= U_BF16 * (vmax + ref.abs()) + 1e-6).all(), f"worst error {err.max().item()}"


def test_amx_attention_no_worse_than_torch_bf16(amx):
    # Against torch's own bf16 attention on the same inputs: the same error, to within a rounding.
    b, s, heads, hs = 2, 128, 4, 32
    qkv = (torch.randn(b * s, 3 * heads * hs) * 3).bfloat16()
    q, k, v = qkv.view(b, s, 3, heads, hs).permute(2, 0, 3, 1, 4).unbind(0)
    torch_y = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b * s, -1)
    ref, _ = attention_ref(qkv, b, s, heads)
    ours = (cpu.attention_cpu(qkv, b, s, heads).double() - ref).abs()
    theirs = (torch_y.double() - ref).abs()
    assert ours.mean() <= 1.25 * theirs.mean() and ours.max() <= 2 * theirs.max()


def test_amx_attention_propagates_nan(amx):
    # As the fp32 kernel: a NaN query makes its row NaN; a NaN key, every query row of its sequence
    # and head; nothing else changes.
    s, hs = 20, 32
    qkv = torch.randn(2 * s, 3 * 2 * hs).bfloat16()
    qkv[3, 3] = float("nan")                     # a query of sequence 0, head 0
    qkv[s + 1, 2 * hs + hs + 2] = float("nan")   # a key of sequence 1, head 1
    y = cpu.attention_cpu(qkv, 2, s, 2)
    ref, _ = attention_ref(qkv, 2, s, 2)
    nan = torch.isnan(ref)
    assert nan[3, :hs].all() and nan[s:, hs:].all() and nan.sum() == hs + hs * s
    assert torch.equal(torch.isnan(y), nan)


def test_amx_attention_threads_bitwise_equal(amx):
    # One (sequence, head) per task, computed by one thread: the split changes no bit.
    qkv = torch.randn(4 * 64, 3 * 6 * 32).bfloat16()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = cpu.attention_cpu(qkv, 4, 64, 6)
        torch.set_num_threads(2)
        y2 = cpu.attention_cpu(qkv, 4, 64, 6)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(y1, y2)


def test_amx_attention_fits_only_what_it_runs():
    qkv = torch.randn(10, 3 * 64).bfloat16()
    has_amx = cpu.bf16_isa() == "amx"
    assert cpu.attention_fits(qkv, 2) == has_amx       # head size 32
    assert cpu.attention_fits(qkv, 1) == has_amx       # head size 64
    assert not cpu.attention_fits(qkv, 4)              # head size 16: SDPA
    if not cpu.bf16_support()["avx512_bf16"]:
        return
    before = cpu.bf16_isa()
    try:
        cpu.set_bf16_isa("avx512_bf16")               # no AMX selected: SDPA, and the kernel refuses
        assert not cpu.attention_fits(qkv, 2)
        with pytest.raises(RuntimeError, match="AMX kernels are not selected"):
            cpu._C.attention_bf16(torch.empty(10, 64).bfloat16().data_ptr(), qkv.data_ptr(), 1, 10, 2, 32, 1.0, 1)
    finally:
        cpu.set_bf16_isa(before)


# ---- out projection + residual + LayerNorm in one AMX call (cpu.linear_add_norm) ---------------------

@pytest.mark.parametrize("n", (1, 17, 70, 130, 200))
@pytest.mark.parametrize("o,i,r,c", [(64, 96, 16, 32), (40, 24, 8, 4)], ids=str)
@pytest.mark.parametrize("affine", [True, False])
def test_linear_add_norm_matches_float64(amx, n, o, i, r, c, affine):
    # LayerNorm(x · Wᵀ + b + residual) of the stored bf16 values in float64. The sum is exact up to
    # fp32 accumulation (k · 2^-24 Σ|w||x|), the LayerNorm divides it by the row's deviation σ, and the
    # output is rounded once (2^-9 relative; bound 2^-8 |y|).
    w = bf16_weight(o, i, r, c, seed=n)
    x, res, bias = torch.randn(n, i).bfloat16(), torch.randn(n, o).bfloat16(), torch.randn(o)
    gamma, beta = (torch.randn(o), torch.randn(o)) if affine else (None, None)
    assert cpu.linear_add_norm_fits(x, w, res, gamma, beta)
    y = cpu.linear_add_norm(x, w, bias, res, gamma, beta, 1e-5)
    assert y.dtype is torch.bfloat16 and y.shape == (n, o) and cpu.last_bf16_kernel() == "amx"
    lin, mag = reference(x, w, bias, "none")
    h = lin + res.double()
    ref = torch.nn.functional.layer_norm(h, (o,), None if gamma is None else gamma.double(),
                                         None if beta is None else beta.double(), 1e-5)
    sigma = h.std(dim=1, unbiased=False, keepdim=True)
    g = 1.0 if gamma is None else gamma.double().abs()
    bound = U_BF16 * ref.abs() + 2 * g * i * U_F32 * mag / sigma + 1e-5
    assert ((y.double() - ref).abs() <= bound).all(), f"worst {(y.double() - ref).abs().max().item()}"


def test_linear_add_norm_threads_bitwise_equal(amx):
    w = bf16_weight(384, 384, 16, 32, sparsity=0.5, seed=4)
    x, res = torch.randn(300, 384).bfloat16(), torch.randn(300, 384).bfloat16()
    gamma, beta = torch.randn(384), torch.randn(384)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1 = cpu.linear_add_norm(x, w, None, res, gamma, beta, 1e-12)
        torch.set_num_threads(2)
        y2 = cpu.linear_add_norm(x, w, None, res, gamma, beta, 1e-12)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(y1, y2)


def test_linear_add_norm_refuses_what_it_cannot_run(amx):
    w = bf16_weight(64, 96, 16, 32)
    x, res = torch.randn(5, 96).bfloat16(), torch.randn(5, 64).bfloat16()
    assert not cpu.linear_add_norm_fits(x.float(), w, res, None, None)          # fp32 x
    assert not cpu.linear_add_norm_fits(x, w, res.float(), None, None)          # fp32 residual
    assert not cpu.linear_add_norm_fits(x, w, res[:4], None, None)              # residual of another shape
    assert not cpu.linear_add_norm_fits(x, w, res, torch.ones(63), None)        # LayerNorm of another width
    w32 = BSR.from_dense(w.to_dense(torch.float32), blocksize=(16, 32))
    assert not cpu.linear_add_norm_fits(x, w32, res, None, None)                # fp32 weights
    packed = cpu._vnni(w)
    y = torch.empty(5, 64).bfloat16()
    with pytest.raises(ValueError, match="no activation"):                      # the C++ guard
        cpu._C.bsr_linear_bf16(y.data_ptr(), x.data_ptr(), 5, 96, 64, 16, 32, w.crow_indices.data_ptr(),
                               w.col_indices.data_ptr(), packed.data_ptr(), 0, 1, 1, True, True,
                               res.data_ptr(), 0, 0, 1e-5)
