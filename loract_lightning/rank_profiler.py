"""RankProfiler: measure which rank each module's activations need over a few training batches."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from loract_lightning.checks import check_int
from loract_lightning.context import ActivationCompressor
from loract_lightning.options import CompressionOptions
from loract_lightning.rank_profile import RankProfile
from loract_lightning.step_capture import StepCapture, StepCaptureCallback


class RankProfiler(StepCaptureCallback):
    """Profile the first ``batches`` training batches, then stop the fit.

    Every activation the engine would factorize with the given options (modules that ``layers``
    maps to None stay out; other ranks do not matter) is passed to a
    :class:`~loract_lightning.rank_profile.RankProfile`, which records per module the optimal and
    the method's relative error at candidate ranks. ``loract profile`` drives this callback and
    prints and writes the result. The callback itself needs only the core install; the profile's
    table and files (:func:`~loract_lightning.report.print_rank_profile`, ``write_rank_profile``) need
    the ``report`` extra (rich, matplotlib).

    Args:
        batches: training batches to profile.
        **options: compression options (``method``, ``min_bytes``, ``layers``, ``checkpoint``,
            ``seed``, ...) of :class:`~loract_lightning.options.CompressionOptions`.

    Example::

        profiler = RankProfiler(batches=2, min_bytes=1 << 16)
        Trainer(callbacks=[profiler]).fit(model, datamodule)
        print(profiler.profile.layers_for_error(0.2))
    """

    def __init__(self, batches: int = 2, **options: Any) -> None:
        check_int("batches", batches, minimum=1)
        self.batches = batches
        self.options = CompressionOptions(**options)
        method_options = {k: getattr(self.options, k) for k in ("power_iters", "oversample")}
        method_options = {k: v for k, v in method_options.items() if v is not None}
        self.profile = RankProfile(self.options.method, self.options.seed, **method_options)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        compressor = ActivationCompressor(pl_module, self.options)
        compressor.observers.append(lambda module_name, matrix, left, right: self.profile.observe(module_name, matrix))
        self._capture = StepCapture(compressor, several_forwards=not pl_module.automatic_optimization)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.profile.steps += 1
        rank_zero_info(f"loract profile: batch {self.profile.steps}/{self.batches} measured")
        if self.profile.steps >= self.batches:
            trainer.should_stop = True
