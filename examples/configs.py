"""The shipped configs: one folder per task in ``configs/``, a ``baseline.yaml`` that runs on its own
(no compression) and overlays that add LoRAct to it. A run is named ``task/variant`` and given to
``loract`` as the baseline followed by the overlay::

    loract fit --config configs/text/baseline.yaml --config configs/text/loract.yaml

(LightningCLI merges the ``--config`` files in order; an overlay's ``callbacks+:`` appends to the
baseline's callbacks instead of replacing them.)
"""

from __future__ import annotations

import contextlib
import io
import warnings
from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
BASELINE = "baseline"


def config_names() -> list[str]:
    """Every shipped run, ``task/variant``, baselines included."""
    return sorted(f"{path.parent.name}/{path.stem}" for path in CONFIG_DIR.glob("*/*.yaml"))


def config_files(name: str) -> list[Path]:
    """The ``--config`` files of the run ``task/variant``, in order: the task's baseline, then the overlay.

    Raises:
        ValueError: ``name`` is not a shipped run (the message lists those that are).
    """
    if name not in config_names():
        raise ValueError(f"no shipped config {name!r}; choose from {config_names()}")
    task, variant = name.split("/")
    files = [CONFIG_DIR / task / f"{BASELINE}.yaml"]
    return files if variant == BASELINE else [*files, CONFIG_DIR / task / f"{variant}.yaml"]


def config_arguments(name: str) -> list[str]:
    """``--config FILE`` for each of :func:`config_files`, for ``loract`` or ``loract_lightning.cli.main``."""
    return [argument for path in config_files(name) for argument in ("--config", str(path))]


def resolved_config(name: str) -> dict:
    """The run's whole config as LightningCLI merges it (what ``--print_config`` prints), e.g. to change
    a setting and write it back as one file."""
    from loract_lightning.cli import main

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.suppress(SystemExit), warnings.catch_warnings():
        # LightningCLI warns that it was given arguments beside the caller's own command line.
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")
        main(["fit", *config_arguments(name), "--print_config"])
    return yaml.safe_load(printed.getvalue())
