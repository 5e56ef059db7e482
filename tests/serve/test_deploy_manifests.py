"""deploy/: the Dockerfile, the KServe ServingRuntime + InferenceService and the Ray Serve config
agree with the server they run: their arguments parse with `sparse-engine serve`'s own parser,
ports and probes point where that server listens and answers without a token, the image runs as a
non-root user with the pinned CPU torch, and the Ray config's builder accepts its args."""
from __future__ import annotations

import argparse
import json
import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml

from engine.serve import server
from engine.serve.app import InferenceApp

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def serve_args(argv: list[str]):
    """argv parsed by `sparse-engine serve`'s own parser (an unknown flag fails the test)."""
    assert argv[0] == "serve", argv
    parser = argparse.ArgumentParser()
    server.configure(parser)
    return parser.parse_args(argv[1:])


def dockerfile() -> dict[str, list[str]]:
    """Instruction -> its arguments, one entry per occurrence (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            op, _, rest = line.strip().partition(" ")
            out.setdefault(op.upper(), []).append(rest.strip())
    return out


def test_dockerfile_runs_the_server_as_non_root_on_the_exposed_port():
    d = dockerfile()
    user = d["USER"][-1]
    assert user not in ("root", "0") and user.isdigit()  # numeric: Kubernetes' runAsNonRoot can check it
    assert any("torch==2.13.0" in r and "whl/cpu" in r for r in d["RUN"])  # the pinned CPU build
    entry = json.loads(d["ENTRYPOINT"][-1])
    args = serve_args(json.loads(d["CMD"][-1]))
    assert entry == ["sparse-engine"] and args.host == "0.0.0.0"
    exposed = {int(p) for p in d["EXPOSE"][-1].split()}
    assert {args.port, args.grpc_port} == exposed
    health = d["HEALTHCHECK"][-1]
    assert f"127.0.0.1:{args.port}/v2/health/ready" in health and "/v2/health/ready" in InferenceApp.OPEN_PATHS
    copied = {shlex.split(c)[0] for c in d["COPY"]}
    assert {"engine", "kernels", "csrc", "setup.py"} <= copied | {w for c in d["COPY"] for w in c.split()}


def test_kserve_runtime_and_inference_service_match_the_server():
    runtime, isvc = yaml.safe_load_all((DEPLOY / "kserve.yaml").read_text())
    assert runtime["kind"] == "ServingRuntime" and isvc["kind"] == "InferenceService"
    assert "v2" in runtime["spec"]["protocolVersions"]
    (container,) = runtime["spec"]["containers"]
    argv = [a.replace("{{.Name}}", isvc["metadata"]["name"]) for a in container["args"]]
    args = serve_args(argv)
    assert args.host == "0.0.0.0" and args.artifacts == ["/mnt/models"] and args.name == ["minilm-sparse"]
    assert [p["containerPort"] for p in container["ports"]] == [args.port]
    for probe, path in (("readinessProbe", "/v2/health/ready"), ("livenessProbe", "/v2/health/live")):
        get = container[probe]["httpGet"]
        assert get == {"path": path, "port": args.port} and path in InferenceApp.OPEN_PATHS  # no token needed
    d = dockerfile()
    assert container["securityContext"]["runAsUser"] == int(d["USER"][-1])
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"] and model["protocolVersion"] == "v2"
    assert model["modelFormat"]["name"] in {f["name"] for f in runtime["spec"]["supportedModelFormats"]}


def test_ray_serve_config_builds_the_application(tmp_path):
    pytest.importorskip("ray", reason="ray[serve] (the ray extra) missing")
    from engine.convert import convert
    from engine.examples import mlp
    from engine.serve import ray_serve
    config = yaml.safe_load((DEPLOY / "ray-serve.yaml").read_text())
    (app,) = config["applications"]
    module, _, name = app["import_path"].partition(":")
    assert module == "engine.serve.ray_serve" and callable(getattr(ray_serve, name))
    torch.save(mlp([64, 32, 10]).state_dict(), tmp_path / "m.pt")
    convert(tmp_path / "m.pt", tmp_path / "m.spz", arch="mlp:relu", log=lambda *a, **k: None)
    given = {**app["args"], "artifacts": [str(tmp_path / "m.spz")], "names": ["m"]}
    built = ray_serve.builder(given)
    assert type(built).__name__ == "Application"
    with pytest.raises(ValueError, match="unknown args"):
        ray_serve.builder({**given, "max_batchh": 3})
    with pytest.raises(ValueError, match="needs `artifacts`"):
        ray_serve.builder({"replicas": 2})
    assert config["http_options"]["host"] == "0.0.0.0"
