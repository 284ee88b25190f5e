"""A causal-LM loss whose tokens x vocabulary logits never exist all at once.

A language model's loss is usually the largest thing a training step saves: for a b8 s512 batch
over a 49152-token vocabulary the float32 log-probabilities alone are 805 MB, and in backward
the logits' gradient and the log-softmax's input gradient exist beside them (about three
tokens x vocab tensors at once), whatever else is compressed. Here the LM head and the
cross-entropy run over chunks of tokens, each chunk under activation checkpointing: forward
keeps only the chunk's hidden states (a view of the input, so nothing new), and backward
recomputes one chunk's logits at a time. The result and its gradients equal the plain loss up
to float rounding (the sum is taken chunk by chunk).

    loss = chunked_cross_entropy(hidden_states, lm_head, labels)   # labels already shifted
    loss = causal_lm_loss(model, input_ids, labels=input_ids)      # a transformers causal LM
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from loract_lightning.checks import check_int

IGNORE_INDEX = -100
"""Label of a token that does not count (padding), as in transformers and F.cross_entropy."""


def chunked_cross_entropy(
    hidden_states: Tensor,
    head: Callable[[Tensor], Tensor],
    labels: Tensor,
    chunk_tokens: int = 1024,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Mean cross-entropy of ``head(hidden_states)`` against ``labels``, ``chunk_tokens`` tokens at a time.

    Args:
        hidden_states: (..., hidden) inputs of the LM head, one row per token.
        head: the LM head (an ``nn.Linear`` or any function of the hidden states to logits).
        labels: (...) target ids, aligned with ``hidden_states`` (shift them first for a causal
            LM); ``ignore_index`` marks tokens that do not count.
        chunk_tokens: tokens per chunk; the logits of one chunk (chunk_tokens x vocab) are the
            most that exists at once, in forward and in backward.
        ignore_index: label of tokens left out of the mean.

    Returns:
        The mean loss over the counted tokens (NaN when none counts, as ``F.cross_entropy``).
    """
    check_int("chunk_tokens", chunk_tokens, minimum=1)
    if hidden_states.shape[:-1] != labels.shape:
        raise ValueError(
            f"labels must have the shape of hidden_states without its last dim: "
            f"{tuple(labels.shape)} vs {tuple(hidden_states.shape)}"
        )
    rows = hidden_states.reshape(-1, hidden_states.shape[-1])
    targets = labels.reshape(-1)
    total = rows.new_zeros((), dtype=torch.float32)
    for start in range(0, rows.shape[0], chunk_tokens):
        chunk, chunk_targets = rows[start : start + chunk_tokens], targets[start : start + chunk_tokens]
        total = total + checkpoint(_summed_loss, head, chunk, chunk_targets, ignore_index, use_reentrant=False)
    return total / (targets != ignore_index).sum()


def _summed_loss(head: Callable[[Tensor], Tensor], rows: Tensor, targets: Tensor, ignore_index: int) -> Tensor:
    logits = head(rows).float()
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")


def causal_lm_loss(
    model: nn.Module, input_ids: Tensor, labels: Tensor, chunk_tokens: int = 1024, **model_kwargs
) -> Tensor:
    """The loss ``model(input_ids, labels=labels).loss`` of a transformers causal LM, computed in chunks.

    Runs the model's decoder (``get_decoder()``; through peft's ``PeftModel`` too), then
    :func:`chunked_cross_entropy` over its output embeddings (``get_output_embeddings()``) and the
    logit transforms transformers' causal LMs apply after the head (the soft cap of Gemma 2/3 and
    others, the scales of Granite, Cohere and FalconH1), with the labels shifted by one as
    transformers does. ``model_kwargs`` (``attention_mask``, ...) go to the decoder.

    The first call on a model object compares this with the model's own forward on the first (up to
    8) tokens of ``input_ids``, its logits and its loss, in eval mode and without consuming random
    numbers. A model that changes them in a way this function does not reproduce (another logit
    transform, a MoE router loss, peft prompt learning's virtual tokens) gets a ValueError rather
    than a different loss: use ``model(..., labels=...).loss`` for it.
    """
    peft_config = getattr(model, "active_peft_config", None)
    if peft_config is not None and peft_config.is_prompt_learning:
        raise _cannot(f"peft {peft_config.peft_type.value}", "its virtual tokens are not in input_ids")
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = type(causal_lm).__name__
    for flag in ("output_router_logits", "z_loss_coefficient"):  # loss terms (MoE, Bamba) too small for the check
        if getattr(causal_lm.config, flag, None) or model_kwargs.get(flag):
            raise _cannot(f"{name}'s loss", f"{flag} adds a loss term")
    decoder, head = causal_lm.get_decoder(), causal_lm.get_output_embeddings()
    if decoder is None or head is None:
        raise ValueError(f"{name} has no decoder/output embeddings to chunk the loss over")
    head = _with_logit_transforms(head, causal_lm.config)
    if model not in _reproduced:
        prefix = input_ids.reshape(-1, input_ids.shape[-1])[:1, :8]
        _check_against_the_model(model, name, decoder, head, prefix)
        _reproduced[model] = True
    hidden_states = decoder(input_ids=input_ids, **model_kwargs)[0]
    return chunked_cross_entropy(hidden_states, head, _shift(labels), chunk_tokens)


