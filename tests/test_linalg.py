"""The factorizations: exact on low-rank input, near-optimal on decaying spectra, own RNG only."""

from __future__ import annotations

import re

import pytest
import torch

from loract_lightning.linalg import (
    METHODS,
    _orthonormal_basis,
    _shifted_cholesky_qr,
    adaptive_qb,
    randomized_svd,
    relative_error,
    sampled_qb,
    truncated_svd,
)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def low_rank_matrix(rows: int, cols: int, rank: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, rank, generator=generator) @ torch.randn(rank, cols, generator=generator)


def decaying_matrix(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """A matrix with singular values 0.9**i, like a real hidden state's slowly decaying spectrum."""
    generator = torch.Generator().manual_seed(seed)
    left, _ = torch.linalg.qr(torch.randn(rows, min(rows, cols), generator=generator))
    right, _ = torch.linalg.qr(torch.randn(cols, min(rows, cols), generator=generator))
    singular = 0.9 ** torch.arange(min(rows, cols), dtype=torch.float32)
    return (left * singular) @ right.T


def factorize(name: str, matrix: torch.Tensor, rank: int, **options):
    if name != "truncated_svd":
        options.setdefault("generator", torch.Generator(device=matrix.device).manual_seed(0))
    return METHODS[name](matrix, rank, **options)


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return request.param


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("shape", [(512, 96), (96, 512)], ids=["tall", "wide"])
def test_exact_on_matrices_of_lower_rank(method, shape, device):
    matrix = low_rank_matrix(*shape, rank=6).to(device)
    left, right = factorize(method, matrix, 12)
    assert left.shape == (shape[0], 12) and right.shape == (12, shape[1])
    # cuSOLVER's fp32 SVD is a little less exact than LAPACK's (2e-5 measured on an H100).
    assert relative_error(matrix, left, right) < (1e-5 if device == "cpu" else 1e-4)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_keeps_dtype(method, dtype, device):
    matrix = low_rank_matrix(256, 64, rank=4).to(device)
    left, right = factorize(method, matrix.to(dtype), 8)
    assert left.dtype == dtype and right.dtype == dtype
    assert relative_error(matrix, left, right) < 2e-2


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("shape", [(300, 96), (96, 300)], ids=["tall", "wide"])
def test_narrower_factor_dtype_adds_only_rounding_error(method, shape):
    matrix = decaying_matrix(*shape)
    full = relative_error(matrix, *factorize(method, matrix, 16))
    left, right = factorize(method, matrix, 16, dtype=torch.bfloat16)
    assert left.dtype == right.dtype == torch.bfloat16
    assert relative_error(matrix, left, right) == pytest.approx(full, abs=0.01)


def test_adaptive_rank_meets_its_target_with_bfloat16_factors():
    matrix = decaying_matrix(300, 96)
    left, right = adaptive_qb(matrix, 0.2, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(0))
    assert left.dtype == right.dtype == torch.bfloat16
    assert relative_error(matrix, left, right) <= 0.2 + 0.01


def test_truncated_svd_is_optimal():
    matrix = decaying_matrix(300, 80)
    singular = torch.linalg.svdvals(matrix)
    expected = (singular[10:].square().sum() / singular.square().sum()).sqrt()
    assert relative_error(matrix, *truncated_svd(matrix, 10)) == pytest.approx(float(expected), rel=1e-4)


@pytest.mark.parametrize("method", ["sampled_qb", "randomized_svd"])
def test_randomized_methods_are_near_optimal(method):
    matrix = decaying_matrix(400, 128)
    optimal = relative_error(matrix, *truncated_svd(matrix, 16))
    error = relative_error(matrix, *factorize(method, matrix, 16))
    assert optimal <= error < 1.5 * optimal


def test_power_iterations_and_oversampling_reduce_sampled_qb_error():
    matrix = decaying_matrix(400, 128)
    plain = relative_error(matrix, *factorize("sampled_qb", matrix, 16))
    sharpened = relative_error(matrix, *factorize("sampled_qb", matrix, 16, power_iters=2, oversample=8))
    assert sharpened < plain


@pytest.mark.parametrize("method", ["sampled_qb", "randomized_svd"])
def test_randomness_comes_only_from_the_given_generator(method):
    matrix = decaying_matrix(200, 64)
    global_state = torch.get_rng_state()
    first = factorize(method, matrix, 8)
    second = factorize(method, matrix, 8)
    assert torch.equal(torch.get_rng_state(), global_state)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("shape", [(200, 64), (64, 200)], ids=["tall", "wide"])
def test_sampled_qb_does_not_depend_on_the_memory_layout(shape):
    # A wide activation is factorized through its (column-major) transpose, whose columns are
    # gathered as rows: the same columns, so the same factors as from a row-major copy.
    matrix = decaying_matrix(*shape)
    column_major = matrix.T.contiguous().T
    expected = factorize("sampled_qb", matrix, 8)
    actual = factorize("sampled_qb", column_major, 8)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4)


