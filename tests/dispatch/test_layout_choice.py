"""`format="auto"` / choose_layout never pick a BSR block that does not divide the weight's shape;
a forced one is refused with a message that says what to do."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from engine import costmodel, cpu
from engine.formats import BSR, FormatError
from engine.modules import SparseLinear, choose_layout, detect_blocksize, sparsify
from tests.fixtures import random_sparse


def _pruned(i, o, sparsity, block=(1, 1)):
    lin = nn.Linear(i, o)
    with torch.no_grad():
        lin.weight.copy_(random_sparse(o, i, sparsity, block=block))
    return lin


def test_detected_blocks_always_divide():
    # 50x100 in 2x4 tiles: the 4x4, 8x8, ... candidates do not divide 50 and must not be considered.
    keep = random_sparse(50, 100, 0.8, block=(2, 4)) != 0
    block = detect_blocksize(keep)
    assert block is not None and 50 % block[0] == 0 and 100 % block[1] == 0


def test_auto_with_a_non_dividing_block_never_picks_it():
    w = random_sparse(50, 100, 0.9, block=(2, 4))
    fmt, block, reason = choose_layout(w, blocksize=(4, 4), batch=32)
    assert fmt != "bsr" and block is None, reason
    fmt, block, _ = choose_layout(w, blocksize=(2, 4), batch=32)  # a dividing one competes
    assert (fmt, block) == ("bsr", (2, 4))


def test_sparsify_auto_with_a_block_that_does_not_divide_every_layer():
    """The 64-100-50-10 digits shape with 4x4: the 50x100 layer falls back to another layout."""
    model = nn.Sequential(_pruned(64, 100, 0.9, (4, 4)), nn.ReLU(), _pruned(100, 50, 0.9, (2, 4)),
                          nn.ReLU(), _pruned(50, 10, 0.5))
    x = torch.randn(7, 64)
    with torch.no_grad():
        expected = model(x)
        sparsify(model, "auto", (4, 4), batch=32)
        for m in model.modules():
            if isinstance(m, SparseLinear) and m.format == "bsr":
                r, c = m.sparse_weight.blocksize
                assert m.out_features % r == 0 and m.in_features % c == 0
        assert isinstance(model[2], (nn.Linear, SparseLinear)) and getattr(model[2], "format", "dense") != "bsr"
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_forced_non_dividing_block_says_what_to_do():
    lin = _pruned(100, 50, 0.8)
    with pytest.raises(FormatError, match=r"blocksize \(4, 4\) does not divide weight shape \(50, 100\)") as e:
        SparseLinear.from_linear(lin, "bsr", (4, 4))
    msg = str(e.value)
    assert "e.g. (2, 4)" in msg and "format='csr'" in msg and "auto" in msg
    BSR.from_dense(lin.weight.detach(), blocksize=(2, 4))  # the suggested block works


def test_forced_bsr_without_block_picks_a_dividing_one():
    layer = SparseLinear.from_linear(_pruned(100, 50, 0.8), "bsr")
    r, c = layer.sparse_weight.blocksize
    assert 50 % r == 0 and 100 % c == 0


needs_bf16 = pytest.mark.skipif(not costmodel.bf16_compute_available(),
                                reason="this CPU has neither AMX nor AVX512-BF16: no bf16-compute kernels")


@needs_bf16
def test_auto_for_a_bf16_model_weighs_sparse_against_dense_bf16():
    """A bf16 model's baseline is torch's bf16 GEMM: at a large batch unstructured CSR (fp32 FMAs)
    loses to it and stays dense, while 16x16 blocks (AMX tiles) still win."""
    loose = random_sparse(768, 3072, 0.9)
    tiles = random_sparse(768, 3072, 0.9, block=(16, 16))
    assert choose_layout(loose, batch=1024)[0] == "csr"  # against dense fp32 it wins
    fmt, _, reason = choose_layout(loose, batch=1024, value_bytes=2, compute="bf16")
    assert fmt == "dense" and "vs dense bf16" in reason
    assert choose_layout(tiles, batch=1024, value_bytes=2, compute="bf16")[:2] == ("bsr", (16, 16))

    model = nn.Sequential(_pruned(3072, 768, 0.9), nn.GELU(), _pruned(768, 3072, 0.9, (16, 16))).to(torch.bfloat16)
    x = torch.randn(1024, 3072, dtype=torch.bfloat16)
    with torch.no_grad():
        want = model(x)
    sparsify(model, batch=1024)
    assert type(model[0]) is nn.Linear                       # dense bf16 kept
    assert isinstance(model[2], SparseLinear) and model[2].format == "bsr"
    assert cpu.bf16_kernel_for(model[2].sparse_weight) != "none"
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=2e-2, atol=2e-2)
