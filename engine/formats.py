"""Sparse weight layouts: CSR (unstructured) and BSR (block), both for a 2-D weight W[O, I].

Indices are int32 (every kernel reads int32); values keep the weight's dtype (fp32, bf16, fp16).
`from_dense` takes an optional mask: what the mask keeps is stored even when its value is zero, so a
pruned layer's structure survives fine-tuning that drove a kept weight to exactly 0.

Every layout, dense included, is also described once in the registry at the end of this file
(`Format`: its buffers, how it is built from a masked weight, its bytes, its kernel per backend);
dispatch, SparseLinear, the loader, the artifact checks, the cost model and `inspect` look it up
(`get(name)`, `format_of(weight)`) instead of branching on the layout.
"""
from __future__ import annotations

import importlib
import math
import sys
from dataclasses import dataclass, field
from typing import Callable

import torch

VALUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class FormatError(ValueError):
    """A sparse layout's buffers are inconsistent, or an argument does not fit the layout."""


def _fail(fn: str, msg: str):
    raise FormatError(f"{fn}: {msg}")


def _check_weight(fn: str, weight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if not isinstance(weight, torch.Tensor):
        _fail(fn, f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        _fail(fn, f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    if weight.dtype not in VALUE_DTYPES:
        _fail(fn, f"weight dtype must be one of float32/bfloat16/float16, got {weight.dtype}")
    if weight.numel() and not torch.isfinite(weight).all():
        _fail(fn, "weight holds NaN or Inf values")
    if mask is None:
        return weight != 0
    if tuple(mask.shape) != tuple(weight.shape):
        _fail(fn, f"mask shape {tuple(mask.shape)} does not match weight shape {tuple(weight.shape)}")
    return mask.to(device=weight.device) != 0


# Entries checked per step: bounds the temporaries when a large artifact's indices are validated at
# load (the index tensors themselves may be memory-mapped; no int64 copy of them is made).
_CHECK_CHUNK = 1 << 20


def _check_index_arrays(fn, crow, col, n_rows, n_cols, n_stored):
    """Shared checks of a compressed-row index: pointers and sorted, in-range column indices."""
    for name, t in (("crow_indices", crow), ("col_indices", col)):
        if t.dtype != torch.int32 or t.dim() != 1:
            _fail(fn, f"{name} must be a 1-D int32 tensor, got dtype {t.dtype} and {t.dim()} dims")
    if crow.numel() != n_rows + 1:
        _fail(fn, f"crow_indices has length {crow.numel()}, expected rows + 1 = {n_rows + 1}")
    c, k = crow.cpu(), col.cpu()
    if int(c[0]) != 0 or int(c[-1]) != n_stored or k.numel() != n_stored:
        _fail(fn, f"crow_indices must start at 0 and end at the stored count {n_stored} "
                  f"(got {int(c[0])}..{int(c[-1])}, {k.numel()} column indices)")
    if (c[1:] < c[:-1]).any():
        _fail(fn, "crow_indices must be non-decreasing")
    if n_stored and (int(k.min()) < 0 or int(k.max()) >= n_cols):
        _fail(fn, f"col_indices out of range [0, {n_cols}): min {int(k.min())}, max {int(k.max())}")
    if n_stored < 2:
        return
    # Within a row the indices must strictly increase: every adjacent pair that is not a row start.
    row_starts = c[1:-1]
    for lo in range(1, n_stored, _CHECK_CHUNK):
        hi = min(n_stored, lo + _CHECK_CHUNK)
        starts = torch.zeros(hi - lo, dtype=torch.bool)
        starts[(row_starts[(row_starts >= lo) & (row_starts < hi)] - lo).long()] = True
        bad = (k[lo:hi] <= k[lo - 1:hi - 1]) & ~starts
        if bad.any():
            i = lo + int(bad.nonzero()[0])
            _fail(fn, f"col_indices must be strictly increasing within a row (position {i}: "
                      f"{int(k[i - 1])} then {int(k[i])})")


def parse_blocksize(blocksize, fn: str = "BSR") -> tuple[int, int]:
    """An int or a pair -> (R, C), both positive."""
    if isinstance(blocksize, int):
        blocksize = (blocksize, blocksize)
    try:
        r, c = (int(b) for b in blocksize)
    except (TypeError, ValueError):
        _fail(fn, f"blocksize must be an int or a pair (R, C), got {blocksize!r}")
    if r <= 0 or c <= 0:
        _fail(fn, f"blocksize must be positive, got {(r, c)}")
    return r, c


@dataclass
class _Compressed:
    """What CSR and BSR share: row pointers, column indices, values and the dense shape [O, I];
    validated on construction (each layout's own `validate`)."""

    crow_indices: torch.Tensor
    col_indices: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, int]

    def __post_init__(self):
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        self.validate()

    def validate(self) -> None:
        raise NotImplementedError

    @classmethod
    def trusted(cls, crow_indices, col_indices, values, shape):
        """Wraps buffers that were validated before (e.g. a module's own), skipping the checks."""
        self = object.__new__(cls)
        self.crow_indices, self.col_indices, self.values, self.shape = crow_indices, col_indices, values, shape
        return self

    @property
    def nnz(self) -> int:
        """Stored values (for BSR, explicit zeros inside kept blocks included)."""
        return self.values.numel()

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def density(self) -> float:
        return self.nnz / max(1, self.shape[0] * self.shape[1])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.crow_indices, self.col_indices, self.values))

    def to(self, device=None, dtype: torch.dtype | None = None):
        return type(self)(self.crow_indices.to(device), self.col_indices.to(device),
                          self.values.to(device=device, dtype=dtype or self.dtype), self.shape)


