"""The v2 server replicated on a Ray cluster (Ray Serve): every replica loads the artifacts and runs
the same app as `sparse-engine serve` (engine.serve.app: batching, limits, token, metrics), and Ray
Serve's HTTP proxy spreads the requests over the replicas, so clients see one v2 REST endpoint.

    import ray
    from ray import serve
    from engine.serve.ray_serve import application
    serve.run(application(["model.spz"], replicas=4))

`sparse-engine serve model.spz --ray 4` does that on the cluster RAY_ADDRESS names, or on a
single-node cluster it starts (and stops) itself, and runs until SIGINT / SIGTERM. The artifacts'
paths must be readable on every node that runs a replica (a shared volume, or baked into the image).

Each replica warms its models before Ray routes to it, answers with an `x-replica` header naming
itself, and reports unhealthy (Ray then replaces it) if its app failed. gRPC is not served this way:
Ray Serve's gRPC proxy routes only its own protobuf services.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from pathlib import Path

import ray
from ray import serve

from .app import InferenceApp
from .limits import LIMITS, Settings, read_token
from .runner import load_runners

log = logging.getLogger("engine.server")
DEPLOYMENT = "sparse-engine"


def application(artifacts: list, names: list[str] = (), *, replicas: int = 2, settings: Settings | None = None,
                cpus_per_replica: float = 1.0, device: str = "cpu", trust_module: bool = False,
                verify_key: Path | None = None):
    """A Ray Serve application (pass it to `serve.run`) of `replicas` copies of the v2 server for
    `artifacts` (files or directories, as `sparse-engine serve` takes them). The artifacts are
    loaded here first, so a bad one fails now with the loader's message, not in a replica."""
    if replicas < 1:
        raise ValueError(f"replicas must be at least 1, got {replicas}")
    names, settings = list(names), settings or Settings()
    load_runners(artifacts, names, device=device, trust_module=trust_module, verify_key=verify_key)  # the check
    paths = [str(Path(a).resolve()) for a in artifacts]  # replicas may run in another directory
    threads = max(1, int(cpus_per_replica))

    def build():
        import torch
        torch.set_num_threads(threads)
        served = load_runners(paths, names, device=device, trust_module=trust_module, verify_key=verify_key)
        for runner in served:
            runner.warmup(settings.max_batch)  # before Ray routes anything here
        return _Named(InferenceApp(served, settings), _replica_name())

    @serve.deployment(name=DEPLOYMENT, num_replicas=replicas, ray_actor_options={"num_cpus": cpus_per_replica},
                      # more requests in flight than one batch holds, so the batcher has rows to merge
                      max_ongoing_requests=max(8, 2 * settings.max_batch),
                      graceful_shutdown_timeout_s=settings.timeout_s + 5)
    @serve.ingress(build)
    class SparseEngine:
        def check_health(self):
            failed = self.app.inner.failed
            if failed:
                raise RuntimeError(failed)

    return SparseEngine.bind()


def builder(args: dict):
    """The application from a Ray Serve config's `args` (deploy/ray-serve.yaml; `import_path:
    engine.serve.ray_serve:builder`): `artifacts` (required), `names`, `replicas`,
    `cpus_per_replica`, `device`, `token_file`, and any serve limit by its option name with
    underscores (`max_batch`, `max_delay_ms`, ...)."""
    args = dict(args)
    unknown = set(args) - {"artifacts", "names", "replicas", "cpus_per_replica", "device", "token_file", *LIMITS}
    if unknown:
        raise ValueError(f"unknown args {sorted(unknown)} for engine.serve.ray_serve:builder")
    if not args.get("artifacts"):
        raise ValueError("engine.serve.ray_serve:builder needs `artifacts`: a list of artifact paths")
    token = read_token(args["token_file"]) if args.get("token_file") else None
    settings = Settings(token=token, **{k: args[k] for k in LIMITS if k in args})
    return application(args["artifacts"], args.get("names", ()), replicas=int(args.get("replicas", 2)),
                       settings=settings, cpus_per_replica=float(args.get("cpus_per_replica", 1.0)),
                       device=args.get("device", "cpu"))


def _replica_name() -> str:
    return str(serve.get_replica_context().replica_id.unique_id)


class _Named:
    """The app, answering with an `x-replica` header: which replica served a request."""

    def __init__(self, inner: InferenceApp, name: str):
        self.inner, self.header = inner, (b"x-replica", name.encode())

    async def __call__(self, scope, receive, send):
        async def named(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)
        await self.inner(scope, receive, named if scope["type"] == "http" else send)


def main(args, settings: Settings) -> int:
    """`sparse-engine serve ... --ray N`: runs until SIGINT / SIGTERM, then removes the application
    (replicas answer what they hold first) and stops Ray Serve and Ray if this process started
    them; on a cluster RAY_ADDRESS names, only this application is removed."""
    app = application(args.artifacts, args.name, replicas=args.ray, settings=settings,
                      cpus_per_replica=args.ray_cpus, device=args.device, trust_module=args.trust_module,
                      verify_key=args.verify_key)
    port = args.port or _free_port(args.host)  # Ray Serve's proxy takes no port 0
    joined = "RAY_ADDRESS" in os.environ  # a cluster someone else runs: leave it (and its other apps) be
    if joined:
        ray.init()
    else:
        ray.init(include_dashboard=False, configure_logging=False)
    stop = threading.Event()  # set by SIGINT / SIGTERM; installed after ray.init, which installs its own
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve.start(http_options={"host": args.host, "port": port})
        serve.run(app, name=DEPLOYMENT, route_prefix="/")
        # Tests and scripts read this line to find the port.
        log.info("serving %s on http://%s:%d (Ray Serve, %d replicas)",
                 ", ".join(args.name or map(str, args.artifacts)), args.host, port, args.ray)
        while not stop.wait(1.0):
            pass
        log.info("stopping: removing the Ray Serve application")
    finally:
        if joined:
            serve.delete(DEPLOYMENT)
        else:
            serve.shutdown()
        ray.shutdown()  # joined: only disconnects
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
