"""One layer at batch 1 with its weight cold, as inside a real model: before every timed call a dense
F.linear on another weight of the same shape runs (untimed) and evicts this layer's weight from the
caches, so each call streams its weight from memory. BSR and CSR (engine.sparse_linear) against dense
F.linear, rounds interleaved in one process (BSR also with bf16 values, computed in fp32); medians of
the per-call times, and the weight bytes per second they imply. The issue-12 bar: BSR 16x16 at 90 %, 4096x4096, >= 8x dense.

    PYTHONPATH=. .venv/bin/python bench/cold_weights.py --threads 2
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import engine
from engine import cpu
from engine.bench import _nums, _pairs, random_weight
from engine.formats import BSR, CSR
from engine.timing import cpu_model


def cold_times(fns: dict, evict, calls: int, rounds: int) -> dict[str, float]:
    """Median seconds per call of each fn, each call right after evict(); fns take turns by round."""
    samples: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, fn in fns.items():
                for _ in range(calls):
                    evict()
                    t0 = time.perf_counter()
                    fn()
                    samples[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in samples.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--shapes", type=_pairs, default=((4096, 4096), (2048, 8192)))
    p.add_argument("--sparsity", type=lambda s: _nums(s, float), default=(0.9, 0.95))
    p.add_argument("--calls", type=int, default=20, help="cold calls per provider per round")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{cpu_model()}, kernels isa={cpu.isa_label()}, {args.threads} threads, batch 1, fp32 values; "
          f"medians of {args.calls} x {args.rounds} cold calls")
    print("| shape O×I | sparsity | dense ms | bsr 16x16 ms | csr ms | bsr speedup | csr speedup | "
          "bsr bf16 speedup | bsr GB/s | dense GB/s | bsr warm speedup |\n|" + "---|" * 11)
    for o, i in args.shapes:
        other = torch.randn(o, i)   # the previous layer's weight: evicts this one's
        x, xe = torch.randn(1, i), torch.randn(1, i)
        evict = lambda: F.linear(xe, other)  # noqa: E731
        for s in args.sparsity:
            w, keep = random_weight((o, i), s, block=(16, 16))
            wb, wc = BSR.from_dense(w, mask=keep, blocksize=(16, 16)), CSR.from_dense(w, mask=keep)
            wh = BSR.from_dense(w.bfloat16(), mask=keep, blocksize=(16, 16))  # bf16 values, fp32 compute
            ref = F.linear(x, w)
            fns = {"dense": lambda: F.linear(x, w), "bsr": lambda: engine.sparse_linear(x, wb),
                   "csr": lambda: engine.sparse_linear(x, wc), "bsr bf16": lambda: engine.sparse_linear(x, wh)}
            for name in ("bsr", "csr"):
                torch.testing.assert_close(fns[name](), ref, rtol=1e-4, atol=1e-3)
            torch.testing.assert_close(fns["bsr bf16"](), F.linear(x, w.bfloat16().float()), rtol=1e-4, atol=1e-3)
            t = cold_times(fns, evict, args.calls, args.rounds)
            warm = cold_times({k: fns[k] for k in ("dense", "bsr")}, lambda: None, args.calls, args.rounds)
            gbs = {k: b / t[k] / 1e9 for k, b in (("bsr", wb.nbytes), ("dense", w.numel() * 4))}
            print(f"| {o}x{i} | {s:.2f} | {t['dense'] * 1e3:.3f} | {t['bsr'] * 1e3:.3f} | {t['csr'] * 1e3:.3f} | "
                  f"{t['dense'] / t['bsr']:.2f}x | {t['dense'] / t['csr']:.2f}x | {t['dense'] / t['bsr bf16']:.2f}x | {gbs['bsr']:.1f} | "
                  f"{gbs['dense']:.1f} | {warm['dense'] / warm['bsr']:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
