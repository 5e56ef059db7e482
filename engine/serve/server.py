"""`sparse-engine serve ARTIFACT [ARTIFACT ...]`: the Open Inference Protocol (KServe v2) over HTTP,
on Starlette + uvicorn, with dynamic batching (engine.serve.batching) and Prometheus metrics.

Routes: GET /v2/health/live, /v2/health/ready, /v2, /v2/models/{name}, /v2/models/{name}/ready,
POST /v2/models/{name}/infer, GET /metrics. Every error is JSON `{"error": "..."}` naming the problem.
Binds 127.0.0.1 unless told otherwise. SIGTERM/SIGINT: stop accepting connections, run every queued
request, answer it, exit 0 (a second SIGINT forces the exit).
"""
from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import signal
import socket
import sys
import time
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import uvicorn
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .batching import Batcher, QueueFull
from .runner import InferenceError, ModelRunner
from .protocol import RequestError, infer_response, model_metadata, parse_infer

log = logging.getLogger("engine.server")
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
# Bodies above this are parsed off the event loop so one large request does not stall the others.
PARSE_IN_THREAD_BYTES = 1 << 20


class Settings:
    """The serve limits, in the units the code uses (seconds, bytes)."""

    def __init__(self, *, max_batch=32, max_delay_ms=5.0, max_body_mb=16.0, max_rows=1024,
                 max_queue=1024, timeout_s=30.0, token=None):
        self.max_batch, self.max_delay_s = int(max_batch), float(max_delay_ms) / 1000.0
        self.max_body = int(float(max_body_mb) * (1 << 20))
        self.max_rows, self.max_queue = int(max_rows), int(max_queue)
        self.timeout_s, self.token = float(timeout_s), token


