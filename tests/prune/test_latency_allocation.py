"""Latency-aware allocation (engine/prune/latency.py): the allocator meets the budget, prefers
insensitive layers and names the fastest reachable latency when a budget is infeasible; a profile
measures every unit's options inside the engine's model, with sensitivities that grow with sparsity."""
from __future__ import annotations

import json
import time

import pytest
import torch
from torch import nn

from engine.cli import main as cli
from engine.prune.granularity import PruneError
from engine.prune.latency import Option, allocate, options_of, profile, units


def _opts(dense_ms: float, sensitivity: float) -> list[Option]:
    """Dense plus four sparsity levels: time falls with sparsity, error grows with it x sensitivity."""
    out = [Option("dense", 0.0, "dense", dense_ms / 1e3, 0.0)]
    for s in (0.5, 0.7, 0.9, 0.95):
        out.append(Option("unstructured", s, "csr", dense_ms * (1.05 - s) / 1e3, sensitivity * s ** 2))
    return out


def test_allocation_meets_the_budget_and_prefers_insensitive_layers():
    table = {"sensitive": _opts(1.0, 10.0), "robust": _opts(1.0, 0.1), "small": _opts(0.2, 1.0)}
    for budget_ms in (2.2, 1.5, 1.0, 0.5):
        plan = allocate(table, budget_ms / 1e3)
        assert sum(o.seconds for o in plan.values()) <= budget_ms / 1e3 + 1e-12
        assert plan["robust"].sparsity >= plan["sensitive"].sparsity
    plan = allocate(table, 1.0 / 1e3)
    assert plan["robust"].sparsity >= 0.9 > plan["sensitive"].sparsity
    # the exact optimum of a small case, checked by brute force
    import itertools
    best = min(itertools.product(*table.values()),
               key=lambda c: (sum(o.seconds for o in c) > 1e-3, sum(o.error for o in c)))
    assert sum(o.error for o in plan.values()) == pytest.approx(sum(o.error for o in best), rel=1e-9)


def test_infeasible_budget_names_the_fastest_reachable_latency():
    table = {"a": _opts(1.0, 1.0), "b": _opts(1.0, 1.0)}
    fastest = 2 * 0.1  # ms: both layers at 95 %
    with pytest.raises(PruneError, match=f"fastest reachable latency is {fastest:.3f} ms"):
        allocate(table, 0.15e-3)
    with pytest.raises(PruneError, match="at least one option"):
        allocate({"a": []}, 1.0)


def test_units_group_query_key_value_of_one_attention():
    names = ["a.self.query", "a.self.key", "a.self.value", "a.output.dense", "b.query", "b.key", "c"]
    assert units(names) == {"a.self.qkv": ["a.self.query", "a.self.key", "a.self.value"],
                            "a.output.dense": ["a.output.dense"], "b.query": ["b.query"], "b.key": ["b.key"],
                            "c": ["c"]}


def test_profile_times_each_unit_inside_the_engine_model_and_sensitivity_grows_with_sparsity():
    import copy
    import engine
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
    batches = [torch.randn(16, 64) for _ in range(4)]
    engine_model = engine.sparsify(copy.deepcopy(model), format="dense")
    table = profile(model, batches, engine_model, (torch.randn(8, 64),), sparsities=(0.5, 0.9),
                    granularities=("unstructured", "block:16x16"), rounds=3)
    assert set(table["machine"]) >= {"cpu", "isa", "threads", "date", "clock"}
    assert table["model"]["dense_s"] > table["model"]["rest_s"] >= 0
    assert list(table["units"]) == ["0", "2"]
    for name, opts in options_of(table).items():
        assert [(o.granularity, o.sparsity) for o in opts] == [
            ("dense", 0.0), ("unstructured", 0.5), ("unstructured", 0.9), ("block:16x16", 0.5), ("block:16x16", 0.9)]
        assert all(o.seconds > 0 for o in opts) and opts[0].error == 0.0
        assert opts[1].error < opts[2].error and opts[3].error < opts[4].error
    # the engine model is left as it was: every unit dense again
    assert [m.format for m in engine_model.modules() if isinstance(m, engine.SparseLinear)] == ["dense", "dense"]
    with pytest.raises(PruneError, match="do not line up"):
        profile(model, batches, engine.sparsify(nn.Sequential(nn.Linear(64, 32)), format="dense"),
                (torch.randn(8, 64),), sparsities=(0.5,), rounds=1)


