"""Issue #27's break-it sweep, the cases that hold: "never silently wrong" on what real users run.

Each case is checked in default mode (``saved_by`` default and ``None``, no size floors) and, where
it has blocks, in layer mode, with up to three tests of its own:

- lossless: at ``rank=1.0`` (nothing factorized), or at an int rank above the rank of every
  activation (a rank-4 input through linear layers), gradients and buffers after one step equal
  the uncompressed step's;
- only activations: at a lossy rank, no factorized tensor has the same values when the inputs
  change (an independent test of "computed from parameters and buffers alone", whatever form
  autograd saves it in);
- it raises: an in-place write to a saved tensor raises PyTorch's own error.

The real models (transformers audio models, timm CNNs in layer mode) are marked slow.
"""

from __future__ import annotations

import copy
import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import is_factorized, spy_on_pack
from torch import nn
from torch.nn.utils import parametrizations, parametrize, prune

from loract_lightning import ActivationCompressor, CompressionOptions, compress_activations

pytestmark = [
    pytest.mark.filterwarnings("ignore:LoRAct compressed nothing"),
    pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN"),
]

WIDTH = 64
DEFAULT = {"min_bytes": 0, "min_width": 0}
ALL = {"saved_by": None, "min_bytes": 0, "min_width": 0}


def modes(*blocks: str) -> dict[str, dict]:
    """Default mode (``saved_by`` default and None) and, given block classes, layer mode."""
    found = {"default": DEFAULT, "saved_by_none": ALL}
    if blocks:
        found["layer"] = {"min_bytes": 0, "min_width": 0, "checkpoint": list(blocks)}
    return found


def low_rank(batch: int = 4, length: int = 32, rank: int = 4, width: int = WIDTH, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, rank, generator=generator) @ torch.randn(rank, width, generator=generator)


def one_step(model: nn.Module, loss_fn, options: dict | None = None, spy: bool = False):
    """Gradients, buffers and (with ``spy``) the pack calls of one seeded step."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    calls = []
    if options is None:
        loss = loss_fn()
    else:
        compressor = ActivationCompressor(model, CompressionOptions(**options))
        if spy:
            calls = spy_on_pack(compressor)
        with compressor.capture():
            loss = loss_fn()
    loss.backward()
    gradients = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    return gradients, buffers, calls


def assert_lossless(model: nn.Module, loss_fn, options: dict, rank: int | float = 1.0, tolerance: float = 1e-4):
    """One compressed step at ``rank`` gives the uncompressed step's gradients and buffers."""
    state = copy.deepcopy(model.state_dict())
    expected, expected_buffers, _ = one_step(model, loss_fn)
    model.load_state_dict(state)
    gradients, buffers, _ = one_step(model, loss_fn, {**options, "rank": rank, "min_rank": 1})
    model.load_state_dict(state)
    assert gradients.keys() == expected.keys()
    for name, value in expected.items():
        error = ((gradients[name] - value).norm() / value.norm().clamp_min(1e-30)).item()
        assert error < tolerance, f"gradient of {name}: relative error {error:.3g} at rank {rank}"
    for name, value in expected_buffers.items():
        torch.testing.assert_close(buffers[name], value, msg=f"buffer {name}")


def _keyed(calls: list[dict]) -> dict[tuple, dict]:
    """Pack calls by (module, shape, occurrence), so two forwards of one model line up."""
    counts: dict[tuple, int] = {}
    keyed = {}
    for call in calls:
        key = (call["module"], tuple(call["tensor"].shape))
        counts[key] = counts.get(key, 0) + 1
        keyed[(*key, counts[key])] = call
    return keyed


def _perturb(inputs: list[torch.Tensor]) -> None:
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for tensor in inputs:
            if tensor.is_floating_point():
                tensor.mul_(-0.7).add_(0.5 * torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype))
            else:
                tensor.copy_(tensor.roll(1, dims=-1))


def _rebuilt_exactly(tensor: torch.Tensor, rank: int) -> bool:
    """Whether rank-``rank`` factors hold ``tensor`` exactly (a broadcast bias: a GRU's first step
    from its zero state), so that factorizing it loses nothing."""
    matrix = tensor.reshape(-1, tensor.shape[-1]).double()
    return int(torch.linalg.matrix_rank(matrix)) <= rank


