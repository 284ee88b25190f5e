"""2-process fits (CPU, gloo) with LoRAct's DDP and FSDP strategies and their plain twins; each rank
writes what it saw to OUT/rank{N}.pt (started as test_strategy.py starts it: both ranks at once).

Usage: python tests/strategy_fit.py OUT_DIR   (with LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set)

FSDP runs FSDP1 on the CPU as fsdp_fit.py explains (the module wraps itself in configure_model;
LoRActFSDPStrategy, a subclass, passes Lightning's GPU check), and FSDP2 under
ModelParallelStrategy (the module shards itself, each block in a checkpoint_wrapper with
``wrap``). Every KnownRankBlock forward run in training mode is counted, so a block recomputed
twice in backward shows.
"""

from __future__ import annotations

import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import lightning.pytorch as pl
import torch
from conftest import KnownRankBlock
from fsdp_fit import (
    BATCH_PER_RANK,
    LOSSLESS_RANK,
    WORLD_SIZE,
    CPUFSDPStrategy,
    ShardedKnownRankModule,
    full_parameters,
    loader,
)
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import DDPStrategy, ModelParallelStrategy, Strategy
from lit_models import saved_tensor_hooks_installed

from loract_lightning.strategies import LoRActDDPStrategy, LoRActFSDPStrategy, LoRActModelParallelStrategy

BLOCK_FORWARDS = [0]
_block_forward = KnownRankBlock.forward


def _counting_forward(self: KnownRankBlock, x: torch.Tensor) -> torch.Tensor:
    if self.training:
        BLOCK_FORWARDS[0] += 1
    return _block_forward(self, x)


KnownRankBlock.forward = _counting_forward

LOSSLESS = {"rank": LOSSLESS_RANK, "min_bytes": 0}
LAYER = {**LOSSLESS, "checkpoint": ["KnownRankBlock"]}
POLICY = {"activation_checkpointing_policy": {KnownRankBlock}}
FSDP2 = {"data_parallel_size": WORLD_SIZE, "tensor_parallel_size": 1}


class Run(NamedTuple):
    sharding: str | None  # "fsdp1", "fsdp2": the module shards itself; None: DDP
    strategy: Callable[[], Strategy]
    twin: str  # the plain run it must end equal to
    wrap: bool = False  # fsdp2: each block in a checkpoint_wrapper


RUNS: dict[str, Run] = {
    "ddp_plain": Run(None, lambda: DDPStrategy(), "ddp_plain"),
    "ddp_loract": Run(None, lambda: LoRActDDPStrategy(**LOSSLESS, saved_by=None), "ddp_plain"),
    "ddp_loract_layer": Run(None, lambda: LoRActDDPStrategy(**LAYER), "ddp_plain"),
    "fsdp_plain": Run("fsdp1", lambda: CPUFSDPStrategy(), "fsdp_plain"),
    "fsdp_policy_plain": Run("fsdp1", lambda: CPUFSDPStrategy(**POLICY), "fsdp_policy_plain"),
    "fsdp_loract_layer": Run("fsdp1", lambda: LoRActFSDPStrategy(**LAYER), "fsdp_plain"),
    "fsdp_policy_loract_layer": Run("fsdp1", lambda: LoRActFSDPStrategy(**POLICY, **LAYER), "fsdp_policy_plain"),
    "fsdp2_plain": Run("fsdp2", lambda: ModelParallelStrategy(**FSDP2), "fsdp2_plain"),
    "fsdp2_wrapped_plain": Run("fsdp2", lambda: ModelParallelStrategy(**FSDP2), "fsdp2_wrapped_plain", wrap=True),
    "fsdp2_loract_layer": Run("fsdp2", lambda: LoRActModelParallelStrategy(**FSDP2, **LAYER), "fsdp2_plain"),
    "fsdp2_wrapped_loract_layer": Run(
        "fsdp2", lambda: LoRActModelParallelStrategy(**FSDP2, **LAYER), "fsdp2_wrapped_plain", wrap=True
    ),
}


class RecordingModule(ShardedKnownRankModule):
    """Records whether saved-tensor hooks were installed in each training and validation step."""

    def __init__(self, sharding: str | None, wrap: bool = False) -> None:
        super().__init__(sharding, wrap)
        self.hooks_seen: dict[str, list[bool]] = {"train": [], "validation": []}

    def training_step(self, batch, batch_idx):
        self.hooks_seen["train"].append(saved_tensor_hooks_installed())
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        self.hooks_seen["validation"].append(saved_tensor_hooks_installed())
        self.log("val_loss", self.net(batch[0]), sync_dist=True)


def fit(name: str, run: Run, out_dir: Path) -> dict:
    pl.seed_everything(0, verbose=False)
    module = RecordingModule(run.sharding, run.wrap)
    strategy = run.strategy()
    trainer = pl.Trainer(
        accelerator="cpu", devices=WORLD_SIZE, strategy=strategy, max_epochs=1, log_every_n_steps=1,
        logger=CSVLogger(out_dir, name=name, version=0), enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    BLOCK_FORWARDS[0] = 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, loader(BATCH_PER_RANK), loader(BATCH_PER_RANK))
    if run.sharding is None:
        parameters = {name: p.detach().clone() for name, p in module.named_parameters()}
    else:
        parameters = full_parameters(module)
    loract = getattr(strategy, "loract", None)
    return {
        "parameters": parameters,
        "compressed": loract.step_stats.compressed if loract else 0,
        "train_hooks": module.hooks_seen["train"],
        "validation_hooks": module.hooks_seen["validation"],
        "hooks_left": saved_tensor_hooks_installed(),
        "logged_metrics": {key: float(value) for key, value in trainer.logged_metrics.items()},
        "block_forwards": BLOCK_FORWARDS[0],
        "warnings": [str(w.message) for w in caught if "LoRAct" in str(w.message)],
    }


def main(out_dir: Path) -> None:
    results: dict[str, dict] = {}
    for name, run in RUNS.items():
        try:
            results[name] = fit(name, run, out_dir)
        except Exception as error:  # recorded for the test; every rank fails alike, so none hangs
            traceback.print_exc()
            results[name] = {"error": f"{type(error).__name__}: {error}"}
    torch.save(results, out_dir / f"rank{torch.distributed.get_rank()}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
