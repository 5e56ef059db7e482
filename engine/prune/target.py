"""Latency-aware pruning to a speed target (issue 13): `sparse-engine prune --target-speedup X`
(or `--latency-budget-ms T`) at `--batch B` and `--seq-len S`.

1. profile (latency.profile): every unit's measured latency and measured sensitivity per option,
   cached in a JSON file keyed by machine, batch, sequence length and grid; it also measures the
   engine's dense model and its time outside the units (`rest`): the units' budget is the target
   latency - rest;
2. allocate (exact knapsack DP, latency.allocate) -> a plan: one option per unit;
3. prune with the plan (calibrated, sequential; each layer its own granularity and sparsity), then
   recover (the digits MLP is fine-tuned with its masks enforced; an encoder is distilled when
   distillation steps are asked for);
4. write the pruned checkpoint, convert it with the plan's layouts, load the artifact and time it
   against the engine's dense model, interleaved: the report holds the plan per unit, predicted
   against measured latency, and quality (test accuracy / embedding cosine to dense) against dense.

`Subject` is what is pruned: the dense model with its calibration data, how its quality is
measured, how it recovers and how it is saved for `convert` (a digits example or an HF folder).
"""
from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .calibrate import calibrated_prune
from .granularity import PruneError, parse_granularity
from .latency import Option, allocate, options_of, profile
from .masks import MaskSet, export_state_dict

REPORT_SUFFIX = ".latency.json"
PROFILE_VERSION = 8  # bumped whenever what a profile measures changes: older caches are re-measured


@dataclass
class Subject:
    name: str
    model: nn.Module                                   # the dense model, eval mode
    calib: list                                        # calibration batches (positional inputs)
    batch: int
    seq: int
    quality: Callable[[nn.Module], dict]               # {"quality": float, ...}: higher is better
    recover: Callable[[nn.Module, MaskSet], MaskSet]   # fine-tune / distil in place
    save: Callable[[nn.Module, MaskSet, dict, Path], None]  # the pruned checkpoint `convert` reads
    dense_source: Callable[[Path], Path]               # workdir -> the dense checkpoint `convert` reads
    arch: str | None = None                            # convert's --arch, where it is needed
    readout: Callable | None = None                    # (model, batch) -> what sensitivity is measured on


def example_subject(name: str, batch: int, *, seed: int = 0, dense_epochs: int = 60, epochs: int = 40,
                    calib_samples: int = 512) -> Subject:
    """The digits MLP ("mlp-digits" / "mlp-digits-wide"), trained dense; quality = test accuracy;
    recovery = `epochs` of fine-tuning with the masks enforced."""
    from .. import examples
    from .finetune import TrainConfig, evaluate, finetune
    from .report import describe_architecture
    data = examples.digits_data(seed)
    model = examples.mlp_digits("wide" if name.endswith("wide") else "small", seed=seed)
    examples.train_dense(model, data, epochs=dense_epochs, seed=seed)
    model.eval()
    train, val, test = (examples.loader(s, 32) for s in data)
    x = data.train.x[:calib_samples]

    def quality(m):
        return {"quality": evaluate(m, test), "test_accuracy": evaluate(m, test), "val_accuracy": evaluate(m, val)}

    def recover(m, masks):
        if epochs:
            finetune(m, train, val, TrainConfig(epochs, seed=seed, desc="fine-tune"), masks=masks)
        m.eval()
        return masks

    def save(m, masks, report, out):
        torch.save(m.state_dict() if masks is None else export_state_dict(m, masks, "zeros"), out)
        out.with_name(out.stem + ".report.json").write_text(
            json.dumps({**report, "architecture": describe_architecture(m)}, indent=1))

    def dense_source(workdir):
        save(model, None, {}, workdir / "dense.pt")
        return workdir / "dense.pt"

    return Subject(name, model, [x[i:i + 64] for i in range(0, len(x), 64)], batch, 1, quality,
                   recover, save, dense_source, arch="mlp:relu")