def assert_only_activations_factorized(model: nn.Module, loss_fn, inputs: list[torch.Tensor], options: dict):
    """At a lossy rank, every factorized tensor changes when the inputs change (none is computed
    from parameters and buffers alone), unless its factors hold it exactly. Changes ``inputs`` in place."""
    state = copy.deepcopy(model.state_dict())
    lossy = {**options, "rank": 2, "min_rank": 1}
    _, _, calls = one_step(model, loss_fn, lossy, spy=True)
    factorized = {
        key: call["tensor"].detach().clone() for key, call in _keyed(calls).items() if is_factorized(call["packed"])
    }
    assert factorized, "nothing was factorized: the check saw nothing"
    _perturb(inputs)
    model.load_state_dict(state)
    _, _, calls = one_step(model, loss_fn, lossy, spy=True)
    again = _keyed(calls)
    model.load_state_dict(state)
    constant = [
        key
        for key, value in factorized.items()
        if key in again
        and again[key]["tensor"].shape == value.shape
        and torch.equal(again[key]["tensor"], value)
        and not _rebuilt_exactly(value, lossy["rank"])
    ]
    assert constant == [], f"factorized tensors that do not depend on the input: {constant}"


# --- 1. Parametrizations and weights computed in forward ---------------------------------------------


class Symmetric(nn.Module):
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.triu() + weight.triu(1).transpose(-1, -2)


class LowRankProduct(nn.Module):
    """``W = U @ V`` with U and V slices of the original."""

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight[:, :8] @ weight[:8, :] / 8


def _parametrized(parametrization: nn.Module) -> nn.Module:
    layer = nn.Linear(WIDTH, WIDTH)
    parametrize.register_parametrization(layer, "weight", parametrization)
    return layer


def _old_weight_norm() -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated in favour of parametrizations.weight_norm
        return torch.nn.utils.weight_norm(nn.Linear(WIDTH, WIDTH))


def _randomly_pruned() -> nn.Module:
    layer = nn.Linear(WIDTH, WIDTH)
    prune.random_structured(layer, "weight", amount=0.3, dim=0)
    return layer


LINEAR_LAYERS = {
    "symmetric": lambda: _parametrized(Symmetric()),
    "low_rank_product": lambda: _parametrized(LowRankProduct()),
    "old_weight_norm": _old_weight_norm,
    "random_structured_pruning": _randomly_pruned,
}