def test_profile_cli_writes_the_table_and_a_plan(tmp_path, capsys):
    out = tmp_path / "profile.json"
    assert cli(["profile", "--example", "mlp-digits", "-o", str(out), "--batch", "8", "--sparsities", "0.5,0.9",
                "--granularities", "unstructured", "--rounds", "3", "--profile-seconds", "0", "--dense-epochs", "2",
                "--budget-ms", "1000"]) == 0
    table = json.loads(out.read_text())
    assert list(table["units"]) == ["0", "2", "4"] and table["engine_dense_ms"] > 0
    printed = capsys.readouterr().out
    assert "plan for 1000.000 ms" in printed and "predicted" in printed
    assert cli(["profile", "--example", "mlp-digits", "-o", str(out), "--sparsities", "1.5"]) == 1


class _Spy(nn.Module):
    """Counts its calls and whether any hook was registered on it during each."""

    def __init__(self, seconds: float = 0.0):
        super().__init__()
        self.seconds, self.calls, self.hooked = seconds, 0, []

    def forward(self, x):
        self.calls += 1
        self.hooked.append(bool(self._forward_hooks or self._forward_pre_hooks))
        if self.seconds:
            time.sleep(self.seconds)
        return x


def test_time_configs_times_each_config_without_idle_hooks_and_for_min_time():
    from engine.prune.latency import time_configs
    fast, slow = _Spy(), _Spy(0.002)
    model = nn.Sequential(_Spy())
    slots = [(model, "0")]
    units_s, rest = time_configs(model, (torch.zeros(1),), slots, [[fast], [slow]], rounds=3,
                                 clock=time.perf_counter, warm_time=0.0, block_time=0.0)
    assert units_s[1][0] > units_s[0][0] + 0.001 and rest >= 0.0
    # two first calls (pack, size the timed block), then per round: one warm pass and one
    # hook-timed pass with hooks, one timed block (here of one pass) without
    for spy in (fast, slow):
        assert spy.calls == 2 + 3 * 3 and spy.hooked == [False, False] + [True, True, False] * 3
    assert isinstance(model[0], _Spy) and model[0].calls == 0  # the original module is put back
    # a block of about block_time seconds of passes; the unit's time still matches its own
    slow.calls = 0
    units_s, rest = time_configs(model, (torch.zeros(1),), slots, [[slow]], rounds=2, clock=time.perf_counter,
                                 warm_time=0.0, block_time=0.02)
    assert slow.calls >= 2 + 2 * (2 + 5) and units_s[0][0] == pytest.approx(0.002, rel=0.5)
    fast.calls = 0
    start = time.perf_counter()
    time_configs(model, (torch.zeros(1),), slots, [[fast]], rounds=1, clock=time.perf_counter, min_time=0.2,
                 warm_time=0.0, block_time=0.0)
    assert time.perf_counter() - start >= 0.2 and fast.calls > 2 + 3 * 10


def test_dense_option_of_an_untiled_unit_is_its_median_over_the_configs_it_ran_dense_in(monkeypatch):
    """16x16 blocks cannot tile a 10-row head, so it stays dense in every block option: its dense
    option is the median of its times there and in the all-dense model (where it runs after the big
    dense layers), while the model's dense time stays the all-dense model's."""
    import copy
    import engine
    from engine.prune import latency
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    configs_seen = []

    def fake(engine_model, inputs, slots, configs, rounds, clock, min_time=0.0):
        configs_seen.append(len(configs))  # all-dense, block 50 %, block 90 %
        return [[1e-3, 9e-3], [0.5e-3, 3e-3], [0.2e-3, 4e-3]], 1e-4
    monkeypatch.setattr(latency, "time_configs", fake)
    table = profile(model, [torch.randn(16, 64) for _ in range(2)],
                    engine.sparsify(copy.deepcopy(model), format="dense"), (torch.randn(4, 64),),
                    sparsities=(0.5, 0.9), granularities=("block:16x16",), rounds=1)
    opts = options_of(table)
    assert configs_seen == [3] and table["model"]["dense_s"] == pytest.approx(10e-3 + 1e-4)
    assert [(o.granularity, o.seconds) for o in opts["2"]] == [("dense", pytest.approx(4e-3))]
    assert [o.seconds for o in opts["0"]] == pytest.approx([1e-3, 0.5e-3, 0.2e-3])