_reproduced: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()
"""The models whose own logits and loss causal_lm_loss has checked it reproduces (once per model object)."""


def _shift(labels: Tensor) -> Tensor:
    return F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)  # token t predicts label t + 1


def _with_logit_transforms(head: nn.Module, config: object) -> Callable[[Tensor], Tensor]:
    """``head`` followed by what transformers' (5.x) ``*ForCausalLM.forward`` does to its output."""
    divisor = getattr(config, "logits_scaling", None)  # Granite family; MiniCPM3 (divides the bias-free head's input)
    factor = getattr(config, "logit_scale", None) or getattr(config, "lm_head_multiplier", None)  # Cohere; FalconH1
    if getattr(config, "model_type", None) == "hyperclovax":  # the one model that multiplies by logits_scaling
        divisor, factor = None, divisor
    cap = (
        getattr(config, "final_logit_softcapping", None)  # Gemma 2, 3, 3n, 4, VaultGemma, NanoChat
        or getattr(config, "logits_soft_cap", None)  # RecurrentGemma
        or getattr(config, "output_logit_soft_cap", None)  # xLSTM
    )
    if divisor is None and factor is None and cap is None:
        return head

    def transformed(rows: Tensor) -> Tensor:
        logits = head(rows)  # the models' operations in their order, so the rounding is theirs too
        logits = logits if divisor is None else logits / divisor
        logits = logits if factor is None else logits * factor
        return logits if cap is None else torch.tanh(logits / cap) * cap

    return transformed


@torch.no_grad()
def _check_against_the_model(
    model: nn.Module, name: str, decoder: nn.Module, head: Callable[[Tensor], Tensor], prefix: Tensor
) -> None:
    """Raise a ValueError unless ``decoder``, ``head`` and the shifted cross-entropy give the model's own
    logits and loss on ``prefix``. In eval mode, so dropout cannot make them differ, and on a forked
    RNG, so that training draws the same random numbers as without the check."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            expected = model(input_ids=prefix, labels=prefix)
            hidden_states = decoder(input_ids=prefix)[0]
            logits, loss = head(hidden_states), chunked_cross_entropy(hidden_states, head, _shift(prefix))
    finally:
        for module, training in modes.items():  # each flag as it was (model.train() would set them all)
            module.training = training
    # Rounding differences only (none on CPU): a missing transform or loss term is far larger.
    tolerance = max(1e-5, 4 * torch.finfo(expected.logits.dtype).eps)
    for what, ours, theirs in (("logits", logits, expected.logits), ("loss", loss, expected.loss)):
        if theirs is None or not _close(ours, theirs, tolerance):
            raise _cannot(f"{name}'s {what}", "its forward does something causal_lm_loss does not know")


def _close(ours: Tensor, theirs: Tensor, tolerance: float) -> bool:
    """Whether the two differ by at most ``tolerance`` times the largest of ``theirs`` (NaN equals NaN)."""
    ours, theirs = ours.float().nan_to_num(), theirs.float().nan_to_num()
    return ours.shape == theirs.shape and bool((ours - theirs).abs().max() <= tolerance * theirs.abs().max())


def _cannot(what: str, why: str) -> ValueError:
    return ValueError(f"causal_lm_loss cannot reproduce {what} ({why}); use model(..., labels=...).loss")
