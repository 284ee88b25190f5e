"""Layer mode on MiniLM: how well each block input can be kept at rank k, and what it costs.

The text example's model (pretrained all-MiniLM-L6-v2 + LoRA r16, the model of
``configs/text/baseline.yaml``) runs ``--batches`` batches of 16 rotten tomatoes reviews (64 tokens,
padded). Per ``BertLayer`` it prints:

- the best any rank-k factorization can do for that block's input, the truncated SVD's relative
  error ``||A - A_k|| / ||A||``: over all rows, and over the rows of real tokens only (the padding
  rows, which mean pooling drops, are close to each other and easy to fit, so the first figure
  flatters what matters);
- the relative error of what layer mode stores with the defaults (sampled QB, block deltas,
  ``rank=0.125`` with its floor of 64 directions), as the compressor's observers see it;
- the LoRA gradient's relative error and cosine against the uncompressed gradient when only that
  block's input is compressed, and when every block's is, with the defaults, without block deltas
  and at rank 1/4 (same batches, same dropout masks).

    python benchmarks/block_inputs.py
    python benchmarks/block_inputs.py --ranks 64 128 192 --batches 2
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import gradients
from examples.text_classification import RottenTomatoesDataModule, TextClassifier
from loract_lightning import ActivationCompressor, CompressionOptions, linalg
from loract_lightning.cli import silence_known_warnings

BLOCK = "BertLayer"


def svd_error(matrix: Tensor, rank: int) -> float:
    """The truncated SVD's relative error at ``rank``: the best any rank-``rank`` factorization does."""
    values = torch.linalg.svdvals(matrix.double())
    return float(values[rank:].square().sum().sqrt() / values.square().sum().sqrt())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", nargs="+", type=int, default=[64, 96, 192], help="ranks for the SVD bound")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    silence_known_warnings()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = RottenTomatoesDataModule()
    data.setup("fit")
    model = TextClassifier(num_classes=2).train()
    blocks = [name for name, module in model.named_modules() if type(module).__name__ == BLOCK]
    ids, masks, labels = data.splits["train"].tensors
    batches = [(ids[i : i + 16], masks[i : i + 16], labels[i : i + 16]) for i in range(0, 160 * args.batches, 160)]

    def lora_gradient(batch: tuple[Tensor, ...], options: dict | None, observed: dict | None = None) -> Tensor:
        compressor = ActivationCompressor(model, CompressionOptions(**options)) if options else None
        if observed is not None:
            compressor.observers.append(
                lambda name, matrix, left, right: observed.setdefault(name, []).append(
                    float(linalg.relative_error(matrix, left, right))
                )
            )

        def loss() -> Tensor:
            return F.cross_entropy(model(batch[0], batch[1]), batch[2])

        lora, _ = gradients.flat_gradient(model, loss, compressor, keep=lambda name: "lora" in name)
        return lora

    # min_bytes 0: a short batch's block inputs (under 1 MiB) would otherwise stay raw.
    layer_mode = {"rank": 0.125, "checkpoint": [BLOCK], "min_bytes": 0}
    every_block = {
        "every block (the defaults)": layer_mode,
        "every block, block_deltas=False": layer_mode | {"block_deltas": False},
        "every block, rank 1/4": layer_mode | {"rank": 0.25},
    }
    settings = every_block | {
        f"only block {i}": layer_mode | {"layers": {other: None for other in blocks if other != name}}
        for i, name in enumerate(blocks)
    }
    # The block inputs of the first batch, from its uncompressed forward.
    inputs: dict[str, Tensor] = {}

    def keep_input(name: str, module: torch.nn.Module, args: tuple) -> None:
        inputs.setdefault(name, args[0].detach())

    handles = [
        module.register_forward_pre_hook(functools.partial(keep_input, name))
        for name, module in model.named_modules()
        if name in blocks
    ]
    references = [lora_gradient(batches[0], None)]
    for handle in handles:
        handle.remove()
    references += [lora_gradient(batch, None) for batch in batches[1:]]
    stored_errors: dict[str, list[float]] = {}
    gradient = {}
    for label, options in settings.items():
        errors, cosines = [], []
        for batch, reference in zip(batches, references, strict=True):
            observed = stored_errors if label == "every block (the defaults)" else None
            compressed = lora_gradient(batch, options, observed)
            errors.append(gradients.relative_error(compressed, reference))
            cosines.append(gradients.cosine(compressed, reference))
        gradient[label] = (statistics.mean(errors), statistics.mean(cosines))

    real_tokens = batches[0][1].flatten().bool()
    header = [f"SVD error k={k}, all rows / real tokens" for k in args.ranks]
    print(f"| block | {' | '.join(header)} | stored (defaults) | LoRA gradient error, cosine: only this block |")
    print("|---|" + "---|" * (len(header) + 2))
    for i, name in enumerate(blocks):
        matrix = inputs[name].flatten(0, 1)
        bounds = [f"{svd_error(matrix, k):.3f} / {svd_error(matrix[real_tokens], k):.3f}" for k in args.ranks]
        stored = statistics.mean(stored_errors.get(name, [float("nan")]))
        error, cosine = gradient[f"only block {i}"]
        print(f"| {i} | {' | '.join(bounds)} | {stored:.3f} | {error:.3f}, {cosine:.3f} |")
    print()
    for label in every_block:
        error, cosine = gradient[label]
        print(f"{label}: LoRA gradient error {error:.3f}, cosine {cosine:.3f}")


if __name__ == "__main__":
    main()
