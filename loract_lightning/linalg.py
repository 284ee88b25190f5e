"""Low-rank factorizations of a 2-D activation: ``A ~ L @ R``.

Every function takes ``A`` (M x N, any floating dtype, CPU or CUDA) and a rank ``k`` and returns
``(L, R)`` with ``L`` of shape (M, k) and ``R`` of shape (k, N), both in ``A.dtype`` or in the
``dtype`` asked for (bfloat16 factors of a float32 activation take half the memory).
Orthogonalization (QR, eigendecomposition, SVD) always runs in float32, because half-precision
QR is either unsupported or too inaccurate to give an orthonormal basis. On the CPU the QR is
shifted Cholesky QR, with Householder QR as its fallback (see :func:`_orthonormal_basis`).

- :func:`sampled_qb` is the paper's algorithm: the sketch is ``A^T A[:, S]`` for k random
  columns S, i.e. k columns of the Gram matrix. No Gaussian draw, no SVD, ~4*M*N*k flops.
- :func:`randomized_svd` is Halko et al.'s randomized SVD with a Gaussian test matrix.
- :func:`truncated_svd` is the exact (optimal) rank-k approximation, the yardstick.
- :func:`adaptive_qb` grows a sampled-QB basis until a relative error target is met: the rank
  is chosen per matrix (``rank="auto"``).

Randomness comes only from the ``generator`` argument, so callers can keep the global RNG
stream (and with it dropout masks) untouched.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from loract_lightning.checks import check_fraction, check_int

Factorization = Callable[..., tuple[Tensor, Tensor]]


def _check_input(matrix: Tensor, rank: int) -> None:
    if matrix.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(matrix.shape)}")
    if not matrix.is_floating_point():
        raise TypeError(f"expected a floating-point matrix, got dtype {matrix.dtype}")
    check_int("rank", rank, minimum=1)


def _gram_columns(matrix: Tensor, columns: Tensor) -> Tensor:
    """Columns ``columns`` of the Gram matrix, ``A^T A[:, columns]`` (N x len(columns)).

    The columns are gathered in increasing order with ``index_select``: on the CPU that is 10-20x
    faster than ``A[:, columns]`` (measured on 2048 x 1536, 192 columns: 0.15 vs 2.2 ms), and the
    order of the columns does not change the space they span. A column-major ``A`` (the
    transpose of a wide activation, such as logits) is gathered as rows of its row-major
    transpose: a column gather across its strides was ~130x slower (1024 x 32000 logits,
    128 columns: 114 vs 0.9 ms).
    """
    columns = columns.sort().values
    if matrix.stride(0) == 1 and matrix.stride(1) != 1:
        sampled = matrix.T.index_select(0, columns).T
    else:
        sampled = matrix.index_select(1, columns)
    return _transposed_product(matrix, sampled)


FLOAT32_BLOCK_NUMEL = 1 << 22
"""Elements of each float32 row block of a float16 matrix in :func:`_transposed_product` (16 MiB)."""


def _transposed_product(matrix: Tensor, other: Tensor) -> Tensor:
    """``A^T @ B``, summed over the rows of ``A`` and ``B``; float32 when ``A`` is float16.

    A float16 product overflows (65504) once rows x RMS^2 pass it: 4096 x 64 rows of RMS 4
    already do. float16 input is therefore summed in float32, a block of rows at a time so the
    float32 copy stays small. bfloat16 has float32's range and keeps its own dtype.
    """
    if matrix.dtype != torch.float16:
        return matrix.T @ other
    step = max(1, FLOAT32_BLOCK_NUMEL // max(1, matrix.shape[1]))
    product = matrix.new_zeros(matrix.shape[1], other.shape[1], dtype=torch.float32)
    for start in range(0, matrix.shape[0], step):
        product.addmm_(matrix[start : start + step].float().T, other[start : start + step].float())
    return product


CHOLESKY_QR_MIN_NUMEL = 1 << 16
"""Smallest sketch (N * k elements) for which the CPU uses Cholesky QR. Measured on 2 cores,
Householder vs Cholesky: 512 x 64 0.27 vs 0.40 ms, 768 x 96 0.89 vs 0.67 ms, 1536 x 192 17.0 vs
3.2 ms."""


def _orthonormal_basis(sketch: Tensor) -> Tensor:
    """Orthonormal columns spanning ``sketch`` (N x k), computed in float32.

    On the CPU, shifted Cholesky QR is tried first: MKL's Householder QR is slow on tall-skinny
    matrices of some shapes (1536 x 192, MiniLM's MLP width at rank 1/8: 13.5 ms against 1.9 ms),
    while Cholesky QR is a few Gram products, k x k Cholesky factorizations and triangular
    solves. Householder QR remains for small sketches and as the fallback for sketches too
    ill-conditioned for Cholesky QR (rank-deficient A). On CUDA the fallback test would read a
    flag on the host and stall the side stream, so Householder QR (cuSOLVER) is used directly.
    """
    sketch = sketch.float()
    if sketch.device.type == "cpu" and sketch.numel() >= CHOLESKY_QR_MIN_NUMEL:
        basis = _shifted_cholesky_qr(sketch)
        if basis is not None:
            return basis
    return _householder_qr(sketch)


def _householder_qr(sketch: Tensor) -> Tensor:
    """The Q of Householder QR (LAPACK / cuSOLVER) of ``sketch``, in float32."""
    return torch.linalg.qr(sketch.float(), mode="reduced").Q


def _shifted_cholesky_qr(sketch: Tensor) -> Tensor | None:
    """The Q of shifted Cholesky QR3 (Fukaya et al., SIAM J. Sci. Comput. 2020), or None if it fails.

    Cholesky QR computes ``Q = Y R^-1`` with ``R^T R = Y^T Y``; its loss of orthogonality grows
    with cond(Y)^2. The first pass adds a shift to the Gram matrix so that its Cholesky factor
    exists even when cond(Y)^2 exceeds 1/u (u: float32 unit roundoff); two plain passes then make
    the basis orthonormal. The shift uses the Frobenius norm, an upper bound of the paper's
    spectral norm. In float32 this succeeds up to cond(Y) ~ 3e3 (tests); without the shift,
    3-19 of the 64-134 sketches of one Llama, MiniLM or ViT forward fell back, with it 0-2.
    None when a Cholesky factorization fails or the result is not orthonormal to within 1e-4.
    """
    rows, cols = sketch.shape
    unit_roundoff = torch.finfo(torch.float32).eps / 2
    basis = sketch
    for step in range(3):
        gram = basis.T @ basis
        if step == 0:
            # The trace of Y^T Y is ||Y||_F^2: no extra pass over the sketch.
            gram.diagonal().add_(11 * (rows * cols + cols * (cols + 1)) * unit_roundoff * gram.trace())
        factor, info = torch.linalg.cholesky_ex(gram, upper=True)
        if info.item() != 0:
            return None
        basis = torch.linalg.solve_triangular(factor, basis, upper=True, left=False)
    # Accepted bases measured ~1e-6 from orthonormal; a failed one is far off.
    if float((basis.T @ basis - torch.eye(cols, device=basis.device)).abs().max()) > 1e-4:
        return None
    return basis


def _shrink_basis(matrix: Tensor, basis: Tensor, rank: int) -> Tensor:
    """Best rank-``rank`` sub-basis of ``basis`` (N x p, p > rank) for projecting ``matrix``'s rows.

    The top eigenvectors of the small p x p Gram matrix of ``matrix @ basis`` pick the directions
    that carry most of the energy; this is what oversampling buys.
    """
    projected = (matrix @ basis.to(matrix.dtype)).float()
    _, eigenvectors = torch.linalg.eigh(projected.T @ projected)
    top = eigenvectors[:, -rank:].flip(-1)
    return basis @ top


def sampled_qb(
    matrix: Tensor,
    rank: int,
    *,
    oversample: int = 0,
    power_iters: int = 0,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """The paper's sampling-based QB decomposition: ``A ~ (A Q) Q^T``.

    Args:
        matrix: the 2-D matrix ``A`` (M x N) to factorize.
        rank: number of columns ``k`` of the basis; clamped to ``min(M, N)``. A wide matrix
            (M < N) is factorized through its transpose, so the basis lies on the short side.
        oversample: extra sampled columns; the basis is then shrunk back to ``rank``.
        power_iters: extra passes ``Y <- A^T (A Q)`` that sharpen the basis on flat spectra.
        generator: source of the random column choice (defaults to the global generator).
        dtype: dtype of the factors (default ``matrix.dtype``). The basis is always found from
            ``matrix`` as given; only the projection ``A Q`` runs in ``dtype``.

    Returns:
        ``(L, R)`` with ``L = A Q`` (M x k) and ``R = Q^T`` (k x N), in ``dtype``.
    """
    _check_input(matrix, rank)
    if matrix.shape[0] < matrix.shape[1]:
        # Wide matrix (logits over a vocabulary): sketch its row space instead, so the QR runs on
        # the short side. A^T ~ L R  gives  A ~ R^T L^T.
        options = {"oversample": oversample, "power_iters": power_iters, "generator": generator, "dtype": dtype}
        left, right = sampled_qb(matrix.T, rank, **options)
        return right.T.contiguous(), left.T.contiguous()
    num_cols = matrix.shape[1]
    rank = min(rank, *matrix.shape)
    sample_size = min(rank + oversample, num_cols)
    columns = torch.randperm(num_cols, generator=generator, device=generator.device if generator else "cpu")
    columns = columns[:sample_size].to(matrix.device)
    basis = _orthonormal_basis(_gram_columns(matrix, columns))
    for _ in range(power_iters):
        basis = _orthonormal_basis(_transposed_product(matrix, matrix @ basis.to(matrix.dtype)))
    if basis.shape[1] > rank:
        basis = _shrink_basis(matrix, basis, rank)
    # The basis (from the sketch in the matrix's own precision) decides the error; rounding the
    # projection to bfloat16 adds only ~2^-9 relative to each factor.
    dtype = dtype or matrix.dtype
    basis = basis.to(dtype)
    return matrix.to(dtype) @ basis, basis.T.contiguous()


def adaptive_qb(
    matrix: Tensor,
    max_error: float,
    *,
    min_rank: int = 1,
    max_rank: int | None = None,
    block: int = 16,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Sampled QB with the rank chosen so that ``||A - L R|| <= max_error * ||A||``.

    The basis grows by sampled Gram columns, doubling each round (``block``, then as many
    columns as it already has), each new part orthogonalized against the basis so far. The
    error is known without rebuilding A: ``||A||^2 - ||A Q||^2``. Once it is met (or ``max_rank``
    is reached), the basis is rotated onto the principal directions of ``A Q`` (a k x k
    eigendecomposition) and cut to the smallest rank >= ``min_rank`` that meets the target, so
    the doubling does not overshoot. Costs a few host syncs (one per round).

    Returns:
        ``(L, R)`` as :func:`sampled_qb`, with k chosen between ``min_rank`` and ``max_rank``
        (default ``min(M, N)``); at ``max_rank`` the target may be missed. In ``dtype``
        (default ``matrix.dtype``); the error check runs in float32 whatever ``dtype`` is.
    """
    check_fraction("max_error", max_error)
    _check_input(matrix, min_rank)
    if matrix.shape[0] < matrix.shape[1]:
        left, right = adaptive_qb(
            matrix.T, max_error, min_rank=min_rank, max_rank=max_rank, block=block, generator=generator, dtype=dtype
        )
        return right.T.contiguous(), left.T.contiguous()
    num_cols = matrix.shape[1]
    limit = min(max_rank or num_cols, num_cols)
    min_rank = min(min_rank, limit)
    order = torch.randperm(num_cols, generator=generator, device=generator.device if generator else "cpu")
    order = order.to(matrix.device)
    energy = float(matrix.float().square().sum())
    target = max_error**2 * energy
    basis = matrix.new_zeros(num_cols, 0, dtype=torch.float32)
    projected = matrix.new_zeros(matrix.shape[0], 0, dtype=torch.float32)  # A @ basis
    size = max(block, min_rank)
    while True:
        taken = basis.shape[1]
        columns = order[taken : taken + min(size, limit - taken)]
        new = _orthonormal_basis(_gram_columns(matrix, columns))
        # Twice: the new directions must be orthogonal to the basis, also those QR made up for a
        # sketch that the basis already spans (rank-deficient A).
        for _ in range(2):
            new = _orthonormal_basis(new - basis @ (basis.T @ new))
        basis = torch.cat([basis, new], dim=1)
        projected = torch.cat([projected, (matrix @ new.to(matrix.dtype)).float()], dim=1)
        if energy - float(projected.square().sum()) <= target or basis.shape[1] >= limit:
            break
        size = basis.shape[1]
    eigenvalues, eigenvectors = torch.linalg.eigh(projected.T @ projected)
    eigenvalues, eigenvectors = eigenvalues.flip(0).clamp(min=0), eigenvectors.flip(1)
    missed = energy - torch.cumsum(eigenvalues.double(), 0)
    rank = int((missed > target).sum()) + 1  # missed is decreasing: the first rank that meets it
    rank = max(min_rank, min(rank, basis.shape[1]))
    rotation = eigenvectors[:, :rank]
    dtype = dtype or matrix.dtype
    left = (projected @ rotation).to(dtype)
    right = (basis @ rotation).T.to(dtype).contiguous()
    return left, right


def randomized_svd(
    matrix: Tensor,
    rank: int,
    *,
    oversample: int = 10,
    power_iters: int = 2,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Randomized SVD with a Gaussian test matrix (Halko, Martinsson and Tropp, 2011).

    Args:
        matrix: the 2-D matrix ``A`` (M x N) to factorize.
        rank: target rank ``k``; clamped to ``min(M, N)``.
        oversample: extra Gaussian columns ``p`` in the test matrix.
        power_iters: subspace iterations, each re-orthonormalized in float32.
        generator: source of the Gaussian test matrix (defaults to the global generator).
        dtype: dtype of the factors (default ``matrix.dtype``).

    Returns:
        ``(L, R)`` with ``L = U_k S_k`` (M x k) and ``R = V_k^T`` (k x N), in ``dtype``.
    """
    _check_input(matrix, rank)
    rows, cols = matrix.shape
    rank = min(rank, rows, cols)
    sketch_size = min(rank + oversample, rows, cols)
    test_matrix = torch.randn(cols, sketch_size, generator=generator, device=generator.device if generator else "cpu")
    work = matrix.float()
    basis = _orthonormal_basis(work @ test_matrix.to(matrix.device))
    for _ in range(power_iters):
        basis = _orthonormal_basis(work @ _orthonormal_basis(work.T @ basis))
    small = basis.T @ work
    left, singular, right = torch.linalg.svd(small, full_matrices=False)
    left_factor = basis @ (left[:, :rank] * singular[:rank])
    dtype = dtype or matrix.dtype
    return left_factor.to(dtype), right[:rank].to(dtype)


def truncated_svd(matrix: Tensor, rank: int, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Exact rank-``k`` truncation of the SVD: the optimal approximation (Eckart-Young).

    Args:
        matrix: the 2-D matrix ``A`` (M x N) to factorize.
        rank: target rank ``k``; clamped to ``min(M, N)``.
        dtype: dtype of the factors (default ``matrix.dtype``).

    Returns:
        ``(L, R)`` with ``L = U_k S_k`` (M x k) and ``R = V_k^T`` (k x N), in ``dtype``.
    """
    _check_input(matrix, rank)
    rank = min(rank, *matrix.shape)
    left, singular, right = torch.linalg.svd(matrix.float(), full_matrices=False)
    dtype = dtype or matrix.dtype
    return (left[:, :rank] * singular[:rank]).to(dtype), right[:rank].to(dtype)


def relative_error(matrix: Tensor, left: Tensor, right: Tensor | None = None) -> float:
    """Relative Frobenius error ``||A - L R|| / ||A||`` (0.0 for a zero matrix); with ``right``
    None, ``left`` is the approximation itself."""
    norm = float(torch.linalg.matrix_norm(matrix.float()))
    if norm == 0:
        return 0.0
    return distance(matrix, left if right is None else left.float() @ right.float()) / norm


def distance(matrix: Tensor, approximation: Tensor) -> float:
    """Frobenius norm of ``matrix - approximation``, in float32."""
    return float(torch.linalg.matrix_norm(matrix.float() - approximation.float()))


def keep_row_norms(matrix: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """``L`` with each row scaled so that row m of ``L R`` has the norm of row m of ``A``.

    A projection onto k directions shrinks every row (token) of A. Layers that normalise each
    token (LayerNorm, RMSNorm) then divide by a too-small norm, and in layer mode, where blocks are
    recomputed from the rebuilt input, the gradient error grows block after block (measured on
    pretrained MiniLM: relative gradient error 2.5 at rank 1/8 with the plain projection, 0.55
    with row norms kept). Rescaling L costs no memory. Rows that come out as zero stay zero.
    """
    gram = right.float() @ right.float().T  # k x k: ||L_m R||^2 = L_m G L_m^T
    rebuilt = ((left.float() @ gram) * left.float()).sum(dim=1, keepdim=True).clamp(min=0).sqrt()
    return (left.float() * row_norm_scale(matrix, rebuilt)).to(left.dtype)


def row_norm_scale(matrix: Tensor, rebuilt_norms: Tensor) -> Tensor:
    """Per row of ``matrix`` (M x N): its norm over ``rebuilt_norms`` (M x 1), as float32; 1 where
    the rebuilt row is zero."""
    target = matrix.float().norm(dim=1, keepdim=True)
    rebuilt_norms = rebuilt_norms.float()
    return torch.where(rebuilt_norms > 0, target / rebuilt_norms.clamp(min=torch.finfo(torch.float32).tiny), 1.0)


METHODS: dict[str, Factorization] = {
    "sampled_qb": sampled_qb,
    "randomized_svd": randomized_svd,
    "truncated_svd": truncated_svd,
}
"""The factorizations that ``method=`` accepts, by name."""

RANDOMIZED = frozenset({"sampled_qb", "randomized_svd"})
"""Methods that take a ``generator`` argument."""
