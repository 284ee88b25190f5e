"""2-process sharded fits (CPU, gloo) with LoRAct; each rank writes what it saw to OUT/rank{N}.pt.

Usage: python tests/fsdp_fit.py OUT_DIR   (Lightning re-launches this script for rank 1; or start both
ranks yourself with LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set, as torchrun does)

Two ways to shard on the CPU:

- FSDP2 (``fully_shard``) under Lightning's ``ModelParallelStrategy``: runs on the CPU as it is;
  the LightningModule shards itself in ``configure_model``.
- FSDP1 under Lightning's ``FSDPStrategy``. Lightning refuses it on the CPU ("requires a GPU
  accelerator"); its check tests ``type(strategy) is FSDPStrategy``, so a subclass passes it. Then
  FSDP1 itself refuses the CPU unless given ``device_id=torch.device("cpu")`` (Lightning gives the
  device index, None on the CPU), so ``configure_model`` wraps the network itself; Lightning
  keeps a model that is already wrapped and still applies ``activation_checkpointing_policy``.

Every run sees the same 32 samples: 8 per rank and step, two steps; the unsharded run
(``unsharded_parameters``) takes them 16 at a time, which gives the same averaged gradients.
"""

from __future__ import annotations

import sys
import traceback
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from conftest import KNOWN_MAX_RANK, KnownRankBlock, KnownRankNet
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from lit_models import known_rank_loader, saved_tensor_hooks_installed
from torch.utils.data import DataLoader

from loract_lightning import LoRAct

LOSSLESS_RANK = KNOWN_MAX_RANK + 12
BATCHES, BATCH_PER_RANK, WORLD_SIZE = 2, 8, 2
LAYER = {"checkpoint": ["KnownRankBlock"]}

# name -> (sharding, checkpoint-wrap the blocks before LoRAct sees them, LoRAct options or None)
RUNS: dict[str, tuple[str, bool, dict | None]] = {
    "fsdp2_plain": ("fsdp2", False, None),
    "fsdp2_default": ("fsdp2", False, {}),
    "fsdp2_layer": ("fsdp2", False, LAYER),
    "fsdp2_wrapped_layer": ("fsdp2", True, LAYER),
    "fsdp1_plain": ("fsdp1", False, None),
    "fsdp1_default": ("fsdp1", False, {}),
    "fsdp1_layer": ("fsdp1", False, LAYER),
    # Blocks checkpointed by the strategy, LoRAct in default mode: what the checkpoints save are
    # block inputs, saved by no linear layer, so only saved_by=None compresses them.
    "fsdp1_policy_default": ("fsdp1", True, {"saved_by": None}),
    "fsdp1_policy_layer": ("fsdp1", True, LAYER),
}
WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy, allowed on the CPU (see the module docstring)."""


class ShardedKnownRankModule(pl.LightningModule):
    """KnownRankNet without dropout (the ranks draw different masks), sharded in configure_model.

    ``sharding``: "fsdp2" (each block, then the net, under ``fully_shard``; with ``wrap`` each
    block is put in a ``CheckpointWrapper`` first, the order torch recommends), "fsdp1" (the net
    under FSDP1, one unit per block; ``wrap`` is Lightning's ``activation_checkpointing_policy``,
    given to the strategy) or None.
    """

    def __init__(self, sharding: str | None = None, wrap: bool = False) -> None:
        super().__init__()
        self.net = KnownRankNet(dropout=0.0)
        self.sharding = sharding
        self.wrap = wrap

    def configure_model(self) -> None:
        if self.sharding == "fsdp2":
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for index, block in enumerate(self.net.blocks):
                if self.wrap:
                    block = self.net.blocks[index] = checkpoint_wrapper(block)
                fully_shard(block, mesh=mesh)
            fully_shard(self.net, mesh=mesh)
        elif self.sharding == "fsdp1":
            from torch.distributed.fsdp import FullyShardedDataParallel
            from torch.distributed.fsdp.wrap import ModuleWrapPolicy

            self.net = FullyShardedDataParallel(
                self.net, device_id=torch.device("cpu"), auto_wrap_policy=ModuleWrapPolicy({KnownRankBlock})
            )

    def training_step(self, batch, batch_idx):
        return self.net(batch[0])

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def loader(batch_size: int) -> DataLoader:
    """The same 32 samples whatever the batch size."""
    return DataLoader(known_rank_loader(BATCHES * WORLD_SIZE, BATCH_PER_RANK).dataset, batch_size=batch_size)


def clean_name(name: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def unsharded_parameters() -> dict[str, torch.Tensor]:
    """The parameters after the same two steps in one process, unsharded and without LoRAct."""
    pl.seed_everything(0, verbose=False)
    module = ShardedKnownRankModule()
    _trainer(devices=1, strategy="auto").fit(module, loader(WORLD_SIZE * BATCH_PER_RANK))
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def full_parameters(module: ShardedKnownRankModule) -> dict[str, torch.Tensor]:
    """Unsharded copies of the parameters, by their unwrapped names (a collective: every rank calls it)."""
    if module.sharding == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(module, writeback=False):
            return {clean_name(name): p.detach().clone() for name, p in module.named_parameters()}
    return {clean_name(name): p.full_tensor().detach().clone() for name, p in module.named_parameters()}


def sharded_fit(sharding: str, wrap: bool, options: dict | None) -> dict:
    pl.seed_everything(0, verbose=False)
    module = ShardedKnownRankModule(sharding, wrap=wrap and sharding == "fsdp2")
    if sharding == "fsdp2":
        strategy = ModelParallelStrategy(data_parallel_size=WORLD_SIZE, tensor_parallel_size=1)
    else:
        strategy = CPUFSDPStrategy(activation_checkpointing_policy={KnownRankBlock} if wrap else None)
    callback = None if options is None else LoRAct(rank=LOSSLESS_RANK, min_bytes=0, **options)
    trainer = _trainer(devices=WORLD_SIZE, strategy=strategy, callbacks=[callback] if callback else [])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, loader(BATCH_PER_RANK))
    return {
        "parameters": full_parameters(module),
        "compressed": callback.step_stats.compressed if callback else 0,
        "hooks_left": saved_tensor_hooks_installed(),
        "warnings": [str(w.message) for w in caught if "LoRAct" in str(w.message)],
        "modules": {clean_name(name): type(m).__name__ for name, m in module.named_modules()},
    }


def _trainer(**options) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, **options,
    )  # fmt: skip


def main(out_dir: Path) -> None:
    results: dict[str, dict] = {}
    for name, (sharding, wrap, options) in RUNS.items():
        try:
            results[name] = sharded_fit(sharding, wrap, options)
        except Exception as error:  # recorded for the test; every rank fails alike, so none hangs
            traceback.print_exc()
            results[name] = {"error": f"{type(error).__name__}: {error}"}
    torch.save(results, out_dir / f"rank{torch.distributed.get_rank()}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
