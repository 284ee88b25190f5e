"""The loract command as a Lightning user meets it: short callback names, per-argument help, --version,
the user's own module from the working directory, --optimizer, and a profile run that does not train."""

from __future__ import annotations

import importlib.metadata
import inspect
import re
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

import loract_lightning
from loract_lightning import ActivationMemoryMonitor, LoRAct, ProfilingTrainer
from loract_lightning.cli import build_cli, main

# main() is given its arguments; pytest's own command line is not meant for it.
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter is intended")

USER_MODULE = """
import torch
from lightning.pytorch import LightningModule
from torch.utils.data import DataLoader, TensorDataset


class MyModel(LightningModule):
    def __init__(self, width: int = 96) -> None:
        super().__init__()
        self.width = width
        self.net = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.ReLU(), torch.nn.Linear(width, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        x = torch.randn(256, self.width, generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=64)
"""


@pytest.fixture
def user_folder(tmp_path, monkeypatch):
    """An empty working directory holding only the user's ``user_model.py``; sys.path restored after."""
    (tmp_path / "user_model.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "user_model", raising=False)
    yield tmp_path
    sys.modules.pop("user_model", None)


def exit_output(capsys, args: list[str]) -> tuple[int | None, str]:
    with pytest.raises(SystemExit) as exited:
        main(args)
    captured = capsys.readouterr()
    return exited.value.code, captured.out + captured.err


def test_version_is_the_package_version_written_once(capsys):
    code, out = exit_output(capsys, ["--version"])
    assert code == 0
    assert out.strip() == f"loract-lightning {loract_lightning.__version__}"
    assert importlib.metadata.version("loract-lightning") == loract_lightning.__version__


def test_help_describes_loract_not_lightnings_default(capsys):
    code, out = exit_output(capsys, ["--help"])
    assert code == 0
    assert "Lightning Trainer command line tool" not in out
    assert "LoRAct" in out and "profile" in out


@pytest.mark.parametrize("callback", [LoRAct, ActivationMemoryMonitor])
def test_callback_help_by_short_name_describes_every_argument(callback, capsys):
    code, out = exit_output(capsys, ["fit", "--trainer.callbacks.help", callback.__name__])
    assert code == 0, out
    out = " ".join(out[out.index("Help for") :].split())
    descriptions = {}
    for name in list(inspect.signature(callback.__init__).parameters)[1:]:
        match = re.search(rf"--trainer\.callbacks\.{name} \S+(?: --trainer\S+ \S+)? (.*?)\(type:", out)
        assert match, f"{name} is not in the help"
        descriptions[name] = match.group(1).strip()
        assert len(descriptions[name]) > 15, f"{name} has no description of its own: {descriptions[name]!r}"
    assert len(set(descriptions.values())) == len(descriptions), "arguments share a description"
    if callback is LoRAct:
        assert "Literal['sampled_qb', 'randomized_svd', 'truncated_svd']" in out  # method: a fixed set
        assert re.search(r"--trainer\.callbacks\.rank RANK .*?\(type: Union\[int, float, Literal\['auto'\]\]", out)


def test_callbacks_are_added_by_short_name(user_folder):
    cli = build_cli(
        [
            "--model", "user_model.MyModel",
            "--trainer.callbacks+=LoRAct", "--trainer.callbacks.rank=0.25", "--trainer.callbacks.method=randomized_svd",
            "--trainer.callbacks+=ActivationMemoryMonitor", "--trainer.callbacks.top_k=3",
            "--trainer.logger=false", "--trainer.enable_checkpointing=false",
        ],
        run=False,
    )  # fmt: skip
    (loract,) = [c for c in cli.trainer.callbacks if isinstance(c, LoRAct)]
    (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, ActivationMemoryMonitor)]
    assert loract.options.rank == 0.25 and loract.options.method == "randomized_svd"
    assert monitor.top_k == 3


