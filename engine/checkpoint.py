"""Reads every pruned-checkpoint kind into one shape: weights with the masks applied, plus the masks.

Kinds, told apart by their content (never by the file name):
    torch file        zip (torch.save) or legacy pickle, loaded with `weights_only=True` only
    safetensors       8-byte little-endian header length, then a JSON header
    Hugging Face dir  config.json + model.safetensors (or pytorch_model.bin), optional
                      tokenizer.json and sentence-transformers' pooling/normalize configs

Masks: `torch.nn.utils.prune` leaves `<p>_orig` + `<p>_mask`; the pruning verb writes `<p>` plus
`<p>_mask`. Either way the mask decides what is kept: the weight becomes `orig * mask`, and the
mask travels on so a kept weight that fine-tuning drove to exactly 0 stays stored.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """The checkpoint cannot be read, or its masks do not fit its weights."""


@dataclass
class Checkpoint:
    kind: str                                  # "torch" | "safetensors" | "hf"
    tensors: dict[str, torch.Tensor]           # weights with masks applied, mask keys removed
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # weight key -> bool mask
    hf_config: dict | None = None              # config.json of a Hugging Face folder
    tokenizer_json: str | None = None          # tokenizer.json contents, when present
    extras: dict = field(default_factory=dict)  # pooling / max_seq_length / report arch hints
    path: Path | None = None                   # where it was read from: a family may read more files


def sniff(path: Path) -> str:
    """"hf" | "safetensors" | "torch", from the file's first bytes (or a folder's contents)."""
    fn = f"checkpoint.sniff({str(path)!r})"
    if path.is_dir():
        if (path / "config.json").is_file():
            return "hf"
        raise CheckpointError(f"{fn}: a folder checkpoint needs config.json (Hugging Face layout)")
    if not path.is_file():
        raise CheckpointError(f"{fn}: no such file or folder")
    with open(path, "rb") as f:
        head = f.read(9)
    if head[:2] == b"PK" or head[:1] == b"\x80":  # torch.save's zip, or its legacy pickle format
        return "torch"
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size:
        return "safetensors"
    raise CheckpointError(f"{fn}: unrecognised content (first bytes {head!r}): expected a torch.save "
                          "file, a safetensors file or a Hugging Face model folder")


def _load_torch(path: Path) -> dict[str, torch.Tensor]:
    fn = f"checkpoint.read({str(path)!r})"
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses arbitrary pickles: say so rather than retry unsafely
        raise CheckpointError(f"{fn}: torch.load(weights_only=True) failed; only plain state_dicts "
                              f"of tensors are accepted (no pickled modules): {e}") from e
    # Common wrappers: {"state_dict": {...}} / {"model": {...}}
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(obj.get(key), dict) and all(isinstance(v, torch.Tensor) for v in obj[key].values()):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{fn}: expected a non-empty state_dict (dict of tensors), got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{fn}: state_dict entries {bad[:5]} are not tensors")
    return dict(obj)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"checkpoint.read({str(path)!r}): not a readable safetensors file: {e}") from e


def split_masks(raw: dict[str, torch.Tensor], fn: str = "checkpoint") -> tuple[dict, dict]:
    """-> (weights with masks applied, {weight key: bool mask})."""
    tensors, masks = {}, {}
    for key, value in raw.items():
        if key.endswith("_mask"):
            continue
        if key.endswith("_orig") and key[:-5] + "_mask" in raw:
            tensors[key[:-5]] = value
        else:
            tensors[key] = value
    for key, mask in raw.items():
        if not key.endswith("_mask"):
            continue
        target = key[:-5]
        if target not in tensors:
            raise CheckpointError(f"{fn}: mask {key!r} has no weight {target!r} (or {target + '_orig'!r})")
        w = tensors[target]
        if tuple(mask.shape) != tuple(w.shape):
            raise CheckpointError(f"{fn}: mask {key!r} has shape {tuple(mask.shape)} but weight "
                                  f"{target!r} has shape {tuple(w.shape)}")
        keep = mask != 0
        masks[target] = keep
        tensors[target] = w * keep.to(w.dtype)  # the mask decides: pruned positions become exact zeros
    return tensors, masks


def _read_hf(path: Path) -> Checkpoint:
    fn = f"checkpoint.read({str(path)!r})"
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{fn}: config.json is not valid JSON: {e}") from e
    if (path / "model.safetensors").is_file():
        raw = _load_safetensors(path / "model.safetensors")
    elif (path / "pytorch_model.bin").is_file():
        raw = _load_torch(path / "pytorch_model.bin")
    else:
        raise CheckpointError(f"{fn}: folder has config.json but no model.safetensors or pytorch_model.bin")
    tensors, masks = split_masks(raw, fn)
    tok = path / "tokenizer.json"
    extras = {}
    # sentence-transformers' folder layout: pooling mode, max length and normalisation.
    pooling = path / "1_Pooling" / "config.json"
    if pooling.is_file():
        cfg = json.loads(pooling.read_text())
        modes = [m for m in ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens")
                 if cfg.get(f"pooling_mode_{m}")]
        extras["pooling"] = {"cls_token": "cls", "mean_tokens": "mean", "max_tokens": "max",
                             "mean_sqrt_len_tokens": "mean_sqrt_len"}[modes[0]] if len(modes) == 1 else modes
    sbert = path / "sentence_bert_config.json"
    if sbert.is_file():
        extras["max_seq_length"] = json.loads(sbert.read_text()).get("max_seq_length")
    modules = path / "modules.json"
    if modules.is_file():
        extras["normalize"] = any(m.get("type", "").endswith("Normalize") for m in json.loads(modules.read_text()))
    return Checkpoint("hf", tensors, masks, config, tok.read_text() if tok.is_file() else None, extras, path)


def read(path: str | os.PathLike) -> Checkpoint:
    """Reads a pruned checkpoint of any supported kind (see the module docstring)."""
    path = Path(path)
    kind = sniff(path)
    if kind == "hf":
        return _read_hf(path)
    raw = _load_torch(path) if kind == "torch" else _load_safetensors(path)
    tensors, masks = split_masks(raw, f"checkpoint.read({str(path)!r})")
    extras = {}
    # The pruning verb writes `<stem>.report.json` beside the checkpoint with the architecture.
    report = path.with_name(path.stem + ".report.json")
    if report.is_file():
        try:
            doc = json.loads(report.read_text())
            arch = doc.get("architecture", doc.get("arch"))
        except (json.JSONDecodeError, AttributeError):
            arch = None
        if isinstance(arch, dict):
            extras["arch"] = arch
    return Checkpoint(kind, tensors, masks, extras=extras, path=path)