def hf_subject(folder: str, batch: int, seq: int, *, calib_samples: int = 128, val_sentences: int = 256,
               text: str | None = None, distill_steps: int = 0, distill: dict | None = None,
               log: Callable[[str], None] = print) -> Subject:
    """An encoder folder; quality = mean cosine of its sentence embeddings to the dense model's on
    validation sentences; recovery = `distill_steps` of distillation (engine/prune/distill.py)."""
    from . import corpus as corpus_io
    from .embeddings import fidelity, token_batches, tokenizer
    from .hf import load_folder, write_folder
    enc = load_folder(folder)
    texts = corpus_io.load(text)
    val = texts.val[:val_sentences]
    dense_emb = enc.model.encode(val)
    calib = token_batches(tokenizer(enc.tokenizer_json, seq), texts.samples("calib", calib_samples))

    def quality(m):
        f = fidelity(dense_emb, m.encode(val))
        return {"quality": f["cosine_mean"], **f}

    def recover(m, masks):
        if distill_steps:
            from .distill import distill as run_distill
            _, masks = run_distill(m, enc.model, masks, enc.tokenizer_json, texts, dense_emb, val,
                                   steps=distill_steps, seq_len=seq, log=log, **(distill or {}))
        m.eval().requires_grad_(False)
        return masks

    def save(m, masks, report, out):
        write_folder(enc, m, masks, report, out)

    def pooled(m, batch):  # the sentence embeddings, which quality is measured on
        ids, mask = batch
        return m.pool(m(ids, mask), mask)

    return Subject(f"hf:{Path(folder).name}", enc.model, calib, batch, seq, quality, recover,
                   save, lambda _workdir: Path(folder), readout=pooled)


# -- profile (cached) ------------------------------------------------------------------------------
def cached_profile(subject: Subject, path: Path | None, engine_dense: nn.Module, inputs: tuple, **grid) -> dict:
    """The profile at `path` when it was measured for this subject, machine and grid; else a new
    one (written to `path`)."""
    from .. import cpu
    from ..timing import cpu_model
    key = {"version": PROFILE_VERSION, "subject": subject.name, "batch": subject.batch, "seq": subject.seq,
           "cpu": cpu_model(), "threads": torch.get_num_threads(), "isa": cpu.isa_label() if cpu.available() else "none",
           **{k: list(v) if isinstance(v, (list, tuple)) else v for k, v in grid.items() if k not in ("clock", "readout")},
           "clock": "cpu" if grid.get("clock") is time.thread_time else "wall"}
    if path is not None and path.is_file():
        table = json.loads(path.read_text())
        if table.get("key") == key:
            return table
    if subject.readout is not None:
        grid = {**grid, "readout": subject.readout}
    table = profile(subject.model, subject.calib, engine_dense, inputs, **grid)
    table["key"] = key
    if path is not None:
        path.write_text(json.dumps(table, indent=1))
    return table


# -- pruning with a plan ----------------------------------------------------------------------------
def plan_layers(table: dict, plan: dict[str, Option]) -> tuple[dict, list, dict]:
    """({layer: (granularity, sparsity)} to prune, [layers kept dense], {layer: (format, block)})."""
    per_layer, dense, layouts = {}, [], {}
    for unit, o in plan.items():
        block = tuple(parse_granularity(o.granularity).block) if o.format == "bsr" else None
        for name in table["units"][unit]["members"]:
            layouts[name] = (o.format, block)
            if o.format == "dense":
                dense.append(name)
            else:
                per_layer[name] = (o.granularity, o.sparsity)
    return per_layer, dense, layouts


def uniform_plan(table: dict, granularity: str, sparsity: float) -> dict[str, Option]:
    """Every unit at the same option (units the granularity does not tile stay dense): the baseline
    latency-aware allocation is judged against."""
    plan = {}
    for unit, opts in options_of(table).items():
        same = [o for o in opts if o.granularity == granularity and abs(o.sparsity - sparsity) < 1e-9]
        plan[unit] = same[0] if same else opts[0]
    return plan


def predicted_seconds(plan: dict[str, Option], rest: float) -> float:
    return rest + sum(o.seconds for o in plan.values())


