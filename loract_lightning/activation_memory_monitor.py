"""ActivationMemoryMonitor: where activation memory goes, and what LoRAct stores of it."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from typing_extensions import override

from loract_lightning.checks import check_int
from loract_lightning.context import ActivationCompressor
from loract_lightning.linalg import relative_error
from loract_lightning.report import MemoryReport, log_figures, require_report_packages
from loract_lightning.step_capture import StepCapture, StepCaptureCallback, log_metrics, should_log


class ActivationMemoryMonitor(StepCaptureCallback):
    r"""Measure the activation memory of every training step, per module.

    Alone, it counts what the training forward saves for backward, per module, uncompressed: where
    activation memory goes, and so which modules LoRAct would work on (its report shows saved bytes
    only, as nothing is stored differently). Beside a :class:`~loract_lightning.LoRAct` callback it
    reads LoRAct's numbers instead of hooking the model a second time, and shows saved and stored
    bytes. In layer mode "saved" is what the checkpointed forward saves (the blocks' inputs and what
    runs outside them), not what an uncompressed forward saves: run it alone on the same model
    (without LoRAct) for that figure.

    **Logged metrics** (through ``trainer.loggers``, every ``log_every_n_steps``):

    - ``memory/activations_saved_bytes``: alone, bytes autograd saved in the step (beside LoRAct
      not logged: the same bytes are LoRAct's ``loract/saved_bytes`` and ``loract/stored_bytes``);
    - ``memory/activations_stored_bytes``: alone, bytes really held for them (equal to saved);
    - ``memory/peak_bytes``: CUDA: peak allocated during the step; CPU: the process's peak
      resident memory during the step (reset every step where Linux allows, else since start);
    - ``memory/reconstruction_error_mean`` and ``_max``: every ``error_every_n_steps``, the
      relative error of the step's compressed tensors (only beside LoRAct).

    Under DDP, bytes are averaged over ranks and peaks take the maximum; the report is written
    once, by rank zero.

    **Report** at the end of fit, on rank zero: a table of the ``top_k`` modules by saved bytes
    (saved, stored, stored / saved, ranks, reconstruction error; alone: saved and its share), the
    module names' common prefix dropped and named, 200 columns wide where stdout is not a terminal
    (a log file, a pipe); and ``activation_memory.csv``, ``activation_memory.json`` and
    ``activation_memory.png`` (per-module bars, the activation bytes of each step and, on CUDA, the
    step's peak allocated memory; the CPU's process-wide peak resident memory says nothing about
    activations and is in the JSON file only) in ``output_dir``, else the first logger's
    ``log_dir``, else the trainer's ``default_root_dir``. The chart also goes to the loggers that
    take images: TensorBoard (``add_figure``), Weights & Biases (``log_image``) and MLflow (an
    artifact), under ``loract/activation_memory``.

    The table needs rich and the chart matplotlib, which the core install leaves out: without
    them the constructor raises :class:`ModuleNotFoundError` naming the ``report`` extra
    (``pip install "loract-lightning[report]"``; ``[examples]`` and ``[dev]`` include it), rather
    than the fit failing at its end.

    Args:
        top_k: modules shown in the table and chart.
        error_every_n_steps: measure reconstruction errors every this many steps (0: never).
        output_dir: where the report files go (None: the first logger's ``log_dir``, else the
            trainer's ``default_root_dir``).

    Example::

        from lightning import Trainer
        from loract_lightning import ActivationMemoryMonitor, LoRAct

        Trainer(callbacks=[ActivationMemoryMonitor()])  # what the forward saves, per module, uncompressed
        Trainer(callbacks=[LoRAct(rank=0.125), ActivationMemoryMonitor(error_every_n_steps=50)])
    """

    def __init__(self, top_k: int = 15, error_every_n_steps: int = 0, output_dir: str | None = None) -> None:
        check_int("top_k", top_k, minimum=1)
        check_int("error_every_n_steps", error_every_n_steps)
        require_report_packages("ActivationMemoryMonitor")
        self.top_k = top_k
        self.error_every_n_steps = error_every_n_steps
        self.output_dir = output_dir
        self.report = MemoryReport()
        self.report_files: list[Path] = []
        self._loract: Any = None
        self._capture: StepCapture | None = None  # own capture, only when no LoRAct callback
        self._measure_errors = False  # this step's factorizations are measured
        self._step_errors: dict[str, list[float]] = {}

    def _step_stats(self):
        return (self._loract or self._capture).step_stats

    def _observe(self, module_name: str, matrix: torch.Tensor, left: torch.Tensor, right: torch.Tensor | None) -> None:
        """LoRAct's compressor calls this with every factorization (one extra rebuild when measuring)."""
        if self._measure_errors:
            self._step_errors.setdefault(module_name, []).append(relative_error(matrix, left, right))

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from loract_lightning.loract import LoRAct

        self._loract = next((c for c in trainer.callbacks if isinstance(c, LoRAct)), None)
        cuda = trainer.strategy.root_device.type == "cuda"
        self.report = MemoryReport(
            peak_label="CUDA peak allocated, all tensors" if cuda else "process peak resident memory, not activations",
            compressed=self._loract is not None,
            layer_mode=bool(self._loract is not None and self._loract.options.checkpoint),
            chart_peaks=cuda,
        )
        if self._loract is None:
            compressor = ActivationCompressor(pl_module, compress=False)
            self._capture = StepCapture(compressor, several_forwards=not pl_module.automatic_optimization)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        device = trainer.strategy.root_device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        else:
            _reset_resident_peak()
        every = self.error_every_n_steps
        self._measure_errors = bool(every) and trainer.global_step % every == 0
        self._step_errors = {}
        # Attached here, not in on_fit_start: LoRAct builds its compressor in its own on_fit_start,
        # which may come after this callback's.
        observers = self._loract.compressor.observers if self._loract is not None else []
        if self._measure_errors and self._observe not in observers:
            observers.append(self._observe)
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        stats = self._step_stats()
        device = trainer.strategy.root_device
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _resident_peak()
        self.report.add_step(stats, trainer.global_step, peak, self._step_errors)
        if not should_log(trainer):
            return
        # Every rank reaches this line at the same steps, so the collectives below line up.
        metrics = {}
        if self._loract is None:  # beside LoRAct these bytes are its loract/saved_bytes and stored_bytes
            saved, stored = (
                float(trainer.strategy.reduce(torch.tensor(float(value), device=device), reduce_op="mean"))
                for value in (stats.saved_bytes, stats.stored_bytes)
            )
            metrics = {"memory/activations_saved_bytes": saved, "memory/activations_stored_bytes": stored}
        metrics["memory/peak_bytes"] = float(
            trainer.strategy.reduce(torch.tensor(float(peak), device=device), reduce_op="max")
        )
        errors = [error for module_errors in self._step_errors.values() for error in module_errors]
        if errors:
            metrics["memory/reconstruction_error_mean"] = sum(errors) / len(errors)
            metrics["memory/reconstruction_error_max"] = max(errors)
        log_metrics(trainer, metrics)

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_end(trainer, pl_module)
        self.report.reduce_across_ranks(trainer.strategy, [name for name, _ in pl_module.named_modules()])
        if trainer.is_global_zero:
            self.report.print_table(self.top_k)
            self.report_files, figures = self.report.write(self._output_dir(trainer), self.top_k)
            pngs = {path.stem: path for path in self.report_files if path.suffix == ".png"}
            log_figures(trainer.loggers, figures, pngs, trainer.global_step)
            import matplotlib.pyplot as plt  # the report extra, checked when the monitor was built

            for figure in figures.values():
                plt.close(figure)

    def _close(self) -> None:
        super()._close()
        self._measure_errors = False
        compressor = self._loract.compressor if self._loract is not None else None
        if compressor is not None and self._observe in compressor.observers:
            compressor.observers.remove(self._observe)

    def _output_dir(self, trainer: pl.Trainer) -> Path:
        if self.output_dir is not None:
            return Path(self.output_dir)
        log_dir = trainer.loggers[0].log_dir if trainer.loggers else None
        return Path(log_dir or trainer.default_root_dir)


_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _reset_resident_peak() -> None:
    """Reset the kernel's peak-RSS mark (VmHWM) so the next reading covers one step (Linux)."""
    with contextlib.suppress(OSError):  # elsewhere the peak is the process's peak since start
        _CLEAR_REFS.write_text("5")


def _resident_peak() -> int:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
