"""Which saved tensors are compressed, and at what rank.

Everything here answers one of two questions for the pack hook:

- *which rank* does the module that is running right now ask for (:class:`RankPolicy`: a default
  rank plus per-module glob overrides from ``layers``);
- *may this tensor be factorized at all* (:func:`structural_reason`, :func:`value_reason`,
  :class:`ParameterIndex`). A non-``None`` reason means "keep it raw" and is what the stats count.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

RankSpec = int | float | Literal["auto"] | None
"""An int k, a float in (0, 1] meaning a fraction of the last dimension, ``"auto"`` (chosen per
tensor for an error target), or None (do not compress)."""

AUTO = "auto"

# Reasons for keeping a saved tensor raw, as they appear in ``CompressionStats.kept``.
PARAMETER = "parameter"
NOT_FLOATING = "not_floating"
UNSUPPORTED = "unsupported_tensor"  # a tensor subclass or a sparse layout
SMALL = "below_min_bytes"
NOT_MATRIX = "not_a_matrix"
OVERLAPPING = "overlapping_view"
DISABLED = "disabled_by_layers"
NO_SAVING = "rank_too_high"
MASK = "mask"
NON_FINITE = "non_finite"
NON_FINITE_FACTORS = "non_finite_factors"  # finite input, factors overflowed (float16)
EMPTY = "empty"
OUTSIDE_CHECKPOINT = "outside_checkpoint"
IN_BACKWARD = "saved_in_backward"
OTHER_MODULE = "not_in_saved_by"  # saved by a module whose class is not in ``saved_by``
NARROW = "below_min_width"
STORAGE_KEPT_RAW = "storage_kept_raw"
MEASURE_ONLY = "measure_only"


LINEAR_LAYERS = ("Linear", "Conv1d", "Conv2d", "Conv3d", "Conv1D")
"""Modules whose saved input enters the weight gradient linearly (``Conv1D`` is transformers'
GPT-2 linear layer). A low-rank error in such an input becomes an error of the same size in the
weight gradient, and nothing more: nothing downstream is recomputed from it."""


def has_class(module: nn.Module, class_names: Iterable[str]) -> bool:
    """``module`` is of one of ``class_names`` or derived from one (matched along the MRO, so
    peft's ``lora.Linear`` and FSDP2's ``FSDPLinear`` subclasses count too)."""
    names = set(class_names)
    return any(cls.__name__ in names for cls in type(module).__mro__)


def check_rank(rank: RankSpec, what: str = "rank", allow_none: bool = False) -> None:
    """Raise a ValueError/TypeError naming ``rank`` unless it is a valid rank spec."""
    if (rank is None and allow_none) or rank == AUTO:
        return
    allowed = "an int >= 1, a float in (0, 1], 'auto'" + (" or None" if allow_none else "")
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise TypeError(f"{what} must be {allowed}, got {rank!r}")
    if isinstance(rank, int) and rank < 1:
        raise ValueError(f"{what} must be {allowed}, got {rank!r}")
    if isinstance(rank, float) and not 0.0 < rank <= 1.0:
        raise ValueError(f"{what} must be {allowed}, got {rank!r}")


def resolve_rank(rank: int | float, num_rows: int, num_cols: int) -> int:
    """The number of factor columns ``k`` that ``rank`` asks for on an M x N matrix.

    A float is a fraction of N, the last dimension; when the matrix has fewer rows than columns
    (logits of a short batch over a large vocabulary) it is a fraction of M instead, since the
    rank cannot exceed min(M, N). The result never exceeds min(M, N).
    """
    largest = min(num_rows, num_cols)
    if isinstance(rank, float):
        return max(1, round(rank * largest))
    return min(rank, largest)


def keeps_memory(rank: int, num_rows: int, num_cols: int) -> bool:
    """True when rank-``rank`` factors are smaller than the dense matrix: k(M+N) < MN."""
    return rank * (num_rows + num_cols) < num_rows * num_cols


@dataclass
class RankPolicy:
    """The rank each module asks for: ``layers`` glob patterns first (first match wins), then ``default``.

    Patterns are matched with :func:`fnmatch.fnmatchcase` against qualified module names as
    ``model.named_modules()`` gives them (the root module's name is ``""``).
    """

    default: RankSpec
    layers: Mapping[str, RankSpec] = field(default_factory=dict)
    _cache: dict[str, RankSpec] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        check_rank(self.default, "rank")
        if not isinstance(self.layers, Mapping):
            raise TypeError(f"layers must be a mapping of glob pattern -> rank, got {self.layers!r}")
        for pattern, rank in self.layers.items():
            if not isinstance(pattern, str):
                raise TypeError(f"layers keys must be glob patterns (str), got {pattern!r}")
            check_rank(rank, f"layers[{pattern!r}]", allow_none=True)

    def rank_for(self, module_name: str) -> RankSpec:
        if module_name not in self._cache:
            self._cache[module_name] = next(
                (rank for pattern, rank in self.layers.items() if fnmatch.fnmatchcase(module_name, pattern)),
                self.default,
            )
        return self._cache[module_name]

    def matches(self, module_names: Iterable[str]) -> dict[str, int]:
        """How many of ``module_names`` each pattern matches (first match wins is not applied)."""
        names = list(module_names)
        return {pattern: len(fnmatch.filter(names, pattern)) for pattern in self.layers}

    def check_against(self, model: nn.Module) -> None:
        """Raise a ValueError for a ``layers`` pattern that matches no module of ``model``."""
        names = [name for name, _ in model.named_modules()]
        unmatched = [pattern for pattern, count in self.matches(names).items() if count == 0]
        if unmatched:
            examples = ", ".join(repr(name) for name in names[1:7])
            raise ValueError(
                f"layers pattern(s) {unmatched} match no module of {type(model).__name__}; "
                f"patterns are globs on qualified module names such as {examples}"
            )


class ParameterIndex:
    """Recognises parameters and buffers of a model in whatever form autograd saves them.

    Autograd rarely saves the Parameter object itself: ``F.linear`` saves ``weight.t()``, and
    under autocast it saves a half-precision copy of the weight (a new storage). So a tensor is
    parameter-like when it shares storage with a parameter/buffer, when its autograd history is
    a chain of casts/views from a leaf that requires grad, or, for frozen weights cast by
    autocast (no history at all), when its shape and a few values match a parameter.
    """

    _HISTORY_DEPTH = 4
    # Autograd nodes that only cast or re-view their single input.
    _CAST_OR_VIEW = frozenset(
        {
            "ToCopyBackward",
            "TBackward",
            "TransposeBackward",
            "PermuteBackward",
            "ViewBackward",
            "UnsafeViewBackward",
            "AliasBackward",
            "ExpandBackward",
            "SplitBackward",
            "SplitWithSizesBackward",  # FSDP1 views each unsharded weight out of one flat parameter
            "SqueezeBackward",
            "UnsqueezeBackward",
        }
    )

    def __init__(self, model: nn.Module) -> None:
        # A sharded (DTensor) parameter has no storage of its own: its local shard has. The
        # unsharded copy that the forward saves is recognised by its history instead.
        tensors = [getattr(t, "_local_tensor", t) for t in [*model.parameters(), *model.buffers()]]
        self._storages = {t.untyped_storage().data_ptr() for t in tensors if t.numel() > 0}
        self._by_shape: dict[tuple[int, ...], list[Tensor]] = {}
        for tensor in tensors:
            if tensor.ndim >= 2 and tensor.is_floating_point():
                self._by_shape.setdefault(tuple(tensor.shape), []).append(tensor)

    def __contains__(self, tensor: Tensor) -> bool:
        if tensor.untyped_storage().data_ptr() in self._storages:
            return True
        if tensor.grad_fn is not None:
            return self._history_reaches_leaf(tensor)
        return tensor.ndim >= 2 and self._is_cast_copy(tensor)

    def _history_reaches_leaf(self, tensor: Tensor) -> bool:
        node = tensor.grad_fn
        for _ in range(self._HISTORY_DEPTH):
            if type(node).__name__.rstrip("0123456789") not in self._CAST_OR_VIEW:
                return False
            inputs = [fn for fn, _ in node.next_functions if fn is not None]
            if len(inputs) != 1:
                return False
            node = inputs[0]
            if hasattr(node, "variable"):  # AccumulateGrad: the chain started at a leaf parameter
                return True
        return False

    def _is_cast_copy(self, tensor: Tensor) -> bool:
        """Whether ``tensor`` has the shape of a parameter (of any rank: conv weights are 4-D) and
        the same leading values, or is the transpose of a 2-D one (``F.linear`` saves ``weight.t()``)."""
        for param in self._by_shape.get(tuple(tensor.shape), []):
            if torch.equal(_head(tensor), _head(param).to(tensor.dtype)):
                return True
        if tensor.ndim == 2:
            for param in self._by_shape.get(tuple(tensor.shape[::-1]), []):
                if torch.equal(_head(tensor.T), _head(param).to(tensor.dtype)):
                    return True
        return False


def _head(tensor: Tensor, rows: int = 2, cols: int = 8) -> Tensor:
    """A few leading values: the first ``rows`` x ``cols`` corner of the last two dimensions."""
    return tensor[(0,) * (tensor.ndim - 2)][:rows, :cols]


def structural_reason(tensor: Tensor, min_bytes: int, min_width: int = 0) -> str | None:
    """Why a plain strided ``tensor`` must stay raw, judged from its metadata alone (no data is read)."""
    if not tensor.is_floating_point():
        return NOT_FLOATING
    if tensor.numel() == 0:
        return EMPTY
    if tensor.ndim < 2:
        return NOT_MATRIX
    if tensor.numel() * tensor.element_size() < min_bytes:
        return SMALL
    if min(tensor.shape[-1], tensor.numel() // tensor.shape[-1]) < min_width:
        return NARROW
    if not tensor.is_contiguous() and not _is_non_overlapping(tensor):
        return OVERLAPPING
    return None


def inspect_values(matrix: Tensor) -> tuple[str | None, float, float]:
    """Read ``matrix`` once for what low-rank factors cannot hold: NaN/Inf, or only two values.

    Returns ``(NON_FINITE, ...)``, ``(MASK, low, high)`` for a two-valued tensor (the float
    ``{0, 1/(1-p)}`` dropout mask the CPU saves: full rank, so it is stored exactly instead), or
    ``(None, ...)``. One ``aminmax`` pass gives the candidate values; a few rows then reject
    almost every real activation before the full two-valued check runs.
    """
    low, high = torch.aminmax(matrix)
    # One host sync for both answers: on CUDA each sync stalls the forward.
    finite, head_two_valued = torch.stack(
        [torch.isfinite(low) & torch.isfinite(high), _two_valued(matrix[:4], low, high)]
    ).tolist()
    if not finite:
        return NON_FINITE, 0.0, 0.0
    if head_two_valued and _two_valued(matrix, low, high):
        return MASK, low.item(), high.item()
    return None, 0.0, 0.0


def _two_valued(values: Tensor, low: Tensor, high: Tensor) -> Tensor:
    return ((values == low) | (values == high)).all()


def _is_non_overlapping(tensor: Tensor) -> bool:
    """True when no two elements share memory (gaps allowed), so a fresh strided copy can hold it."""
    dims = sorted((stride, size) for size, stride in zip(tensor.size(), tensor.stride(), strict=True) if size > 1)
    reach = 1
    for stride, size in dims:
        if stride < reach:
            return False
        reach = stride * size
    return True
