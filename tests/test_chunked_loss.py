"""The chunked causal-LM loss equals the plain one, in value and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama
from torch import nn

from loract_lightning import causal_lm_loss, chunked_cross_entropy, compress_activations


def test_chunked_cross_entropy_equals_the_plain_loss_and_its_gradients():
    torch.manual_seed(0)
    head = nn.Linear(32, 500)
    hidden = torch.randn(3, 50, 32, requires_grad=True)
    labels = torch.randint(0, 500, (3, 50))
    labels[0, :7] = -100  # padding does not count
    plain = F.cross_entropy(head(hidden).flatten(0, 1), labels.flatten(), ignore_index=-100)
    plain_grads = torch.autograd.grad(plain, [hidden, head.weight, head.bias])
    chunked = chunked_cross_entropy(hidden, head, labels, chunk_tokens=16)  # 150 tokens: a ragged last chunk
    chunked_grads = torch.autograd.grad(chunked, [hidden, head.weight, head.bias])
    assert torch.allclose(chunked, plain, rtol=1e-6)
    for got, expected in zip(chunked_grads, plain_grads, strict=True):
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_no_chunk_of_logits_outlives_its_step():
    """Forward saves only each chunk's inputs (hidden states and targets), never a chunk's logits."""
    head = nn.Linear(32, 500)
    hidden = torch.randn(256, 32, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        chunked_cross_entropy(hidden, head, torch.randint(0, 500, (256,)), chunk_tokens=64)
    assert {shape for shape in saved if shape} == {(64,), (64, 32)}, saved  # no (tokens, 500) logits kept


def test_bad_chunk_size_and_shapes_are_refused():
    head = nn.Linear(8, 10)
    with pytest.raises(ValueError, match="chunk_tokens must be an int >= 1, got 0"):
        chunked_cross_entropy(torch.randn(4, 8), head, torch.zeros(4, dtype=torch.long), chunk_tokens=0)
    with pytest.raises(ValueError, match="labels must have the shape"):
        chunked_cross_entropy(torch.randn(4, 8), head, torch.zeros(5, dtype=torch.long))


@pytest.mark.parametrize("lora", [False, True], ids=["full", "peft_lora"])
def test_causal_lm_loss_equals_transformers_loss(lora):
    torch.manual_seed(0)
    model = tiny_llama(kv_heads=2, vocab=700, use_cache=False)
    if lora:
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    ids = torch.randint(0, 700, (2, 40))
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    trainable = [p for p in model.parameters() if p.requires_grad]
    expected = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    expected_grads = torch.autograd.grad(expected, trainable)
    loss = causal_lm_loss(model, ids, labels, chunk_tokens=24, attention_mask=mask)
    grads = torch.autograd.grad(loss, trainable)
    assert torch.allclose(loss, expected, rtol=1e-5)
    assert all(torch.allclose(g, e, rtol=1e-4, atol=1e-6) for g, e in zip(grads, expected_grads, strict=True))
    # Under LoRAct at a rank >= N (nothing factorized) it is unchanged.
    with compress_activations(model, rank=1.0, min_bytes=0):
        again = causal_lm_loss(model, ids, labels, chunk_tokens=24, attention_mask=mask)
    assert torch.allclose(again, expected, rtol=1e-5)
