"""LoRActStrategy: a single-device strategy that compresses the training forward (``"loract"``)."""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.utilities.types import _DEVICE
from lightning.pytorch.strategies import SingleDeviceStrategy

from loract_lightning.strategies.mixin import LoRActStrategyMixin


class LoRActStrategy(LoRActStrategyMixin, SingleDeviceStrategy):
    r"""Lightning's single-device strategy with LoRAct: every training forward is compressed.

    Registered as ``"loract"`` (``Trainer(strategy="loract")`` after ``import
    loract_lightning.strategies``), with LoRAct's defaults. It does what a
    :class:`~loract_lightning.LoRAct` callback with the same options does, by adding that
    callback (see :class:`~loract_lightning.strategies.LoRActStrategyMixin`); metrics, checkpoints
    and the fit-start summary are the callback's.

    Args:
        device: the device to train on; None (the default): the one the Trainer's ``accelerator``
            and ``devices`` pick, as ``strategy="auto"`` does (``Trainer(devices=2)`` is a
            ValueError: use ``"loract_ddp"``).
        \**options: LoRAct's options by name (``rank``, ``checkpoint``, ``layers``, ...; see
            :class:`~loract_lightning.options.CompressionOptions`) and ``accelerator``,
            ``checkpoint_io``, ``precision_plugin`` as ``SingleDeviceStrategy`` takes them.

    Example::

        from lightning import Trainer
        from loract_lightning.strategies import LoRActStrategy

        trainer = Trainer(strategy="loract")  # LoRAct's defaults
        trainer = Trainer(strategy=LoRActStrategy(rank=0.25, checkpoint=["LlamaDecoderLayer"]))
    """

    def __init__(self, device: _DEVICE | None = None, **options: Any) -> None:
        super().__init__(device="cpu" if device is None else device, **options)
        self._device_given = device is not None

    @property
    def parallel_devices(self) -> list[torch.device] | None:
        """The device given, or None: the Trainer then sets the device it picks (its connector
        fills in ``parallel_devices`` where a strategy leaves it empty)."""
        return [self._root_device] if self._device_given else None

    @parallel_devices.setter
    def parallel_devices(self, devices: list[torch.device]) -> None:
        if len(devices) != 1:
            raise ValueError(
                f"{type(self).__name__} trains on one device, but the Trainer asks for {len(devices)} "
                f"({devices}); use strategy='loract_ddp' (LoRActDDPStrategy) for several"
            )
        self._root_device = torch.device(devices[0])
