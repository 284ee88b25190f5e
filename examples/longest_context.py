"""Before training: how long a context a memory budget (by default, this run's step) holds with
LoRAct's layer mode and with activation checkpointing plus a chunked loss, planned from short
measured steps. Run it alone before a long job with ``--trainer.max_steps=0``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from typing_extensions import override

from loract_lightning import ActivationCompressor, CompressionOptions, LoRAct, causal_lm_loss
from loract_lightning.planner import ContextPlan, parse_bytes, plan_context, step_peak_bytes

MIB = 1 << 20


class LongestContext(pl.Callback):
    """Print, when fit starts, the longest sequence a memory budget holds.

    The budget is ``budget`` if given, else on CUDA the device's free memory, else what one
    training step of this run holds at its peak (tensors only: see
    :mod:`loract_lightning.planner`), at the run's batch shape, with the run's ``LoRAct``
    callback if it has one. Then, for activation checkpointing (AC) of each decoder layer with
    the chunked loss, and for LoRAct's layer mode at its defaults with the chunked loss, two
    steps of one sequence at ``lengths`` tokens give a line of peak over tokens, and the budget
    the longest sequence on it. The steps change no weight (no optimizer step; gradients and the
    random state are put back). For the examples' ``CausalLM`` (a transformers causal LM in
    ``pl_module.model``, batches of token ids).

    Args:
        lengths: tokens of the planning steps (one sequence each, at least two lengths). Longer
            steps plan long contexts better: LoRAct's MLP chunks (``mlp_chunk_tokens``, 1024)
            show only beyond 1024 tokens, so the default plan is conservative for LoRAct.
        budget: the memory to plan for, e.g. ``"24GiB"`` or a number of bytes (see
            :func:`~loract_lightning.planner.parse_bytes`); None: see above.

    Example::

        trainer = Trainer(callbacks=[LoRAct(), LongestContext(lengths=[1024, 4096])])

        # before a long job, from the command line:
        # loract fit --config ... --trainer.max_steps=0 \\
        #     --trainer.callbacks+=examples.longest_context.LongestContext --trainer.callbacks.budget=24GiB
    """

    def __init__(self, lengths: list[int] | None = None, budget: str | int | None = None) -> None:
        self.lengths = list(lengths or [512, 1536])
        if len(set(self.lengths)) < 2 or min(self.lengths) < 1:
            raise ValueError(f"lengths must hold at least two distinct token counts >= 1, got {self.lengths}")
        self.budget = None if budget is None else parse_bytes(budget)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        if trainer.fast_dev_run:  # a smoke test of the run: planning steps would be most of it
            rank_zero_info("LongestContext: no plan under fast_dev_run")
            return
        model, data = pl_module.model, trainer.datamodule.hparams
        batch_shape = (data.batch_size, data.seq_len)
        run = next((c for c in trainer.callbacks if isinstance(c, LoRAct)), None)
        chunk = pl_module.hparams.loss_chunk_tokens
        block = _decoder_layer(model)
        ac = CompressionOptions(checkpoint=[block])
        with _leaving_no_trace(model):
            # This run's own step first: its peak, and the warm-up of the model for the plans.
            own_peak = step_peak_bytes(_step(model, run.options if run else None, chunk, batch_shape), pl_module.device)
            budget, source = self.budget, "the budget given"
            if budget is None and pl_module.device.type == "cuda":
                budget, source = torch.cuda.mem_get_info(pl_module.device)[0], "the device's free memory"
            if budget is None:
                budget, source = own_peak, "this run's step, tensors only"
                source += f", at {' x '.join(map(str, batch_shape))} tokens"
            plans = [
                _plan(model, "AC + chunked loss", ac, False, chunk or 128, self.lengths),
                _plan(model, "LoRAct layer mode", ac, True, chunk or 128, self.lengths),
            ]
        lines = [f"Longest context in {budget / MIB:.1f} MiB ({source}), planned from steps of {self.lengths} tokens:"]
        for plan in plans:
            lines.append(
                f"  {plan.label:<20} {plan.longest(budget):>7} tokens  ({plan.bytes_per_token / 1024:.1f} KiB a token)"
            )
        rank_zero_info("\n".join(lines))


def _decoder_layer(model: nn.Module) -> str:
    """The class name of a transformers model's decoder layers."""
    for module in model.modules():
        if any(cls.__name__ == "GradientCheckpointingLayer" for cls in type(module).__mro__[1:]):
            return type(module).__name__
    raise ValueError(f"{type(model).__name__} has no transformers decoder layers to checkpoint")


def _step(
    model: nn.Module, options: CompressionOptions | None, chunk_tokens: int | None, shape, compress: bool = True
) -> Callable[[], None]:
    """One training step without the optimizer on random token ids of ``shape`` (under a
    compressor with ``options``, measuring only with ``compress=False``; none for None)."""
    compressor = ActivationCompressor(model, options, compress=compress) if options is not None else None
    vocab = model.get_input_embeddings().num_embeddings
    device = next(model.parameters()).device

    def step() -> None:
        ids = torch.randint(0, vocab, shape, device=device)
        with compressor.capture() if compressor else nullcontext():
            if chunk_tokens:
                loss = causal_lm_loss(model, ids, labels=ids, chunk_tokens=chunk_tokens)
            else:
                loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def _plan(model, label: str, options: CompressionOptions, compress: bool, chunk_tokens: int, lengths) -> ContextPlan:
    device = next(model.parameters()).device
    return plan_context(
        lambda tokens: _step(model, options, chunk_tokens, (1, tokens), compress)(), lengths, label, device
    )


@contextmanager
def _leaving_no_trace(model: nn.Module) -> Iterator[None]:
    """Train mode, the gradients and the random state put back afterwards."""
    training = model.training
    grads = {p: p.grad for p in model.parameters() if p.grad is not None}
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model.train()
        model.zero_grad(set_to_none=True)
        try:
            yield
        finally:
            model.train(training)
            for parameter, grad in grads.items():
                parameter.grad = grad
