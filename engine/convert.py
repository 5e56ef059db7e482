"""The `convert` verb: pruned checkpoint -> verified sparse artifact (offline; the runtime swap
lives in engine.runtime).

    sparse-engine convert CKPT -o ARTIFACT [--format auto|csr|bsr|dense] [--block RxC]
                          [--dtype fp32|bf16|fp16] [--arch mlp:relu|mlp:gelu|mlp:tanh|bert|
                          module:pkg.mod:factory|any registered family's form]

What the model is (its config, canonical tensor names, example inputs) comes from its family
(engine.models); this file knows layouts, verification and the artifact, not architectures.

Before the artifact appears at its path, it is loaded back with `engine.load` and run against the
checkpoint's dense model on random inputs; a mismatch leaves no artifact behind.
"""
from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import torch
from torch import nn

from . import artifact as artifact_io
from . import checkpoint as checkpoint_io
from . import signing
from .artifact import DTYPE_NAMES, ArtifactError
from .checkpoint import CheckpointError
from .formats import FormatError
from .models import ArchError, Family, families, family_for_arch
from .modules import FORMATS, SparseLinear, choose_layout
from .signing import SignatureError

# The kernels compute in fp32 whatever the storage: against a reference whose weights were rounded
# the same way, only summation order differs. Against the original fp32 checkpoint, 16-bit storage
# adds rounding of each weight (unit roundoff 2^-11 fp16, 2^-8 bf16) that a few layers compound.
KERNEL_TOL = 1e-5
STORAGE_TOL = {"fp32": 1e-5, "fp16": 16 * 2.0 ** -11, "bf16": 16 * 2.0 ** -8}
TOKENIZER_TENSOR = "__tokenizer__"


class ConvertError(ValueError):
    """The checkpoint cannot be converted as asked (bad values, bad options, failed verification)."""


def parse_arch(arch: str | None, ck) -> tuple[Family, dict]:
    """--arch (or what the checkpoint says about itself) -> (family, option dict)."""
    forms = " | ".join(f.arch_help or f.name for f in families())
    if arch is None:
        for fam in families():
            option = fam.recognise(ck)
            if option is not None:
                return fam, option
        if ck.kind == "hf":
            mtype = (ck.hf_config or {}).get("model_type")
            raise ArchError(f"convert: unknown architecture: the Hugging Face config has model_type "
                            f"{mtype!r}, which no registered family recognises; pass --arch {forms}")
        factory = (ck.extras.get("arch") or {}).get("factory")
        # Never import the report's factory on our own: code runs only when the user names it.
        extra = f" (the pruning report names the model factory {factory!r})" if factory else ""
        raise ArchError(f"convert: cannot tell the architecture of a bare state_dict; pass --arch {forms}{extra}")
    prefix, _, option = arch.partition(":")
    fam = family_for_arch(prefix)
    if fam is None:
        raise ArchError(f"convert: unknown architecture {arch!r}; expected {forms}")
    return fam, fam.parse_option(option, arch)


def parse_block(block) -> tuple[int, int] | None:
    if block is None or isinstance(block, (tuple, list)):
        return None if block is None else tuple(block)
    parts = str(block).lower().split("x")
    try:
        r, c = (int(p) for p in parts) if len(parts) == 2 else (int(parts[0]),) * 2
    except ValueError:
        raise ConvertError(f"convert: --block must be RxC (e.g. 16x16) or one int, got {block!r}") from None
    if r <= 0 or c <= 0:
        raise ConvertError(f"convert: --block must be positive, got {block!r}")
    return r, c


def _check_finite(tensors: dict[str, torch.Tensor]) -> None:
    for k, t in tensors.items():
        # A finite sum proves every element finite and is far cheaper than isfinite() on big
        # embeddings; only a non-finite sum (NaN/Inf, or overflow) needs the element-wise check.
        if t.is_floating_point() and t.numel() and not torch.isfinite(t.sum()) and not torch.isfinite(t).all():
            raise ConvertError(f"convert: tensor {k!r} holds NaN or Inf values; refusing to convert")


def _load_dense(fam: Family, config: dict, sd: dict) -> nn.Module:
    model = fam.build(config)
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # size mismatches
        raise ArchError(f"convert: the state_dict does not fit the {fam.name} architecture: {e}") from e
    if missing or unexpected:
        raise ArchError(f"convert: the state_dict does not fit the {fam.name} architecture: "
                        f"missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}")
    return model.eval()


