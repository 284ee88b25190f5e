"""Resident memory (RSS) of the process over training steps: uncompressed vs LoRAct, on the CPU.

Fits the MiniLM + LoRA text example for ``--steps`` steps in a fresh subprocess per setting (so
one setting's heap cannot inflate the next) and prints RSS after the first step, after
``--warmup`` steps and at the end, and the growth per step after the warm-up. A steady growth
that the uncompressed run does not show would be memory that LoRAct loses. ``loract-trim`` also
calls ``malloc_trim`` after each step (``release_free_memory``, which the callback once did), to
show what that buys and costs.

    python benchmarks/host_memory_growth.py [--steps 120] [--warmup 20]
        [--settings none loract loract-bf16 loract-trim]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "none": None,
    "loract": {"rank": 0.125, "layers": {"*.attention.self": None}},
    "loract-bf16": {"rank": 0.125, "layers": {"*.attention.self": None}, "factor_dtype": "bfloat16"},
    "loract-trim": {"rank": 0.125, "layers": {"*.attention.self": None}},
}


def fit_and_record(setting: str, steps: int) -> dict[str, list[float]]:
    """Runs in the subprocess: RSS after every training step, and the time from one batch's start
    to the next (so it includes the ``malloc_trim`` of ``loract-trim``)."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback

    sys.path.insert(0, str(ROOT))
    from host_memory import release_free_memory, resident_bytes

    from examples.text_classification import DrugReviewsDataModule, TextClassifier
    from loract_lightning import LoRAct

    class ResidentMemory(Callback):
        def __init__(self) -> None:
            self.mib: list[float] = []
            self.batch_starts: list[float] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.batch_starts.append(time.perf_counter())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if setting == "loract-trim":
                release_free_memory()
            self.mib.append(resident_bytes() / 2**20)

    pl.seed_everything(0, verbose=False)
    recorder = ResidentMemory()
    callbacks = [recorder] + ([LoRAct(**SETTINGS[setting])] if SETTINGS[setting] else [])
    trainer = pl.Trainer(
        max_steps=steps, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(TextClassifier(lr=1e-3, num_classes=3), DrugReviewsDataModule(batch_size=16, max_length=128))
    starts = recorder.batch_starts
    return {"rss_mib": recorder.mib, "step_seconds": [b - a for a, b in itertools.pairwise(starts)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "host_memory_growth.json")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(fit_and_record(args.child, args.steps)))
        return
    if args.steps <= args.warmup:
        raise SystemExit(f"--steps ({args.steps}) must exceed --warmup ({args.warmup})")
    rows = []
    print(
        "| setting | RSS after step 1 MiB | after warm-up MiB | at the end MiB "
        "| growth per step after warm-up MiB | median step s |"
    )
    print("|---|---|---|---|---|---|")
    for setting in args.settings:
        command = [sys.executable, __file__, "--child", setting, "--steps", str(args.steps)]
        finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
        if finished.returncode != 0:
            raise SystemExit(f"{setting} failed:\n{finished.stderr[-3000:]}")
        recorded = json.loads(finished.stdout.strip().splitlines()[-1])
        mib = recorded["rss_mib"]
        growth = (mib[-1] - mib[args.warmup - 1]) / (len(mib) - args.warmup)
        step_seconds = statistics.median(recorded["step_seconds"][args.warmup :])
        rows.append({"setting": setting, **recorded, "growth_per_step_mib": growth, "median_step_s": step_seconds})
        cells = [f"{value:.0f}" for value in (mib[0], mib[args.warmup - 1], mib[-1])]
        cells += [f"{growth:.2f}", f"{step_seconds:.3f}"]
        print(f"| {setting} | " + " | ".join(cells) + " |", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
