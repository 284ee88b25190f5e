"""Where a training step's peak sits, tensor by tensor (issue #28): a census of live storages.

``loract_lightning.planner.LiveTensorBytes`` (a ``TorchDispatchMode``) sees every tensor an aten
op creates during one training step (forward, backward, optimizer step) and follows its storage
until it is freed. The live total is exact on any device, with no allocator in between; at the
moment it peaks, every live storage is listed with what made it: the phase ("forward",
"recompute" while a checkpointed block runs again inside backward, "backward" otherwise), the
innermost module running when it was made (layer indices replaced by ``*``) and the aten op.
Memory that existed before the step (weights, optimizer state, the batch) is not counted, as in
``benchmarks/peak_memory.py``. Figures are per token of the batch, so lengths compare.

    python benchmarks/peak_census.py --settings ac-chunked layer-chunked --seq 2048
    python benchmarks/peak_census.py --settings layer-chunked --lora-dropout 0.0 --top 25
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from peak_memory import SETTINGS, build_model

from loract_lightning import ActivationCompressor, CompressionOptions, causal_lm_loss
from loract_lightning.planner import LiveTensorBytes

KIB = 2**10


class ModuleLabels:
    """The innermost module running, and whether autograd is in backward (recompute or not)."""

    def __init__(self, model: nn.Module) -> None:
        self.names = {id(m): re.sub(r"\.\d+\.", ".*.", name) for name, m in model.named_modules()}
        self.stack: list[str] = []
        self.in_backward = False
        self.handles = [
            nn.modules.module.register_module_forward_pre_hook(self._enter),
            nn.modules.module.register_module_forward_hook(self._leave),
        ]

    def _enter(self, module, args):
        self.stack.append(self.names.get(id(module), type(module).__name__))

    def _leave(self, module, args, output):
        if self.stack:
            self.stack.pop()

    def describe(self, op: str) -> str:
        return f"{self.phase()} | {self.module()} | {op}"

    def module(self) -> str:
        return self.stack[-1].removeprefix("base_model.model.") if self.stack else "-"

    def phase(self) -> str:
        if not self.in_backward:
            return "forward"
        return "recompute" if self.stack else "backward"

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def census(name: str, key: str, args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    setting = SETTINGS[key]
    model, batches = build_model(name, args)
    context = nullcontext
    if setting.options is not None:
        options = {"rank": args.rank} | setting.options
        compress = options.pop("compress", True)
        context = ActivationCompressor(model, CompressionOptions(**options), compress=compress).capture
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-4)

    def step(ids: Tensor, mode: LiveTensorBytes | None = None, labels: ModuleLabels | None = None) -> None:
        with mode or nullcontext():
            with context():
                loss = (
                    causal_lm_loss(model, ids, labels=ids, chunk_tokens=args.chunk_tokens)
                    if setting.chunked_loss
                    else model(input_ids=ids, labels=ids).loss
                )
            if labels:
                labels.in_backward = True
            loss.backward()
            del loss
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    step(batches[0])  # warm-up: optimizer state exists before the measured step, as in peak_memory.py
    labels = ModuleLabels(model)
    mode = LiveTensorBytes(labels.describe)
    step(batches[1], mode, labels)
    labels.close()
    tokens = args.batch * args.seq
    grouped: dict[str, int] = defaultdict(int)
    for size, label in mode.at_peak:
        grouped[label] += size
    print(f"\n## {name} {key}, batch {args.batch} x {args.seq}, LoRA dropout {args.lora_dropout:g}")
    per_token = mode.peak / tokens / KIB
    print(f"peak {mode.peak / 2**20:.1f} MiB = {per_token:.1f} KiB per token")
    by_phase: dict[str, int] = defaultdict(int)
    for label, size in grouped.items():
        by_phase[label.split(" | ")[0]] += size
    print("by phase made in: " + ", ".join(f"{p} {s / tokens / KIB:.1f}" for p, s in sorted(by_phase.items())))
    print("| made in | module | op | KiB per token |\n|---|---|---|---|")
    for label, size in sorted(grouped.items(), key=lambda kv: -kv[1])[: args.top]:
        print("| " + " | ".join(label.split(" | ")) + f" | {size / tokens / KIB:.2f} |")


def main(argv: list[str] | None = None) -> None:
    from peak_memory import build_parser

    parser = build_parser()
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("--top", type=int, default=20, help="rows of the table (largest first)")
    parser.set_defaults(models=["smollm2"], batch=1, seq=2048, settings=["ac-chunked", "layer-chunked"])
    args = parser.parse_args(argv)
    args.warmup, args.steps = 1, 1
    for name in args.models:
        for key in args.settings:
            census(name, key, args)


if __name__ == "__main__":
    main()
