"""loract-lightning: low-rank activation compression (LoRAct) for PyTorch and Lightning."""

from loract_lightning.context import ActivationCompressor, compress_activations
from loract_lightning.stats import CompressionStats, ModuleMemory

__all__ = ["ActivationCompressor", "CompressionStats", "ModuleMemory", "compress_activations"]
__version__ = "0.1.0"
