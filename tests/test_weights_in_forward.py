"""Weights computed inside forward are weights, not activations: they are never factorized.

Each model here computes a layer's weight in forward (parametrizations, pruning, a merged LoRA
weight, a fused qkv, fast weights). Its input has rank 4, so every real activation is rebuilt
exactly at rank 16: any gradient error can only come from a factorized weight. Before the fix
the defaults gave gradient errors of 0.03-0.85 on these models.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import flat_gradients, is_factorized, spy_on_pack
from torch import nn
from torch.nn.utils import parametrizations, prune

from loract_lightning import ActivationCompressor, CompressionOptions

WIDTH = 128


def with_second_layer(layer: nn.Module) -> nn.Module:
    # The second layer's input requires grad, so autograd saves its weight for the input's gradient.
    return nn.Sequential(nn.Linear(WIDTH, WIDTH), layer)


class MergedLoRA(nn.Module):
    """``F.linear(x, W + B @ A)``: a merged adapter."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(WIDTH, WIDTH)
        self.weight = nn.Parameter(torch.randn(WIDTH, WIDTH) / WIDTH**0.5)
        self.lora_a = nn.Parameter(torch.randn(8, WIDTH) * 0.1)
        self.lora_b = nn.Parameter(torch.randn(WIDTH, 8) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.first(x), self.weight + self.lora_b @ self.lora_a)


class FusedQKV(nn.Module):
    """One projection whose weight is ``torch.cat`` of three parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(WIDTH, WIDTH)
        self.q, self.k, self.v = (nn.Parameter(torch.randn(WIDTH, WIDTH) / WIDTH**0.5) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.first(x), torch.cat([self.q, self.k, self.v]))


class TransposedMatmul(nn.Module):
    """``x @ weight.t().contiguous()``: a copy of a parameter, saved by matmul."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(WIDTH, WIDTH)
        self.weight = nn.Parameter(torch.randn(WIDTH, WIDTH) / WIDTH**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.first(x) @ self.weight.t().contiguous()


class EqualizedLinear(nn.Module):
    """StyleGAN's equalized learning rate: the weight is scaled in every forward."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(WIDTH, WIDTH))
        self.scale = WIDTH**-0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.scale)


class FastWeights(nn.Module):
    """MAML: an inner step on a support batch, then the query through ``functional_call``."""

    def __init__(self) -> None:
        super().__init__()
        self.net = with_second_layer(nn.Linear(WIDTH, WIDTH))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        params = dict(self.net.named_parameters())
        support_loss = torch.func.functional_call(self.net, params, (x[:1],)).pow(2).mean()
        grads = torch.autograd.grad(support_loss, list(params.values()), create_graph=True)
        fast = {name: p - 0.1 * g for (name, p), g in zip(params.items(), grads, strict=True)}
        return torch.func.functional_call(self.net, fast, (x,))


def pruned() -> nn.Module:
    layer = nn.Linear(WIDTH, WIDTH)
    prune.l1_unstructured(layer, "weight", amount=0.3)
    return with_second_layer(layer)


MODELS = {
    "weight_norm": lambda: with_second_layer(parametrizations.weight_norm(nn.Linear(WIDTH, WIDTH))),
    "spectral_norm": lambda: with_second_layer(parametrizations.spectral_norm(nn.Linear(WIDTH, WIDTH))),
    "orthogonal": lambda: with_second_layer(parametrizations.orthogonal(nn.Linear(WIDTH, WIDTH))),
    "prune": pruned,
    "merged_lora": MergedLoRA,
    "fused_qkv": FusedQKV,
    "transposed_matmul": TransposedMatmul,
    "equalized_linear": lambda: with_second_layer(EqualizedLinear()),
    "fast_weights": FastWeights,
}


def low_rank_batch() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randn(8, 64, 4, generator=generator) @ torch.randn(4, WIDTH, generator=generator)


def gradients(model: nn.Module, x: torch.Tensor, options: CompressionOptions | None) -> tuple[torch.Tensor, list]:
    model.zero_grad(set_to_none=True)
    calls = []
    if options is None:
        loss = model(x).pow(2).mean()
    else:
        compressor = ActivationCompressor(model, options)
        calls = spy_on_pack(compressor)
        with compressor.capture():
            loss = model(x).pow(2).mean()
    loss.backward()
    return flat_gradients(model), calls


@pytest.mark.parametrize("saved_by", ["default", None])
@pytest.mark.parametrize("name", list(MODELS))
def test_a_weight_computed_in_forward_is_never_factorized(name, saved_by):
    torch.manual_seed(0)
    model = MODELS[name]().train()
    state = copy.deepcopy(model.state_dict())  # spectral norm's power iteration updates buffers
    x = low_rank_batch()
    reference, _ = gradients(model, x, None)
    model.load_state_dict(state)
    options = CompressionOptions(rank=16, min_bytes=0, **({} if saved_by == "default" else {"saved_by": None}))
    compressed, calls = gradients(model, x, options)
    factorized = [call["tensor"] for call in calls if is_factorized(call["packed"])]
    assert factorized, "the activations themselves are still compressed"
    error = ((compressed - reference).norm() / reference.norm()).item()
    assert error < 1e-4, f"{name}: gradient error {error:.3g} (a weight was factorized)"


def test_only_what_depends_on_the_input_is_factorized_in_wav2vec2():
    """transformers' Wav2Vec2 builds its positional conv's (768, 48, 128)-like weight with weight norm."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Wav2Vec2Config(
        hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=128,
        conv_dim=(32, 32), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4, vocab_size=16,
    )  # fmt: skip
    model = transformers.Wav2Vec2ForCTC(config).train()
    conv_weight_shape = tuple(model.wav2vec2.encoder.pos_conv_embed.conv.weight.shape)
    audio = torch.randn(2, 4000)
    compressor = ActivationCompressor(model, CompressionOptions(rank=8, min_bytes=0, min_width=8, saved_by=None))
    calls = spy_on_pack(compressor)
    with compressor.capture():
        model(audio).logits.pow(2).mean().backward()
    factorized = [tuple(call["tensor"].shape) for call in calls if is_factorized(call["packed"])]
    assert factorized
    assert conv_weight_shape not in factorized


