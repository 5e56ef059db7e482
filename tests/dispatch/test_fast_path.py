"""SparseLinear validates once (construction, load, attribute assignment) and its forward calls the
kernels through sparse_linear's skip-checks path; direct sparse_linear callers keep every check."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import engine
from engine import cpu, ops
from engine.formats import CSR
from engine.modules import SparseLinear
from tests.fixtures import random_sparse


def _layer(fmt="csr", block=None, o=24, i=40):
    lin = nn.Linear(i, o)
    with torch.no_grad():
        lin.weight.copy_(random_sparse(o, i, 0.7, block=(4, 8)))
    return lin, SparseLinear.from_linear(lin, fmt, block)


def _refuse(*args, **kwargs):
    raise AssertionError("the per-call argument checks ran")


@pytest.mark.parametrize("fmt, block", [("csr", None), ("bsr", (4, 8)), ("dense", None)])
def test_forward_skips_the_argument_checks_and_still_runs_the_kernel(monkeypatch, fmt, block):
    if not cpu.available():
        pytest.fail(f"the C++ extension must be built for the test suite: {cpu.import_error()}")
    lin, layer = _layer(fmt, block)
    x = torch.randn(3, 5, 40)
    monkeypatch.setattr(ops, "_check_args", _refuse)
    monkeypatch.setattr(ops, "check_activation", _refuse)
    before = ops.calls[("cpu", fmt)]
    with torch.no_grad():
        torch.testing.assert_close(layer(x), lin(x), rtol=1e-5, atol=1e-5)
        layer(x[0])  # 2-D input: the no-reshape branch
    assert ops.calls[("cpu", fmt)] == before + 2  # the fast path reached the (cpu, fmt) kernel
    with pytest.raises(AssertionError, match="argument checks ran"):
        engine.sparse_linear(x, layer.sparse_weight)  # direct callers keep the full checks


@pytest.mark.parametrize("x, exc, match", [
    (torch.randn(2, 41), ValueError, "41 features"),
    (torch.randn(40), None, None),  # 1-D input: fine
    (torch.arange(40), TypeError, "floating point"),
    (torch.tensor(1.0), ValueError, "at least 1 dimension"),
    (torch.randn(2, 40, device="meta"), ValueError, "x is on meta"),
])
def test_forward_still_refuses_bad_inputs_clearly(x, exc, match):
    """x comes from outside: a wrong width, dtype or device gets the full message, never a kernel
    reading past a buffer."""
    lin, layer = _layer()
    if exc is None:
        torch.testing.assert_close(layer(x), lin(x), rtol=1e-5, atol=1e-5)
        return
    with pytest.raises(exc, match=match):
        layer(x)


def test_activation_and_backend_are_checked_when_set():
    _, layer = _layer()
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        layer.activation = "swish"
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        layer.backend = "gpu"
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        SparseLinear(CSR.from_dense(torch.randn(4, 4)), activation="swish")
    layer.activation = "gelu_tanh"
    layer.backend = "torch"
    x = torch.randn(2, 40)
    ref = engine.sparse_linear(x, layer.sparse_weight, layer.bias, activation="gelu_tanh", backend="torch")
    torch.testing.assert_close(layer(x), ref)


def test_replaced_buffers_are_seen_by_the_next_forward():
    """The cached layout object follows .to() and load_state_dict(assign=True)."""
    lin, layer = _layer()
    x = torch.randn(3, 40)
    y = layer(x)
    half = copy.deepcopy(layer).to(torch.bfloat16)
    assert half.sparse_weight.values.dtype == torch.bfloat16
    other = copy.deepcopy(layer)
    with torch.no_grad():
        other.weight_values.copy_(torch.randn_like(other.weight_values))
    layer.load_state_dict(other.state_dict(), assign=True)
    assert layer.sparse_weight.values.data_ptr() == other.weight_values.data_ptr()
    torch.testing.assert_close(layer(x), other(x))
    assert not torch.allclose(layer(x), y)
