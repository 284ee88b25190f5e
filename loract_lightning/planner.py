"""How long a context fits in a memory budget, planned from a few short measured steps.

A training step's peak grows about linearly with the tokens of its batch: a fixed part (the
weights' gradients, one block's recompute at short lengths, the loss's chunk) and a part per
token (what is held from forward to backward, the working set of one block's backward). Two
short steps at different lengths give the line; the budget gives the longest context.

The peak is measured where it is exact: on CUDA by the caching allocator
(``max_memory_allocated`` above what was allocated before the step); elsewhere by following
every storage that an aten op creates during the step until it is freed (:class:`LiveTensorBytes`),
which counts tensors only (no allocator slack, no Python objects), so it is the floor of what a
GPU would need, not the process's resident memory.

Example::

    def step(tokens: int) -> None:
        ids = torch.randint(0, vocab, (1, tokens))
        with compressor.capture():
            loss = causal_lm_loss(model, ids, labels=ids)
        loss.backward()
        model.zero_grad(set_to_none=True)

    plan = plan_context(step, lengths=(256, 512), label="LoRAct layer mode")
    plan.longest(parse_bytes("24GiB"))  # tokens per batch that fit
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_UNITS = {"": 1, "B": 1, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9}


def parse_bytes(text: str | int | float) -> int:
    """``"24GiB"``, ``"512 MiB"``, ``"1.5GB"`` or a number of bytes, as bytes; a ValueError naming
    the text and the units allowed otherwise."""
    if isinstance(text, (int, float)) and not isinstance(text, bool) and text > 0:
        return int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"a memory size must be a positive number with a unit in {sorted(_UNITS)[1:]}, got {text!r}")
    return int(float(match.group(1)) * _UNITS[unit])


class LiveTensorBytes(TorchDispatchMode):
    """While active, the bytes of the storages that aten ops create and that are still alive, and
    their peak. Views and in-place results share a storage that is already counted (or that
    existed before: weights, the batch) and add nothing.

    Args:
        describe: for tools that list what is live at the peak: called with the op's name when a
            storage is made, its result labels the storage; the labels and sizes of what is live
            at the peak are then kept in ``at_peak``.
    """

    def __init__(self, describe: Callable[[str], str] | None = None) -> None:
        super().__init__()
        self.live: dict[int, tuple[int, str]] = {}  # storage address -> (bytes, label)
        self.total = 0
        self.peak = 0
        self.describe = describe
        self.at_peak: list[tuple[int, str]] = []

    def _freed(self, key: int) -> None:
        self.total -= self.live.pop(key, (0, ""))[0]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, Tensor) or tensor.device.type == "meta":
                continue
            storage = tensor.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or key in self.live or key in inputs:
                continue
            label = self.describe(func.overloadpacket.__name__) if self.describe else ""
            self.live[key] = (size, label)
            self.total += size
            # The storage's Python object lives exactly as long as the storage itself.
            weakref.finalize(storage, self._freed, key)
            if self.total > self.peak:
                self.peak = self.total
                if self.describe:
                    self.at_peak = list(self.live.values())
        return out


def step_peak_bytes(step: Callable[[], object], device: torch.device | str = "cpu") -> int:
    """The most memory ``step()`` holds at once beyond what existed before it (see the module
    docstring for how it is measured on CUDA and elsewhere)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with LiveTensorBytes() as live:
        step()
    return live.peak


@dataclass(frozen=True)
class ContextPlan:
    """A step's peak as a line over the tokens of its batch, fitted to measured steps.

    Args:
        label: what was measured (a setting's name).
        tokens: the tokens of each measured step's batch.
        peaks: each measured step's peak, in bytes.
    """

    label: str
    tokens: tuple[int, ...]
    peaks: tuple[int, ...]

    @property
    def bytes_per_token(self) -> float:
        """The least-squares slope of the peak over the tokens."""
        mean_t, mean_p = sum(self.tokens) / len(self.tokens), sum(self.peaks) / len(self.peaks)
        spread = sum((t - mean_t) ** 2 for t in self.tokens)
        return sum((t - mean_t) * (p - mean_p) for t, p in zip(self.tokens, self.peaks, strict=True)) / spread

    @property
    def fixed_bytes(self) -> float:
        """The line's value at zero tokens."""
        mean_t, mean_p = sum(self.tokens) / len(self.tokens), sum(self.peaks) / len(self.peaks)
        return mean_p - self.bytes_per_token * mean_t

    def peak_at(self, tokens: int) -> float:
        return self.fixed_bytes + self.bytes_per_token * tokens

    def longest(self, budget_bytes: int) -> int:
        """The most tokens per batch whose planned peak fits ``budget_bytes`` (0 if none do)."""
        if self.bytes_per_token <= 0:
            raise ValueError(f"{self.label}: the peak did not grow with the tokens {self.peaks}; measure longer steps")
        return max(0, int((budget_bytes - self.fixed_bytes) // self.bytes_per_token))


def plan_context(
    step_at: Callable[[int], object],
    lengths: Sequence[int],
    label: str = "",
    device: torch.device | str = "cpu",
    warm_up: bool = True,
) -> ContextPlan:
    """Measure ``step_at(n)`` (one training step on a batch of ``n`` tokens) at each of ``lengths``
    (at least two, distinct) and fit the line. With ``warm_up``, one step at the shortest length
    runs first, unmeasured, so that lazily made state (optimizer moments, caches) is not counted;
    leave it off when the model has already run a step."""
    lengths = sorted(lengths)
    if len(set(lengths)) < 2 or lengths[0] < 1:
        raise ValueError(f"lengths must hold at least two distinct token counts >= 1, got {list(lengths)}")
    if warm_up:
        step_at(lengths[0])
    peaks = tuple(step_peak_bytes(lambda n=n: step_at(n), device) for n in lengths)
    return ContextPlan(label, tuple(lengths), peaks)