@dataclass
class CSR(_Compressed):
    """Compressed sparse rows of W[O, I].

    crow_indices: (O + 1,) int32, row r's entries are [crow[r], crow[r+1])
    col_indices:  (nnz,) int32, input-feature index of each entry, increasing within a row
    values:       (nnz,) fp32 | bf16 | fp16
    """

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor | None = None) -> "CSR":
        keep = _check_weight("CSR.from_dense", weight, mask)
        counts = keep.sum(dim=1)
        crow = torch.zeros(weight.shape[0] + 1, dtype=torch.int64, device=weight.device)
        crow[1:] = torch.cumsum(counts, 0)
        rows, cols = keep.nonzero(as_tuple=True)  # row-major order: sorted by row, then column
        return cls(crow.to(torch.int32), cols.to(torch.int32).contiguous(),
                   weight[rows, cols].contiguous(), tuple(weight.shape))

    def validate(self) -> None:
        fn = "CSR"
        o, i = self.shape
        if o < 0 or i < 0:
            _fail(fn, f"shape must be non-negative, got {self.shape}")
        if self.values.dtype not in VALUE_DTYPES:
            _fail(fn, f"values dtype must be float32/bfloat16/float16, got {self.values.dtype}")
        if self.values.dim() != 1 or self.values.numel() != self.col_indices.numel():
            _fail(fn, f"values must be 1-D with one entry per column index "
                      f"({self.col_indices.numel()}), got shape {tuple(self.values.shape)}")
        _check_index_arrays(fn, self.crow_indices, self.col_indices, o, i, self.values.numel())

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        o, i = self.shape
        out = torch.zeros(o, i, dtype=dtype or self.dtype, device=self.device)
        rows = torch.repeat_interleave(torch.arange(o, device=self.device),
                                       (self.crow_indices[1:] - self.crow_indices[:-1]).long())
        out[rows, self.col_indices.long()] = self.values.to(out.dtype)
        return out


