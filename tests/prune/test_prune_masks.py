"""Granularity, scope, mask enforcement through optimizers, schedules, export and bad arguments."""
import pytest
import torch
from torch import nn

from engine.prune import (PruneConfig, PruneError, compute_masks, cubic_sparsity, export_state_dict,
                          parse_granularity, pruning_plan, split_state_dict)
from engine.prune.granularity import global_masks, layer_masks


def _mlp(seed=0, sizes=(24, 36, 20, 8)):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)


# -- granularity --------------------------------------------------------------------------------
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (3, 8), (1, 2)])
def test_nm_masks_keep_exactly_n_of_every_m_along_the_input(n, m):
    model = _mlp(1, sizes=(24, 40, 16))
    masks = compute_masks(model, 1 - n / m, PruneConfig(granularity=f"nm:{n}:{m}")).masks
    for name, mask in masks.items():
        groups = mask.reshape(mask.shape[0], -1, m)  # (out, in/M, M): groups along the input dim
        assert (groups.sum(-1) == n).all(), name
        # and the kept ones are the largest of their group
        w = dict(model.named_modules())[name].weight.detach().abs().reshape(groups.shape)
        assert (w.masked_fill(~groups, -1).max(-1).values >= w.masked_fill(groups, float("inf")).min(-1).values).all()


@pytest.mark.parametrize("r,c", [(4, 4), (2, 4), (4, 2), (1, 4)])
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_block_masks_are_unions_of_aligned_tiles(r, c, scope):
    model = _mlp(2, sizes=(24, 36, 20, 8))
    masks = compute_masks(model, 0.6, PruneConfig(granularity=f"block:{r}x{c}", scope=scope)).masks
    total = kept = 0
    for name, mask in masks.items():
        tiles = mask.reshape(mask.shape[0] // r, r, mask.shape[1] // c, c)
        per_tile = tiles.sum(dim=(1, 3))
        assert ((per_tile == 0) | (per_tile == r * c)).all(), f"layer {name}: a tile is partly kept"
        total, kept = total + mask.numel(), kept + int(mask.sum())
        if scope == "layer":
            assert abs(1 - mask.float().mean() - 0.6) <= (r * c) / mask.numel()
    assert abs(1 - kept / total - 0.6) < 0.02


def test_block_scores_aggregate_element_scores():
    # One tile holds a few large weights among small ones; the tile with uniformly medium weights
    # has the larger mean and must be the one kept.
    w = torch.full((4, 8), 0.01)
    w[:, 4:] = 0.5          # tile (0, 1): mean 0.5
    w[0, 0] = 1.0           # tile (0, 0): one big weight, mean ~0.07
    masks = layer_masks({"x": w.abs()}, parse_granularity("block:4x4"), 0.5)
    assert masks["x"][:, 4:].all() and not masks["x"][:, :4].any()


def test_unstructured_layer_and_global_scope_counts():
    g = parse_granularity("unstructured")
    a = torch.arange(1.0, 101.0).reshape(10, 10)          # scores 1..100
    b = torch.arange(101.0, 141.0).reshape(4, 10) * 0.01  # scores 1.01..1.40, all below most of a
    per_layer = layer_masks({"a": a, "b": b}, g, 0.3)
    assert int(per_layer["a"].sum()) == 70 and int(per_layer["b"].sum()) == 28
    # Globally the 42 lowest of 140 go: a's 1.0, all 40 of b (1.01..1.40), then a's 2.0.
    glob = global_masks({"a": a, "b": b}, g, 0.3)
    assert int(glob["b"].sum()) == 0 and int(glob["a"].sum()) == 98
    assert not glob["a"].flatten()[:2].any() and glob["a"].flatten()[2:].all()


def test_per_layer_overrides_and_skip():
    model = _mlp(3)
    cfg = PruneConfig(skip=("4",), layer_sparsity={"0": 0.25})
    masks = compute_masks(model, 0.75, cfg).masks
    assert set(masks) == {"0", "2"}
    assert 1 - masks["0"].float().mean() == pytest.approx(0.25, abs=1 / masks["0"].numel())
    assert 1 - masks["2"].float().mean() == pytest.approx(0.75, abs=1 / masks["2"].numel())


def test_gradual_repruning_never_revives_a_pruned_weight():
    model = _mlp(4)
    cfg = PruneConfig(method="random", seed=1)
    first = compute_masks(model, 0.3, cfg)
    cfg.seed = 2  # fresh random scores would pick different weights without the monotone rule
    second = compute_masks(model, 0.6, cfg, previous=first)
    for name in first.masks:
        assert not (second.masks[name] & ~first.masks[name]).any()
    assert second.sparsity() == pytest.approx(0.6, abs=0.01)


def test_one_by_one_conv_layers_are_pruned_too():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 12, 1), nn.ReLU(), nn.Conv2d(12, 4, 3))  # the 3x3 conv is not prunable
    masks = compute_masks(model, 0.5, PruneConfig(granularity="nm:2:4")).masks
    assert set(masks) == {"0"} and masks["0"].shape == (12, 8, 1, 1)
    assert (masks["0"].reshape(12, 2, 4).sum(-1) == 2).all()


