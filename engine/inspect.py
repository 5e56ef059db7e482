"""The `inspect` verb: an artifact's per-layer table (format, block, sparsity, bytes vs dense, the
cost model's predicted speedup) and why `auto` chose each layout. Reads the header only."""
from __future__ import annotations

import sys

from . import costmodel
from .artifact import ArtifactError, read_meta

VALUE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def predicted_speedup(layer: dict, batch: int, device: str = "cpu", isa: str | None = None) -> float:
    """t(dense fp32 F.linear) / t(this layer's layout), both from the cost model (for the CPU
    kernels' `isa`; default this machine's)."""
    shape = tuple(layer["shape"])
    full = shape[0] * shape[1]
    t_dense = costmodel.predict_seconds("dense", shape, full, batch, value_bytes=4, device=device, isa=isa)
    fmt = layer["format"]
    stored = layer.get("stored", full)
    block = tuple(layer["block"]) if layer.get("block") else None
    t = costmodel.predict_seconds(fmt, shape, stored, batch, block, value_bytes=VALUE_BYTES[layer["dtype"]],
                                  device=device, isa=isa)
    return t_dense / t


def format_table(meta: dict, batches=(1, 32), device: str = "cpu") -> str:
    arch = meta["arch"]
    target = meta.get("target") or {}
    # Predict for the ISA the layouts were chosen for, when the artifact records it.
    isa = target.get("isa") if device == "cpu" and target.get("device") == "cpu" else None
    rows = [["layer", "shape", "format", "block", "dtype", "sparsity", "bytes", "dense bytes", "ratio",
             *(f"speedup b{b}" for b in batches), "why"]]
    tot, tot_dense = 0, 0
    for name, layer in meta["layers"].items():
        tot += layer["bytes"]
        tot_dense += layer["dense_bytes"]
        block = "x".join(map(str, layer["block"])) if layer.get("block") else "-"
        rows.append([name, "x".join(map(str, layer["shape"])), layer["format"], block, layer["dtype"],
                     f"{layer['sparsity']:.1%}", f"{layer['bytes']:,}", f"{layer['dense_bytes']:,}",
                     f"{layer['bytes'] / max(1, layer['dense_bytes']):.2f}",
                     *(f"{predicted_speedup(layer, b, device, isa):.2f}x" for b in batches),
                     layer.get("reason", "")])
    rows.append(["total", "", "", "", "", "", f"{tot:,}", f"{tot_dense:,}", f"{tot / max(1, tot_dense):.2f}",
                 *("" for _ in batches), ""])
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths)) + "  " + r[-1] for r in rows]
    head = [f"family {arch['family']}  config {arch['config']}",
            f"format_version {meta.get('format_version')}  producer {meta.get('producer')}  "
            f"tokenizer {'yes' if meta.get('tokenizer') else 'no'}"]
    ver = meta.get("verification")
    if ver:
        head.append(f"verified at convert: relative error {ver['rel_err_vs_checkpoint']:.2e} vs the "
                    f"checkpoint (tolerance {ver['tolerance']:.1e})")
    if target:
        head.append(f"layouts chosen for {target.get('device')}"
                    + (f" ({target['isa']} kernels)" if target.get("isa") else "")
                    + f", cost model of {target.get('cost_model')}")
    else:
        head.append("layouts chosen for: not recorded (artifact written before targets were)")
    fitted = (costmodel.CPU_FITTED if device == "cpu" else costmodel.GPU_FITTED)["date"]
    head.append(f"predicted speedups: cost model fitted {fitted}, {device}"
                + (f" ({isa or costmodel.current_isa()} kernels)" if device == "cpu" else "")
                + ", vs dense fp32 F.linear per layer")
    return "\n".join(head + lines)


def configure(parser) -> None:
    parser.add_argument("artifact", help="artifact written by `sparse-engine convert`")
    parser.add_argument("--batch", type=int, action="append",
                        help="batch size(s) for the predicted speedup (default 1 and 32)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))


def main(args) -> int:
    try:
        meta = read_meta(args.artifact)
    except (ArtifactError, FileNotFoundError) as e:
        print(f"sparse-engine inspect: error: {e}", file=sys.stderr)
        return 2
    print(format_table(meta, tuple(args.batch or (1, 32)), args.device))
    return 0
