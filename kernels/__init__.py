"""Triton GPU kernels for sparse linear layers. One kernel and its launcher per file.

A leaf, like csrc/: the launchers take plain tensors (crow indices, col indices, values, shape,
bias, activation name) and import nothing from `engine`; engine/gpu.py adapts engine's CSR/BSR
formats to them.

Importing this package never fails: without Triton, `available()` is False and the launchers are
absent; `engine.sparse_linear` then falls back (auto) or raises (backend="triton")."""
from __future__ import annotations

try:
    import triton  # noqa: F401
    _IMPORT_ERROR = None
except ImportError as e:
    _IMPORT_ERROR = str(e)


def available() -> bool:
    return _IMPORT_ERROR is None


def import_error() -> str | None:
    return _IMPORT_ERROR


if available():
    from .bsr_linear import bsr_linear_triton  # noqa: E402,F401
    from .csr_linear import csr_linear_triton  # noqa: E402,F401
