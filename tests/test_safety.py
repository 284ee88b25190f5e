"""Never silently wrong: what the engine cannot handle exactly it keeps raw, or refuses as PyTorch does.

Each test here reproduces a case where an earlier version gave a wrong gradient, NaN or a crash.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import KnownRankNet, flat_gradients, run_and_backward, spy_on_pack, tiny_llama
from torch import nn

from loract_lightning import ActivationCompressor, CompressionOptions, compress_activations
from loract_lightning.linalg import sampled_qb
from loract_lightning.packed import PackedTensor, RawTensor

INPLACE_ERROR = "modified by an inplace operation"


class ModifiesAfterSave(nn.Module):
    """relu saves its output; the in-place add then changes what relu's backward would read."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.lin1 = nn.Linear(width, width)
        self.lin2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.lin1(x))
        hidden.add_(1.0)
        return self.lin2(hidden).pow(2).sum()


def low_rank_input(rows: int = 512, width: int = 64, rank: int = 2) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(rows, rank, generator=generator) @ torch.randn(rank, width, generator=generator)


def test_plain_pytorch_refuses_the_in_place_write():
    """The reference behaviour the engine must match."""
    model = ModifiesAfterSave().train()
    with pytest.raises(RuntimeError, match=INPLACE_ERROR):
        model(low_rank_input()).backward()


@pytest.mark.parametrize("rank", [1.0, 8], ids=["kept_raw", "compressed"])
def test_in_place_write_after_a_save_raises_as_pytorch_does(rank):
    model = ModifiesAfterSave().train()
    # Relu's output too.
    compressor = ActivationCompressor(model, CompressionOptions(rank=rank, min_bytes=0, saved_by=None))
    calls = spy_on_pack(compressor)
    with compressor.capture():
        loss = model(low_rank_input())
    relu_saves = [call for call in calls if call["module"] == "" and call["tensor"].shape == (512, 64)]
    expected_form = RawTensor if rank == 1.0 else PackedTensor
    assert relu_saves and all(isinstance(call["packed"], expected_form) for call in relu_saves)
    with pytest.raises(RuntimeError, match=INPLACE_ERROR):
        loss.backward()


class ScalesItsInput(nn.Module):
    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x.mul_(2)  # changes the input that checkpointing saved for the recompute
        return self.lin(x)


