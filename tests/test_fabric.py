"""LoRAct under Lightning Fabric (ActivationCompressor.capture() in a Fabric loop), and on a litgpt
model (Lightning's LLM fine-tuning tool, which runs on Fabric) in layer mode."""

from __future__ import annotations

import contextlib

import lightning as L
import pytest
import torch
from conftest import KNOWN_MAX_RANK, KnownRankNet
from lit_models import saved_tensor_hooks_installed
from torch import nn

from loract_lightning import ActivationCompressor, CompressionOptions, CompressionStats, policy

LOSSLESS_RANK = KNOWN_MAX_RANK + 12


def fabric_fit(make_model, batches, loss_fn, options: CompressionOptions | None, steps: int = 3):
    """``steps`` SGD steps of a fresh model under Fabric on the CPU, each training forward inside
    ``capture()`` when ``options`` is given, then a validation forward (inside ``capture()`` too:
    it must install nothing). Returns the model, the per-step stats and what each stage saw."""
    fabric = L.Fabric(accelerator="cpu", devices=1)
    fabric.seed_everything(0, verbose=False)
    model = make_model()
    model, optimizer = fabric.setup(model, torch.optim.SGD(model.parameters(), lr=0.05))
    seen: dict[str, list[bool]] = {"train": [], "validation": []}
    stage = ["train"]
    model.register_forward_pre_hook(lambda module, args: seen[stage[0]].append(saved_tensor_hooks_installed()))
    compressor = ActivationCompressor(model, options) if options is not None else None
    stats = []
    for step in range(steps):
        model.train()
        batch = batches(step)
        if compressor is None:
            loss = loss_fn(model, batch)
        else:
            with compressor.capture() as step_stats:
                loss = loss_fn(model, batch)
            stats.append(step_stats)
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    stage[0] = "validation"
    capture = compressor.capture() if compressor else contextlib.nullcontext(CompressionStats())
    with torch.no_grad(), capture as validation_stats:
        loss_fn(model, batches(0))
    return model, stats, seen, validation_stats


def known_rank_batches(step: int) -> torch.Tensor:
    return KnownRankNet.make_input(seed=step)


def known_rank_loss(model, x):
    return model(x)


@pytest.mark.parametrize("mode", ["default", "layer"])
def test_a_fabric_loop_with_patterns_as_the_user_names_modules(mode):
    """Under Fabric module names gain ``_forward_module.``; ``layers`` and ``checkpoint`` are
    written without it, and a lossless fit ends with the uncompressed parameters."""
    # The input of one linear layer (default mode) or of the second block (layer mode) stays raw.
    options = {"layers": {"blocks.1.down": None}}
    if mode == "layer":
        options = {"layers": {"blocks.1": None}, "checkpoint": ["blocks.*"]}
    compressed = CompressionOptions(rank=LOSSLESS_RANK, min_bytes=0, saved_by=None, **options)
    model, stats, seen, validation = fabric_fit(KnownRankNet, known_rank_batches, known_rank_loss, compressed)
    assert any(name.startswith("_forward_module.") for name, _ in model.named_modules())
    assert all(step.compressed > 0 for step in stats)
    assert all(step.kept[policy.DISABLED] > 0 for step in stats)  # by the pattern
    assert seen["train"] and all(seen["train"])
    assert seen["validation"] and not any(seen["validation"]) and validation.saved_bytes == 0
    expected, *_ = fabric_fit(KnownRankNet, known_rank_batches, known_rank_loss, None)
    for (name, value), (_, reference) in zip(model.named_parameters(), expected.named_parameters(), strict=True):
        torch.testing.assert_close(value, reference, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_a_pattern_that_matches_nothing_names_the_user_module_names():
    fabric = L.Fabric(accelerator="cpu", devices=1)
    model = fabric.setup(KnownRankNet())
    message = r"layers pattern\(s\) \['block.\*'\] match no module of KnownRankNet.*'blocks'"
    with pytest.raises(ValueError, match=message):
        ActivationCompressor(model, CompressionOptions(layers={"block.*": None}))


def tiny_litgpt():
    """A small litgpt GPT (2 Blocks, width 64) in train mode."""
    from litgpt.config import Config
    from litgpt.model import GPT

    config = Config(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=128, padded_vocab_size=128)
    return GPT(config).train()


def repeated_sequences(step: int) -> torch.Tensor:
    """8 copies of one 16-token sequence: every activation has at most 16 distinct rows, so rank
    32 factors hold it exactly (a lossless run), while each is 128 x 64 or wider."""
    generator = torch.Generator().manual_seed(step)
    return torch.randint(0, 128, (1, 17), generator=generator).repeat(8, 1)


def next_token_loss(model, ids):
    logits = model(ids[:, :-1])
    return nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())


def test_litgpt_blocks_in_layer_mode_under_fabric():
    pytest.importorskip("litgpt.model", reason="litgpt is a test-only extra: pip install --no-deps litgpt")
    forwards = []
    from litgpt.model import Block

    original = Block.forward

    def counting_forward(self, *args, **kwargs):
        forwards.append(self.training)
        return original(self, *args, **kwargs)

    # randomized_svd: at rank 32 the default sampled QB misses up to 7% of the MLP's GELU output
    # (rank 16, but its smallest directions fall below float32's reach in the Gram matrix A^T A).
    options = CompressionOptions(rank=32, min_bytes=0, checkpoint=["Block"], method="randomized_svd")
    try:
        Block.forward = counting_forward
        model, stats, seen, validation = fabric_fit(tiny_litgpt, repeated_sequences, next_token_loss, options)
    finally:
        Block.forward = original
    # Each training forward saves each Block's input as factors; each Block is recomputed once in backward.
    assert all(step.compressed > 0 for step in stats)
    assert {name for step in stats for name, memory in step.modules.items() if memory.ranks} >= {
        "transformer.h.0", "transformer.h.1",
    }  # fmt: skip
    assert forwards.count(True) == 3 * 2 * 2 and forwards.count(False) == 2
    assert all(seen["train"]) and not any(seen["validation"]) and validation.saved_bytes == 0
    expected, *_ = fabric_fit(tiny_litgpt, repeated_sequences, next_token_loss, None)
    for (name, value), (_, reference) in zip(model.named_parameters(), expected.named_parameters(), strict=True):
        torch.testing.assert_close(value, reference, rtol=1e-4, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")
