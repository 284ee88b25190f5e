"""What the pack hook stores in place of a saved activation, and how unpack rebuilds it.

A :class:`StoredRegion` stands for one saved tensor's stretch of a storage, in compact form:

- :class:`LowRankFactors`: ``L`` (M x k) and ``R`` (k x N) with ``A ~ L @ R`` (lossy);
- :class:`TwoValuedMask`: a bool tensor and two scalars for a tensor that holds only two values,
  such as the float ``{0, 1/(1-p)}`` dropout mask the CPU saves (exact; a mask is full rank, so
  it is never factorized).

Several saved tensors may read one region (q/k/v projections read one input; ``linear`` saves a
2-D view of the 3-D tensor that ``layer_norm`` saved), so each saved tensor gets its own small
:class:`PackedTensor` recording its view (size, stride, offset) onto the shared region.
Unpack can be called any number of times (``retain_graph``, double backward) and never
consumes the region. Within one backward, the views of a shared region reuse one rebuild: the
region keeps its rebuilt tensor until each of its views has been unpacked once, as the original
storage was shared (on Llama, 22 of 86 rebuilds were repeats, 8.7 GFLOP a step, most of it
the logits that ``nll_loss`` and ``log_softmax`` both save).

In-place writes: autograd skips its version check for tensors that pass through saved-tensor
hooks, so the check is done here. Each region keeps a :func:`version_probe` of its source (an
empty tensor sharing the source's version counter, not its memory) and a tensor kept raw is a
:class:`RawTensor`; unpacking either after the source was modified in place raises the error
PyTorch itself raises.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor


def version_probe(tensor: Tensor) -> Tensor:
    """An empty tensor that shares ``tensor``'s version counter but holds none of its memory.

    Any later in-place write to ``tensor`` (or to a view of it) shows in the probe's ``_version``,
    while the activation itself can be freed once it is compressed. ``set_()`` bumps the shared
    counter; it is put back at once, so nothing else sees a change.
    """
    version = tensor._version
    probe = tensor.detach()
    with torch.no_grad():
        probe.set_()
    torch._C._autograd._unsafe_set_version_counter((probe,), (version,))
    return probe


def check_version(current: Tensor, version: int, size: torch.Size) -> None:
    """Raise PyTorch's own error if ``current`` (the saved tensor or its probe) was written in place."""
    if current._version != version:
        raise RuntimeError(
            "one of the variables needed for gradient computation has been modified by an inplace "
            f"operation: [{current.type()} {list(size)}] is at version {current._version}; expected version "
            f"{version} instead. (Checked by LoRAct, since autograd does not check tensors that pass "
            "through saved-tensor hooks.) Hint: enable anomaly detection to find the operation that "
            "failed to compute its gradient, with torch.autograd.set_detect_anomaly(True)."
        )


@dataclass(eq=False)
class RawTensor:
    """A saved tensor kept as it is (detached), with the version it had when it was saved."""

    tensor: Tensor
    version: int

    def unpack(self) -> Tensor:
        check_version(self.tensor, self.version, self.tensor.size())
        return self.tensor


@dataclass(eq=False)
class HandedOn:
    """A tensor kept raw, handed to the saved-tensor hooks that were in place before LoRAct's
    (the user's ``save_on_cpu``): they store it as they would without LoRAct."""

    packed: object
    unpack_hook: Callable[[object], Tensor]
    source_version: Tensor
    """:func:`version_probe` of the tensor (the hooks may keep a copy, which never changes)."""
    version: int
    size: torch.Size

    def unpack(self) -> Tensor:
        check_version(self.source_version, self.version, self.size)
        return self.unpack_hook(self.packed)


