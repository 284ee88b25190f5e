"""Full fine-tuning runs of the shipped configs over several seeds: accuracy and memory, mean ± std.

Each run is ``python -m loract_lightning.cli fit --config <config>`` with its own seed and log
folder; the final validation metrics come from the run's CSV log, the activation memory ratio
(stored / saved bytes, averaged over training steps) from LoRAct's ``loract/ratio`` metric
(1.0 for a run without LoRAct). ``--ranks`` adds, for every LoRAct config, one variant per rank
(the accuracy-vs-rank study).

    python benchmarks/accuracy.py --configs text_baseline text_loract text_loract_layer --seeds 0 1 2
    python benchmarks/accuracy.py --configs text_loract --ranks 0.0625 0.25 0.5 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import csv
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

ROOT = Path(__file__).resolve().parent.parent
LORACT_CLASS = "loract_lightning.LoRAct"


@dataclass(frozen=True)
class Run:
    config: str
    rank: float | None  # None: the config's own rank
    seed: int

    @property
    def variant(self) -> str:
        return self.config if self.rank is None else f"{self.config} rank={self.rank:g}"

    @property
    def name(self) -> str:
        suffix = "" if self.rank is None else f"-r{self.rank:g}"
        return f"{self.config}{suffix}-s{self.seed}"


def has_loract(config: dict) -> bool:
    return any(callback.get("class_path") == LORACT_CLASS for callback in config["trainer"].get("callbacks") or [])


def with_rank(config: dict, rank: float) -> dict:
    """A copy of ``config`` whose LoRAct callback uses ``rank``."""
    config = json.loads(json.dumps(config))
    for callback in config["trainer"]["callbacks"]:
        if callback.get("class_path") == LORACT_CLASS:
            callback.setdefault("init_args", {})["rank"] = rank
    return config


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


def read_metrics(path: Path, compressed: bool) -> dict:
    """The last logged value of every ``val_*`` metric, and the mean of ``loract/ratio``."""
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    final: dict[str, float] = {}
    ratios = []
    for row in rows:
        for key, value in row.items():
            if value and key.startswith("val_"):
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


def print_table(table: list[dict]) -> None:
    metrics = sorted({key for row in table for key in row if key.startswith("val_") and not key.endswith("_std")})
    print("| run | seeds | " + " | ".join(metrics) + " | memory ratio |")
    print("|---|---|" + "---|" * len(metrics) + "---|")
    for row in table:
        cells = [f"{row[key]:.4f} ± {row[key + '_std']:.4f}" if key in row else "" for key in metrics]
        print(f"| {row['variant']} | {row['seeds']} | " + " | ".join(cells) + f" | {row['memory_ratio']:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", required=True, help="names in configs/ (without .yaml)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--ranks", nargs="*", type=float, default=[], help="extra ranks for LoRAct configs")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time")
    parser.add_argument("--logs", type=Path, default=ROOT / "benchmarks" / "results" / "accuracy_logs")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "accuracy.json")
    parser.add_argument("extra", nargs="*", help="passed to every run, e.g. --trainer.accelerator=cuda")
    args, unknown = parser.parse_known_args()
    extra = args.extra + unknown
    configs = {}
    for name in args.configs:
        path = ROOT / "configs" / f"{name}.yaml"
        if not path.is_file():
            known = sorted(p.stem for p in path.parent.glob("*.yaml"))
            parser.error(f"--configs: no configs/{name}.yaml; choose from {known}")
        configs[name] = yaml.safe_load(path.read_text())
    runs = []
    for name, config in configs.items():
        ranks = [None] + (args.ranks if has_loract(config) else [])
        runs += [Run(name, rank, seed) for rank in ranks for seed in args.seeds]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)

    def fit(run: Run) -> tuple[Run, dict]:
        config = configs[run.config] if run.rank is None else with_rank(configs[run.config], run.rank)
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
    print_table(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"runs": per_run, "summary": table}, indent=2))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
