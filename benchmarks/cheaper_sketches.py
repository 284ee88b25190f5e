"""Cheaper sketches than sampled QB, tried on real activations: kept only if the error stays within 10%.

Activations of pretrained MiniLM are captured for two different batches of drug reviews (the
engine's own selection, through ``ActivationCompressor.observers``). For each large activation of
the second batch, at k = N/8, it compares with plain sampled QB (time, relative error):

- *subspace reuse*: the basis ``Q`` computed on the first batch's activation of the same module
  is reused, so only ``L = A Q`` is computed (half the flops, no QR);
- *row sampling*: the Gram columns are estimated from a quarter (``row_sampled``) or half
  (``row_sampled_half``) of the rows (tokens), ``Y = A[R]^T A[R, S]``, then ``L = A Q`` as usual;
- *sampled columns as the basis*: ``Q = qr(A[:, S])`` spans the sampled columns themselves and
  the factors are ``Q, Q^T A`` (no Gram product: two thirds of the flops, rebuild included);
- *bfloat16 sketch*: sampled QB on the activation cast to bfloat16 (QR still in float32), the
  factors cast back; the time includes both casts;
- *bfloat16 factors* (``factor_dtype="bfloat16"``): the sketch in float32, only the projection
  ``A Q`` in bfloat16, factors kept in bfloat16 (half the memory).

Every sketch orthonormalizes with the engine's own QR (Cholesky QR on the CPU), so time ratios
compare the sketches, not QR implementations.

    python benchmarks/cheaper_sketches.py [--count 8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from models import minilm

from loract_lightning import ActivationCompressor, CompressionOptions
from loract_lightning.linalg import _orthonormal_basis, relative_error, sampled_qb

SKETCHES = ("reuse", "row_sampled", "row_sampled_half", "column_basis", "bfloat16_sketch", "bfloat16_factors")
"""The cheaper sketches compared with plain sampled QB."""


def capture(model, loss_fn) -> dict[str, torch.Tensor]:
    """The first activation each module saves for compression, by module name."""
    compressor = ActivationCompressor(
        model, CompressionOptions(rank=1, min_bytes=1 << 20, layers={"*.attention.self": None}, saved_by=None)
    )
    captured: dict[str, torch.Tensor] = {}
    compressor.observers.append(lambda name, matrix, *factors: captured.setdefault(name, matrix.detach().clone()))
    with compressor.capture():
        loss_fn()
    return captured


def reuse_basis(matrix: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return matrix @ basis, basis.T


def row_sampled_qb(
    matrix: torch.Tensor, rank: int, generator: torch.Generator, row_fraction: float
) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.randperm(matrix.shape[0], generator=generator)[: round(matrix.shape[0] * row_fraction)]
    columns = torch.randperm(matrix.shape[1], generator=generator)[:rank]
    sample = matrix[rows]
    basis = _orthonormal_basis(sample.T @ sample[:, columns]).to(matrix.dtype)
    return matrix @ basis, basis.T


def column_basis(matrix: torch.Tensor, rank: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    columns = torch.randperm(matrix.shape[1], generator=generator)[:rank]
    basis = _orthonormal_basis(matrix[:, columns]).to(matrix.dtype)
    return basis, basis.T @ matrix


def bfloat16_sketch_qb(
    matrix: torch.Tensor, rank: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    left, right = sampled_qb(matrix.bfloat16(), rank, generator=generator)
    return left.to(matrix.dtype), right.to(matrix.dtype)


def median_ms(function, repeats: int) -> tuple[float, tuple[torch.Tensor, torch.Tensor]]:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=8, help="largest activations to compare")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cheaper_sketches.json")
    args = parser.parse_args()
    # The same pretrained weights (and seed) twice, each bound to its own batch of reviews.
    _, first_model, first_batch = minilm(batch=16, seq=128)
    _, second_model, second_batch = minilm(batch=16, seq=128, offset=16)
    first, second = capture(first_model, first_batch), capture(second_model, second_batch)
    names = sorted(set(first) & set(second), key=lambda name: -second[name].numel())[: args.count]
    generator = torch.Generator().manual_seed(0)
    rows = []
    headers = " | ".join(f"{key} ms / err ratio" for key in SKETCHES)
    print(f"| module | M x N | k | sampled QB ms / err | {headers} |")
    print("|---|---|---|---|" + "---|" * len(SKETCHES))
    for name in names:
        matrix = second[name]
        rank = max(1, matrix.shape[1] // 8)
        old_basis = sampled_qb(first[name], rank, generator=generator)[1].T.contiguous()
        candidates = {
            "sampled_qb": lambda m=matrix, k=rank: sampled_qb(m, k, generator=generator),
            "reuse": lambda m=matrix, b=old_basis: reuse_basis(m, b),
            "row_sampled": lambda m=matrix, k=rank: row_sampled_qb(m, k, generator, 0.25),
            "row_sampled_half": lambda m=matrix, k=rank: row_sampled_qb(m, k, generator, 0.5),
            "column_basis": lambda m=matrix, k=rank: column_basis(m, k, generator),
            "bfloat16_sketch": lambda m=matrix, k=rank: bfloat16_sketch_qb(m, k, generator),
            "bfloat16_factors": lambda m=matrix, k=rank: sampled_qb(m, k, generator=generator, dtype=torch.bfloat16),
        }
        row = {"module": name, "shape": list(matrix.shape), "rank": rank}
        for key, function in candidates.items():
            milliseconds, factors = median_ms(function, args.repeats)
            row[key] = {"ms": milliseconds, "error": relative_error(matrix, *factors)}
        rows.append(row)
        base = row["sampled_qb"]
        cells = [f"{row[key]['ms']:.1f} / {row[key]['error'] / base['error']:.3f}" for key in SKETCHES]
        print(
            f"| {name.removeprefix('bert.encoder.')} | {matrix.shape[0]} x {matrix.shape[1]} | {rank} | "
            f"{base['ms']:.1f} / {base['error']:.3f} | " + " | ".join(cells) + " |",
            flush=True,
        )
    for key in SKETCHES:
        ratios = [row[key]["error"] / row["sampled_qb"]["error"] for row in rows]
        speed = [row[key]["ms"] / row["sampled_qb"]["ms"] for row in rows]
        kept = "within 10%" if max(ratios) <= 1.10 else "NOT within 10%"
        print(
            f"{key}: error ratio median {statistics.median(ratios):.3f}, worst {max(ratios):.3f} ({kept}); "
            f"time ratio median {statistics.median(speed):.2f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
