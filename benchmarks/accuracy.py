"""Full fine-tuning runs of the shipped configs over several seeds: accuracy and memory, mean ± std.

Each run is ``python -m loract_lightning.cli fit --config <config>`` with its own seed and log
folder, ``<config>`` being the shipped run (``task/variant``, see ``examples/configs.py``) as
LightningCLI merges it, with the settings under study changed. Its metrics come from the run's CSV
log: the last logged value of every ``val_*`` metric (validation after the last epoch), and the
``test_*``/``best_*`` metrics that the configs' ``BestValidationTest`` logs (the test split scored
with the best validation epoch's weights); the activation memory ratio (stored / saved bytes,
averaged over training steps) from LoRAct's ``loract/ratio`` metric (1.0 for a run without LoRAct).
Arguments it does not know go to every run. ``--grid KEY=V1,V2`` runs every config once per value of
a setting (a dotted path in the YAML; several ``--grid`` make a product); ``--ranks`` is the
shorthand for the LoRAct callback's rank (the accuracy-vs-rank study).

    python benchmarks/accuracy.py --configs text/baseline text/loract text/loract_layer --seeds 0 1 2 \
        --columns test_accuracy test_macro_f1 best_val_accuracy val_accuracy \
        --trainer.max_epochs=1 --data.init_args.max_train_samples=6400 --trainer.val_check_interval=0.5
    python benchmarks/accuracy.py --configs text/loract --ranks 0.0625 0.25 0.5 --seeds 0 1 2
    python benchmarks/accuracy.py --configs text/baseline --grid model.init_args.lr=3e-4,1e-3
"""

from __future__ import annotations

import argparse
import copy
import csv
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import yaml

from examples.configs import resolved_config

ROOT = Path(__file__).resolve().parent.parent
LORACT_CLASS = "loract_lightning.LoRAct"


@dataclass(frozen=True)
class Run:
    config: str
    settings: tuple[tuple[str, object], ...]  # (dotted key, value) pairs changed from the config
    seed: int

    @property
    def variant(self) -> str:
        return " ".join([self.config, *(f"{key.rsplit('.', 1)[-1]}={value}" for key, value in self.settings)])

    @property
    def name(self) -> str:
        return "-".join(
            [self.config.replace("/", "_"), *(f"{key.rsplit('.', 1)[-1]}{value}" for key, value in self.settings)]
        ) + (f"-s{self.seed}")


def has_loract(config: dict) -> bool:
    return any(callback.get("class_path") == LORACT_CLASS for callback in config["trainer"].get("callbacks") or [])


def with_settings(config: dict, settings: tuple[tuple[str, object], ...]) -> dict:
    """A copy of ``config`` with each dotted key set; ``rank`` alone means the LoRAct callback's."""
    config = copy.deepcopy(config)
    for key, value in settings:
        if key == "rank":
            for callback in config["trainer"]["callbacks"]:
                if callback.get("class_path") == LORACT_CLASS:
                    callback.setdefault("init_args", {})["rank"] = value
            continue
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        node[leaf] = value
    return config


def parse_grid(entries: list[str]) -> list[tuple[str, list]]:
    """``["model.init_args.lr=1e-3,3e-3"]`` -> ``[("model.init_args.lr", [0.001, 0.003])]``."""
    grid = []
    for entry in entries:
        key, separator, values = entry.partition("=")
        if not separator or not key or not values:
            raise SystemExit(f"--grid {entry!r}: expected KEY=V1,V2,... (KEY a dotted path in the config)")
        grid.append((key, [parse_value(value) for value in values.split(",")]))
    return grid


