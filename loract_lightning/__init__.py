"""loract-lightning: low-rank activation compression (LoRAct) for PyTorch and Lightning.

The core (``compress_activations``) needs only PyTorch; the Lightning callbacks are imported on
first use, so plain-PyTorch users do not pay for importing Lightning.
"""

from typing import Any

from loract_lightning.chunked_loss import causal_lm_loss, chunked_cross_entropy
from loract_lightning.context import ActivationCompressor, compress_activations
from loract_lightning.options import CompressionOptions
from loract_lightning.stats import CompressionStats, ModuleMemory

__all__ = [
    "ActivationCompressor",
    "ActivationMemoryMonitor",
    "CompressionOptions",
    "CompressionStats",
    "LoRAct",
    "ModuleMemory",
    "causal_lm_loss",
    "chunked_cross_entropy",
    "compress_activations",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "LoRAct":
        from loract_lightning.loract import LoRAct

        return LoRAct
    if name == "ActivationMemoryMonitor":
        from loract_lightning.activation_memory_monitor import ActivationMemoryMonitor

        return ActivationMemoryMonitor
    raise AttributeError(f"module 'loract_lightning' has no attribute {name!r}")
