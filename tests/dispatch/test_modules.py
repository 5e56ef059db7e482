import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune as tprune

import engine
import engine.transformer
from engine.modules import SparseLinear, choose_layout, detect_blocksize, sparsify
from tests.fixtures import random_sparse


def _pruned_linear(i, o, sparsity, block=(1, 1), bias=True):
    lin = nn.Linear(i, o, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(random_sparse(o, i, sparsity, block=block))
    return lin


@pytest.mark.parametrize("fmt, block", [("csr", None), ("bsr", (4, 8)), ("bsr", None), ("dense", None), ("auto", None)])
def test_from_linear_matches_linear(fmt, block):
    lin = _pruned_linear(40, 24, 0.8, block=(4, 8))
    layer = SparseLinear.from_linear(lin, fmt, block)
    x = torch.randn(3, 7, 40)
    torch.testing.assert_close(layer(x), lin(x), rtol=1e-5, atol=1e-5)
    if fmt == "bsr":
        assert layer.sparse_weight.blocksize == (4, 8)  # detected from the structure when not given


def test_from_linear_reads_torch_prune_mask_and_keeps_zero_valued_kept_weights():
    lin = nn.Linear(16, 8)
    tprune.l1_unstructured(lin, "weight", amount=0.75)
    with torch.no_grad():
        kept = lin.weight_mask.nonzero()[0]
        lin.weight_orig[kept[0], kept[1]] = 0.0  # kept by the mask, value happens to be 0
    layer = SparseLinear.from_linear(lin, "csr")
    assert layer.sparse_weight.nnz == int(lin.weight_mask.sum())
    x = torch.randn(5, 16)
    torch.testing.assert_close(layer(x), lin(x))


def test_sparsify_swaps_layers_fuses_activations_and_matches_dense():
    model = nn.Sequential(_pruned_linear(64, 128, 0.9), nn.ReLU(), _pruned_linear(128, 32, 0.9, (8, 8)),
                          nn.GELU(), _pruned_linear(32, 10, 0.0))
    x = torch.randn(6, 64)
    expected = model(x)
    sparsify(model, skip=("4",))
    assert isinstance(model[0], SparseLinear) and model[0].activation == "relu"
    assert isinstance(model[1], nn.Identity)
    assert isinstance(model[2], SparseLinear) and model[2].activation == "gelu"
    assert isinstance(model[4], nn.Linear)  # skipped by name
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_sparsify_auto_keeps_dense_layer_dense():
    model = nn.Sequential(_pruned_linear(256, 256, 0.05), nn.ReLU(), _pruned_linear(256, 256, 0.95))
    sparsify(model)
    assert type(model[0]) is nn.Linear
    assert isinstance(model[2], SparseLinear) and model[2].format in ("csr", "bsr")


def test_choose_layout_prefers_bsr_for_block_structure():
    w = random_sparse(512, 512, 0.9, block=(16, 16))
    fmt, block, reason = choose_layout(w, batch=32)
    assert fmt == "bsr" and block == (16, 16), reason
    assert detect_blocksize(random_sparse(512, 512, 0.9) != 0) is None


def test_state_dict_round_trip_and_dtype_move():
    layer = SparseLinear.from_linear(_pruned_linear(32, 16, 0.7, (4, 4)), "bsr", (4, 4))
    sd = layer.state_dict()
    assert set(sd) == {"weight_crow_indices", "weight_col_indices", "weight_values", "bias"}
    clone = copy.deepcopy(layer)
    clone.weight_values.zero_()
    clone.load_state_dict(sd)
    x = torch.randn(3, 32)
    torch.testing.assert_close(clone(x), layer(x))
    half = layer.to(torch.bfloat16)
    assert half.weight_values.dtype == torch.bfloat16 and half.weight_col_indices.dtype == torch.int32


def test_bf16_storage_within_rounding():
    lin = _pruned_linear(64, 32, 0.8)
    layer = SparseLinear.from_linear(lin, "csr", dtype=torch.bfloat16)
    assert layer.weight_values.dtype == torch.bfloat16
    x = torch.randn(4, 64)
    ref = torch.nn.functional.linear(x, lin.weight.bfloat16().float(), lin.bias.bfloat16().float())
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("call, exc, match", [
    (lambda: SparseLinear.from_linear(nn.Conv1d(2, 2, 1)), TypeError, "expected nn.Linear"),
    (lambda: SparseLinear.from_linear(nn.Linear(8, 8), "coo"), ValueError, "unknown format 'coo'"),
    (lambda: SparseLinear.from_linear(nn.Linear(6, 8), "bsr", (4, 4)), ValueError, "does not divide"),
    (lambda: SparseLinear(torch.randn(4, 4), torch.randn(3)), ValueError, "bias must have shape"),
    (lambda: sparsify(nn.Linear(4, 4), "ell"), ValueError, "unknown format 'ell'"),
])
def test_bad_arguments(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_public_names():
    # engine.sparsify swaps whole transformer blocks, then calls modules.sparsify for the rest.
    assert engine.SparseLinear is SparseLinear and engine.sparsify is engine.transformer.sparsify
