"""Latency-aware allocation (issue 13): where to prune, decided from how fast the result will run
on this machine and how much the model's output suffers.

- `units(names)`: the layers that run as one kernel call in the engine. A BERT attention's query,
  key and value are stacked into one matrix by engine.transformer, so they are one unit and take
  one option together; every other layer is a unit of its own.
- `profile(model, calib_batches, engine_model, inputs, ...)`: for every unit, over a grid of options
  (dense; unstructured -> CSR; R x C blocks -> BSR; at each sparsity level), the unit's latency
  *measured* here inside whole forward passes of the engine's model at the user's batch and
  sequence length (every unit in that option at once, timed by hooks; the options take turns in
  every round, each turn warmed first; medians of at least `rounds` rounds and `min_time`
  seconds; scaled to each option's whole-model time in blocks of back-to-back passes), so caches
  hold what they hold in the real model; the model's time outside its units;
  and its sensitivity: the relative change of the *model's* output on calibration data
  when this unit alone is pruned that way by the calibrated criterion (wanda or sparsegpt), i.e.
  ||f(x) - f'(x)||^2 / ||f(x)||^2, measured, not assumed.
- `allocate(options, budget_s)`: one option per unit minimising the summed sensitivity under a
  latency budget: a multiple-choice knapsack solved exactly by dynamic programming over the budget
  cut in `bins` steps, each option's time rounded *up* to a step (so the plan never exceeds the
  budget; it may miss a plan that fits only within the rounding). An infeasible budget is an error
  naming the fastest reachable latency.

Summing per-unit sensitivities treats units as independent (the assumption OBS-style pruners make
per weight); engine/prune/target.py prunes with a plan, measures the real model and reports
predicted against measured latency.
"""
from __future__ import annotations

import math
import time
import statistics
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import numpy as np
import torch
from torch import nn

from .calibrate import InputStats, _as_args, _first_output, sparsegpt_layer, wanda_layer
from .granularity import PruneError, check_sparsity, parse_granularity
from .masks import prunable_layers, weight_2d

QKV = ("query", "key", "value")
CRITERIA = ("wanda", "sparsegpt")


@dataclass(frozen=True)
class Option:
    """One way to run one unit: its granularity ("dense", "unstructured", "block:RxC"), sparsity,
    format, measured seconds per call and sensitivity (relative model-output change; 0 for dense)."""
    granularity: str
    sparsity: float
    format: str
    seconds: float
    error: float


def units(names: Iterable[str]) -> dict[str, list[str]]:
    """{unit: [layer names]}, in layer order: "<parent>.qkv" for a query/key/value trio, else the layer."""
    names = list(names)
    out: dict[str, list[str]] = {}
    for n in names:
        parent, _, leaf = n.rpartition(".")
        if leaf in QKV and all(f"{parent}.{q}" in names for q in QKV):
            out.setdefault(f"{parent}.qkv", []).append(n)
        else:
            out[n] = [n]
    return out


def _format_of(gran) -> tuple[str, tuple[int, int] | None]:
    if gran.kind == "block":
        return "bsr", tuple(gran.block)
    return "csr", None


def stacked(layers: list[nn.Linear], weight: torch.Tensor) -> nn.Linear:
    """One nn.Linear holding the units' (stacked) weight and biases, as the engine runs it."""
    biased = any(m.bias is not None for m in layers)
    proxy = nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=biased)
    with torch.no_grad():
        proxy.weight.copy_(weight)
        if biased:
            proxy.bias.copy_(torch.cat([torch.zeros(m.out_features) if m.bias is None else m.bias.detach()
                                        for m in layers]))
    return proxy


def _inputs(model: nn.Module, layers: dict, batches: list) -> dict[str, InputStats]:
    """{name: InputStats over every calibration batch}."""
    stats = {name: InputStats(m) for name, m in layers.items()}
    try:
        for batch in batches:
            model(*_as_args(batch))
    finally:
        for s in stats.values():
            s.remove()
    return stats


def model_output(model: nn.Module, batch) -> torch.Tensor:
    """The model's (first) output on one batch: what its sensitivity is measured on by default."""
    return _first_output(model(*_as_args(batch)))


def _outputs(model: nn.Module, batches: list, readout: Callable = model_output) -> list[torch.Tensor]:
    return [readout(model, b).detach().float() for b in batches]


