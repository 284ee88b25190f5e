"""What is not an activation: parameters, buffers and everything computed from them alone.

An activation depends on the model's input; a weight does not. LoRAct factorizes activations
only, so the pack hook asks :class:`ParameterIndex` whether a saved tensor is parameter-like:

- it shares storage with a parameter or buffer (``F.linear`` saves ``weight.t()``, a view);
- it was computed, during this forward, from parameters and buffers alone: weight norm,
  spectral norm, pruning masks, a merged LoRA weight ``W + B @ A``, a fused qkv weight built by
  ``torch.cat``, MAML fast weights through ``functional_call``. :meth:`ParameterIndex.tracking`
  watches every torch function call of the forward (a ``TorchFunctionMode``) and marks the
  outputs of calls whose tensor inputs are all parameter-like, what such a call saves (``exp``
  saves its output), and whatever a linear or conv layer takes as its weight;
- it was made inside a call on a quantized weight (a tensor subclass such as torchao's int8 or
  NF4 weights: the call dequantizes it and autograd saves the plain copy) and is not one of the
  call's own plain inputs;
- it is an autocast copy of one of those (a new storage made inside the dispatcher, where the
  mode cannot see it): a chain of casts and views leads back to a parameter or to a marked
  tensor, or, for frozen weights (no history at all), its shape and leading values match a
  parameter (or a broadcast copy of one). A frozen weight computed in forward is cast in sight
  of the mode instead.

Marking errs on the safe side: a tensor wrongly taken for parameter-like is only kept raw.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode


def owns_storage(tensor: Tensor) -> bool:
    """Whether ``tensor`` has a plain storage of its own to read (not a wrapper subclass such as
    DTensor or a torchao quantized weight, whose ``data_ptr`` is not to be touched)."""
    return type(tensor).__torch_dispatch__ is Tensor.__torch_dispatch__ and tensor.layout == torch.strided


_DERIVED = "loract_computed_from_parameters"
"""Key of the autograd-node metadata that marks a tensor computed from parameters alone."""


class ParameterIndex:
    """Recognises the parameters and buffers of ``model``, and tensors computed from them alone,
    in whatever form autograd saves them (see the module docstring)."""

    _HISTORY_DEPTH = 8
    # Autograd nodes that only cast or re-view their single input.
    _CAST_OR_VIEW = frozenset(
        {
            "ToCopyBackward",
            "CloneBackward",  # matmul's contiguous copy of a broadcast weight
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
        tensors = [*model.parameters(), *model.buffers()]
        self._ids = {id(t) for t in tensors}
        # A sharded (DTensor) parameter has no storage of its own: its local shard has. The
        # unsharded copy that the forward saves is recognised by its history instead.
        plain = [t for t in (getattr(t, "_local_tensor", t) for t in tensors) if owns_storage(t)]
        self._storages = {t.untyped_storage().data_ptr() for t in plain if t.numel() > 0}
        self._by_shape: dict[tuple[int, ...], list[Tensor]] = {}
        self._by_matrix_shape: dict[tuple[int, ...], list[Tensor]] = {}
        for tensor in plain:
            if tensor.ndim >= 2 and tensor.is_floating_point():
                self._by_shape.setdefault(tuple(tensor.shape), []).append(tensor)
                self._by_matrix_shape.setdefault(tuple(tensor.shape[-2:]), []).append(tensor)
        self._derived: dict[int, StorageWeakRef] = {}
        """Storages computed from parameters alone in this forward, by address."""
        self._running_calls: list[set[int]] = []
        """For each call now running on parameter-like inputs (see :meth:`running`): the storages
        among what it saves that may be activations (its own plain activation inputs)."""

    def __contains__(self, tensor: Tensor) -> bool:
        """Whether the saved ``tensor`` is parameter-like (never an activation)."""
        if self.holds(tensor):
            return True
        if self._running_calls and tensor.untyped_storage().data_ptr() not in self._running_calls[-1]:
            return True  # made from the weights inside the call (a dequantized copy, exp's output)
        if tensor.grad_fn is not None:
            return self._history_reaches_parameter(tensor)
        return tensor.ndim >= 2 and self._is_cast_copy(tensor)

    def holds(self, tensor: Tensor) -> bool:
        """Cheap check (no values read): a parameter or buffer, a view of one, or a tensor marked
        as computed from them."""
        if id(tensor) in self._ids:
            return True
        if not owns_storage(tensor):
            return False
        address = tensor.untyped_storage().data_ptr()
        if address in self._storages:
            return True
        ref = self._derived.get(address)
        if ref is not None and ref.expired():  # freed; the address may now hold an activation
            del self._derived[address]
            return False
        return ref is not None

    def mark(self, tensor: Tensor) -> None:
        """Record ``tensor`` as computed from parameters and buffers alone."""
        if not owns_storage(tensor) or tensor.numel() == 0:
            return
        storage = tensor.untyped_storage()
        self._derived[storage.data_ptr()] = StorageWeakRef(storage)
        if tensor.grad_fn is not None:
            # Marked on the node itself (its metadata lives as long as the node), so an autocast
            # copy's history finds it without this index holding the graph.
            tensor.grad_fn.metadata[_DERIVED] = True

    @contextmanager
    def running(self, activation_inputs: list[Tensor]) -> Iterator[None]:
        """Inside the block, a call on parameter-like inputs runs: what it saves is parameter-like
        unless it is one of ``activation_inputs`` (or a view of one)."""
        self._running_calls.append({t.untyped_storage().data_ptr() for t in activation_inputs if owns_storage(t)})
        try:
            yield
        finally:
            self._running_calls.pop()

    @contextmanager
    def tracking(self) -> Iterator[None]:
        """Mark, inside the block, what torch calls compute from parameters and buffers alone."""
        with _DerivedFromParameters(self):
            yield

    def _history_reaches_parameter(self, tensor: Tensor) -> bool:
        """A chain of casts/views leads from ``tensor`` to a leaf parameter or a marked tensor."""
        node = tensor.grad_fn
        for _ in range(self._HISTORY_DEPTH):
            if node.metadata.get(_DERIVED):
                return True
            if type(node).__name__.rstrip("0123456789") not in self._CAST_OR_VIEW:
                return False
            inputs = [fn for fn, _ in node.next_functions if fn is not None]
            if len(inputs) != 1:
                return False
            node = inputs[0]
            if hasattr(node, "variable"):  # AccumulateGrad: the chain started at a leaf parameter
                return True
        return bool(node.metadata.get(_DERIVED))

    def _is_cast_copy(self, tensor: Tensor) -> bool:
        """Whether ``tensor`` has the shape of a parameter (of any rank: conv weights are 4-D) and
        the same leading values, is the transpose of a 2-D one (``F.linear`` saves ``weight.t()``),
        or a broadcast copy of one (``matmul`` copies a per-head weight out to every batch)."""
        candidates = self._by_shape.get(tuple(tensor.shape), [])
        if tensor.ndim > 2:
            candidates = candidates + self._by_matrix_shape.get(tuple(tensor.shape[-2:]), [])
        for param in candidates:
            if torch.equal(_head(tensor), _head(param).to(tensor.dtype)):
                return True
        if tensor.ndim == 2:
            for param in self._by_shape.get(tuple(tensor.shape[::-1]), []):
                if torch.equal(_head(tensor.T), _head(param).to(tensor.dtype)):
                    return True
        return False


class _DerivedFromParameters(TorchFunctionMode):
    """Marks the tensor outputs of every torch call whose tensor inputs are all parameter-like.

    A call with no tensor input (``torch.arange``, ``torch.randn``: a generator's noise input)
    marks nothing: what it makes depends on the batch's shape, not only on the weights.
    """

    def __init__(self, index: ParameterIndex) -> None:
        super().__init__()
        self.index = index

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.compiler.is_compiling():  # traced by torch.compile: nothing real to mark
            return func(*args, **kwargs)
        if func in _TAKES_WEIGHT:
            args, kwargs = self._with_marked_weight(func, args, kwargs)
        inputs = _tensors_in(args) + _tensors_in(kwargs)
        held = [self.index.holds(tensor) for tensor in inputs]
        if inputs and all(held):
            # Computed from the weights alone: so is all it saves (exp and tanh save their output
            # before it returns) and all it returns.
            with self.index.running([]):
                result = func(*args, **kwargs)
            for tensor in _tensors_in(result):
                self.index.mark(tensor)
            return result
        if any(is_held and not owns_storage(t) for t, is_held in zip(inputs, held, strict=True)):
            # A quantized weight: what the call saves beyond its plain inputs (the weight's
            # dequantized copy) was made from the weight.
            with self.index.running([t for t, is_held in zip(inputs, held, strict=True) if not is_held]):
                return func(*args, **kwargs)
        return func(*args, **kwargs)

    def _with_marked_weight(self, func, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Mark what a linear or conv layer is given as its weight: a weight, even when it was
        computed from the input too (MAML's fast weights), never an activation to factorize.

        Under autocast, a weight with no autograd history (computed from frozen parameters) is
        cast here rather than inside the call, where the copy would be made out of sight.
        """
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        if not isinstance(weight, Tensor):
            return args, kwargs
        self.index.mark(weight)
        device = weight.device.type
        autocast_copy = (
            func is not F.bilinear
            and weight.dtype == torch.float32
            and weight.grad_fn is None
            and id(weight) not in self.index._ids  # a parameter's copy is found by its values
            and torch.is_autocast_enabled(device)
        )
        if not autocast_copy:
            return args, kwargs
        cast = weight.to(torch.get_autocast_dtype(device))
        self.index.mark(cast)
        if len(args) > 1:
            return (args[0], cast, *args[2:]), kwargs
        return args, kwargs | {"weight": cast}


_TAKES_WEIGHT = frozenset(
    {
        F.linear,
        F.bilinear,
        F.conv1d,
        F.conv2d,
        F.conv3d,
        F.conv_transpose1d,
        F.conv_transpose2d,
        F.conv_transpose3d,
    }
)
"""Functions whose second argument (or ``weight``) is a layer's weight."""


def _tensors_in(value: object) -> list[Tensor]:
    """The tensors in ``value``, looking into tuples, lists and dicts (``torch.cat``'s list)."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [tensor for item in value for tensor in _tensors_in(item)]
    if isinstance(value, dict):
        return [tensor for item in value.values() for tensor in _tensors_in(item)]
    return []


def _head(tensor: Tensor, rows: int = 2, cols: int = 8) -> Tensor:
    """A few leading values: the first ``rows`` x ``cols`` corner of the last two dimensions."""
    return tensor[(0,) * (tensor.ndim - 2)][:rows, :cols]
