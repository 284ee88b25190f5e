"""Layer mode: run chosen modules under PyTorch's own activation checkpointing.

Inside a checkpointed module autograd keeps nothing but the module's inputs (saved through the
ambient saved-tensor hooks, so LoRAct sees and compresses them); backward recomputes the module
from the rebuilt inputs. We only swap each module's ``forward`` for a call through
:func:`torch.utils.checkpoint.checkpoint` and put the original back afterwards.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from loract_lightning.policy import has_class


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
def checkpointed(modules: Mapping[str, nn.Module], hook: Callable[[Tensor], object]) -> Iterator[None]:
    """Run each of ``modules`` through non-reentrant activation checkpointing inside the block.

    ``hook`` is the pack hook that saves the inputs: where another saved-tensor hook is the
    innermost at call time (an enclosing checkpoint, the user's own or the outer recompute of one,
    or ``save_on_cpu``), the module runs as it is, so that forward and recompute do the same thing.
    """
    originals = {name: module.__dict__.get("forward") for name, module in modules.items()}
    try:
        for name, module in modules.items():
            module.forward = _checkpointed_forward(module, name, module.forward, hook)
        yield
    finally:
        for name, module in modules.items():
            if originals[name] is None:
                del module.forward
            else:
                module.forward = originals[name]


def _checkpointed_forward(module: nn.Module, name: str, forward, hook):
    def run(*args, **kwargs):
        innermost = torch._C._autograd._top_saved_tensors_default_hooks(False)
        if innermost is None or innermost[0] is not hook:
            _warn_enclosed(name)
            return forward(*args, **kwargs)
        # Tensor keyword arguments are moved into the positional ones: checkpoint saves only
        # positional tensors through saved-tensor hooks (keyword ones it keeps by reference).
        args, kwargs = without_cache(args, kwargs)
        tensor_keys = [key for key, value in kwargs.items() if isinstance(value, Tensor)]
        other_kwargs = {key: value for key, value in kwargs.items() if key not in tensor_keys}
        num_args = len(args)

        def call(*flat_args):
            tensor_kwargs = dict(zip(tensor_keys, flat_args[num_args:], strict=True))
            with buffers_kept_in_recompute(module):
                return forward(*flat_args[:num_args], **tensor_kwargs, **other_kwargs)

        return checkpoint(call, *args, *(kwargs[key] for key in tensor_keys), use_reentrant=False)

    return run


@contextmanager
def buffers_kept_in_recompute(module: nn.Module) -> Iterator[None]:
    """In backward's recompute of ``module``, put its buffers back as the forward left them.

    The recompute runs the module in train mode again: BatchNorm would update its running
    statistics (and ``num_batches_tracked``) a second time.
    """
    buffers = list(module.buffers())
    if torch._C._current_graph_task_id() == -1 or not buffers:  # the forward itself
        yield
        return
    kept = [buffer.clone() for buffer in buffers]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in zip(buffers, kept, strict=True):
                buffer.copy_(value)


def _warn_enclosed(name: str) -> None:
    # Python's default filter shows each message once.
    warnings.warn(
        f"LoRAct: checkpoint target {name!r} runs inside another activation checkpoint (or under another "
        "saved-tensor hook, such as save_on_cpu); it is not checkpointed again and its input is not "
        "compressed. Leave it out of `checkpoint`, or remove the enclosing checkpoint.",
        stacklevel=3,
    )
