"""What one compressed forward saved, stored and spent."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class ModuleMemory:
    """Activation bytes attributed to the module that was running when autograd saved them."""

    saved_bytes: int = 0
    stored_bytes: int = 0
    compressed: int = 0
    ranks: set[int] = field(default_factory=set)

    @property
    def ratio(self) -> float:
        return self.stored_bytes / self.saved_bytes if self.saved_bytes else 1.0


@dataclass
class CompressionStats:
    """Counters for one forward pass under :func:`~loract_lightning.compress_activations`.

    Attributes:
        saved_bytes: bytes of the distinct storages of the activations autograd saved, before
            compression (parameters and buffers excluded; a storage saved several times counts once).
            In default mode that is what an uncompressed forward saves; in layer mode it is what the
            checkpointed forward saves (the checkpointed modules' inputs and what runs outside
            them), which is already less than an uncompressed forward's.
        stored_bytes: bytes really held for them afterwards: factors plus storages kept raw.
        compressed: saved tensors replaced by newly computed factors.
        rank_sum: the sum of their ranks (``mean_rank`` is the average; with ``rank="auto"`` it
            shows the ranks chosen).
        shared: saved tensors answered by a region already packed from the same storage.
        masks: two-valued tensors (float dropout masks) stored exactly, one bit per value.
        kept: saved tensors kept raw, counted by reason (see ``loract_lightning.policy``).
        compress_seconds: wall time spent in factorizations (on CUDA: launch time, not kernel time).
        modules: the bytes above per qualified module name.
    """

    saved_bytes: int = 0
    stored_bytes: int = 0
    compressed: int = 0
    rank_sum: int = 0
    shared: int = 0
    masks: int = 0
    kept: Counter[str] = field(default_factory=Counter)
    compress_seconds: float = 0.0
    modules: dict[str, ModuleMemory] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """``stored_bytes / saved_bytes`` of the same forward (1.0 if nothing was saved): ``loract/ratio``.

        It compares with what that forward saved: in layer mode, with the checkpointed forward's
        bytes, so it is not the saving against uncompressed training and does not compare with a
        default-mode ratio. For that saving, divide ``stored_bytes`` by the ``saved_bytes`` of an
        uncompressed run of the same batch (``ActivationMemoryMonitor`` alone, or
        ``compress_activations(model, compress=False)``).
        """
        return self.stored_bytes / self.saved_bytes if self.saved_bytes else 1.0

    @property
    def mean_rank(self) -> float:
        """Average rank of the factorizations (0.0 if none)."""
        return self.rank_sum / self.compressed if self.compressed else 0.0

    def module(self, name: str) -> ModuleMemory:
        if name not in self.modules:
            self.modules[name] = ModuleMemory()
        return self.modules[name]

    def add_saved(self, module_name: str, nbytes: int) -> None:
        self.saved_bytes += nbytes
        self.module(module_name).saved_bytes += nbytes

    def add_stored(self, module_name: str, nbytes: int) -> None:
        self.stored_bytes += nbytes
        self.module(module_name).stored_bytes += nbytes

    def add_factors(self, module_name: str, rank: int) -> None:
        self.compressed += 1
        self.rank_sum += rank
        module = self.module(module_name)
        module.compressed += 1
        module.ranks.add(rank)

    def merge(self, other: CompressionStats) -> CompressionStats:
        """Add ``other`` (another forward of the same step, e.g. under manual optimization) into this."""
        self.saved_bytes += other.saved_bytes
        self.stored_bytes += other.stored_bytes
        self.compressed += other.compressed
        self.rank_sum += other.rank_sum
        self.shared += other.shared
        self.masks += other.masks
        self.kept.update(other.kept)
        self.compress_seconds += other.compress_seconds
        for name, memory in other.modules.items():
            mine = self.module(name)
            mine.saved_bytes += memory.saved_bytes
            mine.stored_bytes += memory.stored_bytes
            mine.compressed += memory.compressed
            mine.ranks |= memory.ranks
        return self

    def __str__(self) -> str:
        mib = 2**20
        kept = ", ".join(f"{reason}={count}" for reason, count in sorted(self.kept.items())) or "none"
        return (
            f"saved {self.saved_bytes / mib:.1f} MiB -> stored {self.stored_bytes / mib:.1f} MiB "
            f"(ratio {self.ratio:.3f}); compressed {self.compressed} (mean rank {self.mean_rank:.1f}), "
            f"shared {self.shared}, masks {self.masks}, "
            f"kept raw: {kept}; {self.compress_seconds * 1e3:.1f} ms compressing"
        )
