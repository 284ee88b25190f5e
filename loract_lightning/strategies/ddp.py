"""LoRActDDPStrategy: DDP that compresses the training forward (``"loract_ddp"``)."""

from __future__ import annotations

from lightning.pytorch.strategies import DDPStrategy

from loract_lightning.strategies.mixin import LoRActStrategyMixin


class LoRActDDPStrategy(LoRActStrategyMixin, DDPStrategy):
    r"""Lightning's ``DDPStrategy`` with LoRAct: every rank compresses its training forward.

    Registered as ``"loract_ddp"`` (the ``"ddp"`` launch, LoRAct's defaults). It takes
    ``DDPStrategy``'s arguments and LoRAct's options by name; the work is the
    :class:`~loract_lightning.LoRAct` callback's (see
    :class:`~loract_lightning.strategies.LoRActStrategyMixin`). Each rank compresses its own
    forward and logs its own ``loract/*`` values.

    Example::

        from lightning import Trainer
        from loract_lightning.strategies import LoRActDDPStrategy

        trainer = Trainer(devices=4, strategy="loract_ddp")
        strategy = LoRActDDPStrategy(rank=0.25, checkpoint=["LlamaDecoderLayer"], find_unused_parameters=False)
        trainer = Trainer(devices=4, strategy=strategy)
    """
