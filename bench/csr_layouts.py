"""Batched CSR: the row-at-a-time loop against the copies the kernel may read instead (panel-major
rows on AVX2 and AVX-512; SELL-4 grouped panels on AVX-512), the same weight and x, interleaved in
one process; GFLOP/s on stored values (2 · nnz · N / t), medians.

    PYTHONPATH=. .venv/bin/python bench/csr_layouts.py --threads 1
    PYTHONPATH=. .venv/bin/python bench/csr_layouts.py --threads 2 --shapes 3072x768,768x3072,4096x4096
"""
from __future__ import annotations

import argparse
from unittest import mock

import torch

from engine import cpu
from engine.bench import _nums, _pairs, random_weight
from engine.formats import CSR
from engine.timing import cpu_model, time_interleaved


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--shapes", type=_pairs, default=((3072, 768), (768, 3072), (4096, 4096)))
    p.add_argument("--batch", type=_nums, default=(64, 128, 1024))
    p.add_argument("--sparsity", type=lambda s: _nums(s, float), default=(0.8, 0.9, 0.95))
    p.add_argument("--min-time", type=float, default=0.5)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    layouts = ("rows", "panels", "groups") if cpu.isa() == "avx512" else ("rows", "panels")
    print(f"{cpu_model()}, kernels isa={cpu.isa()}, {args.threads} threads; GFLOP/s on stored values, medians")
    print("| shape O×I | batch | sparsity | " + " | ".join(layouts) + " | chosen |\n|" + "---|" * (len(layouts) + 4))
    real = cpu._batched_layout
    for o, i in args.shapes:
        for s in args.sparsity:
            w, keep = random_weight((o, i), s)
            wc = CSR.from_dense(w, mask=keep)
            for n in args.batch:
                x = torch.randn(n, i)
                ref = x @ w.T
                fns = {}
                for layout in layouts:
                    def run(layout=layout):
                        with mock.patch.object(cpu, "_batched_layout", lambda *_: layout):
                            return cpu.csr_linear_cpu(x, wc, None, "none")
                    torch.testing.assert_close(run(), ref, rtol=1e-4, atol=1e-3)
                    fns[layout] = run
                t = time_interleaved(fns, min_time=args.min_time)
                rates = " | ".join(f"{2 * n * wc.values.numel() / t[k] / 1e9:.1f}" for k in layouts)
                print(f"| {o}x{i} | {n} | {s:.2f} | {rates} | {real(wc, n)} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
