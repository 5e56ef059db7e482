"""A model family added from outside the engine: defined and registered in this file only, then
converted, loaded with engine.load, run by the `run` verb and served end to end by a real
`sparse-engine serve` process that imports this module first (as a plugin would be imported).

The family is deliberately unlike the built-ins: two inputs (features and a per-row gain), two
named outputs returned as a dict, its own checkpoint recognition and its own request check.
"""
from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
from torch import nn

import engine
from engine.cli import main as cli
from engine.convert import convert
from engine.models import ArchError, Family, InputError, get_family, register_family
from engine.modules import SparseLinear
from engine.serve.protocol import InferRequest, RequestError
from engine.serve.runner import ModelRunner
from tests.serve.test_server import PYTHONPATH, ROOT, Server, fp32, output

FEATURES, HIDDEN, OUT = 29, 53, 7  # odd widths
KEYS = {"enc.weight", "enc.bias", "head.weight", "head.bias"}

pytestmark = pytest.mark.timeout(300)


class GatedNet(nn.Module):
    """scores = head(relu(enc(features))) * gain; norm = |scores| per row."""

    def __init__(self, features: int, hidden: int, out: int):
        super().__init__()
        self.enc, self.head = nn.Linear(features, hidden), nn.Linear(hidden, out)

    def forward(self, features, gain):
        scores = self.head(torch.relu(self.enc(features))) * gain
        return {"scores": scores, "norm": scores.norm(dim=1, keepdim=True)}


class GatedFamily(Family):
    name = "test-gated"
    arch_help = "test-gated"

    def recognise(self, ck):
        return {} if set(ck.tensors) == KEYS else None

    def from_checkpoint(self, ck, option):
        w_enc, w_head = ck.tensors["enc.weight"], ck.tensors["head.weight"]
        config = {"features": w_enc.shape[1], "hidden": w_enc.shape[0], "out": w_head.shape[0]}
        return config, dict(ck.tensors), dict(ck.masks)

    def build(self, config):
        return GatedNet(config["features"], config["hidden"], config["out"])

    def example_inputs(self, config, batch, generator, seq=16):
        return (torch.randn(batch, config["features"], generator=generator),
                torch.rand(batch, 1, generator=generator) + 0.5)

    def spec(self, config, name, model):
        return {"family": self.name, "name": name,
                "inputs": [{"name": "features", "datatype": "FP32", "shape": [-1, config["features"]]},
                           {"name": "gain", "datatype": "FP32", "shape": [-1, 1]}],
                "outputs": [{"name": "scores", "datatype": "FP32", "shape": [-1, config["out"]]},
                            {"name": "norm", "datatype": "FP32", "shape": [-1, 1]}],
                "gain_range": "(0, inf)"}

    def request(self, model, spec, inputs, outputs):
        if "gain" in inputs and (inputs["gain"] <= 0).any():
            raise InputError("input 'gain' must be positive")
        return super().request(model, spec, inputs, outputs)


GATED = register_family(GatedFamily())
# What a server process runs before the CLI: importing this module registers the family.
LAUNCHER = "import tests.serve.test_family_plugin"


@pytest.fixture(scope="module")
def gated(tmp_path_factory):
    """(artifact path, the dense torch model it was converted from)."""
    tmp = tmp_path_factory.mktemp("gated")
    torch.manual_seed(11)
    net = GatedNet(FEATURES, HIDDEN, OUT).eval()
    with torch.no_grad():
        net.enc.weight.mul_(torch.rand_like(net.enc.weight) > 0.8)
        net.head.weight.mul_(torch.rand_like(net.head.weight) > 0.5)
    torch.save(net.state_dict(), tmp / "gated.pt")
    # No --arch: the family recognises its own checkpoint.
    meta = convert(tmp / "gated.pt", tmp / "gated.spz", format="csr", log=lambda *_: None)
    assert meta["arch"]["family"] == "test-gated"
    return tmp / "gated.spz", net


def _inputs(rows: int, seed: int):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(rows, FEATURES)).astype(np.float32),
            (rng.random((rows, 1)) + 0.5).astype(np.float32))


def _local(model, x, g) -> dict:
    with torch.inference_mode():
        return {k: v.numpy() for k, v in model(torch.from_numpy(x), torch.from_numpy(g)).items()}