def parse_value(text: str) -> object:
    """A number where the text is one (YAML would read ``3e-4`` as a string), else YAML's reading."""
    for number in (int, float):
        try:
            return number(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def launch(run: Run, config: dict, log_dir: Path, threads: int, extra: list[str]) -> dict:
    """Fit one run in a subprocess; its final validation metrics and memory ratio."""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        yaml.safe_dump(config, handle)
    command = [
        sys.executable, "-m", "loract_lightning.cli", "fit", "--config", handle.name,
        f"--seed_everything={run.seed}",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.save_dir={log_dir}", f"--trainer.logger.name={run.name}", "--trainer.logger.version=0",
        "--trainer.enable_progress_bar=false", "--trainer.enable_checkpointing=false", *extra,
    ]  # fmt: skip
    environment = dict(os.environ, OMP_NUM_THREADS=str(threads))
    finished = subprocess.run(command, cwd=ROOT, env=environment, capture_output=True, text=True)
    os.unlink(handle.name)
    if finished.returncode != 0:
        raise RuntimeError(f"{run.name} failed (exit {finished.returncode}):\n{finished.stderr[-3000:]}")
    return read_metrics(log_dir / run.name / "version_0" / "metrics.csv", compressed=has_loract(config))


REPORTED = ("val_", "test_", "best_")
"""Prefixes of the logged metrics a run reports (last logged value of each)."""


def read_metrics(path: Path, compressed: bool) -> dict:
    """The last logged value of every metric named with a ``REPORTED`` prefix, and the mean of
    ``loract/ratio``."""
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    final: dict[str, float] = {}
    ratios = []
    for row in rows:
        for key, value in row.items():
            if value and key.startswith(REPORTED):
                final[key] = float(value)
        if row.get("loract/ratio"):
            ratios.append(float(row["loract/ratio"]))
    # A LoRAct run that logged no training step (too short) has no measured ratio.
    final["memory_ratio"] = statistics.mean(ratios) if ratios else (float("nan") if compressed else 1.0)
    return final


def summarize(results: dict[str, list[dict]]) -> list[dict]:
    """Per variant: mean and standard deviation of every metric over its seeds."""
    table = []
    for variant, runs in results.items():
        row: dict = {"variant": variant, "seeds": len(runs)}
        for key in runs[0]:
            values = [run[key] for run in runs]
            row[key] = statistics.mean(values)
            row[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        table.append(row)
    return table


def print_table(table: list[dict], columns: list[str] | None = None) -> None:
    """A markdown table: one row per variant, ``columns`` (default: every reported metric) as mean ± std."""
    reported = sorted({key for row in table for key in row if key.startswith(REPORTED) and not key.endswith("_std")})
    metrics = columns or reported
    print("| run | seeds | " + " | ".join(metrics) + " | memory ratio |")
    print("|---|---|" + "---|" * len(metrics) + "---|")
    for row in table:
        cells = [f"{row[key]:.4f} ± {row[key + '_std']:.4f}" if key in row else "" for key in metrics]
        print(f"| {row['variant']} | {row['seeds']} | " + " | ".join(cells) + f" | {row['memory_ratio']:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", required=True, help="shipped runs, task/variant: text/loract")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--ranks", nargs="*", type=float, default=[], help="ranks to run for LoRAct configs")
    parser.add_argument("--grid", nargs="*", default=[], help="KEY=V1,V2: run each value of a config setting")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--columns", nargs="*", default=None, help="metrics to print (default: all val_/test_/best_)")
    parser.add_argument("--logs", type=Path, default=ROOT / "benchmarks" / "results" / "accuracy_logs")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "accuracy.json")
    parser.add_argument("extra", nargs="*", help="passed to every run, e.g. --trainer.accelerator=cuda")
    args, unknown = parser.parse_known_args()
    extra = args.extra + unknown
    configs = {}
    for name in args.configs:
        try:
            configs[name] = resolved_config(name)
        except ValueError as error:
            parser.error(f"--configs: {error}")
    grid = parse_grid(args.grid)
    runs = []
    for name, config in configs.items():
        config_grid = grid + ([("rank", args.ranks)] if args.ranks and has_loract(config) else [])
        keys = [key for key, _ in config_grid]
        for values in itertools.product(*(values for _, values in config_grid)):
            runs += [Run(name, tuple(zip(keys, values, strict=True)), seed) for seed in args.seeds]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)

    def fit(run: Run) -> tuple[Run, dict]:
        config = with_settings(configs[run.config], run.settings)
        metrics = launch(run, config, args.logs, threads, extra)
        print(f"{run.name}: " + ", ".join(f"{key}={value:.4f}" for key, value in metrics.items()), flush=True)
        return run, metrics

    results: dict[str, list[dict]] = {}
    per_run = {}
    with ThreadPoolExecutor(args.jobs) as pool:
        for run, metrics in pool.map(fit, runs):
            results.setdefault(run.variant, []).append(metrics)
            per_run[run.name] = metrics
    table = summarize(results)
    print()
    print_table(table, args.columns)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": per_run, "summary": table}, indent=2))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