class Residual(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layer(x)


class TiedTransformed(nn.Module):
    """One weight used twice, each time transformed: ``F.linear(x, 0.5 W)`` then ``F.linear(h, W.t() + 0.1)``."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(WIDTH, WIDTH)
        self.weight = nn.Parameter(torch.randn(WIDTH, WIDTH) / WIDTH**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(self.first(x), self.weight * 0.5), self.weight.t() + 0.1)


def linear_model(kind: str, cached: bool = False):
    torch.manual_seed(0)
    if kind == "tied_transformed":
        model = TiedTransformed().train()
    else:
        layers = [Residual(LINEAR_LAYERS[kind]()) for _ in range(2)]
        model = nn.Sequential(nn.Linear(WIDTH, WIDTH), *layers, nn.Linear(WIDTH, WIDTH)).train()
    x = low_rank()

    def loss_fn():
        if cached:
            with parametrize.cached():
                return model(x).pow(2).mean()
        return model(x).pow(2).mean()

    return model, loss_fn, [x]


WEIGHT_CASES = [
    *itertools.product([*LINEAR_LAYERS, "cached_symmetric"], modes("Residual")),
    *itertools.product(["tied_transformed"], modes()),
]


@pytest.mark.parametrize(("kind", "mode"), WEIGHT_CASES)
def test_parametrized_and_transformed_weights_are_never_factorized(kind, mode):
    options = modes("Residual")[mode]
    cached = kind == "cached_symmetric"
    model, loss_fn, inputs = linear_model("symmetric" if cached else kind, cached=cached)
    # Rank-4 input through linear layers: every activation is rebuilt exactly at rank 24, a weight is not.
    assert_lossless(model, loss_fn, options, rank=24)
    assert_only_activations_factorized(model, loss_fn, inputs, options)


class ConvBlock(nn.Module):
    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv
        self.norm = nn.BatchNorm2d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.relu(self.norm(self.conv(x)))


class Doubled(nn.Module):
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return 2.0 * weight


def _conv(kind: str) -> nn.Module:
    conv = nn.Conv2d(16, 16, 3, padding=1)
    if kind == "weight_norm":
        return parametrizations.weight_norm(conv)
    if kind == "spectral_norm":
        return parametrizations.spectral_norm(conv)
    parametrize.register_parametrization(conv, "weight", Doubled())
    return conv


def conv_model(kind: str):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), ConvBlock(_conv(kind)), ConvBlock(_conv(kind))).train()
    x = torch.randn(2, 3, 16, 16)
    return model, lambda: model(x).pow(2).mean(), [x]


CONV_CASES = [
    *itertools.product(["weight_norm", "doubled"], modes("ConvBlock")),
    # Layer mode is left out for spectral norm: its recompute reads the u, v its forward updated.
    *itertools.product(["spectral_norm"], ["default", "saved_by_none"]),
]


@pytest.mark.parametrize(("kind", "mode"), CONV_CASES)
def test_parametrized_convolutions(kind, mode):
    model, loss_fn, inputs = conv_model(kind)
    options = modes("ConvBlock")[mode]
    assert_lossless(model, loss_fn, options)
    assert_only_activations_factorized(model, loss_fn, inputs, options)


# --- 2. Mixed precision: trainable computed weights under autocast -------------------------------------


class EqualizedLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(WIDTH, WIDTH))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * WIDTH**-0.5)


class MergedLoRA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(WIDTH, WIDTH) / 8)
        self.lora_a = nn.Parameter(torch.randn(4, WIDTH) / 8)
        self.lora_b = nn.Parameter(torch.randn(WIDTH, 4) / 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight + self.lora_b @ self.lora_a)


def _trained_weight_norm() -> nn.Module:
    layer = parametrizations.weight_norm(nn.Linear(WIDTH, WIDTH))
    with torch.no_grad():
        layer.parametrizations.weight.original0.mul_(1.5)  # g != ||v||, as after training
    return layer


AUTOCAST_LAYERS = {
    "weight_norm": _trained_weight_norm,
    "old_weight_norm": _old_weight_norm,
    "spectral_norm": lambda: parametrizations.spectral_norm(nn.Linear(WIDTH, WIDTH)),
    "equalized_lr": EqualizedLinear,
    "merged_lora": MergedLoRA,
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("mode", ["default", "saved_by_none"])
@pytest.mark.parametrize("kind", list(AUTOCAST_LAYERS))
def test_trainable_computed_weights_under_autocast_are_never_factorized(kind, mode, dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH), AUTOCAST_LAYERS[kind](), nn.Linear(WIDTH, WIDTH)).train()
    x = low_rank()

    def loss_fn():
        with torch.autocast("cpu", dtype=dtype):
            return model(x).float().pow(2).mean()

    options = modes()[mode]
    assert_lossless(model, loss_fn, options)
    assert_only_activations_factorized(model, loss_fn, [x], options)


# --- 3. Odd inputs and odd training loops ---------------------------------------------------------------


class LinearBlock(nn.Module):
    """Keeps a low-rank input low-rank (LayerNorm adds at most two directions)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.inner = nn.Linear(WIDTH, WIDTH)
        self.out = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.out(self.inner(self.norm(x)))


def linear_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(WIDTH, WIDTH), LinearBlock(), LinearBlock(), nn.Linear(WIDTH, WIDTH)).train()


ODD_INPUTS = {
    "contiguous": lambda: low_rank(),
    "transposed": lambda: low_rank(batch=16, length=4).transpose(0, 1),
    "strided": lambda: low_rank(length=64)[:, ::2],
    "expanded": lambda: low_rank(batch=1).expand(4, -1, -1),
    "batch_of_one": lambda: low_rank(batch=1, length=64),
    "single_row": lambda: low_rank(batch=1, length=1),
    "empty_batch": lambda: low_rank(batch=0),
    "zeros": lambda: torch.zeros(4, 32, WIDTH),
    "constant": lambda: torch.full((4, 32, WIDTH), 3.0),
    "huge_values": lambda: low_rank() * 1e18,
    "tiny_values": lambda: low_rank() * 1e-20,
}