def _tensors(y) -> list[torch.Tensor]:
    """A model's output (a tensor, a tuple/list or a dict of tensors) as a flat list."""
    if isinstance(y, torch.Tensor):
        return [y]
    return [t for v in (y.values() if isinstance(y, dict) else y) for t in _tensors(v)]


def _rel_err(y, ref) -> float:
    """Largest ‖y − ref‖ / ‖ref‖ over the outputs."""
    errs = []
    for a, b in zip(_tensors(y), _tensors(ref), strict=True):
        num, den = (a.double() - b.double()).norm(), b.double().norm()
        errs.append(float(num / den) if den > 0 else float(num))
    return max(errs)


def convert(checkpoint: str | os.PathLike, output: str | os.PathLike, *, format: str = "auto",
            block=None, dtype: str = "fp32", arch: str | None = None, batch: int = 8,
            device: str = "cpu", seed: int = 0, sign_key=None, layouts: dict | None = None, log=print) -> dict:
    """Converts, verifies and writes; returns the artifact's metadata (with `verification`).
    sign_key: an Ed25519 private key or its PEM path; the artifact is then signed (engine.signing).
    layouts: {layer name: (format, block or None)} chosen per layer (a latency plan's choice, see
    engine/prune/target.py); the layers it does not name follow `format`."""
    if sign_key is not None:
        sign_key = signing.load_private(sign_key)  # an unusable key fails before the work
    if format not in FORMATS:
        raise ConvertError(f"convert: unknown format {format!r}; expected one of {FORMATS}")
    if dtype not in DTYPE_NAMES:
        raise ConvertError(f"convert: unknown dtype {dtype!r}; expected one of {sorted(DTYPE_NAMES)}")
    block = parse_block(block)
    if block is not None and format != "bsr":
        raise ConvertError(f"convert: --block {block[0]}x{block[1]} needs --format bsr "
                           f"(got --format {format}; auto detects the block from the mask)")
    ck = checkpoint_io.read(checkpoint)
    _check_finite(ck.tensors)
    fam, option = parse_arch(arch, ck)
    config, sd, masks = fam.from_checkpoint(ck, option)
    dense = _load_dense(fam, config, sd)
    wdtype = DTYPE_NAMES[dtype]
    value_bytes = torch.tensor([], dtype=wdtype).element_size()

    tensors, layers = {}, {}
    linear_names = [n for n, m in dense.named_modules() if isinstance(m, nn.Linear)]
    unknown = sorted(set(layouts or {}) - set(linear_names))
    if unknown:
        raise ConvertError(f"convert: layouts name layers the model does not have: {unknown[:5]}; its linear "
                           f"layers are named like {linear_names[:3]}")
    for name in linear_names:
        linear = dense.get_submodule(name)
        mask = masks.get(f"{name}.weight")
        w = linear.weight.detach()
        keep = (w != 0) if mask is None else mask
        if layouts and name in layouts:
            fmt, blk = layouts[name][0], parse_block(layouts[name][1])
            reason = "chosen per layer by the caller (a latency plan)"
        elif format == "auto":
            fmt, blk, reason = choose_layout(w, mask, batch=batch, device=device, value_bytes=value_bytes)
        else:
            fmt, blk, reason = format, block, f"forced by --format {format}"
        try:
            sl = SparseLinear.from_linear(linear, fmt, blk, mask=mask, dtype=wdtype)
        except FormatError as e:
            raise ConvertError(f"convert: layer {name!r}: {e}") from e
        sw = sl.sparse_weight
        o, i = sl.out_features, sl.in_features
        layers[name] = {
            "format": fmt, "block": list(sw.blocksize) if fmt == "bsr" else None, "dtype": dtype,
            "shape": [o, i], "sparsity": 1.0 - float(keep.sum()) / max(1, o * i),
            "stored": o * i if fmt == "dense" else sw.nnz,
            "bytes": sw.numel() * sw.element_size() if fmt == "dense" else sw.nbytes,
            "dense_bytes": o * i * 4, "reason": reason}
        for k, v in sl.state_dict().items():
            tensors[f"{name}.{k}"] = v
    linear_keys = {f"{n}.{p}" for n in linear_names for p in ("weight", "bias")}
    for k, v in dense.state_dict().items():
        if k not in linear_keys:
            tensors[k] = v
    source = {"checkpoint": Path(checkpoint).name, "kind": ck.kind, "format": format, "batch": batch,
              "device": device}
    meta = {"arch": {"family": fam.name, "config": config}, "layers": layers, "tokenizer": None, "source": source}
    tokenizer_json = fam.tokenizer_json(ck)
    if tokenizer_json is not None:
        tensors[TOKENIZER_TENSOR] = torch.frombuffer(bytearray(tokenizer_json.encode("utf-8")), dtype=torch.uint8)
        meta["tokenizer"] = {"tensor": TOKENIZER_TENSOR}

    gen = torch.Generator().manual_seed(seed)
    inputs = fam.example_inputs(config, fam.verify_batch, gen)
    with torch.inference_mode():
        ref = dense(*inputs)
        meta["arch"]["config"] = config = fam.observe_output(config, ref)
        rounded = dense
        if dtype != "fp32":  # the same model with its linear weights stored as the artifact stores them
            rounded = copy.deepcopy(dense)
            for n in linear_names:
                lin = rounded.get_submodule(n)
                lin.weight.copy_(lin.weight.to(wdtype).float())
                if lin.bias is not None:
                    lin.bias.copy_(lin.bias.to(wdtype).float())
        ref_rounded = rounded(*inputs)

    out = Path(output)
    tmp = out.with_name(f".{out.name}.verify")
    artifact_io.write(tmp, tensors, meta)
    try:
        from .runtime import load
        sparse = load(tmp, trust_module=True)  # the user named the factory on this command line
        with torch.inference_mode():
            y = sparse(*inputs)
        err_kernel, err_ckpt = _rel_err(y, ref_rounded), _rel_err(y, ref)
        verification = {"inputs": [list(t.shape) for t in inputs], "seed": seed,
                        "rel_err_vs_checkpoint": err_ckpt, "rel_err_vs_rounded_weights": err_kernel,
                        "tolerance": STORAGE_TOL[dtype]}
        log(f"verify: relative error vs the dense checkpoint {err_ckpt:.2e} (tolerance "
            f"{STORAGE_TOL[dtype]:.1e}, {dtype} weights); vs the same weights rounded to {dtype} "
            f"{err_kernel:.2e} (tolerance {KERNEL_TOL:.0e})")
        if not (err_kernel <= KERNEL_TOL and err_ckpt <= STORAGE_TOL[dtype]):
            raise ConvertError(f"convert: verification failed: the sparse model's outputs differ from the "
                               f"checkpoint's (relative error {err_ckpt:.3e} vs the checkpoint, "
                               f"{err_kernel:.3e} vs rounded weights); no artifact written")
        meta["verification"] = verification
        meta = artifact_io.write(out, tensors, meta, sign_key=sign_key)
    finally:
        if tmp.exists():
            tmp.unlink()
    return meta


