"""Cholesky QR against Householder QR for the sketch's basis, on the CPU.

For every sketch ``Y = A^T A[:, S]`` one training forward factorizes (k = N/8, the engine's own
selection through ``ActivationCompressor.observers``), it reports how often shifted Cholesky QR
falls back to Householder QR, the largest change of the factorization's relative error where it
does not, and the summed time of both QRs. Then it times the training step with default mode at
1/8, the two QRs alternating step by step in one process (median of ``--steps``).

    python benchmarks/cholesky_qr.py [--models minilm llama vit] [--steps 10]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from models import MODELS
from training_step import run_step

from loract_lightning import ActivationCompressor, CompressionOptions, linalg
from loract_lightning.policy import resolve_rank

RANK = 0.125


def milliseconds(function, repeats: int = 3) -> float:
    function()
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    return (time.perf_counter() - start) / repeats * 1e3


def compare_bases(model, loss_fn) -> str:
    """Fallbacks, worst error ratio and QR time over the sketches of one forward."""
    compressor = ActivationCompressor(model, CompressionOptions(rank=RANK, saved_by=None))
    matrices: list[torch.Tensor] = []
    compressor.observers.append(lambda name, matrix, *factors: matrices.append(matrix.detach().clone()))
    with compressor.capture():
        loss_fn()
    generator = torch.Generator().manual_seed(0)
    fallbacks, worst, cholesky_ms, householder_ms = 0, 1.0, 0.0, 0.0
    for matrix in matrices:
        matrix = matrix.T if matrix.shape[0] < matrix.shape[1] else matrix  # as sampled_qb does
        rank = resolve_rank(RANK, *matrix.shape)
        columns = torch.randperm(matrix.shape[1], generator=generator)[:rank]
        sketch = linalg._gram_columns(matrix, columns).float()
        reference = linalg._householder_qr(sketch)
        basis = linalg._shifted_cholesky_qr(sketch)
        cholesky_ms += milliseconds(lambda s=sketch: linalg._orthonormal_basis(s))
        householder_ms += milliseconds(lambda s=sketch: linalg._householder_qr(s))
        if basis is None:
            fallbacks += 1
            continue
        error = linalg.relative_error(matrix, matrix @ basis, basis.T)
        reference_error = linalg.relative_error(matrix, matrix @ reference, reference.T)
        worst = max(worst, error / reference_error if reference_error else 1.0)
    return (
        f"{len(matrices)} sketches, {fallbacks} fell back, worst error ratio {worst:.5f}, "
        f"QR time {householder_ms:.1f} ms Householder -> {cholesky_ms:.1f} ms Cholesky (with fallbacks)"
    )


def alternating_steps(model, loss_fn, steps: int) -> dict[str, float]:
    """Median step ms with each QR, alternating so both see the same machine state."""
    compressor = ActivationCompressor(model, CompressionOptions(rank=RANK, saved_by=None))
    cholesky = linalg._shifted_cholesky_qr
    times: dict[str, list[float]] = {"cholesky": [], "householder": []}
    try:
        for step in range(steps + 2):  # two warm-up rounds
            for key, times_of_key in times.items():
                linalg._shifted_cholesky_qr = cholesky if key == "cholesky" else (lambda sketch: None)
                start = time.perf_counter()
                run_step(compressor.capture, loss_fn, model)
                if step >= 2:
                    times_of_key.append(time.perf_counter() - start)
    finally:
        linalg._shifted_cholesky_qr = cholesky
    return {key: statistics.median(values) * 1e3 for key, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["minilm", "llama", "vit"], choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    for model_name in args.models:
        name, model, loss_fn = MODELS[model_name]()
        print(f"{name}: {compare_bases(model, loss_fn)}", flush=True)
        step = alternating_steps(model, loss_fn, args.steps)
        change = step["cholesky"] / step["householder"] - 1
        print(
            f"{name}: step {step['householder']:.1f} ms Householder -> {step['cholesky']:.1f} ms Cholesky "
            f"({change:+.1%})",
            flush=True,
        )


if __name__ == "__main__":
    main()
