"""The fine-tuning loop, pre/post trials and the accuracy-targeted search."""
from dataclasses import dataclass

import pytest
import torch

from engine import examples
from engine.prune import (PruneConfig, PruneError, Task, TrainConfig, evaluate, finetune, run_trial,
                          search_sparsity)


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny layers: with 2+ threads on a busy machine, OpenMP spinning makes each step ~50x slower.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits():
    data = examples.digits_data(seed=0)
    loaders = [examples.loader(split, 64) for split in data]
    task = Task(lambda seed: examples.mlp_digits("small", seed=seed), *loaders)
    dense = examples.mlp_digits("small", seed=0)
    examples.train_dense(dense, data, epochs=15, seed=0, batch_size=64)
    return task, dense


def test_examples_split_is_fixed_by_seed_and_disjoint():
    a, b, c = examples.digits_data(0), examples.digits_data(0), examples.digits_data(1)
    assert [len(s.y) for s in a] == [1077, 360, 360]
    assert torch.equal(a.test.x, b.test.x) and not torch.equal(a.test.x, c.test.x)
    rows = {tuple(r.tolist()) for s in a for r in s.x}
    assert len(rows) > 1700  # near all distinct images, no split copies another wholesale
    model = examples.mlp_digits("small")
    assert [tuple(p.shape) for p in model.state_dict().values()] == [
        (100, 64), (100,), (50, 100), (50,), (10, 50), (10,)]
    assert examples.mlp_architecture(examples.mlp_digits("wide")) == {
        "family": "mlp", "sizes": [64, 2048, 1024, 10], "activation": "relu"}
    with pytest.raises(ValueError, match="unknown width 'huge'"):
        examples.mlp_digits("huge")


@pytest.mark.parametrize("schedule", ["oneshot", "gradual"])
def test_post_pruning_trial_keeps_the_best_epoch_at_final_sparsity(digits, schedule):
    task, dense = digits
    cfg = TrainConfig(epochs=4, batch_size=64, seed=0)
    trial = run_trial(task, dense, 0.8, PruneConfig("magnitude"), cfg, schedule=schedule)
    assert trial.masks.sparsity() == pytest.approx(0.8, abs=1e-3)
    for name, mask in trial.masks.masks.items():
        assert (dict(trial.model.named_modules())[name].weight[~mask] == 0).all()
    hist = trial.history
    if schedule == "gradual":
        assert hist[0]["sparsity"] < hist[-1]["sparsity"]  # the ramp happened during training
    assert hist[-1]["sparsity"] == pytest.approx(0.8, abs=1e-3)
    eligible = [h["val_accuracy"] for h in hist if h["sparsity"] == pytest.approx(0.8, abs=1e-3)]
    assert trial.val_accuracy == max(eligible)
    assert trial.test_accuracy == evaluate(trial.model, task.test_loader)
    # the dense model itself is untouched
    assert float((dense[0].weight == 0).float().mean()) < 0.01


def test_pre_pruning_with_snip_trains_a_sparse_net_from_scratch(digits):
    task, dense = digits
    trial = run_trial(task, dense, 0.7, PruneConfig("snip", calib_batches=4),
                      TrainConfig(epochs=8, lr=3e-3, batch_size=64),
                      when="pre")
    assert trial.masks.sparsity() == pytest.approx(0.7, abs=1e-3)
    assert trial.val_accuracy > 0.8  # learnt from scratch, far above chance (0.1)
    with pytest.raises(PruneError, match="unknown pruning time 'during'"):
        run_trial(task, dense, 0.7, PruneConfig(), TrainConfig(epochs=1), when="during")
    with pytest.raises(PruneError, match="N:M sparsity is fixed"):
        run_trial(task, dense, 0.5, PruneConfig(granularity="nm:2:4"), TrainConfig(epochs=1), schedule="gradual")


@pytest.mark.parametrize("distill", ["logit", "hidden"])
def test_distillation_runs_with_masks_enforced(digits, distill):
    task, dense = digits
    cfg = TrainConfig(epochs=2, batch_size=64, distill=distill, distill_alpha=0.7)
    trial = run_trial(task, dense, 0.9, PruneConfig(scope="global"), cfg, teacher=dense)
    assert trial.masks.sparsity() == pytest.approx(0.9, abs=1e-3)
    assert all(h["train_loss"] > 0 for h in trial.history)
    with pytest.raises(PruneError, match="distillation 'logit' needs the dense teacher"):
        finetune(examples.mlp_digits(), task.train_loader, task.val_loader, TrainConfig(epochs=1, distill="logit"))


def test_bad_training_arguments_fail_clearly(digits):
    task, _ = digits
    with pytest.raises(PruneError, match="unknown optimizer 'rmsprop'"):
        finetune(examples.mlp_digits(), task.train_loader, task.val_loader, TrainConfig(optimizer="rmsprop"))
    with pytest.raises(PruneError, match="unknown distillation 'features'"):
        finetune(examples.mlp_digits(), task.train_loader, task.val_loader, TrainConfig(distill="features"))


# -- search -------------------------------------------------------------------------------------
@dataclass
class _FakeTrial:
    sparsity: float
    val_accuracy: float


def _curve(edge):
    """Accuracy 0.97 up to `edge`, then falling: a trial is cheap and its answer known."""
    calls = []

    def trial(s):
        calls.append(s)
        return _FakeTrial(s, 0.97 if s <= edge else 0.97 - (s - edge))
    return trial, calls


@pytest.mark.parametrize("edge", [0.5, 0.83, 0.9, 0.955])
def test_search_finds_the_highest_passing_sparsity(edge):
    trial, calls = _curve(edge)
    result = search_sparsity(trial, threshold=0.965, max_sparsity=0.99, tol=0.01, max_trials=12)
    # passing region: s <= edge + 0.005
    assert result.best is not None and result.best.sparsity <= edge + 0.005
    assert result.best.sparsity >= edge + 0.005 - 0.01 - 1e-9
    assert len(calls) == len(set(calls)) == len(result.trials) <= 12
    assert calls[0] == 0.99  # the search tries the maximum first, not a ladder from zero
    passing = [t.sparsity for t in result.trials if t.val_accuracy >= 0.965]
    assert result.best.sparsity == max(passing)


def test_search_stops_at_once_when_the_maximum_passes_and_reports_no_pass():
    trial, calls = _curve(0.999)
    assert search_sparsity(trial, threshold=0.96, max_sparsity=0.95).best.sparsity == 0.95 and calls == [0.95]
    trial, calls = _curve(0.0)
    result = search_sparsity(trial, threshold=0.99, max_sparsity=0.95, max_trials=5)
    assert result.best is None and len(calls) == 5
    with pytest.raises(PruneError, match="max_sparsity must be in"):
        search_sparsity(trial, threshold=0.9, max_sparsity=1.0)
