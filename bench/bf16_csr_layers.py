"""Unstructured bf16 layers: dense bf16 (torch F.linear, oneDNN) vs the fp32-compute CSR kernel on
bf16 weights (`engine.cpu.set_bf16_isa("none")`) vs the AVX512-BF16 CSR kernel (csrc/bf16.cpp,
called directly, so batches the dispatcher keeps on fp32 compute are timed too) vs
`engine.sparse_linear` as dispatched. bf16 x and bf16 weights throughout; one thread; CPU time of
the calling thread (engine.timing, interleaved rounds, medians).

    PYTHONPATH=. .venv/bin/python bench/bf16_csr_layers.py [--rounds 5] [--min-time 0.1] [--out FILE]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import engine
from engine import cpu
from engine.formats import CSR
from engine.timing import cpu_model, time_interleaved

SHAPES = ((4096, 4096), (768, 3072))
BATCHES = (1, 4, 8, 64)


def fp32_compute(x, w):
    cpu.set_bf16_isa("none")
    try:
        return engine.sparse_linear(x, w)
    finally:
        cpu.set_bf16_isa("auto")


def rows(sparsity: float, rounds: int, min_time: float) -> list[str]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for o, i in SHAPES:
        keep = torch.rand(o, i, generator=gen) >= sparsity
        w = (torch.randn(o, i, generator=gen) * keep / i ** 0.5).bfloat16()
        s = CSR.from_dense(w, mask=keep)
        for n in BATCHES:
            x = torch.randn(n, i, generator=gen).bfloat16()
            fns = {"dense bf16": lambda: F.linear(x, w), "fp32-compute CSR": lambda: fp32_compute(x, s),
                   "bf16 CSR kernel": lambda: cpu._csr_linear_bf16(x, s, None, "none"),
                   "sparse_linear": lambda: engine.sparse_linear(x, s)}
            t = time_interleaved(fns, min_time=min_time, rounds=rounds, clock=time.thread_time)
            served = cpu.bf16_kernel_for(s, n)
            out.append(f"| {o}x{i} | {n} | " + " | ".join(f"{v * 1e3:.3f}" for v in t.values()) +
                       f" | {served if served != 'none' else 'fp32-compute'} | "
                       f"{t['fp32-compute CSR'] / t['bf16 CSR kernel']:.2f}x | "
                       f"{t['dense bf16'] / t['sparse_linear']:.2f}x |")
            print(out[-1], flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--min-time", type=float, default=0.1, help="seconds per fn over all rounds")
    p.add_argument("--out", help="append the markdown table to this file")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    head = [f"### {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {cpu_model()}, 1 thread, CPU time, "
            f"sparsity {a.sparsity} unstructured, engine ISA {cpu.isa()}, bf16 ISA {cpu.bf16_isa()}, "
            f"torch {torch.__version__}",
            "",
            "ms per call, medians of interleaved rounds. `served by`: what sparse_linear ran. Speedups: "
            "fp32-compute / bf16 kernel, and dense bf16 / sparse_linear.",
            "",
            "| layer (O x I) | batch | dense bf16 | fp32-compute CSR | bf16 CSR kernel | sparse_linear "
            "| served by | kernel vs fp32-compute | sparse_linear vs dense bf16 |",
            "|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(head), flush=True)
    body = rows(a.sparsity, a.rounds, a.min_time)
    if a.out:
        with open(a.out, "a") as f:
            f.write("\n".join(head + body) + "\n\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
