"""What the pack hook stores in place of a saved activation, and how unpack rebuilds it.

A :class:`LowRankFactors` holds ``L`` (M x k) and ``R`` (k x N) for one stretch of a storage.
Several saved tensors may read that stretch (q/k/v projections read one input; ``linear`` saves
a 2-D view of the 3-D tensor that ``layer_norm`` saved), so each saved tensor gets its own small
:class:`PackedTensor` that records its view (size, stride, offset) onto the shared factors.
Unpack can be called any number of times (``retain_graph``, double backward): it rebuilds from the
factors every time and never consumes them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(eq=False)
class LowRankFactors:
    """Factors of a matrix ``A ~ left @ right`` that stood for ``rows x cols`` of a storage.

    ``contiguous`` says the compressed tensor was laid out row-major with no gaps, so the
    rebuilt buffer has the same linear layout as the original storage stretch and any view that
    lies inside it can be rebuilt with ``as_strided``.
    """

    left: Tensor
    right: Tensor
    storage_offset: int
    size: torch.Size
    stride: tuple[int, ...]
    contiguous: bool
    version: int

    @property
    def nbytes(self) -> int:
        return self.left.nbytes + self.right.nbytes

    @property
    def numel(self) -> int:
        return self.size.numel()

    def covers(self, tensor: Tensor) -> bool:
        """Whether ``tensor`` (a view of the same storage) can be rebuilt from these factors."""
        if tensor._version != self.version or tensor.dtype != self.left.dtype:
            return False
        if not self.contiguous:
            same_view = tensor.size() == self.size and tensor.stride() == self.stride
            return same_view and tensor.storage_offset() == self.storage_offset
        start, end = view_extent(tensor)
        return self.storage_offset <= start and end <= self.storage_offset + self.numel

    def rebuild(self) -> Tensor:
        """The low-rank approximation in the compressed tensor's own shape and strides."""
        dense = (self.left @ self.right).view(self.size)
        if self.contiguous:
            return dense
        exact = torch.empty_strided(self.size, self.stride, dtype=dense.dtype, device=dense.device)
        return exact.copy_(dense)


@dataclass(eq=False)
class PackedTensor:
    """One saved tensor, stored as a view onto (possibly shared) :class:`LowRankFactors`."""

    factors: LowRankFactors
    size: torch.Size
    stride: tuple[int, ...]
    storage_offset: int

    def unpack(self) -> Tensor:
        rebuilt = self.factors.rebuild()
        if self.factors.contiguous:
            offset = self.storage_offset - self.factors.storage_offset
            rebuilt = rebuilt.view(-1).as_strided(self.size, self.stride, offset)
        return rebuilt


def view_extent(tensor: Tensor) -> tuple[int, int]:
    """The half-open range of storage elements ``[start, end)`` that ``tensor`` can touch."""
    start = tensor.storage_offset()
    if tensor.numel() == 0:
        return start, start
    span = sum((size - 1) * stride for size, stride in zip(tensor.size(), tensor.stride(), strict=True))
    return start, start + span + 1
