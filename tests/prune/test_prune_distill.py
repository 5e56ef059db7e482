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
    assert final["kept"] and final["cosine_mean"] == max(s["cosine_mean"] for s in report["steps"])
    val = corpus.load(str(text)).val[:16]
    got = fidelity(load_folder(folder).model.encode(val), load_folder(out).model.encode(val))
    assert got["cosine_mean"] == pytest.approx(final["cosine_mean"], abs=1e-5)


def test_a_run_that_only_hurts_keeps_the_one_shot_state(folder, text, tmp_path):  # noqa: F811
    """A learning rate far too high wrecks the student: the kept state is step 0, the pruned start."""
    out = tmp_path / "hurt"
    report = _run(folder, text, out, sparsity=0.7, distill_steps=4,
                  distill=dict(eval_every=2, batch=4, lr=5.0, lr_decay="none"))
    steps = report["steps"]
    assert [s["step"] for s in steps] == [0, 2, 4] and max(s["cosine_mean"] for s in steps[1:]) < steps[0]["cosine_mean"]
    assert report["final"]["step"] == 0 and report["final"]["kept"]
    val = corpus.load(str(text)).val[:16]
    got = fidelity(load_folder(folder).model.encode(val), load_folder(out).model.encode(val))
    assert got["cosine_mean"] == pytest.approx(steps[0]["cosine_mean"], abs=1e-5)


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


# -- learning-rate schedule and length-grouped batches --------------------------------------------
def test_lr_warms_up_then_decays_to_zero():
    from engine.prune.distill import WARMUP, lr_factor
    assert lr_factor(0.0, "cosine") == 0.0 and lr_factor(WARMUP, "cosine") == pytest.approx(1.0)
    assert lr_factor(WARMUP / 2, "cosine") == pytest.approx(0.5)
    after = [lr_factor(WARMUP + (1 - WARMUP) * k / 20, "cosine") for k in range(21)]
    assert all(a > b for a, b in zip(after, after[1:])) and after[-1] == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(1.5, "cosine") == pytest.approx(0.0, abs=1e-12)  # past the end: stays at 0
    assert {lr_factor(p, "none") for p in (0.0, 0.5, 1.0)} == {1.0}


def test_length_grouped_batches_hold_similar_lengths():
    from engine.prune.distill import POOL, length_grouped
    lengths = [5, 100] * 500  # two lengths, evenly mixed
    gen = torch.Generator().manual_seed(0)
    batches = length_grouped(lengths, 16, gen)
    drawn = [next(batches) for _ in range(10 * POOL)]
    assert all(len(b) == 16 and all(0 <= i < len(lengths) for i in b) for b in drawn)
    mixed = sum(len({lengths[i] for i in b}) > 1 for b in drawn)
    assert mixed <= 10  # sorted pools: only the batch at each pool's boundary mixes the two lengths
    # random batches of 16 from the same sentences would mix both lengths in nearly every batch
    assert len({i for b in drawn for i in b}) > 500  # and the batches still cover the sentences


def test_distillation_rate_follows_the_schedule(folder, text, tmp_path):  # noqa: F811
    from engine.prune.distill import lr_factor
    report = _run(folder, text, tmp_path / "lr", sparsity=0.6, distill_steps=6,
                  distill=dict(eval_every=2, batch=4, lr=1e-3))
    rows = report["steps"][1:]
    assert [r["step"] for r in rows] == [2, 4, 6]
    assert [r["lr"] for r in rows] == pytest.approx([1e-3 * lr_factor(r["step"] / 6, "cosine") for r in rows])
    assert report["seconds_total"] >= rows[-1]["seconds"] > 0  # the whole run, distillation included
    flat = _run(folder, text, tmp_path / "flat", sparsity=0.6, distill_steps=4,
                distill=dict(eval_every=2, batch=4, lr=1e-3, lr_decay="none"))
    assert [r["lr"] for r in flat["steps"][1:]] == [1e-3, 1e-3]


def test_unknown_lr_decay_is_refused(folder, text, tmp_path):  # noqa: F811
    from engine.prune import PruneError
    with pytest.raises(PruneError, match="--distill-lr-decay: unknown 'linear'"):
        _run(folder, text, tmp_path / "bad", distill_steps=2, distill=dict(lr_decay="linear"))
    assert not (tmp_path / "bad").exists()


def test_teacher_cache_gives_the_teachers_states_whatever_the_padding():
    from engine.prune.distill import TeacherCache
    teacher = _tiny().requires_grad_(False)
    cache = TeacherCache(teacher)
    ids, mask = _batch(seed=4, batch=4, seq=12)
    mask[1, 7:] = 0  # a shorter sentence
    with torch.no_grad():
        want = teacher(ids, mask)
    first = cache([10, 11, 12, 13], ids, mask)
    assert torch.allclose(first, want * mask.unsqueeze(-1), atol=1e-6)
    # sentence 11 again, now padded to 7 tokens beside a new sentence: taken from the cache
    ids2, mask2 = ids[[1, 0], :7].clone(), mask[[1, 0], :7].clone()
    with torch.no_grad():
        want2 = teacher(ids2, mask2)
    calls = []
    handle = teacher.register_forward_hook(lambda _m, args, _o: calls.append(args[0].shape[0]))
    got = cache([11, 20], ids2, mask2)
    handle.remove()
    assert calls == [1]  # the teacher ran on the one sentence it had not seen
    assert torch.allclose(got, want2 * mask2.unsqueeze(-1), atol=1e-5)
    full = TeacherCache(teacher, limit_bytes=0)  # a full cache computes but keeps nothing
    full([1, 2], ids[:2], mask[:2])
    assert not full.states


def test_distillation_leaves_the_embeddings_as_the_teachers(folder, text, tmp_path):  # noqa: F811
    out = tmp_path / "emb"
    _run(folder, text, out, sparsity=0.6, distill_steps=4, distill=dict(eval_every=2, batch=4, lr=1e-2))
    before, after = load_file(str(folder / "model.safetensors")), load_file(str(out / "model.safetensors"))
    emb = [k for k in after if "embeddings" in k and k.endswith("_embeddings.weight")]
    assert len(emb) == 3 and all(torch.equal(after[k], before[k]) for k in emb)
    layer = "encoder.layer.0.output.dense.weight"
    assert not torch.equal(after[layer], before[layer])  # while the pruned layers trained
