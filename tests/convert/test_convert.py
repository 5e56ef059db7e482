"""checkpoint -> convert -> artifact -> engine.load, for every checkpoint kind and format choice,
and every refusal and corruption the loader must catch."""
from __future__ import annotations

import json
import sys
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import prune

import engine
from engine import artifact as artifact_io
from engine.artifact import ArtifactError
from engine.checkpoint import CheckpointError
from engine.cli import main as cli
from engine.convert import ConvertError, convert
from engine.models import ArchError
from engine.modules import SparseLinear

SIZES = [48, 96, 64, 10]  # odd-ish widths so no test leans on powers of two


def make_mlp(act=nn.ReLU, sizes=SIZES, sparsity=0.85, block=None) -> nn.Sequential:
    """A pruned MLP: about `sparsity` of each weight zeroed (in RxC tiles when `block` is set)."""
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        if i:
            layers.append(act())
        layers.append(nn.Linear(a, b))
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                r, c = block or (1, 1)
                o, i = m.weight.shape
                keep = (torch.rand(o // r, i // c) >= sparsity).repeat_interleave(r, 0).repeat_interleave(c, 1)
                m.weight.mul_(keep)
                m.bias.normal_()
    return model.eval()


def loaded_matches(path, model, *, shape=(5, 3), atol=1e-5, **kw):
    """engine.load(path)(x) == model(x) on fresh random inputs with extra leading dims."""
    sparse = engine.load(path, **kw)
    x = torch.randn(*shape, model[0].in_features)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), model(x), atol=atol, rtol=1e-5)
    return sparse


# ----------------------------------------------------------------------------- checkpoint kinds

def _plain(model, tmp_path):
    p = tmp_path / "plain.pt"
    torch.save(model.state_dict(), p)
    return p, model


def _prune_pairs(model, tmp_path):
    """torch.nn.utils.prune's *_orig/*_mask pairs: the orig weights are NOT zero where pruned."""
    dense = make_mlp(sparsity=0.0)
    for m in dense:
        if isinstance(m, nn.Linear):
            prune.l1_unstructured(m, "weight", amount=0.8)
    sd = dense.state_dict()
    assert any(k.endswith("weight_orig") for k in sd) and any(k.endswith("weight_mask") for k in sd)
    p = tmp_path / "pairs.pt"
    torch.save(sd, p)
    for m in dense:
        if isinstance(m, nn.Linear):
            prune.remove(m, "weight")
    return p, dense


def _weight_mask(model, tmp_path):
    """The pruning verb's layout: `<layer>.weight` (zeros in place) plus `<layer>.weight_mask`,
    where the mask keeps a few weights that fine-tuning drove to exactly 0."""
    sd = model.state_dict()
    for k in [k for k in sd if k.endswith("weight")]:
        mask = sd[k] != 0
        mask[0, :3] = True  # kept but zero: must still be stored
        sd[k + "_mask"] = mask
    p = tmp_path / "masked.pt"
    torch.save(sd, p)
    return p, model


def _safetensors(model, tmp_path):
    p = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(p))
    return p, model


def _wrapped(model, tmp_path):
    p = tmp_path / "ckpt.bin"  # the name says nothing: the content decides
    torch.save({"state_dict": model.state_dict()}, p)
    return p, model


KINDS = {"plain": _plain, "prune_pairs": _prune_pairs, "weight_mask": _weight_mask,
         "safetensors": _safetensors, "wrapped": _wrapped}


