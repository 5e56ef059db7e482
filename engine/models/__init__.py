"""Built-in model families, runnable from an artifact's metadata alone (no user code).

A family is a module with:
    from_checkpoint(ck, option) -> (config, state_dict, masks)  canonical names; raises ArchError
    build(config) -> nn.Module       the dense model; built under whatever device context is active
    prepare_runtime(model, config)   load-time structural steps (activation fusion, ...)
    example_inputs(config, batch, generator) -> tuple   random inputs for convert's verification
    spec(config, name, tokenizer) -> dict               the inputs/outputs contract servers read
"""
from __future__ import annotations

import re


class ArchError(ValueError):
    """The architecture is unknown, or the checkpoint's tensors do not fit it."""


def natural_key(name: str):
    """'layers.10.weight' sorts after 'layers.2.weight' (safetensors stores keys alphabetically)."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def family(name: str):
    from . import bert, custom, mlp
    families = {"mlp": mlp, "bert": bert, "custom": custom}
    if name not in families:
        raise ArchError(f"unknown architecture family {name!r}; built-in families are "
                        f"{sorted(families)} (or 'module:pkg.mod:factory' at convert time)")
    return families[name]
