"""LightningModules over the known-rank network, for the callback tests and the DDP script."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning.pytorch as pl
import torch
from conftest import KnownRankNet
from torch.utils.data import DataLoader, TensorDataset


def saved_tensor_hooks_installed() -> bool:
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


class KnownRankModule(pl.LightningModule):
    """Trains KnownRankNet with SGD; records whether compression was active in each stage."""

    def __init__(self, manual: bool = False, forwards_per_step: int = 2, fail_at_step: int | None = None) -> None:
        super().__init__()
        self.net = KnownRankNet()
        self.automatic_optimization = not manual
        self.forwards_per_step = forwards_per_step
        self.fail_at_step = fail_at_step
        self.hooks_seen: dict[str, list[bool]] = {"train": [], "validation": [], "test": [], "predict": []}

    def training_step(self, batch, batch_idx):
        self.hooks_seen["train"].append(saved_tensor_hooks_installed())
        if self.fail_at_step is not None and self.global_step == self.fail_at_step:
            raise RuntimeError("failure inside training_step")
        (x,) = batch
        if self.automatic_optimization:
            loss = self.net(x)
            self.log("train_loss", loss)
            return loss
        optimizer = self.optimizers()
        for part in x.chunk(self.forwards_per_step):
            self.hooks_seen["train"].append(saved_tensor_hooks_installed())
            loss = self.net(part)
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
        return None

    def validation_step(self, batch, batch_idx):
        self.hooks_seen["validation"].append(saved_tensor_hooks_installed())
        self.log("val_loss", self.net(batch[0]))

    def test_step(self, batch, batch_idx):
        self.hooks_seen["test"].append(saved_tensor_hooks_installed())

    def predict_step(self, batch, batch_idx):
        self.hooks_seen["predict"].append(saved_tensor_hooks_installed())
        return self.net(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def known_rank_loader(batches: int = 4, batch_size: int = 4) -> DataLoader:
    inputs = torch.cat([KnownRankNet.make_input(batch=batch_size, seed=i) for i in range(batches)])
    return DataLoader(TensorDataset(inputs), batch_size=batch_size)


def trainer(tmp_path: Path, callbacks=(), **options) -> pl.Trainer:
    defaults = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "default_root_dir": tmp_path,
    }
    return pl.Trainer(callbacks=list(callbacks), **{**defaults, **options})


def fit(tmp_path: Path, callbacks=(), module_options=None, **trainer_options) -> KnownRankModule:
    pl.seed_everything(0, verbose=False)
    module = KnownRankModule(**(module_options or {}))
    trainer(tmp_path, callbacks, **trainer_options).fit(module, known_rank_loader(), known_rank_loader(batches=1))
    return module


def parameters_of(module: pl.LightningModule) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def logged_rows(logger, key: str) -> list[dict]:
    """Rows of a CSVLogger's metrics file that hold ``key``."""
    with open(Path(logger.log_dir) / "metrics.csv") as metrics_file:
        return [row for row in csv.DictReader(metrics_file) if row.get(key)]
