"""QLoRA: LoRA adapters on quantized, frozen base weights (torchao int8 and NF4, bitsandbytes 4
and 8 bit). The capture must start (torchao's weights have no plain storage to index) and
nothing of a quantized weight may be factorized, not even the plain copy that its linear
dequantizes and autograd saves."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import flat_gradients, is_factorized, spy_on_pack
from torch import nn

from loract_lightning import ActivationCompressor, CompressionOptions

WIDTH = 256


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.lora_a = nn.Linear(WIDTH, 8, bias=False)
        self.lora_b = nn.Linear(8, WIDTH, bias=False)
        nn.init.normal_(self.lora_b.weight, std=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_b(self.lora_a(x))


def torchao_int8(base: nn.Linear) -> nn.Module:
    quantization = pytest.importorskip("torchao.quantization")
    quantization.quantize_(base, quantization.Int8WeightOnlyConfig())
    return base


def torchao_nf4(base: nn.Linear) -> nn.Module:
    nf4 = pytest.importorskip("torchao.quantization.quantize_.workflows.nf4.nf4_tensor")

    class NF4Linear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(nf4.to_nf4(base.weight.detach()), requires_grad=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nf4.linear_nf4(x, self.weight)

    return NF4Linear()


def bitsandbytes_layer(bits: int):
    def quantize(base: nn.Linear) -> nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            bnb = pytest.importorskip("bitsandbytes")
        if bits == 4:
            layer = bnb.nn.Linear4bit(WIDTH, WIDTH, bias=True)
        else:
            layer = bnb.nn.Linear8bitLt(WIDTH, WIDTH, bias=True, has_fp16_weights=False)
        layer.load_state_dict(base.state_dict())
        return layer.to("cpu")  # quantizes the weight

    return quantize


QUANTIZERS = {
    "torchao_int8": torchao_int8,
    "torchao_nf4": torchao_nf4,
    "bitsandbytes_4bit": bitsandbytes_layer(4),
    "bitsandbytes_8bit": bitsandbytes_layer(8),
}


@pytest.mark.parametrize("name", list(QUANTIZERS))
def test_lora_on_a_quantized_base_is_exact_where_the_activations_are_low_rank(name):
    torch.manual_seed(0)
    bases = [QUANTIZERS[name](nn.Linear(WIDTH, WIDTH).requires_grad_(False)) for _ in range(2)]
    model = nn.Sequential(nn.Linear(WIDTH, WIDTH), LoRALinear(bases[0]), LoRALinear(bases[1])).train()
    generator = torch.Generator().manual_seed(1)  # rank 4: every activation is exact at rank 16
    x = torch.randn(8, 64, 4, generator=generator) @ torch.randn(4, WIDTH, generator=generator)
    model(x).pow(2).mean().backward()
    expected = flat_gradients(model)

    model.zero_grad(set_to_none=True)
    compressor = ActivationCompressor(model, CompressionOptions(rank=16, min_bytes=0, saved_by=None))
    calls = spy_on_pack(compressor)
    with compressor.capture():
        loss = model(x).pow(2).mean()
    loss.backward()
    factorized = [tuple(call["tensor"].shape) for call in calls if is_factorized(call["packed"])]
    assert factorized and (WIDTH, WIDTH) not in factorized, factorized
    torch.testing.assert_close(flat_gradients(model), expected)
