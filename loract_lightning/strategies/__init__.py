"""The strategy form of LoRAct: Lightning strategies that compress every training forward.

Importing this package registers them by name with Lightning's ``StrategyRegistry``:
``Trainer(strategy="loract")`` (one device), ``"loract_ddp"``, ``"loract_fsdp"`` and
``"loract_model_parallel"`` (FSDP2), each with LoRAct's defaults; the classes take LoRAct's
options by name beside the strategy's own. Each is its Lightning strategy with
:class:`LoRActStrategyMixin`, which adds a :class:`~loract_lightning.LoRAct` callback built from
those options: the strategy form and the callback form share that one implementation.
"""

from lightning.pytorch.strategies import StrategyRegistry

from loract_lightning.strategies.ddp import LoRActDDPStrategy
from loract_lightning.strategies.fsdp import LoRActFSDPStrategy
from loract_lightning.strategies.mixin import LoRActStrategyMixin
from loract_lightning.strategies.model_parallel import LoRActModelParallelStrategy
from loract_lightning.strategies.single_device import LoRActStrategy

__all__ = [
    "LoRActDDPStrategy",
    "LoRActFSDPStrategy",
    "LoRActModelParallelStrategy",
    "LoRActStrategy",
    "LoRActStrategyMixin",
]

_NAMES = {
    "loract": (LoRActStrategy, "single device, every training forward compressed by LoRAct", {}),
    "loract_ddp": (LoRActDDPStrategy, "DDP, every training forward compressed by LoRAct", {"start_method": "popen"}),
    "loract_fsdp": (LoRActFSDPStrategy, "FSDP, every training forward compressed by LoRAct", {}),
    "loract_model_parallel": (
        LoRActModelParallelStrategy,
        "FSDP2 / tensor parallel (configure_model), every training forward compressed by LoRAct",
        {},
    ),
}
for _name, (_strategy, _description, _init_params) in _NAMES.items():
    if _name not in StrategyRegistry:
        StrategyRegistry.register(_name, _strategy, description=_description, **_init_params)