def build(subject: Subject, table: dict, plan: dict[str, Option], method: str, out: Path, artifact: Path,
          *, report: dict | None = None) -> tuple[dict, dict]:
    """Prunes a copy of the dense model with `plan`, recovers it, saves it to `out` and converts it
    to `artifact` with the plan's layouts; -> (quality, {layer: {"sparsity", "error"}})."""
    from ..convert import convert
    per_layer, dense, layouts = plan_layers(table, plan)
    model = copy.deepcopy(subject.model)
    masks, layers = calibrated_prune(model, subject.calib, method, skip=dense, per_layer=per_layer)
    if per_layer:  # a plan that keeps every layer dense is the dense model: nothing to recover
        masks = subject.recover(model, masks)
    model.eval()
    with torch.no_grad():
        quality = subject.quality(model)
    subject.save(model, masks, {**(report or {}), "layers": layers, "method": method, "granularity": "plan",
                                "steps": [{"step": 0, "cosine_mean": quality["quality"],
                                           "nn_agreement": quality.get("nn_agreement", 0.0)}]}, out)
    convert(out, artifact, format="dense", arch=subject.arch, layouts=layouts, log=lambda _m: None)
    return quality, layers


def measure(engine_dense: nn.Module, artifact: Path, inputs: tuple, *, min_time: float = 3.0,
            clock: Callable[[], float] = time.perf_counter) -> tuple[float, float]:
    """(seconds of the artifact's model, seconds of the engine's dense model), timed interleaved
    over 15 rounds (medians)."""
    from ..runtime import load
    from ..timing import time_interleaved
    model = load(artifact)
    t = time_interleaved({"dense": lambda: engine_dense(*inputs), "pruned": lambda: model(*inputs)},
                         min_time=min_time, rounds=15, clock=clock)
    return t["pruned"], t["dense"]


@dataclass
class Setup:
    """What every plan of one subject shares: the profile, the engine's dense model and timings."""
    subject: Subject
    table: dict
    engine_dense: nn.Module
    inputs: tuple
    dense_s: float
    rest_s: float
    dense_quality: dict


def prepare(subject: Subject, workdir: Path, *, profile_path: Path | None = None,
            clock: Callable[[], float] = time.perf_counter, **grid) -> Setup:
    """Converts the subject's dense model with the engine and profiles it there (or reuses a cached
    profile): the dense latency, the part outside the units, each unit's options."""
    from ..convert import convert
    from ..model_bench import example_inputs
    from ..runtime import load
    art = workdir / "dense.spz"
    convert(subject.dense_source(workdir), art, format="dense", arch=subject.arch, log=lambda _m: None)
    engine_dense = load(art)
    inputs = example_inputs(engine_dense, subject.batch, subject.seq)
    table = cached_profile(subject, profile_path, engine_dense, inputs, clock=clock, **grid)
    with torch.no_grad():
        dense_quality = subject.quality(subject.model)
    return Setup(subject, table, engine_dense, inputs, table["model"]["dense_s"], table["model"]["rest_s"],
                 dense_quality)


def run_plan(setup: Setup, plan: dict[str, Option], method: str, out: Path, artifact: Path, *,
             model_time: float = 3.0, clock: Callable[[], float] = time.perf_counter, report: dict | None = None
             ) -> dict:
    """build + measure one plan; -> its row: predicted and measured latency, quality, the plan."""
    t0 = time.time()
    quality, layers = build(setup.subject, setup.table, plan, method, out, artifact, report=report)
    measured, dense = measure(setup.engine_dense, artifact, setup.inputs, min_time=model_time, clock=clock)
    predicted = predicted_seconds(plan, setup.rest_s)
    return {"predicted_ms": predicted * 1e3, "measured_ms": measured * 1e3, "dense_ms": dense * 1e3,
            "prediction_error": predicted / measured - 1.0, "measured_speedup": dense / measured,
            # the same with the host's drift between profile and measurement taken out (the dense
            # model's profiled / measured time): predicted vs measured speedup
            "drift_corrected_error": (predicted / setup.dense_s) / (measured / dense) - 1.0,
            "predicted_speedup": setup.dense_s / predicted, "quality": quality,
            "plan": {u: {"members": setup.table["units"][u]["members"], "granularity": o.granularity,
                         "sparsity": o.sparsity, "format": o.format, "ms": o.seconds * 1e3, "sensitivity": o.error}
                     for u, o in plan.items()},
            "layers": layers, "seconds": round(time.time() - t0, 1)}


