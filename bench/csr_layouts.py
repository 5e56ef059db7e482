"""Batched CSR: the row-at-a-time loop against the copies the kernel may read instead (panel-major
rows; SELL-4 grouped panels with the 512-bit kernels), with the 512-bit and the 256-bit kernels on
AVX-512 CPUs, the same weight and x, interleaved in one process; GFLOP/s on stored values
(2 · nnz · N / t), medians; "chosen": the layout and width the engine picks.

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
    # (vector bits, layout): on AVX-512 CPUs both the zmm kernels and the AVX2 (ymm) ones.
    variants = [(256, "rows"), (256, "panels")]
    if cpu.isa() == "avx512":
        variants = [(512, "rows"), (512, "panels"), (512, "groups")] + variants
    layouts = [f"{layout} {bits}" for bits, layout in variants]
    auto_bits = cpu.csr_bits()
    print(f"{cpu_model()}, kernels isa={cpu.isa_label()}, {args.threads} threads; GFLOP/s on stored values, medians")
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
                for name, (bits, layout) in zip(layouts, variants):
                    def run(bits=bits, layout=layout):
                        cpu.set_csr_bits(bits)
                        with mock.patch.object(cpu, "_batched_layout", lambda *_: layout):
                            return cpu.csr_linear_cpu(x, wc, None, "none")
                    torch.testing.assert_close(run(), ref, rtol=1e-4, atol=1e-3)
                    fns[name] = run
                t = time_interleaved(fns, min_time=args.min_time)
                cpu.set_csr_bits(auto_bits)
                rates = " | ".join(f"{2 * n * wc.values.numel() / t[k] / 1e9:.1f}" for k in layouts)
                print(f"| {o}x{i} | {n} | {s:.2f} | {rates} | {real(wc, n)} {auto_bits} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
