"""The module a user wrote, under the wrappers that would prefix its module names."""

from __future__ import annotations

from torch import nn

from loract_lightning.policy import has_class


def user_module(model: nn.Module) -> nn.Module:
    """``model`` without Fabric's wrapper: ``fabric.setup(model)`` returns a ``_FabricModule``
    whose module names gain ``_forward_module.`` (``_forward_module.module.`` under DDP), so
    ``layers`` and ``checkpoint`` patterns written as the user names the modules would match
    nothing. The wrapper's forward runs the user's module, whose submodules are the same objects,
    so hooks and checkpointing set on them work through it. Any other module is returned as it is.
    """
    while has_class(model, ["_FabricModule"]) and isinstance(getattr(model, "_original_module", None), nn.Module):
        model = model._original_module
    return model
