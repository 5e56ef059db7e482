"""Fine-tuning under torchrun with DistributedDataParallel (gloo, 2 CPU processes)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[2]
ARGS = ["--example", "mlp-digits", "--sparsity", "0.75", "--scope", "global", "--schedule", "gradual",
        "--dense-epochs", "4", "--epochs", "2", "--batch-size", "64", "--quiet"]


def _torchrun() -> list[str]:
    exe = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    return [exe] if exe else [sys.executable, "-m", "torch.distributed.run"]


def test_two_process_ddp_matches_single_process_sparsity_and_ranks_agree(tmp_path):
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "PRUNE_BACKEND": "gloo"}
    cmd = [*_torchrun(), "--standalone", "--nproc_per_node", "2", "-m", "engine", "prune", *ARGS,
           "--save-every-rank", "-o", str(tmp_path / "ddp.pt")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    rank0 = torch.load(tmp_path / "ddp.rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "ddp.rank1.pt", weights_only=True)
    written = torch.load(tmp_path / "ddp.pt", weights_only=True)
    assert set(rank0) == set(rank1) == set(written)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"{key} differs between ranks"
        assert torch.equal(rank0[key], written[key])
    report = json.loads((tmp_path / "ddp.report.json").read_text())
    assert report["config"]["world_size"] == 2

    assert cli_main(["prune", *ARGS, "-o", str(tmp_path / "single.pt")]) == 0
    single = torch.load(tmp_path / "single.pt", weights_only=True)
    mask_keys = sorted(k for k in single if k.endswith("weight_mask"))
    assert mask_keys == sorted(k for k in written if k.endswith("weight_mask")) and mask_keys
    total = sum(single[k].numel() for k in mask_keys)
    single_sparsity = 1 - sum(int(single[k].sum()) for k in mask_keys) / total
    ddp_sparsity = 1 - sum(int(written[k].sum()) for k in mask_keys) / total
    assert ddp_sparsity == pytest.approx(single_sparsity, abs=0) and ddp_sparsity == pytest.approx(0.75, abs=1e-3)
    for k in mask_keys:  # the zeros really are in the weights, on the DDP result too
        w = written[k.replace("_mask", "")]
        assert (w[~written[k]] == 0).all()
