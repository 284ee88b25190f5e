"""The saved-tensor hook: compress activations as autograd saves them, rebuild them in backward.

The path of one saved activation: autograd calls :meth:`_Forward.pack` (the state of one
captured forward); :meth:`SelectionPolicy.decide <loract_lightning.policy.SelectionPolicy.decide>`
says keep it raw, store it as a mask or factorize it; :meth:`ActivationCompressor.factorize` runs
the factorization (:mod:`loract_lightning.linalg`); the result is a region of
:mod:`loract_lightning.packed`, whose ``unpack`` rebuilds the tensor in backward.
:class:`ActivationCompressor` holds the options across forwards; :func:`compress_activations` is
the context manager around one forward pass::

    with compress_activations(model, rank=0.125) as stats:
        loss = loss_fn(model(x), y)
    loss.backward()
    print(stats)
"""

from __future__ import annotations

import functools
import time
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef

from loract_lightning import policy
from loract_lightning.checkpointing import checkpointed, checkpointed_by_others, select_modules
from loract_lightning.linalg import METHODS, RANDOMIZED, adaptive_qb, distance, keep_row_norms, row_norm_scale
from loract_lightning.options import FACTOR_DTYPES, CompressionOptions
from loract_lightning.packed import (
    HandedOn,
    LowRankFactors,
    PackedTensor,
    RawTensor,
    StoredRegion,
    TwoValuedMask,
    low_rank_product,
    pack_bits,
    version_probe,
)
from loract_lightning.parameters import ParameterIndex
from loract_lightning.policy import Factorize, KeepRaw, SelectionPolicy, StoreMask
from loract_lightning.stats import CompressionStats
from loract_lightning.token_chunks import TokenChunks
from loract_lightning.wrappers import user_module


@functools.cache
def _side_stream_of(device: torch.device) -> torch.cuda.Stream:
    """One side stream per device for every compressor: cuBLAS keeps a workspace (32 MiB on an
    H100) for each stream it has run on, so a new stream per forward would pile them up."""
    return torch.cuda.Stream(device)


@dataclass
class _StorageRecord:
    """What this forward has done with one storage: compact regions built from it, or kept raw.

    Regions are held weakly: the graph that saved them holds them, and once its backward has
    freed them (micro-batches in one ``with`` block) nothing here may keep them alive.
    """

    ref: StorageWeakRef
    kept_raw: bool = False
    regions: list[weakref.ref[StoredRegion]] = field(default_factory=list)

    def region_covering(self, tensor: Tensor) -> StoredRegion | None:
        alive = (ref() for ref in self.regions)
        return next((region for region in alive if region is not None and region.covers(tensor)), None)


Observer = Callable[[str, Tensor, Tensor, Tensor | None], None]
"""``observer(module_name, matrix, left, right)``: called with every factorization, see
:attr:`ActivationCompressor.observers`."""


