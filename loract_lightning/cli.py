"""The ``loract`` command: LightningCLI (fit/validate/test/predict) with LoRAct's callbacks.

    loract fit --config configs/text_loract.yaml
    loract fit --config configs/text_baseline.yaml --trainer.max_epochs=2
    loract fit --config configs/text_loract.yaml --print_config

Any LightningModule/LightningDataModule can be named by ``class_path``; the current directory is
on the import path (as with ``python -m``), so ``examples.text_classification.TextClassifier``
resolves from a checkout. LoRAct is added like any callback::

    trainer:
      callbacks:
        - class_path: loract_lightning.LoRAct
          init_args: {rank: 0.125, layers: {"model.*.layer.0.*": 64}}
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

from lightning.pytorch.cli import LightningCLI


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
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    silence_known_warnings()
    LightningCLI(
        args=args,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )


if __name__ == "__main__":
    main()
