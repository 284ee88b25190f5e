"""Every table, chart and file LoRAct's tools write (the ``report`` extra: rich, matplotlib).

:class:`MemoryReport`: the monitor's per-module activation memory over a fit (accumulated,
combined across ranks, printed and written); :func:`print_rank_profile` and
:func:`write_rank_profile`: ``loract profile``'s table, files and proposed ``layers:`` block.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loract_lightning.rank_profile import CANDIDATE_FRACTIONS, TARGET_ERRORS, RankProfile
from loract_lightning.stats import CompressionStats

COLUMNS = ("module", "saved_bytes", "stored_bytes", "ratio", "ranks", "error_mean", "error_max")

# What prints the report tables (rich) and draws the charts (matplotlib): the `report` extra.
REPORT_PACKAGES = ("rich", "matplotlib")


def require_report_packages(user: str) -> None:
    """Raise :class:`ModuleNotFoundError` naming the ``report`` extra if rich or matplotlib is
    missing: ``user`` calls this when it is built, not when its report is due after a long run."""
    missing = [name for name in REPORT_PACKAGES if not _importable(name)]
    if missing:
        raise ModuleNotFoundError(
            f"{user} prints its table with rich and draws its chart with matplotlib; not installed: "
            f'{", ".join(missing)}. Install them with: pip install "loract-lightning[report]"',
            name=missing[0],
        )


def _importable(name: str) -> bool:
    if name in sys.modules:  # None there means "known missing" to the import system
        return sys.modules[name] is not None
    return importlib.util.find_spec(name) is not None


@dataclass
class _ModuleTotals:
    saved_bytes: float = 0.0
    stored_bytes: float = 0.0
    ranks: set[int] = field(default_factory=set)
    error_sum: float = 0.0
    error_count: int = 0
    error_max: float = 0.0


@dataclass
class MemoryReport:
    """Module totals over the observed training steps and the peak memory at each logged step."""

    peak_label: str = "peak memory"
    steps: int = 0
    modules: dict[str, _ModuleTotals] = field(default_factory=dict)
    peaks: list[tuple[int, float]] = field(default_factory=list)

    def add_step(
        self, stats: CompressionStats, step: int, peak_bytes: float, errors: dict[str, list[float]] | None = None
    ) -> None:
        """Add one training step: its stats, peak memory and the relative errors measured per module."""
        self.steps += 1
        self.peaks.append((step, peak_bytes))
        for name, memory in stats.modules.items():
            totals = self.modules.setdefault(name, _ModuleTotals())
            totals.saved_bytes += memory.saved_bytes
            totals.stored_bytes += memory.stored_bytes
            totals.ranks |= memory.ranks
        for name, module_errors in (errors or {}).items():
            totals = self.modules.setdefault(name, _ModuleTotals())
            totals.error_sum += sum(module_errors)
            totals.error_count += len(module_errors)
            totals.error_max = max([totals.error_max, *module_errors])

    def reduce_across_ranks(self, strategy, names: list[str]) -> None:
        """Average bytes over ranks, take the largest error and peak; ``names`` must match on every rank."""
        if strategy.world_size <= 1:
            return
        device = strategy.root_device
        peaks = torch.tensor([peak for _, peak in self.peaks], dtype=torch.float64, device=device)
        peaks = strategy.reduce(peaks, reduce_op="max").tolist()
        self.peaks = [(step, peak) for (step, _), peak in zip(self.peaks, peaks, strict=True)]
        totals = [self.modules.get(name, _ModuleTotals()) for name in names]
        summed = torch.tensor(
            [[t.saved_bytes, t.stored_bytes, t.error_sum, t.error_count] for t in totals],
            dtype=torch.float64,
            device=device,
        )
        summed = strategy.reduce(summed, reduce_op="sum")
        largest = strategy.reduce(torch.tensor([t.error_max for t in totals], device=device), reduce_op="max")
        world = strategy.world_size
        for name, total, row, error_max in zip(names, totals, summed.tolist(), largest.tolist(), strict=True):
            if row[0] == 0 and name not in self.modules:
                continue
            total.saved_bytes, total.stored_bytes = row[0] / world, row[1] / world
            total.error_sum, total.error_count, total.error_max = row[2], int(row[3]), error_max
            self.modules[name] = total

    def rows(self) -> list[dict]:
        """One row per module, bytes per training step, largest saved first."""
        steps = max(self.steps, 1)
        rows = []
        for name, totals in self.modules.items():
            saved, stored = totals.saved_bytes / steps, totals.stored_bytes / steps
            count = totals.error_count
            rows.append(
                {
                    "module": name or "(root)",
                    "saved_bytes": saved,
                    "stored_bytes": stored,
                    "ratio": stored / saved if saved else 1.0,
                    "ranks": _format_ranks(totals.ranks),
                    "error_mean": totals.error_sum / count if count else None,
                    "error_max": totals.error_max if count else None,
                }
            )
        return sorted(rows, key=lambda row: -row["saved_bytes"])

    def print_table(self, top_k: int) -> None:
        from rich.console import Console
        from rich.table import Table

        rows = self.rows()
        table = Table(title=f"Activation memory per training step (top {min(top_k, len(rows))} of {len(rows)} modules)")
        for column in ("module", "saved", "stored", "ratio", "rank", "error mean", "error max"):
            table.add_column(column, justify="left" if column == "module" else "right")
        for row in rows[:top_k]:
            table.add_row(
                row["module"],
                format_bytes(row["saved_bytes"]),
                format_bytes(row["stored_bytes"]),
                f"{row['ratio']:.3f}",
                row["ranks"] or "-",
                _format_error(row["error_mean"]),
                _format_error(row["error_max"]),
            )
        saved = sum(row["saved_bytes"] for row in rows)
        stored = sum(row["stored_bytes"] for row in rows)
        table.add_section()
        table.add_row("total", format_bytes(saved), format_bytes(stored), f"{stored / saved if saved else 1:.3f}")
        Console().print(table)

    def write(self, directory: Path, top_k: int) -> list[Path]:
        """Write ``activation_memory.{csv,json,png}`` into ``directory``; returns their paths."""
        directory.mkdir(parents=True, exist_ok=True)
        rows = self.rows()
        csv_path = directory / "activation_memory.csv"
        with csv_path.open("w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        json_path = directory / "activation_memory.json"
        json_path.write_text(json.dumps({"steps": self.steps, "modules": rows, "peaks": self.peaks}, indent=2))
        png_path = directory / "activation_memory.png"
        self._chart(rows[:top_k], png_path)
        return [csv_path, json_path, png_path]

    def _chart(self, rows: list[dict], path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, (bars, peaks) = plt.subplots(
            1, 2, figsize=(14, max(4.5, 0.38 * len(rows) + 1.5)), gridspec_kw={"width_ratios": [3, 2]}
        )
        unit, scale = _unit(max((row["saved_bytes"] for row in rows), default=1))
        labels = [shorten(row["module"]) for row in rows][::-1]
        positions = range(len(rows))
        height = 0.4
        bars.barh([p + height / 2 for p in positions], [r["saved_bytes"] / scale for r in rows][::-1], height,
                  label="saved (uncompressed)", color="#9aa5b1")  # fmt: skip
        bars.barh([p - height / 2 for p in positions], [r["stored_bytes"] / scale for r in rows][::-1], height,
                  label="stored", color="#2b7bba")  # fmt: skip
        bars.set_yticks(list(positions), labels, fontsize=8)
        bars.set_xlabel(f"activation memory per step ({unit})")
        bars.set_title("Top modules: saved vs stored")
        bars.legend(loc="lower right")
        if self.peaks:
            peak_unit, peak_scale = _unit(max(peak for _, peak in self.peaks))
            peaks.plot([s for s, _ in self.peaks], [p / peak_scale for _, p in self.peaks], marker="o", markersize=3)
            peaks.set_ylabel(f"{self.peak_label} ({peak_unit})")
            peaks.set_ylim(bottom=0)
        else:
            peaks.text(0.5, 0.5, "no training steps", ha="center", va="center", transform=peaks.transAxes)
        peaks.set_xlabel("training step")
        peaks.set_title("Peak memory per training step")
        figure.tight_layout()
        figure.savefig(path, dpi=110)
        plt.close(figure)


# -- the rank profile (``loract profile``) -----------------------------------------------------


def print_rank_profile(profile: RankProfile, top_k: int = 20) -> None:
    """The profile's table: per module, optimal / method error at each candidate rank."""
    from rich.console import Console
    from rich.table import Table

    rows = profile.rows()
    table = Table(
        title=f"Relative error per candidate rank, optimal / {profile.method} (top {min(top_k, len(rows))} of "
        f"{len(rows)} modules by saved bytes)"
    )
    table.add_column("module")
    table.add_column("saved", justify="right")
    for fraction in CANDIDATE_FRACTIONS:
        table.add_column(f"1/{round(1 / fraction)}", justify="right")
    for target in TARGET_ERRORS:
        table.add_column(f"rank for {target}", justify="right")
    for row in rows[:top_k]:
        errors = [f"{o:.2f}/{m:.2f}" for o, m in zip(row["optimal_error"], row["method_error"], strict=True)]
        needed = [f"{row['rank_fraction_needed'][str(t)]:.3f}" for t in TARGET_ERRORS]
        table.add_row(shorten(row["module"]), format_bytes(row["saved_bytes"]), *errors, *needed)
    console = Console()
    if not console.is_terminal:  # a log file: no need to squeeze the table into 80 columns
        console.width = 200
    console.print(table)


