"""Latency-aware allocation, first part (issue 13): where to prune, decided from how fast the
result will run on this machine and how much each layer's output suffers.

- `profile(model, calib_batches, ...)`: for every prunable nn.Linear, over a grid of options
  (dense; unstructured -> CSR; R x C blocks -> BSR; at each sparsity level), the layer's latency
  *measured* here on inputs of the shape it sees in the model (rows = batch x sequence), interleaved
  with its dense twin; and its sensitivity, the relative reconstruction error ||(W - W')X||^2 /
  ||W X||^2 of a Wanda-pruned W' on the layer's calibration inputs X.
- `allocate(table, budget_s)`: one option per layer minimising the summed error under a latency
  budget: a multiple-choice knapsack solved exactly by dynamic programming over the budget cut in
  `bins` steps, each option's time rounded *up* to a step (so the plan never exceeds the budget;
  it may miss a plan that fits only within the rounding). An infeasible budget is an error naming
  the fastest reachable latency.

Summing per-layer errors treats layers as independent (the OBS / SparseGPT assumption); the
measured end-to-end check of a plan belongs to the prune pipeline (not built yet, see the issue).
"""
from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .calibrate import InputStats, _as_args, reconstruction_error, wanda_layer
from .granularity import PruneError, check_sparsity, parse_granularity
from .masks import prunable_layers, weight_2d


@dataclass(frozen=True)
class Option:
    """One way to run one layer: its granularity ("dense", "unstructured", "block:RxC"), sparsity,
    format, measured seconds per call and relative reconstruction error (0 for dense)."""
    granularity: str
    sparsity: float
    format: str
    seconds: float
    error: float


def _format_of(gran) -> tuple[str, tuple[int, int] | None]:
    if gran.kind == "block":
        return "bsr", tuple(gran.block)
    return "csr", None


