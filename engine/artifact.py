"""The sparse artifact: one safetensors file whose header metadata (key `sparse_engine`) is a JSON
document describing the model; nothing in it is code, and reading it never unpickles anything.

Metadata (format_version 1):
    format_version  int
    producer        "sparse-engine <version>"
    arch            {"family": "mlp" | "bert" | "custom", "config": {...}}
    layers          {qualified name: {"format", "block", "dtype", "shape", "sparsity", "bytes",
                     "dense_bytes", "reason"}}   one entry per linear layer
    tokenizer       null | {"tensor": name of a uint8 tensor holding tokenizer.json, ...}
    verification    what `convert` measured before it wrote the file
    target          {"device", "isa", "cost_model"}: what the layouts were chosen for (the device,
                    the CPU kernels' ISA the cost model predicted, the cost model's fit date);
                    absent in files written before it was recorded
    tensors         {name: {"sha256", "dtype", "shape"}}   one entry per tensor in the file
    meta_sha256     sha256 of the canonical JSON of every other field, so an edited header fails too

A signed artifact also holds, beside the metadata in the header, key `sparse_engine_signature`:
an Ed25519 signature of the metadata (engine.signing), checked when a verify key is given.

A layer's format names a layout of the registry (engine.formats), whose description lists the
tensors the layer must have. `write` is atomic (temporary file + rename): a crash never leaves a
half-written artifact behind. `read` memory-maps the file: the tensors it returns are views of the
mapping (copy-on-write, so the file is never modified), each checksummed and checked finite once,
page by page, with no second copy of the weights in memory. A loaded model keeps the file mapped:
replace an artifact by writing a new file and renaming it over the old (as `write` does), never
by rewriting it in place.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from . import formats, signing

FORMAT_VERSION = 1
META_KEY = "sparse_engine"
DTYPE_NAMES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ArtifactError(ValueError):
    """The file is not a valid sparse artifact: truncated, altered, or of an unknown version."""


def dtype_name(dtype: torch.dtype) -> str:
    for name, dt in DTYPE_NAMES.items():
        if dt == dtype:
            return name
    raise ArtifactError(f"artifact: weight dtype {dtype} is not one of {sorted(DTYPE_NAMES)}")


def tensor_sha256(t: torch.Tensor) -> str:
    # Raw little-endian bytes of the contiguous tensor: the same bytes safetensors stores. Hashed
    # through a view, not a bytes copy: a memory-mapped tensor is read once, page by page.
    flat = t.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy()).hexdigest()


def _finite(t: torch.Tensor) -> bool:
    # A finite sum proves every element finite and needs no temporary as large as the tensor; only a
    # non-finite sum (a NaN/Inf, or an overflow of the sum itself) needs the element-wise check.
    return not t.numel() or bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def layout_target(device: str = "cpu") -> dict:
    """What convert chose the layouts for: recorded as the artifact's `target`."""
    from . import costmodel
    if device == "cuda":
        return {"device": "cuda", "isa": None, "cost_model": costmodel.GPU_FITTED["date"]}
    return {"device": device, "isa": costmodel.current_isa(), "cost_model": costmodel.CPU_FITTED["date"]}


def _meta_digest(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict, *, sign_key=None) -> dict:
    """Writes `tensors` with `meta` (arch, layers, tokenizer, verification, target); adds the
    version, per-tensor checksums and the header digest, and, when `meta` has no `target`, the
    target of this process (device from meta["source"]["device"], default cpu; this machine's
    kernel ISA). `sign_key` (an Ed25519 private key or its PEM path) adds a signature of the
    metadata (engine.signing). Returns the metadata as written."""
    from safetensors.torch import save_file

    from .version import __version__

    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = dict(meta, format_version=FORMAT_VERSION, producer=f"sparse-engine {__version__}")
    if meta.get("target") is None:
        meta["target"] = layout_target((meta.get("source") or {}).get("device", "cpu"))
    meta["tensors"] = {k: {"sha256": tensor_sha256(v), "dtype": str(v.dtype).removeprefix("torch."),
                           "shape": list(v.shape)} for k, v in sorted(tensors.items())}
    meta["meta_sha256"] = _meta_digest(meta)
    _check_structure(str(path), meta, tensors)  # never write a file `read` would refuse
    _check_finite(str(path), tensors)
    header = {META_KEY: json.dumps(meta)}
    if sign_key is not None:
        header[signing.SIGNATURE_KEY] = signing.sign(meta, sign_key)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent or ".")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=header)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return meta


def read_meta(path: str | os.PathLike) -> dict:
    """The metadata alone (header only, no tensor data read), its digest verified."""
    from safetensors import safe_open

    fn = f"artifact.read_meta({str(path)!r})"
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises its own error types for a bad header
        raise ArtifactError(f"{fn}: not a readable safetensors file (truncated or corrupted?): {e}") from e
    return _parse_meta(fn, header)


