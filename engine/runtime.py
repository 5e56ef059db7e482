"""Loads an artifact into a ready nn.Module (`engine.load`) and runs it offline (the `run` verb).

The model is built on the meta device by its family (engine.models) from the artifact's
architecture, its linear layers swapped for SparseLinear skeletons in the recorded layouts, and
filled with `load_state_dict(assign=True)`: the module takes the tensors `artifact.read` returns as
they are, without a copy of its own, and nothing is executed from the file. Sparse buffers are
validated once here, so the kernels can trust them afterwards.

Memory: `artifact.read` memory-maps the file (`safe_open`) and hands out copy-on-write tensors over
its pages, so the weights exist once while loading (peak RSS within 1.2x the artifact's size,
tested). After loading, derived layouts the CPU kernels prepare and cache (engine/cpu.py) and a
`device=` other than the CPU add copies of their own.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

from . import artifact as artifact_io
from .artifact import ArtifactError
from . import formats
from .formats import FormatError
from .models import InputError, get_family
from .modules import SparseLinear


def _meta_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device="meta")


def _skeleton(fn: str, model: nn.Module, name: str, layer: dict, tensors: dict) -> None:
    """Replaces the nn.Linear at `name` with a meta-device SparseLinear of the recorded layout."""
    try:
        linear = model.get_submodule(name)
    except AttributeError:
        raise ArtifactError(f"{fn}: layer {name!r} is not a module of the {type(model).__name__} "
                            "the architecture builds") from None
    if not isinstance(linear, (nn.Linear, SparseLinear)):
        raise ArtifactError(f"{fn}: layer {name!r} is a {type(linear).__name__}, not a linear layer")
    shape = (linear.out_features, linear.in_features)
    if list(shape) != layer["shape"]:
        raise ArtifactError(f"{fn}: layer {name!r} is {list(shape)} in the architecture but "
                            f"{layer['shape']} in the layer table")
    fmt = formats.get(layer["format"])
    weight = fmt.from_buffers(tuple(_meta_like(tensors[f"{name}.{b}"]) for b in fmt.buffers), shape, True)
    bias = tensors.get(f"{name}.bias")
    layer_module = SparseLinear(weight, None if bias is None else _meta_like(bias))
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, layer_module)


def _validate_layers(fn: str, model: nn.Module, layers: dict) -> None:
    """The one full check of each layer's loaded buffers; forward trusts them afterwards."""
    for name, layer in layers.items():
        m = model.get_submodule(name)
        try:
            m.validate()  # runs the layout's own checks on the loaded buffers
        except FormatError as e:
            raise ArtifactError(f"{fn}: layer {name!r} has an invalid {m.format} layout: {e}") from e
        block = formats.get(m.format).blocksize(m.sparse_weight)
        if block is not None and list(block) != list(layer.get("block") or []):
            raise ArtifactError(f"{fn}: layer {name!r} stores blocks {block} but the layer "
                                f"table says {layer.get('block')}")


def load(path: str | os.PathLike, device: str | torch.device = "cpu", *, trust_module: bool = False,
         backend: str = "auto", verify_key=None) -> nn.Module:
    """Artifact -> nn.Module in eval mode, linear layers SparseLinear, with `.spec` (the inputs and
    outputs it serves) and `.arch` (the artifact's {"family", "config"}).

    trust_module: a `custom` artifact names a Python factory (`pkg.mod:factory`); importing it runs
    code, so it is refused unless the caller opts in here.
    backend: passed to every SparseLinear ("auto", "cpu", "triton", "torch").
    verify_key: an Ed25519 public key or its PEM path (`sparse-engine keygen`): refuse the artifact
    (engine.signing.SignatureError) unless it is signed by that key and unedited since.
    """
    fn = f"engine.load({str(path)!r})"
    meta, tensors = artifact_io.read(path, verify_key=verify_key)
    arch = meta["arch"]
    fam = get_family(arch["family"])
    config = arch["config"]
    untrusted = fam.needs_trust(config)
    if untrusted and not trust_module:
        raise ArtifactError(f"{fn}: {untrusted}. Pass trust_module=True (CLI: --trust-module) if you trust it")
    tok_meta = meta.get("tokenizer")
    tok_bytes = tensors.pop(tok_meta["tensor"]) if tok_meta else None
    with torch.device("meta"):
        model = fam.build(config)
    for name, layer in meta["layers"].items():
        _skeleton(fn, model, name, layer, tensors)
    try:
        model.load_state_dict(tensors, strict=True, assign=True)
    except RuntimeError as e:
        raise ArtifactError(f"{fn}: the tensors do not fit the {arch['family']} architecture: {e}") from e
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise ArtifactError(f"{fn}: tensors {left[:5]} are not in the artifact")
    _validate_layers(fn, model, meta["layers"])
    fam.prepare_runtime(model, config)
    for m in model.modules():
        if isinstance(m, SparseLinear):
            m.backend = backend
    tokenizer = None
    if tok_bytes is not None:
        from tokenizers import Tokenizer
        tokenizer = Tokenizer.from_str(bytes(tok_bytes.numpy()).decode("utf-8"))
    fam.attach_tokenizer(model, config, tokenizer)
    model = model.to(device).eval().requires_grad_(False)
    model.arch = arch  # {"family", "config"}: what bench and tools need to make inputs
    model.spec = fam.spec(config, Path(path).stem, model)
    return model