def _layer_inputs(model: nn.Module, layers: dict, batches: list) -> tuple[dict, dict]:
    """{name: InputStats over every calibration batch}, {name: rows of the layer's input per batch}."""
    stats = {name: InputStats(m) for name, m in layers.items()}
    rows = {}

    def count(name):
        def hook(module, args, output):  # returns None: the output stays the layer's
            rows.setdefault(name, args[0].reshape(-1, args[0].shape[-1]).shape[0])
        return hook
    hooks = [m.register_forward_hook(count(name)) for name, m in layers.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                model(*_as_args(batch))
    finally:
        for h in hooks:
            h.remove()
        for s in stats.values():
            s.remove()
    return stats, rows


@torch.no_grad()
def profile(model: nn.Module, calib_batches: Iterable, *, sparsities: Iterable[float] = (0.5, 0.7, 0.8, 0.9, 0.95),
            granularities: Iterable[str] = ("unstructured", "block:16x16"), skip: Iterable[str] = (),
            rows: int | None = None, min_time: float = 0.05) -> dict:
    """-> {"machine", "layers": {name: {"shape", "rows", "options": [Option as dict]}}}. The model
    runs each calibration batch once (for X^T X and the rows each layer sees); each layer is then
    timed alone on random inputs of `rows` rows (default: the rows of its first calibration batch;
    a transformer at batch B and sequence S: B x S)."""
    from .. import cpu
    model.eval()
    layers = {n: m for n, m in prunable_layers(model).items() if isinstance(m, nn.Linear) and n not in set(skip)}
    if not layers:
        raise PruneError("profile: the model has no nn.Linear layer to profile")
    levels = [check_sparsity(s) for s in sparsities]
    grans = [parse_granularity(g) for g in granularities]
    stats, seen = _layer_inputs(model, layers, list(calib_batches))
    rows_of = {name: rows or seen[name] for name in layers}
    from ..modules import SparseLinear
    from ..timing import cpu_model, time_interleaved
    table = {}
    for name, linear in layers.items():
        w, hessian = weight_2d(linear).detach(), stats[name].hessian()
        x, bias = torch.randn(rows_of[name], w.shape[1]), None if linear.bias is None else linear.bias.detach()
        dense = lambda: F.linear(x, w, bias)  # noqa: E731
        options, dense_times = [], []
        for gran in grans:
            if gran.kind == "block" and (w.shape[0] % gran.block[0] or w.shape[1] % gran.block[1]):
                continue  # blocks that do not tile this layer
            fmt, block = _format_of(gran)
            for s in levels:
                keep = wanda_layer(w, hessian, gran, s)
                sparse = SparseLinear.from_linear(linear, fmt, block, mask=keep)
                # interleaved with the dense layer, so load on the machine hits both alike
                t = time_interleaved({"dense": dense, "sparse": lambda: sparse(x)}, min_time=min_time, rounds=5)
                dense_times.append(t["dense"])
                options.append(Option(str(gran), s, fmt, t["sparse"], reconstruction_error(w, w * keep, hessian)))
        dense_s = (statistics.median(dense_times) if dense_times
                   else time_interleaved({"dense": dense}, min_time=min_time, rounds=5)["dense"])
        options.insert(0, Option("dense", 0.0, "dense", dense_s, 0.0))
        table[name] = {"shape": list(w.shape), "rows": rows_of[name], "options": [asdict(o) for o in options]}
    machine = {"cpu": cpu_model(), "isa": cpu.isa() if cpu.available() else "none",
               "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "torch": torch.__version__}
    return {"machine": machine, "layers": table}


def options_of(table: dict) -> dict[str, list[Option]]:
    """A profile's layers as {name: [Option]}."""
    return {name: [Option(**o) for o in layer["options"]] for name, layer in table["layers"].items()}


def allocate(options: dict[str, list[Option]], budget_s: float, *, bins: int = 2000) -> dict[str, Option]:
    """One option per layer with the least summed error whose summed seconds fit `budget_s`."""
    if not options or any(not opts for opts in options.values()):
        raise PruneError("allocate: every layer needs at least one option")
    fastest = sum(min(o.seconds for o in opts) for opts in options.values())
    if not budget_s > 0 or fastest > budget_s:
        raise PruneError(f"allocate: a budget of {budget_s * 1e3:.3f} ms cannot be met; the fastest reachable "
                         f"latency is {fastest * 1e3:.3f} ms (every layer at its fastest option)")
    step = budget_s / bins
    best = np.zeros(bins + 1)  # best[t]: least error of the layers so far within t steps
    choices = []
    for opts in options.values():
        nxt = np.full(bins + 1, np.inf)
        pick = np.full(bins + 1, -1)
        for k, o in enumerate(opts):
            cost = math.ceil(o.seconds / step - 1e-9)
            if cost > bins:
                continue
            cand = np.full(bins + 1, np.inf)
            cand[cost:] = best[:bins + 1 - cost] + o.error
            better = cand < nxt
            nxt[better], pick[better] = cand[better], k
        best = nxt
        choices.append(pick)
    if not np.isfinite(best[bins]):
        raise PruneError(f"allocate: no plan fits {budget_s * 1e3:.3f} ms once times are rounded up to "
                         f"{step * 1e6:.2f} us steps (fastest reachable {fastest * 1e3:.3f} ms); raise `bins` "
                         f"or the budget")
    plan, t = {}, bins
    for name, opts, pick in reversed(list(zip(options, options.values(), choices))):
        o = opts[pick[t]]
        plan[name] = o
        t -= math.ceil(o.seconds / step - 1e-9)
    return dict(reversed(list(plan.items())))


# -- sparse-engine profile -------------------------------------------------------------------------
def configure(parser) -> None:
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--example", choices=("mlp-digits", "mlp-digits-wide"),
                     help="the built-in digits MLP, trained dense first (seed 0)")
    src.add_argument("--hf", metavar="DIR", help="a Hugging Face / sentence-transformers encoder folder")
    parser.add_argument("-o", "--output", required=True, help="the profile table (JSON) to write")
    parser.add_argument("--batch", type=int, default=1, help="batch the latencies are measured at (default 1)")
    parser.add_argument("--seq", type=int, default=128, help="sequence length for --hf (default 128)")
    parser.add_argument("--sparsities", default="0.5,0.7,0.8,0.9,0.95", help="comma-separated levels")
    parser.add_argument("--granularities", default="unstructured,block:16x16",
                        help="comma-separated: unstructured (CSR), block:RxC (BSR)")
    parser.add_argument("--calib-samples", type=int, default=64, help="calibration samples for the errors")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--min-time", type=float, default=0.05, help="seconds of timing per option")
    parser.add_argument("--budget-ms", type=float, help="also print the allocation for this model latency")
    parser.add_argument("--target-speedup", type=float, help="... or for dense latency / this")


def _example(name: str, batch: int, n: int):
    from ..examples import digits_data, mlp_digits, train_dense
    data = digits_data()
    model = mlp_digits("wide" if name.endswith("wide") else "small", seed=0)
    train_dense(model, data, epochs=10)
    x = data.train.x[:max(n, batch)]
    return model, [x[i:i + batch] for i in range(0, len(x), batch)], None


def _hf(folder: str, batch: int, seq: int, n: int):
    from . import corpus as corpus_io
    from .embeddings import token_batches, tokenizer
    from .hf import load_folder
    enc = load_folder(folder)
    texts = corpus_io.load().samples("calib", n)
    return enc.model, token_batches(tokenizer(enc.tokenizer_json, seq), texts, batch=max(batch, 8)), batch * seq


def main(args) -> int:
    import json
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        sparsities = [float(s) for s in args.sparsities.split(",")]
        grans = [g.strip() for g in args.granularities.split(",")]
        if args.batch < 1 or args.calib_samples < 1:
            raise PruneError("--batch and --calib-samples must be >= 1")
        model, batches, rows = (_example(args.example, args.batch, args.calib_samples) if args.example
                                else _hf(args.hf, args.batch, args.seq, args.calib_samples))
        table = profile(model, batches, sparsities=sparsities, granularities=grans, rows=rows,
                        min_time=args.min_time)
        with open(args.output, "w") as f:
            json.dump(table, f, indent=1)
        print(format_table(table))
        print(f"wrote {args.output}")
        dense = sum(layer["options"][0]["seconds"] for layer in table["layers"].values())
        budget = args.budget_ms / 1e3 if args.budget_ms else (dense / args.target_speedup if args.target_speedup else None)
        if budget is not None:
            print(format_plan(allocate(options_of(table), budget), dense, budget))
    except (PruneError, ValueError, OSError) as exc:
        print(f"sparse-engine profile: error: {exc}", file=sys.stderr)
        return 1
    return 0


def format_table(table: dict) -> str:
    m = table["machine"]
    lines = [f"{m['cpu']}, isa {m['isa']}, {m['threads']} threads, {m['date']}, torch {m['torch']}",
             "layer  shape  rows  option  sparsity  ms  speedup  error"]
    for name, layer in table["layers"].items():
        dense = layer["options"][0]["seconds"]
        for o in layer["options"]:
            lines.append(f"{name}  {layer['shape'][0]}x{layer['shape'][1]}  {layer['rows']}  {o['granularity']}  "
                         f"{o['sparsity']:.2f}  {o['seconds'] * 1e3:.3f}  {dense / o['seconds']:.2f}x  {o['error']:.4f}")
    return "\n".join(lines)


def format_plan(plan: dict[str, Option], dense_s: float, budget_s: float) -> str:
    total = sum(o.seconds for o in plan.values())
    lines = [f"plan for {budget_s * 1e3:.3f} ms (dense {dense_s * 1e3:.3f} ms): predicted {total * 1e3:.3f} ms "
             f"({dense_s / total:.2f}x), summed error {sum(o.error for o in plan.values()):.4f}"]
    lines += [f"  {name}: {o.granularity} {o.sparsity:.2f} ({o.format}) {o.seconds * 1e3:.3f} ms, error {o.error:.4f}"
              for name, o in plan.items()]
    return "\n".join(lines)
