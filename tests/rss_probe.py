"""Run in a fresh process: resident memory held by one Llama forward's saved activations.

Usage: python tests/rss_probe.py [rank]   (no rank: uncompressed). Prints one JSON line.
Run with MALLOC_MMAP_THRESHOLD_ set so glibc returns freed blocks to the OS and RSS is honest.
"""

from __future__ import annotations

import gc
import json
import os
import sys

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from loract_lightning import compress_activations


def resident_bytes() -> int:
    """The process's resident memory (RSS), from ``/proc/self/statm`` (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    rank = float(sys.argv[1]) if len(sys.argv) > 1 else None
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=256, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=8000, max_position_embeddings=512, attn_implementation="sdpa",
    )  # fmt: skip
    model = LlamaForCausalLM(config).train()
    ids = torch.randint(0, config.vocab_size, (8, 256))

    def forward():
        if rank is None:
            return model(input_ids=ids, labels=ids).loss, None
        with compress_activations(model, rank=rank, saved_by=None) as stats:
            return model(input_ids=ids, labels=ids).loss, stats

    loss, _ = forward()  # warm-up: lazy initialisation and the optimizer-free gradient buffers
    loss.backward()
    del loss
    gc.collect()
    before = resident_bytes()
    loss, stats = forward()
    held = resident_bytes() - before
    print(json.dumps({"held_bytes": held, "ratio": stats.ratio if stats else 1.0,
                      "saved_bytes": stats.saved_bytes if stats else None}))  # fmt: skip
    loss.backward()


if __name__ == "__main__":
    main()