class Metrics:
    """Prometheus series on a registry of their own (so several apps in one process do not clash)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("sparse_engine_requests", "HTTP requests by endpoint, model and status",
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


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class Guard:
    """ASGI middleware: bearer-token check and per-request status counting, around every route."""

    OPEN_PATHS = ("/v2/health/live", "/v2/health/ready")  # probes need no token

    def __init__(self, app, *, token: str | None, metrics: Metrics, models: dict):
        self.app, self.token, self.metrics, self.models = app, token, metrics, models

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
            if self.token is not None and path not in self.OPEN_PATHS and not self._authorized(scope):
                await error(401, "missing or wrong bearer token (send 'Authorization: Bearer <token>')",
                            {"WWW-Authenticate": "Bearer"})(scope, receive, send_counting)
            else:
                await self.app(scope, receive, send_counting)
        finally:
            self.metrics.requests.labels(endpoint, model, str(status["code"])).inc()

    def _authorized(self, scope) -> bool:
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, given = header.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.token.encode())

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


def build_app(runners: list[ModelRunner], settings: Settings, metrics: Metrics | None = None) -> Guard:
    """The ASGI app serving `runners` (already loaded). Warm-up runs at startup, off the loop.

    The returned app also carries `status` ({"ready", "failed"}), `drain()` (safe to call from a
    signal handler) and `on_failure` (set by the caller: called when warm-up fails)."""
    metrics = metrics or Metrics()
    models = {r.name: r for r in runners}
    batchers: dict[str, Batcher] = {}
    state = {"ready": False, "failed": None}

    @asynccontextmanager
    async def lifespan(app):
        for runner in runners:
            batchers[runner.name] = Batcher(
                runner.run_batch, max_batch=settings.max_batch, max_delay_s=settings.max_delay_s,
                max_queue=settings.max_queue, name=runner.name,
                on_batch=lambda rows, n, m=runner.name: (metrics.batch_rows.labels(m).observe(rows),
                                                         metrics.batch_requests.labels(m).observe(n)),
                on_depth=metrics.queue_depth.labels(runner.name).set)
            batchers[runner.name].start()
        state["loop"] = asyncio.get_running_loop()
        warm = asyncio.get_running_loop().create_task(_warm_up())
        try:
            yield
        finally:
            warm.cancel()
            for batcher in batchers.values():
                await batcher.close()

    async def _warm_up():
        try:
            for runner in runners:
                await asyncio.to_thread(runner.warmup, settings.max_batch)
                log.info("model '%s' loaded and warmed up", runner.name)
            state["ready"] = True
        except Exception as exc:
            log.exception("warm-up failed")
            state["failed"] = f"{type(exc).__name__}: {exc}"
            guard.on_failure()  # a model that cannot run one batch should not sit there unready

    def find(request: Request) -> ModelRunner:
        name = request.path_params["name"]
        if name not in models:
            raise RequestError(404, f"unknown model {name!r}; this server has "
                                    f"{', '.join(repr(n) for n in models)}")
        return models[name]

    async def live(request):
        return JSONResponse({"live": True})

    async def ready(request):
        return JSONResponse({"ready": state["ready"]}, status_code=200 if state["ready"] else 503)

    async def server_metadata(request):
        from ..version import __version__
        return JSONResponse({"name": "sparse-engine", "version": __version__, "extensions": [],
                             "models": list(models)})

    async def model_meta(request):
        return JSONResponse(model_metadata(find(request).spec))

    async def model_ready(request):
        runner = find(request)
        return JSONResponse({"name": runner.name, "ready": runner.ready},
                            status_code=200 if runner.ready else 503)

    async def infer(request: Request):
        start = time.perf_counter()
        runner = find(request)
        if not runner.ready:
            return error(503, f"model '{runner.name}' is still warming up; retry shortly")

        async def read_parse_run():
            body = await _read_body(request, settings.max_body)
            parse = lambda: parse_infer(body, runner.spec, max_rows=settings.max_rows)
            parsed = await asyncio.to_thread(parse) if len(body) > PARSE_IN_THREAD_BYTES else parse()
            runner.prepare(parsed)
            return parsed, await batchers[runner.name].submit(parsed, parsed.rows)

        try:
            parsed, outputs = await asyncio.wait_for(read_parse_run(), settings.timeout_s)
        except asyncio.TimeoutError:
            return error(504, f"request timed out after {settings.timeout_s:g} s")
        except QueueFull as exc:
            return error(503, f"server busy: {exc}")
        except InferenceError as exc:
            return error(500, f"inference failed in model '{runner.name}': {exc}")
        body = infer_response(runner.spec, parsed, outputs)
        metrics.latency.labels(runner.name).observe(time.perf_counter() - start)
        return Response(json.dumps(body, allow_nan=False), media_type="application/json")

    async def prometheus(request):
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def on_request_error(request, exc: RequestError):
        return error(exc.status, str(exc))

    async def on_http_error(request, exc: HTTPException):
        what = {404: f"no route {request.url.path}", 405: f"method {request.method} not allowed on "
                f"{request.url.path}"}.get(exc.status_code, exc.detail)
        return error(exc.status_code, what)

    async def on_crash(request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return error(500, f"internal error: {type(exc).__name__}: {exc}")

    routes = [
        Route("/v2/health/live", live), Route("/v2/health/ready", ready), Route("/v2", server_metadata),
        Route("/v2/models/{name}", model_meta), Route("/v2/models/{name}/ready", model_ready),
        Route("/v2/models/{name}/infer", infer, methods=["POST"]),
        Route("/v2/models/{name}/versions/1/infer", infer, methods=["POST"]),
        Route("/metrics", prometheus),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={
        RequestError: on_request_error, HTTPException: on_http_error, Exception: on_crash})
    guard = Guard(app, token=settings.token, metrics=metrics, models=models)
    guard.status = state

    def drain():  # called from a signal handler: hop onto the loop thread-safely
        loop = state.get("loop")
        if loop is not None:
            loop.call_soon_threadsafe(lambda: [b.drain() for b in batchers.values()])

    guard.drain = drain
    guard.on_failure = lambda: None
    return guard


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, or RequestError 413 past `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body of {int(declared)} bytes exceeds the limit of {limit} bytes "
                                f"(--max-body-mb)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"request body exceeds the limit of {limit} bytes (--max-body-mb)")
        chunks.append(chunk)
    return b"".join(chunks)


# -- command line -----------------------------------------------------------------------------

def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifacts", nargs="+", metavar="ARTIFACT", help="sparse artifact(s) to serve")
    parser.add_argument("--name", action="append", default=[],
                        help="model name in URLs, once per artifact in order (default: the artifact's name)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1, loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (0 picks a free one; default 8000)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--max-batch", type=int, default=32, help="rows merged into one batch (default 32)")
    parser.add_argument("--max-delay-ms", type=float, default=5.0,
                        help="longest a request waits for others to join its batch (default 5)")
    parser.add_argument("--max-body-mb", type=float, default=16.0, help="request body limit (default 16)")
    parser.add_argument("--max-rows", type=int, default=1024, help="rows allowed in one request (default 1024)")
    parser.add_argument("--max-queue", type=int, default=1024,
                        help="queued requests per model before answering 503 (default 1024)")
    parser.add_argument("--timeout-s", type=float, default=30.0,
                        help="per-request limit from body read to answer; 504 past it (default 30)")
    parser.add_argument("--token-file", type=Path, help="file holding a bearer token clients must send")
    parser.add_argument("--trust-module", action="store_true",
                        help="allow 'custom' artifacts, whose Python factory is imported (runs its code)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = _settings(args)
        runners = _load(args)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"sparse-engine serve: {exc}", file=sys.stderr)
        return 1
    if args.host not in LOOPBACK and settings.token is None:
        log.warning("binding %s without --token-file: anyone who can reach this address can use it", args.host)

    disable_created_metrics()  # the *_created series only add noise to every scrape
    app = build_app(runners, settings)
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as exc:
        print(f"sparse-engine serve: cannot bind {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, log_level=args.log_level, access_log=False, lifespan="on",
                            timeout_graceful_shutdown=settings.timeout_s + 5)
    # Listen now, so the "serving on" line below is true: early connections wait in the backlog.
    sock.listen(config.backlog)
    server = _GracefulServer(config, on_signal=app.drain)
    app.on_failure = lambda: setattr(server, "should_exit", True)
    # Tests and scripts read this line to find the port when --port 0 was given.
    log.info("serving %s on http://%s:%d", ", ".join(r.name for r in runners),
             f"[{host}]" if family == socket.AF_INET6 else host, port)
    server.run(sockets=[sock])
    failed = app.status["failed"]
    if failed:
        print(f"sparse-engine serve: warm-up failed: {failed}", file=sys.stderr)
        return 1
    return 0


def _settings(args) -> Settings:
    token = None
    if args.token_file is not None:
        token = args.token_file.read_text().strip()
        if not token:
            raise ValueError(f"--token-file {args.token_file} is empty")
    for flag in ("max_batch", "max_rows", "max_queue"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.max_delay_ms < 0 or args.max_body_mb <= 0 or args.timeout_s <= 0:
        raise ValueError("--max-delay-ms must be >= 0; --max-body-mb and --timeout-s must be > 0")
    return Settings(max_batch=args.max_batch, max_delay_ms=args.max_delay_ms, max_body_mb=args.max_body_mb,
                    max_rows=args.max_rows, max_queue=args.max_queue, timeout_s=args.timeout_s, token=token)


def _load(args) -> list[ModelRunner]:
    import engine
    if args.name and len(args.name) != len(args.artifacts):
        raise ValueError(f"--name given {len(args.name)} times for {len(args.artifacts)} artifacts; "
                         f"give it once per artifact or not at all")
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise ValueError(f"--device cuda: torch {torch.__version__} sees no CUDA GPU on this machine")
    runners = []
    for i, path in enumerate(args.artifacts):
        # trust_module is passed only when asked, so loading stays refuse-by-default.
        extra = {"trust_module": True} if args.trust_module else {}
        model = engine.load(path, device=args.device, **extra)
        runners.append(ModelRunner(model, args.name[i] if args.name else None, device=args.device))
    names = [r.name for r in runners]
    if len(set(names)) != len(names):
        raise ValueError(f"two models share a name in {names}; use --name to tell them apart")
    return runners


class _GracefulServer(uvicorn.Server):
    """uvicorn.Server whose signal handling drains the batchers and exits 0.

    Stock uvicorn re-raises the signal after its graceful shutdown, so the process would die with
    -SIGTERM; a clean drain is a success here."""

    def __init__(self, config: uvicorn.Config, on_signal):
        super().__init__(config)
        self.on_signal = on_signal

    @contextmanager
    def capture_signals(self):
        previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _handle(self, sig, frame):
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True  # second Ctrl+C: stop waiting
            return
        log.info("received %s: no new connections; answering queued requests, then exiting",
                 signal.Signals(sig).name)
        self.should_exit = True
        self.on_signal()