@pytest.mark.parametrize("mode", list(modes("LinearBlock")))
@pytest.mark.parametrize("kind", list(ODD_INPUTS))
def test_odd_inputs_are_rebuilt_exactly(kind, mode):
    model = linear_net()
    x = ODD_INPUTS[kind]().requires_grad_()
    assert_lossless(model, lambda: model(x).pow(2).sum() / max(x.numel(), 1), modes("LinearBlock")[mode], rank=20)


def test_a_nan_input_gives_the_uncompressed_gradients():
    model = linear_net()
    x = low_rank()
    x[1, 2, 3] = float("nan")
    expected, _, _ = one_step(model, lambda: model(x).pow(2).mean())
    for options in modes("LinearBlock").values():
        gradients, _, _ = one_step(model, lambda: model(x).pow(2).mean(), {**options, "rank": 2, "min_rank": 1})
        for name, value in expected.items():
            torch.testing.assert_close(gradients[name], value, equal_nan=True, msg=name)


@pytest.mark.parametrize("mode", list(modes("LinearBlock")))
def test_a_model_called_twice_in_one_forward(mode):
    model = linear_net()
    x = low_rank()
    assert_lossless(
        model,
        lambda: model(x).pow(2).mean() + model(x.flip(0) * 0.5).pow(2).mean(),
        modes("LinearBlock")[mode],
        rank=20,
    )


class Siamese(nn.Module):
    """A shared encoder run three times, once on its own output."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(LinearBlock(), LinearBlock())
        self.projection = nn.Linear(WIDTH, WIDTH)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        za, zb = self.projection(self.encoder(a)), self.projection(self.encoder(b))
        return (za * zb).sum(-1).mean() + self.encoder(za).pow(2).mean()


@pytest.mark.parametrize("mode", list(modes("LinearBlock")))
def test_a_shared_encoder(mode):
    torch.manual_seed(0)
    model = Siamese().train()
    a, b = low_rank(rank=2), low_rank(rank=2, seed=2)
    assert_lossless(model, lambda: model(a, b), modes("LinearBlock")[mode], rank=24)
    assert_only_activations_factorized(model, lambda: model(a, b), [a, b], modes("LinearBlock")[mode])


def _flat_gradients(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("mode", list(modes("LinearBlock")))
def test_accumulation_retain_graph_and_double_backward_are_exact(mode):
    # torch.autograd.grad (the gradient penalty) needs PyTorch's checkpoint in layer mode.
    options = {**modes("LinearBlock")[mode], "rank": 20, "min_rank": 1, "compress_recompute": False}
    model = linear_net()
    batches = [low_rank(), 2 * low_rank(rank=3, seed=2)]

    def compare(run):
        model.zero_grad(set_to_none=True)
        run(None)
        expected = _flat_gradients(model)
        model.zero_grad(set_to_none=True)
        run(ActivationCompressor(model, CompressionOptions(**options)))
        torch.testing.assert_close(_flat_gradients(model), expected, rtol=1e-4, atol=1e-6)

    def capture(compressor):
        return compressor.capture() if compressor is not None else torch.enable_grad()

    def accumulation(compressor):  # two micro-batches in one capture
        with capture(compressor):
            for x in batches:
                model(x).pow(2).mean().backward()

    def retained(compressor):
        with capture(compressor):
            loss = model(batches[0]).pow(2).mean()
        loss.backward(retain_graph=True)
        loss.backward()

    def gradient_penalty(compressor):
        x = batches[0].clone().requires_grad_()
        with capture(compressor):
            loss = model(x).pow(2).mean()
            (input_gradient,) = torch.autograd.grad(loss, x, create_graph=True)
            total = loss + input_gradient.pow(2).sum()
        total.backward()

    for run in (accumulation, retained, gradient_penalty):
        compare(run)


class NoGradBranch(nn.Module):
    """A target branch computed under ``torch.no_grad()`` inside the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        with torch.no_grad():
            target = self.b(h)
        return self.c(h * torch.sigmoid(target))