class ScalingNet(nn.Module):
    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.inp = nn.Linear(width, width)
        self.block = ScalesItsInput(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(self.inp(x)).pow(2).sum()


@pytest.mark.parametrize("rank", [1.0, 8], ids=["kept_raw", "compressed"])
def test_layer_mode_refuses_a_block_that_writes_its_own_input(rank):
    model = ScalingNet().train()
    x = low_rank_input()
    with pytest.raises(RuntimeError, match=INPLACE_ERROR):  # torch's own checkpoint
        torch.utils.checkpoint.checkpoint(model.block, model.inp(x), use_reentrant=False).pow(2).sum().backward()
    options = {"min_bytes": 0, "checkpoint": ["ScalesItsInput"], "compress_outside": False}  # the block alone
    with compress_activations(model, rank=rank, **options) as stats:
        loss = model(x)
    assert stats.compressed == (1 if rank == 8 else 0)
    with pytest.raises(RuntimeError, match=INPLACE_ERROR):
        loss.backward()


def test_in_place_ops_that_pytorch_allows_still_train():
    """A ReLU(inplace=True) after a layer that does not save its output is legal: no false alarm."""
    model = nn.Sequential(nn.Linear(128, 128), nn.LayerNorm(128), nn.ReLU(inplace=True), nn.Linear(128, 1)).train()
    x = KnownRankNet.make_input()
    expected, _ = run_and_backward(model, lambda: model(x).sum())
    got, _ = run_and_backward(model, lambda: model(x).sum(), rank=1.0, min_bytes=0)
    assert torch.equal(got, expected)
    lossy, stats = run_and_backward(model, lambda: model(x).sum(), rank=4, min_bytes=0)
    assert stats.compressed > 0 and torch.isfinite(lossy).all()


class FrozenConvNet(nn.Module):
    """A trainable stem over frozen 3x3 convolutions, as in conv LoRA or a partly frozen ResNet."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1))
        self.body.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.stem(x)).mean()


def test_frozen_conv_weights_cast_by_autocast_are_never_factorized():
    model = FrozenConvNet().train()
    weight_shapes = {tuple(p.shape) for p in model.body.parameters() if p.ndim == 4}
    # 32-px wide inputs factorized too (no width or rank floor), so that something is compressed.
    options = CompressionOptions(rank=0.125, min_bytes=0, min_width=0, min_rank=1)
    compressor = ActivationCompressor(model, options)
    calls = spy_on_pack(compressor)
    x = torch.randn(4, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16), compressor.capture() as stats:
        loss = model(x)
    loss.backward()
    weight_saves = [c for c in calls if tuple(c["tensor"].shape) in weight_shapes]
    # Saved as bf16 copies with no autograd history: only their shape and values tell.
    assert weight_saves and all(c["tensor"].dtype == torch.bfloat16 for c in weight_saves)
    assert all(c["kept_raw"] for c in weight_saves)
    assert stats.kept["parameter"] >= len(weight_saves) and stats.compressed > 0


class HalfMLP(nn.Module):
    def __init__(self, width: int = 256) -> None:
        super().__init__()
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x))).float().pow(2).mean()


def test_float16_sketch_does_not_overflow():
    """4096 x 64 at RMS 4: the float16 Gram products exceed 65504."""
    matrix = (4 * torch.randn(4096, 64)).half()
    assert not torch.isfinite(matrix.T @ matrix[:, :8]).all()  # the overflow this guards against
    left, right = sampled_qb(matrix, 8, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(left).all() and torch.isfinite(right).all()


@pytest.mark.parametrize("rank", [0.125, "auto"])
@pytest.mark.parametrize("precision", ["half", "autocast"])
def test_float16_training_gives_finite_gradients(rank, precision):
    torch.manual_seed(0)
    model = HalfMLP().train()
    x = 23 * torch.randn(256, 256)  # hidden RMS ~23: rows x RMS^2 far above 65504
    if precision == "half":
        model, x = model.half(), x.half()
        context = torch.autocast("cpu", enabled=False)
    else:
        context = torch.autocast("cpu", dtype=torch.float16)
    with context, compress_activations(model, rank=rank, min_bytes=0) as stats:
        loss = model(x)
    loss.backward()
    assert stats.compressed > 0
    assert torch.isfinite(flat_gradients(model)).all()


def test_factors_that_overflow_are_kept_raw_and_counted():
    """Finite float16 input whose rows are too long for float16 factors (row norm 80000 > 65504)."""
    model = nn.Linear(256, 8).half().train()
    torch.manual_seed(0)
    x = (5000 * (1 + 0.01 * torch.randn(1024, 256))).half().requires_grad_(True)
    compressor = ActivationCompressor(model, CompressionOptions(rank=4, min_bytes=0))
    calls = spy_on_pack(compressor)
    with compressor.capture() as stats:
        model(x).float().sum()
    assert stats.kept["non_finite_factors"] == 1 and stats.compressed == 0
    saved_input = next(c for c in calls if c["tensor"].shape == (1024, 256))
    assert saved_input["kept_raw"] and torch.equal(saved_input["packed"].unpack(), x)


class Router(nn.Module):
    """Top-1 routing over experts; with this router some experts get no tokens at all."""

    def __init__(self, width: int = 32, experts: int = 4) -> None:
        super().__init__()
        self.gate = nn.Linear(width, experts)
        self.experts = nn.ModuleList(nn.Linear(width, width) for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        choice = self.gate(x).argmax(dim=-1)
        out = torch.zeros_like(x)
        for index, expert in enumerate(self.experts):
            chosen = choice == index
            out[chosen] = expert(x[chosen])
        return out


def test_empty_activations_stay_raw():
    torch.manual_seed(0)
    model = Router().train()
    with torch.no_grad():
        model.gate.weight.zero_()
        model.gate.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))  # every token to expert 0
    x = torch.randn(64, 32, requires_grad=True)
    expected, _ = run_and_backward(model, lambda: model(x).pow(2).sum())
    got, stats = run_and_backward(model, lambda: model(x).pow(2).sum(), rank=1.0, min_bytes=0)
    assert stats.kept["empty"] >= 3  # the inputs of the three idle experts
    assert torch.equal(got, expected)


def test_layer_mode_takes_over_transformers_gradient_checkpointing():
    torch.manual_seed(0)
    model = tiny_llama(attn_implementation="eager")
    model.gradient_checkpointing_enable()
    ids = torch.randint(0, 1000, (2, 64))

    def loss_fn():
        return model(input_ids=ids, labels=ids).loss

    expected, _ = run_and_backward(model, loss_fn)
    with pytest.warns(UserWarning, match="already run under activation checkpointing"):
        compressor = ActivationCompressor(
            model, CompressionOptions(rank=1.0, min_bytes=0, checkpoint=["LlamaDecoderLayer"])
        )
    assert compressor.layer_mode and compressor.keep_row_norms
    assert set(compressor.checkpointed_modules) == {"model.layers.0", "model.layers.1"}
    model.zero_grad(set_to_none=True)
    with compressor.capture() as stats:
        loss = loss_fn()
    loss.backward()
    assert torch.allclose(flat_gradients(model), expected, rtol=1e-5, atol=1e-7)
    # At a lossy rank the layers' inputs (2 x 64 x 64 fp32) are compressed, and outside them the
    # LM head's input (saved by a Linear); the loss's log-probabilities stay raw.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with compress_activations(model, rank=4, min_bytes=0, checkpoint=["LlamaDecoderLayer"]) as stats:
            model(input_ids=ids, labels=ids).loss.backward()
    compressed = {name for name, module in stats.modules.items() if module.compressed}
    assert compressed == {"model.layers.0", "model.layers.1", "lm_head"}, stats
    assert stats.compressed == 3 and stats.kept["not_in_saved_by"] > 0


def test_layer_mode_treats_what_is_saved_outside_the_blocks_as_default_mode_does():
    torch.manual_seed(0)
    model = tiny_llama()
    ids = torch.randint(0, 1000, (2, 64))
    options = {"rank": 4, "min_bytes": 0, "checkpoint": ["LlamaDecoderLayer"]}

    def compressed_modules(**more) -> tuple[set[str], object]:
        with compress_activations(model, **options, **more) as stats:
            model(input_ids=ids, labels=ids).loss.backward()
        return {name for name, module in stats.modules.items() if module.compressed}, stats

    blocks = {"model.layers.0", "model.layers.1"}
    compressed, stats = compressed_modules()
    assert compressed == blocks | {"lm_head"}  # the trainable head's input, saved by a Linear
    assert stats.kept["not_in_saved_by"] > 0  # the final norm's and the loss's tensors stay raw
    compressed, stats = compressed_modules(layers={"lm_head": None})  # `layers` globs apply outside too
    assert compressed == blocks and stats.kept["disabled_by_layers"] == 1
    compressed, stats = compressed_modules(compress_outside=False)
    assert compressed == blocks and stats.kept["outside_checkpoint"] > 0 and stats.kept["not_in_saved_by"] == 0


def test_layer_mode_refuses_a_prefilled_kv_cache():
    model = tiny_llama(layers=1)
    with torch.no_grad():
        prefix = model(input_ids=torch.randint(0, 1000, (1, 8)), use_cache=True).past_key_values
    with (
        pytest.raises(ValueError, match="KV cache holding states"),
        compress_activations(model, rank=4, checkpoint=["LlamaDecoderLayer"]),
    ):
        model(input_ids=torch.randint(0, 1000, (1, 8)), past_key_values=prefix, use_cache=True)


class CacheNamedBlock(nn.Module):
    """Takes keyword arguments named like a KV cache that are none: a tensor ``cache`` (an input
    it multiplies by) and an empty ``layer_past`` (no states)."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, cache: torch.Tensor, layer_past: tuple = ()) -> torch.Tensor:
        assert layer_past == (), layer_past  # passed on as it is, in the forward and the recompute
        return torch.tanh(self.proj(x)) * cache


class CacheNamedNet(nn.Module):
    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.embed = nn.Linear(width, width)
        self.gate = nn.Linear(width, width)
        self.block = CacheNamedBlock(width)

    def forward(self, x: torch.Tensor, layer_past: tuple = ()) -> torch.Tensor:
        return self.block(self.embed(x), cache=torch.sigmoid(self.gate(x)), layer_past=layer_past).pow(2).sum()


def test_layer_mode_takes_a_tensor_named_cache_and_an_empty_layer_past():
    """Neither is a KV cache holding states: an earlier version refused both."""
    model = CacheNamedNet()
    x = torch.randn(4, 32, 64)
    expected, _ = run_and_backward(model, lambda: model(x))
    actual, stats = run_and_backward(model, lambda: model(x), rank=1.0, min_bytes=0, checkpoint=["CacheNamedBlock"])
    assert stats.modules["block"].saved_bytes > 0  # the block ran checkpointed: its inputs were saved
    assert expected.abs().sum() > 0 and model.gate.weight.grad.abs().sum() > 0  # the gradient reaches `cache`
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    states = (torch.randn(4, 2, 8), torch.randn(4, 2, 8))
    with (
        pytest.raises(ValueError, match=r"KV cache holding states \(layer_past, a non-empty legacy tuple\)"),
        compress_activations(model, rank=1.0, min_bytes=0, checkpoint=["CacheNamedBlock"]),
    ):
        model(x, layer_past=states)