class ActivationCompressor:
    """Compresses the activations a model saves for backward into low-rank factors.

    Build it once, then wrap each training forward in :meth:`capture`.

    Args:
        model: the module whose forward is compressed; its parameters and buffers are never
            compressed, and its module names are what ``layers`` and ``checkpoint`` match (of
            the module under Fabric's wrapper, for a model ``fabric.setup`` returned).
        options: the compression options (default: ``CompressionOptions()``).
        compress: False only measures: every saved tensor is kept raw but counted, so the stats
            show what an uncompressed forward saves, per module.
        generators: the random generators to draw columns from, by device (default: the
            compressor's own, seeded with ``seed``); :func:`compress_activations` passes one set
            per model and seed, so that successive steps draw different columns.

    Attributes:
        observers: functions called as ``observer(module_name, matrix, left, right)`` with each
            activation that is factorized (flattened to M x N, as it was read) and its factors,
            before they are stored (``right`` is None when ``left`` is the rebuilt matrix itself:
            a block input stored as a delta, ``block_deltas``; ``linalg.relative_error`` takes
            both forms); ``loract profile`` measures spectra this way and the
            monitor reconstruction errors. Add and remove them freely between forwards.
        policy: the :class:`~loract_lightning.policy.SelectionPolicy` that decides, per saved
            tensor, what is stored.

    Example::

        compressor = ActivationCompressor(model, CompressionOptions(rank=0.125))
        for x, y in batches:
            with compressor.capture() as stats:
                loss = loss_fn(model(x), y)
            loss.backward()
    """

    def __init__(
        self,
        model: nn.Module,
        options: CompressionOptions | None = None,
        *,
        compress: bool = True,
        generators: dict[torch.device, torch.Generator] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        model = user_module(model)  # under Fabric: module names as the user wrote them
        if options is None:
            options = CompressionOptions()
        if not isinstance(options, CompressionOptions):
            raise TypeError(f"options must be a CompressionOptions, got {type(options).__name__}")
        self.model = model
        self.options = options
        self.observers: list[Observer] = []
        self._modules_to_wrap, existing = select_modules(model, options.checkpoint)
        self.checkpointed_modules = {**self._modules_to_wrap, **existing}
        """Layer mode: the modules whose saved inputs are compressed (by qualified name)."""
        self.policy = SelectionPolicy(model, options, self.checkpointed_modules, measure_only=not compress)
        self._token_chunks = TokenChunks(self._modules_to_wrap, options.mlp_chunk_tokens)
        if not self.layer_mode and options.saved_by is not None and (others := checkpointed_by_others(model)):
            warnings.warn(
                f"LoRAct: {len(others)} module(s) already run under activation checkpointing (e.g. {others[:2]}); "
                "what they save are their inputs, saved by no `saved_by` class, so in default mode those stay "
                "raw. Name them in `checkpoint` (layer mode) to compress them.",
                stacklevel=2,
            )
        self.keep_row_norms = self.layer_mode if options.keep_row_norms is None else options.keep_row_norms
        self.block_deltas = self.layer_mode and options.block_deltas
        self._method_options = {
            key: value
            for key, value in (("power_iters", options.power_iters), ("oversample", options.oversample))
            if value is not None
        }
        self._factor_dtype = FACTOR_DTYPES[options.factor_dtype]
        self._generators = {} if generators is None else generators
        self._measure_only = not compress
        self._first_capture = True

    @property
    def layer_mode(self) -> bool:
        return bool(self.checkpointed_modules)

    @contextmanager
    def capture(self) -> Iterator[CompressionStats]:
        """Compress what autograd saves inside the block; yields this forward's stats.

        Nothing is installed when the model is in eval mode or gradients are off: no tensor is
        saved then, and nothing should slow down.
        """
        if not self.model.training or not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
            yield CompressionStats()
            return
        forward = self._start_forward()
        pack = forward.pack  # one object: the checkpointed modules look for it on top of the hooks
        hooks = torch.autograd.graph.saved_tensors_hooks(pack, _unpack)
        recompute = self.recompute if self.options.compress_recompute and not self._measure_only else None
        chunks = None if self._measure_only else self._token_chunks
        checkpointing = checkpointed(self._modules_to_wrap, pack, recompute, chunks)
        with forward.tracking_modules(), checkpointing, hooks, forward.tracking_weights():
            yield forward.stats
        if self._first_capture and not self._measure_only:
            self._first_capture = False
            warn_if_nothing_compressed(forward.stats)
            warn_if_one_raw_tensor_dominates(forward.stats, forward.largest_raw)

    def _start_forward(self, recomputing: str | None = None) -> _Forward:
        # One seam for tools that watch every pack call (the tests' spy, benchmarks/attribution.py).
        return _Forward(self, recomputing)

    @contextmanager
    def recompute(self, name: str) -> Iterator[None]:
        """Layer mode, ``compress_recompute``: around the recompute of block ``name`` in backward,
        store what it saves as default mode does (linear layers' inputs as factors, masks exact),
        so that one block's backward holds less than its raw working set."""
        forward = self._start_forward(recomputing=name)
        hooks = torch.autograd.graph.saved_tensors_hooks(forward.pack, _unpack)
        with forward.tracking_modules(), hooks, forward.tracking_weights():
            yield

    def state_dict(self) -> dict[str, Any]:
        """The random generators' states (one per device used), for checkpoints."""
        return {"generator_states": {str(device): g.get_state() for device, g in self._generators.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for device, generator_state in state_dict.get("generator_states", {}).items():
            self._generator(torch.device(device)).set_state(generator_state)

    def factorize(
        self, module_name: str, tensor: Tensor, decision: Factorize, base: tuple[LowRankFactors, Tensor] | None = None
    ) -> tuple[LowRankFactors, Tensor | None] | None:
        """Factors of ``decision.matrix`` (``tensor`` flattened) as the decision asks; None when they
        are not finite (a float16 projection whose rows overflow): such factors are never stored.

        ``base`` (``block_deltas``): the previous block input's factors and rebuilt matrix; the
        difference from that matrix is factorized too, and stored instead where its rebuild is
        closer to the input. Returns the factors and, when they are a delta, this block's rebuilt
        matrix (the next block's base), else None.
        """
        matrix, rank = decision.matrix, decision.rank
        generator = self._generator(tensor.device) if decision.auto or self.options.method in RANDOMIZED else None
        dtype = self._factor_dtype_for(matrix)
        if decision.auto:
            min_rank = min(self.options.min_rank, rank)  # a small matrix caps the search below min_rank
            options = {"min_rank": min_rank, "max_rank": rank, "generator": generator, "dtype": dtype}
            factorize = functools.partial(adaptive_qb, max_error=self.options.max_error, **options)
        else:
            options = self._method_options | {"dtype": dtype}
            options |= {"generator": generator} if generator is not None else {}
            factorize = functools.partial(METHODS[self.options.method], rank=rank, **options)
        side_stream = self._side_stream(tensor.device)
        # The hook may run under autocast; the factors must keep the activation's own dtype.
        with torch.no_grad(), torch.autocast(tensor.device.type, enabled=False), self._on(side_stream):
            left, right = factorize(matrix)
            rebuilt = row_scale = None
            if base is not None:
                # The delta only where it is the closer of the two (it is not when consecutive
                # inputs are unrelated): never worse than the input alone, exact where that is.
                delta_left, delta_right = factorize(matrix - base[1].to(matrix.dtype))
                delta_rebuilt = low_rank_product(delta_left, delta_right, base[1])
                if distance(matrix, delta_rebuilt) < distance(matrix, left @ right):
                    left, right, rebuilt = delta_left, delta_right, delta_rebuilt
                else:
                    base = None
            if self.keep_row_norms and rebuilt is None:
                left = keep_row_norms(matrix, left, right)
            elif self.keep_row_norms:
                row_scale = row_norm_scale(matrix, rebuilt.norm(dim=1, keepdim=True))
                rebuilt = rebuilt * row_scale
            if not bool(torch.isfinite(left).all() & torch.isfinite(right).all()):
                return None
            seen = (left, right) if rebuilt is None else (rebuilt, None)
            for observer in self.observers:
                observer(module_name, matrix, *seen)
            ready = side_stream.record_event() if side_stream is not None else None
        if side_stream is not None:
            # The activation (and the matrix copied from it, if any) belongs to the current stream;
            # once autograd frees it, its memory must not be reused before the side stream has
            # read it. This keeps the original alive until its factors are ready.
            matrix.record_stream(side_stream)
        layout = StoredRegion.layout_of(tensor)
        base_factors = base[0] if base is not None else None
        factors = LowRankFactors(**layout, left=left, right=right, ready=ready, base=base_factors, row_scale=row_scale)
        return factors, rebuilt

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


class _Forward:
    """One captured forward: its stats, the storages it has seen and the modules now running.

    Made by :meth:`ActivationCompressor.capture` and dropped with it, so nothing of one forward
    outlives its autograd graph except the stored regions the graph holds.
    """

    def __init__(self, compressor: ActivationCompressor, recomputing: str | None = None) -> None:
        self.compressor = compressor
        self.recomputing = recomputing
        """The name of the block whose recompute this is (``compress_recompute``), or None."""
        self.policy = compressor.policy
        self.stats = CompressionStats()
        self.parameters = ParameterIndex(compressor.model)
        self.module_stack: list[str] = []
        self.records: dict[tuple[torch.device, int], _StorageRecord] = {}
        self.largest_raw: LargestRaw | None = None
        """The largest activation storage kept raw, for :func:`warn_if_one_raw_tensor_dominates`."""
        self.last_block: tuple[weakref.ref[LowRankFactors], Tensor] | None = None
        """``block_deltas``: the last checkpointed block input's factors (held by its graph) and
        rebuilt matrix."""
        # A recompute runs in backward: the hooks in place then are not the forward's.
        self.outer_hooks = torch._C._autograd._top_saved_tensors_default_hooks(False) if recomputing is None else None
        """The saved-tensor hooks in place before LoRAct's (``save_on_cpu``): what LoRAct keeps raw
        goes to them, as it would without LoRAct."""

    def pack(self, tensor: Tensor) -> RawTensor | HandedOn | PackedTensor:
        """Called by autograd for every tensor it saves; returns it kept raw, or a packed form.

        A tensor kept raw is stored detached: autograd also hands the hook the outputs an op
        saves (tanh, softmax, ...), and holding one with its ``grad_fn`` makes a reference cycle
        through autograd's C++ graph that Python's gc cannot see. A branch that backward never
        runs through (BERT's pooler under a loss on the hidden states) would then never be freed.
        Both forms remember the tensor's version, so an in-place write after the save raises at
        unpack, as it does without hooks.
        """
        recomputing = self.recomputing is not None
        if (reason := self.policy.not_an_activation(tensor, self.parameters, recomputing)) is not None:
            self.stats.kept[reason] += 1
            return self._raw(tensor)
        module_name = self.module_stack[-1] if self.module_stack else ""
        record = self._record(tensor, module_name)
        if (region := record.region_covering(tensor)) is not None:
            self.stats.shared += 1
            return PackedTensor.view_of(region, tensor)
        decision = self.policy.decide(tensor, module_name, record.kept_raw, recomputing)
        if isinstance(decision, KeepRaw):
            return self._keep_raw(tensor, module_name, record, decision.reason)
        region = self._store(tensor, module_name, decision)
        if region is None:  # the factors overflowed
            return self._keep_raw(tensor, module_name, record, policy.NON_FINITE_FACTORS)
        record.regions.append(weakref.ref(region))
        self.stats.add_stored(module_name, region.nbytes)
        return PackedTensor.view_of(region, tensor)

    def _store(self, tensor: Tensor, module_name: str, decision: StoreMask | Factorize) -> StoredRegion | None:
        """The compact region ``decision`` asks for; None when the factors are not finite."""
        if isinstance(decision, StoreMask):
            self.stats.masks += 1
            bits = pack_bits(decision.matrix == decision.high)
            return TwoValuedMask(**StoredRegion.layout_of(tensor), bits=bits, low=decision.low, high=decision.high)
        start = time.perf_counter()
        chained = self.compressor.block_deltas and module_name in self.policy.checkpointed_modules
        chained = chained and self.recomputing is None
        base = self._chain_base(decision.matrix) if chained else None
        result = self.compressor.factorize(module_name, tensor, decision, base)
        # On a side stream this is the time to launch the work, not to run it.
        self.stats.compress_seconds += time.perf_counter() - start
        if result is None:
            return None
        factors, rebuilt = result
        if chained:
            self.last_block = (weakref.ref(factors), rebuilt if rebuilt is not None else factors.matrix())
        self.stats.add_factors(module_name, factors.rank)
        return factors

    def _chain_base(self, matrix: Tensor) -> tuple[LowRankFactors, Tensor] | None:
        """The previous block input to store ``matrix`` as a delta from, or None: there is none, it
        has another shape (a new chain), or its graph was freed by a backward (a new forward)."""
        if self.last_block is None:
            return None
        factors, rebuilt = self.last_block[0](), self.last_block[1]
        if factors is None or rebuilt.shape != matrix.shape or rebuilt.device != matrix.device:
            self.last_block = None
            return None
        return factors, rebuilt

    def _record(self, tensor: Tensor, module_name: str) -> _StorageRecord:
        """The record of ``tensor``'s storage; a storage seen for the first time counts as saved."""
        storage = tensor.untyped_storage()
        key = (tensor.device, storage.data_ptr())
        record = self.records.get(key)
        # A freed storage's address can be handed to a new tensor later in the same forward.
        if record is None or record.ref.expired():
            record = self.records[key] = _StorageRecord(StorageWeakRef(storage))
            self.stats.add_saved(module_name, storage.nbytes())
        return record

    def _keep_raw(self, tensor: Tensor, module_name: str, record: _StorageRecord, reason: str) -> RawTensor | HandedOn:
        self.stats.kept[reason] += 1
        if not record.kept_raw:
            record.kept_raw = True
            nbytes = tensor.untyped_storage().nbytes()
            self.stats.add_stored(module_name, nbytes)
            if self.largest_raw is None or nbytes > self.largest_raw.nbytes:
                self.largest_raw = LargestRaw(nbytes, module_name, type(tensor.grad_fn).__name__, reason)
        return self._raw(tensor)

    def _raw(self, tensor: Tensor) -> RawTensor | HandedOn:
        if self.outer_hooks is None:
            return RawTensor(tensor.detach(), tensor._version)
        pack, unpack = self.outer_hooks
        return HandedOn(pack(tensor), unpack, version_probe(tensor), tensor._version, tensor.size())

    @contextmanager
    def tracking_modules(self) -> Iterator[None]:
        """Keep ``module_stack`` equal to the qualified names of the modules now running."""
        handles = []
        model = self.compressor.model
        if self.recomputing is None:
            modules = model.named_modules()
        else:  # only the recomputed block runs
            modules = model.get_submodule(self.recomputing).named_modules(prefix=self.recomputing)
        for name, module in modules:
            if isinstance(module, torch.jit.ScriptModule):
                continue  # takes no hooks: what it saves counts for the module that calls it
            handles.append(module.register_forward_pre_hook(functools.partial(self._enter_module, name)))
            handles.append(module.register_forward_hook(self._exit_module, always_call=True))
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def tracking_weights(self) -> AbstractContextManager[None]:
        """Inside the block, mark what is computed from parameters alone (never an activation)."""
        return self.parameters.tracking()

    def _enter_module(self, name: str, module: nn.Module, args: object) -> None:
        self.module_stack.append(name)

    def _exit_module(self, module: nn.Module, args: object, output: object) -> None:
        if self.module_stack:
            self.module_stack.pop()


def _unpack(packed: RawTensor | HandedOn | PackedTensor) -> Tensor:
    return packed.unpack()


def compress_activations(
    model: nn.Module, *, compress: bool = True, **options: Any
) -> AbstractContextManager[CompressionStats]:
    """Compress the activations ``model`` saves for backward inside the ``with`` block.

    Takes the options of :class:`~loract_lightning.options.CompressionOptions` by name and yields
    the forward's :class:`~loract_lightning.stats.CompressionStats`; ``compress=False`` only
    measures what the forward saves. Run backward after the block; the model is left exactly as
    it was.

    Example::

        with compress_activations(model, rank=0.125, layers={"*.attention.*": None}) as stats:
            loss = loss_fn(model(x), y)
        loss.backward()
        print(stats.ratio)
    """
    options = CompressionOptions(**options)
    generators = _GENERATORS.setdefault(model, {}).setdefault(options.seed, {})
    return ActivationCompressor(model, options, compress=compress, generators=generators).capture()


_GENERATORS: weakref.WeakKeyDictionary[nn.Module, dict[int, dict[torch.device, torch.Generator]]] = (
    weakref.WeakKeyDictionary()
)
"""Per model and seed, the generators that successive :func:`compress_activations` calls draw from."""


_NOT_ACTIVATIONS = frozenset({policy.PARAMETER, policy.IN_BACKWARD, policy.UNSUPPORTED})
_NEVER_FACTORIZED = frozenset({policy.NOT_FLOATING, policy.NOT_MATRIX, policy.EMPTY})
_HINTS = {
    policy.SMALL: "smaller than min_bytes",
    policy.NARROW: "narrower than min_width",
    policy.OTHER_MODULE: "saved by no module of a `saved_by` class (a compiled graph saves outside any module)",
    policy.OUTSIDE_CHECKPOINT: "outside the checkpointed modules, with compress_outside=False",
    policy.NO_SAVING: "so small that factors would not save memory",
    policy.DISABLED: "of modules whose `layers` rank is None",
}


@dataclass(frozen=True)
class LargestRaw:
    """The largest activation storage one forward kept raw: its bytes, the module running when it
    was saved, the op that made it and why it stayed raw."""

    nbytes: int
    module_name: str
    made_by: str
    reason: str


DOMINANT_SHARE = 0.4
"""A raw tensor holding at least this share of what a forward stores is worth a warning..."""
DOMINANT_BYTES = 16 << 20
"""... when it is at least this large (small models' shares say little)."""


def warn_if_one_raw_tensor_dominates(stats: CompressionStats, largest: LargestRaw | None) -> None:
    """Warn when one tensor kept raw is most of what the forward stores (the log-probabilities
    of an ordinary LM loss: tokens x vocabulary), naming it and, for a loss, the way around it."""
    if largest is None or largest.nbytes < DOMINANT_BYTES or largest.nbytes < DOMINANT_SHARE * stats.stored_bytes:
        return
    share = largest.nbytes / stats.stored_bytes
    where = repr(largest.module_name) if largest.module_name else "the root module"
    hint = ""
    if "Softmax" in largest.made_by or "NllLoss" in largest.made_by or "CrossEntropy" in largest.made_by:
        hint = (
            " It looks like the loss's log-probabilities (tokens x vocabulary), which compress badly: compute the "
            "loss over chunks of tokens instead (loract_lightning.causal_lm_loss for a causal LM, "
            "chunked_cross_entropy otherwise), so they never exist for the whole batch."
        )
    warnings.warn(
        f"LoRAct: one activation kept raw is {share:.0%} of what this training forward stores: "
        f"{largest.nbytes / 2**20:.0f} MiB made by {largest.made_by} in {where} "
        f"(kept raw: {largest.reason}).{hint}",
        stacklevel=4,
    )


def warn_if_nothing_compressed(stats: CompressionStats) -> None:
    """Warn when a training forward stored nothing in compact form, naming why."""
    if stats.compressed or stats.masks:
        return
    activations = {reason: count for reason, count in stats.kept.items() if reason not in _NOT_ACTIVATIONS}
    if not activations:
        why = "no activation reached LoRAct's saved-tensor hook (was the forward run inside the capture?)"
    else:
        # Integer ids, scalars and empty tensors are never factorized; the rest says what to change.
        tunable = {r: c for r, c in activations.items() if r not in _NEVER_FACTORIZED} or activations
        reason = max(tunable, key=tunable.__getitem__)
        kept = ", ".join(f"{name}={count}" for name, count in sorted(activations.items()))
        why = f"every activation was kept raw ({kept}); most were {_HINTS.get(reason, reason)}"
    warnings.warn(f"LoRAct compressed nothing in the first training forward: {why}.", stacklevel=4)
