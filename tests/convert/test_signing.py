"""Signed artifacts (engine.signing, Ed25519): `keygen` writes a key pair, `convert --sign-key`
signs, and `engine.load(..., verify_key=)` / `run --verify-key` accept only an unedited artifact
signed by that key. Each forgery below recomputes every checksum, as an attacker with write access
to the file would, so only the signature can catch it."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import engine
from engine import artifact as artifact_io
from engine.signing import SIGNATURE_KEY, SignatureError
from tests.fixtures import random_sparse

pytest.importorskip("cryptography", reason="signing needs the 'cryptography' package (serve extra)")

ROOT = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
SIZES = [19, 29, 7]


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine", *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    """(folder, signed artifact, unsigned artifact); keys 'alice' (signs) and 'mallory' made by keygen."""
    from engine.convert import convert
    from engine.examples import mlp

    tmp = tmp_path_factory.mktemp("signing")
    r = _cli("keygen", "-o", tmp / "alice")
    assert r.returncode == 0, r.stderr
    assert "alice.key" in r.stdout and "alice.pub" in r.stdout
    from engine.signing import keygen
    keygen(tmp / "mallory")
    sd = {k: random_sparse(*v.shape, 0.7) if v.dim() == 2 else v for k, v in mlp(SIZES).state_dict().items()}
    torch.save(sd, tmp / "mlp.pt")
    quiet = lambda *a, **k: None
    convert(tmp / "mlp.pt", tmp / "signed.spz", arch="mlp:relu", sign_key=tmp / "alice.key", log=quiet)
    convert(tmp / "mlp.pt", tmp / "unsigned.spz", arch="mlp:relu", log=quiet)
    return tmp, tmp / "signed.spz", tmp / "unsigned.spz"


def _forge(src: Path, dst: Path, edit) -> None:
    """Copies the artifact with `edit(meta, tensors)` applied, then recomputes every tensor digest and
    the header digest; keeps whatever signature the source carried."""
    with safe_open(str(src), framework="pt") as f:
        header = dict(f.metadata())
        tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
    meta = json.loads(header[artifact_io.META_KEY])
    edit(meta, tensors)
    for name, t in tensors.items():
        meta["tensors"][name]["sha256"] = artifact_io.tensor_sha256(t)
    meta["meta_sha256"] = artifact_io._meta_digest(meta)
    header[artifact_io.META_KEY] = json.dumps(meta)
    save_file(tensors, str(dst), metadata=header)


def _answer(model, x):
    with torch.inference_mode():
        return model(torch.from_numpy(x)).numpy()


def test_keygen_writes_a_private_key_only_the_owner_reads(signed):
    tmp, _, _ = signed
    assert stat.S_IMODE((tmp / "alice.key").stat().st_mode) == 0o600
    assert b"PUBLIC KEY" in (tmp / "alice.pub").read_bytes()
    r = _cli("keygen", "-o", tmp / "alice")  # never overwrites a key
    assert r.returncode == 1 and "already exists" in r.stderr


def test_signed_artifact_verifies_and_answers_like_unsigned(signed):
    tmp, signed_path, unsigned_path = signed
    with safe_open(str(signed_path), framework="pt") as f:
        entry = json.loads(f.metadata()[SIGNATURE_KEY])
    assert entry["alg"] == "ed25519" and len(entry["key_id"]) == 16
    x = np.random.default_rng(0).normal(size=(3, SIZES[0])).astype(np.float32)
    verified = engine.load(signed_path, verify_key=tmp / "alice.pub")
    np.testing.assert_array_equal(_answer(verified, x), _answer(engine.load(unsigned_path), x))
    engine.load(signed_path)  # without a key the signature is not required


def test_unsigned_artifact_is_refused_when_a_key_is_given(signed):
    tmp, _, unsigned_path = signed
    with pytest.raises(SignatureError, match="not signed"):
        engine.load(unsigned_path, verify_key=tmp / "alice.pub")


def test_artifact_signed_by_another_key_is_refused(signed):
    tmp, signed_path, _ = signed
    with pytest.raises(SignatureError, match="signed by key .* not by the verify key"):
        engine.load(signed_path, verify_key=tmp / "mallory.pub")
    # Re-signing alice's artifact with mallory's key: valid signature, wrong signer.
    meta, tensors = artifact_io.read(signed_path)
    resigned = tmp / "resigned.spz"
    artifact_io.write(resigned, {k: v.clone() for k, v in tensors.items()}, meta, sign_key=tmp / "mallory.key")
    engine.load(resigned, verify_key=tmp / "mallory.pub")
    with pytest.raises(SignatureError, match="not by the verify key"):
        engine.load(resigned, verify_key=tmp / "alice.pub")


def _relu_to_tanh(meta, tensors):
    meta["arch"]["config"]["activation"] = "tanh"


def _scale_a_bias(meta, tensors):
    tensors["0.bias"].mul_(3.0)


def _add_a_field(meta, tensors):
    meta["note"] = "harmless?"


@pytest.mark.parametrize("edit", [_relu_to_tanh, _scale_a_bias, _add_a_field],
                         ids=["activation", "bias", "extra-field"])
def test_edited_artifact_is_refused_though_its_checksums_match(signed, edit):
    tmp, signed_path, _ = signed
    forged = tmp / f"forged-{edit.__name__}.spz"
    _forge(signed_path, forged, edit)
    engine.load(forged)  # the checksums alone cannot tell: they were recomputed
    with pytest.raises(SignatureError, match="edited after it was signed"):
        engine.load(forged, verify_key=tmp / "alice.pub")


def test_bad_keys_get_clear_errors(signed, tmp_path):
    tmp, signed_path, _ = signed
    with pytest.raises(SignatureError, match="private key: pass the .pub file"):
        engine.load(signed_path, verify_key=tmp / "alice.key")
    with pytest.raises(SignatureError, match="cannot read the verify key file"):
        engine.load(signed_path, verify_key=tmp_path / "missing.pub")
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a key")
    from engine.convert import convert
    with pytest.raises(SignatureError, match="not an unencrypted PEM private key"):
        convert(tmp / "mlp.pt", tmp_path / "x.spz", arch="mlp:relu", sign_key=garbage, log=lambda *a: None)
    assert not (tmp_path / "x.spz").exists()


def test_run_cli_refuses_with_the_reason(signed, tmp_path):
    tmp, signed_path, unsigned_path = signed
    x = tmp_path / "x.npy"
    np.save(x, np.random.default_rng(1).normal(size=(2, SIZES[0])).astype(np.float32))
    ok = _cli("run", signed_path, "--input", x, "--verify-key", tmp / "alice.pub")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["shape"] == [2, SIZES[-1]]
    bad = _cli("run", unsigned_path, "--input", x, "--verify-key", tmp / "alice.pub")
    assert bad.returncode != 0 and "sparse-engine run:" in bad.stderr and "not signed" in bad.stderr
    assert "Traceback" not in bad.stderr
