"""`sparse-engine profile`: each prunable unit's latency per (format, sparsity) on this machine and
its measured sensitivity, as a JSON table (engine/prune/latency.py); the engine's dense model and
the part of it outside the units, measured; and, with --budget-ms / --target-speedup, the plan the
allocator would prune with and its predicted whole-model latency (`sparse-engine prune
--target-speedup` prunes with it and measures the result)."""
from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from .granularity import PruneError, check_sparsity
from .latency import CRITERIA, format_plan, format_table
from .target import budget_plan, example_subject, hf_subject, prepare


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
    parser.add_argument("--criterion", default="sparsegpt", choices=CRITERIA,
                        help="the calibrated pruner whose effect on the model's output is the sensitivity")
    parser.add_argument("--calib-samples", type=int, default=128, help="calibration samples")
    parser.add_argument("--sensitivity-batches", type=int, default=4,
                        help="calibration batches the model's output change is measured on (default 4)")
    parser.add_argument("--dense-epochs", type=int, default=60, help="dense training of --example (default 60)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=15, help="timed calls per option (median; default 15)")
    parser.add_argument("--profile-seconds", type=float, default=20.0,
                        help="keep timing rounds for at least this many seconds (default 20): a sub-millisecond "
                             "model needs many rounds to average over a shared host's changes of speed")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time by this thread's CPU time (needs --threads 1): for a machine shared with other jobs")
    parser.add_argument("--budget-ms", type=float, help="also print the plan for this model latency")
    parser.add_argument("--target-speedup", type=float, help="... or for the engine's dense latency / this")


def main(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        sparsities = [check_sparsity(float(s)) for s in args.sparsities.split(",")]
        grans = [g.strip() for g in args.granularities.split(",")]
        if args.batch < 1 or args.calib_samples < 1:
            raise PruneError("--batch and --calib-samples must be >= 1")
        if args.cpu_time and torch.get_num_threads() != 1:
            raise PruneError("--cpu-time measures one thread's CPU time: add --threads 1")
        subject = (example_subject(args.example, args.batch, dense_epochs=args.dense_epochs,
                                   calib_samples=args.calib_samples) if args.example
                   else hf_subject(args.hf, args.batch, args.seq, calib_samples=args.calib_samples))
        out = Path(args.output)
        if out.exists():
            out.unlink()  # rerun: measured again, not read back
        with tempfile.TemporaryDirectory() as tmp:
            setup = prepare(subject, Path(tmp), profile_path=out, clock=time.thread_time if args.cpu_time
                            else time.perf_counter, sparsities=sparsities, granularities=grans,
                            criterion=args.criterion, sensitivity_batches=args.sensitivity_batches,
                            rounds=args.rounds, min_time=args.profile_seconds)
        table = {**setup.table, "engine_dense_ms": setup.dense_s * 1e3, "outside_units_ms": setup.rest_s * 1e3}
        out.write_text(json.dumps(table, indent=1))
        print(format_table(table))
        print(f"the engine's dense model: {setup.dense_s * 1e3:.3f} ms, of which {setup.rest_s * 1e3:.3f} ms "
              f"outside the units; wrote {out}")
        budget = (args.budget_ms / 1e3 if args.budget_ms else
                  setup.dense_s / args.target_speedup if args.target_speedup else None)
        if budget is not None:
            print(format_plan(budget_plan(setup, budget), setup.dense_s, budget, setup.rest_s))
    except (PruneError, ValueError, OSError) as exc:
        print(f"sparse-engine profile: error: {exc}", file=sys.stderr)
        return 1
    return 0
