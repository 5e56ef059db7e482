"""Fuzzing a running server (REST binary bodies and gRPC ModelInfer): hypothesis varies the framing
header, the JSON header's tensors (names, datatypes, shapes, binary sizes), the raw bytes and the
model asked for. Every answer is a 200 or a 4xx (gRPC: OK or a client-error code), never a 5xx or a
dropped connection; afterwards the server still answers a valid request with the engine's numbers on
both protocols, and its RSS has not grown past a bound."""
from __future__ import annotations

import json

import grpc
import httpx
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import engine
from engine.serve.grpc_service import M
from tests.models.test_bert import hf_bert  # noqa: F401  (fixture)
from tests.serve.test_grpc import artifacts, rpc, served  # noqa: F401  (fixtures)
from tests.serve.test_server import MLP_SIZES
from tests.serve.test_server_limits import _rss_mb as rss_mb

pytestmark = pytest.mark.timeout(300)
CLIENT_CODES = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION}
RSS_GROWTH_MB = 64

tensor = st.fixed_dictionaries({
    "name": st.sampled_from(["input", "input_ids", "attention_mask", "text", "nope"]),
    "datatype": st.sampled_from(["FP32", "FP16", "INT64", "INT32", "BYTES", "FP64", "BOOL", ""]),
    "shape": st.lists(st.integers(-2, 40), max_size=3),
    "size": st.integers(-1, 200), "raw": st.booleans()})
# Inference-Header-Content-Length: absent, right ("HEADER"), any number, or not a number at all.
framing = st.one_of(st.none(), st.just("HEADER"), st.integers(-3, 600).map(str),
                    st.sampled_from(["", "abc", "1e3", "+12", "0x10", "1.5", "-0"]))


@pytest.fixture(scope="module")
def fuzzed(served):  # noqa: F811
    srv, port = served
    with httpx.Client(base_url=srv.url, timeout=60) as client:
        client.post("/v2/models/mlp/infer", json={"inputs": [  # every path warm before the first RSS reading
            {"name": "input", "datatype": "FP32", "shape": [1, MLP_SIZES[0]], "data": [0.0] * MLP_SIZES[0]}]})
        yield srv, port, client, rss_mb(srv.proc.pid)


@settings(max_examples=150, deadline=None)
@given(model=st.sampled_from(["mlp", "bert", "nope"]), tensors=st.lists(tensor, max_size=3),
       blob=st.binary(max_size=300), header_length=framing)
def test_fuzzed_binary_bodies_on_a_live_server(fuzzed, model, tensors, blob, header_length):
    srv, _, client, _ = fuzzed
    doc = {"inputs": [{"name": t["name"], "datatype": t["datatype"], "shape": t["shape"],
                       **({"parameters": {"binary_data_size": t["size"]}} if t["raw"] else {"data": [1] * max(0, t["size"])})}
                      for t in tensors]}
    header = json.dumps(doc).encode()
    headers = {"Content-Type": "application/octet-stream"}
    if header_length is not None:
        headers["Inference-Header-Content-Length"] = header_length.replace("HEADER", str(len(header)))
    r = client.post(f"/v2/models/{model}/infer", content=header + blob, headers=headers)
    assert r.status_code == 200 or 400 <= r.status_code < 500, (r.status_code, r.text[:300])
    if r.status_code != 200:
        assert "error" in r.json()
    assert srv.proc.poll() is None


@settings(max_examples=150, deadline=None)
@given(model=st.sampled_from(["mlp", "bert", "nope"]), tensors=st.lists(tensor, max_size=3),
       blobs=st.lists(st.binary(max_size=200), max_size=3),
       numbers=st.lists(st.floats(allow_nan=True, width=32), max_size=50))
def test_fuzzed_grpc_requests_on_a_live_server(fuzzed, model, tensors, blobs, numbers):
    _, port, _, _ = fuzzed
    msg = M["ModelInferRequest"](model_name=model, raw_input_contents=blobs)
    for t in tensors:
        item = msg.inputs.add(name=t["name"], datatype=t["datatype"], shape=[max(d, 0) for d in t["shape"]])
        if not t["raw"]:
            item.contents.fp32_contents.extend(numbers)
            item.contents.int64_contents.extend(int(abs(n)) % 1000 for n in numbers if n == n and abs(n) < 1e9)
    try:
        rpc(port, "ModelInfer", msg)
    except grpc.RpcError as exc:
        assert exc.code() in CLIENT_CODES, (exc.code(), exc.details())


def test_after_the_fuzz_the_server_is_correct_and_bounded(fuzzed, artifacts):  # noqa: F811
    srv, port, client, rss_before = fuzzed
    x = np.random.default_rng(0).normal(size=(3, MLP_SIZES[0])).astype(np.float32)
    with torch.inference_mode():
        want = engine.load(artifacts / "mlp.spz")(torch.from_numpy(x)).numpy()
    r = client.post("/v2/models/mlp/infer", json={"inputs": [
        {"name": "input", "datatype": "FP32", "shape": list(x.shape), "data": x.reshape(-1).tolist()}]})
    assert r.status_code == 200, r.text
    got = np.asarray(r.json()["outputs"][0]["data"], np.float32).reshape(want.shape)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    msg = M["ModelInferRequest"](model_name="mlp", raw_input_contents=[x.tobytes()])
    msg.inputs.add(name="input", datatype="FP32", shape=list(x.shape))
    answer = rpc(port, "ModelInfer", msg)
    np.testing.assert_allclose(np.frombuffer(answer.raw_output_contents[0], np.float32).reshape(want.shape), want,
                               rtol=1e-5, atol=1e-5)
    growth = rss_mb(srv.proc.pid) - rss_before
    assert growth < RSS_GROWTH_MB, f"server RSS grew {growth:.0f} MiB over the fuzz"
