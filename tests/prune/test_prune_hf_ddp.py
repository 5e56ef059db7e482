"""`torchrun --nproc_per_node 2 -m engine prune --hf ... --distill-steps N`: distillation runs
data-parallel (gloo, 2 CPU processes); both ranks end with identical weights, the masks hold, and
rank 0 alone writes the folder."""
from __future__ import annotations

import json
import os
import subprocess

import torch
from safetensors.torch import load_file

from tests.prune.test_prune_ddp import ROOT, _torchrun
from tests.prune.test_prune_hf import folder, text  # noqa: F401 (fixtures)


def test_two_process_hf_distillation_ranks_agree_and_masks_hold(folder, text, tmp_path):  # noqa: F811
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1", "PRUNE_BACKEND": "gloo", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "ddp"
    cmd = [*_torchrun(), "--standalone", "--nproc_per_node", "2", "-m", "engine", "prune", "--hf", str(folder),
           "--text", str(text), "--calib-samples", "8", "--seq-len", "24", "--val-sentences", "16",
           "--sparsity", "0.6", "--distill-steps", "6", "--eval-every", "3", "--distill-batch", "4",
           "--distill-lr", "1e-3", "--layer-loss", "1", "--save-every-rank", "--quiet", "-o", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]

    report = json.loads((out / "prune.report.json").read_text())
    assert report["world_size"] == 2 and [s["step"] for s in report["steps"]] == [0, 3, 6]
    written = load_file(str(out / "model.safetensors"))
    ranks = [load_file(str(tmp_path / f"ddp.rank{r}" / "model.safetensors")) for r in (0, 1)]
    assert set(ranks[0]) == set(ranks[1]) == set(written)
    for key in written:
        assert torch.equal(ranks[0][key], ranks[1][key]), f"{key} differs between ranks"
        assert torch.equal(ranks[0][key], written[key])
    original = load_file(str(folder / "model.safetensors"))
    masks = {k[:-5]: v.bool() for k, v in written.items() if k.endswith("_mask")}
    assert len(masks) == 12
    changed = 0
    for key, keep in masks.items():
        assert (written[key][~keep] == 0).all()
        assert abs(1 - float(keep.float().mean()) - 0.6) < 0.02
        changed += int(not torch.equal(written[key], original[key] * keep))
    assert changed > 0  # the ranks trained (the same way), not merely kept the one-shot weights
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".ddp")]  # no half-written folder
