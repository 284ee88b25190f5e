"""A tiny CPU fit with LoRAct and ActivationMemoryMonitor, run by scripts/core_only_check.sh.

    python core_only_fit.py core     # core install: the monitor refuses at construction, naming
                                     # the `report` extra; LoRAct alone fits
    python core_only_fit.py report   # with the `report` extra: a fit with both callbacks
                                     # completes and writes the monitor's report

Exits non-zero (with the reason) if the installed package behaves otherwise.
"""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from loract_lightning import ActivationMemoryMonitor, LoRAct

STEPS = 4
BATCH = 128  # rows: the default min_width=64 keeps narrower activations raw
EXTRA = 'pip install "loract-lightning[report]"'


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 1))

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        return nn.functional.mse_loss(self.net(inputs), targets)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def fit(callbacks: list[pl.Callback], root: Path) -> pl.Trainer:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(STEPS * BATCH, 64, generator=generator)
    targets = torch.randn(STEPS * BATCH, 1, generator=generator)
    data = TensorDataset(inputs, targets)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=root, callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(Tiny(), DataLoader(data, batch_size=BATCH))
    if trainer.global_step != STEPS:
        sys.exit(f"FAIL: the fit ran {trainer.global_step} of {STEPS} steps")
    return trainer


def core(root: Path) -> None:
    present = [name for name in ("rich", "matplotlib") if importlib.util.find_spec(name) is not None]
    if present:
        sys.exit(f"FAIL: not a core-only environment, the core dependencies brought {', '.join(present)}")
    loract = LoRAct(rank=8, min_bytes=0)
    try:
        ActivationMemoryMonitor()
    except ModuleNotFoundError as error:
        if EXTRA not in str(error):
            sys.exit(f"FAIL: the monitor's error does not name the extra ({EXTRA}): {error}")
        print(f"ok: ActivationMemoryMonitor() refused at construction: {error}")
    else:
        sys.exit("FAIL: ActivationMemoryMonitor() constructed without rich and matplotlib; its report would fail")
    fit([loract], root)
    if not loract.step_stats.stored_bytes < loract.step_stats.saved_bytes:
        sys.exit(f"FAIL: LoRAct compressed nothing: {loract.step_stats}")
    print(f"ok: core-only fit with LoRAct, {STEPS} steps")


def report(root: Path) -> None:
    monitor = ActivationMemoryMonitor(top_k=3, output_dir=str(root / "report"))
    fit([LoRAct(rank=8, min_bytes=0), monitor], root)
    names = sorted(path.name for path in monitor.report_files if path.stat().st_size > 0)
    expected = ["activation_memory.csv", "activation_memory.json", "activation_memory.png"]
    if names != expected:
        sys.exit(f"FAIL: the monitor wrote {names}, expected {expected}")
    print(f"ok: fit with LoRAct and ActivationMemoryMonitor, {STEPS} steps, wrote {', '.join(names)}")


if __name__ == "__main__":
    modes = {"core": core, "report": report}
    if len(sys.argv) != 2 or sys.argv[1] not in modes:
        sys.exit(f"usage: {sys.argv[0]} {{{'|'.join(modes)}}}")
    with tempfile.TemporaryDirectory() as directory:
        modes[sys.argv[1]](Path(directory))
