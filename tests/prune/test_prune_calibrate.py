"""Calibrated pruning (magnitude / wanda / sparsegpt) on tiny random models."""
import pytest
import torch
from torch import nn

from engine.prune import PruneError
from engine.prune.calibrate import InputStats, calibrated_prune, reconstruction_error, sparsegpt, wanda
from engine.prune.granularity import parse_granularity


def _outlier_inputs(n=512, n_in=64, seed=0):
    """Inputs whose columns 3, 17 and 40 are 20x larger than the rest (LLM-style outlier features)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, n_in, generator=g)
    x[:, [3, 17, 40]] *= 20.0
    return x


def _layer_errors(gran, seed=0):
    torch.manual_seed(seed)
    layer = nn.Linear(64, 48)
    x = _outlier_inputs(seed=seed)
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        lin = nn.Sequential(nn.Linear(64, 48))
        lin[0].load_state_dict(layer.state_dict())
        masks, report = calibrated_prune(lin, [x[:256], x[256:]], method, 0.5, gran)
        with torch.no_grad():
            dense_out, out = layer(x) - layer.bias, lin(x) - lin[0].bias
        errors[method] = float((dense_out - out).pow(2).sum() / dense_out.pow(2).sum())
        assert report["0"]["error"] == pytest.approx(errors[method], rel=1e-3)
    return errors


@pytest.mark.parametrize("gran", ["unstructured", "nm:2:4", "block:4x4"])
def test_sparsegpt_beats_wanda_beats_magnitude_on_outlier_inputs(gran):
    e = _layer_errors(gran)
    assert e["sparsegpt"] <= e["wanda"] <= e["magnitude"], e
    assert e["sparsegpt"] < 0.8 * e["magnitude"], e


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("nm", [(2, 4), (4, 8)])
def test_nm_masks_are_exact(method, nm):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 16))
    masks, _ = calibrated_prune(model, [torch.randn(40, 32)], method, granularity=f"nm:{nm[0]}:{nm[1]}")
    for name, m in masks.masks.items():
        groups = m.reshape(m.shape[0], -1, nm[1])
        assert (groups.sum(-1) == nm[0]).all()
        w = dict(model.named_modules())[name].weight
        assert (w[~m] == 0).all() and (w[m] != 0).all()


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_block_masks_align_with_partial_edge_tiles(method):
    """64-100-50-10 (the digits MLP's shape) with 4x4 blocks: 50 rows leave partial edge tiles."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 50), nn.ReLU(), nn.Linear(50, 10))
    masks, report = calibrated_prune(model, [torch.randn(64, 64)], method, 0.75, "block:4x4")
    for name, m in masks.masks.items():
        o, i = m.shape
        padded = torch.nn.functional.pad(m, (0, -i % 4, 0, -o % 4))
        tiles = padded.reshape(padded.shape[0] // 4, 4, padded.shape[1] // 4, 4).permute(0, 2, 1, 3)
        # each tile's real elements are all kept or all pruned (padding reads as pruned)
        real = torch.nn.functional.pad(torch.ones(o, i, dtype=torch.bool), (0, -i % 4, 0, -o % 4))
        real = real.reshape(tiles.shape[0], 4, tiles.shape[1], 4).permute(0, 2, 1, 3)
        kept = (tiles & real).sum((-1, -2))
        assert ((kept == 0) | (kept == real.sum((-1, -2)))).all()
        assert abs(report[name]["sparsity"] - 0.75) < 0.06


def test_sequential_blocks_feed_pruned_outputs_forward():
    """A ModuleList of blocks is pruned block by block: block 1's Hessian comes from pruned block 0."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(nn.Sequential(nn.Linear(16, 16), nn.Tanh()) for _ in range(2))

        def forward(self, x):
            for blk in self.layers:
                x = blk(x)
            return x
    torch.manual_seed(4)
    net = Net()
    x = torch.randn(128, 16)
    ref = Net()
    ref.load_state_dict(net.state_dict())
    masks, report = calibrated_prune(net, [x], "sparsegpt", 0.5)
    assert set(masks.masks) == {"layers.0.0", "layers.1.0"}
    # recompute block 1's error from the inputs it sees after block 0 was pruned: it must match
    with torch.no_grad():
        inp = net.layers[0](x)
        stats = InputStats(ref.layers[1][0])
        ref.layers[1](inp)
        stats.remove()
    err = reconstruction_error(ref.layers[1][0].weight, net.layers[1][0].weight, stats.hessian())
    assert err == pytest.approx(report["layers.1.0"]["error"], rel=1e-6)


def test_python_api_and_bad_input():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    ms = sparsegpt(model, [torch.randn(16, 8)], sparsity=0.5, skip=("2",))
    assert set(ms.masks) == {"0"} and float((model[0].weight == 0).float().mean()) == 0.5
    assert (model[2].weight != 0).all()
    ms = wanda(model, [torch.randn(16, 8)], sparsity=0.25, granularity="unstructured")
    assert set(ms.masks) == {"0", "2"}
    with pytest.raises(PruneError, match=r"sparsity must be in \[0, 1\)"):
        sparsegpt(model, [torch.randn(4, 8)], sparsity=1.0)
    with pytest.raises(PruneError, match="no calibration batches"):
        sparsegpt(model, [], sparsity=0.5)
    with pytest.raises(PruneError, match="unknown calibrated method 'obs'"):
        calibrated_prune(model, [torch.randn(4, 8)], "obs")


def test_sparsegpt_mlp_exports_what_convert_reads(tmp_path):
    """The digits MLP's shape, SparseGPT 2:4 but the head: export_state_dict -> convert -> engine.load
    gives the pruned model's outputs."""
    import engine
    from engine.convert import convert
    from engine.prune import export_state_dict
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 50), nn.ReLU(), nn.Linear(50, 10))
    x = torch.rand(200, 64)
    masks = sparsegpt(model, [x[:100], x[100:]], granularity="nm:2:4", skip=("4",))
    torch.save(export_state_dict(model, masks), tmp_path / "m.pt")
    convert(tmp_path / "m.pt", tmp_path / "m.sparse", format="csr", arch="mlp:relu", log=lambda *_: None)
    with torch.no_grad():
        torch.testing.assert_close(engine.load(tmp_path / "m.sparse")(x), model(x), atol=1e-5, rtol=1e-4)
