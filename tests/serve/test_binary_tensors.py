"""The v2 binary tensor data extension, both directions: bodies framed by
Inference-Header-Content-Length parse to the same arrays as their JSON twins, every framing error
is a 400 naming the input, binary outputs round-trip; fuzzed binary bodies and gRPC requests get a
4xx or a valid request, never anything else; and tritonclient with its default settings (binary
data on) gets the engine's numbers from a real server, MLP and BERT (ids and text)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import engine
from engine.serve.protocol import InferRequest, RequestError, encode_infer_response, parse_infer
from tests.models.test_bert import hf_bert  # noqa: F401  (fixture)
from tests.serve.test_server import MLP_SIZES, Server, mlp_and_bert_artifacts

pytestmark = pytest.mark.timeout(300)
SPEC = {"name": "m", "family": "test",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 3]},
                   {"name": "ids", "datatype": "INT64", "shape": [-1, 2]},
                   {"name": "text", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": "a", "datatype": "FP32", "shape": [-1, 3]},
                    {"name": "b", "datatype": "FP32", "shape": [-1]}]}


def _texts(*texts: str) -> bytes:
    return b"".join(len(t.encode()).to_bytes(4, "little") + t.encode() for t in texts)


def binary_body(inputs: list[tuple[str, str, list, bytes]], **doc) -> tuple[bytes, int]:
    """(name, datatype, shape, raw bytes) per input -> (body, Inference-Header-Content-Length)."""
    doc["inputs"] = [{"name": n, "datatype": d, "shape": s, "parameters": {"binary_data_size": len(raw)}}
                     for n, d, s, raw in inputs]
    header = json.dumps(doc).encode()
    return header + b"".join(raw for *_, raw in inputs), len(header)


X = np.array([[1.5, -2.0, 3.25], [0.0, 4.0, -1.0]], np.float32)
IDS = np.array([[7, 8], [9, 2**40]], np.int64)


def test_binary_inputs_parse_like_their_json_twins():
    body, n = binary_body([("x", "FP32", [2, 3], X.tobytes()), ("ids", "INT64", [2, 2], IDS.tobytes()),
                           ("text", "BYTES", [2], _texts("a dog", "naïve café"))], id="r1")
    got = parse_infer(body, SPEC, max_rows=8, header_length=n)
    assert got.id == "r1" and got.rows == 2 and not got.binary_outputs
    np.testing.assert_array_equal(got.inputs["x"], X)
    np.testing.assert_array_equal(got.inputs["ids"], IDS)
    assert got.inputs["text"] == ["a dog", "naïve café"]
    twin = parse_infer(json.dumps({"inputs": [
        {"name": "x", "datatype": "FP32", "shape": [2, 3], "data": X.ravel().tolist()},
        {"name": "ids", "datatype": "INT64", "shape": [2, 2], "data": IDS.ravel().tolist()}]}).encode(),
        SPEC, max_rows=8)
    np.testing.assert_array_equal(twin.inputs["x"], got.inputs["x"])
    np.testing.assert_array_equal(twin.inputs["ids"], got.inputs["ids"])


def test_binary_inputs_in_the_other_accepted_datatypes():
    body, n = binary_body([("x", "FP16", [2, 3], X.astype(np.float16).tobytes()),
                           ("ids", "INT32", [2, 2], IDS.clip(0, 2**31 - 1).astype(np.int32).tobytes())])
    got = parse_infer(body, SPEC, max_rows=8, header_length=n)
    assert got.inputs["x"].dtype == np.float32 and got.inputs["ids"].dtype == np.int64
    np.testing.assert_array_equal(got.inputs["x"], X.astype(np.float16).astype(np.float32))


BAD = [  # (body and header length, words the 400 must contain)
    (lambda: binary_body([("x", "FP32", [2, 3], X.tobytes()[:-4])]), ["'x'", "does not match shape"]),
    (lambda: (lambda b, n: (b + b"\0" * 4, n))(*binary_body([("x", "FP32", [2, 3], X.tobytes())])),
     ["binary data", "add up to 24"]),
    (lambda: (lambda b, n: (b[:-8], n))(*binary_body([("x", "FP32", [2, 3], X.tobytes())])), ["'x'", "runs past"]),
    (lambda: (lambda b, n: (b, len(b) + 1))(*binary_body([("x", "FP32", [2, 3], X.tobytes())])),
     ["Inference-Header-Content-Length", "longer than the body"]),
    (lambda: binary_body([("text", "BYTES", [2], _texts("one"))]), ["'text'", "element 1"]),
    (lambda: binary_body([("text", "BYTES", [1], _texts("one", "two"))]), ["'text'", "more than"]),
    (lambda: binary_body([("text", "BYTES", [1], b"\3\0\0\0\xff\xfe\xfd")]), ["'text'", "not UTF-8"]),
    (lambda: binary_body([("x", "FP32", [1, 3], np.array([[1, np.nan, 2]], np.float32).tobytes())]),
     ["'x'", "NaN or infinite"]),
    (lambda: binary_body([("x", "INT64", [1, 3], np.zeros(3, np.int64).tobytes())]), ["'x'", "not accepted"]),
]


@pytest.mark.parametrize("case", range(len(BAD)))
def test_bad_framing_is_a_400_naming_the_problem(case):
    make, words = BAD[case]
    body, n = make()
    with pytest.raises(RequestError) as err:
        parse_infer(body, SPEC, max_rows=8, header_length=n)
    assert err.value.status == 400 and all(w in str(err.value) for w in words), str(err.value)


def test_binary_size_without_a_binary_body_or_with_data_is_refused():
    doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "parameters": {"binary_data_size": 12}}]}
    with pytest.raises(RequestError, match="Inference-Header-Content-Length header is missing"):
        parse_infer(json.dumps(doc).encode(), SPEC, max_rows=8)
    doc["inputs"][0]["data"] = [1, 2, 3]
    header = json.dumps(doc).encode()
    with pytest.raises(RequestError, match="both 'data' and parameters.binary_data_size"):
        parse_infer(header + X[:1].tobytes(), SPEC, max_rows=8, header_length=len(header))


def test_binary_outputs_round_trip_and_mix_with_json():
    a, b = np.arange(6, dtype=np.float32).reshape(2, 3) / 7, np.array([1e-30, -3.5], np.float32)
    doc = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 3], "data": X.ravel().tolist()}],
           "outputs": [{"name": "a", "parameters": {"binary_data": True}}, {"name": "b"}]}
    request = parse_infer(json.dumps(doc).encode(), SPEC, max_rows=8)
    assert request.binary_outputs == {"a"}
    content, n = encode_infer_response(SPEC, request, {"a": a, "b": b})
    head = json.loads(content[:n])
    (oa, ob) = head["outputs"]
    assert oa["parameters"]["binary_data_size"] == a.nbytes and "data" not in oa
    np.testing.assert_array_equal(np.frombuffer(content[n:], "<f4").reshape(oa["shape"]), a)
    np.testing.assert_array_equal(np.asarray(ob["data"], np.float32), b)
    # binary_data_output: every output; a per-output false wins over it
    doc["parameters"] = {"binary_data_output": True}
    doc["outputs"] = [{"name": "a"}, {"name": "b", "parameters": {"binary_data": False}}]
    assert parse_infer(json.dumps(doc).encode(), SPEC, max_rows=8).binary_outputs == {"a"}
    plain = InferRequest(inputs={}, outputs=["b"], rows=2)
    assert encode_infer_response(SPEC, plain, {"b": b})[1] is None
    doc["parameters"] = {"binary_data_output": "yes"}
    with pytest.raises(RequestError, match="binary_data_output must be true or false"):
        parse_infer(json.dumps(doc).encode(), SPEC, max_rows=8)


@pytest.fixture(scope="module")
def served(hf_bert, tmp_path_factory):  # noqa: F811
    mlp, bert = mlp_and_bert_artifacts(tmp_path_factory.mktemp("binary"), hf_bert[0], seed=3)
    srv = Server([str(mlp), str(bert), "--name", "mlp", "--name", "bert"])
    yield srv, engine.load(mlp), engine.load(bert)
    assert srv.stop() == 0, srv.log()


def test_tritonclient_with_its_defaults_gets_the_engines_numbers(served):
    http = pytest.importorskip("tritonclient.http", reason="tritonclient[http] (test extra) missing")
    srv, mlp_model, bert_model = served
    client = http.InferenceServerClient(url=f"127.0.0.1:{srv.port}")
    try:
        assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
        x = np.random.default_rng(5).normal(size=(4, MLP_SIZES[0])).astype(np.float32)
        given = http.InferInput("input", list(x.shape), "FP32")
        given.set_data_from_numpy(x)  # binary_data=True: the client's default
        result = client.infer("mlp", [given], outputs=[http.InferRequestedOutput("output")])
        with torch.inference_mode():
            np.testing.assert_allclose(result.as_numpy("output"), mlp_model(torch.from_numpy(x)).numpy(),
                                       rtol=1e-5, atol=1e-5)
        texts = np.array([b"a dog runs", "naïve café".encode()], dtype=np.object_)
        text = http.InferInput("text", [2], "BYTES")
        text.set_data_from_numpy(texts)
        result = client.infer("bert", [text], outputs=[http.InferRequestedOutput("embedding")])
        np.testing.assert_allclose(result.as_numpy("embedding"),
                                   bert_model.encode(["a dog runs", "naïve café"]).numpy(), rtol=1e-5, atol=1e-5)
        ids = np.array([[2, 5, 6, 3], [2, 7, 3, 0]], np.int64)
        mask = (ids != 0).astype(np.int64)
        inputs = []
        for name, value in (("input_ids", ids), ("attention_mask", mask)):
            inputs.append(http.InferInput(name, list(value.shape), "INT64"))
            inputs[-1].set_data_from_numpy(value)
        result = client.infer("bert", inputs)  # no outputs named: the family's default, in JSON
        with torch.inference_mode():
            want = bert_model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
        np.testing.assert_allclose(result.as_numpy("last_hidden_state"), want, rtol=1e-5, atol=1e-5)
    finally:
        client.close()

DATATYPES = ("FP32", "FP16", "INT64", "INT32", "BYTES", "FP64", "BOOL", "")
dims = st.lists(st.integers(-2, 4), min_size=0, max_size=3)
tensor = st.fixed_dictionaries({"name": st.sampled_from(["x", "ids", "text", "nope"]),
                                "datatype": st.sampled_from(DATATYPES), "shape": dims,
                                "size": st.integers(-1, 40), "raw": st.booleans()})


def _check_outcome(call):
    try:
        request = call()
    except RequestError as exc:
        assert 400 <= exc.status < 500, exc
        return
    for name, value in request.inputs.items():
        want = {t["name"]: t for t in SPEC["inputs"]}[name]
        if want["datatype"] == "BYTES":
            assert all(isinstance(v, str) for v in value)
        else:
            assert value.dtype == {"FP32": np.float32, "INT64": np.int64}[want["datatype"]]
            assert value.ndim == len(want["shape"]) and np.isfinite(value.astype(np.float64)).all()


@settings(max_examples=300, deadline=None)
@given(tensors=st.lists(tensor, min_size=0, max_size=3), blob=st.binary(max_size=120), cut=st.integers(-5, 400))
def test_fuzzed_binary_bodies_get_a_4xx_or_a_valid_request(tensors, blob, cut):
    doc = {"inputs": [{"name": t["name"], "datatype": t["datatype"], "shape": t["shape"],
                       **({"parameters": {"binary_data_size": t["size"]}} if t["raw"] else {"data": [1] * max(0, t["size"])})}
                      for t in tensors]}
    header = json.dumps(doc).encode()
    body = header + blob
    n = len(header) if cut < 0 else min(cut, len(body) + 3)  # also header lengths that cut the JSON
    _check_outcome(lambda: parse_infer(body, SPEC, max_rows=8, header_length=n))


@settings(max_examples=300, deadline=None)
@given(tensors=st.lists(tensor, min_size=0, max_size=3), blobs=st.lists(st.binary(max_size=60), max_size=4),
       numbers=st.lists(st.floats(allow_nan=True, width=32), max_size=12))
def test_fuzzed_grpc_requests_get_a_4xx_or_a_valid_request(tensors, blobs, numbers):
    from engine.serve.grpc_service import M
    from engine.serve.protocol import request_from_grpc
    msg = M["ModelInferRequest"](model_name="m", raw_input_contents=blobs)
    for t in tensors:
        item = msg.inputs.add(name=t["name"], datatype=t["datatype"], shape=[max(d, 0) for d in t["shape"]])
        item.contents.fp32_contents.extend(numbers)
        item.contents.bytes_contents.extend(b[:8] for b in blobs)
    _check_outcome(lambda: request_from_grpc(msg, SPEC, max_rows=8))
