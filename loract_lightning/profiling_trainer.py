"""ProfilingTrainer: Lightning's Trainer with one more entry point, ``profile`` (``loract profile``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from jsonargparse.typing import OpenUnitInterval, PositiveInt
from lightning.pytorch.callbacks import Checkpoint

from loract_lightning.checks import check_fraction, check_int
from loract_lightning.rank_profile import RankProfile

PROFILING_RUN: dict[str, Any] = {
    "limit_val_batches": 0, "num_sanity_val_steps": 0, "logger": False, "enable_checkpointing": False,
}  # fmt: skip
"""Trainer settings of a profiling run: it measures training batches and keeps nothing. ``loract profile``
builds its trainer with them; :meth:`ProfilingTrainer.profile` applies them to the trainer it is called on
for the length of the run (and also caps ``max_steps`` at the batches it profiles)."""


class ProfilingTrainer(pl.Trainer):
    """A :class:`~lightning.pytorch.Trainer` that can also :meth:`profile` a run: measure which rank
    each module's activations need and propose LoRAct's ``layers:`` block. ``loract`` builds its
    trainers from this class, so ``profile`` is a subcommand beside ``fit``, ``validate``, ``test``
    and ``predict``, and takes the same ``--config`` files.

    Example::

        trainer = ProfilingTrainer(callbacks=[LoRAct(rank=0.125)], max_epochs=3)
        layers = trainer.profile(model, datamodule, batches=2, max_error=0.2)  # measures; does not train
        Trainer(callbacks=[LoRAct(rank=0.125, layers=layers)], max_epochs=3).fit(model, datamodule)
    """

    def profile(
        self,
        model: pl.LightningModule,
        datamodule: pl.LightningDataModule | None = None,
        batches: PositiveInt = 2,
        max_error: OpenUnitInterval = 0.2,
        memory_budget: OpenUnitInterval | None = None,
        output_dir: Path = Path("loract_profile"),
        top_k: PositiveInt = 20,
    ) -> dict[str, float | None]:
        """Measure the rank each module needs over a few training batches, and propose a ``layers:`` block.

        Fits ``batches`` training batches under a :class:`~loract_lightning.rank_profiler.RankProfiler`,
        which records per module the optimal and the configured method's relative error at candidate
        ranks; then prints a table and the block and writes ``rank_profile.json``, ``rank_profile.png``
        and ``loract_layers.yaml`` to ``output_dir``. This trainer's LoRAct callback, if it has one,
        gives the method, ``min_bytes``, ``checkpoint`` and the other options, and the modules its
        ``layers`` map to None stay out of the profile and stay None in the block. LoRAct and
        ActivationMemoryMonitor sit this run out (the profiler hooks the model itself) and are back
        in the trainer's callbacks afterwards.

        The run measures; it does not train: it runs with :data:`PROFILING_RUN`'s settings (no
        validation, no sanity check, no logger, no checkpoint callback) and at most ``batches``
        steps, and the :class:`~loract_lightning.rank_profiler.RankProfiler` puts the trainable
        parameters and buffers back as they were before its first batch. The trainer's own settings
        are back afterwards.

        Args:
            model: the LightningModule to profile.
            datamodule: its data, unless the model brings its own dataloaders.
            batches: training batches to profile.
            max_error: the block's target relative error per module, in (0, 1).
            memory_budget: instead of ``max_error``: the block's target stored / saved bytes, in (0, 1).
            output_dir: where the files go.
            top_k: modules shown in the table and the chart.

        Returns:
            The proposed ``layers`` mapping (module glob -> rank; None for the modules kept raw).

        Raises:
            ValueError: a bad argument, or a run in which no activation was eligible for compression.
            ModuleNotFoundError: rich or matplotlib (the ``report`` extra) is missing; raised before the run.
        """
        from loract_lightning.activation_memory_monitor import ActivationMemoryMonitor
        from loract_lightning.loract import LoRAct
        from loract_lightning.rank_profiler import RankProfiler
        from loract_lightning.report import layers_yaml, print_rank_profile, require_report_packages, write_rank_profile

        check_int("batches", batches, minimum=1)
        check_fraction("max_error", max_error)
        if memory_budget is not None:
            check_fraction("memory_budget", memory_budget)
        check_int("top_k", top_k, minimum=1)
        require_report_packages("loract profile")  # the report comes after the whole run
        run_callbacks = self.callbacks
        loract = next((c for c in run_callbacks if isinstance(c, LoRAct)), None)
        options = loract.options.to_dict() if loract else {}
        keep_raw = tuple(pattern for pattern, rank in (options.get("layers") or {}).items() if rank is None)
        profiler = RankProfiler(batches, **options)
        sitting_out = (LoRAct, ActivationMemoryMonitor)
        with self._profiling_run(batches):
            self.callbacks = [c for c in self.callbacks if not isinstance(c, sitting_out)] + [profiler]
            self.fit(model, datamodule=datamodule)
        measured: RankProfile = profiler.profile
        if not measured.modules:
            raise ValueError(
                f"{measured.steps} batches ran but no activation was eligible for compression "
                "(all below min_bytes, or outside the checkpointed modules in layer mode)"
            )
        if memory_budget is not None:
            layers = measured.layers_for_budget(memory_budget)
        else:
            layers = measured.layers_for_error(max_error)
        print_rank_profile(measured, top_k)
        target = max_error if memory_budget is None else None
        files = write_rank_profile(measured, Path(output_dir), layers, top_k, keep_raw, max_error=target)
        print(layers_yaml(layers, measured.stored_ratio(layers), keep_raw))
        print("written: " + ", ".join(str(path) for path in files))
        return {**dict.fromkeys(keep_raw), **layers}

    @contextmanager
    def _profiling_run(self, batches: int) -> Iterator[None]:
        """Apply :data:`PROFILING_RUN` and a ``max_steps`` of ``batches`` to this trainer; restore its own after."""
        loop, steps = self.fit_loop, self.fit_loop.epoch_loop
        own = (self.callbacks, self.loggers, self.limit_val_batches, self.num_sanity_val_steps)
        own_limits = (steps.max_steps, loop.max_epochs, loop.min_epochs)
        run = PROFILING_RUN
        try:
            self.limit_val_batches = run["limit_val_batches"]
            self.num_sanity_val_steps = run["num_sanity_val_steps"]
            if run["logger"] is False:
                self.loggers = []
            if run["enable_checkpointing"] is False:
                self.callbacks = [c for c in self.callbacks if not isinstance(c, Checkpoint)]
            if steps.max_steps < 0 or steps.max_steps > batches:
                steps.max_steps = batches  # an upper bound (the profiler stops first); max_epochs need not be set
            yield
        finally:
            self.callbacks, self.loggers, self.limit_val_batches, self.num_sanity_val_steps = own
            steps.max_steps, loop.max_epochs, loop.min_epochs = own_limits
