"""`sparse-engine serve ARTIFACT [ARTIFACT ...]`: the Open Inference Protocol (KServe v2) over HTTP:
loads the artifacts, builds the app (engine.serve.app) and runs it on uvicorn with the connection
limits of engine.serve.limits.

With `--ray N` the same app runs as N replicas on Ray Serve instead (engine.serve.ray_serve).

Binds 127.0.0.1 unless told otherwise. SIGTERM/SIGINT: stop accepting connections, run every queued
request, answer it, exit 0 (a second SIGINT forces the exit).
"""
from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
from contextlib import contextmanager
from pathlib import Path

import uvicorn
from prometheus_client import disable_created_metrics

from .app import InferenceApp
from .limits import LIMITS, Settings, guarded_protocol, read_token
from .runner import ModelRunner, load_runners

log = logging.getLogger("engine.server")
LOOPBACK = {"127.0.0.1", "localhost", "::1"}


# -- command line -----------------------------------------------------------------------------

def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifacts", nargs="+", metavar="ARTIFACT",
                        help="sparse artifact(s) to serve; a directory serves every *.spz / *.sparse file in it")
    parser.add_argument("--name", action="append", default=[],
                        help="model name in URLs, once per artifact in order (default: the artifact's name)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1, loopback only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (0 picks a free one; default 8000)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--grpc-port", type=int, metavar="PORT",
                        help="also serve the v2 gRPC API (GRPCInferenceService) on this port of --host, "
                             "with the same models, limits and token (0 picks a free one; default: off)")
    for name, (typ, default, text) in LIMITS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=typ, default=default, help=f"{text} (default {default:g})")
    parser.add_argument("--token-file", type=Path, help="file holding a bearer token clients must send")
    parser.add_argument("--trust-module", action="store_true",
                        help="allow 'custom' artifacts, whose Python factory is imported (runs its code)")
    parser.add_argument("--verify-key", type=Path, metavar="PUB",
                        help="Ed25519 public key (PEM, from `sparse-engine keygen`): refuse to serve an "
                             "artifact that is not signed by it or was edited after signing")
    parser.add_argument("--ray", type=int, metavar="N",
                        help="serve N replicas on a Ray cluster (Ray Serve; the `ray` extra) behind one v2 REST "
                             "endpoint on --host/--port: the cluster RAY_ADDRESS names, else a local one this "
                             "command starts and stops. Artifact paths must exist on every node")
    parser.add_argument("--ray-cpus", type=float, default=1.0,
                        help="CPUs each Ray replica reserves, also its torch threads (default 1)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = _settings(args)
        if args.ray is not None:
            return _serve_on_ray(args, settings)
        runners = _load(args)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"sparse-engine serve: {exc}", file=sys.stderr)
        return 1
    if args.host not in LOOPBACK and settings.token is None:
        log.warning("binding %s without --token-file: anyone who can reach this address can use it", args.host)

    disable_created_metrics()  # the *_created series only add noise to every scrape
    # The event loop shares the GIL with the batch and encoding threads; a thread waiting for the GIL
    # gets it after this interval (default 5 ms), paid at every hand-over while one request is served.
    sys.setswitchinterval(0.001)
    app = InferenceApp(runners, settings, grpc_address=None if args.grpc_port is None else (args.host, args.grpc_port))
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((args.host, args.port))
    except OSError as exc:
        print(f"sparse-engine serve: cannot bind {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    host, port = sock.getsockname()[:2]
    protocol = guarded_protocol(max_connections=settings.max_connections,
                                header_timeout_s=settings.header_timeout_s)
    config = uvicorn.Config(app, log_level=args.log_level, access_log=False, lifespan="on", http=protocol,
                            timeout_graceful_shutdown=settings.timeout_s + 5)
    # Listen now, so the "serving on" line below is true: early connections wait in the backlog.
    sock.listen(config.backlog)
    server = _GracefulServer(config, on_signal=app.drain)
    app.on_failure = lambda: setattr(server, "should_exit", True)
    # Tests and scripts read this line to find the port when --port 0 was given.
    log.info("serving %s on http://%s:%d", ", ".join(r.name for r in runners),
             f"[{host}]" if family == socket.AF_INET6 else host, port)
    server.run(sockets=[sock])
    if app.failed:
        print(f"sparse-engine serve: {app.failed}", file=sys.stderr)
        return 1
    return 0


def _serve_on_ray(args, settings: Settings) -> int:
    if args.grpc_port is not None:
        raise ValueError("--grpc-port cannot be used with --ray: Ray Serve's gRPC proxy serves only its own "
                         "protobuf services; use REST, or run `serve --grpc-port` behind another balancer")
    if args.ray < 1:
        raise ValueError(f"--ray takes a number of replicas of at least 1, got {args.ray}")
    try:
        from . import ray_serve
    except ImportError as exc:
        raise ValueError(f"--ray needs Ray Serve: pip install 'sparse-engine[ray]' ({exc})") from None
    return ray_serve.main(args, settings)


def _settings(args) -> Settings:
    token = read_token(args.token_file) if args.token_file is not None else None
    return Settings(token=token, **{name: getattr(args, name) for name in LIMITS})


def _load(args) -> list[ModelRunner]:
    return load_runners(args.artifacts, args.name, device=args.device, trust_module=args.trust_module,
                        verify_key=args.verify_key)


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
