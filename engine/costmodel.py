"""Predicted time of one linear layer in each layout, from bytes moved and FLOPs (a roofline whose
bandwidths and FLOP rates are the ones each kernel family reaches), plus a per-call overhead.
`auto` format selection and `inspect`'s expected speedup both read it.

The rates are data (the tables below, with where they come from), kept apart from the formula;
the bytes a layout moves come from its format description (`engine.formats`). A layout missing
from a device's table is never chosen by `auto` there (`has_rates`).
"""
from __future__ import annotations

import math

from . import formats

# ---- CPU ----------------------------------------------------------------------------------------
CPU_FITTED = {
    "date": "2026-11-28",
    "source": "bench/results/cpu.md, section 'Cost model' (kernel grid 4096x4096, 3072x768, "
              "768x3072, 1536x384; batch 1-128; sparsity 0.5-0.95; bench.time_interleaved medians)",
    "machine": "Intel Xeon (KVM guest, family 6 model 167), 2 vCPUs, AVX-512, torch 2.13 MKL",
    "isa": "avx512",
    "threads": 2,
}
# Per layout, for CPU_FITTED's machine and thread count:
#   bandwidth   B/s of weight + activation traffic. Layers up to 64 MiB are partly cache-resident
#               there (a 64 MiB GEMV streams at ~50 GB/s on 2 threads, a 256 MiB one at ~30 GB/s).
#   rate        FLOP/s on stored values by batch, log-interpolated between the measured batches.
#               Dense is far below its peak at batch 8-32 (MKL's small-N GEMM); CSR is gather-bound
#               below batch 4 and L2-bound beyond; BSR streams its values at batch 1 and runs
#               register-blocked FMAs beyond.
#   overhead    seconds per call. The same for every layout: the Python in front of the kernels is
#               paid per layer either way (tiny layers: F.linear ~4 us, engine.cpu wrapper ~6 us).
#   isa_factor  rate multiplier by batch when the kernels run a narrower ISA than CPU_FITTED's,
#               applied from the smallest batch listed (AVX2 measured: the batched sparse
#               micro-kernels run 8-wide, ~0.55x at batch >= 32; portable not measured, AVX2's used;
#               the factored rate never falls below its value at a smaller listed batch).
#   scalar_spmv / narrow_rows   block-shape factors of blocked layouts, see BLOCK_VECTOR below.
CPU = {
    "dense": dict(bandwidth=48e9, overhead=4e-6,
                  rate={1: 250e9, 8: 100e9, 32: 145e9, 128: 250e9}),
    # csr at 128 rows: 170 GFLOP/s since the grouped 512-bit layout reads chunk-major X (2026-12-08,
    # Intel model 207: ~210 GFLOP/s at 30-50 % sparsity, where CSR meets dense, ~100-160 at 80-90 %,
    # where CSR wins by far anyway; bench/auto_choice.py, cpu.md "Cost model"). At 120 it kept a
    # 50 % layer dense where CSR is 1.3x faster. AVX2's factor at 128 lowered with it (0.85 -> 0.6:
    # its panel-major kernels measured 0.65-0.86x the grouped ones), so its prediction is unchanged.
    "csr": dict(bandwidth=40e9, overhead=4e-6,
                rate={1: 11e9, 3: 11e9, 4: 30e9, 8: 50e9, 32: 120e9, 128: 170e9},
                isa_factor={"avx2": {32: 0.9, 128: 0.6}, "portable": {32: 0.9, 128: 0.6}}),
    "bsr": dict(bandwidth=48e9, overhead=4e-6,
                rate={1: 60e9, 3: 60e9, 4: 60e9, 8: 86e9, 32: 200e9, 128: 200e9},
                isa_factor={"avx2": {32: 0.7, 128: 0.55}, "portable": {32: 0.7, 128: 0.55}},
                scalar_spmv=0.25, narrow_rows=0.75),
}
# ---- CPU, bf16 compute (bf16 x and weights: a model cast to bf16) ---------------------------------
# (Laid out like CPU_FITTED / CPU on purpose: one provenance record and one rate table per
# compute type; `duplicates` sees the same shape.)
CPU_BF16_FITTED = {
    "date": "2026-12-05",
    "source": "bench/results/bf16.md (bench/bf16_layers.py --threads 1 --cpu-time: MLP 4096x784, "
              "4096x4096 at batch 1/64; BERT 768x768, 3072x768, 768x3072 at 128/1024 rows; 90% "
              "sparse 16x32 / 16x16 tiles; minima), 1-thread rates doubled for 2 threads; bsr at "
              "128/1024 rows re-measured 2026-12-07 at 2 threads after the batch-row thread split "
              "(BERT 2304x768, 3072x768, 768x3072, 16x32, 90%: 0.85-1.16 TFLOP/s on stored values)",
    "machine": "Intel Xeon (KVM guest, AMX-TILE/BF16, AVX512-BF16), 2 vCPUs shared, torch 2.13 oneDNN",
    "isa": "amx",
    "threads": 2,
}
# dense: torch F.linear on bf16 (oneDNN, AMX); slow GEMV at batch 1 (~12 GFLOP/s a thread).
# bsr:   csrc/bf16.cpp AMX tiles, blocks R <= 16, even C <= 32 (else the fp32 BSR row applies);
#        one A-tile load per 16x16x32 TDPBF16PS and the per-tile store + epilogue bound it at
#        ~450 GFLOP/s a thread on stored values; blocks narrower than 32 inputs scale it by C/32
#        (16x16: 0.48 TFLOP/s at 2 threads, MiniLM 1152x384 at 4096 rows, against ~0.9).
# csr:   the fp32 CSR row above. csrc/bf16.cpp's AVX512-BF16 CSR kernel measured 1.2x (batch 1),
#        1.1-3.5x (batch 4-8) and parity (batch 64) against the fp32-compute kernel on bf16 weights
#        (bench/results/bf16.md, "Unstructured on AVX512-BF16"; 1 thread, noisy): not re-fitted.
CPU_BF16 = {
    "dense": dict(bandwidth=48e9, overhead=6e-6,
                  rate={1: 24e9, 64: 920e9, 128: 1.5e12, 1024: 2.4e12}),
    "bsr": dict(bandwidth=48e9, overhead=8e-6,
                rate={1: 40e9, 8: 300e9, 64: 800e9, 128: 900e9, 1024: 900e9}),
}


