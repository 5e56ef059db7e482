"""engine.sparse_linear: argument checks, backend selection, the torch path against the oracle.
The C++ and Triton kernels have their own test files (test_cpu_kernels.py, test_triton_kernels.py)."""
import warnings

import pytest
import torch

import engine
from engine import ops
from engine.formats import BSR, CSR
from engine.reference import sparse_linear_ref
from tests.fixtures import random_sparse


def _weights(o=24, i=40, sparsity=0.7):
    w = random_sparse(o, i, sparsity, block=(4, 8))
    return w, [w, CSR.from_dense(w), BSR.from_dense(w, blocksize=(4, 8))]


@pytest.mark.parametrize("lead", [(), (3,), (2, 5), (0,), (2, 0, 3)])
@pytest.mark.parametrize("activation", [None, "relu", "gelu", "gelu_tanh"])
def test_torch_backend_matches_dense_reference(lead, activation):
    w, layouts = _weights()
    x = torch.randn(*lead, 40)
    b = torch.randn(24)
    expected = sparse_linear_ref(x.double(), w.double(), b.double(), activation)
    for weight in layouts:
        y = engine.sparse_linear(x, weight, b, activation=activation, backend="torch")
        assert y.shape == (*lead, 24) and y.dtype == x.dtype
        torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)


def test_oracles_agree_without_forming_dense():
    w, (_, csr, bsr) = _weights(16, 32, 0.8)
    x = torch.randn(5, 32, dtype=torch.float64)
    ref = x @ w.double().T
    torch.testing.assert_close(sparse_linear_ref(x, csr), ref)
    torch.testing.assert_close(sparse_linear_ref(x, bsr), ref)


def test_calls_are_counted_per_backend_and_format():
    _, (_, csr, bsr) = _weights()
    before = ops.calls.copy()
    engine.sparse_linear(torch.randn(2, 40), csr, backend="torch")
    engine.sparse_linear(torch.randn(2, 40), bsr, backend="torch")
    assert ops.calls[("torch", "csr")] == before[("torch", "csr")] + 1
    assert ops.calls[("torch", "bsr")] == before[("torch", "bsr")] + 1


@pytest.mark.parametrize("call, exc, match", [
    (lambda w: engine.sparse_linear(torch.randn(2, 41), w), ValueError, "41 features"),
    (lambda w: engine.sparse_linear(torch.randn(2, 40), w, torch.randn(23)), ValueError, "bias must have shape"),
    (lambda w: engine.sparse_linear(torch.randn(2, 40), w, backend="gpu"), ValueError, "unknown backend 'gpu'"),
    (lambda w: engine.sparse_linear(torch.randn(2, 40), w, activation="swish"), ValueError, "unknown activation 'swish'"),
    (lambda w: engine.sparse_linear(torch.arange(40), w), TypeError, "floating point"),
    (lambda w: engine.sparse_linear([1.0] * 40, w), TypeError, "x must be a torch.Tensor"),
    (lambda w: engine.sparse_linear(torch.randn(2, 40), w.values), ValueError, "must be 2-D"),
    (lambda w: engine.sparse_linear(torch.randn(2, 40), "csr"), TypeError, "weight must be"),
    (lambda w: engine.sparse_linear(torch.randn(2, 40, device="meta"), w), ValueError, "x is on meta"),
])
def test_bad_arguments_raise_clear_errors(call, exc, match):
    _, (_, csr, _) = _weights()
    with pytest.raises(exc, match=match):
        call(csr)


def test_forced_cpu_backend_raises_without_extension(monkeypatch):
    from engine import cpu
    monkeypatch.setattr(cpu, "_C", None)
    monkeypatch.setattr(cpu, "_IMPORT_ERROR", "built without a compiler")
    _, (_, csr, _) = _weights()
    with pytest.raises(ops.BackendUnavailable, match="built without a compiler"):
        engine.sparse_linear(torch.randn(2, 40), csr, backend="cpu")


def test_auto_falls_back_to_torch_with_one_warning(monkeypatch):
    from engine import cpu
    monkeypatch.setattr(cpu, "_C", None)
    monkeypatch.setattr(cpu, "_IMPORT_ERROR", "missing")
    monkeypatch.setattr(ops, "_warned", set())
    w, (_, csr, _) = _weights()
    x = torch.randn(3, 40)
    before = ops.calls[("torch", "csr")]
    with pytest.warns(RuntimeWarning, match="falling back to plain torch"):
        y = engine.sparse_linear(x, csr)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine.sparse_linear(x, csr)  # the warning is given once, not per call
    assert ops.calls[("torch", "csr")] == before + 2
    torch.testing.assert_close(y, x @ w.T)


def test_auto_on_cpu_uses_the_cpp_kernels_when_built():
    from engine import cpu
    if not cpu.available():
        pytest.fail(f"the C++ extension must be built for the test suite: {cpu.import_error()}")
    _, (_, csr, bsr) = _weights()
    before = ops.calls.copy()
    engine.sparse_linear(torch.randn(2, 40), csr)
    engine.sparse_linear(torch.randn(2, 40), bsr)
    assert ops.calls[("cpu", "csr")] == before[("cpu", "csr")] + 1
    assert ops.calls[("cpu", "bsr")] == before[("cpu", "bsr")] + 1


@pytest.mark.parametrize("backend", ["cpu", "torch"])
def test_zero_input_features_gives_bias(backend):
    w = CSR.from_dense(torch.zeros(5, 0))
    b = torch.randn(5)
    y = engine.sparse_linear(torch.randn(3, 0), w, b, backend=backend)
    torch.testing.assert_close(y, b.expand(3, 5))
