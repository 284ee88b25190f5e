"""LoRActStrategyMixin: what makes a Lightning strategy compress the training forward."""

from __future__ import annotations

import dataclasses
import difflib
import inspect
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Checkpoint
from typing_extensions import override

from loract_lightning.loract import LoRAct
from loract_lightning.options import CompressionOptions

OPTION_NAMES = frozenset(field.name for field in dataclasses.fields(CompressionOptions))
"""The keyword arguments a LoRAct strategy takes for itself: the options of ``LoRAct``."""


class LoRActStrategyMixin:
    r"""Mix into a Lightning ``Strategy`` to compress every training forward with LoRAct.

    The strategy takes LoRAct's options by name beside its own arguments and builds a
    :class:`~loract_lightning.LoRAct` callback from them (``self.loract``), which it adds to the
    trainer's callbacks when the trainer connects the model, ahead of any ``ModelCheckpoint``
    (so a ``monitor="loract/ratio"`` sees the step's value). All the work is that callback's:
    the strategy form and the callback form are one implementation, log the same ``loract/*``
    metrics and keep the same state in checkpoints. A ``LoRAct`` callback given to the Trainer
    as well is a ValueError: the forward would be compressed twice.

    Put it first in the bases: ``class MyStrategy(LoRActStrategyMixin, DeepSpeedStrategy)``.
    :class:`~loract_lightning.strategies.LoRActStrategy`,
    :class:`~loract_lightning.strategies.LoRActDDPStrategy`,
    :class:`~loract_lightning.strategies.LoRActFSDPStrategy` and
    :class:`~loract_lightning.strategies.LoRActModelParallelStrategy` are made this way (and are
    the ones tested).

    Args:
        \*args: the strategy's own positional arguments.
        \**kwargs: LoRAct's options (``rank``, ``checkpoint``, ``layers``, ..., every field of
            :class:`~loract_lightning.options.CompressionOptions`, with the same defaults) and the
            strategy's own keyword arguments; a bad option raises as ``LoRAct`` raises it.

    Example::

        from lightning import Trainer
        from lightning.pytorch.strategies import DeepSpeedStrategy
        from loract_lightning.strategies import LoRActStrategyMixin

        class LoRActDeepSpeedStrategy(LoRActStrategyMixin, DeepSpeedStrategy):
            pass

        trainer = Trainer(strategy=LoRActDeepSpeedStrategy(stage=2, rank=0.25, checkpoint=["Block"]))
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        options = {name: kwargs.pop(name) for name in list(kwargs) if name in OPTION_NAMES}
        self._check_no_misspelled_option(kwargs)
        self.loract = LoRAct(**options)
        """The callback that does the work, added to the trainer's callbacks by :meth:`connect`."""
        super().__init__(*args, **kwargs)

    def _check_no_misspelled_option(self, kwargs: dict[str, Any]) -> None:
        """A keyword the strategy does not name itself but that is close to a LoRAct option is
        a ValueError: DDP and FSDP pass unknown keywords on to torch, which would refuse it late."""
        strategy = next(cls for cls in type(self).__mro__[1:] if not issubclass(cls, LoRActStrategyMixin))
        named = set(inspect.signature(strategy.__init__).parameters)
        for name in kwargs.keys() - named:
            if near := difflib.get_close_matches(name, OPTION_NAMES, n=1, cutoff=0.7):
                raise ValueError(
                    f"{type(self).__name__}: {name}={kwargs[name]!r} is neither a LoRAct option nor an argument of "
                    f"{strategy.__name__}; did you mean {near[0]!r}? LoRAct's options: {sorted(OPTION_NAMES)}"
                )

    @override
    def connect(self, model: pl.LightningModule) -> None:
        super().connect(model)  # type: ignore[misc]
        callbacks = model.trainer.callbacks
        others = [callback for callback in callbacks if isinstance(callback, LoRAct) and callback is not self.loract]
        if others:
            raise ValueError(
                f"{type(self).__name__} compresses the training forward itself, and the Trainer also has a "
                f"{type(others[0]).__name__} callback: remove it from Trainer(callbacks=...) and give its options "
                f"to the strategy, or use a plain strategy with the callback"
            )
        if self.loract not in callbacks:
            # Ahead of the checkpoint callbacks, as Lightning orders them: they read this step's metrics.
            index = next((i for i, c in enumerate(callbacks) if isinstance(c, Checkpoint)), len(callbacks))
            callbacks.insert(index, self.loract)
