"""Whole-model A/B of the transformer-block kernels on the peers' BERT (2 layers x 768, seq 128,
unstructured L1-magnitude pruning): the FFN as one csr_pair call vs two layer calls, and the C++
attention vs torch's scaled_dot_product_attention, toggled on the same sparsified model and timed in
interleaved rounds in one process (medians); outputs of every variant checked against each other.

    PYTHONPATH=. .venv/bin/python bench/block_ab.py --threads 2
"""
from __future__ import annotations

import argparse
import itertools

import torch

import engine
from engine import cpu, peers
from engine.bench import _nums
from engine.timing import cpu_model, time_interleaved


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sparsity", type=lambda s: _nums(s, float), default=(0.8, 0.9, 0.95))
    p.add_argument("--batch", type=_nums, default=(1, 8))
    p.add_argument("--min-time", type=float, default=4.0)
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    fits = {"pair": cpu.pair_fits, "attention": cpu.attention_fits}
    on = dict.fromkeys(fits, True)
    cpu.pair_fits = lambda *a: on["pair"] and fits["pair"](*a)
    cpu.attention_fits = lambda *a: on["attention"] and fits["attention"](*a)
    variants = {"both": (True, True), "no pair": (False, True), "no C++ attention": (True, False),
                "neither": (False, False)}
    print(f"{cpu_model()}, kernels isa={cpu.isa_label()}, {args.threads} threads; BERT 2x768 seq 128; ms, medians of "
          f"{args.rounds} interleaved rounds")
    print("| sparsity | batch | " + " | ".join(variants) + " | neither / both |\n|" + "---|" * (len(variants) + 3))
    for s, b in itertools.product(args.sparsity, args.batch):
        model = engine.sparsify(peers.pruned_model("bert", s).eval(), batch=b)
        x = peers.example_input("bert", b)

        def run(flags, model=model, x=x):
            on["pair"], on["attention"] = flags
            return model(x)
        fns = {name: (lambda flags=flags: run(flags)) for name, flags in variants.items()}
        with torch.inference_mode():
            ref = fns["neither"]()
            for fn in fns.values():
                torch.testing.assert_close(fn(), ref, rtol=1e-4, atol=1e-4)
            t = time_interleaved(fns, min_time=args.min_time, rounds=args.rounds)
        cells = " | ".join(f"{t[k] * 1e3:.2f}" for k in variants)
        print(f"| {s:.0%} | {b} | {cells} | {t['neither'] / t['both']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
