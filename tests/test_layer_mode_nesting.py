"""Layer mode where the model has state or checkpointing of its own: BatchNorm's running
statistics, an enclosing checkpoint, timm's own block checkpointing, a module matched twice."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conftest import flat_gradients
from torch import nn
from torch.nn.utils import parametrizations
from torch.utils.checkpoint import checkpoint

from loract_lightning import compress_activations

WIDTH = 64


class Block(nn.Module):
    def __init__(self, mlp: nn.Module | None = None) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.mlp = mlp or MLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(WIDTH, 2 * WIDTH), nn.Linear(2 * WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)))


class CheckpointsItsStack(nn.Module):
    """The user's own non-reentrant checkpoint around blocks that layer mode checkpoints too."""

    def __init__(self) -> None:
        super().__init__()
        self.stack = nn.Sequential(Block(), Block(), Block())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.stack, x, use_reentrant=False)


class SharedMLP(nn.Module):
    """One MLP, called on its own and inside a block: ``checkpoint=["Block", "MLP"]`` matches it twice."""

    def __init__(self) -> None:
        super().__init__()
        self.mlp = MLP()
        self.block = Block(self.mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x + self.mlp(x))


def step(model: nn.Module, x: torch.Tensor, **options) -> torch.Tensor:
    """Gradients of one seeded training step, compressed when options are given."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    if options:
        with compress_activations(model, **options):
            loss = model(x).pow(2).mean()
    else:
        loss = model(x).pow(2).mean()
    loss.backward()
    return flat_gradients(model)


@pytest.mark.parametrize("model_class", [CheckpointsItsStack, SharedMLP])
def test_layer_mode_inside_another_checkpoint_gives_the_uncompressed_gradients(model_class):
    torch.manual_seed(0)
    model = model_class().train()
    x = torch.randn(4, 32, WIDTH)
    reference = step(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the enclosed targets are named in a warning
        compressed = step(model, x, rank=1.0, min_bytes=0, checkpoint=["Block", "MLP"])
    torch.testing.assert_close(compressed, reference)


def test_an_enclosed_target_is_named_in_a_warning():
    torch.manual_seed(0)
    model = CheckpointsItsStack().train()
    with pytest.warns(UserWarning, match="runs inside another activation checkpoint"):
        step(model, torch.randn(2, 8, WIDTH), rank=1.0, min_bytes=0, checkpoint=["stack.0"])


def test_timm_own_block_checkpointing_is_refused_with_the_switch_to_turn_off():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", num_classes=4, img_size=32, patch_size=8).train()
    model.set_grad_checkpointing(True)
    with pytest.raises(ValueError, match=r"set_grad_checkpointing\(False\)"):
        step(model, torch.randn(2, 3, 32, 32), checkpoint=["Block"])


def test_batch_norm_statistics_are_updated_once_per_step_in_layer_mode():
    """The recompute runs BatchNorm in train mode again: it must not count the batch twice."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=4).train()
    images = torch.randn(4, 3, 32, 32)
    reference_model = copy.deepcopy(model)
    reference = step(reference_model, images)
    compressed = step(model, images, rank=1.0, min_bytes=0, checkpoint=["BasicBlock"])
    torch.testing.assert_close(compressed, reference)
    for (name, buffer), expected in zip(model.named_buffers(), reference_model.buffers(), strict=True):
        torch.testing.assert_close(buffer, expected, msg=f"buffer {name}")


class SpectralBlock(nn.Module):
    """Reads state its forward updates: spectral norm's power iteration moves ``u`` and ``v``."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = parametrizations.spectral_norm(nn.Linear(WIDTH, WIDTH))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.linear(x))


class SelfAttention(nn.Module):
    """``attention(h, h, h)``: one tensor as query, key and value, which the attention checks."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(WIDTH, WIDTH)
        self.attention = nn.MultiheadAttention(WIDTH, 4, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.inp(x)
        return self.attention(hidden, hidden, hidden, need_weights=False)[0]


@pytest.mark.parametrize("compress_recompute", [False, True])
@pytest.mark.parametrize(
    "build, target",
    [
        (lambda: nn.Sequential(nn.Linear(WIDTH, WIDTH), SpectralBlock(), SpectralBlock()), "SpectralBlock"),
        (SelfAttention, "MultiheadAttention"),
    ],
    ids=["state_read_and_updated", "one_tensor_three_arguments"],
)
def test_the_recompute_sees_what_the_forward_saw(build, target, compress_recompute):
    torch.manual_seed(0)
    model = build().train()
    state = copy.deepcopy(model.state_dict())
    x = torch.randn(4, 32, WIDTH)
    reference = step(model, x)
    expected_buffers = {name: value.clone() for name, value in model.named_buffers()}
    model.load_state_dict(state)
    options = {"rank": 1.0, "min_bytes": 0, "checkpoint": [target], "compress_recompute": compress_recompute}
    torch.testing.assert_close(step(model, x, **options), reference)
    for name, value in model.named_buffers():
        torch.testing.assert_close(value, expected_buffers[name], msg=f"buffer {name}")
