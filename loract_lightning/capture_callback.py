"""StepCaptureCallback: the Lightning hooks that drive a StepCapture, shared by our callbacks."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from loract_lightning.step_capture import StepCapture


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