def budget_plan(setup: Setup, budget_s: float) -> dict[str, Option]:
    """The least-sensitivity plan whose predicted whole-model latency fits `budget_s`."""
    units_budget = budget_s - setup.rest_s
    fastest = setup.rest_s + sum(min(o.seconds for o in opts) for opts in options_of(setup.table).values())
    if units_budget <= 0 or fastest > budget_s:
        raise PruneError(f"a latency budget of {budget_s * 1e3:.3f} ms cannot be met: the fastest reachable "
                         f"latency is {fastest * 1e3:.3f} ms ({setup.rest_s * 1e3:.3f} ms outside the prunable "
                         f"layers + every layer at its fastest option); the dense model takes "
                         f"{setup.dense_s * 1e3:.3f} ms")
    return allocate(options_of(setup.table), units_budget)


# -- sparse-engine prune --target-speedup / --latency-budget-ms --------------------------------------
def add_arguments(parser) -> None:
    g = parser.add_argument_group("latency target (prune to run this fast on this machine)")
    t = g.add_mutually_exclusive_group()
    t.add_argument("--target-speedup", type=float, metavar="X",
                   help="choose per-layer sparsity and block shape so the engine runs the model X times faster "
                        "than its own dense model, at --batch (and --seq-len), on this machine")
    t.add_argument("--latency-budget-ms", type=float, metavar="T", help="... or at most T ms per call")
    g.add_argument("--batch", type=int, default=1, help="batch the latency target is for (default 1)")
    g.add_argument("--profile", metavar="FILE", help="per-layer latency profile cache (default: beside -o, x.pt -> x.profile.json; "
                   "re-measured when the machine, threads, batch, sequence length or grid differ)")
    g.add_argument("--artifact", metavar="PATH", help="the converted artifact (default: beside -o, x.pt -> x.spz); the report goes to "
                   "x.latency.json / .png")
    g.add_argument("--sparsities", default="0.5,0.7,0.8,0.9,0.95", help="levels each layer may take")
    g.add_argument("--granularities", default="unstructured,block:16x16",
                   help="comma-separated: unstructured (CSR), block:RxC (BSR)")
    g.add_argument("--cpu-time", action="store_true",
                   help="time by this thread's CPU time (with --threads 1): for a machine shared with other jobs")
    g.add_argument("--profile-seconds", type=float, default=20.0,
                   help="time the profile's rounds for at least this many seconds (default 20)")


def targeted(args) -> bool:
    return args.target_speedup is not None or args.latency_budget_ms is not None


def side_path(out: Path, suffix: str) -> Path:
    """x.pt -> x<suffix>; a folder out -> out<suffix> beside it."""
    return out.with_name((out.stem if out.suffix in (".pt", ".pth") else out.name) + suffix)


