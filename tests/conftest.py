"""Small real models for the tests: a network with known activation ranks, Llama, BERT and ViT."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from loract_lightning import ActivationCompressor, CompressionOptions
from loract_lightning.linalg import relative_error
from loract_lightning.packed import LowRankFactors, PackedTensor, RawTensor

KNOWN_INPUT_RANK = 2
# Rank of the largest saved activation in KnownRankNet: block 2 squares a rank-8 tensor.
KNOWN_MAX_RANK = 36


class KnownRankBlock(nn.Module):
    """up -> square -> down: every activation it saves has rank bounded by its input's rank.

    For an input of rank r the saved tensors are the input (r), ``up``'s output (r + 1, bias)
    and its square (at most (r + 1)(r + 2) / 2: a Hadamard square); the output has rank <= that + 1.
    """

    def __init__(self, width: int) -> None:
        super().__init__()
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.up(x)
        return self.down(hidden * hidden) / hidden.shape[-1]


class KnownRankNet(nn.Module):
    """Two KnownRankBlocks and a dropout whose mask must be the same with and without compression."""

    def __init__(self, width: int = 128, dropout: float = 0.1) -> None:
        super().__init__()
        self.blocks = nn.Sequential(KnownRankBlock(width), KnownRankBlock(width))
        self.dropout = nn.Dropout(dropout)
        # A buffer, not a parameter: multiplying by a parameter would save the full-rank dropout output.
        self.register_buffer("readout", torch.randn(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The final reduction saves nothing large, so every large saved tensor has known rank
        # except the dropout mask (two-valued, stored exactly).
        return (self.dropout(self.blocks(x)) * self.readout).sum() / x.shape[0]

    @staticmethod
    def make_input(batch: int = 4, length: int = 128, width: int = 128, seed: int = 0) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        coefficients = torch.randn(batch, length, KNOWN_INPUT_RANK, generator=generator)
        basis = torch.randn(KNOWN_INPUT_RANK, width, generator=generator)
        return coefficients @ basis


def flat_gradients(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def run_and_backward(model: nn.Module, loss_fn, seed: int = 0, **compress_options):
    """Seeded forward + backward, compressed when options are given; returns (gradients, stats)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    stats = None
    if compress_options:
        # A compressor of its own, so that its columns are drawn from a fresh generator (seeded
        # runs compare), where successive compress_activations calls would draw new ones.
        compressor = ActivationCompressor(model, CompressionOptions(**compress_options))
        with compressor.capture() as stats:
            loss = loss_fn()
    else:
        loss = loss_fn()
    loss.backward()
    return flat_gradients(model), stats


def tiny_llama(
    hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 4, vocab: int = 1000, intermediate: int = 0,
    **config: object,
):  # fmt: skip
    """A small randomly initialised transformers ``LlamaForCausalLM`` in train mode (seed it first);
    ``intermediate`` 0 means twice ``hidden``; ``config`` goes to ``LlamaConfig``."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate or 2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab, **config,
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config).train()


def is_factorized(packed: object) -> bool:
    """Whether a pack result holds low-rank factors (not a raw tensor, not an exact mask)."""
    return isinstance(packed, PackedTensor) and isinstance(packed.region, LowRankFactors)


def record_errors(compressor: ActivationCompressor) -> list[float]:
    """The relative error of every factorization the compressor makes from now on, in order."""
    errors = []
    compressor.observers.append(lambda name, matrix, left, right: errors.append(relative_error(matrix, left, right)))
    return errors


def spy_on_pack(compressor: ActivationCompressor, recompute: bool = False) -> list[dict]:
    """Record, for every pack call of the forward (and with ``recompute`` of each block's
    compressed recompute in backward), which module ran, what the hook returned and whether it
    kept the tensor raw."""
    calls = []
    start_forward = compressor._start_forward

    def start_spied_forward(*args, **kwargs):
        forward = start_forward(*args, **kwargs)
        if forward.recomputing is not None and not recompute:
            return forward
        pack = forward.pack

        def spied_pack(tensor):
            packed = pack(tensor)
            calls.append(
                {
                    "module": forward.module_stack[-1] if forward.module_stack else "",
                    "recomputing": forward.recomputing,  # the block whose recompute saved it, or None
                    "tensor": tensor,
                    "packed": packed,
                    # Kept raw: the hook kept the tensor itself, detached (same memory, same view).
                    "kept_raw": isinstance(packed, RawTensor)
                    and packed.tensor.data_ptr() == tensor.data_ptr()
                    and packed.tensor.stride() == tensor.stride(),
                }
            )
            return packed

        forward.pack = spied_pack
        return forward

    compressor._start_forward = start_spied_forward
    return calls


REPORT: list[str] = []
"""Lines that tests add to the end-of-run summary (figures worth reading, such as cosine similarities)."""


def pytest_terminal_summary(terminalreporter) -> None:
    if REPORT:
        terminalreporter.section("loract figures")
        for line in REPORT:
            terminalreporter.write_line(line)


@pytest.fixture
def known_rank_net() -> KnownRankNet:
    torch.manual_seed(0)
    return KnownRankNet().train()


@pytest.fixture(scope="module")
def llama():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=32000,
        max_position_embeddings=256,
        attn_implementation="sdpa",
    )
    model = transformers.LlamaForCausalLM(config).train()
    ids = torch.randint(0, config.vocab_size, (2, 256))
    return model, lambda: model(input_ids=ids, labels=ids).loss, ["LlamaDecoderLayer"]


@pytest.fixture(scope="module")
def bert():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        hidden_size=384,
        num_hidden_layers=2,
        num_attention_heads=12,
        intermediate_size=1536,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        num_labels=3,
        attn_implementation="sdpa",
    )
    model = transformers.BertForSequenceClassification(config).train()
    ids = torch.randint(0, config.vocab_size, (8, 128))
    labels = torch.randint(0, 3, (8,))
    return model, lambda: model(input_ids=ids, labels=labels).loss, ["BertLayer"]


@pytest.fixture(scope="module")
def vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=112).train()
    # Smooth images (upsampled 8x8 noise), like real photos, rather than white noise.
    images = F.interpolate(torch.randn(32, 3, 8, 8), size=112, mode="bilinear")
    labels = torch.randint(0, 10, (32,))
    return model, lambda: F.cross_entropy(model(images), labels), ["Block"]


@pytest.fixture(params=["llama", "bert", "vit"])
def real_model(request):
    """(name, model, loss_fn, block class names) for each real model."""
    model, loss_fn, blocks = request.getfixturevalue(request.param)
    return request.param, model, loss_fn, blocks
