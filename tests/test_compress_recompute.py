"""Layer mode's ``compress_recompute``: each block is recomputed in backward under default mode's
rule, so its backward holds linear inputs as factors and masks exactly instead of raw."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import flat_gradients, is_factorized, spy_on_pack, tiny_llama
from torch import nn

from loract_lightning import ActivationCompressor, CompressionOptions
from loract_lightning.packed import PackedTensor, TwoValuedMask

WIDTH = 64


class Block(nn.Module):
    """A residual MLP block with dropout: the recompute must draw the forward's dropout mask."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.up, self.down = nn.Linear(WIDTH, 2 * WIDTH), nn.Linear(2 * WIDTH, WIDTH)
        self.dropout = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dropout(self.down(self.up(self.norm(x))))


def gradients(model: nn.Module, loss_fn, **options) -> tuple[torch.Tensor, list]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    calls = []
    if options:
        compressor = ActivationCompressor(model, CompressionOptions(**options))
        calls = spy_on_pack(compressor, recompute=True)
        with compressor.capture():
            loss = loss_fn()
    else:
        loss = loss_fn()
    loss.backward()
    return flat_gradients(model), calls


def low_rank_input(rank: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(4, 64, rank, generator=generator) @ torch.randn(rank, WIDTH, generator=generator)


def test_the_recompute_stores_linear_inputs_as_factors_and_masks_exactly_and_loses_nothing_at_their_rank():
    torch.manual_seed(0)
    model = nn.Sequential(Block()).train()
    x = low_rank_input()
    # up's input (normed, rank <= 5) is exact at rank 8; down's (up's output, rank <= 6) too.
    options = {"rank": 8, "min_rank": 1, "min_bytes": 0, "min_width": 0, "checkpoint": ["Block"]}
    expected, _ = gradients(model, lambda: model(x).pow(2).mean())
    compressed, calls = gradients(model, lambda: model(x).pow(2).mean(), compress_recompute=True, **options)
    torch.testing.assert_close(compressed, expected, rtol=1e-4, atol=1e-6)
    in_recompute = [call for call in calls if call["recomputing"] is not None]
    assert {call["recomputing"] for call in in_recompute} == {"0"}
    assert sum(is_factorized(call["packed"]) for call in in_recompute) == 2  # up's and down's inputs
    masks = [
        c
        for c in in_recompute
        if isinstance(c["packed"], PackedTensor) and isinstance(c["packed"].region, TwoValuedMask)
    ]
    assert len(masks) == 1  # the dropout mask, exactly


@pytest.mark.parametrize("rank", [1.0, 16])
def test_llama_gradients_match_pytorch_checkpointing(rank):
    """At a lossless rank the two recomputes give the uncompressed gradients; at a lossy one
    the compressed recompute stays close to PyTorch's (it adds default mode's error only)."""
    torch.manual_seed(0)
    model = tiny_llama(hidden=128, layers=3, intermediate=256, attention_dropout=0.1)
    ids = torch.randint(0, 1000, (2, 64))
    options = {"rank": rank, "min_rank": 1, "min_bytes": 0, "checkpoint": ["LlamaDecoderLayer"]}
    expected, _ = gradients(model, lambda: model(input_ids=ids, labels=ids).loss)
    plain, _ = gradients(model, lambda: model(input_ids=ids, labels=ids).loss, compress_recompute=False, **options)
    recompressed, _ = gradients(
        model, lambda: model(input_ids=ids, labels=ids).loss, compress_recompute=True, **options
    )
    if rank == 1.0:
        torch.testing.assert_close(recompressed, expected)
    else:
        error = ((recompressed - plain).norm() / plain.norm()).item()
        assert 0 < error < 0.3, error


def test_a_block_whose_input_needs_no_gradient_still_trains():
    """Frozen embeddings (LoRA): the first block's input needs no gradient, its weights do."""
    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block()).train()
    x = low_rank_input()
    expected, _ = gradients(model, lambda: model(x).pow(2).mean())
    compressed, _ = gradients(
        model, lambda: model(x).pow(2).mean(), rank=1.0, min_bytes=0, checkpoint=["Block"], compress_recompute=True
    )
    assert all(p.grad is not None for p in model.parameters())
    torch.testing.assert_close(compressed, expected)


def test_batch_norm_statistics_move_once_with_the_compressed_recompute():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=4).train()
    reference = copy.deepcopy(model)
    images = torch.randn(4, 3, 32, 32)
    expected, _ = gradients(reference, lambda: reference(images).pow(2).mean())
    options = {"rank": 1.0, "min_bytes": 0, "checkpoint": ["BasicBlock"], "compress_recompute": True}
    compressed, _ = gradients(model, lambda: model(images).pow(2).mean(), **options)
    torch.testing.assert_close(compressed, expected)
    for (name, buffer), value in zip(model.named_buffers(), reference.buffers(), strict=True):
        torch.testing.assert_close(buffer, value, msg=f"buffer {name}")


def test_accumulation_and_retain_graph_are_exact_and_autograd_grad_is_refused_clearly():
    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block()).train()
    batches = [low_rank_input(), low_rank_input(rank=2)]
    options = CompressionOptions(rank=1.0, min_bytes=0, checkpoint=["Block"], compress_recompute=True)

    def accumulate(compressor: ActivationCompressor | None) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        with compressor.capture() if compressor else torch.enable_grad():
            for x in batches:
                loss = model(x).pow(2).mean()
                loss.backward(retain_graph=True)
                loss.backward()
        return flat_gradients(model)

    torch.testing.assert_close(accumulate(ActivationCompressor(model, options)), accumulate(None))
    x = batches[0].clone().requires_grad_()
    with ActivationCompressor(model, options).capture():
        loss = model(x).pow(2).mean()
    with pytest.raises(RuntimeError, match="compress_recompute=False"):
        torch.autograd.grad(loss, x)
