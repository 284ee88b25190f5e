"""Relative error of the gradient under each compression setting, on pretrained MiniLM + LoRA.

One batch of drug reviews (b16 s128, dropout on, same seed for every run) through the text
example's model; for each setting the LoRA/head gradient is compared with the uncompressed one,
with the paper's plain projection and with ``keep_row_norms``. Prints a markdown table.

    python benchmarks/gradient_error.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.gradients import flat_gradient, relative_error
from examples.text_classification import DrugReviewsDataModule, TextClassifier
from loract_lightning import ActivationCompressor, CompressionOptions
from loract_lightning.cli import silence_known_warnings

SETTINGS = {
    "default mode, everything": {"rank": 0.125, "saved_by": None},
    'default mode, `"*.attention.self": null`': {"rank": 0.125, "layers": {"*.attention.self": None}, "saved_by": None},
    'default mode, `"*.attention.self": null`, rank 1/16': {
        "rank": 0.0625,
        "layers": {"*.attention.self": None},
        "saved_by": None,
    },
    "default mode, the defaults (linear inputs)": {"rank": 0.125},
    "layer mode (`checkpoint: [BertLayer]`), sampled QB": {"rank": 0.125, "checkpoint": ["BertLayer"]},
    "layer mode, `method: randomized_svd`": {"rank": 0.125, "method": "randomized_svd", "checkpoint": ["BertLayer"]},
    "layer mode, rank 1/4": {"rank": 0.25, "checkpoint": ["BertLayer"]},
}


def main() -> None:
    silence_known_warnings()
    torch.manual_seed(0)
    data = DrugReviewsDataModule()
    data.setup("fit")
    model = TextClassifier(num_classes=3).train()
    ids, mask, labels = (t[:16] for t in data.splits["train"].tensors)

    def gradients(**options):
        compressor = ActivationCompressor(model, CompressionOptions(**options)) if options else None
        return flat_gradient(model, lambda: F.cross_entropy(model(ids, mask), labels), compressor)

    reference, _ = gradients()
    columns = ["setting (rank 1/8 unless said)", "gradient rel. error, plain projection", "with `keep_row_norms`"]
    print("| " + " | ".join([*columns, "stored / saved"]) + " |")
    print("|---|---|---|---|")
    for label, options in SETTINGS.items():
        errors = []
        for keep in (False, True):
            flat, stats = gradients(keep_row_norms=keep, **options)
            errors.append(relative_error(flat, reference))
        print(f"| {label} | {errors[0]:.3f} | {errors[1]:.3f} | {stats.ratio:.3f} |", flush=True)


if __name__ == "__main__":
    main()
