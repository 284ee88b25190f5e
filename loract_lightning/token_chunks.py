"""Layer mode: run the MLP of each checkpointed block over chunks of tokens.

While backward recomputes a block, everything the recompute saves exists at once, and in a
transformer most of it is the MLP's: on SmolLM2 + LoRA the gate and up projections, their SiLU
and product, 1536 wide, and peft's dropout copies are 36 of the 76 KiB a token that the step's
peak holds (``benchmarks/peak_census.py``). An MLP acts on each token on its own, so it can run
over chunks of tokens, each under its own (PyTorch) checkpoint: the block's recompute then keeps
only the MLP's input, and the MLP's backward recomputes and backpropagates one chunk at a time,
so its working set stops growing with the sequence. The price is one more forward of the MLP in
backward, paid only by inputs longer than one chunk.

Chunks draw their dropout masks chunk by chunk, in the forward as in both recomputes, so
forward and backward see the same masks. A module is chunked only after a check, once, that
its output over chunks equals its output over the whole input (dropout off, buffers restored);
one that mixes tokens (BatchNorm in training mode, a router with capacity limits) fails it and
runs whole.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from loract_lightning.checkpointing import swapped_forwards

MLP_SUFFIXES = ("MLP", "Mlp")
"""Class names ending in these are MLPs (transformers' ``LlamaMLP``, ``GPT2MLP``, ..., timm's
``Mlp``, ``GluMlp``), matched along the class hierarchy."""

CHECK_ROWS = 8
"""Positions along the sequence the token-wise check runs on (split into uneven chunks)."""


def select_mlps(blocks: Mapping[str, nn.Module]) -> dict[str, dict[str, nn.Module]]:
    """Per block (by qualified name), the outermost MLPs inside it (qualified names)."""
    selected: dict[str, dict[str, nn.Module]] = {}
    for block_name, block in blocks.items():
        mlps: dict[str, nn.Module] = {}
        for name, module in block.named_modules():
            qualified = f"{block_name}.{name}" if block_name else name
            if name and _is_mlp(module) and not any(qualified.startswith(f"{outer}.") for outer in mlps):
                mlps[qualified] = module
        if mlps:
            selected[block_name] = mlps
    return selected


def _is_mlp(module: nn.Module) -> bool:
    return any(cls.__name__.endswith(MLP_SUFFIXES) for cls in type(module).__mro__)


class TokenChunks:
    """Runs the MLPs of each checkpointed block over chunks of ``chunk_tokens`` rows.

    Args:
        blocks: the checkpointed blocks, by qualified name.
        chunk_tokens: rows (tokens over the whole batch) per chunk; None or 0: off.
    """

    def __init__(self, blocks: Mapping[str, nn.Module], chunk_tokens: int | None) -> None:
        self.mlps = select_mlps(blocks) if chunk_tokens else {}
        self.chunk_tokens = chunk_tokens or 0
        self.token_wise: dict[str, bool] = {}  # MLP name -> passed the check

    @contextmanager
    def running(self, block_name: str) -> Iterator[None]:
        """Around one run of block ``block_name`` (its forward and each recompute): its MLPs'
        ``forward`` goes over chunks."""
        chunked = lambda name, module: self._chunked_forward(name, module, module.forward)  # noqa: E731
        with swapped_forwards(self.mlps.get(block_name, {}), chunked):
            yield

    def _chunked_forward(self, name: str, module: nn.Module, forward):
        def run(*args, **kwargs):
            hidden = args[0] if len(args) == 1 and not kwargs else None
            if not isinstance(hidden, Tensor) or hidden.dim() < 2 or torch.compiler.is_compiling():
                return forward(*args, **kwargs)
            step = _positions_per_chunk(hidden, self.chunk_tokens)
            if step >= hidden.shape[-2] or not self._acts_per_token(name, module, forward, hidden):
                return forward(hidden)
            pieces = hidden.split(step, dim=-2)
            if torch.is_grad_enabled():
                # Each chunk keeps only its input (a view of ``hidden``) until its own backward.
                outputs = [checkpoint(forward, piece, use_reentrant=False) for piece in pieces]
            else:
                outputs = [forward(piece) for piece in pieces]
            return torch.cat(outputs, dim=-2)

        return run

    def _acts_per_token(self, name: str, module: nn.Module, forward, hidden: Tensor) -> bool:
        if name not in self.token_wise:
            self.token_wise[name] = _chunks_match_whole(module, forward, hidden)
            if not self.token_wise[name]:
                warnings.warn(
                    f"LoRAct: {name!r} ({type(module).__name__}) does not act on each token on its own "
                    "(its output over chunks of tokens differs from its output over the whole input); "
                    "it runs whole (mlp_chunk_tokens does not apply to it)",
                    stacklevel=4,
                )
        return self.token_wise[name]


def _positions_per_chunk(hidden: Tensor, chunk_tokens: int) -> int:
    """Positions along dim -2 (the sequence) per chunk, so that a chunk has about ``chunk_tokens``
    rows over all leading dimensions (the batch)."""
    others = hidden.shape[:-2].numel()
    return max(1, chunk_tokens // max(others, 1))


def _chunks_match_whole(module: nn.Module, forward, hidden: Tensor) -> bool:
    """Whether ``forward`` over a few positions of ``hidden`` gives the same, chunk by chunk as
    whole: with dropout off, the global random state and the module's buffers left as they were."""
    sample = hidden.detach()[..., :CHECK_ROWS, :]
    if sample.shape[-2] < 2:
        return True
    dropouts = [m for m in module.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    switched = [m for m in [module, *dropouts] if m.training]
    buffers = [(b, b.clone()) for b in module.buffers()]
    devices = [hidden.device] if hidden.device.type == "cuda" else []
    try:
        for m in switched:
            m.training = False
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            whole = forward(sample)
            chunked = torch.cat([forward(piece) for piece in sample.split(3, dim=-2)], dim=-2)
    except Exception:  # whatever fails over chunks is not token-wise for us
        return False
    finally:
        for m in switched:
            m.training = True
        with torch.no_grad():
            for buffer, value in buffers:
                buffer.copy_(value)
    if not isinstance(whole, Tensor) or not isinstance(chunked, Tensor) or whole.shape != chunked.shape:
        return False
    scale = whole.float().norm().clamp_min(1e-30)
    return bool((whole.float() - chunked.float()).norm() / scale < 1e-2)