def configure(parser) -> None:
    parser.add_argument("checkpoint", help="state_dict .pt, .safetensors, or a Hugging Face BERT folder")
    parser.add_argument("-o", "--output", required=True, help="artifact path (safetensors)")
    parser.add_argument("--format", default="auto", choices=FORMATS,
                        help="layout of every linear layer; auto picks per layer by predicted speed")
    parser.add_argument("--block", help="BSR block RxC (with --format bsr; default: detected from the mask)")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPE_NAMES), help="weight storage dtype")
    parser.add_argument("--arch", help="mlp:relu | mlp:gelu | mlp:tanh | bert | module:pkg.mod:factory, or "
                                       "a registered family's form (default: recognised from the "
                                       "checkpoint's config or pruning report)")
    parser.add_argument("--batch", type=int, default=8, help="rows per call auto optimises for (default 8; for BERT rows are batch x sequence)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="target device for auto")
    parser.add_argument("--seed", type=int, default=0, help="seed of the verification inputs")
    parser.add_argument("--sign-key", metavar="KEY", help="Ed25519 private key (PEM, from `sparse-engine "
                        "keygen`): sign the artifact's metadata, which lists every tensor's sha256")


def main(args) -> int:
    from .inspect import format_table
    try:
        meta = convert(args.checkpoint, args.output, format=args.format, block=args.block,
                       dtype=args.dtype, arch=args.arch, batch=args.batch, device=args.device,
                       seed=args.seed, sign_key=args.sign_key, log=print)
    except (SignatureError, ConvertError, CheckpointError, ArchError, ArtifactError, FormatError) as e:
        print(f"sparse-engine convert: error: {e}", file=sys.stderr)
        return 2
    print(format_table(meta, batches=(args.batch,), device=args.device))
    print(f"wrote {args.output}")
    return 0
