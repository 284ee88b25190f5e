"""The ``loract`` command: LightningCLI (fit/validate/test/predict) with LoRAct's callbacks,
and ``loract profile``, which measures the rank each module needs.

    loract fit --config configs/text_loract.yaml
    loract fit --config configs/text_baseline.yaml --trainer.max_epochs=2
    loract fit --config configs/text_loract.yaml --print_config
    loract profile --config configs/text_loract.yaml --batches 2 --max_error 0.2

Any importable LightningModule/LightningDataModule can be named by ``class_path``. The shipped
configs name ``examples.*`` classes, which import once ``scripts/setup.sh`` has put the checkout
on the virtual environment's path; elsewhere put your own module on ``PYTHONPATH``. LoRAct is
added like any callback::

    trainer:
      callbacks:
        - class_path: loract_lightning.LoRAct
          init_args: {rank: 0.125, layers: {"model.*.layer.0.*": 64}}
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

from lightning.pytorch.cli import LightningCLI, SaveConfigCallback


class _DropLightningTips(logging.Filter):
    """Lightning advertises its cloud products ("💡 Tip: ...") at every fit; not our users' concern."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("💡 Tip")


def silence_known_warnings() -> None:
    """Messages from our dependencies that say nothing actionable to a user, one by one."""
    # Lightning 2.6 calls a torch.utils._pytree API that torch 2.14 deprecates; harmless.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # peft reads transformers' deprecated `is_gradient_checkpointing` alias when it wraps a model.
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropLightningTips())


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``loract`` console script."""
    silence_known_warnings()
    arguments = sys.argv[1:] if args is None else list(args)
    if arguments[:1] == ["profile"]:
        profile(arguments[1:])
        return
    build_cli(args)


def build_cli(args: list[str] | None, run: bool = True, save_config: bool = True) -> LightningCLI:
    """The LightningCLI of ``loract``; ``save_config=False`` writes no ``config.yaml`` (Lightning
    writes it to the log dir, which is the working directory of a logger-less run)."""
    return LightningCLI(
        args=args,
        run=run,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=SaveConfigCallback if save_config else None,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


def profile(args: list[str]) -> None:
    """``loract profile --config X.yaml [--batches N] [--max_error E | --memory_budget B]``.

    Runs N training batches of the configured model and data, measures per module the optimal
    and the configured method's relative error at candidate ranks, prints a table and writes
    ``rank_profile.json``, ``rank_profile.png`` and ``loract_layers.yaml`` (a ``layers:`` block
    meeting the error target, or the memory budget, to paste into the LoRAct callback). The
    config's LoRAct callback, if any, gives the method, ``min_bytes`` and ``checkpoint``; the
    modules its ``layers`` map to None are left out and stay None in the block.
    The table and chart need the ``report`` extra (rich, matplotlib); without it the command
    exits before the run, naming the extra.
    """
    from loract_lightning.activation_memory_monitor import ActivationMemoryMonitor
    from loract_lightning.loract import LoRAct
    from loract_lightning.rank_profiler import RankProfiler
    from loract_lightning.report import layers_yaml, print_rank_profile, require_report_packages, write_rank_profile

    parser = argparse.ArgumentParser(prog="loract profile", description=profile.__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=2, help="training batches to profile (default 2)")
    parser.add_argument("--max_error", type=float, default=0.2, help="error target in (0, 1) (default 0.2)")
    parser.add_argument(
        "--memory_budget", type=float, default=None, help="instead of --max_error: stored / saved bytes in (0, 1)"
    )
    parser.add_argument("--output_dir", type=Path, default=Path("loract_profile"), help="default ./loract_profile")
    parser.add_argument("--top_k", type=int, default=20, help="modules shown in the table and chart")
    ours, rest = parser.parse_known_args(args)
    if ours.batches < 1:
        parser.error(f"--batches must be >= 1, got {ours.batches}")
    for name in ("max_error", "memory_budget"):
        value = getattr(ours, name)
        if value is not None and not 0 < value < 1:
            parser.error(f"--{name} must be in (0, 1), got {value}")
    overrides = [
        f"--trainer.max_steps={ours.batches}", "--trainer.limit_val_batches=0", "--trainer.num_sanity_val_steps=0",
        "--trainer.logger=false", "--trainer.enable_checkpointing=false",
    ]  # fmt: skip
    if not any(arg == "--config" or arg.startswith(("--config=", "-c")) for arg in rest):
        parser.error("--config is required: the YAML of the run to profile")
    try:  # the table and chart come after the whole run: check their packages before it
        require_report_packages("loract profile")
    except ModuleNotFoundError as error:
        raise SystemExit(str(error)) from error
    # `profile` builds the run from these arguments, not from the command line LightningCLI sees.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
    # A profiling run is not a run to reproduce: no config.yaml in the working directory.
    cli = build_cli([*rest, *overrides], run=False, save_config=False)
    trainer = cli.trainer
    loract = next((c for c in trainer.callbacks if isinstance(c, LoRAct)), None)
    # The profiler hooks the model itself; the run's own LoRAct / monitor would hook it twice.
    trainer.callbacks = [c for c in trainer.callbacks if not isinstance(c, (LoRAct, ActivationMemoryMonitor))]
    options = loract.options.to_dict() if loract else {}
    keep_raw = tuple(pattern for pattern, rank in options.get("layers", {}).items() if rank is None)
    profiler = RankProfiler(ours.batches, **options)
    trainer.callbacks.append(profiler)
    try:
        trainer.fit(cli.model, datamodule=cli.datamodule)
    except Exception as error:
        raise SystemExit(f"loract profile: the configured run failed: {type(error).__name__}: {error}") from error
    measured = profiler.profile
    if not measured.modules:
        raise SystemExit(
            f"loract profile: {measured.steps} batches ran but no activation was eligible for compression "
            "(all below min_bytes, or outside the checkpointed modules in layer mode)"
        )
    if ours.memory_budget is not None:
        layers = measured.layers_for_budget(ours.memory_budget)
    else:
        layers = measured.layers_for_error(ours.max_error)
    print_rank_profile(measured, ours.top_k)
    files = write_rank_profile(measured, ours.output_dir, layers, ours.top_k, keep_raw)
    print(layers_yaml(layers, measured.stored_ratio(layers), keep_raw))
    print("written: " + ", ".join(str(path) for path in files))


if __name__ == "__main__":
    main()
