"""The format registry: every layout is one description the engine looks up. A test-only layout
(COO), registered here and nowhere else, runs through dispatch, SparseLinear, the artifact and
engine.load end to end -- the proof that adding a format touches only its own description."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn as nn

import engine
from engine import artifact as artifact_io
from engine import costmodel, formats, ops
from engine.artifact import ArtifactError
from engine.formats import BSR, CSR, Format, FormatError
from engine.modules import SparseLinear, choose_layout
from engine.reference import apply_activation, sparse_linear_ref
from tests.fixtures import random_sparse


@dataclass
class COO:
    """Coordinate list of W[O, I]: rows (nnz,) int32, cols (nnz,) int32, values (nnz,)."""

    rows: torch.Tensor
    cols: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, int]

    def __post_init__(self):
        o, i = self.shape
        if self.rows.numel() and (int(self.rows.min()) < 0 or int(self.rows.max()) >= o):
            raise FormatError(f"COO: rows out of range [0, {o})")
        if self.cols.numel() and (int(self.cols.min()) < 0 or int(self.cols.max()) >= i):
            raise FormatError(f"COO: cols out of range [0, {i})")

    @classmethod
    def trusted(cls, rows, cols, values, shape):
        self = object.__new__(cls)
        self.rows, self.cols, self.values, self.shape = rows, cols, values, tuple(shape)
        return self

    @classmethod
    def from_dense(cls, w, mask=None):
        keep = (w != 0) if mask is None else (mask != 0)
        r, c = keep.nonzero(as_tuple=True)
        return cls(r.to(torch.int32), c.to(torch.int32), w[r, c].contiguous(), tuple(w.shape))

    @property
    def device(self):
        return self.values.device

    def to_dense(self, dtype=None):
        out = torch.zeros(self.shape, dtype=dtype or self.values.dtype, device=self.device)
        out[self.rows.long(), self.cols.long()] = self.values.to(out.dtype)
        return out


def coo_linear_ref(x, w, bias=None, activation=None):
    """Oracle: scatter each stored product into its output row."""
    y = torch.zeros(*x.shape[:-1], w.shape[0], dtype=x.dtype)
    y.index_add_(-1, w.rows.long(), x[..., w.cols.long()] * w.values.to(x.dtype))
    return apply_activation(y if bias is None else y + bias.to(x.dtype), activation)


COO_FORMAT = Format(
    name="coo", cls=COO, buffers=("weight_rows", "weight_cols", "weight_values"),
    build=lambda w, mask, block: COO.from_dense(w, mask),
    from_buffers=lambda b, shape, trusted: COO.trusted(*b, shape) if trusted else COO(*b, tuple(shape)),
    to_buffers=lambda w: (w.rows, w.cols, w.values),
    stored=lambda keep, block: int(keep.sum()),
    traffic_bytes=lambda shape, stored, block, vb: stored * (vb + 8),
    kernels={"torch": "engine.reference:densified_linear"},
    reference=f"{__name__}:coo_linear_ref")


@pytest.fixture()
def coo(monkeypatch):
    """COO registered for one test; the registry is restored afterwards."""
    monkeypatch.setattr(formats, "_REGISTRY", dict(formats._REGISTRY))
    monkeypatch.setattr(formats, "_BY_CLASS", dict(formats._BY_CLASS))
    monkeypatch.setattr(ops, "_warned", set())
    formats.register(COO_FORMAT)
    return COO_FORMAT


def test_builtin_layouts_are_registered_with_their_buffers():
    assert set(formats.names()) >= {"dense", "csr", "bsr"}
    assert formats.get("csr").cls is CSR and formats.get("bsr").cls is BSR and formats.get("bsr").blocked
    assert formats.get("dense").buffers == ("weight",)
    assert formats.format_of(nn.Parameter(torch.randn(3, 4))) is formats.get("dense")
    assert formats.format_of("csr") is None
    with pytest.raises(FormatError, match="unknown format 'ell'.*'csr'"):
        formats.get("ell")


@pytest.mark.parametrize("name, block", [("dense", None), ("csr", None), ("bsr", (4, 8))])
def test_description_agrees_with_the_layout_objects(name, block):
    w = random_sparse(24, 40, 0.7, block=(4, 8))
    fmt = formats.get(name)
    weight = fmt.build(w, None, block)
    assert formats.format_of(weight) is fmt
    buffers = fmt.to_buffers(weight)
    assert len(buffers) == len(fmt.buffers)
    assert fmt.nbytes(weight) == sum(t.numel() * t.element_size() for t in buffers)
    assert fmt.stored_values(weight) == fmt.stored(w != 0, block)
    assert fmt.blocksize(weight) == block
    again = fmt.from_buffers(buffers, (24, 40), False)
    x = torch.randn(3, 40, dtype=torch.float64)
    torch.testing.assert_close(fmt.reference_fn()(x, again), x @ w.double().T)
    stats = formats.layer_stats(weight)
    assert stats == {"format": name, "block": list(block) if block else None,
                     "stored": fmt.stored_values(weight), "bytes": fmt.nbytes(weight)}


def test_format_pickles_by_name():
    import copy
    import pickle
    fmt = formats.get("bsr")
    assert pickle.loads(pickle.dumps(fmt)) is fmt and copy.deepcopy(fmt) is fmt


def test_registered_format_runs_through_dispatch(coo):
    w = random_sparse(24, 40, 0.8)
    weight = COO.from_dense(w)
    x, b = torch.randn(2, 3, 40), torch.randn(24)
    before = ops.calls[("torch", "coo")]
    y = engine.sparse_linear(x, weight, b, activation="relu", backend="torch")
    assert ops.calls[("torch", "coo")] == before + 1
    torch.testing.assert_close(y, torch.relu(x @ w.T + b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse_linear_ref(x.double(), weight), x.double() @ w.double().T)
    # No CPU kernel registered: forcing it is an error, auto falls back once, with a warning.
    with pytest.raises(ops.BackendUnavailable, match="the coo layout has no cpu kernel"):
        engine.sparse_linear(x, weight, backend="cpu")
    if engine.cpu.available():
        with pytest.warns(RuntimeWarning, match="coo layout has no cpu kernel"):
            engine.sparse_linear(x, weight)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            engine.sparse_linear(x, weight)


def test_registered_format_in_sparselinear_artifact_and_load(coo, tmp_path):
    model = nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 8))
    with torch.no_grad():
        model[0].weight.mul_(torch.rand(24, 40) > 0.8)
    layer = SparseLinear.from_linear(model[0], "coo")
    layer.backend = "torch"  # the only backend coo has
    assert layer.format == "coo" and set(layer.state_dict()) == {"weight_rows", "weight_cols",
                                                                 "weight_values", "bias"}
    x = torch.randn(5, 40)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), model[0](x), rtol=1e-5, atol=1e-5)
    # An artifact with a coo layer: written, checked and loaded by the generic code.
    tensors = {f"0.{k}": v for k, v in layer.state_dict().items()}
    tensors.update({f"2.{k}": v for k, v in model[2].state_dict().items()})
    tensors["2.weight"] = model[2].weight.detach()
    meta = {"arch": {"family": "mlp", "config": {"sizes": [40, 24, 8], "activation": "relu"}},
            "layers": {"0": {"format": "coo", "block": None, "dtype": "fp32", "shape": [24, 40]},
                       "2": {"format": "dense", "block": None, "dtype": "fp32", "shape": [8, 24]}},
            "tokenizer": None}
    artifact_io.write(tmp_path / "coo.sparse", tensors, meta)
    loaded = engine.load(tmp_path / "coo.sparse", backend="torch")
    assert loaded[0].format == "coo" and loaded[0].activation == "relu"
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-5)
    # Its own validation runs at load.
    tensors["0.weight_cols"] = tensors["0.weight_cols"].clone().fill_(99)
    artifact_io.write(tmp_path / "bad.sparse", tensors, meta)
    with pytest.raises(ArtifactError, match="layer '0' has an invalid coo layout.*cols out of range"):
        engine.load(tmp_path / "bad.sparse")
    # A layer missing one of the format's buffers is refused by the structure check.
    del tensors["0.weight_rows"]
    with pytest.raises(ArtifactError, match="layer '0' \\(coo\\) lacks tensor '0.weight_rows'"):
        artifact_io.write(tmp_path / "short.sparse", tensors, meta)


def test_auto_ignores_a_format_without_cost_model_rates(coo):
    assert not costmodel.has_rates("coo")
    w = random_sparse(256, 256, 0.95)
    fmt, block, reason = choose_layout(w)
    assert fmt == "csr" and "coo" not in reason


def test_unknown_layer_format_in_an_artifact(tmp_path):
    with pytest.raises(ArtifactError, match="layer '0' has format 'coo'; expected one of"):
        artifact_io.write(tmp_path / "a.sparse", {"0.w": torch.zeros(1)},
                          {"arch": {"family": "mlp", "config": {}}, "tokenizer": None,
                           "layers": {"0": {"format": "coo", "dtype": "fp32", "shape": [1, 1]}}})
