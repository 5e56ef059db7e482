"""The v2 gRPC API of `sparse-engine serve --grpc-port`: `inference.GRPCInferenceService` beside the
REST routes, in the same process and event loop, on the same models, batchers, limits, bearer token
and metrics (engine.serve.app.InferenceApp).

RPCs: ServerLive, ServerReady, ModelReady, ServerMetadata, ModelMetadata, ModelInfer. The message
types are the Open Inference Protocol's (KServe v2 `grpc_predict_v2.proto`, which Triton's
`grpc_service.proto` extends), declared below by field number and built as protobuf descriptors at
import: nothing is generated at build time. Fields a v2 server may ignore (`parameters` maps) are
left out; protobuf skips them on the wire. Infer inputs come as typed `contents` or as
`raw_input_contents`; every output goes back in `raw_output_contents` (little-endian FP32).
"""
from __future__ import annotations

import asyncio
import logging
import time

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from .batching import QueueFull
from .limits import BudgetExceeded
from .protocol import RequestError, model_metadata, request_from_grpc
from .runner import InferenceError

log = logging.getLogger("engine.server")
SERVICE = "inference.GRPCInferenceService"
_F = descriptor_pb2.FieldDescriptorProto
SCALARS = {"string": _F.TYPE_STRING, "bool": _F.TYPE_BOOL, "int32": _F.TYPE_INT32, "int64": _F.TYPE_INT64,
           "uint32": _F.TYPE_UINT32, "uint64": _F.TYPE_UINT64, "float": _F.TYPE_FLOAT,
           "double": _F.TYPE_DOUBLE, "bytes": _F.TYPE_BYTES}
# message -> [(field, number, type: a scalar above or a message here, repeated)]
MESSAGES = {
    "ServerLiveRequest": [],
    "ServerLiveResponse": [("live", 1, "bool", False)],
    "ServerReadyRequest": [],
    "ServerReadyResponse": [("ready", 1, "bool", False)],
    "ModelReadyRequest": [("name", 1, "string", False), ("version", 2, "string", False)],
    "ModelReadyResponse": [("ready", 1, "bool", False)],
    "ServerMetadataRequest": [],
    "ServerMetadataResponse": [("name", 1, "string", False), ("version", 2, "string", False),
                               ("extensions", 3, "string", True)],
    "ModelMetadataRequest": [("name", 1, "string", False), ("version", 2, "string", False)],
    "TensorMetadata": [("name", 1, "string", False), ("datatype", 2, "string", False), ("shape", 3, "int64", True)],
    "ModelMetadataResponse": [("name", 1, "string", False), ("versions", 2, "string", True),
                              ("platform", 3, "string", False), ("inputs", 4, "TensorMetadata", True),
                              ("outputs", 5, "TensorMetadata", True)],
    "InferTensorContents": [("bool_contents", 1, "bool", True), ("int_contents", 2, "int32", True),
                            ("int64_contents", 3, "int64", True), ("uint_contents", 4, "uint32", True),
                            ("uint64_contents", 5, "uint64", True), ("fp32_contents", 6, "float", True),
                            ("fp64_contents", 7, "double", True), ("bytes_contents", 8, "bytes", True)],
    "InferInputTensor": [("name", 1, "string", False), ("datatype", 2, "string", False),
                         ("shape", 3, "int64", True), ("contents", 5, "InferTensorContents", False)],
    "InferRequestedOutputTensor": [("name", 1, "string", False)],
    "ModelInferRequest": [("model_name", 1, "string", False), ("model_version", 2, "string", False),
                          ("id", 3, "string", False), ("inputs", 5, "InferInputTensor", True),
                          ("outputs", 6, "InferRequestedOutputTensor", True),
                          ("raw_input_contents", 7, "bytes", True)],
    "InferOutputTensor": [("name", 1, "string", False), ("datatype", 2, "string", False),
                          ("shape", 3, "int64", True), ("contents", 5, "InferTensorContents", False)],
    "ModelInferResponse": [("model_name", 1, "string", False), ("model_version", 2, "string", False),
                           ("id", 3, "string", False), ("outputs", 5, "InferOutputTensor", True),
                           ("raw_output_contents", 6, "bytes", True)],
}
# REST status of a RequestError -> the gRPC code that means the same
CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
         404: grpc.StatusCode.NOT_FOUND, 408: grpc.StatusCode.DEADLINE_EXCEEDED,
         413: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE}


def _message_classes() -> dict:
    proto = descriptor_pb2.FileDescriptorProto(name="sparse_engine/inference_v2.proto", package="inference",
                                               syntax="proto3")
    for name, fields in MESSAGES.items():
        message = proto.message_type.add(name=name)
        for field, number, kind, repeated in fields:
            f = message.field.add(name=field, number=number,
                                  label=_F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL)
            if kind in SCALARS:
                f.type = SCALARS[kind]
            else:
                f.type, f.type_name = _F.TYPE_MESSAGE, f".inference.{kind}"
    pool = descriptor_pool.DescriptorPool()  # a pool of its own: no clash with a client's in-process
    pool.Add(proto)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"inference.{name}"))
            for name in MESSAGES}


