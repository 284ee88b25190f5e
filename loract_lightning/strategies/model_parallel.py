"""LoRActModelParallelStrategy: FSDP2 / tensor parallelism that compresses the training forward."""

from __future__ import annotations

from lightning.pytorch.strategies import ModelParallelStrategy

from loract_lightning.strategies.mixin import LoRActStrategyMixin


class LoRActModelParallelStrategy(LoRActStrategyMixin, ModelParallelStrategy):
    r"""Lightning's ``ModelParallelStrategy`` (FSDP2's ``fully_shard`` and tensor parallelism,
    applied by the LightningModule in ``configure_model``) with LoRAct.

    Registered as ``"loract_model_parallel"`` (LoRAct's defaults). It takes
    ``ModelParallelStrategy``'s arguments and LoRAct's options by name; the work is the
    :class:`~loract_lightning.LoRAct` callback's (see
    :class:`~loract_lightning.strategies.LoRActStrategyMixin`). Blocks that ``configure_model``
    puts in a ``checkpoint_wrapper`` are recomputed once: layer mode compresses their saved
    inputs and does not checkpoint them again.

    Example::

        from lightning import Trainer
        from loract_lightning.strategies import LoRActModelParallelStrategy

        strategy = LoRActModelParallelStrategy(data_parallel_size=4, rank=0.25, checkpoint=["Block"])
        trainer = Trainer(devices=4, strategy=strategy)
    """
