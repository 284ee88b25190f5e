"""Time and error of the factorizations on real activations captured from Llama, MiniLM and ViT.

For the largest distinct activations each model saves in one training forward, and for
k = N/8 and N/4, it prints a markdown table of median time and relative Frobenius error of:
sampled QB (the paper's), our Gaussian randomized SVD, ``torch.svd_lowrank(q=k, niter=2)`` and
exact truncated SVD, and writes the rows as JSON.

    python benchmarks/factorization.py [--models llama minilm vit] [--per-model 3] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from models import MODELS

from loract_lightning import ActivationCompressor, CompressionOptions
from loract_lightning.linalg import randomized_svd, relative_error, sampled_qb, truncated_svd


def capture_activations(model, loss_fn, min_bytes: int = 1 << 20) -> list[tuple[str, torch.Tensor]]:
    """(module name, M x N matrix) for every activation the engine would factorize, in save order.

    It runs the real engine and records each matrix as it reaches the factorization, so the
    selection (parameters, masks, shared storages, sizes) is exactly the engine's.
    """
    compressor = ActivationCompressor(model, CompressionOptions(rank=1, min_bytes=min_bytes, saved_by=None))
    captured = []
    compressor.observers.append(lambda name, matrix, *factors: captured.append((name, matrix.detach().clone())))
    with compressor.capture():
        loss_fn()
    return captured


def largest_distinct(captured: list[tuple[str, torch.Tensor]], count: int) -> list[tuple[str, torch.Tensor]]:
    """The ``count`` largest matrices with distinct shapes (one per kind of activation)."""
    by_shape: dict[tuple[int, ...], tuple[str, torch.Tensor]] = {}
    for name, matrix in captured:
        by_shape.setdefault(tuple(matrix.shape), (name, matrix))
    return sorted(by_shape.values(), key=lambda item: -item[1].numel())[:count]


def svd_lowrank(matrix: torch.Tensor, rank: int, generator=None) -> tuple[torch.Tensor, torch.Tensor]:
    left, singular, right = torch.svd_lowrank(matrix, q=rank, niter=2)
    return left * singular, right.T


def timed(function, *args, repeats: int) -> tuple[float, tuple[torch.Tensor, torch.Tensor]]:
    function(*args)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = function(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


METHODS = {
    "sampled_qb": lambda a, k, g: sampled_qb(a, k, generator=g),
    "sampled_qb+1pi": lambda a, k, g: sampled_qb(a, k, power_iters=1, generator=g),
    "randomized_svd": lambda a, k, g: randomized_svd(a, k, generator=g),
    "torch.svd_lowrank": lambda a, k, g: svd_lowrank(a, k),
    "truncated_svd": lambda a, k, g: truncated_svd(a, k),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--per-model", type=int, default=3, help="distinct activations per model")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "factorization.json")
    args = parser.parse_args()

    rows = []
    for model_key in args.models:
        model_name, model, loss_fn = MODELS[model_key]()
        for module, matrix in largest_distinct(capture_activations(model, loss_fn), args.per_model):
            for fraction in (8, 4):
                rank = max(1, min(matrix.shape) // fraction)
                row = {"model": model_name, "module": module, "shape": list(matrix.shape), "k": rank}
                for method, function in METHODS.items():
                    generator = torch.Generator().manual_seed(0)
                    seconds, (left, right) = timed(function, matrix, rank, generator, repeats=args.repeats)
                    row[method] = {"ms": seconds * 1e3, "error": relative_error(matrix, left, right)}
                rows.append(row)
                print_row(row, header=len(rows) == 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    print_summary(rows)
    print(f"\nrows written to {args.out}")


def print_row(row: dict, header: bool) -> None:
    if header:
        names = " | ".join(f"{m} ms | err" for m in METHODS)
        print(f"| model | module | M x N | k | {names} |")
        print("|" + "---|" * (4 + 2 * len(METHODS)))
    cells = " | ".join(f"{row[m]['ms']:.1f} | {row[m]['error']:.3f}" for m in METHODS)
    shape = "x".join(map(str, row["shape"]))
    print(f"| {row['model']} | {row['module'] or '(root)'} | {shape} | {row['k']} | {cells} |", flush=True)


def print_summary(rows: list[dict]) -> None:
    """Sampled QB against torch.svd_lowrank(niter=2): the issue's targets are time <= 0.5x, error <= 1.15x.

    Error ratios are taken only where svd_lowrank's error is at least 1%: below that both are
    exact up to rounding (the activation's rank is <= k) and their ratio means nothing.
    """
    reference = "torch.svd_lowrank"
    lossy = [row for row in rows if row[reference]["error"] >= 0.01]
    exact = [row for row in rows if row[reference]["error"] < 0.01]
    print(f"\nagainst {reference}(niter=2); error ratios over the {len(lossy)} rows where its error >= 1%:")
    for method in ("sampled_qb", "sampled_qb+1pi"):
        time_ratios = [row[method]["ms"] / row[reference]["ms"] for row in rows]
        error_ratios = [row[method]["error"] / row[reference]["error"] for row in lossy]
        worst_exact = max((row[method]["error"] for row in exact), default=0.0)
        print(
            f"  {method:15s} time ratio median {statistics.median(time_ratios):.2f} worst {max(time_ratios):.2f} "
            f"(target <= 0.5); error ratio median {statistics.median(error_ratios):.3f} "
            f"worst {max(error_ratios):.3f} (target <= 1.15); largest error where rank <= k: {worst_exact:.4f}"
        )


if __name__ == "__main__":
    main()