class PositiveLinear(nn.Linear):
    """A weight made by an op that saves its own output (exp): saved before the call returns."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, torch.exp(self.weight) * 0.01, self.bias)


class PerHead(nn.Module):
    """A per-head weight broadcast by ``matmul``, which saves a contiguous copy of it."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(WIDTH, WIDTH, bias=False)
        self.weight = nn.Parameter(torch.randn(4, WIDTH // 4, 32) / 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        heads = self.first(x).view(batch, tokens, 4, WIDTH // 4).transpose(1, 2)
        return torch.matmul(heads, self.weight)


@pytest.mark.parametrize("saved_by", ["default", None])
@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("name", ["exp_weight", "per_head_weight"])
def test_weights_made_inside_a_call_are_never_factorized(name, frozen, saved_by):
    torch.manual_seed(0)
    model = {"exp_weight": lambda: with_second_layer(PositiveLinear(WIDTH, WIDTH)), "per_head_weight": PerHead}[name]()
    model.train()
    if frozen:  # no autograd history leads back to the weight: its copy is found by its values
        for param_name, param in model.named_parameters():
            param.requires_grad_(param_name.startswith("0.") or param_name.startswith("first."))
    x = low_rank_batch()
    reference, _ = gradients(model, x, None)
    options = CompressionOptions(
        rank=16, min_bytes=0, min_width=0, **({} if saved_by == "default" else {"saved_by": None})
    )
    compressed, _ = gradients(model, x, options)
    error = ((compressed - reference).norm() / reference.norm()).item()
    assert error < 1e-4, f"{name}: gradient error {error:.3g} (a weight was factorized)"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_frozen_weight_computed_in_forward_is_not_factorized_under_autocast(dtype):
    """A GAN's generator step: the discriminator is frozen and spectral-normed, its weights are
    computed in every forward and cast by autocast without any autograd history."""
    torch.manual_seed(0)
    generator = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH))
    critic = nn.Sequential(parametrizations.spectral_norm(nn.Linear(WIDTH, WIDTH)), nn.Linear(WIDTH, 1))
    critic.requires_grad_(False)
    model = nn.Sequential(generator, critic).train()
    state = copy.deepcopy(model.state_dict())
    x = low_rank_batch()
    compressor = ActivationCompressor(model, CompressionOptions(rank=16, min_bytes=0))
    calls = spy_on_pack(compressor)
    with torch.autocast("cpu", dtype=dtype), compressor.capture():
        model(x).float().mean().backward()
    model.load_state_dict(state)
    weight_shaped = [call for call in calls if tuple(call["tensor"].shape) == (WIDTH, WIDTH)]
    assert weight_shaped and not any(is_factorized(call["packed"]) for call in weight_shaped)
