"""A user's own model, built by `pkg.mod:factory()` (no arguments) and given at convert time with
`--arch module:pkg.mod:factory`. The artifact records the import path; loading it imports that
module only when the caller passes `trust_module=True` (importing runs the module's code).

The model must take one float tensor; its input width is the first Linear's in_features.
"""
from __future__ import annotations

import importlib

import torch
from torch import nn

from . import ArchError


def _factory(path: str, fn: str = "custom"):
    mod_name, _, attr = path.partition(":")
    if not mod_name or not attr:
        raise ArchError(f"{fn}: custom architecture must be 'module:pkg.mod:factory', got factory {path!r}")
    try:
        module = importlib.import_module(mod_name)
    except ImportError as e:
        raise ArchError(f"{fn}: cannot import {mod_name!r} for factory {path!r}: {e}") from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ArchError(f"{fn}: {mod_name!r} has no callable {attr!r}")
    return factory


def build(config: dict) -> nn.Module:
    model = _factory(config["factory"])()
    if not isinstance(model, nn.Module):
        raise ArchError(f"custom: factory {config['factory']!r} returned {type(model).__name__}, not an nn.Module")
    return model


def from_checkpoint(ck, option: dict) -> tuple[dict, dict, dict]:
    fn = f"convert(--arch module:{option['factory']})"
    with torch.device("meta"):
        model = _factory(option["factory"], fn)()
    if isinstance(model, nn.Linear):
        raise ArchError(f"{fn}: the factory returns a bare nn.Linear; wrap it (e.g. nn.Sequential(linear)) "
                        "so the layer has a name")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ArchError(f"{fn}: the model has no nn.Linear layers to convert")
    return {"factory": option["factory"], "in_features": linears[0].in_features}, dict(ck.tensors), dict(ck.masks)


def prepare_runtime(model: nn.Module, config: dict) -> nn.Module:
    return model


def example_inputs(config: dict, batch: int, generator: torch.Generator) -> tuple:
    return (torch.randn(batch, config["in_features"], generator=generator),)


def spec(config: dict, name: str, tokenizer=None) -> dict:
    out = config.get("out_shape", [-1])
    return {"family": "custom", "name": name,
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, config["in_features"]]}],
            "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, *out[1:]]}]}
