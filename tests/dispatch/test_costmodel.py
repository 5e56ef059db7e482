"""The cost model behind format="auto" and inspect: its shape (monotonic, crossovers, byte counts)
and its data tables (provenance, every row complete)."""
from __future__ import annotations

import math

import pytest

from engine import costmodel, formats
from engine.costmodel import predict_seconds

SHAPES = [(4096, 4096), (3072, 768), (768, 3072), (1536, 384), (50, 100)]
BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 512]


def _stored(shape, density):
    return int(shape[0] * shape[1] * density)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("fmt, block", [("csr", None), ("bsr", (16, 16)), ("bsr", (1, 8)), ("bsr", (2, 2))])
def test_time_grows_with_stored_entries(device, fmt, block):
    for shape in SHAPES:
        for batch in BATCHES:
            times = [predict_seconds(fmt, shape, _stored(shape, d), batch, block, device=device)
                     for d in (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0)]
            assert times == sorted(times) and times[0] < times[-1], (shape, batch, times)


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_time_per_row_never_grows_with_batch(device):
    """A bigger batch amortises the weight traffic: time per row of x falls or stays (the total may
    drop where a kernel switches path, e.g. CSR's SpMM from 4 rows)."""
    for fmt, block in (("dense", None), ("csr", None), ("bsr", (16, 16))):
        for shape in SHAPES:
            stored = shape[0] * shape[1] if fmt == "dense" else _stored(shape, 0.1)
            per_row = [predict_seconds(fmt, shape, stored, b, block, device=device) / b for b in BATCHES]
            assert all(b <= a * (1 + 1e-12) for a, b in zip(per_row, per_row[1:])), (fmt, shape, per_row)
            assert predict_seconds(fmt, shape, stored, 512, block, device=device) > predict_seconds(
                fmt, shape, stored, 1, block, device=device)


def _speedup(fmt, shape, density, batch, block=None, **kw):
    dense = predict_seconds("dense", shape, shape[0] * shape[1], batch, **kw)
    return dense / predict_seconds(fmt, shape, _stored(shape, density), batch, block, **kw)


def test_dense_vs_sparse_crossover():
    """Sparse loses at low sparsity and wins at high sparsity, with one crossover in between, for
    the grid's shapes and batches (bench/results/cpu.md: CSR crosses between 50 % and 70 %)."""
    for shape in SHAPES[:4]:
        for batch in (1, 8, 32, 128):
            s = [_speedup("csr", shape, 1 - sp, batch) for sp in (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99)]
            assert s == sorted(s), (shape, batch, s)
            assert s[0] < 1 < s[-1], (shape, batch, s)
    assert _speedup("csr", (4096, 4096), 0.5, 1) < 1 < _speedup("csr", (4096, 4096), 0.3, 1)
    # At 90 % the memory-bound batch-1 BSR 16x16 speedup approaches the byte ratio, 1 / (1 - s).
    s = _speedup("bsr", (4096, 4096), 0.1, 1, (16, 16))
    assert 0.7 * 10 < s < 10


def test_16bit_weights_halve_the_bytes_and_the_memory_bound_time():
    shape, stored = (4096, 4096), _stored((4096, 4096), 0.1)
    for name, block in (("dense", None), ("bsr", (16, 16))):
        fmt = formats.get(name)
        n = shape[0] * shape[1] if name == "dense" else stored
        assert fmt.traffic_bytes(shape, n, block, 4) - fmt.traffic_bytes(shape, n, block, 2) == 2 * n
        t32 = predict_seconds(name, shape, n, 1, block, value_bytes=4)
        t16 = predict_seconds(name, shape, n, 1, block, value_bytes=2)
        # Batch 1 is memory-bound: the time follows the bytes (BSR keeps its block indices).
        assert 0.5 < t16 / t32 < (0.56 if name == "dense" else 0.65)
    # CSR: values halve, indices (uint16 for I <= 65536) stay: 6 -> 4 bytes per stored value.
    csr = formats.get("csr")
    assert csr.traffic_bytes(shape, stored, None, 4) - csr.traffic_bytes(shape, stored, None, 2) == 2 * stored
    assert csr.traffic_bytes(shape, stored, None, 4) == stored * 6 + 4 * (shape[0] + 1)
    assert csr.traffic_bytes((8, 70000), 100, None, 4) == 100 * 8 + 4 * 9  # int32 indices past 65536


def test_narrower_isa_and_fewer_threads_are_slower_where_measured():
    shape, stored = (4096, 4096), _stored((4096, 4096), 0.1)
    for fmt, block in (("csr", None), ("bsr", (16, 16))):
        fast = predict_seconds(fmt, shape, stored, 128, block, isa="avx512")
        assert predict_seconds(fmt, shape, stored, 128, block, isa="avx2") > fast
        assert predict_seconds(fmt, shape, stored, 128, block, isa="portable") > fast
        # Batch 1 is memory-bound: the SpMV shape, not the vector width, sets the time there.
        assert predict_seconds(fmt, shape, stored, 1, block, isa="avx2") == predict_seconds(
            fmt, shape, stored, 1, block, isa="avx512")
        assert predict_seconds(fmt, shape, stored, 128, block, threads=1) > fast
    # Dense runs MKL, the same on every ISA the kernels pick.
    assert predict_seconds("dense", shape, shape[0] ** 2, 64, isa="avx2") == predict_seconds(
        "dense", shape, shape[0] ** 2, 64, isa="avx512")


def test_block_shape_factors():
    shape, stored = (4096, 4096), _stored((4096, 4096), 0.1)
    t = {blk: predict_seconds("bsr", shape, stored, 1, blk) for blk in ((16, 16), (8, 1), (2, 2), (4, 4))}
    assert t[(2, 2)] > t[(16, 16)] and t[(4, 4)] > t[(16, 16)]  # no vector SpMV for C = 2 or 4
    assert predict_seconds("bsr", shape, stored, 32, (2, 8)) > predict_seconds("bsr", shape, stored, 32, (8, 8))


def test_tables_carry_their_provenance_and_complete_rows():
    for fitted in (costmodel.CPU_FITTED, costmodel.GPU_FITTED):
        assert fitted["date"] and fitted["source"] and fitted["machine"]
    assert costmodel.CPU_FITTED["isa"] == "avx512" and costmodel.CPU_FITTED["threads"] == 2
    for device, table in costmodel.TABLES.items():
        for name, row in table.items():
            assert name in formats.names(), f"{device} rates for unregistered layout {name!r}"
            assert row["bandwidth"] > 0 and row["overhead"] > 0
            rates = row["rate"].values() if device == "cpu" else [row["peak"]]
            assert all(r > 0 and math.isfinite(r) for r in rates)
        assert {"dense", "csr", "bsr"} <= set(table)


def test_unknown_format_names_the_table():
    with pytest.raises(ValueError, match="unknown format 'ell' on cpu.*rates for"):
        predict_seconds("ell", (8, 8), 8, 1)
    assert not costmodel.has_rates("ell") and costmodel.has_rates("csr", "cuda")
