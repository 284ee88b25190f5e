"""block_deltas: layer mode storing each block input as its difference from the previous one."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
from conftest import flat_gradients, record_errors, run_and_backward, spy_on_pack, tiny_llama
from torch import nn

from loract_lightning import ActivationCompressor, CompressionOptions
from loract_lightning.packed import LowRankFactors, PackedTensor

STREAM_RANK = 8
UPDATE_RANK = 4


class UpdateBlock(nn.Module):
    """``x + relu(x W) U``: adds a rank-``UPDATE_RANK`` update with new directions to the stream."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.down = nn.Linear(width, UPDATE_RANK, bias=False)
        self.up = nn.Linear(UPDATE_RANK, width, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(torch.relu(self.down(x)))


class GrowingRankStream(nn.Module):
    """A residual stream of rank ``STREAM_RANK`` to which each block adds ``UPDATE_RANK`` new
    directions: block l's input has rank 8 + 4 l, but differs from block l-1's by rank 4 only."""

    def __init__(self, width: int = 64, blocks: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(STREAM_RANK, width, bias=False)
        self.blocks = nn.Sequential(*(UpdateBlock(width) for _ in range(blocks)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.embed(z)).pow(2).mean()


@pytest.fixture
def stream() -> tuple[GrowingRankStream, torch.Tensor]:
    torch.manual_seed(0)
    return GrowingRankStream().train(), torch.randn(8, 16, STREAM_RANK)


def layer_mode(block_deltas: bool) -> dict:
    return {
        "rank": STREAM_RANK, "min_rank": 1, "min_bytes": 0, "min_width": 0, "checkpoint": ["UpdateBlock"],
        "compress_outside": False, "block_deltas": block_deltas,
    }  # fmt: skip


def relative_difference(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).detach().norm() / expected.detach().norm())


def test_deltas_of_a_growing_stream_are_exact_where_the_inputs_alone_are_not(stream):
    model, z = stream
    expected, _ = run_and_backward(model, lambda: model(z))
    plain, _ = run_and_backward(model, lambda: model(z), **layer_mode(block_deltas=False))
    deltas, stats = run_and_backward(model, lambda: model(z), **layer_mode(block_deltas=True))
    assert stats.compressed == 4 and stats.modules["blocks.3"].ranks == {STREAM_RANK}
    assert relative_difference(plain, expected) > 1e-2  # rank 8 of inputs of rank 12, 16, 20
    assert relative_difference(deltas, expected) < 1e-4


def test_each_rebuilt_block_input_is_the_previous_one_plus_its_factors(stream):
    model, z = stream
    compressor = ActivationCompressor(model, CompressionOptions(**layer_mode(block_deltas=True)))
    calls = spy_on_pack(compressor)
    errors = record_errors(compressor)
    with compressor.capture():
        loss = model(z)
    regions = [c["packed"].region for c in calls if isinstance(c["packed"], PackedTensor)]
    assert all(isinstance(region, LowRankFactors) for region in regions) and len(regions) == 4
    assert regions[0].base is None and all(r.base is previous for previous, r in pairwise(regions))
    # Memory: the same factors per block as without deltas, plus one scale per row (keep_row_norms).
    rows = z.shape[0] * z.shape[1]
    assert all(r.nbytes == 4 * (STREAM_RANK * (rows + 64) + rows) for r in regions[1:])
    # The observers see the error of the rebuilt input, not of the delta.
    inputs = [c["tensor"].reshape(rows, -1) for c in calls if isinstance(c["packed"], PackedTensor)]
    rebuilt = [region.dense().reshape(rows, -1) for region in regions]
    for error, original, approximation in zip(errors, inputs, rebuilt, strict=True):
        assert error == pytest.approx(relative_difference(approximation, original), abs=1e-6)
    for original, approximation in zip(inputs, rebuilt, strict=True):  # rows keep their norms, as without deltas
        torch.testing.assert_close(approximation.norm(dim=1), original.norm(dim=1), rtol=1e-4, atol=1e-5)
    loss.backward()


def test_deltas_are_on_by_default_in_layer_mode_only(stream):
    model, _ = stream
    assert ActivationCompressor(model, CompressionOptions(checkpoint=["UpdateBlock"])).block_deltas
    assert not ActivationCompressor(model).block_deltas
    off = CompressionOptions(checkpoint=["UpdateBlock"], block_deltas=False)
    assert not ActivationCompressor(model, off).block_deltas
    with pytest.raises(TypeError, match="block_deltas must be True or False, got 1"):
        CompressionOptions(block_deltas=1)


class Rotation(nn.Module):
    """``x W`` with W orthogonal: a checkpointed block that keeps its input's rank."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linalg.qr(torch.randn(width, width))[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


class TwoStreams(nn.Module):
    """Two blocks whose inputs (rank 8 each) come from independent inputs: their difference has rank 16."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.embeds = nn.ModuleList(nn.Linear(STREAM_RANK, width, bias=False) for _ in range(2))
        self.blocks = nn.ModuleList(Rotation(width) for _ in range(2))

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        outputs = [block(embed(z)) for block, embed, z in zip(self.blocks, self.embeds, (first, second), strict=True)]
        return sum(output.pow(2).mean() for output in outputs)


def test_a_delta_is_stored_only_where_it_is_closer_so_a_lossless_rank_stays_lossless():
    torch.manual_seed(0)
    model = TwoStreams().train()
    first, second = torch.randn(8, 16, STREAM_RANK), torch.randn(8, 16, STREAM_RANK)
    options = {**layer_mode(block_deltas=True), "checkpoint": ["Rotation"]}
    expected, _ = run_and_backward(model, lambda: model(first, second))
    compressor = ActivationCompressor(model, CompressionOptions(**options))
    calls = spy_on_pack(compressor)
    with compressor.capture():
        loss = model(first, second)
    model.zero_grad()
    loss.backward()
    regions = [c["packed"].region for c in calls if isinstance(c["packed"], PackedTensor)]
    assert len(regions) == 2 and all(region.base is None for region in regions)
    assert relative_difference(flat_gradients(model), expected) < 1e-4


def test_deltas_on_a_llama_lower_the_gradient_error_of_layer_mode():
    torch.manual_seed(0)
    model = tiny_llama(hidden=128, layers=4, intermediate=256)
    ids = torch.randint(0, 1000, (4, 64))
    expected, _ = run_and_backward(model, lambda: model(input_ids=ids, labels=ids).loss)
    # PyTorch's recompute: the compressed one would add its own error to both sides.
    options = {
        "rank": 16,
        "min_rank": 1,
        "min_bytes": 0,
        "checkpoint": ["LlamaDecoderLayer"],
        "compress_recompute": False,
    }
    plain, _ = run_and_backward(model, lambda: model(input_ids=ids, labels=ids).loss, block_deltas=False, **options)
    deltas, stats = run_and_backward(model, lambda: model(input_ids=ids, labels=ids).loss, block_deltas=True, **options)
    assert stats.modules["model.layers.3"].compressed == 1
    assert relative_difference(deltas, expected) < relative_difference(plain, expected)
    assert torch.isfinite(flat_gradients(model)).all()


def test_rebuilds_in_reverse_order_hand_each_base_its_matrix(stream):
    model, z = stream
    compressor = ActivationCompressor(model, CompressionOptions(**layer_mode(block_deltas=True)))
    calls = spy_on_pack(compressor)
    with compressor.capture():
        model(z)
    regions = [c["packed"].region for c in calls if isinstance(c["packed"], PackedTensor)]
    from_scratch = [region.matrix() for region in regions]  # each rebuilt through all its bases
    for index in reversed(range(len(regions))):  # the order autograd rebuilds checkpointed blocks in
        torch.testing.assert_close(regions[index].dense().reshape(from_scratch[index].shape), from_scratch[index])
        if index > 0:  # its base's matrix is waiting for the base's own rebuild: one product, not index + 1
            assert regions[index - 1]._handed_down is not None
    assert all(region._handed_down is None for region in regions)  # nothing is left behind
