"""How the factorization's time and error scale with M, N and k, against torch.svd_lowrank and exact SVD.

Synthetic activations with a slowly decaying spectrum (singular values 0.97**i, like a hidden
state) so the error is comparable across sizes. One sweep each over M (rows), N (columns) and
k (rank); median time of ``--repeats`` runs.

    python benchmarks/kernel_scaling.py [--device cuda] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from loract_lightning.linalg import relative_error, sampled_qb, truncated_svd

SWEEPS = {
    "M": [(m, 1024, 128) for m in (1024, 4096, 16384)],
    "N": [(4096, n, n // 8) for n in (256, 1024, 4096)],
    "k": [(4096, 1024, k) for k in (32, 128, 512)],
}
EXACT_LIMIT = 4096 * 1024  # exact SVD only up to this many elements (it dominates the run time)


def decaying(rows: int, cols: int, device: str) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    size = min(rows, cols)
    left = torch.linalg.qr(torch.randn(rows, size, generator=generator)).Q
    right = torch.linalg.qr(torch.randn(cols, size, generator=generator)).Q
    return ((left * 0.97 ** torch.arange(size, dtype=torch.float32)) @ right.T).to(device)


def timed(factorize, matrix: torch.Tensor, rank: int, repeats: int) -> tuple[float, tuple]:
    """Median seconds of ``factorize(matrix, rank)`` and its last result."""
    device = matrix.device.type
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = factorize(matrix, rank)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "kernel_scaling.json")
    args = parser.parse_args()
    generator = torch.Generator(args.device).manual_seed(0)

    def lowrank(matrix: torch.Tensor, rank: int):
        u, s, v = torch.svd_lowrank(matrix, q=rank, niter=2)
        return u * s, v.T

    methods = {
        "sampled QB": lambda a, k: sampled_qb(a, k, generator=generator),
        "svd_lowrank(niter=2)": lowrank,
        "exact SVD": truncated_svd,
    }
    rows = []
    print("| sweep | M x N | k | " + " | ".join(f"{name} ms / err" for name in methods) + " |")
    print("|---|---|---|" + "---|" * len(methods))
    for sweep, shapes in SWEEPS.items():
        for num_rows, num_cols, rank in shapes:
            matrix = decaying(num_rows, num_cols, args.device)
            row = {"sweep": sweep, "rows": num_rows, "cols": num_cols, "rank": rank}
            cells = []
            for name, factorize in methods.items():
                if name == "exact SVD" and matrix.numel() > EXACT_LIMIT:
                    cells.append("-")
                    continue
                seconds, (left, right) = timed(factorize, matrix, rank, args.repeats)
                error = relative_error(matrix, left, right)
                row[name] = {"ms": seconds * 1000, "error": error}
                cells.append(f"{seconds * 1000:.1f} / {error:.3f}")
            rows.append(row)
            print(f"| {sweep} | {num_rows} x {num_cols} | {rank} | " + " | ".join(cells) + " |", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    print(f"\nrows written to {args.out}")


if __name__ == "__main__":
    main()
