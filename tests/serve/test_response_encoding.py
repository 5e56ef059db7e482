"""The infer answer's JSON, encoded a chunk at a time (engine.serve.protocol.encode_infer_response),
is the document the protocol defines, value for value; and the size predicted from the shapes, which
--max-response-mb and --max-buffered-mb rely on, is never below the real size."""
from __future__ import annotations

import json

import numpy as np
import pytest

from engine.serve import protocol
from engine.serve.protocol import InferRequest, encode_infer_response, predicted_response_bytes

SPEC = {"name": "m\u00e9", "family": "mlp", "inputs": [], "outputs": [{"name": "a"}, {"name": "b"}]}


def _outputs(rng, shapes):
    return {name: rng.normal(size=shape).astype(np.float32) * np.float32(10.0) ** rng.integers(-38, 38, size=shape)
            for name, shape in shapes.items()}


@pytest.mark.parametrize("request_id", [None, 'r-"7"'])
def test_chunked_encoding_is_the_protocol_document(request_id, monkeypatch):
    monkeypatch.setattr(protocol, "ENCODE_CHUNK", 7)  # many chunks, one ragged at the end
    rng = np.random.default_rng(0)
    outputs = _outputs(rng, {"a": (3, 11), "b": (2, 5, 3)})
    outputs["a"][0, 0], outputs["a"][0, 1] = -0.0, np.float32(-3.4028235e38)
    request = InferRequest(inputs={}, outputs=["a", "b"], rows=3, id=request_id)
    doc = json.loads(encode_infer_response(SPEC, request, outputs)[0])
    want = {"model_name": SPEC["name"], "model_version": "1", "outputs": [
        {"name": n, "datatype": "FP32", "shape": list(outputs[n].shape), "data": outputs[n].reshape(-1).tolist()}
        for n in ("a", "b")]}
    if request_id is not None:
        want["id"] = request_id
    assert doc == want  # floats round-trip exactly: the same values as tolist()


def test_empty_and_single_outputs():
    request = InferRequest(inputs={}, outputs=["a"], rows=0)
    doc = json.loads(encode_infer_response(SPEC, request, {"a": np.zeros((0, 4), np.float32)})[0])
    assert doc["outputs"] == [{"name": "a", "datatype": "FP32", "shape": [0, 4], "data": []}]


def test_non_finite_values_are_never_encoded():
    request = InferRequest(inputs={}, outputs=["a"], rows=1)
    with pytest.raises(ValueError):
        encode_infer_response(SPEC, request, {"a": np.array([[1.0, np.nan]], np.float32)})


def test_predicted_size_bounds_the_real_one():
    rng = np.random.default_rng(1)
    shapes = {"a": [4, 9], "b": [4, 2, 3]}
    worst = {n: np.full(s, -1.2345679e-38, np.float32) for n, s in shapes.items()}  # the longest reprs
    for outputs in (worst, _outputs(rng, shapes)):
        request = InferRequest(inputs={}, outputs=["a", "b"], rows=4, id="x" * 40)
        real = len(encode_infer_response(SPEC, request, outputs)[0])
        assert real <= predicted_response_bytes(shapes) + len(request.id)
        for binary in ({"a"}, {"a", "b"}):  # raw FP32 outputs: 4 bytes a value, JSON header included
            request.binary_outputs = frozenset(binary)
            real = len(encode_infer_response(SPEC, request, outputs)[0])
            assert real <= predicted_response_bytes(shapes, request.binary_outputs) + len(request.id)
    assert predicted_response_bytes({"a": None}) is None