@dataclass
class BSR(_Compressed):
    """Block sparse rows of W[O, I] with blocks of R×C (R divides O, C divides I).

    crow_indices: (O/R + 1,) int32, block row b's blocks are [crow[b], crow[b+1])
    col_indices:  (nnzb,) int32, block-column index of each block, increasing within a block row
    values:       (nnzb, R, C) fp32 | bf16 | fp16, each block row-major
    """

    @property
    def blocksize(self) -> tuple[int, int]:
        return (int(self.values.shape[1]), int(self.values.shape[2]))

    @staticmethod
    def check_blocksize(shape, blocksize, fn: str = "BSR") -> tuple[int, int]:
        r, c = parse_blocksize(blocksize, fn)
        o, i = shape
        if o % r or i % c:
            # The BSR kernels assume whole blocks; the nearest block that fits is a common divisor.
            fit = (math.gcd(o, r), math.gcd(i, c))
            _fail(fn, f"blocksize {(r, c)} does not divide weight shape {tuple(shape)} (BSR stores "
                      f"whole blocks only): pick a block whose sides divide the shape, e.g. {fit}, "
                      "or store this layer as CSR (format='csr', or 'auto', which never picks a "
                      "block that does not divide)")
        return r, c

    @classmethod
    def from_dense(cls, weight: torch.Tensor, mask: torch.Tensor | None = None,
                   blocksize=(16, 16)) -> "BSR":
        keep = _check_weight("BSR.from_dense", weight, mask)
        r, c = cls.check_blocksize(weight.shape, blocksize, "BSR.from_dense")
        o, i = weight.shape
        # (O/R, R, I/C, C) -> (O/R, I/C, R, C): one R×C tile per block position.
        tiles = weight.reshape(o // r, r, i // c, c).transpose(1, 2)
        kept = keep.reshape(o // r, r, i // c, c).transpose(1, 2).any(dim=(2, 3))
        crow = torch.zeros(o // r + 1, dtype=torch.int64, device=weight.device)
        crow[1:] = torch.cumsum(kept.sum(dim=1), 0)
        brows, bcols = kept.nonzero(as_tuple=True)
        values = tiles[brows, bcols] * keep.reshape(o // r, r, i // c, c).transpose(1, 2)[brows, bcols]
        return cls(crow.to(torch.int32), bcols.to(torch.int32).contiguous(),
                   values.contiguous(), (o, i))

    def validate(self) -> None:
        fn = "BSR"
        if self.values.dtype not in VALUE_DTYPES:
            _fail(fn, f"values dtype must be float32/bfloat16/float16, got {self.values.dtype}")
        if self.values.dim() != 3:
            _fail(fn, f"values must be 3-D (nnzb, R, C), got shape {tuple(self.values.shape)}")
        r, c = self.check_blocksize(self.shape, self.blocksize, fn)
        if self.values.shape[0] != self.col_indices.numel():
            _fail(fn, f"values holds {self.values.shape[0]} blocks but col_indices has "
                      f"{self.col_indices.numel()} entries")
        _check_index_arrays(fn, self.crow_indices, self.col_indices, self.shape[0] // r,
                            self.shape[1] // c, self.values.shape[0])

    trusted = classmethod(CSR.trusted.__func__)

    @property
    def nnzb(self) -> int:
        return self.values.shape[0]

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        o, i = self.shape
        r, c = self.blocksize
        tiles = torch.zeros(o // r, i // c, r, c, dtype=dtype or self.dtype, device=self.device)
        brows = torch.repeat_interleave(torch.arange(o // r, device=self.device),
                                        (self.crow_indices[1:] - self.crow_indices[:-1]).long())
        tiles[brows, self.col_indices.long()] = self.values.to(tiles.dtype)
        return tiles.transpose(1, 2).reshape(o, i)



SparseWeight = CSR | BSR


# ============================================================================ the format registry

def _resolve(path: str) -> Callable:
    """"pkg.mod:function" -> the function. Looked up on use, so this module imports no backend (and
    a kernel package that tests re-import under TRITON_INTERPRET=1 is always its current copy)."""
    mod_name, _, attr = path.partition(":")
    mod = sys.modules.get(mod_name) or importlib.import_module(mod_name)
    return getattr(mod, attr)


@dataclass(frozen=True, eq=False)
class Format:
    """Everything the engine knows about one weight layout; `register` makes it available by name.

    name         the layer table's / SparseLinear's name for it ("csr")
    cls          Python type of a weight in this layout (CSR; torch.Tensor for dense)
    buffers      SparseLinear buffer names, in `to_buffers` order; also the artifact's tensor names
                 after "<layer>."
    build        (weight (O, I) with pruned entries zeroed, mask or None, blocksize or None) -> weight
    from_buffers (buffers tuple, shape, trusted) -> weight; trusted=False runs the layout's checks
    to_buffers   weight -> its tensors, in `buffers` order, the stored values last
    stored       (keep mask (O, I) bool, blocksize or None) -> values the layout would store
    traffic_bytes(shape, stored, blocksize, value_bytes) -> weight bytes a kernel reads per call
    kernels      backend -> "module:function" called as f(x2 (N, I), weight, bias, act) -> (N, O);
                 a backend absent here has no kernel for this layout
    reference    "module:function", the plain-torch oracle f(x (..., I), weight, bias, act)
    blocked      the layout has a block size (`blocksize(weight)`, "block" in the layer table)
    """

    name: str
    cls: type
    buffers: tuple[str, ...]
    build: Callable
    from_buffers: Callable
    to_buffers: Callable
    stored: Callable
    traffic_bytes: Callable
    kernels: dict = field(default_factory=dict)
    reference: str = "engine.reference:linear_ref"
    blocked: bool = False

    def __reduce__(self):  # pickled / deep-copied by name: the registry holds the one description
        return (get, (self.name,))

    def kernel(self, backend: str) -> Callable | None:
        path = self.kernels.get(backend)
        return None if path is None else _resolve(path)

    def reference_fn(self) -> Callable:
        return _resolve(self.reference)

    def nbytes(self, weight) -> int:
        return sum(t.numel() * t.element_size() for t in self.to_buffers(weight))

    def stored_values(self, weight) -> int:
        """Values `weight` stores (explicit zeros inside kept blocks included)."""
        return self.to_buffers(weight)[-1].numel()

    def blocksize(self, weight) -> tuple[int, int] | None:
        return weight.blocksize if self.blocked else None


_REGISTRY: dict[str, Format] = {}
_BY_CLASS: dict[type, Format] = {}


def register(fmt: Format) -> Format:
    """Adds (or replaces) a layout; its name becomes valid in `format=`, artifacts and dispatch."""
    _REGISTRY[fmt.name] = fmt
    _BY_CLASS[fmt.cls] = fmt
    return fmt


def names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get(name: str, fn: str = "formats.get") -> Format:
    fmt = _REGISTRY.get(name)
    if fmt is None:
        raise FormatError(f"{fn}: unknown format {name!r}; expected one of {names()}")
    return fmt


def format_of(weight) -> Format | None:
    """The layout of a weight object (None when it is none of the registered ones)."""
    fmt = _BY_CLASS.get(type(weight))
    if fmt is None:
        # Subclasses (nn.Parameter for dense) resolve through isinstance, once per class.
        fmt = next((f for c, f in _BY_CLASS.items() if isinstance(weight, c)), None)
        if fmt is not None:
            _BY_CLASS[type(weight)] = fmt
    return fmt


def layer_stats(weight) -> dict:
    """{"format", "block", "stored", "bytes"} of a weight: what the artifact's layer table records."""
    fmt = format_of(weight)
    block = fmt.blocksize(weight)
    return {"format": fmt.name, "block": None if block is None else list(block),
            "stored": fmt.stored_values(weight), "bytes": fmt.nbytes(weight)}


# ---- csr / bsr: the compressed-row layouts


def _compressed_from_buffers(cls):
    def build(buffers, shape, trusted: bool):
        return cls.trusted(*buffers, tuple(shape)) if trusted else cls(*buffers, shape)
    return build


def _compressed_buffers(w):
    return (w.crow_indices, w.col_indices, w.values)


_COMPRESSED = ("weight_crow_indices", "weight_col_indices", "weight_values")
# The torch backend of a sparse layout: densify, then torch's GEMM (the fallback that always works).
_DENSIFIED = "engine.reference:densified_linear"


def _csr_traffic(shape, stored, block, value_bytes):
    # The C++ kernels read uint16 column indices when I <= 65536 (a copy prepared once), else int32.
    o, i = shape
    return stored * (value_bytes + (2 if i <= 65536 else 4)) + (o + 1) * 4


def blocked_stored(keep: torch.Tensor, block: tuple[int, int]) -> int:
    """Values stored when the R×C tiles of `keep` (O, I) that hold a kept entry are stored whole
    (R divides O, C divides I)."""
    o, i = keep.shape
    r, c = block
    return int(keep.reshape(o // r, r, i // c, c).any(dim=(1, 3)).sum()) * r * c


def _bsr_traffic(shape, stored, block, value_bytes):
    r, c = block
    return stored * value_bytes + (stored // max(1, r * c)) * 4 + (shape[0] // r + 1) * 4


register(Format(
    name="csr", cls=CSR, buffers=_COMPRESSED,
    build=lambda w, mask, block: CSR.from_dense(w, mask),
    from_buffers=_compressed_from_buffers(CSR), to_buffers=_compressed_buffers,
    stored=lambda keep, block: int(keep.sum()), traffic_bytes=_csr_traffic,
    kernels={"cpu": "engine.cpu:csr_linear_cpu", "triton": "engine.gpu:csr_linear_triton",
             "torch": _DENSIFIED},
    reference="engine.reference:csr_linear_ref"))

register(Format(
    name="bsr", cls=BSR, buffers=_COMPRESSED,
    build=lambda w, mask, block: BSR.from_dense(w, mask, block),
    from_buffers=_compressed_from_buffers(BSR), to_buffers=_compressed_buffers,
    stored=blocked_stored, traffic_bytes=_bsr_traffic,
    kernels={"cpu": "engine.cpu:bsr_linear_cpu", "triton": "engine.gpu:bsr_linear_triton",
             "torch": _DENSIFIED},
    reference="engine.reference:bsr_linear_ref", blocked=True))


# ---- dense: torch's own GEMM on every backend (nothing of ours beats MKL / cuBLAS on a dense W)

def _dense_from_buffers(buffers, shape, trusted: bool):
    (w,) = buffers
    if not trusted:
        if tuple(w.shape) != tuple(shape):
            _fail("dense", f"weight has shape {tuple(w.shape)}, expected {tuple(shape)}")
        if w.dtype not in VALUE_DTYPES:
            _fail("dense", f"weight dtype must be float32/bfloat16/float16, got {w.dtype}")
    return w


_TORCH_GEMM = "engine.reference:linear_ref"
register(Format(
    name="dense", cls=torch.Tensor, buffers=("weight",),
    build=lambda w, mask, block: w if mask is None else w * (mask.to(w.device) != 0),
    from_buffers=_dense_from_buffers, to_buffers=lambda w: (w,),
    stored=lambda keep, block: keep.numel(),
    traffic_bytes=lambda shape, stored, block, vb: shape[0] * shape[1] * vb,
    kernels={"cpu": _TORCH_GEMM, "triton": _TORCH_GEMM, "torch": _TORCH_GEMM}))
