"""The loract command: every shipped config runs, --print_config round-trips, bad configs name the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from loract_lightning.cli import main

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.fixture(autouse=True)
def run_from_repository_root(monkeypatch):
    monkeypatch.chdir(ROOT)


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_runs_a_fast_dev_run(config, tmp_path):
    main(["fit", "--config", str(config), "--trainer.fast_dev_run=true", f"--trainer.default_root_dir={tmp_path}"])


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_print_config_round_trips(config, tmp_path, capsys):
    def printed(path: Path) -> dict:
        with pytest.raises(SystemExit) as exited:
            main(["fit", "--config", str(path), "--print_config"])
        assert exited.value.code in (0, None)
        return yaml.safe_load(capsys.readouterr().out)

    first = printed(config)
    again = tmp_path / "printed.yaml"
    again.write_text(yaml.safe_dump(first))
    assert printed(again) == first
    callbacks = first["trainer"].get("callbacks") or []
    assert all(c["class_path"].startswith(("loract_lightning", "lightning")) for c in callbacks)


def run_failing(capsys, *args: str) -> str:
    """Run ``loract fit ARGS`` expecting failure; returns what it reported."""
    with pytest.raises((SystemExit, ValueError, TypeError, FileNotFoundError)) as failure:
        main(["fit", *args])
    return capsys.readouterr().err + str(failure.value)


def test_unknown_option_names_the_field(capsys):
    report = run_failing(capsys, "--config", "configs/text_loract.yaml", "--model.init_args.no_such_option=1")
    assert "no_such_option" in report


def test_bad_rank_in_yaml_names_the_value(tmp_path, capsys):
    config = yaml.safe_load((ROOT / "configs" / "text_loract.yaml").read_text())
    config["trainer"]["callbacks"][0]["init_args"]["rank"] = 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(config))
    assert "rank must be an int >= 1, a float in (0, 1], 'auto', got 0" in run_failing(capsys, "--config", str(bad))


def test_missing_data_dir_names_the_path(tmp_path, capsys):
    report = run_failing(
        capsys, "--config", "configs/text_baseline.yaml", f"--data.init_args.data_dir={tmp_path / 'nowhere'}",
        "--trainer.fast_dev_run=true",
    )  # fmt: skip
    assert "nowhere" in report and "train.tsv" in report
