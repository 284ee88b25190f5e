"""Which saved tensors are compressed, how, and at what rank: the one place that decides.

:class:`SelectionPolicy` answers the pack hook's question for every saved tensor, in two steps:

- :meth:`~SelectionPolicy.not_an_activation`: parameters, buffers (in whatever form autograd
  saves them, see :class:`ParameterIndex`), tensors saved during backward and tensor subclasses
  are not activations: they stay raw and are not counted as saved;
- :meth:`~SelectionPolicy.decide`: for an activation, a single :data:`Decision`:
  :class:`KeepRaw` (with the reason the stats count), :class:`StoreMask` (two-valued, stored
  exactly) or :class:`Factorize` (at rank k).

The rank a module asks for comes from :class:`RankPolicy`: a default rank plus per-module glob
overrides from ``layers``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from loract_lightning.options import AUTO, LINEAR_LAYERS, CompressionOptions, RankSpec

__all__ = ["AUTO", "LINEAR_LAYERS", "RankSpec"]  # re-exported: the rank specs this module resolves

# Reasons for keeping a saved tensor raw, as they appear in ``CompressionStats.kept``.
PARAMETER = "parameter"
NOT_FLOATING = "not_floating"
UNSUPPORTED = "unsupported_tensor"  # a tensor subclass or a sparse layout
SMALL = "below_min_bytes"
NOT_MATRIX = "not_a_matrix"
OVERLAPPING = "overlapping_view"
DISABLED = "disabled_by_layers"
NO_SAVING = "rank_too_high"
NON_FINITE = "non_finite"
NON_FINITE_FACTORS = "non_finite_factors"  # finite input, factors overflowed (float16)
EMPTY = "empty"
OUTSIDE_CHECKPOINT = "outside_checkpoint"
IN_BACKWARD = "saved_in_backward"
OTHER_MODULE = "not_in_saved_by"  # saved by a module whose class is not in ``saved_by``
NARROW = "below_min_width"
STORAGE_KEPT_RAW = "storage_kept_raw"
MEASURE_ONLY = "measure_only"


@dataclass(frozen=True)
class KeepRaw:
    """Keep the saved tensor as it is; ``reason`` is what ``CompressionStats.kept`` counts."""

    reason: str


@dataclass(frozen=True, eq=False)
class StoreMask:
    """Store a two-valued tensor exactly, as a bool mask and its two values."""

    matrix: Tensor
    low: float
    high: float


@dataclass(frozen=True, eq=False)
class Factorize:
    """Replace the tensor, flattened to ``matrix`` (M x N), by rank-``rank`` factors; with
    ``auto``, by the smallest rank up to ``rank`` that meets ``max_error``."""

    matrix: Tensor
    rank: int
    auto: bool = False


Decision = KeepRaw | StoreMask | Factorize


def has_class(module: nn.Module, class_names: Iterable[str]) -> bool:
    """``module`` is of one of ``class_names`` or derived from one (matched along the MRO, so
    peft's ``lora.Linear`` and FSDP2's ``FSDPLinear`` subclasses count too)."""
    names = set(class_names)
    return any(cls.__name__ in names for cls in type(module).__mro__)


def resolve_rank(rank: int | float, num_rows: int, num_cols: int, min_rank: int = 1) -> int:
    """The number of factor columns ``k`` that ``rank`` asks for on an M x N matrix.

    A float is a fraction of N, the last dimension; when the matrix has fewer rows than columns
    (logits of a short batch over a large vocabulary) it is a fraction of M instead, since the
    rank cannot exceed min(M, N). A fraction gives at least ``min_rank``; an int is taken as it
    is. The result never exceeds min(M, N).
    """
    largest = min(num_rows, num_cols)
    if isinstance(rank, float):
        rank = max(min_rank, round(rank * largest))
    return max(1, min(rank, largest))


def keeps_memory(rank: int, num_rows: int, num_cols: int) -> bool:
    """True when rank-``rank`` factors are smaller than the dense matrix: k(M+N) < MN."""
    return rank * (num_rows + num_cols) < num_rows * num_cols


@dataclass
class RankPolicy:
    """The rank each module asks for: ``layers`` glob patterns first (first match wins), then ``default``.

    Patterns are matched with :func:`fnmatch.fnmatchcase` against qualified module names as
    ``model.named_modules()`` gives them (the root module's name is ``""``). The specs are those
    :class:`~loract_lightning.options.CompressionOptions` has validated.
    """

    default: RankSpec
    layers: Mapping[str, RankSpec] = field(default_factory=dict)
    _cache: dict[str, RankSpec] = field(default_factory=dict, init=False, repr=False)

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


class SelectionPolicy:
    """Decides, for each tensor autograd saves, whether it is kept raw, stored as a mask or factorized.

    Args:
        model: the compressed model (its module names and classes; ``layers`` patterns are
            checked against them).
        options: the validated options.
        checkpointed_modules: layer mode: the qualified names of the checkpointed modules, whose
            saved inputs are compressed whatever their class.
        measure_only: keep every activation raw (``MEASURE_ONLY``) but let the stats count it.
    """

    def __init__(
        self,
        model: nn.Module,
        options: CompressionOptions,
        checkpointed_modules: Collection[str] = (),
        measure_only: bool = False,
    ) -> None:
        self.options = options
        self.ranks = RankPolicy(options.rank, options.layers)
        self.ranks.check_against(model)
        self.checkpointed_modules = frozenset(checkpointed_modules)
        self.measure_only = measure_only
        self._modules_by_name = dict(model.named_modules())
        self._saved_by_target: dict[str, bool] = {}

    def not_an_activation(self, tensor: Tensor, parameters: ParameterIndex) -> str | None:
        """Why ``tensor`` is not an activation of this forward (it stays raw, uncounted), or None."""
        if torch._C._current_graph_task_id() != -1:
            return IN_BACKWARD  # saved during backward (a recompute): it lives only until backward ends
        if type(tensor) is not torch.Tensor or tensor.layout != torch.strided:
            # Parameter objects, tensor subclasses (DTensor, ...) and sparse tensors: no plain storage to read.
            return PARAMETER if isinstance(tensor, nn.Parameter) else UNSUPPORTED
        return PARAMETER if tensor in parameters else None

    def decide(self, tensor: Tensor, module_name: str, storage_kept_raw: bool) -> Decision:
        """What to do with the activation ``tensor`` that module ``module_name`` saved.

        ``storage_kept_raw``: another tensor of the same storage is already kept raw in this
        forward, so a compact copy would only add memory. Reasons judged from metadata come first;
        the values are read only for a tensor that may be stored in compact form.
        """
        if self.measure_only:
            return KeepRaw(MEASURE_ONLY)
        reason = structural_reason(tensor, self.options.min_bytes, self.options.min_width)
        reason = reason or self._module_reason(module_name)
        if reason is None and storage_kept_raw:
            reason = STORAGE_KEPT_RAW
        rank_spec = self.ranks.rank_for(module_name) if reason is None else None
        if reason is None and rank_spec is None:
            reason = DISABLED
        # A tensor of a module outside ``saved_by`` is not factorized, but a mask is still stored
        # exactly (bool): that loses nothing (peft's LoRA dropout masks, one per projection).
        masks_only = reason == OTHER_MODULE and not storage_kept_raw
        if reason is not None and not masks_only:
            return KeepRaw(reason)
        matrix = tensor.detach().reshape(-1, tensor.shape[-1])
        by_value = _value_decision(matrix)
        if isinstance(by_value, StoreMask):
            return by_value
        if reason is not None:  # outside ``saved_by`` and not a mask
            return KeepRaw(reason)
        if by_value is not None:
            return by_value
        rank = self._rank(rank_spec, *matrix.shape)
        if rank < 1 or not keeps_memory(rank, *matrix.shape):
            return KeepRaw(NO_SAVING)
        return Factorize(matrix, rank, auto=rank_spec == AUTO)

    def _module_reason(self, module_name: str) -> str | None:
        """Why what ``module_name`` saves stays raw because of which module it is, or None."""
        if module_name in self.checkpointed_modules:
            return None  # layer mode: a checkpointed module's input, whatever the module's class
        if self.checkpointed_modules and not self.options.compress_outside:
            return OUTSIDE_CHECKPOINT
        return None if self._is_saved_by_target(module_name) else OTHER_MODULE

    def _is_saved_by_target(self, module_name: str) -> bool:
        """Whether the module ``module_name`` is of a class that ``saved_by`` names (or it is None)."""
        if self.options.saved_by is None:
            return True
        if module_name not in self._saved_by_target:
            module = self._modules_by_name.get(module_name)
            self._saved_by_target[module_name] = module is not None and has_class(module, self.options.saved_by)
        return self._saved_by_target[module_name]

    def _rank(self, rank_spec: RankSpec, num_rows: int, num_cols: int) -> int:
        """The rank to factorize at; for ``"auto"`` the largest rank the choice may reach."""
        if rank_spec != AUTO:
            return resolve_rank(rank_spec, num_rows, num_cols, self.options.min_rank)
        # Up to max_rank, and below the rank at which the factors would hold as much as the tensor.
        largest = resolve_rank(self.options.max_rank, num_rows, num_cols, self.options.min_rank)
        return min(largest, (num_rows * num_cols - 1) // (num_rows + num_cols))


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


def _value_decision(matrix: Tensor) -> KeepRaw | StoreMask | None:
    """Read ``matrix`` once for what low-rank factors cannot hold: NaN/Inf, or only two values.

    A two-valued tensor (the float ``{0, 1/(1-p)}`` dropout mask the CPU saves) is full rank, so
    it is stored exactly instead. One ``aminmax`` pass gives the candidate values; a few rows then
    reject almost every real activation before the full two-valued check runs.
    """
    low, high = torch.aminmax(matrix)
    # One host sync for both answers: on CUDA each sync stalls the forward.
    finite, head_two_valued = torch.stack(
        [torch.isfinite(low) & torch.isfinite(high), _two_valued(matrix[:4], low, high)]
    ).tolist()
    if not finite:
        return KeepRaw(NON_FINITE)
    if head_two_valued and _two_valued(matrix, low, high):
        return StoreMask(matrix, low.item(), high.item())
    return None


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
