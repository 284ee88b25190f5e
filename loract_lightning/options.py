"""The compression options: the one full description of every option, and their validation.

``compress_activations(model, **options)``, ``LoRAct(**options)`` (and its YAML ``init_args``)
and ``loract profile`` take these same options by name; :class:`ActivationCompressor
<loract_lightning.context.ActivationCompressor>` takes a :class:`CompressionOptions`.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch

from loract_lightning.checks import check_choice, check_flag, check_fraction, check_int
from loract_lightning.linalg import METHODS

RankSpec = int | float | Literal["auto"] | None
"""An int k, a float in (0, 1] meaning a fraction of the last dimension, ``"auto"`` (chosen per
tensor for an error target), or None (do not compress)."""

AUTO = "auto"

Method = Literal["sampled_qb", "randomized_svd", "truncated_svd"]
"""The names of :data:`~loract_lightning.linalg.METHODS` as a type: ``LoRAct``'s ``method`` hint, so
that the CLI lists them in ``--help`` and rejects any other name as it parses."""

LINEAR_LAYERS = ("Linear", "Conv1d", "Conv2d", "Conv3d", "Conv1D")
"""Modules whose saved input enters the weight gradient linearly (``Conv1D`` is transformers'
GPT-2 linear layer). A low-rank error in such an input becomes an error of the same size in the
weight gradient, and nothing more: nothing downstream is recomputed from it."""

FACTOR_DTYPES: dict[str | None, torch.dtype | None] = {None: None, "bfloat16": torch.bfloat16, "float16": torch.float16}
"""Allowed ``factor_dtype`` values and the dtype each names."""


def check_rank(rank: RankSpec, what: str = "rank", allow_none: bool = False) -> None:
    """Raise a ValueError/TypeError naming ``rank`` unless it is a valid rank spec."""
    if (rank is None and allow_none) or rank == AUTO:
        return
    allowed = "an int >= 1, a float in (0, 1], 'auto'" + (" or None" if allow_none else "")
    if isinstance(rank, bool) or not isinstance(rank, (int, float)):
        raise TypeError(f"{what} must be {allowed}, got {rank!r}")
    if (isinstance(rank, int) and rank < 1) or (isinstance(rank, float) and not 0.0 < rank <= 1.0):
        raise ValueError(f"{what} must be {allowed}, got {rank!r}")


@dataclass(frozen=True)
class CompressionOptions:
    """The options of LoRAct, validated: a bad value raises a ValueError/TypeError that names it
    and what is allowed. This docstring is the one full description of each option.

    Args:
        rank: the default rank: an int k, or a float in (0, 1] meaning ``round(rank * N)`` for an
            activation whose last dimension is N (of M when the matrix has fewer rows M than
            columns, since its rank cannot exceed M), or ``"auto"``: per tensor, the smallest
            rank within ``min_rank``..``max_rank`` whose relative error is at most ``max_error``
            (sampled_qb only; see :func:`~loract_lightning.linalg.adaptive_qb`). Which rank is
            safe where is measured in docs/results.md (1/8 on SmolLM2-135M + LoRA, 1/4 on narrow
            models such as MiniLM and in layer mode).
        method: ``"sampled_qb"`` (the paper's, default), ``"randomized_svd"`` (Gaussian sketch,
            Halko et al.) or ``"truncated_svd"`` (exact and slow: the yardstick).
        min_bytes: activations smaller than this stay raw (factorizing them costs more than it saves).
        layers: glob pattern on qualified module names (as ``model.named_modules()`` gives them;
            the root is ``""``) -> rank, or None for no compression. The module running when a
            tensor is saved is looked up; the first matching pattern wins. A pattern that
            matches no module is a ValueError that shows real names.
        saved_by: default mode: class names of the modules whose saved tensors are compressed,
            matched along each module's class hierarchy (peft's LoRA layers, FSDP's renamed
            classes count; the module running when autograd saves the tensor decides); tensors
            saved by any other module stay raw, except two-valued masks, which are always stored
            exactly. Default: linear layers (:data:`LINEAR_LAYERS`), whose saved input enters
            only the weight gradient, linearly: the one class of saved tensors that compressed
            at no measurable cost (docs/results.md, "Which tensors hurt"). None: whatever any
            module saves (the paper's default mode). In layer mode the checkpointed modules'
            inputs are compressed whatever their class. A name that no module's class has is a
            ValueError that shows the model's classes (names of the default may miss where
            another name matches; the default itself is not checked).
        min_width: activations whose matrix has fewer columns (or rows) than this stay raw: a
            fractional rank of a narrow matrix is a handful of directions (LoRA's rank-8
            intermediate at rank 1/8 would be rank 1). Conv
            activations are flattened along their width, so those narrower than 64 px stay raw
            too; 0 turns the floor off.
        checkpoint: layer mode: module class names or glob patterns; those modules run under
            activation checkpointing and only their inputs are saved, compressed whatever their
            class. What is saved outside them follows ``compress_outside``. Modules already
            checkpointed (a torch ``CheckpointWrapper``, FSDP's ``activation_checkpointing_policy``,
            transformers' ``gradient_checkpointing_enable()``) are not wrapped again; their inputs
            are still compressed (a warning says so). A checkpointed module gets no KV cache
            (``use_cache=False``, cache arguments None), as under transformers' own
            checkpointing, since the recompute would write it twice; a cache that already holds
            states is refused with a ValueError.
        compress_outside: layer mode: tensors saved outside the checkpointed modules (the LM
            head's input, a classifier's, the final norm's) get default mode's treatment: those
            that ``saved_by`` modules save are compressed under ``rank``/``layers``, masks are
            stored exactly, the rest (the loss's log-probabilities with the default ``saved_by``)
            stays raw. False keeps everything outside raw (the paper's layer mode).
        seed: seed of the compressor's own random generator (the global RNG is never drawn from,
            so dropout masks are the same as without compression).
        power_iters: power iterations of the randomized methods (None: the method's default,
            0 for sampled_qb, 2 for randomized_svd; with truncated_svd, which takes neither this
            nor ``oversample``, a value is a ValueError).
        oversample: extra sketch columns of the randomized methods (None: the method's default,
            0 for sampled_qb, 10 for randomized_svd).
        keep_row_norms: rescale each rebuilt row (token) to its original norm, at no memory
            cost (see :func:`loract_lightning.linalg.keep_row_norms`); False gives the paper's
            plain projection ``A Q Q^T``. None (default): on in layer mode, where it cuts the
            gradient error, off in default mode, where it made it worse (docs/faq.md).
        block_deltas: layer mode: also factorize each checkpointed block's input as its
            difference from the previous block's rebuilt input (when both have the same shape),
            and store that instead where its rebuild (the previous one plus the factors) is closer
            to the input. A residual stream changes a little from block to block, so the blocks'
            factors add up to a basis that grows with depth, at the same memory (plus one float
            per row with ``keep_row_norms``): on SmolLM2 + LoRA at rank 1/8, +0.4% validation loss
            instead of +2.0% (docs/results.md), at about 10% more step time: a second
            factorization per block input in the forward; in backward, blocks rebuilt in reverse
            order cost one product each, others one per predecessor. No effect in default mode;
            False factorizes each block input on its own.
        compress_recompute: layer mode: recompute each checkpointed block in backward under
            default mode's rule (what ``saved_by`` modules save as factors at ``rank``/``layers``,
            masks exactly), so that the block's backward holds its working set compressed rather
            than raw: what sets the step's peak at long context. On SmolLM2-135M + LoRA (b1,
            1024-4096 tokens, chunked loss) each extra token costs 68.5 KiB at the peak instead
            of 95.6 with PyTorch's raw recompute and 146.1 with AC (docs/results.md, "Longer
            context"), at +0.40% validation loss instead of +0.36%. The recompute runs through
            LoRAct's own checkpoint (reentrant: it backpropagates through the recomputed block
            inside backward), so it serves ``loss.backward()`` but refuses
            ``torch.autograd.grad`` with a clear error; under ``torch.compile`` PyTorch's
            checkpoint is used. False: PyTorch's non-reentrant checkpoint, its recompute's saved
            tensors raw.
        mlp_chunk_tokens: layer mode: inside each checkpointed block, the MLPs (modules whose
            class name ends in ``MLP`` or ``Mlp``: transformers' ``LlamaMLP``, ``GPT2MLP``, timm's
            ``Mlp``, ...) run over chunks of about this many tokens (over the whole batch), each
            under its own checkpoint: the block's recompute keeps only the MLP's input, and the
            MLP's backward recomputes one chunk at a time, so the widest part of a block's
            working set no longer grows with the sequence. Costs one more forward of the MLP
            in backward, for inputs longer than one chunk only. Each MLP is checked once to act
            on each token on its own (chunked output equal to whole, dropout off); one that does
            not runs whole, with a warning. Dropout masks are drawn chunk by chunk in the
            forward and its recomputes alike. On SmolLM2-135M + LoRA (b1, 1024-8192 tokens,
            chunked loss) each extra token costs 36.4 KiB at the peak with it (68.5 without,
            150.1 with AC), at +0.44% validation loss (docs/results.md, "The MLP over chunks
            of tokens"). None: MLPs run whole.
        max_error: ``rank="auto"``: the relative Frobenius error each activation may have, in (0, 1).
        min_rank: the fewest directions a fractional rank (``rank``, ``layers`` or ``max_rank``
            values that are floats) or ``"auto"`` gives, where the matrix allows (an int >= 1;
            an int rank is used as it is). A fraction of a narrow activation is a handful of
            directions (MiniLM, width 384: 48 at rank 1/8); the default floor of 64 is what kept
            MiniLM's accuracy within 1 point (docs/results.md), and leaves SmolLM2 (width 576 and
            more) at rank 1/8 untouched.
        max_rank: ``rank="auto"``: the largest rank, an int or a fraction as for ``rank``; never
            more than the rank at which factors stop saving memory. At this rank the error target
            may be missed.
        side_stream: on CUDA, factorize on a separate stream (one per device, shared by all
            compressors) so compression overlaps the rest of the forward; the activation's memory
            is not reused before its factors are done. False runs it on the current stream. No
            effect on the CPU.
        factor_dtype: ``"bfloat16"`` or ``"float16"``: keep the factors of wider (float32)
            activations in this dtype. Halves their memory, and the projection ``A Q`` and the
            rebuild ``L R`` run on the fast units (bfloat16 units of recent CPUs, tensor cores).
            The basis is still found from the activation in its own dtype; the rounding adds
            far less error than the truncation (docs/performance.md). None (default): factors in
            the activation's dtype, as in the paper.

    Raises:
        ValueError, TypeError: for a value outside what the option allows, naming both.

    Example::

        options = CompressionOptions(rank=0.25, checkpoint=["LlamaDecoderLayer"])
        compressor = ActivationCompressor(model, options)
        CompressionOptions(rank=0)  # ValueError: rank must be an int >= 1, a float in (0, 1], 'auto', got 0
    """

    rank: int | float | Literal["auto"] = 0.125
    method: Method = "sampled_qb"
    min_bytes: int = 1 << 20
    layers: Mapping[str, RankSpec] = field(default_factory=dict)
    saved_by: Sequence[str] | None = LINEAR_LAYERS
    min_width: int = 64
    checkpoint: Sequence[str] = ()
    compress_outside: bool = True
    seed: int = 0
    power_iters: int | None = None
    oversample: int | None = None
    keep_row_norms: bool | None = None
    block_deltas: bool = True
    compress_recompute: bool = True
    mlp_chunk_tokens: int | None = 1024
    max_error: float = 0.2
    min_rank: int = 64
    max_rank: int | float = 0.5
    side_stream: bool = True
    factor_dtype: str | None = None

    def __post_init__(self) -> None:
        check_rank(self.rank)
        if not isinstance(self.layers or {}, Mapping):
            raise TypeError(f"layers must be a mapping of glob pattern -> rank, got {self.layers!r}")
        for pattern, rank in (self.layers or {}).items():
            if not isinstance(pattern, str):
                raise TypeError(f"layers keys must be glob patterns (str), got {pattern!r}")
            check_rank(rank, f"layers[{pattern!r}]", allow_none=True)
        check_choice("method", self.method, sorted(METHODS))
        for name in ("min_bytes", "min_width", "seed"):
            check_int(name, getattr(self, name))
        for name in ("power_iters", "oversample"):  # passed on to the method: only those that take it
            value = getattr(self, name)
            check_int(name, value, allow_none=True)
            if value is not None and name not in inspect.signature(METHODS[self.method]).parameters:
                takers = [m for m, f in METHODS.items() if name in inspect.signature(f).parameters]
                raise ValueError(
                    f"{name}={value!r} is not an option of method={self.method!r}; methods that take it: {takers}"
                )
        if self.keep_row_norms is not None and not isinstance(self.keep_row_norms, bool):
            raise TypeError(f"keep_row_norms must be None, True or False, got {self.keep_row_norms!r}")
        check_fraction("max_error", self.max_error)
        check_int("min_rank", self.min_rank, minimum=1)
        if self.max_rank == AUTO:
            raise ValueError("max_rank must be an int >= 1 or a float in (0, 1], got 'auto'")
        check_rank(self.max_rank, "max_rank")
        if isinstance(self.max_rank, int) and self.min_rank > self.max_rank:
            raise ValueError(f"min_rank ({self.min_rank}) must not exceed max_rank ({self.max_rank})")
        uses_auto = self.rank == AUTO or AUTO in (self.layers or {}).values()
        if uses_auto and self.method != "sampled_qb":
            raise ValueError(f"rank='auto' needs method='sampled_qb', got method={self.method!r}")
        check_flag("side_stream", self.side_stream)
        check_flag("compress_outside", self.compress_outside)
        check_flag("block_deltas", self.block_deltas)
        check_flag("compress_recompute", self.compress_recompute)
        check_int("mlp_chunk_tokens", self.mlp_chunk_tokens, minimum=1, allow_none=True)
        check_choice("factor_dtype", self.factor_dtype, FACTOR_DTYPES)
        if isinstance(self.checkpoint, str) or not all(isinstance(c, str) for c in self.checkpoint or ()):
            raise TypeError(
                f"checkpoint must be a list of module class names or glob patterns, got {self.checkpoint!r}"
            )
        if self.saved_by is not None and (
            isinstance(self.saved_by, str) or not all(isinstance(c, str) for c in self.saved_by)
        ):
            raise TypeError(f"saved_by must be None or a list of module class names, got {self.saved_by!r}")
        # Normalise so that two equal configurations compare (and serialise) equal.
        object.__setattr__(self, "layers", dict(self.layers or {}))
        object.__setattr__(self, "checkpoint", tuple(self.checkpoint or ()))
        if self.saved_by is not None:
            object.__setattr__(self, "saved_by", tuple(self.saved_by))

    def to_dict(self) -> dict:
        """Plain, serialisable form (lists instead of tuples) for checkpoints and logs."""
        values = asdict(self)
        values["checkpoint"] = list(self.checkpoint)
        if self.saved_by is not None:
            values["saved_by"] = list(self.saved_by)
        return values
