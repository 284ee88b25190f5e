"""Which saved tensors are compressed, how, and at what rank: the one place that decides.

:class:`SelectionPolicy` answers the pack hook's question for every saved tensor, in two steps:

- :meth:`~SelectionPolicy.not_an_activation`: parameters, buffers and what is computed from
  them alone (in whatever form autograd saves them, see
  :class:`~loract_lightning.parameters.ParameterIndex`), tensors saved during backward and
  tensor subclasses are not activations: they stay raw and are not counted as saved;
- :meth:`~SelectionPolicy.decide`: for an activation, a single :data:`Decision`:
  :class:`KeepRaw` (with the reason the stats count), :class:`StoreMask` (two-valued, stored
  exactly) or :class:`Factorize` (at rank k).

The rank a module asks for comes from :class:`RankPolicy`: a default rank plus per-module glob
overrides from ``layers``.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from loract_lightning.options import AUTO, LINEAR_LAYERS, CompressionOptions, RankSpec
from loract_lightning.parameters import ParameterIndex

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
    """Store a two-valued tensor exactly, as bits (one per value) and its two values."""

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


def check_saved_by(model: nn.Module, saved_by: Collection[str] | None) -> None:
    """Raise a ValueError for ``saved_by`` class names that no module of ``model`` has (along its
    class's MRO, as :func:`has_class` matches them), listing classes it has: a typo would otherwise
    compress nothing. The default (:data:`LINEAR_LAYERS`) is not checked, and names of it may miss
    while another name matches: such a list is meant for several architectures (GPT-2's Conv1D, others' Linear).
    """
    if saved_by is None or tuple(saved_by) == LINEAR_LAYERS:
        return
    classes = {cls.__name__ for module in model.modules() for cls in type(module).__mro__}
    unmatched = [name for name in saved_by if name not in classes]
    if len(unmatched) < len(saved_by):
        unmatched = [name for name in unmatched if name not in LINEAR_LAYERS]
    if unmatched:
        names = list(dict.fromkeys(type(module).__name__ for module in model.modules()))
        near = [match for name in unmatched for match in difflib.get_close_matches(name, names, n=2)]
        examples = list(dict.fromkeys([*near, *names]))[:10]
        raise ValueError(
            f"saved_by class name(s) {unmatched} match no module of {type(model).__name__}; "
            f"give class names (matched along each module's class hierarchy) such as {examples}"
        )


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
        check_saved_by(model, options.saved_by)
        self.checkpointed_modules = frozenset(checkpointed_modules)
        self.measure_only = measure_only
        self._modules_by_name = dict(model.named_modules())
        self._saved_by_target: dict[str, bool] = {}

    def not_an_activation(self, tensor: Tensor, parameters: ParameterIndex, recomputing: bool = False) -> str | None:
        """Why ``tensor`` is not an activation of this forward (it stays raw, uncounted), or None.

        ``recomputing``: the forward is layer mode's recompute of a block in backward
        (``compress_recompute``), whose saved tensors are activations too.
        """
        if torch._C._current_graph_task_id() != -1 and not recomputing:
            return IN_BACKWARD  # saved during backward: it lives only until backward ends
        if type(tensor) is not torch.Tensor or tensor.layout != torch.strided:
            # Parameter objects, tensor subclasses (DTensor, ...) and sparse tensors: no plain storage to read.
            return PARAMETER if isinstance(tensor, nn.Parameter) else UNSUPPORTED
        return PARAMETER if tensor in parameters else None

    def decide(self, tensor: Tensor, module_name: str, storage_kept_raw: bool, recomputing: bool = False) -> Decision:
        """What to do with the activation ``tensor`` that module ``module_name`` saved.

        ``storage_kept_raw``: another tensor of the same storage is already kept raw in this
        forward, so a compact copy would only add memory. ``recomputing``: a block's recompute
        in backward, where default mode's rule (``saved_by``) applies to everything. Reasons
        judged from metadata come first; the values are read only for a tensor that may be
        stored in compact form.
        """
        if self.measure_only:
            return KeepRaw(MEASURE_ONLY)
        reason = structural_reason(tensor, self.options.min_bytes, self.options.min_width)
        if reason is None:
            reason = self._saved_by_reason(module_name) if recomputing else self._module_reason(module_name)
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
        return self._saved_by_reason(module_name)

    def _saved_by_reason(self, module_name: str) -> str | None:
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
