"""Memory really drops: resident memory of a fresh process follows ``stats.ratio``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loract_lightning import compress_activations

PROBE = Path(__file__).with_name("rss_probe.py")


def held_after_forward(*args: str) -> dict:
    # glibc keeps freed blocks below the mmap threshold in its heap; a low threshold makes freed
    # activations go back to the OS, so resident memory shows what is really held.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run([sys.executable, str(PROBE), *args], env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def baseline() -> dict:
    return held_after_forward()


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/statm")
@pytest.mark.parametrize("rank", ["0.125", "0.25"])
def test_resident_memory_falls_in_step_with_the_ratio(baseline, rank):
    compressed = held_after_forward(rank)
    # Uncompressed, the forward holds what the engine counts as saved; compressed, it holds the ratio of it.
    assert baseline["held_bytes"] == pytest.approx(compressed["saved_bytes"], rel=0.1)
    measured_ratio = compressed["held_bytes"] / baseline["held_bytes"]
    assert measured_ratio == pytest.approx(compressed["ratio"], abs=0.05)
    assert compressed["ratio"] < 0.5


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_memory_falls_with_the_ratio():
    from conftest import KnownRankNet

    model = KnownRankNet(width=1024).cuda().train()
    x = KnownRankNet.make_input(batch=16, length=1024, width=1024).cuda()

    def measure(**options) -> tuple[int, int, float]:
        """(bytes held after the forward, peak bytes over forward + backward, stats.ratio)."""
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        with compress_activations(model, rank=options.get("rank", 1.0), min_bytes=0) as stats:
            loss = model(x)
        held = torch.cuda.memory_allocated() - start
        loss.backward()
        torch.cuda.synchronize()
        return held, torch.cuda.max_memory_allocated() - start, stats.ratio

    measure()  # warm-up
    held, peak, _ = measure()
    held_compressed, peak_compressed, ratio = measure(rank=64)
    assert held_compressed / held == pytest.approx(ratio, abs=0.1)
    assert peak_compressed < peak