def run_cli(args) -> dict:
    """`sparse-engine prune ... --target-speedup X`: -> the report (also written beside -o)."""
    import tempfile
    if args.sparsity is not None or args.max_drop is not None or args.min_accuracy is not None:
        raise PruneError("--target-speedup / --latency-budget-ms choose each layer's sparsity; drop "
                         "--sparsity / --max-drop / --min-accuracy")
    method = args.method or "sparsegpt"
    if method not in ("wanda", "sparsegpt"):
        raise PruneError(f"--target-speedup / --latency-budget-ms prune with wanda or sparsegpt, not {method!r}")
    if args.batch < 1:
        raise PruneError(f"--batch must be >= 1, got {args.batch}")
    budget = args.latency_budget_ms if args.latency_budget_ms is not None else args.target_speedup
    if not budget > 0:
        raise PruneError("--target-speedup and --latency-budget-ms must be > 0")
    if args.cpu_time and torch.get_num_threads() != 1:
        raise PruneError("--cpu-time measures one thread's CPU time: add --threads 1")
    try:
        sparsities = tuple(float(s) for s in args.sparsities.split(","))
    except ValueError:
        raise PruneError(f"--sparsities {args.sparsities!r}: expected comma-separated numbers") from None
    grans = tuple(g.strip() for g in args.granularities.split(","))
    out = Path(args.output)
    log = (lambda _m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    if args.hf:
        from .hf import check_output
        check_output(out)
        subject = hf_subject(args.hf, args.batch, args.seq_len, calib_samples=args.calib_samples,
                             val_sentences=args.val_sentences, text=args.text, distill_steps=args.distill_steps,
                             distill=dict(lr=args.distill_lr, batch=args.distill_batch, eval_every=args.eval_every,
                                          time_budget=args.time_budget, layer_loss=args.layer_loss, seed=args.seed),
                             log=log)
    elif args.example:
        subject = example_subject(args.example, args.batch, seed=args.seed, dense_epochs=args.dense_epochs,
                                  epochs=40 if args.epochs is None else args.epochs)
    else:
        raise PruneError("--target-speedup / --latency-budget-ms take --example NAME or --hf DIR")
    clock = time.thread_time if args.cpu_time else time.perf_counter
    artifact = Path(args.artifact) if args.artifact else side_path(out, ".spz")
    profile_path = Path(args.profile) if args.profile else side_path(out, ".profile.json")
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        log(f"profiling {subject.name} at batch {subject.batch} ...")
        setup = prepare(subject, Path(tmp), profile_path=profile_path, clock=clock, sparsities=sparsities,
                        granularities=grans, criterion=method, skip=tuple(args.skip),
                        min_time=args.profile_seconds)
        budget_s = (args.latency_budget_ms / 1e3 if args.latency_budget_ms is not None
                    else setup.dense_s / args.target_speedup)
        plan = budget_plan(setup, budget_s)
        row = run_plan(setup, plan, method, out, artifact, clock=clock)
    report = {"format": "sparse-engine.latency-report/1", "subject": subject.name, "method": method,
              "batch": subject.batch, "seq_len": subject.seq if args.hf else None, "machine": setup.table["machine"],
              "budget_ms": budget_s * 1e3, "target_speedup": args.target_speedup,
              "engine_dense_ms": setup.dense_s * 1e3, "outside_layers_ms": setup.rest_s * 1e3,
              "dense_quality": setup.dense_quality, "profile": str(profile_path), "artifact": str(artifact),
              "checkpoint": str(out), **row, "seconds": round(time.time() - t0, 1)}
    json_path = side_path(out, REPORT_SUFFIX)
    json_path.write_text(json.dumps(report, indent=1))
    plot_plan(report, json_path.with_suffix(".png"))
    return report


def plot_plan(report: dict, path: Path) -> None:
    """The plan per unit (sparsity, coloured by format) and predicted vs measured latency."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    units_ = list(report["plan"])
    colors = {"dense": "grey", "csr": "tab:blue", "bsr": "tab:orange"}
    fig, ax = plt.subplots(figsize=(max(6, 0.35 * len(units_)), 4))
    ax.bar(range(len(units_)), [report["plan"][u]["sparsity"] for u in units_],
           color=[colors[report["plan"][u]["format"]] for u in units_])
    ax.set_xticks(range(len(units_)), units_, rotation=90, fontsize=7)
    ax.set_ylabel("sparsity (grey dense, blue CSR, orange BSR)")
    ax.set_ylim(0, 1)
    ax.set_title(f"{report['subject']} batch {report['batch']}: predicted {report['predicted_ms']:.3f} ms, "
                 f"measured {report['measured_ms']:.3f} ms ({report['measured_speedup']:.2f}x), "
                 f"quality {report['quality']['quality']:.4f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
