"""`sparse-engine prune --target-speedup / --latency-budget-ms` (engine/prune/target.py): the plan
meets the budget it was given, the pruned checkpoint and the artifact follow the plan layer by
layer (Q, K and V take one option together), the profile cache is reused only for the same
measurement, and an infeasible target is a clear error naming the fastest reachable latency."""
from __future__ import annotations

import json

import pytest
import torch

import engine
from engine.cli import main as cli
from engine.convert import ConvertError, convert
from engine.modules import SparseLinear
from engine.prune import target as T
from engine.prune.calibrate import calibrated_prune
from engine.prune.granularity import PruneError
from tests.prune.test_prune_hf import folder, text  # noqa: F401  (module fixtures: a tiny BERT folder, text)

FAST = ["--dense-epochs", "2", "--epochs", "1", "--sparsities", "0.5,0.9", "--profile-seconds", "0", "--quiet"]


def _layers(model) -> dict:
    return {n: m for n, m in model.named_modules() if isinstance(m, SparseLinear)}


def _sparsity(layer: SparseLinear) -> float:
    w = layer.sparse_weight
    return float(((w if isinstance(w, torch.Tensor) else w.to_dense(torch.float32)) == 0).float().mean())


def test_digits_mlp_pruned_to_a_speed_target_follows_its_plan(tmp_path):
    out = tmp_path / "wide.pt"
    assert cli(["prune", "--example", "mlp-digits-wide", "--target-speedup", "1.5", "--batch", "32",
                "-o", str(out), *FAST]) == 0
    report = json.loads((tmp_path / "wide.latency.json").read_text())
    assert (tmp_path / "wide.latency.png").is_file() and (tmp_path / "wide.profile.json").is_file()
    assert report["budget_ms"] == pytest.approx(report["engine_dense_ms"] / 1.5)
    assert report["predicted_ms"] <= report["budget_ms"] * (1 + 1e-9)
    assert report["measured_ms"] > 0 and report["quality"]["quality"] > 0.1
    assert list(report["plan"]) == ["0", "2", "4"]
    model = engine.load(report["artifact"])
    for name, layer in _layers(model).items():
        planned = report["plan"][name]
        assert layer.format == planned["format"]
        assert _sparsity(layer) == pytest.approx(planned["sparsity"], abs=0.01)
    # the checkpoint beside it carries the same masks
    state = torch.load(out, weights_only=True)
    for name, planned in report["plan"].items():
        if planned["format"] != "dense":
            assert 1 - state[f"{name}.weight_mask"].float().mean() == pytest.approx(planned["sparsity"], abs=0.01)


def test_infeasible_target_names_the_fastest_reachable_latency(tmp_path, capsys):
    rc = cli(["prune", "--example", "mlp-digits", "--target-speedup", "1000", "--batch", "8",
              "-o", str(tmp_path / "x.pt"), *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and "cannot be met: the fastest reachable latency is" in err and "the dense model takes" in err
    assert not (tmp_path / "x.spz").exists()


def test_target_options_are_checked_before_any_work(tmp_path, capsys):
    for extra, message in ((["--sparsity", "0.5"], "choose each layer's sparsity"),
                           (["--method", "magnitude"], "prune with wanda or sparsegpt"),
                           (["--cpu-time"], "add --threads 1")):
        rc = cli(["prune", "--example", "mlp-digits", "--target-speedup", "2", "-o", str(tmp_path / "x.pt"),
                  "--threads", "2", *extra])
        assert rc == 2 and message in capsys.readouterr().err


def test_hf_encoder_plan_keeps_query_key_value_together(folder, text, tmp_path):  # noqa: F811
    subject = T.hf_subject(str(folder), 2, 16, calib_samples=8, val_sentences=8, text=str(text), log=lambda _m: None)
    setup = T.prepare(subject, tmp_path, profile_path=tmp_path / "p.json", sparsities=(0.5, 0.9), rounds=3)
    assert "encoder.layer.0.attention.self.qkv" in setup.table["units"]
    fastest = setup.rest_s + sum(min(o.seconds for o in opts) for opts in T.options_of(setup.table).values())
    plan = T.budget_plan(setup, fastest * 1.05)  # close to the fastest option of every unit
    row = T.run_plan(setup, plan, "wanda", tmp_path / "pruned", tmp_path / "pruned.spz", model_time=0.05)
    assert row["predicted_ms"] <= fastest * 1.05 * 1e3 and row["quality"]["quality"] > -1
    model = engine.load(tmp_path / "pruned.spz")
    fast = model.encoder.layer[0]
    assert fast.qkv.format == plan["encoder.layer.0.attention.self.qkv"].format
    assert (tmp_path / "pruned" / "config.json").is_file()
    # the cache answers the same question, and only that one
    again = T.cached_profile(subject, tmp_path / "p.json", setup.engine_dense, setup.inputs, sparsities=(0.5, 0.9),
                             rounds=3)
    assert again == setup.table
    with pytest.raises(PruneError, match="cannot be met"):
        T.budget_plan(setup, fastest * 0.5)


def test_plans_name_layers_the_model_has(folder, tmp_path):  # noqa: F811
    from engine.prune.hf import load_folder
    enc = load_folder(folder)
    with pytest.raises(PruneError, match="not a prunable layer"):
        calibrated_prune(enc.model, [(torch.ones(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long))],
                         "wanda", per_layer={"encoder.layer.9.nothing": ("unstructured", 0.5)})
    with pytest.raises(ConvertError, match="layouts name layers the model does not have"):
        convert(folder, tmp_path / "x.spz", layouts={"nope": ("csr", None)}, log=lambda _m: None)