@pytest.mark.parametrize("mode", list(modes("Linear")))
def test_a_no_grad_region_inside_the_forward(mode):
    torch.manual_seed(0)
    model = NoGradBranch().train()
    x = low_rank()
    assert_lossless(model, lambda: model(x).pow(2).mean(), modes("Linear")[mode])
    assert_only_activations_factorized(model, lambda: model(x).pow(2).mean(), [x], modes("Linear")[mode])


class WritesAfterSaving(nn.Module):
    def __init__(self, where: str) -> None:
        super().__init__()
        self.first = nn.Linear(WIDTH, WIDTH)
        self.block = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH))
        self.where = where

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        y = self.block(h)
        if self.where == "saved_tensor":
            h.mul_(2)
        elif self.where == "view_of_saved_tensor":
            h[:, 0].zero_()
        else:
            x.add_(1)
        return y.pow(2).mean() + 0 * h.sum()


@pytest.mark.parametrize("rank", [1.0, 4])
@pytest.mark.parametrize("mode", list(modes("Sequential")))
@pytest.mark.parametrize("where", ["saved_tensor", "view_of_saved_tensor", "model_input"])
def test_an_in_place_write_after_saving_raises_pytorchs_error(where, mode, rank):
    torch.manual_seed(0)
    model = WritesAfterSaving(where).train()
    x = low_rank()
    with compress_activations(model, rank=rank, min_rank=1, **modes("Sequential")[mode]):
        loss = model(x)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


class ConvNormBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 3, padding=1)
        self.norm = nn.BatchNorm2d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.relu(self.norm(self.conv(x)))


@pytest.mark.parametrize("mode", list(modes("ConvNormBlock")))
def test_channels_last_images_with_batch_norm(mode):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), ConvNormBlock(), ConvNormBlock(), nn.Flatten(), nn.Linear(4096, 4)
    )
    model = model.train().to(memory_format=torch.channels_last)
    x = torch.randn(3, 3, 16, 16).to(memory_format=torch.channels_last)
    assert_lossless(model, lambda: model(x).pow(2).mean(), modes("ConvNormBlock")[mode])
    assert_only_activations_factorized(model, lambda: model(x).pow(2).mean(), [x], modes("ConvNormBlock")[mode])


# --- 4. torch.nn layers users reach for ---------------------------------------------------------------


class Attention(nn.Module):
    def __init__(self, cross: bool = False, **options) -> None:
        super().__init__()
        self.first = nn.Linear(WIDTH, WIDTH)
        kv = {"kdim": 32, "vdim": 48} if cross else {}
        self.attention = nn.MultiheadAttention(WIDTH, 4, batch_first=True, **kv, **options)
        self.cross = cross

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        if self.cross:
            out, weights = self.attention(h, h[..., :32], h[..., 16:])
            return out.pow(2).mean() + weights.mean()
        return self.attention(h, h, h, need_weights=False)[0].pow(2).mean()


class Encoder(nn.Module):
    def __init__(self, **options) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(WIDTH, 4, 2 * WIDTH, batch_first=True, **options)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padding = torch.zeros(x.shape[:2], dtype=torch.bool)
        padding[1, 20:] = True
        return self.encoder(x, src_key_padding_mask=padding).pow(2).mean()


class Recurrent(nn.Module):
    def __init__(self, cell: type[nn.Module], packed: bool = False, **options) -> None:
        super().__init__()
        self.first = nn.Linear(WIDTH, WIDTH)
        self.rnn = cell(WIDTH, WIDTH, batch_first=True, **options)
        self.packed = packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        if self.packed:
            h = nn.utils.rnn.pack_padded_sequence(h, torch.tensor([32, 20, 11, 5]), batch_first=True)
            return nn.utils.rnn.pad_packed_sequence(self.rnn(h)[0], batch_first=True)[0].pow(2).mean()
        return self.rnn(h)[0].pow(2).mean()


class SpatialTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 8, 3, padding=1)
        self.theta = nn.Linear(8, 6)
        self.out = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x)
        identity = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
        theta = self.theta(features.mean((2, 3))).view(-1, 2, 3) * 0.1 + identity
        grid = F.affine_grid(theta, list(features.shape), align_corners=False)
        return self.out(F.grid_sample(features, grid, align_corners=False)).pow(2).mean()


