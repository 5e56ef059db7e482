"""One loaded model behind the server: `ModelRunner` turns parsed v2 requests into forward passes.

What a request means for the model (which inputs it needs, tokenizing text, how requests merge into
one batch and split back) is the model family's (engine.models: `request`, `run`,
`warmup_requests`); this file adds what every model needs behind a server: client errors as 4xx,
one failing request isolated from its batch neighbours, and no NaN/Inf answered as a success.
`load_runners(ARTIFACT arguments, names)` loads them (shared by `serve` and its Ray replicas).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..models import InputError, get_family
from .protocol import InferRequest, RequestError

log = logging.getLogger("engine.server")


class InferenceError(Exception):
    """The model failed on a valid request (answered 500); the message says how."""


class ModelRunner:
    """`ModelRunner(model, name=None, device="cpu")` for a model from `engine.load` (it reads
    `model.spec`). The server uses `name`, `spec`, `ready`, `prepare`, `output_shapes`, `run_batch`
    and `warmup`."""

    def __init__(self, model: nn.Module, name: str | None = None, device: str = "cpu"):
        spec = dict(model.spec)
        if name:
            spec["name"] = name
        self.model, self.spec, self.device = model, spec, torch.device(device)
        self.name = spec["name"]
        self.family = get_family(spec["family"])
        self.ready = False

    # -- on the event loop, per request ------------------------------------------------------
    def prepare(self, request: InferRequest) -> None:
        """The family's checks and preprocessing (tokenizing); fills `request.outputs` when the
        client named none. Raises RequestError (400)."""
        try:
            request.extra["item"], request.outputs = self.family.request(
                self.model, self.spec, request.inputs, request.outputs)
        except InputError as exc:
            raise RequestError(400, str(exc)) from None

    def output_shapes(self, request: InferRequest) -> dict:
        """After `prepare`: {output name: shape the answer will have, or None if unknown}."""
        return self.family.output_shapes(self.spec, request.extra["item"], request.outputs)

    # -- on the batch thread ------------------------------------------------------------------
    def run_batch(self, requests: list[InferRequest]) -> list:
        """One result per request: {output name: np.ndarray} or an InferenceError."""
        try:
            return self._run(requests)
        except Exception as exc:
            if len(requests) == 1:
                log.exception("model '%s' failed on a request", self.name)
                return [_as_inference_error(exc)]
        # One bad request must not fail its neighbours: retry them one by one.
        log.warning("model '%s' failed on a batch of %d requests; retrying them one by one",
                    self.name, len(requests))
        return [self.run_batch([r])[0] for r in requests]

    def _run(self, requests: list[InferRequest]) -> list[dict]:
        with torch.inference_mode():
            results = self.family.run(self.model, self.spec, [r.extra["item"] for r in requests], self.device)
        for request, out in zip(requests, results):
            for name in request.outputs:
                if name not in out:
                    raise InferenceError(f"the model returned no output '{name}'")
                if not np.isfinite(out[name]).all():
                    raise InferenceError(f"the model produced NaN or Inf in output '{name}'")
        return [{name: out[name] for name in r.outputs} for r, out in zip(requests, results)]

    def warmup(self, max_batch: int) -> None:
        """Runs what the family sends at warm-up at batch 1 and at max_batch, so first requests are
        not slow; raises what the model raised."""
        for rows in sorted({1, max(1, max_batch)}):
            for inputs, outputs in self.family.warmup_requests(self.model, self.spec, rows):
                request = InferRequest(inputs=inputs, outputs=outputs, rows=rows)
                self.prepare(request)
                result = self.run_batch([request])[0]
                if isinstance(result, Exception):
                    raise result
        self.ready = True


def _as_inference_error(exc: Exception) -> InferenceError:
    if isinstance(exc, InferenceError):
        return exc
    return InferenceError(f"{type(exc).__name__}: {exc}")


ARTIFACT_SUFFIXES = (".spz", ".sparse")  # what a directory argument serves


def _artifact_paths(given: list[str]) -> list[Path]:
    """The ARTIFACT arguments with each directory replaced by its artifacts, sorted by name."""
    paths = []
    for arg in map(Path, given):
        if not arg.is_dir():
            paths.append(arg)
            continue
        found = sorted(p for p in arg.iterdir() if p.suffix in ARTIFACT_SUFFIXES and p.is_file())
        if not found:
            raise ValueError(f"directory {arg} holds no artifact (*{' / *'.join(ARTIFACT_SUFFIXES)})")
        paths += found
    return paths


def load_runners(artifacts: list, names: list[str], *, device: str = "cpu", trust_module: bool = False,
                 verify_key: Path | None = None) -> list[ModelRunner]:
    """The ARTIFACT arguments (files or directories) loaded by engine.load, one runner each, named
    by `names` (one per artifact, in order) or by the artifacts. Raises ValueError / OSError /
    RuntimeError with the loader's message."""
    import engine
    paths = _artifact_paths([str(a) for a in artifacts])
    if names and len(names) != len(paths):
        raise ValueError(f"--name given {len(names)} times for {len(paths)} artifacts; "
                         f"give it once per artifact or not at all")
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device cuda: torch {torch.__version__} sees no CUDA GPU on this machine")
    runners = []
    for i, path in enumerate(paths):
        model = engine.load(path, device=device, trust_module=trust_module, verify_key=verify_key)
        runners.append(ModelRunner(model, names[i] if names else None, device=device))
    found = [r.name for r in runners]
    if len(set(found)) != len(found):
        raise ValueError(f"two models share a name in {found}; use --name to tell them apart")
    return runners