def test_registry_lookup_and_refusals():
    assert get_family("test-gated") is GATED
    with pytest.raises(ArchError, match="'test-gated' is already registered"):
        register_family(GatedFamily())
    with pytest.raises(ArchError, match=r"unknown architecture family 'nope'.*'test-gated'"):
        get_family("nope")
    with pytest.raises(TypeError, match="Family instance"):
        register_family(object())


def test_converted_and_loaded_like_a_builtin(gated, tmp_path):
    path, net = gated
    model = engine.load(path)
    assert isinstance(model.enc, SparseLinear) and model.enc.format == "csr"
    x, g = _inputs(6, 0)
    want = _local(net, x, g)
    got = _local(model, x, g)
    for name in ("scores", "norm"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)
    # `run` maps inputs onto the model through the same family methods as the server.
    np.savez(tmp_path / "x.npz", features=x, gain=g)
    assert cli(["run", str(path), "--input", str(tmp_path / "x.npz"), "-o", str(tmp_path / "y.npy")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), got["scores"], rtol=1e-6, atol=1e-6)


def test_runner_maps_requests_through_the_family(gated):
    path, _ = gated
    runner = ModelRunner(engine.load(path), "g")
    x, g = _inputs(3, 1)
    request = InferRequest(inputs={"features": x, "gain": g}, outputs=None, rows=3)
    runner.prepare(request)
    assert request.outputs == ["scores", "norm"]  # the family's default: every output
    assert runner.output_shapes(request) == {"scores": [3, OUT], "norm": [3, 1]}
    [result] = runner.run_batch([request])
    want = _local(runner.model, x, g)
    for name in ("scores", "norm"):
        np.testing.assert_array_equal(result[name], want[name])
    with pytest.raises(RequestError, match="'gain' must be positive") as err:
        runner.prepare(InferRequest(inputs={"features": x, "gain": -g}, outputs=None, rows=3))
    assert err.value.status == 400


def test_served_end_to_end_by_a_server_that_imported_the_plugin(gated):
    path, _ = gated
    local = engine.load(path)
    srv = Server([str(path), "--name", "gated", "--max-delay-ms", "20"], launcher=LAUNCHER)
    try:
        client = httpx.Client(base_url=srv.url, timeout=60)
        meta = client.get("/v2/models/gated").json()
        assert meta["platform"] == "sparse-engine/test-gated"
        assert [i["name"] for i in meta["inputs"]] == ["features", "gain"]
        assert [o["name"] for o in meta["outputs"]] == ["scores", "norm"]
        assert meta["parameters"] == {"gain_range": "(0, inf)"}

        # Concurrent requests of 1..4 rows: merged into batches and split back per request.
        cases = [_inputs(int(n), seed) for seed, n in enumerate(np.random.default_rng(5).integers(1, 5, 16))]

        def call(case):
            x, g = case
            with httpx.Client(base_url=srv.url, timeout=60) as c:
                return c.post("/v2/models/gated/infer", json={"inputs": [fp32("features", x), fp32("gain", g)]})

        with ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(call, cases))
        for (x, g), r in zip(cases, responses):
            assert r.status_code == 200, r.text
            want = _local(local, x, g)
            for name in ("scores", "norm"):
                np.testing.assert_allclose(output(r.json(), name), want[name], rtol=1e-5, atol=1e-6)

        x, g = _inputs(2, 99)
        r = client.post("/v2/models/gated/infer", json={"inputs": [fp32("features", x), fp32("gain", g)],
                                                        "outputs": [{"name": "norm"}]})
        assert [o["name"] for o in r.json()["outputs"]] == ["norm"]
        r = client.post("/v2/models/gated/infer", json={"inputs": [fp32("features", x), fp32("gain", -g)]})
        assert r.status_code == 400 and "input 'gain' must be positive" in r.json()["error"]
        r = client.post("/v2/models/gated/infer", json={"inputs": [fp32("features", x)]})
        assert r.status_code == 400 and "missing input 'gain'" in r.json()["error"]
        client.close()
    finally:
        assert srv.stop() == 0, srv.log()


def test_server_without_the_plugin_refuses_the_artifact_clearly(gated):
    path, _ = gated
    r = subprocess.run([sys.executable, "-m", "engine", "serve", str(path), "--port", "0"], cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=PYTHONPATH), capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "unknown architecture family 'test-gated'" in r.stderr
