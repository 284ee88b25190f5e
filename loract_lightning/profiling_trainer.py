"""ProfilingTrainer: Lightning's Trainer with one more entry point, ``profile`` (``loract profile``)."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from jsonargparse.typing import OpenUnitInterval, PositiveInt

from loract_lightning.checks import check_fraction, check_int
from loract_lightning.rank_profile import RankProfile


class ProfilingTrainer(pl.Trainer):
    """A :class:`~lightning.pytorch.Trainer` that can also :meth:`profile` a run: measure which rank
    each module's activations need and propose LoRAct's ``layers:`` block. ``loract`` builds its
    trainers from this class, so ``profile`` is a subcommand beside ``fit``, ``validate``, ``test``
    and ``predict``, and takes the same ``--config`` files.

    Example::

        trainer = ProfilingTrainer(callbacks=[LoRAct(rank=0.125)], limit_val_batches=0, logger=False)
        layers = trainer.profile(model, datamodule, batches=2, max_error=0.2)
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
        self.callbacks = [c for c in run_callbacks if not isinstance(c, (LoRAct, ActivationMemoryMonitor))]
        self.callbacks.append(profiler)
        try:
            self.fit(model, datamodule=datamodule)
        finally:
            self.callbacks = run_callbacks
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
        files = write_rank_profile(measured, Path(output_dir), layers, top_k, keep_raw)
        print(layers_yaml(layers, measured.stored_ratio(layers), keep_raw))
        print("written: " + ", ".join(str(path) for path in files))
        return {**dict.fromkeys(keep_raw), **layers}
