"""Sparse weight layouts: CSR (unstructured) and BSR (block), both for a 2-D weight W[O, I].

Indices are int32 (every kernel reads int32); values keep the weight's dtype (fp32, bf16, fp16).
`from_dense` takes an optional mask: what the mask keeps is stored even when its value is zero, so a
pruned layer's structure survives fine-tuning that drove a kept weight to exactly 0.
"""
from __future__ import annotations

from dataclasses import dataclass

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


def _check_index_arrays(fn, crow, col, n_rows, n_cols, n_stored):
    """Shared checks of a compressed-row index: pointers and sorted, in-range column indices."""
    for name, t in (("crow_indices", crow), ("col_indices", col)):
        if t.dtype != torch.int32 or t.dim() != 1:
            _fail(fn, f"{name} must be a 1-D int32 tensor, got dtype {t.dtype} and {t.dim()} dims")
    if crow.numel() != n_rows + 1:
        _fail(fn, f"crow_indices has length {crow.numel()}, expected rows + 1 = {n_rows + 1}")
    c = crow.cpu().long()
    if c[0] != 0 or c[-1] != n_stored or col.numel() != n_stored:
        _fail(fn, f"crow_indices must start at 0 and end at the stored count {n_stored} "
                  f"(got {int(c[0])}..{int(c[-1])}, {col.numel()} column indices)")
    if (c[1:] < c[:-1]).any():
        _fail(fn, "crow_indices must be non-decreasing")
    k = col.cpu().long()
    if n_stored and (k.min() < 0 or k.max() >= n_cols):
        _fail(fn, f"col_indices out of range [0, {n_cols}): min {int(k.min())}, max {int(k.max())}")
    # Within a row the indices must strictly increase: check every adjacent pair that is not a row start.
    if n_stored > 1:
        starts = torch.zeros(n_stored, dtype=torch.bool)
        starts[c[:-1][c[:-1] < n_stored]] = True
        bad = (k[1:] <= k[:-1]) & ~starts[1:]
        if bad.any():
            i = int(bad.nonzero()[0]) + 1
            _fail(fn, f"col_indices must be strictly increasing within a row (position {i}: "
                      f"{int(k[i - 1])} then {int(k[i])})")


@dataclass
class CSR:
    """Compressed sparse rows of W[O, I].

    crow_indices: (O + 1,) int32, row r's entries are [crow[r], crow[r+1])
    col_indices:  (nnz,) int32, input-feature index of each entry, increasing within a row
    values:       (nnz,) fp32 | bf16 | fp16
    """

    crow_indices: torch.Tensor
    col_indices: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, int]

    def __post_init__(self):
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        self.validate()

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

    @classmethod
    def trusted(cls, crow_indices, col_indices, values, shape) -> "CSR":
        """Wraps buffers that were validated before (e.g. a module's own), skipping the checks."""
        self = object.__new__(cls)
        self.crow_indices, self.col_indices, self.values, self.shape = crow_indices, col_indices, values, shape
        return self

    @property
    def nnz(self) -> int:
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

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        o, i = self.shape
        out = torch.zeros(o, i, dtype=dtype or self.dtype, device=self.device)
        rows = torch.repeat_interleave(torch.arange(o, device=self.device),
                                       (self.crow_indices[1:] - self.crow_indices[:-1]).long())
        out[rows, self.col_indices.long()] = self.values.to(out.dtype)
        return out

    def to(self, device=None, dtype: torch.dtype | None = None) -> "CSR":
        return CSR(self.crow_indices.to(device), self.col_indices.to(device),
                   self.values.to(device=device, dtype=dtype or self.dtype), self.shape)


@dataclass
class BSR:
    """Block sparse rows of W[O, I] with blocks of R×C (R divides O, C divides I).

    crow_indices: (O/R + 1,) int32, block row b's blocks are [crow[b], crow[b+1])
    col_indices:  (nnzb,) int32, block-column index of each block, increasing within a block row
    values:       (nnzb, R, C) fp32 | bf16 | fp16, each block row-major
    """

    crow_indices: torch.Tensor
    col_indices: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, int]

    def __post_init__(self):
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        self.validate()

    @property
    def blocksize(self) -> tuple[int, int]:
        return (int(self.values.shape[1]), int(self.values.shape[2]))

    @staticmethod
    def check_blocksize(shape, blocksize, fn: str = "BSR") -> tuple[int, int]:
        if isinstance(blocksize, int):
            blocksize = (blocksize, blocksize)
        try:
            r, c = (int(b) for b in blocksize)
        except (TypeError, ValueError):
            _fail(fn, f"blocksize must be an int or a pair (R, C), got {blocksize!r}")
        if r <= 0 or c <= 0:
            _fail(fn, f"blocksize must be positive, got {(r, c)}")
        o, i = shape
        if o % r or i % c:
            _fail(fn, f"blocksize {(r, c)} does not divide weight shape {tuple(shape)}")
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

    @property
    def nnz(self) -> int:
        """Stored values, explicit zeros inside kept blocks included."""
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

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        o, i = self.shape
        r, c = self.blocksize
        tiles = torch.zeros(o // r, i // c, r, c, dtype=dtype or self.dtype, device=self.device)
        brows = torch.repeat_interleave(torch.arange(o // r, device=self.device),
                                        (self.crow_indices[1:] - self.crow_indices[:-1]).long())
        tiles[brows, self.col_indices.long()] = self.values.to(tiles.dtype)
        return tiles.transpose(1, 2).reshape(o, i)

    def to(self, device=None, dtype: torch.dtype | None = None) -> "BSR":
        return BSR(self.crow_indices.to(device), self.col_indices.to(device),
                   self.values.to(device=device, dtype=dtype or self.dtype), self.shape)


SparseWeight = CSR | BSR
