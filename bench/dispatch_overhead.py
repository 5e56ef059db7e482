"""How much of a whole-model call is spent outside the C++ kernels: the peer grid's pruned model
(engine.peers, `engine.sparsify`) timed whole, with every `engine._C` kernel entry wrapped by a timer
(the kernels' share), and again with those entries replaced by no-ops (the Python and torch glue
alone: wrappers, checks, allocations, embeddings). Medians / means over --calls calls.

    PYTHONPATH=. .venv/bin/python bench/dispatch_overhead.py [--model bert] [--sparsity 0.95] [--batch 1] [--threads 2]
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import engine  # noqa: E402
from engine import cpu, peers  # noqa: E402
from engine.timing import cpu_model  # noqa: E402

KERNELS = ("csr_linear", "bsr_linear", "csr_pair", "attention", "add_layer_norm", "linear_add_norm")


def run(model, x, calls: int, warmup: int = 20) -> list[float]:
    with torch.inference_mode():
        for _ in range(warmup):
            model(x)
        times = []
        for _ in range(calls):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bert", choices=sorted(peers.MODELS))
    ap.add_argument("--sparsity", type=float, default=0.95)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=300)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model = engine.sparsify(peers.pruned_model(args.model, args.sparsity), batch=args.batch)
    x = peers.example_input(args.model, args.batch)
    real = {k: getattr(cpu._C, k) for k in KERNELS if hasattr(cpu._C, k)}
    spent = dict.fromkeys(real, 0.0)

    def timed(name, fn):
        def call(*a, **kw):
            t = time.perf_counter()
            out = fn(*a, **kw)
            spent[name] += time.perf_counter() - t
            return out
        return call

    try:
        for k, fn in real.items():
            setattr(cpu._C, k, timed(k, fn))
        run(model, x, 0)  # warm-up of the wrapped path, then the counters from zero
        spent.update(dict.fromkeys(real, 0.0))
        whole = run(model, x, args.calls, warmup=0)
        kernels = {k: v / args.calls for k, v in spent.items() if v}
        for k in real:
            setattr(cpu._C, k, lambda *a, **kw: None)
        glue = run(model, x, args.calls)
    finally:
        for k, fn in real.items():
            setattr(cpu._C, k, fn)
    mean = sum(whole) / len(whole)
    print(f"{cpu_model()}, isa={cpu.isa_label()}, {args.threads} threads; {args.model} at {args.sparsity:.0%}, "
          f"batch {args.batch}, {args.calls} calls")
    print(f"| part | ms per model call |\n|---|---|\n| whole call (mean) | {mean * 1e3:.3f} |")
    for k, v in kernels.items():
        print(f"| kernel {k} | {v * 1e3:.3f} |")
    total = sum(kernels.values())
    print(f"| all kernels | {total * 1e3:.3f} |\n| outside the kernels | {(mean - total) * 1e3:.3f} |")
    print(f"| glue alone (kernels as no-ops, median) | {statistics.median(glue) * 1e3:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
