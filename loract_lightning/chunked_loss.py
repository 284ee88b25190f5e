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
    :func:`chunked_cross_entropy` over its output embeddings (``get_output_embeddings()``), with
    the labels shifted by one as transformers does. ``model_kwargs`` (``attention_mask``, ...)
    go to the decoder.
    """
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder, head = causal_lm.get_decoder(), causal_lm.get_output_embeddings()
    if decoder is None or head is None:
        raise ValueError(f"{type(causal_lm).__name__} has no decoder/output embeddings to chunk the loss over")
    hidden_states = decoder(input_ids=input_ids, **model_kwargs)[0]
    shifted = F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)  # token t predicts label t + 1
    return chunked_cross_entropy(hidden_states, head, shifted, chunk_tokens)
