"""Keep an ActivationCompressor installed over the forward passes of each training step.

A training step may run several forward/backward pairs (manual optimization), and only the
forwards may be captured: backward and checkpoint recomputation must not be.
:class:`StepCaptureCallback`, the base of LoRAct's callbacks, drives one :class:`StepCapture`
from Lightning's hooks:

    start_step()   on_train_batch_start                -> installed
    pause()        on_before_backward                  -> removed
    resume()       on_after_backward                   -> installed again (only when
                   ``several_forwards``: manual optimization; otherwise no forward follows)
    end_step()     on_train_batch_end                  -> removed
    close()        on_exception, on_fit_end, teardown  -> removed, whatever the state

:func:`log_step_metrics` logs a step's metrics as ``training_step`` would (``pl_module.log``);
:func:`log_metrics` sends metrics that are not measured every step to the loggers only.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from loract_lightning.context import ActivationCompressor
from loract_lightning.stats import CompressionStats


def should_log(trainer: pl.Trainer) -> bool:
    """Whether this step is one that ``log_every_n_steps`` picks, and there is a logger to write to."""
    return bool(trainer.loggers) and trainer._logger_connector.should_update_logs


def log_metrics(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    """Send ``metrics`` straight to every logger, on the steps :func:`should_log` picks: for
    metrics that are not measured every step (a value logged with ``pl_module.log`` would be
    sent again, stale, on the steps between)."""
    if not should_log(trainer):
        return
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.fit_loop.epoch_loop._batches_that_stepped)


def log_step_metrics(pl_module: pl.LightningModule, metrics: dict[str, float]) -> None:
    """Log a training step's ``metrics`` through ``pl_module.log_dict``, as ``self.log`` in ``training_step``.

    Called from ``on_train_batch_end``: the values reach ``trainer.callback_metrics`` at once (what
    ``ModelCheckpoint(monitor=...)`` and ``EarlyStopping`` read, including a ``ModelCheckpoint``
    that runs later in the same hook) and ``trainer.logged_metrics`` at the end of the batch; the
    loggers get them on the steps ``log_every_n_steps`` picks. Each rank logs its own values (no
    collective).
    """
    has_logger = bool(pl_module.trainer.loggers)
    pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1, logger=has_logger)


class StepCapture:
    """Installs ``compressor.capture()`` around each forward of a step and sums their stats."""

    def __init__(self, compressor: ActivationCompressor, several_forwards: bool = True) -> None:
        self.compressor = compressor
        self.several_forwards = several_forwards
        self.step_stats = CompressionStats()
        """Stats of the current (or last finished) step, summed over its forwards."""
        self._installed: ExitStack | None = None
        self._forward_stats: CompressionStats | None = None
        self._in_step = False

    @property
    def installed(self) -> bool:
        return self._installed is not None

    def start_step(self) -> None:
        self.close()
        self.step_stats = CompressionStats()
        self._in_step = True
        self._install()

    def pause(self) -> None:
        self._remove()

    def resume(self) -> None:
        if self._in_step and self.several_forwards:
            self._install()

    def end_step(self) -> None:
        self._remove()
        self._in_step = False

    close = end_step

    def _install(self) -> None:
        if self._installed is None:
            # Marked installed only once capture() has entered: an error there must surface as
            # itself, not as a failed clean-up of a half-made state.
            installed = ExitStack()
            self._forward_stats = installed.enter_context(self.compressor.capture())
            self._installed = installed

    def _remove(self) -> None:
        if self._installed is not None:
            installed, self._installed = self._installed, None
            installed.close()
            self.step_stats.merge(self._forward_stats)


class StepCaptureCallback(Callback):
    """Installs ``self._capture`` over the forwards of each training step and removes it on every exit.

    Subclasses set ``_capture`` (a :class:`~loract_lightning.step_capture.StepCapture`) in
    ``on_fit_start``, or leave it None to capture nothing, and call ``super()`` in the hooks
    they extend.
    """

    _capture: StepCapture | None = None

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._capture:
            self._capture.start_step()

    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Any) -> None:
        if self._capture:
            self._capture.pause()

    @override
    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._capture:
            self._capture.resume()  # manual optimization may run another forward in the same step

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._capture:
            self._capture.end_step()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close()

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._close()

    def _close(self) -> None:
        if self._capture:
            self._capture.close()
