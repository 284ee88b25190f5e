"""One training step (forward + backward) under each way of saving activations, side by side.

Settings, all on the same model and batch in one process: no compression, PyTorch activation
checkpointing of every block, ``torch.autograd.graph.save_on_cpu``, LoRAct default mode and
LoRAct layer mode at ranks 1/16, 1/8 and 1/4. Memory is the activation bytes held after the
forward (saved bytes of the distinct storages, as the engine counts them; on the CPU
``save_on_cpu`` holds the same bytes, only on a GPU does it move them off the device). Time is
the median step time and its ratio to no compression.

    python benchmarks/training_step.py [--models llama llama1024 minilm vit] [--steps 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from models import llama, minilm, vit

from loract_lightning import ActivationCompressor

MODELS = {
    "llama": (lambda: llama(batch=4, seq=256), "LlamaDecoderLayer"),
    "llama1024": (lambda: llama(batch=1, seq=1024), "LlamaDecoderLayer"),
    "minilm": (lambda: minilm(batch=16, seq=128), "BertLayer"),
    "vit": (lambda: vit(batch=8), "Block"),
}
RANKS = {"1/16": 1 / 16, "1/8": 1 / 8, "1/4": 1 / 4}


def settings(model: torch.nn.Module, block: str) -> dict[str, tuple[Callable[[], AbstractContextManager], object]]:
    """name -> (context for a timed step, compressor whose stats give the memory; None: measure-only)."""
    measure = ActivationCompressor(model, compress=False)
    checkpointed = ActivationCompressor(model, compress=False, checkpoint=[block])
    table = {
        "none": (nullcontext, measure),
        "activation checkpointing": (checkpointed.capture, checkpointed),
        "save_on_cpu": (lambda: torch.autograd.graph.save_on_cpu(pin_memory=False), measure),
    }
    for label, rank in RANKS.items():
        default = ActivationCompressor(model, rank=rank)
        layer = ActivationCompressor(model, rank=rank, checkpoint=[block])
        table[f"LoRAct default {label}"] = (default.capture, default)
        table[f"LoRAct layer {label}"] = (layer.capture, layer)
    return table


def held_bytes(compressor: ActivationCompressor, loss_fn) -> int:
    with compressor.capture() as stats:
        loss = loss_fn()
    loss.backward()
    return stats.stored_bytes


def step_seconds(context: Callable[[], AbstractContextManager], loss_fn, model, steps: int) -> float:
    times = []
    for _ in range(steps + 1):  # the first step warms up
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        with context():
            loss = loss_fn()
        loss.backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "training_step.json")
    args = parser.parse_args()
    rows = []
    print("| model | setting | activation MiB | memory ratio | step s | time ratio |")
    print("|---|---|---|---|---|---|")
    for key in args.models:
        build, block = MODELS[key]
        name, model, loss_fn = build()
        baseline_bytes = baseline_seconds = None
        for setting, (context, compressor) in settings(model, block).items():
            memory = held_bytes(compressor, loss_fn)
            seconds = step_seconds(context, loss_fn, model, args.steps)
            baseline_bytes = baseline_bytes or memory
            baseline_seconds = baseline_seconds or seconds
            row = {
                "model": name, "setting": setting, "bytes": memory, "memory_ratio": memory / baseline_bytes,
                "seconds": seconds, "time_ratio": seconds / baseline_seconds,
            }  # fmt: skip
            rows.append(row)
            print(
                f"| {name} | {setting} | {memory / 2**20:.1f} | {row['memory_ratio']:.3f} | "
                f"{seconds:.3f} | {row['time_ratio']:.2f} |",
                flush=True,
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    print(f"\nrows written to {args.out}")


if __name__ == "__main__":
    main()
