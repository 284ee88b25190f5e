"""Which rank does each module need? Spectra of the activations a model saves, per module.

:class:`RankProfile` is fed every activation the engine would factorize (``observe``), and for
each module keeps, at every candidate rank, the best relative error any rank-k factorization can
reach (from the singular values) and the error the configured method really reaches. From those
it proposes a ``layers:`` block, either for an error target or for a memory budget. Printing and
writing it is :mod:`loract_lightning.report`'s job.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from loract_lightning.checks import check_choice, check_fraction
from loract_lightning.linalg import METHODS, RANDOMIZED, relative_error
from loract_lightning.policy import keeps_memory, resolve_rank

CANDIDATE_FRACTIONS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2)
TARGET_ERRORS = (0.1, 0.2, 0.3)


@dataclass
class ModuleSpectrum:
    """Sums over the activations one module saved; residuals are squared Frobenius norms."""

    tensors: int = 0
    saved_bytes: int = 0
    energy: float = 0.0
    optimal_residual: list[float] = field(default_factory=lambda: [0.0] * len(CANDIDATE_FRACTIONS))
    method_residual: list[float] = field(default_factory=lambda: [0.0] * len(CANDIDATE_FRACTIONS))
    stored_bytes: list[int] = field(default_factory=lambda: [0] * len(CANDIDATE_FRACTIONS))
    needed_fraction: dict[float, float] = field(default_factory=lambda: dict.fromkeys(TARGET_ERRORS, 0.0))

    def optimal_errors(self) -> list[float]:
        return [math.sqrt(r / self.energy) if self.energy else 0.0 for r in self.optimal_residual]

    def method_errors(self) -> list[float]:
        return [math.sqrt(r / self.energy) if self.energy else 0.0 for r in self.method_residual]


class RankProfile:
    """Per-module errors at ``CANDIDATE_FRACTIONS`` of each activation's rank-deciding dimension.

    Args:
        method: the factorization measured beside the optimum (a name of ``linalg.METHODS``).
        seed: seed of the method's random generator.
        **method_options: ``power_iters`` / ``oversample`` of the method.
    """

    def __init__(self, method: str = "sampled_qb", seed: int = 0, **method_options: int) -> None:
        check_choice("method", method, sorted(METHODS))
        self.method = method
        self.method_options = method_options
        self.seed = seed
        self.modules: dict[str, ModuleSpectrum] = {}
        self.steps = 0

    def observe(self, module_name: str, matrix: Tensor) -> None:
        """Add one activation (flattened to M x N) saved while ``module_name`` ran."""
        num_rows, num_cols = matrix.shape
        work = matrix.detach().float()
        squares = torch.linalg.svdvals(work).double() ** 2
        energy = float(squares.sum())
        # tail[k] = sum of squared singular values beyond the first k: the best rank-k residual.
        tail = (energy - torch.cumsum(squares, 0)).clamp(min=0).tolist()
        spectrum = self.modules.setdefault(module_name, ModuleSpectrum())
        spectrum.tensors += 1
        spectrum.saved_bytes += matrix.numel() * matrix.element_size()
        spectrum.energy += energy
        factorize = METHODS[self.method]
        options = dict(self.method_options)
        if self.method in RANDOMIZED:
            options["generator"] = torch.Generator(matrix.device).manual_seed(self.seed)
        for index, fraction in enumerate(CANDIDATE_FRACTIONS):
            rank = resolve_rank(fraction, num_rows, num_cols)
            spectrum.optimal_residual[index] += tail[rank - 1]
            with torch.no_grad():
                left, right = factorize(matrix.detach(), rank, **options)
            spectrum.method_residual[index] += relative_error(matrix, left, right) ** 2 * energy
            kept = rank * (num_rows + num_cols) if keeps_memory(rank, num_rows, num_cols) else num_rows * num_cols
            spectrum.stored_bytes[index] += kept * matrix.element_size()
        base = min(num_rows, num_cols)  # what a float rank is a fraction of
        for target in TARGET_ERRORS:
            rank = next((k + 1 for k, residual in enumerate(tail) if residual <= target**2 * energy), base)
            spectrum.needed_fraction[target] = max(spectrum.needed_fraction[target], rank / base)

    # -- choosing ranks ------------------------------------------------------------------------

    def layers_for_error(self, max_error: float) -> dict[str, float | None]:
        """Per module, the smallest candidate rank at which the method's error is at most
        ``max_error``; None (keep raw) where no candidate reaches it."""
        check_fraction("max_error", max_error)
        layers = {}
        for name, spectrum in self.modules.items():
            errors = spectrum.method_errors()
            layers[name] = next((f for f, e in zip(CANDIDATE_FRACTIONS, errors, strict=True) if e <= max_error), None)
        return layers

    def layers_for_budget(self, memory_budget: float) -> dict[str, float | None]:
        """Ranks whose stored bytes fit in ``memory_budget`` x the saved bytes of these modules,
        spending the bytes where they cut the (size-weighted) squared error most."""
        check_fraction("memory_budget", memory_budget)
        # Options per module, cheapest first: each candidate fraction, then raw (no error).
        options = {}
        for name, spectrum in self.modules.items():
            losses = [error**2 * spectrum.saved_bytes for error in spectrum.method_errors()]
            options[name] = [*zip(CANDIDATE_FRACTIONS, spectrum.stored_bytes, losses, strict=True)]
            options[name].append((None, spectrum.saved_bytes, 0.0))
        choice = dict.fromkeys(options, 0)
        budget = memory_budget * sum(s.saved_bytes for s in self.modules.values())
        spent = sum(options[name][0][1] for name in options)
        while True:
            best, best_gain = None, 0.0
            for name, index in choice.items():
                if index + 1 == len(options[name]):
                    continue
                (_, size, loss), (_, next_size, next_loss) = options[name][index], options[name][index + 1]
                if spent + next_size - size > budget:
                    continue
                gain = (loss - next_loss) / max(next_size - size, 1)
                if gain > best_gain:
                    best, best_gain = name, gain
            if best is None:
                break
            spent += options[best][choice[best] + 1][1] - options[best][choice[best]][1]
            choice[best] += 1
        return {name: options[name][index][0] for name, index in choice.items()}

    def stored_ratio(self, layers: dict[str, float | None]) -> float:
        """Stored / saved bytes of the profiled activations under ``layers``."""
        saved = stored = 0
        for name, spectrum in self.modules.items():
            saved += spectrum.saved_bytes
            fraction = layers.get(name)
            if fraction is None:
                stored += spectrum.saved_bytes
            else:
                stored += spectrum.stored_bytes[CANDIDATE_FRACTIONS.index(fraction)]
        return stored / saved if saved else 1.0

    # -- reporting -----------------------------------------------------------------------------

    def rows(self) -> list[dict]:
        """One row per module, largest saved bytes first; bytes are per training step."""
        steps = max(self.steps, 1)
        rows = []
        for name, spectrum in sorted(self.modules.items(), key=lambda item: -item[1].saved_bytes):
            rows.append({
                "module": name,
                "tensors_per_step": spectrum.tensors / steps,
                "saved_bytes": spectrum.saved_bytes / steps,
                "fractions": list(CANDIDATE_FRACTIONS),
                "optimal_error": spectrum.optimal_errors(),
                "method_error": spectrum.method_errors(),
                "stored_bytes": [b / steps for b in spectrum.stored_bytes],
                "rank_fraction_needed": {str(t): f for t, f in spectrum.needed_fraction.items()},
            })  # fmt: skip
        return rows
