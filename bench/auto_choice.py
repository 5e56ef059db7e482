"""Does `format="auto"` pick the faster of dense and CSR for an unstructured layer? One nn.Linear
(O x I) pruned at random to each sparsity, `engine.sparsify(batch=B)` (auto) against the same layer
forced to CSR and left dense, interleaved in one process, medians (ms).

    PYTHONPATH=. .venv/bin/python bench/auto_choice.py [--shape 3072x768] [--batch 32,128,1024]
        [--sparsity 0.3,0.4,0.5,0.6,0.7] [--threads 2]
"""
from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

import engine
from engine import cpu
from engine.bench import _nums, _pairs, random_weight
from engine.timing import cpu_model, time_interleaved


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=_pairs, default=((3072, 768),))
    p.add_argument("--batch", type=_nums, default=(32, 128, 1024))
    p.add_argument("--sparsity", type=lambda s: _nums(s, float), default=(0.3, 0.4, 0.5, 0.6, 0.7))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{cpu_model()}, kernels isa={cpu.isa_label()}, {args.threads} threads; ms, medians")
    print("| shape | batch | sparsity | dense | csr | auto picks | auto |\n|---|---|---|---|---|---|---|")
    for o, i in args.shape:
        for s in args.sparsity:
            lin = nn.Linear(i, o)
            with torch.no_grad():
                lin.weight.copy_(random_weight((o, i), s)[0])
            dense = nn.Sequential(lin).eval()
            for b in args.batch:
                auto = engine.sparsify(copy.deepcopy(dense), batch=b)
                csr = engine.sparsify(copy.deepcopy(dense), batch=b, format="csr")
                x = torch.randn(b, i)
                with torch.inference_mode():
                    t = time_interleaved({"dense": lambda: dense(x), "csr": lambda: csr(x), "auto": lambda: auto(x)}, 1.0)
                picked = getattr(auto[0], "format", "dense")
                print(f"| {o}x{i} | {b} | {s:.2f} | {t['dense'] * 1e3:.3f} | {t['csr'] * 1e3:.3f} | {picked} | "
                      f"{t['auto'] * 1e3:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
