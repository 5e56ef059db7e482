"""A user's own model, built by `pkg.mod:factory()` (no arguments) and given at convert time with
`--arch module:pkg.mod:factory`. The artifact records the import path; loading it imports that
module only when the caller passes `trust_module=True` (importing runs the module's code).

The model must take one float tensor; its input width is the first Linear's in_features.
"""
from __future__ import annotations

import importlib

import torch
from torch import nn

from . import ArchError, Family, register_family


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


class CustomFamily(Family):
    name = "custom"
    arch_prefix = "module"
    arch_help = "module:pkg.mod:factory"
    # recognise() stays None: the factory is imported only when the user names it on --arch.

    def parse_option(self, option: str, arch: str) -> dict:
        return {"factory": option}

    def from_checkpoint(self, ck, option: dict) -> tuple[dict, dict, dict]:
        fn = f"convert(--arch module:{option['factory']})"
        with torch.device("meta"):
            model = _factory(option["factory"], fn)()
        if isinstance(model, nn.Linear):
            raise ArchError(f"{fn}: the factory returns a bare nn.Linear; wrap it (e.g. nn.Sequential(linear)) "
                            "so the layer has a name")
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not linears:
            raise ArchError(f"{fn}: the model has no nn.Linear layers to convert")
        config = {"factory": option["factory"], "in_features": linears[0].in_features}
        return config, dict(ck.tensors), dict(ck.masks)

    def example_inputs(self, config: dict, batch: int, generator: torch.Generator, seq: int = 16) -> tuple:
        return (torch.randn(batch, config["in_features"], generator=generator),)

    def observe_output(self, config: dict, output) -> dict:
        # Only running the model tells its output shape; the spec needs it.
        return dict(config, out_shape=list(output.shape))

    def needs_trust(self, config: dict) -> str | None:
        return (f"this artifact is built by the Python factory {config.get('factory')!r}; importing it "
                "runs that module's code")

    def build(self, config: dict) -> nn.Module:
        model = _factory(config["factory"])()
        if not isinstance(model, nn.Module):
            raise ArchError(f"custom: factory {config['factory']!r} returned {type(model).__name__}, "
                            "not an nn.Module")
        return model

    def spec(self, config: dict, name: str, model: nn.Module) -> dict:
        out = config.get("out_shape", [-1])
        return {"family": self.name, "name": name,
                "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, config["in_features"]]}],
                "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, *out[1:]]}]}


FAMILY = register_family(CustomFamily())
