import pytest
import torch

from engine.formats import BSR, CSR, FormatError
from tests.fixtures import random_sparse


@pytest.mark.parametrize("shape", [(7, 96), (1, 1), (0, 5), (5, 0), (33, 17)])
@pytest.mark.parametrize("sparsity", [0.0, 0.5, 0.99, 1.0])
def test_csr_round_trip(shape, sparsity):
    w = random_sparse(*shape, sparsity)
    csr = CSR.from_dense(w)
    assert csr.nnz == int((w != 0).sum())
    assert torch.equal(csr.to_dense(), w)
    assert csr.nbytes == 4 * (shape[0] + 1) + 8 * csr.nnz


@pytest.mark.parametrize("block", [(1, 8), (4, 1), (2, 3), (16, 16), (32, 32), (8, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bsr_round_trip(block, dtype):
    r, c = block
    w = random_sparse(4 * r, 3 * c, 0.6, dtype, block)
    bsr = BSR.from_dense(w, blocksize=block)
    assert bsr.blocksize == block and bsr.dtype == dtype
    assert bsr.nnzb == int((w.reshape(4, r, 3, c) != 0).any(dim=(1, 3)).sum())
    assert torch.equal(bsr.to_dense(), w)


def test_mask_keeps_zero_valued_entries_and_blocks():
    w = torch.randn(8, 8)
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[:4, :4] = True
    w[:4, :4] = 0  # fine-tuning drove a kept block to exactly zero: it must stay stored
    w[0, 0] = 0
    mask[5, 6] = True
    w[5, 6] = 0
    bsr = BSR.from_dense(w, mask, blocksize=4)
    assert bsr.nnzb == 2  # block (0,0) and block (1,1)
    csr = CSR.from_dense(w, mask)
    assert csr.nnz == 17
    # Weights outside the mask are not stored, whatever their value.
    assert torch.equal(csr.to_dense(), torch.zeros(8, 8))


def test_bsr_from_dense_zeroes_unmasked_values_inside_kept_block():
    w = torch.randn(4, 4)
    mask = torch.zeros(4, 4)
    mask[0, 0] = 1
    bsr = BSR.from_dense(w, mask, blocksize=2)
    expected = torch.zeros(4, 4)
    expected[0, 0] = w[0, 0]
    assert torch.equal(bsr.to_dense(), expected)


def test_nbytes_shrinks_with_sparsity_and_16bit():
    w = random_sparse(256, 256, 0.9, block=(16, 16))
    dense_bytes = w.numel() * 4
    b32 = BSR.from_dense(w, blocksize=16)
    b16 = BSR.from_dense(w.to(torch.bfloat16), blocksize=16)
    assert b32.nbytes < 0.15 * dense_bytes
    assert b16.nbytes < 0.55 * b32.nbytes


@pytest.mark.parametrize("make, match", [
    (lambda: CSR(torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0], dtype=torch.int32),
                 torch.ones(1), (2, 3)), "crow_indices has length 2, expected rows \\+ 1 = 3"),
    (lambda: CSR(torch.tensor([0, 1], dtype=torch.int32), torch.tensor([3], dtype=torch.int32),
                 torch.ones(1), (1, 3)), "out of range"),
    (lambda: CSR(torch.tensor([0, 2], dtype=torch.int32), torch.tensor([2, 1], dtype=torch.int32),
                 torch.ones(2), (1, 3)), "strictly increasing"),
    (lambda: CSR(torch.tensor([0, 2, 1], dtype=torch.int32), torch.tensor([0, 1], dtype=torch.int32),
                 torch.ones(2), (2, 3)), "end at the stored count|non-decreasing"),
    (lambda: CSR(torch.tensor([0, 1], dtype=torch.int64), torch.tensor([0], dtype=torch.int32),
                 torch.ones(1), (1, 3)), "int32"),
    (lambda: CSR(torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0], dtype=torch.int32),
                 torch.ones(1, dtype=torch.float64), (1, 3)), "dtype"),
    (lambda: BSR.from_dense(torch.randn(6, 8), blocksize=4), "does not divide"),
    (lambda: BSR.from_dense(torch.randn(8, 8), blocksize=(0, 4)), "positive"),
    (lambda: BSR.from_dense(torch.randn(8, 8), blocksize="x"), "blocksize"),
    (lambda: CSR.from_dense(torch.randn(2, 3, 4)), "2-D"),
    (lambda: CSR.from_dense(torch.randn(4, 4).double()), "dtype"),
    (lambda: CSR.from_dense(torch.tensor([[1.0, float("nan")]])), "NaN"),
    (lambda: CSR.from_dense(torch.randn(4, 4), torch.ones(4, 5)), "mask shape"),
    (lambda: BSR(torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0], dtype=torch.int32),
                 torch.ones(1, 2, 2), (2, 4)).validate() or BSR(
                 torch.tensor([0, 1], dtype=torch.int32), torch.tensor([2], dtype=torch.int32),
                 torch.ones(1, 2, 2), (2, 4)), "out of range"),
])
def test_validation_errors_name_the_problem(make, match):
    with pytest.raises(FormatError, match=match):
        make()


def test_unsorted_columns_in_second_row_detected_but_row_boundaries_allowed():
    crow = torch.tensor([0, 2, 4], dtype=torch.int32)
    ok = CSR(crow, torch.tensor([1, 2, 0, 1], dtype=torch.int32), torch.ones(4), (2, 3))
    assert ok.nnz == 4  # 2 then 0 is a row boundary, not disorder
    with pytest.raises(FormatError, match="position 3"):
        CSR(crow, torch.tensor([1, 2, 1, 1], dtype=torch.int32), torch.ones(4), (2, 3))


def test_to_changes_dtype_keeps_indices():
    w = random_sparse(16, 16, 0.5)
    csr = CSR.from_dense(w).to(dtype=torch.bfloat16)
    assert csr.values.dtype == torch.bfloat16 and csr.col_indices.dtype == torch.int32
    torch.testing.assert_close(csr.to_dense(torch.float32), w.bfloat16().float())


from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=40, deadline=None)
@given(r=st.sampled_from([1, 2, 3, 4, 8]), c=st.sampled_from([1, 2, 5, 8]),
       nbr=st.integers(0, 6), nbc=st.integers(0, 6), sparsity=st.floats(0.0, 1.0),
       seed=st.integers(0, 2**31 - 1))
def test_fuzz_round_trip_and_oracle(r, c, nbr, nbc, sparsity, seed):
    torch.manual_seed(seed)
    w = random_sparse(nbr * r, nbc * c, sparsity, block=(r, c))
    mask = w != 0
    for fmt in (CSR.from_dense(w, mask), BSR.from_dense(w, mask, (r, c))):
        assert torch.equal(fmt.to_dense(), w)
        type(fmt)(fmt.crow_indices, fmt.col_indices, fmt.values, fmt.shape)  # re-validates cleanly
