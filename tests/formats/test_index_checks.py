"""The compressed-row index checks run in chunks (bounded memory at load): a fault on either side
of a chunk boundary, and a row start exactly on one, are judged as in one pass."""
from __future__ import annotations

import pytest
import torch

from engine import formats
from engine.formats import CSR, FormatError


@pytest.fixture()
def small_chunks(monkeypatch):
    monkeypatch.setattr(formats, "_CHECK_CHUNK", 4)


def _csr(rows: list[list[int]], n_cols=16):
    crow = torch.tensor([0] + torch.tensor([len(r) for r in rows]).cumsum(0).tolist(), dtype=torch.int32)
    col = torch.tensor([c for r in rows for c in r], dtype=torch.int32)
    return crow, col, torch.randn(col.numel()), (len(rows), n_cols)


@pytest.mark.parametrize("rows", [
    # Chunks of 4 compare positions 1-4, 5-8, 9-12, ... with their predecessors.
    [[0, 1, 2, 3, 4], [0, 1, 2, 3], [5]],     # row starts at positions 5 and 9: first of a chunk
    [[0, 1, 2], [1, 2, 3, 4, 5], [0, 15]],     # row starts inside chunks
    [[], [3], [], [0, 1, 2, 3, 4, 5, 6, 7, 8], []],
])
def test_valid_indices_pass_in_chunks(small_chunks, rows):
    CSR(*_csr(rows))


@pytest.mark.parametrize("rows, pos", [
    ([[0, 1, 2, 3, 4, 4]], 5),              # repeat exactly at a chunk boundary
    ([[0, 1, 2, 3, 5, 4]], 5),              # decrease at the boundary
    ([[0, 1, 2], [0, 1, 2, 3, 5, 4]], 8),   # last of a chunk, in a later row
])
def test_disorder_found_at_and_across_chunk_boundaries(small_chunks, rows, pos):
    with pytest.raises(FormatError, match=f"strictly increasing within a row \\(position {pos}:"):
        CSR(*_csr(rows))
