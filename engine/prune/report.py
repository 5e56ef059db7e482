"""The report beside a pruned checkpoint: `<ckpt stem>.report.json` and `.report.png`.

The JSON carries what the converter needs to rebuild the model (`architecture`), what a reader
needs to trust the result (dense and final accuracy, per-layer sparsity measured from the saved
weights) and every step of the run (each search trial with its per-epoch history)."""
from __future__ import annotations

import json
import os
from pathlib import Path

from torch import nn

from .masks import unwrap


def describe_architecture(model: nn.Module, factory: str | None = None) -> dict:
    """`{"family": "mlp", "sizes": [...], "activation": ...}` for an nn.Sequential of nn.Linear
    layers with one activation kind between them; otherwise {"family": "custom", "factory": ...}."""
    model = unwrap(model)
    acts = {nn.ReLU: "relu", nn.GELU: "gelu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid"}
    if isinstance(model, nn.Sequential) and len(model) and isinstance(model[0], nn.Linear) \
            and isinstance(model[-1], nn.Linear):
        kinds = [type(m) for m in model]
        linears = [m for m in model if isinstance(m, nn.Linear)]
        between = kinds[1::2]
        if kinds[0::2] == [nn.Linear] * len(linears) and len(set(between)) <= 1 \
                and all(k in acts for k in between) \
                and all(a.out_features == b.in_features for a, b in zip(linears, linears[1:])):
            return {"family": "mlp", "sizes": [linears[0].in_features] + [m.out_features for m in linears],
                    "activation": acts[between[0]] if between else "relu"}
    return {"family": "custom", "class": type(model).__name__, "factory": factory}


def report_paths(checkpoint: str | os.PathLike) -> tuple[Path, Path]:
    """pruned.pt -> (pruned.report.json, pruned.report.png)."""
    ckpt = Path(checkpoint)
    stem = ckpt.with_suffix("") if ckpt.suffix else ckpt
    return stem.with_name(stem.name + ".report.json"), stem.with_name(stem.name + ".report.png")


def write_json(report: dict, path: Path) -> None:
    path.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")


def plot(report: dict, path: Path) -> None:
    """Validation (and test) accuracy against sparsity for every trial, with the dense accuracy and
    the target line; for a single trial, its per-epoch curve."""
    import matplotlib
    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    trials = report["steps"]
    pts = sorted(trials, key=lambda t: t["sparsity"])
    ax.plot([t["sparsity"] for t in pts], [t["val_accuracy"] for t in pts], "o-", label="validation")
    ax.plot([t["sparsity"] for t in pts], [t["test_accuracy"] for t in pts], "s--", label="test")
    for i, t in enumerate(trials):
        ax.annotate(str(i + 1), (t["sparsity"], t["val_accuracy"]), textcoords="offset points",
                    xytext=(3, 3), fontsize=7)
    if len(trials) == 1:
        # One trial: show its epochs too, which is where a gradual schedule's steps live.
        hist = trials[0]["epochs"]
        ax.plot([h["sparsity"] for h in hist], [h["val_accuracy"] for h in hist], ".:", alpha=0.6,
                label="per epoch (val)")
    ax.axhline(report["dense"]["val_accuracy"], color="gray", lw=1, label="dense (val)")
    if (report.get("search") or {}).get("threshold") is not None:
        ax.axhline(report["search"]["threshold"], color="red", lw=1, ls=":", label="target")
    ax.set_xlabel("sparsity of pruned layers")
    ax.set_ylabel("accuracy")
    cfg = report["config"]
    ax.set_title(f"{cfg['method']} / {cfg['granularity']} / {cfg['scope']} / {cfg['schedule']}", fontsize=9)
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