M = _message_classes()


class GrpcService:
    """The RPCs over an InferenceApp; `handler()` is what a grpc.aio server adds."""

    OPEN = ("ServerLive", "ServerReady")  # probes need no token, as on REST

    def __init__(self, app):
        self.app = app

    def handler(self) -> grpc.GenericRpcHandler:
        rpcs = {"ServerLive": self.server_live, "ServerReady": self.server_ready, "ModelReady": self.model_ready,
                "ServerMetadata": self.server_metadata, "ModelMetadata": self.model_metadata,
                "ModelInfer": self.model_infer}
        return grpc.method_handlers_generic_handler(SERVICE, {
            name: grpc.unary_unary_rpc_method_handler(
                self._guarded(name, fn), request_deserializer=M[f"{name}Request"].FromString,
                response_serializer=M[f"{name}Response"].SerializeToString)
            for name, fn in rpcs.items()})

    def _guarded(self, rpc: str, fn):
        """Token check, errors as gRPC status codes with the REST message, per-status counting."""
        async def call(request, context):
            code, model = grpc.StatusCode.OK, getattr(request, "model_name", "") or getattr(request, "name", "")
            try:
                token = self.app.settings.token
                if token is not None and rpc not in self.OPEN and not self.app.authorized(
                        dict(context.invocation_metadata()).get("authorization", "")):
                    raise RequestError(401, "missing or wrong bearer token (send metadata "
                                            "'authorization: Bearer <token>')")
                return await fn(request)
            except (RequestError, BudgetExceeded, QueueFull, InferenceError, asyncio.TimeoutError) as exc:
                code, message = _status(exc, self.app.settings.timeout_s)
                await context.abort(code, message)
            except Exception as exc:
                code = grpc.StatusCode.INTERNAL
                log.exception("unhandled error in gRPC %s", rpc)
                await context.abort(code, f"internal error: {type(exc).__name__}: {exc}")
            finally:
                model = model if model in self.app.models else ""
                self.app.metrics.requests.labels(f"grpc:{rpc}", model, code.name).inc()
        return call

    async def server_live(self, request):
        return M["ServerLiveResponse"](live=True)

    async def server_ready(self, request):
        return M["ServerReadyResponse"](ready=self.app.ready)

    async def model_ready(self, request):
        return M["ModelReadyResponse"](ready=self.app.model(request.name, request.version or None).ready)

    async def server_metadata(self, request):
        from ..version import __version__
        return M["ServerMetadataResponse"](name="sparse-engine", version=__version__,
                                           extensions=["binary_tensor_data"])

    async def model_metadata(self, request):
        meta = model_metadata(self.app.model(request.name, request.version or None).spec)
        return M["ModelMetadataResponse"](
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[M["TensorMetadata"](**t) for t in meta["inputs"]],
            outputs=[M["TensorMetadata"](**t) for t in meta["outputs"]])

    async def model_infer(self, request):
        start, app = time.perf_counter(), self.app
        runner = app.ready_model(request.model_name, request.model_version or None)
        with app.holding() as held, app.batchers[runner.name].arriving() as arrival:
            size = request.ByteSize()
            app.hold(held, size)
            parse = lambda: request_from_grpc(request, runner.spec, max_rows=app.settings.max_rows)  # noqa: E731
            parsed, outputs = await app.execute(runner, parse, held, size, arrival)
        answer = M["ModelInferResponse"](model_name=runner.name, model_version="1", id=parsed.id or "")
        for name in parsed.outputs:
            answer.outputs.add(name=name, datatype="FP32", shape=list(outputs[name].shape))
            answer.raw_output_contents.append(outputs[name].astype("<f4").tobytes())
        app.metrics.latency.labels(runner.name).observe(time.perf_counter() - start)
        return answer


def _status(exc: Exception, timeout_s: float) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, RequestError):
        return CODES.get(exc.status, grpc.StatusCode.INTERNAL), str(exc)
    if isinstance(exc, (BudgetExceeded, QueueFull)):
        return grpc.StatusCode.UNAVAILABLE, f"server busy: {exc}"
    if isinstance(exc, InferenceError):
        return grpc.StatusCode.INTERNAL, f"inference failed: {exc}"
    return grpc.StatusCode.DEADLINE_EXCEEDED, f"request timed out after {timeout_s:g} s"


async def start(app, host: str, port: int) -> tuple[grpc.aio.Server, int]:
    """A started grpc.aio server for `app` on host:port (0: a free port) -> (server, bound port).
    Messages are bounded like REST bodies and answers (max_body, max_response); concurrent RPCs
    beyond max_connections are refused with RESOURCE_EXHAUSTED."""
    s = app.settings
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", s.max_body),
                                      ("grpc.max_send_message_length", s.max_response)],
                             maximum_concurrent_rpcs=s.max_connections)
    server.add_generic_rpc_handlers((GrpcService(app).handler(),))
    bound = server.add_insecure_port(f"[{host}]:{port}" if ":" in host else f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC to {host}:{port}")
    await server.start()
    return server, bound
