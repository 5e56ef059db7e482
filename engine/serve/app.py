"""The ASGI app of `sparse-engine serve`: Open Inference Protocol (KServe v2) routes over loaded
`ModelRunner`s, on Starlette, with dynamic batching (engine.serve.batching) and Prometheus metrics.

Routes: GET /v2/health/live, /v2/health/ready, /v2, /v2/models/{name}[/versions/1],
/v2/models/{name}[/versions/1]/ready, POST /v2/models/{name}[/versions/1]/infer,
POST /v2/repository/index, GET /metrics.
Every error is JSON `{"error": "..."}` naming the problem.

Per request: body read within `body_timeout_s` (408) and under `max_body` (413); its bytes and the
answer's predicted size held in a `ByteBudget` across in-flight requests (503 + Retry-After past
it); an answer predicted above `max_response` refused (413) before the model runs; a large answer
encoded off the event loop, so health probes and other clients are served meanwhile.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import time
from contextlib import asynccontextmanager, contextmanager

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .batching import Arrival, Batcher, QueueFull
from .limits import ENCODE_IN_THREAD_BYTES, PARSE_IN_THREAD_BYTES, BudgetExceeded, ByteBudget, Settings
from .protocol import RequestError, encode_infer_response, model_metadata, parse_infer, predicted_response_bytes
from .runner import InferenceError, ModelRunner

log = logging.getLogger("engine.server")
VERSIONS = ("1",)  # an artifact is one version of its model
SEND_SLICE = 256 * 1024  # bytes of an answer handed to the transport per event-loop turn


class Metrics:
    """Prometheus series on a registry of their own (so several apps in one process do not clash)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("sparse_engine_requests", "Requests (HTTP routes; gRPC RPCs as 'grpc:RPC' "
                                "with the status code's name) by endpoint, model and status",
                                ["endpoint", "model", "status"], registry=self.registry)
        self.latency = Histogram("sparse_engine_request_latency_seconds", "Latency of successful infer "
                                 "requests, body read to response", ["model"], registry=self.registry,
                                 buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.batch_rows = Histogram("sparse_engine_batch_size", "Rows per executed batch", ["model"],
                                    registry=self.registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
        self.batch_requests = Histogram("sparse_engine_batch_requests", "Requests merged per executed batch",
                                        ["model"], registry=self.registry,
                                        buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.queue_depth = Gauge("sparse_engine_queue_depth", "Requests waiting for a batch", ["model"],
                                 registry=self.registry)
        self.buffered = Gauge("sparse_engine_buffered_bytes", "Bytes held by in-flight requests (bodies and "
                              "predicted answers)", registry=self.registry)


class SlicedResponse(Response):
    """A Response whose body goes out in SEND_SLICE pieces, awaiting the transport between them: a
    20 MiB answer is not copied through the event loop in one turn (other clients wait meanwhile)."""

    async def __call__(self, scope, receive, send):
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        body = self.body
        for start in range(0, max(len(body), 1), SEND_SLICE):
            end = start + SEND_SLICE
            await send({"type": "http.response.body", "body": body[start:end], "more_body": end < len(body)})


def _header_length(request: Request) -> int | None:
    """The binary tensor extension's JSON header length (None: a plain JSON body)."""
    value = request.headers.get("inference-header-content-length")
    if value is None:
        return None
    if not value.strip().isdigit():
        raise RequestError(400, f"Inference-Header-Content-Length must be a non-negative integer, got {value!r}")
    return int(value)


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def busy(message: str) -> JSONResponse:
    return error(503, f"server busy: {message}", {"Retry-After": "1"})


class InferenceApp:
    """`InferenceApp(runners, settings)` is an ASGI app serving `runners` (already loaded); warm-up
    runs at startup, off the loop. Around every route: bearer-token check, per-status counting.

    With `grpc_address`, the v2 gRPC API is served there too, on the same loop (grpc_service).
    `ready`/`failed` say how start-up and warm-up went; `drain()` (safe from a signal handler) runs
    every queued request now; `on_failure` (set by the caller) is called when warm-up fails."""

    OPEN_PATHS = ("/v2/health/live", "/v2/health/ready")  # probes need no token

    def __init__(self, runners: list[ModelRunner], settings: Settings, metrics: Metrics | None = None,
                 grpc_address: tuple[str, int] | None = None):
        self.settings, self.metrics = settings, metrics or Metrics()
        self.grpc_address = grpc_address  # (host, port): also serve gRPC there (engine.serve.grpc_service)
        self.grpc_port = None  # the bound port, once started
        self.models = {r.name: r for r in runners}
        self.batchers: dict[str, Batcher] = {}
        self.budget = ByteBudget(settings.max_buffered)
        self.ready, self.failed, self.loop = False, None, None
        self.on_failure = lambda: None
        routes = [Route("/v2/health/live", self.live), Route("/v2/health/ready", self.server_ready),
                  Route("/v2", self.server_metadata), Route("/metrics", self.prometheus),
                  Route("/v2/repository/index", self.repository_index, methods=["POST"])]
        for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
            routes += [Route(prefix, self.model_metadata), Route(prefix + "/ready", self.model_ready),
                       Route(prefix + "/infer", self.infer, methods=["POST"])]
        self.app = Starlette(routes=routes, lifespan=self.lifespan, exception_handlers={
            RequestError: self.on_request_error, HTTPException: self.on_http_error, Exception: self.on_crash})

    # -- ASGI entry: token check and status counting around every route --------------------------
    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint, model = self._classify(path)
        status = {"code": 500}

        async def send_counting(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            if self.settings.token is not None and path not in self.OPEN_PATHS and not self._authorized(scope):
                await error(401, "missing or wrong bearer token (send 'Authorization: Bearer <token>')",
                            {"WWW-Authenticate": "Bearer"})(scope, receive, send_counting)
            else:
                await self.app(scope, receive, send_counting)
        finally:
            self.metrics.requests.labels(endpoint, model, str(status["code"])).inc()

    def _authorized(self, scope) -> bool:
        return self.authorized(dict(scope["headers"]).get(b"authorization", b"").decode("latin-1"))

    def authorized(self, header: str) -> bool:
        """Whether an Authorization header value carries this server's bearer token."""
        scheme, _, given = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(),
                                                                  self.settings.token.encode())

    def _classify(self, path: str) -> tuple[str, str]:
        # Label values come from a fixed set, never from the raw path (unbounded cardinality).
        parts = path.strip("/").split("/")
        if parts[:2] == ["v2", "health"]:
            return "health", ""
        if path == "/metrics":
            return "metrics", ""
        if parts[:2] == ["v2", "models"] and len(parts) >= 3:
            model = parts[2] if parts[2] in self.models else ""
            return ("infer" if parts[-1] == "infer" else "model"), model
        return ("server" if path.rstrip("/") == "/v2" else "other"), ""

    # -- lifecycle ---------------------------------------------------------------------------------
    @asynccontextmanager
    async def lifespan(self, app):
        s, m = self.settings, self.metrics
        for runner in self.models.values():
            self.batchers[runner.name] = Batcher(
                runner.run_batch, max_batch=s.max_batch, max_delay_s=s.max_delay_s, max_queue=s.max_queue,
                name=runner.name, on_depth=m.queue_depth.labels(runner.name).set,
                on_batch=lambda rows, n, name=runner.name: (m.batch_rows.labels(name).observe(rows),
                                                            m.batch_requests.labels(name).observe(n)))
            self.batchers[runner.name].start()
        self.loop = asyncio.get_running_loop()
        grpc_server = None
        if self.grpc_address is not None:
            from . import grpc_service
            try:
                grpc_server, self.grpc_port = await grpc_service.start(self, *self.grpc_address)
                # Tests and scripts read this line to find the port when --grpc-port 0 was given.
                log.info("serving gRPC (v2 GRPCInferenceService) on %s:%d", self.grpc_address[0], self.grpc_port)
            except (OSError, RuntimeError) as exc:  # e.g. the port is taken: stop, as a failed warm-up does
                self.failed = f"cannot serve gRPC on {self.grpc_address[0]}:{self.grpc_address[1]}: {exc}"
                self.on_failure()
        warm = self.loop.create_task(self._warm_up()) if self.failed is None else None
        try:
            yield
        finally:
            if warm is not None:
                warm.cancel()
            if grpc_server is not None:
                await grpc_server.stop(s.timeout_s)  # in-flight RPCs finish, new ones are refused
            for batcher in self.batchers.values():
                await batcher.close()

    async def _warm_up(self):
        try:
            for runner in self.models.values():
                if not runner.ready:  # a Ray Serve replica warms its runners before it joins
                    await asyncio.to_thread(runner.warmup, self.settings.max_batch)
                log.info("model '%s' loaded and warmed up", runner.name)
            self.ready = True
        except Exception as exc:
            log.exception("warm-up failed")
            self.failed = f"warm-up failed: {type(exc).__name__}: {exc}"
            self.on_failure()  # a model that cannot run one batch should not sit there unready

    def drain(self) -> None:
        """Called from a signal handler: hop onto the loop thread-safely."""
        if self.loop is not None:
            self.loop.call_soon_threadsafe(lambda: [b.drain() for b in self.batchers.values()])

    # -- routes --------------------------------------------------------------------------------------
    def find(self, request: Request) -> ModelRunner:
        return self.model(request.path_params["name"], request.path_params.get("version"))

    def ready_model(self, name: str, version: str | None = None) -> ModelRunner:
        """`model(name, version)`, else RequestError 503 while it warms up."""
        runner = self.model(name, version)
        if not runner.ready:
            raise RequestError(503, f"model '{runner.name}' is still warming up; retry shortly")
        return runner

    def model(self, name: str, version: str | None = None) -> ModelRunner:
        """The runner serving `name` (and `version`, when given), else RequestError 404."""
        if name not in self.models:
            raise RequestError(404, f"unknown model {name!r}; this server has "
                                    f"{', '.join(repr(n) for n in self.models)}")
        if version is not None and version not in VERSIONS:
            raise RequestError(404, f"model {name!r} has no version {version!r} (versions: {', '.join(VERSIONS)})")
        return self.models[name]

    async def live(self, request):
        return JSONResponse({"live": True})

    async def server_ready(self, request):
        return JSONResponse({"ready": self.ready}, status_code=200 if self.ready else 503)

    async def server_metadata(self, request):
        from ..version import __version__
        return JSONResponse({"name": "sparse-engine", "version": __version__, "extensions": ["binary_tensor_data"],
                             "models": list(self.models)})

    async def repository_index(self, request):
        """The model repository extension's index: every served model, version "1", and its state."""
        return JSONResponse([{"name": r.name, "version": VERSIONS[0], "state": "READY" if r.ready else "LOADING"}
                             for r in self.models.values()])

    async def model_metadata(self, request):
        return JSONResponse(model_metadata(self.find(request).spec))

    async def model_ready(self, request):
        runner = self.find(request)
        return JSONResponse({"name": runner.name, "ready": runner.ready},
                            status_code=200 if runner.ready else 503)

    async def infer(self, request: Request):
        start = time.perf_counter()
        runner = self.ready_model(request.path_params["name"], request.path_params.get("version"))
        with self.holding() as held, self.batchers[runner.name].arriving() as arrival:
            try:
                header_length = _header_length(request)
                body = await self._read_body(request, held)
                return await self._answer(runner, body, header_length, held, start, arrival)
            except BudgetExceeded as exc:
                return busy(str(exc))
            except ClientDisconnect:  # gone mid-body: nobody to answer, nothing worth a traceback
                log.debug("client disconnected while sending its body to %s", request.url.path)
                return Response(status_code=400)

    @contextmanager
    def holding(self):
        """held: a list whose [0] counts the bytes one request holds in the budget (`hold` adds to
        it); all given back when the request ends, however it ends."""
        held = [0]
        try:
            yield held
        finally:
            self.budget.give(held[0])
            self.metrics.buffered.set(self.budget.used)

    def hold(self, held: list, n: int) -> None:
        self.budget.take(n)
        held[0] += n
        self.metrics.buffered.set(self.budget.used)

    async def _read_body(self, request: Request, held: list) -> bytes:
        """The request body within body_timeout_s (408), under max_body (413), held in the budget."""
        limit = self.settings.max_body
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit():
            if int(declared) > limit:
                raise RequestError(413, f"request body of {int(declared)} bytes exceeds the limit of {limit} "
                                        f"bytes (--max-body-mb)")
            self.hold(held, int(declared))

        async def read() -> bytes:
            chunks, size = [], 0
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise RequestError(413, f"request body exceeds the limit of {limit} bytes (--max-body-mb)")
                if declared is None:
                    self.hold(held, len(chunk))
                chunks.append(chunk)
            return b"".join(chunks)

        try:
            return await asyncio.wait_for(read(), self.settings.body_timeout_s)
        except asyncio.TimeoutError:
            raise RequestError(408, f"request body not received within {self.settings.body_timeout_s:g} s "
                                    f"(--body-timeout-s)") from None

    async def execute(self, runner: ModelRunner, parse, held: list, size: int, arrival: Arrival):
        """-> (InferRequest, {output: np.ndarray}): parse() the request of `size` bytes (off the
        loop past PARSE_IN_THREAD_BYTES), refuse an answer predicted above max_response, hold its
        bytes, run it in the model's batch (ending its `arrival` there), all within timeout_s.
        Shared by REST and gRPC; raises RequestError, BudgetExceeded, QueueFull, InferenceError or
        asyncio.TimeoutError for the caller to answer."""
        async def parse_and_run():
            parsed = await asyncio.to_thread(parse) if size > PARSE_IN_THREAD_BYTES else parse()
            runner.prepare(parsed)
            predicted = predicted_response_bytes(runner.output_shapes(parsed), parsed.binary_outputs)
            if predicted is not None:
                self._check_response_size(predicted, "would be")
                self.hold(held, predicted)  # the answer's bytes, reserved before the model runs
            return parsed, await self.batchers[runner.name].submit(parsed, parsed.rows, arrival)

        return await asyncio.wait_for(parse_and_run(), self.settings.timeout_s)

    async def _answer(self, runner: ModelRunner, body: bytes, header_length: int | None, held: list,
                      start: float, arrival: Arrival) -> Response:
        s = self.settings
        parse = lambda: parse_infer(body, runner.spec, max_rows=s.max_rows, header_length=header_length)
        try:
            parsed, outputs = await self.execute(runner, parse, held, len(body), arrival)
        except asyncio.TimeoutError:
            return error(504, f"request timed out after {s.timeout_s:g} s")
        except QueueFull as exc:
            return busy(str(exc))
        except InferenceError as exc:
            return error(500, f"inference failed in model '{runner.name}': {exc}")
        if sum(a.nbytes for a in outputs.values()) > ENCODE_IN_THREAD_BYTES:
            content, json_length = await asyncio.to_thread(encode_infer_response, runner.spec, parsed, outputs)
        else:  # a small answer costs less to encode than the hop to a thread and back
            content, json_length = encode_infer_response(runner.spec, parsed, outputs)
        self._check_response_size(len(content), "is")  # shapes the family could not predict
        self.metrics.latency.labels(runner.name).observe(time.perf_counter() - start)
        if json_length is None:
            return SlicedResponse(content, media_type="application/json")
        return SlicedResponse(content, media_type="application/octet-stream",
                              headers={"Inference-Header-Content-Length": str(json_length)})

    def _check_response_size(self, size: int, verb: str) -> None:
        if size > self.settings.max_response:
            raise RequestError(413, f"the answer {verb} about {size / (1 << 20):.1f} MiB, above the "
                                    f"limit of {self.settings.max_response / (1 << 20):g} MiB "
                                    f"(--max-response-mb): ask for fewer rows, shorter inputs or fewer outputs")

    async def prometheus(self, request):
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # -- errors ----------------------------------------------------------------------------------------
    async def on_request_error(self, request, exc: RequestError):
        return error(exc.status, str(exc))

    async def on_http_error(self, request, exc: HTTPException):
        what = {404: f"no route {request.url.path}", 405: f"method {request.method} not allowed on "
                f"{request.url.path}"}.get(exc.status_code, exc.detail)
        return error(exc.status_code, what)

    async def on_crash(self, request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error(500, f"internal error: {type(exc).__name__}: {exc}")