@dataclass(eq=False)
class StoredRegion:
    """Layout of the tensor a region was built from, so it can be rebuilt exactly.

    ``contiguous`` says that tensor was row-major with no gaps, so the rebuilt buffer has the
    same linear layout as the original storage stretch and any view inside it can be rebuilt
    with ``as_strided``; otherwise only the very same view can share the region.
    """

    storage_offset: int
    size: torch.Size
    stride: tuple[int, ...]
    contiguous: bool
    version: int
    dtype: torch.dtype
    source_version: Tensor = field(repr=False)
    """:func:`version_probe` of the tensor the region was built from."""
    views_to_unpack: int = field(default=0, init=False, repr=False)
    """Views packed onto this region that have not been unpacked yet."""
    _shared_rebuild: tuple[object, Tensor] | None = field(default=None, init=False, repr=False)

    @classmethod
    def layout_of(cls, tensor: Tensor) -> dict:
        return {
            "storage_offset": tensor.storage_offset(),
            "size": tensor.size(),
            "stride": tensor.stride(),
            "contiguous": tensor.is_contiguous(),
            "version": tensor._version,
            "dtype": tensor.dtype,
            "source_version": version_probe(tensor),
        }

    @property
    def nbytes(self) -> int:
        raise NotImplementedError

    def dense(self) -> Tensor:
        """The stored values as a contiguous tensor of shape ``size``."""
        raise NotImplementedError

    def covers(self, tensor: Tensor) -> bool:
        """Whether ``tensor`` (a view of the same storage) can be rebuilt from this region."""
        if tensor._version != self.version or tensor.dtype != self.dtype:
            return False
        if not self.contiguous:
            same_view = tensor.size() == self.size and tensor.stride() == self.stride
            return same_view and tensor.storage_offset() == self.storage_offset
        start, end = view_extent(tensor)
        return self.storage_offset <= start and end <= self.storage_offset + self.size.numel()

    def rebuild(self) -> Tensor:
        """The stored values in the original tensor's own shape and strides."""
        dense = self.dense()
        if self.contiguous:
            return dense
        exact = torch.empty_strided(self.size, self.stride, dtype=dense.dtype, device=dense.device)
        return exact.copy_(dense)

    def rebuild_for_view(self) -> Tensor:
        """:meth:`rebuild`, shared by the views of this region until each has been unpacked once.

        The rebuilt tensor is reused only on the stream that made it: another stream could see
        its memory handed out again while still reading it.
        """
        shared = self._shared_rebuild
        reusable = shared is not None and shared[0] == _current_stream(shared[1].device)
        rebuilt = shared[1] if reusable else self.rebuild()
        self.views_to_unpack -= 1
        # Once every view has had it (or on a repeated backward), nothing is kept.
        keep = self.views_to_unpack > 0
        self._shared_rebuild = (_current_stream(rebuilt.device), rebuilt) if keep else None
        return rebuilt


@dataclass(eq=False)
class LowRankFactors(StoredRegion):
    """``left`` (M x k) @ ``right`` (k x N) approximates the region, viewed as M x N.

    With a ``base`` (``block_deltas``: the previous block's input), the factors approximate the
    difference from the base's rebuilt matrix, which is added back; ``row_scale`` (M x 1), when
    set, then rescales each rebuilt row to its original norm. The factors may be narrower than
    the region (``factor_dtype``): the product is cast back. ``ready``: on CUDA, when the factors
    were computed on a side stream, the event recorded there once they were done; rebuilding
    waits for it on the stream that rebuilds.
    """

    left: Tensor
    right: Tensor
    ready: torch.cuda.Event | None = None
    base: LowRankFactors | None = None
    row_scale: Tensor | None = None
    _handed_down: Tensor | None = field(default=None, init=False, repr=False)
    """This region's matrix, left by its successor's rebuild (see :meth:`matrix`)."""

    @property
    def rank(self) -> int:
        return self.left.shape[1]

    @property
    def nbytes(self) -> int:
        """The bytes this region holds (a base's factors are counted by the base)."""
        return self.left.nbytes + self.right.nbytes + (self.row_scale.nbytes if self.row_scale is not None else 0)

    def matrix(self, hand_down: bool = False) -> Tensor:
        """The M x N approximation, through the base's rebuild for a delta.

        ``hand_down`` (a rebuild in backward): leave the base's matrix on the base for its own
        rebuild, which comes next, since autograd rebuilds checkpointed blocks in reverse order.
        Each rebuild then costs one product instead of one per predecessor.
        """
        self._wait_until_ready()
        if self._handed_down is not None:
            rebuilt, self._handed_down = self._handed_down, None
            if hand_down and self.base is not None:
                self.base._handed_down = self._base_matrix_from(rebuilt)
            return rebuilt
        base_matrix = None
        if self.base is not None:
            base_matrix = self.base.matrix()
            if hand_down:
                self.base._handed_down = base_matrix
        return low_rank_product(self.left, self.right, base_matrix, self.row_scale)

    def _base_matrix_from(self, rebuilt: Tensor) -> Tensor | None:
        """The base's matrix recovered from this region's (None where a row was scaled to zero)."""
        if self.row_scale is not None and not bool((self.row_scale > 0).all()):
            return None
        unscaled = rebuilt if self.row_scale is None else rebuilt / self.row_scale
        return unscaled - self.left @ self.right

    def _wait_until_ready(self) -> None:
        if self.ready is None:
            return
        stream = torch.cuda.current_stream(self.left.device)
        stream.wait_event(self.ready)
        # The factors were allocated on the side stream: once freed, their memory must not be
        # handed out again before this stream has read them.
        for tensor in (self.left, self.right, self.row_scale):
            if tensor is not None:
                tensor.record_stream(stream)

    def dense(self) -> Tensor:
        return self.matrix(hand_down=True).to(self.dtype).view(self.size)


