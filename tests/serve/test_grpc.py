"""The v2 gRPC API beside REST (`serve --grpc-port`), against a real server process: tritonclient's
gRPC client with its defaults (raw contents) gets the engine's numbers for the MLP and BERT (ids
and text), typed contents work too, errors are status codes carrying the REST message, the bearer
token guards every RPC but the probes, and the RPCs are counted in /metrics."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import grpc
import httpx
import numpy as np
import pytest
import torch

import engine
from engine.serve.grpc_service import M, SERVICE
from tests.models.test_bert import hf_bert  # noqa: F401  (fixture)
from tests.serve.test_server import MLP_SIZES, PYTHONPATH, ROOT, Server, mlp_and_bert_artifacts

pytestmark = pytest.mark.timeout(300)
TOKEN = "s3cret-grpc"


def grpc_port(srv: Server) -> int:
    m = re.search(r"serving gRPC \(v2 GRPCInferenceService\) on 127\.0\.0\.1:(\d+)", "".join(srv.lines))
    assert m, srv.log()
    return int(m.group(1))


@pytest.fixture(scope="module")
def artifacts(hf_bert, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("grpc")
    mlp_and_bert_artifacts(tmp, hf_bert[0], seed=9)
    (tmp / "token").write_text(TOKEN)
    return tmp


@pytest.fixture(scope="module")
def served(artifacts):
    srv = Server([str(artifacts / "mlp.spz"), str(artifacts / "bert.spz"), "--name", "mlp", "--name", "bert",
                  "--grpc-port", "0"])
    yield srv, grpc_port(srv)
    assert srv.stop() == 0, srv.log()


def rpc(port: int, name: str, request, metadata=()):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(f"/{SERVICE}/{name}", request_serializer=type(request).SerializeToString,
                                   response_deserializer=M[f"{name}Response"].FromString)
        return call(request, metadata=metadata, timeout=60)


def test_tritonclient_grpc_with_its_defaults(served, artifacts):
    tc = pytest.importorskip("tritonclient.grpc", reason="tritonclient[grpc] (test extra) missing")
    srv, port = served
    mlp, bert = engine.load(artifacts / "mlp.spz"), engine.load(artifacts / "bert.spz")
    client = tc.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("bert")
        meta = client.get_model_metadata("mlp", as_json=True)
        assert meta["versions"] == ["1"] and meta["inputs"][0]["shape"] == ["-1", str(MLP_SIZES[0])]
        x = np.random.default_rng(2).normal(size=(5, MLP_SIZES[0])).astype(np.float32)
        given = tc.InferInput("input", list(x.shape), "FP32")
        given.set_data_from_numpy(x)
        result = client.infer("mlp", [given], request_id="r7")
        assert result.get_response().id == "r7"
        with torch.inference_mode():
            np.testing.assert_allclose(result.as_numpy("output"), mlp(torch.from_numpy(x)).numpy(),
                                       rtol=1e-5, atol=1e-5)
        text = tc.InferInput("text", [2], "BYTES")
        text.set_data_from_numpy(np.array([b"a dog runs", b"the cat"], dtype=np.object_))
        result = client.infer("bert", [text], outputs=[tc.InferRequestedOutput("embedding")])
        np.testing.assert_allclose(result.as_numpy("embedding"), bert.encode(["a dog runs", "the cat"]).numpy(),
                                   rtol=1e-5, atol=1e-5)
        ids = tc.InferInput("input_ids", [1, 4], "INT32")  # INT32 ids are accepted for the INT64 input
        ids.set_data_from_numpy(np.array([[2, 5, 6, 3]], np.int32))
        with torch.inference_mode():
            want = bert(torch.tensor([[2, 5, 6, 3]])).numpy()
        np.testing.assert_allclose(client.infer("bert", [ids]).as_numpy("last_hidden_state"), want,
                                   rtol=1e-5, atol=1e-5)
    finally:
        client.close()


def test_typed_contents_and_errors(served, artifacts):
    _, port = served
    mlp = engine.load(artifacts / "mlp.spz")
    x = np.random.default_rng(3).normal(size=(2, MLP_SIZES[0])).astype(np.float32)
    request = M["ModelInferRequest"](model_name="mlp", inputs=[M["InferInputTensor"](
        name="input", datatype="FP32", shape=list(x.shape), contents=M["InferTensorContents"](fp32_contents=x.ravel()))])
    answer = rpc(port, "ModelInfer", request)
    got = np.frombuffer(answer.raw_output_contents[0], "<f4").reshape(list(answer.outputs[0].shape))
    with torch.inference_mode():
        np.testing.assert_allclose(got, mlp(torch.from_numpy(x)).numpy(), rtol=1e-5, atol=1e-5)

    def refused(request, code, *words):
        with pytest.raises(grpc.RpcError) as err:
            rpc(port, "ModelInfer", request)
        assert err.value.code() == code and all(w in err.value.details() for w in words), err.value.details()

    bad = M["ModelInferRequest"](); bad.CopyFrom(request)
    bad.inputs[0].shape[:] = [2, MLP_SIZES[0] + 1]
    refused(bad, grpc.StatusCode.INVALID_ARGUMENT, "'input'", "does not match")
    bad.CopyFrom(request)
    bad.raw_input_contents.append(x.tobytes()[:-4])
    bad.inputs[0].ClearField("contents")
    refused(bad, grpc.StatusCode.INVALID_ARGUMENT, "'input'", "does not match shape")
    bad.raw_input_contents.append(b"")
    refused(bad, grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents has 2 entries for 1 inputs")
    bad.CopyFrom(request)
    bad.model_name = "nope"
    refused(bad, grpc.StatusCode.NOT_FOUND, "unknown model 'nope'")
    bad.CopyFrom(request)
    bad.model_version = "2"
    refused(bad, grpc.StatusCode.NOT_FOUND, "no version '2'")
    bad.CopyFrom(request)
    bad.inputs[0].contents.fp32_contents[0] = float("nan")
    refused(bad, grpc.StatusCode.INVALID_ARGUMENT, "NaN or infinite")


def test_metrics_count_rpcs_by_status(served):
    srv, port = served
    rpc(port, "ServerLive", M["ServerLiveRequest"]())
    with pytest.raises(grpc.RpcError):
        rpc(port, "ModelMetadata", M["ModelMetadataRequest"](name="mlp", version="3"))
    text = httpx.get(f"{srv.url}/metrics").text
    line = r'sparse_engine_requests_total\{{endpoint="grpc:{}",model="{}",status="{}"\}} [1-9]'
    assert re.search(line.format("ServerLive", "", "OK"), text), text
    assert re.search(line.format("ModelMetadata", "mlp", "NOT_FOUND"), text), text


def test_token_guards_every_rpc_but_the_probes(artifacts):
    srv = Server([str(artifacts / "mlp.spz"), "--name", "mlp", "--grpc-port", "0",
                  "--token-file", str(artifacts / "token")])
    try:
        port = grpc_port(srv)
        assert rpc(port, "ServerLive", M["ServerLiveRequest"]()).live
        assert rpc(port, "ServerReady", M["ServerReadyRequest"]()).ready
        with pytest.raises(grpc.RpcError) as err:
            rpc(port, "ModelMetadata", M["ModelMetadataRequest"](name="mlp"))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "bearer token" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:
            rpc(port, "ModelMetadata", M["ModelMetadataRequest"](name="mlp"), [("authorization", "Bearer wrong")])
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        meta = rpc(port, "ModelMetadata", M["ModelMetadataRequest"](name="mlp"), [("authorization", f"Bearer {TOKEN}")])
        assert meta.name == "mlp" and list(meta.inputs[0].shape) == [-1, MLP_SIZES[0]]
    finally:
        assert srv.stop() == 0, srv.log()


def test_a_grpc_port_in_use_stops_the_server_with_a_message(artifacts):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        r = subprocess.run([sys.executable, "-m", "engine", "serve", str(artifacts / "mlp.spz"), "--port", "0",
                            "--grpc-port", str(busy.getsockname()[1])], cwd=ROOT, capture_output=True, text=True,
                           timeout=120, env={**os.environ, "PYTHONPATH": PYTHONPATH})
    finally:
        busy.close()
    assert r.returncode == 1 and "cannot serve gRPC on 127.0.0.1" in r.stderr, r.stderr
