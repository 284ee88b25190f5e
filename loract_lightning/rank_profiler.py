"""RankProfiler: measure which rank each module's activations need over a few training batches."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from loract_lightning.checks import check_int
from loract_lightning.context import ActivationCompressor
from loract_lightning.options import CompressionOptions
from loract_lightning.rank_profile import RankProfile
from loract_lightning.step_capture import StepCapture, StepCaptureCallback


class RankProfiler(StepCaptureCallback):
    """Profile the first ``batches`` training batches, then stop the fit; the model keeps no trace of them.

    Every activation the engine would factorize with the given options (modules that ``layers``
    maps to None stay out; other ranks do not matter) is passed to a
    :class:`~loract_lightning.rank_profile.RankProfile`, which records per module the optimal and
    the method's relative error at candidate ranks. The optimizer steps of those batches are
    undone: at the end of the run the trainable parameters and the buffers (BatchNorm statistics)
    are put back as they were before the first batch (a copy of them is kept in host memory for
    the run). ``loract profile`` drives this callback and
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
        self._before: dict[str, torch.Tensor] = {}

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        compressor = ActivationCompressor(pl_module, self.options)
        compressor.observers.append(lambda module_name, matrix, left, right: self.profile.observe(module_name, matrix))
        self._capture = StepCapture(compressor, several_forwards=not pl_module.automatic_optimization)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After configure_model and the optimizers' setup: what the batches could change is there now.
        trainable = [(name, p) for name, p in pl_module.named_parameters() if p.requires_grad]
        self._before = {name: t.detach().to("cpu", copy=True) for name, t in [*trainable, *pl_module.named_buffers()]}

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore(pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        self._restore(pl_module)

    def _restore(self, pl_module: pl.LightningModule) -> None:
        """Put the parameters and buffers snapshotted at ``on_train_start`` back."""
        tensors = {**dict(pl_module.named_parameters()), **dict(pl_module.named_buffers())}
        with torch.no_grad():
            for name, before in self._before.items():
                tensors[name].copy_(before)
        self._before = {}

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self.profile.steps += 1
        rank_zero_info(f"loract profile: batch {self.profile.steps}/{self.batches} measured")
        if self.profile.steps >= self.batches:
            trainer.should_stop = True
