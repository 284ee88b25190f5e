"""Layer mode: run chosen modules under PyTorch's own activation checkpointing.

Inside a checkpointed module autograd keeps nothing but the module's inputs (saved through the
ambient saved-tensor hooks, so LoRAct sees and compresses them); backward recomputes the module
from the rebuilt inputs. We only swap each module's ``forward`` for a call through
:func:`torch.utils.checkpoint.checkpoint` and put the original back afterwards.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


def select_modules(model: nn.Module, targets: Sequence[str]) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """Split the outermost modules matching ``targets`` into (to wrap, already checkpointed).

    A target is a class name (``"LlamaDecoderLayer"``) or a glob on qualified names
    (``"encoder.layer.*"``); one that matches nothing raises a ValueError. A match that already
    runs under checkpointing is not wrapped twice: under a torch ``CheckpointWrapper`` (what
    Lightning's FSDP ``activation_checkpointing_policy`` applies) its wrapper is returned in the
    second dict, since that wrapper saves the inputs through saved-tensor hooks and they can still
    be compressed; under a transformers model's own gradient checkpointing it is skipped. Both
    cases warn.
    """
    to_wrap: dict[str, nn.Module] = {}
    existing: dict[str, nn.Module] = {}
    matched = dict.fromkeys(targets, False)
    skipped = []
    for name, module in model.named_modules():
        hits = [t for t in targets if type(module).__name__ == t or (name and fnmatch.fnmatchcase(name, t))]
        if not hits:
            continue
        matched.update(dict.fromkeys(hits, True))
        if any(name.startswith(f"{outer}.") for outer in [*to_wrap, *existing]):
            continue
        checkpointing_ancestor = _checkpointing_ancestor(model, name)
        if checkpointing_ancestor is None:
            to_wrap[name] = module
        elif type(model.get_submodule(checkpointing_ancestor)).__name__ == "CheckpointWrapper":
            existing[checkpointing_ancestor] = model.get_submodule(checkpointing_ancestor)
        else:
            skipped.append(name)
    missing = [target for target, hit in matched.items() if not hit]
    if missing:
        classes = sorted({type(m).__name__ for m in model.modules()})[:8]
        names = [name for name, _ in model.named_modules()][1:6]
        raise ValueError(
            f"checkpoint target(s) {missing} match no module of {type(model).__name__}; "
            f"give class names such as {classes} or globs on names such as {names}"
        )
    if existing:
        warnings.warn(
            f"LoRAct: {len(existing)} module(s) already run under a CheckpointWrapper (e.g. {list(existing)[:2]}); "
            "not wrapping them again, their saved inputs are compressed",
            stacklevel=3,
        )
    if skipped:
        warnings.warn(
            f"LoRAct: skipping {len(skipped)} module(s) under the model's own gradient checkpointing "
            f"(e.g. {skipped[:2]}); their inputs stay raw. Turn it off to use layer mode on them.",
            stacklevel=3,
        )
    return to_wrap, existing


def _checkpointing_ancestor(model: nn.Module, name: str) -> str | None:
    """Name of the outermost module on the path to ``name`` that runs activation checkpointing."""
    parts = name.split(".") if name else []
    module = model
    for depth in range(len(parts) + 1):
        if depth:
            module = module.get_submodule(parts[depth - 1])
        if type(module).__name__ == "CheckpointWrapper" or getattr(module, "gradient_checkpointing", False):
            return ".".join(parts[:depth])
    return None


@contextmanager
def checkpointed(modules: Mapping[str, nn.Module]) -> Iterator[None]:
    """Run each of ``modules`` through non-reentrant activation checkpointing inside the block."""
    originals = {name: module.__dict__.get("forward") for name, module in modules.items()}
    try:
        for module in modules.values():
            module.forward = _checkpointed_forward(module.forward)
        yield
    finally:
        for name, module in modules.items():
            if originals[name] is None:
                del module.forward
            else:
                module.forward = originals[name]


def _checkpointed_forward(forward):
    def run(*args, **kwargs):
        # Tensor keyword arguments are moved into the positional ones: checkpoint saves only
        # positional tensors through saved-tensor hooks (keyword ones it keeps by reference).
        tensor_keys = [key for key, value in kwargs.items() if isinstance(value, Tensor)]
        other_kwargs = {key: value for key, value in kwargs.items() if key not in tensor_keys}
        num_args = len(args)

        def call(*flat_args):
            tensor_kwargs = dict(zip(tensor_keys, flat_args[num_args:], strict=True))
            return forward(*flat_args[:num_args], **tensor_kwargs, **other_kwargs)

        return checkpoint(call, *args, *(kwargs[key] for key in tensor_keys), use_reentrant=False)

    return run
