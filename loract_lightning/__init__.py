"""loract-lightning: low-rank activation compression (LoRAct) for PyTorch and Lightning.

The core (``compress_activations``) needs only PyTorch; the Lightning callbacks are imported on
first use, so plain-PyTorch users do not pay for importing Lightning.
"""

import importlib
from typing import TYPE_CHECKING, Any

from loract_lightning.chunked_loss import causal_lm_loss, chunked_cross_entropy
from loract_lightning.context import ActivationCompressor, compress_activations
from loract_lightning.options import CompressionOptions
from loract_lightning.stats import CompressionStats, ModuleMemory

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports them on first use
    from loract_lightning.activation_memory_monitor import ActivationMemoryMonitor
    from loract_lightning.loract import LoRAct
    from loract_lightning.profiling_trainer import ProfilingTrainer
    from loract_lightning.rank_profiler import RankProfiler
    from loract_lightning.strategies import LoRActDDPStrategy, LoRActFSDPStrategy, LoRActStrategy
    from loract_lightning.transformers_callback import LoRActTrainerCallback as LoRActTrainerCallback

__all__ = [
    "ActivationCompressor",
    "ActivationMemoryMonitor",
    "CompressionOptions",
    "CompressionStats",
    "LoRAct",
    "LoRActDDPStrategy",
    "LoRActFSDPStrategy",
    "LoRActStrategy",
    "ModuleMemory",
    "ProfilingTrainer",
    "RankProfiler",
    "causal_lm_loss",
    "chunked_cross_entropy",
    "compress_activations",
]
__version__ = "0.1.0"  # the one place the version is written (pyproject.toml reads it)

_LIGHTNING_CLASSES = {
    "LoRAct": "loract_lightning.loract",
    "ActivationMemoryMonitor": "loract_lightning.activation_memory_monitor",
    "ProfilingTrainer": "loract_lightning.profiling_trainer",
    "RankProfiler": "loract_lightning.rank_profiler",
    # importing the strategies registers "loract", "loract_ddp" and "loract_fsdp" with Lightning
    "LoRActStrategy": "loract_lightning.strategies",
    "LoRActDDPStrategy": "loract_lightning.strategies",
    "LoRActFSDPStrategy": "loract_lightning.strategies",
    # not in __all__: it needs transformers, which the core install leaves out
    "LoRActTrainerCallback": "loract_lightning.transformers_callback",
}


def __getattr__(name: str) -> Any:
    """The Lightning classes, imported on first use (``from loract_lightning import LoRAct``)."""
    if name in _LIGHTNING_CLASSES:
        return getattr(importlib.import_module(_LIGHTNING_CLASSES[name]), name)
    raise AttributeError(f"module 'loract_lightning' has no attribute {name!r}")