TORCH_LAYERS = {
    # name: (model, input, layer-mode block classes or None)
    "multihead_attention": (lambda: Attention(), lambda: low_rank(), None),
    "multihead_attention_bias_kv": (lambda: Attention(add_bias_kv=True, add_zero_attn=True), lambda: low_rank(), None),
    "multihead_cross_attention": (lambda: Attention(cross=True), lambda: low_rank(), "MultiheadAttention"),
    "transformer_encoder": (lambda: Encoder(), lambda: low_rank(), "TransformerEncoderLayer"),
    "transformer_encoder_norm_first": (
        lambda: Encoder(norm_first=True, activation="gelu"),
        lambda: low_rank(),
        "TransformerEncoderLayer",
    ),
    "lstm": (lambda: Recurrent(nn.LSTM, num_layers=2, dropout=0.1), lambda: low_rank(), "LSTM"),
    "lstm_projected": (lambda: Recurrent(nn.LSTM, proj_size=32), lambda: low_rank(), "LSTM"),
    "gru_bidirectional_packed": (lambda: Recurrent(nn.GRU, packed=True, bidirectional=True), lambda: low_rank(), "GRU"),
    "grid_sample": (SpatialTransformer, lambda: torch.randn(2, 3, 16, 16), "Conv2d"),
}
TORCH_LAYER_CASES = [
    (name, mode) for name, (_, _, blocks) in TORCH_LAYERS.items() for mode in modes(*([blocks] if blocks else []))
]


@pytest.mark.parametrize(("name", "mode"), TORCH_LAYER_CASES)
def test_torch_layers(name, mode):
    make_model, make_input, blocks = TORCH_LAYERS[name]
    torch.manual_seed(0)
    model = make_model().train()
    x = make_input()
    options = modes(*([blocks] if blocks else []))[mode]
    assert_lossless(model, lambda: model(x), options)
    assert_only_activations_factorized(model, lambda: model(x), [x], options)


VOCAB = 200


class TiedLanguageModel(nn.Module):
    def __init__(self, max_norm: float | None = None, through_matmul: bool = False) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, WIDTH, max_norm=max_norm)
        self.blocks = nn.Sequential(LinearBlock(), LinearBlock())
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)
        self.head.weight = self.embedding.weight
        self.through_matmul = through_matmul

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.blocks(self.embedding(ids))
        logits = hidden @ self.embedding.weight.T if self.through_matmul else self.head(hidden)
        return F.cross_entropy(logits.flatten(0, 1), ids.roll(-1, 1).flatten())


class Bag(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(VOCAB, WIDTH, mode=mode)
        self.head = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 4))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        offsets = torch.arange(0, ids.numel(), 8)
        weights = torch.linspace(0.1, 1.0, ids.numel()) if self.bag.mode == "sum" else None
        return self.head(self.bag(ids.flatten(), offsets, per_sample_weights=weights)).pow(2).mean()


EMBEDDINGS = {
    "tied_head": (lambda: TiedLanguageModel(), "LinearBlock"),
    "tied_matmul_head": (lambda: TiedLanguageModel(through_matmul=True), "LinearBlock"),
    "max_norm_tied_head": (lambda: TiedLanguageModel(max_norm=1.0), "LinearBlock"),
    "embedding_bag_mean": (lambda: Bag("mean"), None),
    "embedding_bag_max": (lambda: Bag("max"), None),
    "embedding_bag_sum": (lambda: Bag("sum"), None),
}
EMBEDDING_CASES = [
    (name, mode) for name, (_, blocks) in EMBEDDINGS.items() for mode in modes(*([blocks] if blocks else []))
]


@pytest.mark.parametrize(("name", "mode"), EMBEDDING_CASES)
def test_embeddings_and_tied_heads(name, mode):
    make_model, blocks = EMBEDDINGS[name]
    torch.manual_seed(0)
    model = make_model().train()
    ids = torch.randint(0, VOCAB, (16, 32))
    options = modes(*([blocks] if blocks else []))[mode]
    assert_lossless(model, lambda: model(ids), options)  # max_norm renormalises in place: restored between runs
    assert_only_activations_factorized(model, lambda: model(ids), [ids], options)


