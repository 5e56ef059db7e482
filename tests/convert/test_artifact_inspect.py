"""`inspect`'s maths on a known small artifact: bytes, sparsity and the predicted speedup, worked
out by hand from the cost model's table; and the layout target the artifact records."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from engine import costmodel
from engine.artifact import read_meta
from engine.convert import convert
from engine.inspect import format_table, predicted_speedup

O, I = 512, 1024
NNZ = O * I // 8


def known_mlp() -> nn.Sequential:
    """Layer 0: 512x1024 keeping every 8th input of each row (nnz 65536, sparsity 7/8)."""
    model = nn.Sequential(nn.Linear(I, O), nn.ReLU(), nn.Linear(O, 10))
    with torch.no_grad():
        keep = torch.zeros(O, I, dtype=torch.bool)
        keep[:, ::8] = True
        model[0].weight.copy_((torch.rand(O, I) + 0.5) * keep)  # no kept weight is zero
    return model.eval()


@pytest.fixture(scope="module")
def known(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inspect")
    torch.save(known_mlp().state_dict(), tmp / "m.pt")
    convert(tmp / "m.pt", tmp / "m.sparse", format="csr", arch="mlp:relu", log=lambda *_: None)
    return read_meta(tmp / "m.sparse")


def test_bytes_and_sparsity(known):
    layer = known["layers"]["0"]
    assert layer["stored"] == NNZ == 65536
    assert layer["sparsity"] == pytest.approx(7 / 8)
    assert layer["bytes"] == 4 * (O + 1) + (4 + 4) * NNZ == 526340  # int32 crow + (int32 col, fp32 value)
    assert layer["dense_bytes"] == 4 * O * I == 2097152


def _roofline(row, batch, w_bytes, flops_values):
    rate = costmodel._interp(row["rate"], batch)
    return row["overhead"] + max((w_bytes + 4 * batch * (O + I)) / row["bandwidth"],
                                 2 * batch * flops_values / rate)


@pytest.mark.parametrize("batch", [1, 32])
def test_predicted_speedup_by_hand(known, batch):
    layer = known["layers"]["0"]
    nnz = NNZ
    t_dense = _roofline(costmodel.CPU["dense"], batch, 4 * O * I, O * I)
    # The CSR kernels read uint16 column indices (I <= 65536): 6 bytes per stored value.
    t_csr = _roofline(costmodel.CPU["csr"], batch, 6 * nnz + 4 * (O + 1), nnz)
    assert predicted_speedup(layer, batch, isa="avx512") == pytest.approx(t_dense / t_csr, rel=1e-12)
    if batch == 1:  # memory-bound dense vs gather-bound CSR: a win, below the byte ratio of 8
        assert 2.0 < t_dense / t_csr < 8.0


def test_table_rows_and_totals(known):
    text = format_table(known, batches=(1, 32))
    row = next(line for line in text.splitlines() if line.startswith("0 "))
    cells = row.split()
    assert cells[1:7] == ["512x1024", "csr", "-", "fp32", "87.5%", "526,340"]
    assert cells[7] == "2,097,152" and cells[8] == f"{526340 / 2097152:.2f}"
    total = next(line for line in text.splitlines() if line.startswith("total"))
    layers = known["layers"].values()
    assert f"{sum(l['bytes'] for l in layers):,}" in total
    assert f"{sum(l['dense_bytes'] for l in layers):,}" in total


def test_artifact_records_the_target_and_inspect_predicts_for_it(known, tmp_path):
    target = known["target"]
    assert target == {"device": "cpu", "isa": costmodel.current_isa(),
                      "cost_model": costmodel.CPU_FITTED["date"]}
    assert f"layouts chosen for cpu ({target['isa']} kernels)" in format_table(known)
    # An artifact chosen for AVX2 is predicted for AVX2, on whatever machine inspects it.
    avx2 = dict(known, target=dict(target, isa="avx2"))
    layer = known["layers"]["0"]
    want = f"{predicted_speedup(layer, 128, isa='avx2'):.2f}x"
    assert want != f"{predicted_speedup(layer, 128, isa='avx512'):.2f}x"
    row = next(line for line in format_table(avx2, batches=(128,)).splitlines() if line.startswith("0 "))
    assert row.split()[9] == want
    assert "not recorded" in format_table({k: v for k, v in known.items() if k != "target"})
