"""LoRActTrainerCallback: LoRAct for the Hugging Face ``transformers.Trainer``."""

from __future__ import annotations

import functools
from typing import Any

from torch import nn
from typing_extensions import override

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
except ModuleNotFoundError as missing:  # not a dependency of loract-lightning's core
    raise ModuleNotFoundError(
        "LoRActTrainerCallback is for the Hugging Face transformers.Trainer and needs transformers: "
        "pip install transformers"
    ) from missing

from loract_lightning.context import ActivationCompressor
from loract_lightning.options import CompressionOptions
from loract_lightning.stats import CompressionStats


class LoRActTrainerCallback(TrainerCallback):
    r"""Compress the training forward of a Hugging Face ``transformers.Trainer`` with LoRAct.

    From the start of training to its end the model's ``forward`` runs inside
    :meth:`ActivationCompressor.capture() <loract_lightning.ActivationCompressor.capture>`, which
    compresses only when the model is in training mode with gradients on: every micro-batch's
    training forward is compressed, and its backward rebuilds what it saved. Evaluation and
    prediction (``eval()``, no gradients) are not. When training ends the model's ``forward`` is
    put back as it was. peft models work as they are (the LoRA layers' inputs are what default
    mode compresses).

    Module names in ``layers`` and ``checkpoint`` are those of the model given to the Trainer
    (a peft model's start with ``base_model.model.``); class names (``"LlamaDecoderLayer"``)
    need no prefix. With ``TrainingArguments(gradient_checkpointing=True)`` the layers are
    already checkpointed: name them in ``checkpoint`` and LoRAct compresses their saved inputs
    without checkpointing them twice.

    Args:
        \**options: LoRAct's options by name, with the same defaults (``rank``, ``checkpoint``,
            ``layers``, ``saved_by``, ...; each is described in
            :class:`~loract_lightning.options.CompressionOptions`; a bad value raises here).

    Attributes:
        step_stats: the :class:`~loract_lightning.CompressionStats` of the current (or last)
            training step, summed over its micro-batches.

    Example::

        from transformers import Trainer
        from loract_lightning.transformers_callback import LoRActTrainerCallback

        trainer = Trainer(model=model, args=args, train_dataset=train, callbacks=[LoRActTrainerCallback(rank=0.125)])
        # layer mode: each decoder layer checkpointed, its input kept at rank 1/4
        callback = LoRActTrainerCallback(rank=0.25, checkpoint=["LlamaDecoderLayer"])
    """

    def __init__(self, **options: Any) -> None:
        self.options = CompressionOptions(**options)
        self.compressor: ActivationCompressor | None = None
        self.step_stats = CompressionStats()
        self._model: nn.Module | None = None
        self._own_forward: Any = None  # the instance's own forward before ours (accelerate's), if any

    @override
    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model = kwargs.get("model")
        if not isinstance(model, nn.Module):
            raise ValueError(f"LoRActTrainerCallback needs the Trainer's model, got {type(model).__name__}")
        self._restore()
        self.compressor = ActivationCompressor(model, self.options)
        self._model, self._own_forward = model, vars(model).get("forward")
        model.forward = self._compressed(model.forward, self.compressor)

    @override
    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.step_stats = CompressionStats()

    @override
    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._restore()

    def _compressed(self, forward: Any, compressor: ActivationCompressor) -> Any:
        @functools.wraps(forward)  # the Trainer reads the signature to pick the dataset's columns
        def compressed_forward(*args: Any, **kwargs: Any) -> Any:
            with compressor.capture() as stats:  # installs nothing in eval mode or without gradients
                output = forward(*args, **kwargs)
            self.step_stats.merge(stats)
            return output

        return compressed_forward

    def _restore(self) -> None:
        if self._model is None:
            return
        if self._own_forward is None:
            del self._model.forward
        else:
            self._model.forward = self._own_forward
        self._model = self._own_forward = None
