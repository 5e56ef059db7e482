"""pytest-benchmark JSON (bench/test_bench_kernels.py) -> markdown table + PNG plot.

    PYTHONPATH=. .venv/bin/python bench/report.py out.json [more.json] --md table.md --png plot.png

Table: one row per (shape, batch, sparsity) with the dense median and every provider's speedup
t(dense)/t(provider); then the best engine BSR and CSR, their issue-7 bars, and the engine's best
against the best torch.sparse. Plot: speedup vs sparsity, one line per provider, one panel per
batch, one row of panels per shape.
"""
from __future__ import annotations

import argparse
import json
from collections import defaultdict


MODELS: dict = defaultdict(dict)


def publish(lines: list[str], out: str | None) -> None:
    """Prints a results table (its lines) and appends it to the file `out` when one is given."""
    table = "\n".join(lines) + "\n"
    print(table)
    if out:
        with open(out, "a") as f:
            f.write("\n" + table)


def model_table() -> str:
    rows = ["| model | batch | sparsity | dense ms | engine ms | speedup |", "|---|---|---|---|---|---|"]
    for (model, n, s), t in sorted(MODELS.items()):
        eng = next((k for k in t if k.startswith("engine")), None)
        if "dense" in t and eng:
            rows.append(f"| {model} ({eng}) | {n} | {s:.2f} | {t['dense'] * 1e3:.2f} | {t[eng] * 1e3:.2f} | "
                        f"{t['dense'] / t[eng]:.2f}x |")
    return "\n".join(rows) if len(rows) > 2 else ""


def load(paths):
    """-> {(O, I, batch, sparsity): {provider: median seconds}}, plus the threads/isa seen."""
    cells: dict = defaultdict(dict)
    meta = set()
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        for b in data["benchmarks"]:
            e = b["extra_info"]
            if "model" in e:  # whole-model rows: kept apart
                MODELS[(e["model"], e["batch"], e["sparsity"])][e["provider"]] = b["stats"]["median"]
                continue
            key = (e["out_features"], e["in_features"], e["batch"], e["sparsity"])
            cells[key][e["provider"]] = b["stats"]["median"]
            meta.add((e["threads"], e["isa"]))
    return cells, meta


def bars(batch: int, s: float):
    """Issue-7 targets: (BSR speedup bar, CSR bar or None). CSR: > 1 from 70 % at batch <= 32,
    >= 0.5/(1-s) at 90 %."""
    bsr = 0.8 / (1 - s) if batch == 1 else (0.6 / (1 - s) if batch >= 32 else None)
    csr = None
    if abs(s - 0.9) < 1e-9:
        csr = 0.5 / (1 - s)
    elif s >= 0.7 - 1e-9 and batch <= 32:
        csr = 1.0
    return bsr, csr


def table(cells) -> str:
    providers = sorted({p for v in cells.values() for p in v if p != "dense"},
                       key=lambda p: (not p.startswith("torch"), not p.startswith("onnx"), p))
    cols = ["O×I", "N", "s", "dense ms"] + providers + ["best BSR", "BSR bar", "CSR", "CSR bar",
                                                        "engine vs torch.sparse"]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for (o, i, n, s), t in sorted(cells.items()):
        d = t.get("dense")
        if d is None:
            continue
        row = [f"{o}x{i}", str(n), f"{s:.2f}", f"{d * 1e3:.3f}"]
        row += [f"{d / t[p]:.2f}" if p in t else "-" for p in providers]
        bsr_names = [p for p in t if p.startswith("engine bsr") and not p.endswith(("bf16", "fp16"))]
        best_bsr = max(bsr_names, key=lambda p: d / t[p], default=None)
        bsr_bar, csr_bar = bars(n, s)
        sb = d / t[best_bsr] if best_bsr else float("nan")
        sc = d / t["engine csr"] if "engine csr" in t else float("nan")
        mark = lambda v, bar: "" if bar is None else (" ✓" if v >= bar else " ✗")
        row += [f"{sb:.2f} ({best_bsr.split()[-1]})" if best_bsr else "-",
                "-" if bsr_bar is None else f"{bsr_bar:.1f}{mark(sb, bsr_bar)}",
                f"{sc:.2f}", "-" if csr_bar is None else f"{csr_bar:.1f}{mark(sc, csr_bar)}"]
        # Engine vs torch.sparse on like terms: CSR vs CSR, each BSR block vs the same block.
        ratios = []
        if "engine csr" in t and "torch.sparse csr" in t:
            ratios.append(t["torch.sparse csr"] / t["engine csr"])
        for p in bsr_names:
            tp = p.replace("engine", "torch.sparse")
            if tp in t:
                ratios.append(t[tp] / t[p])
        row.append(f"{min(ratios):.2f} (worst pair)" if ratios else "-")
        out.append("| " + " | ".join(row) + " |")
    return "\n".join(out)


def plot(cells, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    shapes = sorted({(o, i) for o, i, _, _ in cells})
    batches = sorted({n for _, _, n, _ in cells})
    providers = sorted({p for v in cells.values() for p in v if p != "dense"})
    fig, axes = plt.subplots(len(shapes), len(batches), figsize=(4.2 * len(batches), 3.4 * len(shapes)),
                             squeeze=False, sharex=True)
    for r, (o, i) in enumerate(shapes):
        for c, n in enumerate(batches):
            ax = axes[r][c]
            ax.set_prop_cycle(color=plt.cm.tab20.colors)  # > 10 providers: distinct colours
            keys = sorted(k for k in cells if k[:3] == (o, i, n))
            for p in providers:
                xs = [k[3] for k in keys if p in cells[k] and "dense" in cells[k]]
                ys = [cells[k]["dense"] / cells[k][p] for k in keys if p in cells[k] and "dense" in cells[k]]
                if xs:
                    style = "--" if p.startswith(("torch", "onnx")) else "-"
                    ax.plot(xs, ys, style, marker="o", ms=3, label=p)
            ss = sorted({k[3] for k in keys})
            if ss:
                ax.plot(ss, [1 / (1 - s) for s in ss], ":", color="gray", label="1/(1-s)")
            ax.axhline(1.0, color="black", lw=0.6)
            ax.set_yscale("log")
            ax.set_title(f"{o}x{i}, batch {n}", fontsize=9)
            if r == len(shapes) - 1:
                ax.set_xlabel("sparsity")
            if c == 0:
                ax.set_ylabel("speedup vs dense F.linear")
    handles, labels = axes[0][0].get_legend_handles_labels()
    ncol = max(2, min(len(labels), int(4.2 * len(batches) / 2.3)))
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8)
    fig.tight_layout(rect=(0, 0.04 + 0.025 * (-(-len(labels) // ncol)), 1, 1))
    fig.savefig(path, dpi=80)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+", help="pytest-benchmark --benchmark-json output(s)")
    ap.add_argument("--md", help="write the markdown table here (default: print)")
    ap.add_argument("--png", help="write the plot here")
    args = ap.parse_args(argv)
    cells, meta = load(args.json)
    text = (f"threads/isa: {', '.join(f'{t} threads, {isa}' for t, isa in sorted(meta))}; "
            "cells: speedup t(dense F.linear)/t(provider), medians\n\n" + table(cells) + "\n")
    if MODELS:
        text += "\n" + model_table() + "\n"
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)
    else:
        print(text)
    if args.png:
        plot(cells, args.png)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
