"""Layer mode's ``mlp_chunk_tokens``: each block's MLP runs over chunks of tokens, each chunk
recomputed and backpropagated on its own, with the forward's dropout masks and exact gradients."""

from __future__ import annotations

import pytest
import torch
from conftest import flat_gradients, spy_on_pack, tiny_llama
from torch import nn

from loract_lightning import ActivationCompressor, CompressionOptions
from loract_lightning.token_chunks import select_mlps

LOSSLESS_LAYER_MODE = {"rank": 1.0, "min_rank": 1, "min_bytes": 0, "checkpoint": ["LlamaDecoderLayer"]}


def peft_llama(dropout: float) -> nn.Module:
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = tiny_llama(hidden=64, layers=2, intermediate=128)
    targets = ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
    lora = peft.LoraConfig(r=4, lora_dropout=dropout, target_modules=targets, init_lora_weights=False)
    return peft.get_peft_model(model, lora).train()


def loss_and_gradients(model: nn.Module, ids: torch.Tensor, options: dict | None = None, chunk_by_hand: int = 0):
    """Seeded loss and gradients: compressed with ``options``; plain without, its MLPs run over
    chunks of ``chunk_by_hand`` positions (no checkpoint) when that is > 0."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    mlps = [m for block in select_mlps({"": model}).values() for m in block.values()]
    if chunk_by_hand:
        for mlp in mlps:
            forward = mlp.forward
            mlp.forward = lambda x, f=forward: torch.cat([f(p) for p in x.split(chunk_by_hand, dim=-2)], dim=-2)
    try:
        if options is None:
            loss = model(input_ids=ids, labels=ids).loss
        else:
            with ActivationCompressor(model, CompressionOptions(**options)).capture():
                loss = model(input_ids=ids, labels=ids).loss
    finally:
        for mlp in mlps:
            mlp.__dict__.pop("forward", None)
    loss.backward()
    return loss.detach(), flat_gradients(model)


def test_the_mlps_of_checkpointed_blocks_are_found_by_class_name():
    model = peft_llama(dropout=0.0)
    blocks = {name: m for name, m in model.named_modules() if type(m).__name__ == "LlamaDecoderLayer"}
    found = select_mlps(blocks)
    assert sorted(found) == sorted(blocks)
    assert [list(mlps) for mlps in found.values()] == [[f"{name}.mlp"] for name in blocks]


@pytest.mark.filterwarnings("ignore:LoRAct compressed nothing")
@pytest.mark.parametrize("compress_recompute", [True, False])
def test_chunked_mlps_keep_the_forwards_dropout_masks_and_give_its_exact_gradients(compress_recompute):
    """With LoRA dropout the chunks draw their masks chunk by chunk: the loss and the gradients
    equal those of the same model with its MLPs run over the same chunks by hand, so both
    recomputes (the block's and each chunk's) reproduced the forward's masks."""
    model = peft_llama(dropout=0.3)
    ids = torch.randint(0, 1000, (2, 40))
    options = {**LOSSLESS_LAYER_MODE, "compress_recompute": compress_recompute, "mlp_chunk_tokens": 16}
    loss, chunked = loss_and_gradients(model, ids, options)
    expected_loss, expected = loss_and_gradients(model, ids, chunk_by_hand=8)  # 16 rows over a batch of 2
    _, whole = loss_and_gradients(model, ids)
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(chunked, expected)
    assert (chunked - whole).norm() > 1e-3 * whole.norm()  # other masks: the comparison can fail


@pytest.mark.filterwarnings("ignore:LoRAct compressed nothing")
def test_without_dropout_chunked_mlps_give_the_uncompressed_gradients():
    model = peft_llama(dropout=0.0)
    ids = torch.randint(0, 1000, (3, 50))
    loss, chunked = loss_and_gradients(model, ids, {**LOSSLESS_LAYER_MODE, "mlp_chunk_tokens": 20})
    expected_loss, expected = loss_and_gradients(model, ids)
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(chunked, expected)


