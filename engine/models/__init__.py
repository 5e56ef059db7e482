"""Model families: what the engine knows about one kind of model, in one file each, behind a registry.

A family is an instance of a `Family` subclass, registered with `register_family(...)` and found by
name (`get_family`), or by a checkpoint it recognises. Convert, load, bench, `run` and the server
reach a model only through these methods, so a new family (a decoder LM, a vision model) is one new
file: subclass, override, `register_family(MyFamily())` when the file is imported. The built-ins
are `mlp`, `bert` and `custom` (a user's factory given at convert time).

Convert (offline, engine.convert):
    name / arch_prefix / arch_help   artifact name; `--arch PREFIX[:OPTION]`; the forms, for messages
    recognise(ck) -> option | None   claims a checkpoint given without --arch
    parse_option(option, arch)       `--arch PREFIX:OPTION` -> option dict (ArchError if not taken)
    from_checkpoint(ck, option)      -> (config, state_dict, masks), canonical names (ArchError)
    tokenizer_json(ck)               tokenizer.json text the artifact should carry, or None
    example_inputs(config, batch, generator, seq=16) -> tuple   random inputs: verification, bench
    verify_batch                     the rows (sequences) verification runs
    observe_output(config, output)   -> config, after the verification's dense run (e.g. out shape)
Load (engine.load):
    needs_trust(config) -> str|None  why loading would run user code (refused unless trusted)
    build(config) -> nn.Module       the dense model, under whatever device context is active
    prepare_runtime(model, config)   structural steps once SparseLinear is in (activation fusion)
    attach_tokenizer(model, config, tokenizer)   the artifact's tokenizer (or None)
    spec(config, name, model) -> dict            the v2 contract: {"family", "name", "inputs",
                                                 "outputs", extra keys = metadata parameters}
Serve and `run` (engine.serve.runner, the `run` verb):
    request(model, spec, inputs, outputs) -> (item, outputs)   one parsed request (inputs: name ->
        ndarray in the declared dtype, list[str] for BYTES; outputs: names asked for or None) ->
        the family's work item and the outputs to answer; InputError for what the model cannot take.
        Runs on the server's event loop: cheap checks and tokenizing only.
    run(model, spec, items, device) -> [{output: ndarray}]     one forward pass for a batch of
        items, split back per item (rows in, rows out); on the batch thread, under inference_mode.
    output_shapes(spec, item, outputs) -> {output: shape|None}   before running: what the answer
        will hold (None where only running tells), so a server can refuse an oversized answer.
    warmup_requests(model, spec, rows) -> [(inputs, outputs)]  what warm-up sends.

The base class serves the common case: every declared input required, each concatenated along the
batch dimension, `model(*inputs)` once, every output split back by rows.
"""
from __future__ import annotations

import importlib
import re

import numpy as np
import torch
from torch import nn


class ArchError(ValueError):
    """The architecture is unknown, or the checkpoint's tensors do not fit it."""


class InputError(ValueError):
    """A request (or `run` input) this model cannot take; the server answers 400 with the message."""


