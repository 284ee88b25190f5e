"""A few lines at the end of fit that say what the run did: validation loss before -> after,
activation memory saved -> stored, peak memory and minutes (Lightning's ``Timer``)."""

from __future__ import annotations

import math
import resource
import sys

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from loract_lightning import LoRAct

MIB = 1 << 20


class RunSummary(Timer):
    """Print a short summary of the fit on rank zero.

    Reads ``val_loss_before`` and ``val_loss`` from the logged metrics (the causal-LM example
    logs both; perplexity is ``exp`` of the loss), the last training step's stats of a
    :class:`~loract_lightning.LoRAct` callback if there is one, and the peak memory: on CUDA
    ``torch.cuda.max_memory_allocated``, else the process's peak resident memory (``resource``'s
    ``ru_maxrss``: psutil reports the current resident memory, not the peak). The time is that of
    the training loop (validation included), measured by Lightning's :class:`~lightning.pytorch.callbacks.Timer`,
    which this callback is (without a ``duration``: it stops nothing).

    Example::

        trainer = Trainer(callbacks=[LoRAct(checkpoint=["LlamaDecoderLayer"]), RunSummary()])
    """

    def __init__(self) -> None:
        super().__init__(duration=None, verbose=False)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        lines = ["Run summary"]
        metrics = trainer.callback_metrics
        before, after = metrics.get("val_loss_before"), metrics.get("val_loss")
        if before is not None and after is not None:
            before, after = float(before), float(after)
            lines.append(
                f"  validation perplexity  {_perplexity(before):.2f} -> {_perplexity(after):.2f}"
                f"  (loss {before:.4f} -> {after:.4f}, {100 * (after - before) / before:+.1f}%)"
            )
        compressor = next((c for c in trainer.callbacks if isinstance(c, LoRAct)), None)
        if compressor is not None and compressor.step_stats.saved_bytes:
            stats = compressor.step_stats
            saved, stored = stats.saved_bytes / MIB, stats.stored_bytes / MIB
            # In layer mode "saved" is what activation checkpointing already keeps, not what an
            # uncompressed step saves, so the two modes' stored / saved do not compare: say which.
            if compressor.options.checkpoint:
                mode = "layer mode: saved = the checkpointed forward's, not an uncompressed one's"
            else:
                mode = "default mode: saved = uncompressed"
            lines.append(
                f"  activation memory      {saved:.1f} MiB saved -> {stored:.1f} MiB stored per step"
                f" (stored / saved {stats.ratio:.3f}, {mode})"
            )
        lines.append(f"  peak memory            {_peak_memory(pl_module.device)}")
        lines.append(f"  time                   {self.time_elapsed('train') / 60:.1f} min (training loop)")
        rank_zero_info("\n".join(lines))


def _perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def _peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / MIB:.0f} MiB allocated on {device}"
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return f"{peak / MIB:.0f} MiB resident (process peak)"
