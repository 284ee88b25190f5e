"""What a compressed forward costs a GPU, counted on the CPU (issue #30): host reads and aten ops.

A GPU pays for every read of a tensor's value on the host (``.item()``, ``bool(t)``,
``.tolist()``: the host waits for the device) and for every kernel launch. Both are countable on
the CPU: a host read is an aten ``_local_scalar_dense`` (or ``is_nonzero``) call and a launch
about one aten op, both seen by a ``TorchDispatchMode``. This counts them inside one training
forward of a tiny Llama (h256, 4 layers, batch 4 x 256 tokens; rank 1/8 with ``min_rank=8,
min_bytes=0``, so every eligible activation is compressed), uncompressed, in default mode and in
layer mode, after one warm-up step (first-call work such as the token-wise check of
``mlp_chunk_tokens`` is not counted).

    python benchmarks/launches.py
"""

from __future__ import annotations

import sys
from collections import Counter
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models import llama_model

from loract_lightning import ActivationCompressor, CompressionOptions

HOST_READS = {"_local_scalar_dense", "is_nonzero"}


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def host_reads(self) -> int:
        return sum(self.ops[name] for name in HOST_READS)


def count(options: dict | None) -> OpCounter:
    torch.manual_seed(0)
    model = llama_model(hidden=256, layers=4, max_positions=256).train()
    ids = torch.randint(0, model.config.vocab_size, (4, 256))
    compressor = ActivationCompressor(model, CompressionOptions(**options)) if options is not None else None
    for measured in (False, True):
        counter = OpCounter()
        with compressor.capture() if compressor else nullcontext(), counter if measured else nullcontext():
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
    return counter


def main() -> None:
    torch.set_num_threads(2)
    common = {"rank": 0.125, "min_rank": 8, "min_bytes": 0}
    settings = {
        "uncompressed": None,
        "default mode": common,
        "layer mode": {**common, "checkpoint": ["LlamaDecoderLayer"]},
    }
    counts = {label: count(options) for label, options in settings.items()}
    base = counts["uncompressed"]
    print("| forward | host reads | added by LoRAct | aten ops | / uncompressed |\n|---|---|---|---|---|")
    for label, counter in counts.items():
        ops = sum(counter.ops.values())
        added = counter.host_reads - base.host_reads
        print(f"| {label} | {counter.host_reads} | {added} | {ops} | {ops / sum(base.ops.values()):.2f} |")
    for label in ("default mode", "layer mode"):
        extra = counts[label].ops - base.ops
        print(f"\n{label}, most added ops: " + ", ".join(f"{op} {n}" for op, n in extra.most_common(12)))


if __name__ == "__main__":
    main()
