"""What one capture leaves behind and what it meets: several backward passes in one ``with``
block, successive steps, other saved-tensor hooks, TorchScript, a run that compresses nothing."""

from __future__ import annotations

import copy
import gc
import warnings

import pytest
import torch
from conftest import flat_gradients
from torch import nn

from loract_lightning import ActivationCompressor, CompressionOptions, compress_activations
from loract_lightning.packed import HandedOn, LowRankFactors

WIDTH = 128


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.mlp = nn.Sequential(nn.Linear(WIDTH, 2 * WIDTH), nn.GELU(), nn.Linear(2 * WIDTH, WIDTH))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


def stack(depth: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*(Block() for _ in range(depth))).train()


LAYER_MODE = {"rank": 8, "min_rank": 1, "min_bytes": 0, "checkpoint": ["Block"]}


def micro_batches(count: int = 6) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(4, 32, WIDTH, generator=generator) for _ in range(count)]


def live_factor_bytes() -> int:
    gc.collect()
    return sum(o.nbytes for o in gc.get_objects() if isinstance(o, LowRankFactors))


def test_micro_batches_in_one_capture_free_what_each_backward_held_and_match_separate_captures():
    model = stack()
    one_block = ActivationCompressor(model, CompressionOptions(**LAYER_MODE))
    held = []
    before = live_factor_bytes()  # left by other tests in this process
    with one_block.capture():
        for x in micro_batches():
            model(x).pow(2).mean().backward()
            held.append(live_factor_bytes() - before)
    together = flat_gradients(model)
    assert held == [0] * len(held), f"factors of freed graphs still held: {held} bytes"

    model.zero_grad(set_to_none=True)
    separate = ActivationCompressor(model, CompressionOptions(**LAYER_MODE))  # the same seed: the same columns
    for x in micro_batches():
        with separate.capture():
            loss = model(x).pow(2).mean()
        loss.backward()
    torch.testing.assert_close(together, flat_gradients(model))


def lossy_gradients(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    with compress_activations(model, rank=4, min_rank=1, min_bytes=0, seed=3):
        loss = model(x).pow(2).mean()
    loss.backward()
    return flat_gradients(model)


def test_successive_compress_activations_calls_draw_new_columns_reproducibly():
    model = stack(depth=1)
    twin = copy.deepcopy(model)  # a model of its own: its generators start from the seed again
    x = micro_batches(1)[0]
    steps = [lossy_gradients(model, x) for _ in range(3)]
    assert not torch.equal(steps[0], steps[1]) and not torch.equal(steps[1], steps[2])
    for expected in steps:
        torch.testing.assert_close(lossy_gradients(twin, x), expected)


def compressed_gradients(model: nn.Module, x: torch.Tensor, **options) -> tuple[torch.Tensor, object]:
    model.zero_grad(set_to_none=True)
    with ActivationCompressor(model, CompressionOptions(**options)).capture() as stats:
        loss = model(x).pow(2).mean()
    loss.backward()
    return flat_gradients(model), stats


def test_what_loract_keeps_raw_goes_to_the_saved_tensor_hooks_around_it():
    """The user's own ``save_on_cpu`` (or any hooks) around LoRAct still sees what LoRAct keeps raw."""
    model = stack(depth=2)
    x = micro_batches(1)[0]
    options = {"rank": 16, "min_bytes": 0, "min_width": 0, "saved_by": None}
    expected, _ = compressed_gradients(model, x, **options)

    outer_packs = []

    def pack(tensor):
        outer_packs.append(tuple(tensor.shape))
        return tensor.clone()  # a copy, as save_on_cpu keeps one

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda packed: packed):
        gradients, stats = compressed_gradients(model, x, **options)
    torch.testing.assert_close(gradients, expected)
    assert stats.compressed > 0 and sum(stats.kept.values()) == len(outer_packs) > 0


def test_an_in_place_write_to_a_tensor_handed_on_still_raises():
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU())
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t):
        compressor = ActivationCompressor(model, CompressionOptions(rank=1.0, min_bytes=0, saved_by=["ReLU"]))
        forward = compressor._start_forward()
        hidden = torch.relu(torch.randn(8, WIDTH, requires_grad=True))
        packed = forward._keep_raw(hidden, "1", forward._record(hidden, "1"), "test")
    assert isinstance(packed, HandedOn)
    hidden.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        packed.unpack()


class Scripted(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(WIDTH, WIDTH)
        self.scripted = torch.jit.script(nn.Linear(WIDTH, WIDTH))
        self.last = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.scripted(self.first(x)))


def test_a_torchscript_submodule_is_compressed_as_part_of_its_caller():
    torch.manual_seed(0)
    model = Scripted().train()
    generator = torch.Generator().manual_seed(0)  # rank 4: every activation is exact at rank 16
    x = torch.randn(256, 4, generator=generator) @ torch.randn(4, WIDTH, generator=generator)
    model(x).pow(2).mean().backward()
    expected = flat_gradients(model)
    gradients, stats = compressed_gradients(model, x, rank=16, min_bytes=0)
    torch.testing.assert_close(gradients, expected)
    assert stats.compressed > 0
    with pytest.raises(ValueError, match="TorchScript"):
        compress_activations(model, checkpoint=["scripted"]).__enter__()


def test_a_forward_that_compresses_nothing_says_why_once():
    model = stack(depth=2)
    compressor = ActivationCompressor(model, CompressionOptions(checkpoint=["Block"]))  # 64 KiB inputs
    expected = "compressed nothing.*below_min_bytes.*smaller than min_bytes"
    with pytest.warns(UserWarning, match=expected), compressor.capture():
        model(micro_batches(1)[0]).sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with compressor.capture():
            model(micro_batches(1)[0]).sum().backward()


@pytest.mark.slow
def test_a_compiled_model_that_compresses_nothing_says_so():
    model = torch.compile(stack(depth=1), backend="aot_eager")
    expected = "compressed nothing.*compiled graph"
    with pytest.warns(UserWarning, match=expected), compress_activations(model, min_bytes=0):
        loss = model(micro_batches(1)[0]).pow(2).mean()
    loss.backward()


@pytest.mark.parametrize("checkpoint", [[], ["LlamaDecoderLayer"]])
def test_a_raw_loss_that_dominates_the_step_is_named_with_the_way_around_it(checkpoint):
    """The ordinary LM loss keeps its tokens x vocabulary log-probabilities raw (rightly: they
    compress badly); LoRAct says so once, and the chunked loss makes it go away."""
    from conftest import tiny_llama

    from loract_lightning import causal_lm_loss

    torch.manual_seed(0)
    model = tiny_llama(hidden=64, layers=2, vocab=32000)
    ids = torch.randint(0, 32000, (2, 256))  # log-probabilities: 2 x 256 x 32000 floats, 62 MiB
    options = CompressionOptions(checkpoint=checkpoint, min_bytes=0)
    expected = r"one activation kept raw is 9\d% .* 62 MiB made by LogSoftmaxBackward0 in the root module.*causal_lm"
    with pytest.warns(UserWarning, match=expected), ActivationCompressor(model, options).capture():
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="LoRAct: one activation kept raw")
        with ActivationCompressor(model, options).capture():
            loss = causal_lm_loss(model, ids, labels=ids)
        loss.backward()