def output_change(model: nn.Module, batches: list, reference: list[torch.Tensor],
                  readout: Callable = model_output) -> float:
    """||f(x) - f_ref(x)||^2 / ||f_ref(x)||^2 summed over the batches (f: `readout`)."""
    out = _outputs(model, batches, readout)
    num = sum(float((o - r).pow(2).sum()) for o, r in zip(out, reference))
    return num / max(sum(float(r.pow(2).sum()) for r in reference), 1e-30)


def prune_weight(w: torch.Tensor, hessian: torch.Tensor, criterion: str, gran, sparsity: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(pruned weight, keep mask) of one layer by a calibrated criterion; sparsegpt also updates."""
    if criterion == "sparsegpt":
        return sparsegpt_layer(w, hessian, gran, sparsity)
    keep = wanda_layer(w, hessian, gran, sparsity)
    return w * keep, keep


def unit_slots(engine_model: nn.Module, shapes: list[tuple[int, int]]) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of each unit's SparseLinear in the engine's model, in unit order (the
    engine registers a block's stacked QKV, output, FFN-in and FFN-out in the units' order)."""
    from ..modules import SparseLinear
    slots = [(parent, name) for parent in engine_model.modules() for name, child in parent.named_children()
             if isinstance(child, SparseLinear)]
    found = [(getattr(p, n).out_features, getattr(p, n).in_features) for p, n in slots]
    if found != [tuple(s) for s in shapes]:
        raise PruneError(f"profile: the engine's layers {found[:6]}... do not line up with the model's prunable "
                         f"units {shapes[:6]}...")
    return slots


def time_configs(engine_model: nn.Module, inputs: tuple, slots: list, configs: list[list[nn.Module]], rounds: int,
                 clock: Callable[[], float], min_time: float = 0.0, warm_time: float = 0.01,
                 block_time: float = 0.02) -> tuple[list[list[float]], float]:
    """([each unit's seconds per config], the model's seconds outside its units): each config is
    one module per slot; a unit's seconds are timed by hooks inside whole forward passes, less the
    hooks' own cost (measured on an empty module). The configs take turns within every round, so a
    burst of load from other processes lands on all alike; each turn starts with untimed passes
    (at least one, and for `warm_time` seconds), so the caches and branch predictors hold that
    config as they hold a model that serves call after call, not the config before it. Rounds go on
    until `rounds` are done and `min_time` wall seconds have passed: this host's speed changes
    from second to second, and a sub-millisecond model needs many rounds to see as many of those
    changes as the seconds-long measurement it predicts. Medians.

    Each turn ends with a block of back-to-back passes without hooks (about `block_time` seconds),
    timed as a whole: the config's whole-model time as a model serving call after call runs (a
    single pass timed after switching configs ran up to 10 % faster than that here, and the hook
    bracketing adds its own disturbance). The time outside the units is the median over configs of
    (that time - the units' sum), and each config's units are scaled so that they and the time
    outside add up to its whole-model time: hooks give the split between units, the blocks the
    total. The hooks exist only during the untimed and the hook-timed pass, as even an idle hook
    costs microseconds per call."""
    spent = [0.0] * (len(slots) + 1)  # index -1: the probe
    state = {"on": False, "t0": 0.0}

    def before(_m, _args):
        if state["on"]:
            state["t0"] = clock()

    def after(i):
        def hook(_m, _args, _out):
            if state["on"]:
                spent[i] += clock() - state["t0"]
        return hook
    probe, probe_x, probe_t = nn.Identity(), torch.zeros(1), []
    originals = [getattr(p, n) for p, n in slots]

    def use(config):
        for (parent, name), module in zip(slots, config):
            setattr(parent, name, module)

    def hooked(config):
        return [h for i, m in [*enumerate(config), (-1, probe)]
                for h in (m.register_forward_pre_hook(before), m.register_forward_hook(after(i)))]
    samples = [([[] for _ in slots], []) for _ in configs]
    try:
        with torch.inference_mode():
            passes = []  # per config: passes in one timed block of about block_time seconds
            for config in configs:  # first calls pack and cache
                use(config)
                engine_model(*inputs)
                begin = time.perf_counter()
                engine_model(*inputs)
                passes.append(max(1, round(block_time / max(time.perf_counter() - begin, 1e-6))))
            start, done = time.perf_counter(), 0
            while done < rounds or time.perf_counter() - start < min_time:
                done += 1
                for config, n, (per_unit, totals) in zip(configs, passes, samples):
                    use(config)
                    handles = hooked(config)
                    try:  # an untimed pass first: caches (and the hooks' code) hold this config
                        warm_start = time.perf_counter()
                        engine_model(*inputs)
                        while time.perf_counter() - warm_start < warm_time:
                            engine_model(*inputs)
                        probe(probe_x)
                        spent[:] = [0.0] * len(spent)
                        state["on"] = True
                        engine_model(*inputs)
                        probe(probe_x)
                    finally:
                        state["on"] = False
                        for h in handles:
                            h.remove()
                    for i in range(len(slots)):
                        per_unit[i].append(spent[i])
                    probe_t.append(spent[-1])
                    begin = clock()
                    for _ in range(n):
                        engine_model(*inputs)
                    totals.append((clock() - begin) / n)
    finally:
        use(originals)
    cost = statistics.median(probe_t)
    units_s = [[max(statistics.median(v) - cost, 0.0) for v in per_unit] for per_unit, _ in samples]
    totals = [statistics.median(t) for _, t in samples]
    rest = max(statistics.median([t - sum(u) for u, t in zip(units_s, totals)]), 0.0)
    # Each config's units scaled so that they and the rest add up to its own whole-model time.
    return [[x * (t - rest) / sum(u) if sum(u) > 0 and t > rest else x for x in u]
            for u, t in zip(units_s, totals)], rest


@torch.no_grad()
def profile(model: nn.Module, calib_batches: Iterable, engine_model: nn.Module, inputs: tuple, *,
            sparsities: Iterable[float] = (0.5, 0.7, 0.8, 0.9, 0.95),
            granularities: Iterable[str] = ("unstructured", "block:16x16"), skip: Iterable[str] = (),
            rounds: int = 15, min_time: float = 0.0, criterion: str = "wanda", sensitivity_batches: int | None = 4,
            readout: Callable = model_output, clock: Callable[[], float] = time.perf_counter) -> dict:
    """-> {"machine", "criterion", "model": {"dense_s", "rest_s"}, "units": {name: {"members",
    "shape", "options"}}}.

    `model` is the torch model (pruned copies of its weights are scored on the first
    `sensitivity_batches` calibration batches by the change of `readout(model, batch)`, by default
    the model's output; an encoder's pooled sentence embeddings, say); `engine_model` the same model as the engine runs it
    with every unit dense (engine.load of its dense conversion), timed on `inputs` (the batch and
    sequence length the latency is for). For each grid option, every unit the option tiles is
    swapped for its pruned version in that layout and each unit is timed *inside* whole forward
    passes (so caches hold what they hold in the real model); `rest_s` is the dense model's time
    outside its units. Units named in `skip` keep only the dense option."""
    from .. import cpu
    from ..modules import SparseLinear
    from ..timing import cpu_model
    if criterion not in CRITERIA:
        raise PruneError(f"profile: unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    was_training = model.training
    model.eval()
    layers = {n: m for n, m in prunable_layers(model).items() if isinstance(m, nn.Linear)}
    if not layers:
        raise PruneError("profile: the model has no nn.Linear layer to profile")
    skip = set(skip)
    levels = [check_sparsity(s) for s in sparsities]
    grans = [parse_granularity(g) for g in granularities]
    batches = list(calib_batches)
    stats = _inputs(model, layers, batches)
    sens_batches = batches[:sensitivity_batches] if sensitivity_batches else batches
    reference = _outputs(model, sens_batches, readout)
    groups = units(layers)
    candidates = {}  # (unit, granularity, sparsity) -> (pruned stacked weight, keep, sensitivity)
    for unit, members in groups.items():
        if any(n in skip for n in members):
            continue
        mods = [layers[n] for n in members]
        ws = [weight_2d(m).detach().clone() for m in mods]
        hessian = stats[members[0]].hessian()  # a unit's layers share their input
        for gran in grans:
            if gran.kind == "block" and any(v.shape[0] % gran.block[0] or v.shape[1] % gran.block[1] for v in ws):
                continue  # blocks that do not tile this unit
            for s in levels:
                pruned = [prune_weight(v, hessian, criterion, gran, s) for v in ws]
                try:  # the model with this unit alone pruned, against the dense model's outputs
                    for m, (new, _) in zip(mods, pruned):
                        m.weight.copy_(new.reshape(m.weight.shape))
                    change = output_change(model, sens_batches, reference, readout)
                finally:
                    for m, v in zip(mods, ws):
                        m.weight.copy_(v.reshape(m.weight.shape))
                candidates[unit, str(gran), s] = (torch.cat([p for p, _ in pruned]),
                                                  torch.cat([k for _, k in pruned]), change)
    model.train(was_training)

    shapes = [(sum(layers[n].out_features for n in members), layers[members[0]].in_features)
              for members in groups.values()]
    slots = unit_slots(engine_model, shapes)
    originals = [getattr(p, n) for p, n in slots]
    grid = [(gran, s) for gran in grans for s in levels]
    configs = [originals]
    for gran, s in grid:  # every unit the option tiles in its pruned layout; the others dense
        fmt, block = _format_of(gran)
        config = []
        for old, (unit, members) in zip(originals, groups.items()):
            if (unit, str(gran), s) not in candidates:
                config.append(old)
                continue
            w, keep, _ = candidates[unit, str(gran), s]
            new = SparseLinear.from_linear(stacked([layers[n] for n in members], w), fmt, block, mask=keep)
            new.activation = old.activation
            config.append(new)
        configs.append(config)
    (dense_t, *timed), rest = time_configs(engine_model, inputs, slots, configs, rounds, clock, min_time)
    # A unit's dense option: its median time over every config in which it ran dense, not only the
    # all-dense one, where a small layer runs right after the big dense ones have emptied the caches
    # (the digits MLP's 10x1024 head: 158 us there, 61 us inside a block-sparse model at batch 32).
    dense_opt = [statistics.median([dense_t[j]] + [times[j] for (gran, s), times in zip(grid, timed)
                                                   if (unit, str(gran), s) not in candidates])
                 for j, unit in enumerate(groups)]
    options = {unit: [Option("dense", 0.0, "dense", t, 0.0)] for unit, t in zip(groups, dense_opt)}
    for (gran, s), times in zip(grid, timed):
        for unit, t in zip(groups, times):
            if (unit, str(gran), s) in candidates:
                options[unit].append(Option(str(gran), s, _format_of(gran)[0], t, candidates[unit, str(gran), s][2]))
    machine = {"cpu": cpu_model(), "isa": cpu.isa_label() if cpu.available() else "none",
               "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "torch": torch.__version__, "clock": "cpu" if clock is time.thread_time else "wall"}
    table = {unit: {"members": members, "shape": list(shape), "options": [asdict(o) for o in options[unit]]}
             for (unit, members), shape in zip(groups.items(), shapes)}
    return {"machine": machine, "criterion": criterion, "model": {"dense_s": sum(dense_t) + rest, "rest_s": rest},
            "units": table}


def options_of(table: dict) -> dict[str, list[Option]]:
    """A profile's units as {name: [Option]}."""
    return {name: [Option(**o) for o in unit["options"]] for name, unit in table["units"].items()}


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


# -- tables for people --------------------------------------------------------------------------------
def format_table(table: dict) -> str:
    m = table["machine"]
    lines = [f"{m['cpu']}, isa {m['isa']}, {m['threads']} threads ({m['clock']} clock), {m['date']}, torch "
             f"{m['torch']}; sensitivity: {table['criterion']}",
             "unit  shape  option  sparsity  ms (inside the model)  speedup  sensitivity"]
    for name, unit in table["units"].items():
        dense = unit["options"][0]["seconds"]
        for o in unit["options"]:
            lines.append(f"{name}  {unit['shape'][0]}x{unit['shape'][1]}  {o['granularity']}  "
                         f"{o['sparsity']:.2f}  {o['seconds'] * 1e3:.3f}  {dense / o['seconds']:.2f}x  {o['error']:.4f}")
    return "\n".join(lines)


def format_plan(plan: dict[str, Option], dense_s: float, budget_s: float, rest_s: float = 0.0) -> str:
    """The plan, its predicted latency (rest_s: the model's time outside the units) against dense."""
    total = rest_s + sum(o.seconds for o in plan.values())
    lines = [f"plan for {budget_s * 1e3:.3f} ms (dense {dense_s * 1e3:.3f} ms): predicted {total * 1e3:.3f} ms "
             f"({dense_s / total:.2f}x), summed sensitivity {sum(o.error for o in plan.values()):.4f}"]
    lines += [f"  {name}: {o.granularity} {o.sparsity:.2f} ({o.format}) {o.seconds * 1e3:.3f} ms, sensitivity {o.error:.4f}"
              for name, o in plan.items()]
    return "\n".join(lines)