def write_rank_profile(
    profile: RankProfile,
    directory: Path,
    layers: dict[str, float | None],
    top_k: int = 12,
    keep_raw: tuple[str, ...] = (),
) -> list[Path]:
    """Write ``rank_profile.json``, ``rank_profile.png`` and ``loract_layers.yaml`` (the proposed
    ``layers`` block) into ``directory``; returns their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = profile.rows()
    data = directory / "rank_profile.json"
    data.write_text(json.dumps({"method": profile.method, "steps": profile.steps, "modules": rows}, indent=2))
    block = directory / "loract_layers.yaml"
    block.write_text(layers_yaml(layers, profile.stored_ratio(layers), keep_raw))
    chart = directory / "rank_profile.png"
    _rank_profile_chart(rows[:top_k], profile.method, chart)
    return [data, block, chart]


def _rank_profile_chart(rows: list[dict], method: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(9, 5.5))
    for index, row in enumerate(rows):
        color = plt.cm.tab20(index % 20)
        axes.plot(row["fractions"], row["method_error"], marker="o", color=color, label=shorten(row["module"], 40))
        axes.plot(row["fractions"], row["optimal_error"], linestyle="--", color=color)
    axes.set_xscale("log", base=2)
    axes.set_xlabel("rank (fraction of the activation's last dimension)")
    axes.set_ylabel("relative error")
    axes.set_title(f"Error vs rank per module: {method} (solid), optimal (dashed)")
    axes.legend(fontsize=7, loc="upper right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def layers_yaml(layers: dict[str, float | None], stored_ratio: float, keep_raw: tuple[str, ...] = ()) -> str:
    """A ``layers:`` block to paste under the LoRAct callback's ``init_args``; the ``keep_raw``
    patterns (the run's own None entries) come first, as the first matching pattern wins."""
    lines = [
        f"# Proposed by `loract profile`; stored / saved bytes of the profiled activations: {stored_ratio:.3f}.",
        "# null keeps a module's activations raw. Paste under the LoRAct callback's init_args.",
        "layers:",
    ]
    lines += [f'  "{pattern}": null' for pattern in keep_raw]
    lines += [f'  "{name}": {"null" if rank is None else repr(rank)}' for name, rank in layers.items()]
    return "\n".join(lines) + "\n"


def _format_ranks(ranks: set[int]) -> str:
    """``"16 32"``; a range once there are many (``rank="auto"`` chooses one per tensor)."""
    ordered = sorted(ranks)
    return " ".join(map(str, ordered)) if len(ordered) <= 3 else f"{ordered[0]}-{ordered[-1]}"


def format_bytes(value: float) -> str:
    unit, scale = _unit(value)
    return f"{value / scale:.1f} {unit}"


def _unit(value: float) -> tuple[str, float]:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= scale:
            return unit, scale
    return "B", 1


def _format_error(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def shorten(name: str, width: int = 48) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1) :]
