"""Gradient comparisons shared by the benchmarks that measure what compression does to a gradient
(gradient_error.py, block_inputs.py, attribution.py): one training forward/backward under a
compressor, and how far its gradient lies from the uncompressed one."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from loract_lightning import ActivationCompressor, CompressionStats


def flat_gradient(
    model: nn.Module,
    compute_loss: Callable[[], Tensor],
    compressor: ActivationCompressor | None = None,
    dropout_seed: int = 1,
    keep: Callable[[str], bool] = lambda name: True,
) -> tuple[Tensor, CompressionStats | None]:
    """The gradient of ``compute_loss()`` for the parameters whose names ``keep`` accepts, as one
    flat vector, and the forward's stats (None without a compressor). The global RNG is seeded with
    ``dropout_seed`` first, so every setting sees the same dropout masks."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(dropout_seed)
    with compressor.capture() if compressor is not None else contextlib.nullcontext() as stats:
        loss = compute_loss()
    loss.backward()
    grads = [p.grad.flatten() for name, p in model.named_parameters() if p.grad is not None and keep(name)]
    gradient = torch.cat(grads)
    model.zero_grad(set_to_none=True)
    return gradient, stats


def relative_error(gradient: Tensor, reference: Tensor) -> float:
    """``||g - g0|| / ||g0||`` (NaN for a zero reference)."""
    norm = float(reference.norm())
    return float((gradient - reference).norm()) / norm if norm > 0 else math.nan


def cosine(gradient: Tensor, reference: Tensor) -> float:
    """Cosine similarity of two gradients, in float64."""
    return float(F.cosine_similarity(gradient.double(), reference.double(), dim=0))
