"""Layer-level bf16 comparison: a pruned layer's time in dense fp32 (F.linear, MKL), dense bf16
(F.linear on bf16, oneDNN: AMX where present), the engine in fp32 (fp32 weights and x) and the
engine in bf16 (bf16 weights and x: AMX tiles / AVX512-BF16 for tile-shaped blocks; unstructured
CSR on the AVX512-BF16 CSR kernel, or the fp32-compute CSR kernel where the dispatcher keeps it).
All variants of one (layer, batch) are timed interleaved in one process (engine.timing.time_samples;
per variant "median (minimum)" of `--rounds` rounds: on a shared machine the minimum is the least
disturbed estimate). --cpu-time (with --threads 1) counts the
calling thread's CPU time only, immune to time slices lost to other processes.

    PYTHONPATH=. .venv/bin/python bench/bf16_layers.py [--threads 2] [--cpu-time] [--out bench/results/bf16.md]
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import engine
from engine import cpu
from engine.formats import BSR, CSR
from engine.timing import cpu_model, median_and_min, time_samples

# (name, out_features, in_features, tile block, batches): MLP 784-4096-4096-10 hidden layers (the
# 10x4096 head is too small to matter) and BERT-base layers (tokens = batch x 128). The tile block
# is 16 outputs x 32 inputs (one 1 KiB bf16 AMX tile); 784 inputs take 16x16 (half-K tiles).
LAYERS = [
    ("MLP 4096x784", 4096, 784, (16, 16), (1, 64)),
    ("MLP 4096x4096", 4096, 4096, (16, 32), (1, 64)),
    ("BERT 768x768", 768, 768, (16, 32), (128, 1024)),
    ("BERT 3072x768", 3072, 768, (16, 32), (128, 1024)),
    ("BERT 768x3072", 768, 3072, (16, 32), (128, 1024)),
]


def masked_weight(o: int, i: int, sparsity: float, block: tuple[int, int], gen) -> tuple:
    """(W fp32 (o, i), keep mask) with `sparsity` of the R×C blocks zero (1x1: unstructured)."""
    r, c = block
    keep = torch.rand(o // r, i // c, generator=gen) >= sparsity
    keep = keep.repeat_interleave(r, 0).repeat_interleave(c, 1)
    return torch.randn(o, i, generator=gen) * keep * (1.0 / i ** 0.5), keep


def variants(w, keep, block, n: int, gen) -> dict:
    """name -> zero-argument callable, for one layer at batch n."""
    o, i = w.shape
    x32 = torch.randn(n, i, generator=gen)
    x16 = x32.bfloat16()
    w16 = w.bfloat16()
    if block == (1, 1):
        s32, s16 = CSR.from_dense(w, mask=keep), CSR.from_dense(w16, mask=keep)
    else:
        s32, s16 = BSR.from_dense(w, mask=keep, blocksize=block), BSR.from_dense(w16, mask=keep, blocksize=block)
    return {
        "dense fp32": lambda: F.linear(x32, w),
        "dense bf16": lambda: F.linear(x16, w16),
        "engine fp32": lambda: engine.sparse_linear(x32, s32),
        "engine bf16": lambda: engine.sparse_linear(x16, s16),
    }


def run(rounds: int, sparsity: float, min_time: float, layers=LAYERS, clock=time.perf_counter) -> list[str]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for name, o, i, tile, batches in layers:
        for label, block in ((f"tiles {tile[0]}x{tile[1]}", tile), ("unstructured", (1, 1))):
            w, keep = masked_weight(o, i, sparsity, block, gen)
            for n in batches:
                fns = variants(w, keep, block, n, gen)
                for f in fns.values():  # warm: prepared copies, packing, thread pools
                    f()
                fp32_csr = block == (1, 1) and n in cpu._BF16_CSR_FP32_BATCHES  # dispatcher's rule
                engine_kernel = "fp32 FMA (CSR)" if fp32_csr else cpu.last_bf16_kernel()
                t = median_and_min(time_samples(fns, min_time=min_time * rounds, rounds=rounds, clock=clock))
                lo = {k: v[1] for k, v in t.items()}
                best_dense = min(lo["dense fp32"], lo["dense bf16"])
                best_engine = min(lo["engine fp32"], lo["engine bf16"])
                rows.append(f"| {name} | {label} | {n} | " + " | ".join(
                    f"{t[k][0] * 1e3:.3f} ({t[k][1] * 1e3:.3f})" for k in fns) + f" | {engine_kernel} | "
                    f"{lo['dense bf16'] / lo['engine bf16']:.2f}x | {best_dense / best_engine:.2f}x |")
                print(rows[-1], flush=True)
    return rows


def mlp_models(sparsity: float, block: tuple[int, int], gen) -> dict:
    """MLP 784-4096-4096-10 with its two hidden layers pruned to `sparsity` in `block` blocks (the
    10-wide head stays dense): name -> (model, input dtype) for dense fp32/bf16 and engine fp32/bf16
    (engine.sparsify to BSR with ReLU fused; the bf16 one is the fp32 one cast with .to(bfloat16))."""
    import copy

    from torch import nn
    dense = nn.Sequential(nn.Linear(784, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 10))
    with torch.no_grad():
        for layer in (dense[0], dense[2]):
            o, i = layer.weight.shape
            w, _ = masked_weight(o, i, sparsity, block, gen)
            layer.weight.copy_(w)
    sparse = engine.sparsify(copy.deepcopy(dense), "bsr", block, skip=("4",))
    return {"dense fp32": (dense, torch.float32), "dense bf16": (copy.deepcopy(dense).to(torch.bfloat16), torch.bfloat16),
            "engine fp32": (sparse, torch.float32), "engine bf16": (copy.deepcopy(sparse).to(torch.bfloat16), torch.bfloat16)}


def mlp_rows(rounds: int, sparsity: float, min_time: float, clock=time.perf_counter) -> list[str]:
    gen = torch.Generator().manual_seed(2)
    models = mlp_models(sparsity, (16, 16), gen)
    rows = []
    with torch.inference_mode():
        for n in (1, 64):
            x = torch.randn(n, 784, generator=gen)
            fns = {k: (lambda m=m, xx=x.to(dt): m(xx)) for k, (m, dt) in models.items()}
            for f in fns.values():
                f()
            t = median_and_min(time_samples(fns, min_time * rounds, rounds, clock))
            lo = {k: v[1] for k, v in t.items()}
            rows.append(f"| MLP 784-4096-4096-10, 16x16 tiles | {n} | " + " | ".join(
                f"{t[k][0] * 1e3:.3f} ({t[k][1] * 1e3:.3f})" for k in fns) + f" | {cpu.last_bf16_kernel()} | "
                f"{lo['dense bf16'] / lo['engine bf16']:.2f}x | "
                f"{min(lo['dense fp32'], lo['dense bf16']) / min(lo['engine fp32'], lo['engine bf16']):.2f}x |")
            print(rows[-1], flush=True)
    return rows


CROSSOVER_BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def crossover(rounds: int, sparsity: float, min_time: float, clock=time.perf_counter) -> list[str]:
    """Unstructured sparsity: best engine time (CSR, fp32 or bf16 weights) against dense bf16 over
    a batch sweep, per layer shape; the crossover is the smallest batch from which dense bf16 wins."""
    gen = torch.Generator().manual_seed(1)
    rows = []
    for name, o, i, _tile, _batches in LAYERS:
        w, keep = masked_weight(o, i, sparsity, (1, 1), gen)
        ratios = []
        for n in CROSSOVER_BATCHES:
            fns = variants(w, keep, (1, 1), n, gen)
            fns = {k: fns[k] for k in ("dense bf16", "engine fp32", "engine bf16")}
            for f in fns.values():
                f()
            lo = {k: v[1] for k, v in median_and_min(time_samples(fns, min_time * rounds, rounds, clock)).items()}
            ratios.append((n, lo["dense bf16"] / min(lo["engine fp32"], lo["engine bf16"])))
        cross = next((n for n, r in ratios if r < 1), None)
        rows.append(f"| {name} | " + " | ".join(f"{r:.2f}x" for _, r in ratios) +
                    f" | {cross if cross else '> ' + str(CROSSOVER_BATCHES[-1])} |")
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--min-time", type=float, default=0.02, help="seconds per fn per round")
    p.add_argument("--crossover", action="store_true",
                   help="unstructured only: engine vs dense bf16 over a batch sweep, with the crossover batch")
    p.add_argument("--mlp", action="store_true", help="whole MLP 784-4096-4096-10 (90%% 16x16 tiles) instead of layers")
    p.add_argument("--cpu-time", action="store_true", help="time the calling thread's CPU time (--threads 1)")
    p.add_argument("--out", help="append the markdown table to this file")
    a = p.parse_args(argv)
    if a.cpu_time and a.threads != 1:
        p.error("--cpu-time counts the calling thread only; use it with --threads 1")
    torch.set_num_threads(a.threads)
    head = [f"### {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: {cpu_model()}, "
            f"{a.threads} threads, sparsity {a.sparsity}, engine ISA {cpu.isa()}, bf16 ISA {cpu.bf16_isa()}, "
            f"torch {torch.__version__}, {'CPU' if a.cpu_time else 'wall'} time",
            "",
            "ms per call, median (minimum) of interleaved rounds. `engine bf16 kernel`: the family that "
            "served the engine bf16 call. Speedups, of the minima: dense bf16 / engine bf16, and best "
            "dense / best engine.",
            "",
            "| layer (O x I) | sparsity pattern | batch (rows) | dense fp32 | dense bf16 | engine fp32 | engine bf16 "
            "| engine bf16 kernel | vs dense bf16 | best vs best |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    clock = time.thread_time if a.cpu_time else time.perf_counter
    if a.crossover:
        head[2] = ("Unstructured: dense bf16 time / best engine time (CSR, fp32 or bf16 weights; minima) "
                   "by batch rows; crossover = smallest batch from which dense bf16 wins.")
        head[4:] = ["| layer (O x I) | " + " | ".join(map(str, CROSSOVER_BATCHES)) + " | crossover |",
                    "|---|" + "---|" * (len(CROSSOVER_BATCHES) + 1)]
    if a.mlp:
        head[4] = head[4].replace("layer (O x I) | sparsity pattern", "model").replace("batch (rows)", "batch")
        head[5] = "|---|---|---|---|---|---|---|---|---|"
    print("\n".join(head), flush=True)
    if a.crossover:
        rows = crossover(a.rounds, a.sparsity, a.min_time, clock)
    elif a.mlp:
        rows = mlp_rows(a.rounds, a.sparsity, a.min_time, clock)
    else:
        rows = run(a.rounds, a.sparsity, a.min_time, clock=clock)
    if a.out:
        with open(a.out, "a") as f:
            f.write("\n".join(head + rows) + "\n\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
