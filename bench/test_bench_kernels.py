"""pytest-benchmark: one linear layer y = x·Wᵀ per provider, grouped by shape / batch / sparsity.

Every group holds the dense torch baseline (F.linear) beside torch.sparse CSR/BSR, ONNX Runtime's
dense run (when onnxruntime is installed), the engine's CSR, BSR per block size, and 16-bit weight
variants. extra_info carries GFLOP/s on the stored values, GB/s of the weight bytes and the
provider name; bench/report.py turns the JSON into the table and plot of bench/results/cpu.md.

    # small default grid (a few minutes)
    PYTHONPATH=. .venv/bin/python -m pytest bench/test_bench_kernels.py --benchmark-json out.json
    # the issue-7 grid (4 shapes x batch 1,8,32,128 x sparsity 0.5..0.95)
    SPARSE_ENGINE_BENCH=full PYTHONPATH=. .venv/bin/python -m pytest bench/test_bench_kernels.py ...

SPARSE_ENGINE_BENCH_THREADS (default 2) sets the threads of every provider.
"""
from __future__ import annotations

import os

import pytest
import torch

from engine import bench, cpu

FULL = os.environ.get("SPARSE_ENGINE_BENCH", "") == "full"
THREADS = int(os.environ.get("SPARSE_ENGINE_BENCH_THREADS", "2"))

if FULL:
    SHAPES, BATCHES, SPARSITIES, BLOCKS = bench.SHAPES, bench.BATCHES, bench.SPARSITIES, bench.BLOCKS
else:
    SHAPES, BATCHES, SPARSITIES = ((4096, 4096), (1536, 384)), (1, 32), (0.9,)
    BLOCKS = ((8, 8), (16, 16))

PROVIDERS = (["dense", "torch.sparse csr", "onnxruntime dense", "engine csr", "engine csr bf16",
              "engine csr fp16"]
             + [f"engine bsr {r}x{c}" for r, c in BLOCKS]
             + [f"torch.sparse bsr {r}x{c}" for r, c in BLOCKS]
             + (["engine bsr 16x16 bf16"] if (16, 16) in BLOCKS else []))

CELLS = [(shape, batch, s) for shape in SHAPES for batch in BATCHES for s in SPARSITIES]
_cache: dict = {}


def _cell(shape, batch, s):
    # Weights of one cell at a time: a 4096x4096 cell holds ~0.5 GB of variants.
    key = (shape, batch, s)
    if key not in _cache:
        _cache.clear()
        torch.set_num_threads(THREADS)
        _cache[key] = bench.providers(shape, s, batch, blocks=BLOCKS, threads=THREADS)
    return _cache[key]


@pytest.mark.parametrize("cell,provider", [(c, p) for c in CELLS for p in PROVIDERS],
                         ids=[f"{c[0][0]}x{c[0][1]}-N{c[1]}-s{c[2]}-{p.replace(' ', '_')}"
                              for c in CELLS for p in PROVIDERS])
def test_linear(benchmark, cell, provider):
    assert cpu.available(), cpu.import_error()
    shape, batch, s = cell
    ps = _cell(shape, batch, s)
    if provider not in ps:
        pytest.skip(f"{provider} is not installed / does not fit {shape}")
    p = ps[provider]
    torch.set_num_threads(THREADS)
    benchmark.group = f"{shape[0]}x{shape[1]} N={batch} s={s}"
    with torch.inference_mode():
        benchmark(p["fn"])
    t = benchmark.stats.stats.median
    o, i = shape
    w_bytes = p["stored"] * p["value_bytes"]
    benchmark.extra_info.update(
        provider=provider, out_features=o, in_features=i, batch=batch, sparsity=s, threads=THREADS,
        isa=cpu.isa(), stored=p["stored"], block=p["block"], value_bytes=p["value_bytes"],
        gflops=2.0 * batch * p["stored"] / t / 1e9, weight_gbps=w_bytes / t / 1e9)


# ---- whole model: the pruned 784-4096-4096-10 MLP (ReLU), unstructured, batch 64 -----------------

_mlp_cache: dict = {}


@pytest.mark.parametrize("sparsity", [0.9, 0.95])
@pytest.mark.parametrize("provider", ["dense", "engine csr"])
def test_mlp_784_4096_4096_10(benchmark, sparsity, provider):
    if sparsity not in _mlp_cache:
        _mlp_cache.clear()
        torch.set_num_threads(THREADS)
        _mlp_cache[sparsity] = bench.mlp_providers(sparsity, 64)
    p = _mlp_cache[sparsity][provider]
    torch.set_num_threads(THREADS)
    benchmark.group = f"mlp 784-4096-4096-10 N=64 s={sparsity}"
    with torch.inference_mode():
        benchmark(p["fn"])
    t = benchmark.stats.stats.median
    benchmark.extra_info.update(provider=provider, model="mlp 784-4096-4096-10", batch=64,
                                sparsity=sparsity, threads=THREADS, isa=cpu.isa(), stored=p["stored"],
                                gflops=2.0 * 64 * p["stored"] / t / 1e9)
