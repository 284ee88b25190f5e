"""The saved-tensor hook: compress activations as autograd saves them, rebuild them in backward.

:class:`ActivationCompressor` holds the validated options and the per-forward state;
:func:`compress_activations` is the public context manager around one forward pass::

    with compress_activations(model, rank=0.125) as stats:
        loss = loss_fn(model(x), y)
    loss.backward()
    print(stats)
"""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef

from loract_lightning import policy
from loract_lightning.checkpointing import checkpointed, checkpointed_by_others, select_modules
from loract_lightning.linalg import METHODS, RANDOMIZED, adaptive_qb, keep_row_norms, relative_error
from loract_lightning.options import FACTOR_DTYPES, CompressionOptions
from loract_lightning.packed import LowRankFactors, PackedTensor, RawTensor, StoredRegion, TwoValuedMask
from loract_lightning.policy import ParameterIndex, RankPolicy, RankSpec
from loract_lightning.stats import CompressionStats


@functools.cache
def _side_stream_of(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for every compressor: cuBLAS keeps a workspace (32 MiB on an
    H100) for each stream it has run on, so a new stream per forward would pile them up."""
    return torch.cuda.Stream(device)


@dataclass
class _StorageRecord:
    """What this forward has done with one storage: compact regions built from it, or kept raw."""

    ref: StorageWeakRef
    kept_raw: bool = False
    regions: list[StoredRegion] = field(default_factory=list)


class ActivationCompressor:
    """Compresses the activations a model saves for backward into low-rank factors.

    Build it once, then wrap each training forward in :meth:`capture`. The options are those of
    :class:`~loract_lightning.options.CompressionOptions`.

    Args:
        model: the module whose forward is compressed; its parameters and buffers are never
            compressed, and its module names are what ``layers`` and ``checkpoint`` match.
        compress: False only measures: every saved tensor is kept raw but counted, so the stats
            show what an uncompressed forward saves, per module.
        **options: see :class:`~loract_lightning.options.CompressionOptions`.

    Attributes:
        track_error: when True, the relative error of every factorization is recorded in
            ``stats.modules[name].errors`` (costs one extra rebuild per tensor).
        observer: when set, called as ``observer(module_name, matrix)`` with every activation
            (flattened to M x N) just before it is factorized; ``loract profile`` uses it.
    """

    def __init__(self, model: nn.Module, compress: bool = True, **options: Any) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.compress = compress
        self.track_error = False
        self.observer: Callable[[str, Tensor], None] | None = None
        self.options = CompressionOptions(**options)
        self.ranks = RankPolicy(self.options.rank, self.options.layers)
        self.ranks.check_against(model)
        self._modules_by_name = dict(model.named_modules())
        self._saved_by_target: dict[str, bool] = {}
        self._modules_to_wrap, existing = select_modules(model, self.options.checkpoint)
        self.checkpointed_modules = {**self._modules_to_wrap, **existing}
        """Layer mode: the modules whose saved inputs are compressed (by qualified name)."""
        if not self.layer_mode and self.options.saved_by is not None and (others := checkpointed_by_others(model)):
            warnings.warn(
                f"LoRAct: {len(others)} module(s) already run under activation checkpointing (e.g. {others[:2]}); "
                "what they save are their inputs, saved by no `saved_by` class, so in default mode those stay "
                "raw. Name them in `checkpoint` (layer mode) to compress them.",
                stacklevel=2,
            )
        keep = self.options.keep_row_norms
        self.keep_row_norms = self.layer_mode if keep is None else keep
        self._method_options = {
            key: value
            for key, value in (("power_iters", self.options.power_iters), ("oversample", self.options.oversample))
            if value is not None
        }
        self._factor_dtype = FACTOR_DTYPES[self.options.factor_dtype]
        self._generators: dict[torch.device, torch.Generator] = {}
        self._module_stack: list[str] = []
        self._records: dict[tuple[torch.device, int], _StorageRecord] = {}
        self._parameters: ParameterIndex | None = None
        self._stats = CompressionStats()

    @property
    def layer_mode(self) -> bool:
        return bool(self.checkpointed_modules)

    @contextmanager
    def capture(self) -> Iterator[CompressionStats]:
        """Compress what autograd saves inside the block; yields this forward's stats.

        Nothing is installed when the model is in eval mode or gradients are off: no tensor is
        saved then, and nothing should slow down.
        """
        stats = CompressionStats()
        if not self.model.training or not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
            yield stats
            return
        self._stats = stats
        self._parameters = ParameterIndex(self.model)
        with ExitStack() as installed:
            installed.callback(self._forget_forward)
            installed.enter_context(self._track_modules())
            installed.enter_context(checkpointed(self._modules_to_wrap))
            installed.enter_context(torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack))
            yield stats

    def _forget_forward(self) -> None:
        # Drop every per-forward reference so factors live only as long as the autograd graph.
        self._records = {}
        self._module_stack = []
        self._parameters = None

    @contextmanager
    def _track_modules(self) -> Iterator[None]:
        """Keep ``_module_stack`` equal to the qualified names of the modules now running."""
        handles = []
        for name, module in self.model.named_modules():
            handles.append(module.register_forward_pre_hook(functools.partial(self._enter_module, name)))
            handles.append(module.register_forward_hook(self._exit_module, always_call=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _enter_module(self, name: str, module: nn.Module, args: object) -> None:
        self._module_stack.append(name)

    def _exit_module(self, module: nn.Module, args: object, output: object) -> None:
        if self._module_stack:
            self._module_stack.pop()

    # -- the hook pair -------------------------------------------------------------------------

    def pack(self, tensor: Tensor) -> RawTensor | PackedTensor:
        """Called by autograd for every tensor it saves; returns it kept raw, or a packed form.

        A tensor kept raw is stored detached: autograd also hands the hook the outputs an op
        saves (tanh, softmax, ...), and holding one with its ``grad_fn`` makes a reference cycle
        through autograd's C++ graph that Python's gc cannot see. A branch that backward never
        runs through (BERT's pooler under a loss on the hidden states) would then never be freed.
        Both forms remember the tensor's version, so an in-place write after the save raises at
        unpack, as it does without hooks.
        """
        packed = self._pack(tensor)
        return RawTensor(packed.detach(), tensor._version) if isinstance(packed, Tensor) else packed

    def _pack(self, tensor: Tensor) -> Tensor | PackedTensor:
        stats = self._stats
        if torch._C._current_graph_task_id() != -1:
            # Saved during backward (a recompute): it lives only until backward ends.
            stats.kept[policy.IN_BACKWARD] += 1
            return tensor
        if type(tensor) is not torch.Tensor or tensor.layout != torch.strided:
            # Parameter objects, tensor subclasses (DTensor, ...) and sparse tensors: no plain storage to read.
            stats.kept[policy.PARAMETER if isinstance(tensor, nn.Parameter) else policy.UNSUPPORTED] += 1
            return tensor
        if tensor in self._parameters:
            stats.kept[policy.PARAMETER] += 1
            return tensor
        module_name = self._module_stack[-1] if self._module_stack else ""
        record = self._record(tensor, module_name)
        if not self.compress:
            return self._keep_raw(tensor, module_name, record, policy.MEASURE_ONLY)
        for region in record.regions:
            if region.covers(tensor):
                stats.shared += 1
                return PackedTensor.view_of(region, tensor)
        reason, rank_spec = self._policy_reason(tensor, module_name, record)
        # A tensor of a module outside ``saved_by`` is not factorized, but a mask is still stored
        # exactly (bool): that loses nothing (peft's LoRA dropout masks, one per projection).
        masks_only = reason == policy.OTHER_MODULE and not record.kept_raw
        if reason is not None and not masks_only:
            return self._keep_raw(tensor, module_name, record, reason)
        matrix = tensor.detach().reshape(-1, tensor.shape[-1])
        value_reason, low, high = policy.inspect_values(matrix)
        if value_reason == policy.MASK:
            region = TwoValuedMask(**StoredRegion.layout_of(tensor), is_high=matrix == high, low=low, high=high)
            stats.masks += 1
        elif masks_only or value_reason is not None:
            return self._keep_raw(tensor, module_name, record, reason or value_reason)
        else:
            num_rows, num_cols = matrix.shape
            rank = self._rank_for(rank_spec, num_rows, num_cols)
            if rank < 1 or not policy.keeps_memory(rank, num_rows, num_cols):
                return self._keep_raw(tensor, module_name, record, policy.NO_SAVING)
            if self.observer is not None:
                self.observer(module_name, matrix)
            region = self._factorize(tensor, matrix, rank, module_name, auto=rank_spec == policy.AUTO)
            if region is None:
                return self._keep_raw(tensor, module_name, record, policy.NON_FINITE_FACTORS)
            stats.compressed += 1
            stats.rank_sum += region.rank
            module = stats.module(module_name)
            module.compressed += 1
            module.ranks.add(region.rank)
        record.regions.append(region)
        stats.add_stored(module_name, region.nbytes)
        return PackedTensor.view_of(region, tensor)

    @staticmethod
    def unpack(packed: RawTensor | PackedTensor) -> Tensor:
        return packed.unpack()

    # -- helpers of pack -----------------------------------------------------------------------

    def _record(self, tensor: Tensor, module_name: str) -> _StorageRecord:
        """The record of ``tensor``'s storage; a storage seen for the first time counts as saved."""
        storage = tensor.untyped_storage()
        key = (tensor.device, storage.data_ptr())
        record = self._records.get(key)
        # A freed storage's address can be handed to a new tensor later in the same forward.
        if record is None or record.ref.expired():
            record = self._records[key] = _StorageRecord(StorageWeakRef(storage))
            self._stats.add_saved(module_name, storage.nbytes())
        return record

    def _policy_reason(self, tensor: Tensor, module_name: str, record: _StorageRecord) -> tuple[str | None, RankSpec]:
        """Why ``tensor`` stays raw, judged without reading its values; else None and its rank spec."""
        reason = policy.structural_reason(tensor, self.options.min_bytes, self.options.min_width)
        if reason is not None:
            return reason, None
        # A checkpointed module's input is compressed whatever the module's class.
        if not (self.layer_mode and module_name in self.checkpointed_modules):
            if self.layer_mode and not self.options.compress_outside:
                return policy.OUTSIDE_CHECKPOINT, None
            if not self._is_saved_by_target(module_name):
                return policy.OTHER_MODULE, None
        if record.kept_raw:
            # Its storage stays alive anyway: a compact copy would only add memory.
            return policy.STORAGE_KEPT_RAW, None
        rank_spec = self.ranks.rank_for(module_name)
        if rank_spec is None:
            return policy.DISABLED, None
        return None, rank_spec

    def _is_saved_by_target(self, module_name: str) -> bool:
        """Whether the module ``module_name`` is of a class that ``saved_by`` names (or it is None)."""
        if self.options.saved_by is None:
            return True
        if module_name not in self._saved_by_target:
            module = self._modules_by_name.get(module_name)
            self._saved_by_target[module_name] = module is not None and policy.has_class(module, self.options.saved_by)
        return self._saved_by_target[module_name]

    def _rank_for(self, rank_spec: RankSpec, num_rows: int, num_cols: int) -> int:
        """The rank to factorize at; for ``"auto"`` the largest rank the choice may reach."""
        if rank_spec != policy.AUTO:
            return policy.resolve_rank(rank_spec, num_rows, num_cols)
        # Up to max_rank, and below the rank at which the factors would hold as much as the tensor.
        largest = policy.resolve_rank(self.options.max_rank, num_rows, num_cols)
        return min(largest, (num_rows * num_cols - 1) // (num_rows + num_cols))

    def _keep_raw(self, tensor: Tensor, module_name: str, record: _StorageRecord, reason: str) -> Tensor:
        self._stats.kept[reason] += 1
        if not record.kept_raw:
            record.kept_raw = True
            self._stats.add_stored(module_name, tensor.untyped_storage().nbytes())
        return tensor

    def _factorize(
        self, tensor: Tensor, matrix: Tensor, rank: int, module_name: str, auto: bool = False
    ) -> LowRankFactors | None:
        """Factors of ``matrix`` at ``rank``; with ``auto``, at the smallest rank up to ``rank``
        that meets ``max_error``. None when the factors are not finite (a float16 projection
        whose rows overflow): such factors are never stored."""
        generator = self._generator(tensor.device) if auto or self.options.method in RANDOMIZED else None
        dtype = self._factor_dtype_for(matrix)
        if auto:
            options = {"min_rank": self.options.min_rank, "max_rank": rank, "generator": generator, "dtype": dtype}
            factorize = functools.partial(adaptive_qb, max_error=self.options.max_error, **options)
        else:
            options = self._method_options | {"dtype": dtype}
            options |= {"generator": generator} if generator is not None else {}
            factorize = functools.partial(METHODS[self.options.method], rank=rank, **options)
        side_stream = self._side_stream(tensor.device)
        start = time.perf_counter()
        # The hook may run under autocast; the factors must keep the activation's own dtype.
        with torch.no_grad(), torch.autocast(tensor.device.type, enabled=False), self._on(side_stream):
            left, right = factorize(matrix)
            if self.keep_row_norms:
                left = keep_row_norms(matrix, left, right)
            if not bool(torch.isfinite(left).all() & torch.isfinite(right).all()):
                return None
            if self.track_error:
                self._stats.module(module_name).errors.append(relative_error(matrix, left, right))
            ready = side_stream.record_event() if side_stream is not None else None
        if side_stream is not None:
            # The activation (and the matrix copied from it, if any) belongs to the current stream;
            # once autograd frees it, its memory must not be reused before the side stream has
            # read it. This keeps the original alive until its factors are ready.
            matrix.record_stream(side_stream)
        # On a side stream this is the time to launch the work, not to run it.
        self._stats.compress_seconds += time.perf_counter() - start
        return LowRankFactors(**StoredRegion.layout_of(tensor), left=left, right=right, ready=ready)

    def _factor_dtype_for(self, matrix: Tensor) -> torch.dtype:
        """``factor_dtype`` where it is narrower than the activation's dtype, else the activation's."""
        dtype = self._factor_dtype
        if dtype is None or dtype.itemsize >= matrix.dtype.itemsize:
            return matrix.dtype
        return dtype

    def _side_stream(self, device: torch.device) -> torch.cuda.Stream | None:
        if device.type != "cuda" or not self.options.side_stream:
            return None
        return _side_stream_of(device)

    @staticmethod
    @contextmanager
    def _on(side_stream: torch.cuda.Stream | None) -> Iterator[None]:
        """Run the block on ``side_stream`` once the current stream has produced its inputs."""
        if side_stream is None:
            yield
            return
        current = torch.cuda.current_stream(side_stream.device)
        side_stream.wait_stream(current)
        with torch.cuda.stream(side_stream):
            yield

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._generators:
            self._generators[device] = torch.Generator(device=device).manual_seed(self.options.seed)
        return self._generators[device]


def compress_activations(model: nn.Module, **options: Any) -> AbstractContextManager[CompressionStats]:
    """Compress the activations ``model`` saves for backward inside the ``with`` block.

    Takes the options of :class:`~loract_lightning.options.CompressionOptions` and yields the forward's
    :class:`~loract_lightning.stats.CompressionStats`. Run backward after the block; the model is
    left exactly as it was.

    Example::

        with compress_activations(model, rank=0.125, layers={"*.attention.*": None}) as stats:
            loss = loss_fn(model(x), y)
        loss.backward()
        print(stats.ratio)
    """
    return ActivationCompressor(model, **options).capture()
