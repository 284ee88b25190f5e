"""Every table, chart and file LoRAct's tools write (the ``report`` extra: rich, matplotlib).

:class:`MemoryReport`: the monitor's per-module activation memory over a fit (accumulated,
combined across ranks, printed and written); :func:`print_rank_profile` and
:func:`write_rank_profile`: ``loract profile``'s table, files and proposed ``layers:`` block.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from loract_lightning.rank_profile import CANDIDATE_FRACTIONS, TARGET_ERRORS, RankProfile
from loract_lightning.stats import CompressionStats

if TYPE_CHECKING:
    from collections.abc import Sequence

    from lightning.pytorch.loggers import Logger
    from matplotlib.figure import Figure
    from rich.console import Console

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
    """Module totals over the observed training steps, each step's activation bytes and peak memory.

    Attributes:
        compressed: a LoRAct callback stored the activations; False: the monitor alone measured an
            uncompressed run, where stored equals saved, so the report shows saved bytes only.
        layer_mode: LoRAct checkpointed modules: "saved" is what the checkpointed forward saves.
        peak_label: what ``peaks`` measure (CUDA: all allocated tensors; CPU: the process's resident memory).
        chart_peaks: draw ``peaks`` beside the activation bytes (CUDA); the CPU's process-wide resident
            memory says nothing about activations and stays in the JSON file only.
    """

    peak_label: str = "peak memory"
    compressed: bool = True
    layer_mode: bool = False
    chart_peaks: bool = False
    steps: int = 0
    modules: dict[str, _ModuleTotals] = field(default_factory=dict)
    peaks: list[tuple[int, float]] = field(default_factory=list)
    activations: list[tuple[int, float, float]] = field(default_factory=list)
    """Per step: (step, saved bytes, stored bytes) on this rank."""

    def add_step(
        self, stats: CompressionStats, step: int, peak_bytes: float, errors: dict[str, list[float]] | None = None
    ) -> None:
        """Add one training step: its stats, peak memory and the relative errors measured per module."""
        self.steps += 1
        self.peaks.append((step, peak_bytes))
        self.activations.append((step, float(stats.saved_bytes), float(stats.stored_bytes)))
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
        per_step = torch.tensor([[saved, stored] for _, saved, stored in self.activations], dtype=torch.float64)
        per_step = strategy.reduce(per_step.to(device), reduce_op="mean").tolist()
        steps = [step for step, _, _ in self.activations]
        self.activations = [(step, saved, stored) for step, (saved, stored) in zip(steps, per_step, strict=True)]
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
        """One row per module, bytes per training step, largest saved first; ``ratio`` is stored / saved."""
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

    def title(self, shown: int, total: int, separator: str = ", ") -> str:
        """The table's and chart's title: what was measured, and how many modules are shown."""
        what = "with LoRAct" if self.compressed else "uncompressed (no LoRAct callback)"
        return f"Activation memory per training step{separator}{what} (top {shown} of {total} modules)"

    def notes(self, prefix: str) -> list[str]:
        """What a reader needs to read the table right: the dropped name prefix, what "saved" means."""
        notes = [f"module names under {prefix!r}"] if prefix else []
        if not self.compressed:
            notes.append("saved: what autograd keeps for backward; add LoRAct to store it as low-rank factors")
        elif self.layer_mode:
            notes.append(
                "layer mode: saved = what the checkpointed forward saves (block inputs and what runs outside the "
                "blocks), not what an uncompressed forward saves; stored / saved compares with that"
            )
        return notes

    def print_table(self, top_k: int) -> None:
        """Print the ``top_k`` modules by saved bytes (wide enough for a log file or a pipe)."""
        from rich.table import Table

        rows = self.rows()
        shown = rows[:top_k]
        prefix = common_prefix([row["module"] for row in shown])
        table = Table(title=self.title(len(shown), len(rows)), caption="; ".join(self.notes(prefix)) or None)
        columns = ("module", "saved", "stored", "stored / saved", "rank", "error mean", "error max")
        if not self.compressed:
            columns = ("module", "saved", "share of total")
        for column in columns:
            table.add_column(column, justify="left" if column == "module" else "right")
        saved = sum(row["saved_bytes"] for row in rows)
        stored = sum(row["stored_bytes"] for row in rows)
        for row in shown:
            name = row["module"][len(prefix) :]
            if not self.compressed:
                share = row["saved_bytes"] / saved if saved else 0.0
                table.add_row(name, format_bytes(row["saved_bytes"]), f"{share:.1%}")
                continue
            table.add_row(
                name,
                format_bytes(row["saved_bytes"]),
                format_bytes(row["stored_bytes"]),
                f"{row['ratio']:.3f}",
                row["ranks"] or "-",
                _format_error(row["error_mean"]),
                _format_error(row["error_max"]),
            )
        table.add_section()
        if self.compressed:
            table.add_row("total", format_bytes(saved), format_bytes(stored), f"{stored / saved if saved else 1:.3f}")
        else:
            table.add_row("total", format_bytes(saved), "100.0%")
        report_console().print(table)

    def write(self, directory: Path, top_k: int) -> tuple[list[Path], dict[str, Figure]]:
        """Write ``activation_memory.{csv,json,png}`` into ``directory``; returns their paths and the
        chart (open, for :func:`log_figures`; close it with ``matplotlib.pyplot.close``)."""
        directory.mkdir(parents=True, exist_ok=True)
        rows = self.rows()
        csv_path = directory / "activation_memory.csv"
        with csv_path.open("w", newline="") as out:
            writer = csv.DictWriter(out, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        json_path = directory / "activation_memory.json"
        data = {
            "steps": self.steps,
            "compressed": self.compressed,
            "layer_mode": self.layer_mode,
            "modules": rows,
            "activations_per_step": [{"step": s, "saved_bytes": a, "stored_bytes": b} for s, a, b in self.activations],
            "peak_label": self.peak_label,
            "peaks": self.peaks,
        }
        json_path.write_text(json.dumps(data, indent=2))
        png_path = directory / "activation_memory.png"
        figure = self._chart(rows, top_k)
        figure.savefig(png_path, dpi=110)
        return [csv_path, json_path, png_path], {"activation_memory": figure}

    def _chart(self, all_rows: list[dict], top_k: int) -> Figure:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = all_rows[:top_k]
        prefix = common_prefix([row["module"] for row in rows])
        figure, (bars, steps) = plt.subplots(
            1, 2, figsize=(14, max(4.5, 0.38 * len(rows) + 2)), gridspec_kw={"width_ratios": [3, 2]}
        )
        unit, scale = _unit(max((row["saved_bytes"] for row in rows), default=1))
        labels = [shorten(row["module"][len(prefix) :]) for row in rows][::-1]
        positions = list(range(len(rows)))
        saved = [r["saved_bytes"] / scale for r in rows][::-1]
        if self.compressed:
            height = 0.4
            bars.barh([p + height / 2 for p in positions], saved, height, label="saved", color="#9aa5b1")
            stored = [r["stored_bytes"] / scale for r in rows][::-1]
            bars.barh([p - height / 2 for p in positions], stored, height, label="stored", color="#2b7bba")
            bars.legend(loc="lower right")
        else:
            bars.barh(positions, saved, 0.6, color="#9aa5b1")
        bars.set_yticks(positions, labels, fontsize=8)
        bars.set_xlabel(f"activation memory per step ({unit})")
        bars.set_title(self.title(len(rows), len(all_rows), separator="\n"))
        if self.activations:
            step_unit, step_scale = _unit(max(max(a, b) for _, a, b in self.activations))
            numbers = [s for s, _, _ in self.activations]
            steps.plot(numbers, [a / step_scale for _, a, _ in self.activations], marker="o", markersize=3,
                       color="#9aa5b1", label="activations saved")  # fmt: skip
            if self.compressed:
                steps.plot(numbers, [b / step_scale for _, _, b in self.activations], marker="o", markersize=3,
                           color="#2b7bba", label="activations stored")  # fmt: skip
            steps.set_ylabel(f"activation memory ({step_unit})")
            steps.set_ylim(bottom=0)
            if self.chart_peaks and self.peaks:
                peak_unit, peak_scale = _unit(max(peak for _, peak in self.peaks))
                other = steps.twinx()
                other.plot([s for s, _ in self.peaks], [p / peak_scale for _, p in self.peaks], color="#d95f02",
                           linestyle="--", label=self.peak_label)  # fmt: skip
                other.set_ylabel(f"{self.peak_label} ({peak_unit})", color="#d95f02")
                other.set_ylim(bottom=0)
                other.legend(loc="lower right", fontsize=8)
            steps.legend(loc="lower left", fontsize=8)
        else:
            steps.text(0.5, 0.5, "no training steps", ha="center", va="center", transform=steps.transAxes)
        steps.set_xlabel("training step")
        steps.set_title("Activation memory per training step")
        notes = self.notes(prefix)
        if notes:
            figure.text(0.01, 0.01, "; ".join(notes), fontsize=8, ha="left", va="bottom", wrap=True)
        figure.tight_layout(rect=(0, 0.04 if notes else 0, 1, 1))
        return figure


def log_figures(loggers: Sequence[Logger], figures: dict[str, Figure], files: dict[str, Path], step: int) -> list[str]:
    """Send ``figures`` to the loggers that take images: TensorBoard (``add_figure``), Weights & Biases
    (``log_image``, from the PNG in ``files``) and MLflow (the PNG as an artifact). Returns the kinds
    of logger they went to; other loggers (CSV) have the PNG in their folder already, or nothing."""
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

    sent = []
    for logger in loggers:
        for name, figure in figures.items():
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure(f"loract/{name}", figure, global_step=step, close=False)
                sent.append("tensorboard")
            elif isinstance(logger, WandbLogger):
                logger.log_image(key=f"loract/{name}", images=[str(files[name])], step=step)
                sent.append("wandb")
            elif isinstance(logger, MLFlowLogger):
                logger.experiment.log_artifact(logger.run_id, str(files[name]), artifact_path="loract")
                sent.append("mlflow")
    return sorted(set(sent))


def report_console() -> Console:
    """A rich Console; where stdout is not a terminal (a log file, a pipe) it is 200 columns wide
    rather than rich's 80, so tables are not cut (``COLUMNS`` still sets the width where given)."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=200)
    return console


def common_prefix(names: list[str]) -> str:
    """The dotted prefix all ``names`` share (``"model.base_model.model."``), or "" where none; at
    least one part of each name is left, and a numbered child keeps its container's name."""
    parts = [name.split(".") for name in names if name and name != "(root)"]
    if len(parts) < 2 or len(parts) != len(names):
        return ""
    shared = []
    for pieces in zip(*[p[:-1] for p in parts], strict=False):  # up to the shortest name
        if len(set(pieces)) != 1:
            break
        shared.append(pieces[0])
    # Keep the container of a numbered child ("layers.3.mlp", not "3.mlp").
    while shared and any(p[len(shared)].isdigit() for p in parts):
        shared.pop()
    return ".".join(shared) + "." if shared else ""


# -- the rank profile (``loract profile``) -----------------------------------------------------


def print_rank_profile(profile: RankProfile, top_k: int = 20) -> None:
    """The profile's table: per module, optimal / method error at each candidate rank."""
    from rich.table import Table

    rows = profile.rows()
    shown = rows[:top_k]
    prefix = common_prefix([row["module"] for row in shown])
    table = Table(
        title=f"Relative error per candidate rank, optimal / {profile.method} (top {len(shown)} of "
        f"{len(rows)} modules by saved bytes)",
        caption=f"module names under {prefix!r}" if prefix else None,
    )
    table.add_column("module")
    table.add_column("saved", justify="right")
    for fraction in CANDIDATE_FRACTIONS:
        table.add_column(f"1/{round(1 / fraction)}", justify="right")
    for target in TARGET_ERRORS:
        table.add_column(f"rank for {target}", justify="right")
    for row in shown:
        errors = [f"{o:.2f}/{m:.2f}" for o, m in zip(row["optimal_error"], row["method_error"], strict=True)]
        needed = [f"{row['rank_fraction_needed'][str(t)]:.3f}" for t in TARGET_ERRORS]
        table.add_row(row["module"][len(prefix) :], format_bytes(row["saved_bytes"]), *errors, *needed)
    report_console().print(table)


def write_rank_profile(
    profile: RankProfile,
    directory: Path,
    layers: dict[str, float | None],
    top_k: int = 12,
    keep_raw: tuple[str, ...] = (),
    max_error: float | None = None,
) -> list[Path]:
    """Write ``rank_profile.json``, ``rank_profile.png`` and ``loract_layers.yaml`` (the proposed
    ``layers`` block) into ``directory``; returns their paths. ``max_error``: the error target the
    block was chosen for, marked in the chart (None: it was chosen for a memory budget)."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = profile.rows()
    data = directory / "rank_profile.json"
    data.write_text(json.dumps({"method": profile.method, "steps": profile.steps, "modules": rows}, indent=2))
    block = directory / "loract_layers.yaml"
    block.write_text(layers_yaml(layers, profile.stored_ratio(layers), keep_raw))
    chart = directory / "rank_profile.png"
    figure = rank_profile_chart(rows[:top_k], profile.method, layers, max_error)
    figure.savefig(chart, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return [data, block, chart]


def rank_profile_chart(
    rows: list[dict], method: str, layers: dict[str, float | None], max_error: float | None = None
) -> Figure:
    """A heatmap of modules (rows) x candidate ranks (columns): the method's relative error in each
    cell (the optimum under it), coloured against ``max_error`` (green within it, red beyond), the
    proposed rank of each module boxed, "raw" where none is proposed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import Normalize, TwoSlopeNorm
    from matplotlib.patches import Rectangle

    prefix = common_prefix([row["module"] for row in rows])
    errors = torch.tensor([row["method_error"] for row in rows], dtype=torch.float64).reshape(len(rows), -1)
    figure, axes = plt.subplots(figsize=(9, max(3.5, 0.42 * len(rows) + 2)))
    top = max(float(errors.max()) if errors.numel() else 1.0, 1e-6)
    if max_error is not None and 0 < max_error < top:
        norm = TwoSlopeNorm(vmin=0.0, vcenter=max_error, vmax=top)
    else:
        norm = Normalize(vmin=0.0, vmax=top)
    image = axes.imshow(errors.numpy(), cmap="RdYlGn_r", norm=norm, aspect="auto")
    for i, row in enumerate(rows):
        for j, (error, optimal) in enumerate(zip(row["method_error"], row["optimal_error"], strict=True)):
            axes.text(j, i, f"{error:.2f}\n({optimal:.2f})", ha="center", va="center", fontsize=7)
        chosen = layers.get(row["module"])
        if chosen is None:
            axes.text(len(CANDIDATE_FRACTIONS) - 0.5, i, " raw", ha="left", va="center", fontsize=8, color="#b2182b")
        else:
            j = CANDIDATE_FRACTIONS.index(chosen)
            axes.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", linewidth=2.2))
    axes.set_xticks(range(len(CANDIDATE_FRACTIONS)), [f"1/{round(1 / f)}" for f in CANDIDATE_FRACTIONS])
    axes.set_yticks(range(len(rows)), [shorten(row["module"][len(prefix) :], 44) for row in rows], fontsize=8)
    axes.set_xlabel("rank (fraction of the activation's rank-deciding dimension)")
    target = f"max_error {max_error}: green within it, red beyond; " if max_error is not None else ""
    axes.set_title(
        f"Relative error of {method} per module and rank (optimal in brackets)\n"
        f"{target}boxed: the proposed rank" + (f"; module names under {prefix!r}" if prefix else ""),
        fontsize=10,
    )
    bar = figure.colorbar(image, ax=axes, fraction=0.04, pad=0.08)
    bar.set_label(f"relative error ({method})")
    if max_error is not None and max_error < top:
        bar.ax.axhline(max_error, color="black", linewidth=2)
    figure.tight_layout()
    return figure


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
