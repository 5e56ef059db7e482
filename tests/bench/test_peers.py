"""`sparse-engine bench --peers` (engine/peers.py): the DeepSparse child protocol, the peer discovery
and the whole grid on a small cell. DeepSparse itself needs its own Python 3.11 venv, so here a
stand-in `deepsparse` package answers its API by running the same ONNX file on ONNX Runtime: the
parent's plumbing (export, worker process, output check, timing, table, plot) is what is tested."""
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from engine import peers

STAND_IN = '''
"""DeepSparse stand-in for tests: compile_model runs the ONNX file on ONNX Runtime."""
import os
import onnxruntime

__version__ = "0.0-stand-in"
print("DeepSparse-like banner on stdout")


class _Engine:
    def __init__(self, path, num_cores):
        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = num_cores
        self.sess = onnxruntime.InferenceSession(path, opts, providers=["CPUExecutionProvider"])

    def run(self, inputs):
        out = self.sess.run(None, {"x": inputs[0]})
        if os.environ.get("STAND_IN_WRONG"):
            out = [o + 1.0 for o in out]
        return out


def compile_model(path, batch_size=1, num_cores=None):
    return _Engine(path, num_cores)
'''


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "deepsparse"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent(STAND_IN))
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path / 'site'}")
    monkeypatch.delenv(peers.DS_ENV, raising=False)
    return sys.executable


def test_find_deepsparse_names_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.delenv(peers.DS_ENV, raising=False)
    python, why = peers.find_deepsparse(None)
    assert python is None and "deepsparse==1.8.0" in why and peers.DS_ENV in why
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # no deepsparse there
    python, why = peers.find_deepsparse(sys.executable)
    assert python is None and "cannot import deepsparse" in why
    python, why = peers.find_deepsparse(str(tmp_path / "no-such-python"))
    assert python is None and "cannot run" in why


def test_find_deepsparse_reads_the_environment_variable(stand_in, monkeypatch):
    monkeypatch.setenv(peers.DS_ENV, stand_in)
    assert peers.find_deepsparse(None) == (stand_in, "0.0-stand-in")


def test_worker_protocol_survives_stdout_banners_and_reports_errors(stand_in, tmp_path):
    model = torch.nn.Linear(8, 3).eval()
    path = tmp_path / "lin.onnx"
    peers.export_onnx(model, torch.randn(1, 8), path)
    x = torch.randn(5, 8)
    ds = peers.DeepSparse(stand_in, threads=1)
    try:
        with pytest.raises(RuntimeError, match="no model loaded"):
            ds.run()
        ds.load(path, x.numpy())
        with torch.no_grad():
            np.testing.assert_allclose(ds.run(), model(x).numpy(), rtol=1e-5, atol=1e-6)
        assert 0 < ds.timed(3) < 1.0
        with pytest.raises(RuntimeError, match="unknown op"):
            ds.ask(op="nonsense")
    finally:
        ds.close()
    assert ds.proc.returncode == 0


def test_worker_that_dies_is_reported(tmp_path):
    ds = peers.DeepSparse(sys.executable, threads=1)
    ds.proc.kill()
    ds.proc.wait()
    with pytest.raises(RuntimeError, match="worker exited"):
        ds.ask(op="run")


def test_grid_cell_end_to_end_writes_table_json_and_plot(stand_in, tmp_path):
    out = tmp_path / "peers"
    rc = peers.run(["mlp", "bert"], [0.9], {"mlp": (2,), "bert": (1,)}, threads=1, min_time=0.05,
                   ds_python=stand_in, out=out)
    assert rc == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert "DeepSparse 0.0-stand-in" in data["machine"]
    cells = {(r["model"], r["batch"]): r["providers"] for r in data["results"]}
    assert set(cells) == {("mlp", 2), ("bert", 1)}
    for providers in cells.values():
        assert set(providers) == {"dense torch fp32", "dense torch bf16", "onnxruntime", "engine", "deepsparse"}
        assert all(p["ms"] > 0 and p["min_ms"] <= p["ms"] for p in providers.values())
        # the fp32 providers compute the dense model's function
        assert providers["engine"]["max_diff"] < 1e-3 and providers["deepsparse"]["max_diff"] < 1e-3
    md = out.with_suffix(".md").read_text()
    assert "engine / DeepSparse" in md and md.count("| mlp | 90% | 2 |") == 1
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_a_peer_with_wrong_numbers_fails_the_run(stand_in, tmp_path, monkeypatch):
    monkeypatch.setenv("STAND_IN_WRONG", "1")
    with pytest.raises(RuntimeError, match="deepsparse differs from dense torch"):
        peers.run(["mlp"], [0.9], {"mlp": (1,)}, threads=1, min_time=0.05, ds_python=stand_in,
                  out=tmp_path / "peers")


def test_cli_without_deepsparse_says_so_and_times_the_rest(tmp_path, monkeypatch):
    monkeypatch.delenv(peers.DS_ENV, raising=False)
    r = subprocess.run([sys.executable, "-m", "engine", "bench", "--peers", "--peer-models", "mlp",
                        "--sparsity", "0.95", "--batch", "1", "--threads", "1", "--min-time", "0.05",
                        "-o", str(tmp_path / "p")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "DeepSparse: not configured" in r.stdout and "deepsparse==1.8.0" in r.stdout
    assert "mlp 95% batch 1" in r.stdout and "engine / DeepSparse" not in r.stdout
    assert (tmp_path / "p.md").exists()


def test_cli_rejects_an_unknown_model(tmp_path):
    r = subprocess.run([sys.executable, "-m", "engine", "bench", "--peers", "--peer-models", "resnet",
                        "-o", str(tmp_path / "p")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "unknown model(s) ['resnet']" in r.stdout


def test_time_rounds_leaves_the_cores_idle_after_the_named_providers(monkeypatch):
    """A provider with its own spinning thread pool is followed by SPIN_IDLE_S of idle, every round,
    and only where asked: the next provider's slot must not start beside its workers."""
    from engine import timing
    events = []
    monkeypatch.setattr(timing.time, "sleep", lambda s: events.append(("idle", s)))

    def timer(name):
        def timed(n):
            events.append(("run", name))
            return 1e-3
        return timed

    samples = timing.time_rounds({k: timer(k) for k in "abc"}, min_time=0.01, rounds=3, idle_after={"b"})
    assert {k: len(v) for k, v in samples.items()} == {"a": 3, "b": 3, "c": 3}
    # after the two warm-up calls per provider:
    assert events[6:] == [("run", "a"), ("run", "b"), ("idle", timing.SPIN_IDLE_S), ("run", "c")] * 3


def test_grid_cell_idles_between_all_providers(stand_in, tmp_path, monkeypatch):
    seen = {}
    real = peers.time_rounds

    def spy(timers, min_time, **kw):
        seen.update(kw)
        return real(timers, min_time, **kw)
    monkeypatch.setattr(peers, "time_rounds", spy)
    peers.run(["mlp"], [0.9], {"mlp": (1,)}, threads=1, min_time=0.05, ds_python=stand_in, out=tmp_path / "p")
    assert seen["idle_after"] == {"dense torch fp32", "dense torch bf16", "onnxruntime", "engine", "deepsparse"}