@dataclass(eq=False)
class TwoValuedMask(StoredRegion):
    """A region holding only ``low`` and ``high``: stored exactly, one bit per value
    (:func:`pack_bits`; a dropout mask of a float32 activation keeps 1/32 of its bytes)."""

    bits: Tensor
    low: float
    high: float

    @property
    def nbytes(self) -> int:
        return self.bits.nbytes

    def dense(self) -> Tensor:
        high = torch.tensor(self.high, dtype=self.dtype, device=self.bits.device)
        low = torch.tensor(self.low, dtype=self.dtype, device=self.bits.device)
        return torch.where(unpack_bits(self.bits, self.size.numel()), high, low).view(self.size)


_BIT_VALUES: dict[torch.device, Tensor] = {}


def _bit_values(device: torch.device) -> Tensor:
    """1, 2, 4, ..., 128 as uint8 on ``device`` (made once per device, on it)."""
    if device not in _BIT_VALUES:
        _BIT_VALUES[device] = torch.bitwise_left_shift(
            torch.ones(8, dtype=torch.uint8, device=device), torch.arange(8, dtype=torch.uint8, device=device)
        )
    return _BIT_VALUES[device]


def pack_bits(flags: Tensor) -> Tensor:
    """A bool tensor as uint8 bytes, eight flags a byte in order (the last byte padded with False)."""
    flat = flags.reshape(-1)
    if padding := -flat.numel() % 8:
        flat = torch.cat([flat, flat.new_zeros(padding)])
    return (flat.view(-1, 8).to(torch.uint8) * _bit_values(flat.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(bits: Tensor, count: int) -> Tensor:
    """The first ``count`` flags of :func:`pack_bits`' bytes, as a flat bool tensor."""
    return bits.unsqueeze(-1).bitwise_and(_bit_values(bits.device)).ne(0).view(-1)[:count]


@dataclass(eq=False)
class PackedTensor:
    """One saved tensor, stored as a view onto a (possibly shared) :class:`StoredRegion`."""

    region: StoredRegion
    size: torch.Size
    stride: tuple[int, ...]
    storage_offset: int

    @classmethod
    def view_of(cls, region: StoredRegion, tensor: Tensor) -> PackedTensor:
        region.views_to_unpack += 1
        return cls(region, tensor.size(), tensor.stride(), tensor.storage_offset())

    def unpack(self) -> Tensor:
        check_version(self.region.source_version, self.region.version, self.size)
        rebuilt = self.region.rebuild_for_view()
        if self.region.contiguous:
            offset = self.storage_offset - self.region.storage_offset
            rebuilt = rebuilt.view(-1).as_strided(self.size, self.stride, offset)
        return rebuilt


def low_rank_product(
    left: Tensor, right: Tensor, base_matrix: Tensor | None = None, row_scale: Tensor | None = None
) -> Tensor:
    """``left @ right``, plus ``base_matrix`` for a delta, each row times ``row_scale`` when given:
    what :class:`LowRankFactors` rebuilds, and what the compressor compares before storing a delta."""
    product = left @ right
    if base_matrix is not None:
        product = product + base_matrix
    return product if row_scale is None else product * row_scale


def view_extent(tensor: Tensor) -> tuple[int, int]:
    """The half-open range of storage elements ``[start, end)`` that ``tensor`` can touch."""
    start = tensor.storage_offset()
    if tensor.numel() == 0:
        return start, start
    span = sum((size - 1) * stride for size, stride in zip(tensor.size(), tensor.stride(), strict=True))
    return start, start + span + 1


def _current_stream(device: torch.device) -> torch.cuda.Stream | None:
    return torch.cuda.current_stream(device) if device.type == "cuda" else None