def bf16_compute_available() -> bool:
    """Whether this process runs bf16 BSR on AMX / AVX512-BF16 (engine.cpu.bf16_isa() != "none")."""
    from . import cpu
    return cpu.available() and cpu.bf16_isa() != "none"


# Blocked layouts' kernel shapes: below SPMM_FROM_BATCH rows of x a block row is a vector SpMV only
# when C is a multiple of the vector width (or C == 1 and R is); otherwise it runs a scalar loop
# (x scalar_spmv). From SPMM_FROM_BATCH rows, blocks with R < NARROW_R share each loaded x vector
# among fewer rows (x narrow_rows).
BLOCK_VECTOR = 8
SPMM_FROM_BATCH = 4
NARROW_R = 4
# One thread draws most of the memory bandwidth two threads do; compute scales with cores.
ONE_THREAD_BANDWIDTH_SHARE = 0.875

# ---- GPU ----------------------------------------------------------------------------------------
GPU_FITTED = {
    "date": "2026-11-28",
    "source": "nominal H100/H200 figures (HBM bandwidth, tensor-core peak) scaled by the share each "
              "kernel family reaches; not fitted to measurements (bench/RESULTS.md has the H200 grid)",
    "machine": "NVIDIA H100/H200",
}
GPU = {
    "dense": dict(bandwidth=3.0e12, peak=600e12, overhead=8e-6),
    "csr": dict(bandwidth=1.5e12, peak=30e12, overhead=8e-6),
    "bsr": dict(bandwidth=2.5e12, peak=300e12, overhead=8e-6),
}
TABLES = {"cpu": CPU, "cuda": GPU}  # any other device is predicted with the CPU table


def _interp(table: dict[int, float], n: int) -> float:
    keys = sorted(table)
    if n <= keys[0]:
        return table[keys[0]]
    if n >= keys[-1]:
        return table[keys[-1]]
    for lo, hi in zip(keys, keys[1:]):
        if lo <= n <= hi:
            f = (math.log2(n) - math.log2(lo)) / (math.log2(hi) - math.log2(lo))
            return table[lo] * (table[hi] / table[lo]) ** f
    return table[keys[-1]]


