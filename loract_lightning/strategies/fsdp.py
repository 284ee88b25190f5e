"""LoRActFSDPStrategy: FSDP that compresses the training forward (``"loract_fsdp"``)."""

from __future__ import annotations

from lightning.pytorch.strategies import FSDPStrategy

from loract_lightning.strategies.mixin import LoRActStrategyMixin


class LoRActFSDPStrategy(LoRActStrategyMixin, FSDPStrategy):
    r"""Lightning's ``FSDPStrategy`` with LoRAct: every rank compresses its training forward.

    Registered as ``"loract_fsdp"`` (LoRAct's defaults). It takes ``FSDPStrategy``'s arguments
    and LoRAct's options by name; the work is the :class:`~loract_lightning.LoRAct` callback's
    (see :class:`~loract_lightning.strategies.LoRActStrategyMixin`).

    Layer mode and FSDP's ``activation_checkpointing_policy`` compose: a block that FSDP already
    runs under its checkpoint wrapper is not checkpointed a second time; LoRAct compresses the
    input that FSDP's checkpoint saves, and the block is recomputed once in backward (by PyTorch's
    checkpoint, so ``compress_recompute`` does not apply to it). Leave the policy out and name
    the blocks in ``checkpoint`` for LoRAct's own compressed recompute.

    Example::

        from lightning import Trainer
        from loract_lightning.strategies import LoRActFSDPStrategy

        # FSDP checkpoints each block, LoRAct keeps each block's input at rank 1/4
        strategy = LoRActFSDPStrategy(
            auto_wrap_policy={Block}, activation_checkpointing_policy={Block}, rank=0.25, checkpoint=["Block"]
        )
        # LoRAct checkpoints each block itself, with its compressed recompute
        strategy = LoRActFSDPStrategy(auto_wrap_policy={Block}, rank=0.25, checkpoint=["Block"])
        trainer = Trainer(accelerator="cuda", devices=4, strategy=strategy)
    """
