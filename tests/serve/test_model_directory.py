"""Several models from one directory argument (`serve DIR`): every *.spz / *.sparse file in it is a
model named by its file, listed by the repository extension's index; a directory with none stops
the server with a message."""
from __future__ import annotations

import os
import subprocess
import sys

import httpx
import numpy as np
import pytest
import torch

import engine
from tests.models.test_bert import hf_bert  # noqa: F401  (fixture)
from tests.serve.test_server import MLP_SIZES, PYTHONPATH, ROOT, Server, fp32, mlp_and_bert_artifacts, output

pytestmark = pytest.mark.timeout(300)


def test_a_directory_serves_each_artifact_in_it(hf_bert, tmp_path):  # noqa: F811
    mlp, bert = mlp_and_bert_artifacts(tmp_path, hf_bert[0], seed=4)
    repo = tmp_path / "models"
    repo.mkdir()
    mlp.rename(repo / "digits.spz")
    bert.rename(repo / "minilm.sparse")
    (repo / "README.txt").write_text("not a model")
    srv = Server([str(repo)])
    try:
        index = httpx.post(f"{srv.url}/v2/repository/index").json()
        assert index == [{"name": "digits", "version": "1", "state": "READY"},
                         {"name": "minilm", "version": "1", "state": "READY"}]
        x = np.random.default_rng(1).normal(size=(2, MLP_SIZES[0])).astype(np.float32)
        r = httpx.post(f"{srv.url}/v2/models/digits/infer", json={"inputs": [fp32("input", x)]})
        assert r.status_code == 200, r.text
        with torch.inference_mode():
            want = engine.load(repo / "digits.spz")(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(output(r.json(), "output"), want, rtol=1e-5, atol=1e-5)
        assert httpx.get(f"{srv.url}/v2/models/minilm").json()["platform"] == "sparse-engine/bert"
    finally:
        assert srv.stop() == 0, srv.log()


def test_a_directory_without_artifacts_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("no model here")
    r = subprocess.run([sys.executable, "-m", "engine", "serve", str(tmp_path), "--port", "0"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": PYTHONPATH})
    assert r.returncode == 1 and f"directory {tmp_path} holds no artifact" in r.stderr, r.stderr
