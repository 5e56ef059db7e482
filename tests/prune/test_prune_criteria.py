"""Each criterion ranks a planted unimportant weight lowest; random is a seeded baseline."""
import pytest
import torch
from torch import nn

from engine.prune import PruneConfig, PruneError, compute_masks, prunable_layers, scores


def _model_and_batches(seed=0, dead_input=None):
    """A 2-layer MLP on random data (13 inputs, odd sizes), with one input feature optionally always 0."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(13, 7), nn.ReLU(), nn.Linear(7, 5))
    batches = []
    for _ in range(4):
        x = torch.randn(16, 13, generator=gen)
        if dead_input is not None:
            x[:, dead_input] = 0.0
        batches.append((x, torch.randint(0, 5, (16,), generator=gen)))
    return model, batches


def _argmin(t):
    return divmod(int(t.argmin()), t.shape[1])


def test_magnitude_ranks_a_tiny_weight_lowest():
    model, _ = _model_and_batches()
    with torch.no_grad():
        model[0].weight[3, 8] = 1e-6
    s = scores("magnitude", model, prunable_layers(model))
    assert _argmin(s["0"]) == (3, 8)


@pytest.mark.parametrize("method", ["taylor", "snip"])
def test_weight_times_gradient_ranks_a_zero_weight_lowest(method):
    model, batches = _model_and_batches(1)
    with torch.no_grad():
        model[0].weight[5, 2] = 0.0
    s = scores(method, model, prunable_layers(model), batches=batches)
    assert _argmin(s["0"]) == (5, 2)
    others = torch.ones_like(s["0"], dtype=torch.bool)
    others[5, 2] = False
    assert s["0"][5, 2] < s["0"][others].min()


def test_gradient_ranks_the_weights_of_a_dead_input_lowest():
    # dL/dW[:, i] = delta * x_i: an input that is always 0 gives its weights zero sensitivity,
    # however large they are.
    model, batches = _model_and_batches(2, dead_input=9)
    with torch.no_grad():
        model[0].weight[:, 9] = 5.0  # the largest weights in the layer: magnitude would keep them
    s = scores("gradient", model, prunable_layers(model), batches=batches)["0"]
    dead = s[:, 9]
    live = torch.cat([s[:, :9], s[:, 10:]], dim=1)
    assert dead.max() < live.min()
    masks = compute_masks(model, 7 / 91, PruneConfig("gradient"), batches=batches)  # prune 7 of 91
    assert not masks.masks["0"][:, 9].any() and masks.masks["0"].sum() == 91 - 7


def test_gradient_scores_do_not_touch_grads_or_weights():
    model, batches = _model_and_batches(3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for method in ("gradient", "taylor", "snip"):
        scores(method, model, prunable_layers(model), batches=batches)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_snip_scores_are_normalised_over_the_model():
    model, batches = _model_and_batches(4)
    s = scores("snip", model, prunable_layers(model), batches=batches)
    assert sum(float(v.sum()) for v in s.values()) == pytest.approx(1.0, rel=1e-5)


def test_random_is_seeded_and_ignores_the_weights():
    model, _ = _model_and_batches(5)
    layers = prunable_layers(model)
    a, b = scores("random", model, layers, seed=7), scores("random", model, layers, seed=7)
    c = scores("random", model, layers, seed=8)
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert not torch.equal(a["0"], c["0"])
    with torch.no_grad():
        model[0].weight.mul_(100)
    assert torch.equal(scores("random", model, layers, seed=7)["0"], a["0"])


def test_unknown_method_and_missing_batches_fail_clearly():
    model, _ = _model_and_batches()
    with pytest.raises(PruneError, match=r"unknown pruning method 'l3'.*magnitude"):
        scores("l3", model, prunable_layers(model))
    with pytest.raises(PruneError, match="'taylor' needs calibration batches"):
        scores("taylor", model, prunable_layers(model))