def natural_key(name: str):
    """'layers.10.weight' sorts after 'layers.2.weight' (safetensors stores keys alphabetically)."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


class Family:
    """One model family; see the module docstring for the protocol. Instances hold no state."""

    name = ""
    arch_prefix: str | None = None  # None: the same as `name`
    arch_help = ""
    verify_batch = 16

    # -- convert ----------------------------------------------------------------------------
    def recognise(self, ck) -> dict | None:
        return None

    def parse_option(self, option: str, arch: str) -> dict:
        if option:
            raise ArchError(f"convert: unknown architecture {arch!r}: the {self.name} family takes no "
                            f"option; expected {self.arch_help or self.name}")
        return {}

    def from_checkpoint(self, ck, option: dict) -> tuple[dict, dict, dict]:
        raise NotImplementedError(f"family {self.name!r} does not convert checkpoints")

    def tokenizer_json(self, ck) -> str | None:
        return None

    def example_inputs(self, config: dict, batch: int, generator: torch.Generator, seq: int = 16) -> tuple:
        raise NotImplementedError(f"family {self.name!r} gives no example inputs")

    def observe_output(self, config: dict, output) -> dict:
        return config

    # -- load -------------------------------------------------------------------------------
    def needs_trust(self, config: dict) -> str | None:
        return None

    def build(self, config: dict) -> nn.Module:
        raise NotImplementedError(f"family {self.name!r} does not build models")

    def prepare_runtime(self, model: nn.Module, config: dict) -> None:
        pass

    def attach_tokenizer(self, model: nn.Module, config: dict, tokenizer) -> None:
        pass

    def spec(self, config: dict, name: str, model: nn.Module) -> dict:
        raise NotImplementedError(f"family {self.name!r} declares no inputs and outputs")

    # -- serve ------------------------------------------------------------------------------
    def request(self, model: nn.Module, spec: dict, inputs: dict, outputs: list[str] | None):
        missing = [t["name"] for t in spec["inputs"] if t["name"] not in inputs]
        if missing:
            raise InputError(f"missing input {', '.join(repr(n) for n in missing)}")
        return inputs, outputs or [t["name"] for t in spec["outputs"]]

    def run(self, model: nn.Module, spec: dict, items: list, device) -> list[dict]:
        merged = [torch.from_numpy(np.ascontiguousarray(np.concatenate([it[t["name"]] for it in items])))
                  .to(device) for t in spec["inputs"]]
        result = named_outputs(model(*merged), [t["name"] for t in spec["outputs"]])
        return split_rows(result, [len(next(iter(it.values()))) for it in items])

    def output_shapes(self, spec: dict, item, outputs: list[str]) -> dict:
        rows = len(next(iter(item.values())))
        declared = {t["name"]: t["shape"] for t in spec["outputs"]}
        return {n: None if -1 in declared[n][1:] else [rows, *declared[n][1:]] for n in outputs}

    def warmup_requests(self, model: nn.Module, spec: dict, rows: int) -> list[tuple[dict, list | None]]:
        # Ones are valid in every declared tensor (a token id, a mask value, a feature).
        inputs = {t["name"]: np.ones([rows] + [d if d >= 0 else 8 for d in t["shape"][1:]],
                                     np.float32 if t["datatype"].startswith("FP") else np.int64)
                  for t in spec["inputs"] if t["datatype"] != "BYTES"}
        return [(inputs, None)]


# -- helpers for a family's `run` ---------------------------------------------------------------

def to_numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float32).numpy()
    return np.asarray(value, dtype=np.float32)


def named_outputs(result, names: list[str]) -> dict:
    """A model's return value (tensor, tuple, dict or object with attributes) -> {name: value}."""
    if isinstance(result, torch.Tensor):
        return {names[0]: result}
    if isinstance(result, dict):
        return {n: result[n] for n in names if n in result}
    if isinstance(result, (tuple, list)):
        return dict(zip(names, result))
    return {n: getattr(result, n) for n in names if hasattr(result, n)}


def split_rows(outputs: dict, rows: list[int]) -> list[dict]:
    """{name: (sum(rows), ...)} -> one {name: (rows_i, ...)} per item, as float32 numpy."""
    arrays = {name: to_numpy(value) for name, value in outputs.items()}
    for name, a in arrays.items():
        if a.shape[0] != sum(rows):
            raise RuntimeError(f"output '{name}' has {a.shape[0]} rows for {sum(rows)} input rows")
    parts, start = [], 0
    for n in rows:
        parts.append({name: a[start:start + n] for name, a in arrays.items()})
        start += n
    return parts


# -- the registry -------------------------------------------------------------------------------

_FAMILIES: dict[str, Family] = {}
# Imported on first lookup (each registers itself), so `import engine.models` stays cheap and the
# built-in files may import this module without a cycle.
BUILTINS = ("engine.models.mlp", "engine.models.bert", "engine.models.custom")


def register_family(family: Family) -> Family:
    """Makes `family` known to convert, load and serve; returns it. A name is registered once."""
    if not isinstance(family, Family) or not family.name:
        raise TypeError(f"register_family: expected a Family instance with a name, got {family!r}")
    taken = _FAMILIES.get(family.name)
    if taken is not None and taken is not family:
        raise ArchError(f"register_family: a family named {family.name!r} is already registered "
                        f"({type(taken).__module__}.{type(taken).__qualname__})")
    _FAMILIES[family.name] = family
    return family


def families() -> list[Family]:
    """Every registered family (the built-ins imported first time round), in registration order."""
    for module in BUILTINS:
        importlib.import_module(module)
    return list(_FAMILIES.values())


def get_family(name: str) -> Family:
    known = {f.name: f for f in families()}
    if name not in known:
        raise ArchError(f"unknown architecture family {name!r}; registered families are {sorted(known)} "
                        "(a family's module must be imported, and register itself, before its "
                        "artifacts load)")
    return known[name]


def family_for_arch(prefix: str) -> Family | None:
    """The family whose `--arch` prefix is `prefix` (e.g. 'mlp', 'bert', 'module')."""
    return next((f for f in families() if (f.arch_prefix or f.name) == prefix), None)
