"""Distillation of pruned encoders: the per-layer hidden-state loss (--layer-loss) on a tiny random
BERT, and Taylor saliency for `prune --hf --method taylor`."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from engine.models.bert import build
from engine.prune import corpus
from engine.prune.calibrate import calibrated_prune
from engine.prune.distill import LayerTap, distill_loss, layer_mse
from engine.prune.embeddings import fidelity
from engine.prune.hf import load_folder
from engine.prune.masks import MaskSet
from tests.prune.test_prune_hf import CONFIG, _run, folder, text  # noqa: F401 (fixtures)


def _tiny(seed=0):
    torch.manual_seed(seed)
    return build(CONFIG).eval()


def _batch(seed=1, batch=3, seq=10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, CONFIG["vocab_size"], (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, 6:] = 0  # one padded sentence: padded tokens must not count
    return ids, mask


def _layer_term(student, teacher, ids, mask):
    taps = (LayerTap(student), LayerTap(teacher))
    try:
        student(ids, mask), teacher(ids, mask)
        assert len(taps[0].outputs) == len(taps[1].outputs) == CONFIG["num_hidden_layers"]
        return layer_mse(taps, mask.unsqueeze(-1).float())
    finally:
        taps[0].close(), taps[1].close()


def test_layer_loss_is_zero_for_identical_models_and_positive_after_pruning():
    teacher = _tiny()
    student = copy.deepcopy(teacher)
    ids, mask = _batch()
    with torch.no_grad():
        assert float(_layer_term(student, teacher, ids, mask)) == 0.0
        calibrated_prune(student, [(ids, mask)], "magnitude", 0.5)
        assert float(_layer_term(student, teacher, ids, mask)) > 1e-4
    # only real tokens count: changing what sits under padding changes nothing
    ids2 = ids.clone()
    ids2[0, 6:] = 5
    with torch.no_grad():
        assert torch.equal(_layer_term(student, teacher, ids, mask), _layer_term(student, teacher, ids2, mask))


def test_layer_loss_gradients_reach_only_unmasked_weights():
    teacher = _tiny()
    student = copy.deepcopy(teacher)
    ids, mask = _batch()
    masks, _ = calibrated_prune(student, [(ids, mask)], "magnitude", 0.6)
    student.requires_grad_(True).train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    masks.enforce(student, opt)
    taps = (LayerTap(student), LayerTap(teacher))
    try:
        grads = {}
        for w in (0.0, 1.0):
            opt.zero_grad(set_to_none=True)
            distill_loss(student, teacher, ids, mask, layer_loss=w, taps=taps).backward()
            grads[w] = {n: student.get_submodule(n).weight.grad.clone() for n in masks.masks}
        opt.step()
    finally:
        taps[0].close(), taps[1].close()
        masks.release()
    for name, keep in masks.masks.items():
        g = grads[1.0][name]
        assert (g[~keep] == 0).all(), name
        assert (g[keep] != 0).any(), name
        assert (student.get_submodule(name).weight[~keep] == 0).all(), name  # masks hold after the step
    # the layer term adds its own gradient (it is not silently dropped)
    assert any(not torch.allclose(grads[0.0][n], grads[1.0][n]) for n in masks.masks)


def test_distillation_with_layer_loss_keeps_masks(folder, text, tmp_path):  # noqa: F811
    out = tmp_path / "ll"
    report = _run(folder, text, out, sparsity=0.7, distill_steps=4,
                  distill=dict(eval_every=2, batch=4, lr=1e-3, layer_loss=2.0))
    assert report["distill"]["layer_loss"] == 2.0 and [s["step"] for s in report["steps"]] == [0, 2, 4]
    tensors = load_file(str(out / "model.safetensors"))
    for key, keep in ((k[:-5], v.bool()) for k, v in tensors.items() if k.endswith("_mask")):
        assert (tensors[key][~keep] == 0).all()
        assert abs(1 - float(keep.float().mean()) - 0.7) < 0.02
    # the report's final row is the kept (best) state, and it is what the folder holds
    final = report["final"]
    assert final["kept"] and final["cosine_mean"] == max(s["cosine_mean"] for s in report["steps"][1:])
    val = corpus.load(str(text)).val[:16]
    got = fidelity(load_folder(folder).model.encode(val), load_folder(out).model.encode(val))
    assert got["cosine_mean"] == pytest.approx(final["cosine_mean"], abs=1e-5)


def test_negative_layer_loss_is_refused(folder, text, tmp_path):  # noqa: F811
    from engine.prune import PruneError
    with pytest.raises(PruneError, match="--layer-loss must be >= 0"):
        _run(folder, text, tmp_path / "neg", distill_steps=2, distill=dict(layer_loss=-1.0))


# -- taylor -------------------------------------------------------------------------------------
@pytest.mark.parametrize("gran", ["unstructured", "nm:2:4", "block:8x8"])
def test_taylor_folder_masks_are_exact(folder, text, tmp_path, gran):  # noqa: F811
    out = tmp_path / "taylor"
    report = _run(folder, text, out, method="taylor", granularity=gran, sparsity=0.5)
    tensors = load_file(str(out / "model.safetensors"))
    masks = {k[:-5]: v.bool() for k, v in tensors.items() if k.endswith("_mask")}
    assert len(masks) == 6 * CONFIG["num_hidden_layers"] and report["method"] == "taylor"
    for key, keep in masks.items():
        assert (tensors[key][~keep] == 0).all()
        if gran == "unstructured":  # ranked within each output row: every row loses exactly half
            assert (keep.sum(1) == keep.shape[1] // 2).all(), key
        elif gran == "nm:2:4":
            assert (keep.reshape(keep.shape[0], -1, 4).sum(-1) == 2).all(), key
        else:  # whole 8x8 tiles, half of them
            tiles = keep.reshape(keep.shape[0] // 8, 8, keep.shape[1] // 8, 8).permute(0, 2, 1, 3).flatten(2)
            assert ((tiles.sum(-1) == 0) | (tiles.sum(-1) == 64)).all(), key
            assert float((tiles.sum(-1) == 0).float().mean()) == 0.5, key


def test_taylor_scores_by_output_sensitivity_not_magnitude():
    """A large weight on an input that is always 0 moves no output: taylor prunes it, magnitude keeps it."""
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    x[:, 3] = 0.0
    layer = nn.Linear(16, 8)
    with torch.no_grad():
        layer.weight[:, 3] = 10.0
    models = {m: nn.Sequential(copy.deepcopy(layer)) for m in ("taylor", "magnitude")}
    masks = {m: calibrated_prune(models[m], [x[:128], x[128:]], m, 0.25)[0].masks["0"] for m in models}
    assert not masks["taylor"][:, 3].any() and masks["magnitude"][:, 3].all()
    assert (masks["taylor"].sum(1) == 12).all()
    assert isinstance(calibrated_prune(_tiny(), [_batch()], "taylor", 0.5)[0], MaskSet)
