"""Run by tests/serve/test_kserve_clients.py in a child interpreter: the `kserve` SDK's REST and gRPC
clients, with their defaults, against a running server (argv: base URL, gRPC port, output .npz).
A child because kserve's generated protobufs and tritonclient's register the same `inference.*`
names in protobuf's default pool, so one process can import only one of the two gRPC clients.
Saves every answer, and the inputs it sent, in the .npz."""
from __future__ import annotations

import asyncio
import sys

import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.infer_type import RequestedOutput

TEXTS = ["A sparse model still has to answer correctly.", "the cat sat on the mat"]


def tensor(name: str, array: np.ndarray, datatype: str, binary: bool = True) -> InferInput:
    given = InferInput(name, list(array.shape), datatype)
    given.set_data_from_numpy(array, binary_data=binary)
    return given


def requests(features: int) -> tuple[dict, dict]:
    """(inputs sent, {answer key: InferRequest})."""
    x = np.random.default_rng(1).normal(size=(3, features)).astype(np.float32)
    ids = np.array([[101, 1037, 2512, 2944, 102, 0], [101, 1996, 4937, 2938, 2006, 102]], np.int64)
    mask = (ids != 0).astype(np.int64)
    text = np.array([t.encode() for t in TEXTS], dtype=np.object_)
    sent = {"x": x, "ids": ids, "mask": mask, "texts": np.array(TEXTS)}
    made = {"mlp": lambda binary=True: InferRequest("mlp", [tensor("input", x, "FP32", binary)]),
            "fp16": lambda: InferRequest("mlp", [tensor("input", x.astype(np.float16), "FP16")]),
            "text": lambda: InferRequest("minilm", [tensor("text", text, "BYTES")],
                                         request_outputs=[RequestedOutput("embedding")]),
            "ids": lambda: InferRequest("minilm", [tensor("input_ids", ids, "INT64"),
                                                   tensor("attention_mask", mask, "INT64")])}
    return sent, made


async def main(url: str, port: int, out: str, features: int) -> None:
    sent, made = requests(features)
    answers = {}
    rest = InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=120))
    try:
        assert await rest.is_server_live(url) and await rest.is_server_ready(url)
        assert await rest.is_model_ready(url, "minilm")
        for key in ("mlp", "fp16", "text", "ids"):
            request = made[key]()
            answers[f"rest_{key}"] = await rest.infer(url, request, request.model_name)
        answers["rest_json_mlp"] = await rest.infer(url, made["mlp"](binary=False), "mlp")
    finally:
        await rest.close()
    grpc = InferenceGRPCClient(f"127.0.0.1:{port}", retries=0, timeout=120)
    try:
        assert await grpc.is_server_ready() and await grpc.is_model_ready("mlp")
        for key in ("mlp", "text", "ids"):
            answers[f"grpc_{key}"] = await grpc.infer(made[key]())
    finally:
        await grpc.close()
    arrays = {f"sent_{k}": v for k, v in sent.items()}
    for key, response in answers.items():
        for output in response.outputs:
            arrays[f"{key}:{output.name}"] = output.as_numpy()
    np.savez(out, **arrays)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])))