@pytest.mark.parametrize("fmt", ["auto", "csr", "bsr", "dense"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_round_trip_every_kind_and_format(tmp_path, kind, fmt):
    path, model = KINDS[kind](make_mlp(), tmp_path)
    out = tmp_path / "model.sparse"
    meta = convert(path, out, format=fmt, arch="mlp:relu", log=lambda *_: None)
    assert meta["verification"]["rel_err_vs_checkpoint"] <= 1e-5
    assert meta["format_version"] == 1 and set(meta["tensors"]) == set(artifact_io.read(out)[1])
    sparse = loaded_matches(out, model)
    layers = [m for m in sparse.modules() if isinstance(m, SparseLinear)]
    assert len(layers) == 3
    if fmt != "auto":
        assert {m.format for m in layers} == {fmt}
    assert all(not any(p.requires_grad for p in m.parameters()) for m in layers)
    assert not sparse.training


def test_prune_pairs_mask_decides(tmp_path):
    """Weights the mask drops are dropped even though *_orig still holds them."""
    path, pruned = _prune_pairs(None, tmp_path)
    sd = torch.load(path, weights_only=True)
    assert (sd["0.weight_orig"] * (sd["0.weight_mask"] == 0)).abs().sum() > 0
    convert(path, tmp_path / "a.sparse", format="csr", arch="mlp:relu", log=lambda *_: None)
    sparse = loaded_matches(tmp_path / "a.sparse", pruned)
    assert sparse[0].weight_values.numel() == int(sd["0.weight_mask"].sum())


def test_kept_zero_weights_stay_stored(tmp_path):
    path, model = _weight_mask(make_mlp(), tmp_path)
    convert(path, tmp_path / "a.sparse", format="csr", arch="mlp:relu", log=lambda *_: None)
    meta, tensors = artifact_io.read(tmp_path / "a.sparse")
    mask = torch.load(path, weights_only=True)["0.weight_mask"]
    assert tensors["0.weight_values"].numel() == int(mask.sum()) > int((model[0].weight != 0).sum())


@pytest.mark.parametrize("dtype,tol", [("bf16", 2 ** -8), ("fp16", 2 ** -11)])
def test_16bit_weights_within_their_precision(tmp_path, dtype, tol):
    path, model = _plain(make_mlp(), tmp_path)
    meta = convert(path, tmp_path / "a.sparse", dtype=dtype, format="csr", arch="mlp:relu", log=lambda *_: None)
    ver = meta["verification"]
    assert ver["rel_err_vs_rounded_weights"] <= 1e-5
    assert 0 < ver["rel_err_vs_checkpoint"] <= 16 * tol
    sparse = engine.load(tmp_path / "a.sparse")
    assert sparse[0].weight_values.dtype == {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    x = torch.randn(7, SIZES[0])
    with torch.no_grad():
        y, ref = sparse(x), model(x)
    assert float((y - ref).norm() / ref.norm()) <= 16 * tol


def test_gelu_and_tanh_mlps(tmp_path):
    for act, name in ((nn.GELU, "gelu"), (nn.Tanh, "tanh")):
        path, model = _plain(make_mlp(act=act), tmp_path)
        convert(path, tmp_path / f"{name}.sparse", arch=f"mlp:{name}", format="csr", log=lambda *_: None)
        loaded_matches(tmp_path / f"{name}.sparse", model)


def test_pruning_report_supplies_the_arch(tmp_path):
    model = make_mlp(act=nn.GELU)
    torch.save(model.state_dict(), tmp_path / "pruned.pt")
    (tmp_path / "pruned.report.json").write_text(json.dumps(
        {"arch": {"family": "mlp", "sizes": SIZES, "activation": "gelu"}}))
    meta = convert(tmp_path / "pruned.pt", tmp_path / "a.sparse", log=lambda *_: None)
    assert meta["arch"] == {"family": "mlp", "config": {"sizes": SIZES, "activation": "gelu"}}
    loaded_matches(tmp_path / "a.sparse", model)


def test_bsr_block_detected_and_forced(tmp_path):
    model = make_mlp(sizes=[64, 128, 64, 16], sparsity=0.8, block=(16, 16))
    path, _ = _plain(model, tmp_path)
    meta = convert(path, tmp_path / "a.sparse", format="bsr", arch="mlp:relu", log=lambda *_: None)
    assert {tuple(l["block"]) for l in meta["layers"].values()} == {(16, 16)}  # the pruning tiles
    meta = convert(path, tmp_path / "b.sparse", format="bsr", block="8x4", arch="mlp:relu", log=lambda *_: None)
    assert {tuple(l["block"]) for l in meta["layers"].values()} == {(8, 4)}
    sparse = loaded_matches(tmp_path / "b.sparse", model)
    assert sparse[2].sparse_weight.blocksize == (8, 4)


def test_auto_keeps_dense_ish_layer_dense_and_sparse_layer_sparse(tmp_path):
    torch.manual_seed(7)
    model = make_mlp(sizes=[512, 512, 512], sparsity=0.0)
    with torch.no_grad():
        model[0].weight.mul_(torch.rand_like(model[0].weight) >= 0.1)  # 10 % sparse: dense-ish
        keep = (torch.rand(32, 32) >= 0.95).repeat_interleave(16, 0).repeat_interleave(16, 1)
        model[2].weight.mul_(keep)  # 95 % sparse in 16x16 blocks
    path, _ = _plain(model, tmp_path)
    meta = convert(path, tmp_path / "a.sparse", arch="mlp:relu", log=lambda *_: None)
    assert meta["layers"]["0"]["format"] == "dense", meta["layers"]["0"]["reason"]
    assert meta["layers"]["2"]["format"] == "bsr", meta["layers"]["2"]["reason"]
    assert "dense" in meta["layers"]["0"]["reason"]
    loaded_matches(tmp_path / "a.sparse", model, atol=1e-4)


def test_spec_contract_mlp(tmp_path):
    path, model = _plain(make_mlp(), tmp_path)
    convert(path, tmp_path / "digits-90.sparse", arch="mlp:relu", log=lambda *_: None)
    sparse = engine.load(tmp_path / "digits-90.sparse", device="cpu")
    assert sparse.spec == {"family": "mlp", "name": "digits-90",
                           "inputs": [{"name": "input", "datatype": "FP32", "shape": [-1, SIZES[0]]}],
                           "outputs": [{"name": "output", "datatype": "FP32", "shape": [-1, SIZES[-1]]}]}


def test_concurrent_forwards_equal_serial(tmp_path):
    path, model = _plain(make_mlp(), tmp_path)
    convert(path, tmp_path / "a.sparse", arch="mlp:relu", format="csr", log=lambda *_: None)
    sparse = engine.load(tmp_path / "a.sparse")
    xs = [torch.randn(4, SIZES[0]) for _ in range(8)]
    serial = [sparse(x) for x in xs]
    results = [None] * len(xs)

    def work(i):
        for _ in range(5):
            results[i] = sparse(xs[i])
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(results, serial):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# ----------------------------------------------------------------------------- refusals

def test_refuses_mask_shape_mismatch(tmp_path):
    sd = make_mlp().state_dict()
    sd["2.weight_mask"] = torch.ones(3, 3, dtype=torch.bool)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"mask '2.weight_mask' has shape \(3, 3\) but weight '2.weight'"):
        convert(tmp_path / "bad.pt", tmp_path / "a.sparse", arch="mlp:relu")
    assert not (tmp_path / "a.sparse").exists()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_refuses_nan_inf(tmp_path, bad):
    sd = make_mlp().state_dict()
    sd["2.weight"][1, 2] = bad
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(ConvertError, match=r"'2.weight' holds NaN or Inf"):
        convert(tmp_path / "bad.pt", tmp_path / "a.sparse", arch="mlp:relu")


def test_refuses_state_dict_that_does_not_fit(tmp_path):
    sd = make_mlp().state_dict()
    sd["2.weight"] = torch.randn(64, 95)  # layer 0 outputs 96 features
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(ArchError, match=r"'2.weight' has shape \(64, 95\).*outputs 96"):
        convert(tmp_path / "bad.pt", tmp_path / "a.sparse", arch="mlp:relu")
    sd = make_mlp().state_dict()
    sd["extra.running_mean"] = torch.zeros(4)
    torch.save(sd, tmp_path / "extra.pt")
    with pytest.raises(ArchError, match="do not belong to any Linear"):
        convert(tmp_path / "extra.pt", tmp_path / "a.sparse", arch="mlp:relu")
    torch.save(make_mlp().state_dict(), tmp_path / "mlp.pt")
    with pytest.raises(ArchError, match="needs a Hugging Face folder"):
        convert(tmp_path / "mlp.pt", tmp_path / "a.sparse", arch="bert")


def test_refuses_report_sizes_that_disagree(tmp_path):
    torch.save(make_mlp().state_dict(), tmp_path / "p.pt")
    (tmp_path / "p.report.json").write_text(json.dumps({"arch": {"family": "mlp", "sizes": [48, 10]}}))
    with pytest.raises(ArchError, match=r"report says sizes \[48, 10\]"):
        convert(tmp_path / "p.pt", tmp_path / "a.sparse")


@pytest.mark.parametrize("arch,msg", [("resnet50", "unknown architecture 'resnet50'"),
                                      ("mlp:swish", "unknown MLP activation 'swish'"),
                                      (None, "cannot tell the architecture"),
                                      ("module:no_such_pkg_xyz:make", "cannot import 'no_such_pkg_xyz'")])
def test_refuses_unknown_architecture(tmp_path, arch, msg):
    torch.save(make_mlp().state_dict(), tmp_path / "m.pt")
    with pytest.raises(ArchError, match=msg):
        convert(tmp_path / "m.pt", tmp_path / "a.sparse", arch=arch)


def test_refuses_pickled_module_and_unknown_content(tmp_path):
    torch.save(make_mlp(), tmp_path / "whole_model.pt")  # a pickled nn.Module, not a state_dict
    with pytest.raises(CheckpointError, match="weights_only=True"):
        convert(tmp_path / "whole_model.pt", tmp_path / "a.sparse", arch="mlp:relu")
    (tmp_path / "notes.pt").write_text("hello")
    with pytest.raises(CheckpointError, match="unrecognised content"):
        convert(tmp_path / "notes.pt", tmp_path / "a.sparse", arch="mlp:relu")


def test_refuses_bad_options(tmp_path):
    torch.save(make_mlp().state_dict(), tmp_path / "m.pt")
    with pytest.raises(ConvertError, match="--block 8x8 needs --format bsr"):
        convert(tmp_path / "m.pt", tmp_path / "a.sparse", arch="mlp:relu", block="8x8")
    with pytest.raises(ConvertError, match="unknown dtype 'int8'"):
        convert(tmp_path / "m.pt", tmp_path / "a.sparse", arch="mlp:relu", dtype="int8")
    with pytest.raises(ConvertError, match="block 5x5 does not divide|does not divide"):
        convert(tmp_path / "m.pt", tmp_path / "a.sparse", arch="mlp:relu", format="bsr", block="5x5")


def test_failed_verification_writes_nothing(tmp_path, monkeypatch):
    import engine.convert as conv
    torch.save(make_mlp().state_dict(), tmp_path / "m.pt")
    monkeypatch.setattr(conv, "KERNEL_TOL", -1.0)
    with pytest.raises(ConvertError, match="verification failed"):
        convert(tmp_path / "m.pt", tmp_path / "a.sparse", arch="mlp:relu", log=lambda *_: None)
    assert list(tmp_path.iterdir()) == [tmp_path / "m.pt"]


# ----------------------------------------------------------------------------- corrupted artifacts

@pytest.fixture()
def artifact(tmp_path):
    path, model = _plain(make_mlp(), tmp_path)
    convert(path, tmp_path / "a.sparse", arch="mlp:relu", format="csr", log=lambda *_: None)
    return tmp_path / "a.sparse"


def test_truncated_artifact(artifact):
    data = artifact.read_bytes()
    for cut in (4, 100, len(data) // 2, len(data) - 1):
        artifact.write_bytes(data[:cut])
        with pytest.raises(ArtifactError, match="truncated"):
            engine.load(artifact)


def test_inspect_reports_a_truncated_artifact(artifact, capsys):
    data = artifact.read_bytes()
    artifact.write_bytes(data[:len(data) // 3])
    assert cli(["inspect", str(artifact)]) == 2
    assert "truncated" in capsys.readouterr().err


def test_altered_tensor_bytes(artifact):
    data = bytearray(artifact.read_bytes())
    data[-7] ^= 0x40  # inside the last tensor's data
    artifact.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="checksum mismatch for tensor"):
        engine.load(artifact)


def test_altered_header(artifact):
    data = artifact.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    meta = json.loads(header["__metadata__"]["sparse_engine"])
    meta["arch"]["config"]["activation"] = "tanh"
    header["__metadata__"]["sparse_engine"] = json.dumps(meta)
    new = json.dumps(header).encode()
    new += b" " * ((8 - len(new) % 8) % 8)
    artifact.write_bytes(len(new).to_bytes(8, "little") + new + data[8 + n:])
    with pytest.raises(ArtifactError, match="metadata checksum mismatch"):
        engine.load(artifact)


def test_plain_safetensors_is_not_an_artifact(tmp_path):
    save_file({"w": torch.randn(3, 3)}, str(tmp_path / "w.safetensors"))
    with pytest.raises(ArtifactError, match="not a sparse-engine artifact"):
        engine.load(tmp_path / "w.safetensors")


def test_consistent_but_invalid_indices_rejected(artifact, tmp_path):
    """A file re-checksummed after its indices were broken still fails the layout validation."""
    meta, tensors = artifact_io.read(artifact)
    cols = tensors["0.weight_col_indices"].clone()
    cols[0] = 10_000
    tensors["0.weight_col_indices"] = cols
    keep = {k: meta[k] for k in ("arch", "layers", "tokenizer")}
    artifact_io.write(tmp_path / "evil.sparse", tensors, keep)
    with pytest.raises(ArtifactError, match="invalid csr layout.*col_indices out of range"):
        engine.load(tmp_path / "evil.sparse")


# ----------------------------------------------------------------------------- custom family

FACTORY_SRC = '''
import torch.nn as nn
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(40, 80)
        self.out = nn.Linear(80, 24)
    def forward(self, x):
        return self.out(nn.functional.silu(self.inp(x)))
def make():
    return Net()
'''


def test_custom_factory_needs_trust(tmp_path, monkeypatch):
    (tmp_path / "my_models_t5.py").write_text(FACTORY_SRC)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("my_models_t5", None)
    import my_models_t5
    model = my_models_t5.make().eval()
    with torch.no_grad():
        model.inp.weight.mul_(torch.rand_like(model.inp.weight) > 0.8)
    torch.save(model.state_dict(), tmp_path / "c.pt")
    convert(tmp_path / "c.pt", tmp_path / "c.sparse", arch="module:my_models_t5:make", log=lambda *_: None)
    with pytest.raises(ArtifactError, match="trust_module=True"):
        engine.load(tmp_path / "c.sparse")
    sparse = engine.load(tmp_path / "c.sparse", trust_module=True)
    assert isinstance(sparse.inp, SparseLinear)
    assert sparse.spec["family"] == "custom" and sparse.spec["outputs"][0]["shape"] == [-1, 24]
    x = torch.randn(6, 40)
    with torch.no_grad():
        torch.testing.assert_close(sparse(x), model(x), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- command line

def test_cli_convert_inspect_run(tmp_path, capsys):
    path, model = _plain(make_mlp(), tmp_path)
    art = tmp_path / "m.sparse"
    assert cli(["convert", str(path), "-o", str(art), "--arch", "mlp:relu"]) == 0
    out = capsys.readouterr().out
    assert "verify: relative error" in out and "wrote" in out
    assert cli(["inspect", str(art)]) == 0
    table = capsys.readouterr().out
    for col in ("format", "sparsity", "dense bytes", "speedup b1", "speedup b32"):
        assert col in table
    assert "predicted" in table  # auto's reason for each layer
    x = np.random.default_rng(0).standard_normal((9, SIZES[0])).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    assert cli(["run", str(art), "--input", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.npy")]) == 0
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), ref, atol=1e-5, rtol=1e-5)
    assert cli(["run", str(art), "--input", str(tmp_path / "x.npy"), "-o", str(tmp_path / "y.json")]) == 0
    doc = json.loads((tmp_path / "y.json").read_text())
    assert doc["name"] == "output" and doc["shape"] == [9, SIZES[-1]]
    np.testing.assert_allclose(np.array(doc["data"]), ref, atol=1e-5, rtol=1e-5)


def test_cli_convert_refusal_exit_code(tmp_path, capsys):
    sd = make_mlp().state_dict()
    sd["0.weight"][0, 0] = float("nan")
    torch.save(sd, tmp_path / "bad.pt")
    assert cli(["convert", str(tmp_path / "bad.pt"), "-o", str(tmp_path / "a.sparse"), "--arch", "mlp:relu"]) == 2
    assert "NaN or Inf" in capsys.readouterr().err
    assert not (tmp_path / "a.sparse").exists()


def test_cli_run_rejects_wrong_width(artifact, tmp_path):
    np.save(tmp_path / "x.npy", np.zeros((2, 7), dtype=np.float32))
    with pytest.raises(SystemExit, match="expected last dimension 48"):
        cli(["run", str(artifact), "--input", str(tmp_path / "x.npy")])
