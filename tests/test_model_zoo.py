"""One test over real architectures, both modes: exact when lossless, finite when lossy, parameters never
factorized, the model left as it was.

Decoder-only (GPT-2, Llama) and encoder-decoder (T5) models run with a padding mask and the KV cache
on (transformers' default in training); the CNN uses in-place ReLUs; the routing module leaves
experts without tokens (empty activations); the LSTM saves its packed weights.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import flat_gradients, spy_on_pack, tiny_llama
from lit_models import saved_tensor_hooks_installed
from torch import nn

from loract_lightning import ActivationCompressor, CompressionOptions

pytestmark = pytest.mark.slow


def _padding_mask(batch: int, length: int) -> torch.Tensor:
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, length // 2 :] = 0
    return mask


def gpt2():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=500, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    ids, mask = torch.randint(0, 500, (2, 64)), _padding_mask(2, 64)
    return model, lambda: model(input_ids=ids, attention_mask=mask, labels=ids).loss, ["GPT2Block"]


def llama():
    model = tiny_llama(kv_heads=2, vocab=500)
    ids, mask = torch.randint(0, 500, (2, 64)), _padding_mask(2, 64)
    return model, lambda: model(input_ids=ids, attention_mask=mask, labels=ids).loss, ["LlamaDecoderLayer"]


def t5():
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(
        d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, vocab_size=500, decoder_start_token_id=0,
        pad_token_id=0,
    )  # fmt: skip
    model = transformers.T5ForConditionalGeneration(config)
    ids, mask, labels = torch.randint(1, 500, (2, 48)), _padding_mask(2, 48), torch.randint(1, 500, (2, 32))
    return model, lambda: model(input_ids=ids, attention_mask=mask, labels=labels).loss, ["T5Block"]


def distilbert():
    transformers = pytest.importorskip("transformers")
    config = transformers.DistilBertConfig(dim=64, hidden_dim=128, n_layers=2, n_heads=4, vocab_size=500, num_labels=3)
    model = transformers.DistilBertForSequenceClassification(config)
    ids, mask, labels = torch.randint(0, 500, (4, 64)), _padding_mask(4, 64), torch.tensor([0, 1, 2, 1])
    return model, lambda: model(input_ids=ids, attention_mask=mask, labels=labels).loss, ["TransformerBlock"]


def resnet():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", num_classes=10)
    images, labels = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    return model, lambda: F.cross_entropy(model(images), labels), ["BasicBlock"]


def vit():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=64, depth=2)
    images, labels = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))
    return model, lambda: F.cross_entropy(model(images), labels), ["Block"]


class Experts(nn.Module):
    """Top-1 routing: tokens go to the expert their gate scores highest; some experts get none."""

    def __init__(self, width: int = 64, count: int = 4) -> None:
        super().__init__()
        self.gate = nn.Linear(width, count)
        self.experts = nn.ModuleList(nn.Sequential(nn.Linear(width, 2 * width), nn.GELU()) for _ in range(count))
        self.down = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.gate(x).softmax(dim=-1)
        choice = weights.argmax(dim=-1)
        hidden = x.new_zeros(*x.shape[:-1], 2 * x.shape[-1])
        for index, expert in enumerate(self.experts):
            chosen = choice == index
            hidden = hidden.index_put((chosen,), expert(x[chosen]) * weights[chosen][:, index : index + 1])
        return x + self.down(hidden)


def mixture_of_experts():
    model = nn.Sequential(nn.Linear(32, 64), Experts(), Experts(), nn.Linear(64, 1))
    with torch.no_grad():
        model[1].gate.bias.copy_(torch.tensor([5.0, 5.0, -50.0, -50.0]))  # experts 2 and 3 stay idle
    x = torch.randn(8, 32, 32)
    # Layer mode on the experts, not the router: a recompute from a lossy input could route differently.
    return model, lambda: model(x).pow(2).mean(), ["*.experts.*"]


class Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(16, 64)
        self.lstm = nn.LSTM(64, 64, num_layers=2, batch_first=True)
        self.head = nn.Linear(64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(self.embed(x))[0]).pow(2).mean()


def lstm():
    model = Recurrent()
    x = torch.randn(8, 48, 16)
    return model, lambda: model(x), ["LSTM"]


ZOO = {f.__name__: f for f in (gpt2, llama, t5, distilbert, resnet, vit, mixture_of_experts, lstm)}


@pytest.fixture(params=list(ZOO), scope="module")
def zoo_model(request):
    torch.manual_seed(0)
    model, loss_fn, blocks = ZOO[request.param]()
    return model.train(), loss_fn, blocks


def _gradients(model: nn.Module, loss_fn, compressor: ActivationCompressor | None = None):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    if compressor is None:
        loss_fn().backward()
        return flat_gradients(model), None
    with compressor.capture() as stats:
        loss = loss_fn()
    loss.backward()
    return flat_gradients(model), stats


def _parameter_test(model: nn.Module):
    """A test for "shares memory with a parameter or buffer, or is a cast copy of one (any rank)",
    independent of the engine's own ParameterIndex."""
    tensors = [*model.parameters(), *model.buffers()]
    storages = {t.untyped_storage().data_ptr() for t in tensors if t.numel()}
    by_shape: dict[tuple, list[torch.Tensor]] = {}
    for tensor in tensors:
        if tensor.ndim >= 2:
            by_shape.setdefault(tuple(tensor.shape), []).append(tensor)
            by_shape.setdefault(tuple(tensor.T.shape), []).append(tensor.T)

    def is_parameter(tensor: torch.Tensor) -> bool:
        if tensor.untyped_storage().data_ptr() in storages:
            return True
        candidates = by_shape.get(tuple(tensor.shape), [])
        return any(torch.allclose(tensor.float(), p.float(), atol=1e-2, rtol=1e-2) for p in candidates)

    return is_parameter


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.named_buffers()}