def _parse_meta(fn: str, header: dict) -> dict:
    if META_KEY not in header:
        raise ArtifactError(f"{fn}: no '{META_KEY}' metadata: this safetensors file is not a "
                            "sparse-engine artifact (convert a checkpoint with `sparse-engine convert`)")
    try:
        meta = json.loads(header[META_KEY])
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{fn}: metadata is not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise ArtifactError(f"{fn}: metadata must be a JSON object, got {type(meta).__name__}")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(f"{fn}: format_version {version!r} is not supported (this engine reads "
                            f"version {FORMAT_VERSION})")
    if meta.get("meta_sha256") != _meta_digest(meta):
        raise ArtifactError(f"{fn}: metadata checksum mismatch: the header was altered after convert")
    return meta


def read(path: str | os.PathLike, *, verify_key=None) -> tuple[dict, dict[str, torch.Tensor]]:
    """-> (metadata, tensors) after checking the file's structure, every tensor's sha256 and that
    every floating tensor is finite. The tensors are copy-on-write views of the memory-mapped file.
    `verify_key` (an Ed25519 public key or its PEM path): also require a valid signature of the
    metadata by that key (engine.signing.SignatureError otherwise), checked before any tensor."""
    from safetensors import safe_open

    fn = f"artifact.read({str(path)!r})"
    size = os.stat(path).st_size  # FileNotFoundError as is
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ArtifactError(f"{fn}: file is {size} bytes long: truncated (a safetensors file "
                                "starts with an 8-byte header length)")
        header_len = int.from_bytes(head, "little")
        if 8 + header_len > size:
            raise ArtifactError(f"{fn}: header claims {header_len} bytes but the file holds only "
                                f"{size - 8} after the length: truncated")
        raw = fh.read(header_len)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{fn}: header is not valid JSON (corrupted?): {e}") from e
    if not isinstance(header, dict):
        raise ArtifactError(f"{fn}: header is not a JSON object (corrupted?)")
    meta = _parse_meta(fn, header.get("__metadata__") or {})
    if verify_key is not None:
        signing.verify(fn, meta, (header.get("__metadata__") or {}).get(signing.SIGNATURE_KEY), verify_key)
    try:
        # safe_open maps the file; get_tensor returns views of the mapping, nothing is read yet.
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise ArtifactError(f"{fn}: tensor data does not match the header (truncated or corrupted?): {e}") from e
    _check_structure(fn, meta, tensors)
    for name, info in meta["tensors"].items():  # each tensor's pages read while they are warm
        if tensor_sha256(tensors[name]) != info["sha256"]:
            raise ArtifactError(f"{fn}: checksum mismatch for tensor {name!r}: the file was altered "
                                "or corrupted after convert")
        _check_finite(fn, {name: tensors[name]})
    return meta, tensors


def _check_finite(fn: str, tensors: dict[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        if t.is_floating_point() and not _finite(t):
            raise ArtifactError(f"{fn}: tensor {name!r} holds NaN or Inf values: refusing a "
                                "non-finite weight (the model would answer NaN or garbage)")


def _check_structure(fn: str, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    for key in ("arch", "layers", "tensors"):
        if not isinstance(meta.get(key), dict):
            raise ArtifactError(f"{fn}: metadata field {key!r} is missing or not an object")
    arch = meta["arch"]
    if not isinstance(arch.get("family"), str) or not isinstance(arch.get("config"), dict):
        raise ArtifactError(f"{fn}: arch must be {{'family': str, 'config': {{...}}}}, got {arch!r}")
    listed, present = set(meta["tensors"]), set(tensors)
    if listed != present:
        raise ArtifactError(f"{fn}: tensors in the file {sorted(present - listed)[:5]} and tensors in "
                            f"the metadata {sorted(listed - present)[:5]} differ")
    for name, info in meta["tensors"].items():
        t = tensors[name]
        if list(t.shape) != info.get("shape") or str(t.dtype).removeprefix("torch.") != info.get("dtype"):
            raise ArtifactError(f"{fn}: tensor {name!r} is {str(t.dtype)} {list(t.shape)} but the "
                                f"metadata says {info.get('dtype')} {info.get('shape')}")
    for name, layer in meta["layers"].items():
        fmt = layer.get("format") if isinstance(layer, dict) else None
        if fmt not in formats.names():
            raise ArtifactError(f"{fn}: layer {name!r} has format {fmt!r}; expected one of {formats.names()}")
        if layer.get("dtype") not in DTYPE_NAMES:
            raise ArtifactError(f"{fn}: layer {name!r} has dtype {layer.get('dtype')!r}; "
                                f"expected one of {sorted(DTYPE_NAMES)}")
        shape = layer.get("shape")
        if not (isinstance(shape, list) and len(shape) == 2 and all(isinstance(s, int) and s >= 0 for s in shape)):
            raise ArtifactError(f"{fn}: layer {name!r} has shape {shape!r}; expected [out, in]")
        for buf in formats.get(fmt).buffers:
            if f"{name}.{buf}" not in tensors:
                raise ArtifactError(f"{fn}: layer {name!r} ({fmt}) lacks tensor '{name}.{buf}'")
    tok = meta.get("tokenizer")
    if tok is not None and (not isinstance(tok, dict) or tok.get("tensor") not in tensors):
        raise ArtifactError(f"{fn}: tokenizer entry {tok!r} does not name a tensor in the file")
