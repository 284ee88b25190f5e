"""The compression options shared by ``compress_activations``, the ``LoRAct`` callback and the CLI."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch

from loract_lightning.linalg import METHODS
from loract_lightning.policy import AUTO, LINEAR_LAYERS, RankPolicy, RankSpec, check_rank

FACTOR_DTYPES: dict[str | None, torch.dtype | None] = {None: None, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""Allowed ``factor_dtype`` values and the dtype each names."""


@dataclass(frozen=True)
class CompressionOptions:
    """Validated options; a bad value raises a ValueError/TypeError that names it and what is allowed.

    Args:
        rank: default rank: an int k, or a float in (0, 1] meaning ``round(rank * N)`` for an
            activation whose last dimension is N (of M when it has fewer rows M than columns), or
            ``"auto"``: the smallest rank (within ``min_rank``..``max_rank``) whose relative error
            is at most ``max_error``, chosen per tensor (sampled_qb only).
        method: ``"sampled_qb"`` (the paper's, default), ``"randomized_svd"`` or ``"truncated_svd"``.
        min_bytes: activations smaller than this stay raw (factorizing them costs more than it saves).
        layers: glob pattern on qualified module names -> rank, or None for no compression. The
            module running when a tensor is saved is looked up; the first matching pattern wins.
        saved_by: default mode: class names of the modules whose saved tensors are compressed,
            matched along each module's class hierarchy (the module running when autograd saves
            the tensor decides); tensors saved by any other module stay raw, except two-valued
            masks, which are always stored exactly. Default: linear layers
            (:data:`~loract_lightning.policy.LINEAR_LAYERS`), whose saved input enters only the
            weight gradient, linearly. On SmolLM2-135M + LoRA (``benchmarks/attribution.py``) that
            is the one class that compresses at no measurable cost (LoRA gradient cosine 0.9995);
            the loss's log-probabilities, nonlinear inputs, norms and attention internals gave
            cosines of 0.28, 0.75, 0.83 and ~0. None: whatever any module saves (the paper's
            default mode). In layer mode the checkpointed modules' inputs are compressed whatever
            their class.
        min_width: activations whose matrix has fewer columns (or rows) than this stay raw: a
            fractional rank of a narrow matrix is a handful of directions (LoRA's rank-8
            intermediate at rank 1/8 is rank 1: LoRA-B gradient error 0.60 on SmolLM2).
        checkpoint: layer mode: module class names or glob patterns; those modules run under
            activation checkpointing and only their inputs are saved, compressed whatever their
            class. What is saved outside them follows ``compress_outside``.
        compress_outside: layer mode: tensors saved outside the checkpointed modules (the LM
            head's input, a classifier's, the final norm's) get default mode's treatment: those
            that ``saved_by`` modules save are compressed under ``rank``/``layers``, masks are
            stored exactly, the rest (the loss's log-probabilities with the default ``saved_by``)
            stays raw. False keeps everything outside raw (the paper's layer mode).
        seed: seed of the compressor's own random generator (the global RNG is never drawn from).
        power_iters: power iterations of the randomized methods (None: the method's default,
            0 for sampled_qb, 2 for randomized_svd).
        oversample: extra sketch columns of the randomized methods (None: the method's default,
            0 for sampled_qb, 10 for randomized_svd).
        keep_row_norms: rescale each rebuilt row (token) to its original norm, at no memory
            cost (see :func:`loract_lightning.linalg.keep_row_norms`); False gives the paper's
            plain projection ``A Q Q^T``. None (default): on in layer mode, where it cut the
            gradient error on pretrained MiniLM from 2.04 to 0.54, off in default mode, where on
            attention internals it made the error worse (0.28 to 2.04).
        max_error: ``rank="auto"``: the relative Frobenius error each activation may have.
        min_rank: ``rank="auto"``: the smallest rank used (an int >= 1).
        max_rank: ``rank="auto"``: the largest rank, an int or a fraction as for ``rank``; never
            more than the rank at which factors stop saving memory. At this rank the error target
            may be missed.
        side_stream: on CUDA, factorize on a separate stream so compression overlaps the rest of
            the forward (the activation stays allocated until its factors are done); False runs
            it on the current stream. No effect on the CPU.
        factor_dtype: ``"bfloat16"`` or ``"float16"``: keep the factors of wider (float32)
            activations in this dtype. Halves their memory, and the projection ``A Q`` and the
            rebuild ``L R`` run on the fast units (bfloat16 units of recent CPUs, tensor cores).
            The basis is still found from the activation in its own dtype; rounding adds about
            0.3% (bfloat16) to each rebuilt activation's relative error, far below the truncation
            error. None (default): factors in the activation's dtype, as in the paper.
    """

    rank: int | float = 0.125
    method: str = "sampled_qb"
    min_bytes: int = 1 << 20
    layers: Mapping[str, RankSpec] = field(default_factory=dict)
    saved_by: Sequence[str] | None = LINEAR_LAYERS
    min_width: int = 64
    checkpoint: Sequence[str] = ()
    compress_outside: bool = True
    seed: int = 0
    power_iters: int | None = None
    oversample: int | None = None
    keep_row_norms: bool | None = None
    max_error: float = 0.2
    min_rank: int = 1
    max_rank: int | float = 0.5
    side_stream: bool = True
    factor_dtype: str | None = None

    def __post_init__(self) -> None:
        RankPolicy(self.rank, self.layers or {})  # validates rank and every layers entry
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)}, got {self.method!r}")
        _check_count("min_bytes", self.min_bytes)
        _check_count("min_width", self.min_width)
        _check_count("seed", self.seed)
        for name in ("power_iters", "oversample"):
            value = getattr(self, name)
            if value is not None:
                _check_count(name, value, "None or ")
        if self.keep_row_norms is not None and not isinstance(self.keep_row_norms, bool):
            raise TypeError(f"keep_row_norms must be None, True or False, got {self.keep_row_norms!r}")
        if isinstance(self.max_error, bool) or not isinstance(self.max_error, (int, float)):
            raise TypeError(f"max_error must be a number in (0, 1), got {self.max_error!r}")
        if not 0 < self.max_error < 1:
            raise ValueError(f"max_error must be a number in (0, 1), got {self.max_error!r}")
        if isinstance(self.min_rank, bool) or not isinstance(self.min_rank, int) or self.min_rank < 1:
            raise ValueError(f"min_rank must be an int >= 1, got {self.min_rank!r}")
        check_rank(self.max_rank, "max_rank")
        if self.max_rank == AUTO:
            raise ValueError("max_rank must be an int >= 1 or a float in (0, 1], got 'auto'")
        if isinstance(self.max_rank, int) and self.min_rank > self.max_rank:
            raise ValueError(f"min_rank ({self.min_rank}) must not exceed max_rank ({self.max_rank})")
        uses_auto = self.rank == AUTO or AUTO in (self.layers or {}).values()
        if uses_auto and self.method != "sampled_qb":
            raise ValueError(f"rank='auto' needs method='sampled_qb', got method={self.method!r}")
        for name in ("side_stream", "compress_outside"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.factor_dtype not in FACTOR_DTYPES:
            raise ValueError(f"factor_dtype must be one of {list(FACTOR_DTYPES)}, got {self.factor_dtype!r}")
        if isinstance(self.checkpoint, str) or not all(isinstance(c, str) for c in self.checkpoint or ()):
            raise TypeError(
                f"checkpoint must be a list of module class names or glob patterns, got {self.checkpoint!r}"
            )
        if self.saved_by is not None and (
            isinstance(self.saved_by, str) or not all(isinstance(c, str) for c in self.saved_by)
        ):
            raise TypeError(f"saved_by must be None or a list of module class names, got {self.saved_by!r}")
        # Normalise so that two equal configurations compare (and serialise) equal.
        object.__setattr__(self, "layers", dict(self.layers or {}))
        object.__setattr__(self, "checkpoint", tuple(self.checkpoint or ()))
        if self.saved_by is not None:
            object.__setattr__(self, "saved_by", tuple(self.saved_by))

    def to_dict(self) -> dict:
        """Plain, serialisable form (lists instead of tuples) for checkpoints and logs."""
        values = asdict(self)
        values["checkpoint"] = list(self.checkpoint)
        if self.saved_by is not None:
            values["saved_by"] = list(self.saved_by)
        return values


def _check_count(name: str, value: object, prefix: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be {prefix}an int >= 0, got {value!r}")
