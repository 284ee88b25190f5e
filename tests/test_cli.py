"""The loract command: every shipped config runs, --print_config round-trips, bad configs name the field."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus

from loract_lightning import LoRAct
from loract_lightning.cli import main

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.fixture(autouse=True)
def run_from_repository_root(monkeypatch):
    monkeypatch.chdir(ROOT)


class TrainableSnapshot(Callback):
    """The trainable parameters as training starts (after ``configure_model`` and ``setup`` built them)."""

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.before = {name: p.detach().clone() for name, p in pl_module.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_runs_a_fast_dev_run(config, tmp_path, monkeypatch):
    fits = []
    fit = Trainer.fit

    def recording_fit(trainer, model, *args, **kwargs):
        fits.append((trainer, model, TrainableSnapshot()))
        trainer.callbacks.append(fits[-1][2])
        return fit(trainer, model, *args, **kwargs)

    monkeypatch.setattr(Trainer, "fit", recording_fit)
    main(["fit", "--config", str(config), "--trainer.fast_dev_run=true", f"--trainer.default_root_dir={tmp_path}"])
    ((trainer, model, snapshot),) = fits
    assert trainer.state.fn == TrainerFn.FITTING and trainer.state.status == TrainerStatus.FINISHED
    assert trainer.global_step == 1  # fast_dev_run: one training batch, one optimizer step
    after = dict(model.named_parameters())
    assert snapshot.before, "no trainable parameters"
    assert any(not torch.equal(after[name], p) for name, p in snapshot.before.items()), "no parameter was updated"
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    configured = yaml.safe_load(config.read_text())["trainer"].get("callbacks") or []
    configured = [c["init_args"] for c in configured if c["class_path"] == "loract_lightning.LoRAct"]
    callbacks = [c for c in trainer.callbacks if isinstance(c, LoRAct)]
    assert len(callbacks) == len(configured)
    if not configured:  # a baseline
        return
    (loract,), (init_args,) = callbacks, configured
    stats = loract.step_stats
    assert stats.compressed > 0 and stats.mean_rank >= 1, stats
    assert 0 < stats.stored_bytes < stats.saved_bytes, stats
    compressor = loract.compressor
    assert compressor.layer_mode == bool(init_args.get("checkpoint"))
    if compressor.layer_mode:  # a checkpointed block saves only its input: one factorization per block
        assert compressor.checkpointed_modules, init_args
        assert all(stats.modules[name].compressed == 1 for name in compressor.checkpointed_modules), stats
    assert not loract.installed  # removed at the end of fit


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
    assert all(c["class_path"].startswith(("loract_lightning", "lightning", "examples.")) for c in callbacks)


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
        capsys, "--config", "configs/text_baseline.yaml",
        f"--data.init_args.data_name_or_path={tmp_path / 'nowhere.csv'}", "--trainer.fast_dev_run=true",
    )  # fmt: skip
    assert "nowhere.csv" in report


def test_bad_lr_schedule_names_the_value_and_the_choices(capsys):
    report = run_failing(capsys, "--config", "configs/text_baseline.yaml", "--model.init_args.lr_schedule=cosine")
    assert "lr_schedule must be one of ['one_cycle', 'constant'], got 'cosine'" in report


@pytest.mark.parametrize("schedule", ["one_cycle", "constant"])
def test_text_learning_rate_warms_up_then_decays_or_stays(schedule, tmp_path, monkeypatch):
    rates = []

    class RecordLearningRate(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            rates.append(trainer.optimizers[0].param_groups[0]["lr"])

    fit = Trainer.fit

    def recording_fit(trainer, model, *args, **kwargs):
        trainer.callbacks.append(RecordLearningRate())
        return fit(trainer, model, *args, **kwargs)

    monkeypatch.setattr(Trainer, "fit", recording_fit)
    main([
        "fit", "--config", "configs/text_baseline.yaml", f"--model.init_args.lr_schedule={schedule}",
        "--data.init_args.max_train_samples=40", "--data.init_args.batch_size=2", "--data.init_args.max_length=16",
        "--trainer.max_epochs=1", "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false", "--trainer.enable_checkpointing=false",
    ])  # fmt: skip
    peak = 1e-3  # the config's lr
    assert len(rates) == 20
    if schedule == "constant":
        assert rates == [peak] * 20
        return
    top = rates.index(max(rates))
    assert max(rates) == pytest.approx(peak) and 0 < top <= 3  # warmup over the first 10% of the steps
    assert all(a < b for a, b in pairwise(rates[: top + 1]))  # rising to the peak
    assert all(a > b for a, b in pairwise(rates[top:]))  # then falling
    assert rates[0] < peak / 10 and rates[-1] < peak / 10
