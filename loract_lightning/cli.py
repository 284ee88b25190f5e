"""The ``loract`` command: LightningCLI (fit/validate/test/predict) with LoRAct's callbacks,
and ``profile`` (:meth:`ProfilingTrainer.profile`), which measures the rank each module needs.

    loract fit --config configs/text/baseline.yaml --config configs/text/loract.yaml
    loract fit --config configs/text/baseline.yaml --trainer.max_epochs=2
    loract fit --config configs/text/baseline.yaml --config configs/text/loract.yaml --print_config
    loract profile --config configs/text/baseline.yaml --config configs/text/loract.yaml --batches 2
    loract profile --help

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

import logging
import warnings
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI
from typing_extensions import override

from loract_lightning.profiling_trainer import ProfilingTrainer


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


PROFILING_RUN = {
    "limit_val_batches": 0, "num_sanity_val_steps": 0, "logger": False, "enable_checkpointing": False,
}  # fmt: skip
"""Trainer settings of a ``loract profile`` run: it measures training batches and keeps nothing."""


class LoRActCLI(LightningCLI):
    """LightningCLI whose trainer is a :class:`ProfilingTrainer`, so ``profile`` is one more subcommand."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("trainer_class", ProfilingTrainer)
        super().__init__(*args, **kwargs)

    @staticmethod
    @override
    def subcommands() -> dict[str, set[str]]:
        return {**LightningCLI.subcommands(), "profile": {"model", "datamodule"}}

    @override
    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        if self.subcommand == "profile":
            # A profiling run is not a run to reproduce: no config.yaml in the working directory.
            self.save_config_callback = None
            kwargs = {**PROFILING_RUN, **kwargs}
        return super().instantiate_trainer(**kwargs)


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``loract`` console script."""
    silence_known_warnings()
    build_cli(args)


def build_cli(args: list[str] | None, run: bool = True) -> LightningCLI:
    """The LightningCLI of ``loract``; ``run=False`` parses and builds the run without running it."""
    return LoRActCLI(
        args=args,
        run=run,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


if __name__ == "__main__":
    main()
