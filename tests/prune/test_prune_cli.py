"""`sparse-engine prune` end to end: checkpoint + report + plot, the max-drop search, custom models
given by import path, and clear errors."""
import json
import textwrap

import pytest
import torch

from engine.cli import main as cli_main

FAST = ["--dense-epochs", "8", "--epochs", "3", "--batch-size", "64", "--quiet"]


def _prune(tmp_path, *extra, name="pruned.pt"):
    out = tmp_path / name
    rc = cli_main(["prune", *FAST, *extra, "-o", str(out)])
    return rc, out


def test_fixed_sparsity_writes_checkpoint_masks_and_report(tmp_path):
    rc, out = _prune(tmp_path, "--example", "mlp-digits", "--sparsity", "0.8", "--skip", "4",
                     "--schedule", "gradual", "--scope", "layer")
    assert rc == 0
    state = torch.load(out, weights_only=True)
    assert set(state) == {"0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias",
                          "0.weight_mask", "2.weight_mask"}
    for layer in ("0", "2"):
        w, m = state[f"{layer}.weight"], state[f"{layer}.weight_mask"]
        assert m.dtype == torch.bool and m.shape == w.shape
        assert (w[~m] == 0).all() and 1 - m.float().mean() == pytest.approx(0.8, abs=1e-3)
    assert (state["4.weight"] != 0).all()  # the skipped head stays dense

    report = json.loads((tmp_path / "pruned.report.json").read_text())
    assert report["architecture"] == {"family": "mlp", "sizes": [64, 100, 50, 10], "activation": "relu"}
    assert 0.85 < report["dense"]["test_accuracy"] <= 1.0
    assert report["final"]["layers"]["2"]["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert report["final"]["layers"]["4"]["pruned"] is False
    assert report["final"]["sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert report["final"]["test_accuracy"] == report["steps"][0]["test_accuracy"]
    assert [e["epoch"] for e in report["steps"][0]["epochs"]] == [1, 2, 3]
    cmd = report["command"]
    assert cmd.startswith("sparse-engine prune --example mlp-digits ")
    assert all(part in cmd for part in ("--sparsity 0.8", "--skip 4", "--schedule gradual", "--epochs 3"))
    assert report["config"]["schedule"] == "gradual" and report["search"] is None
    assert (tmp_path / "pruned.report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_default_recipe_is_global_gradual(tmp_path):
    """The defaults are the recipe that keeps 90 % within a point (bench/results/pruning.md)."""
    rc, _ = _prune(tmp_path, "--example", "mlp-digits", "--sparsity", "0.9")
    assert rc == 0
    config = json.loads((tmp_path / "pruned.report.json").read_text())["config"]
    assert (config["scope"], config["schedule"], config["method"]) == ("global", "gradual", "magnitude")


def test_block_4x4_with_partial_edge_tiles_runs(tmp_path):
    rc, out = _prune(tmp_path, "--example", "mlp-digits", "--sparsity", "0.8", "--granularity", "block:4x4")
    assert rc == 0
    state = torch.load(out, weights_only=True)
    assert state["2.weight_mask"].shape == (50, 100)  # 50 rows: the last tile row holds 2


def test_max_drop_search_reports_the_sparsity_found(tmp_path):
    rc, out = _prune(tmp_path, "--example", "mlp-digits", "--max-drop", "0.01", "--scope", "global",
                     "--max-trials", "4")
    assert rc == 0
    report = json.loads((tmp_path / "pruned.report.json").read_text())
    search = report["search"]
    assert search["mode"] == "max-drop" and search["trials"] == len(report["steps"]) <= 4
    assert search["threshold"] == pytest.approx(report["dense"]["val_accuracy"] - 0.01)
    passing = [s for s in report["steps"] if s["val_accuracy"] >= search["threshold"]]
    assert report["steps"][0]["target_sparsity"] == 0.99
    if passing:
        best = max(passing, key=lambda s: s["sparsity"])
        assert search["sparsity_found"] == pytest.approx(best["sparsity"])
        assert report["final"]["val_accuracy"] == best["val_accuracy"] >= search["threshold"]
    else:
        assert search["sparsity_found"] == 0.0
    state = torch.load(out, weights_only=True)
    masks = [state[k] for k in state if k.endswith("weight_mask")]
    kept = sum(int(m.sum()) for m in masks)
    assert 1 - kept / sum(m.numel() for m in masks) == pytest.approx(search["sparsity_found"])


def test_custom_model_by_import_path_and_torch_prune_export(tmp_path, monkeypatch):
    (tmp_path / "mymodels.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Net(nn.Module):  # not an nn.Sequential: the report calls it custom
            def __init__(self):
                super().__init__()
                self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 3)
            def forward(self, x):
                return self.fc2(torch.relu(self.fc1(x)))

        def data():
            g = torch.Generator().manual_seed(0)
            x = torch.randn(300, 8, generator=g)
            y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
            ds = [torch.utils.data.TensorDataset(x[a:b], y[a:b]) for a, b in ((0, 200), (200, 250), (250, 300))]
            return [torch.utils.data.DataLoader(d, batch_size=25) for d in ds]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    rc, out = _prune(tmp_path, "--model", "mymodels:Net", "--data", "mymodels:data", "--method", "taylor",
                     "--granularity", "nm:2:4", "--skip", "fc2", "--export-style", "torch-prune")
    assert rc == 0
    state = torch.load(out, weights_only=True)
    assert "fc1.weight_orig" in state and "fc1.weight" not in state
    assert (state["fc1.weight_mask"].reshape(16, -1, 4).sum(-1) == 2).all()
    report = json.loads((tmp_path / "pruned.report.json").read_text())
    assert report["architecture"]["family"] == "custom" and report["architecture"]["factory"] == "mymodels:Net"
    assert report["final"]["sparsity"] == pytest.approx(0.5)


def test_start_from_a_given_dense_checkpoint(tmp_path):
    from engine import examples
    dense = examples.mlp_digits("small", seed=3)
    torch.save(dense.state_dict(), tmp_path / "dense.pt")
    rc, out = _prune(tmp_path, "--example", "mlp-digits", "--sparsity", "0.5", "--dense", str(tmp_path / "dense.pt"),
                     "--epochs", "0")
    assert rc == 0
    state = torch.load(out, weights_only=True)
    # zero fine-tuning epochs: the kept weights are exactly the given dense weights
    m = state["0.weight_mask"]
    assert torch.equal(state["0.weight"][m], dense[0].weight.detach()[m])


@pytest.mark.parametrize("args,message", [
    (["--sparsity", "1.0"], r"sparsity must be in \[0, 1\), got 1.0"),
    (["--max-drop", "0.01", "--granularity", "nm:2:4"], "fixes the sparsity at 0.5"),
    (["--sparsity", "0.8", "--granularity", "nm:2:4"], "means sparsity 0.5, but --sparsity 0.8"),
    (["--sparsity", "0.5", "--skip", "7"], r"cannot skip \['7'\]"),
    (["--sparsity", "0.5", "--layer-sparsity", "0"], "expected LAYER=S"),
    (["--sparsity", "0.5", "--dense", "/nonexistent/dense.pt"], "--dense '/nonexistent/dense.pt': cannot load"),
    (["--max-drop", "1.5"], r"--max-drop must be in \[0, 1\)"),
    (["--min-accuracy", "0.99"], r"the dense model's validation accuracy 0\.\d+ is already below the target 0.9900"),
    ([], "give --sparsity S, --max-drop D or --min-accuracy A"),
])
def test_bad_arguments_exit_2_with_a_clear_message(tmp_path, capsys, args, message):
    rc = cli_main(["prune", "--example", "mlp-digits", *args, "-o", str(tmp_path / "x.pt"), "--dense-epochs", "0"])
    assert rc == 2
    import re
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "x.pt").exists()


def test_unknown_method_is_refused_by_the_parser(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli_main(["prune", "--example", "mlp-digits", "--method", "l3", "--sparsity", "0.5", "-o", str(tmp_path / "x.pt")])
    assert e.value.code == 2 and "invalid choice: 'l3'" in capsys.readouterr().err