class HeadBeforeRenorm(nn.Module):
    """The tied weight is saved by the head, then ``Embedding(max_norm)`` renormalises it in place."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(VOCAB, WIDTH, max_norm=1.0)
        self.first = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        logits = self.first(x) @ self.embedding.weight.T
        return logits.logsumexp(-1).mean() + self.embedding(ids).pow(2).mean()


@pytest.mark.parametrize("rank", [1.0, 4])
@pytest.mark.parametrize("mode", ["default", "saved_by_none"])
def test_an_embedding_renorm_of_a_saved_weight_raises_pytorchs_error(mode, rank):
    torch.manual_seed(0)
    model = HeadBeforeRenorm().train()
    with torch.no_grad():
        model.embedding.weight.mul_(3)  # rows longer than max_norm
    with compress_activations(model, rank=rank, min_rank=1, **modes()[mode]):
        loss = model(torch.randn(4, 32, WIDTH), torch.randint(0, VOCAB, (4, 8)))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# --- 5. Tiny and degenerate shapes: no crash, finite gradients, for every method and rank --------------


class TanhBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b(torch.tanh(self.a(x)))


SHAPES = [(0, 4, 8), (1, 1, 8), (1, 2, 3), (2, 3, 1), (3, 70, 2), (1, 1, 70)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_tiny_shapes_never_crash(shape):
    configurations = [
        (rank, method, mode)
        for rank, method, mode in itertools.product(
            [1, 3, 0.5, 1.0, "auto"], ["sampled_qb", "randomized_svd", "truncated_svd"], ["saved_by_none", "layer"]
        )
        if rank != "auto" or method == "sampled_qb"
    ]
    for rank, method, mode in configurations:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(shape[-1], shape[-1]), TanhBlock(shape[-1]), TanhBlock(shape[-1])).train()
        options = modes("TanhBlock")[mode]
        with compress_activations(model, rank=rank, method=method, min_rank=1, factor_dtype="bfloat16", **options):
            loss = model(torch.randn(*shape)).pow(2).sum()
        loss.backward()
        assert torch.isfinite(_flat_gradients(model)).all(), (rank, method, mode)


# --- 6. Real models (slow): transformers audio models, timm CNNs in layer mode --------------------------


def _audio_config(config_class, **overrides):
    base = {
        "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
        "conv_dim": (16, 16), "conv_stride": (5, 2), "conv_kernel": (10, 3), "num_conv_pos_embeddings": 16,
        "num_conv_pos_embedding_groups": 4, "vocab_size": 16, "mask_time_prob": 0.0,
    }  # fmt: skip
    return config_class(**{**base, **overrides})


def _ctc(name: str, **overrides):
    def build():
        transformers = pytest.importorskip("transformers")
        model = getattr(transformers, f"{name}ForCTC")(
            _audio_config(getattr(transformers, f"{name}Config"), **overrides)
        )
        audio, labels = torch.randn(2, 4000), torch.randint(1, 16, (2, 10))
        return model, lambda: model(audio, labels=labels).loss, [audio, labels]

    return build


def _whisper():
    transformers = pytest.importorskip("transformers")
    config = transformers.WhisperConfig(
        d_model=32, encoder_layers=1, decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=50, max_target_positions=32,
        vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )  # fmt: skip
    model = transformers.WhisperForConditionalGeneration(config)
    features, labels = torch.randn(2, 16, 100), torch.randint(0, 100, (2, 12))
    return model, lambda: model(features, labels=labels).loss, [features, labels]


def _encodec():
    transformers = pytest.importorskip("transformers")
    config = transformers.EncodecConfig(
        hidden_size=16, num_filters=4, num_residual_layers=1, upsampling_ratios=[4, 2], codebook_size=32,
        codebook_dim=16, num_lstm_layers=1, audio_channels=1, sampling_rate=8000, norm_type="weight_norm",
    )  # fmt: skip
    model = transformers.EncodecModel(config)
    with torch.no_grad():  # the codebooks start at zero: the decoder would see no input at all
        for name, buffer in model.named_buffers():
            if name.endswith(("embed", "embed_avg")):
                buffer.normal_()
    audio = torch.randn(2, 1, 800)
    return model, lambda: model(audio).audio_values.pow(2).mean(), [audio]


def _dac():
    transformers = pytest.importorskip("transformers")
    config = transformers.DacConfig(
        encoder_hidden_size=4, downsampling_ratios=[2, 2], decoder_hidden_size=16, n_codebooks=2, codebook_size=32,
        codebook_dim=4, hidden_size=32, upsampling_ratios=[2, 2],
    )  # fmt: skip
    model = transformers.DacModel(config)
    audio = torch.randn(2, 1, 400)
    return model, lambda: model(audio).audio_values.pow(2).mean(), [audio]


AUDIO = {
    "hubert": (_ctc("Hubert"), "HubertEncoderLayer", ("default", "saved_by_none", "layer")),
    "sew": (_ctc("SEW", squeeze_factor=2), "SEWEncoderLayer", ("default", "saved_by_none", "layer")),
    "data2vec_audio": (
        _ctc("Data2VecAudio", num_conv_pos_embeddings=5, conv_pos_kernel_size=5),
        "Data2VecAudioEncoderLayer",
        ("default", "saved_by_none", "layer"),
    ),
    # Their position tables or biases (from a buffer or an embedding and the sequence length) are
    # factorized with saved_by=None and as block inputs: only the modes that hold are guarded.
    "wavlm": (_ctc("WavLM", num_buckets=32, max_bucket_distance=100), "WavLMEncoderLayer", ("default",)),
    "wav2vec2_conformer_relative": (
        _ctc("Wav2Vec2Conformer", position_embeddings_type="relative", conv_depthwise_kernel_size=7),
        "Wav2Vec2ConformerEncoderLayer",
        ("default", "layer"),
    ),
    "wav2vec2_conformer_rotary": (
        _ctc("Wav2Vec2Conformer", position_embeddings_type="rotary", conv_depthwise_kernel_size=7),
        "Wav2Vec2ConformerEncoderLayer",
        ("default",),
    ),
    "whisper": (_whisper, ["WhisperEncoderLayer", "WhisperDecoderLayer"], ("default", "saved_by_none", "layer")),
    "encodec_weight_norm": (_encodec, "EncodecResnetBlock", ("default", "saved_by_none", "layer")),
    "dac_weight_norm": (_dac, "DacResidualUnit", ("default", "saved_by_none", "layer")),
}
AUDIO_CASES = [(name, mode) for name, (_, _, held) in AUDIO.items() for mode in held]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "mode"), AUDIO_CASES)
def test_audio_models(name, mode):
    build, blocks, _ = AUDIO[name]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' notes on configs
        model, loss_fn, inputs = build()
        model.train()
        options = modes(*([blocks] if isinstance(blocks, str) else blocks))[mode]
        assert_lossless(model, loss_fn, options)
        assert_only_activations_factorized(model, loss_fn, inputs, options)


TIMM_MODELS = {
    "resnet26d": ["Bottleneck"],
    "seresnext26d_32x4d": ["Bottleneck"],
    "efficientnet_b0": ["InvertedResidual", "DepthwiseSeparableConv"],
    "mobilenetv3_small_050": ["InvertedResidual", "DepthwiseSeparableConv"],
    "convnext_atto": ["ConvNeXtBlock"],
    "regnetx_002": ["Bottleneck"],
    "resnetv2_50x1_bit": ["PreActBottleneck"],
    "nf_resnet26": ["NormFreeBlock"],
    "dla34": ["DlaBasic"],
}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["default", "layer"])
@pytest.mark.parametrize("name", list(TIMM_MODELS))
def test_timm_models_keep_gradients_and_batch_norm_statistics(name, mode):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=5).train()
    images, labels = torch.randn(2, 3, 32, 32), torch.tensor([0, 3])
    options = modes(*TIMM_MODELS[name])[mode]
    assert_lossless(model, lambda: F.cross_entropy(model(images), labels), options)
    assert_only_activations_factorized(model, lambda: F.cross_entropy(model(images), labels), [images], options)