def test_sampled_qb_returns_orthonormal_right_factor():
    _, right = sampled_qb(decaying_matrix(200, 64), 8, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(right @ right.T, torch.eye(8), atol=1e-5, rtol=0)


def conditioned_sketch(rows: int, cols: int, condition: float, rank: int | None = None) -> torch.Tensor:
    """A rows x cols matrix with singular values spread geometrically from 1 to 1/condition;
    with ``rank``, all but the first ``rank`` of them are zero."""
    generator = torch.Generator().manual_seed(0)
    left, _ = torch.linalg.qr(torch.randn(rows, cols, generator=generator, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(cols, cols, generator=generator, dtype=torch.float64))
    singular = torch.logspace(0, -torch.log10(torch.tensor(condition)).item(), cols, dtype=torch.float64)
    if rank is not None:
        singular[rank:] = 0
    return ((left * singular) @ right.T).float()


@pytest.mark.parametrize(
    ("condition", "rank", "cholesky_used"),
    [(1.0, None, True), (1e3, None, True), (1e6, None, False), (10.0, 10, False), (1.0, 0, False)],
)
def test_orthonormal_basis_spans_the_sketch_with_cholesky_or_its_fallback(condition, rank, cholesky_used):
    sketch = conditioned_sketch(1536, 192, condition, rank)
    assert (_shifted_cholesky_qr(sketch) is not None) == cholesky_used
    basis = _orthonormal_basis(sketch)
    assert basis.shape == sketch.shape
    torch.testing.assert_close(basis.T @ basis, torch.eye(192), atol=1e-5, rtol=0)
    leftover = torch.linalg.matrix_norm(sketch - basis @ (basis.T @ sketch))
    assert leftover <= 1e-5 * max(float(torch.linalg.matrix_norm(sketch)), 1.0)


@pytest.mark.parametrize(
    ("matrix", "rank", "error", "message"),
    [
        (torch.randn(4, 4, 4), 2, ValueError, "expected a 2-D matrix, got shape (4, 4, 4)"),
        (torch.ones(4, 4, dtype=torch.long), 2, TypeError, "expected a floating-point matrix, got dtype torch.int64"),
        (torch.randn(4, 4), 0, ValueError, "rank must be an int >= 1, got 0"),
        (torch.randn(4, 4), 1.5, ValueError, "rank must be an int >= 1, got 1.5"),
        (torch.randn(4, 4), True, ValueError, "rank must be an int >= 1, got True"),
    ],
    ids=["3-D", "integer", "rank-0", "float-rank", "bool-rank"],
)
def test_bad_input_is_rejected(matrix, rank, error, message):
    for function in (sampled_qb, randomized_svd, truncated_svd):
        # The whole message: a check that fired for another reason names something else.
        with pytest.raises(error, match=f"^{re.escape(message)}$"):
            function(matrix, rank)


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("shape", [(300, 96), (64, 300)], ids=["tall", "wide"])
def test_keep_row_norms_rebuilds_rows_with_their_norms(method, shape):
    from loract_lightning.linalg import keep_row_norms

    matrix = decaying_matrix(*shape) + 0.5
    left, right = factorize(method, matrix, 12)
    rescaled = keep_row_norms(matrix, left, right)
    torch.testing.assert_close((rescaled @ right).norm(dim=1), matrix.norm(dim=1), rtol=1e-4, atol=1e-6)


def test_keep_row_norms_leaves_exact_factors_exact():
    from loract_lightning.linalg import keep_row_norms

    matrix = low_rank_matrix(200, 64, rank=5)
    left, right = sampled_qb(matrix, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(keep_row_norms(matrix, left, right) @ right, matrix, rtol=1e-4, atol=1e-4)


def optimal_rank(matrix: torch.Tensor, max_error: float) -> int:
    """The smallest k whose best rank-k approximation has relative error <= max_error."""
    squares = torch.linalg.svdvals(matrix).double() ** 2
    missed = squares.sum() - torch.cumsum(squares, 0)
    return int((missed > max_error**2 * squares.sum()).sum()) + 1


@pytest.mark.parametrize("decay", [0.8, 0.9, 0.97])
@pytest.mark.parametrize("max_error", [0.1, 0.2, 0.3])
def test_adaptive_rank_meets_its_error_target_near_the_optimal_rank(decay, max_error, device):
    spectrum = decay ** torch.arange(128, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    left_basis = torch.linalg.qr(torch.randn(1024, 128, generator=generator)).Q
    right_basis = torch.linalg.qr(torch.randn(128, 128, generator=generator)).Q
    matrix = ((left_basis * spectrum) @ right_basis.T).to(device)
    left, right = adaptive_qb(matrix, max_error, generator=torch.Generator(device).manual_seed(0))
    assert relative_error(matrix, left, right) <= max_error * 1.001
    best = optimal_rank(matrix.cpu(), max_error)
    assert best <= left.shape[1] <= best + max(2, best // 8)


@pytest.mark.parametrize("shape", [(600, 200), (200, 600)], ids=["tall", "wide"])
def test_adaptive_rank_finds_the_rank_of_an_exactly_low_rank_matrix(shape):
    matrix = low_rank_matrix(*shape, rank=7)
    left, right = adaptive_qb(matrix, 0.01)
    assert left.shape == (shape[0], 7) and right.shape == (7, shape[1])
    assert relative_error(matrix, left, right) < 1e-5


def test_adaptive_rank_stays_within_its_bounds():
    matrix = decaying_matrix(400, 120)
    assert adaptive_qb(matrix, 0.9, min_rank=20)[0].shape[1] == 20
    left, right = adaptive_qb(matrix, 0.01, max_rank=10)
    assert left.shape[1] == 10 and relative_error(matrix, left, right) > 0.01


@pytest.mark.parametrize("max_error", [0.0, 1.0, -0.5])
def test_adaptive_rank_rejects_an_error_target_outside_0_1(max_error):
    with pytest.raises(ValueError, match=r"max_error must be a number in \(0, 1\)"):
        adaptive_qb(decaying_matrix(64, 32), max_error)