# ----------------------------------------------------------------------------- the `run` verb

def configure(parser) -> None:
    parser.add_argument("artifact", help="artifact written by `sparse-engine convert`")
    parser.add_argument("--input", help=".npy (the model's first input) or .npz (arrays named after "
                                        "the model's inputs, e.g. input_ids and attention_mask)")
    parser.add_argument("--text", action="append", help="a text to run (models with a text input, "
                                                        "e.g. a BERT artifact with a tokenizer); repeat for a batch")
    parser.add_argument("-o", "--output", help="y.npy, or y.json for JSON; default: JSON on stdout")
    parser.add_argument("--device", default="cpu", help="cpu | cuda (default cpu)")
    parser.add_argument("--trust-module", action="store_true",
                        help="allow a custom artifact to import its Python factory")
    parser.add_argument("--verify-key", metavar="PUB",
                        help="Ed25519 public key (PEM, from `sparse-engine keygen`): refuse the artifact "
                             "unless it is signed by this key and unedited")


def _inputs(args, spec: dict) -> dict:
    """The command line's inputs -> {input name: ndarray in the declared dtype, or list[str]}."""
    import numpy as np
    if args.text:
        text = [i["name"] for i in spec["inputs"] if i["datatype"] == "BYTES"]
        if not text:
            raise SystemExit(f"sparse-engine run: --text needs a model with a text input; this one takes "
                             f"{[i['name'] for i in spec['inputs']]}")
        return {text[0]: list(args.text)}
    if not args.input:
        raise SystemExit("sparse-engine run: give --input FILE (or --text for a model with a text input)")
    data = np.load(args.input, allow_pickle=False)  # np.load tells .npy from .npz by their magic bytes
    arrays = dict(data) if hasattr(data, "files") else {spec["inputs"][0]["name"]: data}
    names = [i["name"] for i in spec["inputs"] if i["datatype"] != "BYTES"]
    unknown = sorted(set(arrays) - set(names))
    if unknown or names[0] not in arrays:
        raise SystemExit(f"sparse-engine run: inputs {sorted(arrays)} do not match the model's "
                         f"{names} (the first is required)")
    out = {}
    for i in spec["inputs"]:
        if i["name"] not in arrays:
            continue
        a = arrays[i["name"]]
        if i["datatype"] == "FP32":
            if a.dtype.kind != "f":
                raise SystemExit(f"sparse-engine run: input {i['name']!r} must be floating point, got {a.dtype}")
            if a.shape[-1:] != tuple(i["shape"][-1:]):
                raise SystemExit(f"sparse-engine run: input {i['name']!r} has shape {tuple(a.shape)}, "
                                 f"expected last dimension {i['shape'][-1]}")
            out[i["name"]] = np.ascontiguousarray(a, dtype=np.float32)
        else:
            if a.dtype.kind not in "iu":
                raise SystemExit(f"sparse-engine run: input {i['name']!r} must be integers, got {a.dtype}")
            out[i["name"]] = np.ascontiguousarray(a, dtype=np.int64)
    return out


def main(args) -> int:
    import numpy as np
    try:
        model = load(args.artifact, args.device, trust_module=args.trust_module, verify_key=args.verify_key)
    except ValueError as e:  # ArtifactError, SignatureError: the message names the file and the problem
        raise SystemExit(f"sparse-engine run: {e}") from None
    fam, spec = get_family(model.spec["family"]), model.spec
    # The same mapping of inputs onto the model as the server's (the family's request + run).
    try:
        item, outputs = fam.request(model, spec, _inputs(args, spec), None)
    except InputError as e:
        raise SystemExit(f"sparse-engine run: {e}") from None
    with torch.inference_mode():
        y = fam.run(model, spec, [item], torch.device(args.device))[0][outputs[0]]
    if args.output and not args.output.endswith(".json"):
        np.save(args.output, y)
    else:
        doc = json.dumps({"name": outputs[0], "datatype": "FP32", "shape": list(y.shape), "data": y.tolist()})
        if args.output:
            Path(args.output).write_text(doc)
        else:
            sys.stdout.write(doc + "\n")
    return 0
