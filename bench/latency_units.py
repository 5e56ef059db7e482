"""Per-unit check of the latency profile (issue 13): the profile's option times against per-unit hook
times of the measured artifacts, for the wide digits MLP at batch 32 (uniform 16x16 blocks at 90 %
and unstructured 90 %, SparseGPT + 20 epochs), 1 thread, CPU time.

    PYTHONPATH=. .venv/bin/python bench/latency_units.py

Prints, per plan: measured and predicted ms, and the unit times both ways (microseconds).
"""
import tempfile
import time
from pathlib import Path

import torch

import engine
from engine.prune import target as T
from engine.prune.latency import options_of, time_configs, unit_slots

torch.set_num_threads(1)
clock = time.thread_time
subject = T.example_subject("mlp-digits-wide", 32, epochs=20, calib_samples=128)
tmp = Path(tempfile.mkdtemp())
setup = T.prepare(subject, tmp, clock=clock, sparsities=(0.7, 0.8, 0.9, 0.95),
                  granularities=("unstructured", "block:16x16"), criterion="sparsegpt", rounds=15, min_time=20)
opts = options_of(setup.table)
shapes = [tuple(u["shape"]) for u in setup.table["units"].values()]
print("profile dense units", [round(o[0].seconds * 1e6) for o in opts.values()])
for gran in ("block:16x16", "unstructured"):
    plan = T.uniform_plan(setup.table, gran, 0.9)
    row = T.run_plan(setup, plan, "sparsegpt", tmp / gran[:3], tmp / f"{gran[:3]}.spz", model_time=3.0, clock=clock)
    art = engine.load(tmp / f"{gran[:3]}.spz")
    slots = unit_slots(art, shapes)
    units, rest = time_configs(art, setup.inputs, slots, [[getattr(p, n) for p, n in slots]], 15, clock, min_time=5)
    print(f"{gran} 0.9: measured {row['measured_ms']:.3f} ms, predicted {row['predicted_ms']:.3f} ms")
    print("  profile units", [round(plan[u].seconds * 1e6) for u in plan], "artifact units",
          [round(x * 1e6) for x in units[0]])