def current_isa() -> str:
    """The ISA this process's CPU kernels run ("avx512", "avx2", "portable"); without the
    extension, the fitted machine's, so the model still answers for the machine it describes."""
    from . import cpu
    return cpu.isa() if cpu.available() else CPU_FITTED["isa"]


def has_rates(fmt: str, device: str = "cpu") -> bool:
    return fmt in TABLES.get(device, CPU)


def _row(fmt: str, device: str) -> dict:
    table = TABLES.get(device, CPU)
    if fmt not in table:
        raise ValueError(f"predict_seconds: unknown format {fmt!r} on {device}: the cost model has "
                         f"rates for {sorted(table)} (add a row to engine/costmodel.py's table)")
    return table[fmt]


def _bf16_row(fmt: str, blocksize) -> dict | None:
    """The bf16-compute rates of fmt, or None where the fp32-compute kernel serves bf16."""
    from .cpu import bf16_block_fits
    if fmt == "bsr" and not (blocksize and bf16_block_fits(blocksize)):
        return None
    return CPU_BF16.get(fmt)


def predict_seconds(fmt: str, shape: tuple[int, int], stored: int, batch: int,
                    blocksize: tuple[int, int] | None = None, value_bytes: int = 4,
                    device: str = "cpu", threads: int = 2, isa: str | None = None,
                    compute: str = "fp32") -> float:
    """fmt: a registered layout with rates here; shape (O, I); stored = values the layout keeps
    (nnz, nnzb·R·C, O·I for dense). isa: the CPU kernels' ISA to predict for (default: this
    machine's). compute="bf16": activations and weights in bf16 (a model cast to bf16), with the
    bf16 rates (CPU_BF16: dense on oneDNN AMX, BSR on AMX tiles) where a bf16 kernel serves fmt."""
    if compute not in ("fp32", "bf16"):
        raise ValueError(f"predict_seconds: compute must be 'fp32' or 'bf16', got {compute!r}")
    row = _row(fmt, device)
    bf16_row = _bf16_row(fmt, blocksize) if compute == "bf16" and device == "cpu" else None
    if bf16_row is not None:
        row = bf16_row
    o, i = shape
    batch = max(1, int(batch))
    w_bytes = formats.get(fmt).traffic_bytes(shape, stored, blocksize, value_bytes)
    act_bytes = (2 if compute == "bf16" else 4) * batch * (o + i)
    flops = 2.0 * batch * stored
    if device == "cuda":
        return row["overhead"] + max((w_bytes + act_bytes) / row["bandwidth"], flops / row["peak"])

    bw = row["bandwidth"]
    rate = _interp(row["rate"], batch)
    factor = row.get("isa_factor", {}).get(isa or current_isa())
    if factor and batch >= min(factor):
        # never below the factored rate at a smaller listed batch: a rate flat past batch 32 times
        # a factor falling past it (AVX2) would make the time per row grow with the batch
        rate = max(_interp(row["rate"], n) * _interp(factor, n) for n in {batch, *(k for k in factor if k <= batch)})
    if bf16_row is not None and fmt == "bsr" and blocksize is not None:
        from .cpu import BF16_TILE  # blocks narrower than a tile row run part-empty TDPBF16PS
        rate *= min(1.0, blocksize[1] / BF16_TILE[1])
    if blocksize is not None and "scalar_spmv" in row and bf16_row is None:
        r, c = blocksize
        if batch < SPMM_FROM_BATCH and not (c % BLOCK_VECTOR == 0 or (c == 1 and r % BLOCK_VECTOR == 0)):
            rate *= row["scalar_spmv"]
        elif batch >= SPMM_FROM_BATCH and r < NARROW_R:
            rate *= row["narrow_rows"]
    if threads != CPU_FITTED["threads"]:  # CPU_BF16_FITTED has the same thread count
        rate *= threads / CPU_FITTED["threads"]
        bw *= ONE_THREAD_BANDWIDTH_SHARE if threads == 1 else 1.0
    return row["overhead"] + max((w_bytes + act_bytes) / bw, flops / rate)
