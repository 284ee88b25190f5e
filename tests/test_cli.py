"""The loract command: every shipped config runs, --print_config round-trips, bad configs name the field."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus

from examples.configs import CONFIG_DIR, config_arguments, config_names
from loract_lightning import LoRAct
from loract_lightning.cli import main

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
CONFIGS = config_names()


@pytest.fixture(autouse=True)
def run_from_repository_root(monkeypatch):
    monkeypatch.chdir(ROOT)


class TrainableSnapshot(Callback):
    """The trainable parameters as training starts (after ``configure_model`` and ``setup`` built them)."""

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.before = {name: p.detach().clone() for name, p in pl_module.named_parameters() if p.requires_grad}


def test_every_task_has_a_baseline_and_every_overlay_adds_one_loract():
    tasks = {name.split("/")[0] for name in CONFIGS}
    assert tasks and all(f"{task}/baseline" in CONFIGS for task in tasks)
    for overlay in sorted(CONFIG_DIR.glob("*/*.yaml")):
        added = yaml.safe_load(overlay.read_text())["trainer"].get("callbacks+", [])
        loracts = [c for c in added if c["class_path"] == "loract_lightning.LoRAct"]
        assert len(loracts) == (overlay.stem != "baseline"), overlay


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_runs_a_fast_dev_run(config, tmp_path, monkeypatch):
    fits = []
    fit = Trainer.fit

    def recording_fit(trainer, model, *args, **kwargs):
        fits.append((trainer, model, TrainableSnapshot()))
        trainer.callbacks.append(fits[-1][2])
        return fit(trainer, model, *args, **kwargs)

    monkeypatch.setattr(Trainer, "fit", recording_fit)
    main(["fit", *config_arguments(config), "--trainer.fast_dev_run=true", f"--trainer.default_root_dir={tmp_path}"])
    ((trainer, model, snapshot),) = fits
    assert trainer.state.fn == TrainerFn.FITTING and trainer.state.status == TrainerStatus.FINISHED
    assert trainer.global_step == 1  # fast_dev_run: one training batch, one optimizer step
    after = dict(model.named_parameters())
    assert snapshot.before, "no trainable parameters"
    assert any(not torch.equal(after[name], p) for name, p in snapshot.before.items()), "no parameter was updated"
    assert torch.isfinite(trainer.callback_metrics["train_loss"])
    callbacks = [c for c in trainer.callbacks if isinstance(c, LoRAct)]
    assert len(callbacks) == (not config.endswith("/baseline"))
    if not callbacks:  # a baseline
        return
    (loract,) = callbacks
    stats = loract.step_stats
    assert stats.compressed > 0 and stats.mean_rank >= 1, stats
    assert 0 < stats.stored_bytes < stats.saved_bytes, stats
    compressor = loract.compressor
    assert compressor.layer_mode == bool(loract.options.checkpoint)
    if compressor.layer_mode:  # a checkpointed block saves only its input: one factorization per block
        assert compressor.checkpointed_modules, loract.options.checkpoint
        assert all(stats.modules[name].compressed == 1 for name in compressor.checkpointed_modules), stats
    assert not loract.installed  # removed at the end of fit


@pytest.mark.parametrize("config", CONFIGS)
def test_print_config_round_trips(config, tmp_path, capsys):
    def printed(*config_arguments: str) -> dict:
        with pytest.raises(SystemExit) as exited:
            main(["fit", *config_arguments, "--print_config"])
        assert exited.value.code in (0, None)
        return yaml.safe_load(capsys.readouterr().out)

    first = printed(*config_arguments(config))
    again = tmp_path / "printed.yaml"
    again.write_text(yaml.safe_dump(first))
    assert printed("--config", str(again)) == first
    callbacks = first["trainer"].get("callbacks") or []
    assert all(c["class_path"].startswith(("loract_lightning", "lightning", "examples.")) for c in callbacks)


def run_failing(capsys, *args: str) -> str:
    """Run ``loract fit ARGS`` expecting failure; returns what it reported."""
    with pytest.raises((SystemExit, ValueError, TypeError, FileNotFoundError)) as failure:
        main(["fit", *args])
    return capsys.readouterr().err + str(failure.value)


def test_unknown_option_names_the_field(capsys):
    report = run_failing(capsys, *config_arguments("text/loract"), "--model.init_args.no_such_option=1")
    assert "no_such_option" in report


def test_bad_rank_in_an_overlay_names_the_value(tmp_path, capsys):
    overlay = yaml.safe_load((CONFIG_DIR / "text" / "loract.yaml").read_text())
    overlay["trainer"]["callbacks+"][0]["init_args"]["rank"] = 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(overlay))
    report = run_failing(capsys, *config_arguments("text/baseline"), "--config", str(bad))
    assert "rank must be an int >= 1, a float in (0, 1], 'auto', got 0" in report


@pytest.mark.parametrize(
    ("init_args", "parsed", "message"),
    [
        # refused by LoRAct as it is built: the library's message, and nothing else
        ({"rank": 1.5}, False, "error: LoRAct: rank must be an int >= 1, a float in (0, 1], 'auto', got 1.5"),
        (
            {"method": "truncated_svd", "power_iters": 2},
            False,
            "error: LoRAct: power_iters=2 is not an option of method='truncated_svd'; methods that take it:",
        ),
        # refused by the parser (method is a Literal): jsonargparse's usage, then the one problem
        (
            {"method": "nope"},
            True,
            """Parser key "method": Expected a typing.Literal['sampled_qb', 'randomized_svd', """,
        ),
    ],
)
def test_a_bad_loract_value_is_one_error_line_and_exit_code_2(init_args, parsed, message, tmp_path, capsys):
    overlay = {"trainer": {"callbacks+": [{"class_path": "loract_lightning.LoRAct", "init_args": init_args}]}}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(overlay))
    with pytest.raises(SystemExit) as exited:
        main(["fit", *config_arguments("text/baseline"), "--config", str(bad), "--trainer.fast_dev_run=true"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    error = err[err.index("error: ") :]
    assert message in error and error.count("\n") == 1, err  # one line
    assert "Traceback" not in err and "Does not validate against any of the Union subtypes" not in err
    if not parsed:
        assert len(err.splitlines()) <= 3, err  # no usage either: at most a log line before it


def test_missing_data_dir_names_the_path(tmp_path, capsys):
    report = run_failing(
        capsys, *config_arguments("text/baseline"),
        f"--data.init_args.data_name_or_path={tmp_path / 'nowhere.csv'}", "--trainer.fast_dev_run=true",
    )  # fmt: skip
    assert "nowhere.csv" in report


def test_bad_lr_schedule_names_the_value_and_the_choices(capsys):
    report = run_failing(capsys, *config_arguments("text/baseline"), "--model.init_args.lr_schedule=cosine")
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
        "fit", *config_arguments("text/baseline"), f"--model.init_args.lr_schedule={schedule}",
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