# -- bad arguments ------------------------------------------------------------------------------
@pytest.mark.parametrize("sparsity", [1.0, -0.1, 1.5, float("nan")])
def test_sparsity_outside_unit_interval_fails(sparsity):
    with pytest.raises(PruneError, match=r"sparsity must be in \[0, 1\), got"):
        compute_masks(_mlp(), sparsity, PruneConfig())


def test_block_not_dividing_a_layer_gives_partial_edge_tiles():
    """A 18x36 layer with 4x4 blocks: 5x9 tiles, the last tile row holds only 2 rows. Masks stay
    aligned to the 4x4 grid, edge tiles are kept or dropped whole, and the sparsity is reached."""
    torch.manual_seed(3)
    model = _mlp(sizes=(24, 36, 18, 8))
    masks = compute_masks(model, 0.5, PruneConfig(granularity="block:4x4", skip=("4",))).masks
    m = masks["2"]
    assert m.shape == (18, 36)
    padded = torch.nn.functional.pad(m, (0, 0, 0, 2))  # 20x36: whole 4x4 tiles again
    tiles = padded.reshape(5, 4, 9, 4).permute(0, 2, 1, 3).reshape(5, 9, 16)
    edge = tiles[4, :, :8]  # the real rows of the partial edge tiles
    assert ((tiles[:4].all(-1)) | (~tiles[:4].any(-1))).all()
    assert ((edge.all(-1)) | (~edge.any(-1))).all()
    assert round(0.5 * 45) == int((~tiles[:, :, 0]).sum())


def test_nm_group_not_dividing_a_layer_names_the_layer():
    with pytest.raises(PruneError, match=r"layer '0': N:M group size M=8 does not divide its 36 input"):
        compute_masks(_mlp(sizes=(36, 16, 8)), 0.75, PruneConfig(granularity="nm:2:8"))


@pytest.mark.parametrize("text,msg", [("block:4", "unknown granularity 'block:4'"), ("nm:4:2", "need 0 < N < M"),
                                      ("nm:0:4", "need 0 < N < M"), ("block:0x4", "block sides must be >= 1"),
                                      ("diagonal", "unknown granularity 'diagonal'")])
def test_bad_granularity_strings(text, msg):
    with pytest.raises(PruneError, match=msg):
        parse_granularity(text)


def test_bad_scope_skip_and_override_names():
    model = _mlp()
    with pytest.raises(PruneError, match="unknown scope 'model'"):
        compute_masks(model, 0.5, PruneConfig(scope="model"))
    with pytest.raises(PruneError, match=r"cannot skip \['head'\]"):
        compute_masks(model, 0.5, PruneConfig(skip=("head",)))
    with pytest.raises(PruneError, match=r"per-layer sparsity names \['4'\]"):
        compute_masks(model, 0.5, PruneConfig(skip=("4",), layer_sparsity={"4": 0.5}))
    with pytest.raises(PruneError, match=r"sparsity of layer '0' must be in \[0, 1\), got 1.0"):
        compute_masks(model, 0.5, PruneConfig(layer_sparsity={"0": 1.0}))


