"""The engine under every torch grad mode: an artifact loaded, a model sparsified and a layer run
inside torch.inference_mode, torch.no_grad or neither all give the dense model's outputs.
(Inference tensors keep no version counter, which the prepared-weight cache once read.)"""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch import nn

import engine
from engine.convert import convert
from engine.modules import SparseLinear, sparsify

MODES = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad, "plain": contextlib.nullcontext}


def pruned_mlp() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10))
    with torch.no_grad():
        model[0].weight.mul_(torch.rand(48, 64) > 0.8)
    return model.eval()


@pytest.mark.parametrize("fmt", ["csr", "bsr"])
@pytest.mark.parametrize("mode", MODES)
def test_load_and_run_in_each_mode(tmp_path, fmt, mode):
    model = pruned_mlp()
    torch.save(model.state_dict(), tmp_path / "m.pt")
    convert(tmp_path / "m.pt", tmp_path / "m.sparse", format=fmt, arch="mlp:relu", log=lambda *_: None)
    x = torch.randn(5, 64)
    with torch.no_grad():
        want = model(x)
    with MODES[mode]():
        loaded = engine.load(tmp_path / "m.sparse", backend="cpu")
        got = loaded(x)
        again = loaded(x)  # the second call reads the prepared-weight cache
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, got, rtol=0, atol=0)
    if mode != "inference_mode":  # an inference-mode load runs in the other modes too
        return
    for other in ("no_grad", "plain"):
        with MODES[other]():
            torch.testing.assert_close(loaded(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_sparsify_and_from_linear_in_each_mode(mode):
    model = pruned_mlp()
    x = torch.randn(3, 64)
    with torch.no_grad():
        want = model(x)
    with MODES[mode]():
        layer = SparseLinear.from_linear(model[0], "csr", activation="relu")
        layer.backend = "cpu"
        torch.testing.assert_close(layer(x), torch.relu(model[0](x)), rtol=1e-5, atol=1e-5)
        fast = sparsify(model, "csr")
        torch.testing.assert_close(fast(x), want, rtol=1e-5, atol=1e-5)
