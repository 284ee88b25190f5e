"""Core-only install: what needs the `report` extra (rich, matplotlib) refuses to start without it,
naming the extra, instead of failing at the end of a whole run."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from lightning.pytorch import Trainer

from examples.configs import config_arguments
from loract_lightning import ActivationMemoryMonitor
from loract_lightning import cli as loract_cli
from loract_lightning.report import REPORT_PACKAGES

ROOT = Path(__file__).resolve().parents[1]
EXTRA = r'pip install "loract-lightning\[report\]"'


def hide(monkeypatch: pytest.MonkeyPatch, package: str) -> None:
    """Make ``package`` look uninstalled: None in sys.modules is what the import system reads as
    missing (``import`` raises ModuleNotFoundError, ``importlib.util.find_spec`` returns None)."""
    monkeypatch.setitem(sys.modules, package, None)


def test_the_report_extra_holds_what_the_error_names():
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert sorted(extras["report"]) == sorted(REPORT_PACKAGES)
    assert "loract-lightning[report]" in extras["examples"]
    assert "loract-lightning[examples]" in extras["dev"]


@pytest.mark.parametrize("package", REPORT_PACKAGES)
def test_monitor_without_a_report_package_fails_at_construction_naming_the_extra(monkeypatch, package):
    hide(monkeypatch, package)
    with pytest.raises(ModuleNotFoundError, match=f"not installed: {package}\\. .*{EXTRA}") as raised:
        ActivationMemoryMonitor()
    assert raised.value.name == package


def test_monitor_names_every_missing_package(monkeypatch):
    for package in REPORT_PACKAGES:
        hide(monkeypatch, package)
    with pytest.raises(ModuleNotFoundError, match=f"not installed: rich, matplotlib\\. .*{EXTRA}"):
        ActivationMemoryMonitor()


def test_monitor_with_the_report_packages_constructs():
    ActivationMemoryMonitor(top_k=3)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:LightningCLI's args parameter is intended")
def test_loract_fit_config_with_the_monitor_fails_while_the_cli_is_built(monkeypatch):
    hide(monkeypatch, "matplotlib")
    monkeypatch.syspath_prepend(str(ROOT / "tests"))  # for lit_models
    arguments = [
        "--model=lit_models.KnownRankModule",
        "--trainer.callbacks+=loract_lightning.ActivationMemoryMonitor",
        "--trainer.logger=false",
        "--seed_everything=0",
    ]
    # jsonargparse reports a failing callback constructor as a ValueError quoting its message.
    with pytest.raises((ValueError, ModuleNotFoundError), match=EXTRA):
        loract_cli.build_cli(arguments, run=False)


def test_loract_profile_without_rich_stops_before_the_run(monkeypatch):
    hide(monkeypatch, "rich")

    def no_fit(*args, **kwargs):
        raise AssertionError("loract profile ran although it cannot print its result")

    monkeypatch.setattr(Trainer, "fit", no_fit)
    with pytest.raises(ModuleNotFoundError, match=f"loract profile .*not installed: rich\\. .*{EXTRA}"):
        loract_cli.main(["profile", *config_arguments("vision/loract")])