@pytest.mark.slow  # a subprocess
def test_the_strategy_form_by_its_registered_name(user_folder):
    # In a fresh interpreter: only what the command imports may have registered the name.
    script = (
        "from loract_lightning.cli import build_cli\n"
        "cli = build_cli(['--model', 'user_model.MyModel', '--trainer.strategy=loract', '--trainer.logger=false'],"
        " run=False)\n"
        "print(type(cli.trainer.strategy).__name__)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "LoRActStrategy"


def test_the_users_own_module_runs_from_its_folder(user_folder):
    fit = [
        "fit", "--model", "user_model.MyModel", "--trainer.callbacks+=LoRAct",
        "--trainer.callbacks.rank=0.25", "--trainer.callbacks.min_bytes=0",
        "--trainer.max_steps=2", "--trainer.enable_progress_bar=false",
    ]  # fmt: skip
    main(fit)
    cli = build_cli(fit[1:], run=False)  # without running: no subcommand
    assert type(cli.model).__module__ == "user_model"


def test_a_module_that_does_not_import_says_where_loract_looks(user_folder, capsys):
    code, out = exit_output(capsys, ["fit", "--model", "no_such_module.Model"])
    assert code == 2
    assert "No module named 'no_such_module'" in out and f"working directory {user_folder}," in out
    # From a config file in another folder (jsonargparse parses it from there): still the working directory.
    config = user_folder / "configs" / "run.yaml"
    config.parent.mkdir()
    config.write_text("model:\n  class_path: no_such_module.Model\n")
    code, out = exit_output(capsys, ["fit", "--config", str(config)])
    assert code == 2 and f"working directory {user_folder}," in out, out


def test_optimizer_and_lr_scheduler_options_are_there(user_folder):
    cli = build_cli(
        [
            # Full class paths: once bitsandbytes is imported (the quantized-base tests), "Adam"
            # alone is ambiguous for jsonargparse (bitsandbytes.optim.Adam), as for any user.
            "--model", "user_model.MyModel", "--optimizer=torch.optim.Adam", "--optimizer.lr=0.003",
            "--lr_scheduler=torch.optim.lr_scheduler.StepLR", "--lr_scheduler.step_size=5", "--trainer.logger=false",
        ],
        run=False,
    )  # fmt: skip
    ((optimizer,), (scheduler,)) = cli.model.configure_optimizers()
    assert isinstance(optimizer, torch.optim.Adam) and optimizer.defaults["lr"] == 0.003
    assert isinstance(scheduler, torch.optim.lr_scheduler.StepLR) and scheduler.step_size == 5


def test_profile_from_python_measures_without_training(user_folder):
    sys.path.insert(0, str(user_folder))
    from user_model import MyModel

    class WithValidation(MyModel):
        validation_batches = 0

        def validation_step(self, batch, batch_idx):
            WithValidation.validation_batches += 1

        def val_dataloader(self):
            return self.train_dataloader()

    model = WithValidation()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    loract = LoRAct(rank=0.25, min_bytes=0, min_width=16, min_rank=4)
    trainer = ProfilingTrainer(callbacks=[loract], enable_progress_bar=False, max_steps=-1)
    checkpoint = trainer.checkpoint_callback
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layers = trainer.profile(model, batches=2, output_dir=user_folder / "profile", max_error=0.5)
    assert layers, "nothing was profiled"
    messages = [str(w.message) for w in caught]
    assert not any("max_epochs" in m for m in messages), messages
    after = model.state_dict()
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items()), "the profile trained the model"
    assert trainer.global_step == 2  # the batches ran, with their optimizer steps undone
    assert WithValidation.validation_batches == 0  # no sanity check, no validation
    written = sorted(p.name for p in user_folder.rglob("*") if p.is_file())
    assert written == ["loract_layers.yaml", "rank_profile.json", "rank_profile.png", "user_model.py"], written
    # The trainer's own settings are back.
    assert isinstance(checkpoint, ModelCheckpoint) and trainer.checkpoint_callback is checkpoint
    assert trainer.loggers and trainer.max_steps == -1 and trainer.limit_val_batches == 1.0
    assert loract in trainer.callbacks
