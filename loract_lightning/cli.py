"""The ``loract`` command: LightningCLI (fit/validate/test/predict) with LoRAct's callbacks,
and ``profile`` (:meth:`ProfilingTrainer.profile`), which measures the rank each module needs.

    loract fit --config configs/text/baseline.yaml --config configs/text/loract.yaml
    loract fit --config configs/text/baseline.yaml --trainer.max_epochs=2
    loract fit --config configs/text/baseline.yaml --config configs/text/loract.yaml --print_config
    loract profile --config configs/text/baseline.yaml --config configs/text/loract.yaml --batches 2
    loract profile --help

Any importable LightningModule/LightningDataModule can be named by ``class_path``; like
``python -m``, ``loract`` imports from the working directory first, so ``--model my_module.MyModel``
finds ``./my_module.py`` and, from a checkout's root, the shipped configs find ``examples.*``.
LoRAct's callbacks are added by their short names, like Lightning's own, and its strategies by
their registered names (``--trainer.strategy=loract_ddp``)::

    loract fit --model my_module.MyModel --trainer.callbacks+=LoRAct --trainer.callbacks.rank=0.25
    loract fit --trainer.callbacks.help LoRAct

or in YAML::

    trainer:
      callbacks:
        - class_path: loract_lightning.LoRAct
          init_args: {rank: 0.125, layers: {"model.*.layer.0.*": 64}}

A bad value is an argument error (exit code 2) with one ``error:`` line that names it: after the
usage where the parser rejects it (a ``method`` it does not know), alone where the class refuses it
as it is built (``error: LoRAct: rank must be an int >= 1, a float in (0, 1], 'auto', got 1.5``).
``JSONARGPARSE_DEBUG=true`` raises it with its traceback instead.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
import warnings
from typing import Any, NoReturn

from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from typing_extensions import override

import loract_lightning
import loract_lightning.strategies
from loract_lightning.activation_memory_monitor import ActivationMemoryMonitor
from loract_lightning.loract import LoRAct
from loract_lightning.profiling_trainer import PROFILING_RUN, ProfilingTrainer

# Imported (above) so that jsonargparse resolves their short names as it does Lightning's callbacks'
# (--trainer.callbacks+=LoRAct), and so that the strategies' names are registered with Lightning
# (--trainer.strategy=loract_ddp).
CALLBACKS = (LoRAct, ActivationMemoryMonitor)
STRATEGIES = loract_lightning.strategies.__all__

DESCRIPTION = (
    "loract: train a LightningModule with its saved activations stored as low-rank factors (LoRAct). "
    "LightningCLI's fit/validate/test/predict, plus `profile` (the rank each module needs). "
    "Add the callback with --trainer.callbacks+=LoRAct; see its options with --trainer.callbacks.help LoRAct."
)


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


_working_directory = os.getcwd()
"""The directory ``loract`` was started in (see :func:`import_from_working_directory`)."""


class LoRActArgumentParser(LightningArgumentParser):
    """LightningCLI's parser, whose error for a bad ``init_args`` value of a class in a list (a
    callback) is the one line that names it, not every Union subtype the list could have been."""

    @override
    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        super().error(_import_hint(_class_problem(message, ex)), ex)


def _import_hint(message: str) -> str:
    """``message``, with where ``loract`` looks for a class path whose module did not import."""
    if "No module named" not in message:
        return message
    return (
        f"{message} (class paths import from the working directory {_working_directory}, PYTHONPATH and the "
        "installed packages; the shipped configs' examples.* from the root of a loract-lightning checkout)"
    )


def _class_problem(message: str, error: Exception | None) -> str:
    """``message``, or for a Union that no subtype validates, the problem jsonargparse found with the
    given class (``Parser key "trainer.callbacks": Problem with given class_path 'loract_lightning.LoRAct':
    Parser key "method": Expected a typing.Literal[...]. Got value: nope``), on one line."""
    if "Does not validate against any of the Union subtypes" not in message:
        return message
    for cause in _causes(error):
        if str(cause).startswith("Problem with given class_path"):
            key = message.splitlines()[0] + " " if message.startswith("Parser key") else ""
            return key + " ".join(line.strip() for line in str(cause).splitlines())
    return message


def _causes(error: BaseException | None) -> list[BaseException]:
    """``error`` and the chain of exceptions it was raised from (or while handling)."""
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _refusal(error: BaseException) -> BaseException:
    """The error a configured class raised as it was built, out of jsonargparse's wrapping: the
    first in ``error``'s chain that jsonargparse did not raise (else the last)."""
    chain = _causes(error)
    return next((e for e in chain if f"{os.sep}jsonargparse{os.sep}" not in _raised_in(e)), chain[-1])


def _one_line(refusal: BaseException) -> str:
    """``<class>: <message>``, the class being the one whose ``__init__`` raised ``refusal``, where one did."""
    frames = [frame for frame, _ in traceback.walk_tb(refusal.__traceback__)]
    owners = [f.f_locals["self"] for f in frames if f.f_code.co_name == "__init__" and "self" in f.f_locals]
    return f"{type(owners[0]).__name__}: {refusal}" if owners else str(refusal)


def _raised_in(error: BaseException) -> str:
    """The file of the frame that raised ``error``."""
    frames = list(traceback.walk_tb(error.__traceback__))
    return frames[-1][0].f_code.co_filename if frames else ""


class LoRActCLI(LightningCLI):
    """LightningCLI whose trainer is a :class:`ProfilingTrainer`, so ``profile`` is one more
    subcommand, whose help describes ``loract`` and has ``--version``, and whose errors for bad
    values are one line (exit code 2).

    Args:
        *args: LightningCLI's arguments.
        **kwargs: LightningCLI's keyword arguments; ``trainer_class`` defaults to :class:`ProfilingTrainer`.

    Example::

        LoRActCLI(args=["fit", "--model", "my_module.MyModel", "--trainer.callbacks+=LoRAct"])
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("trainer_class", ProfilingTrainer)
        kwargs.setdefault("parser_class", LoRActArgumentParser)
        super().__init__(*args, **kwargs)

    @override
    def setup_parser(
        self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]
    ) -> None:
        main_kwargs = {"description": DESCRIPTION, **main_kwargs}
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        self.parser.add_argument(
            "--version", action="version", version=f"loract-lightning {loract_lightning.__version__}"
        )

    @override
    def instantiate_classes(self) -> None:
        """Build the configured classes; a value one of them refuses (a ValueError/TypeError from its
        ``__init__``, such as LoRAct's checks) is an argument error: one line, exit code 2."""
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as error:
            refusal = _refusal(error)
            debug = os.environ.get("JSONARGPARSE_DEBUG", "").lower() == "true"
            if not isinstance(refusal, (ValueError, TypeError)) or not self.parser.exit_on_error or debug:
                raise
            self.parser.exit(2, f"error: {_one_line(refusal)}\n")

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


def import_from_working_directory() -> None:
    """Put the working directory first on ``sys.path``, as ``python -m`` does, so that class paths
    name the user's own modules (``--model my_module.MyModel``) as they would in ``python -m``."""
    global _working_directory
    # Kept: jsonargparse parses a config file from inside the file's folder.
    _working_directory = os.getcwd()
    if _working_directory not in sys.path:  # absolute: "" would follow jsonargparse into a config's folder
        sys.path.insert(0, _working_directory)


def build_cli(args: list[str] | None, run: bool = True) -> LightningCLI:
    """The LightningCLI of ``loract``; ``run=False`` parses and builds the run without running it."""
    import_from_working_directory()
    return LoRActCLI(
        args=args,
        run=run,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()
