"""Loading an artifact: memory-mapped without a second copy of the weights, every tensor
checksummed and checked finite once, and a forged non-finite weight refused by name."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import engine
from engine import artifact as artifact_io
from engine import formats
from engine.artifact import ArtifactError
from tests.fixtures import random_sparse

ROOT = Path(__file__).resolve().parents[2]


def mlp_artifact(path, sizes, layouts, sparsity=0.5, seed=0) -> dict[str, torch.Tensor]:
    """Writes an MLP artifact whose i-th linear layer is stored as layouts[i] = (format, block);
    returns the dense weights by layer name."""
    gen = torch.Generator().manual_seed(seed)
    tensors, layers, dense = {}, {}, {}
    for n, ((fmt_name, block), (i, o)) in enumerate(zip(layouts, zip(sizes[:-1], sizes[1:]))):
        name = str(2 * n)
        keep = (torch.rand(o // (block or (1, 1))[0], i // (block or (1, 1))[1], generator=gen) >= sparsity)
        if block:
            keep = keep.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
        w = torch.randn(o, i, generator=gen).mul_(i ** -0.5).mul_(keep if fmt_name != "dense" else 1.0)
        fmt = formats.get(fmt_name)
        weight = fmt.build(w, None, block)
        for buf, t in zip(fmt.buffers, fmt.to_buffers(weight)):
            tensors[f"{name}.{buf}"] = t
        tensors[f"{name}.bias"] = torch.randn(o, generator=gen)
        layers[name] = {"format": fmt_name, "block": list(block) if block else None, "dtype": "fp32",
                        "shape": [o, i]}
        dense[name] = w
    meta = {"arch": {"family": "mlp", "config": {"sizes": list(sizes), "activation": "relu"}},
            "layers": layers, "tokenizer": None}
    artifact_io.write(path, tensors, meta)
    return dense


def forge(path, tensors: dict, meta: dict) -> None:
    """What someone who can write the file does: edit tensors, recompute every digest, save."""
    meta = {k: v for k, v in meta.items() if k not in ("tensors", "meta_sha256")}
    meta["tensors"] = {k: {"sha256": artifact_io.tensor_sha256(v), "dtype": str(v.dtype).removeprefix("torch."),
                           "shape": list(v.shape)} for k, v in sorted(tensors.items())}
    meta["meta_sha256"] = artifact_io._meta_digest(meta)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
              metadata={artifact_io.META_KEY: json.dumps(meta)})


LAYOUTS = [("dense", None), ("csr", None), ("bsr", (16, 16))]


def test_loaded_model_matches_the_weights(tmp_path):
    sizes = [96, 128, 64, 32]
    dense = mlp_artifact(tmp_path / "m.sparse", sizes, LAYOUTS)
    model = engine.load(tmp_path / "m.sparse")
    _, tensors = artifact_io.read(tmp_path / "m.sparse")
    x = torch.randn(5, sizes[0])
    ref = x.double()  # float64 oracle
    for n, name in enumerate(dense):
        ref = torch.nn.functional.linear(ref, dense[name].double(), tensors[f"{name}.bias"].double())
        if n < len(dense) - 1:
            ref = torch.relu(ref)
    with torch.no_grad():
        torch.testing.assert_close(model(x).double(), ref, rtol=1e-5, atol=1e-5)
    assert [model[i].format for i in (0, 2, 4)] == ["dense", "csr", "bsr"]


# Peak RSS is read as VmHWM, the high-water mark of this process's own memory: ru_maxrss would do,
# except that Linux carries a parent's peak across fork + exec into the child's ru_maxrss (here
# pytest's, after it built the artifact), so the child reports that instead of its own.
RSS_SCRIPT = r"""
import json, sys
import torch, engine
import engine.runtime, engine.models.mlp, safetensors  # everything load imports, before the baseline
def status(key):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))
base = status("VmRSS")
model = engine.load(sys.argv[1])
print(json.dumps({"base": base, "peak": status("VmHWM"), "after": status("VmRSS")}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status (Linux)")
def test_peak_rss_of_a_200mb_load_is_at_most_1_2x_its_size(tmp_path):
    # dense 4096x3072 (50 MB) + CSR 8192x4096 at 50 % (134 MB) + BSR 16x16 1024x8192 at 50 % (17 MB)
    path = tmp_path / "big.sparse"
    mlp_artifact(path, [3072, 4096, 8192, 1024], LAYOUTS)
    size = path.stat().st_size
    assert 190e6 < size < 230e6
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(path)], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    grew = r["peak"] - r["base"]
    assert grew <= 1.2 * size, f"loading a {size / 1e6:.0f} MB artifact raised peak RSS by {grew / 1e6:.0f} MB"
    # And the load really touched the weights (checksums, finiteness, index checks): not lazily skipped.
    assert grew >= 0.9 * size, f"peak RSS grew only {grew / 1e6:.0f} MB for a {size / 1e6:.0f} MB artifact"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("victim, dtype", [("2.weight_values", torch.float32), ("4.bias", torch.float32),
                                           ("0.weight", torch.bfloat16)])
def test_forged_non_finite_tensor_is_refused_by_name(tmp_path, bad, victim, dtype):
    mlp_artifact(tmp_path / "m.sparse", [48, 64, 32, 16], LAYOUTS)
    meta, tensors = artifact_io.read(tmp_path / "m.sparse")
    tensors = {k: v.clone() for k, v in tensors.items()}
    t = tensors[victim].to(dtype)
    t.view(-1)[t.numel() // 2] = bad
    tensors[victim] = t
    if dtype != torch.float32:
        meta["layers"]["0"]["dtype"] = "bf16"
    forge(tmp_path / "evil.sparse", tensors, meta)
    with pytest.raises(ArtifactError, match=f"tensor '{victim}' holds NaN or Inf"):
        engine.load(tmp_path / "evil.sparse")


def test_finite_but_overflowing_sum_is_accepted(tmp_path):
    """Huge finite weights whose sum overflows are legal: the element-wise check decides."""
    mlp_artifact(tmp_path / "m.sparse", [48, 64, 32, 16], LAYOUTS)
    meta, tensors = artifact_io.read(tmp_path / "m.sparse")
    tensors = {k: v.clone() for k, v in tensors.items()}
    tensors["0.weight"].fill_(3e38)
    forge(tmp_path / "big.sparse", tensors, meta)
    model = engine.load(tmp_path / "big.sparse")
    assert float(model[0].weight[0, 0]) == pytest.approx(3e38)


def test_write_refuses_a_non_finite_tensor(tmp_path):
    with pytest.raises(ArtifactError, match="'w' holds NaN or Inf"):
        artifact_io.write(tmp_path / "a.sparse", {"w": torch.tensor([1.0, float("nan")])},
                          {"arch": {"family": "mlp", "config": {}}, "layers": {}, "tokenizer": None})
    assert not (tmp_path / "a.sparse").exists()


def test_loaded_tensors_are_views_of_the_file_not_copies(tmp_path):
    """The weights alias one mapping of the file, and writing into a loaded model never modifies
    the file (the mapping is copy-on-write)."""
    path = tmp_path / "m.sparse"
    mlp_artifact(path, [48, 64, 32, 16], LAYOUTS)
    before = path.read_bytes()
    model = engine.load(path)
    ptrs = sorted((t.data_ptr(), t.numel() * t.element_size()) for t in model.state_dict().values())
    span = ptrs[-1][0] + ptrs[-1][1] - ptrs[0][0]
    assert span <= len(before)  # every tensor inside one file-sized region: the mapping
    with torch.no_grad():
        model[0].weight.zero_()
    assert path.read_bytes() == before
    engine.load(path)  # still verifies
