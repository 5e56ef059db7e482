"""Latency-aware against uniform sparsity (issue 13): quality against *measured* latency.

For one subject (all-MiniLM-L6-v2 at seq 128, or the wide digits MLP) and each batch:
1. profile it (engine/prune/latency.py) and measure the engine's dense model (engine/prune/target.py);
2. uniform: every prunable unit at the same option (unstructured -> CSR, or 16x16 blocks -> BSR) at
   each sparsity of --uniform; pruned with the same calibrated criterion, recovered the same way,
   converted, and timed against the engine's dense model;
3. latency-aware: for every uniform point, the allocator's plan for a budget equal to that point's
   *measured* latency, pruned, recovered, converted and timed the same way.
A plan's pruned model does not depend on the batch, so each distinct plan is built once and timed at
every batch it appears in. Writes OUT.json (every row), OUT.md (the table) and OUT.png (the fronts).

    PYTHONPATH=. .venv/bin/python bench/latency_pareto.py minilm --batches 1,32 --threads 1 --cpu-time \
        -o bench/results/latency_minilm
    PYTHONPATH=. .venv/bin/python bench/latency_pareto.py mlp-digits-wide --batches 1,32 --threads 1 \
        --cpu-time -o bench/results/latency_mlp
    PYTHONPATH=. .venv/bin/python bench/latency_pareto.py --tables-from bench/results/latency_mlp.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from engine.prune import target as T
from engine.prune.granularity import PruneError

sys.path.insert(0, str(Path(__file__).parent))
from minilm import model_folder  # noqa: E402


def subject_for(name: str, batch: int, args):
    if name == "minilm":
        return T.hf_subject(str(model_folder()), batch, args.seq, calib_samples=args.calib_samples,
                            distill_steps=args.distill_steps, log=lambda _m: None)
    return T.example_subject(name, batch, epochs=args.epochs, calib_samples=args.calib_samples)


def plan_key(plan) -> tuple:
    return tuple((u, o.granularity, round(o.sparsity, 4)) for u, o in sorted(plan.items()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("subject", choices=("minilm", "mlp-digits-wide"))
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--uniform", default="0.5,0.7,0.8,0.9", help="uniform sparsities")
    ap.add_argument("--granularities", default="unstructured,block:16x16")
    ap.add_argument("--sparsities", default="0.5,0.7,0.8,0.9,0.95", help="levels the allocator may pick")
    ap.add_argument("--method", default="sparsegpt", choices=("wanda", "sparsegpt"))
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--epochs", type=int, default=20, help="fine-tuning epochs of the MLP after pruning")
    ap.add_argument("--distill-steps", type=int, default=0, help="distillation steps of MiniLM after pruning")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cpu-time", action="store_true", help="time by CPU time (1 thread): a shared machine")
    ap.add_argument("--rounds", type=int, default=15, help="timed calls per profiled option")
    ap.add_argument("--profile-seconds", type=float, default=20.0, help="least seconds of profile timing rounds")
    ap.add_argument("--model-time", type=float, default=3.0, help="seconds of timing per whole-model comparison")
    ap.add_argument("-o", "--output", required=True, help="OUT: writes OUT.json, OUT.md, OUT.png")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    clock = time.thread_time if args.cpu_time else time.perf_counter
    grans = tuple(args.granularities.split(","))
    levels = tuple(float(s) for s in args.sparsities.split(","))
    uniform = [(g, float(s)) for g in grans for s in args.uniform.split(",")]
    out = Path(args.output)
    rows, built = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subject = None
        for batch in (int(b) for b in args.batches.split(",")):
            # one dense model for every batch: only the batch the latency is for changes
            subject = subject_for(args.subject, batch, args) if subject is None else replace(subject, batch=batch)
            setup = T.prepare(subject, tmp, clock=clock, sparsities=levels,
                              granularities=grans, criterion=args.method, rounds=args.rounds,
                              min_time=args.profile_seconds)
            print(f"batch {batch}: engine dense {setup.dense_s * 1e3:.3f} ms ({setup.rest_s * 1e3:.3f} ms outside "
                  f"the units), quality {setup.dense_quality['quality']:.4f}", flush=True)

            def run(kind, label, plan):
                key = plan_key(plan)
                if key not in built:
                    n = len(built)
                    ckpt = tmp / (f"p{n}.pt" if subject.arch else f"p{n}")
                    built[key] = (tmp / f"p{n}.spz",) + T.build(subject, setup.table, plan, args.method, ckpt,
                                                                 tmp / f"p{n}.spz")
                art, quality, _ = built[key]
                measured, dense = T.measure(setup.engine_dense, art, setup.inputs, min_time=args.model_time,
                                            clock=clock)
                predicted = T.predicted_seconds(plan, setup.rest_s)
                row = {"batch": batch, "kind": kind, "label": label, "measured_ms": measured * 1e3,
                       "dense_ms": dense * 1e3, "predicted_ms": predicted * 1e3,
                       "prediction_error": predicted / measured - 1, "speedup": dense / measured,
                       "predicted_speedup": setup.dense_s / predicted,
                       # predicted vs measured with the host's drift taken out: the measured latency
                       # scaled by the dense model's profiled / measured time (= speedup vs speedup)
                       "drift_corrected_error": (predicted / setup.dense_s) / (measured / dense) - 1,
                       "quality": quality["quality"], "dense_quality": setup.dense_quality["quality"],
                       "plan": {u: [o.granularity, o.sparsity] for u, o in plan.items()}}
                rows.append(row)
                print(f"  {kind:>8} {label:<28} measured {row['measured_ms']:9.3f} ms ({row['speedup']:.2f}x), "
                      f"predicted {row['predicted_ms']:9.3f} ms ({100 * row['prediction_error']:+.1f} %, "
                      f"{row['predicted_speedup']:.2f}x, drift-corrected {100 * row['drift_corrected_error']:+.1f} %), "
                      f"quality {row['quality']:.4f}", flush=True)
                return row

            for g, s in uniform:
                u = run("uniform", f"{g} {s:.2f}", T.uniform_plan(setup.table, g, s))
                try:
                    # the uniform point's measured speedup, on the profile's clock: the latency it
                    # would have had when the profile ran (the host's speed drifts between runs)
                    budget = setup.dense_s / u["speedup"]
                    plan = T.budget_plan(setup, budget)
                except PruneError as e:
                    print(f"  latency-aware at {u['speedup']:.2f}x: {e}", flush=True)
                    continue
                run("aware", f"budget {u['speedup']:.2f}x ({budget * 1e3:.3f} ms)", plan)
            machine = setup.table["machine"]
    doc = {"subject": args.subject, "machine": machine, "method": args.method, "args": vars(args),
           "command": "PYTHONPATH=. .venv/bin/python bench/latency_pareto.py " + " ".join(sys.argv[1:]), "rows": rows}
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    write_table(doc, out.with_suffix(".md"))
    plot(doc, out.with_suffix(".png"))
    return 0


def uniform_front(rows: list[dict], batch: int, speedup: float) -> float | None:
    """The best quality uniform sparsity reaches at a measured speedup >= `speedup` (None: none does)."""
    q = [r["quality"] for r in rows if r["batch"] == batch and r["kind"] == "uniform" and r["speedup"] >= speedup]
    return max(q) if q else None


def write_table(doc: dict, path: Path) -> None:
    m = doc["machine"]
    lines = [f"# Latency-aware vs uniform sparsity: {doc['subject']}", "",
             f"{m['cpu']}, kernels isa {m['isa']}, {m['threads']} thread(s), {m['clock']} clock, {m['date']}, "
             f"torch {m['torch']}; criterion {doc['method']}; command: `{doc['command']}`", "",
             "Each latency-aware row's budget is the uniform row above it, at that row's measured speedup "
             "(the profile's dense latency / the measured speedup). Measured: the artifact against the engine's "
             "dense model, interleaved in one run (medians); predicted: the profile's time outside the units + "
             "the plan's per-unit times (measured minutes earlier, inside the model). 'error': predicted ms vs "
             "measured ms; 'drift-corrected': the same with the measured ms rescaled by the dense model's "
             "profiled / measured time, i.e. predicted vs measured speedup (the host's speed drifts by up to "
             "40 % between minutes, on the dense model alike).", "",
             "'uniform front': the best quality any uniform row of the batch reaches at a measured speedup at "
             "least this row's (— where none is that fast).", "",
             "| batch | kind | plan | measured ms | measured speedup | predicted ms | error | predicted speedup "
             "| drift-corrected error | quality | uniform front | dense quality |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        front = uniform_front(doc["rows"], r["batch"], r["speedup"]) if r["kind"] == "aware" else None
        lines.append(f"| {r['batch']} | {r['kind']} | {r['label']} | {r['measured_ms']:.3f} | {r['speedup']:.2f}x | "
                     f"{r['predicted_ms']:.3f} | {100 * r['prediction_error']:+.1f} % | {r['predicted_speedup']:.2f}x | "
                     f"{100 * r['drift_corrected_error']:+.1f} % | {r['quality']:.4f} | {'' if r['kind'] == 'uniform' else '—' if front is None else f'{front:.4f}'} "
                     f"| {r['dense_quality']:.4f} |")
    path.write_text("\n".join(lines) + "\n")


def plot(doc: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    batches = sorted({r["batch"] for r in doc["rows"]})
    fig, axes = plt.subplots(1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for kind, style in (("uniform", "o--"), ("aware", "s-")):
            pts = sorted((r["speedup"], r["quality"]) for r in doc["rows"] if r["batch"] == batch and r["kind"] == kind)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"{kind} (measured)")
        ax.axvline(1.0, color="grey", ls=":", label="engine dense")
        ax.set_xlabel(f"measured speedup over the engine's dense model (batch {batch}); right = faster")
        ax.set_ylabel("quality (test accuracy / cosine to dense)")
        ax.set_title(f"{doc['subject']} batch {batch}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--tables-from"]:  # redraw OUT.md / OUT.png from an earlier OUT.json
        for name in sys.argv[2:]:
            doc = json.loads(Path(name).read_text())
            write_table(doc, Path(name).with_suffix(".md"))
            plot(doc, Path(name).with_suffix(".png"))
        sys.exit(0)
    sys.exit(main())