# -- enforcement --------------------------------------------------------------------------------
@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=1e-2),
    lambda p: torch.optim.Adam(p, lr=1e-2, weight_decay=1e-2),
    lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1),
], ids=["sgd-momentum", "adam", "adamw"])
def test_masks_survive_optimizer_steps(make_opt):
    torch.manual_seed(0)
    model = _mlp(5)
    opt = make_opt(model.parameters())
    # Build up optimizer state while dense, so momentum would push pruned weights off zero.
    x, y = torch.randn(32, 24), torch.randint(0, 8, (32,))
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    masks = compute_masks(model, 0.7, PruneConfig())
    masks.enforce(model, opt)
    w0 = model[0].weight.detach().clone()
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(32, 24)), y).backward()
        assert (model[0].weight.grad[~masks.masks["0"]] == 0).all()
        opt.step()
        for name, mask in masks.masks.items():
            w = dict(model.named_modules())[name].weight
            assert (w[~mask] == 0).all(), f"layer {name}: a pruned weight moved"
    assert not torch.equal(model[0].weight[masks.masks["0"]], w0[masks.masks["0"]])  # kept ones train
    masks.release()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert (model[0].weight[~masks.masks["0"]] != 0).any()  # hooks really are gone after release()


# -- export ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("style", ["zeros", "torch-prune"])
def test_export_roundtrip(tmp_path, style):
    model = _mlp(6)
    masks = compute_masks(model, 0.8, PruneConfig(skip=("4",)))
    state = export_state_dict(model, masks, style)
    path = tmp_path / "p.pt"
    torch.save(state, path)
    loaded = torch.load(path, weights_only=True)
    if style == "zeros":
        assert set(loaded) == set(model.state_dict()) | {"0.weight_mask", "2.weight_mask"}
        assert loaded["0.weight_mask"].dtype == torch.bool
        assert (loaded["0.weight"][~loaded["0.weight_mask"]] == 0).all()
    else:
        assert "0.weight_orig" in loaded and "0.weight" not in loaded and "4.weight" in loaded
    plain, back = split_state_dict(loaded)
    assert set(plain) == set(model.state_dict())
    assert all(torch.equal(back.masks[n], masks.masks[n]) for n in ("0", "2")) and set(back.masks) == {"0", "2"}
    fresh = _mlp(99)
    fresh.load_state_dict(plain)
    assert torch.equal(fresh[2].weight, model[2].weight)


def test_mask_shape_mismatch_is_refused():
    with pytest.raises(PruneError, match=r"mask '0.weight_mask' has shape \(3, 3\), weight has \(36, 24\)"):
        split_state_dict({**_mlp().state_dict(), "0.weight_mask": torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(PruneError, match="has no weight"):
        split_state_dict({"9.weight_mask": torch.ones(3, 3, dtype=torch.bool)})


# -- schedules ------------------------------------------------------------------------------------
def test_cubic_schedule_matches_zhu_and_gupta():
    # s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n dt))^3
    assert cubic_sparsity(0, 0.9, n_steps=10, every=5) == 0.0
    assert cubic_sparsity(25, 0.9, n_steps=10, every=5) == pytest.approx(0.9 - 0.9 * 0.5 ** 3)
    assert cubic_sparsity(50, 0.9, n_steps=10, every=5) == pytest.approx(0.9)
    assert cubic_sparsity(500, 0.9, n_steps=10, every=5) == pytest.approx(0.9)
    assert cubic_sparsity(3, 0.9, initial=0.2, begin=10) == 0.2
    plan = pruning_plan("gradual", 0.8, total_steps=100, n_prunes=5)
    values = [plan[k] for k in sorted(plan)]
    assert values[0] == 0.0 and values[-1] == pytest.approx(0.8) and max(plan) <= 50
    assert all(b > a for a, b in zip(values, values[1:]))
    increments = [b - a for a, b in zip(values, values[1:])]
    assert all(b < a for a, b in zip(increments, increments[1:]))  # fast first, slow near the target
    assert pruning_plan("oneshot", 0.8, 100) == {0: 0.8}
    with pytest.raises(PruneError, match="unknown schedule 'linear'"):
        pruning_plan("linear", 0.8, 100)
