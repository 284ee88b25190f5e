"""A 2-process DDP fit (CPU, gloo) with LoRAct; each rank writes what it saw to OUT/rank{N}.json.

Usage: python tests/ddp_fit.py OUT_DIR   (Lightning re-launches this script for rank 1)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
from lit_models import KnownRankModule, known_rank_loader, saved_tensor_hooks_installed

from loract_lightning import ActivationMemoryMonitor, LoRAct


def main(out_dir: Path) -> None:
    pl.seed_everything(0, verbose=False)
    module = KnownRankModule()
    callback = LoRAct(rank=8, min_bytes=0)
    monitor = ActivationMemoryMonitor(output_dir=str(out_dir / "report"), error_every_n_steps=1)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False, log_every_n_steps=1,
        callbacks=[callback, monitor], enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, known_rank_loader(batches=4))
    result = {
        "compressed": callback.step_stats.compressed,
        "ratio": callback.step_stats.ratio,
        "train_hooks": all(module.hooks_seen["train"]),
        "hooks_left": saved_tensor_hooks_installed(),
        "report_files": len(monitor.report_files),
        "report_saved_bytes": sum(row["saved_bytes"] for row in monitor.report.rows()),
        "parameters": [float(p.detach().sum()) for p in module.parameters()],
    }
    (out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
