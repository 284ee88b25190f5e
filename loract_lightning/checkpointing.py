"""Layer mode: run chosen modules under PyTorch's own activation checkpointing.

Inside a checkpointed module autograd keeps nothing but the module's inputs (saved through the
ambient saved-tensor hooks, so LoRAct sees and compresses them); backward recomputes the module
from the rebuilt inputs. We only swap each module's ``forward`` for a call through
:func:`torch.utils.checkpoint.checkpoint` and put the original back afterwards.
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.utils import _pytree as pytree
from torch.utils.checkpoint import checkpoint

from loract_lightning.packed import check_version, version_probe
from loract_lightning.policy import has_class

if TYPE_CHECKING:
    from loract_lightning.token_chunks import TokenChunks


def select_modules(model: nn.Module, targets: Sequence[str]) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """Split the outermost modules matching ``targets`` into (to wrap, already checkpointed).

    A target is a class name (``"LlamaDecoderLayer"``) or a glob on qualified names
    (``"encoder.layer.*"``); one that matches nothing raises a ValueError. A match that already
    runs under checkpointing is not wrapped twice: its checkpointing ancestor (a torch
    ``CheckpointWrapper``, what Lightning's FSDP ``activation_checkpointing_policy`` applies, or a
    transformers layer under ``gradient_checkpointing_enable()``) is returned in the second dict,
    since both save the layer's inputs through saved-tensor hooks while the layer's forward hooks
    run, so they are compressed like those of a module LoRAct wraps. A warning says so. A model
    that checkpoints its layers from its own forward loop (older transformers) raises a
    ValueError: the inputs it saves cannot be told apart from the rest.
    """
    to_wrap: dict[str, nn.Module] = {}
    existing: dict[str, nn.Module] = {}
    matched = dict.fromkeys(targets, False)
    looping = []
    for name, module in model.named_modules():
        hits = [t for t in targets if has_class(module, [t]) or (name and fnmatch.fnmatchcase(name, t))]
        if not hits:
            continue
        matched.update(dict.fromkeys(hits, True))
        if any(name.startswith(f"{outer}.") for outer in [*to_wrap, *existing]):
            continue
        checkpointing_ancestor = _checkpointing_ancestor(model, name)
        if checkpointing_ancestor is None:
            to_wrap[name] = module
        elif _checkpoints_its_own_forward(model.get_submodule(checkpointing_ancestor)):
            existing[checkpointing_ancestor] = model.get_submodule(checkpointing_ancestor)
        else:
            looping.append(checkpointing_ancestor)
    scripted = [name for name, module in to_wrap.items() if isinstance(module, torch.jit.ScriptModule)]
    if scripted:
        raise ValueError(
            f"checkpoint target(s) {scripted} are TorchScript modules, whose forward cannot be run under "
            "activation checkpointing; leave them out of `checkpoint` or checkpoint their eager parent"
        )
    missing = [target for target, hit in matched.items() if not hit]
    if missing:
        classes = sorted({type(m).__name__ for m in model.modules()})[:8]
        names = [name for name, _ in model.named_modules()][1:6]
        raise ValueError(
            f"checkpoint target(s) {missing} match no module of {type(model).__name__}; "
            f"give class names such as {classes} or globs on names such as {names}"
        )
    if looping:
        raise ValueError(
            f"checkpoint target(s) {targets} run under the gradient checkpointing of {sorted(set(looping))[:2]}, "
            "which checkpoints its layers from its own forward; call model.gradient_checkpointing_disable() "
            "(timm: model.set_grad_checkpointing(False)) "
            "and let LoRAct's layer mode checkpoint them"
        )
    if existing:
        warnings.warn(
            f"LoRAct: {len(existing)} module(s) already run under activation checkpointing "
            f"(e.g. {list(existing)[:2]}); not wrapping them again, their saved inputs are compressed (layer mode)",
            stacklevel=3,
        )
    return to_wrap, existing


def checkpointed_by_others(model: nn.Module) -> list[str]:
    """Names of the outermost modules that already checkpoint their own forward (a torch
    ``CheckpointWrapper``, a transformers layer under ``gradient_checkpointing_enable()``)."""
    names: list[str] = []
    for name, module in model.named_modules():
        if _checkpoints_its_own_forward(module) and not any(name.startswith(f"{outer}.") for outer in names):
            names.append(name)
    return names


def _checkpointing_ancestor(model: nn.Module, name: str) -> str | None:
    """Name of the outermost module on the path to ``name`` (itself included) under whose
    activation checkpointing ``name`` runs, or None."""
    parts = name.split(".") if name else []
    own_layers = any(_is_transformers_layer(m) for m in model.modules())
    module = model
    for depth in range(len(parts) + 1):
        if depth:
            module = module.get_submodule(parts[depth - 1])
        if _checkpoints_its_own_forward(module):
            return ".".join(parts[:depth])
        # Older transformers (and timm): the model's flag makes its forward loop checkpoint each layer.
        if (getattr(module, "gradient_checkpointing", False) and not own_layers) or _timm_checkpoints(module):
            return ".".join(parts[:depth])
    return None


def _timm_checkpoints(module: nn.Module) -> bool:
    """A timm model under ``set_grad_checkpointing()``: its forward checkpoints its blocks."""
    return bool(getattr(module, "grad_checkpointing", False)) and hasattr(module, "set_grad_checkpointing")


def _is_transformers_layer(module: nn.Module) -> bool:
    return has_class(module, ["GradientCheckpointingLayer"])


def _checkpoints_its_own_forward(module: nn.Module) -> bool:
    """A CheckpointWrapper, or a transformers ``GradientCheckpointingLayer`` with checkpointing on
    (transformers >= 5 checkpoints the layer's ``forward`` inside its ``__call__``)."""
    if has_class(module, ["CheckpointWrapper"]):
        return True
    return _is_transformers_layer(module) and bool(getattr(module, "gradient_checkpointing", False))


CACHE_ARGUMENTS = ("cache", "past_key_value", "past_key_values", "layer_past")
"""Keyword arguments through which transformers layers receive a KV cache (by version and model);
a transformers ``Cache`` object is recognised in any argument, positional ones included (GPT-2)."""


def without_cache(args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``args`` and ``kwargs`` with the KV cache off: a recompute would write its keys and values a
    second time (keys doubled in backward).

    A cache is a transformers ``Cache`` (in any argument) or, under one of :data:`CACHE_ARGUMENTS`,
    a non-empty legacy tuple/list of keys and values; a tensor never is one (a tensor argument
    named ``cache`` is an input), and an empty tuple/list holds no states: both are left as they
    are. Raises a ValueError for a cache that already holds states (a prefix): the checkpointed
    module reads them, and dropping them would change its output.
    """
    args = tuple(_no_cache(value, f"argument {i}") if _is_cache(value) else value for i, value in enumerate(args))
    kwargs = {
        key: _no_cache(value, key)
        if _is_cache(value) or (key in CACHE_ARGUMENTS and isinstance(value, (tuple, list)) and len(value) > 0)
        else value
        for key, value in kwargs.items()
    }
    if kwargs.get("use_cache"):
        kwargs["use_cache"] = False
    return args, kwargs


def _is_cache(value: object) -> bool:
    return not isinstance(value, Tensor) and hasattr(value, "get_seq_length")


def _no_cache(cache: object, where: str) -> None:
    """None for a transformers ``Cache`` that holds no states; a ValueError for one that does, and
    for a (non-empty) legacy tuple/list cache."""
    length = cache.get_seq_length() if _is_cache(cache) else None
    if length == 0:
        return None
    holds = f"length {length}" if length is not None else f"a non-empty legacy {type(cache).__name__}"
    raise ValueError(
        f"layer mode cannot checkpoint a module that reads a KV cache holding states ({where}, "
        f"{holds}): its recompute in backward would see a different cache. Train without a "
        "prefilled cache, or leave this module out of `checkpoint`."
    )


@contextmanager
def checkpointed(
    modules: Mapping[str, nn.Module],
    hook: Callable[[Tensor], object],
    recompute: Callable[[str], AbstractContextManager] | None = None,
    chunks: TokenChunks | None = None,
) -> Iterator[None]:
    """Run each of ``modules`` under activation checkpointing inside the block.

    ``hook`` is the pack hook that saves the inputs: where another saved-tensor hook is the
    innermost at call time (an enclosing checkpoint, the user's own or the outer recompute of one,
    or ``save_on_cpu``), the module runs as it is, so that forward and recompute do the same thing.
    ``recompute(name)``: a context to recompute module ``name`` in (``compress_recompute``),
    through :class:`RecomputeInContext`; None: PyTorch's non-reentrant checkpoint. ``chunks``:
    the blocks' MLPs run over chunks of tokens, in the forward and every recompute alike.
    """
    with swapped_forwards(
        modules, lambda name, module: _checkpointed_forward(module, name, module.forward, hook, recompute, chunks)
    ):
        yield


@contextmanager
def swapped_forwards(modules: Mapping[str, nn.Module], wrap: Callable[[str, nn.Module], Callable]) -> Iterator[None]:
    """Each of ``modules`` (by name) runs ``wrap(name, module)`` as its ``forward`` inside the
    block; the original (a class method or an instance attribute) is put back afterwards."""
    originals = {name: module.__dict__.get("forward") for name, module in modules.items()}
    try:
        for name, module in modules.items():
            module.forward = wrap(name, module)
        yield
    finally:
        for name, module in modules.items():
            if originals[name] is None:
                del module.forward
            else:
                module.forward = originals[name]


def _checkpointed_forward(module: nn.Module, name: str, forward, hook, recompute, chunks):
    def run(*args, **kwargs):
        innermost = torch._C._autograd._top_saved_tensors_default_hooks(False)
        if innermost is None or innermost[0] is not hook:
            _warn_enclosed(name)
            return forward(*args, **kwargs)
        args, kwargs = without_cache(args, kwargs)
        # Every tensor argument goes in positionally, each distinct tensor once: checkpoint saves
        # only positional tensors through saved-tensor hooks (keyword ones it keeps by reference),
        # and a block called as ``attention(h, h, h)`` must see one tensor three times in its
        # recompute too (it may branch on ``query is key``).
        keys, values = list(kwargs), [*args, *kwargs.values()]
        distinct: list[Tensor] = []
        slots: list[int | None] = []
        for value in values:
            slot = next((i for i, tensor in enumerate(distinct) if tensor is value), None)
            if slot is None and isinstance(value, Tensor):
                distinct.append(value)
                slot = len(distinct) - 1
            slots.append(slot)
        constants = [None if slot is not None else value for slot, value in zip(slots, values, strict=True)]
        num_args = len(args)
        buffers = ForwardBuffers(module)
        # torch.compile traces PyTorch's own checkpoint, not LoRAct's.
        pytorch_checkpoint = recompute is None or torch.compiler.is_compiling()

        def call(*tensors):
            values = [tensors[s] if s is not None else c for s, c in zip(slots, constants, strict=True)]
            # RecomputeInContext sets the buffers itself, around its recompute and backward.
            with (
                buffers.as_in_forward() if pytorch_checkpoint else contextlib.nullcontext(),
                chunks.running(name) if chunks is not None else contextlib.nullcontext(),
            ):
                return forward(*values[:num_args], **dict(zip(keys, values[num_args:], strict=True)))

        if pytorch_checkpoint:
            return checkpoint(call, *distinct, use_reentrant=False)
        return RecomputeInContext.run(call, functools.partial(recompute, name), buffers, *distinct)

    return run


class RecomputeInContext(torch.autograd.Function):
    """Activation checkpointing whose recompute runs inside a context of the caller's.

    Forward runs ``function`` without saving anything but its tensor inputs (through the
    saved-tensor hooks in place, so layer mode compresses them); backward rebuilds them, runs
    ``function`` again inside ``recompute_context()`` (with the forward's random state and
    autocast), and backpropagates through that. PyTorch's own checkpoint stores what its
    recompute saves where no saved-tensor hook can reach it; here LoRAct's hooks see it.
    Its arguments are tensors (``run`` passes each distinct tensor argument of the module once);
    outputs may be any nesting of tuples, lists and dicts of tensors.
    """

    @staticmethod
    def run(function: Callable, recompute_context: Callable[[], AbstractContextManager], buffers, *args: Tensor):
        """``function(*args)``, recomputed in backward inside ``recompute_context()`` with
        ``buffers`` (:class:`ForwardBuffers`) as the forward found them, and put back as it left
        them after that backward."""
        # A tensor that requires grad, so that the output does even when no input does (the
        # first block of a model whose embeddings are frozen), and backward reaches the block.
        anchor = torch.empty(0, requires_grad=True)
        structure: list = []
        leaves = RecomputeInContext.apply(anchor, (function, recompute_context, buffers), structure, *args)
        return pytree.tree_unflatten(list(leaves), structure[0])

    @staticmethod
    def forward(ctx, anchor, call, structure, *args):
        ctx.function, ctx.recompute_context, ctx.buffers = call
        ctx.save_for_backward(*args)
        # A Function's saved tensors are packed once forward returns: a write to an input inside
        # the block would go unseen, and the recompute would read the written values.
        ctx.input_versions = [(version_probe(arg), arg._version, arg.size()) for arg in args]
        ctx.devices = sorted({arg.device for arg in args if arg.device.type == "cuda"}, key=str)
        ctx.rng_states = (torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in ctx.devices])
        ctx.autocast = {
            device: (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
            for device in ("cpu", "cuda")
            if device == "cpu" or ctx.devices
        }
        leaves, spec = pytree.tree_flatten(ctx.function(*args))
        structure.append(spec)
        return tuple(leaves)

    @staticmethod
    def backward(ctx, *grads):
        if not torch.autograd._is_checkpoint_valid():
            raise RuntimeError(
                "LoRAct's compressed recompute (layer mode, compress_recompute=True) backpropagates through "
                "each block with loss.backward(); it cannot serve torch.autograd.grad or backward(inputs=...). "
                "Set compress_recompute=False to use PyTorch's checkpoint instead."
            )
        for probe, version, size in ctx.input_versions:
            check_version(probe, version, size)
        needs_grad = ctx.needs_input_grad[3:]  # after anchor, call and structure
        args = [
            tensor.detach().requires_grad_(needs) for tensor, needs in zip(ctx.saved_tensors, needs_grad, strict=True)
        ]
        with ctx.buffers.as_in_forward():
            return RecomputeInContext._recompute_and_backpropagate(ctx, args, grads)

    @staticmethod
    def _recompute_and_backpropagate(ctx, args: list, grads: tuple) -> tuple:
        with torch.random.fork_rng(devices=ctx.devices), torch.enable_grad():
            torch.set_rng_state(ctx.rng_states[0])
            for device, state in zip(ctx.devices, ctx.rng_states[1], strict=True):
                torch.cuda.set_rng_state(state, device)
            autocasts = [torch.autocast(d, enabled=on, dtype=dtype) for d, (on, dtype) in ctx.autocast.items()]
            with contextlib.ExitStack() as stack:
                for autocast in autocasts:
                    stack.enter_context(autocast)
                stack.enter_context(ctx.recompute_context())
                outputs, _ = pytree.tree_flatten(ctx.function(*args))
        pairs = [
            (output, grad)
            for output, grad in zip(outputs, grads, strict=True)
            if isinstance(output, Tensor) and output.requires_grad and grad is not None
        ]
        if pairs:
            torch.autograd.backward([output for output, _ in pairs], [grad for _, grad in pairs])
        return (None, None, None, *(arg.grad for arg in args))


class ForwardBuffers:
    """A checkpointed module's buffers as its forward found them, for its recompute in backward.

    A block that reads state it also updates (spectral norm's power iteration, a VQ codebook's
    moving average) must be recomputed with the values its forward read, and a recompute must
    not update them again (BatchNorm's running statistics): :meth:`as_in_forward` sets them for
    the recompute and puts back what the forward left.
    """

    def __init__(self, module: nn.Module) -> None:
        # Bool buffers are masks (GPT-2's causal mask, 1 MiB a block), which no forward updates.
        self.buffers = [buffer for buffer in module.buffers() if buffer.dtype != torch.bool]
        with torch.no_grad():
            self.found = [buffer.clone() for buffer in self.buffers]

    @contextmanager
    def as_in_forward(self) -> Iterator[None]:
        if torch._C._current_graph_task_id() == -1 or not self.buffers:  # the forward itself
            yield
            return
        with torch.no_grad():
            left = [buffer.clone() for buffer in self.buffers]
            for buffer, value in zip(self.buffers, self.found, strict=True):
                buffer.copy_(value)
        try:
            yield
        finally:
            with torch.no_grad():
                for buffer, value in zip(self.buffers, left, strict=True):
                    buffer.copy_(value)


def _warn_enclosed(name: str) -> None:
    # Python's default filter shows each message once.
    warnings.warn(
        f"LoRAct: checkpoint target {name!r} runs inside another activation checkpoint (or under another "
        "saved-tensor hook, such as save_on_cpu); it is not checkpointed again and its input is not "
        "compressed. Leave it out of `checkpoint`, or remove the enclosing checkpoint.",
        stacklevel=3,
    )
