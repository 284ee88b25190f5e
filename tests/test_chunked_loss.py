"""The chunked causal-LM loss equals the plain one, in value and gradients."""

from __future__ import annotations

import re

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


VOCAB = 128
SIZE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
LLAMA_LIKE = dict(SIZE, intermediate_size=64, num_key_value_heads=2)
SOFT_CAP = dict(LLAMA_LIKE, head_dim=8, final_logit_softcapping=0.5)
# family: (config class, model class, config values). The logit transforms get values far from
# their defaults (a cap the tiny logits reach), so that skipping one would change the loss visibly.
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", LLAMA_LIKE),
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", dict(LLAMA_LIKE, tie_word_embeddings=True)),
    "mistral": ("MistralConfig", "MistralForCausalLM", LLAMA_LIKE),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", LLAMA_LIKE),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(LLAMA_LIKE, head_dim=8)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(LLAMA_LIKE, head_dim=8)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", SOFT_CAP),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", SOFT_CAP),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", LLAMA_LIKE),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", dict(SIZE, intermediate_size=64, hidden_dropout=0.1)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(SIZE, ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=64)),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(LLAMA_LIKE, logit_scale=4.0)),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(LLAMA_LIKE, logits_scaling=0.25)),
    "granitemoe": (
        "GraniteMoeConfig",
        "GraniteMoeForCausalLM",
        dict(LLAMA_LIKE, logits_scaling=0.25, num_local_experts=2, num_experts_per_tok=1),
    ),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", LLAMA_LIKE),
}


def tiny_causal_lm(family: str, **overrides: object):
    """A small randomly initialised transformers causal LM of ``family`` (a key of FAMILIES), in train mode;
    ``overrides`` go to its config."""
    transformers = pytest.importorskip("transformers")
    config_class, model_class, values = FAMILIES[family]
    special = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # inside the small vocabulary
    config = getattr(transformers, config_class)(vocab_size=VOCAB, **special, **{**values, **overrides})
    return getattr(transformers, model_class)(config).train()


def loss_and_gradients(loss_fn, parameters):
    torch.manual_seed(1)  # the same dropout masks for both losses (GPT-2's, GPT-NeoX's and OPT's)
    loss = loss_fn()
    return loss, torch.autograd.grad(loss, parameters)


@pytest.mark.parametrize("family", [*FAMILIES, "peft_lora"])
def test_causal_lm_loss_equals_each_family_s_own_loss(family):
    """Every post-head logit transform (Gemma's soft cap, Granite's and Cohere's scales) is reproduced,
    and the once-per-model self-check leaves the random numbers alone (the dropout masks stay equal)."""
    torch.manual_seed(0)
    if family == "peft_lora":  # LoRA, a trained copy of the head, and Granite's logit scale after it
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(
            tiny_causal_lm("granite"),
            peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"], lora_dropout=0.0),
        )
    else:
        model = tiny_causal_lm(family)
    ids = torch.randint(0, VOCAB, (2, 16))
    labels = ids.clone()
    labels[1, 12:] = -100
    trainable = [p for p in model.parameters() if p.requires_grad]
    expected, expected_grads = loss_and_gradients(lambda: model(input_ids=ids, labels=labels).loss, trainable)
    loss, grads = loss_and_gradients(lambda: causal_lm_loss(model, ids, labels, chunk_tokens=5), trainable)
    assert torch.allclose(loss, expected, rtol=1e-5), (loss, expected)
    for got, want in zip(grads, expected_grads, strict=True):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6), (got - want).abs().max()
    assert all(module.training for module in model.modules())  # the self-check's eval mode is undone


@pytest.mark.parametrize("method", ["PromptTuningConfig", "PrefixTuningConfig"])
def test_peft_prompt_learning_is_refused(method):
    peft = pytest.importorskip("peft")
    config = getattr(peft, method)(task_type="CAUSAL_LM", num_virtual_tokens=4, modules_to_save=["lm_head"])
    model = peft.get_peft_model(tiny_causal_lm("llama"), config)
    ids = torch.randint(0, VOCAB, (2, 16))
    with pytest.raises(ValueError, match=r"peft PR\w+_TUNING \(its virtual tokens .*labels=\.\.\.\)\.loss$"):
        causal_lm_loss(model, ids, ids)


@pytest.mark.parametrize("case", ["doubled_logits", "unshifted_loss", "router_loss"])
def test_a_model_whose_forward_does_something_unknown_is_refused(case):
    """Logits doubled by a subclass (found by the self-check), BART's causal LM whose loss does not
    shift the labels (found by the self-check), a MoE's router loss (refused from its config)."""
    transformers = pytest.importorskip("transformers")

    class DoubledLogits(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    torch.manual_seed(0)
    if case == "doubled_logits":
        model, message = DoubledLogits(tiny_causal_lm("llama").config).train(), "DoubledLogits's logits"
    elif case == "unshifted_loss":
        config = transformers.BartConfig(
            vocab_size=VOCAB, d_model=32, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=64
        )
        model, message = transformers.BartForCausalLM(config).train(), "BartForCausalLM's loss"
    else:
        model = tiny_causal_lm("granitemoe", output_router_logits=True)
        message = "GraniteMoeForCausalLM's loss (output_router_logits adds a loss term)"
    ids = torch.randint(0, VOCAB, (2, 16))
    state = torch.random.get_rng_state()
    with pytest.raises(ValueError, match=re.escape(message) + r".*; use model\(\.\.\., labels=\.\.\.\)\.loss$"):
        causal_lm_loss(model, ids, ids)
    assert torch.equal(torch.random.get_rng_state(), state)  # the check drew no random numbers
    assert all(module.training for module in model.modules())  # and left train mode on