def _restore_buffers(model: nn.Module, values: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(values[name])


def _model_state(model: nn.Module) -> dict:
    return {
        # Buffers are compared step by step above: BatchNorm's running statistics move in every step.
        "tensors": {name: value.detach().clone() for name, value in model.named_parameters()},
        "patched_forwards": [name for name, module in model.named_modules() if "forward" in module.__dict__],
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
    }


@pytest.mark.parametrize("mode", ["default", "layer"])
def test_model_zoo(zoo_model, mode):
    model, loss_fn, blocks = zoo_model
    # Every saved tensor, at any width and rank 1/8 as it is (no floor: these models are narrow),
    # so the engine meets everything these models save.
    options = {"min_bytes": 0, "min_width": 0, "min_rank": 1, "saved_by": None}
    options["checkpoint"] = blocks if mode == "layer" else ()
    before = _model_state(model)
    buffers_before = _buffers(model)
    expected, _ = _gradients(model, loss_fn)
    expected_buffers = _buffers(model)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' own notes on configs and caches
        _restore_buffers(model, buffers_before)
        lossless, _ = _gradients(model, loss_fn, ActivationCompressor(model, CompressionOptions(rank=1.0, **options)))
        # One step moves BatchNorm's statistics once, as without compression (a recompute must not).
        for name, value in _buffers(model).items():
            torch.testing.assert_close(value, expected_buffers[name], msg=f"buffer {name}")
        compressor = ActivationCompressor(model, CompressionOptions(rank=0.125, **options))
        calls = spy_on_pack(compressor)
        lossy, stats = _gradients(model, loss_fn, compressor)

    assert torch.allclose(lossless, expected, rtol=1e-4, atol=1e-6), "rank >= N must be exact"
    assert stats.compressed > 0 and torch.isfinite(lossy).all()
    is_parameter = _parameter_test(model)
    parameter_saves = [call for call in calls if is_parameter(call["tensor"])]
    factorized = [call["module"] for call in parameter_saves if not call["kept_raw"]]
    assert factorized == [], f"parameters factorized in {factorized}"
    if mode == "default":
        assert parameter_saves, "no parameter was saved: the check above saw nothing"

    after = _model_state(model)
    assert after["patched_forwards"] == before["patched_forwards"] and after["hooks"] == before["hooks"]
    assert all(torch.equal(after["tensors"][name], value) for name, value in before["tensors"].items())
    assert not saved_tensor_hooks_installed()
