"""LoRAct: the callback that compresses the training forward of a LightningModule."""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from loract_lightning.context import ActivationCompressor
from loract_lightning.options import AUTO, LINEAR_LAYERS, CompressionOptions, Method, RankSpec
from loract_lightning.stats import CompressionStats
from loract_lightning.step_capture import StepCapture, StepCaptureCallback, log_step_metrics


class LoRAct(StepCaptureCallback):
    r"""Store the activations of every training forward as low-rank factors (LoRAct).

    Compression is installed for the training forward only: from the start of each training batch
    until backward starts, and again after each backward of the same batch (manual optimization
    runs several forward/backward pairs in one ``training_step``). Backward, checkpoint
    recomputation, validation, test, predict and the sanity check are never compressed. At the
    end of fit everything it added is removed and the model is as it was.

    **Logged metrics** (through ``pl_module.log``: in ``trainer.callback_metrics`` and
    ``trainer.logged_metrics`` every step, so ``ModelCheckpoint(monitor="loract/ratio")`` sees them;
    sent to the loggers every ``log_every_n_steps``):

    - ``loract/saved_bytes``: activation bytes autograd saved in the step, before compression;
    - ``loract/stored_bytes``: bytes really held for them after compression;
    - ``loract/ratio``: stored / saved;
    - ``loract/compress_ms``: time spent factorizing in the step;
    - ``loract/mean_rank``: average rank of the step's factorizations (the ranks chosen, with
      ``rank="auto"``).

    Module names in ``layers`` and ``checkpoint`` are those of ``pl_module.named_modules()``, so
    they start with the attribute that holds the network (``"model.bert.encoder.layer.0.*"``).

    Under ``torch.compile`` module hooks do not run inside compiled code: every saved tensor is
    attributed to the root module, so with the default ``saved_by`` nothing is compressed (a
    warning after the first step says so), ``saved_by=None`` compresses the compiled graph's
    saved tensors (both modes train as without compile) and ``layers`` overrides do not apply.

    The arguments are :class:`~loract_lightning.options.CompressionOptions`' options, flat so that
    YAML ``init_args`` and ``--trainer.callbacks`` can set them; each is described in full, with its
    measured effect, there (and in docs/options.md); a bad value raises the error it documents.

    Args:
        rank: factor rank: an int, a float in (0, 1] (that fraction of each activation's last
            dimension, at least ``min_rank``), or ``"auto"`` (the smallest rank within ``max_error``).
        method: factorization: ``"sampled_qb"`` (the paper's), ``"randomized_svd"`` or
            ``"truncated_svd"`` (exact and slow).
        min_bytes: activations smaller than this many bytes stay raw.
        layers: module-name glob -> rank (or None: keep raw) overriding ``rank``; the first match wins.
        saved_by: default mode: class names of the modules whose saved tensors are compressed
            (default: linear layers); None: whatever any module saves.
        min_width: activations with fewer columns (or rows) than this stay raw; 0 turns it off.
        checkpoint: layer mode: module class names or globs run under activation checkpointing,
            only their inputs saved, as factors.
        compress_outside: layer mode: what is saved outside the checkpointed modules gets default
            mode's treatment; False keeps it raw.
        seed: seed of the compressor's own random generator (the global RNG is never drawn from).
        power_iters: power iterations of the randomized methods (None: the method's default).
        oversample: extra sketch columns of the randomized methods (None: the method's default).
        keep_row_norms: rescale each rebuilt row to its original norm (None: on in layer mode only).
        block_deltas: layer mode: store a block input as its difference from the previous
            block's where that rebuilds closer.
        compress_recompute: layer mode: recompute each block in backward with default mode's
            compression; False uses PyTorch's raw recompute.
        mlp_chunk_tokens: layer mode: the blocks' MLPs run over chunks of about this many tokens,
            each recomputed on its own in backward; None: whole.
        max_error: ``rank="auto"``: the relative error each activation may have, in (0, 1).
        min_rank: the fewest directions a fractional or ``"auto"`` rank gives.
        max_rank: ``rank="auto"``: the largest rank, an int or a fraction.
        side_stream: on CUDA, factorize on a separate stream; no effect on the CPU.
        factor_dtype: ``"bfloat16"`` or ``"float16"``: keep float32 activations' factors in this
            dtype; None: the activation's dtype.

    Example::

        from lightning import Trainer
        from loract_lightning import LoRAct

        # default mode: the inputs of linear layers at rank 1/8 of their width
        trainer = Trainer(callbacks=[LoRAct(rank=0.125)])

        # the paper's default mode: every eligible saved activation
        trainer = Trainer(callbacks=[LoRAct(rank=0.125, saved_by=None)])

        # layer mode: checkpoint each BERT layer, keep its input at rank 64, skip the first layer
        trainer = Trainer(callbacks=[LoRAct(rank=64, checkpoint=["BertLayer"], layers={"*.layer.0": None})])
    """

    def __init__(
        self,
        rank: int | float | Literal["auto"] = 0.125,
        method: Method = "sampled_qb",
        min_bytes: int = 1 << 20,
        layers: dict[str, RankSpec] | None = None,
        saved_by: list[str] | None = list(LINEAR_LAYERS),  # noqa: B006 - never mutated; shows in --help
        min_width: int = 64,
        checkpoint: list[str] | None = None,
        compress_outside: bool = True,
        seed: int = 0,
        power_iters: int | None = None,
        oversample: int | None = None,
        keep_row_norms: bool | None = None,
        block_deltas: bool = True,
        compress_recompute: bool = True,
        mlp_chunk_tokens: int | None = 1024,
        max_error: float = 0.2,
        min_rank: int = 64,
        max_rank: int | float = 0.5,
        side_stream: bool = True,
        factor_dtype: Literal["bfloat16", "float16"] | None = None,
    ) -> None:
        self.options = CompressionOptions(
            rank=rank,
            method=method,
            min_bytes=min_bytes,
            layers=layers or {},
            saved_by=saved_by,
            min_width=min_width,
            checkpoint=checkpoint or (),
            compress_outside=compress_outside,
            seed=seed,
            power_iters=power_iters,
            oversample=oversample,
            keep_row_norms=keep_row_norms,
            block_deltas=block_deltas,
            compress_recompute=compress_recompute,
            mlp_chunk_tokens=mlp_chunk_tokens,
            max_error=max_error,
            min_rank=min_rank,
            max_rank=max_rank,
            side_stream=side_stream,
            factor_dtype=factor_dtype,
        )
        self.compressor: ActivationCompressor | None = None
        self._capture: StepCapture | None = None
        self._restored_state: dict[str, Any] | None = None

    @property
    def step_stats(self) -> CompressionStats:
        """Stats of the current (or last finished) training step, summed over its forwards."""
        return self._capture.step_stats if self._capture else CompressionStats()

    @property
    def installed(self) -> bool:
        """Whether compression is active right now."""
        return bool(self._capture and self._capture.installed)

    # -- fit lifecycle -----------------------------------------------------------------------

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.compressor = ActivationCompressor(pl_module, self.options)
        self._capture = StepCapture(self.compressor, several_forwards=not pl_module.automatic_optimization)
        if self._restored_state is not None:
            self.compressor.load_state_dict(self._restored_state)
            self._restored_state = None
        self._log_summary(pl_module)
        if getattr(pl_module, "_compiler_ctx", None) and (self.options.layers or self.options.saved_by is not None):
            rank_zero_warn(
                "LoRAct: the LightningModule is compiled; module hooks do not run inside compiled code, so every "
                "saved tensor is attributed to the root module: `layers` overrides do not apply, and with "
                "`saved_by` set only what the root module's class allows is compressed (saved_by=None: everything)."
            )

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._log_step(pl_module)

    # -- logging -----------------------------------------------------------------------------

    def _log_summary(self, pl_module: pl.LightningModule) -> None:
        compressor = self.compressor
        mode = f"layer mode ({len(compressor.checkpointed_modules)} checkpointed modules)"
        if not compressor.layer_mode:
            saved_by = self.options.saved_by
            mode = "default mode, " + (f"tensors saved by {', '.join(saved_by)}" if saved_by else "every saved tensor")
        rank = self.options.rank
        rank_text = f"{rank}"
        if isinstance(rank, float):
            rank_text = f"{rank} of each activation's last dim (at least {self.options.min_rank})"
        if rank == AUTO:
            options = self.options
            rank_text = f"auto (max_error {options.max_error}, ranks {options.min_rank}..{options.max_rank})"
        method = self.options.method
        if self.options.factor_dtype is not None:
            method += f", factors in {self.options.factor_dtype}"
        lines = [f"LoRAct: {mode}, rank {rank_text}, method {method}"]
        module_names = [name for name, _ in pl_module.named_modules()]
        for pattern, count in compressor.policy.ranks.matches(module_names).items():
            lines.append(f"  layers[{pattern!r}] -> {self.options.layers[pattern]}: matches {count} modules")
        rank_zero_info("\n".join(lines))

    def _log_step(self, pl_module: pl.LightningModule) -> None:
        stats = self.step_stats
        metrics = {
            "loract/saved_bytes": float(stats.saved_bytes),
            "loract/stored_bytes": float(stats.stored_bytes),
            "loract/ratio": stats.ratio,
            "loract/compress_ms": stats.compress_seconds * 1e3,
            "loract/mean_rank": stats.mean_rank,
        }
        log_step_metrics(pl_module, metrics)

    # -- checkpointing -----------------------------------------------------------------------

    @override
    def state_dict(self) -> dict[str, Any]:
        compressor_state = self.compressor.state_dict() if self.compressor else {}
        return {"options": self.options.to_dict(), **compressor_state}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Restored before on_fit_start builds the compressor; applied there.
        self._restored_state = state_dict
        saved = state_dict.get("options", {})
        current = self.options.to_dict()
        differences = [
            f"{key}: checkpoint {saved.get(key)!r}, now {current[key]!r}"
            for key in current
            if key in saved and saved[key] != current[key]
        ]
        if differences:
            rank_zero_warn(
                "LoRAct: resuming with a compression config that differs from the checkpoint's; "
                "this run uses the new one. Differences: " + "; ".join(differences)
            )
