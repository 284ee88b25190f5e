"""One training step (forward + backward) under each way of saving activations, side by side.

Settings, all on the same model and batch in one process: no compression, PyTorch activation
checkpointing of every block, ``torch.autograd.graph.save_on_cpu``, LoRAct default mode and
LoRAct layer mode at ranks 1/16, 1/8 and 1/4, default mode with bfloat16 factors
(``factor_dtype="bfloat16"``), default mode at 1/8 with the loss's inputs (the tensors the root
module saves itself: Llama's logits) kept raw, and on CUDA default mode without the side stream.
Time is the median step time and its ratio to no compression. Flop ratio: the floating-point
operations of one step (counted by ``torch.utils.flop_counter.FlopCounterMode``: matmuls and
attention, the factorizations and rebuilds included, with the Gram products of Cholesky QR but
not Householder QR or triangular solves) over those of the uncompressed step; on a machine whose
step time is all matmuls it is the time ratio the setting cannot beat.

Memory on the CPU is the activation bytes held after the forward (saved bytes of the distinct
storages, as the engine counts them; ``save_on_cpu`` holds the same bytes there). On CUDA it is
what the allocator holds after the forward beyond the model and batch (``memory_allocated``), and
the peak over forward + backward (``max_memory_allocated``), both measured.

    python benchmarks/training_step.py [--models llama llama1024 llama-large minilm vit] [--steps 5] [--device cuda]
        [--settings "none" "LoRAct default*"]   # glob patterns on the setting names (none always runs)
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from models import llama, minilm, vit
from torch.utils.flop_counter import FlopCounterMode

from loract_lightning import ActivationCompressor, CompressionOptions

MODELS = {
    "llama": (lambda device: llama(batch=4, seq=256, device=device), "LlamaDecoderLayer"),
    "llama1024": (lambda device: llama(batch=1, seq=1024, device=device), "LlamaDecoderLayer"),
    "llama-large": (lambda device: llama(batch=8, seq=1024, device=device, hidden=1024, layers=8), "LlamaDecoderLayer"),
    "minilm": (lambda device: minilm(batch=16, seq=128, device=device), "BertLayer"),
    "vit": (lambda device: vit(batch=8, device=device), "Block"),
}
RANKS = {"1/16": 1 / 16, "1/8": 1 / 8, "1/4": 1 / 4}


Context = Callable[[], AbstractContextManager]


def settings(model: torch.nn.Module, block: str, cuda: bool) -> dict[str, tuple[Context, ActivationCompressor]]:
    """name -> (context for a step, compressor whose stats give the CPU memory figure)."""
    measure = ActivationCompressor(model, compress=False)
    checkpointed = ActivationCompressor(model, CompressionOptions(checkpoint=[block]), compress=False)
    table = {
        "none": (nullcontext, measure),
        "activation checkpointing": (checkpointed.capture, checkpointed),
        "save_on_cpu": (lambda: torch.autograd.graph.save_on_cpu(pin_memory=cuda), measure),
    }
    for label, rank in RANKS.items():
        # "every tensor" is the paper's default mode (and this table's until 2026-12-01); the
        # library's default now factorizes only what linear layers save.
        default = ActivationCompressor(model, CompressionOptions(rank=rank, saved_by=None))
        linear = ActivationCompressor(model, CompressionOptions(rank=rank))
        layer = ActivationCompressor(model, CompressionOptions(rank=rank, checkpoint=[block]))
        table[f"LoRAct default {label}"] = (default.capture, default)
        table[f"LoRAct default {label}, linear inputs only (the defaults)"] = (linear.capture, linear)
        table[f"LoRAct layer {label}"] = (layer.capture, layer)
        narrow = ActivationCompressor(model, CompressionOptions(rank=rank, factor_dtype="bfloat16", saved_by=None))
        table[f"LoRAct default {label}, bf16 factors"] = (narrow.capture, narrow)
        if label == "1/8":
            # The root module's own saved tensors are the loss's inputs (on Llama the 1024 x 32000
            # logits, most of default mode's flops); this shows the step without compressing them.
            loss_raw = ActivationCompressor(model, CompressionOptions(rank=rank, layers={"": None}, saved_by=None))
            table[f"LoRAct default {label}, loss inputs raw"] = (loss_raw.capture, loss_raw)
        if cuda:
            inline = ActivationCompressor(model, CompressionOptions(rank=rank, side_stream=False, saved_by=None))
            table[f"LoRAct default {label}, no side stream"] = (inline.capture, inline)
    return table


def memory(context: Context, compressor: ActivationCompressor, loss_fn, model, cuda: bool) -> tuple[int, int]:
    """(bytes held for backward after the forward, peak bytes over forward + backward; 0 on the CPU)."""
    model.zero_grad(set_to_none=True)
    if not cuda:
        with compressor.capture() as stats:
            loss = loss_fn()
        loss.backward()
        return stats.stored_bytes, 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    with context():
        loss = loss_fn()
    # Activations freed while the side stream still read them return to the allocator once their
    # events complete; empty_cache processes those events so they do not count as held.
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    held = torch.cuda.memory_allocated() - start
    loss.backward()
    torch.cuda.synchronize()
    return held, torch.cuda.max_memory_allocated() - start


def run_step(context: Context, loss_fn, model) -> None:
    """One training step: the forward under ``context``, then backward."""
    model.zero_grad(set_to_none=True)
    with context():
        loss = loss_fn()
    loss.backward()


def step_flops(context: Context, loss_fn, model) -> int:
    with FlopCounterMode(display=False) as counter:
        run_step(context, loss_fn, model)
    return counter.get_total_flops()


def step_seconds(context: Context, loss_fn, model, steps: int, cuda: bool) -> float:
    times = []
    for _ in range(steps + 2):  # the first two steps warm up
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        run_step(context, loss_fn, model)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["llama", "llama1024", "minilm", "vit"], choices=list(MODELS))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--settings", nargs="+", default=["*"], help="glob patterns on setting names")
    parser.add_argument("--out", type=Path, default=None, help="default: results/training_step[_cuda].json")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    suffix = "_cuda" if cuda else ""
    out = args.out or Path(__file__).parent / "results" / f"training_step{suffix}.json"
    rows = []
    peak_column = " peak MiB | peak ratio |" if cuda else ""
    print(f"| model | setting | activation MiB | memory ratio |{peak_column} step ms | time ratio | flop ratio |")
    print("|---|---|---|---|" + ("---|---|" if cuda else "") + "---|---|---|")
    for key in args.models:
        build, block = MODELS[key]
        name, model, loss_fn = build(args.device)
        baseline = None
        for setting, (context, compressor) in settings(model, block, cuda).items():
            if setting != "none" and not any(fnmatch.fnmatch(setting, pattern) for pattern in args.settings):
                continue
            held, peak = memory(context, compressor, loss_fn, model, cuda)
            seconds = step_seconds(context, loss_fn, model, args.steps, cuda)
            flops = step_flops(context, loss_fn, model)
            baseline = baseline or {"held": held, "peak": peak, "seconds": seconds, "flops": flops}
            row = {
                "model": name, "device": args.device, "setting": setting, "bytes": held, "peak_bytes": peak,
                "memory_ratio": held / baseline["held"], "peak_ratio": peak / baseline["peak"] if cuda else None,
                "seconds": seconds, "time_ratio": seconds / baseline["seconds"],
                "flops": flops, "flop_ratio": flops / baseline["flops"],
            }  # fmt: skip
            rows.append(row)
            peak_cells = f" {peak / 2**20:.1f} | {row['peak_ratio']:.3f} |" if cuda else ""
            print(
                f"| {name} | {setting} | {held / 2**20:.1f} | {row['memory_ratio']:.3f} |{peak_cells} "
                f"{seconds * 1000:.1f} | {row['time_ratio']:.2f} | {row['flop_ratio']:.2f} |",
                flush=True,
            )
    args.out = out
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    print(f"\nrows written to {args.out}")


if __name__ == "__main__":
    main()
