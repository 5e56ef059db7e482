"""`sparse-engine bench --model`: the dense twin computes what the engine computes, and the table
is printed for an MLP and a BERT artifact."""
import torch
from torch import nn

from engine.cli import main as cli
from engine.convert import convert
from engine.model_bench import DenseLinear, dense_twin
from engine.modules import SparseLinear
from engine.runtime import load
from tests.models.test_bert import hf_bert  # noqa: F401  (fixture)


def _mlp_artifact(tmp_path):
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    with torch.no_grad():
        model[0].weight.mul_(torch.rand(64, 32) > 0.8)
    torch.save(model.state_dict(), tmp_path / "mlp.pt")
    convert(tmp_path / "mlp.pt", tmp_path / "mlp.spz", arch="mlp:relu", log=lambda *_: None)
    return tmp_path / "mlp.spz"


def test_dense_twin_swaps_every_sparse_layer_and_agrees(tmp_path):
    model = load(_mlp_artifact(tmp_path))
    twin = dense_twin(model)
    assert any(isinstance(m, SparseLinear) for m in model.modules())
    assert not any(isinstance(m, SparseLinear) for m in twin.modules())
    assert any(isinstance(m, DenseLinear) for m in twin.modules())
    x = torch.randn(5, 32)
    torch.testing.assert_close(twin(x), model(x), rtol=1e-5, atol=1e-5)
    twin16 = twin.to(torch.bfloat16)  # the bf16 baseline: every weight cast with the module
    assert all(t.dtype == torch.bfloat16 for t in twin16.state_dict().values())
    torch.testing.assert_close(twin16(x.bfloat16()).float(), model(x), rtol=2e-2, atol=2e-2)


def test_bench_model_prints_a_row_per_batch(tmp_path, capsys):
    path = _mlp_artifact(tmp_path)
    assert cli(["bench", "--model", str(path), "--batch", "1,4", "--threads", "1", "--min-time", "0.01"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip() and line.split()[0].isdigit()]
    assert [r[0] for r in rows] == ["1", "4"]
    assert all(float(r[6]) < 1e-4 for r in rows)  # max |diff| engine vs dense twin


def test_bench_model_on_bert(hf_bert, tmp_path, capsys):  # noqa: F811
    folder, _ = hf_bert
    convert(folder, tmp_path / "bert.spz", log=lambda *_: None)
    assert cli(["bench", "--model", str(tmp_path / "bert.spz"), "--batch", "1,2", "--seq", "8",
                "--threads", "1", "--min-time", "0.01"]) == 0
    out = capsys.readouterr().out
    assert "family bert" in out
    assert "8 SparseLinear layers" in out  # 4 per encoder block (Q/K/V stacked into one), 2 blocks
    assert "bf16 kernels" in out and "torch CPU capability" in out  # the ISA each side used is stated
    # batch, fp32 ms, bf16 ms, engine ms, vs fp32 ("1.23x"), vs best dense, max |diff|
    rows = [line.split() for line in out.splitlines() if line.strip() and line.split()[0].isdigit()]
    assert [r[0] for r in rows] == ["1", "2"]
    for batch, fp32, bf16, eng, vs_fp32, vs_best, diff in rows:
        fp32, bf16, eng = float(fp32), float(bf16), float(eng)
        assert fp32 > 0 and bf16 > 0 and eng > 0
        for dense, printed in ((fp32, vs_fp32), (min(fp32, bf16), vs_best)):
            # Each figure is printed rounded (ms to 3 decimals, the ratio to 2): allow exactly that.
            slack = 0.005 + (dense / eng) * (0.0005 / dense + 0.0005 / eng)
            assert abs(float(printed.removesuffix("x")) - dense / eng) <= slack, (dense, eng, printed)
        assert float(diff) < 1e-4  # engine vs its dense twin on the same inputs