def test_the_blocks_recompute_keeps_only_the_mlps_input_chunks_and_each_chunk_runs_three_times():
    """The block's compressed recompute sees nothing the MLP saves (the chunks' checkpoints hold
    it); each chunk runs in the forward, the block's recompute and its own recompute."""
    model = peft_llama(dropout=0.1)
    ids = torch.randint(0, 1000, (1, 64))
    options = CompressionOptions(checkpoint=["LlamaDecoderLayer"], mlp_chunk_tokens=16, min_bytes=0, rank=8, min_rank=1)
    compressor = ActivationCompressor(model, options)
    calls = spy_on_pack(compressor, recompute=True)
    rows: list[int] = []
    handle = model.base_model.model.model.layers[0].mlp.gate_proj.register_forward_pre_hook(
        lambda module, args: rows.append(args[0].shape[-2])
    )
    with compressor.capture():
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    handle.remove()
    assert rows[:4] == [8, 3, 3, 2]  # the check, once: 8 positions whole, then in uneven chunks
    assert rows[4:] == [16] * 12  # 4 chunks, 3 times
    in_mlps = [c for c in calls if c["recomputing"] is not None and ".mlp" in c["module"]]
    # What the block's recompute saves inside its MLP: each chunk's input, raw, and nothing else.
    assert [c["module"].rsplit(".", 2)[-2:] for c in in_mlps] == [["1", "mlp"]] * 4 + [["0", "mlp"]] * 4
    assert all(c["kept_raw"] and c["tensor"].shape == (1, 16, 64) for c in in_mlps)
    assert any(c["recomputing"] is not None and "self_attn" in c["module"] for c in calls)


def test_short_inputs_run_whole():
    model = peft_llama(dropout=0.1)
    ids = torch.randint(0, 1000, (1, 16))
    rows: list[int] = []
    gate = model.base_model.model.model.layers[0].mlp.gate_proj
    gate.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[-2]))
    options = CompressionOptions(checkpoint=["LlamaDecoderLayer"], mlp_chunk_tokens=16, min_bytes=0)
    with ActivationCompressor(model, options).capture():
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert rows == [16, 16]  # forward and the block's recompute, one piece each, no check


class MixingMLP(nn.Module):
    """Named like an MLP, but mixes tokens: subtracts the mean over the sequence."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.proj(x)
        return hidden - hidden.mean(dim=-2, keepdim=True)


class BatchNormMLP(nn.Module):
    """An MLP with BatchNorm over all tokens (LeViT-like): token-wise only in eval mode."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(width, width)
        self.norm = nn.BatchNorm1d(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.proj(x)
        return self.norm(hidden.flatten(0, -2)).view_as(hidden)


class Block(nn.Module):
    def __init__(self, mlp: nn.Module, width: int = 32) -> None:
        super().__init__()
        self.mlp = mlp
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.out(self.mlp(x))


@pytest.mark.parametrize("mlp_class", [MixingMLP, BatchNormMLP])
def test_an_mlp_that_mixes_tokens_runs_whole_with_a_warning(mlp_class):
    torch.manual_seed(0)
    model = nn.Sequential(Block(mlp_class(32)), Block(mlp_class(32))).train()
    x = torch.randn(2, 40, 32)
    options = CompressionOptions(rank=1.0, min_rank=1, min_bytes=0, checkpoint=["Block"], mlp_chunk_tokens=8)

    def gradients(compressor: ActivationCompressor | None) -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        with compressor.capture() if compressor else torch.enable_grad():
            loss = model(x).pow(2).mean()
        loss.backward()
        return flat_gradients(model)

    buffers_before = [b.clone() for b in model.buffers()]
    expected = gradients(None)
    buffers_once = [b.clone() for b in model.buffers()]
    for buffer, value in zip(model.buffers(), buffers_before, strict=True):
        buffer.copy_(value)
    with pytest.warns(UserWarning, match=r"'0.mlp' \(" + mlp_class.__name__ + r"\) does not act on each token"):
        compressed = gradients(ActivationCompressor(model, options))
    torch.testing.assert_close(compressed, expected)
    for buffer, value in zip(model.buffers(), buffers_once, strict=True):
        torch.testing.assert_close(buffer, value)  # BatchNorm's statistics moved once, as without LoRAct


@pytest.mark.parametrize("bad", [0, -4, 2.5, True, "1024"])
def test_a_bad_chunk_size_is_refused_by_name(bad):
    with pytest.raises(ValueError, match=rf"mlp_chunk_tokens must be None or an int >= 1, got {bad!r}"):
        CompressionOptions(mlp_chunk_tokens=bad)
