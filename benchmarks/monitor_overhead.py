"""Step-time overhead of ActivationMemoryMonitor used alone (target: at most 5%).

Fits the MiniLM + LoRA text example for a few steps with and without the monitor, alternating
the two settings several times, and prints the median training-step time of each.

    python benchmarks/monitor_overhead.py [--steps 12] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from examples.text_classification import DrugReviewsDataModule, TextClassifier
from loract_lightning import ActivationMemoryMonitor
from loract_lightning.cli import silence_known_warnings


class StepTimer(Callback):
    """Time between consecutive training-batch starts: the whole step, every callback's hooks included."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())

    @property
    def seconds(self) -> list[float]:
        return [end - start for start, end in zip(self.starts, self.starts[1:], strict=False)]


def step_times(steps: int, with_monitor: bool, output_dir: Path) -> list[float]:
    pl.seed_everything(0, verbose=False)
    timer = StepTimer()
    callbacks = [timer, ActivationMemoryMonitor(output_dir=str(output_dir))] if with_monitor else [timer]
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks, log_every_n_steps=1,
    )  # fmt: skip
    trainer.fit(TextClassifier(num_classes=3), DrugReviewsDataModule())
    return timer.seconds[2:]  # the first steps warm up allocators and thread pools


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "monitor")
    args = parser.parse_args()
    silence_known_warnings()
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for with_monitor in (False, True):
            times[with_monitor] += step_times(args.steps, with_monitor, args.out)
    plain, monitored = statistics.median(times[False]), statistics.median(times[True])
    print("| setting | median step (s) | steps |")
    print("|---|---|---|")
    print(f"| MiniLM+LoRA b16 s128, no monitor | {plain:.3f} | {len(times[False])} |")
    print(f"| MiniLM+LoRA b16 s128, ActivationMemoryMonitor alone | {monitored:.3f} | {len(times[True])} |")
    print(f"\noverhead: {100 * (monitored / plain - 1):+.1f}% (target <= 5%)")


if __name__ == "__main__":
    main()
